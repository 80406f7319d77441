//! Hostile input, each case with the exact error it must produce: every truncation point,
//! lengths at and past every limit, garbage and mislabelled headers, out-of-domain fields.
// Tests build hostile lengths on purpose; every cast here is of a small, known value.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::mem::{offset_of, size_of};

use codec::limits::*;
use codec::*;
use common::*;

fn code(result: Result<FrameRef<'_>, CodecError>) -> ErrorCode {
    match result {
        Ok(frame) => panic!(
            "decoded a {:?} frame that should have been refused",
            frame.kind()
        ),
        Err(error) => error.code(),
    }
}

fn envelope_bytes(payload_len: usize) -> Vec<u8> {
    encode_to_bytes(&envelope(DeviceSelection::All), &vec![0xEE; payload_len])
        .unwrap()
        .to_vec()
}

#[test]
fn every_truncation_point_is_frame_truncated() {
    for (kind, bytes) in one_of_each_kind() {
        for cut in 0..bytes.len() {
            let error = decode(&bytes[..cut]).unwrap_err();
            assert_eq!(
                error.code(),
                ErrorCode::FrameTruncated,
                "{kind:?} cut at {cut}: {error}"
            );
            // The streaming decoder waits for the rest instead.
            let mut stream = FrameDecoder::with_capacity(0);
            stream.extend_from_slice(&bytes[..cut]);
            assert!(
                stream.next_frame().unwrap().is_none(),
                "{kind:?} cut at {cut}"
            );
            if cut > 0 {
                assert_eq!(
                    stream.finish().unwrap_err().code(),
                    ErrorCode::FrameTruncated
                );
            }
        }
    }
}

#[test]
fn length_prefix_limits() {
    let prefix = |body: u32| {
        let mut bytes = body.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[FrameKind::Envelope as u8, 1, 0, 0]);
        bytes
    };
    let largest_body = (FRAME_BYTES_MAX - 4) as u32;
    // At the limit: accepted, and so merely truncated here.
    assert_eq!(
        code(decode(&prefix(largest_body))),
        ErrorCode::FrameTruncated
    );
    assert_eq!(
        frame_len(&prefix(largest_body)).unwrap(),
        Some(FRAME_BYTES_MAX)
    );
    // One past it, and far past it: refused from the four prefix bytes alone.
    for body in [largest_body + 1, u32::MAX] {
        assert_eq!(code(decode(&prefix(body))), ErrorCode::FrameTooLarge);
        assert_eq!(
            frame_len(&body.to_le_bytes()).unwrap_err().code(),
            ErrorCode::FrameTooLarge
        );
    }
    // Shorter than the rest of the preamble.
    for body in 0..4u32 {
        assert_eq!(
            code(decode(&prefix(body))),
            ErrorCode::FrameTooShort,
            "body {body}"
        );
    }
    // Exactly a preamble with an empty header: the header is malformed, not the framing.
    assert_eq!(
        code(decode(&raw_frame(FrameKind::Signal as u8, 1, &[], &[]))),
        ErrorCode::HeaderMalformed
    );
}

#[test]
fn payload_at_and_past_its_limit() {
    let at_limit = envelope_bytes(PAYLOAD_BYTES_MAX);
    assert_eq!(decode(&at_limit).unwrap().payload.len(), PAYLOAD_BYTES_MAX);
    let header = archive(&envelope(DeviceSelection::All));
    let past = raw_frame(
        FrameKind::Envelope as u8,
        1,
        &header,
        &vec![0; PAYLOAD_BYTES_MAX + 1],
    );
    assert_eq!(code(decode(&past)), ErrorCode::PayloadTooLarge);
    // The encoder refuses it too, and leaves the output buffer as it was.
    let mut out = bytes::BytesMut::from(&b"keep"[..]);
    let error = encode(
        &mut out,
        &envelope(DeviceSelection::All),
        &vec![0; PAYLOAD_BYTES_MAX + 1],
    )
    .unwrap_err();
    assert_eq!(error.code(), ErrorCode::PayloadTooLarge);
    assert_eq!(&out[..], b"keep");
}

