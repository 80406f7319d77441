//! Users: enlistment with a signed opt-in consent record, opting out, user-visible
//! identifiers (and changing one, with a grace period), the contact book (consent model
//! iii), device sets, and location attestations with the rule they feed.

use std::collections::HashSet;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use codec::{DeviceId, ErrorCode, MessageId, Notice, NoticeKind, UserAddress};
use devkit::hex::{hex, parse_hex32};
use ring::signature::{ED25519, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::events::{self, EventKind};
use super::identifier::{Identifier, IdentifierType};
use super::location::{self, DAY_MS};
use super::partners::Partner;
use super::store::{ACCEPTED_BY, DEVICE_KEYS, IDENTIFIERS, MOVED, ONE_TIME_KEYS, Tx, USERS};
pub use super::user_record::{Accepted, Attestation, ConsentRecord, UserRecord, consent_message};
use super::{ApiError, ApiResult, Caller, ControlPlane, UserRef, require_network, user_key};

/// Visible identifiers per user.
pub const IDENTIFIERS_PER_USER_MAX: usize = 8;
/// Entries of one contact book.
pub const CONTACT_BOOK_MAX: usize = 10_000;
/// Location attestations kept per user (the newest).
pub const ATTESTATIONS_KEPT: usize = 16;
/// How far in the future a timestamp may lie (clock skew between networks).
pub const CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

/// An identifier as sent: a type and a value to validate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentifierInput {
    #[serde(rename = "type")]
    pub kind: IdentifierType,
    pub value: String,
}

impl IdentifierInput {
    fn parse(&self) -> ApiResult<Identifier> {
        Identifier::parse(self.kind, &self.value)
            .map_err(|e| ApiError::new(ErrorCode::IdentifierInvalid, e))
    }
}

/// `PUT /v1/users/{network}/{user}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enlistment {
    pub consent: Option<ConsentRecord>,
    #[serde(default)]
    pub identifiers: Vec<IdentifierInput>,
    /// The user's device set; absent on a re-enlistment: unchanged (on a first: none).
    #[serde(default)]
    pub devices: Option<Vec<u32>>,
    #[serde(default)]
    pub test: bool,
    pub location: Option<Attestation>,
}

/// `POST /v1/users/{network}/{user}/identifiers/change`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentifierChange {
    pub old: IdentifierInput,
    pub new: IdentifierInput,
}

/// Where a former identifier went, for contacts who look it up during the grace period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moved {
    pub user: UserRef,
    pub new: Identifier,
    pub until_ms: u64,
}

fn check_devices(devices: &[u32], max: u16) -> ApiResult<Vec<DeviceId>> {
    let max = usize::from(max).min(codec::limits::RECIPIENT_DEVICES_MAX);
    if devices.len() > max {
        return Err(ApiError::new(
            ErrorCode::DeviceLimit,
            format!("devices: at most {max} per user on this relay"),
        ));
    }
    let unique: HashSet<u32> = devices.iter().copied().collect();
    if unique.len() != devices.len() {
        return Err(ApiError::malformed("devices: an id is listed twice"));
    }
    Ok(devices.iter().map(|&d| DeviceId(d)).collect())
}

fn check_attestation(attestation: &Attestation, now_ms: u64) -> ApiResult<()> {
    if !location::valid_country(&attestation.country) {
        return Err(ApiError::malformed(format!(
            "location.country: {:?} is not an ISO 3166-1 alpha-2 code (two capital letters)",
            attestation.country
        )));
    }
    if attestation.observed_at_ms > now_ms + CLOCK_SKEW_MS {
        return Err(ApiError::malformed(
            "location.observed_at_ms: lies in the future",
        ));
    }
    Ok(())
}

impl ControlPlane {
    /// Fills the policy table from the store at start, then applies the location rule.
    pub(super) fn load_policy(&self, now_ms: u64) -> ApiResult<()> {
        let users = self.store.scan::<UserRecord>(USERS, "")?;
        for (_, record) in &users {
            let address = record.address();
            let standing = self
                .settings
                .location
                .evaluate(now_ms, record.last_in_eea_ms);
            self.policy
                .set_user(address, record.policy(standing.until_ms));
            for accepted in &record.accepted {
                self.policy.accept(address, accepted.party());
            }
        }
        tracing::info!("control plane: {} users loaded", users.len());
        Ok(())
    }

