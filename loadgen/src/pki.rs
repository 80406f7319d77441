//! Identities for a run: a CA, the relay's server certificate, one client certificate and one
//! Ed25519 device-token key per network, and the relay configuration (TOML) that lists the
//! networks by certificate fingerprint and token public key. `--spawn` generates them for
//! as many partners as asked; `loadgen pki` writes them for a relay started by hand;
//! `--pki DIR` reads them back (or the relay's own two-network development PKI).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use client::ClientTls;
use devkit::hex::fingerprint_hex;
use devkit::pki::{DevCa, RELAY_DEV_NETWORKS, token_key, token_public_key};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

/// One network's credentials.
#[derive(Debug, Clone)]
pub struct NetworkIdentity {
    pub id: u32,
    pub name: String,
    /// `Some("gatekeeper_server" | "partner_server")` when its servers connect; `None` for a
    /// network whose devices only connect directly.
    pub server_role: Option<String>,
    pub cert_pem: Option<String>,
    pub key_pem: Option<String>,
    pub token_key_pkcs8: Vec<u8>,
}

/// Everything a run needs to authenticate.
#[derive(Debug, Clone)]
pub struct Identities {
    pub ca_pem: String,
    pub networks: Vec<NetworkIdentity>,
    /// The name the relay's certificate carries.
    pub server_name: String,
}

/// What `generate` asks for, per network.
#[derive(Debug, Clone)]
pub struct NetworkRequest {
    pub id: u32,
    pub name: String,
    pub server_role: Option<&'static str>,
}

/// The manifest `loadgen pki` writes next to the files.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    server_name: String,
    networks: Vec<ManifestNetwork>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ManifestNetwork {
    id: u32,
    name: String,
    server_role: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    token_key: String,
}

/// The generated server side: certificate and key, PEM.
#[derive(Debug, Clone)]
pub struct ServerIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Identities {
    /// A fresh CA, server certificate (for `localhost` and 127.0.0.1) and per-network
    /// identities.
    pub fn generate(networks: &[NetworkRequest]) -> Result<(Identities, ServerIdentity), String> {
        let (ca, ca_pem) = DevCa::generate("loadgen CA")?;
        let server = ca.issue_server()?;
        let mut identities = Vec::new();
        for request in networks {
            let (cert_pem, key_pem) = if request.server_role.is_some() {
                let issued = ca.issue_client(&request.name)?;
                (Some(issued.cert_pem), Some(issued.key_pem))
            } else {
                (None, None)
            };
            identities.push(NetworkIdentity {
                id: request.id,
                name: request.name.clone(),
                server_role: request.server_role.map(str::to_string),
                cert_pem,
                key_pem,
                token_key_pkcs8: token_key()?,
            });
        }
        Ok((
            Identities {
                ca_pem,
                networks: identities,
                server_name: "localhost".to_string(),
            },
            ServerIdentity {
                cert_pem: server.cert_pem,
                key_pem: server.key_pem,
            },
        ))
    }

