//! `keelson proxy`: wires the settings into a [`proxy_core::Proxy`], runs
//! one event loop per worker thread, each with its own `SO_REUSEPORT`
//! listener socket, starts the store followers ([`follow`]) in store mode,
//! and handles SIGTERM/SIGINT.
//!
//! One single-threaded runtime per worker keeps a session's reads, writes and
//! wake-ups on one thread: no work stealing and no cross-thread wake-ups on
//! the data path.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use proxy_core::{Backend, ListenerOptions, Proxy, ProxyConfig, SocketOptions, View, ViewHandle};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::config::{ProxySettings, Source};
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
        backend_tls: match &s.backend_tls {
            Some((mode, ca)) => Some(proxy_core::tls::backend_tls(*mode, ca.as_deref())?),
            None => None,
        },
        cluster_backend_tls: s
            .cluster_backend_tls
            .iter()
            .map(|(name, t)| {
                let tls = match t {
                    Some((mode, ca)) => Some(proxy_core::tls::backend_tls(*mode, ca.as_deref())?),
                    None => None,
                };
                Ok((name.clone(), tls))
            })
            .collect::<Result<_>>()?,
        cancel_rate_per_second: s.cancel_rate_per_second,
        hold_timeout: cluster::ClusterSpec::default().hold_timeout,
        rules: s.rules.clone(),
        replica_lag: s.replica_lag,
        replica_lag_fence: s.replica_lag_fence,
        server_names: Default::default(),
        error_detail: s.error_detail,
    })
}

/// SIGHUP: reads the command line, environment and config file again and
/// takes the new TLS certificate and key and routing rules, without
/// touching a session; what else changed takes effect at the next start.
/// A configuration that does not load is refused with the reason, and the
/// running one stays.
fn reload(proxy: &Proxy, running: &ProxySettings, listeners: &[(SocketAddr, SwappableOptions)]) {
    let loaded =
        crate::args::parse(std::env::args_os().collect()).and_then(|cli| match cli.command {
            crate::Command::Proxy(args) => ProxySettings::load(args, cli.config.as_deref()),
            _ => anyhow::bail!("not a proxy command line"),
        });
    let new = match loaded {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "SIGHUP: the configuration does not load; keeping the running one");
            return;
        }
    };
    let tls = match &new.tls {
        Some((cert, key)) => match proxy_core::tls::server_config(cert, key) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: the TLS certificate or key does not load; keeping the running configuration");
                return;
            }
        },
        None => None,
    };
    proxy.reload(tls, new.rules.clone());
    // Listeners at the same addresses take their new route and PROXY
    // protocol setting; adding or removing a listener needs a restart.
    let trusted = trusted_networks(&new);
    let addrs = |s: &ProxySettings| s.listeners.iter().map(|l| l.addr).collect::<Vec<_>>();
    for l in &new.listeners {
        if let Some((_, opts)) = listeners.iter().find(|(a, _)| *a == l.addr) {
            opts.store(Arc::new(listener_options(l, &trusted)));
        }
    }
    let rest = |s: &ProxySettings| {
        format!(
            "{:?}",
            ProxySettings {
                tls: None,
                rules: Vec::new(),
                listeners: Vec::new(),
                proxy_protocol_trusted: Vec::new(),
                ..s.clone()
            }
        )
    };
    if rest(&new) != rest(running) || addrs(&new) != addrs(running) {
        tracing::warn!("SIGHUP: settings other than the TLS certificate, routing rules and listeners' routes and PROXY protocol changed (or listeners were added or removed); they take effect at the next start");
    }
    tracing::info!(
        tls = new.tls.is_some(),
        rules = new.rules.len(),
        listeners = new.listeners.len(),
        "SIGHUP: TLS certificate, routing rules and listener settings reloaded"
    );
}

/// A listener's options, shared by its sockets on every worker.
type SwappableOptions = Arc<arc_swap::ArcSwap<ListenerOptions>>;

/// The networks trusted to send PROXY protocol headers, if any.
fn trusted_networks(s: &ProxySettings) -> Option<Arc<[ipnet::IpNet]>> {
    (!s.proxy_protocol_trusted.is_empty()).then(|| s.proxy_protocol_trusted.clone().into())
}

