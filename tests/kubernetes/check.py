#!/usr/bin/env python3
"""What can be proven about keelson on Kubernetes without a cluster.

Run by scripts/test (through tests/kubernetes/run, which makes its venv):

  chart      `helm lint`; `helm template` with default values equals
             deploy/kubernetes/keelson.yaml byte for byte.
  schema     every rendered object (defaults, and the chart with an
             external etcd) validates strictly against the Kubernetes
             OpenAPI schema (kubernetes-validate).
  kustomize  `kubectl kustomize deploy/kubernetes` gives the same objects.
  timers     the relations between the manifests' timers that a drain
             depends on (switchover wait < grace, proxy delay + grace <
             its grace), and the image's user is the pods' runAsUser.
  image      the OCI image of deploy/image/build has the configuration the
             Containerfile declares.
  pods       the image run with podman: an etcd, `keelson ctl init` as
             docs/kubernetes.md runs it, three keepers, a sentinel and a
             proxy, each with the arguments, environment, volumes, user and
             IP the rendered manifests give its pod; every probe of the
             manifests polled with its own timings; a SIGTERM of the
             primary's container (what a node drain sends) under a write
             load through the proxy: no client error; then a SIGKILL of the
             primary's container: the acknowledged write survives.

Usage: check.py [STEP...]   (default: every step)
"""

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CHART = os.path.join(ROOT, "deploy", "helm", "keelson")
PLAIN = os.path.join(ROOT, "deploy", "kubernetes")
OCI = os.path.join(ROOT, "target", "image", "oci")
IMAGE = "localhost/keelson:dev"
K8S_VERSIONS = ["1.30.0", "1.32.0"]
# The test's pod network (podman's bridge, this machine only).
NET, SUBNET, PREFIX = "keelson-k8s-test", "10.89.77.0/24", "10.89.77."


def log(msg):
    print(f"[check] {msg}", flush=True)