    /// Once the data plane runs: carries out again what a crash may have cut short (the
    /// deletion of an opted-out user's interop messages), and applies the location rule to
    /// the time that passed while the relay was down, with its notices.
    pub fn reconcile(&self, now_ms: u64) -> ApiResult<()> {
        let mut purged = 0;
        for (_, record) in self.store.scan::<UserRecord>(USERS, "")? {
            if !record.enlisted && record.opted_out_at_ms.is_some() {
                self.data_plane.purge_interop(record.address())?;
                purged += 1;
            }
        }
        let changed = self.location_sweep(now_ms)?;
        tracing::info!(
            "control plane: queues of {purged} opted-out users checked, {changed} location standings changed"
        );
        Ok(())
    }

    fn user_record(&self, user: &UserAddress) -> ApiResult<Option<UserRecord>> {
        Ok(self.store.get(USERS, &user_key(user))?)
    }

    /// A network reads its own user.
    pub fn user(&self, caller: Caller, user: UserAddress) -> ApiResult<UserRecord> {
        require_network(caller, user.network)?;
        self.user_record(&user)?.ok_or_else(ApiError::not_found)
    }

    fn verify_consent(
        &self,
        user: &UserAddress,
        consent: &ConsentRecord,
        now_ms: u64,
    ) -> ApiResult<()> {
        let invalid = |m: &str| ApiError::new(ErrorCode::ConsentInvalid, m.to_string());
        let partner: Partner = self
            .partner_get(user.network.0)?
            .ok_or_else(|| invalid("the user's network is not registered"))?;
        let key = partner
            .token_key()
            .ok_or_else(|| invalid("the network has no signing key registered"))?;
        let signature = BASE64
            .decode(&consent.signature)
            .map_err(|_| invalid("signature: not base64"))?;
        let message = consent_message(
            user,
            consent.opted_in_at_ms,
            consent.model,
            consent.discoverable,
        );
        UnparsedPublicKey::new(&ED25519, key)
            .verify(&message, &signature)
            .map_err(|_| {
                invalid("the signature does not verify for this user with the network's key")
            })?;
        if consent.opted_in_at_ms > now_ms + CLOCK_SKEW_MS {
            return Err(invalid("opted_in_at_ms lies in the future"));
        }
        let max_age = u64::from(self.settings.consent_max_age_days) * DAY_MS;
        if now_ms.saturating_sub(consent.opted_in_at_ms) > max_age {
            return Err(invalid(&format!(
                "the opt-in is older than {} days; ask the user again",
                self.settings.consent_max_age_days
            )));
        }
        Ok(())
    }

