//! ForwardState: copies bytes both ways between a client and its backend once
//! the session is established.
//!
//! - Nothing is allocated per message. A direction takes a pooled buffer just
//!   before it reads and returns it once the bytes are written, so an idle
//!   session holds no data buffer.
//! - The backend-to-client direction feeds every chunk to a
//!   [`MessageTracker`], which follows the 5-byte message headers. The proxy
//!   therefore always knows where the next message boundary is, and can end
//!   a fenced session with a FATAL ErrorResponse that the client parses as
//!   cleanly as one from PostgreSQL itself.
//! - Both directions and the fence are polled by one future in one task: no
//!   channel, no extra wake-up, and after a read the write is attempted at
//!   once. A fence is noticed through one atomic load per wake-up.
//! - A primary session of a view with a validity [`Deadline`] also checks it
//!   whenever it has client bytes to forward, after reading them and before
//!   writing them: one atomic load and a monotonic clock read per read batch
//!   (wake-ups with nothing from the client skip it; forwarding the server's
//!   replies after the deadline is harmless). Once the deadline has passed
//!   the session ends like a fenced one, and the bytes read are dropped,
//!   even if nothing has fired its fence yet: after a whole-node freeze the
//!   worker threads may resume before the task that would fence them.
//!   Sessions without a deadline (static mode, standbys) skip the check.
//!
//! The future is not cancel-safe in the sense of resuming: dropping it drops
//! whatever bytes were in flight, which is what ending a session means.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::fence::{Fence, FenceReason, SWITCHOVER_DRAIN};
use crate::pool::PooledBuf;
use crate::protocol::{self, MessageTracker, Severity, Side};
use crate::view::Deadline;

/// How a forwarded session ended.
#[derive(Debug)]
pub enum Outcome {
    /// The client closed its side (normally after Terminate).
    ClientClosed,
    /// The server closed its side.
    BackendClosed,
    /// A fence fired; the client was sent a FATAL unless `clean` is false
    /// (no boundary could be reached in time).
    Fenced { label: &'static str, clean: bool },
    /// A socket error, and the side it came from.
    Error { side: Side, error: io::Error },
}

/// Errors compare by side and [`io::ErrorKind`].
impl PartialEq for Outcome {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Outcome::Error { side: a, error: e }, Outcome::Error { side: b, error: f }) => {
                a == b && e.kind() == f.kind()
            }
            (Outcome::Fenced { label: a, clean: c }, Outcome::Fenced { label: b, clean: d }) => {
                a == b && c == d
            }
            (a, b) => std::mem::discriminant(a) == std::mem::discriminant(b),
        }
    }
}

impl Outcome {
    /// Metric label for `sessions_ended_total{reason=...}`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::ClientClosed => "client_closed",
            Outcome::BackendClosed => "backend_closed",
            Outcome::Fenced { label, .. } => label,
            Outcome::Error {
                side: Side::Client, ..
            } => "client_error",
            Outcome::Error {
                side: Side::Backend,
                ..
            } => "backend_error",
        }
    }
}

/// Byte counters fed once per read batch.
pub trait ByteCounter {
    fn add(&self, n: u64);
}

impl ByteCounter for metrics::Counter {
    #[inline]
    fn add(&self, n: u64) {
        self.increment(n)
    }
}

impl ByteCounter for () {
    #[inline]
    fn add(&self, _: u64) {}
}

/// Totals of a session's traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
}

const _: () = assert!(crate::pool::BUF_SIZE <= u32::MAX as usize);

/// One direction of the copy.
#[derive(Default)]
struct Half {
    buf: Option<PooledBuf>,
    /// Written and read up to, in `buf` (a pooled buffer is far smaller
    /// than 4 GiB; 32 bits keep every idle session's state smaller).
    pos: u32,
    end: u32,
    needs_flush: bool,
    eof: bool,
    total: u64,
}

enum Step {
    /// The reader reached EOF and the writer was shut down.
    Eof,
    /// Fencing only: the stream is at a message boundary.
    Boundary,
    /// The gate's deadline had passed when bytes were to be written; they
    /// were dropped.
    Expired,
}

enum HalfError {
    Read(io::Error),
    Write(io::Error),
}

