//! Session errors, classified once. Each variant has one row in
//! [`SessionError::meta`]: the side at fault ([`ErrorKind`], a metric
//! label), a stable reason label, the SQLSTATE the client receives, the
//! message and hint it reads, and whether retrying is safe.
//!
//! Two texts per error: `Display` is the log line, with backend addresses
//! and OS error text; [`SessionError::client_message`] is what a client that
//! has not authenticated yet reads, and holds neither. The log line can be
//! sent as the ErrorResponse detail behind [`crate::ProxyConfig::error_detail`].
//!
//! SQLSTATE codes come from PostgreSQL's `src/backend/utils/errcodes.txt`.

use std::borrow::Cow;
use std::io;
use std::time::Duration;

use crate::protocol::ProtocolError;
use crate::proxy_protocol::ProxyHeaderError;

/// Which part of the system an error belongs to: the `kind` label of
/// `keelson_connections_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The client misbehaved or went away.
    Client,
    /// The backend PostgreSQL failed or could not be reached.
    Backend,
    /// The proxy refused the session by policy (limits, shutdown, no primary).
    Policy,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Client => "client",
            ErrorKind::Backend => "backend",
            ErrorKind::Policy => "policy",
        }
    }
}

/// Everything known about one kind of session error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub kind: ErrorKind,
    /// A short, stable label (`rejected{reason=...}`).
    pub reason: &'static str,
    /// The SQLSTATE the client receives, or `None` when no ErrorResponse
    /// can or should be sent (the client is gone, or TLS failed).
    pub sqlstate: Option<&'static str>,
    /// What the client reads: no addresses, no OS error text.
    pub message: Cow<'static, str>,
    /// What the user can do about it.
    pub hint: Option<&'static str>,
    /// Whether the client may safely retry: nothing reached a server.
    pub retryable: bool,
}

/// SQLSTATE `08P01` protocol_violation.
pub const PROTOCOL_VIOLATION: &str = "08P01";
/// SQLSTATE `08006` connection_failure.
pub const CONNECTION_FAILURE: &str = "08006";
/// SQLSTATE `57P03` cannot_connect_now.
pub const CANNOT_CONNECT_NOW: &str = "57P03";
/// SQLSTATE `53300` too_many_connections.
pub const TOO_MANY_CONNECTIONS: &str = "53300";
/// SQLSTATE `57P01` admin_shutdown.
pub const ADMIN_SHUTDOWN: &str = "57P01";
/// SQLSTATE `22023` invalid_parameter_value.
pub const INVALID_PARAMETER_VALUE: &str = "22023";

/// Why a session could not start or had to end.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("the client sent data after SSLRequest before the TLS handshake began (possible man-in-the-middle injection, CVE-2021-23214)")]
    SslInjection,
    #[error("the client sent {0} twice during the startup phase")]
    RepeatedRequest(&'static str),
    #[error("the client sent no complete startup message within {0:?}")]
    StartupTimeout(Duration),
    #[error("the TLS handshake with the client failed: {0}")]
    ClientTls(io::Error),
    #[error("the client closed the connection during the startup phase")]
    ClientGone,
    #[error("client connection error: {0}")]
    ClientIo(io::Error),
    #[error("too many client connections: this proxy is at its limit of {0}")]
    TooManyConnections(usize),
    #[error("no primary server became available within {0:?}; the cluster may be failing over or the proxy cannot reach its cluster store")]
    NoPrimaryAfter(Duration),
    #[error("no primary within {0:?}: the cluster is a standby cluster, which takes no writes until `keelson ctl promote`")]
    StandbyCluster(Duration),
    #[error("could not connect to server {addr}: {source}")]
    BackendConnect { addr: String, source: io::Error },
    #[error("connecting to server {addr} timed out after {timeout:?}")]
    BackendConnectTimeout { addr: String, timeout: Duration },
    #[error("could not set up TLS with server {addr}: {detail}")]
    BackendTls { addr: String, detail: String },
    #[error("server {addr} did not finish authentication within {timeout:?}")]
    AuthTimeout { addr: String, timeout: Duration },
    #[error("lost the connection to server {addr}: {source}")]
    BackendIo { addr: String, source: io::Error },
    #[error("the proxy is shutting down")]
    ShuttingDown,
    #[error("the primary changed while this session was connecting")]
    FencedWhileConnecting,
    #[error("{0}")]
    BadRoute(#[from] crate::route::BadRoute),
    #[error("no replica within the lag limit became available within {0:?}")]
    NoReplicaAfter(Duration),
    #[error("server {addr} is {}, but this session's route needs {}; the cluster is changing", if *.is_standby { "a standby" } else { "a primary" }, if *.is_standby { "the primary" } else { "a standby" })]
    WrongServerRole { addr: String, is_standby: bool },
    #[error("{0}")]
    ProxyHeader(ProxyHeaderError),
    #[error(
        "the client sent a TLS handshake without ALPN \"postgresql\" (direct TLS requires it)"
    )]
    DirectTlsWithoutAlpn,
}