#[test]
fn payload_on_kinds_that_carry_none() {
    for (kind, bytes) in one_of_each_kind() {
        if matches!(kind, FrameKind::Envelope | FrameKind::Delivery) {
            continue;
        }
        let header = &bytes[PREAMBLE_BYTES..];
        let with_payload = raw_frame(kind as u8, 1, header, b"x");
        assert_eq!(
            code(decode(&with_payload)),
            ErrorCode::UnexpectedPayload,
            "{kind:?}"
        );
    }
}

#[test]
fn header_length_past_its_limit_or_the_frame() {
    let mut bytes = envelope_bytes(16);
    bytes[6..8].copy_from_slice(&((HEADER_BYTES_MAX + 1) as u16).to_le_bytes());
    assert_eq!(code(decode(&bytes)), ErrorCode::HeaderTooLarge);
    let mut bytes = envelope_bytes(0);
    let longer = (bytes.len() - PREAMBLE_BYTES + 1) as u16;
    bytes[6..8].copy_from_slice(&longer.to_le_bytes());
    assert_eq!(code(decode(&bytes)), ErrorCode::HeaderTooLarge);
}

#[test]
fn unknown_kinds_and_versions() {
    let header = archive(&signal());
    for kind in [0u8, 12, 200, 255] {
        assert_eq!(
            code(decode(&raw_frame(kind, 1, &header, &[]))),
            ErrorCode::UnknownKind,
            "kind {kind}"
        );
    }
    for version in [0u8, 2, 255] {
        let frame = raw_frame(FrameKind::Signal as u8, version, &header, &[]);
        assert_eq!(
            code(decode(&frame)),
            ErrorCode::UnknownVersion,
            "version {version}"
        );
    }
}

#[test]
fn trailing_bytes_after_one_frame() {
    let mut bytes = envelope_bytes(8);
    bytes.push(0);
    assert_eq!(code(decode(&bytes)), ErrorCode::TrailingBytes);
}

#[test]
fn garbage_headers_are_malformed() {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for kind in FrameKind::ALL {
        for len in [1usize, 7, 16, 33, 100, 255] {
            let garbage: Vec<u8> = (0..len).map(|_| next() as u8 | 0x80).collect();
            let frame = raw_frame(kind as u8, 1, &garbage, &[]);
            // Bytecheck refuses most; an all-integer header that happens to validate must
            // still fail its kind's domain checks.
            let error = code(decode(&frame));
            assert!(
                matches!(error, ErrorCode::HeaderMalformed | ErrorCode::InvalidField),
                "{kind:?} with {len} garbage bytes: {error}"
            );
        }
    }
}

#[test]
fn header_of_one_kind_labelled_as_another_is_malformed() {
    let samples = one_of_each_kind();
    let header_of = |kind: FrameKind| {
        let bytes = &samples.iter().find(|(k, _)| *k == kind).unwrap().1;
        let header_len = u16::from_le_bytes([bytes[6], bytes[7]]) as usize;
        bytes[PREAMBLE_BYTES..PREAMBLE_BYTES + header_len].to_vec()
    };
    // Smaller archives read as larger types fail the bounds check.
    for (from, to) in [
        (FrameKind::Signal, FrameKind::Envelope),
        (FrameKind::Welcome, FrameKind::Hello),
        (FrameKind::Delivery, FrameKind::Receipt),
        (FrameKind::Signal, FrameKind::Notice),
    ] {
        let frame = raw_frame(to as u8, 1, &header_of(from), &[]);
        assert_eq!(
            code(decode(&frame)),
            ErrorCode::HeaderMalformed,
            "{from:?} header as {to:?}"
        );
    }
}

/// The header bytes of `value` with one byte at `offset` (from the archived root) replaced.
fn patched<T>(value: &T, root_size: usize, offset: usize, byte: u8) -> Vec<u8>
where
    T: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                rkyv::util::AlignedVec,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rkyv::rancor::Error,
            >,
        >,
{
    let mut header = archive(value);
    let root = header.len() - root_size;
    header[root + offset] = byte;
    header
}

