//! The session state machine's own rules, driven directly (no shard, no sockets): the
//! in-flight bound counts exactly the routed frames it bounds, and the Hello deadline closes
//! a session that never says who it is.

use bytes::BytesMut;
use codec::*;
use relay::core::ConnId;
use relay::core::session::{Session, SessionContext, SessionEvent};
use relay::core::shard::interface::{AckOf, ShardInput};
use relay::limits::{HELLO_TIMEOUT, RelayLimits};
use relay::tables::auth::{Auth, NetworkEntry};
use relay::tables::policy::Policy;

const CERT: &[u8] = b"gatekeeper test certificate";
const CONN: ConnId = ConnId {
    core: 0,
    slot: 1,
    generation: 1,
};

struct World {
    auth: Auth,
    policy: Policy,
    limits: RelayLimits,
}

impl World {
    fn new(frames_in_flight_max: u32) -> World {
        let entry = NetworkEntry {
            id: NetworkId(1),
            name: "gatekeeper".into(),
            server_roles: vec![Role::GatekeeperServer],
            cert_sha256: vec![devkit::hex::sha256(CERT)],
            token_public_key: None,
            client_ca_der: Vec::new(),
        };
        World {
            auth: Auth::new(vec![entry], 16).unwrap(),
            policy: Policy::new(false),
            limits: RelayLimits {
                frames_in_flight_max,
                ..RelayLimits::default()
            },
        }
    }

    /// Feeds one frame; returns the frames the session wrote and the events it asked for.
    fn feed<H: Encode>(
        &self,
        session: &mut Session,
        header: &H,
        payload: &[u8],
    ) -> (Vec<FrameKind>, Vec<SessionEvent>) {
        let frame = Frame::from_bytes(encode_to_bytes(header, payload).unwrap()).unwrap();
        let cx = SessionContext {
            now_ms: 1_000,
            auth: &self.auth,
            policy: &self.policy,
            peer_cert: Some(CERT),
            limits: &self.limits,
            shards: 1,
        };
        session.handle_frame(&cx, &frame);
        drain(session)
    }
}

fn drain(session: &mut Session) -> (Vec<FrameKind>, Vec<SessionEvent>) {
    let mut out = BytesMut::new();
    session.poll_transmit(&mut out);
    let mut decoder = FrameDecoder::with_capacity(0);
    decoder.extend_from_slice(&out);
    let mut kinds = Vec::new();
    while let Some(frame) = decoder.next_frame().unwrap() {
        kinds.push(frame.kind());
    }
    let mut events = Vec::new();
    while let Some(event) = session.poll_event() {
        events.push(event);
    }
    (kinds, events)
}

fn hello() -> Hello {
    Hello {
        version_min: 1,
        version_max: 1,
        role: Role::GatekeeperServer,
        features: 0,
        agent: String::new(),
        token: None,
    }
}

fn envelope(n: u128) -> Envelope {
    Envelope {
        message_id: MessageId(n),
        sender: DeviceAddress::new(NetworkId(1), UserId(1), DeviceId(1)),
        recipient: UserAddress::new(NetworkId(1), UserId(2)),
        devices: DeviceSelection::All,
        content_type: ContentType::Text,
        e2e_protocol: E2eProtocol::Signal,
        timestamp_ms: 1_000,
        ttl_seconds: 60,
        flags: 0,
    }
}

fn routed(events: &[SessionEvent]) -> usize {
    events
        .iter()
        .filter(|e| {
            matches!(
                e,
                SessionEvent::Route {
                    input: ShardInput::Envelope(_),
                    ..
                }
            )
        })
        .count()
}

/// Acks of `DeviceList` frames do not free a place in the in-flight bound: a server that
/// mixes device lists in cannot keep its count of envelopes awaiting the relay near zero.
#[test]
fn device_list_acks_do_not_free_in_flight_places() {
    let world = World::new(2);
    let mut session = Session::new(CONN, 1, 0);
    let (kinds, _) = world.feed(&mut session, &hello(), &[]);
    assert_eq!(kinds, [FrameKind::Welcome]);
    let (_, events) = world.feed(&mut session, &envelope(1), b"one");
    assert_eq!(routed(&events), 1);
    let (_, events) = world.feed(&mut session, &envelope(2), b"two");
    assert_eq!(routed(&events), 1);
    assert_eq!(session.in_flight(), 2);
    // The relay answers a device list of this session.
    let user = UserAddress::new(NetworkId(1), UserId(3));
    session.handle_relay_ack(
        AckOf::DeviceList,
        MessageId(99),
        user.device(DeviceId(0)),
        Ok(()),
    );
    let (kinds, _) = drain(&mut session);
    assert_eq!(kinds, [FrameKind::Ack]);
    assert_eq!(session.in_flight(), 2, "a device list's ack freed a place");
    let (kinds, events) = world.feed(&mut session, &envelope(3), b"three");
    assert_eq!(routed(&events), 0);
    assert_eq!(kinds, [FrameKind::Ack], "refused with IN_FLIGHT_LIMIT");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SessionEvent::Refused(ErrorCode::InFlightLimit)))
    );
    // An envelope's ack does free one.
    let sender = envelope(1).sender;
    session.handle_relay_ack(AckOf::Routed, MessageId(1), sender, Ok(()));
    assert_eq!(session.in_flight(), 1);
    let (_, events) = world.feed(&mut session, &envelope(4), b"four");
    assert_eq!(routed(&events), 1);
}

