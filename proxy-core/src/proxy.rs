//! The listener and the life of one session: accept, startup phase, route,
//! connect, relay authentication, forward, close.
//!
//! Invariants kept here:
//! - a session is routed from one lock-free snapshot of the view and holds
//!   the fence of the backend it was routed to before it connects, so a
//!   fence that fires while it is still connecting ends it too;
//! - every connection counts against `max_connections` from accept to close;
//! - every refusal reaches the client as an ErrorResponse with a SQLSTATE
//!   whenever the client can still read one.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
use crate::fence::{Fence, FenceReason, Fences};
use crate::forward::{forward, Outcome};
use crate::handshake::{read_startup, Startup};
use crate::metrics::{self as m, SessionCounters};
use crate::protocol::{self, Severity, StartupMessage, PROTOCOL_NEWEST_MINOR};
use crate::route::{self, LagLimit, Route, Rule};
use crate::stream::ClientStream;
use crate::view::{Backend, ViewHandle};

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
    /// before it is refused with 57P03. Can be changed at run time with
    /// [`Proxy::set_hold_timeout`].
    pub hold_timeout: Duration,
    /// Rules that pick a route by database, user, application name or
    /// client network; the first match wins over the listener's default.
    pub rules: Vec<Rule>,
    /// How far behind a replica may be and still take new sessions.
    pub replica_lag: LagLimit,
    /// End the sessions of a replica that falls beyond `replica_lag`
    /// (applied by whoever stores new views, see [`Proxy::apply_replica_lag`]).
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
    hold_timeout_ms: AtomicU64,
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
        let cfg_hold_ms = cfg.hold_timeout.as_millis() as u64;
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
                hold_timeout_ms: AtomicU64::new(cfg_hold_ms),
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

    /// Ends every session routed to `backend` so far, with a FATAL carrying
    /// `reason`, at the next message boundary. Store the view that no longer
    /// names `backend` first: sessions routed after this call then cannot
    /// reach it. Returns the fired fence, whose holders are the sessions
    /// still closing (see [`Fence::wait_released`]), if any session had been
    /// routed there.
    pub fn fence_backend(&self, backend: &Backend, reason: FenceReason) -> Option<Arc<Fence>> {
        self.shared.fences.fence_backend(backend, reason)
    }

    /// Called after a new view was stored in place of `old`: publishes the
    /// replicas' lag, and with `replica_lag_fence` ends the sessions of
    /// replicas that fell beyond the lag limit.
    pub fn apply_replica_lag(&self, old: &crate::View, new: &crate::View) {
        let limit = &self.shared.cfg.replica_lag;
        m::replicas(new, limit);
        if !self.shared.cfg.replica_lag_fence {
            return;
        }
        for r in &new.replicas {
            let was_ok = old
                .replicas
                .iter()
                .any(|o| o.backend == r.backend && limit.admits(o));
            if was_ok && !limit.admits(r) && new.primary.as_ref() != Some(&r.backend) {
                tracing::info!(backend = %r.backend, lag_bytes = r.lag_bytes, "replica fell behind; ending its sessions");
                self.fence_backend(
                    &r.backend,
                    FenceReason {
                        sqlstate: ADMIN_SHUTDOWN,
                        message: format!(
                            "terminating connection because the replica fell behind the primary ({} bytes); reconnect to reach a fresh one",
                            r.lag_bytes
                        ),
                        label: "replica_lag",
                    },
                );
            }
        }
    }

    /// Changes how long clients wait for a primary.
    pub fn set_hold_timeout(&self, d: Duration) {
        self.shared
            .hold_timeout_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
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
            let view = shared.view.load();
            let (route, to) = shared.cancel.route(&req, &view);
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
    span.record("user", message.user().unwrap_or(""));
    span.record("database", message.database().unwrap_or(""));
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
    let is_option = |k: &str| k.starts_with("_pq_.");
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
    loop {
        let current = view.load();
        let chosen = route::pick(&current, route, limit, sessions, unreachable)
            .map(|p| (p.backend.clone(), p.standby));
        if let Some((backend, standby)) = chosen {
            let fence = shared.fences.for_backend(&backend);
            // The view may have changed between the load and taking the
            // fence; a fence fired in between would be missed. Whoever
            // changes the view stores it before fencing, so re-reading it
            // settles the race.
            let now = view.load();
            let still = if standby {
                now.replicas
                    .iter()
                    .any(|r| r.backend == backend && limit.admits(r))
            } else {
                now.primary.as_ref() == Some(&backend)
            };
            if still {
                if let Some(t) = held_since {
                    m::held(t.elapsed().as_secs_f64(), "released", route.as_str());
                }
                m::routed(route.as_str(), standby);
                return Ok(Some(Routed {
                    backend,
                    fence,
                    want_standby: route.wants_standby(),
                    standby,
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
        let hold = Duration::from_millis(shared.hold_timeout_ms.load(Ordering::Relaxed));
        let since = *held_since.get_or_insert_with(|| {
            tracing::debug!(hold = ?hold, "no server for the route; holding the client");
            Instant::now()
        });
        let changes = changes.get_or_insert_with(|| view.subscribe());
        changes.borrow_and_update();
        if route::pick(&view.load(), route, limit, sessions, unreachable).is_some() {
            continue;
        }
        if tokio::time::timeout_at(since + hold, changes.changed())
            .await
            .is_err()
        {
            m::held(since.elapsed().as_secs_f64(), "timed_out", route.as_str());
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
        ..
    } = routed;
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
    if !est.to_backend.is_empty() {
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