    /// Enlists (or re-enlists, with a fresh consent) a user of the caller's network.
    pub fn enlist(
        &self,
        caller: Caller,
        user: UserAddress,
        request: Enlistment,
        now_ms: u64,
    ) -> ApiResult<(UserRecord, bool)> {
        require_network(caller, user.network)?;
        self.require_active(caller)?;
        let consent = request.consent.ok_or_else(|| {
            ApiError::new(
                ErrorCode::ConsentRequired,
                "a user is enlisted only with the record of its opt-in (consent)",
            )
        })?;
        self.verify_consent(&user, &consent, now_ms)?;
        if request.identifiers.len() > IDENTIFIERS_PER_USER_MAX {
            return Err(ApiError::malformed(format!(
                "identifiers: at most {IDENTIFIERS_PER_USER_MAX}"
            )));
        }
        let identifiers = request
            .identifiers
            .iter()
            .map(IdentifierInput::parse)
            .collect::<ApiResult<Vec<_>>>()?;
        let devices = match &request.devices {
            Some(devices) => Some(check_devices(devices, self.settings.devices_per_user_max)?),
            None => None,
        };
        if let Some(attestation) = &request.location {
            check_attestation(attestation, now_ms)?;
        }
        let key = user_key(&user);
        let _guard = self.lock();
        let (record, created) = self.store.write(|tx| {
            let old: Option<UserRecord> = tx.get(USERS, &key)?;
            for identifier in &identifiers {
                let hash = id_key(&user, identifier);
                if let Some(holder) = tx.get::<String>(IDENTIFIERS, &hash)?
                    && holder != key
                {
                    return Err(ApiError::new(
                        ErrorCode::IdentifierTaken,
                        format!(
                            "{} {} belongs to another user",
                            identifier.kind.name(),
                            identifier.value
                        ),
                    ));
                }
            }
            if let Some(old) = &old {
                for identifier in &old.identifiers {
                    if !identifiers.contains(identifier) {
                        tx.delete(IDENTIFIERS, &id_key(&user, identifier))?;
                    }
                }
            }
            for identifier in &identifiers {
                tx.put(IDENTIFIERS, &id_key(&user, identifier), &key)?;
            }
            if let Some(out_at) = old.as_ref().and_then(|o| o.opted_out_at_ms)
                && consent.opted_in_at_ms <= out_at
            {
                return Err(ApiError::new(
                    ErrorCode::ConsentInvalid,
                    "the opt-in predates the user's opt-out; ask the user again",
                ));
            }
            let created = old.as_ref().is_none_or(|o| !o.enlisted);
            let mut record = old.unwrap_or_else(|| UserRecord {
                network: user.network.0,
                user: super::String32(user.user.0),
                enlisted: false,
                test: false,
                consent: None,
                enlisted_at_ms: None,
                opted_out_at_ms: None,
                identifiers: Vec::new(),
                devices: Vec::new(),
                contact_book: Vec::new(),
                accepted: Vec::new(),
                locations: Vec::new(),
                last_in_eea_ms: None,
                in_region: false,
            });
            record.enlisted = true;
            record.test = request.test;
            record.consent = Some(consent);
            if created {
                record.enlisted_at_ms = Some(now_ms);
            }
            record.opted_out_at_ms = None;
            record.identifiers = identifiers.clone();
            if let Some(devices) = &request.devices {
                record.devices = devices.clone();
            }
            if let Some(attestation) = request.location.clone() {
                add_attestation(&mut record, attestation);
            }
            let standing = self
                .settings
                .location
                .evaluate(now_ms, record.last_in_eea_ms);
            record.in_region = standing.in_region;
            tx.put(USERS, &key, &record)?;
            // The data plane first: if it cannot take the device set, nothing commits.
            if let Some(devices) = &devices {
                self.data_plane.set_devices(user, devices.clone())?;
            }
            Ok::<_, ApiError>((record, created))
        })?;
        let standing = self
            .settings
            .location
            .evaluate(now_ms, record.last_in_eea_ms);
        self.policy.set_user(user, record.policy(standing.until_ms));
        for accepted in &record.accepted {
            self.policy.accept(user, accepted.party());
        }
        tracing::info!(%user, "enlisted ({:?})", record.model());
        Ok((record, created))
    }

