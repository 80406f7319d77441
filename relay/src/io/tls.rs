//! The server's rustls configuration: TLS 1.3 only, ring as the crypto provider, client
//! certificates asked for always and checked against the configured CAs.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsPaths;
use crate::tables::auth::Auth;
use crate::tables::client_ca::DynamicClientVerifier;

/// The server configuration; its client verifier trusts the configured CAs and, through
/// `auth`, every CA a partner is registered with (now and after each change).
pub fn server_config(paths: &TlsPaths, auth: &Auth) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_file_iter(&paths.server_cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("tls.server_cert {}: {e}", paths.server_cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&paths.server_key)
        .map_err(|e| format!("tls.server_key {}: {e}", paths.server_key.display()))?;
    let mut roots = Vec::new();
    for ca in &paths.client_ca {
        let certs = CertificateDer::pem_file_iter(ca)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("tls.client_ca {}: {e}", ca.display()))?;
        roots.extend(certs.into_iter().map(|c| c.to_vec()));
    }
    // Unauthenticated clients get through TLS so that the session can answer with a protocol
    // error (CERTIFICATE_REQUIRED) instead of a bare alert; device sessions authenticate with
    // a token instead. A certificate from an unknown CA still fails the handshake.
    let verifier = Arc::new(
        DynamicClientVerifier::new(roots, provider.clone())
            .map_err(|e| format!("tls.client_ca: {e}"))?,
    );
    auth.attach_verifier(verifier.clone())?;
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
