//! The per-shard log's record format. Each record is framed with its length and a CRC so that
//! recovery can tell a record torn by a crash at the tail from damage in the middle.
//!
//! ```text
//! record = len: u32 | crc32: u32 | kind: u8 | body     (len counts kind + body; LE integers)
//! ```
//!
//! Kinds: `DeviceSet` (a user's complete device set), `Enqueue` (one envelope or receipt
//! queued for one or more devices, with the whole frame), `Release` (a device's ack, or TTL
//! expiry, of one queued frame). Replaying them in order rebuilds every queue exactly.
#![deny(clippy::indexing_slicing)]

use bytes::{BufMut, BytesMut};
use codec::{DeviceAddress, DeviceId, MessageId, NetworkId, UserAddress, UserId};

use super::DeviceSet;

pub const RECORD_HEADER_BYTES: usize = 9;
/// No valid record is longer: the largest frame plus the largest fan-out's metadata.
pub const RECORD_BYTES_MAX: usize = codec::limits::FRAME_BYTES_MAX + 1024;

const KIND_DEVICE_SET: u8 = 1;
const KIND_ENQUEUE: u8 = 2;
const KIND_RELEASE: u8 = 3;

/// Where the frame starts inside an `Enqueue` record with `targets` targets, counted from
/// the record's first byte: how spilled frames are read back from a segment.
pub const fn enqueue_frame_offset(targets: usize) -> u64 {
    (RECORD_HEADER_BYTES + 8 + 8 + 24 + 16 + 20 + 1 + 12 * targets + 4) as u64
}

/// Where a queued frame went: one device and its position in that device's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub device: DeviceId,
    pub seq: u64,
}

/// The targets of one `Enqueue` record, inline: a record is built per message, and a user has
/// at most `RECIPIENT_DEVICES_MAX` devices.
#[derive(Clone, Copy)]
pub struct Targets {
    items: [Target; codec::limits::RECIPIENT_DEVICES_MAX],
    len: u8,
}

impl Targets {
    pub const fn new() -> Targets {
        Targets {
            items: [Target {
                device: DeviceId(0),
                seq: 0,
            }; codec::limits::RECIPIENT_DEVICES_MAX],
            len: 0,
        }
    }

    pub fn one(target: Target) -> Targets {
        let mut targets = Targets::new();
        targets.push(target);
        targets
    }

    /// Adds `target`; `false` when full.
    pub fn push(&mut self, target: Target) -> bool {
        let Some(slot) = self.items.get_mut(usize::from(self.len)) else {
            return false;
        };
        *slot = target;
        self.len += 1;
        true
    }

