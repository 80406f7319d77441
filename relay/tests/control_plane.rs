//! The control plane without sockets, on a clock the test moves: the location rule over
//! months, the event feed's retention, one request per pair, and the store across a reopen.

use std::sync::Arc;

use base64::Engine as _;
use codec::{NetworkId, Role, UserAddress, UserId};
use relay::control::users::{Attestation, ConsentRecord, Enlistment, consent_message};
use relay::control::{Caller, ControlPlane, InteropSettings, Links, NoDataPlane};
use relay::tables::auth::{Auth, NetworkEntry};
use relay::tables::policy::{ConsentModel, Policy};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};

const DAY: u64 = 24 * 3600 * 1000;
const T0: u64 = 1_800_000_000_000;

struct World {
    dir: std::path::PathBuf,
    keys: Vec<Ed25519KeyPair>,
    networks: Vec<NetworkEntry>,
    settings: InteropSettings,
}

impl World {
    fn new(name: &str, settings: InteropSettings) -> World {
        let dir = std::env::temp_dir().join(format!("a7-control-{}-{name}", std::process::id()));
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
        World {
            dir,
            keys,
            networks,
            settings,
        }
    }

    fn open(&self, now_ms: u64) -> ControlPlane {
        let auth = Arc::new(Auth::new(self.networks.clone(), 16).unwrap());
        let links = Links {
            auth,
            policy: Arc::new(Policy::new(true)),
            data_plane: Arc::new(NoDataPlane),
        };
        ControlPlane::open(
            &self.dir,
            self.settings.clone(),
            &self.networks,
            Vec::new(),
            links,
            now_ms,
        )
        .unwrap()
    }

