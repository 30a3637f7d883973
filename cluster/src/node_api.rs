//! A minimal HTTP/1.1 client for the node API calls keelson's own
//! components make to each other (a primary's keeper asking its peers for
//! failsafe promises, a proxy asking the primary's keeper how long it may
//! route to it): one request, no body, `Connection: close`, a small JSON
//! answer, all within `limit`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where a primary's keeper asks another keeper for a failsafe promise
/// (POST, `?primary=<uid>`).
pub const FAILSAFE_PROMISE_PATH: &str = "/failsafe/promise";
/// Where a proxy asks the primary's keeper how long it may route (GET).
pub const FAILSAFE_ROUTE_PATH: &str = "/failsafe/route";

/// A keeper's failsafe promise, as it answers it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Promise {
    /// The keeper promising.
    pub uid: String,
    /// For how long from when it received the request.
    pub promised_ms: u64,
}

/// The primary's keeper's answer to a proxy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Route {
    /// The keeper (and database) answering.
    pub uid: String,
    /// How long from now its fence holds off.
    pub remaining_ms: u64,
}

/// The value of `name` in a query string (`a=1&b=2`).
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The largest answer read.
const MAX_ANSWER: usize = 1024 * 1024;

/// Sends `method path` to `addr` (`host:port`) and returns the status and
/// body, or why there is none.
pub async fn call(
    addr: &str,
    method: &str,
    path: &str,
    limit: Duration,
) -> Result<(u16, String), String> {
    let exchange = async {
        let mut conn = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let _ = conn.set_nodelay(true);
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        conn.write_all(head.as_bytes())
            .await
            .map_err(|e| format!("cannot send to {addr}: {e}"))?;
        let mut answer = Vec::new();
        (&mut conn)
            .take(MAX_ANSWER as u64)
            .read_to_end(&mut answer)
            .await
            .map_err(|e| format!("no answer from {addr}: {e}"))?;
        parse(&answer).ok_or_else(|| format!("{addr} did not answer in HTTP"))
    };
    tokio::time::timeout(limit, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("{addr} did not answer within {limit:?}")))
}

/// The status and body of an answer.
fn parse(answer: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_gives_its_status_and_body() {
        let a = b"HTTP/1.1 409 Error\r\nContent-Length: 3\r\n\r\nno\n";
        assert_eq!(parse(a), Some((409, "no\n".into())));
        assert_eq!(parse(b"garbage"), None);
    }
}
