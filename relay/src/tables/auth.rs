//! Who a session speaks for: server sessions by their TLS client certificate, device
//! sessions by a token their network signed. Every network, the gatekeeper included, is an
//! entry of the same table and goes through the same checks (principle 6).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use codec::{ArchivedHello, DeviceAddress, ErrorCode, NetworkId, Role, UserAddress};
use ring::signature::{ED25519, UnparsedPublicKey};
use rkyv::option::ArchivedOption;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;

use super::client_ca::{DynamicClientVerifier, webpki_verifier};

/// Who an established session speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal {
    /// A server of one network (gatekeeper or partner: the same rules): any of its users.
    Server { network: NetworkId },
    /// One device, authenticated by a token its network signed.
    Device { device: DeviceAddress },
}

impl Principal {
    /// The network the session speaks for.
    pub fn network(&self) -> NetworkId {
        match self {
            Principal::Server { network } => *network,
            Principal::Device { device } => device.network,
        }
    }

    /// Whether this session may send as (or acknowledge for) `address`.
    pub fn may_act_as(&self, address: &DeviceAddress) -> bool {
        match self {
            Principal::Server { network } => address.network == *network,
            Principal::Device { device } => address == device,
        }
    }

    /// Whether this session may speak for every device of `user` (declare its device set).
    pub fn may_manage(&self, user: &UserAddress) -> bool {
        matches!(self, Principal::Server { network } if user.network == *network)
    }
}

/// One network the relay serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkEntry {
    pub id: NetworkId,
    pub name: String,
    /// Server roles its certificates may take (`PartnerServer`, `GatekeeperServer`,
    /// `PeerRelay`); empty for a network that only connects devices.
    pub server_roles: Vec<Role>,
    /// SHA-256 of the DER of each client certificate that speaks for it.
    pub cert_sha256: Vec<[u8; 32]>,
    /// Its Ed25519 key for device tokens; without one its devices cannot connect directly.
    pub token_public_key: Option<[u8; 32]>,
    /// CA certificates (DER): every client certificate they issued speaks for it too.
    pub client_ca_der: Vec<Vec<u8>>,
}

/// The longest a device token may be valid (plus five minutes of clock skew).
pub const TOKEN_LIFETIME_MAX_MS: u64 = (24 * 60 + 5) * 60 * 1000;

/// A refusal at handshake time: a code and a reason for the `Error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: ErrorCode,
    pub reason: String,
}

fn refused(code: ErrorCode, reason: impl Into<String>) -> Refused {
    Refused {
        code,
        reason: reason.into(),
    }
}

/// Token ids seen, kept until their token expires; bounded.
#[derive(Debug)]
struct TokenCache {
    seen: HashMap<u128, u64>,
    expiry: BinaryHeap<Reverse<(u64, u128)>>,
    max: usize,
}

impl TokenCache {
    /// Records `id`; `Err` when it was seen before, or when the cache is full of live tokens.
    fn record(&mut self, now_ms: u64, id: u128, expires_at_ms: u64) -> Result<(), ErrorCode> {
        while let Some(&Reverse((at, old))) = self.expiry.peek() {
            if at > now_ms {
                break;
            }
            self.expiry.pop();
            self.seen.remove(&old);
        }
        if self.seen.contains_key(&id) {
            return Err(ErrorCode::TokenReplayed);
        }
        if self.seen.len() >= self.max {
            return Err(ErrorCode::Internal);
        }
        self.seen.insert(id, expires_at_ms);
        self.expiry.push(Reverse((expires_at_ms, id)));
        Ok(())
    }

    /// Takes back a record whose journal entry could not be handed on (its expiry entry
    /// goes lazily).
    fn forget(&mut self, id: u128) {
        self.seen.remove(&id);
    }
}

/// A device token id the relay has seen: what the token journal (`io::tokens`) keeps on
/// disk until `expires_at_ms`, so that a replay is refused after a restart too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenToken {
    pub network: NetworkId,
    pub token_id: u128,
    pub expires_at_ms: u64,
}

/// The network table: by id, by certificate fingerprint, and by issuing CA.
#[derive(Debug, Default)]
struct Table {
    networks: HashMap<NetworkId, NetworkEntry>,
    by_cert: HashMap<[u8; 32], NetworkId>,
    by_ca: Vec<(NetworkId, Arc<dyn ClientCertVerifier>)>,
}

