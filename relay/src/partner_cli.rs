//! `relay partner ...`: the operator's commands for the partner registry. Each is one call to
//! the control API of a running relay, with the operator's client certificate (by default
//! the development PKI's, under `--data-dir`). Prints the answer as JSON; exits 1 with the
//! error's code and message when the relay refuses.

use std::net::SocketAddr;
use std::path::PathBuf;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use clap::{Args, Subcommand, ValueEnum};
use client::ClientTls;
use client::control::ControlClient;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};

#[derive(Debug, Args)]
pub struct PartnerArgs {
    #[command(subcommand)]
    action: Action,
    /// The relay's HTTP port.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:7780",
        global = true
    )]
    api: SocketAddr,
    /// Where the development PKI is (its operator certificate, key and CA are used unless
    /// --cert/--key/--ca say otherwise).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "./relay-data",
        global = true
    )]
    data_dir: PathBuf,
    /// The operator's client certificate (PEM).
    #[arg(long, value_name = "FILE", global = true)]
    cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE", global = true)]
    key: Option<PathBuf>,
    /// The CA that signed the relay's certificate (PEM).
    #[arg(long, value_name = "FILE", global = true)]
    ca: Option<PathBuf>,
    /// The name the relay's certificate is issued for.
    #[arg(long, value_name = "NAME", default_value = "localhost", global = true)]
    server_name: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ArchitectureArg {
    Proxy,
    Direct,
    Both,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StatusArg {
    Testing,
    Active,
    Suspended,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum GroundArg {
    Integrity,
    Security,
    Privacy,
    PartnerRequest,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Every registered network, the gatekeeper included.
    List,
    /// One network's registration and status history.
    Show { id: u32 },
    /// Register a partner network (it starts in `testing` unless --status says otherwise).
    Add {
        #[arg(long)]
        id: u32,
        #[arg(long)]
        name: String,
        /// SHA-256 (hex) of a client certificate that speaks for it; repeatable.
        #[arg(long = "cert-sha256", value_name = "HEX")]
        cert_sha256: Vec<String>,
        /// A client certificate (PEM) that speaks for it; repeatable.
        #[arg(long = "cert-file", value_name = "FILE")]
        cert_file: Vec<PathBuf>,
        /// Its CA certificate (PEM): every client certificate it issued speaks for it.
        #[arg(long = "ca-file", value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// Its Ed25519 public key (base64) for device tokens and consent records.
        #[arg(long, value_name = "BASE64")]
        token_key: Option<String>,
        /// Its Ed25519 key as PKCS#8 (the public half is taken).
        #[arg(long, value_name = "FILE")]
        token_key_file: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "proxy")]
        architecture: ArchitectureArg,
        #[arg(long, value_enum, default_value = "testing")]
        status: StatusArg,
        /// Identifiers it may look up per minute.
        #[arg(long, default_value_t = 60_000)]
        discovery_per_min: u32,
        /// Frames it may send across networks per second (0: no limit).
        #[arg(long, default_value_t = 0)]
        messages_per_s: u32,
        #[command(flatten)]
        caps: CapArgs,
        #[arg(long)]
        reason: String,
    },
    /// Change a network's limits and caps; what is not given stays as it is.
    Limits {
        id: u32,
        /// Identifiers it may look up per minute.
        #[arg(long)]
        discovery_per_min: Option<u32>,
        /// Frames it may send across networks per second (0: no limit).
        #[arg(long)]
        messages_per_s: Option<u32>,
        #[command(flatten)]
        caps: CapArgs,
    },
    /// Change a network's status; a suspension needs a statutory ground.
    Status {
        id: u32,
        #[arg(long, value_enum)]
        to: StatusArg,
        #[arg(long)]
        reason: String,
        #[arg(long, value_enum)]
        ground: Option<GroundArg>,
    },
}

/// A network's caps on the relay; one left out is the relay's default (`[limits]`).
#[derive(Debug, Args)]
struct CapArgs {
    /// Its users the relay holds at most (`NETWORK_USER_LIMIT` past it).
    #[arg(long)]
    users_max: Option<u64>,
    /// Its users' devices at most (`NETWORK_DEVICE_LIMIT`).
    #[arg(long)]
    devices_max: Option<u64>,
    /// Its device-set changes per second (`DEVICE_SET_RATE_LIMITED`).
    #[arg(long)]
    device_set_changes_per_s: Option<u32>,
}

