use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use proxy_core::ProxyConfig;

use crate::support::{connect, PgServer, TestProxy};

const TOTAL: usize = 100 * 1024 * 1024;

/// Deterministic COPY text: `id<TAB>payload<LF>` rows, in chunks.
fn chunks() -> impl Iterator<Item = Bytes> {
    let mut id: u64 = 0;
    let mut produced = 0usize;
    std::iter::from_fn(move || {
        if produced >= TOTAL {
            return None;
        }
        let mut chunk = Vec::with_capacity(128 * 1024);
        while chunk.len() < 120 * 1024 && produced + chunk.len() < TOTAL {
            id += 1;
            let fill = (b'a' + (id % 26) as u8) as char;
            let payload: String = std::iter::repeat_n(fill, 60 + (id % 61) as usize).collect();
            chunk.extend_from_slice(
                format!("{id}\t{payload}-{}\n", id.wrapping_mul(2_654_435_761)).as_bytes(),
            );
        }
        produced += chunk.len();
        Some(Bytes::from(chunk))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_100_mb_byte_exact() {
    let pg = PgServer::start().await;
    let proxy = TestProxy::start(&pg.addr(), ProxyConfig::default()).await;
    let client = connect(&proxy.conn("postgres")).await;
    client
        .batch_execute("CREATE UNLOGGED TABLE bulk (id bigint, v text)")
        .await
        .unwrap();

    let sink = client
        .copy_in("COPY bulk (id, v) FROM STDIN")
        .await
        .unwrap();
    let mut sink = std::pin::pin!(sink);
    let mut sent = 0usize;
    for c in chunks() {
        sent += c.len();
        sink.send(c).await.unwrap();
    }
    let rows = sink.as_mut().finish().await.unwrap();
    assert!(sent >= TOTAL, "sent {sent}");

    let direct = pg.superuser().await;
    let n: i64 = direct
        .query_one("SELECT count(*) FROM bulk", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n as u64, rows);

    let out = client
        .copy_out("COPY (SELECT id, v FROM bulk ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let mut out = std::pin::pin!(out);
    let mut expected = chunks();
    let mut pending = Bytes::new();
    let mut received = 0usize;
    while let Some(piece) = out.next().await {
        let mut piece = piece.unwrap();
        received += piece.len();
        while !piece.is_empty() {
            if pending.is_empty() {
                pending = expected
                    .next()
                    .expect("COPY OUT returned more than was copied in");
            }
            let n = pending.len().min(piece.len());
            assert_eq!(
                piece.split_to(n),
                pending.split_to(n),
                "COPY OUT differs at byte {}",
                received
            );
        }
    }
    assert!(
        pending.is_empty() && expected.next().is_none(),
        "COPY OUT returned less than was copied in"
    );
    assert_eq!(received, sent);
}
