//! A whole relay node as `relay serve` runs it: the control plane (opened first, so the
//! policy is loaded before the first session), the data-plane cores, and the HTTP port.

use std::sync::Arc;

use crate::config::Config;
use crate::control::{ControlPlane, InteropSettings, Links};
use crate::http::{HttpContext, HttpServer};
use crate::io::inject::ShardInjector;
use crate::io::{Relay, now_ms};
use crate::tables::auth::Auth;
use crate::tables::policy::Policy;

#[derive(Debug)]
pub struct Server {
    pub relay: Relay,
    pub http: HttpServer,
    pub control: Arc<ControlPlane>,
}

impl Server {
    pub fn start(config: &Config) -> Result<Server, String> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| format!("data_dir {}: {e}", config.data_dir.display()))?;
        let (_, networks) = config.resolve_identities()?;
        let auth = Arc::new(Auth::new(
            networks.clone(),
            config.limits.token_ids_max as usize,
        )?);
        let policy = Arc::new(Policy::new(config.interop.enforce));
        if !config.interop.enforce {
            tracing::warn!(
                "interop.enforce = false: the interop rules (consent, location, partner status) are NOT enforced; for lab use only"
            );
        }
        let injector = Arc::new(ShardInjector::default());
        let control = Arc::new(
            ControlPlane::open(
                &config.data_dir,
                InteropSettings {
                    devices_per_user_max: config.limits.devices_per_user_max,
                    ..config.interop.clone()
                },
                &networks,
                config.dev_operators(),
                Links {
                    auth: auth.clone(),
                    policy: policy.clone(),
                    data_plane: injector.clone(),
                },
                now_ms(),
            )
            .map_err(|e| format!("control plane: {e}"))?,
        );
        let relay = Relay::start_with(config, auth, policy)?;
        injector.attach(relay.shared.clone());
        if let Err(e) = control.reconcile(now_ms()) {
            tracing::error!(
                "control plane: reconciling with the data plane: {}",
                e.message
            );
        }
        let shared = relay.shared.clone();
        let durability = config.durability.name();
        let limited = control.clone();
        let journal = relay.tokens.as_ref().map(|j| j.metrics.clone());
        let render = Arc::new(move || {
            let mut text = crate::metrics::render(&shared.metrics, &shared.connections, durability);
            crate::metrics::render_policy(&mut text, &shared.metrics, shared.policy.enforced());
            crate::metrics::render_rate_buckets(&mut text, &limited.rate_buckets());
            crate::metrics::render_network_caps(&mut text, shared.policy.caps());
            if let Some(journal) = &journal {
                crate::metrics::render_token_journal(&mut text, journal);
            }
            text
        });
        let context = HttpContext {
            render,
            control: Some(control.clone()),
            tls: Some(relay.shared.tls.clone()),
            limits: config.http,
        };
        let http = match HttpServer::start(config.http_listen, context) {
            Ok(http) => http,
            Err(e) => {
                relay.stop();
                return Err(e);
            }
        };
        Ok(Server {
            relay,
            http,
            control,
        })
    }

    /// Stops the HTTP port, then the cores (which flush and close their sessions).
    pub fn stop(self) {
        self.http.stop();
        self.relay.stop();
    }
}
