//! The [`Proxy`] handle: its configuration, listeners, views and shutdown.
//! One session's life, accept to close, is in `session.rs`.
//!
//! Invariants kept here:
//! - a new view is stored before the sessions it removed are fenced
//!   ([`Proxy::apply`]), so no session can be routed to a backend the
//!   applied view no longer names (a session re-reads the view after taking
//!   its fence: `route.rs`);
//! - a view whose deadline has passed routes nothing, and its primary
//!   sessions forward nothing more;
//! - every connection counts against `max_connections` from accept to close.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::{Duration, Instant};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{field, Instrument};

use crate::backend::SocketOptions;
use crate::cancel::CancelRegistry;
use crate::error::{SessionError, ADMIN_SHUTDOWN};
use crate::fence::{Fence, FenceReason, Fences, Role};
use crate::handshake::{read_startup, Startup};
use crate::metrics::{self as m, Metrics};
use crate::route::{LagLimit, Route, Rule};
use crate::stream::{ClientStream, Prefixed};
use crate::view::{Backend, View, ViewHandle};

/// Runtime settings of the data path, already validated.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Time a client has to finish the startup phase (TLS included).
    pub startup_timeout: Duration,
    /// Time to open a TCP connection to a backend.
    pub connect_timeout: Duration,
    /// Time the backend and client have to finish authentication
    /// (PostgreSQL's `authentication_timeout` defaults to 60 s).
    pub auth_timeout: Duration,
    /// Client connections open at once, in any phase.
    pub max_connections: usize,
    pub socket: SocketOptions,
    /// TLS for clients; `None` answers `N` to SSLRequest.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// TLS for the connections to PostgreSQL; `None`: plain TCP.
    pub backend_tls: Option<crate::tls::BackendTls>,
    /// TLS to PostgreSQL for the clusters named here (by view name: the
    /// SNI routes' clusters, or the proxy's own), instead of `backend_tls`;
    /// a `None` value is plain TCP for that cluster.
    pub cluster_backend_tls: std::collections::HashMap<String, Option<crate::tls::BackendTls>>,
    /// Cancel requests forwarded per second, across all clients.
    pub cancel_rate_per_second: u32,
    /// How long a new client waits for a primary when the view has none,
    /// before it is refused with 57P03, unless its view has its own
    /// ([`ViewHandle::set_hold_timeout`], the cluster spec's).
    pub hold_timeout: Duration,
    /// Rules that pick a route by database, user, application name or
    /// client network; the first match wins over the listener's default.
    pub rules: Vec<Rule>,
    /// How far behind a replica may be and still take new sessions.
    pub replica_lag: LagLimit,
    /// End the sessions of a replica that falls beyond `replica_lag`, when
    /// a view saying so is applied ([`Proxy::apply`]).
    pub replica_lag_fence: bool,
    /// SNI routing: TLS sessions whose server name is a key here route by
    /// that cluster's view instead of the proxy's own.
    pub server_names: std::collections::HashMap<String, ViewHandle>,
    /// Send a refused client the full error, backend address and OS error
    /// text included, as the ErrorResponse detail. Off by default: clients
    /// that have not authenticated should not learn the network's layout.
    pub error_detail: bool,
}

/// Options of one listening socket.
#[derive(Debug, Clone, Default)]
pub struct ListenerOptions {
    /// The route of sessions that neither choose one nor match a rule.
    pub route: Route,
    /// PROXY protocol v2: `Some(networks)` requires the header from these
    /// networks and refuses it from any other; `None` (the default) is off.
    pub proxy_protocol: Option<Arc<[ipnet::IpNet]>>,
    /// How established plaintext sessions move their bytes.
    pub forwarding: ForwardingMode,
}

/// How a listener's established sessions move their bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardingMode {
    /// Through the proxy's own buffers (every session, TLS included).
    #[default]
    Userspace,
    /// Handed to the kernel (a BPF sockhash) after authentication, for
    /// plaintext TCP sessions where the kernel supports it; TLS sessions,
    /// and every session where it does not ([`kernel_forwarding`]), stay
    /// in user space.
    Kernel,
}

impl ForwardingMode {
    pub fn parse(s: &str) -> Option<ForwardingMode> {
        match s {
            "userspace" => Some(ForwardingMode::Userspace),
            "kernel" => Some(ForwardingMode::Kernel),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ForwardingMode::Userspace => "userspace",
            ForwardingMode::Kernel => "kernel",
        }
    }
}

