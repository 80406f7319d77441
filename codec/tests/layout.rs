//! The byte layouts `docs/protocol.md` promises partners: root sizes, field offsets, enum
//! tags, and the worked examples. A change that moves a byte fails here first.
// Tests build hostile lengths on purpose; every cast here is of a small, known value.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::mem::{offset_of, size_of};

use codec::limits::*;
use codec::*;
use common::*;

macro_rules! layout {
    ($ty:ty, size $size:literal $(, $field:ident @ $at:literal)*) => {
        assert_eq!(size_of::<$ty>(), $size, "size of {}", stringify!($ty));
        $( assert_eq!(offset_of!($ty, $field), $at, "{}.{}", stringify!($ty), stringify!($field)); )*
    };
}

#[test]
fn root_sizes_and_field_offsets() {
    layout!(ArchivedUserAddress, size 20, network @ 0, user @ 4);
    layout!(ArchivedDeviceAddress, size 24, network @ 0, user @ 4, device @ 20);
    layout!(ArchivedHello, size 134, version_min @ 0, version_max @ 2, role @ 4, features @ 5, agent @ 13, token @ 21);
    layout!(ArchivedDeviceToken, size 112, device @ 0, expires_at_ms @ 24, token_id @ 32, signature @ 48);
    layout!(ArchivedWelcome, size 40, version @ 0, session_id @ 2, features @ 10, limits @ 18);
    layout!(ArchivedSessionLimits, size 22, frame_bytes_max @ 0, payload_bytes_max @ 4, recipient_devices_max @ 8,
        receipt_ids_max @ 10, devices_per_user_max @ 12, frames_in_flight_max @ 14, ttl_seconds_max @ 18);
    layout!(ArchivedEnvelope, size 87, message_id @ 0, sender @ 16, recipient @ 40, devices @ 60,
        content_type @ 69, e2e_protocol @ 70, timestamp_ms @ 73, ttl_seconds @ 81, flags @ 85);
    layout!(ArchivedAck, size 55, message_id @ 0, address @ 16, status @ 40);
    layout!(ArchivedReceipt, size 77, receipt_id @ 0, kind @ 16, sender @ 17, recipient @ 41, message_ids @ 61, timestamp_ms @ 69);
    layout!(ArchivedSignal, size 53, sender @ 0, recipient @ 24, kind @ 44, timestamp_ms @ 45);
    layout!(ArchivedErrorFrame, size 28, code @ 0, refers_to @ 2, fatal @ 19, reason @ 20);
    layout!(ArchivedNotice, size 56, notice_id @ 0, kind @ 16, audience @ 17, effective_at_ms @ 38, code @ 46, text @ 48);
    layout!(ArchivedDelivery, size 33, device @ 0, seq @ 24, flags @ 32);
    layout!(ArchivedDeviceList, size 44, request_id @ 0, user @ 16, devices @ 36);
    layout!(ArchivedKeepAlive, size 9, nonce @ 0, reply @ 8);
    assert_eq!(size_of::<ArchivedDeviceSelection>(), 9);
    assert_eq!(size_of::<ArchivedAckStatus>(), 15);
    assert_eq!(size_of::<ArchivedE2eProtocol>(), 3);
}

/// The root of an encoded header: its last `size` bytes.
fn root_byte<H: Encode>(header: &H, size: usize, offset: usize) -> u8 {
    let bytes = encode_to_bytes(header, &[]).unwrap();
    let root = bytes.len() - size;
    bytes[root + offset]
}

#[test]
fn enum_tags_are_declaration_order() {
    let size = size_of::<ArchivedHello>();
    for (tag, role) in [
        Role::PartnerServer,
        Role::Device,
        Role::GatekeeperServer,
        Role::PeerRelay,
    ]
    .into_iter()
    .enumerate()
    {
        let h = Hello {
            role,
            ..hello("x", None)
        };
        assert_eq!(root_byte(&h, size, 4), tag as u8, "{role:?}");
    }
    let size = size_of::<ArchivedEnvelope>();
    let contents = [
        ContentType::Text,
        ContentType::Media,
        ContentType::Reaction,
        ContentType::Reply,
        ContentType::Edit,
        ContentType::Delete,
        ContentType::ReceiptBearing,
        ContentType::CallSignal,
        ContentType::Other,
    ];
    for (tag, content_type) in contents.into_iter().enumerate() {
        let e = Envelope {
            content_type,
            ..envelope(DeviceSelection::All)
        };
        assert_eq!(root_byte(&e, size, 69), tag as u8, "{content_type:?}");
    }
    for (tag, e2e_protocol) in [E2eProtocol::Signal, E2eProtocol::Mls, E2eProtocol::Other(7)]
        .into_iter()
        .enumerate()
    {
        let e = Envelope {
            e2e_protocol,
            ..envelope(DeviceSelection::All)
        };
        assert_eq!(root_byte(&e, size, 70), tag as u8, "{e2e_protocol:?}");
    }
    let listed = envelope(DeviceSelection::Listed(vec![DeviceId(1)]));
    assert_eq!(root_byte(&envelope(DeviceSelection::All), size, 60), 0);
    assert_eq!(root_byte(&listed, size, 60), 1);
    let size = size_of::<ArchivedReceipt>();
    for (tag, kind) in [
        ReceiptKind::Delivered,
        ReceiptKind::Read,
        ReceiptKind::Played,
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(
            root_byte(&Receipt { kind, ..receipt(1) }, size, 16),
            tag as u8,
            "{kind:?}"
        );
    }
    let size = size_of::<ArchivedSignal>();
    let signals = [
        SignalKind::TypingStarted,
        SignalKind::TypingStopped,
        SignalKind::PresenceOnline,
        SignalKind::PresenceOffline,
    ];
    for (tag, kind) in signals.into_iter().enumerate() {
        assert_eq!(
            root_byte(&Signal { kind, ..signal() }, size, 44),
            tag as u8,
            "{kind:?}"
        );
    }
    let size = size_of::<ArchivedNotice>();
    let notices = [
        NoticeKind::Deprecation,
        NoticeKind::Suspension,
        NoticeKind::LocationChange,
        NoticeKind::Incident,
        NoticeKind::Other,
    ];
    for (tag, kind) in notices.into_iter().enumerate() {
        assert_eq!(
            root_byte(
                &Notice {
                    kind,
                    ..notice("x")
                },
                size,
                16
            ),
            tag as u8,
            "{kind:?}"
        );
    }
    let size = size_of::<ArchivedAck>();
    let accepted = Ack {
        status: AckStatus::Accepted,
        ..ack_rejected(0)
    };
    assert_eq!(root_byte(&accepted, size, 40), 0);
    assert_eq!(root_byte(&ack_rejected(1), size, 40), 1);
}

