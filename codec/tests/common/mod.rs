//! Shared builders for the codec tests: one sample of every frame kind, proptest strategies,
//! and a way to hand-craft frames the encoder would refuse to write.
#![allow(dead_code)]

use bytes::{BufMut, Bytes, BytesMut};
use codec::limits::PREAMBLE_BYTES;
use codec::*;
use proptest::collection::vec;
use proptest::prelude::*;

pub fn device(n: u32) -> DeviceAddress {
    DeviceAddress::new(
        NetworkId(1),
        UserId(0xA7A7_0000_0000_0000_0000_0000_0000_0000 | u128::from(n)),
        DeviceId(n),
    )
}

pub fn user(n: u32) -> UserAddress {
    device(n).user_address()
}

pub fn envelope(devices: DeviceSelection) -> Envelope {
    Envelope {
        message_id: MessageId(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
        sender: device(1),
        recipient: user(2),
        devices,
        content_type: ContentType::Text,
        e2e_protocol: E2eProtocol::Signal,
        timestamp_ms: 1_790_000_000_000,
        ttl_seconds: 86_400,
        flags: 0,
    }
}

pub fn hello(agent: &str, token: Option<DeviceToken>) -> Hello {
    Hello {
        version_min: 1,
        version_max: 1,
        role: Role::Device,
        features: 0b101,
        agent: agent.into(),
        token,
    }
}

pub fn token() -> DeviceToken {
    DeviceToken {
        device: device(3),
        expires_at_ms: 1_800_000_000_000,
        token_id: 77,
        signature: [9; 64],
    }
}

pub fn receipt(count: usize) -> Receipt {
    Receipt {
        receipt_id: MessageId(5),
        kind: ReceiptKind::Read,
        sender: device(2),
        recipient: user(1),
        message_ids: (0..count as u128).map(MessageId).collect(),
        timestamp_ms: 1_790_000_000_500,
    }
}

pub fn error_frame(reason: &str) -> ErrorFrame {
    ErrorFrame {
        code: 209,
        refers_to: Some(MessageId(1)),
        fatal: false,
        reason: reason.into(),
    }
}

pub fn notice(text: &str) -> Notice {
    Notice {
        notice_id: MessageId(8),
        kind: NoticeKind::Deprecation,
        audience: Some(user(4)),
        effective_at_ms: 1_800_000_000_000,
        code: 0,
        text: text.into(),
    }
}

pub fn welcome() -> Welcome {
    Welcome {
        version: 1,
        session_id: 42,
        features: 1,
        limits: SessionLimits {
            frame_bytes_max: 1 << 18,
            payload_bytes_max: 1 << 16,
            recipient_devices_max: 5,
            receipt_ids_max: 256,
            devices_per_user_max: 5,
            frames_in_flight_max: 1024,
            ttl_seconds_max: 86_400 * 30,
        },
    }
}

pub fn ack_rejected(devices: usize) -> Ack {
    Ack {
        message_id: MessageId(3),
        address: device(1),
        status: AckStatus::Rejected {
            code: ErrorCode::DeviceListStale.as_u16(),
            retry_after_ms: 0,
            current_devices: (0..devices as u32).map(DeviceId).collect(),
        },
    }
}

pub fn signal() -> Signal {
    Signal {
        sender: device(1),
        recipient: user(2),
        kind: SignalKind::TypingStarted,
        timestamp_ms: 7,
    }
}

pub fn delivery(seq: u64) -> Delivery {
    Delivery {
        device: device(2),
        seq,
        flags: 0,
    }
}

pub fn device_list(count: usize) -> DeviceList {
    DeviceList {
        request_id: MessageId(11),
        user: user(2),
        devices: (1..=count as u32).map(DeviceId).collect(),
    }
}

/// One valid frame of every kind, encoded.
pub fn one_of_each_kind() -> Vec<(FrameKind, Bytes)> {
    let inner = encode_to_bytes(&envelope(DeviceSelection::All), b"ciphertext").unwrap();
    vec![
        (
            FrameKind::Hello,
            encode_to_bytes(&hello("sdk/1", Some(token())), &[]).unwrap(),
        ),
        (
            FrameKind::Welcome,
            encode_to_bytes(&welcome(), &[]).unwrap(),
        ),
        (FrameKind::Envelope, inner.clone()),
        (
            FrameKind::Ack,
            encode_to_bytes(&ack_rejected(2), &[]).unwrap(),
        ),
        (
            FrameKind::Receipt,
            encode_to_bytes(&receipt(3), &[]).unwrap(),
        ),
        (FrameKind::Signal, encode_to_bytes(&signal(), &[]).unwrap()),
        (
            FrameKind::Error,
            encode_to_bytes(&error_frame("spoofed sender"), &[]).unwrap(),
        ),
        (
            FrameKind::Notice,
            encode_to_bytes(&notice("v1 ends in 2027"), &[]).unwrap(),
        ),
        (
            FrameKind::Delivery,
            encode_to_bytes(&delivery(9), &inner).unwrap(),
        ),
        (
            FrameKind::DeviceList,
            encode_to_bytes(&device_list(3), &[]).unwrap(),
        ),
        (
            FrameKind::KeepAlive,
            encode_to_bytes(
                &KeepAlive {
                    nonce: 0x0123_4567_89ab_cdef,
                    reply: false,
                },
                &[],
            )
            .unwrap(),
        ),
    ]
}

/// The archived bytes of any header value, without the encoder's limit checks.
pub fn archive<T>(value: &T) -> Vec<u8>
where
    T: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                rkyv::util::AlignedVec,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rkyv::rancor::Error,
            >,
        >,
{
    rkyv::to_bytes::<rkyv::rancor::Error>(value)
        .unwrap()
        .to_vec()
}

/// Builds a frame by hand: any kind byte, version byte, header and payload, with a correct
/// length prefix and header length (unless the header is longer than a u16 can say).
pub fn raw_frame(kind: u8, version: u8, header: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    let body = (PREAMBLE_BYTES - 4 + header.len() + payload.len()) as u32;
    out.put_u32_le(body);
    out.put_u8(kind);
    out.put_u8(version);
    out.put_u16_le(header.len() as u16);
    out.put_slice(header);
    out.put_slice(payload);
    out.to_vec()
}

pub fn any_device() -> impl Strategy<Value = DeviceAddress> {
    (any::<u32>(), any::<u128>(), any::<u32>())
        .prop_map(|(n, u, d)| DeviceAddress::new(NetworkId(n), UserId(u), DeviceId(d)))
}

pub fn any_user() -> impl Strategy<Value = UserAddress> {
    (any::<u32>(), any::<u128>()).prop_map(|(n, u)| UserAddress::new(NetworkId(n), UserId(u)))
}

pub fn any_message_id() -> impl Strategy<Value = MessageId> {
    any::<u128>().prop_map(MessageId)
}

fn device_ids(min: usize, max: usize) -> impl Strategy<Value = Vec<DeviceId>> {
    vec(any::<u32>().prop_map(DeviceId), min..=max)
}

/// Text of at most `max` bytes (multi-byte characters included).
pub fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(".{0,40}")
        .unwrap()
        .prop_map(move |s| {
            let mut end = s.len().min(max);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s[..end].to_string()
        })
}

