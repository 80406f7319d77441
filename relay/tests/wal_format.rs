//! The log's record format and its scanner (`relay::core::wal`): records round-trip, a tail
//! torn at every byte is a torn tail, damage in the middle is corruption, and the scanner goes
//! past a damaged record only when where it ends is proven (never by searching the bytes, which
//! a sender's payload could fool).
#![allow(clippy::cast_possible_truncation, clippy::indexing_slicing)]

use bytes::BytesMut;
use codec::{DeviceAddress, DeviceId, MessageId, NetworkId, UserAddress, UserId};
use relay::core::DeviceSet;
use relay::core::wal::*;

fn samples() -> Vec<Record<'static>> {
    let user = UserAddress::new(NetworkId(2), UserId(7));
    let mut devices = DeviceSet::new();
    devices.insert(DeviceId(1));
    devices.insert(DeviceId(2));
    vec![
        Record::DeviceSet { user, devices },
        Record::Enqueue {
            arrival_ms: 10,
            expires_at_ms: 20,
            sender: DeviceAddress::new(NetworkId(1), UserId(3), DeviceId(1)),
            id: MessageId(99),
            recipient: user,
            targets: {
                let mut targets = Targets::new();
                targets.push(Target {
                    device: DeviceId(1),
                    seq: 1,
                });
                targets.push(Target {
                    device: DeviceId(2),
                    seq: 5,
                });
                targets
            },
            frame: b"the whole frame, as received",
        },
        Record::Release {
            device: user.device(DeviceId(2)),
            seq: 5,
            expired: true,
        },
    ]
}

