//! One client connection, accept to close, in DESIGN's steps: PROXY
//! header, startup phase (or a cancel request), route, connect,
//! authenticate, forward, close. Each step is a call into its own module;
//! this file is the order they run in and what happens when one fails.
//!
//! Invariants kept here:
//! - a session holds the fence of the backend it was routed to before it
//!   connects (`route::connect`), so a fence that fires while it is still
//!   connecting or authenticating ends it too;
//! - its cancel key is registered before the client can read its first
//!   ReadyForQuery, so a cancel sent at once finds it;
//! - every refusal reaches the client as a FATAL ErrorResponse with a
//!   SQLSTATE whenever the client can still read one, worded without
//!   backend addresses or OS error text (those go to the log).
//!
//! Steps 1 to 6 run in their own boxed future, dropped once the session
//! is established: an idle session's task keeps only what forwarding
//! needs (`the_session_future_stays_small`; measured: 1760 bytes with
//! only the steps' inner futures boxed, 3328 with none boxed).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout, Duration, Instant};
use tracing::field;

use crate::backend::{self, AuthResult, NotReady};
use crate::error::SessionError;
use crate::forward::{forward, ByteCounter, Outcome};
use crate::handshake::{read_startup, Startup};
use crate::metrics::SessionCounters;
use crate::protocol::{self, Severity};
use crate::proxy::{ActiveGuard, ForwardingMode, ListenerOptions, Shared};
use crate::route::{self, Plan};
use crate::stream::{ClientStream, Prefixed};
use crate::{cancel, proxy_protocol};

/// A connection as accepted: boxed, so that the session's future holds a
/// pointer to it until its setup consumes it, not its bytes for life.
pub(crate) struct Accepted<S> {
    pub io: S,
    pub peer: SocketAddr,
    pub opts: Arc<ListenerOptions>,
}

/// Runs one client connection from accept to close.
pub(crate) async fn run<S>(shared: Arc<Shared>, accepted: Box<Accepted<S>>, _guard: ActiveGuard)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Steps 1 to 6 in their own allocation, freed once the session is
    // established: an idle session's task keeps only what forwarding needs.
    let Some(mut session) = Box::pin(start(&shared, accepted)).await else {
        return;
    };
    let outcome = session.forward(&shared).await;
    if matches!(outcome, Outcome::Fenced { .. }) {
        route::linger_then_close(session.conn.server);
    }
}

/// What an established session keeps while it forwards.
struct Forwarding<'s, S> {
    client: ClientStream<S>,
    conn: route::Connected,
    /// Where the server stream stands (after its first ReadyForQuery).
    tracker: protocol::MessageTracker,
    /// The view's validity, for a primary session of a view with one.
    deadline: Option<&'s crate::view::Deadline>,
    _cancel: Option<cancel::CancelGuard>,
    /// The session's sockets in the kernel's sockhash (kernel forwarding).
    #[cfg(target_os = "linux")]
    kernel: Kernel,
}

/// Steps 1 to 6: `None` once the session has ended (refused, a cancel
/// request relayed, the server's own refusal relayed).
async fn start<'s, S>(shared: &'s Shared, accepted: Box<Accepted<S>>) -> Option<Forwarding<'s, S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Accepted { io, peer, opts } = *accepted;
    let accepted_at = Instant::now();
    let limit = shared.cfg.startup_timeout;
    let deadline = accepted_at + limit;
    let mut io = Prefixed::new(io);

    // 1. PROXY header: the real client address, from a trusted balancer.
    let client_addr = match &opts.proxy_protocol {
        None => peer,
        Some(trusted) => {
            match Box::pin(proxy_protocol::read(&mut io, peer, trusted, deadline)).await {
                Ok(addr) => {
                    if addr != peer {
                        shared.metrics.proxy_header_accepted();
                        tracing::Span::current().record("client.addr", field::display(addr));
                    }
                    addr
                }
                Err(e) => {
                    Box::pin(refuse(shared, &mut ClientStream::Plain(io), e)).await;
                    return None;
                }
            }
        }
    };

    // 2. Startup phase: SSLRequest/GSSENCRequest answered, TLS terminated,
    //    then a StartupMessage or a CancelRequest.
    let mut client = ClientStream::Plain(io);
    let tls = shared.acceptor();
    let startup = Box::pin(read_startup(&mut client, tls.as_ref(), deadline, limit)).await;
    let (message, pipelined) = match startup {
        Ok(Startup::Session { message, pipelined }) => (message, pipelined),
        // 3. A cancel request goes to the backend that issued its key; the
        //    client's connection closes once that backend closed its own.
        Ok(Startup::Cancel(req)) => {
            let cluster = client
                .server_name()
                .and_then(|n| shared.cfg.server_names.get(n));
            Box::pin(cancel::relay(shared, cluster, &req)).await;
            return None;
        }
        Err(e) => {
            Box::pin(refuse(shared, &mut client, e)).await;
            return None;
        }
    };

    // 4. Route: the session's own `keelson.route`, a rule, or the
    //    listener's default; the cluster is the SNI name's, or the proxy's.
    let server_name = client.server_name();
    let plan = match route::plan(shared, server_name, message, client_addr, opts.route) {
        Ok(plan) => plan,
        Err(e) => {
            Box::pin(refuse(shared, &mut client, e)).await;
            return None;
        }
    };
    let route = plan.route;
    let mode = opts.forwarding;
    match established(shared, &mut client, plan, pipelined, accepted_at, mode).await {
        Ok(Some(((conn, tracker, deadline, cancel), _kernel))) => Some(Forwarding {
            client,
            conn,
            tracker,
            deadline,
            _cancel: cancel,
            #[cfg(target_os = "linux")]
            kernel: _kernel,
        }),
        Ok(None) => None,
        Err(e) => {
            shared.metrics.route_refused(route, e.reason());
            Box::pin(refuse(shared, &mut client, e)).await;
            None
        }
    }
}

