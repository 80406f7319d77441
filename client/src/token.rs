//! Device tokens: the credential a device presents in `Hello` when it connects directly
//! (`Role::Device`), signed with its network's Ed25519 key (protocol section 4.1).
//!
//! A network mints tokens on its own servers and hands them to its devices; the relay checks
//! them with the network's public key, which its operator configured.

use codec::{DeviceAddress, DeviceToken, device_token_signed_bytes};
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::error::ClientError;

/// Signs a device token with the network's Ed25519 key (PKCS#8 DER, v1 or v2).
///
/// `token_id` must be unique per token (the relay refuses a replayed id); a random `u128` is
/// the simplest choice.
pub fn mint_device_token(
    network_key_pkcs8: &[u8],
    device: DeviceAddress,
    expires_at_ms: u64,
    token_id: u128,
) -> Result<DeviceToken, ClientError> {
    let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(network_key_pkcs8)
        .map_err(|e| ClientError::InvalidKey(format!("not a PKCS#8 Ed25519 key: {e}")))?;
    let signed = device_token_signed_bytes(device, expires_at_ms, token_id);
    let signature: [u8; 64] = key
        .sign(&signed)
        .as_ref()
        .try_into()
        .map_err(|_| ClientError::InvalidKey("Ed25519 signature is not 64 bytes".into()))?;
    Ok(DeviceToken {
        device,
        expires_at_ms,
        token_id,
        signature,
    })
}

/// A fresh Ed25519 network key, PKCS#8 v2 DER. For tests and development setups; production
/// keys belong in the network's key management.
///
/// # Panics
///
/// If the operating system's random number generator fails.
pub fn generate_network_key() -> Vec<u8> {
    match Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()) {
        Ok(document) => document.as_ref().to_vec(),
        Err(_) => panic!("the system random number generator failed"),
    }
}

/// The 32-byte Ed25519 public key of a network key (what the relay's operator configures).
pub fn network_public_key(network_key_pkcs8: &[u8]) -> Result<[u8; 32], ClientError> {
    let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(network_key_pkcs8)
        .map_err(|e| ClientError::InvalidKey(format!("not a PKCS#8 Ed25519 key: {e}")))?;
    key.public_key()
        .as_ref()
        .try_into()
        .map_err(|_| ClientError::InvalidKey("Ed25519 public key is not 32 bytes".into()))
}

/// Whether `token`'s signature verifies with the network's 32-byte Ed25519 public key.
/// Expiry and replay are the relay's to check.
pub fn verify_device_token(network_public_key: &[u8], token: &DeviceToken) -> bool {
    UnparsedPublicKey::new(&ED25519, network_public_key)
        .verify(&token.signed_bytes(), &token.signature)
        .is_ok()
}
