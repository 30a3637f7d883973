//! The listener and the life of one session: accept, startup phase, route,
//! connect, relay authentication, forward, close.
//!
//! Invariants kept here:
//! - a new view is stored before the sessions it removed are fenced
//!   ([`Proxy::apply`]), so no session can be routed to a backend the
//!   applied view no longer names;
//! - a session is routed from one lock-free snapshot of the view and holds
//!   the fence of the backend it was routed to before it connects, so a
//!   fence that fires while it is still connecting ends it too;
//! - a view whose deadline has passed routes nothing, and its primary
//!   sessions forward nothing more;
//! - every connection counts against `max_connections` from accept to close;
//! - every refusal reaches the client as an ErrorResponse with a SQLSTATE
//!   whenever the client can still read one.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::{timeout, Duration, Instant};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{field, Instrument};

use crate::backend::{self, AuthResult, Negotiation, SocketOptions};
use crate::cancel::{self, CancelRegistry, CancelRoute};
use crate::error::{SessionError, ADMIN_SHUTDOWN};
use crate::fence::{Fence, FenceReason, Fences, Role};
use crate::forward::{forward, Outcome};
use crate::handshake::{read_startup, Startup};
use crate::metrics::{self as m, SessionCounters};
use crate::protocol::{self, Severity, StartupMessage, PROTOCOL_NEWEST_MINOR};
use crate::route::{self, LagLimit, Route, Rule};
use crate::stream::ClientStream;
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
}

/// Options of one listening socket.
#[derive(Debug, Clone, Default)]
pub struct ListenerOptions {
    /// The route of sessions that neither choose one nor match a rule.
    pub route: Route,
    /// PROXY protocol v2: `Some(networks)` requires the header from these
    /// networks and refuses it from any other; `None` (the default) is off.
    pub proxy_protocol: Option<Arc<[ipnet::IpNet]>>,
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
            cancel_rate_per_second: 100,
            hold_timeout: Duration::from_secs(10),
            rules: Vec::new(),
            replica_lag: LagLimit::default(),
            replica_lag_fence: false,
            server_names: Default::default(),
        }
    }
}

/// Connections over the limit are answered with 53300 by at most this many
/// tasks at once; beyond that they are closed without a word.
const MAX_REJECTING: usize = 256;
/// How long a refused client gets to send its startup packet so that it can
/// be told why it is refused.
const REJECT_TIMEOUT: Duration = Duration::from_secs(2);

struct Shared {
    cfg: ProxyConfig,
    tls: Option<TlsAcceptor>,
    view: ViewHandle,
    fences: Fences,
    cancel: Arc<CancelRegistry>,
    active: AtomicUsize,
    rejecting: AtomicUsize,
    idle: Notify,
    stop_accepting: CancellationToken,
    terminating: AtomicBool,
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

/// Counts a connection from accept to close.
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        m::active(-1.0);
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Proxy {
    pub fn new(cfg: ProxyConfig, view: ViewHandle) -> Self {
        let tls = cfg.tls.clone().map(TlsAcceptor::from);
        let cancel = Arc::new(CancelRegistry::new(cfg.cancel_rate_per_second));
        Proxy {
            shared: Arc::new(Shared {
                cfg,
                tls,
                view,
                fences: Fences::default(),
                cancel,
                active: AtomicUsize::new(0),
                rejecting: AtomicUsize::new(0),
                idle: Notify::new(),
                stop_accepting: CancellationToken::new(),
                terminating: AtomicBool::new(false),
            }),
        }
    }

    /// The view this proxy routes by.
    pub fn view(&self) -> &ViewHandle {
        &self.shared.view
    }

    /// Client connections open now, in any phase.
    pub fn active_connections(&self) -> usize {
        self.shared.active.load(Ordering::Acquire)
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
        let opts = Arc::new(opts);
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
            self.admit(tcp, peer, &opts);
        }
    }

