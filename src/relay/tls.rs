//! TLS client settings for `mqtts://` and `wss://` connections.
//!
//! Configurations are built here, never by rumqttc: its own defaults ask rustls for a process-wide
//! crypto provider, which does not exist in a binary that links both ring and aws-lc-rs (it
//! panics), and they load the system trust store once per connection.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// How the broker's certificate is checked.
#[derive(Clone, Default)]
pub enum TlsTrust {
    /// Against the system trust store.
    #[default]
    System,
    /// Against the CA certificates of a PEM bundle (a prepared configuration).
    Custom(Arc<ClientConfig>),
    /// Not at all: any certificate is accepted. Only by explicit request, and logged.
    InsecureSkipVerify,
}

impl std::fmt::Debug for TlsTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsTrust::System => "System",
            TlsTrust::Custom(_) => "Custom",
            TlsTrust::InsecureSkipVerify => "InsecureSkipVerify",
        })
    }
}

/// A TLS configuration could not be built. The messages carry no certificate contents.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TlsError {
    #[error("no PEM certificate found in the CA bundle")]
    NoCertificate,
    /// Only the kind of the PEM reader's error: its text may quote the bundle.
    #[error("the CA bundle is not valid PEM: {0}")]
    Pem(std::io::ErrorKind),
    #[error("none of the {0} certificate(s) in the CA bundle could be used")]
    Unusable(usize),
    #[error("the system trust store has no usable CA certificates; set caSecret")]
    NoSystemRoots,
    #[error("TLS setup: {0}")]
    Rustls(#[source] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn with_roots(roots: RootCertStore) -> Result<Arc<ClientConfig>, TlsError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A configuration trusting exactly the CA certificates in `pem`.
pub fn custom_ca(pem: &[u8]) -> Result<Arc<ClientConfig>, TlsError> {
    let certs = rustls_pemfile::certs(&mut std::io::Cursor::new(pem))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.kind()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let total = certs.len();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsError::Unusable(total));
    }
    with_roots(roots)
}

/// The system trust store, loaded once per process and shared by every connection.
pub fn system() -> Result<Arc<ClientConfig>, TlsError> {
    static SYSTEM: OnceLock<Result<Arc<ClientConfig>, TlsError>> = OnceLock::new();
    SYSTEM
        .get_or_init(|| {
            let loaded = rustls_native_certs::load_native_certs();
            for e in &loaded.errors {
                tracing::warn!(error = %e, "reading the system trust store");
            }
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(loaded.certs);
            if roots.is_empty() {
                return Err(TlsError::NoSystemRoots);
            }
            with_roots(roots)
        })
        .clone()
}

/// A configuration that accepts any server certificate (handshake signatures are still checked,
/// so the connection is encrypted, but the peer is not authenticated).
pub fn insecure() -> Result<Arc<ClientConfig>, TlsError> {
    static INSECURE: OnceLock<Result<Arc<ClientConfig>, TlsError>> = OnceLock::new();
    INSECURE
        .get_or_init(|| {
            let config = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(TlsError::Rustls)?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider())))
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .clone()
}

/// The configuration for a trust choice.
pub fn client_config(trust: &TlsTrust) -> Result<Arc<ClientConfig>, TlsError> {
    match trust {
        TlsTrust::System => system(),
        TlsTrust::Custom(c) => Ok(c.clone()),
        TlsTrust::InsecureSkipVerify => insecure(),
    }
}

#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_ca_bundles_are_named() {
        assert_eq!(custom_ca(b"").unwrap_err(), TlsError::NoCertificate);
        assert_eq!(
            custom_ca(b"not a certificate").unwrap_err(),
            TlsError::NoCertificate
        );
        let garbage = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            custom_ca(garbage).unwrap_err(),
            TlsError::Unusable(1) | TlsError::Pem(_)
        ));
    }

    /// Why configurations are built here: rustls's own builder (which rumqttc's default and
    /// CA-file configurations use) cannot choose between the two providers in this binary.
    #[test]
    fn rustls_has_no_process_default_provider_here() {
        assert!(CryptoProvider::get_default().is_none());
        let r = std::panic::catch_unwind(|| {
            let _ = ClientConfig::builder();
        });
        assert!(r.is_err(), "rustls picked a provider on its own");
        assert!(system().is_ok() || matches!(system(), Err(TlsError::NoSystemRoots)));
    }

    #[test]
    fn the_insecure_configuration_builds_once() {
        let a = insecure().unwrap();
        let b = insecure().unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }
}