#[test]
fn out_of_domain_discriminants_and_bools_are_malformed() {
    let e = envelope(DeviceSelection::All);
    let size = size_of::<ArchivedEnvelope>();
    for (field, offset) in [
        ("content_type", offset_of!(ArchivedEnvelope, content_type)),
        ("e2e_protocol", offset_of!(ArchivedEnvelope, e2e_protocol)),
        ("devices", offset_of!(ArchivedEnvelope, devices)),
    ] {
        let header = patched(&e, size, offset, 0xC8);
        let frame = raw_frame(FrameKind::Envelope as u8, 1, &header, &[]);
        assert_eq!(
            code(decode(&frame)),
            ErrorCode::HeaderMalformed,
            "envelope.{field} = 200"
        );
    }
    let header = patched(
        &error_frame("x"),
        size_of::<ArchivedErrorFrame>(),
        offset_of!(ArchivedErrorFrame, fatal),
        2,
    );
    let frame = raw_frame(FrameKind::Error as u8, 1, &header, &[]);
    assert_eq!(
        code(decode(&frame)),
        ErrorCode::HeaderMalformed,
        "error.fatal = 2"
    );
}

#[test]
fn invalid_utf8_text_is_malformed() {
    let mut header = archive(&hello("sdk-agent", None));
    let at = header.windows(9).position(|w| w == b"sdk-agent").unwrap();
    header[at] = 0xFF;
    let frame = raw_frame(FrameKind::Hello as u8, 1, &header, &[]);
    assert_eq!(code(decode(&frame)), ErrorCode::HeaderMalformed);
}

#[test]
fn relative_pointer_out_of_bounds_is_malformed() {
    let e = envelope(DeviceSelection::Listed(vec![DeviceId(1), DeviceId(2)]));
    let mut header = archive(&e);
    let root = header.len() - size_of::<ArchivedEnvelope>();
    // The list's relative pointer follows the one-byte variant tag.
    let at = root + offset_of!(ArchivedEnvelope, devices) + 1;
    header[at..at + 4].copy_from_slice(&0x4000_0000i32.to_le_bytes());
    let frame = raw_frame(FrameKind::Envelope as u8, 1, &header, &[]);
    assert_eq!(code(decode(&frame)), ErrorCode::HeaderMalformed);
}

#[test]
fn recipient_devices_at_and_past_the_limit() {
    let listed = |n: usize| {
        envelope(DeviceSelection::Listed(
            (0..n as u32).map(DeviceId).collect(),
        ))
    };
    let at = encode_to_bytes(&listed(RECIPIENT_DEVICES_MAX), &[]).unwrap();
    assert!(decode(&at).is_ok());
    let past = raw_frame(
        FrameKind::Envelope as u8,
        1,
        &archive(&listed(RECIPIENT_DEVICES_MAX + 1)),
        &[],
    );
    assert_eq!(code(decode(&past)), ErrorCode::TooManyRecipients);
    assert_eq!(
        encode_to_bytes(&listed(RECIPIENT_DEVICES_MAX + 1), &[])
            .unwrap_err()
            .code(),
        ErrorCode::TooManyRecipients
    );
    let empty = raw_frame(FrameKind::Envelope as u8, 1, &archive(&listed(0)), &[]);
    assert_eq!(code(decode(&empty)), ErrorCode::InvalidField);
    // The same bound holds for the device set a rejected Ack returns.
    assert!(decode(&encode_to_bytes(&ack_rejected(RECIPIENT_DEVICES_MAX), &[]).unwrap()).is_ok());
    let past = raw_frame(
        FrameKind::Ack as u8,
        1,
        &archive(&ack_rejected(RECIPIENT_DEVICES_MAX + 1)),
        &[],
    );
    assert_eq!(code(decode(&past)), ErrorCode::TooManyRecipients);
    // And for a declared device set.
    assert!(decode(&encode_to_bytes(&device_list(RECIPIENT_DEVICES_MAX), &[]).unwrap()).is_ok());
    let past = raw_frame(
        FrameKind::DeviceList as u8,
        1,
        &archive(&device_list(RECIPIENT_DEVICES_MAX + 1)),
        &[],
    );
    assert_eq!(code(decode(&past)), ErrorCode::TooManyRecipients);
}