    fn enlist(
        &self,
        control: &ControlPlane,
        user: UserAddress,
        model: ConsentModel,
        at: u64,
        country: &str,
    ) {
        let key = &self.keys[usize::try_from(user.network.0 - 1).unwrap()];
        let signature = key.sign(&consent_message(&user, at, model, true));
        let request = Enlistment {
            consent: Some(ConsentRecord {
                opted_in_at_ms: at,
                model,
                discoverable: true,
                signature: base64::engine::general_purpose::STANDARD.encode(signature.as_ref()),
            }),
            identifiers: Vec::new(),
            devices: Some(vec![1]),
            test: false,
            location: Some(Attestation {
                country: country.into(),
                observed_at_ms: at,
            }),
        };
        control
            .enlist(Caller::Network(user.network), user, request, at)
            .unwrap();
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn user(network: u32, id: u128) -> UserAddress {
    UserAddress::new(NetworkId(network), UserId(id))
}

/// What a session and its IO shell do with one cross-network frame: decide, then record
/// the first contact.
fn check(
    policy: &relay::tables::policy::Policy,
    sender: &UserAddress,
    recipient: &UserAddress,
) -> Result<(), codec::ErrorCode> {
    let verdict = policy.check(sender, recipient);
    if let Some(contact) = verdict.contact {
        policy.record_contact(contact);
    }
    verdict.result
}

#[test]
fn the_location_rule_lapses_on_time_and_never_late() {
    let world = World::new("location", InteropSettings::default());
    let control = world.open(T0);
    let (a, b) = (user(1, 1), user(2, 2));
    world.enlist(&control, a, ConsentModel::Everyone, T0, "DE");
    world.enlist(&control, b, ConsentModel::Everyone, T0, "NO");
    assert_eq!(check(&control.policy, &a, &b), Ok(()));
    // Travelling outside the EEA does not lapse the standing inside the window.
    control
        .attest_location(
            Caller::Network(b.network),
            b,
            Attestation {
                country: "US".into(),
                observed_at_ms: T0 + 100 * DAY,
            },
            T0 + 100 * DAY,
        )
        .unwrap();
    assert_eq!(control.location_sweep(T0 + 119 * DAY).unwrap(), 0);
    assert_eq!(check(&control.policy, &a, &b), Ok(()));
    // One sweep interval before the 120 days run out, the sweep applies the lapse: early by
    // at most one interval, never after the window.
    let due = T0 + 120 * DAY;
    let interval = u64::from(InteropSettings::default().location_sweep_s) * 1000;
    assert_eq!(control.location_sweep(due - interval - 1).unwrap(), 0);
    assert_eq!(control.location_sweep(due - interval).unwrap(), 2);
    assert_eq!(
        check(&control.policy, &a, &b),
        Err(codec::ErrorCode::SenderOutsideRegion)
    );
    // An attestation brings one back at once; the other stays out.
    control
        .attest_location(
            Caller::Network(a.network),
            a,
            Attestation {
                country: "FR".into(),
                observed_at_ms: due,
            },
            due,
        )
        .unwrap();
    assert_eq!(
        check(&control.policy, &a, &b),
        Err(codec::ErrorCode::RecipientOutsideRegion)
    );
    // The standing survives a reopen, evaluated again at the new time.
    drop(control);
    let control = world.open(due + DAY);
    assert!(control.policy.user(&a).unwrap().in_region);
    assert!(!control.policy.user(&b).unwrap().in_region);
}

#[test]
fn the_event_feed_forgets_after_its_retention() {
    let settings = InteropSettings {
        events_retention_days: 2,
        ..InteropSettings::default()
    };
    let world = World::new("retention", settings);
    let control = world.open(T0);
    let (a, b) = (user(1, 1), user(2, 2));
    world.enlist(&control, a, ConsentModel::Everyone, T0, "DE");
    world.enlist(&control, b, ConsentModel::RequestAlways, T0, "DE");
    // At T0 network 2 hears of a request; two days later network 1 of its acceptance.
    assert!(check(&control.policy, &a, &b).is_err());
    control.drain_contact_events(T0).unwrap();
    let id = control
        .requests(Caller::Network(b.network), None, 0, 100)
        .unwrap()[0]
        .id;
    control
        .decide_request(Caller::Network(b.network), id, true, T0 + 2 * DAY)
        .unwrap();
    let feed = |network: u32| {
        control
            .events(Caller::Network(NetworkId(network)), 0, 100)
            .unwrap()
            .len()
    };
    assert_eq!((feed(1), feed(2)), (1, 1));
    assert_eq!(control.prune_events(T0 + 2 * DAY + 1).unwrap(), 1);
    assert_eq!((feed(1), feed(2)), (1, 0));
    assert_eq!(control.prune_events(T0 + 2 * DAY + 1).unwrap(), 0);
}

#[test]
fn one_request_per_pair_whatever_became_of_it() {
    let world = World::new("requests", InteropSettings::default());
    let control = world.open(T0);
    let (a, b) = (user(1, 1), user(2, 2));
    world.enlist(&control, a, ConsentModel::Everyone, T0, "DE");
    world.enlist(&control, b, ConsentModel::RequestAlways, T0, "DE");
    let pending = codec::ErrorCode::MessageRequestPending;
    assert_eq!(check(&control.policy, &a, &b), Err(pending));
    assert_eq!(control.drain_contact_events(T0).unwrap(), 2);
    let listed = control
        .requests(Caller::Network(b.network), None, 0, 100)
        .unwrap();
    assert_eq!(listed.len(), 1);
    control
        .decide_request(Caller::Network(b.network), listed[0].id, false, T0)
        .unwrap();
    // After a reopen (the in-memory marks are gone) a new attempt finds the stored request.
    drop(control);
    let control = world.open(T0 + DAY);
    assert_eq!(check(&control.policy, &a, &b), Err(pending));
    control.drain_contact_events(T0 + DAY).unwrap();
    let listed = control
        .requests(Caller::Network(b.network), None, 0, 100)
        .unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(
        control
            .requests(Caller::Network(a.network), None, 0, 100)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn requests_come_in_pages() {
    let world = World::new("request_pages", InteropSettings::default());
    let control = world.open(T0);
    let b = user(2, 2);
    world.enlist(&control, b, ConsentModel::RequestAlways, T0, "DE");
    for sender in 10..15 {
        let a = user(1, sender);
        world.enlist(&control, a, ConsentModel::Everyone, T0, "DE");
        assert!(check(&control.policy, &a, &b).is_err());
    }
    control.drain_contact_events(T0).unwrap();
    let caller = Caller::Network(b.network);
    let first = control.requests(caller, None, 0, 2).unwrap();
    assert_eq!(first.len(), 2);
    let second = control.requests(caller, None, first[1].id, 2).unwrap();
    let third = control.requests(caller, None, second[1].id, 2).unwrap();
    assert_eq!((second.len(), third.len()), (2, 1));
    assert!(first[1].id < second[0].id && second[1].id < third[0].id);
    control
        .decide_request(caller, second[0].id, false, T0)
        .unwrap();
    let refused = control
        .requests(
            caller,
            Some(relay::control::requests::RequestState::Refused),
            0,
            2,
        )
        .unwrap();
    assert_eq!(refused.len(), 1);
    let pending = control
        .requests(
            caller,
            Some(relay::control::requests::RequestState::Pending),
            0,
            10,
        )
        .unwrap();
    assert_eq!(pending.len(), 4);
}