    /// Opts the user out: delisted at once, its queued interop messages deleted, its
    /// identifiers, contact book, keys and contacts forgotten, every other network told.
    pub fn opt_out(&self, caller: Caller, user: UserAddress, now_ms: u64) -> ApiResult<UserRecord> {
        require_network(caller, user.network)?;
        // Contacts the data plane reported and not yet stored are contacts to tell.
        self.drain_contact_events(now_ms)?;
        let key = user_key(&user);
        let _guard = self.lock();
        let record = self.store.write(|tx| {
            let mut record = enlisted_record(tx, &key)?;
            for identifier in &record.identifiers {
                tx.delete(IDENTIFIERS, &id_key(&user, identifier))?;
            }
            for device in &record.devices {
                tx.delete(DEVICE_KEYS, &format!("{key}:{device}"))?;
            }
            while tx
                .take_first::<serde_json::Value>(ONE_TIME_KEYS, &format!("{key}:"))?
                .is_some()
            {}
            // Its contacts, both ways: the users it accepted, and those who accepted it (the
            // reverse index); both forget it, and only their networks are told.
            let mut told: Vec<u32> = Vec::new();
            for accepted in &record.accepted {
                if let Accepted::User(other) = accepted {
                    tx.delete(
                        ACCEPTED_BY,
                        &format!("{}|{key}", user_key(&other.address())),
                    )?;
                    told.push(other.network);
                }
            }
            for entry in tx.keys(ACCEPTED_BY, &format!("{key}|"), usize::MAX)? {
                tx.delete(ACCEPTED_BY, &entry)?;
                let Some(acceptor_key) = entry.split_once('|').map(|(_, a)| a.to_string()) else {
                    continue;
                };
                if let Some(mut acceptor) = tx.get::<UserRecord>(USERS, &acceptor_key)? {
                    acceptor
                        .accepted
                        .retain(|a| *a != Accepted::User(UserRef::of(user)));
                    tx.put(USERS, &acceptor_key, &acceptor)?;
                    told.push(acceptor.network);
                }
            }
            super::requests::forget_requests_to(tx, &user)?;
            record.enlisted = false;
            record.opted_out_at_ms = Some(now_ms);
            record.consent = None;
            record.identifiers.clear();
            record.contact_book.clear();
            record.accepted.clear();
            record.locations.clear();
            record.last_in_eea_ms = None;
            record.in_region = false;
            tx.put(USERS, &key, &record)?;
            told.sort_unstable();
            told.dedup();
            for network in told.into_iter().filter(|n| *n != user.network.0) {
                events::append(
                    tx,
                    now_ms,
                    EventKind::UserDelisted,
                    network,
                    json!({"user": UserRef::of(user)}),
                )?;
            }
            // Delisted on the data plane first, so nothing new arrives, then purged; if the
            // purge cannot be carried out, the user stays as it was and nothing commits.
            let before = self.policy.user(&user);
            self.policy.update_user(&user, |p| p.enlisted = false);
            if let Err(e) = self.data_plane.purge_interop(user) {
                if let Some(before) = before {
                    self.policy.set_user(user, before);
                }
                return Err(e);
            }
            Ok::<_, ApiError>(record)
        })?;
        self.policy.remove_user(&user);
        self.policy.set_user(user, record.policy(None));
        tracing::info!(%user, "opted out: delisted, queued interop messages deleted");
        Ok(record)
    }

    /// Replaces one visible identifier: the old one stops resolving; contacts who look it up
    /// during the grace period learn the new one. Routing is on the internal id, so
    /// conversations and messages in flight are untouched.
    pub fn change_identifier(
        &self,
        caller: Caller,
        user: UserAddress,
        change: IdentifierChange,
        now_ms: u64,
    ) -> ApiResult<UserRecord> {
        require_network(caller, user.network)?;
        self.require_active(caller)?;
        let old = change.old.parse()?;
        let new = change.new.parse()?;
        let key = user_key(&user);
        let until_ms = now_ms + u64::from(self.settings.identifier_grace_days) * DAY_MS;
        let _guard = self.lock();
        let record = self.store.write(|tx| {
            let mut record = enlisted_record(tx, &key)?;
            let Some(position) = record.identifiers.iter().position(|i| *i == old) else {
                return Err(ApiError::new(
                    ErrorCode::NotFound,
                    "the old identifier is not one of the user's",
                ));
            };
            let new_hash = id_key(&user, &new);
            if let Some(holder) = tx.get::<String>(IDENTIFIERS, &new_hash)?
                && holder != key
            {
                return Err(ApiError::new(
                    ErrorCode::IdentifierTaken,
                    "the new identifier belongs to another user",
                ));
            }
            let old_hash = id_key(&user, &old);
            tx.delete(IDENTIFIERS, &old_hash)?;
            tx.put(IDENTIFIERS, &new_hash, &key)?;
            tx.delete(MOVED, &new_hash)?;
            tx.put(
                MOVED,
                &old_hash,
                &Moved {
                    user: UserRef::of(user),
                    new: new.clone(),
                    until_ms,
                },
            )?;
            record.identifiers[position] = new.clone();
            tx.put(USERS, &key, &record)?;
            Ok(record)
        })?;
        let hashes: Vec<[u8; 32]> = record.identifiers.iter().map(Identifier::hash).collect();
        self.policy.update_user(&user, |p| p.identifiers = hashes);
        Ok(record)
    }

