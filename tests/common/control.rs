//! The control-plane harness: a whole relay node (`relay::server::Server`: control plane,
//! cores, HTTP port) started in-process with the interop rules enforced, API clients for the
//! operator, each network and strangers, and helpers that enlist users the way a network
//! would (a consent record signed with the network's key).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use client::control::{ApiResponse, ControlClient, identifier_hash, sign_consent, user_hex};
use client::{ClientTls, Role, UserAddress, connect};
use relay::config::Config;
use relay::server::Server;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};

use super::{GATEKEEPER, PARTNER, RELAYS, STEP_TIMEOUT, Session, now_ms};

/// Whose certificate a control-API call carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    Operator,
    Gatekeeper,
    Partner,
    /// TLS without a client certificate.
    Anonymous,
}

/// How to enlist a user.
#[derive(Debug, Clone)]
pub struct Enlist {
    pub model: &'static str,
    pub discoverable: bool,
    pub devices: Vec<u32>,
    pub identifiers: Vec<(&'static str, String)>,
    pub test: bool,
    /// Where the user was seen, and how long ago (ms); `None`: no attestation.
    pub location: Option<(&'static str, u64)>,
}

impl Default for Enlist {
    fn default() -> Enlist {
        Enlist {
            model: "everyone",
            discoverable: true,
            devices: vec![1],
            identifiers: Vec::new(),
            test: false,
            location: Some(("DE", 0)),
        }
    }
}

pub struct ControlRelay {
    server: Option<Server>,
    pub dir: PathBuf,
    pub addr: SocketAddr,
    pub http: SocketAddr,
}

impl ControlRelay {
    pub fn start(name: &str) -> ControlRelay {
        ControlRelay::start_configured(name, |_| {})
    }

    pub fn start_configured(name: &str, configure: impl FnOnce(&mut Config)) -> ControlRelay {
        let n = RELAYS.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "a7-relay-control-{}-{n}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the relay's data dir");
        let mut config = Config::embedded();
        config.data_dir = dir.clone();
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.cores = 2;
        configure(&mut config);
        let server = Server::start(&config).expect("relay node starts");
        ControlRelay {
            addr: server.relay.listen,
            http: server.http.addr,
            server: Some(server),
            dir,
        }
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("the relay runs")
    }

    /// Stops the node and starts it again on the same data directory (new ports).
    pub fn restart(&mut self, configure: impl FnOnce(&mut Config)) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
        let mut config = Config::embedded();
        config.data_dir = self.dir.clone();
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.cores = 2;
        configure(&mut config);
        let server = Server::start(&config).expect("relay node restarts");
        self.addr = server.relay.listen;
        self.http = server.http.addr;
        self.server = Some(server);
    }

    pub fn pki(&self, file: &str) -> PathBuf {
        self.dir.join("pki").join(file)
    }

    pub fn tls(&self, stem: Option<&str>) -> ClientTls {
        let identity = stem.map(|s| (self.pki(&format!("{s}.pem")), self.pki(&format!("{s}.key"))));
        ClientTls::from_pem_files(
            &self.pki("ca.pem"),
            identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        )
        .expect("client TLS from the dev PKI")
    }

    pub fn api(&self, who: Who) -> ControlClient {
        let stem = match who {
            Who::Operator => Some("operator"),
            Who::Gatekeeper => Some("gatekeeper"),
            Who::Partner => Some("partner"),
            Who::Anonymous => None,
        };
        ControlClient::new(self.http, self.tls(stem), "localhost").expect("control client")
    }

    /// The API as the network `user` belongs to (1 gatekeeper, 2 partner).
    pub fn api_of(&self, user: &UserAddress) -> ControlClient {
        self.api(who_of(user))
    }

    pub fn network_key(&self, user: &UserAddress) -> Vec<u8> {
        let stem = match who_of(user) {
            Who::Gatekeeper => "gatekeeper",
            _ => "partner",
        };
        std::fs::read(self.pki(&format!("{stem}-token.pk8"))).expect("network key")
    }

