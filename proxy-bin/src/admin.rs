//! The admin HTTP listener: `/metrics` (Prometheus text format), `/healthz`, `/serving`,
//! `/readyz` and `/view`. It owns the rendering of the view as JSON; the
//! follower ([`follow::FollowStatus`]) knows nothing of HTTP.
//!
//! Served by the small HTTP/1.1 responder of [`crate::http`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use follow::FollowStatus;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use proxy_core::{View, ViewHandle};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::http::Response;

/// What the admin endpoints report on.
#[derive(Debug)]
pub enum AdminState {
    /// Static mode: a fixed view.
    Static(ViewHandle),
    /// Store mode: the follower of the proxy's cluster, and those of its
    /// SNI clusters by server name.
    Store {
        main: Arc<FollowStatus>,
        sni: Vec<(String, Arc<FollowStatus>)>,
    },
}

impl AdminState {
    /// `Ok` if the proxy can route primary sessions of its cluster now,
    /// else why not (`/readyz`).
    pub fn ready(&self) -> Result<(), String> {
        match self {
            AdminState::Static(v) if v.load().primary.is_some() => Ok(()),
            AdminState::Static(_) => Err("no primary to route to".into()),
            AdminState::Store { main, .. } => main.not_ready_reason().map_or(Ok(()), Err),
        }
    }

    /// `Ok` if the proxy should be sent clients (`/serving`, a Kubernetes
    /// readiness probe): it has applied a view it may use. Unlike
    /// `/readyz` it holds while the cluster has no primary (a failover or
    /// switchover: the proxy holds new clients, and a proxy taken out of
    /// its Service would refuse them instead) and while the store is
    /// unreachable (the proxy holds, routes on the failsafe, or refuses
    /// with 57P03, as every other proxy of the cluster would).
    pub fn serving(&self) -> Result<(), String> {
        match self {
            AdminState::Static(_) => Ok(()),
            AdminState::Store { main, .. } => {
                if let Some(c) = main.conflict() {
                    return Err(c);
                }
                if main.age().is_none() || !main.has_data() {
                    return Err(
                        "no view of the cluster applied yet (the store holds no data for it: \
                         not initialised, or not read yet)"
                            .into(),
                    );
                }
                match main.not_ready_reason() {
                    Some(why) if why.contains("upgrade the proxy") => Err(why),
                    _ => Ok(()),
                }
            }
        }
    }

    /// The applied view as JSON (`/view`).
    pub fn view_json(&self) -> String {
        match self {
            AdminState::Static(v) => {
                let mut out = view_json(&v.load());
                out["mode"] = "static".into();
                out
            }
            AdminState::Store { main, sni } => {
                let mut out = follower_json(main);
                if !sni.is_empty() {
                    out["sni"] = sni
                        .iter()
                        .map(|(name, f)| (name.clone(), follower_json(f)))
                        .collect::<serde_json::Map<_, _>>()
                        .into();
                }
                out
            }
        }
        .to_string()
    }
}

/// A view: generation, primary, and the replicas with their lag.
pub fn view_json(v: &View) -> Value {
    let replicas: Vec<Value> = v
        .replicas
        .iter()
        .map(|r| {
            json!({
                "address": r.backend.addr(),
                "lag_bytes": r.lag_bytes,
                "lag_seconds": r.lag.map(|l| l.as_secs_f64()),
                "streaming": r.streaming,
            })
        })
        .collect();
    json!({
        "generation": v.generation,
        "primary": v.primary.as_ref().map(|b| b.addr()),
        "replicas": replicas,
    })
}

/// A followed cluster: its view, freshness and registration.
fn follower_json(f: &FollowStatus) -> Value {
    let now = tokio::time::Instant::now();
    let mut out = view_json(&f.view().load());
    let extra = json!({
        "mode": "store",
        "cluster": f.cluster(),
        "uid": f.uid(),
        "instance": f.instance(),
        "fresh": f.is_fresh(),
        "age_seconds": f.age().map(|a| a.as_secs_f64()),
        "valid_for_seconds": f.valid_until().map(|t| t.saturating_duration_since(now).as_secs_f64()),
        "lease_ttl_seconds": f.lease_ttl().map(|t| t.as_secs_f64()),
        "not_ready": f.not_ready_reason(),
    });
    if let (Value::Object(o), Value::Object(e)) = (&mut out, extra) {
        o.extend(e);
    }
    out
}

/// Installs the Prometheus recorder for this process. Histograms get buckets
/// suited to connection setup times.
pub fn install_metrics() -> Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0,
            ],
        )
        .context("invalid histogram buckets")?
        .install_recorder()
        .context("could not install the metrics recorder")?;
    proxy_core::metrics::describe();
    follow::metrics::describe();
    Ok(handle)
}

/// Serves admin requests on `listener` forever.
/// Once `stopping` is set (SIGTERM), `/readyz` fails.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    state: Arc<AdminState>,
    stopping: Arc<AtomicBool>,
) {
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let handler: crate::http::Handler = Arc::new(move |req| {
        let r = answer(
            &req.path,
            &metrics,
            &state,
            stopping.load(Ordering::Relaxed),
        );
        Box::pin(async move { r })
    });
    crate::http::serve(listener, handler).await
}

fn answer(path: &str, metrics: &PrometheusHandle, state: &AdminState, stopping: bool) -> Response {
    match path {
        "/readyz" if stopping => Response::new(
            503,
            "text/plain",
            "not ready: shutting down (SIGTERM); new sessions go elsewhere\n",
        ),
        "/metrics" => Response::new(200, "text/plain; version=0.0.4", metrics.render()),
        "/healthz" => Response::new(200, "text/plain", "ok\n"),
        "/readyz" => match state.ready() {
            Ok(()) => Response::new(200, "text/plain", "ready\n"),
            Err(why) => Response::new(503, "text/plain", format!("not ready: {why}\n")),
        },
        "/serving" if stopping => Response::new(
            503,
            "text/plain",
            "not serving: shutting down (SIGTERM); new sessions go elsewhere\n",
        ),
        "/serving" => match state.serving() {
            Ok(()) => Response::new(200, "text/plain", "serving\n"),
            Err(why) => Response::new(503, "text/plain", format!("not serving: {why}\n")),
        },
        "/view" => Response::new(200, "application/json", state.view_json()),
        _ => Response::new(
            404,
            "text/plain",
            "not found; try /metrics, /healthz, /readyz, /serving or /view\n",
        ),
    }
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    crate::http::bind(addr, "admin").await
}