pub fn any_envelope() -> impl Strategy<Value = Envelope> {
    let devices = prop_oneof![
        Just(DeviceSelection::All),
        device_ids(1, limits::RECIPIENT_DEVICES_MAX).prop_map(DeviceSelection::Listed),
    ];
    let content = prop_oneof![
        Just(ContentType::Text),
        Just(ContentType::Media),
        Just(ContentType::Reaction),
        Just(ContentType::Reply),
        Just(ContentType::Edit),
        Just(ContentType::Delete),
        Just(ContentType::ReceiptBearing),
        Just(ContentType::CallSignal),
        Just(ContentType::Other),
    ];
    let protocol = prop_oneof![
        Just(E2eProtocol::Signal),
        Just(E2eProtocol::Mls),
        any::<u16>().prop_map(E2eProtocol::Other),
    ];
    (
        any_message_id(),
        any_device(),
        any_user(),
        devices,
        content,
        protocol,
        any::<u64>(),
        1..=limits::TTL_SECONDS_MAX,
        0..=envelope_flags::KNOWN,
    )
        .prop_map(
            |(
                message_id,
                sender,
                recipient,
                devices,
                content_type,
                e2e_protocol,
                timestamp_ms,
                ttl_seconds,
                flags,
            )| {
                Envelope {
                    message_id,
                    sender,
                    recipient,
                    devices,
                    content_type,
                    e2e_protocol,
                    timestamp_ms,
                    ttl_seconds,
                    flags,
                }
            },
        )
}

pub fn any_hello() -> impl Strategy<Value = Hello> {
    let role = prop_oneof![
        Just(Role::PartnerServer),
        Just(Role::Device),
        Just(Role::GatekeeperServer),
        Just(Role::PeerRelay),
    ];
    let token = proptest::option::of(
        (any_device(), any::<u64>(), any::<u128>(), any::<[u8; 32]>()).prop_map(
            |(device, expires_at_ms, token_id, half)| {
                let mut signature = [0u8; 64];
                signature[..32].copy_from_slice(&half);
                signature[32..].copy_from_slice(&half);
                DeviceToken {
                    device,
                    expires_at_ms,
                    token_id,
                    signature,
                }
            },
        ),
    );
    (
        1u16..100,
        0u16..100,
        role,
        any::<u64>(),
        text(limits::AGENT_BYTES_MAX),
        token,
    )
        .prop_map(|(version_min, span, role, features, agent, token)| Hello {
            version_min,
            version_max: version_min.saturating_add(span),
            role,
            features,
            agent,
            token,
        })
}