/// Whether kernel forwarding works here, loading its programs on first
/// call: `Err` says why not (not Linux, no BPF, not privileged).
pub fn kernel_forwarding() -> Result<(), String> {
    #[cfg(target_os = "linux")]
    {
        crate::kernel::get().map(|_| ()).map_err(str::to_owned)
    }
    #[cfg(not(target_os = "linux"))]
    {
        Err("kernel forwarding needs Linux".to_owned())
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            startup_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            auth_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            socket: SocketOptions {
                keepalive: Some((Duration::from_secs(60), Duration::from_secs(10))),
            },
            tls: None,
            backend_tls: None,
            cluster_backend_tls: Default::default(),
            cancel_rate_per_second: 100,
            hold_timeout: Duration::from_secs(10),
            rules: Vec::new(),
            replica_lag: LagLimit::default(),
            replica_lag_fence: false,
            server_names: Default::default(),
            error_detail: false,
        }
    }
}

/// Connections over the limit are answered with 53300 by at most this many
/// tasks at once; beyond that they are closed without a word.
const MAX_REJECTING: usize = 256;
/// How long a refused client gets to send its startup packet so that it can
/// be told why it is refused.
const REJECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What every session of a proxy shares.
pub(crate) struct Shared {
    pub(crate) cfg: ProxyConfig,
    /// The TLS configuration for clients; swapped by [`Proxy::reload`]
    /// (sessions keep the one they started with).
    pub(crate) tls: arc_swap::ArcSwapOption<rustls::ServerConfig>,
    /// The routing rules; swapped by [`Proxy::reload`].
    pub(crate) rules: arc_swap::ArcSwap<Vec<Rule>>,
    pub(crate) view: ViewHandle,
    pub(crate) fences: Fences,
    pub(crate) cancel: Arc<CancelRegistry>,
    pub(crate) metrics: Metrics,
    active: AtomicUsize,
    rejecting: AtomicUsize,
    idle: Notify,
    stop_accepting: CancellationToken,
    /// Set by [`Proxy::shutdown`] once the grace period is over.
    pub(crate) terminating: AtomicBool,
    /// Sessions handed to the kernel so far.
    pub(crate) kernel_sessions: std::sync::atomic::AtomicU64,
    /// Sessions of kernel-forwarding listeners that stayed in user space.
    pub(crate) kernel_fallbacks: std::sync::atomic::AtomicU64,
}

/// A PostgreSQL proxy. Cheap to clone; clones share all state, so one
/// proxy can serve several listeners on several runtimes.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("active", &self.active_connections())
            .field("view", &self.shared.view)
            .finish()
    }
}

impl Shared {
    /// The TLS acceptor for a new connection, if TLS is on.
    pub(crate) fn acceptor(&self) -> Option<TlsAcceptor> {
        self.tls.load_full().map(TlsAcceptor::from)
    }
}

