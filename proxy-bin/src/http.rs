//! A deliberately small HTTP/1.1 responder for the proxy's admin listener
//! and the keepers' and sentinels' node APIs: a handful of GET endpoints
//! with small bodies do not justify an HTTP stack in the dependency tree.
//! It reads one request head (at most 8 KiB, within 5 s), answers and
//! closes. `HEAD` and `OPTIONS` get the status `GET` would get, without a
//! body, as HAProxy's and other load balancers' checks use them.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// One request: what the handlers need of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// What follows `?`, if anything.
    pub query: String,
}

/// One answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl Response {
    pub fn new(status: u16, content_type: &str, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: content_type.to_owned(),
            body: body.into(),
        }
    }
}

/// What answers a GET.
pub type Handler =
    Arc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

const MAX_REQUEST_HEAD: usize = 8192;

/// Binds a listener, with the flag's name in the error.
pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("could not listen on the {what} address {addr}"))
}

/// Serves requests on `listener` forever.
pub async fn serve(listener: TcpListener, handler: Handler) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _ = timeout(Duration::from_secs(5), handle(conn, &handler)).await;
        });
    }
}

/// Parses a request head's first line.
pub fn parse_head(head: &[u8]) -> Request {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Request {
        method: method.to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
    }
}

async fn handle(mut conn: TcpStream, handler: &Handler) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
        if head.len() > MAX_REQUEST_HEAD {
            let r = Response::new(431, "text/plain", "request head too large\n");
            return respond(&mut conn, &r, true).await;
        }
    }
    let req = parse_head(&head);
    let with_body = matches!(req.method.as_str(), "GET" | "POST");
    // POST only for the failsafe's calls between keelson's own components.
    let post = req.method == "POST" && req.path.starts_with("/failsafe/");
    if !(matches!(req.method.as_str(), "GET" | "HEAD" | "OPTIONS") || post) {
        let r = Response::new(
            405,
            "text/plain",
            "only GET, HEAD and OPTIONS are supported\n",
        );
        return respond(&mut conn, &r, true).await;
    }
    let r = handler(req).await;
    respond(&mut conn, &r, with_body).await
}

async fn respond(conn: &mut TcpStream, r: &Response, with_body: bool) -> std::io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
         Allow: GET, HEAD, OPTIONS, POST\r\nConnection: close\r\n\r\n",
        r.status,
        r.content_type,
        if with_body { r.body.len() } else { 0 }
    );
    conn.write_all(head.as_bytes()).await?;
    if with_body {
        conn.write_all(r.body.as_bytes()).await?;
    }
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_line_gives_method_path_and_query() {
        let r = parse_head(b"GET /replica?lag=16MB HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/replica");
        assert_eq!(r.query, "lag=16MB");
        let r = parse_head(b"OPTIONS /primary HTTP/1.0\r\n\r\n");
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.query.as_str()),
            ("OPTIONS", "/primary", "")
        );
    }
}