    /// Replaces the user's contact book (hashed identifiers).
    pub fn set_contact_book(
        &self,
        caller: Caller,
        user: UserAddress,
        hashes: Vec<String>,
    ) -> ApiResult<usize> {
        require_network(caller, user.network)?;
        self.require_active(caller)?;
        if hashes.len() > CONTACT_BOOK_MAX {
            return Err(ApiError::malformed(format!(
                "hashes: at most {CONTACT_BOOK_MAX}"
            )));
        }
        let mut parsed = HashSet::new();
        for hash in &hashes {
            let lower = hash.to_ascii_lowercase();
            let value = parse_hex32(&lower).ok_or_else(|| {
                ApiError::malformed(format!("hashes: {hash:?} is not 64 hex digits"))
            })?;
            parsed.insert(value);
        }
        let key = user_key(&user);
        let _guard = self.lock();
        self.store.write(|tx| {
            let mut record = enlisted_record(tx, &key)?;
            record.contact_book = parsed.iter().map(|h| hex(h)).collect();
            tx.put(USERS, &key, &record)?;
            Ok::<_, ApiError>(())
        })?;
        let count = parsed.len();
        self.policy
            .update_user(&user, |p| p.contact_book = Arc::new(parsed));
        Ok(count)
    }

    /// Replaces the user's device set, here and on the data plane.
    pub fn set_devices(
        &self,
        caller: Caller,
        user: UserAddress,
        devices: Vec<u32>,
    ) -> ApiResult<UserRecord> {
        require_network(caller, user.network)?;
        self.require_active(caller)?;
        let ids = check_devices(&devices, self.settings.devices_per_user_max)?;
        let key = user_key(&user);
        let _guard = self.lock();
        let record = self.store.write(|tx| {
            let mut record = enlisted_record(tx, &key)?;
            for removed in record.devices.iter().filter(|d| !devices.contains(d)) {
                tx.delete(DEVICE_KEYS, &format!("{key}:{removed}"))?;
                // Its one-time keys too ("|" ends the device id: device 1 is not 10).
                while tx
                    .take_first::<serde_json::Value>(ONE_TIME_KEYS, &format!("{key}:{removed}|"))?
                    .is_some()
                {}
            }
            record.devices = devices.clone();
            tx.put(USERS, &key, &record)?;
            // The data plane first: if it cannot take the device set, nothing commits.
            self.data_plane.set_devices(user, ids)?;
            Ok::<_, ApiError>(record)
        })?;
        Ok(record)
    }

    /// Records where the network saw its user, and applies the location rule.
    pub fn attest_location(
        &self,
        caller: Caller,
        user: UserAddress,
        attestation: Attestation,
        now_ms: u64,
    ) -> ApiResult<UserRecord> {
        require_network(caller, user.network)?;
        self.require_active(caller)?;
        check_attestation(&attestation, now_ms)?;
        let key = user_key(&user);
        {
            let _guard = self.lock();
            self.store.write(|tx| {
                let mut record = enlisted_record(tx, &key)?;
                add_attestation(&mut record, attestation);
                tx.put(USERS, &key, &record)?;
                Ok::<_, ApiError>(())
            })?;
        }
        self.apply_location_rule(user, now_ms, now_ms)?;
        self.user_record(&user)?.ok_or_else(ApiError::not_found)
    }

