//! The stored records of users: the consent a network collected, location attestations,
//! whom a user accepted, and the user record itself (JSON in the control store). Shared by
//! the modules that read and write users (`users`, `requests`, `keys`, `discovery`).

use std::collections::HashSet;
use std::sync::Arc;

use devkit::hex::parse_hex32;
use serde::{Deserialize, Serialize};

use super::UserRef;
use super::identifier::Identifier;
use crate::tables::policy::{ConsentModel, Party, UserPolicy};
use codec::{NetworkId, UserAddress};

/// The opt-in a network collected from its user, signed with the network's Ed25519 key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentRecord {
    pub opted_in_at_ms: u64,
    /// How the user chose to be reached.
    pub model: ConsentModel,
    /// Whether lookups by identifier may find the user.
    pub discoverable: bool,
    /// Ed25519 signature (base64) over [`consent_message`].
    pub signature: String,
}

/// The bytes a consent record's signature covers (`codec::consent`).
pub fn consent_message(
    user: &UserAddress,
    opted_in_at_ms: u64,
    model: ConsentModel,
    discoverable: bool,
) -> Vec<u8> {
    let model = serde_json::to_value(model)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    codec::consent::signed_bytes(user, opted_in_at_ms, &model, discoverable)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attestation {
    /// ISO 3166-1 alpha-2.
    pub country: String,
    pub observed_at_ms: u64,
}

/// Whom a user accepted: a user, or (model iv) a whole network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accepted {
    User(UserRef),
    Network(u32),
}

impl Accepted {
    pub fn party(self) -> Party {
        match self {
            Accepted::User(u) => Party::User(u.address()),
            Accepted::Network(n) => Party::Network(NetworkId(n)),
        }
    }

    pub fn of(party: Party) -> Accepted {
        match party {
            Party::User(u) => Accepted::User(UserRef::of(u)),
            Party::Network(n) => Accepted::Network(n.0),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub network: u32,
    pub user: super::String32,
    pub enlisted: bool,
    pub test: bool,
    pub consent: Option<ConsentRecord>,
    pub enlisted_at_ms: Option<u64>,
    pub opted_out_at_ms: Option<u64>,
    pub identifiers: Vec<Identifier>,
    pub devices: Vec<u32>,
    /// SHA-256 (hex) of the identifiers in the user's contact book.
    pub contact_book: Vec<String>,
    pub accepted: Vec<Accepted>,
    pub locations: Vec<Attestation>,
    pub last_in_eea_ms: Option<u64>,
    pub in_region: bool,
}

impl UserRecord {
    pub fn address(&self) -> UserAddress {
        UserRef {
            network: self.network,
            user: self.user,
        }
        .address()
    }

    pub fn model(&self) -> ConsentModel {
        self.consent
            .as_ref()
            .map_or(ConsentModel::RequestAlways, |c| c.model)
    }

    pub fn discoverable(&self) -> bool {
        self.consent.as_ref().is_some_and(|c| c.discoverable)
    }

    pub(super) fn policy(&self, region_until_ms: Option<u64>) -> UserPolicy {
        UserPolicy {
            enlisted: self.enlisted,
            test: self.test,
            model: self.model(),
            in_region: self.in_region,
            region_until_ms,
            identifiers: self.identifiers.iter().map(Identifier::hash).collect(),
            contact_book: Arc::new(
                self.contact_book
                    .iter()
                    .filter_map(|h| parse_hex32(h))
                    .collect::<HashSet<_>>(),
            ),
        }
    }
}
