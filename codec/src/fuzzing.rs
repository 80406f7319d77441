//! The checks a fuzzer runs on arbitrary bytes, here so that the fuzz target stays three
//! lines and ordinary tests can replay the seed corpus through the same code.
//!
//! For any input: neither decoder panics; a frame that decodes re-encodes to a frame that
//! decodes to the same header value and payload.

use bytes::BytesMut;
use rkyv::rancor::Error;

use crate::decode::{FrameRef, HeaderRef, decode};
use crate::encode::{Encode, encode};
use crate::stream::FrameDecoder;

/// Runs every check on `data`. Panics (which is what a fuzzer reports) when one fails.
pub fn check(data: &[u8]) {
    if let Ok(frame) = decode(data) {
        check_reencodes(&frame);
        if let Ok(Some(inner)) = frame.delivery_inner() {
            check_reencodes(&inner);
        }
    }
    check_stream(data);
}

fn check_stream(data: &[u8]) {
    // Split the input into two reads at a point the input itself chooses.
    let cut = data
        .first()
        .map_or(0, |&b| usize::from(b) % (data.len() + 1));
    let (first, second) = data.split_at(cut);
    let mut decoder = FrameDecoder::with_capacity(0);
    for chunk in [first, second] {
        decoder.extend_from_slice(chunk);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    if let Ok(view) = frame.decode() {
                        check_reencodes(&view);
                    }
                }
                Ok(None) => break,
                Err(error) if error.is_framing() => return,
                Err(_) => {}
            }
        }
    }
    let _ = decoder.finish();
}

fn check_reencodes(frame: &FrameRef<'_>) {
    match frame.header {
        HeaderRef::Hello(a) => roundtrip::<crate::Hello>(a, frame.payload),
        HeaderRef::Welcome(a) => roundtrip::<crate::Welcome>(a, frame.payload),
        HeaderRef::Envelope(a) => roundtrip::<crate::Envelope>(a, frame.payload),
        HeaderRef::Ack(a) => roundtrip::<crate::Ack>(a, frame.payload),
        HeaderRef::Receipt(a) => roundtrip::<crate::Receipt>(a, frame.payload),
        HeaderRef::Signal(a) => roundtrip::<crate::Signal>(a, frame.payload),
        HeaderRef::Error(a) => roundtrip::<crate::ErrorFrame>(a, frame.payload),
        HeaderRef::Notice(a) => roundtrip::<crate::Notice>(a, frame.payload),
        HeaderRef::Delivery(a) => roundtrip::<crate::Delivery>(a, frame.payload),
        HeaderRef::DeviceList(a) => roundtrip::<crate::DeviceList>(a, frame.payload),
        HeaderRef::KeepAlive(a) => roundtrip::<crate::KeepAlive>(a, frame.payload),
    }
}

fn roundtrip<H>(archived: &H::Archived, payload: &[u8])
where
    H: Encode + PartialEq + core::fmt::Debug,
    H::Archived: rkyv::Deserialize<H, rkyv::api::high::HighDeserializer<Error>>
        + for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, Error>>,
{
    let value: H = match rkyv::deserialize::<H, Error>(archived) {
        Ok(value) => value,
        Err(error) => panic!("a validated header failed to deserialize: {error}"),
    };
    let mut out = BytesMut::new();
    if let Err(error) = encode(&mut out, &value, payload) {
        panic!("a decoded {value:?} does not re-encode: {error}");
    }
    let again = match decode(&out) {
        Ok(again) => again,
        Err(error) => panic!("re-encoded {value:?} does not decode: {error}"),
    };
    assert_eq!(
        again.payload, payload,
        "payload changed through re-encoding"
    );
    assert_eq!(again.kind(), H::KIND);
    let header = match crate::decode::split(&out) {
        Ok(raw) => raw.header,
        Err(error) => panic!("re-encoded {value:?} does not split: {error}"),
    };
    match rkyv::from_bytes::<H, Error>(header) {
        Ok(back) => assert_eq!(back, value, "header changed through re-encoding"),
        Err(error) => panic!("re-encoded {value:?} header does not read back: {error}"),
    }
}
