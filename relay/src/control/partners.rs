//! The partner registry: every network the relay serves (the gatekeeper too), its identity
//! (client-certificate fingerprints, device-token key), architecture, traffic limits and
//! activation status, with every status change recorded with its reason. Networks from the
//! configuration file are registered at start; the operator adds others through the API.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use codec::{ErrorCode, MessageId, NetworkId, Notice, NoticeKind, Role};
use devkit::hex::{hex, parse_hex32};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::events::{self, EventKind};
use super::store::PARTNERS;
use super::{ApiError, ApiResult, Caller, ControlPlane, require_operator};
use crate::tables::auth::NetworkEntry;
use crate::tables::caps::Caps;
use crate::tables::policy::PartnerStatus;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// How a partner connects (BEREC, chapter 3: with or without a proxy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// The partner's servers connect and speak for its users.
    Proxy,
    /// The partner's devices connect directly with device tokens.
    Direct,
    Both,
}

/// The grounds on which a network may be suspended: Article 7(9) DMA allows measures that
/// are strictly necessary and duly justified to protect the integrity, security and privacy
/// of the service; a partner may also ask for its own suspension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ground {
    Integrity,
    Security,
    Privacy,
    PartnerRequest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// From the configuration file; re-read at every start.
    Config,
    Api,
}

/// Traffic limits of one partner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrafficLimits {
    /// Identifiers the partner may look up per minute.
    pub discovery_per_min: u32,
    /// Envelopes, receipts and signals it may send across networks per second, over all its
    /// sessions (bursts of one second's worth pass); 0: no limit. Past it: `RATE_LIMITED`
    /// with a `retry_after_ms`.
    pub messages_per_s: u32,
    /// The network's users the relay holds at most, over every shard; absent: the relay's
    /// `limits.network_users_max`. Past it a new user is refused with `NETWORK_USER_LIMIT`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub users_max: Option<u64>,
    /// Its users' devices at most; absent: `limits.network_devices_max`
    /// (`NETWORK_DEVICE_LIMIT`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices_max: Option<u64>,
    /// Device-set changes per second; absent: `limits.network_device_set_changes_per_s`
    /// (`DEVICE_SET_RATE_LIMITED`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_set_changes_per_s: Option<u32>,
}

impl Default for TrafficLimits {
    fn default() -> TrafficLimits {
        TrafficLimits {
            discovery_per_min: 60_000,
            messages_per_s: 0,
            users_max: None,
            devices_max: None,
            device_set_changes_per_s: None,
        }
    }
}

/// The largest cap a partner record may set (users, devices, changes per second).
const CAP_MAX: u64 = u32::MAX as u64;

impl TrafficLimits {
    /// The caps per network the shards enforce.
    fn caps(&self) -> Caps {
        Caps {
            users_max: self.users_max,
            devices_max: self.devices_max,
            device_set_changes_per_s: self.device_set_changes_per_s,
        }
    }