/// Counts a connection from accept to close.
pub(crate) struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.metrics.active(-1.0);
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Proxy {
    /// A proxy routing by `view`. It registers its metric handles with the
    /// recorder installed now: install the embedder's recorder first (the
    /// metrics are no-ops without one).
    pub fn new(cfg: ProxyConfig, view: ViewHandle) -> Self {
        let tls = arc_swap::ArcSwapOption::new(cfg.tls.clone());
        let rules = arc_swap::ArcSwap::from_pointee(cfg.rules.clone());
        let cancel = Arc::new(CancelRegistry::new(cfg.cancel_rate_per_second));
        Proxy {
            shared: Arc::new(Shared {
                cfg,
                tls,
                rules,
                view,
                fences: Fences::default(),
                cancel,
                metrics: Metrics::new(),
                active: AtomicUsize::new(0),
                rejecting: AtomicUsize::new(0),
                idle: Notify::new(),
                stop_accepting: CancellationToken::new(),
                terminating: AtomicBool::new(false),
                kernel_sessions: Default::default(),
                kernel_fallbacks: Default::default(),
            }),
        }
    }

    /// Takes a new TLS configuration for clients and new routing rules
    /// (a SIGHUP of the binary): connections accepted from now on use
    /// them; established sessions keep theirs and are not interrupted.
    pub fn reload(&self, tls: Option<Arc<rustls::ServerConfig>>, rules: Vec<Rule>) {
        self.shared.tls.store(tls);
        self.shared.rules.store(Arc::new(rules));
    }

    /// The view this proxy routes by.
    pub fn view(&self) -> &ViewHandle {
        &self.shared.view
    }

    /// Client connections open now, in any phase.
    pub fn active_connections(&self) -> usize {
        self.shared.active.load(Ordering::Acquire)
    }

    /// Sessions whose bytes the kernel moved (kernel forwarding), so far.
    pub fn kernel_sessions(&self) -> u64 {
        self.shared.kernel_sessions.load(Ordering::Relaxed)
    }

    /// Sessions of listeners with `forwarding = "kernel"` that forwarded
    /// in user space (TLS, bytes pending, the kernel unable), so far.
    pub fn kernel_fallbacks(&self) -> u64 {
        self.shared.kernel_fallbacks.load(Ordering::Relaxed)
    }

    /// Sessions whose cancel keys are known (established sessions).
    pub fn established_sessions(&self) -> usize {
        self.shared.cancel.len()
    }

    /// Ends every session routed to `backend` so far, in any role, with a
    /// FATAL carrying `reason`, at the next message boundary. Store the view
    /// that no longer names `backend` first (or use [`Proxy::apply`], which
    /// does both): sessions routed after this call then cannot reach it.
    /// Returns the fired fences, whose holders are the sessions still
    /// closing (see [`Fence::wait_released`]).
    pub fn fence_backend(&self, backend: &Backend, reason: FenceReason) -> Vec<Arc<Fence>> {
        self.shared.fences.fence_backend(backend, reason)
    }

    /// Applies a new view of one cluster: stores it in `handle` (the
    /// proxy's own view or one of its SNI views), then ends the sessions it
    /// no longer allows, each with a FATAL 57P01 saying why:
    /// - sessions on the former primary;
    /// - sessions on a standby that left the replica set (removed,
    ///   unhealthy, or promoted: a session routed to a standby must not
    ///   become read-write);
    /// - with `replica_lag_fence`, sessions on a replica that fell beyond
    ///   the lag limit.
    ///
    /// It also publishes the view's metrics. `change` says why the view
    /// changed, for the words the ended sessions are told. The order (store,
    /// then fence) keeps a session from being routed to a backend that the
    /// applied view no longer names: a session routed in between re-reads
    /// the view after taking its fence (see `route_session`).
    ///
    /// A view has one owner: calls for the same `handle` must not run
    /// concurrently (the store follower serialises its own).
    pub fn apply(&self, handle: &ViewHandle, view: View, change: ViewChange) -> Applied {
        let old = handle.load();
        if *old == view {
            return Applied::default();
        }
        let cfg = &self.shared.cfg;
        let cluster = handle.name_label();
        tracing::info!(
            cluster = %cluster,
            generation = view.generation,
            primary = ?view.primary,
            replicas = ?view.replicas,
            unconfirmed = change == ViewChange::Unconfirmed,
            "applying cluster view"
        );
        let removed = removals(&old, &view, change, &cfg.replica_lag, cfg.replica_lag_fence);
        m::view_applied(&cluster, &old, &view, &cfg.replica_lag);
        handle.store(view);
        let ended = removed
            .into_iter()
            .map(|(backend, role, reason)| {
                let label = reason.label;
                let fence = self.shared.fences.fence(&backend, role, reason);
                if fence.is_some() {
                    tracing::info!(cluster = %cluster, %backend, ?role, reason = label, "ending sessions");
                }
                Ended {
                    backend,
                    role,
                    label,
                    fence,
                }
            })
            .collect();
        Applied {
            changed: true,
            ended,
        }
    }

    /// Accepts clients on `listener` until [`Proxy::stop_accepting`] is
    /// called. Each session runs as a task on the current runtime. Sessions
    /// go to the primary unless they choose otherwise.
    pub async fn serve(&self, listener: TcpListener) -> std::io::Result<()> {
        self.serve_with(listener, ListenerOptions::default()).await
    }

    /// [`Proxy::serve`] with a default route and PROXY protocol settings.
    pub async fn serve_with(
        &self,
        listener: TcpListener,
        opts: ListenerOptions,
    ) -> std::io::Result<()> {
        let opts = Arc::new(arc_swap::ArcSwap::from_pointee(opts));
        self.serve_swappable(listener, opts).await
    }

    /// [`Proxy::serve_with`] with options the embedder can swap while it
    /// serves (a reload): each new client gets the options current when it
    /// is accepted; sessions keep the ones they started with.
    pub async fn serve_swappable(
        &self,
        listener: TcpListener,
        opts: Arc<arc_swap::ArcSwap<ListenerOptions>>,
    ) -> std::io::Result<()> {
        let stop = self.shared.stop_accepting.clone();
        loop {
            let accepted = tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                r = listener.accept() => r,
            };
            let (tcp, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors or a transient network error:
                    // back off briefly rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Err(e) = self.shared.cfg.socket.apply(&tcp) {
                tracing::debug!(error = %e, "could not set client socket options");
            }
            self.admit(tcp, peer, &opts.load_full());
        }
    }

    /// Serves one client connection that the embedder accepted itself (a
    /// Unix socket, an in-memory stream, a connection handed over by
    /// another listener): it counts against `max_connections` and runs as a
    /// task on the current runtime, as if [`Proxy::serve_with`] had
    /// accepted it from `peer`.
    pub fn serve_connection<S>(&self, io: S, peer: SocketAddr, opts: &Arc<ListenerOptions>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.admit(io, peer, opts);
    }

    fn admit<S>(&self, io: S, peer: SocketAddr, opts: &Arc<ListenerOptions>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let shared = &self.shared;
        shared.metrics.accepted();
        let prev = shared.active.fetch_add(1, Ordering::AcqRel);
        shared.metrics.active(1.0);
        let guard = ActiveGuard(shared.clone());
        if prev >= shared.cfg.max_connections {
            drop(guard);
            shared.metrics.rejected(crate::ErrorKind::Policy, "limit");
            if shared.rejecting.fetch_add(1, Ordering::AcqRel) < MAX_REJECTING {
                let shared = shared.clone();
                tokio::spawn(async move {
                    refuse_over_limit(&shared, io).await;
                    shared.rejecting.fetch_sub(1, Ordering::AcqRel);
                });
            } else {
                shared.rejecting.fetch_sub(1, Ordering::AcqRel);
            }
            return;
        }
        let span = tracing::info_span!(
            "session",
            client.addr = %peer,
            backend.addr = field::Empty,
            route = field::Empty,
            user = field::Empty,
            database = field::Empty,
        );
        let accepted = Box::new(crate::session::Accepted {
            io,
            peer,
            opts: opts.clone(),
        });
        let session = crate::session::run(shared.clone(), accepted, guard);
        tokio::spawn(session.instrument(span));
    }

    /// Stops every `serve` loop; open sessions continue.
    pub fn stop_accepting(&self) {
        self.shared.stop_accepting.cancel();
    }

    /// Graceful shutdown: stop accepting, let sessions finish for up to
    /// `grace`, then end the rest with a FATAL (57P01) at a message boundary.
    /// Returns the number of sessions that had to be ended.
    pub async fn shutdown(&self, grace: Duration) -> usize {
        self.stop_accepting();
        if self.wait_idle(Instant::now() + grace).await {
            return 0;
        }
        let left = self.active_connections();
        self.shared.terminating.store(true, Ordering::Release);
        self.shared.fences.fence_all(FenceReason {
            sqlstate: ADMIN_SHUTDOWN,
            message: "terminating connection because the proxy is shutting down".into(),
            label: "shutdown",
            drain: false,
        });
        let deadline = Instant::now() + crate::forward::FENCE_DEADLINE + Duration::from_secs(1);
        self.wait_idle(deadline).await;
        left
    }

    /// Waits until no connection is open, or `deadline`. True if idle.
    pub async fn wait_idle(&self, deadline: Instant) -> bool {
        loop {
            let notified = self.shared.idle.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.active_connections() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.active_connections() == 0;
            }
        }
    }
}