/// What steps 5 and 6 leave for forwarding: the connection, the server
/// stream's position, the view's deadline (if it has one) and the cancel
/// key's registration.
type Ready<'s> = (
    route::Connected,
    protocol::MessageTracker,
    Option<&'s crate::view::Deadline>,
    Option<cancel::CancelGuard>,
);

/// The session's sockets in the kernel, where it forwards there.
#[cfg(target_os = "linux")]
type Kernel = Option<Box<crate::kernel::Handed>>;
#[cfg(not(target_os = "linux"))]
type Kernel = ();

/// Steps 5 and 6 of a routed session: connect and authenticate, register
/// the cancel key, hand the session to the kernel (kernel forwarding),
/// and write what authentication left for either side. `None` once the
/// server refused the client (its ErrorResponse was relayed).
async fn established<'s, S>(
    shared: &Shared,
    client: &mut ClientStream<S>,
    plan: Plan<'s>,
    pipelined: BytesMut,
    accepted_at: Instant,
    mode: ForwardingMode,
) -> Result<Option<(Ready<'s>, Kernel)>, SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let view = plan.view;
    let Some((mut conn, mut est)) =
        Box::pin(connect_and_authenticate(shared, client, plan, pipelined)).await?
    else {
        return Ok(None);
    };
    shared.metrics.handshake(accepted_at.elapsed());
    let cancel = est
        .cancel_key
        .take()
        .map(|(pid, secret)| shared.cancel.register(pid, secret, conn.backend.clone()));
    let deadline = conn.deadline.then(|| view.deadline());
    // Handed to the kernel before the client can answer: nothing is in
    // flight either way until it reads its first ReadyForQuery.
    #[cfg(target_os = "linux")]
    let mut kernel = hand_off(shared, mode, client, &conn, &est, deadline);
    #[cfg(not(target_os = "linux"))]
    let kernel = {
        shared.metrics.forwarding(
            "userspace",
            match mode {
                ForwardingMode::Kernel => "unavailable",
                ForwardingMode::Userspace => "none",
            },
        );
    };
    // The client is ready once it reads this: its cancel key is known now.
    client
        .write_all(&est.to_client)
        .await
        .map_err(SessionError::ClientIo)?;
    #[cfg(target_os = "linux")]
    if let Some(h) = kernel.as_mut() {
        h.wrote_to_client(est.to_client.len());
    }
    drop(std::mem::take(&mut est.to_client));
    // Past the deadline nothing more reaches the primary; `forward` then
    // ends the session at once.
    if !est.to_backend.is_empty() && !deadline.is_some_and(|d| d.passed()) {
        conn.server
            .write_all(&est.to_backend)
            .await
            .map_err(|source| SessionError::BackendIo {
                addr: conn.backend.addr().to_owned(),
                source,
            })?;
    }
    tracing::debug!("session established");
    Ok(Some(((conn, est.tracker, deadline, cancel), kernel)))
}