/// A session that never sends `Hello` is closed with `HELLO_REQUIRED` at its deadline, not
/// before; one that said Hello has no deadline left.
#[test]
fn the_hello_deadline_closes_a_silent_session() {
    let world = World::new(16);
    let deadline = u64::try_from(HELLO_TIMEOUT.as_millis()).unwrap();
    let mut silent = Session::new(CONN, 1, 0);
    assert_eq!(silent.poll_timeout(), Some(deadline));
    silent.handle_timeout(deadline - 1);
    assert!(!silent.is_closed());
    assert!(drain(&mut silent).0.is_empty());
    silent.handle_timeout(deadline);
    assert!(silent.is_closed());
    let (kinds, events) = drain(&mut silent);
    assert_eq!(kinds, [FrameKind::Error]);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SessionEvent::Refused(ErrorCode::HelloRequired)))
    );
    assert!(events.iter().any(|e| matches!(e, SessionEvent::Close)));
    assert_eq!(silent.poll_timeout(), None);

    // Once established, what is left is the idle deadline, which the Hello's arrival started.
    let mut greeted = Session::new(CONN, 2, 0);
    world.feed(&mut greeted, &hello(), &[]);
    let idle = u64::from(RelayLimits::default().idle_timeout_ms);
    assert_eq!(greeted.poll_timeout(), Some(1_000 + idle));
    greeted.handle_timeout(deadline * 2);
    assert!(!greeted.is_closed());
}

/// A session that enabled `KEEPALIVE` is asked after half its idle deadline and closed with
/// `IDLE_TIMEOUT` at the deadline if it says nothing; any frame (a `KeepAlive` reply) moves
/// the deadline. Before authentication every malformed frame is fatal: one error, no more.
#[test]
fn keepalive_and_the_idle_deadline() {
    let world = World::new(16);
    let idle = u64::from(RelayLimits::default().idle_timeout_ms);
    let mut session = Session::new(CONN, 3, 0);
    let (kinds, _) = world.feed(
        &mut session,
        &Hello {
            features: features::KEEPALIVE,
            ..hello()
        },
        &[],
    );
    assert_eq!(kinds, [FrameKind::Welcome]);
    // Asked at half the deadline, once.
    assert_eq!(session.poll_timeout(), Some(1_000 + idle / 2));
    session.handle_timeout(1_000 + idle / 2);
    let (kinds, events) = drain(&mut session);
    assert_eq!(kinds, [FrameKind::KeepAlive]);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SessionEvent::KeepAliveSent))
    );
    assert_eq!(session.poll_timeout(), Some(1_000 + idle));
    // The reply (fed at t = 1 000, the harness's clock) restarts the deadline's clock; the
    // relay answers a client's request with the same nonce.
    world.feed(
        &mut session,
        &KeepAlive {
            nonce: 7,
            reply: true,
        },
        &[],
    );
    let (kinds, _) = world.feed(
        &mut session,
        &KeepAlive {
            nonce: 8,
            reply: false,
        },
        &[],
    );
    assert_eq!(kinds, [FrameKind::KeepAlive]);
    session.handle_timeout(1_000 + idle - 1);
    assert!(!session.is_closed());
    drain(&mut session);
    session.handle_timeout(1_000 + idle);
    assert!(session.is_closed());
    let (kinds, events) = drain(&mut session);
    assert_eq!(kinds, [FrameKind::Error]);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SessionEvent::Refused(ErrorCode::IdleTimeout)))
    );

    let mut unknown = Session::new(CONN, 4, 0);
    unknown.handle_decode_error(CodecError::HeaderMalformed {
        kind: FrameKind::Hello,
    });
    assert!(
        unknown.is_closed(),
        "a malformed frame before Hello is fatal"
    );
    unknown.handle_decode_error(CodecError::HeaderMalformed {
        kind: FrameKind::Hello,
    });
    let (kinds, _) = drain(&mut unknown);
    assert_eq!(kinds, [FrameKind::Error], "one error, no more");
}
