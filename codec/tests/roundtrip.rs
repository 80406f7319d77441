//! Property tests: every frame kind survives encode → decode unchanged, whole or split across
//! reads at any point; no input, random or mutated, makes the decoder panic; and every frame
//! that decodes meets every limit, checked here on its own terms ([`limit_violations`]).
// Tests build hostile lengths on purpose; every cast here is of a small, known value.
#![allow(clippy::cast_possible_truncation)]

mod common;

use bytes::Bytes;
use codec::limits::*;
use codec::*;
use common::*;
use proptest::prelude::*;

macro_rules! roundtrip {
    ($test:ident, $strategy:expr, $variant:ident, $ty:ty, $payload:expr) => {
        proptest! {
            #[test]
            fn $test(header in $strategy, payload in $payload) {
                let bytes = encode_to_bytes(&header, &payload).unwrap();
                let frame = decode(&bytes).unwrap();
                within_limits(&frame, bytes.len())?;
                prop_assert_eq!(frame.kind(), <$ty as FrameHeader>::KIND);
                prop_assert_eq!(frame.version, WIRE_VERSION);
                let HeaderRef::$variant(archived) = frame.header else {
                    panic!("decoded as {:?}", frame.kind());
                };
                let back: $ty = rkyv::deserialize::<$ty, rkyv::rancor::Error>(archived).unwrap();
                prop_assert_eq!(&back, &header);
                prop_assert_eq!(frame.payload, &payload[..]);

                // The owned frame gives the same header and a zero-copy payload slice.
                let owned = Frame::from_bytes(bytes.clone()).unwrap();
                prop_assert_eq!(owned.kind(), <$ty as FrameHeader>::KIND);
                let payload_bytes = owned.payload();
                prop_assert_eq!(&payload_bytes[..], &payload[..]);
                if !payload.is_empty() {
                    let start = bytes.as_ptr() as usize;
                    let at = payload_bytes.as_ptr() as usize;
                    prop_assert!(at >= start && at + payload.len() <= start + bytes.len(), "payload was copied");
                }
            }
        }
    };
}