impl CapArgs {
    /// Sets the caps given into a `limits` object.
    fn apply(&self, limits: &mut Value) {
        if let Some(n) = self.users_max {
            limits["users_max"] = json!(n);
        }
        if let Some(n) = self.devices_max {
            limits["devices_max"] = json!(n);
        }
        if let Some(n) = self.device_set_changes_per_s {
            limits["device_set_changes_per_s"] = json!(n);
        }
    }
}

fn name_of<T: ValueEnum>(value: T) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().replace('-', "_"))
        .unwrap_or_default()
}

pub fn run(args: PartnerArgs) -> Result<(), String> {
    let pki = args.data_dir.join("pki");
    let cert = args
        .cert
        .clone()
        .unwrap_or_else(|| pki.join("operator.pem"));
    let key = args.key.clone().unwrap_or_else(|| pki.join("operator.key"));
    let ca = args.ca.clone().unwrap_or_else(|| pki.join("ca.pem"));
    let tls = ClientTls::from_pem_files(&ca, Some((&cert, &key))).map_err(|e| e.to_string())?;
    let client = ControlClient::new(args.api, tls, &args.server_name).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (method, path, body) = match args.action {
        Action::List => ("GET", "/v1/partners".to_string(), None),
        Action::Show { id } => ("GET", format!("/v1/partners/{id}"), None),
        Action::Add {
            id,
            name,
            mut cert_sha256,
            cert_file,
            ca_file,
            token_key,
            token_key_file,
            architecture,
            status,
            discovery_per_min,
            messages_per_s,
            caps,
            reason,
        } => {
            for file in cert_file {
                let cert = CertificateDer::from_pem_file(&file)
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                cert_sha256.push(devkit::hex::fingerprint_hex(&cert));
            }
            let token_key = match (token_key, token_key_file) {
                (Some(key), _) => Some(key),
                (None, Some(file)) => {
                    let pkcs8 =
                        std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
                    let public = client::network_public_key(&pkcs8).map_err(|e| e.to_string())?;
                    Some(BASE64.encode(public))
                }
                (None, None) => None,
            };
            let ca_pem = match ca_file {
                Some(file) => Some(
                    std::fs::read_to_string(&file)
                        .map_err(|e| format!("{}: {e}", file.display()))?,
                ),
                None => None,
            };
            let body = json!({
                "id": id,
                "name": name,
                "cert_sha256": cert_sha256,
                "ca_pem": ca_pem,
                "token_public_key": token_key,
                "architecture": name_of(architecture),
                "status": name_of(status),
                "limits": {"discovery_per_min": discovery_per_min, "messages_per_s": messages_per_s},
                "reason": reason,
            });
            let mut body = body;
            caps.apply(&mut body["limits"]);
            ("POST", "/v1/partners".to_string(), Some(body))
        }
        Action::Limits {
            id,
            discovery_per_min,
            messages_per_s,
            caps,
        } => {
            // What is not given stays: the record's limits, read first, are the base.
            let path = format!("/v1/partners/{id}");
            let current = runtime
                .block_on(client.call("GET", &path, None))
                .map_err(|e| format!("{}: {e}", args.api))?;
            if !current.is_success() {
                return Err(format!("HTTP {}: {}", current.status, current.body));
            }
            let mut limits = current.body["limits"].clone();
            if let Some(n) = discovery_per_min {
                limits["discovery_per_min"] = json!(n);
            }
            if let Some(n) = messages_per_s {
                limits["messages_per_s"] = json!(n);
            }
            caps.apply(&mut limits);
            ("PUT", format!("{path}/limits"), Some(limits))
        }
        Action::Status {
            id,
            to,
            reason,
            ground,
        } => {
            let body = json!({
                "status": name_of(to),
                "reason": reason,
                "ground": ground.map(name_of),
            });
            ("POST", format!("/v1/partners/{id}/status"), Some(body))
        }
    };

    let response = runtime
        .block_on(client.call(method, &path, body.as_ref()))
        .map_err(|e| format!("{}: {e}", args.api))?;
    let text = serde_json::to_string_pretty(&response.body).unwrap_or_default();
    if response.is_success() {
        println!("{text}");
        Ok(())
    } else {
        let code = response.error_code().unwrap_or(0);
        let message = response
            .body
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or("");
        let name = response
            .body
            .pointer("/error/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        Err(format!(
            "HTTP {}: {code} {name}: {message}",
            response.status
        ))
    }
}