    /// A consent record for `user`, signed now with its network's key.
    pub fn consent(&self, user: &UserAddress, model: &str, discoverable: bool) -> Value {
        let at = now_ms();
        let signature = sign_consent(&self.network_key(user), user, at, model, discoverable)
            .expect("sign consent");
        json!({"opted_in_at_ms": at, "model": model, "discoverable": discoverable, "signature": signature})
    }

    /// Enlists `user` as its network would; the answer as it came.
    pub async fn try_enlist(&self, user: &UserAddress, how: &Enlist) -> ApiResponse {
        let identifiers: Vec<Value> = how
            .identifiers
            .iter()
            .map(|(kind, value)| json!({"type": kind, "value": value}))
            .collect();
        let mut body = json!({
            "consent": self.consent(user, how.model, how.discoverable),
            "identifiers": identifiers,
            "devices": how.devices,
            "test": how.test,
        });
        if let Some((country, ago_ms)) = how.location {
            body["location"] = json!({"country": country, "observed_at_ms": now_ms() - ago_ms});
        }
        self.api_of(user)
            .put(&user_path(user), &body)
            .await
            .expect("enlist call")
    }

    /// Enlists `user` and fails the test unless it succeeds.
    pub async fn enlist(&self, user: &UserAddress, how: &Enlist) -> Value {
        let response = self.try_enlist(user, how).await;
        assert!(
            response.is_success(),
            "enlisting {user}: HTTP {} {}",
            response.status,
            response.body
        );
        response.body
    }

    /// A data-plane server session of `network`.
    pub async fn session(&self, network: client::NetworkId) -> Session {
        let (stem, role) = if network == GATEKEEPER {
            ("gatekeeper", Role::GatekeeperServer)
        } else if network == PARTNER {
            ("partner", Role::PartnerServer)
        } else {
            panic!("the dev PKI has no network {network}")
        };
        let options = client::ConnectOptions::new(self.addr, self.tls(Some(stem)), role)
            .agent("relay-control-e2e/1")
            .connect_timeout(STEP_TIMEOUT);
        let conn = connect(options)
            .await
            .unwrap_or_else(|e| panic!("server of network {network} connects: {e}"));
        Session::new(format!("server{}", network.0), conn)
    }

    /// The node's policy table (what the data plane enforces).
    pub fn policy(&self) -> &relay::tables::policy::Policy {
        &self.server().relay.shared.policy
    }

    /// The node's `/metrics` text over plain HTTP.
    pub async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.http)
            .await
            .expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: relay\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut text = String::new();
        stream.read_to_string(&mut text).await.expect("read");
        text
    }
}

impl Drop for ControlRelay {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn who_of(user: &UserAddress) -> Who {
    if user.network == GATEKEEPER {
        Who::Gatekeeper
    } else {
        Who::Partner
    }
}

pub fn user_path(user: &UserAddress) -> String {
    format!("/v1/users/{}/{}", user.network.0, user_hex(user))
}

/// The discovery hash of an identifier in normal form.
pub fn hash_of(kind: &str, value: &str) -> String {
    identifier_hash(kind, value)
}

/// Asserts an error answer: its HTTP status and protocol code.
#[track_caller]
pub fn assert_error(response: &ApiResponse, status: u16, code: client::ErrorCode) {
    assert_eq!(
        (response.status, response.error_code()),
        (status, Some(code.as_u16())),
        "expected HTTP {status} {} ({}), got {}",
        code.name(),
        code.as_u16(),
        response.body
    );
    let message = response
        .body
        .pointer("/error/message")
        .and_then(Value::as_str)
        .unwrap_or("");
    assert!(
        !message.is_empty(),
        "an error names its cause: {}",
        response.body
    );
}

/// Asserts a success answer and returns its body.
#[track_caller]
pub fn ok(response: ApiResponse) -> Value {
    assert!(
        response.is_success(),
        "expected success, got HTTP {} {}",
        response.status,
        response.body
    );
    response.body
}

/// A network registered during a test: its certificate, fingerprint and Ed25519 key.
pub struct ExtraNetwork {
    pub id: client::NetworkId,
    pub tls: ClientTls,
    pub fingerprint: String,
    pub key_pkcs8: Vec<u8>,
}

impl ControlRelay {
    /// Issues a client certificate and an Ed25519 key for network `id` from the dev PKI;
    /// does not register it.
    pub fn new_network(&self, id: u32) -> ExtraNetwork {
        let pki = relay::pki::DevPki {
            dir: self.dir.join("pki"),
        };
        let (cert_pem, key_pem) = pki
            .issue_client(&format!("network-{id}"))
            .expect("issue cert");
        let ca = std::fs::read(self.pki("ca.pem")).expect("ca");
        let tls = ClientTls::from_pem(&ca, Some((cert_pem.as_bytes(), key_pem.as_bytes())))
            .expect("client TLS");
        let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .expect("cert der");
        ExtraNetwork {
            id: client::NetworkId(id),
            tls,
            fingerprint: devkit::hex::fingerprint_hex(&der),
            key_pkcs8: client::generate_network_key(),
        }
    }