#[test]
fn receipt_ids_at_and_past_the_limit() {
    assert!(decode(&encode_to_bytes(&receipt(RECEIPT_IDS_MAX), &[]).unwrap()).is_ok());
    for count in [0, RECEIPT_IDS_MAX + 1] {
        let frame = raw_frame(FrameKind::Receipt as u8, 1, &archive(&receipt(count)), &[]);
        assert_eq!(code(decode(&frame)), ErrorCode::TooManyIds, "{count} ids");
        assert_eq!(
            encode_to_bytes(&receipt(count), &[]).unwrap_err().code(),
            ErrorCode::TooManyIds
        );
    }
}

#[test]
fn text_fields_at_and_past_their_limits() {
    type Build = fn(&str) -> Vec<u8>;
    let cases: [(FrameKind, usize, Build, Build); 3] = [
        (
            FrameKind::Hello,
            AGENT_BYTES_MAX,
            |t| archive(&hello(t, None)),
            |t| encode_to_bytes(&hello(t, None), &[]).unwrap().to_vec(),
        ),
        (
            FrameKind::Error,
            ERROR_REASON_BYTES_MAX,
            |t| archive(&error_frame(t)),
            |t| encode_to_bytes(&error_frame(t), &[]).unwrap().to_vec(),
        ),
        (
            FrameKind::Notice,
            NOTICE_TEXT_BYTES_MAX,
            |t| archive(&notice(t)),
            |t| encode_to_bytes(&notice(t), &[]).unwrap().to_vec(),
        ),
    ];
    for (kind, max, archived, encoded) in cases {
        assert!(
            decode(&encoded(&"é".repeat(max / 2))).is_ok(),
            "{kind:?} at its limit"
        );
        let past = raw_frame(kind as u8, 1, &archived(&"a".repeat(max + 1)), &[]);
        assert_eq!(
            code(decode(&past)),
            ErrorCode::TextTooLong,
            "{kind:?} past its limit"
        );
    }
}

#[test]
fn out_of_domain_fields_are_invalid() {
    let mut e = envelope(DeviceSelection::All);
    e.flags = 1 << 15;
    let frame = raw_frame(FrameKind::Envelope as u8, 1, &archive(&e), &[]);
    assert_eq!(code(decode(&frame)), ErrorCode::InvalidField);
    for ttl in [0, TTL_SECONDS_MAX + 1] {
        let mut e = envelope(DeviceSelection::All);
        e.ttl_seconds = ttl;
        let frame = raw_frame(FrameKind::Envelope as u8, 1, &archive(&e), &[]);
        assert_eq!(code(decode(&frame)), ErrorCode::InvalidField, "ttl {ttl}");
    }
    let mut h = hello("x", None);
    h.version_min = 3;
    h.version_max = 2;
    assert_eq!(
        code(decode(&raw_frame(
            FrameKind::Hello as u8,
            1,
            &archive(&h),
            &[]
        ))),
        ErrorCode::InvalidField
    );
    let d = Delivery {
        device: device(1),
        seq: 1,
        flags: 0x80,
    };
    let inner = envelope_bytes(4);
    assert_eq!(
        code(decode(&raw_frame(
            FrameKind::Delivery as u8,
            1,
            &archive(&d),
            &inner
        ))),
        ErrorCode::InvalidField
    );
}