    fn check(&self) -> ApiResult<()> {
        let caps = [
            ("users_max", self.users_max),
            ("devices_max", self.devices_max),
            (
                "device_set_changes_per_s",
                self.device_set_changes_per_s.map(u64::from),
            ),
        ];
        for (field, value) in caps {
            if let Some(value) = value
                && !(1..=CAP_MAX).contains(&value)
            {
                return Err(ApiError::malformed(format!(
                    "limits.{field}: 1 to {CAP_MAX}, or absent for the relay's default"
                )));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusChange {
    pub at_ms: u64,
    pub from: Option<PartnerStatus>,
    pub to: PartnerStatus,
    pub reason: String,
    pub ground: Option<Ground>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partner {
    pub id: u32,
    pub name: String,
    /// SHA-256 (hex) of each client certificate that speaks for it.
    pub cert_sha256: Vec<String>,
    /// Ed25519 public key (base64) for device tokens and consent records.
    pub token_public_key: Option<String>,
    /// The partner's CA (PEM): every client certificate it issued speaks for the partner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    pub architecture: Architecture,
    pub gatekeeper: bool,
    pub status: PartnerStatus,
    pub limits: TrafficLimits,
    pub source: Source,
    pub history: Vec<StatusChange>,
}

/// `POST /v1/partners`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPartner {
    pub id: u32,
    pub name: String,
    #[serde(default)]
    pub cert_sha256: Vec<String>,
    /// The partner's CA certificate(s), PEM: an alternative (or addition) to fingerprints.
    #[serde(default)]
    pub ca_pem: Option<String>,
    pub token_public_key: Option<String>,
    pub architecture: Architecture,
    #[serde(default = "testing")]
    pub status: PartnerStatus,
    #[serde(default)]
    pub limits: TrafficLimits,
    pub reason: String,
}

fn testing() -> PartnerStatus {
    PartnerStatus::Testing
}

/// `POST /v1/partners/{id}/status`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewStatus {
    pub status: PartnerStatus,
    pub reason: String,
    pub ground: Option<Ground>,
}

const NAME_BYTES_MAX: usize = 64;
const REASON_BYTES_MAX: usize = 1000;

impl Partner {
    fn entry(&self) -> NetworkEntry {
        let mut server_roles = Vec::new();
        if self.gatekeeper {
            server_roles.push(Role::GatekeeperServer);
        } else if matches!(self.architecture, Architecture::Proxy | Architecture::Both) {
            server_roles.push(Role::PartnerServer);
        }
        let token_public_key = match self.architecture {
            Architecture::Direct | Architecture::Both => self.token_key(),
            Architecture::Proxy => None,
        };
        NetworkEntry {
            id: NetworkId(self.id),
            name: self.name.clone(),
            server_roles,
            cert_sha256: self
                .cert_sha256
                .iter()
                .filter_map(|h| parse_hex32(h))
                .collect(),
            token_public_key,
            client_ca_der: self.ca_pem.as_deref().map(ca_ders).unwrap_or_default(),
        }
    }

    /// The network's Ed25519 key, which also signs its users' consent records.
    pub fn token_key(&self) -> Option<[u8; 32]> {
        let bytes = BASE64.decode(self.token_public_key.as_deref()?).ok()?;
        bytes.try_into().ok()
    }
}

/// The certificates of a PEM text (DER); empty when there are none or it does not parse.
fn ca_ders(pem: &str) -> Vec<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map(|certs| certs.into_iter().map(|c| c.to_vec()).collect())
        .unwrap_or_default()
}

fn check_reason(reason: &str) -> ApiResult<()> {
    if reason.trim().is_empty() {
        return Err(ApiError::new(
            ErrorCode::GroundRequired,
            "a status change needs a reason",
        ));
    }
    if reason.len() > REASON_BYTES_MAX {
        return Err(ApiError::malformed(format!(
            "reason: at most {REASON_BYTES_MAX} bytes"
        )));
    }
    Ok(())
}

impl ControlPlane {
    /// Registers (or refreshes) the networks of the configuration file. Their status and
    /// history stay as recorded.
    pub(super) fn register_configured(
        &self,
        networks: &[NetworkEntry],
        now_ms: u64,
    ) -> ApiResult<()> {
        let _guard = self.lock();
        self.store.write(|tx| {
            for network in networks {
                let key = network.id.0.to_string();
                let old: Option<Partner> = tx.get(PARTNERS, &key)?;
                let direct = network.token_public_key.is_some();
                let proxy = !network.server_roles.is_empty();
                let partner = Partner {
                    id: network.id.0,
                    name: network.name.clone(),
                    cert_sha256: network.cert_sha256.iter().map(|h| hex(h)).collect(),
                    token_public_key: network.token_public_key.map(|k| BASE64.encode(k)),
                    ca_pem: None,
                    architecture: match (proxy, direct) {
                        (true, true) => Architecture::Both,
                        (false, true) => Architecture::Direct,
                        _ => Architecture::Proxy,
                    },
                    gatekeeper: network.server_roles.contains(&Role::GatekeeperServer),
                    status: old.as_ref().map_or(PartnerStatus::Active, |o| o.status),
                    limits: old.as_ref().map(|o| o.limits).unwrap_or_default(),
                    source: Source::Config,
                    history: old.map(|o| o.history).unwrap_or_else(|| {
                        vec![StatusChange {
                            at_ms: now_ms,
                            from: None,
                            to: PartnerStatus::Active,
                            reason: "configured".into(),
                            ground: None,
                        }]
                    }),
                };
                tx.put(PARTNERS, &key, &partner)?;
            }
            // A network taken out of the configuration no longer speaks for anyone.
            for (key, old) in tx_partners(tx)? {
                if old.source == Source::Config && !networks.iter().any(|n| n.id.0 == old.id) {
                    tracing::warn!(
                        network = old.id,
                        "network {} is no longer configured: unregistered",
                        old.name
                    );
                    tx.delete(PARTNERS, &key)?;
                }
            }
            Ok::<(), ApiError>(())
        })?;
        self.sync_networks()
    }

    /// Pushes the registry into the handshake table and the policy.
    /// The id of every registered network.
    pub(super) fn partner_ids(&self) -> ApiResult<Vec<u32>> {
        let partners = self.store.scan::<Partner>(PARTNERS, "")?;
        Ok(partners.into_iter().map(|(_, p)| p.id).collect())
    }

    fn sync_networks(&self) -> ApiResult<()> {
        let partners = self.store.scan::<Partner>(PARTNERS, "")?;
        let known: Vec<NetworkId> = partners.iter().map(|(_, p)| NetworkId(p.id)).collect();
        self.policy.retain_networks(&known);
        let mut entries = Vec::new();
        for (_, partner) in &partners {
            self.policy
                .set_network(NetworkId(partner.id), partner.status);
            self.policy
                .set_rate(NetworkId(partner.id), partner.limits.messages_per_s);
            self.policy
                .caps()
                .set(NetworkId(partner.id), partner.limits.caps());
            entries.push(partner.entry());
        }
        self.auth
            .replace(entries)
            .map_err(|e| ApiError::new(ErrorCode::AlreadyExists, e))
    }

    pub fn partner_get(&self, id: u32) -> ApiResult<Option<Partner>> {
        Ok(self.store.get(PARTNERS, &id.to_string())?)
    }

    pub fn partners(&self, caller: Caller) -> ApiResult<Vec<Partner>> {
        require_operator(caller)?;
        let mut list: Vec<Partner> = self
            .store
            .scan::<Partner>(PARTNERS, "")?
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        list.sort_by_key(|p| p.id);
        Ok(list)
    }

    /// The operator sees every partner; a network sees only itself.
    pub fn partner(&self, caller: Caller, id: u32) -> ApiResult<Partner> {
        match caller {
            Caller::Operator => {}
            Caller::Network(own) if own.0 == id => {}
            Caller::Network(_) => {
                return Err(ApiError::new(
                    ErrorCode::ForeignResource,
                    "a network may read only its own registration",
                ));
            }
        }
        self.partner_get(id)?.ok_or_else(ApiError::not_found)
    }

    pub fn partner_add(&self, caller: Caller, new: NewPartner, now_ms: u64) -> ApiResult<Partner> {
        require_operator(caller)?;
        if new.id == 0 {
            return Err(ApiError::malformed("id: network 0 is reserved"));
        }
        if new.name.trim().is_empty() || new.name.len() > NAME_BYTES_MAX {
            return Err(ApiError::malformed(format!(
                "name: 1 to {NAME_BYTES_MAX} bytes"
            )));
        }
        check_reason(&new.reason)?;
        new.limits.check()?;
        let mut fingerprints = Vec::new();
        for fingerprint in &new.cert_sha256 {
            let lower = fingerprint.to_ascii_lowercase();
            if parse_hex32(&lower).is_none() {
                return Err(ApiError::malformed(format!(
                    "cert_sha256: {fingerprint:?} is not 64 hex digits"
                )));
            }
            if fingerprints.contains(&lower) {
                return Err(ApiError::malformed(format!(
                    "cert_sha256: {fingerprint:?} is listed twice"
                )));
            }
            fingerprints.push(lower);
        }
        if let Some(pem) = &new.ca_pem
            && ca_ders(pem).is_empty()
        {
            return Err(ApiError::malformed(
                "ca_pem: no CERTIFICATE in PEM form, or one that does not parse",
            ));
        }
        if let Some(pem) = &new.ca_pem
            && crate::tables::client_ca::webpki_verifier(
                &ca_ders(pem),
                &std::sync::Arc::new(rustls::crypto::ring::default_provider()),
            )
            .is_err()
        {
            return Err(ApiError::malformed("ca_pem: not a usable CA certificate"));
        }
        let needs_certs = matches!(new.architecture, Architecture::Proxy | Architecture::Both);
        if needs_certs && fingerprints.is_empty() && new.ca_pem.is_none() {
            return Err(ApiError::malformed(
                "cert_sha256 or ca_pem: a proxy partner needs a client certificate or its CA",
            ));
        }
        if let Some(key) = &new.token_public_key
            && BASE64.decode(key).map(|k| k.len()) != Ok(32)
        {
            return Err(ApiError::malformed(
                "token_public_key: base64 of a 32-byte Ed25519 public key",
            ));
        }
        if new.token_public_key.is_none() && new.architecture != Architecture::Proxy {
            return Err(ApiError::malformed(
                "token_public_key: a direct partner's devices need it",
            ));
        }
        if new.status == PartnerStatus::Suspended {
            return Err(ApiError::malformed(
                "status: a partner starts in testing or active",
            ));
        }
        let partner = Partner {
            id: new.id,
            name: new.name.trim().to_string(),
            cert_sha256: fingerprints,
            token_public_key: new.token_public_key,
            ca_pem: new.ca_pem,
            architecture: new.architecture,
            gatekeeper: false,
            status: new.status,
            limits: new.limits,
            source: Source::Api,
            history: vec![StatusChange {
                at_ms: now_ms,
                from: None,
                to: new.status,
                reason: new.reason,
                ground: None,
            }],
        };
        let _guard = self.lock();
        let taken: Vec<String> = self
            .store
            .scan::<Partner>(PARTNERS, "")?
            .into_iter()
            .flat_map(|(_, p)| p.cert_sha256)
            .collect();
        let operators: Vec<String> = self.operators.iter().map(|h| hex(h)).collect();
        if let Some(used) = partner
            .cert_sha256
            .iter()
            .find(|h| taken.contains(h) || operators.contains(h))
        {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("certificate {used} is in use (by another network or the operator)"),
            ));
        }
        // The table the handshake would use with it must hold together (a certificate or a
        // CA for two networks, ...), or the registry could not be loaded at the next start.
        let mut entries: Vec<NetworkEntry> = self
            .store
            .scan::<Partner>(PARTNERS, "")?
            .into_iter()
            .filter(|(_, p)| p.id != partner.id)
            .map(|(_, p)| p.entry())
            .collect();
        if let Some(ca) = &partner.ca_pem {
            let ders = ca_ders(ca);
            if entries
                .iter()
                .any(|e| e.client_ca_der.iter().any(|d| ders.contains(d)))
            {
                return Err(ApiError::new(
                    ErrorCode::AlreadyExists,
                    "this CA already speaks for another network",
                ));
            }
        }
        entries.push(partner.entry());
        crate::tables::auth::Auth::check(entries)
            .map_err(|e| ApiError::new(ErrorCode::AlreadyExists, e))?;
        self.store.write(|tx| {
            let key = partner.id.to_string();
            if tx.get::<Partner>(PARTNERS, &key)?.is_some() {
                return Err(ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!("network {} is registered already", partner.id),
                ));
            }
            tx.put(PARTNERS, &key, &partner)?;
            Ok(())
        })?;
        self.sync_networks()?;
        tracing::info!(
            network = partner.id,
            "partner {} registered ({:?}, {:?})",
            partner.name,
            partner.architecture,
            partner.status
        );
        Ok(partner)
    }

    /// The operator changes a network's limits and caps; they hold at once on every core
    /// (users and devices already there stay, even past a lowered cap: only new ones are
    /// refused).
    pub fn partner_set_limits(
        &self,
        caller: Caller,
        id: u32,
        limits: TrafficLimits,
    ) -> ApiResult<Partner> {
        require_operator(caller)?;
        limits.check()?;
        let _guard = self.lock();
        let partner = self.store.write(|tx| {
            let key = id.to_string();
            let mut partner: Partner = tx.get(PARTNERS, &key)?.ok_or_else(ApiError::not_found)?;
            partner.limits = limits;
            tx.put(PARTNERS, &key, &partner)?;
            Ok::<Partner, ApiError>(partner)
        })?;
        self.sync_networks()?;
        tracing::info!(network = id, "partner limits set: {:?}", partner.limits);
        Ok(partner)
    }

    pub fn partner_set_status(
        &self,
        caller: Caller,
        id: u32,
        change: NewStatus,
        now_ms: u64,
    ) -> ApiResult<Partner> {
        require_operator(caller)?;
        check_reason(&change.reason)?;
        if change.status == PartnerStatus::Suspended && change.ground.is_none() {
            return Err(ApiError::new(
                ErrorCode::GroundRequired,
                "a suspension needs a statutory ground: integrity, security, privacy or partner_request",
            ));
        }
        let _guard = self.lock();
        let partner = self.store.write(|tx| {
            let key = id.to_string();
            let mut partner: Partner = tx.get(PARTNERS, &key)?.ok_or_else(ApiError::not_found)?;
            partner.history.push(StatusChange {
                at_ms: now_ms,
                from: Some(partner.status),
                to: change.status,
                reason: change.reason.clone(),
                ground: change.ground,
            });
            partner.status = change.status;
            tx.put(PARTNERS, &key, &partner)?;
            events::append(
                tx,
                now_ms,
                EventKind::PartnerStatus,
                id,
                json!({"status": change.status, "reason": change.reason, "ground": change.ground}),
            )?;
            Ok::<Partner, ApiError>(partner)
        })?;
        self.sync_networks()?;
        let suspended = change.status == PartnerStatus::Suspended;
        let kind = if suspended {
            NoticeKind::Suspension
        } else {
            NoticeKind::Other
        };
        let text = match change.ground {
            Some(ground) => format!(
                "network status {:?} on ground {ground:?}: {}",
                change.status, change.reason
            ),
            None => format!("network status {:?}: {}", change.status, change.reason),
        };
        let notice = Notice {
            notice_id: MessageId(u128::from(now_ms) << 32 | u128::from(id)),
            kind,
            audience: None,
            effective_at_ms: now_ms,
            code: if suspended {
                ErrorCode::PartnerSuspended.as_u16()
            } else {
                0
            },
            text: truncate(&text, codec::limits::NOTICE_TEXT_BYTES_MAX),
        };
        // The status holds already (registry, policy, handshake table): nothing crosses for
        // a suspended network whether or not its sessions could be told and closed now.
        if let Err(e) = self
            .data_plane
            .notice_network(NetworkId(id), notice, suspended)
        {
            tracing::error!(
                network = id,
                "partner status notice not delivered to every core: {}",
                e.message
            );
        }
        tracing::warn!(
            network = id,
            "partner status {:?} -> {:?} ({:?}): {}",
            partner.history.last().and_then(|c| c.from),
            change.status,
            change.ground,
            change.reason
        );
        Ok(partner)
    }
}

/// Every partner record, inside a write transaction.
fn tx_partners(tx: &mut super::store::Tx<'_>) -> super::store::StoreResult<Vec<(String, Partner)>> {
    let mut out = Vec::new();
    for key in tx.keys(PARTNERS, "", usize::MAX)? {
        if let Some(partner) = tx.get::<Partner>(PARTNERS, &key)? {
            out.push((key, partner));
        }
    }
    Ok(out)
}

/// `text` cut to at most `max` bytes, on a character boundary.
pub fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}