/// The session's two sockets in the kernel's sockhash, if its listener
/// forwards there and it can: plain TCP both ways, nothing buffered, and
/// the programs loaded. Counts the mode either way.
#[cfg(target_os = "linux")]
fn hand_off<S: 'static>(
    shared: &Shared,
    mode: ForwardingMode,
    client: &ClientStream<S>,
    conn: &route::Connected,
    est: &backend::Established,
    deadline: Option<&crate::view::Deadline>,
) -> Kernel {
    use crate::kernel::{self, Handed};
    use crate::stream::ServerStream;
    let why = 'why: {
        if mode == ForwardingMode::Userspace {
            break 'why "none";
        }
        let Ok(k) = kernel::get() else {
            break 'why "unavailable";
        };
        let (ClientStream::Plain(p), ServerStream::Plain(server)) = (client, &conn.server) else {
            break 'why "tls";
        };
        let tcp = (p.get_ref() as &dyn std::any::Any).downcast_ref::<tokio::net::TcpStream>();
        // Nothing pending either way, and the server's stream at its first
        // ReadyForQuery (authentication read no further), which is where
        // the kernel's parser starts.
        let at_ready = p.prefix_is_empty() && est.to_backend.is_empty() && est.tracker.idle();
        let Some(tcp) = tcp.filter(|_| at_ready) else {
            break 'why "pending_bytes";
        };
        match Handed::hand_off(k, tcp, server, deadline, &conn.fence) {
            Ok(Ok(h)) => {
                shared.metrics.forwarding("kernel", "none");
                shared
                    .kernel_sessions
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Some(Box::new(h));
            }
            Ok(Err(why)) => why,
            Err(e) => {
                tracing::debug!(error = %e, "kernel forwarding refused this session");
                "error"
            }
        }
    };
    shared.metrics.forwarding("userspace", why);
    if why != "none" {
        shared
            .kernel_fallbacks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    None
}