/// The size of one session's future over `S` (for a test of its size).
#[cfg(test)]
pub(crate) fn session_future_size<S>(io: S) -> usize
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let proxy = Proxy::new(ProxyConfig::default(), ViewHandle::new(View::default()));
    let guard = ActiveGuard(proxy.shared.clone());
    proxy.shared.active.fetch_add(1, Ordering::AcqRel);
    let accepted = Box::new(crate::session::Accepted {
        io,
        peer: SocketAddr::from(([127, 0, 0, 1], 1)),
        opts: Arc::new(ListenerOptions::default()),
    });
    let f = crate::session::run(proxy.shared.clone(), accepted, guard);
    std::mem::size_of_val(&f)
}

/// Answers a connection over the limit: finish its startup phase (so that
/// TLS clients can read the answer), then 53300.
async fn refuse_over_limit<S>(shared: &Shared, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = ClientStream::Plain(Prefixed::new(io));
    let deadline = Instant::now() + REJECT_TIMEOUT;
    let tls = shared.acceptor();
    if let Ok(Startup::Session { .. }) =
        read_startup(&mut client, tls.as_ref(), deadline, REJECT_TIMEOUT).await
    {
        let err = SessionError::TooManyConnections(shared.cfg.max_connections);
        crate::session::tell(shared, &mut client, &err).await;
    }
}