impl Half {
    /// Moves bytes from `r` to `w` until the reader is pending (then
    /// `Pending`), EOF, or (with `to_boundary`) the next message boundary.
    /// With a `gate`, bytes are written only while its deadline has not
    /// passed (checked once per batch read, and before resuming a write).
    #[allow(clippy::too_many_arguments)]
    fn poll_copy<R, W, C>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        mut tracker: Option<&mut MessageTracker>,
        to_boundary: bool,
        gate: Option<&Deadline>,
        counter: &C,
    ) -> Poll<Result<Step, HalfError>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
        C: ByteCounter,
    {
        // A write left pending by an earlier wake-up (the writer was full):
        // the deadline may have passed since.
        if self.pos < self.end && gate.is_some_and(Deadline::passed) {
            return Poll::Ready(Ok(Step::Expired));
        }
        loop {
            if let Some(buf) = &self.buf {
                while self.pos < self.end {
                    let n = ready!(w
                        .as_mut()
                        .poll_write(cx, &buf[self.pos as usize..self.end as usize]))
                    .map_err(HalfError::Write)?;
                    if n == 0 {
                        return Poll::Ready(Err(HalfError::Write(io::ErrorKind::WriteZero.into())));
                    }
                    self.pos += n as u32;
                    self.needs_flush = true;
                }
            }
            if self.needs_flush {
                ready!(w.as_mut().poll_flush(cx)).map_err(HalfError::Write)?;
                self.needs_flush = false;
            }
            // Everything read has been written: the buffer goes back.
            self.buf = None;
            if self.eof {
                // A peer that already went away cannot be shut down; that
                // is fine, the session is over either way.
                let _ = ready!(w.as_mut().poll_shutdown(cx));
                return Poll::Ready(Ok(Step::Eof));
            }
            let mut limit = usize::MAX;
            if to_boundary {
                match tracker.as_deref().and_then(MessageTracker::to_boundary) {
                    Some(0) | None => return Poll::Ready(Ok(Step::Boundary)),
                    Some(n) => limit = n,
                }
            }
            let mut buf = PooledBuf::take();
            let cap = buf.len().min(limit);
            let mut rb = ReadBuf::new(&mut buf[..cap]);
            // On Pending the buffer is dropped, which returns it to the pool.
            ready!(r.as_mut().poll_read(cx, &mut rb)).map_err(HalfError::Read)?;
            let n = rb.filled().len();
            if n == 0 {
                self.eof = true;
                continue;
            }
            if gate.is_some_and(Deadline::passed) {
                return Poll::Ready(Ok(Step::Expired));
            }
            if let Some(t) = tracker.as_deref_mut() {
                t.observe(&buf[..n]);
            }
            counter.add(n as u64);
            self.total += n as u64;
            self.pos = 0;
            self.end = n as u32;
            self.buf = Some(buf);
        }
    }
}

/// How long a fenced session may take to reach a message boundary and
/// deliver its FATAL before both sockets are simply closed.
pub const FENCE_DEADLINE: Duration = Duration::from_secs(1);

/// Where a session stands with its fence. Each fenced state is boxed:
/// every idle session holds an `Open` one, two words, not the 80 bytes
/// of the largest.
enum FenceState {
    /// Not fenced yet.
    Open,
    /// Fenced by a planned switchover: forwarding both ways until no
    /// transaction is open, or the deadline passes.
    Finishing(Box<(Pin<Box<Sleep>>, FenceReason)>),
    /// ForwardState server bytes up to the next boundary.
    Draining(Box<(Pin<Box<Sleep>>, FenceReason)>),
    /// Writing the FATAL; `pos` bytes of `msg` written.
    Telling(Box<Telling>),
}

struct Telling {
    deadline: Pin<Box<Sleep>>,
    msg: BytesMut,
    pos: usize,
    label: &'static str,
}

fn telling(deadline: Pin<Box<Sleep>>, msg: BytesMut, label: &'static str) -> FenceState {
    FenceState::Telling(Box::new(Telling {
        deadline,
        msg,
        pos: 0,
        label,
    }))
}

/// Copies between `client` and `backend` until either side closes, an error
/// occurs, `fence` fires, or `deadline` (if any) passes.
///
/// `tracker` must describe the server stream as of the first byte this
/// function will forward (a fresh tracker after ReadyForQuery).
///
/// The future is a plain struct (no async fn, no closure): every idle
/// session keeps it, and an async fn would hold its arguments and a
/// closure's references to them twice over (424 bytes as an async fn).
#[allow(clippy::too_many_arguments)]
pub fn forward<'a, C, B, CC, BC>(
    client: &'a mut C,
    backend: &'a mut B,
    tracker: &'a mut MessageTracker,
    fence: &'a Fence,
    deadline: Option<&'a Deadline>,
    to_backend_bytes: &'a CC,
    to_client_bytes: &'a BC,
) -> Forward<'a, C, B, CC, BC>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    CC: ByteCounter,
    BC: ByteCounter,
{
    Forward {
        notified: fence.notified(),
        s: ForwardState {
            client,
            backend,
            tracker,
            fence,
            deadline,
            to_backend_bytes,
            to_client_bytes,
            armed: false,
            up: Half::default(),
            down: Half::default(),
            state: FenceState::Open,
            awaiting: false,
        },
    }
}

