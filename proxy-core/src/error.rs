//! Session errors, classified once: which side failed (a metric label), the
//! SQLSTATE the client receives, and a message a person can act on.
//!
//! SQLSTATE codes come from PostgreSQL's `src/backend/utils/errcodes.txt`.

use std::io;
use std::time::Duration;

use crate::protocol::ProtocolError;

/// Which part of the system an error belongs to. Used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The client misbehaved or went away.
    Client,
    /// The backend PostgreSQL failed or could not be reached.
    Backend,
    /// The proxy refused the session by policy (limits, shutdown, no primary).
    Policy,
    /// A bug or resource problem in the proxy.
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Client => "client",
            ErrorKind::Backend => "backend",
            ErrorKind::Policy => "policy",
            ErrorKind::Internal => "internal",
        }
    }
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
/// SQLSTATE `08001` sqlclient_unable_to_establish_sqlconnection.
pub const UNABLE_TO_CONNECT: &str = "08001";
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
    #[error("no primary server is available to route to; the cluster may be failing over")]
    NoPrimary,
    #[error("no primary server became available within {0:?}; the cluster may be failing over or the proxy cannot reach its cluster store")]
    NoPrimaryAfter(Duration),
    #[error("could not connect to server {addr}: {source}")]
    BackendConnect { addr: String, source: io::Error },
    #[error("connecting to server {addr} timed out after {timeout:?}")]
    BackendConnectTimeout { addr: String, timeout: Duration },
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
    ProxyHeader(String),
    #[error(
        "the client sent a TLS handshake without ALPN \"postgresql\" (direct TLS requires it)"
    )]
    DirectTlsWithoutAlpn,
}

impl SessionError {
    /// The side at fault, as a metric label.
    pub fn kind(&self) -> ErrorKind {
        use SessionError::*;
        match self {
            Protocol(_) | SslInjection | RepeatedRequest(_) | StartupTimeout(_) | ClientTls(_)
            | ClientGone | ClientIo(_) => ErrorKind::Client,
            TooManyConnections(_)
            | NoPrimary
            | NoPrimaryAfter(_)
            | ShuttingDown
            | FencedWhileConnecting
            | NoReplicaAfter(_)
            | WrongServerRole { .. } => ErrorKind::Policy,
            BadRoute(_) | ProxyHeader(_) | DirectTlsWithoutAlpn => ErrorKind::Client,
            BackendConnect { .. }
            | BackendConnectTimeout { .. }
            | AuthTimeout { .. }
            | BackendIo { .. } => ErrorKind::Backend,
        }
    }

    /// A short, stable label for metrics (`rejected{reason=...}`).
    pub fn reason(&self) -> &'static str {
        use SessionError::*;
        match self {
            Protocol(_) | SslInjection | RepeatedRequest(_) => "protocol",
            StartupTimeout(_) => "startup_timeout",
            ClientTls(_) => "tls",
            ClientGone | ClientIo(_) => "client_closed",
            TooManyConnections(_) => "limit",
            NoPrimary | NoPrimaryAfter(_) => "no_primary",
            BackendConnect { .. } | BackendConnectTimeout { .. } => "backend_unavailable",
            AuthTimeout { .. } | BackendIo { .. } => "backend_error",
            ShuttingDown => "shutdown",
            FencedWhileConnecting => "fenced",
            BadRoute(_) => "bad_route",
            NoReplicaAfter(_) => "no_replica",
            WrongServerRole { .. } => "wrong_server_role",
            ProxyHeader(_) => "proxy_protocol",
            DirectTlsWithoutAlpn => "tls",
        }
    }

    /// The SQLSTATE the client receives, or `None` when no ErrorResponse can
    /// or should be sent (the client is gone, or TLS failed).
    pub fn sqlstate(&self) -> Option<&'static str> {
        use SessionError::*;
        match self {
            Protocol(_) | SslInjection | RepeatedRequest(_) => Some(PROTOCOL_VIOLATION),
            StartupTimeout(_) => Some(CONNECTION_FAILURE),
            ClientTls(_) | ClientGone | ClientIo(_) => None,
            TooManyConnections(_) => Some(TOO_MANY_CONNECTIONS),
            NoPrimary | NoPrimaryAfter(_) => Some(CANNOT_CONNECT_NOW),
            BackendConnect { .. }
            | BackendConnectTimeout { .. }
            | AuthTimeout { .. }
            | BackendIo { .. } => Some(CONNECTION_FAILURE),
            ShuttingDown | FencedWhileConnecting => Some(CANNOT_CONNECT_NOW),
            BadRoute(_) => Some(INVALID_PARAMETER_VALUE),
            NoReplicaAfter(_) | WrongServerRole { .. } => Some(CANNOT_CONNECT_NOW),
            ProxyHeader(_) | DirectTlsWithoutAlpn => Some(PROTOCOL_VIOLATION),
        }
    }

    /// What the user can do about it, sent as the ErrorResponse hint.
    pub fn hint(&self) -> Option<&'static str> {
        use SessionError::*;
        match self {
            TooManyConnections(_) => {
                Some("Close idle connections or raise the proxy's max_connections.")
            }
            NoPrimary | NoPrimaryAfter(_) | ShuttingDown => Some("Retry in a few seconds."),
            FencedWhileConnecting => Some("Retry: new sessions go to the new primary."),
            NoReplicaAfter(_) => Some(
                "Retry later, or use keelson.route=prefer-replica to fall back to the primary.",
            ),
            WrongServerRole { .. } => Some("Retry: nothing was run on that server."),
            BackendConnect { .. } | BackendConnectTimeout { .. } => Some(
                "Check that PostgreSQL is running and reachable from the proxy; retrying is safe.",
            ),
            _ => None,
        }
    }

    /// Whether the client may safely retry (nothing reached the server).
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            SessionError::TooManyConnections(_)
                | SessionError::NoPrimary
                | SessionError::NoPrimaryAfter(_)
                | SessionError::ShuttingDown
                | SessionError::FencedWhileConnecting
                | SessionError::NoReplicaAfter(_)
                | SessionError::WrongServerRole { .. }
                | SessionError::BackendConnect { .. }
                | SessionError::BackendConnectTimeout { .. }
        )
    }
}
