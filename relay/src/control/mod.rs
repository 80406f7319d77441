//! The interop control plane: partners, users (enlistment with consent, identifiers,
//! consent models, location), message requests, discovery and the key directory. Each
//! operation takes the caller and the time and returns a typed result or an [`ApiError`];
//! `crate::http` is the HTTP shell around it. State lives in [`store::Store`]; what the data
//! plane must enforce is mirrored into [`Policy`] and the [`Auth`] table, and what it must
//! carry out (device sets, deletions, notices) goes through [`DataPlane`].

pub mod discovery;
pub mod events;
pub mod identifier;
pub mod keys;
pub mod location;
pub mod partners;
pub mod ratelimit;
pub mod requests;
pub mod store;
pub mod user_record;
pub mod users;

use std::sync::{Arc, Mutex};

use codec::{DeviceId, ErrorCode, NetworkId, Notice, UserAddress, UserId};
use serde::{Deserialize, Serialize};

use self::location::LocationRule;
use self::ratelimit::RateLimiter;
use self::store::{Store, StoreError};
use crate::tables::auth::Auth;
use crate::tables::policy::Policy;

/// Who is calling, from the TLS client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A certificate listed as the relay operator's.
    Operator,
    /// A server certificate of a registered network (partner or gatekeeper).
    Network(NetworkId),
}

/// A refused or failed control-plane request: a protocol error code, the HTTP status it
/// maps to, and a message that names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub status: u16,
    pub message: String,
    /// For `RATE_LIMITED`: when to try again.
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        let status = match code {
            ErrorCode::RequestMalformed
            | ErrorCode::IdentifierInvalid
            | ErrorCode::DiscoveryBatchTooLarge
            | ErrorCode::GroundRequired
            | ErrorCode::KeysInvalid
            | ErrorCode::ConsentRequired
            | ErrorCode::ConsentInvalid
            | ErrorCode::DeviceLimit => 400,
            ErrorCode::CertificateRequired => 401,
            ErrorCode::OperatorRequired
            | ErrorCode::ForeignResource
            | ErrorCode::CertificateUnknown
            | ErrorCode::RoleNotAllowed
            | ErrorCode::RecipientNotEnlisted
            | ErrorCode::SenderNotEnlisted
            | ErrorCode::MessageRequestPending
            | ErrorCode::RecipientOutsideRegion
            | ErrorCode::SenderOutsideRegion
            | ErrorCode::PartnerSuspended
            | ErrorCode::PartnerTesting
            | ErrorCode::NetworkUnknown
            | ErrorCode::NetworkUserLimit
            | ErrorCode::NetworkDeviceLimit => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::AlreadyExists | ErrorCode::IdentifierTaken | ErrorCode::RequestDecided => {
                409
            }
            ErrorCode::BodyTooLarge => 413,
            ErrorCode::RateLimited
            | ErrorCode::RateTableFull
            | ErrorCode::DeviceSetRateLimited
            | ErrorCode::SourceRateLimited => 429,
            ErrorCode::StorageUnavailable
            | ErrorCode::DataPlaneUnavailable
            | ErrorCode::ShardUserLimit
            | ErrorCode::HttpBusy => 503,
            _ => 500,
        };
        ApiError {
            code,
            status,
            message: message.into(),
            retry_after_s: None,
        }
    }

    pub fn malformed(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::RequestMalformed, message)
    }

    /// `RATE_LIMITED` for `what`, with `Retry-After` from a wait in milliseconds.
    pub fn rate_limited(what: &str, wait_ms: u64) -> ApiError {
        let seconds = wait_ms.div_ceil(1000);
        let mut error = ApiError::new(
            ErrorCode::RateLimited,
            format!("{what} limit reached; retry in {seconds} s"),
        );
        error.retry_after_s = Some(seconds);
        error
    }

    /// What the network's rate table refused: `RATE_LIMITED`, or `RATE_TABLE_FULL` when
    /// its own table is full; with `Retry-After` either way.
    pub fn rate_refused(what: &str, refused: ratelimit::Refused) -> ApiError {
        match refused {
            ratelimit::Refused::Wait(wait_ms) => ApiError::rate_limited(what, wait_ms),
            ratelimit::Refused::TableFull(wait_ms) => {
                let seconds = wait_ms.div_ceil(1000);
                let mut error = ApiError::new(
                    ErrorCode::RateTableFull,
                    format!(
                        "your network's rate-limit table is full (interop.rate_buckets_per_network_max); retry in {seconds} s"
                    ),
                );
                error.retry_after_s = Some(seconds);
                error
            }
        }
    }

    pub fn not_found() -> ApiError {
        ApiError::new(ErrorCode::NotFound, "no such resource, or none you may see")
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        tracing::error!("control store: {}", e.0);
        ApiError::new(
            ErrorCode::StorageUnavailable,
            "the control store failed; nothing was changed",
        )
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// The control plane's settings (`[interop]` in the configuration file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InteropSettings {
    /// Enforce the interop rules on the data plane. `false` is for the lab only
    /// (data-plane benchmarks, protocol tests); the relay warns at start.
    pub enforce: bool,
    pub location: LocationRule,
    /// How long contacts who look up a changed identifier learn the new one.
    pub identifier_grace_days: u32,
    /// Identifiers in one bulk discovery request.
    pub discovery_batch_max: u32,
    /// Identifiers one partner may look up per minute (unless its own limit is lower).
    pub discovery_per_partner_per_min: u32,
    /// Identifiers looked up on behalf of one requesting user per day.
    pub discovery_per_user_per_day: u32,
    /// How old a consent record may be when the user is enlisted.
    pub consent_max_age_days: u32,
    /// Below this many one-time prekeys (or KeyPackages) the owner is told to upload more.
    pub prekeys_low: u32,
    /// Key claims one partner may make per minute.
    pub key_claims_per_partner_per_min: u32,
    /// Key claims one requesting user may make for one target user per day (a session set
    /// up again now and then; not a drain of someone's one-time keys).
    pub key_claims_per_pair_per_day: u32,
    /// SHA-256 (hex) of the operator's client certificates (the development PKI adds its own).
    pub operator_cert_sha256: Vec<String>,
    /// How often the location rule is re-evaluated for every user, in seconds.
    pub location_sweep_s: u32,
    /// The largest control-API request body.
    pub api_body_bytes_max: u32,
    /// How long events stay in the feed (minimal metadata: they go after this).
    pub events_retention_days: u32,
    /// Rate-limit buckets (one per partner, requesting user, claim pair) one network may
    /// have live at once, in a table of its own: a network that fills it is refused with
    /// `RATE_TABLE_FULL`, and no other network notices.
    pub rate_buckets_per_network_max: u32,
    /// The data plane's `limits.devices_per_user_max`, which device sets must respect (set
    /// from `[limits]` at start, not configured here).
    #[serde(skip, default = "default_devices_per_user_max")]
    pub devices_per_user_max: u16,
}