impl<C: ?Sized, B: ?Sized, CC, BC> Forward<'_, C, B, CC, BC> {
    /// Client bytes went out since the server's last ReadyForQuery (the
    /// session was forwarded elsewhere until now).
    pub(crate) fn awaiting(mut self, awaiting: bool) -> Self {
        self.s.awaiting = awaiting;
        self
    }
}

/// The future [`forward`] returns.
pub struct Forward<'a, C: ?Sized, B: ?Sized, CC, BC> {
    /// Pinned with the struct (never moved out of it).
    notified: tokio::sync::futures::Notified<'a>,
    s: ForwardState<'a, C, B, CC, BC>,
}

struct ForwardState<'a, C: ?Sized, B: ?Sized, CC, BC> {
    client: &'a mut C,
    backend: &'a mut B,
    tracker: &'a mut MessageTracker,
    fence: &'a Fence,
    deadline: Option<&'a Deadline>,
    to_backend_bytes: &'a CC,
    to_client_bytes: &'a BC,
    /// The fence's notification is registered.
    armed: bool,
    up: Half,
    down: Half,
    state: FenceState,
    /// Client bytes were read since the server's last answer: a query may be
    /// on its way or running, even though the server's stream still ends
    /// with the ReadyForQuery before it. (A pipelined query sent before an
    /// earlier one's answer is not told apart from it.)
    awaiting: bool,
}

impl<C, B, CC, BC> Future for Forward<'_, C, B, CC, BC>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    CC: ByteCounter,
    BC: ByteCounter,
{
    type Output = (Outcome, Transferred);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: `notified` is only ever used pinned, through this
        // projection, and never moved out; the other fields are Unpin
        // data that may move freely.
        let this = unsafe { self.get_unchecked_mut() };
        let notified = unsafe { Pin::new_unchecked(&mut this.notified) };
        let outcome = ready!(poll_forward(cx, &mut this.s, notified));
        Poll::Ready((
            outcome,
            Transferred {
                client_to_backend: this.s.up.total,
                backend_to_client: this.s.down.total,
            },
        ))
    }
}

