//! Where a session goes. Its route comes from, in order of precedence: the
//! `keelson.route` setting the client sent at startup (taken out of the
//! startup message before PostgreSQL sees it), the first matching rule of
//! the configuration, or the default route of the listener it connected
//! to. The backend is then chosen from the current view: the primary, or
//! the replica with the fewest sessions among those fresh enough.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::stream::ServerStream;
use bytes::{Bytes, BytesMut};
use ipnet::IpNet;
use tokio::time::Instant;

use crate::error::SessionError;
use crate::fence::{Fence, Role};
use crate::protocol::{self, StartupMessage};
use crate::proxy::Shared;
use crate::view::{Backend, Replica, View, ViewHandle};

/// The name of the setting that picks a session's route:
/// `options='-c keelson.route=replica'`, or a startup parameter.
pub const ROUTE_SETTING: &str = "keelson.route";

/// What kind of server a session wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Route {
    /// The primary (read-write). The default.
    #[default]
    Primary,
    /// A standby that is fresh enough; never the primary.
    Replica,
    /// A fresh standby if there is one, else the primary.
    PreferReplica,
    /// Whichever server has the fewest sessions: the primary or a fresh
    /// standby.
    Any,
}

impl Route {
    pub const ALL: [Route; 4] = [
        Route::Primary,
        Route::Replica,
        Route::PreferReplica,
        Route::Any,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Route::Primary => "primary",
            Route::Replica => "replica",
            Route::PreferReplica => "prefer-replica",
            Route::Any => "any",
        }
    }

    pub fn parse(s: &str) -> Option<Route> {
        Route::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether the server must be a standby (`Some(true)`), must be the
    /// primary (`Some(false)`), or may be either.
    pub(crate) fn wants_standby(self) -> Option<bool> {
        match self {
            Route::Primary => Some(false),
            Route::Replica => Some(true),
            Route::PreferReplica | Route::Any => None,
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A configured rule: sessions that match every given field take `route`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    pub database: Option<String>,
    pub user: Option<String>,
    pub application_name: Option<String>,
    /// The client's network (its real address when PROXY protocol is on).
    pub source: Option<IpNet>,
    pub route: Route,
}

impl Rule {
    pub fn matches(&self, msg: &StartupMessage, client: Option<IpAddr>) -> bool {
        let field = |want: &Option<String>, got: Option<&[u8]>| {
            want.as_deref().is_none_or(|w| got == Some(w.as_bytes()))
        };
        field(&self.database, msg.database())
            && field(&self.user, msg.user())
            && field(&self.application_name, msg.param("application_name"))
            && self
                .source
                .is_none_or(|net| client.is_some_and(|ip| net.contains(&ip)))
    }
}

/// How stale a replica may be and still take new sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagLimit {
    /// WAL bytes not yet replayed, against the primary's position.
    pub bytes: u64,
    /// Time since the last replayed transaction, while behind.
    pub time: Duration,
}

impl Default for LagLimit {
    fn default() -> Self {
        LagLimit {
            bytes: 16 * 1024 * 1024,
            time: Duration::from_secs(10),
        }
    }
}

impl LagLimit {
    /// Whether `r` may take new sessions: streaming and within both limits.
    pub fn admits(&self, r: &Replica) -> bool {
        r.streaming && r.lag_bytes <= self.bytes && r.lag.is_none_or(|l| l <= self.time)
    }
}

/// Startup parameters, name and value, in order, as the client's bytes.
pub type Params = Vec<(Bytes, Bytes)>;

/// Why the `keelson.route` setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value for {ROUTE_SETTING}: {0:?}; use primary, replica, prefer-replica or any")]
pub struct BadRoute(pub String);

/// Takes the `keelson.route` setting out of a startup message's
/// parameters: from `options` (`-c keelson.route=X`, `-ckeelson.route=X`
/// or `--keelson.route=X`) or from a parameter of that name. Returns the
/// route and the parameters without it (every other byte as the client sent
/// it), or `None` if it was not given.
pub fn take_route_setting(params: &[(Bytes, Bytes)]) -> Result<Option<(Route, Params)>, BadRoute> {
    let mut found: Option<Vec<u8>> = None;
    let mut out = Vec::with_capacity(params.len());
    for (k, v) in params {
        if k.as_ref() == ROUTE_SETTING.as_bytes() {
            found = Some(v.to_vec());
            continue;
        }
        if k.as_ref() == b"options" {
            let (value, rest) = take_from_options(v);
            if let Some(value) = value {
                found = Some(value);
                if !rest.is_empty() {
                    out.push((k.clone(), Bytes::from(rest)));
                }
                continue;
            }
        }
        out.push((k.clone(), v.clone()));
    }
    match found {
        None => Ok(None),
        Some(v) => {
            let text = String::from_utf8_lossy(&v);
            match Route::parse(text.trim()) {
                Some(r) => Ok(Some((r, out))),
                None => Err(BadRoute(text.into_owned())),
            }
        }
    }
}

/// Splits `options` the way PostgreSQL does (`pg_split_opts`: ASCII
/// whitespace separates, a backslash escapes the next byte), removes the
/// route setting, and joins the rest back with the same escaping. Works on
/// bytes, as PostgreSQL does: other bytes pass unchanged.
fn take_from_options(options: &[u8]) -> (Option<Vec<u8>>, Vec<u8>) {
    let mut words: Vec<Vec<u8>> = Vec::new();
    let mut bytes = options.iter().copied().peekable();
    loop {
        while bytes.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            bytes.next();
        }
        if bytes.peek().is_none() {
            break;
        }
        let mut w = Vec::new();
        while let Some(c) = bytes.next() {
            match c {
                c if c.is_ascii_whitespace() => break,
                b'\\' => {
                    if let Some(n) = bytes.next() {
                        w.push(n);
                    }
                }
                c => w.push(c),
            }
        }
        words.push(w);
    }
    let setting = |w: &[u8]| -> Option<Vec<u8>> {
        let eq = w.iter().position(|&b| b == b'=')?;
        let name: Vec<u8> = w[..eq]
            .iter()
            .map(|&b| if b == b'-' { b'_' } else { b })
            .collect();
        (name == ROUTE_SETTING.as_bytes()).then(|| w[eq + 1..].to_vec())
    };
    let mut found = None;
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let w = &words[i][..];
        if w == b"-c" {
            if let Some(v) = words.get(i + 1).and_then(|n| setting(n)) {
                found = Some(v);
                i += 2;
                continue;
            }
        } else if let Some(v) = w
            .strip_prefix(b"-c")
            .or_else(|| w.strip_prefix(b"--"))
            .and_then(setting)
        {
            found = Some(v);
            i += 1;
            continue;
        }
        kept.push(w);
        i += 1;
    }
    let mut joined = Vec::with_capacity(options.len());
    for (n, w) in kept.iter().enumerate() {
        if n > 0 {
            joined.push(b' ');
        }
        for &c in *w {
            if c == b'\\' || c.is_ascii_whitespace() {
                joined.push(b'\\');
            }
            joined.push(c);
        }
    }
    (found, joined)
}