fn log_of(records: &[Record<'_>]) -> BytesMut {
    let mut out = BytesMut::new();
    for record in records {
        encode(&mut out, record);
    }
    out
}

#[test]
#[allow(clippy::cast_possible_truncation)]
fn the_frame_offset_points_at_the_frame() {
    let records = samples();
    let bytes = log_of(&records[1..2]);
    let Record::Enqueue { frame, targets, .. } = &records[1] else {
        unreachable!()
    };
    let at = enqueue_frame_offset(targets.len()) as usize;
    assert_eq!(&bytes[at..at + frame.len()], *frame);
}

#[test]
fn encoded_len_is_what_encode_appends() {
    for record in &samples() {
        assert_eq!(
            log_of(std::slice::from_ref(record)).len(),
            encoded_len(record)
        );
    }
}

#[test]
fn records_round_trip_in_order() {
    let records = samples();
    let bytes = log_of(&records);
    let mut scanner = Scanner::new(&bytes);
    for expected in &records {
        let (_, record) = scanner.next().unwrap().unwrap();
        assert_eq!(&record, expected);
    }
    assert_eq!(scanner.next(), Ok(None));
}

/// A crash can cut the last write anywhere: every cut is a torn tail at the last record's
/// offset, and everything before it reads back.
#[test]
fn a_tail_torn_at_every_byte_is_detected() {
    let records = samples();
    let bytes = log_of(&records);
    let last_offset = log_of(&records[..2]).len();
    for cut in last_offset..bytes.len() {
        let mut scanner = Scanner::new(&bytes[..cut]);
        assert!(scanner.next().unwrap().is_some());
        assert!(scanner.next().unwrap().is_some());
        if cut == last_offset {
            assert_eq!(scanner.next(), Ok(None));
        } else {
            assert_eq!(
                scanner.next(),
                Err(ScanStop::TornTail {
                    offset: last_offset
                }),
                "cut at {cut}"
            );
        }
    }
}

/// A torn write may also leave garbage of full length in the last record.
#[test]
fn garbage_in_the_last_record_is_a_torn_tail() {
    let records = samples();
    let mut bytes = log_of(&records);
    let last_offset = log_of(&records[..2]).len();
    let end = bytes.len();
    bytes[end - 1] ^= 0xFF;
    let mut scanner = Scanner::new(&bytes);
    scanner.next().unwrap();
    scanner.next().unwrap();
    assert_eq!(
        scanner.next(),
        Err(ScanStop::TornTail {
            offset: last_offset
        })
    );
}

#[test]
fn damage_in_the_middle_is_corruption() {
    let records = samples();
    let mut bytes = log_of(&records);
    let second = log_of(&records[..1]).len();
    // Flip a byte inside the second record's frame bytes.
    bytes[second + 40] ^= 0x01;
    let mut scanner = Scanner::new(&bytes);
    scanner.next().unwrap();
    assert_eq!(
        scanner.next(),
        Err(ScanStop::Corrupt {
            offset: second,
            damage: Damage::Crc
        })
    );
    // And a damaged length in the middle.
    let mut bytes = log_of(&records);
    bytes[second..second + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut scanner = Scanner::new(&bytes);
    scanner.next().unwrap();
    assert_eq!(
        scanner.next(),
        Err(ScanStop::Corrupt {
            offset: second,
            damage: Damage::Length
        })
    );
}

/// A framed record around any body, with a correct CRC.
fn raw_record(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Every record a scan that skips what it can prove returns, with its offset.
fn scan_skipping(bytes: &[u8]) -> (Vec<(usize, Record<'_>)>, Option<ScanStop>) {
    let mut scanner = Scanner::new(bytes);
    let mut records = Vec::new();
    loop {
        match scanner.next() {
            Ok(Some(found)) => records.push(found),
            Ok(None) => return (records, None),
            Err(stop @ ScanStop::TornTail { .. }) => return (records, Some(stop)),
            Err(stop @ ScanStop::Corrupt { .. }) => {
                if scanner.skip_damaged().is_none() {
                    return (records, Some(stop));
                }
            }
        }
    }
}

#[test]
fn a_record_failing_its_crc_is_skipped_when_a_valid_record_follows() {
    let records = samples();
    let mut bytes = log_of(&records);
    let second = log_of(&records[..1]).len();
    let third = log_of(&records[..2]).len();
    bytes[second + 40] ^= 0x01;
    let mut scanner = Scanner::new(&bytes);
    scanner.next().unwrap();
    assert!(matches!(scanner.next(), Err(ScanStop::Corrupt { .. })));
    assert_eq!(scanner.skip_damaged(), Some(third));
    assert_eq!(scanner.next(), Ok(Some((third, records[2].clone()))));
    assert_eq!(scanner.next(), Ok(None));
    // Asked twice, or after a record that was fine: nothing to skip.
    assert_eq!(scanner.skip_damaged(), None);
}

#[test]
fn a_record_whose_crc_holds_but_does_not_decode_is_skipped_by_its_length() {
    let records = samples();
    let first = log_of(&records[..1]);
    let rest = log_of(&records[1..]);
    for body in [
        vec![9u8, 1, 2, 3], // an unknown kind
        vec![3u8; 30],      // a release too short
        {
            // A release of queue position 0.
            let mut b = vec![3u8];
            b.extend_from_slice(&[0; 24]);
            b.extend_from_slice(&0u64.to_le_bytes());
            b.push(0);
            b
        },
    ] {
        let mut bytes = first.to_vec();
        let at = bytes.len();
        bytes.extend_from_slice(&raw_record(&body));
        let after = bytes.len();
        bytes.extend_from_slice(&rest);
        let mut scanner = Scanner::new(&bytes);
        scanner.next().unwrap();
        assert_eq!(
            scanner.next(),
            Err(ScanStop::Corrupt {
                offset: at,
                damage: Damage::Content
            })
        );
        assert_eq!(scanner.skip_damaged(), Some(after));
        let (found, stop) = scan_skipping(&bytes);
        assert_eq!(found.len(), 3);
        assert_eq!(stop, None);
        // Last in the segment: skipped to the end.
        let mut bytes = first.to_vec();
        bytes.extend_from_slice(&raw_record(&body));
        assert_eq!(scan_skipping(&bytes).0.len(), 1);
    }
}

#[test]
fn a_bad_length_stops_the_scan() {
    let records = samples();
    let mut bytes = log_of(&records);
    let second = log_of(&records[..1]).len();
    bytes[second..second + 4].copy_from_slice(&0u32.to_le_bytes());
    let (found, stop) = scan_skipping(&bytes);
    assert_eq!(found.len(), 1);
    assert_eq!(
        stop,
        Some(ScanStop::Corrupt {
            offset: second,
            damage: Damage::Length
        })
    );
}

/// A damaged length that is still plausible points into the next record: nothing valid
/// starts there, so nothing is skipped to.
#[test]
fn a_bad_crc_is_not_skipped_when_what_follows_is_not_a_record() {
    let records = samples();
    let second = log_of(&records[..1]).len();
    let third = log_of(&records[..2]).len();
    // The length of the second record, one too long: its CRC fails, and the third record
    // read one byte late is no record.
    let mut bytes = log_of(&records);
    let len = u32::from_le_bytes(bytes[second..second + 4].try_into().unwrap());
    bytes[second..second + 4].copy_from_slice(&(len + 1).to_le_bytes());
    assert_eq!(scan_skipping(&bytes).0.len(), 1);
    // Two damaged records in a row.
    let mut bytes = log_of(&records);
    bytes[second + 40] ^= 0x01;
    bytes[third + 20] ^= 0x01;
    let (found, stop) = scan_skipping(&bytes);
    assert_eq!(found.len(), 1);
    assert!(matches!(stop, Some(ScanStop::Corrupt { offset, .. }) if offset == second));
}

/// A sender controls its payload, so a frame can carry bytes that are a valid record. When
/// the record around it is damaged, the scanner must not land inside it.
#[test]
fn a_record_forged_inside_a_payload_is_never_replayed() {
    let victim = UserAddress::new(NetworkId(2), UserId(7));
    let forged = log_of(&[Record::Release {
        device: victim.device(DeviceId(1)),
        seq: 1,
        expired: false,
    }]);
    let mut payload = vec![0xEEu8; 64];
    payload.extend_from_slice(&forged);
    payload.extend_from_slice(&forged);
    let records = vec![
        samples()[0].clone(),
        Record::Enqueue {
            arrival_ms: 1,
            expires_at_ms: 2,
            sender: DeviceAddress::new(NetworkId(1), UserId(3), DeviceId(1)),
            id: MessageId(5),
            recipient: victim,
            targets: Targets::one(Target {
                device: DeviceId(1),
                seq: 1,
            }),
            frame: &payload,
        },
        samples()[2].clone(),
    ];
    let second = log_of(&records[..1]).len();
    let is_forged = |r: &Record<'_>| matches!(r, Record::Release { seq: 1, .. });
    // Every single byte of the enclosing record's header and metadata damaged in turn.
    for at in second..second + enqueue_frame_offset(1) as usize {
        for flip in [0x01u8, 0x80] {
            let mut bytes = log_of(&records);
            bytes[at] ^= flip;
            let (found, _) = scan_skipping(&bytes);
            assert!(
                !found.iter().any(|(_, r)| is_forged(r)),
                "a forged record replayed after damage at {at}"
            );
        }
    }
}

#[test]
fn zeros_to_the_end_are_a_torn_tail() {
    let records = samples();
    let mut bytes = log_of(&records).to_vec();
    let end = bytes.len();
    bytes.resize(end + 4096, 0);
    let (found, stop) = scan_skipping(&bytes);
    assert_eq!(found.len(), 3);
    assert_eq!(stop, Some(ScanStop::TornTail { offset: end }));
    // Zeros followed by anything else are damage.
    bytes.push(1);
    let (_, stop) = scan_skipping(&bytes);
    assert_eq!(
        stop,
        Some(ScanStop::Corrupt {
            offset: end,
            damage: Damage::Length
        })
    );
}

/// A device set with the same device twice is written by no one: content damage, not a set
/// that re-encodes to other bytes. (Found by the log scanner's fuzz checks.)
#[test]
fn a_device_set_naming_a_device_twice_does_not_decode() {
    let mut body = vec![1u8];
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&7u128.to_le_bytes());
    body.push(2);
    body.extend_from_slice(&1u32.to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes());
    let bytes = raw_record(&body);
    relay::core::wal_fuzzing::check(&bytes);
    assert!(matches!(
        Scanner::new(&bytes).next(),
        Err(ScanStop::Corrupt {
            damage: Damage::Content,
            ..
        })
    ));
}

/// Nor does an enqueue naming one device twice.
#[test]
fn an_enqueue_naming_a_device_twice_does_not_decode() {
    let mut targets = Targets::one(Target {
        device: DeviceId(1),
        seq: 1,
    });
    targets.push(Target {
        device: DeviceId(1),
        seq: 2,
    });
    let user = UserAddress::new(NetworkId(2), UserId(7));
    let bytes = log_of(&[Record::Enqueue {
        arrival_ms: 1,
        expires_at_ms: 2,
        sender: user.device(DeviceId(9)),
        id: MessageId(1),
        recipient: user,
        targets,
        frame: b"frame",
    }]);
    assert!(matches!(
        Scanner::new(&bytes).next(),
        Err(ScanStop::Corrupt {
            damage: Damage::Content,
            ..
        })
    ));
}
