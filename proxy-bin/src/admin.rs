//! The admin HTTP listener: `/metrics` (Prometheus text format), `/healthz`,
//! `/readyz` and `/view`. It owns the rendering of the view as JSON; the
//! follower ([`follow::FollowStatus`]) knows nothing of HTTP.
//!
//! Four GET endpoints with tiny bodies do not justify an HTTP stack in the
//! dependency tree, so this is a deliberately small HTTP/1.1 responder: it
//! reads one request head (at most 8 KiB, within 5 s), answers and closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use follow::FollowStatus;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use proxy_core::{View, ViewHandle};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

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

const MAX_REQUEST_HEAD: usize = 8192;

/// Serves admin requests on `listener` forever.
pub async fn serve(listener: TcpListener, metrics: PrometheusHandle, state: Arc<AdminState>) {
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let metrics = metrics.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let _ = timeout(Duration::from_secs(5), handle(conn, &metrics, &state)).await;
        });
    }
}

async fn handle(
    mut conn: TcpStream,
    metrics: &PrometheusHandle,
    state: &AdminState,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
        if head.len() > MAX_REQUEST_HEAD {
            return respond(&mut conn, 431, "text/plain", "request head too large\n").await;
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return respond(&mut conn, 405, "text/plain", "only GET is supported\n").await;
    }
    match path {
        "/metrics" => {
            respond(
                &mut conn,
                200,
                "text/plain; version=0.0.4",
                &metrics.render(),
            )
            .await
        }
        "/healthz" => respond(&mut conn, 200, "text/plain", "ok\n").await,
        "/readyz" => match state.ready() {
            Ok(()) => respond(&mut conn, 200, "text/plain", "ready\n").await,
            Err(why) => {
                let body = format!("not ready: {why}\n");
                respond(&mut conn, 503, "text/plain", &body).await
            }
        },
        "/view" => respond(&mut conn, 200, "application/json", &state.view_json()).await,
        _ => {
            respond(
                &mut conn,
                404,
                "text/plain",
                "not found; try /metrics, /healthz, /readyz or /view\n",
            )
            .await
        }
    }
}

async fn respond(
    conn: &mut TcpStream,
    status: u16,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("could not listen on the admin address {addr}"))
}