/// Why a view is applied; it picks the words of the FATAL that the sessions
/// it ends receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewChange {
    /// The cluster changed: its store names another primary or replica set.
    Update,
    /// The view's owner could not confirm its view in time, so the view it
    /// applies names no servers; their sessions are told so.
    Unconfirmed,
    /// A planned switchover: the old primary is still healthy and stops
    /// cleanly once its transactions end, so its sessions end between
    /// transactions (within [`crate::fence::SWITCHOVER_DRAIN`]), not in
    /// the middle of one.
    Switchover,
}

/// What [`Proxy::apply`] did.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// Whether the view differed from the one it replaced.
    pub changed: bool,
    /// The backends whose sessions (in one role) were told to end.
    pub ended: Vec<Ended>,
}

/// Sessions on one backend that a new view ended.
#[derive(Debug, Clone)]
pub struct Ended {
    pub backend: Backend,
    pub role: Role,
    /// The reason's metric label (`fenced`, `stale`, `replica_promoted`,
    /// `replica_removed`, `replica_lag`).
    pub label: &'static str,
    /// The fired fence, if any session had been routed there; its other
    /// holders are the sessions still closing ([`Fence::wait_released`]).
    pub fence: Option<Arc<Fence>>,
}

/// Which sessions going from `old` to `new` must end, and why.
fn removals(
    old: &View,
    new: &View,
    change: ViewChange,
    limit: &LagLimit,
    lag_fence: bool,
) -> Vec<(Backend, Role, FenceReason)> {
    let unconfirmed = change == ViewChange::Unconfirmed;
    let mut out = Vec::new();
    if let Some(p) = &old.primary {
        if new.primary.as_ref() != Some(p) {
            let reason = match change {
                ViewChange::Unconfirmed => FenceReason::primary_unconfirmed(),
                ViewChange::Switchover => FenceReason::primary_switched_over(),
                ViewChange::Update => FenceReason::primary_changed(),
            };
            out.push((p.clone(), Role::Primary, reason));
        }
    }
    for r in &old.replicas {
        let b = &r.backend;
        if old.primary.as_ref() == Some(b)
            || out
                .iter()
                .any(|(o, role, _)| o == b && *role == Role::Standby)
        {
            continue;
        }
        let reason = if new.primary.as_ref() == Some(b) {
            Some(FenceReason::standby_promoted())
        } else {
            match new.replicas.iter().find(|n| n.backend == *b) {
                None if unconfirmed => Some(FenceReason::standby_unconfirmed()),
                None => Some(FenceReason::standby_removed()),
                Some(n) if lag_fence && limit.admits(r) && !limit.admits(n) => {
                    Some(FenceReason::standby_lagging(n.lag_bytes))
                }
                Some(_) => None,
            }
        };
        if let Some(reason) = reason {
            out.push((b.clone(), Role::Standby, reason));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::Replica;

    fn b(a: &str) -> Backend {
        Backend::new(a)
    }

    fn r(a: &str, lag_bytes: u64) -> Replica {
        Replica {
            lag_bytes,
            ..Replica::fresh(b(a))
        }
    }

    fn view(primary: Option<&str>, replicas: &[Replica]) -> View {
        View {
            generation: 1,
            primary: primary.map(b),
            replicas: replicas.to_vec(),
        }
    }

    #[test]
    fn removals_end_what_the_new_view_no_longer_allows() {
        use ViewChange::*;
        let limit = LagLimit {
            bytes: 100,
            time: Duration::from_secs(10),
        };
        let lagging = r("b", 1000);
        #[rustfmt::skip]
        #[allow(clippy::type_complexity)]
        let rows: &[(&str, View, View, ViewChange, bool, &[(&str, Role, &str)])] = &[
            ("nothing changed",
                view(Some("a"), &[r("b", 0)]), view(Some("a"), &[r("b", 0)]), Update, true, &[]),
            ("the primary changed",
                view(Some("a"), &[r("b", 0)]), view(Some("c"), &[r("b", 0)]), Update, false,
                &[("a", Role::Primary, "fenced")]),
            ("a standby was promoted: its standby sessions end, the primary's too",
                view(Some("a"), &[r("b", 0)]), view(Some("b"), &[]), Update, false,
                &[("a", Role::Primary, "fenced"), ("b", Role::Standby, "replica_promoted")]),
            ("failover step one: no primary yet",
                view(Some("a"), &[r("b", 0)]), view(None, &[r("b", 0)]), Update, false,
                &[("a", Role::Primary, "fenced")]),
            ("a standby left the replica set",
                view(Some("a"), &[r("b", 0), r("c", 0)]), view(Some("a"), &[r("c", 0)]), Update, false,
                &[("b", Role::Standby, "replica_removed")]),
            ("the view could not be confirmed: everything ends, saying why",
                view(Some("a"), &[r("b", 0)]), view(None, &[]), Unconfirmed, false,
                &[("a", Role::Primary, "stale"), ("b", Role::Standby, "stale")]),
            ("a replica fell behind, with replica_lag_fence",
                view(Some("a"), &[r("b", 0)]), view(Some("a"), std::slice::from_ref(&lagging)), Update, true,
                &[("b", Role::Standby, "replica_lag")]),
            ("a replica fell behind, without replica_lag_fence",
                view(Some("a"), &[r("b", 0)]), view(Some("a"), std::slice::from_ref(&lagging)), Update, false, &[]),
            ("a replica already behind stays",
                view(Some("a"), std::slice::from_ref(&lagging)), view(Some("a"), &[r("b", 2000)]), Update, true, &[]),
        ];
        for (name, old, new, change, lag_fence, want) in rows {
            let got: Vec<(String, Role, &str)> = removals(old, new, *change, &limit, *lag_fence)
                .into_iter()
                .map(|(b, role, reason)| {
                    assert_eq!(reason.sqlstate, "57P01", "{name}");
                    (b.addr().to_owned(), role, reason.label)
                })
                .collect();
            let want: Vec<(String, Role, &str)> = want
                .iter()
                .map(|(a, r, l)| ((*a).to_owned(), *r, *l))
                .collect();
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn apply_stores_then_fences_the_sessions_of_removed_backends() {
        let handle = ViewHandle::named("main", view(Some("a"), &[r("b", 0)]));
        let proxy = Proxy::new(ProxyConfig::default(), ViewHandle::new(View::default()));
        // Sessions routed to a as primary, and to b as a standby and (after
        // its promotion) as the primary.
        let on_a = proxy.shared.fences.for_backend(&b("a"), Role::Primary);
        let on_b = proxy.shared.fences.for_backend(&b("b"), Role::Standby);
        let applied = proxy.apply(&handle, view(Some("b"), &[]), ViewChange::Update);
        assert!(applied.changed);
        assert_eq!(handle.load().primary, Some(b("b")), "stored");
        assert!(on_a.is_fired() && on_b.is_fired());
        assert!(on_b
            .reason()
            .is_some_and(|r| r.message.contains("promoted")));
        let new_primary = proxy.shared.fences.for_backend(&b("b"), Role::Primary);
        let again = proxy.apply(&handle, view(Some("b"), &[]), ViewChange::Update);
        assert!(!again.changed && again.ended.is_empty());
        assert!(!new_primary.is_fired(), "primary sessions on b go on");
        let labels: Vec<_> = applied
            .ended
            .iter()
            .map(|e| (e.label, e.fence.is_some()))
            .collect();
        assert_eq!(labels, vec![("fenced", true), ("replica_promoted", true)]);
    }
}