    /// Re-evaluates every enlisted user whose standing may have lapsed.
    ///
    /// A standing that lapses before the next sweep is applied now: the user is told and made
    /// unreachable up to one sweep interval early, never late (the data plane reads the
    /// standing, not the clock, so that the notice always comes first).
    pub fn location_sweep(&self, now_ms: u64) -> ApiResult<usize> {
        let mut changed = 0;
        let horizon = now_ms + u64::from(self.settings.location_sweep_s) * 1000;
        let rule_off = self.settings.location == location::LocationRule::Off;
        let due = self.policy.users_where(|policy| {
            let lapsed = policy.in_region && policy.region_until_ms.is_some_and(|u| u <= horizon);
            let rule_off_now = !policy.in_region && rule_off;
            policy.enlisted && (lapsed || rule_off_now)
        });
        for user in due {
            if self.apply_location_rule(user, now_ms, horizon)? {
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Applies the rule to one user. A user who falls outside is told (a `Notice` with the
    /// reason) before it is made unreachable; one who comes back is reachable again at once,
    /// without re-enlisting. Returns whether the standing changed.
    fn apply_location_rule(
        &self,
        user: UserAddress,
        now_ms: u64,
        judged_at_ms: u64,
    ) -> ApiResult<bool> {
        let key = user_key(&user);
        let _guard = self.lock();
        let Some(mut record) = self
            .store
            .get::<UserRecord>(USERS, &key)?
            .filter(|r| r.enlisted)
        else {
            return Ok(false);
        };
        let standing = self
            .settings
            .location
            .evaluate(judged_at_ms, record.last_in_eea_ms);
        self.policy
            .update_user(&user, |p| p.region_until_ms = standing.until_ms);
        if standing.in_region == record.in_region {
            return Ok(false);
        }
        record.in_region = standing.in_region;
        let window = self.settings.location.describe();
        let (text, code) = if standing.in_region {
            (
                format!(
                    "you meet the location rule ({window}) again: other networks can reach you"
                ),
                0,
            )
        } else {
            (
                format!(
                    "no attestation inside the EEA within the rule's window ({window}): other networks can no longer reach you, and you cannot reach them, until your provider attests you in the EEA"
                ),
                ErrorCode::RecipientOutsideRegion.as_u16(),
            )
        };
        self.store.write(|tx| {
            tx.put(USERS, &key, &record)?;
            events::append(
                tx,
                now_ms,
                EventKind::LocationChanged,
                user.network.0,
                json!({"user": UserRef::of(user), "in_region": standing.in_region, "rule": window}),
            )?;
            Ok::<_, ApiError>(())
        })?;
        let notice = Notice {
            notice_id: MessageId(u128::from(now_ms) << 64 | user.user.0 & u128::from(u64::MAX)),
            kind: NoticeKind::LocationChange,
            audience: Some(user),
            effective_at_ms: now_ms,
            code,
            text,
        };
        // The standing is stored and enforced whether or not the notice reaches the
        // user's sessions now: a rule is not held back by a slow core.
        let told = if standing.in_region {
            self.policy.update_user(&user, |p| p.in_region = true);
            self.data_plane.notice_user(user, notice)
        } else {
            // The notice is queued for the user's sessions before the policy changes.
            let told = self.data_plane.notice_user(user, notice);
            self.policy.update_user(&user, |p| p.in_region = false);
            told
        };
        if let Err(e) = told {
            tracing::warn!(%user, "location notice not delivered: {}", e.message);
        }
        tracing::info!(%user, in_region = standing.in_region, "location standing changed");
        Ok(true)
    }
}

/// The record of an enlisted user, or `NOT_FOUND`.
fn enlisted_record(tx: &mut Tx<'_>, key: &str) -> ApiResult<UserRecord> {
    tx.get::<UserRecord>(USERS, key)?
        .filter(|r| r.enlisted)
        .ok_or_else(ApiError::not_found)
}

/// The store key of an identifier: its hash, then the network (identifiers are per network:
/// one network's users cannot take, or learn about, another's numbers), so that discovery
/// finds every network's holder with one prefix scan.
fn id_key(user: &UserAddress, identifier: &Identifier) -> String {
    format!("{}|{:010}", hex(&identifier.hash()), user.network.0)
}

fn add_attestation(record: &mut UserRecord, attestation: Attestation) {
    if location::in_eea(&attestation.country) {
        record.last_in_eea_ms = Some(
            record
                .last_in_eea_ms
                .map_or(attestation.observed_at_ms, |t| {
                    t.max(attestation.observed_at_ms)
                }),
        );
    }
    record.locations.push(attestation);
    record.locations.sort_by_key(|a| a.observed_at_ms);
    if record.locations.len() > ATTESTATIONS_KEPT {
        let excess = record.locations.len() - ATTESTATIONS_KEPT;
        record.locations.drain(..excess);
    }
}