/// The limits of `docs/protocol.md` (sections 2, 4 and 5) that `frame`, `frame_len` bytes
/// long, breaks; empty when it meets them all. Written against the named limits and the
/// header fields, not through the codec's own checks, so that it can catch them missing.
fn limit_violations(frame: &FrameRef<'_>, frame_len: usize) -> Vec<String> {
    let mut broken = Vec::new();
    let mut check = |holds: bool, what: String| {
        if !holds {
            broken.push(what);
        }
    };
    let kind = frame.kind();
    let payload = frame.payload.len();
    let header = frame_len.saturating_sub(PREAMBLE_BYTES + payload);
    check(
        frame_len <= FRAME_BYTES_MAX,
        format!("{kind:?}: frame of {frame_len} bytes > FRAME_BYTES_MAX"),
    );
    check(
        header <= HEADER_BYTES_MAX,
        format!("{kind:?}: header of {header} bytes > HEADER_BYTES_MAX"),
    );
    check(
        (PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION_MAX).contains(&u16::from(frame.version)),
        format!("{kind:?}: version byte {}", frame.version),
    );
    let payload_max = match kind {
        FrameKind::Envelope => PAYLOAD_BYTES_MAX,
        FrameKind::Delivery => DELIVERY_PAYLOAD_BYTES_MAX,
        _ => 0,
    };
    check(
        payload <= payload_max,
        format!("{kind:?}: payload of {payload} bytes > {payload_max}"),
    );
    let one_to = |value: u64, max: usize| value >= 1 && value <= max as u64;
    match frame.header {
        HeaderRef::Hello(h) => {
            let (min, max) = (h.version_min.to_native(), h.version_max.to_native());
            check(
                min >= 1 && min <= max,
                format!("hello.version_min..version_max {min}..{max}"),
            );
            check(
                h.agent.len() <= AGENT_BYTES_MAX,
                format!("hello.agent of {} bytes", h.agent.len()),
            );
        }
        HeaderRef::Welcome(w) => {
            check(w.version.to_native() >= 1, "welcome.version 0".into());
            let l = &w.limits;
            for (name, value, max) in [
                (
                    "frame_bytes_max",
                    u64::from(l.frame_bytes_max.to_native()),
                    FRAME_BYTES_MAX,
                ),
                (
                    "payload_bytes_max",
                    u64::from(l.payload_bytes_max.to_native()),
                    PAYLOAD_BYTES_MAX,
                ),
                (
                    "recipient_devices_max",
                    u64::from(l.recipient_devices_max.to_native()),
                    RECIPIENT_DEVICES_MAX,
                ),
                (
                    "receipt_ids_max",
                    u64::from(l.receipt_ids_max.to_native()),
                    RECEIPT_IDS_MAX,
                ),
                (
                    "ttl_seconds_max",
                    u64::from(l.ttl_seconds_max.to_native()),
                    TTL_SECONDS_MAX as usize,
                ),
            ] {
                check(one_to(value, max), format!("welcome.limits.{name} {value}"));
            }
        }
        HeaderRef::Envelope(e) => {
            if let ArchivedDeviceSelection::Listed(list) = &e.devices {
                check(
                    one_to(list.len() as u64, RECIPIENT_DEVICES_MAX),
                    format!("envelope.devices lists {}", list.len()),
                );
            }
            let ttl = e.ttl_seconds.to_native();
            check(
                one_to(u64::from(ttl), TTL_SECONDS_MAX as usize),
                format!("envelope.ttl_seconds {ttl}"),
            );
            let flags = e.flags.to_native();
            check(
                flags & !envelope_flags::KNOWN == 0,
                format!("envelope.flags {flags:#x}"),
            );
        }
        HeaderRef::Ack(a) => {
            if let ArchivedAckStatus::Rejected {
                current_devices, ..
            } = &a.status
            {
                check(
                    current_devices.len() <= RECIPIENT_DEVICES_MAX,
                    format!("ack.current_devices lists {}", current_devices.len()),
                );
            }
        }
        HeaderRef::Receipt(r) => check(
            one_to(r.message_ids.len() as u64, RECEIPT_IDS_MAX),
            format!("receipt.message_ids lists {}", r.message_ids.len()),
        ),
        HeaderRef::Signal(_) | HeaderRef::KeepAlive(_) => {}
        HeaderRef::Error(e) => check(
            e.reason.len() <= ERROR_REASON_BYTES_MAX,
            format!("error.reason of {} bytes", e.reason.len()),
        ),
        HeaderRef::Notice(n) => check(
            n.text.len() <= NOTICE_TEXT_BYTES_MAX,
            format!("notice.text of {} bytes", n.text.len()),
        ),
        HeaderRef::Delivery(d) => {
            check(
                d.flags & !delivery_flags::KNOWN == 0,
                format!("delivery.flags {:#x}", d.flags),
            );
            // Its payload is one whole frame of a kind the relay queues or signals, itself
            // within every limit when it decodes. (The decoder checks only the inner
            // preamble; the receiver validates the inner header, protocol section 4.9.)
            if let Ok(Some(inner)) = frame.delivery_inner() {
                check(
                    matches!(
                        inner.kind(),
                        FrameKind::Envelope | FrameKind::Receipt | FrameKind::Signal
                    ),
                    format!("delivery carries a {:?}", inner.kind()),
                );
                for what in limit_violations(&inner, payload) {
                    check(false, format!("delivery inner {what}"));
                }
            }
        }
        HeaderRef::DeviceList(l) => check(
            l.devices.len() <= RECIPIENT_DEVICES_MAX,
            format!("device_list.devices lists {}", l.devices.len()),
        ),
    }
    broken
}

fn no_payload() -> impl Strategy<Value = Vec<u8>> {
    Just(Vec::new())
}

fn inner_frame() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (any_envelope(), any_payload(512))
            .prop_map(|(e, p)| encode_to_bytes(&e, &p).unwrap().to_vec()),
        any_receipt().prop_map(|r| encode_to_bytes(&r, &[]).unwrap().to_vec()),
        any_signal().prop_map(|s| encode_to_bytes(&s, &[]).unwrap().to_vec()),
    ]
}

