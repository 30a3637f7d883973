//! Kernel forwarding against real sockets on loopback: the programs load,
//! bytes move byte-exact both ways, a session taken back is at a message
//! boundary with nothing in flight, and a passed deadline stops the
//! client's bytes in the kernel. These need root and a kernel with BPF
//! sockhash and stream parser support (this project's CI machine); they
//! fail, not skip, without it.

use super::*;
use crate::view::{View, ViewHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A client application, the proxy's socket to it, the proxy's socket to
/// the server, and the server, all on loopback.
async fn sockets() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (to_app, _) = l.accept().await.unwrap();
    let l2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to_server = TcpStream::connect(l2.local_addr().unwrap()).await.unwrap();
    let (server, _) = l2.accept().await.unwrap();
    (app, to_app, to_server, server)
}

fn msg(tag: u8, body: usize, fill: u8) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend(((body + 4) as u32).to_be_bytes());
    v.extend(std::iter::repeat_n(fill, body));
    v
}

const READY: &[u8] = b"Z\0\0\0\x05I";

/// The message lengths of `bytes`, which must be whole messages.
fn whole_messages(mut bytes: &[u8]) -> Vec<(u8, usize)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        assert!(bytes.len() >= 5, "a partial header at the end");
        let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize + 1;
        assert!(bytes.len() >= len, "a partial message at the end");
        out.push((bytes[0], len));
        bytes = &bytes[len..];
    }
    out
}

/// Hands the two proxy sockets to the kernel, which must take them.
fn hand_off(
    to_app: &TcpStream,
    to_server: &TcpStream,
    deadline: Option<&Deadline>,
    fence: &std::sync::Arc<Fence>,
) -> Handed {
    Handed::hand_off(kernel(), to_app, to_server, deadline, fence)
        .unwrap()
        .expect("handed off")
}

fn kernel() -> &'static Kernel {
    get().unwrap_or_else(|e| panic!("kernel forwarding is unavailable here: {e}"))
}

#[tokio::test]
async fn bytes_move_both_ways_in_the_kernel_byte_exact() {
    let fence = std::sync::Arc::new(Fence::default());
    let (mut app, to_app, to_server, mut server) = sockets().await;
    let h = hand_off(&to_app, &to_server, None, &fence);
    // Messages of every size from empty to 3 MiB (far above the socket's
    // receive buffer), written in pieces that split headers and bodies.
    let mut stream = Vec::new();
    for i in 0..300usize {
        stream.extend(msg(b'D', (i * 7919) % 20_000, i as u8));
        if i % 50 == 0 {
            stream.extend(msg(b'n', 0, 0));
        }
    }
    stream.extend(msg(b'D', 3 << 20, 7));
    stream.extend(msg(b'C', 10, 1));
    stream.extend(READY);
    let sent = stream.clone();
    let writer = tokio::spawn(async move {
        let mut at = 0;
        let mut piece = 1;
        while at < sent.len() {
            let end = (at + piece).min(sent.len());
            server.write_all(&sent[at..end]).await.unwrap();
            at = end;
            piece = piece * 3 % 65_521 + 1;
        }
        server
    });
    let mut got = vec![0; stream.len()];
    app.read_exact(&mut got).await.unwrap();
    assert!(got == stream, "the client received other bytes");
    let mut server = writer.await.unwrap();
    let q = msg(b'Q', 100, b'x');
    app.write_all(&q).await.unwrap();
    let mut got = vec![0; q.len()];
    server.read_exact(&mut got).await.unwrap();
    assert_eq!(got, q);
    assert_eq!(h.moved(), (q.len() as u64, stream.len() as u64));
    let s = h.state(h.server).unwrap();
    assert_eq!(
        (s.remaining, s.last_tag as u8, s.last_status as u8),
        (0, b'Z', b'I')
    );
    // Nothing reached the proxy's own sockets.
    assert_eq!(unread(to_app.as_raw_fd()).unwrap(), 0);
    assert_eq!(unread(to_server.as_raw_fd()).unwrap(), 0);
    // The client's close wakes the proxy.
    drop(app);
    let woken = tokio::time::timeout(Duration::from_secs(5), h.wait(&to_app, &to_server, &fence))
        .await
        .expect("woken");
    assert!(matches!(woken, Woken::ClientClosed));
    assert!(h.flush_to_server().await);
}