#[test]
fn delivery_payload_must_be_one_queued_frame() {
    let header = archive(&delivery(1));
    let inner = envelope_bytes(32);
    let ok = raw_frame(FrameKind::Delivery as u8, 1, &header, &inner);
    assert!(decode(&ok).is_ok());
    let truncated = raw_frame(
        FrameKind::Delivery as u8,
        1,
        &header,
        &inner[..inner.len() - 1],
    );
    assert_eq!(code(decode(&truncated)), ErrorCode::FrameTruncated);
    let mut longer = inner.clone();
    longer.push(0);
    let trailing = raw_frame(FrameKind::Delivery as u8, 1, &header, &longer);
    assert_eq!(code(decode(&trailing)), ErrorCode::TrailingBytes);
    let hello_inner = encode_to_bytes(&hello("x", None), &[]).unwrap();
    let wrong_kind = raw_frame(FrameKind::Delivery as u8, 1, &header, &hello_inner);
    assert_eq!(code(decode(&wrong_kind)), ErrorCode::InvalidField);
    let nested = raw_frame(FrameKind::Delivery as u8, 1, &header, &ok);
    assert_eq!(code(decode(&nested)), ErrorCode::InvalidField);
}

#[test]
fn misaligned_frames_decode_in_place() {
    for (kind, bytes) in one_of_each_kind() {
        let mut buffer = vec![0u8; bytes.len() + 16];
        for offset in 0..16 {
            buffer[offset..offset + bytes.len()].copy_from_slice(&bytes);
            let frame = decode(&buffer[offset..offset + bytes.len()]).unwrap();
            assert_eq!(frame.kind(), kind, "at offset {offset}");
        }
    }
}

#[test]
fn stream_framing_errors_are_sticky_and_frame_errors_are_not() {
    // A bad length prefix: nothing after it can be trusted.
    let mut stream = FrameDecoder::with_capacity(0);
    stream.extend_from_slice(&u32::MAX.to_le_bytes());
    stream.extend_from_slice(&envelope_bytes(4));
    let error = stream.next_frame().unwrap_err();
    assert_eq!(error.code(), ErrorCode::FrameTooLarge);
    assert!(error.is_framing());
    assert_eq!(stream.next_frame().unwrap_err(), error);

    // A well-delimited bad frame is consumed and reported; the next frame decodes.
    let mut stream = FrameDecoder::with_capacity(0);
    stream.extend_from_slice(&raw_frame(99, 1, &[1, 2, 3], &[]));
    stream.extend_from_slice(&raw_frame(FrameKind::Envelope as u8, 1, &[0xFF; 12], &[]));
    stream.extend_from_slice(&envelope_bytes(4));
    let error = stream.next_frame().unwrap_err();
    assert_eq!(error.code(), ErrorCode::UnknownKind);
    assert!(!error.is_framing());
    let malformed = stream.next_frame().unwrap().unwrap();
    assert_eq!(
        malformed.decode().unwrap_err().code(),
        ErrorCode::HeaderMalformed
    );
    let good = stream.next_frame().unwrap().unwrap();
    assert_eq!(good.decode().unwrap().kind(), FrameKind::Envelope);
    assert!(stream.next_frame().unwrap().is_none());
}

