//! Decoding allocates nothing, and steady-state encoding into a reserved buffer allocates
//! nothing: counted by a global allocator that tallies this thread's allocations.
// Tests build hostile lengths on purpose; every cast here is of a small, known value.
#![allow(clippy::cast_possible_truncation)]
// A GlobalAlloc is an unsafe trait; this wrapper only counts and forwards to System.
#![allow(unsafe_code)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::BytesMut;
use codec::*;
use common::*;

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_during(work: impl FnOnce()) -> usize {
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|c| c.set(true));
    work();
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn decoding_allocates_nothing() {
    let samples = one_of_each_kind();
    let frames: Vec<Frame> = samples
        .iter()
        .map(|(_, b)| Frame::from_bytes(b.clone()).unwrap())
        .collect();
    let garbage = raw_frame(FrameKind::Envelope as u8, 1, &[0xFF; 40], &[]);
    let count = allocations_during(|| {
        for _ in 0..1_000 {
            for (_, bytes) in &samples {
                let frame = decode(bytes).unwrap();
                std::hint::black_box(frame.delivery_inner().unwrap());
            }
            for frame in &frames {
                std::hint::black_box(frame.decode().unwrap());
                std::hint::black_box(frame.payload());
            }
            // The error path too: the error type carries no heap data.
            std::hint::black_box(decode(&garbage).unwrap_err());
        }
    });
    assert_eq!(count, 0, "decode allocated {count} times");
}

#[test]
fn streaming_decoder_allocates_nothing_per_frame() {
    let one = encode_to_bytes(&envelope(DeviceSelection::All), &[7; 256]).unwrap();
    let mut decoder = FrameDecoder::with_capacity(one.len() * 2_000);
    for _ in 0..2_000 {
        decoder.extend_from_slice(&one);
    }
    let mut seen = 0;
    let count = allocations_during(|| {
        while let Some(frame) = decoder.next_frame().unwrap() {
            std::hint::black_box(frame.decode().unwrap());
            seen += 1;
        }
    });
    assert_eq!(seen, 2_000);
    // Splitting the first frame off a vector-backed buffer turns it into a shared one: one
    // allocation for the whole buffer, none per frame.
    assert!(count <= 1, "{count} allocations for {seen} frames");
}

#[test]
fn steady_state_encoding_allocates_nothing() {
    let e = envelope(DeviceSelection::Listed(vec![DeviceId(1), DeviceId(2)]));
    let ack = Ack {
        message_id: MessageId(1),
        address: device(1),
        status: AckStatus::Accepted,
    };
    let mut out = BytesMut::with_capacity(1 << 20);
    // Warm-up: rkyv's thread-local arena allocates its first block here.
    encode_head(&mut out, &e, 256).unwrap();
    out.clear();
    let count = allocations_during(|| {
        for _ in 0..1_000 {
            encode_head(&mut out, &e, 256).unwrap();
            encode(&mut out, &ack, &[]).unwrap();
        }
    });
    assert!(out.len() < 1 << 20, "the test buffer must not have grown");
    assert_eq!(count, 0, "encode allocated {count} times");
}