/// The network table and the replay cache. Shared by every core; consulted once per session.
/// The control plane replaces entries as partners are registered (hence the lock: written
/// rarely, read once per handshake).
#[derive(Debug)]
pub struct Auth {
    table: RwLock<Table>,
    /// Token ids seen, per network: one network's tokens can fill only its own cache.
    tokens: Mutex<HashMap<NetworkId, TokenCache>>,
    token_ids_max: usize,
    /// The TLS client verifier, told of every network CA.
    verifier: OnceLock<Arc<DynamicClientVerifier>>,
    /// Where each token id seen goes to be stored (the IO shell's token journal); unset at
    /// the `memory` durability level, where a restart forgets them.
    journal: OnceLock<crossbeam_channel::Sender<SeenToken>>,
}

impl Table {
    fn build(networks: Vec<NetworkEntry>) -> Result<Table, String> {
        let mut by_id = HashMap::new();
        let mut by_cert = HashMap::new();
        let mut by_ca = Vec::new();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        for network in networks {
            if !network.client_ca_der.is_empty() {
                let verifier = webpki_verifier(&network.client_ca_der, &provider)
                    .map_err(|e| format!("network {}: {e}", network.name))?;
                by_ca.push((network.id, verifier));
            }
            for fingerprint in &network.cert_sha256 {
                if by_cert.insert(*fingerprint, network.id).is_some() {
                    return Err(format!(
                        "network {}: a certificate is listed for two networks",
                        network.name
                    ));
                }
            }
            if network.server_roles.contains(&Role::Device) {
                return Err(format!(
                    "network {}: `device` is not a server role",
                    network.name
                ));
            }
            let name = network.name.clone();
            if by_id.insert(network.id, network).is_some() {
                return Err(format!("network {name}: its id is used twice"));
            }
        }
        Ok(Table {
            networks: by_id,
            by_cert,
            by_ca,
        })
    }

    /// Every network CA (DER), for the TLS verifier.
    fn cas(&self) -> Vec<Vec<u8>> {
        self.networks
            .values()
            .flat_map(|n| n.client_ca_der.iter().cloned())
            .collect()
    }
}

impl Auth {
    pub fn new(networks: Vec<NetworkEntry>, token_ids_max: usize) -> Result<Auth, String> {
        let table = Table::build(networks)?;
        Ok(Auth {
            table: RwLock::new(table),
            tokens: Mutex::new(HashMap::new()),
            token_ids_max: token_ids_max.max(1),
            verifier: OnceLock::new(),
            journal: OnceLock::new(),
        })
    }

    /// From now on every token id accepted is handed to `journal` to be stored; a handshake
    /// whose id the journal cannot take (it is behind) is refused with
    /// `TOKEN_JOURNAL_BUSY`, so that no token is accepted that a restart would forget.
    pub fn attach_journal(&self, journal: crossbeam_channel::Sender<SeenToken>) {
        let _ = self.journal.set(journal);
    }

    /// Token ids seen before a restart (read back from the journal), refused as replays
    /// until they expire. Returns how many were still live (past `token_ids_max` per network
    /// the rest are dropped: that many live tokens cannot have been accepted).
    pub fn restore_tokens(&self, now_ms: u64, tokens: &[SeenToken]) -> usize {
        let mut caches = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut restored = 0;
        for token in tokens {
            let cache = caches.entry(token.network).or_insert_with(|| TokenCache {
                seen: HashMap::new(),
                expiry: BinaryHeap::new(),
                max: self.token_ids_max,
            });
            if token.expires_at_ms > now_ms
                && cache
                    .record(now_ms, token.token_id, token.expires_at_ms)
                    .is_ok()
            {
                restored += 1;
            }
        }
        restored
    }