#[tokio::test]
async fn a_session_taken_back_is_at_a_boundary_and_keeps_what_the_client_sends_next() {
    let fence = std::sync::Arc::new(Fence::default());
    let (mut app, mut to_app, mut to_server, mut server) = sockets().await;
    let mut h = hand_off(&to_app, &to_server, None, &fence);
    // The server streams rows without pause.
    let rows = 20_000usize;
    let writer = tokio::spawn(async move {
        let mut total = 0usize;
        for i in 0..rows {
            let m = msg(b'D', 100 + (i * 31) % 3000, i as u8);
            total += m.len();
            server.write_all(&m).await.unwrap();
        }
        (server, total)
    });
    let mut head = vec![0; 1 << 20];
    app.read_exact(&mut head).await.unwrap();
    let (mut tracker, _) = h
        .take_back(Instant::now() + Duration::from_secs(1))
        .await
        .unwrap()
        .expect("taken back");
    // The proxy forwards the rest of the message the kernel stopped in,
    // then the FATAL: the client sees whole messages only.
    let mut buf = vec![0; 1 << 16];
    while tracker.to_boundary() != Some(0) {
        let want = tracker
            .to_boundary()
            .expect("boundaries known")
            .min(buf.len());
        let n = to_server.read(&mut buf[..want]).await.unwrap();
        assert!(n > 0);
        tracker.observe(&buf[..n]);
        to_app.write_all(&buf[..n]).await.unwrap();
    }
    let fatal = msg(b'E', 20, b'F');
    to_app.write_all(&fatal).await.unwrap();
    // What the proxy holds now is the rest of the server's stream, read
    // while the server still writes it.
    let mut rest = Vec::new();
    let mut buf = vec![0; 1 << 16];
    loop {
        let n = tokio::time::timeout(Duration::from_millis(300), to_server.read(&mut buf)).await;
        match n {
            Ok(Ok(n)) if n > 0 => rest.extend_from_slice(&buf[..n]),
            _ if writer.is_finished() => break,
            _ => {}
        }
    }
    let (mut server, total) = writer.await.unwrap();
    // The client: whole messages, then the FATAL; with what the proxy
    // holds, all the server sent.
    let mut got = head;
    let mut buf = vec![0; 1 << 16];
    loop {
        let n = app.read(&mut buf).await.unwrap();
        got.extend_from_slice(&buf[..n]);
        if got.ends_with(&fatal) {
            break;
        }
        assert!(n > 0, "the client's stream ended without the FATAL");
    }
    let msgs = whole_messages(&got);
    assert_eq!(msgs.last().unwrap().0, b'E');
    let ss = h.state(h.server).unwrap();
    assert_eq!(
        got.len() - fatal.len() + rest.len(),
        total,
        "redirected {} read by the proxy {} client got {}",
        ss.redir,
        rest.len(),
        got.len() - fatal.len()
    );
    whole_messages(&rest);
    // The client's next bytes reach the proxy, not the server.
    let q = msg(b'Q', 50, b'q');
    app.write_all(&q).await.unwrap();
    let mut got = vec![0; q.len()];
    tokio::time::timeout(Duration::from_secs(5), to_app.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, q);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        unread(server.as_raw_fd()).unwrap(),
        0,
        "the server got bytes after the fence"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn client_bytes_stop_in_the_kernel_once_the_views_deadline_passes() {
    let fence = std::sync::Arc::new(Fence::default());
    let view = ViewHandle::new(View::default());
    view.set_valid_until(Instant::now() + Duration::from_millis(300));
    let (mut app, mut to_app, to_server, mut server) = sockets().await;
    let mut h = hand_off(&to_app, &to_server, Some(view.deadline()), &fence);
    let q = msg(b'Q', 10, b'a');
    app.write_all(&q).await.unwrap();
    let mut got = vec![0; q.len()];
    server.read_exact(&mut got).await.unwrap();
    // Renewed, then left to pass, with nothing in user space running.
    view.set_valid_until(Instant::now() + Duration::from_millis(400));
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.write_all(&q).await.unwrap();
    server.read_exact(&mut got).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.write_all(&q).await.unwrap();
    // The proxy wakes, takes the session back, and reads the bytes itself.
    let woken = tokio::time::timeout(Duration::from_secs(5), h.wait(&to_app, &to_server, &fence))
        .await
        .expect("woken");
    assert!(matches!(woken, Woken::Passed));
    let (_, awaiting) = h
        .take_back(Instant::now() + Duration::from_secs(1))
        .await
        .unwrap()
        .expect("at a boundary");
    assert!(awaiting, "a query went out with no answer since");
    tokio::time::timeout(Duration::from_secs(5), to_app.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, q);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        unread(server.as_raw_fd()).unwrap(),
        0,
        "bytes reached the server after the deadline"
    );
}