def run(cmd, check=True, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def tool(name, env):
    path = os.environ.get(env) or shutil.which(name)
    if not path:
        raise AssertionError(f"{name} not found (set {env}); tests/kubernetes/run installs it")
    return path


def helm_template(*sets):
    args = [tool("helm", "HELM"), "template", "keelson", CHART]
    for s in sets:
        args += ["--set", s]
    return run(args).stdout


def objects(text):
    return {
        (d["kind"], d["metadata"]["name"]): d
        for d in yaml.safe_load_all(text)
        if d
    }


# --- chart -----------------------------------------------------------------

def step_chart():
    run([tool("helm", "HELM"), "lint", CHART])
    rendered = helm_template()
    with open(os.path.join(PLAIN, "keelson.yaml")) as f:
        plain = f.read()
    body = "".join(plain.splitlines(keepends=True)[2:])
    if body != rendered:
        raise AssertionError(
            "deploy/kubernetes/keelson.yaml differs from the chart's default rendering; "
            "run deploy/kubernetes/regenerate"
        )
    kinds = sorted(k for k, _ in objects(rendered))
    log(f"chart: {len(kinds)} objects, equal to the plain YAML: {', '.join(kinds)}")


def step_schema():
    validate = tool("kubernetes-validate", "KUBERNETES_VALIDATE")
    with tempfile.TemporaryDirectory() as d:
        files = []
        for name, sets in [
            ("default", []),
            ("external-etcd", ["etcd.enabled=false", "store=etcd://etcd-0.etcd:2379",
                               "keeper.storage.storageClassName=fast", "keeper.replicas=5"]),
        ]:
            p = os.path.join(d, f"{name}.yaml")
            with open(p, "w") as f:
                f.write(helm_template(*sets))
            files.append(p)
        for v in K8S_VERSIONS:
            r = run([validate, "--strict", "--quiet", "-k", v, *files], check=False)
            if r.returncode != 0:
                raise AssertionError(f"schema {v}:\n{r.stdout}{r.stderr}")
    # Without a store the chart refuses to render, with a reason.
    r = run([tool("helm", "HELM"), "template", "keelson", CHART, "--set", "etcd.enabled=false"],
            check=False)
    assert r.returncode != 0 and "set store" in r.stderr, r.stderr
    log(f"schema: strict validation passed against Kubernetes {', '.join(K8S_VERSIONS)}")


def step_kustomize():
    r = run([tool("kubectl", "KUBECTL"), "kustomize", PLAIN])
    got, want = objects(r.stdout), objects(helm_template())
    if got != want:
        raise AssertionError(
            f"kubectl kustomize differs: only there {sorted(set(got) - set(want))}, "
            f"missing {sorted(set(want) - set(got))}, changed "
            f"{sorted(k for k in got.keys() & want.keys() if got[k] != want[k])}"
        )
    log(f"kustomize: {len(got)} objects, the same as the chart's")


# --- timers ----------------------------------------------------------------

def seconds(s):
    m = re.fullmatch(r"(\d+)s", str(s))
    assert m, f"{s!r}: write durations as seconds, such as 45s"
    return int(m.group(1))


def pod_spec(objs, kind, name):
    return objs[(kind, name)]["spec"]["template"]["spec"]


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def step_timers():
    objs = objects(helm_template())
    keeper = pod_spec(objs, "StatefulSet", "keelson-keeper")
    k_env = env_of(keeper["containers"][0])
    wait = seconds(k_env["KEELSON_STOP_SWITCHOVER_TIMEOUT"])
    grace = keeper["terminationGracePeriodSeconds"]
    # The keeper must stop PostgreSQL itself (a checkpoint, ~seconds)
    # before the kubelet's SIGKILL.
    assert wait + 10 <= grace, f"keeper: switchover wait {wait}s + 10s > grace {grace}s"
    proxy = pod_spec(objs, "Deployment", "keelson-proxy")
    p_env = env_of(proxy["containers"][0])
    delay, p_grace = seconds(p_env["KEELSON_SHUTDOWN_DELAY"]), seconds(p_env["KEELSON_SHUTDOWN_GRACE"])
    pod_grace = proxy["terminationGracePeriodSeconds"]
    assert delay + p_grace < pod_grace, f"proxy: delay {delay}s + grace {p_grace}s >= {pod_grace}s"
    # The Service must drop the proxy within its delay: readiness fails
    # after period * failureThreshold seconds.
    rp = proxy["containers"][0]["readinessProbe"]
    assert rp["periodSeconds"] * rp["failureThreshold"] < delay, rp
    for kind, name in [("StatefulSet", "keelson-keeper"), ("Deployment", "keelson-sentinel"),
                       ("Deployment", "keelson-proxy")]:
        sc = pod_spec(objs, kind, name)["securityContext"]
        assert sc["runAsNonRoot"] and sc["runAsUser"] == 999 == sc["fsGroup"], (name, sc)
    log(f"timers: keeper wait {wait}s < grace {grace}s; proxy delay {delay}s + grace {p_grace}s "
        f"< {pod_grace}s; readiness drops in {rp['periodSeconds'] * rp['failureThreshold']}s")


# --- image -----------------------------------------------------------------

def oci_config():
    with open(os.path.join(OCI, "index.json")) as f:
        index = json.load(f)
    def blob(digest):
        algo, h = digest.split(":")
        with open(os.path.join(OCI, "blobs", algo, h)) as f:
            return json.load(f)
    m = next(m for m in index["manifests"]
             if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == "keelson:dev")
    return blob(blob(m["digest"])["config"]["digest"])["config"]


def containerfile():
    out = {"Env": []}
    with open(os.path.join(ROOT, "deploy", "image", "Containerfile")) as f:
        text = f.read().replace("\\\n", " ")
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ENV":
            out["Env"].append(rest.strip())
        elif word == "USER":
            out["User"] = rest.strip()
        elif word == "WORKDIR":
            out["WorkingDir"] = rest.strip()
        elif word == "ENTRYPOINT":
            out["Entrypoint"] = json.loads(rest)
        elif word == "CMD":
            out["Cmd"] = json.loads(rest)
    assert "deploy/image/packages deploy/image/setup-rootfs" in text, \
        "the Containerfile must install the same packages and run the same setup"
    return out


def step_image():
    if not os.path.exists(os.path.join(OCI, "index.json")):
        raise AssertionError("no image at target/image/oci; run deploy/image/build")
    got, want = oci_config(), containerfile()
    for k, v in want.items():
        g = got.get(k)
        if k == "Env":
            missing = [e for e in v if e not in g]
            assert not missing, f"image lacks {missing}; it has {g}"
        else:
            assert g == v, f"image {k} {g!r}, the Containerfile says {v!r}"
    log(f"image: user {got['User']}, entrypoint {' '.join(got['Entrypoint'])}, as the Containerfile")


# --- pods --------------------------------------------------------------------

class Probe(threading.Thread):
    """One container's probes as the kubelet runs them: the startup probe
    first, then liveness and readiness, each every periodSeconds with its
    timeoutSeconds, judged by failureThreshold."""

    def __init__(self, name, ip, container):
        super().__init__(daemon=True)
        self.name, self.ip = name, ip
        self.probes = {k: container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")
                       if k in container}
        self.ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        self.started = "startupProbe" not in self.probes
        self.ready = False
        self.restarts = []     # liveness (or startup) would have restarted it
        self.polls = {k: 0 for k in self.probes}
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def get(self, probe):
        h = probe["httpGet"]
        port = self.ports.get(h["port"], h["port"])
        try:
            with urllib.request.urlopen(f"http://{self.ip}:{port}{h['path']}",
                                        timeout=probe.get("timeoutSeconds", 1)) as r:
                return 200 <= r.status < 400
        except Exception:
            return False

    def loop(self, kind):
        p = self.probes[kind]
        fails = 0
        while not self.stop.is_set():
            if kind != "startupProbe" and not self.started:
                time.sleep(0.2)
                continue
            if kind == "startupProbe" and self.started:
                return
            ok = self.get(p)
            with self.lock:
                self.polls[kind] += 1
                fails = 0 if ok else fails + 1
                if kind == "startupProbe":
                    if ok:
                        self.started = True
                    elif fails >= p.get("failureThreshold", 3):
                        self.restarts.append((time.time(), "startup"))
                        fails = 0
                elif kind == "livenessProbe" and fails >= p.get("failureThreshold", 3):
                    self.restarts.append((time.time(), "liveness"))
                    fails = 0
                elif kind == "readinessProbe":
                    if ok:
                        self.ready = True
                    elif fails >= p.get("failureThreshold", 3):
                        self.ready = False
            self.stop.wait(p.get("periodSeconds", 10))

    def run(self):
        ts = [threading.Thread(target=self.loop, args=(k,), daemon=True) for k in self.probes]
        for t in ts:
            t.start()
        for t in ts:
            t.join()


class Pods:
    def __init__(self, tmp):
        self.tmp = tmp
        self.podman = [tool("podman", "PODMAN")]
        if shutil.which("runc"):
            # crun refuses this machine's hybrid cgroup hierarchy.
            self.podman += ["--runtime", shutil.which("runc")]
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
        nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[0], 32768)
        self.limits = ["--ulimit", f"nofile={nofile[0]}:{nofile[1]}",
                       "--ulimit", f"nproc={nproc}:{nproc}"]
        self.names, self.probes, self.plays = [], {}, []

    def pm(self, *args, check=True):
        return run(self.podman + list(args), check=check)

    def setup(self):
        self.teardown()
        self.pm("network", "create", "--subnet", SUBNET, NET)
        # The image just built, never one left in podman's storage.
        self.pm("rmi", "-f", IMAGE, check=False)
        image_id = self.pm("pull", "-q", f"oci:{OCI}:keelson:dev").stdout.split()[-1]
        self.pm("tag", image_id, IMAGE)
        digest = self.pm("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
        assert digest.startswith(image_id[:12]), (digest, image_id)

    def teardown(self):
        for path in self.plays:
            self.pm("kube", "down", path, check=False)
        for n in self.names:
            self.pm("rm", "-f", "-t", "0", n, check=False)
        for line in self.pm("ps", "-a", "--format", "{{.Names}}", check=False).stdout.split():
            if line.startswith("keelson-") or line.startswith("k8s-test-"):
                self.pm("rm", "-f", "-t", "0", line, check=False)
        self.pm("network", "rm", "-f", NET, check=False)

    def start(self, name, ip, container, pod_spec, volumes=(), extra=()):
        """Runs `container` of a rendered pod as the kubelet would: its
        args, its environment (fieldRefs and $(VAR) expanded), its user."""
        env, values = [], {}
        for e in container.get("env", []):
            if "valueFrom" in e:
                path = e["valueFrom"]["fieldRef"]["fieldPath"]
                v = {"metadata.name": name, "status.podIP": ip}[path]
            else:
                v = re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), m.group(0)), e["value"])
            values[e["name"]] = v
            env += ["-e", f"{e['name']}={v}"]
        sc = pod_spec.get("securityContext", {})
        user = f"{sc.get('runAsUser', 999)}:{sc.get('runAsGroup', 999)}"
        vols = []
        for host, path, ro in volumes:
            vols += ["-v", f"{host}:{path}{':ro' if ro else ''}"]
        self.pm("run", "-d", "--name", name, "--hostname", name, "--network", NET, "--ip", ip,
                *self.limits, "--user", user, *env, *vols, *extra,
                container.get("image", IMAGE), *container.get("args", []))
        if name not in self.names:
            self.names.append(name)
        if "livenessProbe" in container or "readinessProbe" in container:
            p = Probe(name, ip, container)
            p.start()
            self.probes[name] = p

    def kube_play(self, ip, obj):
        """Runs a rendered Deployment with `podman kube play`, one replica
        at `ip` on the test network, and starts its probes; returns its
        container's name."""
        obj = json.loads(json.dumps(obj))
        obj["spec"]["replicas"] = 1
        path = os.path.join(self.tmp, obj["metadata"]["name"] + ".json")
        with open(path, "w") as f:
            json.dump(obj, f)
        # kube play has no --ulimit (nor does the kubelet): the defaults
        # come from a containers.conf, with the runtime runc.
        conf = os.path.join(self.tmp, "containers.conf")
        with open(conf, "w") as f:
            f.write("[containers]\ndefault_ulimits = [%s]\n" % ", ".join(
                f'"{self.limits[i + 1]}"' for i in range(0, len(self.limits), 2)))
        env = {**os.environ, "CONTAINERS_CONF": conf}
        r = run(self.podman + ["kube", "play", "--network", NET, "--ip", ip, path], env=env)
        self.plays.append(path)
        container = obj["spec"]["template"]["spec"]["containers"][0]
        names = [n for n in self.pm("ps", "--format", "{{.Names}}").stdout.split()
                 if n.startswith(obj["metadata"]["name"]) and n.endswith("-" + container["name"])]
        assert len(names) == 1, (names, r.stdout)
        self.names.append(names[0])
        p = Probe(names[0], ip, container)
        p.start()
        self.probes[names[0]] = p
        return names[0]

    def logs(self, name):
        r = self.pm("logs", name, check=False)
        return r.stdout + r.stderr