fn poll_forward<C, B, CC, BC>(
    cx: &mut Context<'_>,
    s: &mut ForwardState<'_, C, B, CC, BC>,
    mut notified: Pin<&mut tokio::sync::futures::Notified<'_>>,
) -> Poll<Outcome>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    CC: ByteCounter,
    BC: ByteCounter,
{
    let ForwardState {
        client,
        backend,
        tracker,
        fence,
        deadline,
        to_backend_bytes,
        to_client_bytes,
        armed,
        up,
        down,
        state,
        awaiting,
    } = s;
    let (client, backend, tracker): (&mut C, &mut B, &mut MessageTracker) =
        (&mut **client, &mut **backend, &mut **tracker);
    let (fence, deadline, to_backend_bytes, to_client_bytes) =
        (*fence, *deadline, *to_backend_bytes, *to_client_bytes);
    if !*armed {
        // Registers this task's waker with the fence; afterwards the
        // atomic flag alone tells whether it fired.
        let _ = notified.as_mut().poll(cx);
        *armed = true;
    }
    loop {
        match &mut *state {
            FenceState::Open => {
                if fence.is_fired() {
                    let reason = fence.reason().cloned().unwrap_or_else(default_reason);
                    *state = if reason.drain {
                        FenceState::Finishing(Box::new((
                            Box::pin(tokio::time::sleep(SWITCHOVER_DRAIN)),
                            reason,
                        )))
                    } else {
                        FenceState::Draining(Box::new((
                            Box::pin(tokio::time::sleep(FENCE_DEADLINE)),
                            reason,
                        )))
                    };
                    continue;
                }
                let copied = copy_noting(
                    cx,
                    (&mut *up, &mut *down),
                    (&mut *client, &mut *backend),
                    tracker,
                    deadline,
                    (to_backend_bytes, to_client_bytes),
                    awaiting,
                );
                match copied {
                    Poll::Ready(None) => {
                        *state = expired();
                        continue;
                    }
                    Poll::Ready(Some(o)) => return Poll::Ready(o),
                    Poll::Pending => {}
                }
                // Re-check: the fence may have fired while we copied.
                if !fence.is_fired() {
                    return Poll::Pending;
                }
            }
            FenceState::Finishing(b) => {
                let (limit, reason) = &mut **b;
                // Checked before any client byte is forwarded: once idle
                // after a round that ran a statement, nothing more
                // reaches the server. A session that has run nothing since
                // it started (its client is about to) runs its first
                // statement first, and one idle only after a prepare or a
                // describe (an extended-protocol client's first round trip
                // of two) runs its execute: a client with a connection per
                // transaction sees no error.
                let out_of_time = limit.as_mut().poll(cx).is_ready();
                let quiet = tracker.idle() && !*awaiting;
                let done = tracker.idle_after_work() && !*awaiting;
                if done || out_of_time {
                    let reason = reason.clone();
                    if quiet {
                        let mut msg = BytesMut::new();
                        protocol::write_error(
                            &mut msg,
                            Severity::Fatal,
                            reason.sqlstate,
                            &reason.message,
                            None,
                        );
                        let sleep = Box::pin(tokio::time::sleep(FENCE_DEADLINE));
                        *state = telling(sleep, msg, reason.label);
                    } else {
                        // A transaction still open: ended at the next
                        // message boundary, as any fenced session.
                        let sleep = Box::pin(tokio::time::sleep(FENCE_DEADLINE));
                        *state = FenceState::Draining(Box::new((sleep, reason)));
                    }
                    continue;
                }
                let copied = copy_noting(
                    cx,
                    (&mut *up, &mut *down),
                    (&mut *client, &mut *backend),
                    tracker,
                    deadline,
                    (to_backend_bytes, to_client_bytes),
                    awaiting,
                );
                match copied {
                    Poll::Ready(None) => {
                        *state = expired();
                        continue;
                    }
                    Poll::Ready(Some(o)) => return Poll::Ready(o),
                    Poll::Pending => {}
                }
                if !tracker.idle_after_work() || *awaiting {
                    return Poll::Pending;
                }
            }
            FenceState::Draining(b) => {
                let (deadline, reason) = &mut **b;
                let label = reason.label;
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Outcome::Fenced {
                        label,
                        clean: false,
                    });
                }
                match down.poll_copy(
                    cx,
                    Pin::new(&mut *backend),
                    Pin::new(&mut *client),
                    Some(&mut *tracker),
                    true,
                    None,
                    to_client_bytes,
                ) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(Step::Boundary)) if tracker.to_boundary() == Some(0) => {
                        let mut msg = BytesMut::new();
                        protocol::write_error(
                            &mut msg,
                            Severity::Fatal,
                            reason.sqlstate,
                            &reason.message,
                            None,
                        );
                        let FenceState::Draining(b) = std::mem::replace(state, FenceState::Open)
                        else {
                            unreachable!("state checked above")
                        };
                        *state = telling(b.0, msg, label);
                    }
                    Poll::Ready(_) => {
                        return Poll::Ready(Outcome::Fenced {
                            label,
                            clean: false,
                        })
                    }
                }
            }
            FenceState::Telling(t) => {
                let Telling {
                    deadline,
                    msg,
                    pos,
                    label,
                } = &mut **t;
                let label = *label;
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Outcome::Fenced {
                        label,
                        clean: false,
                    });
                }
                let mut w = Pin::new(&mut *client);
                while *pos < msg.len() {
                    match ready!(w.as_mut().poll_write(cx, &msg[*pos..])) {
                        Ok(n) if n > 0 => *pos += n,
                        _ => {
                            return Poll::Ready(Outcome::Fenced {
                                label,
                                clean: false,
                            })
                        }
                    }
                }
                let clean = ready!(w.as_mut().poll_flush(cx)).is_ok();
                let _ = ready!(w.as_mut().poll_shutdown(cx));
                return Poll::Ready(Outcome::Fenced { label, clean });
            }
        }
    }
}

/// [`copy_both`], noting in `awaiting` that the client sent bytes (a
/// statement may be on its way) or that the server answered up to a
/// ReadyForQuery saying idle.
#[inline]
fn copy_noting<C, B, CC, BC>(
    cx: &mut Context<'_>,
    (up, down): (&mut Half, &mut Half),
    (client, backend): (&mut C, &mut B),
    tracker: &mut MessageTracker,
    deadline: Option<&Deadline>,
    counters: (&CC, &BC),
    awaiting: &mut bool,
) -> Poll<Option<Outcome>>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    CC: ByteCounter,
    BC: ByteCounter,
{
    let (sent, received) = (up.total, down.total);
    let copied = copy_both(cx, (up, down), client, backend, tracker, deadline, counters);
    if up.total != sent {
        *awaiting = true;
    } else if down.total != received && tracker.idle() {
        *awaiting = false;
    }
    copied
}