    pub fn as_slice(&self) -> &[Target] {
        self.items.get(..usize::from(self.len)).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Default for Targets {
    fn default() -> Targets {
        Targets::new()
    }
}

impl PartialEq for Targets {
    fn eq(&self, other: &Targets) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Targets {}

impl std::fmt::Debug for Targets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl<'a> IntoIterator for &'a Targets {
    type Item = &'a Target;
    type IntoIter = std::slice::Iter<'a, Target>;
    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

/// One log record, borrowing the frame bytes from the segment it was read from.
// Built on the stack and passed by reference, one at a time: boxing the targets would cost an
// allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    DeviceSet {
        user: UserAddress,
        devices: DeviceSet,
    },
    Enqueue {
        arrival_ms: u64,
        expires_at_ms: u64,
        sender: DeviceAddress,
        id: MessageId,
        recipient: UserAddress,
        targets: Targets,
        frame: &'a [u8],
    },
    Release {
        device: DeviceAddress,
        seq: u64,
        expired: bool,
    },
}

fn put_user(out: &mut BytesMut, user: &UserAddress) {
    out.put_u32_le(user.network.0);
    out.put_u128_le(user.user.0);
}

fn put_device(out: &mut BytesMut, device: &DeviceAddress) {
    put_user(out, &device.user_address());
    out.put_u32_le(device.device.0);
}

/// The bytes [`encode`] appends for `record`.
#[allow(clippy::cast_possible_truncation)]
pub fn encoded_len(record: &Record<'_>) -> usize {
    match record {
        Record::DeviceSet { devices, .. } => RECORD_HEADER_BYTES + 20 + 1 + 4 * devices.len(),
        Record::Enqueue { targets, frame, .. } => {
            enqueue_frame_offset(targets.len()) as usize + frame.len()
        }
        Record::Release { .. } => RECORD_HEADER_BYTES + 24 + 8 + 1,
    }
}

/// Appends `record` to `out`, framed. Counts fit their fields: device sets and targets hold at
/// most `RECIPIENT_DEVICES_MAX` (32) entries, frames at most `FRAME_BYTES_MAX` bytes.
#[allow(clippy::cast_possible_truncation, clippy::indexing_slicing)]
pub fn encode(out: &mut BytesMut, record: &Record<'_>) {
    let start = out.len();
    out.put_bytes(0, RECORD_HEADER_BYTES - 1);
    match record {
        Record::DeviceSet { user, devices } => {
            out.put_u8(KIND_DEVICE_SET);
            put_user(out, user);
            out.put_u8(devices.len() as u8);
            for id in devices.as_slice() {
                out.put_u32_le(id.0);
            }
        }
        Record::Enqueue {
            arrival_ms,
            expires_at_ms,
            sender,
            id,
            recipient,
            targets,
            frame,
        } => {
            out.put_u8(KIND_ENQUEUE);
            out.put_u64_le(*arrival_ms);
            out.put_u64_le(*expires_at_ms);
            put_device(out, sender);
            out.put_u128_le(id.0);
            put_user(out, recipient);
            out.put_u8(targets.len() as u8);
            for target in targets {
                out.put_u32_le(target.device.0);
                out.put_u64_le(target.seq);
            }
            out.put_u32_le(frame.len() as u32);
            out.put_slice(frame);
        }
        Record::Release {
            device,
            seq,
            expired,
        } => {
            out.put_u8(KIND_RELEASE);
            put_device(out, device);
            out.put_u64_le(*seq);
            out.put_u8(u8::from(*expired));
        }
    }
    let body_start = start + RECORD_HEADER_BYTES - 1;
    let body_len = u32::try_from(out.len() - body_start).unwrap_or(u32::MAX);
    let crc = out.get(body_start..).map_or(0, crc32fast::hash);
    if let Some(header) = out.get_mut(start..body_start) {
        header[..4].copy_from_slice(&body_len.to_le_bytes());
        header[4..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Why a scan of a segment stopped before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanStop {
    /// The last record is incomplete or fails its CRC and nothing follows it: a write torn by
    /// a crash. Truncate the segment at `offset`.
    TornTail { offset: usize },
    /// A record in the middle is damaged: the segment cannot be trusted past `offset`.
    Corrupt { offset: usize },
}

/// Reads records from one segment's bytes, in order.
#[derive(Debug)]
pub struct Scanner<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Scanner<'a> {
    pub fn new(bytes: &'a [u8]) -> Scanner<'a> {
        Scanner { bytes, offset: 0 }
    }

    /// The next record and its offset, `Ok(None)` at a clean end.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<(usize, Record<'a>)>, ScanStop> {
        let offset = self.offset;
        let Some(rest) = self.bytes.get(offset..) else {
            return Ok(None);
        };
        if rest.is_empty() {
            return Ok(None);
        }
        let Some((header, after)) = rest.split_first_chunk::<8>() else {
            return Err(ScanStop::TornTail { offset });
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len == 0 || len > RECORD_BYTES_MAX {
            // A length no writer produces: a torn length at the very end, else damage.
            return Err(if after.len() < 4 {
                ScanStop::TornTail { offset }
            } else {
                ScanStop::Corrupt { offset }
            });
        }
        let Some(body) = after.get(..len) else {
            return Err(ScanStop::TornTail { offset });
        };
        let is_last = after.len() == len;
        if crc32fast::hash(body) != crc {
            return Err(if is_last {
                ScanStop::TornTail { offset }
            } else {
                ScanStop::Corrupt { offset }
            });
        }
        let record = decode_body(body).ok_or(ScanStop::Corrupt { offset })?;
        self.offset = offset + 8 + len;
        Ok(Some((offset, record)))
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u128(&mut self) -> Option<u128> {
        Some(u128::from_le_bytes(self.take(16)?.try_into().ok()?))
    }
    fn user(&mut self) -> Option<UserAddress> {
        Some(UserAddress::new(
            NetworkId(self.u32()?),
            UserId(self.u128()?),
        ))
    }
    fn device(&mut self) -> Option<DeviceAddress> {
        Some(self.user()?.device(DeviceId(self.u32()?)))
    }
}

fn decode_body(body: &[u8]) -> Option<Record<'_>> {
    let mut r = Reader(body);
    let record = match r.u8()? {
        KIND_DEVICE_SET => {
            let user = r.user()?;
            let count = r.u8()?;
            let mut devices = DeviceSet::new();
            for _ in 0..count {
                if !devices.insert(DeviceId(r.u32()?)) {
                    return None;
                }
            }
            Record::DeviceSet { user, devices }
        }
        KIND_ENQUEUE => {
            let arrival_ms = r.u64()?;
            let expires_at_ms = r.u64()?;
            let sender = r.device()?;
            let id = MessageId(r.u128()?);
            let recipient = r.user()?;
            let count = usize::from(r.u8()?);
            if count > codec::limits::RECIPIENT_DEVICES_MAX {
                return None;
            }
            let mut targets = Targets::new();
            for _ in 0..count {
                let target = Target {
                    device: DeviceId(r.u32()?),
                    seq: r.u64()?,
                };
                if !targets.push(target) {
                    return None;
                }
            }
            let frame_len = r.u32()? as usize;
            let frame = r.take(frame_len)?;
            Record::Enqueue {
                arrival_ms,
                expires_at_ms,
                sender,
                id,
                recipient,
                targets,
                frame,
            }
        }
        KIND_RELEASE => {
            let device = r.device()?;
            let seq = r.u64()?;
            let expired = match r.u8()? {
                0 => false,
                1 => true,
                _ => return None,
            };
            Record::Release {
                device,
                seq,
                expired,
            }
        }
        _ => return None,
    };
    r.0.is_empty().then_some(record)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

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
        assert_eq!(scanner.next(), Err(ScanStop::Corrupt { offset: second }));
        // And a damaged length in the middle.
        let mut bytes = log_of(&records);
        bytes[second..second + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut scanner = Scanner::new(&bytes);
        scanner.next().unwrap();
        assert_eq!(scanner.next(), Err(ScanStop::Corrupt { offset: second }));
    }
}