fn default_devices_per_user_max() -> u16 {
    crate::limits::RelayLimits::default().devices_per_user_max
}

impl Default for InteropSettings {
    fn default() -> InteropSettings {
        InteropSettings {
            enforce: true,
            location: LocationRule::default(),
            identifier_grace_days: 30,
            discovery_batch_max: 1000,
            discovery_per_partner_per_min: 60_000,
            discovery_per_user_per_day: 5_000,
            consent_max_age_days: 30,
            prekeys_low: 10,
            key_claims_per_partner_per_min: 60_000,
            key_claims_per_pair_per_day: 100,
            operator_cert_sha256: Vec::new(),
            location_sweep_s: 60,
            api_body_bytes_max: 1 << 20,
            events_retention_days: 30,
            rate_buckets_per_network_max: 100_000,
            devices_per_user_max: default_devices_per_user_max(),
        }
    }
}

impl InteropSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.discovery_batch_max == 0 || self.discovery_batch_max > 100_000 {
            return Err("interop.discovery_batch_max: must be 1 to 100000".into());
        }
        if let LocationRule::Eea { window_days } = self.location
            && !(1..=3650).contains(&window_days)
        {
            return Err("interop.location.window_days: must be 1 to 3650".into());
        }
        if self.location_sweep_s == 0 {
            return Err("interop.location_sweep_s: must be at least 1".into());
        }
        if self.key_claims_per_partner_per_min == 0 || self.key_claims_per_pair_per_day == 0 {
            return Err("interop.key_claims_per_*: must be at least 1".into());
        }
        if self.events_retention_days == 0 {
            return Err("interop.events_retention_days: must be at least 1".into());
        }
        if !(16..=10_000_000).contains(&self.rate_buckets_per_network_max) {
            return Err("interop.rate_buckets_per_network_max: must be 16 to 10000000".into());
        }
        if self.api_body_bytes_max < 1024 {
            return Err("interop.api_body_bytes_max: must be at least 1024".into());
        }
        for fingerprint in &self.operator_cert_sha256 {
            if devkit::hex::parse_hex32(&fingerprint.to_ascii_lowercase()).is_none() {
                return Err(format!(
                    "interop.operator_cert_sha256: {fingerprint:?} is not 64 hex digits"
                ));
            }
        }
        Ok(())
    }
}