/// Both directions of an open session, as far as they go now: `Ready`
/// with how the session ended, or `Ready(None)` when the view's deadline
/// passed; `Pending` once both wait. The client is read first.
#[inline]
fn copy_both<C, B, CC, BC>(
    cx: &mut Context<'_>,
    (up, down): (&mut Half, &mut Half),
    client: &mut C,
    backend: &mut B,
    tracker: &mut MessageTracker,
    deadline: Option<&Deadline>,
    (to_backend_bytes, to_client_bytes): (&CC, &BC),
) -> Poll<Option<Outcome>>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    CC: ByteCounter,
    BC: ByteCounter,
{
    if let Poll::Ready(r) = up.poll_copy(
        cx,
        Pin::new(&mut *client),
        Pin::new(&mut *backend),
        None,
        false,
        deadline,
        to_backend_bytes,
    ) {
        return Poll::Ready(match r {
            Ok(Step::Expired) => None,
            Ok(_) => Some(Outcome::ClientClosed),
            Err(HalfError::Read(e)) => Some(io_outcome(true, e)),
            Err(HalfError::Write(e)) => Some(io_outcome(false, e)),
        });
    }
    if let Poll::Ready(r) = down.poll_copy(
        cx,
        Pin::new(&mut *backend),
        Pin::new(&mut *client),
        Some(tracker),
        false,
        None,
        to_client_bytes,
    ) {
        return Poll::Ready(Some(match r {
            Ok(_) => Outcome::BackendClosed,
            Err(HalfError::Read(e)) => io_outcome(false, e),
            Err(HalfError::Write(e)) => io_outcome(true, e),
        }));
    }
    Poll::Pending
}

/// A primary session past its view's deadline: it ends as if fenced.
#[cold]
fn expired() -> FenceState {
    FenceState::Draining(Box::new((
        Box::pin(tokio::time::sleep(FENCE_DEADLINE)),
        FenceReason::primary_unconfirmed(),
    )))
}

#[cold]
fn default_reason() -> FenceReason {
    FenceReason {
        sqlstate: crate::error::ADMIN_SHUTDOWN,
        message: "terminating connection: the proxy ended this session".into(),
        label: "fenced",
        drain: false,
    }
}

