//! `relay serve`'s configuration: embedded defaults, or a TOML file validated at start. A bad
//! value is reported with the key it belongs to, never a panic.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use codec::{NetworkId, Role};
use devkit::hex::parse_hex32;
use serde::Deserialize;

use crate::control::InteropSettings;
use crate::core::log::Durability;
use crate::http::limits::HttpLimits;
use crate::limits::RelayLimits;
use crate::pki::DevPki;
use crate::tables::auth::NetworkEntry;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    http_listen: Option<SocketAddr>,
    cores: Option<u16>,
    durability: Option<Durability>,
    tls: Option<TlsFile>,
    #[serde(default)]
    limits: RelayLimits,
    #[serde(default)]
    networks: Vec<NetworkFile>,
    #[serde(default)]
    interop: InteropSettings,
    /// The HTTP port's bounds.
    #[serde(default)]
    http: HttpLimits,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    server_cert: PathBuf,
    server_key: PathBuf,
    /// CAs whose client certificates may connect.
    client_ca: Vec<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkFile {
    id: u32,
    name: String,
    #[serde(default)]
    server_roles: Vec<RoleName>,
    #[serde(default)]
    client_cert_sha256: Vec<String>,
    token_public_key: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RoleName {
    PartnerServer,
    GatekeeperServer,
    PeerRelay,
}

/// The server's TLS material.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_ca: Vec<PathBuf>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub http_listen: SocketAddr,
    /// Cores to run on; each owns a shard.
    pub cores: u16,
    /// How far a frame is stored before it is acknowledged.
    pub durability: Durability,
    pub limits: RelayLimits,
    /// `None`: the development PKI under `data_dir/pki`.
    pub tls: Option<TlsPaths>,
    /// `None`: the development PKI's two networks.
    pub networks: Option<Vec<NetworkEntry>>,
    /// The control plane and the interop rules.
    pub interop: InteropSettings,
    /// The HTTP port's bounds.
    pub http: HttpLimits,
}

/// The most cores (and shards) one relay runs.
pub const CORES_MAX: u16 = 256;

impl Config {
    /// The embedded defaults: data under `./relay-data`, TLS on 127.0.0.1:7700, HTTP on
    /// 127.0.0.1:7780, one core per available CPU, the development PKI.
    pub fn embedded() -> Config {
        Config::from_file(ConfigFile {
            data_dir: None,
            listen: None,
            http_listen: None,
            cores: None,
            durability: None,
            tls: None,
            limits: RelayLimits::default(),
            networks: Vec::new(),
            interop: InteropSettings::default(),
            http: HttpLimits::default(),
        })
        .unwrap_or_else(|e| unreachable!("the embedded defaults are valid: {e}"))
    }

    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let file: ConfigFile =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
        Config::from_file(file)
    }

    fn from_file(file: ConfigFile) -> Result<Config, String> {
        file.limits.validate()?;
        file.interop.validate()?;
        file.http.validate()?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let available = u16::try_from(cpus).unwrap_or(CORES_MAX).min(CORES_MAX);
        let cores = match file.cores {
            None | Some(0) => available,
            Some(n) if n > CORES_MAX => return Err(format!("cores: at most {CORES_MAX}")),
            Some(n) => n,
        };
        let tls = file.tls.map(|t| TlsPaths {
            server_cert: t.server_cert,
            server_key: t.server_key,
            client_ca: t.client_ca,
        });
        if tls.as_ref().is_some_and(|t| t.client_ca.is_empty()) {
            return Err("tls.client_ca: list at least one CA".into());
        }
        let networks = if file.networks.is_empty() {
            None
        } else {
            Some(
                file.networks
                    .into_iter()
                    .enumerate()
                    .map(|(i, n)| network_entry(i, n))
                    .collect::<Result<Vec<_>, _>>()?,
            )
        };
        if tls.is_some() != networks.is_some() {
            return Err(
                "tls and networks: configure both (your own PKI) or neither (the development PKI)"
                    .into(),
            );
        }
        Ok(Config {
            data_dir: file
                .data_dir
                .unwrap_or_else(|| PathBuf::from("./relay-data")),
            listen: file
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7700))),
            http_listen: file
                .http_listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7780))),
            cores,
            durability: file.durability.unwrap_or_default(),
            limits: file.limits,
            tls,
            networks,
            interop: file.interop,
            http: file.http,
        })
    }

    /// The TLS paths and networks in force, creating the development PKI if they come from it.
    pub fn resolve_identities(&self) -> Result<(TlsPaths, Vec<NetworkEntry>), String> {
        match (&self.tls, &self.networks) {
            (Some(tls), Some(networks)) => Ok((tls.clone(), networks.clone())),
            _ => {
                let pki = DevPki::ensure(&self.data_dir)?;
                let tls = TlsPaths {
                    server_cert: pki.server_cert(),
                    server_key: pki.server_key(),
                    client_ca: vec![pki.ca_cert()],
                };
                Ok((tls, pki.networks()?))
            }
        }
    }
}

