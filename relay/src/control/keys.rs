//! The key directory, protocol-agnostic: per device an identity key, a signed prekey, a
//! last-resort prekey and one-time prekeys (Signal protocol), and MLS KeyPackages
//! (RFC 9420) with a last-resort KeyPackage. The device's network uploads; any network
//! allowed to reach the user claims. A one-time prekey or KeyPackage is handed out once:
//! the claim removes it in the same write transaction that reads it, and the store
//! serializes writers, so concurrent claims never see the same key. When none is left the
//! last-resort key is returned and the owner's network is told to upload more.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use codec::{ErrorCode, UserAddress};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::events::{self, EventKind};
use super::ratelimit::Key;
use super::store::{DEVICE_KEYS, META, ONE_TIME_KEYS, Tx, USERS};
use super::users::UserRecord;
use super::{
    ApiError, ApiResult, Caller, ControlPlane, String32, UserRef, caller_network, require_network,
    user_key,
};

/// One-time prekeys or KeyPackages in one upload.
pub const UPLOAD_KEYS_MAX: usize = 1000;
/// One-time prekeys (and, separately, KeyPackages) stored per device.
pub const STORED_KEYS_MAX: u64 = 10_000;
/// The largest KeyPackage accepted.
pub const KEY_PACKAGE_BYTES_MAX: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreKey {
    pub id: u32,
    /// base64 public key.
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedPreKey {
    pub id: u32,
    pub key: String,
    /// base64 signature by the identity key.
    pub signature: String,
}

/// `PUT /v1/keys/{network}/{user}/{device}`: every field optional; one-time keys and
/// KeyPackages are added to those stored, the others replace.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyUpload {
    pub identity_key: Option<String>,
    pub signed_prekey: Option<SignedPreKey>,
    pub last_resort_prekey: Option<SignedPreKey>,
    #[serde(default)]
    pub one_time_prekeys: Vec<PreKey>,
    #[serde(default)]
    pub key_packages: Vec<String>,
    pub last_resort_key_package: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceKeys {
    pub identity_key: Option<String>,
    pub signed_prekey: Option<SignedPreKey>,
    pub last_resort_prekey: Option<SignedPreKey>,
    pub last_resort_key_package: Option<String>,
    pub one_time_prekeys: u64,
    pub key_packages: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Signal,
    Mls,
}

/// `POST /v1/keys/{network}/{user}/claim`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    /// The caller's user who will encrypt to the devices.
    pub requester: String32,
    pub protocol: Protocol,
}

/// One device's keys as handed out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    pub device: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signed_prekey: Option<SignedPreKey>,
    /// Signal: the one-time prekey, or the last-resort prekey when none is left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prekey: Option<SignedOrOneTime>,
    /// MLS: a KeyPackage (base64), or the last-resort one when none is left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_package: Option<String>,
    /// The one-time keys ran out and a last-resort key was handed out instead.
    pub last_resort: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SignedOrOneTime {
    Signed(SignedPreKey),
    OneTime(PreKey),
}

/// Decodes base64 key material of `lengths` bytes.
fn check_key(field: &str, value: &str, lengths: &[usize]) -> ApiResult<()> {
    let bytes = BASE64
        .decode(value)
        .map_err(|_| ApiError::new(ErrorCode::KeysInvalid, format!("{field}: not base64")))?;
    if !lengths.contains(&bytes.len()) {
        return Err(ApiError::new(
            ErrorCode::KeysInvalid,
            format!("{field}: {} bytes, expected {lengths:?}", bytes.len()),
        ));
    }
    Ok(())
}

/// Curve25519 public keys: 32 bytes, or 33 with the Signal type byte.
const PUBLIC_KEY_LENGTHS: [usize; 2] = [32, 33];

fn check_signed(field: &str, key: &SignedPreKey) -> ApiResult<()> {
    check_key(&format!("{field}.key"), &key.key, &PUBLIC_KEY_LENGTHS)?;
    check_key(&format!("{field}.signature"), &key.signature, &[64])
}

fn check_key_package(field: &str, value: &str) -> ApiResult<()> {
    let bytes = BASE64
        .decode(value)
        .map_err(|_| ApiError::new(ErrorCode::KeysInvalid, format!("{field}: not base64")))?;
    if bytes.is_empty() || bytes.len() > KEY_PACKAGE_BYTES_MAX {
        return Err(ApiError::new(
            ErrorCode::KeysInvalid,
            format!("{field}: 1 to {KEY_PACKAGE_BYTES_MAX} bytes"),
        ));
    }
    Ok(())
}

fn device_key(user: &UserAddress, device: u32) -> String {
    format!("{}:{device}", user_key(user))
}

fn count(tx: &mut Tx<'_>, prefix: &str) -> ApiResult<u64> {
    Ok(tx.keys(ONE_TIME_KEYS, prefix, usize::MAX)?.len() as u64)
}