/// The numbers are the protocol: a change here breaks every deployed peer.
#[test]
fn error_codes_are_stable_and_unique() {
    let expected: &[(&str, u16)] = &[
        ("FRAME_TRUNCATED", 100),
        ("FRAME_TOO_LARGE", 101),
        ("FRAME_TOO_SHORT", 102),
        ("UNKNOWN_KIND", 103),
        ("UNKNOWN_VERSION", 104),
        ("HEADER_TOO_LARGE", 105),
        ("HEADER_MALFORMED", 106),
        ("PAYLOAD_TOO_LARGE", 107),
        ("UNEXPECTED_PAYLOAD", 108),
        ("TOO_MANY_RECIPIENTS", 109),
        ("TOO_MANY_IDS", 110),
        ("TEXT_TOO_LONG", 111),
        ("TRAILING_BYTES", 112),
        ("INVALID_FIELD", 113),
        ("HELLO_REQUIRED", 200),
        ("UNSUPPORTED_VERSION", 201),
        ("CERTIFICATE_REQUIRED", 202),
        ("CERTIFICATE_UNKNOWN", 203),
        ("ROLE_NOT_ALLOWED", 204),
        ("TOKEN_REQUIRED", 205),
        ("TOKEN_EXPIRED", 206),
        ("TOKEN_INVALID", 207),
        ("TOKEN_REPLAYED", 208),
        ("SENDER_NOT_ALLOWED", 209),
        ("UNEXPECTED_FRAME", 210),
        ("HANDSHAKE_TIMEOUT", 211),
        ("IDLE_TIMEOUT", 212),
        ("PREAUTH_LIMIT", 213),
        ("RECIPIENT_UNKNOWN", 300),
        ("DEVICE_LIST_STALE", 301),
        ("NETWORK_UNKNOWN", 302),
        ("MESSAGE_EXPIRED", 303),
        ("DEVICE_LIMIT", 304),
        ("RECIPIENT_NOT_ENLISTED", 305),
        ("SENDER_NOT_ENLISTED", 306),
        ("MESSAGE_REQUEST_PENDING", 307),
        ("RECIPIENT_OUTSIDE_REGION", 308),
        ("SENDER_OUTSIDE_REGION", 309),
        ("PARTNER_SUSPENDED", 310),
        ("PARTNER_TESTING", 311),
        ("NETWORK_USER_LIMIT", 312),
        ("NETWORK_DEVICE_LIMIT", 313),
        ("QUEUE_FULL", 400),
        ("RATE_LIMITED", 401),
        ("IN_FLIGHT_LIMIT", 402),
        ("WRITE_TIMEOUT", 403),
        ("HANDSHAKE_RATE_LIMITED", 404),
        ("SOURCE_CONNECTION_LIMIT", 405),
        ("UNAUTHENTICATED_EVICTED", 406),
        ("DEVICE_SET_RATE_LIMITED", 410),
        ("SHARD_USER_LIMIT", 411),
        ("RATE_TABLE_FULL", 412),
        ("TOKEN_JOURNAL_BUSY", 413),
        ("INTERNAL", 500),
        ("STORAGE_UNAVAILABLE", 501),
        ("SHUTTING_DOWN", 502),
        ("DATA_PLANE_UNAVAILABLE", 503),
        ("REQUEST_MALFORMED", 600),
        ("OPERATOR_REQUIRED", 601),
        ("FOREIGN_RESOURCE", 602),
        ("NOT_FOUND", 603),
        ("CONSENT_REQUIRED", 604),
        ("CONSENT_INVALID", 605),
        ("IDENTIFIER_INVALID", 606),
        ("IDENTIFIER_TAKEN", 607),
        ("DISCOVERY_BATCH_TOO_LARGE", 608),
        ("ALREADY_EXISTS", 609),
        ("GROUND_REQUIRED", 610),
        ("KEYS_INVALID", 611),
        ("REQUEST_DECIDED", 612),
        ("BODY_TOO_LARGE", 613),
        ("SOURCE_RATE_LIMITED", 614),
        ("HTTP_BUSY", 615),
    ];
    let actual: Vec<(&str, u16)> = ErrorCode::ALL
        .iter()
        .map(|c| (c.name(), c.as_u16()))
        .collect();
    assert_eq!(actual, expected);
    for &(name, number) in expected {
        let code = ErrorCode::from_u16(number).unwrap();
        assert_eq!(code.name(), name);
        // The HTTP port's answers to a flood are the control API's (6xx) and retryable.
        let retryable = (400..600).contains(&number) || matches!(number, 614 | 615);
        assert_eq!(code.is_retryable(), retryable, "{name}");
    }
    assert_eq!(ErrorCode::from_u16(999), None);
}

/// Every protocol error code is documented for partners.
#[test]
fn every_error_code_is_in_the_protocol_document() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"))
        .unwrap();
    for code in ErrorCode::ALL {
        let row = format!("| {} | `{}` |", code.as_u16(), code.name());
        assert!(
            doc.contains(&row),
            "docs/protocol.md lacks the row starting {row}"
        );
    }
}
