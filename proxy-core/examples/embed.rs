//! Embedding the keelson proxy in your own program, with the cluster view fed
//! from your own code instead of keelson's store.
//!
//! ```sh
//! cargo run -p proxy-core --example embed -- 127.0.0.1:6432 127.0.0.1:5432
//! ```
//!
//! Then `psql -h 127.0.0.1 -p 6432` reaches the PostgreSQL on 5432. Each
//! line typed on stdin names a new primary (`host:port`), or `none`: the
//! proxy stores the new view, then ends the sessions on the old primary
//! with a FATAL 57P01 at a message boundary. While there is no primary, new
//! clients are held for the hold timeout, then refused with 57P03.

use std::time::Duration;

use proxy_core::{Backend, Proxy, ProxyConfig, View, ViewChange, ViewHandle};
use tokio::io::AsyncBufReadExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(primary)) = (args.next(), args.next()) else {
        eprintln!("usage: embed LISTEN_ADDR PRIMARY_HOST:PORT");
        std::process::exit(2);
    };

    // 1. A view: the primary (and replicas, if any) sessions are routed to.
    //    The generation must grow with each view you apply.
    let mut generation = 1;
    let view = ViewHandle::new(View {
        generation,
        primary: Some(Backend::new(primary)),
        replicas: Vec::new(),
    });

    // 2. The proxy. Install your metrics recorder before this line if you
    //    want keelson's metrics (they are no-ops without one).
    let cfg = ProxyConfig {
        hold_timeout: Duration::from_secs(5),
        ..ProxyConfig::default()
    };
    let proxy = Proxy::new(cfg, view.clone());

    // 3. Serve. `serve` runs until `stop_accepting`; several listeners (or
    //    one per worker thread) can share one proxy.
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    eprintln!("listening on {}", listener.local_addr()?);
    let server = {
        let proxy = proxy.clone();
        tokio::spawn(async move { proxy.serve(listener).await })
    };

    // 4. Feed views from your own source: here, lines on stdin. `apply`
    //    stores the view first, then ends the sessions it removed, so no
    //    new session can reach a backend the applied view no longer names.
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        generation += 1;
        let primary = (line != "none").then(|| Backend::new(line.to_owned()));
        let applied = proxy.apply(
            &view,
            View {
                generation,
                primary,
                replicas: Vec::new(),
            },
            ViewChange::Update,
        );
        for e in &applied.ended {
            eprintln!("ended the {:?} sessions on {}", e.role, e.backend);
        }
        eprintln!("view {generation} applied: primary {line}");
    }

    // 5. Graceful shutdown once stdin closes: stop accepting, give sessions
    //    10 s, then end the rest with a FATAL 57P01.
    let ended = proxy.shutdown(Duration::from_secs(10)).await;
    eprintln!("shut down; {ended} session(s) had to be ended");
    server.await??;
    Ok(())
}