#[cold]
fn io_outcome(client: bool, e: io::Error) -> Outcome {
    // A reset from the peer is how many clients say goodbye.
    if client
        && matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        )
    {
        return Outcome::ClientClosed;
    }
    let side = if client { Side::Client } else { Side::Backend };
    Outcome::Error { side, error: e }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    type Task = tokio::task::JoinHandle<(Outcome, Transferred)>;

    /// A session forwarding between two in-memory streams, right after
    /// its first ReadyForQuery: the client's end, the server's end, its
    /// fence, and the forwarding task.
    fn session() -> (
        tokio::io::DuplexStream,
        tokio::io::DuplexStream,
        Arc<Fence>,
        Task,
    ) {
        let (client_end, mut client) = tokio::io::duplex(1 << 16);
        let (backend_end, mut backend) = tokio::io::duplex(1 << 16);
        let fence = Arc::new(Fence::default());
        let f2 = fence.clone();
        let task = tokio::spawn(async move {
            let mut t = MessageTracker::after_ready();
            forward(&mut client, &mut backend, &mut t, &f2, None, &(), &()).await
        });
        (client_end, backend_end, fence, task)
    }

    /// The session ended fenced by the switchover, cleanly: the client
    /// read `before`, then a FATAL.
    async fn ends_with_a_fatal(
        task: Task,
        client_end: &mut tokio::io::DuplexStream,
        before: &[u8],
    ) {
        let (outcome, _) = task.await.unwrap();
        assert_eq!(
            outcome,
            Outcome::Fenced {
                label: "switchover",
                clean: true
            }
        );
        let mut got = Vec::new();
        client_end.read_to_end(&mut got).await.unwrap();
        assert!(got.starts_with(before), "{got:?}");
        assert_eq!(got[before.len()], b'E');
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn tracker_follows_boundaries_byte_by_byte() {
        let mut stream = msg(b'D', b"hello");
        stream.extend(msg(b'C', b"SELECT 1\0"));
        stream.extend(msg(b'Z', b"I"));
        let mut t = MessageTracker::default();
        let ends = [10usize, 24, 30];
        for (i, b) in stream.iter().enumerate() {
            t.observe(std::slice::from_ref(b));
            let at_boundary = t.to_boundary() == Some(0);
            assert_eq!(at_boundary, ends.contains(&(i + 1)), "byte {i}");
        }
        let mut t = MessageTracker::default();
        t.observe(&stream[..12]);
        assert_eq!(t.to_boundary(), Some(3));
        t.observe(&stream[12..15]);
        assert_eq!(t.to_boundary(), Some(9));
    }

    /// A round that only prepared or described leaves the client's unit of
    /// work open; one that ran a statement (or failed one) closes it.
    #[test]
    fn tracker_tells_a_prepare_from_a_statement_that_ran() {
        let mut t = MessageTracker::after_ready();
        assert!(t.idle() && !t.idle_after_work(), "after authentication");
        t.observe(&[msg(b'1', b""), msg(b'n', b""), msg(b'Z', b"I")].concat());
        assert!(t.idle() && !t.idle_after_work(), "after a prepare");
        t.observe(&[msg(b'2', b""), msg(b'C', b"INSERT 0 1\0"), msg(b'Z', b"I")].concat());
        assert!(t.idle_after_work(), "after an execute");
        t.observe(&[msg(b'E', b"SERROR\0\0"), msg(b'Z', b"I")].concat());
        assert!(t.idle_after_work(), "after an error");
        t.observe(&[msg(b'T', b""), msg(b'Z', b"I")].concat());
        assert!(!t.idle_after_work(), "after a describe");
    }

    #[test]
    fn tracker_gives_up_on_bad_length() {
        let mut t = MessageTracker::default();
        t.observe(&[b'D', 0, 0, 0, 2]);
        assert_eq!(t.to_boundary(), None);
    }

    #[tokio::test]
    async fn copies_both_ways_and_reports_who_closed() {
        let (mut client_end, mut client) = tokio::io::duplex(1024);
        let (mut backend_end, mut backend) = tokio::io::duplex(1024);
        let fence = Fence::default();
        let task = tokio::spawn(async move {
            let mut t = MessageTracker::default();
            forward(&mut client, &mut backend, &mut t, &fence, None, &(), &()).await
        });
        client_end.write_all(b"Q query").await.unwrap();
        let mut got = [0u8; 7];
        backend_end.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"Q query");
        let reply = msg(b'Z', b"I");
        backend_end.write_all(&reply).await.unwrap();
        let mut got = vec![0u8; reply.len()];
        client_end.read_exact(&mut got).await.unwrap();
        assert_eq!(got, reply);
        drop(client_end);
        let (outcome, totals) = task.await.unwrap();
        assert_eq!(outcome, Outcome::ClientClosed);
        assert_eq!(totals.client_to_backend, 7);
        assert_eq!(totals.backend_to_client, 6);
    }

    #[tokio::test(start_paused = true)]
    async fn fence_waits_for_the_message_boundary() {
        let (mut client_end, mut client) = tokio::io::duplex(1 << 16);
        let (mut backend_end, mut backend) = tokio::io::duplex(1 << 16);
        let fence = Arc::new(Fence::default());
        let f2 = fence.clone();
        let task = tokio::spawn(async move {
            let mut t = MessageTracker::default();
            forward(&mut client, &mut backend, &mut t, &f2, None, &(), &()).await
        });
        // Half a DataRow, then the fence fires.
        let row = msg(b'D', &[7u8; 100]);
        backend_end.write_all(&row[..50]).await.unwrap();
        tokio::task::yield_now().await;
        fence.trigger(FenceReason {
            sqlstate: "57P01",
            message: "primary changed".into(),
            label: "fenced",
            drain: false,
        });
        tokio::task::yield_now().await;
        backend_end.write_all(&row[50..]).await.unwrap();
        backend_end.write_all(&msg(b'C', b"more\0")).await.unwrap();
        let (outcome, _) = task.await.unwrap();
        assert_eq!(
            outcome,
            Outcome::Fenced {
                label: "fenced",
                clean: true
            }
        );
        let mut got = Vec::new();
        client_end.read_to_end(&mut got).await.unwrap();
        let mut want = BytesMut::new();
        want.put_slice(&row);
        protocol::write_error(&mut want, Severity::Fatal, "57P01", "primary changed", None);
        assert_eq!(
            got,
            &want[..],
            "the row completes, then FATAL, and nothing after"
        );
    }

    #[test]
    fn tracker_knows_when_no_transaction_is_open() {
        let mut t = MessageTracker::after_ready();
        assert!(t.idle());
        let mut stream = msg(b'C', b"BEGIN\0");
        stream.extend(msg(b'Z', b"T"));
        stream.extend(msg(b'C', b"COMMIT\0"));
        stream.extend(msg(b'Z', b"I"));
        // Byte by byte: idle only right after the last ReadyForQuery.
        for (i, b) in stream.iter().enumerate() {
            t.observe(std::slice::from_ref(b));
            assert_eq!(t.idle(), i + 1 == stream.len(), "byte {i}");
        }
        t.observe(&msg(b'Z', b"E"));
        assert!(!t.idle(), "a failed transaction is still open");
    }

    /// A planned switchover's fence lets the open transaction finish (its
    /// statements go on both ways), then ends the session between
    /// transactions.
    #[tokio::test(start_paused = true)]
    async fn a_switchover_fence_ends_the_session_between_transactions() {
        let (mut client_end, mut backend_end, fence, task) = session();
        // A transaction is open when the fence fires.
        client_end.write_all(b"Q BEGIN").await.unwrap();
        let mut got = [0u8; 7];
        backend_end.read_exact(&mut got).await.unwrap();
        let open = [msg(b'C', b"BEGIN\0"), msg(b'Z', b"T")].concat();
        backend_end.write_all(&open).await.unwrap();
        let mut got = vec![0u8; open.len()];
        client_end.read_exact(&mut got).await.unwrap();
        fence.trigger(FenceReason::primary_switched_over());
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The rest of the transaction still reaches the server...
        client_end.write_all(b"Q COMMIT").await.unwrap();
        let mut got = [0u8; 8];
        backend_end.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"Q COMMIT");
        let done = [msg(b'C', b"COMMIT\0"), msg(b'Z', b"I")].concat();
        backend_end.write_all(&done).await.unwrap();
        // ...and its answer the client, then the FATAL.
        ends_with_a_fatal(task, &mut client_end, &done).await;
    }

    /// A statement sent but not yet answered when a switchover's fence
    /// fires (the server's stream still ends with the ReadyForQuery before
    /// it) gets its answer before the FATAL: the client is not told its
    /// session ended while its statement may commit.
    #[tokio::test(start_paused = true)]
    async fn a_switchover_fence_waits_for_the_answer_to_a_statement_in_flight() {
        let (mut client_end, mut backend_end, fence, task) = session();
        // A first statement, answered: the session is not fresh.
        client_end.write_all(b"Q one").await.unwrap();
        let mut got = [0u8; 5];
        backend_end.read_exact(&mut got).await.unwrap();
        let idle = [msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")].concat();
        backend_end.write_all(&idle).await.unwrap();
        let mut got = vec![0u8; idle.len()];
        client_end.read_exact(&mut got).await.unwrap();
        // The second reaches the server; the fence fires before its answer.
        client_end.write_all(b"Q two").await.unwrap();
        let mut got = [0u8; 5];
        backend_end.read_exact(&mut got).await.unwrap();
        fence.trigger(FenceReason::primary_switched_over());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !task.is_finished(),
            "the session ended with a statement in flight"
        );
        backend_end.write_all(&idle).await.unwrap();
        ends_with_a_fatal(task, &mut client_end, &idle).await;
    }

    /// A client that prepares (one round trip, idle after it) and then
    /// executes (a second), fenced by a switchover between the two: the
    /// execute still reaches the server and its answer the client before
    /// the FATAL. (CI saw tokio-postgres, a connection per write, lose its
    /// INSERT this way: the FATAL came right after the prepare.)
    #[tokio::test(start_paused = true)]
    async fn a_switchover_fence_lets_a_prepared_statement_run() {
        let (mut client_end, mut backend_end, fence, task) = session();
        client_end.write_all(b"P parse").await.unwrap();
        let mut got = [0u8; 7];
        backend_end.read_exact(&mut got).await.unwrap();
        let prepared = [msg(b'1', b""), msg(b'n', b""), msg(b'Z', b"I")].concat();
        backend_end.write_all(&prepared).await.unwrap();
        let mut got = vec![0u8; prepared.len()];
        client_end.read_exact(&mut got).await.unwrap();
        fence.trigger(FenceReason::primary_switched_over());
        tokio::time::sleep(Duration::from_millis(20)).await;
        client_end.write_all(b"B execute").await.unwrap();
        let mut got = [0u8; 9];
        backend_end.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"B execute");
        let done = [msg(b'C', b"INSERT 0 1\0"), msg(b'Z', b"I")].concat();
        backend_end.write_all(&done).await.unwrap();
        ends_with_a_fatal(task, &mut client_end, &done).await;
    }

    /// A session fenced by a switchover before it sent anything (its
    /// client connected a moment before and is about to send its first
    /// statement) runs that statement, then ends: a client with a
    /// connection per transaction sees no error.
    #[tokio::test(start_paused = true)]
    async fn a_switchover_fence_lets_a_fresh_session_run_its_first_statement() {
        let (mut client_end, mut backend_end, fence, task) = session();
        fence.trigger(FenceReason::primary_switched_over());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !task.is_finished(),
            "a fresh session ended before its first statement"
        );
        client_end.write_all(b"Q INSERT").await.unwrap();
        let mut got = [0u8; 8];
        backend_end.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"Q INSERT");
        let done = [msg(b'C', b"INSERT 0 1\0"), msg(b'Z', b"I")].concat();
        backend_end.write_all(&done).await.unwrap();
        ends_with_a_fatal(task, &mut client_end, &done).await;
    }

    /// A transaction that does not end within the drain is ended at the
    /// next message boundary.
    #[tokio::test(start_paused = true)]
    async fn a_switchover_fence_does_not_wait_for_a_transaction_forever() {
        let (mut client_end, mut backend_end, fence, task) = session();
        backend_end.write_all(&msg(b'Z', b"T")).await.unwrap();
        let mut got = vec![0u8; 6];
        client_end.read_exact(&mut got).await.unwrap();
        let t0 = tokio::time::Instant::now();
        fence.trigger(FenceReason::primary_switched_over());
        let (outcome, _) = task.await.unwrap();
        assert!(matches!(
            outcome,
            Outcome::Fenced {
                label: "switchover",
                ..
            }
        ));
        assert!(t0.elapsed() >= SWITCHOVER_DRAIN, "{:?}", t0.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn fence_gives_up_when_no_boundary_comes() {
        let (_client_end, mut client) = tokio::io::duplex(1 << 16);
        let (mut backend_end, mut backend) = tokio::io::duplex(1 << 16);
        let fence = Arc::new(Fence::default());
        let f2 = fence.clone();
        let task = tokio::spawn(async move {
            let mut t = MessageTracker::default();
            forward(&mut client, &mut backend, &mut t, &f2, None, &(), &()).await
        });
        backend_end
            .write_all(&msg(b'D', &[1u8; 100])[..20])
            .await
            .unwrap();
        tokio::task::yield_now().await;
        fence.trigger(default_reason());
        let (outcome, _) = task.await.unwrap();
        assert_eq!(
            outcome,
            Outcome::Fenced {
                label: "fenced",
                clean: false
            }
        );
    }

    /// A node freeze: the session's deadline passes while nothing runs. At
    /// the next wake-up (the client's query arriving) the session forwards
    /// nothing and ends with a FATAL at the message boundary, although no
    /// fence fired.
    #[tokio::test(start_paused = true)]
    async fn a_passed_deadline_ends_a_primary_session_before_it_forwards() {
        let (mut client_end, mut client) = tokio::io::duplex(1 << 16);
        let (mut backend_end, mut backend) = tokio::io::duplex(1 << 16);
        let view = crate::ViewHandle::new(crate::View::default());
        view.set_valid_until(tokio::time::Instant::now() + Duration::from_secs(5));
        let v2 = view.clone();
        let task = tokio::spawn(async move {
            let fence = Fence::default();
            let mut t = MessageTracker::default();
            let d = Some(v2.deadline());
            forward(&mut client, &mut backend, &mut t, &fence, d, &(), &()).await
        });
        // Before the deadline: traffic flows both ways.
        client_end.write_all(b"Q1").await.unwrap();
        let mut got = [0u8; 2];
        backend_end.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"Q1");
        let reply = msg(b'Z', b"I");
        backend_end.write_all(&reply).await.unwrap();
        let mut got = vec![0u8; reply.len()];
        client_end.read_exact(&mut got).await.unwrap();
        // The deadline passes with no renewal (everything was frozen).
        tokio::time::advance(Duration::from_secs(6)).await;
        client_end
            .write_all(b"Q2 must not reach the primary")
            .await
            .unwrap();
        let (outcome, totals) = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the session must end at once")
            .unwrap();
        assert_eq!(
            outcome,
            Outcome::Fenced {
                label: "stale",
                clean: true
            }
        );
        assert_eq!(totals.client_to_backend, 2, "nothing after the deadline");
        let mut to_client = Vec::new();
        client_end.read_to_end(&mut to_client).await.unwrap();
        let mut want = BytesMut::new();
        let r = FenceReason::primary_unconfirmed();
        protocol::write_error(&mut want, Severity::Fatal, "57P01", &r.message, None);
        assert_eq!(to_client, &want[..]);
        let mut to_backend = Vec::new();
        drop(backend_end.read_to_end(&mut to_backend).await);
        assert!(to_backend.is_empty(), "{to_backend:?}");
    }

    /// A deadline that keeps being renewed never ends the session, and a
    /// session without one never looks at the clock.
    #[tokio::test(start_paused = true)]
    async fn a_renewed_deadline_lets_the_session_go_on() {
        let (mut client_end, mut client) = tokio::io::duplex(1 << 16);
        let (mut backend_end, mut backend) = tokio::io::duplex(1 << 16);
        let view = crate::ViewHandle::new(crate::View::default());
        let now = tokio::time::Instant::now;
        view.set_valid_until(now() + Duration::from_secs(5));
        let v2 = view.clone();
        let task = tokio::spawn(async move {
            let fence = Fence::default();
            let mut t = MessageTracker::default();
            let d = Some(v2.deadline());
            forward(&mut client, &mut backend, &mut t, &fence, d, &(), &()).await
        });
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(4)).await;
            view.set_valid_until(now() + Duration::from_secs(5));
            client_end.write_all(b"Q").await.unwrap();
            let mut got = [0u8; 1];
            backend_end.read_exact(&mut got).await.unwrap();
        }
        drop(client_end);
        let (outcome, totals) = task.await.unwrap();
        assert_eq!(outcome, Outcome::ClientClosed);
        assert_eq!(totals.client_to_backend, 5);
    }
}