roundtrip!(hello_roundtrips, any_hello(), Hello, Hello, no_payload());
roundtrip!(
    welcome_roundtrips,
    any_welcome(),
    Welcome,
    Welcome,
    no_payload()
);
roundtrip!(
    envelope_roundtrips,
    any_envelope(),
    Envelope,
    Envelope,
    any_payload(4096)
);
roundtrip!(ack_roundtrips, any_ack(), Ack, Ack, no_payload());
roundtrip!(
    receipt_roundtrips,
    any_receipt(),
    Receipt,
    Receipt,
    no_payload()
);
roundtrip!(
    signal_roundtrips,
    any_signal(),
    Signal,
    Signal,
    no_payload()
);
roundtrip!(
    error_roundtrips,
    any_error_frame(),
    Error,
    ErrorFrame,
    no_payload()
);
roundtrip!(
    notice_roundtrips,
    any_notice(),
    Notice,
    Notice,
    no_payload()
);
roundtrip!(
    device_list_roundtrips,
    any_device_list(),
    DeviceList,
    DeviceList,
    no_payload()
);
roundtrip!(
    keep_alive_roundtrips,
    any_keep_alive(),
    KeepAlive,
    KeepAlive,
    no_payload()
);
roundtrip!(
    delivery_roundtrips,
    any_delivery(),
    Delivery,
    Delivery,
    inner_frame()
);

proptest! {
    #[test]
    fn delivery_inner_frame_decodes(envelope in any_envelope(), payload in any_payload(256), seq in any::<u64>()) {
        let inner = encode_to_bytes(&envelope, &payload).unwrap();
        let outer = encode_to_bytes(&Delivery { device: device(2), seq, flags: 0 }, &inner).unwrap();
        let frame = decode(&outer).unwrap();
        within_limits(&frame, outer.len())?;
        let inner_frame = frame.delivery_inner().unwrap().unwrap();
        let HeaderRef::Envelope(archived) = inner_frame.header else { panic!("not an envelope") };
        prop_assert_eq!(archived.message_id.get(), envelope.message_id);
        prop_assert_eq!(inner_frame.payload, &payload[..]);
    }

    /// A stream of frames of every kind, cut into reads of arbitrary sizes, comes out whole,
    /// in order and byte for byte.
    #[test]
    fn stream_reassembles_frames_split_anywhere(
        picks in proptest::collection::vec(0usize..10, 1..40),
        cuts in proptest::collection::vec(1usize..700, 1..200),
    ) {
        let samples = one_of_each_kind();
        let frames: Vec<Bytes> = picks.iter().map(|&i| samples[i].1.clone()).collect();
        let stream: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        let mut decoder = FrameDecoder::with_capacity(64);
        let mut out = Vec::new();
        let mut at = 0;
        let mut cut = cuts.iter().cycle();
        while at < stream.len() {
            let end = (at + cut.next().unwrap()).min(stream.len());
            decoder.extend_from_slice(&stream[at..end]);
            at = end;
            while let Some(frame) = decoder.next_frame().unwrap() {
                let view = frame.decode().unwrap();
                within_limits(&view, frame.as_bytes().len())?;
                out.push(frame.into_bytes());
            }
        }
        decoder.finish().unwrap();
        prop_assert_eq!(out, frames);
    }

    /// Random bytes: an error or a frame within every limit, never a panic, from both
    /// decoders.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        if let Ok(frame) = decode(&bytes) {
            within_limits(&frame, bytes.len())?;
        }
        let mut decoder = FrameDecoder::with_capacity(0);
        decoder.extend_from_slice(&bytes);
        for _ in 0..64 {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    if let Ok(view) = frame.decode() {
                        within_limits(&view, frame.as_bytes().len())?;
                    }
                }
                Ok(None) => break,
                Err(e) if e.is_framing() => break,
                Err(_) => {}
            }
        }
    }

    /// A valid frame with bytes overwritten: decodes or fails with a code, never panics, and
    /// when it decodes the header still meets every limit.
    #[test]
    fn mutated_frames_never_panic(
        pick in 0usize..10,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = one_of_each_kind()[pick].1.to_vec();
        for (index, value) in edits {
            let i = index.index(bytes.len());
            bytes[i] = value;
        }
        if let Ok(frame) = decode(&bytes) {
            within_limits(&frame, bytes.len())?;
        }
    }
}

