//! Property tests: every frame kind survives encode → decode unchanged, whole or split across
//! reads at any point; and no input, random or mutated, makes the decoder panic.
// Tests build hostile lengths on purpose; every cast here is of a small, known value.
#![allow(clippy::cast_possible_truncation)]

mod common;

use bytes::Bytes;
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
                frame.decode().unwrap();
                out.push(frame.into_bytes());
            }
        }
        decoder.finish().unwrap();
        prop_assert_eq!(out, frames);
    }

    /// Random bytes: an error or a frame, never a panic, from both decoders.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode(&bytes);
        let mut decoder = FrameDecoder::with_capacity(0);
        decoder.extend_from_slice(&bytes);
        for _ in 0..64 {
            match decoder.next_frame() {
                Ok(Some(frame)) => { let _ = frame.decode(); }
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
            let _ = frame.delivery_inner();
        }
    }
}