/// Hands a session off, has its server write `rows` small rows then a
/// ReadyForQuery in one write, and checks the client got all of it; the
/// session is returned.
async fn one_write_of_small_rows(rows: usize, tail: &[u8]) -> Handed {
    let fence = std::sync::Arc::new(Fence::default());
    let (mut app, to_app, to_server, mut server) = sockets().await;
    let h = hand_off(&to_app, &to_server, None, &fence);
    let mut stream = Vec::new();
    for i in 0..rows {
        stream.extend(msg(b'D', 6, i as u8));
    }
    stream.extend(tail);
    stream.extend(READY);
    server.write_all(&stream).await.unwrap();
    let mut got = vec![0; stream.len()];
    tokio::time::timeout(Duration::from_secs(5), app.read_exact(&mut got))
        .await
        .expect("every byte arrives")
        .unwrap();
    assert!(got == stream);
    h
}

#[tokio::test]
async fn many_small_messages_in_one_write_all_arrive() {
    // In one segment, so that chunks begin inside the kernel's buffer, not
    // at its start.
    one_write_of_small_rows(100, &[]).await;
}

/// A fence stops a kernel-mode session's client bytes in the kernel when
/// it fires, before the session's task runs: nothing the client sends
/// after the fence reaches the server, even if the proxy is slow to take
/// the session back (the proxy acknowledges a view once its fences fired).
#[tokio::test]
async fn a_fired_fence_stops_client_bytes_before_the_session_is_taken_back() {
    let fence = std::sync::Arc::new(Fence::default());
    let (mut app, mut to_app, mut to_server, mut server) = sockets().await;
    let mut h = hand_off(&to_app, &to_server, None, &fence);
    let q = msg(b'Q', 10, b'a');
    app.write_all(&q).await.unwrap();
    let mut got = vec![0; q.len()];
    server.read_exact(&mut got).await.unwrap();
    fence.trigger(crate::fence::FenceReason::primary_changed());
    // Nobody waits on the session or takes it back.
    app.write_all(&q).await.unwrap();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_millis(500), server.read(&mut buf)).await;
    assert!(
        r.is_err(),
        "the server got bytes the client sent after the fence: {r:?}"
    );
    // They wait in the proxy's socket, for the proxy to read once it has
    // taken the session back.
    h.take_back(Instant::now() + Duration::from_secs(1))
        .await
        .unwrap()
        .expect("taken back");
    h.rebind(&mut to_app, &mut to_server).unwrap();
    tokio::time::timeout(Duration::from_secs(1), to_app.read_exact(&mut got))
        .await
        .expect("the client's bytes are in the proxy's socket")
        .unwrap();
    assert_eq!(got, q);
    assert!(
        tokio::time::timeout(Duration::from_millis(100), server.read(&mut buf))
            .await
            .is_err(),
        "the server got bytes after the fence"
    );
    // The stop's socket error leaves no readiness behind: with the app not
    // reading, a full send queue is not writable (a write that would block
    // waits rather than spins).
    let chunk = vec![0u8; 65536];
    let mut filled = 0usize;
    loop {
        match to_app.try_write(&chunk) {
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("writing to the app: {e}"),
        }
        assert!(filled < 1 << 30, "the app's socket never filled");
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), to_app.writable())
            .await
            .is_err(),
        "a full socket is writable after the take-back: writes would spin"
    );
}