/// The route of a session: its own setting, else the first matching rule,
/// else the listener's default.
pub fn resolve(
    explicit: Option<Route>,
    rules: &[Rule],
    msg: &StartupMessage,
    client: Option<IpAddr>,
    listener_default: Route,
) -> Route {
    explicit
        .or_else(|| {
            rules
                .iter()
                .find(|r| r.matches(msg, client))
                .map(|r| r.route)
        })
        .unwrap_or(listener_default)
}

/// Where a route sends a new session in `view`, if anywhere.
/// `sessions(addr)` counts the sessions a backend has now; replicas in
/// `unreachable` (this session could not connect to them) are skipped.
pub fn pick<'v>(
    view: &'v View,
    route: Route,
    limit: &LagLimit,
    sessions: impl Fn(&Backend) -> usize,
    unreachable: &[Backend],
) -> Option<Pick<'v>> {
    let replica = || {
        view.replicas
            .iter()
            .filter(|r| replica_admitted(view, r, limit) && !unreachable.contains(&r.backend))
            .min_by_key(|r| sessions(&r.backend))
    };
    let primary = view.primary.as_ref().map(|b| Pick {
        backend: b,
        standby: false,
    });
    let standby = |r: &'v Replica| Pick {
        backend: &r.backend,
        standby: true,
    };
    match route {
        Route::Primary => primary,
        Route::Replica => replica().map(standby),
        Route::PreferReplica => replica().map(standby).or(primary),
        Route::Any => match (replica(), primary) {
            (Some(r), Some(p)) if sessions(p.backend) < sessions(&r.backend) => Some(p),
            (Some(r), _) => Some(standby(r)),
            (None, p) => p,
        },
    }
}

