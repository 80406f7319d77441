//! A client for the relay's control API (`/v1/...` on its HTTP port, TLS 1.3 with a client
//! certificate): JSON in, JSON out, each call on its own connection. Also what a network
//! needs to produce for it: consent signatures and identifier hashes.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use ring::signature::Ed25519KeyPair;
use rustls_pki_types::ServerName;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::{ClientError, ClientTls, UserAddress};

/// How long one call may take, connection included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A control-API answer: the HTTP status, the JSON body (`Null` when empty or not JSON),
/// and `Retry-After` in seconds if present.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Value,
    pub retry_after_s: Option<u64>,
}

impl ApiResponse {
    /// The protocol error code of an error answer (`{"error": {"code": ...}}`).
    pub fn error_code(&self) -> Option<u16> {
        self.body
            .pointer("/error/code")
            .and_then(Value::as_u64)
            .and_then(|c| u16::try_from(c).ok())
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

#[derive(Clone, Debug)]
pub struct ControlClient {
    addr: SocketAddr,
    tls: ClientTls,
    server_name: ServerName<'static>,
}

impl ControlClient {
    /// A client for the API at `addr` (the relay's HTTP port), authenticating with `tls`'s
    /// client certificate; the relay's certificate must name `server_name`.
    pub fn new(
        addr: SocketAddr,
        tls: ClientTls,
        server_name: &str,
    ) -> Result<ControlClient, ClientError> {
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| ClientError::Config(format!("server name {server_name:?}: {e}")))?;
        Ok(ControlClient {
            addr,
            tls,
            server_name,
        })
    }

    pub async fn get(&self, path: &str) -> Result<ApiResponse, ClientError> {
        self.call("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<ApiResponse, ClientError> {
        self.call("POST", path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Result<ApiResponse, ClientError> {
        self.call("PUT", path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<ApiResponse, ClientError> {
        self.call("DELETE", path, None).await
    }

    /// One request with a JSON body (or none).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<ApiResponse, ClientError> {
        let bytes = match body {
            Some(value) => Bytes::from(
                serde_json::to_vec(value).map_err(|e| ClientError::Config(e.to_string()))?,
            ),
            None => Bytes::new(),
        };
        self.call_raw(method, path, bytes).await
    }

    /// One request with the body exactly as given (for malformed-input tests and tools).
    pub async fn call_raw(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> Result<ApiResponse, ClientError> {
        tokio::time::timeout(CALL_TIMEOUT, self.exchange(method, path, body))
            .await
            .map_err(|_| ClientError::Timeout(CALL_TIMEOUT))?
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> Result<ApiResponse, ClientError> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(ClientError::Io)?;
        let _ = tcp.set_nodelay(true);
        let tls = TlsConnector::from(self.tls.config().clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(ClientError::from_io)?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ClientError::Http(format!("handshake: {e}")))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "relay")
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| ClientError::Http(format!("request: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let status = response.status().as_u16();
        let retry_after_s = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let collected = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(format!("body: {e}")))?
            .to_bytes();
        let body = serde_json::from_slice(&collected).unwrap_or(Value::Null);
        Ok(ApiResponse {
            status,
            body,
            retry_after_s,
        })
    }
}

/// Signs a user's opt-in with the network's Ed25519 key (PKCS#8), as the relay's
/// enlistment checks it (`codec::consent`). Returns the signature in base64.
pub fn sign_consent(
    network_key_pkcs8: &[u8],
    user: &UserAddress,
    opted_in_at_ms: u64,
    model: &str,
    discoverable: bool,
) -> Result<String, ClientError> {
    let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(network_key_pkcs8)
        .map_err(|_| ClientError::Config("not an Ed25519 PKCS#8 key".into()))?;
    let message = codec::consent::signed_bytes(user, opted_in_at_ms, model, discoverable);
    Ok(BASE64.encode(key.sign(&message).as_ref()))
}

/// The hash discovery takes for an identifier already in its normal form (`phone`
/// `+491701234567`, `email` lower-case, `username` lower-case): SHA-256 of `type:value`,
/// hex.
pub fn identifier_hash(kind: &str, normal_value: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{kind}:{normal_value}").as_bytes(),
    );
    hex(digest.as_ref())
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The API's spelling of a user id: 32 hex digits.
pub fn user_hex(user: &UserAddress) -> String {
    format!("{:032x}", user.user.0)
}