impl SessionError {
    /// The one table of what each error means. Exhaustive: a new variant
    /// does not compile until it has its row. Columns: side at fault,
    /// reason label, SQLSTATE (`None`: the client cannot read one), the
    /// client's message (`log`: the Display text, which names no address
    /// or OS error for these variants), hint, retry safe.
    #[rustfmt::skip]
    pub fn meta(&self) -> Meta {
        use ErrorKind::{Backend, Client, Policy};
        use SessionError::*;
        let log = || Cow::Owned(self.to_string());
        let said = |m: String| Cow::Owned(m);
        let fixed = Cow::Borrowed;
        let retry = Some("Retry in a few seconds.");
        let check = Some("Check that PostgreSQL is running and reachable from the proxy; retrying is safe.");
        let (kind, reason, sqlstate, message, hint, retryable) = match self {
            Protocol(_)                => (Client,  "protocol",            Some(PROTOCOL_VIOLATION),      log(), None, false),
            SslInjection               => (Client,  "protocol",            Some(PROTOCOL_VIOLATION),      log(), None, false),
            RepeatedRequest(_)         => (Client,  "protocol",            Some(PROTOCOL_VIOLATION),      log(), None, false),
            StartupTimeout(_)          => (Client,  "startup_timeout",     Some(CONNECTION_FAILURE),      log(), None, false),
            ClientTls(_)               => (Client,  "tls",                 None, fixed("the TLS handshake with the client failed"), None, false),
            ClientGone                 => (Client,  "client_closed",       None,                          log(), None, false),
            ClientIo(_)                => (Client,  "client_closed",       None, fixed("client connection error"), None, false),
            TooManyConnections(_)      => (Policy,  "limit",               Some(TOO_MANY_CONNECTIONS),    log(),
                                           Some("Close idle connections or raise the proxy's max_connections."), true),
            NoPrimaryAfter(_)          => (Policy,  "no_primary",          Some(CANNOT_CONNECT_NOW),      log(), retry, true),
            StandbyCluster(_)          => (Policy,  "standby_cluster",     Some(CANNOT_CONNECT_NOW),
                                           fixed("the cluster is a standby cluster: it replicates another and takes no writes until it is promoted; read-only sessions can use a replica route"),
                                           Some("Read with keelson.route=replica or through the replica listener; writes need `keelson ctl promote`."), true),
            BackendConnect { .. }      => (Backend, "backend_unavailable", Some(CONNECTION_FAILURE),
                                           fixed("could not connect to the database server"), check, true),
            BackendConnectTimeout { timeout, .. } => (Backend, "backend_unavailable", Some(CONNECTION_FAILURE),
                                           said(format!("connecting to the database server timed out after {timeout:?}")), check, true),
            BackendTls { .. }          => (Backend, "backend_tls",         Some(CONNECTION_FAILURE),
                                           fixed("could not set up TLS with the database server"),
                                           Some("The proxy's TLS settings for the server (backend_tls, backend_tls_ca_file) and the server's certificate do not agree; the proxy's log says how."), false),
            AuthTimeout { timeout, .. } => (Backend, "backend_error",      Some(CONNECTION_FAILURE),
                                           said(format!("the database server did not finish authentication within {timeout:?}")), None, false),
            BackendIo { .. }           => (Backend, "backend_error",       Some(CONNECTION_FAILURE),
                                           fixed("lost the connection to the database server"), None, false),
            ShuttingDown               => (Policy,  "shutdown",            Some(CANNOT_CONNECT_NOW),      log(), retry, true),
            FencedWhileConnecting      => (Policy,  "fenced",              Some(CANNOT_CONNECT_NOW),      log(),
                                           Some("Retry: new sessions go to the new primary."), true),
            BadRoute(_)                => (Client,  "bad_route",           Some(INVALID_PARAMETER_VALUE), log(), None, false),
            NoReplicaAfter(_)          => (Policy,  "no_replica",          Some(CANNOT_CONNECT_NOW),      log(),
                                           Some("Retry later, or use keelson.route=prefer-replica to fall back to the primary."), true),
            WrongServerRole { is_standby, .. } => (Policy, "wrong_server_role", Some(CANNOT_CONNECT_NOW),
                                           said(format!("the server is {}, but this session's route needs {}; the cluster is changing",
                                               if *is_standby { "a standby" } else { "a primary" },
                                               if *is_standby { "the primary" } else { "a standby" })),
                                           Some("Retry: nothing was run on that server."), true),
            ProxyHeader(_)             => (Client,  "proxy_protocol",      Some(PROTOCOL_VIOLATION),      log(), None, false),
            DirectTlsWithoutAlpn       => (Client,  "tls",                 Some(PROTOCOL_VIOLATION),      log(), None, false),
        };
        Meta { kind, reason, sqlstate, message, hint, retryable }
    }

    /// The side at fault, as a metric label.
    pub fn kind(&self) -> ErrorKind {
        self.meta().kind
    }

    /// A short, stable label for metrics (`rejected{reason=...}`).
    pub fn reason(&self) -> &'static str {
        self.meta().reason
    }

    /// The SQLSTATE the client receives, if it receives one.
    pub fn sqlstate(&self) -> Option<&'static str> {
        self.meta().sqlstate
    }

    /// The message the client receives: no addresses, no OS error text.
    pub fn client_message(&self) -> Cow<'static, str> {
        self.meta().message
    }

    /// What the user can do about it, sent as the ErrorResponse hint.
    pub fn hint(&self) -> Option<&'static str> {
        self.meta().hint
    }

    /// Whether the client may safely retry (nothing reached the server).
    pub fn retryable(&self) -> bool {
        self.meta().retryable
    }
}
