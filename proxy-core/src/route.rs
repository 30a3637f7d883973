//! Where a session goes. Its route comes from, in order of precedence: the
//! `keelson.route` setting the client sent at startup (taken out of the
//! startup message before PostgreSQL sees it), the first matching rule of
//! the configuration, or the default route of the listener it connected
//! to. The backend is then chosen from the current view: the primary, or
//! the replica with the fewest sessions among those fresh enough.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use ipnet::IpNet;

use crate::protocol::StartupMessage;
use crate::view::{Replica, View};

/// The name of the setting that picks a session's route:
/// `options='-c keelson.route=replica'`, or a startup parameter.
pub const ROUTE_SETTING: &str = "keelson.route";

/// What kind of server a session wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Route {
    /// The primary (read-write). The default.
    #[default]
    Primary,
    /// A standby that is fresh enough; never the primary.
    Replica,
    /// A fresh standby if there is one, else the primary.
    PreferReplica,
    /// Whichever server has the fewest sessions: the primary or a fresh
    /// standby.
    Any,
}

impl Route {
    pub const ALL: [Route; 4] = [
        Route::Primary,
        Route::Replica,
        Route::PreferReplica,
        Route::Any,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Route::Primary => "primary",
            Route::Replica => "replica",
            Route::PreferReplica => "prefer-replica",
            Route::Any => "any",
        }
    }

    pub fn parse(s: &str) -> Option<Route> {
        Route::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether the server must be a standby (`Some(true)`), must be the
    /// primary (`Some(false)`), or may be either.
    pub(crate) fn wants_standby(self) -> Option<bool> {
        match self {
            Route::Primary => Some(false),
            Route::Replica => Some(true),
            Route::PreferReplica | Route::Any => None,
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A configured rule: sessions that match every given field take `route`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    pub database: Option<String>,
    pub user: Option<String>,
    pub application_name: Option<String>,
    /// The client's network (its real address when PROXY protocol is on).
    pub source: Option<IpNet>,
    pub route: Route,
}

impl Rule {
    pub fn matches(&self, msg: &StartupMessage, client: Option<IpAddr>) -> bool {
        let field = |want: &Option<String>, got: Option<&[u8]>| {
            want.as_deref().is_none_or(|w| got == Some(w.as_bytes()))
        };
        field(&self.database, msg.database())
            && field(&self.user, msg.user())
            && field(&self.application_name, msg.param("application_name"))
            && self
                .source
                .is_none_or(|net| client.is_some_and(|ip| net.contains(&ip)))
    }
}

/// How stale a replica may be and still take new sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagLimit {
    /// WAL bytes not yet replayed, against the primary's position.
    pub bytes: u64,
    /// Time since the last replayed transaction, while behind.
    pub time: Duration,
}

impl Default for LagLimit {
    fn default() -> Self {
        LagLimit {
            bytes: 16 * 1024 * 1024,
            time: Duration::from_secs(10),
        }
    }
}

impl LagLimit {
    /// Whether `r` may take new sessions: streaming and within both limits.
    pub fn admits(&self, r: &Replica) -> bool {
        r.streaming && r.lag_bytes <= self.bytes && r.lag.is_none_or(|l| l <= self.time)
    }
}

/// Startup parameters, name and value, in order, as the client's bytes.
pub type Params = Vec<(Bytes, Bytes)>;

/// Why the `keelson.route` setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value for {ROUTE_SETTING}: {0:?}; use primary, replica, prefer-replica or any")]
pub struct BadRoute(pub String);

/// Takes the `keelson.route` setting out of a startup message's
/// parameters: from `options` (`-c keelson.route=X`, `-ckeelson.route=X`
/// or `--keelson.route=X`) or from a parameter of that name. Returns the
/// route and the parameters without it (every other byte as the client sent
/// it), or `None` if it was not given.
pub fn take_route_setting(params: &[(Bytes, Bytes)]) -> Result<Option<(Route, Params)>, BadRoute> {
    let mut found: Option<Vec<u8>> = None;
    let mut out = Vec::with_capacity(params.len());
    for (k, v) in params {
        if k.as_ref() == ROUTE_SETTING.as_bytes() {
            found = Some(v.to_vec());
            continue;
        }
        if k.as_ref() == b"options" {
            let (value, rest) = take_from_options(v);
            if let Some(value) = value {
                found = Some(value);
                if !rest.is_empty() {
                    out.push((k.clone(), Bytes::from(rest)));
                }
                continue;
            }
        }
        out.push((k.clone(), v.clone()));
    }
    match found {
        None => Ok(None),
        Some(v) => {
            let text = String::from_utf8_lossy(&v);
            match Route::parse(text.trim()) {
                Some(r) => Ok(Some((r, out))),
                None => Err(BadRoute(text.into_owned())),
            }
        }
    }
}

/// Splits `options` the way PostgreSQL does (`pg_split_opts`: ASCII
/// whitespace separates, a backslash escapes the next byte), removes the
/// route setting, and joins the rest back with the same escaping. Works on
/// bytes, as PostgreSQL does: other bytes pass unchanged.
fn take_from_options(options: &[u8]) -> (Option<Vec<u8>>, Vec<u8>) {
    let mut words: Vec<Vec<u8>> = Vec::new();
    let mut bytes = options.iter().copied().peekable();
    loop {
        while bytes.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            bytes.next();
        }
        if bytes.peek().is_none() {
            break;
        }
        let mut w = Vec::new();
        while let Some(c) = bytes.next() {
            match c {
                c if c.is_ascii_whitespace() => break,
                b'\\' => {
                    if let Some(n) = bytes.next() {
                        w.push(n);
                    }
                }
                c => w.push(c),
            }
        }
        words.push(w);
    }
    let setting = |w: &[u8]| -> Option<Vec<u8>> {
        let eq = w.iter().position(|&b| b == b'=')?;
        let name: Vec<u8> = w[..eq]
            .iter()
            .map(|&b| if b == b'-' { b'_' } else { b })
            .collect();
        (name == ROUTE_SETTING.as_bytes()).then(|| w[eq + 1..].to_vec())
    };
    let mut found = None;
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let w = &words[i][..];
        if w == b"-c" {
            if let Some(v) = words.get(i + 1).and_then(|n| setting(n)) {
                found = Some(v);
                i += 2;
                continue;
            }
        } else if let Some(v) = w
            .strip_prefix(b"-c")
            .or_else(|| w.strip_prefix(b"--"))
            .and_then(setting)
        {
            found = Some(v);
            i += 1;
            continue;
        }
        kept.push(w);
        i += 1;
    }
    let mut joined = Vec::with_capacity(options.len());
    for (n, w) in kept.iter().enumerate() {
        if n > 0 {
            joined.push(b' ');
        }
        for &c in *w {
            if c == b'\\' || c.is_ascii_whitespace() {
                joined.push(b'\\');
            }
            joined.push(c);
        }
    }
    (found, joined)
}