pub fn any_welcome() -> impl Strategy<Value = Welcome> {
    let limits = (
        1..=limits::FRAME_BYTES_MAX as u32,
        1..=limits::PAYLOAD_BYTES_MAX as u32,
        1..=limits::RECIPIENT_DEVICES_MAX as u16,
        1..=limits::RECEIPT_IDS_MAX as u16,
        any::<u16>(),
        any::<u32>(),
        1..=limits::TTL_SECONDS_MAX,
    );
    (1..=u16::MAX, any::<u64>(), any::<u64>(), limits).prop_map(
        |(version, session_id, features, l)| Welcome {
            version,
            session_id,
            features,
            limits: SessionLimits {
                frame_bytes_max: l.0,
                payload_bytes_max: l.1,
                recipient_devices_max: l.2,
                receipt_ids_max: l.3,
                devices_per_user_max: l.4,
                frames_in_flight_max: l.5,
                ttl_seconds_max: l.6,
            },
        },
    )
}

pub fn any_ack() -> impl Strategy<Value = Ack> {
    let status = prop_oneof![
        Just(AckStatus::Accepted),
        (
            any::<u16>(),
            any::<u32>(),
            device_ids(0, limits::RECIPIENT_DEVICES_MAX)
        )
            .prop_map(
                |(code, retry_after_ms, current_devices)| AckStatus::Rejected {
                    code,
                    retry_after_ms,
                    current_devices
                }
            ),
    ];
    (any_message_id(), any_device(), status).prop_map(|(message_id, address, status)| Ack {
        message_id,
        address,
        status,
    })
}

pub fn any_receipt() -> impl Strategy<Value = Receipt> {
    let kind = prop_oneof![
        Just(ReceiptKind::Delivered),
        Just(ReceiptKind::Read),
        Just(ReceiptKind::Played)
    ];
    (
        any_message_id(),
        kind,
        any_device(),
        any_user(),
        vec(any_message_id(), 1..=limits::RECEIPT_IDS_MAX),
        any::<u64>(),
    )
        .prop_map(
            |(receipt_id, kind, sender, recipient, message_ids, timestamp_ms)| Receipt {
                receipt_id,
                kind,
                sender,
                recipient,
                message_ids,
                timestamp_ms,
            },
        )
}

pub fn any_keep_alive() -> impl Strategy<Value = KeepAlive> {
    (any::<u64>(), any::<bool>()).prop_map(|(nonce, reply)| KeepAlive { nonce, reply })
}

pub fn any_signal() -> impl Strategy<Value = Signal> {
    let kind = prop_oneof![
        Just(SignalKind::TypingStarted),
        Just(SignalKind::TypingStopped),
        Just(SignalKind::PresenceOnline),
        Just(SignalKind::PresenceOffline),
    ];
    (any_device(), any_user(), kind, any::<u64>()).prop_map(
        |(sender, recipient, kind, timestamp_ms)| Signal {
            sender,
            recipient,
            kind,
            timestamp_ms,
        },
    )
}

pub fn any_error_frame() -> impl Strategy<Value = ErrorFrame> {
    (
        any::<u16>(),
        proptest::option::of(any_message_id()),
        any::<bool>(),
        text(limits::ERROR_REASON_BYTES_MAX),
    )
        .prop_map(|(code, refers_to, fatal, reason)| ErrorFrame {
            code,
            refers_to,
            fatal,
            reason,
        })
}

pub fn any_notice() -> impl Strategy<Value = Notice> {
    let kind = prop_oneof![
        Just(NoticeKind::Deprecation),
        Just(NoticeKind::Suspension),
        Just(NoticeKind::LocationChange),
        Just(NoticeKind::Incident),
        Just(NoticeKind::Other),
    ];
    (
        any_message_id(),
        kind,
        proptest::option::of(any_user()),
        any::<u64>(),
        any::<u16>(),
        text(limits::NOTICE_TEXT_BYTES_MAX),
    )
        .prop_map(
            |(notice_id, kind, audience, effective_at_ms, code, text)| Notice {
                notice_id,
                kind,
                audience,
                effective_at_ms,
                code,
                text,
            },
        )
}

pub fn any_delivery() -> impl Strategy<Value = Delivery> {
    (any_device(), any::<u64>(), 0..=delivery_flags::KNOWN)
        .prop_map(|(device, seq, flags)| Delivery { device, seq, flags })
}

pub fn any_payload(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..=max)
}

pub fn any_device_list() -> impl Strategy<Value = DeviceList> {
    (
        any_message_id(),
        any_user(),
        device_ids(0, limits::RECIPIENT_DEVICES_MAX),
    )
        .prop_map(|(request_id, user, devices)| DeviceList {
            request_id,
            user,
            devices,
        })
}
