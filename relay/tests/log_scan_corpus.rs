//! Replays the log-scanner fuzzer's seed corpus (`fuzz/corpus/log_scan/seed-*`) through its
//! checks (`relay::core::wal_fuzzing`), so every `cargo test` runs what the fuzzer starts
//! from, and checks that the corpus holds a clean segment, a torn one and each kind of damage.
//!
//! `A7_WRITE_SEEDS=1 cargo test -p relay --test log_scan_corpus` rewrites the seeds after a
//! change of the record format.
#![allow(clippy::cast_possible_truncation, clippy::indexing_slicing)]

use std::path::PathBuf;

use bytes::BytesMut;
use codec::{DeviceAddress, DeviceId, MessageId, NetworkId, UserAddress, UserId};
use relay::core::DeviceSet;
use relay::core::wal::{self, Damage, Record, ScanStop, Scanner, Target, Targets};
use relay::core::wal_fuzzing;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/log_scan")
}

/// A clean segment: a device set, enqueues for one and two devices, a release; with the
/// offset of each record.
fn clean() -> (Vec<u8>, Vec<usize>) {
    let user = UserAddress::new(NetworkId(2), UserId(7));
    let sender = DeviceAddress::new(NetworkId(1), UserId(3), DeviceId(1));
    let mut devices = DeviceSet::new();
    devices.insert(DeviceId(1));
    devices.insert(DeviceId(2));
    let mut out = BytesMut::new();
    let mut offsets = vec![0];
    wal::encode(&mut out, &Record::DeviceSet { user, devices });
    for n in 1..=3u64 {
        offsets.push(out.len());
        let mut targets = Targets::one(Target {
            device: DeviceId(1),
            seq: n,
        });
        if n > 1 {
            targets.push(Target {
                device: DeviceId(2),
                seq: n - 1,
            });
        }
        let frame = vec![n as u8; 20 * n as usize];
        wal::encode(
            &mut out,
            &Record::Enqueue {
                arrival_ms: 1_000 * n,
                expires_at_ms: 9_000_000,
                sender,
                id: MessageId(u128::from(n)),
                recipient: user,
                targets,
                frame: &frame,
            },
        );
    }
    offsets.push(out.len());
    wal::encode(
        &mut out,
        &Record::Release {
            device: user.device(DeviceId(1)),
            seq: 1,
            expired: false,
        },
    );
    (out.to_vec(), offsets)
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let (valid, at) = clean();
    let mut seeds = vec![("seed-valid", valid.clone())];
    seeds.push(("seed-torn", valid[..valid.len() - 7].to_vec()));
    let mut crc = valid.clone();
    crc[at[2] + 30] ^= 0x04;
    seeds.push(("seed-crc-middle", crc));
    let mut length = valid.clone();
    length[at[2]..at[2] + 4].copy_from_slice(&0u32.to_le_bytes());
    seeds.push(("seed-bad-length", length));
    // A record whose CRC holds around a body of an unknown kind.
    let mut content = valid[..at[2]].to_vec();
    let body = [9u8, 1, 2, 3, 4];
    content.extend_from_slice(&(body.len() as u32).to_le_bytes());
    content.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    content.extend_from_slice(&body);
    content.extend_from_slice(&valid[at[2]..]);
    seeds.push(("seed-undecodable", content));
    let mut zeros = valid.clone();
    zeros.resize(valid.len() + 512, 0);
    seeds.push(("seed-zero-tail", zeros));
    // A whole valid segment inside a frame, the enclosing record's CRC damaged.
    let mut forged = BytesMut::new();
    wal::encode(
        &mut forged,
        &Record::Enqueue {
            arrival_ms: 1,
            expires_at_ms: 2,
            sender: DeviceAddress::new(NetworkId(1), UserId(3), DeviceId(1)),
            id: MessageId(66),
            recipient: UserAddress::new(NetworkId(2), UserId(7)),
            targets: Targets::one(Target {
                device: DeviceId(1),
                seq: 9,
            }),
            frame: &valid,
        },
    );
    forged[40] ^= 0x01;
    forged.extend_from_slice(&valid[at[4]..]);
    seeds.push(("seed-forged-in-payload", forged.to_vec()));
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
    let mut stops = Vec::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        wal_fuzzing::check(&data);
        let mut scanner = Scanner::new(&data);
        loop {
            match scanner.next() {
                Ok(Some(_)) => {}
                Ok(None) => {
                    stops.push("clean");
                    break;
                }
                Err(ScanStop::TornTail { .. }) => {
                    stops.push("torn");
                    break;
                }
                Err(ScanStop::Corrupt { damage, .. }) => {
                    stops.push(match damage {
                        Damage::Length => "length",
                        Damage::Crc => "crc",
                        Damage::Content => "content",
                    });
                    if scanner.skip_damaged().is_none() {
                        break;
                    }
                }
            }
        }
        files += 1;
    }
    for kind in ["clean", "torn", "length", "crc", "content"] {
        assert!(stops.contains(&kind), "no seed ends {kind}: {stops:?}");
    }
    assert!(files >= seeds().len(), "{files} seeds");
}

/// The seeds as the fuzzer's checks see them, each in place (the corpus files may lag).
#[test]
fn the_generated_seeds_pass_the_checks() {
    for (_, bytes) in seeds() {
        wal_fuzzing::check(&bytes);
    }
}