/// The route of a session: its own setting, else the first matching rule,
/// else the listener's default.
pub fn resolve(
    explicit: Option<Route>,
    rules: &[Rule],
    msg: &StartupMessage,
    client: Option<IpAddr>,
    listener_default: Route,
) -> Route {
    explicit
        .or_else(|| {
            rules
                .iter()
                .find(|r| r.matches(msg, client))
                .map(|r| r.route)
        })
        .unwrap_or(listener_default)
}

/// Where a route sends a new session in `view`, if anywhere.
/// `sessions(addr)` counts the sessions a backend has now; replicas in
/// `unreachable` (this session could not connect to them) are skipped.
pub fn pick<'v>(
    view: &'v View,
    route: Route,
    limit: &LagLimit,
    sessions: impl Fn(&crate::view::Backend) -> usize,
    unreachable: &[crate::view::Backend],
) -> Option<Pick<'v>> {
    let replica = || {
        view.replicas
            .iter()
            .filter(|r| {
                limit.admits(r)
                    && Some(&r.backend) != view.primary.as_ref()
                    && !unreachable.contains(&r.backend)
            })
            .min_by_key(|r| sessions(&r.backend))
    };
    let primary = view.primary.as_ref().map(|b| Pick {
        backend: b,
        standby: false,
    });
    let standby = |r: &'v Replica| Pick {
        backend: &r.backend,
        standby: true,
    };
    match route {
        Route::Primary => primary,
        Route::Replica => replica().map(standby),
        Route::PreferReplica => replica().map(standby).or(primary),
        Route::Any => match (replica(), primary) {
            (Some(r), Some(p)) if sessions(p.backend) < sessions(&r.backend) => Some(p),
            (Some(r), _) => Some(standby(r)),
            (None, p) => p,
        },
    }
}