    /// The registration body for `network` (proxy, with its key for consent records).
    pub fn partner_body(&self, network: &ExtraNetwork, status: &str) -> Value {
        use base64::Engine as _;
        let public = client::network_public_key(&network.key_pkcs8).expect("public key");
        json!({
            "id": network.id.0,
            "name": format!("partner-{}", network.id.0),
            "cert_sha256": [network.fingerprint],
            "token_public_key": base64::engine::general_purpose::STANDARD.encode(public),
            "architecture": "proxy",
            "status": status,
            "reason": "interoperability agreement signed",
        })
    }

    /// An API client with `network`'s certificate.
    pub fn api_as(&self, network: &ExtraNetwork) -> ControlClient {
        ControlClient::new(self.http, network.tls.clone(), "localhost").expect("control client")
    }

    /// A data-plane server session of `network`.
    pub async fn session_as(&self, network: &ExtraNetwork) -> Result<Session, client::ClientError> {
        let options =
            client::ConnectOptions::new(self.addr, network.tls.clone(), Role::PartnerServer)
                .agent("relay-control-e2e/1")
                .connect_timeout(STEP_TIMEOUT);
        Ok(Session::new(
            format!("server{}", network.id.0),
            connect(options).await?,
        ))
    }

    /// Enlists a user of an extra network with a consent signed by its key.
    pub async fn enlist_as(
        &self,
        network: &ExtraNetwork,
        user: &UserAddress,
        test: bool,
    ) -> ApiResponse {
        let at = now_ms();
        let signature = sign_consent(&network.key_pkcs8, user, at, "everyone", true).expect("sign");
        let body = json!({
            "consent": {"opted_in_at_ms": at, "model": "everyone", "discoverable": true, "signature": signature},
            "devices": [1],
            "test": test,
            "location": {"country": "FR", "observed_at_ms": at},
        });
        self.api_as(network)
            .put(&user_path(user), &body)
            .await
            .expect("enlist call")
    }
}

/// Polls `GET /v1/requests?state=pending` as `who` until `pred` finds one (requests are
/// stored asynchronously), and returns it.
pub async fn wait_request(api: &ControlClient, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    loop {
        let list = ok(api
            .get("/v1/requests?state=pending")
            .await
            .expect("requests"));
        if let Some(found) = list["requests"]
            .as_array()
            .and_then(|r| r.iter().find(|r| pred(r)))
        {
            return found.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no such request: {list}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The `GET /v1/events?after=0` feed of `api`'s network.
pub async fn events(api: &ControlClient) -> Vec<Value> {
    let body = ok(api.get("/v1/events?after=0").await.expect("events"));
    body["events"].as_array().cloned().unwrap_or_default()
}
