//! Codec hot paths: encode and decode of one envelope at several payload sizes, and decode of
//! a 64 KiB read buffer of back-to-back envelopes with 256-byte payloads.
//!
//! Run: `cargo bench --bench codec` (about 40 s). Reports are under `target/criterion/`.
#![allow(clippy::cast_possible_truncation)]

use std::hint::black_box;
use std::time::Duration;

use bytes::BytesMut;
use codec::{
    ContentType, DeviceAddress, DeviceId, DeviceSelection, E2eProtocol, Envelope, FrameDecoder,
    HeaderRef, MessageId, NetworkId, UserAddress, UserId, decode, encode,
};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

const PAYLOAD_SIZES: [usize; 4] = [64, 256, 1024, 65536];
const READ_BUFFER_BYTES: usize = 64 * 1024;

fn envelope(n: u128) -> Envelope {
    Envelope {
        message_id: MessageId(n),
        sender: DeviceAddress::new(NetworkId(1), UserId(n), DeviceId(1)),
        recipient: UserAddress::new(NetworkId(2), UserId(n + 1)),
        devices: DeviceSelection::All,
        content_type: ContentType::Text,
        e2e_protocol: E2eProtocol::Signal,
        timestamp_ms: 1_790_000_000_000,
        ttl_seconds: 86_400,
        flags: 0,
    }
}

fn encoded(payload_len: usize) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(&mut out, &envelope(7), &vec![0xAB; payload_len]).unwrap();
    out.to_vec()
}

fn encode_envelope(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode_envelope");
    let header = envelope(7);
    for size in PAYLOAD_SIZES {
        let payload = vec![0xAB; size];
        let mut out = BytesMut::with_capacity(2 * (size + 256));
        group.throughput(Throughput::Bytes(encoded(size).len() as u64));
        group.bench_function(format!("{size}"), |b| {
            b.iter(|| {
                out.clear();
                encode(&mut out, black_box(&header), black_box(&payload)).unwrap();
                black_box(out.len())
            })
        });
    }
    group.finish();
}

fn decode_envelope(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_envelope");
    for size in PAYLOAD_SIZES {
        let bytes = encoded(size);
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(format!("{size}"), |b| {
            b.iter(|| {
                let frame = decode(black_box(&bytes)).unwrap();
                let HeaderRef::Envelope(header) = frame.header else {
                    unreachable!()
                };
                black_box((header.message_id.get(), frame.payload.len()))
            })
        });
    }
    group.finish();
}

/// A 64 KiB read buffer, as one socket read would fill it: whole frames, then the start of
/// the next one (which the decoder keeps for the following read).
fn read_buffer() -> (Vec<u8>, u64) {
    let mut out = BytesMut::with_capacity(READ_BUFFER_BYTES);
    let payload = [0xAB; 256];
    let mut frames = 0;
    for n in 0.. {
        let before = out.len();
        encode(&mut out, &envelope(n), &payload).unwrap();
        if out.len() > READ_BUFFER_BYTES {
            out.truncate(READ_BUFFER_BYTES.max(before));
            break;
        }
        frames += 1;
    }
    out.truncate(READ_BUFFER_BYTES);
    (out.to_vec(), frames)
}

fn decode_read_buffer(c: &mut Criterion) {
    let (buffer, frames) = read_buffer();
    let mut group = c.benchmark_group("decode_64k_buffer_256b_envelopes");
    group.throughput(Throughput::Elements(frames));
    group.bench_function(format!("{frames}_frames"), |b| {
        b.iter_batched(
            || {
                let mut decoder = FrameDecoder::with_capacity(READ_BUFFER_BYTES);
                decoder.extend_from_slice(&buffer);
                decoder
            },
            |mut decoder| {
                let mut seen = 0u64;
                while let Some(frame) = decoder.next_frame().unwrap() {
                    let view = frame.decode().unwrap();
                    black_box(view.payload.len());
                    seen += 1;
                }
                assert_eq!(seen, frames);
                decoder
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50);
    targets = encode_envelope, decode_envelope, decode_read_buffer
}
criterion_main!(benches);