impl ControlPlane {
    /// The device's network uploads keys.
    pub fn upload_keys(
        &self,
        caller: Caller,
        user: UserAddress,
        device: u32,
        upload: KeyUpload,
    ) -> ApiResult<DeviceKeys> {
        require_network(caller, user.network)?;
        self.require_active(caller)?;
        if let Some(key) = &upload.identity_key {
            check_key("identity_key", key, &PUBLIC_KEY_LENGTHS)?;
        }
        if let Some(key) = &upload.signed_prekey {
            check_signed("signed_prekey", key)?;
        }
        if let Some(key) = &upload.last_resort_prekey {
            check_signed("last_resort_prekey", key)?;
        }
        if upload.one_time_prekeys.len() > UPLOAD_KEYS_MAX
            || upload.key_packages.len() > UPLOAD_KEYS_MAX
        {
            return Err(ApiError::new(
                ErrorCode::KeysInvalid,
                format!(
                    "at most {UPLOAD_KEYS_MAX} one-time prekeys and {UPLOAD_KEYS_MAX} KeyPackages per upload"
                ),
            ));
        }
        let mut ids = std::collections::HashSet::new();
        for (i, key) in upload.one_time_prekeys.iter().enumerate() {
            check_key(
                &format!("one_time_prekeys[{i}].key"),
                &key.key,
                &PUBLIC_KEY_LENGTHS,
            )?;
            if !ids.insert(key.id) {
                return Err(ApiError::new(
                    ErrorCode::KeysInvalid,
                    format!("one_time_prekeys: id {} twice", key.id),
                ));
            }
        }
        for (i, package) in upload.key_packages.iter().enumerate() {
            check_key_package(&format!("key_packages[{i}]"), package)?;
        }
        if let Some(package) = &upload.last_resort_key_package {
            check_key_package("last_resort_key_package", package)?;
        }
        let key = device_key(&user, device);
        let _guard = self.lock();
        self.store.write(|tx| {
            let record: UserRecord = tx
                .get(USERS, &user_key(&user))?
                .filter(|r: &UserRecord| r.enlisted && r.devices.contains(&device))
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::NotFound,
                        "no such device of an enlisted user (set its devices first)",
                    )
                })?;
            let _ = record;
            let mut keys: DeviceKeys = tx.get(DEVICE_KEYS, &key)?.unwrap_or_default();
            if upload.identity_key.is_some() {
                keys.identity_key = upload.identity_key.clone();
            }
            if upload.signed_prekey.is_some() {
                keys.signed_prekey = upload.signed_prekey.clone();
            }
            if upload.last_resort_prekey.is_some() {
                keys.last_resort_prekey = upload.last_resort_prekey.clone();
            }
            if upload.last_resort_key_package.is_some() {
                keys.last_resort_key_package = upload.last_resort_key_package.clone();
            }
            for prekey in &upload.one_time_prekeys {
                let entry = format!("{key}|p|{:010}", prekey.id);
                if tx.get::<PreKey>(ONE_TIME_KEYS, &entry)?.is_some() {
                    return Err(ApiError::new(
                        ErrorCode::KeysInvalid,
                        format!("one-time prekey {} is stored already", prekey.id),
                    ));
                }
                tx.put(ONE_TIME_KEYS, &entry, prekey)?;
            }
            for package in &upload.key_packages {
                let seq = tx.next("next_key_package")?;
                tx.put(ONE_TIME_KEYS, &format!("{key}|m|{seq:020}"), package)?;
            }
            keys.one_time_prekeys = count(tx, &format!("{key}|p|"))?;
            keys.key_packages = count(tx, &format!("{key}|m|"))?;
            if keys.one_time_prekeys > STORED_KEYS_MAX || keys.key_packages > STORED_KEYS_MAX {
                return Err(ApiError::new(
                    ErrorCode::KeysInvalid,
                    format!("a device stores at most {STORED_KEYS_MAX} one-time prekeys and as many KeyPackages"),
                ));
            }
            tx.put(DEVICE_KEYS, &key, &keys)?;
            // Fresh keys: the next time they run out is news again.
            for protocol in [Protocol::Signal, Protocol::Mls] {
                tx.delete(META, &format!("keys_low|{key}|{protocol:?}"))?;
            }
            Ok(keys)
        })
    }

    /// The owner reads what is stored for a device (counts, not the one-time keys).
    pub fn device_keys(
        &self,
        caller: Caller,
        user: UserAddress,
        device: u32,
    ) -> ApiResult<DeviceKeys> {
        require_network(caller, user.network)?;
        self.store
            .get(DEVICE_KEYS, &device_key(&user, device))?
            .ok_or_else(ApiError::not_found)
    }

    /// Hands out one bundle per device of `user` to a network allowed to reach it.
    pub fn claim_keys(
        &self,
        caller: Caller,
        user: UserAddress,
        claim: Claim,
        now_ms: u64,
    ) -> ApiResult<Vec<Bundle>> {
        let network = caller_network(caller)?;
        let requester = UserAddress {
            network,
            user: codec::UserId(claim.requester.0),
        };
        // Both users must be enlisted before anything is charged, for claims within the
        // caller's own network too (the interop rules below pass those untouched): claims
        // that name strangers take no bucket from the caller's rate table.
        let enlisted = |u: &UserAddress| self.policy.user(u).is_some_and(|p| p.enlisted);
        if !enlisted(&requester) {
            return Err(ApiError::new(
                ErrorCode::SenderNotEnlisted,
                format!(
                    "user {:032x} has not opted in to interoperability",
                    requester.user.0
                ),
            ));
        }
        if !enlisted(&user) {
            // Never say whether an unknown user exists.
            return Err(ApiError::not_found());
        }
        // The same rules as an envelope: a key claim is a first contact.
        let verdict = self.policy.check(&requester, &user);
        if let Some(contact) = verdict.contact {
            self.policy.record_contact(contact);
        }
        if let Err(code) = verdict.result {
            return Err(match code {
                // Never say whether an unknown user exists.
                ErrorCode::RecipientNotEnlisted => ApiError::not_found(),
                code => ApiError::new(
                    code,
                    format!("user {:032x} may not reach this user now", requester.user.0),
                ),
            });
        }
        let limits = [
            (
                Key::Claims(network),
                self.settings.key_claims_per_partner_per_min,
                60_000,
            ),
            (
                Key::ClaimPair(requester, user),
                self.settings.key_claims_per_pair_per_day,
                super::location::DAY_MS,
            ),
        ];
        let taken = self
            .limiter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(network, now_ms, 1, &limits);
        if let Err(refused) = taken {
            return Err(ApiError::rate_refused("key claim", refused));
        }
        let user_key = user_key(&user);
        let low = u64::from(self.settings.prekeys_low);
        let _guard = self.lock();
        self.store.write(|tx| {
            let record: UserRecord = tx
                .get(USERS, &user_key)?
                .filter(|r: &UserRecord| r.enlisted)
                .ok_or_else(ApiError::not_found)?;
            let mut bundles = Vec::new();
            for &device in &record.devices {
                let key = format!("{user_key}:{device}");
                let Some(mut keys) = tx.get::<DeviceKeys>(DEVICE_KEYS, &key)? else {
                    continue;
                };
                let bundle = match claim.protocol {
                    Protocol::Signal => {
                        let Some(signed) = keys.signed_prekey.clone() else {
                            continue;
                        };
                        let taken = tx.take_first::<PreKey>(ONE_TIME_KEYS, &format!("{key}|p|"))?;
                        let last_resort = taken.is_none();
                        if taken.is_some() {
                            keys.one_time_prekeys = keys.one_time_prekeys.saturating_sub(1);
                        }
                        Bundle {
                            device,
                            identity_key: keys.identity_key.clone(),
                            signed_prekey: Some(signed),
                            prekey: match taken {
                                Some((_, one_time)) => Some(SignedOrOneTime::OneTime(one_time)),
                                None => keys.last_resort_prekey.clone().map(SignedOrOneTime::Signed),
                            },
                            key_package: None,
                            last_resort,
                        }
                    }
                    Protocol::Mls => {
                        let taken = tx.take_first::<String>(ONE_TIME_KEYS, &format!("{key}|m|"))?;
                        let last_resort = taken.is_none();
                        if taken.is_some() {
                            keys.key_packages = keys.key_packages.saturating_sub(1);
                        }
                        let package = match taken {
                            Some((_, package)) => Some(package),
                            None => keys.last_resort_key_package.clone(),
                        };
                        if package.is_none() {
                            continue;
                        }
                        Bundle {
                            device,
                            identity_key: None,
                            signed_prekey: None,
                            prekey: None,
                            key_package: package,
                            last_resort,
                        }
                    }
                };
                let left = match claim.protocol {
                    Protocol::Signal => keys.one_time_prekeys,
                    Protocol::Mls => keys.key_packages,
                };
                // Told when the stock crosses the mark and when it is gone (the last one-time
                // key taken, or the first claim served from the last-resort key), once until
                // the next upload: a drained device does not make an event per claim.
                let crossed = !bundle.last_resort && left + 1 == low;
                let exhausted = left == 0;
                let told_key = format!("keys_low|{key}|{:?}", claim.protocol);
                let already_told = exhausted && tx.get::<bool>(META, &told_key)?.is_some();
                if (crossed || exhausted) && !already_told {
                    if exhausted {
                        tx.put(META, &told_key, &true)?;
                    }
                    events::append(
                        tx,
                        now_ms,
                        EventKind::KeysLow,
                        user.network.0,
                        json!({"user": UserRef::of(user), "device": device, "protocol": claim.protocol, "left": left}),
                    )?;
                }
                tx.put(DEVICE_KEYS, &key, &keys)?;
                bundles.push(bundle);
            }
            Ok(bundles)
        })
    }
}
