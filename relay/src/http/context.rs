//! What the HTTP port serves with ([`HttpContext`]) and how a client reached it ([`Peer`]):
//! shared by the listener (`mod.rs`) and the API routes (`api.rs`).

use std::sync::Arc;

use rustls::ServerConfig;

use crate::control::ControlPlane;

/// Renders `/metrics`.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// What the HTTP port serves.
#[derive(Clone)]
pub struct HttpContext {
    pub render: Render,
    /// `None`: no control plane (only `/metrics` and `/healthz`).
    pub control: Option<Arc<ControlPlane>>,
    /// The relay's TLS configuration (client certificates asked, not required).
    pub tls: Option<Arc<ServerConfig>>,
}

impl std::fmt::Debug for HttpContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpContext")
            .field("control", &self.control.is_some())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// How the client reached the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Plain,
    /// TLS, with the client certificate (DER) if one was presented.
    Tls(Option<Arc<[u8]>>),
}
