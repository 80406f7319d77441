//! The development PKI `relay serve` creates on first start: a CA, the relay's server
//! certificate, client certificates for a gatekeeper network and a demo partner network, and
//! an Ed25519 device-token key for each (it also signs their users' consent records), and
//! the operator's client certificate for the control API. Real deployments configure their own (see
//! `config.rs`); this exists so the README's run command works on a fresh machine.

use std::fs;
use std::path::{Path, PathBuf};

use codec::{NetworkId, Role};
use devkit::pki::{DevCa, RELAY_DEV_NETWORKS};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::tables::auth::NetworkEntry;

// Kept under this path: relay/tests call `relay::pki::sha256`.
pub use devkit::hex::sha256;

/// The development CA's name: a CA restored from `ca.key` must carry the same one.
const CA_NAME: &str = "Article 7 Relay development CA";

/// The gatekeeper network of the development PKI.
pub const DEV_GATEKEEPER: NetworkId = NetworkId(RELAY_DEV_NETWORKS[0].id);
/// The demo partner network of the development PKI.
pub const DEV_PARTNER: NetworkId = NetworkId(RELAY_DEV_NETWORKS[1].id);

/// Paths of the development PKI's files.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub dir: PathBuf,
}

impl DevPki {
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("relay.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("relay.key")
    }
    /// The operator's client certificate, for the control API's operator endpoints.
    pub fn operator_cert(&self) -> PathBuf {
        self.dir.join("operator.pem")
    }

    /// SHA-256 of the operator certificate, if this PKI has one (PKIs made before the
    /// control plane existed do not: delete `pki/` to have it made again).
    pub fn operator_fingerprint(&self) -> Option<[u8; 32]> {
        let cert = CertificateDer::from_pem_file(self.operator_cert()).ok()?;
        Some(sha256(&cert))
    }

    /// Creates the PKI under `data_dir/pki` unless it is already there, and returns it.
    pub fn ensure(data_dir: &Path) -> Result<DevPki, String> {
        let pki = DevPki {
            dir: data_dir.join("pki"),
        };
        if pki.ca_cert().exists() {
            return Ok(pki);
        }
        fs::create_dir_all(&pki.dir).map_err(|e| format!("creating {}: {e}", pki.dir.display()))?;
        pki.generate().map_err(|e| {
            format!(
                "generating the development PKI in {}: {e}",
                pki.dir.display()
            )
        })?;
        Ok(pki)
    }

    fn generate(&self) -> Result<(), String> {
        let (ca, ca_pem) = DevCa::generate(CA_NAME)?;
        // Kept (0600) so that more development identities can be issued later
        // (`DevPki::issue_client`); a real deployment's CA key never sits on the relay.
        self.write("ca.key", ca.key_pem().as_bytes())?;
        let server = ca.issue_server()?;
        self.write("ca.pem", ca_pem.as_bytes())?;
        self.write("relay.pem", server.cert_pem.as_bytes())?;
        self.write("relay.key", server.key_pem.as_bytes())?;
        let operator = ca.issue_client("relay operator")?;
        self.write("operator.pem", operator.cert_pem.as_bytes())?;
        self.write("operator.key", operator.key_pem.as_bytes())?;
        for network in RELAY_DEV_NETWORKS {
            let stem = network.stem;
            let client = ca.issue_client(network.name)?;
            self.write(&format!("{stem}.pem"), client.cert_pem.as_bytes())?;
            self.write(&format!("{stem}.key"), client.key_pem.as_bytes())?;
            let token_key = devkit::pki::token_key()?;
            self.write(&format!("{stem}-token.pk8"), &token_key)?;
        }
        Ok(())
    }

    /// The two networks of the development PKI, with their certificate fingerprints and
    /// token keys read from the files.
    pub fn networks(&self) -> Result<Vec<NetworkEntry>, String> {
        RELAY_DEV_NETWORKS
            .iter()
            .map(|network| {
                let stem = network.stem;
                let cert_path = self.dir.join(format!("{stem}.pem"));
                let cert = CertificateDer::from_pem_file(&cert_path)
                    .map_err(|e| format!("{}: {e}", cert_path.display()))?;
                let token_path = self.dir.join(format!("{stem}-token.pk8"));
                let pkcs8 =
                    fs::read(&token_path).map_err(|e| format!("{}: {e}", token_path.display()))?;
                let public = devkit::pki::token_public_key(&pkcs8)
                    .map_err(|e| format!("{}: {e}", token_path.display()))?;
                Ok(NetworkEntry {
                    id: NetworkId(network.id),
                    name: network.name.to_string(),
                    server_roles: vec![if network.gatekeeper {
                        Role::GatekeeperServer
                    } else {
                        Role::PartnerServer
                    }],
                    cert_sha256: vec![sha256(&cert)],
                    token_public_key: Some(public),
                    client_ca_der: Vec::new(),
                })
            })
            .collect()
    }

    /// Issues a client certificate named `name` from the development CA: (certificate PEM,
    /// key PEM). For development and tests that register more networks.
    pub fn issue_client(&self, name: &str) -> Result<(String, String), String> {
        let ca_key_path = self.dir.join("ca.key");
        let pem = fs::read_to_string(&ca_key_path)
            .map_err(|e| format!("{}: {e}", ca_key_path.display()))?;
        let ca = DevCa::from_key_pem(CA_NAME, &pem)
            .map_err(|e| format!("{}: {e}", ca_key_path.display()))?;
        let issued = ca.issue_client(name)?;
        Ok((issued.cert_pem, issued.key_pem))
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), String> {
        let path = self.dir.join(name);
        write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))
    }
}

fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    fs::write(path, bytes)?;
    // Keys are secrets even in development.
    #[cfg(unix)]
    if path.extension().is_some_and(|e| e == "key" || e == "pk8") {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}