    fn admit(&self, tcp: TcpStream, peer: SocketAddr, opts: &Arc<ListenerOptions>) {
        m::accepted();
        let shared = &self.shared;
        let prev = shared.active.fetch_add(1, Ordering::AcqRel);
        m::active(1.0);
        let guard = ActiveGuard(shared.clone());
        if prev >= shared.cfg.max_connections {
            drop(guard);
            m::rejected("limit");
            if shared.rejecting.fetch_add(1, Ordering::AcqRel) < MAX_REJECTING {
                let shared = shared.clone();
                tokio::spawn(async move {
                    refuse_over_limit(&shared, tcp).await;
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
        tokio::spawn(session(shared.clone(), tcp, peer, opts.clone(), guard).instrument(span));
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

/// Answers a connection over the limit: finish its startup phase (so that
/// TLS clients can read the answer), then 53300.
async fn refuse_over_limit(shared: &Shared, tcp: TcpStream) {
    let mut client = ClientStream::Plain(tcp);
    let deadline = Instant::now() + REJECT_TIMEOUT;
    if let Ok(Startup::Session { .. }) =
        read_startup(&mut client, shared.tls.as_ref(), deadline, REJECT_TIMEOUT).await
    {
        let err = SessionError::TooManyConnections(shared.cfg.max_connections);
        send_error(&mut client, &err).await;
    }
}

/// One client connection, accept to close. The futures of the setup steps
/// are boxed: they are done once the session forwards, and unboxed they
/// would stay in every idle session's task (measured: the session future is
/// 1760 bytes with them boxed, 3328 without).
async fn session(
    shared: Arc<Shared>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    opts: Arc<ListenerOptions>,
    _guard: ActiveGuard,
) {
    let accepted_at = Instant::now();
    if let Err(e) = shared.cfg.socket.apply(&tcp) {
        tracing::debug!(error = %e, "could not set client socket options");
    }
    let limit = shared.cfg.startup_timeout;
    let client_addr = match &opts.proxy_protocol {
        None => peer,
        Some(trusted) => {
            match Box::pin(crate::proxy_protocol::read(
                &mut tcp,
                peer,
                trusted,
                accepted_at + limit,
            ))
            .await
            {
                Ok(addr) => {
                    if addr != peer {
                        m::proxy_header_accepted();
                    }
                    tracing::Span::current().record("client.addr", field::display(addr));
                    addr
                }
                Err(e) => return refuse(&mut ClientStream::Plain(tcp), e).await,
            }
        }
    };
    let mut client = ClientStream::Plain(tcp);
    let startup = Box::pin(read_startup(
        &mut client,
        shared.tls.as_ref(),
        accepted_at + limit,
        limit,
    ))
    .await;
    let (message, pipelined) = match startup {
        Ok(Startup::Session { message, pipelined }) => (message, pipelined),
        Ok(Startup::Cancel(req)) => {
            // Under SNI the session is on that name's cluster; otherwise it
            // may be on any cluster this proxy routes to.
            let views: Vec<Arc<View>> = match client
                .server_name()
                .and_then(|n| shared.cfg.server_names.get(n))
            {
                Some(v) => vec![v.load()],
                None => std::iter::once(&shared.view)
                    .chain(shared.cfg.server_names.values())
                    .map(ViewHandle::load)
                    .collect(),
            };
            let (route, to) = shared.cancel.route(&req, views.iter().map(|v| &**v));
            m::cancel(route.as_str());
            tracing::debug!(route = route.as_str(), pid = req.pid, "cancel request");
            if route != CancelRoute::RateLimited {
                cancel::send(&req, &to, shared.cfg.connect_timeout, &shared.cfg.socket).await;
            }
            return;
        }
        Err(e) => return refuse(&mut client, e).await,
    };
    let (explicit, message) = match route::take_route_setting(&message.params) {
        Ok(None) => (None, message),
        Ok(Some((r, params))) => {
            let mut raw = BytesMut::new();
            protocol::encode_startup(&mut raw, message.minor, &params, |_| false);
            let message = StartupMessage {
                params,
                raw: raw.freeze(),
                ..message
            };
            (Some(r), message)
        }
        Err(e) => return refuse(&mut client, e.into()).await,
    };
    let route = route::resolve(
        explicit,
        &shared.cfg.rules,
        &message,
        Some(client_addr.ip()),
        opts.route,
    );
    let span = tracing::Span::current();
    let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
    span.record("user", text(message.user()));
    span.record("database", text(message.database()));
    span.record("route", route.as_str());
    let r = run_session(&shared, &mut client, message, pipelined, accepted_at, route).await;
    if let Err(e) = r {
        m::route_refused(route.as_str(), e.reason());
        refuse(&mut client, e).await;
    }
}

#[cold]
async fn refuse(client: &mut ClientStream, e: SessionError) {
    m::rejected(e.reason());
    match e.kind() {
        crate::ErrorKind::Client => tracing::debug!(error = %e, "client refused"),
        _ => tracing::info!(error = %e, retryable = e.retryable(), "session refused"),
    }
    send_error(client, &e).await;
}

/// Writes `e` as a FATAL ErrorResponse, if it has a SQLSTATE, and closes.
async fn send_error<S: AsyncWrite + Unpin>(client: &mut S, e: &SessionError) {
    if let Some(code) = e.sqlstate() {
        let mut buf = BytesMut::new();
        protocol::write_error(&mut buf, Severity::Fatal, code, &e.to_string(), e.hint());
        let _ = timeout(Duration::from_secs(1), async {
            client.write_all(&buf).await?;
            client.flush().await?;
            client.shutdown().await
        })
        .await;
    }
}

/// The startup message to send to the backend and, for a protocol version
/// the proxy does not speak, the negotiation owed to the client.
fn negotiate(message: &StartupMessage) -> (Bytes, Option<Negotiation>) {
    if message.minor == 0 || message.minor == PROTOCOL_NEWEST_MINOR {
        return (message.raw.clone(), None);
    }
    // 3.1 was never used; anything newer than 3.2 falls back to 3.2.
    let minor = if message.minor > PROTOCOL_NEWEST_MINOR {
        PROTOCOL_NEWEST_MINOR
    } else {
        0
    };
    let is_option = |k: &[u8]| k.starts_with(b"_pq_.");
    let unrecognized = message
        .params
        .iter()
        .map(|(k, _)| k)
        .filter(|k| is_option(k))
        .cloned()
        .collect();
    let mut startup = BytesMut::new();
    protocol::encode_startup(&mut startup, minor, &message.params, is_option);
    (
        startup.freeze(),
        Some(Negotiation {
            minor,
            unrecognized,
        }),
    )
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

#[cold]
fn linger_then_close(server: TcpStream) {
    tokio::spawn(async move {
        tokio::time::sleep(FENCED_BACKEND_LINGER).await;
        drop(server);
    });
}

/// Runs `work` unless and until `fence` fires.
async fn until_fenced<T>(
    fence: &Fence,
    work: impl std::future::Future<Output = Result<T, SessionError>>,
) -> Result<T, SessionError> {
    let notified = fence.notified();
    let mut notified = std::pin::pin!(notified);
    notified.as_mut().enable();
    if fence.is_fired() {
        return Err(SessionError::FencedWhileConnecting);
    }
    tokio::select! {
        r = work => r,
        _ = notified => Err(SessionError::FencedWhileConnecting),
    }
}

/// Where a session was routed.
struct Routed {
    backend: Backend,
    /// Taken before connecting, so a fence fired from now on ends the session.
    fence: Arc<Fence>,
    /// Whether the server must turn out to be a standby or a primary.
    want_standby: Option<bool>,
    /// Chosen among the replicas.
    standby: bool,
    /// A primary session of a view with a deadline: it stops forwarding
    /// once the deadline passes.
    deadline: bool,
}

/// Picks a backend for `route` from the current view, skipping replicas in
/// `unreachable`. While there is none it holds the client for up to the
/// hold timeout, unless replicas were skipped: then `None` (the caller
/// reports why they were unreachable).
async fn route_session(
    shared: &Shared,
    view: &ViewHandle,
    route: Route,
    unreachable: &[Backend],
) -> Result<Option<Routed>, SessionError> {
    let limit = &shared.cfg.replica_lag;
    let sessions = |b: &Backend| shared.fences.sessions(b);
    // Only a held client needs to hear about view changes; the common path
    // takes no subscription.
    let mut changes = None;
    let mut held_since: Option<Instant> = None;
    let deadline = view.deadline();
    loop {
        let current = view.load();
        // A view past its deadline routes nothing, whatever it names: its
        // owner could not confirm it in time.
        let chosen = if deadline.passed() {
            None
        } else {
            route::pick(&current, route, limit, sessions, unreachable)
                .map(|p| (p.backend.clone(), p.standby))
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
            let now = view.load();
            let still = !deadline.passed()
                && if standby {
                    now.replicas
                        .iter()
                        .any(|r| r.backend == backend && limit.admits(r))
                } else {
                    now.primary.as_ref() == Some(&backend)
                };
            if still {
                if let Some(t) = held_since {
                    let secs = t.elapsed().as_secs_f64();
                    m::held(secs, "released", route.as_str(), view.name_label());
                }
                m::routed(route.as_str(), standby);
                return Ok(Some(Routed {
                    backend,
                    fence,
                    want_standby: route.wants_standby(),
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
        if !deadline.passed()
            && route::pick(&view.load(), route, limit, sessions, unreachable).is_some()
        {
            continue;
        }
        if tokio::time::timeout_at(since + hold, changes.changed())
            .await
            .is_err()
        {
            let secs = since.elapsed().as_secs_f64();
            m::held(secs, "timed_out", route.as_str(), view.name_label());
            return Err(match route {
                Route::Replica => SessionError::NoReplicaAfter(hold),
                _ => SessionError::NoPrimaryAfter(hold),
            });
        }
    }
}

async fn run_session(
    shared: &Shared,
    client: &mut ClientStream,
    message: StartupMessage,
    pipelined: BytesMut,
    accepted_at: Instant,
    route: Route,
) -> Result<(), SessionError> {
    if shared.terminating.load(Ordering::Acquire) {
        return Err(SessionError::ShuttingDown);
    }
    let view = client
        .server_name()
        .and_then(|n| shared.cfg.server_names.get(n))
        .unwrap_or(&shared.view);
    // A replica that cannot be reached is skipped for the next one (or the
    // primary, for prefer-replica and any): nothing has been sent yet.
    let mut unreachable = Vec::new();
    let mut last_error = None;
    let (routed, mut server) = loop {
        let Some(r) = Box::pin(route_session(shared, view, route, &unreachable)).await? else {
            return Err(last_error.unwrap_or(SessionError::NoReplicaAfter(Duration::ZERO)));
        };
        // Connecting can hang on a server that is hung itself; a fence
        // (the primary changed) ends the wait at once.
        let connect = async {
            let t0 = Instant::now();
            let s = backend::connect(
                r.backend.addr(),
                shared.cfg.connect_timeout,
                &shared.cfg.socket,
            )
            .await?;
            m::backend_connect(t0.elapsed().as_secs_f64());
            Ok(s)
        };
        match Box::pin(until_fenced(&r.fence, connect)).await {
            Ok(s) => break (r, s),
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
    };
    let Routed {
        backend,
        fence,
        want_standby,
        deadline,
        ..
    } = routed;
    let deadline = deadline.then(|| view.deadline());
    tracing::Span::current().record("backend.addr", backend.addr());

    let (startup, negotiation) = negotiate(&message);
    let setup = async {
        let mut first = BytesMut::with_capacity(startup.len() + pipelined.len());
        first.extend_from_slice(&startup);
        first.extend_from_slice(&pipelined);
        let auth_limit = shared.cfg.auth_timeout;
        let auth = backend::authenticate(
            &mut *client,
            &mut server,
            backend.addr(),
            &first,
            backend::Expect {
                negotiation,
                want_standby,
            },
            Instant::now() + auth_limit,
            auth_limit,
        )
        .await?;
        Ok(auth)
    };
    let auth = Box::pin(until_fenced(&fence, setup)).await?;
    let mut est = match auth {
        AuthResult::Ready(est) => est,
        AuthResult::Refused => {
            m::ended("refused_by_server");
            return Ok(());
        }
    };
    m::handshake(accepted_at.elapsed().as_secs_f64());
    let _cancel = est
        .cancel_key
        .take()
        .map(|(pid, secret)| shared.cancel.register(pid, secret, backend.clone()));
    // The client is ready once it reads this: its cancel key is known now.
    client
        .write_all(&est.to_client)
        .await
        .map_err(SessionError::ClientIo)?;
    drop(std::mem::take(&mut est.to_client));
    // Past the deadline nothing more reaches the primary; `forward` then
    // ends the session at once.
    if !est.to_backend.is_empty() && !deadline.is_some_and(|d| d.passed()) {
        server
            .write_all(&est.to_backend)
            .await
            .map_err(|source| SessionError::BackendIo {
                addr: backend.addr().to_owned(),
                source,
            })?;
    }
    drop(est.to_backend);
    tracing::debug!("session established");

    let counters = SessionCounters::new();
    let tracker = &mut est.tracker;
    let (outcome, totals) = match client {
        ClientStream::Plain(s) => {
            forward(
                s,
                &mut server,
                tracker,
                &fence,
                deadline,
                &counters.to_backend,
                &counters.to_client,
            )
            .await
        }
        ClientStream::Tls(s) => {
            forward(
                s.as_mut(),
                &mut server,
                tracker,
                &fence,
                deadline,
                &counters.to_backend,
                &counters.to_client,
            )
            .await
        }
        ClientStream::Closed => (Outcome::ClientClosed, Default::default()),
    };
    m::ended(outcome.label());
    if matches!(outcome, Outcome::Fenced { .. }) {
        linger_then_close(server);
    }
    match &outcome {
        Outcome::Error { client, error } => tracing::info!(
            client_side = client,
            error = %error,
            to_server = totals.client_to_backend,
            to_client = totals.backend_to_client,
            "session ended with an error"
        ),
        o => tracing::debug!(
            reason = o.label(),
            to_server = totals.client_to_backend,
            to_client = totals.backend_to_client,
            "session ended"
        ),
    }
    Ok(())
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
            let reason = if unconfirmed {
                FenceReason::primary_unconfirmed()
            } else {
                FenceReason::primary_changed()
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
                view(Some("a"), &[r("b", 0)]), view(Some("a"), &[lagging.clone()]), Update, true,
                &[("b", Role::Standby, "replica_lag")]),
            ("a replica fell behind, without replica_lag_fence",
                view(Some("a"), &[r("b", 0)]), view(Some("a"), &[lagging.clone()]), Update, false, &[]),
            ("a replica already behind stays",
                view(Some("a"), &[lagging.clone()]), view(Some("a"), &[r("b", 2000)]), Update, true, &[]),
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