/// Fails the property with what `frame` breaks, if anything.
fn within_limits(frame: &FrameRef<'_>, frame_len: usize) -> Result<(), TestCaseError> {
    let broken = limit_violations(frame, frame_len);
    prop_assert!(
        broken.is_empty(),
        "a decoded frame breaks limits: {broken:?}"
    );
    Ok(())
}

/// A header read with rkyv's validation alone, without the codec's limit checks: how a
/// decoder that forgot one would see it.
fn unchecked<'a, T>(header: &'a [u8]) -> &'a T
where
    T: rkyv::Portable
        + for<'b> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'b, rkyv::rancor::Error>>,
{
    rkyv::access::<T, rkyv::rancor::Error>(header).unwrap()
}

/// The check above can fail: each header one step past one limit is reported, by the name of
/// the field, and the codec's decoder refuses the same frame.
#[test]
fn limit_violations_reports_each_limit_broken() {
    let long = |n: usize| "x".repeat(n);
    let over_devices = RECIPIENT_DEVICES_MAX + 1;
    let cases: Vec<(FrameKind, Vec<u8>, &str)> = vec![
        (
            FrameKind::Hello,
            archive(&hello(&long(AGENT_BYTES_MAX + 1), None)),
            "hello.agent",
        ),
        (
            FrameKind::Hello,
            archive(&Hello {
                version_min: 0,
                ..hello("a", None)
            }),
            "hello.version_min",
        ),
        (
            FrameKind::Hello,
            archive(&Hello {
                version_min: 2,
                version_max: 1,
                ..hello("a", None)
            }),
            "hello.version_min",
        ),
        (
            FrameKind::Welcome,
            archive(&Welcome {
                version: 0,
                ..welcome()
            }),
            "welcome.version",
        ),
        (
            FrameKind::Welcome,
            archive(&Welcome {
                limits: SessionLimits {
                    frame_bytes_max: FRAME_BYTES_MAX as u32 + 1,
                    ..welcome().limits
                },
                ..welcome()
            }),
            "welcome.limits.frame_bytes_max",
        ),
        (
            FrameKind::Welcome,
            archive(&Welcome {
                limits: SessionLimits {
                    receipt_ids_max: 0,
                    ..welcome().limits
                },
                ..welcome()
            }),
            "welcome.limits.receipt_ids_max",
        ),
        (
            FrameKind::Envelope,
            archive(&envelope(DeviceSelection::Listed(
                (0..over_devices as u32).map(DeviceId).collect(),
            ))),
            "envelope.devices",
        ),
        (
            FrameKind::Envelope,
            archive(&envelope(DeviceSelection::Listed(Vec::new()))),
            "envelope.devices",
        ),
        (
            FrameKind::Envelope,
            archive(&Envelope {
                ttl_seconds: TTL_SECONDS_MAX + 1,
                ..envelope(DeviceSelection::All)
            }),
            "envelope.ttl_seconds",
        ),
        (
            FrameKind::Envelope,
            archive(&Envelope {
                ttl_seconds: 0,
                ..envelope(DeviceSelection::All)
            }),
            "envelope.ttl_seconds",
        ),
        (
            FrameKind::Envelope,
            archive(&Envelope {
                flags: 1 << 15,
                ..envelope(DeviceSelection::All)
            }),
            "envelope.flags",
        ),
        (
            FrameKind::Ack,
            archive(&ack_rejected(over_devices)),
            "ack.current_devices",
        ),
        (
            FrameKind::Receipt,
            archive(&receipt(RECEIPT_IDS_MAX + 1)),
            "receipt.message_ids",
        ),
        (
            FrameKind::Receipt,
            archive(&receipt(0)),
            "receipt.message_ids",
        ),
        (
            FrameKind::Error,
            archive(&error_frame(&long(ERROR_REASON_BYTES_MAX + 1))),
            "error.reason",
        ),
        (
            FrameKind::Notice,
            archive(&notice(&long(NOTICE_TEXT_BYTES_MAX + 1))),
            "notice.text",
        ),
        (
            FrameKind::DeviceList,
            archive(&device_list(over_devices)),
            "device_list.devices",
        ),
    ];
    for (kind, header, field) in cases {
        let bytes = raw_frame(kind as u8, WIRE_VERSION, &header, &[]);
        assert!(
            decode(&bytes).is_err(),
            "the decoder refuses the {field} case"
        );
        let header = &bytes[PREAMBLE_BYTES..];
        let header = match kind {
            FrameKind::Hello => HeaderRef::Hello(unchecked(header)),
            FrameKind::Welcome => HeaderRef::Welcome(unchecked(header)),
            FrameKind::Envelope => HeaderRef::Envelope(unchecked(header)),
            FrameKind::Ack => HeaderRef::Ack(unchecked(header)),
            FrameKind::Receipt => HeaderRef::Receipt(unchecked(header)),
            FrameKind::Error => HeaderRef::Error(unchecked(header)),
            FrameKind::Notice => HeaderRef::Notice(unchecked(header)),
            FrameKind::DeviceList => HeaderRef::DeviceList(unchecked(header)),
            other => unreachable!("no case of kind {other:?}"),
        };
        let frame = FrameRef {
            version: WIRE_VERSION,
            header,
            payload: &[],
        };
        let broken = limit_violations(&frame, bytes.len());
        assert!(
            broken.len() == 1 && broken[0].starts_with(field),
            "{field}: reported {broken:?}"
        );
    }

    // Sizes and the version byte: a valid header around a payload past its kind's limit, or
    // a header past HEADER_BYTES_MAX, or an unknown version.
    let env = archive(&envelope(DeviceSelection::All));
    let big = vec![0u8; PAYLOAD_BYTES_MAX + 1];
    let frame = FrameRef {
        version: WIRE_VERSION,
        header: HeaderRef::Envelope(unchecked(&env)),
        payload: &big,
    };
    let broken = limit_violations(&frame, PREAMBLE_BYTES + env.len() + big.len());
    assert!(
        broken.len() == 1 && broken[0].contains("payload of"),
        "{broken:?}"
    );
    let frame = FrameRef {
        version: WIRE_VERSION,
        header: HeaderRef::Envelope(unchecked(&env)),
        payload: &[],
    };
    let broken = limit_violations(&frame, PREAMBLE_BYTES + HEADER_BYTES_MAX + 1);
    assert!(
        broken.len() == 1 && broken[0].contains("header of"),
        "{broken:?}"
    );
    let frame = FrameRef {
        version: 0,
        header: HeaderRef::Envelope(unchecked(&env)),
        payload: &[],
    };
    let broken = limit_violations(&frame, PREAMBLE_BYTES + env.len());
    assert!(
        broken.len() == 1 && broken[0].contains("version byte"),
        "{broken:?}"
    );

    // A Delivery with unknown flags, and one that carries a frame of a kind it may not.
    let inner = encode_to_bytes(&signal(), &[]).unwrap();
    let outer = archive(&Delivery {
        flags: 0x80,
        ..delivery(1)
    });
    let frame = FrameRef {
        version: WIRE_VERSION,
        header: HeaderRef::Delivery(unchecked(&outer)),
        payload: &inner,
    };
    let broken = limit_violations(&frame, PREAMBLE_BYTES + outer.len() + inner.len());
    assert!(
        broken.len() == 1 && broken[0].starts_with("delivery.flags"),
        "{broken:?}"
    );
    let inner = encode_to_bytes(&hello("a", None), &[]).unwrap();
    let outer = archive(&delivery(1));
    let frame = FrameRef {
        version: WIRE_VERSION,
        header: HeaderRef::Delivery(unchecked(&outer)),
        payload: &inner,
    };
    let broken = limit_violations(&frame, PREAMBLE_BYTES + outer.len() + inner.len());
    assert!(
        broken.len() == 1 && broken[0].starts_with("delivery carries a Hello"),
        "{broken:?}"
    );

    // And every well-formed sample passes.
    for (kind, bytes) in one_of_each_kind() {
        let frame = decode(&bytes).unwrap();
        assert_eq!(
            limit_violations(&frame, bytes.len()),
            Vec::<String>::new(),
            "{kind:?}"
        );
    }
}