#[test]
fn worked_examples_match_the_document() {
    let signal = Signal {
        sender: DeviceAddress::new(NetworkId(1), UserId(2), DeviceId(3)),
        recipient: UserAddress::new(NetworkId(4), UserId(5)),
        kind: SignalKind::TypingStopped,
        timestamp_ms: 6,
    };
    let mut expected = vec![0x39, 0, 0, 0, 6, 1, 0x35, 0];
    expected.extend_from_slice(&[1, 0, 0, 0]);
    expected.extend_from_slice(&2u128.to_le_bytes());
    expected.extend_from_slice(&[3, 0, 0, 0, 4, 0, 0, 0]);
    expected.extend_from_slice(&5u128.to_le_bytes());
    expected.push(1);
    expected.extend_from_slice(&6u64.to_le_bytes());
    assert_eq!(&encode_to_bytes(&signal, &[]).unwrap()[..], &expected[..]);

    let error = ErrorFrame {
        code: 209,
        refers_to: None,
        fatal: true,
        reason: "spoofed sender".into(),
    };
    let bytes = encode_to_bytes(&error, &[]).unwrap();
    let mut expected = vec![0x2e, 0, 0, 0, 7, 1, 0x2a, 0];
    expected.extend_from_slice(b"spoofed sender");
    expected.extend_from_slice(&[0xd1, 0]);
    expected.push(0);
    // The None variant's 16 bytes are ignored by readers; check only the ones that matter.
    assert_eq!(&bytes[..25], &expected[..]);
    assert_eq!(bytes[PREAMBLE_BYTES + 14 + 19], 1, "fatal");
    assert_eq!(
        &bytes[bytes.len() - 8..],
        &[0x8e, 0, 0, 0, 0xde, 0xff, 0xff, 0xff]
    );
}

#[test]
fn device_token_signed_bytes_layout() {
    let t = token();
    let bytes = t.signed_bytes();
    assert_eq!(&bytes[..8], b"A7TOKEN1");
    assert_eq!(&bytes[8..12], &t.device.network.0.to_le_bytes());
    assert_eq!(&bytes[12..28], &t.device.user.0.to_le_bytes());
    assert_eq!(&bytes[28..32], &t.device.device.0.to_le_bytes());
    assert_eq!(&bytes[32..40], &t.expires_at_ms.to_le_bytes());
    assert_eq!(&bytes[40..56], &t.token_id.to_le_bytes());
    // The archived token signs the same bytes.
    let frame = encode_to_bytes(&hello("x", Some(t.clone())), &[]).unwrap();
    let HeaderRef::Hello(h) = decode(&frame).unwrap().header else {
        unreachable!()
    };
    let rkyv::option::ArchivedOption::Some(archived) = &h.token else {
        panic!("token lost")
    };
    assert_eq!(archived.signed_bytes(), bytes);
}

#[test]
fn limits_table_matches_the_document() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"))
        .unwrap();
    let thousands = |n: usize| {
        let digits = n.to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    };
    for (name, value) in [
        ("PREAMBLE_BYTES", PREAMBLE_BYTES),
        ("HEADER_BYTES_MAX", HEADER_BYTES_MAX),
        ("PAYLOAD_BYTES_MAX", PAYLOAD_BYTES_MAX),
        ("DELIVERY_PAYLOAD_BYTES_MAX", DELIVERY_PAYLOAD_BYTES_MAX),
        ("FRAME_BYTES_MAX", FRAME_BYTES_MAX),
        ("RECIPIENT_DEVICES_MAX", RECIPIENT_DEVICES_MAX),
        ("RECEIPT_IDS_MAX", RECEIPT_IDS_MAX),
        ("ERROR_REASON_BYTES_MAX", ERROR_REASON_BYTES_MAX),
        ("NOTICE_TEXT_BYTES_MAX", NOTICE_TEXT_BYTES_MAX),
        ("AGENT_BYTES_MAX", AGENT_BYTES_MAX),
        ("TTL_SECONDS_MAX", TTL_SECONDS_MAX as usize),
    ] {
        let row = format!("| `{name}` | {} |", thousands(value));
        assert!(doc.contains(&row), "docs/protocol.md lacks the row {row}");
    }
}