    /// Writes the PKI and a relay configuration into `dir`; returns the config's path.
    /// `limits` lines (`key = value`) go into its `[limits]` table.
    pub fn write(
        &self,
        server: &ServerIdentity,
        dir: &Path,
        data_dir: &Path,
        limits: &[String],
    ) -> Result<PathBuf, String> {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.join(name);
            fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))
        };
        write("ca.pem", self.ca_pem.as_bytes())?;
        write("relay.pem", server.cert_pem.as_bytes())?;
        write("relay.key", server.key_pem.as_bytes())?;
        let mut manifest = Manifest {
            server_name: self.server_name.clone(),
            networks: Vec::new(),
        };
        let mut toml = String::new();
        let _ = writeln!(
            toml,
            "# Written by loadgen: {} networks.",
            self.networks.len()
        );
        let _ = writeln!(toml, "data_dir = {:?}", data_dir.display().to_string());
        let _ = writeln!(toml, "\n[tls]");
        let _ = writeln!(
            toml,
            "server_cert = {:?}",
            dir.join("relay.pem").display().to_string()
        );
        let _ = writeln!(
            toml,
            "server_key = {:?}",
            dir.join("relay.key").display().to_string()
        );
        let _ = writeln!(
            toml,
            "client_ca = [{:?}]",
            dir.join("ca.pem").display().to_string()
        );
        if !limits.is_empty() {
            let _ = writeln!(toml, "\n[limits]");
            for line in limits {
                let _ = writeln!(toml, "{line}");
            }
        }
        for network in &self.networks {
            let stem = format!("network-{}", network.id);
            let token_name = format!("{stem}-token.pk8");
            write(&token_name, &network.token_key_pkcs8)?;
            let public = token_public_key(&network.token_key_pkcs8)?;
            let _ = writeln!(toml, "\n[[networks]]");
            let _ = writeln!(toml, "id = {}", network.id);
            let _ = writeln!(toml, "name = {:?}", network.name);
            let (mut cert_name, mut key_name) = (None, None);
            if let (Some(role), Some(cert), Some(key)) =
                (&network.server_role, &network.cert_pem, &network.key_pem)
            {
                let c = format!("{stem}.pem");
                let k = format!("{stem}.key");
                write(&c, cert.as_bytes())?;
                write(&k, key.as_bytes())?;
                let der = CertificateDer::from_pem_slice(cert.as_bytes()).map_err(err)?;
                let _ = writeln!(toml, "server_roles = [{role:?}]");
                let _ = writeln!(toml, "client_cert_sha256 = [{:?}]", fingerprint_hex(&der));
                cert_name = Some(c);
                key_name = Some(k);
            }
            let _ = writeln!(toml, "token_public_key = {:?}", devkit::hex::hex(&public));
            manifest.networks.push(ManifestNetwork {
                id: network.id,
                name: network.name.clone(),
                server_role: network.server_role.clone(),
                cert: cert_name,
                key: key_name,
                token_key: token_name,
            });
        }
        let manifest = serde_json::to_string_pretty(&manifest).map_err(err)?;
        write("identities.json", manifest.as_bytes())?;
        write("relay.toml", toml.as_bytes())?;
        Ok(dir.join("relay.toml"))
    }

    /// Reads identities written by [`Identities::write`], or a relay's development PKI
    /// (`gatekeeper.pem`, `partner.pem`, ...: networks 1 and 2).
    pub fn load(dir: &Path) -> Result<Identities, String> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))
        };
        let text = |name: &str| read(name).map(|b| String::from_utf8_lossy(&b).into_owned());
        let ca_pem = text("ca.pem")?;
        if dir.join("identities.json").exists() {
            let manifest: Manifest =
                serde_json::from_slice(&read("identities.json")?).map_err(err)?;
            let mut networks = Vec::new();
            for n in manifest.networks {
                networks.push(NetworkIdentity {
                    id: n.id,
                    name: n.name,
                    server_role: n.server_role,
                    cert_pem: n.cert.as_deref().map(text).transpose()?,
                    key_pem: n.key.as_deref().map(text).transpose()?,
                    token_key_pkcs8: read(&n.token_key)?,
                });
            }
            return Ok(Identities {
                ca_pem,
                networks,
                server_name: manifest.server_name,
            });
        }
        let networks = RELAY_DEV_NETWORKS
            .iter()
            .map(|network| {
                let stem = network.stem;
                Ok(NetworkIdentity {
                    id: network.id,
                    name: network.name.to_string(),
                    server_role: Some(network.server_role().to_string()),
                    cert_pem: Some(text(&format!("{stem}.pem"))?),
                    key_pem: Some(text(&format!("{stem}.key"))?),
                    token_key_pkcs8: read(&format!("{stem}-token.pk8"))?,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Identities {
            ca_pem,
            networks,
            server_name: "localhost".to_string(),
        })
    }

    pub fn network(&self, id: u32) -> Result<&NetworkIdentity, String> {
        self.networks.iter().find(|n| n.id == id).ok_or_else(|| {
            format!(
                "no identity for network {id} (have {})",
                self.networks.len()
            )
        })
    }

    /// TLS for a server session of `network`.
    pub fn server_tls(&self, network: u32) -> Result<ClientTls, String> {
        let n = self.network(network)?;
        let (Some(cert), Some(key)) = (&n.cert_pem, &n.key_pem) else {
            return Err(format!("network {network} has no server certificate"));
        };
        ClientTls::from_pem(
            self.ca_pem.as_bytes(),
            Some((cert.as_bytes(), key.as_bytes())),
        )
        .map_err(err)
    }

    /// TLS for a device session (no client certificate: the token authenticates).
    pub fn device_tls(&self) -> Result<ClientTls, String> {
        ClientTls::from_pem(self.ca_pem.as_bytes(), None).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_identities_write_and_load_back() {
        let dir = std::env::temp_dir().join(format!("loadgen-pki-test-{}", std::process::id()));
        let requests = [
            NetworkRequest {
                id: 1,
                name: "gatekeeper".into(),
                server_role: Some("gatekeeper_server"),
            },
            NetworkRequest {
                id: 2,
                name: "partner-2".into(),
                server_role: Some("partner_server"),
            },
            NetworkRequest {
                id: 3,
                name: "devices-only".into(),
                server_role: None,
            },
        ];
        let (ids, server) = Identities::generate(&requests).unwrap();
        let config = ids
            .write(
                &server,
                &dir,
                &dir.join("data"),
                &["devices_per_user_max = 5".into()],
            )
            .unwrap();
        let toml = fs::read_to_string(&config).unwrap();
        assert_eq!(toml.matches("[[networks]]").count(), 3);
        assert_eq!(toml.matches("client_cert_sha256").count(), 2);
        assert_eq!(toml.matches("token_public_key").count(), 3);
        assert!(toml.contains("[limits]\ndevices_per_user_max = 5"));
        let loaded = Identities::load(&dir).unwrap();
        assert_eq!(loaded.networks.len(), 3);
        assert_eq!(loaded.network(3).unwrap().cert_pem, None);
        assert!(loaded.server_tls(2).is_ok());
        assert!(loaded.server_tls(3).is_err());
        assert!(loaded.device_tls().is_ok());
        let _ = fs::remove_dir_all(&dir);
    }
}
