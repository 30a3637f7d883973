//! TLS termination configuration for client connections (rustls, ring).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("could not read the certificate chain from {path}: {source}")]
    Cert {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("could not read the private key from {path}: {source}")]
    Key {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no certificate")]
    NoCert { path: String },
    #[error("the certificate and key do not make a valid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds a server configuration from PEM files. ALPN `postgresql` is offered,
/// as PostgreSQL 17 does.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsConfigError::Cert {
            path: cert.display().to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCert {
            path: cert.display().to_string(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsConfigError::Key {
        path: key.display().to_string(),
        source,
    })?;
    server_config_from_der(certs, key)
}

/// Builds a server configuration from DER certificates and key.
pub fn server_config_from_der(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Arc::new(cfg))
}

/// How the proxy's connections to PostgreSQL use TLS, as libpq's
/// `sslmode` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendTlsMode {
    /// Encrypt; accept any certificate (protects against listeners, not
    /// against an impostor).
    Require,
    /// Encrypt, and the certificate must chain to the CA.
    VerifyCa,
    /// ... and name the server's address (host name or IP address SAN).
    VerifyFull,
}

impl std::str::FromStr for BackendTlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "require" => Ok(BackendTlsMode::Require),
            "verify-ca" => Ok(BackendTlsMode::VerifyCa),
            "verify-full" => Ok(BackendTlsMode::VerifyFull),
            _ => Err(format!(
                "{s:?} is not a TLS mode for the server connection: use disable, require, verify-ca or verify-full"
            )),
        }
    }
}

impl BackendTlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendTlsMode::Require => "require",
            BackendTlsMode::VerifyCa => "verify-ca",
            BackendTlsMode::VerifyFull => "verify-full",
        }
    }
}

/// TLS for the proxy's connections to PostgreSQL.
#[derive(Clone)]
pub struct BackendTls {
    pub mode: BackendTlsMode,
    pub(crate) connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTls")
            .field("mode", &self.mode)
            .finish()
    }
}

/// Why a backend TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BackendTlsError {
    #[error("could not read the CA certificates from {path}: {source}")]
    Ca {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{0} holds no usable CA certificate")]
    NoCa(String),
    #[error(
        "{0} needs a CA file (--backend-tls-ca-file) to verify the server's certificate against"
    )]
    CaNeeded(&'static str),
    #[error("the TLS configuration is not valid: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("the CA certificates do not make a verifier: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

/// Accepts any certificate (`require`): the handshake's signatures are
/// still checked, so the session is encrypted to whoever holds the key.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

/// Checks the chain against the CA but not the name (`verify-ca`).
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

macro_rules! signatures {
    ($provider:expr) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &$provider(self).signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &$provider(self).signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            $provider(self)
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    signatures!(|s: &AnyCertificate| s.0.clone());
}

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError as C;
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                C::NotValidForName | C::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            r => r,
        }
    }
    signatures!(|_: &ChainOnly| ring());
}

/// Builds the TLS configuration of the proxy's server connections: `mode`,
/// and for the verifying modes the CA certificates (PEM) in `ca`.
pub fn backend_tls(mode: BackendTlsMode, ca: Option<&Path>) -> Result<BackendTls, BackendTlsError> {
    let provider = ring();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let roots = match ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|source| BackendTlsError::Ca {
                    path: path.display().to_string(),
                    source,
                })?
            {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(BackendTlsError::NoCa(path.display().to_string()));
            }
            Some(Arc::new(roots))
        }
        None => None,
    };
    let mut cfg = match (mode, roots) {
        (BackendTlsMode::Require, _) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
        (BackendTlsMode::VerifyCa, Some(roots)) => {
            let inner =
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
                .with_no_client_auth()
        }
        (BackendTlsMode::VerifyFull, Some(roots)) => {
            let inner =
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()?;
            builder.with_webpki_verifier(inner).with_no_client_auth()
        }
        (m, None) => return Err(BackendTlsError::CaNeeded(m.as_str())),
    };
    cfg.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(BackendTls {
        mode,
        connector: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
    })
}
