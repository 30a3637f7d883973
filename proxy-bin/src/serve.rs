//! `keelson proxy` in static mode: wires the settings into a
//! [`proxy_core::Proxy`], runs one event loop per worker thread, each with
//! its own `SO_REUSEPORT` listener socket, and handles SIGTERM/SIGINT.
//!
//! One single-threaded runtime per worker keeps a session's reads, writes and
//! wake-ups on one thread: no work stealing and no cross-thread wake-ups on
//! the data path.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use proxy_core::{Backend, Proxy, ProxyConfig, SocketOptions, View, ViewHandle};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::config::{ProxySettings, Source};
use crate::follow;
use cluster::Keys;

/// Builds the data-path configuration from validated settings.
pub fn proxy_config(s: &ProxySettings) -> Result<ProxyConfig> {
    let tls = match &s.tls {
        Some((cert, key)) => Some(proxy_core::tls::server_config(cert, key)?),
        None => None,
    };
    Ok(ProxyConfig {
        startup_timeout: s.startup_timeout,
        connect_timeout: s.connect_timeout,
        auth_timeout: s.auth_timeout,
        max_connections: s.max_connections,
        socket: SocketOptions {
            keepalive: s.keepalive,
        },
        tls,
        cancel_rate_per_second: s.cancel_rate_per_second,
        hold_timeout: cluster::ClusterSpec::default().hold_timeout,
    })
}

/// A listening socket with `SO_REUSEPORT`, so that each worker can have its
/// own and the kernel spreads connections between them.
pub fn reuseport_listener(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("could not listen on {addr}"))?;
    socket.listen(1024)?;
    Ok(socket.into())
}

struct StaticState {
    view: ViewHandle,
}

impl AdminState for StaticState {
    fn ready(&self) -> bool {
        self.view.load().primary.is_some()
    }

    fn view_json(&self) -> String {
        let v = self.view.load();
        serde_json::json!({
            "generation": v.generation,
            "primary": v.primary.as_ref().map(|b| b.addr()),
            "replicas": v.replicas.iter().map(|b| b.addr()).collect::<Vec<_>>(),
            "mode": "static",
        })
        .to_string()
    }
}

/// Runs the proxy until SIGTERM or SIGINT, then shuts down gracefully.
pub fn run(settings: ProxySettings) -> Result<()> {
    let cfg = proxy_config(&settings)?;
    let view = match &settings.source {
        Source::Static(backend) => ViewHandle::new(View::fixed(Backend::new(backend.clone()))),
        // Nothing is routed until the store has been read.
        Source::Store { .. } => ViewHandle::new(View::default()),
    };
    let proxy = Proxy::new(cfg, view.clone());
    let metrics = admin::install_metrics()?;

    let first = reuseport_listener(settings.listen)?;
    let bound = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..settings.workers {
        sockets.push(reuseport_listener(bound)?);
    }
    let done = CancellationToken::new();
    let mut threads = Vec::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        let proxy = proxy.clone();
        let done = done.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("could not start a worker runtime")?;
        threads.push(
            std::thread::Builder::new()
                .name(format!("keelson-worker-{i}"))
                .spawn(move || {
                    rt.block_on(async move {
                        match TcpListener::from_std(socket) {
                            Ok(l) => {
                                if let Err(e) = proxy.serve(l).await {
                                    tracing::error!(error = %e, "listener failed");
                                }
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "could not register the listener")
                            }
                        }
                        // Sessions on this runtime keep running until the
                        // shutdown is complete.
                        done.cancelled().await;
                    })
                })?,
        );
    }
    tracing::info!(listen = %bound, source = ?settings.source, workers = settings.workers, tls = settings.tls.is_some(), "keelson proxy started");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let state: Arc<dyn AdminState> = match &settings.source {
            Source::Static(_) => Arc::new(StaticState { view: view.clone() }),
            Source::Store {
                url,
                cluster,
                prefix,
                uid,
            } => {
                let store = cluster::open(url).await?;
                let keys = Keys::new(prefix, cluster);
                follow::spawn(store, keys, uid.clone(), proxy.clone())
            }
        };
        if let Some(addr) = settings.admin_listen {
            let l = admin::bind(addr).await?;
            tracing::info!(admin = %l.local_addr()?, "admin listener started");
            tokio::spawn(admin::serve(l, metrics, state));
        }
        let signal = crate::shutdown_signal().await?;
        tracing::info!(
            signal,
            grace = ?settings.shutdown_grace,
            active = proxy.active_connections(),
            "shutting down: no new connections; waiting for sessions to finish"
        );
        let ended = proxy.shutdown(settings.shutdown_grace).await;
        tracing::info!(ended, "shutdown complete");
        anyhow::Ok(())
    });
    done.cancel();
    for t in threads {
        let _ = t.join();
    }
    result
}
