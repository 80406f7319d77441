//! Replays the fuzzer's seed corpus (`fuzz/corpus/decode/seed-*`) through the fuzz checks, so
//! every `cargo test` runs what the fuzzer starts from, and checks that the corpus holds a
//! valid frame of every kind plus hostile ones.
//!
//! `A7_WRITE_SEEDS=1 cargo test -p codec --test fuzz_corpus` rewrites the seeds after a wire
//! format change.
// Tests build hostile lengths on purpose; every cast here is of a small, known value.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::path::PathBuf;

use codec::limits::PREAMBLE_BYTES;
use codec::*;
use common::*;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/decode")
}

fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds: Vec<(String, Vec<u8>)> = one_of_each_kind()
        .into_iter()
        .map(|(kind, bytes)| (format!("seed-{kind:?}").to_lowercase(), bytes.to_vec()))
        .collect();
    let envelope = encode_to_bytes(
        &envelope(DeviceSelection::Listed(vec![DeviceId(1), DeviceId(2)])),
        b"ct",
    )
    .unwrap();
    let mut two = envelope.to_vec();
    two.extend_from_slice(&envelope);
    seeds.push(("seed-two-frames".into(), two));
    seeds.push((
        "seed-truncated".into(),
        envelope[..envelope.len() - 3].to_vec(),
    ));
    seeds.push(("seed-too-large".into(), u32::MAX.to_le_bytes().to_vec()));
    seeds.push((
        "seed-garbage-header".into(),
        raw_frame(FrameKind::Envelope as u8, 1, &[0xFF; 24], &[]),
    ));
    seeds.push((
        "seed-unknown-kind".into(),
        raw_frame(42, 1, &envelope[PREAMBLE_BYTES..], &[]),
    ));
    seeds
}

#[test]
fn seed_corpus_replays_cleanly() {
    let dir = corpus_dir();
    if std::env::var_os("A7_WRITE_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds() {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    let mut kinds_seen = Vec::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        fuzzing::check(&data);
        if let Ok(frame) = decode(&data) {
            kinds_seen.push(frame.kind());
        }
        files += 1;
    }
    for kind in FrameKind::ALL {
        assert!(
            kinds_seen.contains(&kind),
            "the seed corpus has no valid {kind:?} frame"
        );
    }
    assert!(
        files > FrameKind::ALL.len(),
        "the seed corpus has no hostile seeds"
    );
}