fn listener_options(
    l: &crate::config::Listener,
    trusted: &Option<Arc<[ipnet::IpNet]>>,
) -> ListenerOptions {
    ListenerOptions {
        route: l.route,
        proxy_protocol: trusted.clone().filter(|_| l.proxy_protocol),
        forwarding: l.forwarding,
    }
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

/// Runs the proxy until SIGTERM or SIGINT, then shuts down gracefully.
pub fn run(settings: ProxySettings) -> Result<()> {
    let mut cfg = proxy_config(&settings)?;
    let view = match &settings.source {
        Source::Static(backend, replicas) => ViewHandle::named(
            "static",
            View {
                replicas: replicas
                    .iter()
                    .map(|r| proxy_core::Replica::fresh(Backend::new(r.clone())))
                    .collect(),
                ..View::fixed(Backend::new(backend.clone()))
            },
        ),
        // Nothing is routed until the store has been read.
        Source::Store { cluster, .. } => ViewHandle::named(cluster.as_str(), View::default()),
    };
    // SNI routing: one view per named cluster, each followed below.
    let sni_views: Vec<(String, String, ViewHandle)> = settings
        .sni
        .iter()
        .map(|(name, cluster)| {
            (
                name.clone(),
                cluster.clone(),
                ViewHandle::named(cluster.as_str(), View::default()),
            )
        })
        .collect();
    cfg.server_names = sni_views
        .iter()
        .map(|(name, _, v)| (name.clone(), v.clone()))
        .collect();
    // The proxy registers its metric handles when it is built: the
    // recorder must be installed first.
    let metrics = admin::install_metrics()?;
    let proxy = Proxy::new(cfg, view.clone());

    // Each listener gets one SO_REUSEPORT socket per worker.
    let trusted = trusted_networks(&settings);
    let mut per_worker: Vec<Vec<(std::net::TcpListener, SwappableOptions)>> =
        (0..settings.workers).map(|_| Vec::new()).collect();
    let mut bound_addrs = Vec::new();
    // Per listener as configured, its options, which a SIGHUP may swap.
    let mut swappable: Vec<(SocketAddr, SwappableOptions)> = Vec::new();
    for l in &settings.listeners {
        let first = reuseport_listener(l.addr)?;
        let bound = first.local_addr()?;
        bound_addrs.push(format!("{bound} ({})", l.route));
        let opts = Arc::new(arc_swap::ArcSwap::from_pointee(listener_options(
            l, &trusted,
        )));
        swappable.push((l.addr, opts.clone()));
        per_worker[0].push((first, opts.clone()));
        for w in per_worker.iter_mut().skip(1) {
            w.push((reuseport_listener(bound)?, opts.clone()));
        }
    }
    let done = CancellationToken::new();
    let mut threads = Vec::new();
    for (i, sockets) in per_worker.into_iter().enumerate() {
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
                        let mut serving = Vec::new();
                        for (socket, opts) in sockets {
                            match TcpListener::from_std(socket) {
                                Ok(l) => {
                                    let proxy = proxy.clone();
                                    serving.push(tokio::spawn(async move {
                                        if let Err(e) = proxy.serve_swappable(l, opts).await {
                                            tracing::error!(error = %e, "listener failed");
                                        }
                                    }));
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "could not register the listener")
                                }
                            }
                        }
                        for s in serving {
                            let _ = s.await;
                        }
                        // Sessions on this runtime keep running until the
                        // shutdown is complete.
                        done.cancelled().await;
                    })
                })?,
        );
    }
    if settings
        .listeners
        .iter()
        .any(|l| l.forwarding == proxy_core::ForwardingMode::Kernel)
    {
        // Loaded once, before the first session; one line either way.
        match proxy_core::kernel_forwarding() {
            Ok(()) => tracing::info!("kernel forwarding ready: plaintext sessions move in a BPF sockhash, TLS sessions in user space"),
            Err(e) => tracing::warn!(reason = %e, "kernel forwarding is unavailable; sessions forward in user space"),
        }
    }
    tracing::info!(listen = ?bound_addrs, source = ?settings.source, workers = settings.workers, tls = settings.tls.is_some(), "keelson proxy started");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let state = Arc::new(match &settings.source {
            Source::Static(..) => AdminState::Static(view.clone()),
            Source::Store {
                url,
                cluster,
                prefix,
                uid,
                security,
            } => {
                let store = cluster::open_with(url, security).await?;
                let sni = sni_views
                    .iter()
                    .map(|(name, other, handle)| {
                        tracing::info!(server_name = %name, cluster = %other, "following a cluster for SNI routing");
                        let keys = Keys::new(prefix, other);
                        let f = follow::spawn(
                            store.clone(),
                            keys,
                            uid.clone(),
                            proxy.clone(),
                            handle.clone(),
                        );
                        (name.clone(), f)
                    })
                    .collect();
                let keys = Keys::new(prefix, cluster);
                let main = follow::spawn(store, keys, uid.clone(), proxy.clone(), view.clone());
                AdminState::Store { main, sni }
            }
        });
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Some(addr) = settings.admin_listen {
            let l = admin::bind(addr).await?;
            tracing::info!(admin = %l.local_addr()?, "admin listener started");
            tokio::spawn(admin::serve(l, metrics, state.clone(), stopping.clone()));
        }
        let signal = {
            use tokio::signal::unix::{signal, SignalKind};
            let mut hup = signal(SignalKind::hangup())?;
            let stop = crate::shutdown_signal();
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    s = &mut stop => break s?,
                    _ = hup.recv() => reload(&proxy, &settings, &swappable),
                }
            }
        };
        // Readiness fails from now on; new sessions are still taken for
        // the delay, while load balancers notice.
        stopping.store(true, std::sync::atomic::Ordering::Relaxed);
        if !settings.shutdown_delay.is_zero() {
            tracing::info!(
                signal,
                delay = ?settings.shutdown_delay,
                "stopping: /readyz fails; still accepting for the delay"
            );
            tokio::time::sleep(settings.shutdown_delay).await;
        }
        tracing::info!(
            signal,
            grace = ?settings.shutdown_grace,
            active = proxy.active_connections(),
            "shutting down: no new connections; waiting for sessions to finish"
        );
        let ended = proxy.shutdown(settings.shutdown_grace).await;
        // Sessions are over: withdraw the registrations, so that a restart
        // with the same uid does not wait for their leases to expire.
        if let AdminState::Store { main, sni } = &*state {
            for f in sni.iter().map(|(_, f)| f).chain(std::iter::once(main)) {
                f.shutdown().await;
            }
        }
        tracing::info!(ended, "shutdown complete");
        anyhow::Ok(())
    });
    done.cancel();
    for t in threads {
        let _ = t.join();
    }
    result
}