impl<S> Forwarding<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Steps 7 and 8: forward until either side closes, or the fence or
    /// the view's deadline ends the session at a message boundary; then
    /// count and log how it ended.
    async fn forward(&mut self, shared: &Shared) -> Outcome {
        let counters = SessionCounters::new(&shared.metrics);
        #[allow(unused_mut)]
        let mut awaiting = false;
        // Not boxed: the kernel phase waits on the sockets' readiness
        // without waiter nodes and boxes its take-back, so it fits in the
        // space the user-space forwarding state takes
        // (the_session_future_stays_small).
        #[cfg(target_os = "linux")]
        if let Some(end) = self.in_kernel(&mut awaiting).await {
            let (to_server, to_client) = self.kernel_moved();
            counters.to_backend.add(to_server);
            counters.to_client.add(to_client);
            shared.metrics.ended(end.label());
            tracing::debug!(reason = end.label(), to_server, to_client, "session ended");
            return end;
        }
        let (tracker, fence, deadline) = (&mut self.tracker, &self.conn.fence, self.deadline);
        let server = &mut self.conn.server;
        let (outcome, mut totals) = match &mut self.client {
            ClientStream::Plain(s) => {
                forward(
                    s,
                    server,
                    tracker,
                    fence,
                    deadline,
                    &counters.to_backend,
                    &counters.to_client,
                )
                .awaiting(awaiting)
                .await
            }
            ClientStream::Tls(s) => {
                forward(
                    s.as_mut(),
                    server,
                    tracker,
                    fence,
                    deadline,
                    &counters.to_backend,
                    &counters.to_client,
                )
                .await
            }
            ClientStream::Closed => (Outcome::ClientClosed, Default::default()),
        };
        let (to_server, to_client) = self.kernel_moved();
        counters.to_backend.add(to_server);
        counters.to_client.add(to_client);
        totals.client_to_backend += to_server;
        totals.backend_to_client += to_client;

        shared.metrics.ended(outcome.label());
        match &outcome {
            Outcome::Error { side, error } => tracing::info!(
                side = side.as_str(),
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
        outcome
    }
}

impl<S: 'static> Forwarding<'_, S> {
    /// Bytes the kernel moved: to the server, to the client.
    fn kernel_moved(&self) -> (u64, u64) {
        #[cfg(target_os = "linux")]
        if let Some(h) = &self.kernel {
            return h.moved();
        }
        (0, 0)
    }

    /// A kernel-forwarded session, until it ends there (`Some`) or is
    /// taken back to user space at a boundary of the server's stream
    /// (`None`; `awaiting` then says whether the client's bytes went out
    /// since the server's last ReadyForQuery). Holds no buffer meanwhile.
    #[cfg(target_os = "linux")]
    async fn in_kernel(&mut self, awaiting: &mut bool) -> Option<Outcome> {
        use crate::kernel::Woken;
        use crate::stream::ServerStream;
        let h = self.kernel.as_mut()?;
        let (ClientStream::Plain(p), ServerStream::Plain(server)) =
            (&mut self.client, &mut self.conn.server)
        else {
            unreachable!("only plain TCP sessions are handed to the kernel")
        };
        let client = (p.get_mut() as &mut dyn std::any::Any)
            .downcast_mut::<tokio::net::TcpStream>()
            .expect("only plain TCP sessions are handed to the kernel");
        let fence = &self.conn.fence;
        let label = || match fence.reason() {
            Some(r) => r.label,
            None if fence.is_fired() => "fenced",
            None => crate::fence::FenceReason::primary_unconfirmed().label,
        };
        match h.wait(client, server, fence).await {
            Woken::Fenced | Woken::Passed => {
                let limit = Instant::now() + crate::forward::FENCE_DEADLINE;
                // Boxed: an idle session's future holds only the wait.
                match Box::pin(h.take_back(limit)).await {
                    Ok(Some((tracker, a))) => {
                        if let Err(error) = h.rebind(client, server) {
                            return Some(Outcome::Error {
                                side: protocol::Side::Client,
                                error,
                            });
                        }
                        self.tracker = tracker;
                        *awaiting = a;
                        None
                    }
                    Ok(None) => Some(Outcome::Fenced {
                        label: label(),
                        clean: false,
                    }),
                    Err(error) => Some(Outcome::Error {
                        side: protocol::Side::Backend,
                        error,
                    }),
                }
            }
            Woken::ClientClosed => {
                Box::pin(h.flush_to_server()).await;
                Some(Outcome::ClientClosed)
            }
            Woken::ServerClosed => {
                Box::pin(h.flush_to_client()).await;
                Some(Outcome::BackendClosed)
            }
            Woken::Error(side, error) => Some(Outcome::Error { side, error }),
        }
    }
}

/// Steps 5 and 6 of a session: connect and authenticate. `None` once the
/// server refused the client (its ErrorResponse was relayed).
async fn connect_and_authenticate<S>(
    shared: &Shared,
    client: &mut ClientStream<S>,
    plan: Plan<'_>,
    pipelined: BytesMut,
) -> Result<Option<(route::Connected, backend::Established)>, SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // 5. Connect: pick a backend from the view (holding the client while
    //    there is none), take its fence, open the TCP connection.
    // 6. Authenticate: relay the exchange untouched, negotiate the protocol
    //    version, check the server's role, learn the cancel key.
    // A server that refuses the connection or answers 57P03 (starting up,
    // shutting down) before anything reached the client is treated like
    // one that is not there yet: the client is held and both steps are
    // tried again, with the view as it is then, until the hold timeout.
    // Nothing but the startup message has reached a server at that point.
    // The startup message and the bytes pipelined after it are copied into
    // the first write and then dropped once authentication began: an idle
    // session keeps no buffer of its startup phase.
    let (first, negotiation) = {
        let (startup, negotiation) = backend::negotiate(&plan.message);
        let mut first = BytesMut::with_capacity(startup.len() + pipelined.len());
        first.extend_from_slice(&startup);
        first.extend_from_slice(&pipelined);
        (first, negotiation)
    };
    drop(pipelined);
    let route = plan.route;
    let mut held_since: Option<Instant> = None;
    loop {
        let retry = |e: &SessionError| {
            matches!(
                e,
                SessionError::BackendConnect { .. } | SessionError::BackendConnectTimeout { .. }
            )
        };
        let conn = match Box::pin(route::connect(shared, &plan, held_since)).await {
            Ok(conn) => conn,
            Err(e) if retry(&e) => {
                if !Box::pin(hold_for_retry(shared, &plan, &mut held_since, e.reason())).await {
                    return Err(e);
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut conn = conn;
        tracing::Span::current().record("backend.addr", conn.backend.addr());
        let relayed = std::sync::atomic::AtomicBool::new(false);
        let auth = async {
            let auth_limit = shared.cfg.auth_timeout;
            backend::authenticate(
                &mut *client,
                &mut conn.server,
                conn.backend.addr(),
                &first,
                backend::Expect {
                    negotiation: negotiation.clone(),
                    want_standby: route.wants_standby(),
                },
                Instant::now() + auth_limit,
                auth_limit,
                &relayed,
            )
            .await
        };
        // Once the client has seen the authentication exchange, the session
        // cannot be set up elsewhere; a switchover's drain lets it finish on
        // the old primary, which still serves (its first statement runs
        // there too; see forward.rs).
        let committed = || relayed.load(std::sync::atomic::Ordering::Relaxed);
        let authenticated = Box::pin(route::until_fenced_unless_draining(
            &conn.fence,
            committed,
            auth,
        ))
        .await;
        let authenticated = match authenticated {
            // The primary changed while the session was being set up, and
            // the client has seen nothing yet: set up again with the view
            // as it is now.
            Err(SessionError::FencedWhileConnecting)
                if !committed() && !conn.still_routable(shared, &plan) =>
            {
                let reason = "fenced_while_connecting";
                if Box::pin(hold_for_retry(shared, &plan, &mut held_since, reason)).await {
                    continue;
                }
                return Err(SessionError::FencedWhileConnecting);
            }
            r => r?,
        };
        match authenticated {
            AuthResult::Ready(est) => return Ok(Some((conn, est))),
            AuthResult::Refused => {
                shared.metrics.ended("refused_by_server");
                return Ok(None);
            }
            AuthResult::NotReady(not_ready) => {
                let reason = match &not_ready {
                    NotReady::Refused(_) => "server_not_ready",
                    NotReady::Closed(_) => "server_closed",
                };
                if Box::pin(hold_for_retry(shared, &plan, &mut held_since, reason)).await {
                    continue;
                }
                // Held long enough: the client hears the server's refusal.
                match not_ready {
                    NotReady::Refused(reply) => {
                        let _ = client.write_all(&reply).await;
                        let _ = client.flush().await;
                        shared.metrics.ended("refused_by_server");
                        return Ok(None);
                    }
                    NotReady::Closed(e) => return Err(e),
                }
            }
        }
    }
}

/// How often a held session tries a server that refused it again.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// After a server refused a session that can be tried again: holds it for
/// [`RETRY_PAUSE`] and returns true, or returns false once the hold timeout
/// (counted from the first refusal) would pass.
async fn hold_for_retry(
    shared: &Shared,
    plan: &Plan<'_>,
    held_since: &mut Option<Instant>,
    reason: &'static str,
) -> bool {
    let hold = plan.view.hold_timeout().unwrap_or(shared.cfg.hold_timeout);
    let since = *held_since.get_or_insert_with(Instant::now);
    if since.elapsed() + RETRY_PAUSE >= hold || shared.terminating.load(Ordering::Acquire) {
        shared.metrics.held(
            since.elapsed(),
            "timed_out",
            plan.route,
            plan.view.name_label(),
        );
        return false;
    }
    shared.metrics.retried(reason);
    tracing::debug!(
        reason,
        "the server refused the session for now; holding the client"
    );
    tokio::time::sleep(RETRY_PAUSE).await;
    true
}

/// Refuses the session: counts it, logs the full error, and tells the
/// client in words that hold no address or OS error text.
#[cold]
pub(crate) async fn refuse<S>(shared: &Shared, client: &mut S, e: SessionError)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let meta = e.meta();
    shared.metrics.rejected(meta.kind, meta.reason);
    match meta.kind {
        crate::ErrorKind::Client => tracing::debug!(error = %e, "client refused"),
        _ => tracing::info!(error = %e, retryable = meta.retryable, "session refused"),
    }
    tell(shared, client, &e).await;
}

/// Sends `e` as a FATAL ErrorResponse, if it has a SQLSTATE, and closes.
#[cold]
pub(crate) async fn tell<S>(shared: &Shared, client: &mut S, e: &SessionError)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let meta = e.meta();
    let Some(code) = meta.sqlstate else {
        return;
    };
    let detail = shared.cfg.error_detail.then(|| e.to_string());
    let mut buf = BytesMut::new();
    protocol::write_error_with_detail(
        &mut buf,
        Severity::Fatal,
        code,
        &meta.message,
        detail.as_deref(),
        meta.hint,
    );
    let sent = timeout(Duration::from_secs(1), async {
        client.write_all(&buf).await?;
        client.flush().await?;
        client.shutdown().await
    })
    .await;
    if matches!(sent, Ok(Ok(()))) {
        // Read what the client still sends until it closes (briefly):
        // closing with unread bytes resets the connection, and the client
        // could lose the ErrorResponse.
        let _ = timeout(DRAIN_AFTER_REFUSAL, async {
            let mut sink = [0u8; 1024];
            while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}

/// How long a refused client's unread bytes are drained before its
/// connection is closed.
const DRAIN_AFTER_REFUSAL: Duration = Duration::from_millis(250);

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
