//! Discovery: one identifier, or a phone book of up to `discovery_batch_max` at once, in,
//! hashed (see `identifier.rs` for the hash and why it is not enough alone); only users who
//! are enlisted, discoverable and reachable by the requesting user come back. A miss is
//! just absent from the answer: "not registered" and "not discoverable" look the same.
//! Each request is charged to the partner's and the requesting user's rate limits.

use codec::{ErrorCode, UserAddress};
use devkit::hex::{hex, parse_hex32};
use serde::{Deserialize, Serialize};

use super::identifier::Identifier;
use super::ratelimit::Key;
use super::store::{IDENTIFIERS, MOVED, Reader, USERS};
use super::users::{Moved, UserRecord};
use super::{ApiError, ApiResult, Caller, ControlPlane, String32, UserRef, caller_network};
use crate::tables::policy::{PartnerStatus, Party};

/// `POST /v1/discovery/lookup` and `/v1/discovery/bulk`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryRequest {
    /// The caller's user on whose behalf it looks up (rate-limited per user).
    pub requester: String32,
    pub identifier_hashes: Vec<String>,
}

/// How the requester may reach a match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Contact {
    /// Envelopes pass; devices and keys are available.
    Direct,
    /// The first envelope (or key claim) becomes a message request; nothing more of the
    /// user (devices, keys) is given before it is accepted.
    Request,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Match {
    pub identifier_hash: String,
    pub user: UserRef,
    pub contact: Contact,
    /// Only for `direct`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<u32>,
    /// For a former identifier looked up by a contact during the grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<Identifier>,
}

const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 24 * 60 * MINUTE_MS;

impl ControlPlane {
    pub fn discover(
        &self,
        caller: Caller,
        request: DiscoveryRequest,
        now_ms: u64,
    ) -> ApiResult<Vec<Match>> {
        let network = caller_network(caller)?;
        let max = self.settings.discovery_batch_max as usize;
        if request.identifier_hashes.len() > max {
            return Err(ApiError::new(
                ErrorCode::DiscoveryBatchTooLarge,
                format!(
                    "{} identifiers in one request; at most {max}",
                    request.identifier_hashes.len()
                ),
            ));
        }
        let mut hashes = Vec::with_capacity(request.identifier_hashes.len());
        for text in &request.identifier_hashes {
            let lower = text.to_ascii_lowercase();
            parse_hex32(&lower).ok_or_else(|| {
                ApiError::malformed(format!(
                    "identifier_hashes: {text:?} is not 64 hex digits (SHA-256)"
                ))
            })?;
            hashes.push(lower);
        }
        let requester = UserAddress {
            network,
            user: codec::UserId(request.requester.0),
        };
        if self.policy.network_status(network) == Some(PartnerStatus::Suspended) {
            return Err(ApiError::new(
                ErrorCode::PartnerSuspended,
                "a suspended network cannot discover users",
            ));
        }
        let requester_policy = self
            .policy
            .user(&requester)
            .filter(|p| p.enlisted)
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::SenderNotEnlisted,
                    "the requesting user has not opted in to interoperability",
                )
            })?;
        if !requester_policy.in_region {
            return Err(ApiError::new(
                ErrorCode::SenderOutsideRegion,
                "the requesting user does not meet the location rule",
            ));
        }
        let partner_limit = self
            .partner_get(network.0)?
            .map_or(self.settings.discovery_per_partner_per_min, |p| {
                p.limits.discovery_per_min
            })
            .min(self.settings.discovery_per_partner_per_min);
        let cost = u32::try_from(hashes.len()).unwrap_or(u32::MAX).max(1);
        let limits = [
            (Key::Partner(network), partner_limit, MINUTE_MS),
            (
                Key::User(requester),
                self.settings.discovery_per_user_per_day,
                DAY_MS,
            ),
        ];
        let taken = self
            .limiter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(network, now_ms, cost, &limits);
        if let Err(refused) = taken {
            return Err(ApiError::rate_refused("discovery rate", refused));
        }
        let reader = self.store.reader()?;
        let mut matches = Vec::new();
        for hash in hashes {
            self.resolve(&reader, &requester, &hash, now_ms, &mut matches)?;
        }
        Ok(matches)
    }

    /// Every user holding `hash` on any network (each network has its own identifiers: the
    /// same number may be a user on several), or that held it and moved, for a contact.
    fn resolve(
        &self,
        reader: &Reader,
        requester: &UserAddress,
        hash: &str,
        now_ms: u64,
        matches: &mut Vec<Match>,
    ) -> ApiResult<()> {
        let prefix = format!("{hash}|");
        for (_, key) in reader.scan::<String>(IDENTIFIERS, &prefix)? {
            if let Some(record) = reader.get::<UserRecord>(USERS, &key)?
                && record.discoverable()
                && let Some(found) = self.reachable(requester, &record, hash, None)
            {
                matches.push(found);
            }
        }
        for (_, moved) in reader.scan::<Moved>(MOVED, &prefix)? {
            if let Some(found) = self.resolve_moved(reader, requester, hash, now_ms, moved)? {
                matches.push(found);
            }
        }
        Ok(())
    }

    fn resolve_moved(
        &self,
        reader: &Reader,
        requester: &UserAddress,
        hash: &str,
        now_ms: u64,
        moved: Moved,
    ) -> ApiResult<Option<Match>> {
        if moved.until_ms <= now_ms {
            return Ok(None);
        }
        let user = moved.user.address();
        if !self.is_contact(requester, &user) {
            return Ok(None);
        }
        let Some(record) = reader.get::<UserRecord>(USERS, &super::user_key(&user))? else {
            return Ok(None);
        };
        if !record.discoverable() {
            return Ok(None);
        }
        Ok(self.reachable(requester, &record, hash, Some(moved.new)))
    }

    /// A match if the policy lets `requester` reach the user directly or by a request.
    fn reachable(
        &self,
        requester: &UserAddress,
        record: &UserRecord,
        hash: &str,
        moved_to: Option<Identifier>,
    ) -> Option<Match> {
        let user = record.address();
        let contact = match self.policy.peek(requester, &user) {
            Ok(()) => Contact::Direct,
            Err(ErrorCode::MessageRequestPending) => Contact::Request,
            Err(_) => return None,
        };
        Some(Match {
            identifier_hash: hash.to_string(),
            user: UserRef::of(user),
            contact,
            devices: match contact {
                Contact::Direct => record.devices.clone(),
                Contact::Request => Vec::new(),
            },
            moved_to,
        })
    }

    /// Whether `b` knows `a` by its own doing: it accepted `a`'s request, wrote to `a` (or
    /// asked `a`), or keeps one of `a`'s identifiers in its contact book. What `a` did alone
    /// (writing to `b`, asking `b`) does not count: a changed identifier must not reach the
    /// very sender its owner wanted to leave behind.
    fn is_contact(&self, a: &UserAddress, b: &UserAddress) -> bool {
        if self.policy.has_accepted(b, Party::User(*a)) {
            return true;
        }
        match (self.policy.user(a), self.policy.user(b)) {
            (Some(a), Some(b)) => a.identifiers.iter().any(|h| b.contact_book.contains(h)),
            _ => false,
        }
    }
}

/// The hash a partner sends for an identifier (for tools and tests).
pub fn identifier_hash(identifier: &Identifier) -> String {
    hex(&identifier.hash())
}