def http(ip, port, path, timeout=2):
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}{path}", timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception:
        return 0


def wait(what, pred, limit):
    t = time.time()
    while time.time() - t < limit:
        if pred():
            return time.time() - t
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {limit}s")


class Writer(threading.Thread):
    """A client with a connection per write through the proxy (psql),
    one every 50 ms; every failure counts."""

    def __init__(self, conn):
        super().__init__(daemon=True)
        self.conn, self.acked, self.failed, self.i = conn, [], [], 0
        self.longest, self.longest_at = 0.0, 0.0
        self.stop = threading.Event()

    def run(self):
        psql = shutil.which("psql")
        while not self.stop.is_set():
            self.i += 1
            t = time.time()
            r = subprocess.run([psql, self.conn, "-XAtq", "-v", "ON_ERROR_STOP=1",
                                "-c", f"INSERT INTO t VALUES ({self.i})"],
                               capture_output=True, text=True, env={**os.environ, "PGCONNECT_TIMEOUT": "30"})
            if time.time() - t > self.longest:
                self.longest, self.longest_at = time.time() - t, t
            if r.returncode == 0:
                self.acked.append(self.i)
            else:
                self.failed.append(f"write {self.i}: {r.stderr.strip()}")
            self.stop.wait(0.05)


def sql(conn, q):
    r = run([shutil.which("psql"), conn, "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", q], check=False)
    return r.returncode, r.stdout.strip(), r.stderr.strip()


