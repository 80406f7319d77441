//! What the HTTP port serves with ([`HttpContext`]), how a client reached it ([`Peer`],
//! [`Origin`]) and what the port's connections share ([`Guard`]): shared by the listener
//! (`mod.rs`) and the API routes (`api.rs`).

use std::sync::{Arc, Mutex};

use rustls::ServerConfig;

use super::limits::HttpLimits;
use super::metrics::HttpMetrics;
use super::sources::{Source, Sources};
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
    /// The port's bounds (`[http]` in the configuration).
    pub limits: HttpLimits,
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

/// The source a request's connection came from (a request extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin(pub Source);

/// What every connection of the port shares: its bounds, who holds it, its counters.
#[derive(Debug)]
pub struct Guard {
    pub limits: HttpLimits,
    pub sources: Arc<Mutex<Sources>>,
    pub metrics: HttpMetrics,
}

impl Guard {
    pub fn new(limits: HttpLimits) -> Guard {
        Guard {
            limits,
            sources: Arc::new(Mutex::new(Sources::new(limits))),
            metrics: HttpMetrics::default(),
        }
    }
}
