//! Recovery of damaged log segments, in process (`Shard::recover` on a disk in memory): each
//! kind of damage (a bad CRC, a bad length prefix, a record whose CRC holds but that does not
//! decode, a sealed segment cut short, a torn tail) in the last segment and in one before it.
//! Every record the scanner can prove intact is kept, the damaged segment is quarantined only
//! after what it held is stored again, and a second recovery from the resulting disk (or from
//! a crash between the two) finds exactly the same queues.
#![allow(clippy::cast_possible_truncation)]

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use bytes::{Bytes, BytesMut};
use codec::*;
use relay::core::DeviceSet;
use relay::core::shard::Shard;
use relay::core::shard::recovery::{RecoveryReport, SegmentStore};
use relay::core::wal::{self, Record, Target, Targets};
use relay::limits::RelayLimits;

const NOW_MS: u64 = 1_000_000;
const SEGMENT_BYTES: u64 = 1 << 20;

#[derive(Debug, Default, Clone)]
struct MemDisk {
    segments: BTreeMap<u64, Vec<u8>>,
    quarantined: BTreeMap<u64, Vec<u8>>,
    /// A crash after storing the rescued records: before deleting an older segment they
    /// replace, or before moving the damaged segment aside.
    remove_fails: bool,
    quarantine_fails: bool,
}

impl SegmentStore for MemDisk {
    fn list(&mut self) -> io::Result<Vec<u64>> {
        Ok(self.segments.keys().copied().collect())
    }
    fn read(&mut self, id: u64) -> io::Result<Bytes> {
        Ok(Bytes::from(
            self.segments.get(&id).cloned().unwrap_or_default(),
        ))
    }
    fn truncate(&mut self, id: u64, len: u64) -> io::Result<()> {
        if let Some(s) = self.segments.get_mut(&id) {
            s.truncate(len as usize);
        }
        Ok(())
    }
    fn append_durably(&mut self, id: u64, bytes: &[u8]) -> io::Result<()> {
        self.segments
            .entry(id)
            .or_default()
            .extend_from_slice(bytes);
        Ok(())
    }
    fn remove(&mut self, id: u64) -> io::Result<()> {
        if self.remove_fails {
            return Err(io::Error::other("power lost"));
        }
        self.segments.remove(&id);
        Ok(())
    }
    fn quarantine(&mut self, id: u64) -> io::Result<()> {
        if self.quarantine_fails {
            return Err(io::Error::other("power lost"));
        }
        let bytes = self.segments.remove(&id).unwrap_or_default();
        self.quarantined.insert(id, bytes);
        Ok(())
    }
}

fn user() -> UserAddress {
    UserAddress::new(NetworkId(2), UserId(0x77))
}

fn frame_of(id: u64) -> Vec<u8> {
    vec![id as u8; 40 + id as usize]
}

/// Records of one segment, with the offset of each message's enqueue record.
#[derive(Default)]
struct Segment {
    bytes: BytesMut,
    at: BTreeMap<u64, usize>,
}

impl Segment {
    fn device_set(mut self, devices: &[u32]) -> Segment {
        let mut set = DeviceSet::new();
        for d in devices {
            set.insert(DeviceId(*d));
        }
        wal::encode(
            &mut self.bytes,
            &Record::DeviceSet {
                user: user(),
                devices: set,
            },
        );
        self
    }

    /// Message `id` queued for device 1 at queue position `id`.
    fn enqueue(mut self, ids: std::ops::RangeInclusive<u64>) -> Segment {
        for id in ids {
            self.at.insert(id, self.bytes.len());
            let frame = frame_of(id);
            wal::encode(
                &mut self.bytes,
                &Record::Enqueue {
                    arrival_ms: NOW_MS,
                    expires_at_ms: NOW_MS + 3_600_000,
                    sender: DeviceAddress::new(NetworkId(1), UserId(3), DeviceId(1)),
                    id: MessageId(u128::from(id)),
                    recipient: user(),
                    targets: Targets::one(Target {
                        device: DeviceId(1),
                        seq: id,
                    }),
                    frame: &frame,
                },
            );
        }
        self
    }

    fn release(mut self, seq: u64) -> Segment {
        wal::encode(
            &mut self.bytes,
            &Record::Release {
                device: user().device(DeviceId(1)),
                seq,
                expired: false,
            },
        );
        self
    }
}