/// A backend chosen for a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick<'v> {
    pub backend: &'v Backend,
    /// Chosen as a standby (from the replicas).
    pub standby: bool,
}

/// What a session asked for, once its startup message was read.
pub(crate) struct Plan<'s> {
    pub route: Route,
    /// The cluster it goes to: its SNI name's, or the proxy's own.
    pub view: &'s ViewHandle,
    /// Without `keelson.route`, every other byte as the client sent it.
    pub message: StartupMessage,
}

/// Step 4 of a session: takes the route setting out of the startup
/// message, then resolves the route (setting, rule, listener default) and
/// the cluster (the SNI name's, or the proxy's).
pub(crate) fn plan<'s>(
    shared: &'s Shared,
    server_name: Option<&str>,
    message: StartupMessage,
    client: SocketAddr,
    listener_default: Route,
) -> Result<Plan<'s>, SessionError> {
    let (explicit, message) = match take_route_setting(&message.params)? {
        None => (None, message),
        Some((r, params)) => {
            let mut raw = BytesMut::new();
            protocol::encode_startup(&mut raw, message.minor, &params, |_| false);
            let message = StartupMessage {
                params,
                raw: raw.freeze(),
                ..message
            };
            (Some(r), message)
        }
    };
    let route = resolve(
        explicit,
        &shared.rules.load(),
        &message,
        Some(client.ip()),
        listener_default,
    );
    let view = server_name
        .and_then(|n| shared.cfg.server_names.get(n))
        .unwrap_or(&shared.view);
    let span = tracing::Span::current();
    let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
    span.record("user", text(message.user()));
    span.record("database", text(message.database()));
    span.record("route", route.as_str());
    Ok(Plan {
        route,
        view,
        message,
    })
}

/// A session's connection to the backend it was routed to.
pub(crate) struct Connected {
    pub backend: Backend,
    /// Taken before connecting, so a fence fired from then on ends the
    /// session.
    pub fence: Arc<Fence>,
    pub server: ServerStream,
    /// A primary session of a view with a deadline: it stops forwarding
    /// once the deadline passes.
    pub deadline: bool,
    /// Chosen among the replicas.
    pub standby: bool,
}

impl Connected {
    /// Whether the view still routes new sessions of this kind to this
    /// backend (a fence that fired because the view changed: no).
    pub(crate) fn still_routable(&self, shared: &Shared, plan: &Plan<'_>) -> bool {
        let view = plan.view.load();
        !plan.view.deadline().passed()
            && still_routable(&view, &self.backend, self.standby, &shared.cfg.replica_lag)
    }
}

