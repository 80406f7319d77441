//! The control plane's costs: the policy check every cross-network frame pays on the data
//! plane, and the control operations a network calls (discovery of a phone book, a key
//! claim, an enlistment), without HTTP.
//!
//! Run: `cargo bench --bench control` (about a minute; the store commits with fsync, so the
//! figures of the write operations are the disk's).

use std::hint::black_box;
use std::sync::Arc;

use base64::Engine as _;
use codec::{NetworkId, Role, UserAddress, UserId};
use criterion::{Criterion, criterion_group, criterion_main};
use relay::control::discovery::DiscoveryRequest;
use relay::control::identifier::{Identifier, IdentifierType};
use relay::control::keys::{Claim, KeyUpload, PreKey, Protocol, SignedPreKey};
use relay::control::users::{
    Attestation, ConsentRecord, Enlistment, IdentifierInput, consent_message,
};
use relay::control::{Caller, ControlPlane, InteropSettings, Links, NoDataPlane, String32};
use relay::tables::auth::{Auth, NetworkEntry};
use relay::tables::policy::{ConsentModel, Policy};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};

const USERS: u32 = 2_000;
const PHONE_BOOK: usize = 1_000;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

struct Setup {
    control: ControlPlane,
    keys: Vec<Ed25519KeyPair>,
    dir: std::path::PathBuf,
}

fn phone(n: u32) -> String {
    format!("+49170{n:07}")
}

fn setup() -> Setup {
    let dir = std::env::temp_dir().join(format!("a7-bench-control-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rng = SystemRandom::new();
    let mut keys = Vec::new();
    let mut networks = Vec::new();
    for id in [1u32, 2] {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        networks.push(NetworkEntry {
            id: NetworkId(id),
            name: format!("n{id}"),
            server_roles: vec![Role::PartnerServer],
            cert_sha256: vec![[u8::try_from(id).unwrap(); 32]],
            token_public_key: Some(key.public_key().as_ref().try_into().unwrap()),
            client_ca_der: Vec::new(),
        });
        keys.push(key);
    }
    let links = Links {
        auth: Arc::new(Auth::new(networks.clone(), 16).unwrap()),
        policy: Arc::new(Policy::new(true)),
        data_plane: Arc::new(NoDataPlane),
    };
    let now = devkit::now_ms();
    // The claim limits are the relay's defence, not what is measured here.
    let settings = InteropSettings {
        key_claims_per_pair_per_day: u32::MAX,
        key_claims_per_partner_per_min: u32::MAX,
        ..InteropSettings::default()
    };
    let control = ControlPlane::open(&dir, settings, &networks, Vec::new(), links, now).unwrap();
    let setup = Setup { control, keys, dir };
    for u in 0..USERS {
        let network = 1 + u % 2;
        setup.enlist(
            UserAddress::new(NetworkId(network), UserId(u128::from(u))),
            Some(phone(u)),
        );
    }
    setup
}

impl Setup {
    fn enlist(&self, user: UserAddress, phone: Option<String>) {
        let at = devkit::now_ms();
        let key = &self.keys[usize::try_from(user.network.0 - 1).unwrap()];
        let model = ConsentModel::Everyone;
        let request = Enlistment {
            consent: Some(ConsentRecord {
                opted_in_at_ms: at,
                model,
                discoverable: true,
                signature: b64(key.sign(&consent_message(&user, at, model, true)).as_ref()),
            }),
            identifiers: phone
                .map(|value| IdentifierInput {
                    kind: IdentifierType::Phone,
                    value,
                })
                .into_iter()
                .collect(),
            devices: Some(vec![1, 2]),
            test: false,
            location: Some(Attestation {
                country: "DE".into(),
                observed_at_ms: at,
            }),
        };
        self.control
            .enlist(Caller::Network(user.network), user, request, at)
            .unwrap();
    }
}

fn bench(c: &mut Criterion) {
    let setup = setup();
    let control = &setup.control;
    let (gk, partner) = (
        UserAddress::new(NetworkId(1), UserId(0)),
        UserAddress::new(NetworkId(2), UserId(1)),
    );
    let policy = control.policy.clone();
    // Warm the accepted-pair maps as traffic does.
    let first = policy.check(&gk, &partner);
    first.result.unwrap();
    if let Some(contact) = first.contact {
        policy.record_contact(contact);
    }
    c.bench_function("policy/check cross-network, both enlisted", |b| {
        b.iter(|| policy.check(black_box(&gk), black_box(&partner)))
    });
    let same = UserAddress::new(NetworkId(1), UserId(2));
    c.bench_function("policy/check same network (not interop)", |b| {
        b.iter(|| policy.check(black_box(&gk), black_box(&same)))
    });
    let book: Vec<String> = (0..u32::try_from(PHONE_BOOK).unwrap())
        .map(|n| {
            // Half the phone book is enlisted, half unknown.
            let number = if n % 2 == 0 { n } else { USERS + n };
            relay::control::discovery::identifier_hash(
                &Identifier::parse(IdentifierType::Phone, &phone(number)).unwrap(),
            )
        })
        .collect();
    let mut group = c.benchmark_group("control");
    group.sample_size(20);
    // Each iteration a day later, so the rate limits (charged as usual) never refuse.
    let mut clock = devkit::now_ms();
    group.bench_function("discovery/bulk 1000 hashes (500 enlisted)", |b| {
        b.iter(|| {
            clock += 24 * 3600 * 1000;
            let request = DiscoveryRequest {
                requester: String32(0),
                identifier_hashes: book.clone(),
            };
            let matches = control
                .discover(Caller::Network(NetworkId(1)), request, clock)
                .unwrap();
            assert_eq!(matches.len(), PHONE_BOOK / 2);
            matches
        })
    });
    let key32 = b64(&[7u8; 32]);
    let sig64 = b64(&[9u8; 64]);
    let upload = |first: u32| KeyUpload {
        identity_key: Some(key32.clone()),
        signed_prekey: Some(SignedPreKey {
            id: 1,
            key: key32.clone(),
            signature: sig64.clone(),
        }),
        last_resort_prekey: None,
        one_time_prekeys: (first..first + 1000)
            .map(|id| PreKey {
                id,
                key: key32.clone(),
            })
            .collect(),
        key_packages: Vec::new(),
        last_resort_key_package: None,
    };
    let mut next = 0;
    control
        .upload_keys(Caller::Network(NetworkId(2)), partner, 1, upload(next))
        .unwrap();
    next += 1000;
    let mut claimed = 0;
    group.bench_function("keys/claim (one bundle per device, commit)", |b| {
        b.iter(|| {
            claimed += 1;
            if claimed % 900 == 0 {
                control
                    .upload_keys(Caller::Network(NetworkId(2)), partner, 1, upload(next))
                    .unwrap();
                next += 1000;
            }
            let claim = Claim {
                requester: String32(0),
                protocol: Protocol::Signal,
            };
            control
                .claim_keys(
                    Caller::Network(NetworkId(1)),
                    partner,
                    claim,
                    devkit::now_ms(),
                )
                .unwrap()
        })
    });
    let mut n = 0u128;
    group.bench_function("users/enlist (signature check, commit)", |b| {
        b.iter(|| {
            n += 1;
            setup.enlist(UserAddress::new(NetworkId(2), UserId(1_000_000 + n)), None);
        })
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&setup.dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
