//! The bytes a network signs (Ed25519, with its device-token key) to prove that one of its
//! users opted in to interoperability: the relay enlists a user only with this signature.
//! Text, one field per line, so that any implementation can reproduce it exactly:
//!
//! ```text
//! a7-consent-v1\n<network decimal>\n<user: 32 lowercase hex digits>\n<opted_in_at_ms decimal>\n<model>\n<discoverable: true|false>\n
//! ```
//!
//! `model` is one of `everyone`, `request_always`, `request_unknown`, `request_per_network`.

use crate::UserAddress;

pub const CONSENT_CONTEXT: &str = "a7-consent-v1";

pub fn signed_bytes(
    user: &UserAddress,
    opted_in_at_ms: u64,
    model: &str,
    discoverable: bool,
) -> Vec<u8> {
    format!(
        "{CONSENT_CONTEXT}\n{}\n{:032x}\n{opted_in_at_ms}\n{model}\n{discoverable}\n",
        user.network.0, user.user.0
    )
    .into_bytes()
}
