//! Device tokens: minted tokens verify with ring against the network's public key, over the
//! exact bytes of protocol section 4.1; altered or foreign tokens do not.

use client::{
    ClientError, generate_network_key, mint_device_token, network_public_key, verify_device_token,
};
use codec::{DeviceAddress, DeviceId, DeviceToken, NetworkId, UserId};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

fn me() -> DeviceAddress {
    DeviceAddress::new(NetworkId(2), UserId(0x2002), DeviceId(3))
}

fn ring_verifies(public_key: &[u8], token: &DeviceToken) -> bool {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&token.signed_bytes(), &token.signature)
        .is_ok()
}

#[test]
fn a_minted_token_verifies_with_the_network_public_key() {
    let key = generate_network_key();
    let public = Ed25519KeyPair::from_pkcs8(&key)
        .expect("PKCS#8 v2")
        .public_key()
        .as_ref()
        .to_vec();
    let token = mint_device_token(&key, me(), 1_900_000_000_000, 0xDEAD_BEEF).expect("mint");
    assert_eq!(token.device, me());
    assert_eq!(token.expires_at_ms, 1_900_000_000_000);
    assert_eq!(token.token_id, 0xDEAD_BEEF);
    assert!(ring_verifies(&public, &token));
    assert!(verify_device_token(&public, &token));
    assert_eq!(
        network_public_key(&key).expect("public").as_slice(),
        &public[..]
    );
}

#[test]
fn the_signature_covers_the_documented_bytes() {
    let key = generate_network_key();
    let token = mint_device_token(&key, me(), 5, 6).expect("mint");
    let mut expected = Vec::new();
    expected.extend_from_slice(b"A7TOKEN1");
    expected.extend_from_slice(&2u32.to_le_bytes());
    expected.extend_from_slice(&0x2002u128.to_le_bytes());
    expected.extend_from_slice(&3u32.to_le_bytes());
    expected.extend_from_slice(&5u64.to_le_bytes());
    expected.extend_from_slice(&6u128.to_le_bytes());
    assert_eq!(token.signed_bytes().as_slice(), &expected[..]);
    let public = network_public_key(&key).expect("public");
    assert!(
        UnparsedPublicKey::new(&ED25519, &public)
            .verify(&expected, &token.signature)
            .is_ok()
    );
}

#[test]
fn an_altered_or_forged_token_does_not_verify() {
    let key = generate_network_key();
    let public = network_public_key(&key).expect("public");
    let token = mint_device_token(&key, me(), 1_900_000_000_000, 1).expect("mint");

    let mut later = token.clone();
    later.expires_at_ms += 1;
    assert!(!ring_verifies(&public, &later));

    let mut other_device = token.clone();
    other_device.device.device = DeviceId(4);
    assert!(!ring_verifies(&public, &other_device));

    let mut other_user = token.clone();
    other_user.device.user = UserId(0x2003);
    assert!(!ring_verifies(&public, &other_user));

    let mut other_network = token.clone();
    other_network.device.network = NetworkId(1);
    assert!(!ring_verifies(&public, &other_network));

    let mut reused = token.clone();
    reused.token_id = 2;
    assert!(!ring_verifies(&public, &reused));

    let mut flipped = token.clone();
    flipped.signature[17] ^= 0x01;
    assert!(!ring_verifies(&public, &flipped));
    assert!(!verify_device_token(&public, &flipped));

    // Signed by another network's key.
    let forged =
        mint_device_token(&generate_network_key(), me(), 1_900_000_000_000, 1).expect("mint");
    assert!(!ring_verifies(&public, &forged));
    assert!(!verify_device_token(&public, &forged));

    // The untouched token still verifies.
    assert!(ring_verifies(&public, &token));
}

#[test]
fn a_key_that_is_not_pkcs8_ed25519_is_refused() {
    let error = mint_device_token(b"not a key", me(), 1, 1).expect_err("bad key");
    assert!(matches!(error, ClientError::InvalidKey(_)), "got {error:?}");
    assert!(matches!(
        network_public_key(&[0u8; 16]),
        Err(ClientError::InvalidKey(_))
    ));
}

#[test]
fn a_token_survives_the_wire_in_hello() {
    let key = generate_network_key();
    let token = mint_device_token(&key, me(), 1_900_000_000_000, 9).expect("mint");
    let hello = codec::Hello {
        version_min: 1,
        version_max: 1,
        role: codec::Role::Device,
        features: 0,
        agent: "token-test".into(),
        token: Some(token.clone()),
    };
    let bytes = codec::encode_to_bytes(&hello, &[]).expect("encode");
    let decoded = codec::decode(&bytes).expect("decode");
    let codec::HeaderRef::Hello(archived) = decoded.header else {
        panic!("expected Hello");
    };
    let archived_token = archived.token.as_ref().expect("token");
    let public = network_public_key(&key).expect("public");
    assert!(
        UnparsedPublicKey::new(&ED25519, &public)
            .verify(&archived_token.signed_bytes(), &archived_token.signature)
            .is_ok()
    );
}