def step_pods():
    if os.geteuid() != 0:
        raise AssertionError("podman here needs root")
    etcd_ip = PREFIX + "10"
    objs = objects(helm_template(f"store=etcd://{etcd_ip}:2379", "etcd.enabled=false"))
    keeper_pod = pod_spec(objs, "StatefulSet", "keelson-keeper")
    proxy_pod = pod_spec(objs, "Deployment", "keelson-proxy")
    store_env = env_of(proxy_pod["containers"][0])
    tmp = tempfile.mkdtemp(prefix="keelson-k8s-")
    pods = Pods(tmp)
    passed = False
    try:
        pods.setup()
        etcd = shutil.which("etcd")
        pods.pm("run", "-d", "--name", "k8s-test-etcd", "--network", NET, "--ip", etcd_ip,
                *pods.limits, "-v", f"{etcd}:/usr/local/bin/etcd:ro", "--entrypoint",
                "/usr/local/bin/etcd", IMAGE, "--data-dir", "/tmp/etcd",
                "--listen-client-urls", "http://0.0.0.0:2379",
                "--advertise-client-urls", f"http://{etcd_ip}:2379",
                "--listen-peer-urls", "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                "--initial-cluster", "default=http://127.0.0.1:2380")
        pods.names.append("k8s-test-etcd")
        wait("etcd", lambda: http(etcd_ip, 2379, "/health") == 200, 30)
        # `keelson ctl init` in a pod, as docs/kubernetes.md runs it with
        # kubectl run: the image, the store's environment, `ctl init`.
        spec = os.path.join(tmp, "spec")
        os.makedirs(spec)
        with open(os.path.join(spec, "spec.json"), "w") as f:
            json.dump({"synchronous_replication": True}, f)
        pods.pm("run", "--rm", "--network", NET, *pods.limits,
                "-e", f"KEELSON_STORE={store_env['KEELSON_STORE']}",
                "-e", f"KEELSON_CLUSTER={store_env['KEELSON_CLUSTER']}",
                "-v", f"{spec}:/spec:ro", IMAGE, "ctl", "init", "--spec", "/spec/spec.json")
        secret = os.path.join(tmp, "secret")
        os.makedirs(secret)
        with open(os.path.join(secret, "password"), "w") as f:
            f.write("k8s-test-replication-secret\n")
        os.chmod(os.path.join(secret, "password"), 0o644)
        mounts = {m["name"]: m for m in keeper_pod["containers"][0]["volumeMounts"]}
        keepers = {}
        for i in range(3):
            name, ip = f"keelson-keeper-{i}", PREFIX + str(20 + i)
            data = os.path.join(tmp, name)
            os.makedirs(data)
            os.chown(data, 999, 999)
            keepers[name] = (ip, [(data, mounts["data"]["mountPath"], False),
                                  (secret, mounts["replication"]["mountPath"], True)])
        t0 = time.time()
        for name, (ip, vols) in keepers.items():
            pods.start(name, ip, keeper_pod["containers"][0], keeper_pod, vols)
        # The sentinel and the proxy: their rendered Deployments, run by
        # `podman kube play` (env, fieldRefs, user, probes as podman reads
        # them from the objects themselves).
        pods.kube_play(PREFIX + "30", objs[("Deployment", "keelson-sentinel")])
        proxy_ip = PREFIX + "40"
        proxy = pods.kube_play(proxy_ip, objs[("Deployment", "keelson-proxy")])
        wait("every keeper ready (primary or streaming standby)",
             lambda: all(pods.probes[n].ready for n in keepers), 240)
        wait("the proxy ready", lambda: pods.probes[proxy].ready, 60)
        log(f"pods: 3 keepers ready and the proxy serving {time.time() - t0:.1f}s after start")

        def primary():
            found = [n for n, (ip, _) in keepers.items()
                     if n in pods.names and http(ip, 8008, "/primary") == 200]
            return found[0] if len(found) == 1 else None

        first = primary()
        assert first, "no single primary"
        pods.pm("exec", first, "psql", "-h", "/var/lib/keelson/data", "-U", "postgres", "-XAtq",
                "-v", "ON_ERROR_STOP=1", "-c",
                "CREATE ROLE app LOGIN PASSWORD 'app-secret'; "
                "CREATE TABLE t (x int PRIMARY KEY); GRANT ALL ON t TO app")
        conn = f"host={proxy_ip} port=5432 user=app password=app-secret dbname=postgres"

        # A node drain: SIGTERM to the primary's container (tini forwards
        # it to the keeper), under a write load through the proxy.
        w = Writer(conn)
        w.start()
        time.sleep(2)
        t = time.time()
        pods.pm("stop", "-t", str(keeper_pod["terminationGracePeriodSeconds"]), first)
        stopped = time.time() - t
        at_stop = len(w.acked)
        wait("writes after the drain", lambda: len(w.acked) >= at_stop + 10, 60)
        w.stop.set()
        w.join()
        second = primary()
        keeper_log = pods.logs(first)
        log(f"pods: SIGTERM of {first}'s container: stopped after {stopped:.1f}s, primary now "
            f"{second}; {len(w.acked)} writes acknowledged, {len(w.failed)} failed, the longest "
            f"took {w.longest:.2f}s (started {w.longest_at - t:+.2f}s from the SIGTERM)")
        assert "switched over before stopping" in keeper_log, keeper_log[-3000:]
        assert not w.failed, f"clients saw errors across the drain: {w.failed[:5]}"
        assert second and second != first, second
        assert at_stop > 5 and len(w.acked) > at_stop + 5, \
            f"the writer did not run across the drain: {at_stop} before, {len(w.acked)} in all"
        code, out, err = sql(conn, "SELECT count(*) FROM t")
        assert code == 0 and int(out) >= len(w.acked), (code, out, err)
        missing = [x for x in w.acked
                   if sql(conn, f"SELECT 1 FROM t WHERE x = {x}")[1] != "1"][:5]
        assert not missing, f"acknowledged writes lost: {missing}"
        # The drained pod comes back (the StatefulSet recreates it) and
        # rejoins as a standby.
        pods.probes[first].stop.set()
        pods.pm("start", first)
        p = Probe(first, keepers[first][0], keeper_pod["containers"][0])
        p.start()
        pods.probes[first] = p
        wait(f"{first} back as a streaming standby", lambda: p.ready, 120)

        # A SIGKILL of the primary's container: an acknowledged write
        # survives (synchronous replication), writes resume on another.
        code, _, err = sql(conn, "INSERT INTO t VALUES (-1)")
        assert code == 0, err
        victim = primary()
        pods.probes[victim].stop.set()
        t = time.time()
        pods.pm("kill", "--signal", "KILL", victim)
        took = wait("a write through the proxy after the SIGKILL",
                    lambda: sql(conn, "INSERT INTO t VALUES (-2)")[0] == 0, 120)
        code, out, err = sql(conn, "SELECT count(*) FROM t WHERE x = -1")
        assert code == 0 and out == "1", f"the acknowledged write is lost: {out} {err}"
        log(f"pods: SIGKILL of {victim}'s container: writes resumed after {took:.1f}s on "
            f"{primary()}; the acknowledged write survived")

        for name, p in pods.probes.items():
            restarts = [r for r in p.restarts if name not in (victim,)]
            assert not restarts, f"{name}: its probes would have restarted it: {restarts}"
        polled = {n: dict(p.polls) for n, p in pods.probes.items()}
        log(f"pods: no probe would have restarted a container; polls {json.dumps(polled)}")
        passed = True
    finally:
        keep = os.environ.get("KEELSON_KEEP_LOGS") or not passed
        if keep:
            for n in pods.names:
                with open(os.path.join(tmp, f"{n}.log"), "w") as f:
                    f.write(pods.logs(n))
            log(f"pods: logs kept in {tmp}")
        for p in pods.probes.values():
            p.stop.set()
        pods.teardown()
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


STEPS = {"chart": step_chart, "schema": step_schema, "kustomize": step_kustomize,
         "timers": step_timers, "image": step_image, "pods": step_pods}


def main():
    names = sys.argv[1:] or list(STEPS)
    failed = []
    for n in names:
        t = time.time()
        try:
            STEPS[n]()
            log(f"{n}: ok ({time.time() - t:.1f}s)")
        except Exception as e:  # every step runs; all failures are reported
            failed.append(n)
            log(f"{n}: FAILED: {type(e).__name__}: {e}")
    if failed:
        log(f"failed: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
