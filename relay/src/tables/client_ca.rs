//! Client-certificate verification with CAs that change at run time: the configured CAs plus
//! the CA of every partner registered by its CA (rather than by certificate fingerprints).
//! rustls takes one verifier for the life of a `ServerConfig`; this one delegates to a
//! WebPKI verifier it rebuilds whenever the set of partner CAs changes.

use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, RootCertStore, SignatureScheme};

/// A WebPKI verifier trusting exactly `roots` (DER); unauthenticated clients pass the
/// handshake (device sessions use tokens; the session answers `CERTIFICATE_REQUIRED`).
pub fn webpki_verifier(
    roots: &[Vec<u8>],
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut store = RootCertStore::empty();
    for der in roots {
        store
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| format!("a client CA certificate: {e}"))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .allow_unauthenticated()
        .build()
        .map(|v| v as Arc<dyn ClientCertVerifier>)
        .map_err(|e| format!("client CAs: {e}"))
}

#[derive(Debug)]
pub struct DynamicClientVerifier {
    provider: Arc<CryptoProvider>,
    /// The configured CAs (DER), always trusted.
    base: Vec<Vec<u8>>,
    current: RwLock<Arc<dyn ClientCertVerifier>>,
}

impl DynamicClientVerifier {
    pub fn new(
        base: Vec<Vec<u8>>,
        provider: Arc<CryptoProvider>,
    ) -> Result<DynamicClientVerifier, String> {
        let current = webpki_verifier(&base, &provider)?;
        Ok(DynamicClientVerifier {
            provider,
            base,
            current: RwLock::new(current),
        })
    }

    /// Trusts the configured CAs plus `extra` from now on.
    pub fn set_extra(&self, extra: &[Vec<u8>]) -> Result<(), String> {
        let mut roots = self.base.clone();
        roots.extend(extra.iter().cloned());
        let verifier = webpki_verifier(&roots, &self.provider)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = verifier;
        Ok(())
    }

    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl ClientCertVerifier for DynamicClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    /// No hints: the set changes, and an empty list tells a client any CA may do.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}
