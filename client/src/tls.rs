//! TLS settings for a relay connection: the CA that issued the relay's certificate, and the
//! client certificate the relay identifies our network (and allowed roles) by.
//!
//! TLS 1.3 only, with rustls' ring provider chosen explicitly (the workspace builds no other
//! provider, so rustls cannot pick a process-wide default).

use std::path::Path;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::ClientError;

/// Trust anchor and optional client identity for connections to a relay.
///
/// Cheap to clone: the built `rustls::ClientConfig` is shared.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field(
                "client_auth",
                &self.config.client_auth_cert_resolver.has_certs(),
            )
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Loads the CA certificate(s) from `ca` and, if given, the client certificate chain and
    /// its private key (PKCS#8, PKCS#1 or SEC1) from PEM files.
    pub fn from_pem_files(
        ca: &Path,
        cert_and_key: Option<(&Path, &Path)>,
    ) -> Result<ClientTls, ClientError> {
        let ca_pem = read_file(ca)?;
        let roots = certificates(&ca_pem, &ca.display().to_string())?;
        let identity = match cert_and_key {
            None => None,
            Some((cert, key)) => {
                let chain = certificates(&read_file(cert)?, &cert.display().to_string())?;
                let key = private_key(&read_file(key)?, &key.display().to_string())?;
                Some((chain, key))
            }
        };
        ClientTls::from_der(roots, identity)
    }

    /// Same as [`ClientTls::from_pem_files`], from PEM text already in memory.
    pub fn from_pem(
        ca_pem: &[u8],
        cert_and_key_pem: Option<(&[u8], &[u8])>,
    ) -> Result<ClientTls, ClientError> {
        let roots = certificates(ca_pem, "CA PEM")?;
        let identity = match cert_and_key_pem {
            None => None,
            Some((cert, key)) => Some((
                certificates(cert, "client certificate PEM")?,
                private_key(key, "client key PEM")?,
            )),
        };
        ClientTls::from_der(roots, identity)
    }

    /// From DER: trust anchors, and the client certificate chain (leaf first) with its key.
    pub fn from_der(
        roots: Vec<CertificateDer<'static>>,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<ClientTls, ClientError> {
        if roots.is_empty() {
            return Err(ClientError::Config("no CA certificate".into()));
        }
        let mut store = RootCertStore::empty();
        for root in roots {
            store
                .add(root)
                .map_err(|e| ClientError::Config(format!("unusable CA certificate: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ClientError::Config(format!("TLS 1.3 with ring: {e}")))?
            .with_root_certificates(store);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => {
                if chain.is_empty() {
                    return Err(ClientError::Config("empty client certificate chain".into()));
                }
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| ClientError::Config(format!("client certificate: {e}")))?
            }
        };
        Ok(ClientTls {
            config: Arc::new(config),
        })
    }

    /// Wraps a configuration built elsewhere (it should be TLS 1.3 and trust the relay's CA).
    pub fn from_config(config: Arc<ClientConfig>) -> ClientTls {
        ClientTls { config }
    }

    /// The rustls configuration connections use.
    pub fn config(&self) -> &Arc<ClientConfig> {
        &self.config
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path)
        .map_err(|e| ClientError::Config(format!("cannot read {}: {e}", path.display())))
}

fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientError::Config(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(ClientError::Config(format!(
            "{what}: no CERTIFICATE section"
        )));
    }
    Ok(certs)
}

fn private_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, ClientError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| ClientError::Config(format!("{what}: {e}")))
}