/// What the control plane asks of the data plane. The IO shell sends each to the shard that
/// owns the user and answers once the change holds there (for a device set or a purge, once
/// its log record is stored); tests use a recording fake. An `Err` means the change was not
/// applied: the control plane then changes nothing of its own either and answers 503.
pub trait DataPlane: Send + Sync + std::fmt::Debug {
    /// Replaces the user's device set (as a server's `DeviceList` would).
    fn set_devices(&self, user: UserAddress, devices: Vec<DeviceId>) -> ApiResult<()>;
    /// Deletes every queued frame for the user that came from another network.
    fn purge_interop(&self, user: UserAddress) -> ApiResult<()>;
    /// Writes `notice` to the user's connected devices and its network's server sessions.
    fn notice_user(&self, user: UserAddress, notice: Notice) -> ApiResult<()>;
    /// Writes `notice` to the network's server sessions; `close` ends them after it.
    fn notice_network(&self, network: NetworkId, notice: Notice, close: bool) -> ApiResult<()>;
}

/// A data plane that does nothing: for a control plane run without one (offline tools).
#[derive(Debug, Default)]
pub struct NoDataPlane;

impl DataPlane for NoDataPlane {
    fn set_devices(&self, _: UserAddress, _: Vec<DeviceId>) -> ApiResult<()> {
        Ok(())
    }
    fn purge_interop(&self, _: UserAddress) -> ApiResult<()> {
        Ok(())
    }
    fn notice_user(&self, _: UserAddress, _: Notice) -> ApiResult<()> {
        Ok(())
    }
    fn notice_network(&self, _: NetworkId, _: Notice, _: bool) -> ApiResult<()> {
        Ok(())
    }
}

#[derive(Debug)]
pub struct ControlPlane {
    pub settings: InteropSettings,
    store: Store,
    pub policy: Arc<Policy>,
    auth: Arc<Auth>,
    data_plane: Arc<dyn DataPlane>,
    operators: Vec<[u8; 32]>,
    /// Each network's rate buckets, in a table of its own (see `ratelimit`).
    limiter: Mutex<RateLimiter>,
    /// Serializes read-modify-write sequences that span the store and the policy table.
    writer: Mutex<()>,
    /// Contact events whose batch failed to commit, tried again first.
    contact_retry: Mutex<Vec<crate::tables::policy::ContactEvent>>,
}

/// What the control plane shares with the data plane: the handshake table and the policy it
/// writes, and the way in for changes the shards must carry out.
#[derive(Debug, Clone)]
pub struct Links {
    pub auth: Arc<Auth>,
    pub policy: Arc<Policy>,
    pub data_plane: Arc<dyn DataPlane>,
}

impl ControlPlane {
    /// Opens (or creates) the store under `data_dir`, registers the configured networks, and
    /// loads the policy table.
    pub fn open(
        data_dir: &std::path::Path,
        settings: InteropSettings,
        configured: &[crate::tables::auth::NetworkEntry],
        extra_operators: Vec<[u8; 32]>,
        links: Links,
        now_ms: u64,
    ) -> Result<ControlPlane, String> {
        let Links {
            auth,
            policy,
            data_plane,
        } = links;
        settings.validate()?;
        let store = Store::open(&data_dir.join("control.redb")).map_err(|e| e.0)?;
        let mut operators = extra_operators;
        for fingerprint in &settings.operator_cert_sha256 {
            if let Some(hash) = devkit::hex::parse_hex32(&fingerprint.to_ascii_lowercase()) {
                operators.push(hash);
            }
        }
        let limiter = RateLimiter::new(settings.rate_buckets_per_network_max);
        let control = ControlPlane {
            settings,
            store,
            policy,
            auth,
            data_plane,
            operators,
            limiter: Mutex::new(limiter),
            writer: Mutex::new(()),
            contact_retry: Mutex::new(Vec::new()),
        };
        control
            .register_configured(configured, now_ms)
            .map_err(|e| e.message)?;
        control.load_policy(now_ms).map_err(|e| e.message)?;
        Ok(control)
    }

