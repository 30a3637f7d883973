//! The forwarding loop: message-boundary tracking on its own, and whole
//! sessions moving bytes through `forward` over in-memory pipes (the
//! kernel's share of the cost is measured by the comparison harness).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use proxy_core::fence::Fence;
use proxy_core::forward::forward;
use proxy_core::protocol::MessageTracker;
use proxy_core::{View, ViewHandle};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A server stream of DataRow messages of `row` bytes each.
fn data_rows(total: usize, row: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(total + row + 5);
    while v.len() < total {
        v.push(b'D');
        v.extend_from_slice(&((row + 4) as u32).to_be_bytes());
        v.extend(std::iter::repeat_n(7u8, row));
    }
    v
}

fn tracker(c: &mut Criterion) {
    let stream = data_rows(1 << 20, 100);
    let mut g = c.benchmark_group("tracker");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("observe_100B_rows_64KiB_chunks", |b| {
        b.iter(|| {
            let mut t = MessageTracker::default();
            for chunk in stream.chunks(64 * 1024) {
                t.observe(chunk);
            }
            t.to_boundary()
        })
    });
    g.finish();
}

fn pump(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let payload = data_rows(16 << 20, 200);
    // A primary session in store mode: it checks the view's deadline at
    // every wake-up (static mode has none and skips the check).
    let view = ViewHandle::new(View::default());
    view.set_valid_until(tokio::time::Instant::now() + Duration::from_secs(3600));
    let mut g = c.benchmark_group("forward");
    g.sample_size(20);
    g.throughput(Throughput::Bytes(payload.len() as u64));
    g.bench_function("server_to_client_16MiB", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (mut client_end, mut client) = tokio::io::duplex(256 * 1024);
                let (mut server_end, mut server) = tokio::io::duplex(256 * 1024);
                let fence = Fence::default();
                let session = async {
                    let mut t = MessageTracker::default();
                    let d = Some(view.deadline());
                    forward(&mut client, &mut server, &mut t, &fence, d, &(), &()).await
                };
                let produce = async {
                    server_end.write_all(&payload).await.expect("write");
                    drop(server_end);
                };
                let consume = async {
                    let mut sink = vec![0u8; 256 * 1024];
                    let mut n = 0;
                    loop {
                        let k = client_end.read(&mut sink).await.expect("read");
                        if k == 0 {
                            break n;
                        }
                        n += k;
                    }
                };
                let (_, _, n) = tokio::join!(session, produce, consume);
                assert_eq!(n, payload.len());
            })
        })
    });
    g.throughput(Throughput::Elements(1000));
    g.bench_function("ping_pong_small_messages_x1000", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (mut client_end, mut client) = tokio::io::duplex(64 * 1024);
                let (mut server_end, mut server) = tokio::io::duplex(64 * 1024);
                let fence = Fence::default();
                let session = async {
                    let mut t = MessageTracker::default();
                    let d = Some(view.deadline());
                    forward(&mut client, &mut server, &mut t, &fence, d, &(), &()).await
                };
                let query = b"Q\0\0\0\x0dSELECT 1;\0";
                let reply = data_rows(60, 20);
                let talk = async {
                    let mut buf = vec![0u8; 4096];
                    for _ in 0..1000 {
                        client_end.write_all(query).await.expect("w");
                        let mut got = 0;
                        while got < query.len() {
                            got += server_end.read(&mut buf).await.expect("r");
                        }
                        server_end.write_all(&reply).await.expect("w");
                        let mut got = 0;
                        while got < reply.len() {
                            got += client_end.read(&mut buf).await.expect("r");
                        }
                    }
                    drop(client_end);
                };
                tokio::join!(session, talk);
            })
        })
    });
    g.finish();
}

criterion_group!(benches, tracker, pump);
criterion_main!(benches);