/// A result of many small rows arrives as chunks of thousands of
/// messages: the server's boundaries are still known after it, so the
/// session can still be taken back at a boundary (a fence's clean FATAL).
#[tokio::test]
async fn a_chunk_of_thousands_of_small_messages_keeps_the_boundaries() {
    let h = one_write_of_small_rows(40_000, &msg(b'C', 10, 1)).await;
    let s = h.state(h.server).unwrap();
    assert_eq!(
        (s.remaining, s.last_tag as u8, s.last_status as u8),
        (0, b'Z', b'I'),
        "the server's boundaries were lost (remaining {:#x})",
        s.remaining
    );
}

/// The parser for kernels without `bpf_loop` still passes the verifier
/// (this kernel loads the looping one).
#[test]
fn the_unrolled_walk_for_older_kernels_still_loads() {
    let k = kernel();
    let insns = parser(&k.state, &k.ctl, &k.deadlines, Walk::Unrolled(WALKS[0])).0;
    prog_load(&insns, SK_SKB_STREAM_PARSER, "keelson_parse", None).unwrap();
}

/// A client that resets its connection while in the kernel: taking the
/// session back fails, and neither socket stays in the sockhash.
#[tokio::test]
async fn a_reset_client_leaves_neither_socket_in_the_sockhash() {
    let fence = std::sync::Arc::new(Fence::default());
    let (app, to_app, to_server, _server) = sockets().await;
    let mut h = hand_off(&to_app, &to_server, None, &fence);
    let app = app.into_std().unwrap();
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger struct of the length given.
    let r = unsafe {
        libc::setsockopt(
            app.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
    drop(app);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = h.take_back(Instant::now() + Duration::from_secs(1)).await;
    // Deleting it again finds it (a sockhash's values cannot be read back
    // as fds).
    let in_hash = |c: u64| {
        let mut a = Attr::new();
        a.u32(0, kernel().sockhash.as_raw_fd() as u32).ptr(8, &c);
        bpf(MAP_DELETE_ELEM, &mut a).is_ok()
    };
    assert!(!in_hash(h.client), "the client's socket is still in");
    assert!(!in_hash(h.server), "the server's socket is still in");
}

/// The server sends unasked (a FATAL as it is terminated) in the moment
/// its socket is in the sockhash and the client's is not yet: nothing is
/// dropped. The session wakes, is taken back at a boundary, and the bytes
/// wait in the proxy's socket.
#[tokio::test]
async fn what_the_server_sends_while_the_session_enters_the_kernel_is_kept() {
    let fence = std::sync::Arc::new(Fence::default());
    let (mut app, mut to_app, mut to_server, server) = sockets().await;
    let fatal = msg(b'E', 40, b'F');
    let mut h = Handed::hand_off_with(kernel(), &to_app, &to_server, None, &fence, || {
        assert_eq!(server.try_write(&fatal).unwrap(), fatal.len());
        std::thread::sleep(Duration::from_millis(50));
    })
    .unwrap()
    .expect("handed off");
    let woken = tokio::time::timeout(Duration::from_secs(2), h.wait(&to_app, &to_server, &fence))
        .await
        .expect("the session was not woken: the server's bytes were dropped");
    assert!(matches!(woken, Woken::Passed), "woken otherwise");
    let (tracker, _) = h
        .take_back(Instant::now() + Duration::from_secs(1))
        .await
        .unwrap()
        .expect("taken back");
    assert_eq!(tracker.to_boundary(), Some(0));
    h.rebind(&mut to_app, &mut to_server).unwrap();
    let mut got = vec![0; fatal.len()];
    tokio::time::timeout(Duration::from_secs(1), to_server.read_exact(&mut got))
        .await
        .expect("the server's bytes are in the proxy's socket")
        .unwrap();
    assert_eq!(got, fatal);
    // And the client got nothing from the kernel.
    let mut buf = [0u8; 8];
    assert!(
        tokio::time::timeout(Duration::from_millis(100), app.read(&mut buf))
            .await
            .is_err()
    );
}