/// A backend chosen for a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick<'v> {
    pub backend: &'v crate::view::Backend,
    /// Chosen as a standby (from the replicas).
    pub standby: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::Backend;

    fn params(p: &[(&str, &str)]) -> Params {
        p.iter()
            .map(|(k, v)| (Bytes::from(k.to_string()), Bytes::from(v.to_string())))
            .collect()
    }

    #[test]
    fn non_utf8_bytes_pass_the_route_setting_unchanged() {
        let p: Params = vec![
            (Bytes::from_static(b"user"), Bytes::from_static(b"u\xff")),
            (
                Bytes::from_static(b"options"),
                Bytes::from_static(b"-c keelson.route=replica -c x.y=\xe9\\ \xfe"),
            ),
            (
                Bytes::from_static(b"application_name"),
                Bytes::from_static(b"\xe9"),
            ),
        ];
        let (r, rest) = take_route_setting(&p).unwrap().unwrap();
        assert_eq!(r, Route::Replica);
        assert_eq!(
            rest,
            vec![
                (Bytes::from_static(b"user"), Bytes::from_static(b"u\xff")),
                (
                    Bytes::from_static(b"options"),
                    Bytes::from_static(b"-c x.y=\xe9\\ \xfe")
                ),
                (
                    Bytes::from_static(b"application_name"),
                    Bytes::from_static(b"\xe9")
                ),
            ]
        );
    }

    #[test]
    fn route_setting_is_taken_out_of_options() {
        let cases: &[(&str, Option<Route>, Option<&str>)] = &[
            ("-c keelson.route=replica", Some(Route::Replica), None),
            ("-ckeelson.route=any", Some(Route::Any), None),
            (
                "--keelson.route=prefer-replica",
                Some(Route::PreferReplica),
                None,
            ),
            (
                "-c statement_timeout=5s -c keelson.route=replica -c search_path=a\\ b",
                Some(Route::Replica),
                Some("-c statement_timeout=5s -c search_path=a\\ b"),
            ),
            (
                "-c statement_timeout=5s",
                None,
                Some("-c statement_timeout=5s"),
            ),
        ];
        for (opts, route, rest) in cases {
            let p = params(&[("user", "u"), ("options", opts)]);
            let got = take_route_setting(&p).unwrap();
            match route {
                None => assert!(got.is_none(), "{opts}"),
                Some(r) => {
                    let (got_r, got_p) = got.unwrap();
                    assert_eq!(got_r, *r, "{opts}");
                    let want: Params = match rest {
                        Some(rest) => params(&[("user", "u"), ("options", rest)]),
                        None => params(&[("user", "u")]),
                    };
                    assert_eq!(got_p, want, "{opts}");
                }
            }
        }
        let direct = params(&[("user", "u"), ("keelson.route", "replica")]);
        assert_eq!(
            take_route_setting(&direct).unwrap(),
            Some((Route::Replica, params(&[("user", "u")])))
        );
        let bad = params(&[("options", "-c keelson.route=nowhere")]);
        assert_eq!(
            take_route_setting(&bad).unwrap_err(),
            BadRoute("nowhere".into())
        );
    }

    fn replica(addr: &str, lag_bytes: u64, streaming: bool) -> Replica {
        Replica {
            backend: Backend::new(addr),
            lag_bytes,
            lag: None,
            streaming,
        }
    }

    #[test]
    fn replicas_are_chosen_fresh_and_least_loaded() {
        let view = View {
            generation: 1,
            primary: Some(Backend::new("p:1")),
            replicas: vec![
                replica("r1:1", 0, true),
                replica("r2:1", 100, true),
                replica("lagging:1", 1 << 30, true),
                replica("stopped:1", 0, false),
            ],
        };
        let limit = LagLimit::default();
        let load = |b: &Backend| match b.addr() {
            "r1:1" => 5,
            "r2:1" => 2,
            "p:1" => 1,
            _ => 0,
        };
        let addr = |p: Option<Pick>| p.map(|p| p.backend.addr().to_owned());
        assert_eq!(
            addr(pick(&view, Route::Primary, &limit, load, &[])),
            Some("p:1".into())
        );
        assert_eq!(
            addr(pick(&view, Route::Replica, &limit, load, &[])),
            Some("r2:1".into())
        );
        assert_eq!(
            addr(pick(&view, Route::Any, &limit, load, &[])),
            Some("p:1".into())
        );
        let no_fresh = View {
            replicas: vec![replica("lagging:1", 1 << 30, true)],
            ..view.clone()
        };
        assert_eq!(pick(&no_fresh, Route::Replica, &limit, load, &[]), None);
        assert_eq!(
            addr(pick(&no_fresh, Route::PreferReplica, &limit, load, &[])),
            Some("p:1".into())
        );
        let slow = View {
            replicas: vec![Replica {
                lag: Some(Duration::from_secs(60)),
                ..replica("r1:1", 0, true)
            }],
            ..view
        };
        assert_eq!(pick(&slow, Route::Replica, &limit, load, &[]), None);
    }

    #[test]
    fn rules_match_every_given_field() {
        let msg = StartupMessage {
            major: 3,
            minor: 0,
            params: params(&[
                ("user", "app"),
                ("database", "shop"),
                ("application_name", "report"),
            ]),
            raw: Default::default(),
        };
        let rule = Rule {
            user: Some("app".into()),
            application_name: Some("report".into()),
            route: Route::Replica,
            ..Default::default()
        };
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert!(rule.matches(&msg, Some(ip)));
        let other_db = Rule {
            database: Some("crm".into()),
            ..rule.clone()
        };
        assert!(!other_db.matches(&msg, Some(ip)));
        let net = Rule {
            source: Some("10.1.0.0/16".parse().unwrap()),
            ..rule.clone()
        };
        assert!(net.matches(&msg, Some(ip)));
        assert!(!net.matches(&msg, Some("10.2.0.1".parse().unwrap())));
        assert_eq!(
            resolve(
                None,
                &[other_db.clone(), net.clone()],
                &msg,
                Some(ip),
                Route::Primary
            ),
            Route::Replica
        );
        assert_eq!(
            resolve(Some(Route::Any), &[net], &msg, Some(ip), Route::Primary),
            Route::Any,
            "the session's own setting wins"
        );
        assert_eq!(
            resolve(None, &[other_db], &msg, Some(ip), Route::Primary),
            Route::Primary
        );
    }
}