impl Config {
    /// SHA-256 of the development PKI's operator certificate, when the PKI is in use.
    pub fn dev_operators(&self) -> Vec<[u8; 32]> {
        if self.tls.is_some() {
            return Vec::new();
        }
        DevPki {
            dir: self.data_dir.join("pki"),
        }
        .operator_fingerprint()
        .into_iter()
        .collect()
    }
}

fn network_entry(index: usize, n: NetworkFile) -> Result<NetworkEntry, String> {
    let key = |field: &str| format!("networks[{index}].{field}");
    if n.name.is_empty() {
        return Err(format!("{}: must not be empty", key("name")));
    }
    let cert_sha256 = n
        .client_cert_sha256
        .iter()
        .map(|hex| {
            parse_hex32(hex.trim()).ok_or_else(|| {
                format!(
                    "{}: {hex:?} is not 64 hex digits",
                    key("client_cert_sha256")
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let token_public_key = match &n.token_public_key {
        None => None,
        Some(hex) => Some(parse_hex32(hex.trim()).ok_or_else(|| {
            format!(
                "{}: not 64 hex digits (an Ed25519 public key)",
                key("token_public_key")
            )
        })?),
    };
    let server_roles = n
        .server_roles
        .iter()
        .map(|r| match r {
            RoleName::PartnerServer => Role::PartnerServer,
            RoleName::GatekeeperServer => Role::GatekeeperServer,
            RoleName::PeerRelay => Role::PeerRelay,
        })
        .collect::<Vec<_>>();
    if !server_roles.is_empty() && cert_sha256.is_empty() {
        return Err(format!(
            "{}: server roles need at least one client certificate",
            key("client_cert_sha256")
        ));
    }
    Ok(NetworkEntry {
        id: NetworkId(n.id),
        name: n.name,
        server_roles,
        cert_sha256,
        token_public_key,
        client_ca_der: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults() {
        let c = Config::embedded();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7700");
        assert_eq!(c.http_listen.to_string(), "127.0.0.1:7780");
        assert_eq!(c.data_dir, PathBuf::from("./relay-data"));
        assert!(c.cores >= 1);
        assert_eq!(c.limits.devices_per_user_max, 5);
        assert_eq!(c.durability, Durability::Fsync);
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, expected) in [
            ("listen = \"not an address\"", "listen"),
            ("cores = 1000", "cores"),
            (
                "[limits]\ndevices_per_user_max = 0",
                "limits.devices_per_user_max",
            ),
            (
                "[limits]\npayload_bytes_max = 999999999",
                "limits.payload_bytes_max",
            ),
            ("[limits]\nno_such_limit = 3", "no_such_limit"),
            ("colour = \"blue\"", "colour"),
            (
                "[[networks]]\nid = 1\nname = \"x\"\nclient_cert_sha256 = [\"zz\"]",
                "networks[0].client_cert_sha256",
            ),
            (
                "[[networks]]\nid = 1\nname = \"x\"\ntoken_public_key = \"12\"",
                "networks[0].token_public_key",
            ),
            (
                "[[networks]]\nid = 1\nname = \"x\"\nserver_roles = [\"emperor\"]",
                "emperor",
            ),
            (
                "[tls]\nserver_cert = \"a\"\nserver_key = \"b\"\nclient_ca = [\"c\"]",
                "tls and networks",
            ),
            ("cores = -1", "cores"),
            ("durability = \"eventually\"", "durability"),
            (
                "[limits]\nlog_segment_bytes_max = 10",
                "limits.log_segment_bytes_max",
            ),
            ("this is not toml", "expected"),
            (
                "[http]\nconnections_reserved = 0",
                "http.connections_reserved",
            ),
        ] {
            let error = Config::parse(text).unwrap_err();
            assert!(
                error.contains(expected),
                "{text:?} gave {error:?}, which does not name {expected:?}"
            );
        }
    }

    #[test]
    fn a_full_file_parses() {
        let text = r#"
            data_dir = "/var/lib/relay"
            listen = "0.0.0.0:7700"
            cores = 2
            durability = "os"
            [tls]
            server_cert = "relay.pem"
            server_key = "relay.key"
            client_ca = ["ca.pem"]
            [limits]
            devices_per_user_max = 4
            [[networks]]
            id = 1
            name = "gatekeeper"
            server_roles = ["gatekeeper_server"]
            client_cert_sha256 = ["00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"]
            [[networks]]
            id = 7
            name = "partner"
            token_public_key = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100"
        "#;
        let c = Config::parse(text).unwrap();
        assert_eq!(c.cores, 2);
        assert_eq!(c.durability, Durability::Os);
        assert_eq!(c.limits.devices_per_user_max, 4);
        let networks = c.networks.unwrap();
        assert_eq!(networks[0].server_roles, vec![Role::GatekeeperServer]);
        assert_eq!(networks[1].id, NetworkId(7));
        assert_eq!(networks[1].token_public_key.unwrap()[0], 0xff);
    }
}
