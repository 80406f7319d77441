//! The server's rustls configuration: TLS 1.3 only, ring as the crypto provider, client
//! certificates asked for always and checked against the configured CAs.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::TlsPaths;

pub fn server_config(paths: &TlsPaths) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_file_iter(&paths.server_cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("tls.server_cert {}: {e}", paths.server_cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&paths.server_key)
        .map_err(|e| format!("tls.server_key {}: {e}", paths.server_key.display()))?;
    let mut roots = RootCertStore::empty();
    for ca in &paths.client_ca {
        let certs = CertificateDer::pem_file_iter(ca)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("tls.client_ca {}: {e}", ca.display()))?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("tls.client_ca {}: {e}", ca.display()))?;
        }
    }
    // Unauthenticated clients get through TLS so that the session can answer with a protocol
    // error (CERTIFICATE_REQUIRED) instead of a bare alert; device sessions authenticate with
    // a token instead. A certificate from an unknown CA still fails the handshake.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("tls.client_ca: {e}"))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("tls: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls.server_cert/server_key: {e}"))?;
    // Sessions are long-lived and resumption buys nothing; tickets a client never reads can
    // make it reset the connection on close and lose what it sent last.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}