/// Segment 1: the device set and messages 1..=6; segment 2: messages 7..=10 and the release
/// of message 2.
fn two_segments() -> (MemDisk, [Segment; 2]) {
    let first = Segment::default().device_set(&[1]).enqueue(1..=6);
    let second = Segment::default().enqueue(7..=10).release(2);
    let mut disk = MemDisk::default();
    disk.segments.insert(1, first.bytes.to_vec());
    disk.segments.insert(2, second.bytes.to_vec());
    (disk, [first, second])
}

fn recover(disk: &mut MemDisk, limits: RelayLimits) -> (Shard, RecoveryReport) {
    let (shard, report) = Shard::recover(limits, SEGMENT_BYTES, disk, NOW_MS).unwrap();
    shard.audit().unwrap();
    (shard, report)
}

/// Message ids queued for device 1, checking each frame's bytes when it is in memory.
fn queued(shard: &Shard) -> Vec<u64> {
    shard
        .queued(&user().device(DeviceId(1)))
        .into_iter()
        .map(|(seq, id, frame)| {
            let id = id.0 as u64;
            assert_eq!(seq, id);
            assert!(frame.is_empty() || frame == frame_of(id), "frame of {id}");
            id
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
enum Harm {
    /// A byte of the record's frame flipped.
    Crc,
    /// The length prefix zeroed.
    Length,
    /// The length prefix one byte too long (still plausible).
    LengthPlausible,
    /// The kind byte changed and the CRC fixed up: the CRC holds, the body is no record.
    Content,
}

fn harm(bytes: &mut [u8], at: usize, how: Harm) {
    let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    match how {
        Harm::Crc => bytes[at + wal::RECORD_HEADER_BYTES + 50] ^= 0x20,
        Harm::Length => bytes[at..at + 4].copy_from_slice(&[0; 4]),
        Harm::LengthPlausible => bytes[at..at + 4].copy_from_slice(&(len as u32 + 1).to_le_bytes()),
        Harm::Content => {
            bytes[at + 8] = 0x7E;
            let crc = crc32fast::hash(&bytes[at + 8..at + 8 + len]);
            bytes[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        }
    }
}

/// Each kind of damage to message 4 (segment 1, not the last) and to message 8 (segment 2,
/// the last): what is provably intact is kept (after the damage too, where its end is
/// proven), the rest of the log is untouched, and a second recovery agrees.
#[test]
fn every_provably_intact_record_of_a_damaged_segment_is_kept() {
    for (segment, victim) in [(1u64, 4u64), (2, 8)] {
        for how in [
            Harm::Crc,
            Harm::Length,
            Harm::LengthPlausible,
            Harm::Content,
        ] {
            let (mut disk, layout) = two_segments();
            let at = layout[segment as usize - 1].at[&victim];
            harm(disk.segments.get_mut(&segment).unwrap(), at, how);
            let (shard, report) = recover(&mut disk, RelayLimits::default());
            let resumes = matches!(how, Harm::Crc | Harm::Content);
            let last_of_segment = if segment == 1 { 6 } else { 10 };
            let expected: Vec<u64> = (1..=10)
                .filter(|&id| id != 2 && id != victim)
                .filter(|&id| resumes || !(victim..=last_of_segment).contains(&id))
                // The release of 2 is in segment 2, after message 10.
                .chain((!resumes && segment == 2).then_some(2))
                .collect::<BTreeSet<u64>>()
                .into_iter()
                .collect();
            let context = format!("{how:?} in segment {segment}: {report:#?}");
            assert_eq!(queued(&shard), expected, "{context}");
            assert_eq!(report.quarantined, vec![(segment, at)], "{context}");
            let damaged = &report.damaged[0];
            assert_eq!(damaged.ranges.len(), 1, "{context}");
            assert_eq!(damaged.ranges[0].resumed, resumes, "{context}");
            assert!(report.rescued_bytes > 0, "{context}");
            assert!(report.torn_tails.is_empty(), "{context}");
            // Segment 2's release of message 2 refers to segment 1: that one is rewritten
            // and deleted too, else message 2 would come back with it.
            let rewritten = if segment == 2 && resumes {
                vec![1]
            } else {
                vec![]
            };
            assert_eq!(report.rewritten, rewritten, "{context}");
            // Quarantined whole, after the rescued records were stored in a new segment.
            assert!(disk.quarantined.contains_key(&segment), "{context}");
            assert!(disk.segments.contains_key(&3), "{context}");
            let (again, report2) = recover(&mut disk.clone(), RelayLimits::default());
            assert!(report2.damaged.is_empty(), "{context}: {report2:?}");
            assert_eq!(queued(&again), expected, "{context}: second recovery");
        }
    }
}

/// A torn tail of the last segment is normal after a crash: cut off, nothing quarantined. A
/// segment that is not the last was synced whole before the next began: ending inside a
/// record there is damage, and that segment is quarantined with what it held kept.
#[test]
fn a_torn_tail_is_cut_only_in_the_last_segment() {
    let (mut disk, _) = two_segments();
    let len = disk.segments[&2].len();
    disk.segments.get_mut(&2).unwrap().truncate(len - 5);
    let (shard, report) = recover(&mut disk, RelayLimits::default());
    assert!(report.damaged.is_empty());
    assert_eq!(report.torn_tails.len(), 1);
    // The release of 2 was the torn record: 2 is queued again (it was never acknowledged).
    assert_eq!(queued(&shard), (1..=10).collect::<Vec<_>>());
    assert!(disk.quarantined.is_empty());
    assert!(disk.segments[&2].len() < len - 5, "cut at the record");

    let (mut disk, _) = two_segments();
    let len = disk.segments[&1].len();
    disk.segments.get_mut(&1).unwrap().truncate(len - 5);
    let (shard, report) = recover(&mut disk, RelayLimits::default());
    assert_eq!(report.damaged.len(), 1);
    assert_eq!(report.damaged[0].ranges[0].what, "cut short");
    assert!(report.torn_tails.is_empty());
    assert_eq!(queued(&shard), vec![1, 3, 4, 5, 7, 8, 9, 10]);
    assert!(disk.quarantined.contains_key(&1));
    let (again, _) = recover(&mut disk, RelayLimits::default());
    assert_eq!(queued(&again), vec![1, 3, 4, 5, 7, 8, 9, 10]);
}

/// Power lost after the rescued records were stored: before an older segment they replace
/// was deleted, or before the damaged segment was moved aside. The next start replays what is
/// there, queues each frame once, brings back nothing released, and finishes the job.
#[test]
fn a_crash_in_the_middle_of_recovery_loses_and_doubles_nothing() {
    for crash_before_remove in [true, false] {
        let (mut disk, layout) = two_segments();
        harm(
            disk.segments.get_mut(&2).unwrap(),
            layout[1].at[&8],
            Harm::Crc,
        );
        disk.remove_fails = crash_before_remove;
        disk.quarantine_fails = true;
        assert!(Shard::recover(RelayLimits::default(), SEGMENT_BYTES, &mut disk, NOW_MS).is_err());
        assert!(disk.segments.contains_key(&2) && disk.segments.contains_key(&3));
        assert_eq!(disk.segments.contains_key(&1), crash_before_remove);
        disk.remove_fails = false;
        disk.quarantine_fails = false;
        let expected = vec![1, 3, 4, 5, 6, 7, 9, 10];
        let (shard, report) = recover(&mut disk, RelayLimits::default());
        assert_eq!(
            queued(&shard),
            expected,
            "crash before remove: {crash_before_remove}"
        );
        assert_eq!(report.quarantined.len(), 1);
        let (again, report) = recover(&mut disk, RelayLimits::default());
        assert!(report.damaged.is_empty());
        assert_eq!(queued(&again), expected);
    }
}

/// Frames of the damaged segment that recovery left on disk (past the memory budget) are read
/// from its bytes before it is moved aside, so the rewrite carries them byte for byte.
#[test]
fn spilled_frames_of_a_damaged_segment_are_rescued_with_their_bytes() {
    let (mut disk, layout) = two_segments();
    harm(
        disk.segments.get_mut(&1).unwrap(),
        layout[0].at[&4],
        Harm::Crc,
    );
    let small = RelayLimits {
        shard_ram_bytes_max: 100,
        ..RelayLimits::default()
    };
    let (shard, _) = recover(&mut disk, small);
    assert_eq!(queued(&shard), vec![1, 3, 5, 6, 7, 8, 9, 10]);
    let (again, _) = recover(&mut disk, RelayLimits::default());
    let frames = again.queued(&user().device(DeviceId(1)));
    assert_eq!(frames.len(), 8);
    for (_, id, frame) in frames {
        assert_eq!(frame, frame_of(id.0 as u64), "{id}");
    }
}