/// Step 5 of a session: picks a backend ([`route_session`]), then connects
/// to it unless its fence fires first. A replica that cannot be reached is
/// skipped for the next one (or the primary, for prefer-replica and any):
/// nothing has been sent yet.
///
/// `held_since` is when the session began to be held, if it already is (a
/// retry after a server refused it): the hold timeout counts from then.
pub(crate) async fn connect(
    shared: &Shared,
    plan: &Plan<'_>,
    held_since: Option<Instant>,
) -> Result<Connected, SessionError> {
    if shared.terminating.load(Ordering::Acquire) {
        return Err(SessionError::ShuttingDown);
    }
    let mut unreachable = Vec::new();
    let mut last_error = None;
    loop {
        let routed = route_session(shared, plan.view, plan.route, &unreachable, held_since);
        let Some(r) = routed.await? else {
            return Err(last_error.unwrap_or(SessionError::NoReplicaAfter(Duration::ZERO)));
        };
        // Connecting can hang on a server that is hung itself; a fence
        // (the primary changed) ends the wait at once.
        let connect = async {
            let t0 = Instant::now();
            let s = crate::backend::connect(
                r.backend.addr(),
                shared.cfg.connect_timeout,
                &shared.cfg.socket,
            )
            .await?;
            let per_cluster = &shared.cfg.cluster_backend_tls;
            let tls = match (!per_cluster.is_empty())
                .then(|| per_cluster.get(plan.view.name()))
                .flatten()
            {
                Some(t) => t,
                None => &shared.cfg.backend_tls,
            };
            let s = match tls {
                None => ServerStream::Plain(s),
                Some(tls) => {
                    crate::backend::secure(s, r.backend.addr(), tls, shared.cfg.connect_timeout)
                        .await?
                }
            };
            shared.metrics.backend_connect(t0.elapsed());
            Ok(s)
        };
        match until_fenced(&r.fence, connect).await {
            Ok(server) => {
                return Ok(Connected {
                    backend: r.backend,
                    fence: r.fence,
                    server,
                    deadline: r.deadline,
                    standby: r.standby,
                })
            }
            // The view changed while connecting: nothing was sent yet, so
            // route again with the view as it is now.
            Err(SessionError::FencedWhileConnecting)
                if !still_routable(
                    &plan.view.load(),
                    &r.backend,
                    r.standby,
                    &shared.cfg.replica_lag,
                ) =>
            {
                continue;
            }
            Err(
                e @ (SessionError::BackendConnect { .. }
                | SessionError::BackendConnectTimeout { .. }),
            ) if r.standby => {
                tracing::info!(backend = %r.backend, error = %e, "replica unreachable; trying another server");
                unreachable.push(r.backend);
                last_error = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Runs `work` unless and until `fence` fires.
pub(crate) async fn until_fenced<T>(
    fence: &Fence,
    work: impl std::future::Future<Output = Result<T, SessionError>>,
) -> Result<T, SessionError> {
    let notified = fence.notified();
    let mut notified = std::pin::pin!(notified);
    notified.as_mut().enable();
    if fence.is_fired() {
        return Err(SessionError::FencedWhileConnecting);
    }
    // A fence that fired wins over work that finished in the same poll
    // (the work can finish after the fence was looked at, within one poll,
    // while another thread fires it): it is looked at again.
    tokio::select! {
        biased;
        _ = notified => Err(SessionError::FencedWhileConnecting),
        r = work => {
            if fence.is_fired() {
                Err(SessionError::FencedWhileConnecting)
            } else {
                r
            }
        }
    }
}

/// [`until_fenced`], except that once `committed()` holds, a switchover's
/// drain (the old primary serves on until its sessions end) lets `work`
/// finish; any other fence still stops it.
pub(crate) async fn until_fenced_unless_draining<T>(
    fence: &Fence,
    committed: impl Fn() -> bool,
    work: impl std::future::Future<Output = Result<T, SessionError>>,
) -> Result<T, SessionError> {
    let mut work = std::pin::pin!(work);
    let notified = fence.notified();
    let mut notified = std::pin::pin!(notified);
    notified.as_mut().enable();
    if !fence.is_fired() {
        tokio::select! {
            // The fence first, and again once the work finished (see
            // until_fenced).
            biased;
            _ = notified => {}
            r = &mut work => {
                if !fence.is_fired() || draining(fence, &committed) {
                    return r;
                }
                return Err(SessionError::FencedWhileConnecting);
            }
        }
    }
    if draining(fence, &committed) {
        return work.await;
    }
    Err(SessionError::FencedWhileConnecting)
}

/// A switchover's drain lets a session the client has seen set up finish.
fn draining(fence: &Fence, committed: &impl Fn() -> bool) -> bool {
    committed() && fence.reason().is_some_and(|r| r.drain)
}

/// Where a session was routed.
struct Routed {
    backend: Backend,
    fence: Arc<Fence>,
    /// Chosen among the replicas.
    standby: bool,
    deadline: bool,
}

/// Whether `backend`, chosen as a standby or as the primary, may still
/// take a new session in `view`: the same test [`pick`] applies.
fn still_routable(view: &View, backend: &Backend, standby: bool, limit: &LagLimit) -> bool {
    if standby {
        view.replicas
            .iter()
            .any(|r| &r.backend == backend && replica_admitted(view, r, limit))
    } else {
        view.primary.as_ref() == Some(backend)
    }
}

/// Whether replica `r` of `view` takes new sessions: within the lag limit,
/// and not the primary itself.
fn replica_admitted(view: &View, r: &Replica, limit: &LagLimit) -> bool {
    limit.admits(r) && Some(&r.backend) != view.primary.as_ref()
}

/// Picks a backend for `route` from the current view, skipping replicas in
/// `unreachable`, and takes its fence. While there is none it holds the
/// client for up to the hold timeout, unless replicas were skipped: then
/// `None` (the caller reports why they were unreachable).
async fn route_session(
    shared: &Shared,
    view: &ViewHandle,
    route: Route,
    unreachable: &[Backend],
    mut held_since: Option<Instant>,
) -> Result<Option<Routed>, SessionError> {
    let limit = &shared.cfg.replica_lag;
    let sessions = |b: &Backend| shared.fences.sessions(b);
    // Only a held client needs to hear about view changes; the common path
    // takes no subscription.
    let mut changes = None;
    let deadline = view.deadline();
    loop {
        let chosen = {
            let current = view.load();
            // A view past its deadline routes nothing, whatever it names:
            // its owner could not confirm it in time.
            if deadline.passed() {
                None
            } else {
                pick(&current, route, limit, sessions, unreachable)
                    .map(|p| (p.backend.clone(), p.standby))
            }
        };
        if let Some((backend, standby)) = chosen {
            let role = if standby {
                Role::Standby
            } else {
                Role::Primary
            };
            let fence = shared.fences.for_backend(&backend, role);
            // The view may have changed between the load and taking the
            // fence; a fence fired in between would be missed. Whoever
            // changes the view stores it before fencing, so re-reading it
            // settles the race.
            if !deadline.passed() && still_routable(&view.load(), &backend, standby, limit) {
                if let Some(t) = held_since {
                    shared
                        .metrics
                        .held(t.elapsed(), "released", route, view.name_label());
                }
                shared.metrics.routed(route, standby);
                return Ok(Some(Routed {
                    backend,
                    fence,
                    standby,
                    deadline: !standby && deadline.is_set(),
                }));
            }
            continue;
        }
        if !unreachable.is_empty() {
            return Ok(None);
        }
        if shared.terminating.load(Ordering::Acquire) {
            return Err(SessionError::ShuttingDown);
        }
        let hold = view.hold_timeout().unwrap_or(shared.cfg.hold_timeout);
        let since = *held_since.get_or_insert_with(|| {
            tracing::debug!(hold = ?hold, "no server for the route; holding the client");
            Instant::now()
        });
        let changes = changes.get_or_insert_with(|| view.subscribe());
        changes.borrow_and_update();
        if !deadline.passed() && pick(&view.load(), route, limit, sessions, unreachable).is_some() {
            continue;
        }
        if tokio::time::timeout_at(since + hold, changes.changed())
            .await
            .is_err()
        {
            shared
                .metrics
                .held(since.elapsed(), "timed_out", route, view.name_label());
            return Err(match route {
                Route::Replica => SessionError::NoReplicaAfter(hold),
                _ if view.is_standby_cluster() => SessionError::StandbyCluster(hold),
                _ => SessionError::NoPrimaryAfter(hold),
            });
        }
    }
}

/// How long the backend connection of a fenced session stays open (idle:
/// nothing is read from or written to it) after its client was told.
///
/// Closing a backend connection makes its PostgreSQL process exit, which
/// costs the server about a millisecond of CPU. When a fence ends a thousand
/// sessions at once, closing their backends at once starves everything else
/// on a small host, the clients' reconnection to the new primary included:
/// measured here, 1000 fenced sessions took 1.4 s to close with immediate
/// backend closes and 0.08 s with this delay. No traffic can flow on a
/// lingering connection, so the delay costs nothing in safety.
pub const FENCED_BACKEND_LINGER: Duration = Duration::from_secs(1);

/// Closes a fenced session's backend connection after
/// [`FENCED_BACKEND_LINGER`].
#[cold]
pub(crate) fn linger_then_close(server: ServerStream) {
    tokio::spawn(async move {
        tokio::time::sleep(FENCED_BACKEND_LINGER).await;
        drop(server);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::Backend;

    fn params(p: &[(&str, &str)]) -> Params {
        p.iter()
            .map(|(k, v)| (Bytes::from(k.to_string()), Bytes::from(v.to_string())))
            .collect()
    }

    #[test]
    fn non_utf8_bytes_pass_the_route_setting_unchanged() {
        let p: Params = vec![
            (Bytes::from_static(b"user"), Bytes::from_static(b"u\xff")),
            (
                Bytes::from_static(b"options"),
                Bytes::from_static(b"-c keelson.route=replica -c x.y=\xe9\\ \xfe"),
            ),
            (
                Bytes::from_static(b"application_name"),
                Bytes::from_static(b"\xe9"),
            ),
        ];
        let (r, rest) = take_route_setting(&p).unwrap().unwrap();
        assert_eq!(r, Route::Replica);
        assert_eq!(
            rest,
            vec![
                (Bytes::from_static(b"user"), Bytes::from_static(b"u\xff")),
                (
                    Bytes::from_static(b"options"),
                    Bytes::from_static(b"-c x.y=\xe9\\ \xfe")
                ),
                (
                    Bytes::from_static(b"application_name"),
                    Bytes::from_static(b"\xe9")
                ),
            ]
        );
    }

    #[test]
    fn route_setting_is_taken_out_of_options() {
        let cases: &[(&str, Option<Route>, Option<&str>)] = &[
            ("-c keelson.route=replica", Some(Route::Replica), None),
            ("-ckeelson.route=any", Some(Route::Any), None),
            (
                "--keelson.route=prefer-replica",
                Some(Route::PreferReplica),
                None,
            ),
            (
                "-c statement_timeout=5s -c keelson.route=replica -c search_path=a\\ b",
                Some(Route::Replica),
                Some("-c statement_timeout=5s -c search_path=a\\ b"),
            ),
            (
                "-c statement_timeout=5s",
                None,
                Some("-c statement_timeout=5s"),
            ),
        ];
        for (opts, route, rest) in cases {
            let p = params(&[("user", "u"), ("options", opts)]);
            let got = take_route_setting(&p).unwrap();
            match route {
                None => assert!(got.is_none(), "{opts}"),
                Some(r) => {
                    let (got_r, got_p) = got.unwrap();
                    assert_eq!(got_r, *r, "{opts}");
                    let want: Params = match rest {
                        Some(rest) => params(&[("user", "u"), ("options", rest)]),
                        None => params(&[("user", "u")]),
                    };
                    assert_eq!(got_p, want, "{opts}");
                }
            }
        }
        let direct = params(&[("user", "u"), ("keelson.route", "replica")]);
        assert_eq!(
            take_route_setting(&direct).unwrap(),
            Some((Route::Replica, params(&[("user", "u")])))
        );
        let bad = params(&[("options", "-c keelson.route=nowhere")]);
        assert_eq!(
            take_route_setting(&bad).unwrap_err(),
            BadRoute("nowhere".into())
        );
    }

    fn replica(addr: &str, lag_bytes: u64, streaming: bool) -> Replica {
        Replica {
            backend: Backend::new(addr),
            lag_bytes,
            lag: None,
            streaming,
        }
    }

    #[test]
    fn replicas_are_chosen_fresh_and_least_loaded() {
        let view = View {
            generation: 1,
            primary: Some(Backend::new("p:1")),
            replicas: vec![
                replica("r1:1", 0, true),
                replica("r2:1", 100, true),
                replica("lagging:1", 1 << 30, true),
                replica("stopped:1", 0, false),
            ],
        };
        let limit = LagLimit::default();
        let load = |b: &Backend| match b.addr() {
            "r1:1" => 5,
            "r2:1" => 2,
            "p:1" => 1,
            _ => 0,
        };
        let addr = |p: Option<Pick>| p.map(|p| p.backend.addr().to_owned());
        assert_eq!(
            addr(pick(&view, Route::Primary, &limit, load, &[])),
            Some("p:1".into())
        );
        assert_eq!(
            addr(pick(&view, Route::Replica, &limit, load, &[])),
            Some("r2:1".into())
        );
        assert_eq!(
            addr(pick(&view, Route::Any, &limit, load, &[])),
            Some("p:1".into())
        );
        let no_fresh = View {
            replicas: vec![replica("lagging:1", 1 << 30, true)],
            ..view.clone()
        };
        assert_eq!(pick(&no_fresh, Route::Replica, &limit, load, &[]), None);
        assert_eq!(
            addr(pick(&no_fresh, Route::PreferReplica, &limit, load, &[])),
            Some("p:1".into())
        );
        let slow = View {
            replicas: vec![Replica {
                lag: Some(Duration::from_secs(60)),
                ..replica("r1:1", 0, true)
            }],
            ..view
        };
        assert_eq!(pick(&slow, Route::Replica, &limit, load, &[]), None);
    }

    #[test]
    fn rules_match_every_given_field() {
        let msg = StartupMessage {
            major: 3,
            minor: 0,
            params: params(&[
                ("user", "app"),
                ("database", "shop"),
                ("application_name", "report"),
            ]),
            raw: Default::default(),
        };
        let rule = Rule {
            user: Some("app".into()),
            application_name: Some("report".into()),
            route: Route::Replica,
            ..Default::default()
        };
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert!(rule.matches(&msg, Some(ip)));
        let other_db = Rule {
            database: Some("crm".into()),
            ..rule.clone()
        };
        assert!(!other_db.matches(&msg, Some(ip)));
        let net = Rule {
            source: Some("10.1.0.0/16".parse().unwrap()),
            ..rule.clone()
        };
        assert!(net.matches(&msg, Some(ip)));
        assert!(!net.matches(&msg, Some("10.2.0.1".parse().unwrap())));
        assert_eq!(
            resolve(
                None,
                &[other_db.clone(), net.clone()],
                &msg,
                Some(ip),
                Route::Primary
            ),
            Route::Replica
        );
        assert_eq!(
            resolve(Some(Route::Any), &[net], &msg, Some(ip), Route::Primary),
            Route::Any,
            "the session's own setting wins"
        );
        assert_eq!(
            resolve(None, &[other_db], &msg, Some(ip), Route::Primary),
            Route::Primary
        );
    }
}