    /// Who a client certificate (DER) speaks for: the operator by fingerprint, a network by
    /// fingerprint or by its CA.
    pub fn caller(&self, cert_der: &[u8], now_ms: u64) -> Option<Caller> {
        if self.operators.contains(&devkit::hex::sha256(cert_der)) {
            return Some(Caller::Operator);
        }
        self.auth
            .network_of_cert(cert_der, now_ms)
            .map(Caller::Network)
    }

    /// A suspended network may read, and opt its users out, but change nothing else.
    fn require_active(&self, caller: Caller) -> ApiResult<()> {
        match caller {
            Caller::Network(network)
                if self.policy.network_status(network)
                    == Some(crate::tables::policy::PartnerStatus::Suspended) =>
            {
                Err(ApiError::new(
                    ErrorCode::PartnerSuspended,
                    format!(
                        "network {network} is suspended: it may read and opt users out, nothing more"
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Live rate-limit buckets per network, for `/metrics`.
    pub fn rate_buckets(&self) -> Vec<(NetworkId, usize)> {
        self.limiter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .buckets()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// `Operator`, or `OPERATOR_REQUIRED`.
pub fn require_operator(caller: Caller) -> ApiResult<()> {
    match caller {
        Caller::Operator => Ok(()),
        Caller::Network(_) => Err(ApiError::new(
            ErrorCode::OperatorRequired,
            "this endpoint is for the relay's operator",
        )),
    }
}

/// The caller's network, which must be `network`: a network acts only on its own users.
pub fn require_network(caller: Caller, network: NetworkId) -> ApiResult<()> {
    match caller {
        Caller::Network(own) if own == network => Ok(()),
        Caller::Network(own) => Err(ApiError::new(
            ErrorCode::ForeignResource,
            format!("network {own} may not act on users of network {network}"),
        )),
        Caller::Operator => Err(ApiError::new(
            ErrorCode::ForeignResource,
            "the operator does not act for users; use the network's certificate",
        )),
    }
}

/// The caller's network, or `FOREIGN_RESOURCE` for the operator.
pub fn caller_network(caller: Caller) -> ApiResult<NetworkId> {
    match caller {
        Caller::Network(network) => Ok(network),
        Caller::Operator => Err(ApiError::new(
            ErrorCode::ForeignResource,
            "this endpoint acts for a network's users; use the network's certificate",
        )),
    }
}

/// A user's address as the API writes it: `{"network": 2, "user": "<32 hex digits>"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UserRef {
    pub network: u32,
    pub user: String32,
}

/// A 128-bit internal user id as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct String32(pub u128);

impl Serialize for String32 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:032x}", self.0))
    }
}

impl<'de> Deserialize<'de> for String32 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<String32, D::Error> {
        let text = String::deserialize(d)?;
        parse_user_id(&text)
            .map(String32)
            .ok_or_else(|| serde::de::Error::custom("a user id is 1 to 32 hex digits"))
    }
}

pub fn parse_user_id(text: &str) -> Option<u128> {
    if text.is_empty() || text.len() > 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(text, 16).ok()
}

impl UserRef {
    pub fn of(address: UserAddress) -> UserRef {
        UserRef {
            network: address.network.0,
            user: String32(address.user.0),
        }
    }

    pub fn address(self) -> UserAddress {
        UserAddress {
            network: NetworkId(self.network),
            user: UserId(self.user.0),
        }
    }
}

/// The store key of a user.
pub fn user_key(user: &UserAddress) -> String {
    format!("{}:{:032x}", user.network.0, user.user.0)
}