    /// Keeps `verifier` trusting every network CA of the table, now and after each change.
    pub fn attach_verifier(&self, verifier: Arc<DynamicClientVerifier>) -> Result<(), String> {
        verifier.set_extra(&self.read().cas())?;
        let _ = self.verifier.set(verifier);
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn network(&self, id: NetworkId) -> Option<NetworkEntry> {
        self.read().networks.get(&id).cloned()
    }

    pub fn networks(&self) -> Vec<NetworkEntry> {
        self.read().networks.values().cloned().collect()
    }

    /// Whether `networks` would make a consistent table (what [`Auth::replace`] accepts).
    pub fn check(networks: Vec<NetworkEntry>) -> Result<(), String> {
        Table::build(networks).map(|_| ())
    }

    /// Replaces the whole table (the control plane's registry changed); refused, and the
    /// old table kept, if the new one is inconsistent.
    pub fn replace(&self, networks: Vec<NetworkEntry>) -> Result<(), String> {
        let table = Table::build(networks)?;
        if let Some(verifier) = self.verifier.get() {
            verifier.set_extra(&table.cas())?;
        }
        *self
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = table;
        Ok(())
    }

    /// The network a client certificate speaks for: by its fingerprint, or by the network
    /// CA that issued it (checked as of `now_ms`).
    pub fn network_of_cert(&self, cert_der: &[u8], now_ms: u64) -> Option<NetworkId> {
        let fingerprint = devkit::hex::sha256(cert_der);
        if let Some(network) = self.network_of_fingerprint(&fingerprint) {
            return Some(network);
        }
        let table = self.read();
        let cert = CertificateDer::from(cert_der);
        let now = UnixTime::since_unix_epoch(std::time::Duration::from_millis(now_ms));
        table
            .by_ca
            .iter()
            .find(|(_, verifier)| verifier.verify_client_cert(&cert, &[], now).is_ok())
            .map(|(network, _)| *network)
    }

    pub fn network_of_fingerprint(&self, fingerprint: &[u8; 32]) -> Option<NetworkId> {
        self.read().by_cert.get(fingerprint).copied()
    }

    /// Checks a `Hello` against the TLS client certificate (DER, if any) and decides who the
    /// session speaks for.
    pub fn authenticate(
        &self,
        now_ms: u64,
        hello: &ArchivedHello,
        peer_cert: Option<&[u8]>,
    ) -> Result<Principal, Refused> {
        let role = hello.role.get();
        if role == Role::Device {
            return self.authenticate_device(now_ms, hello);
        }
        let cert = peer_cert.ok_or_else(|| {
            refused(
                ErrorCode::CertificateRequired,
                format!("the {role:?} role needs a client certificate"),
            )
        })?;
        let network_id = self.network_of_cert(cert, now_ms).ok_or_else(|| {
            refused(
                ErrorCode::CertificateUnknown,
                "this client certificate speaks for no network",
            )
        })?;
        let network = self.network(network_id).ok_or_else(|| {
            refused(
                ErrorCode::CertificateUnknown,
                "this client certificate speaks for no network",
            )
        })?;
        if !network.server_roles.contains(&role) {
            return Err(refused(
                ErrorCode::RoleNotAllowed,
                format!("network {} may not connect as {role:?}", network.name),
            ));
        }
        Ok(Principal::Server {
            network: network.id,
        })
    }

    fn authenticate_device(
        &self,
        now_ms: u64,
        hello: &ArchivedHello,
    ) -> Result<Principal, Refused> {
        let ArchivedOption::Some(token) = &hello.token else {
            return Err(refused(
                ErrorCode::TokenRequired,
                "a device session needs a device token in Hello",
            ));
        };
        let device = token.device.get();
        let network = self.network(device.network).ok_or_else(|| {
            refused(
                ErrorCode::TokenInvalid,
                format!("network {} is not served by this relay", device.network),
            )
        })?;
        let key = network.token_public_key.ok_or_else(|| {
            refused(
                ErrorCode::TokenInvalid,
                format!("network {} has no device-token key", network.name),
            )
        })?;
        UnparsedPublicKey::new(&ED25519, key)
            .verify(&token.signed_bytes(), &token.signature)
            .map_err(|_| {
                refused(
                    ErrorCode::TokenInvalid,
                    "the device token's signature does not verify",
                )
            })?;
        let expires_at_ms = token.expires_at_ms.to_native();
        if expires_at_ms <= now_ms {
            return Err(refused(
                ErrorCode::TokenExpired,
                "the device token has expired",
            ));
        }
        // A token id is remembered until its token expires: a bounded lifetime keeps the
        // replay cache from filling with tokens that never go.
        if expires_at_ms > now_ms.saturating_add(TOKEN_LIFETIME_MAX_MS) {
            return Err(refused(
                ErrorCode::TokenInvalid,
                "the device token expires more than 24 hours ahead",
            ));
        }
        let mut caches = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tokens = caches.entry(device.network).or_insert_with(|| TokenCache {
            seen: HashMap::new(),
            expiry: BinaryHeap::new(),
            max: self.token_ids_max,
        });
        let token_id = token.token_id.to_native();
        match tokens.record(now_ms, token_id, expires_at_ms) {
            Ok(()) => {
                let seen = SeenToken {
                    network: device.network,
                    token_id,
                    expires_at_ms,
                };
                if let Some(journal) = self.journal.get()
                    && journal.try_send(seen).is_err()
                {
                    tokens.forget(token_id);
                    return Err(refused(
                        ErrorCode::TokenJournalBusy,
                        "the relay cannot record device tokens right now; retry",
                    ));
                }
                Ok(Principal::Device { device })
            }
            Err(ErrorCode::TokenReplayed) => Err(refused(
                ErrorCode::TokenReplayed,
                "this device token was used before",
            )),
            Err(code) => Err(refused(
                code,
                "the relay cannot track more device tokens right now",
            )),
        }
    }
}
