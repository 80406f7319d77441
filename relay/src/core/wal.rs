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

/// What is wrong with a damaged record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// Its length prefix is one no writer produces (0, or past [`RECORD_BYTES_MAX`]): where
    /// the next record starts is unknown.
    Length,
    /// Its bytes fail their CRC.
    Crc,
    /// Its CRC holds but its body is not a record (an unknown kind, a count that does not
    /// match its length, a queue position of 0): written by a different version, or a bug.
    Content,
}

impl Damage {
    pub fn name(self) -> &'static str {
        match self {
            Damage::Length => "bad length",
            Damage::Crc => "bad CRC",
            Damage::Content => "undecodable content",
        }
    }
}

/// Why a scan of a segment stopped before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanStop {
    /// The last record is incomplete or fails its CRC and nothing follows it, or nothing but
    /// zeros follow `offset`: a write torn by a crash. Truncate the segment at `offset` (in
    /// the segment a crash can tear: the last one).
    TornTail { offset: usize },
    /// A record in the middle is damaged; [`Scanner::skip_damaged`] says whether the records
    /// after it can still be read.
    Corrupt { offset: usize, damage: Damage },
}

/// Reads records from one segment's bytes, in order.
#[derive(Debug)]
pub struct Scanner<'a> {
    bytes: &'a [u8],
    offset: usize,
    /// The last damaged record whose length prefix is plausible: (offset, end, damage).
    damaged: Option<(usize, usize, Damage)>,
}

impl<'a> Scanner<'a> {
    pub fn new(bytes: &'a [u8]) -> Scanner<'a> {
        Scanner {
            bytes,
            offset: 0,
            damaged: None,
        }
    }

    /// Where the next record is read from.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The next record and its offset, `Ok(None)` at a clean end.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<(usize, Record<'a>)>, ScanStop> {
        self.damaged = None;
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
            // A length no writer produces: a torn length at the very end, or zeros to the end
            // (space the file system allocated for a write that never landed), else damage.
            return Err(if after.len() < 4 || rest.iter().all(|b| *b == 0) {
                ScanStop::TornTail { offset }
            } else {
                ScanStop::Corrupt {
                    offset,
                    damage: Damage::Length,
                }
            });
        }
        let Some(body) = after.get(..len) else {
            return Err(ScanStop::TornTail { offset });
        };
        let end = offset + 8 + len;
        let is_last = after.len() == len;
        if crc32fast::hash(body) != crc {
            if is_last {
                return Err(ScanStop::TornTail { offset });
            }
            self.damaged = Some((offset, end, Damage::Crc));
            return Err(ScanStop::Corrupt {
                offset,
                damage: Damage::Crc,
            });
        }
        let Some(record) = decode_body(body) else {
            self.damaged = Some((offset, end, Damage::Content));
            return Err(ScanStop::Corrupt {
                offset,
                damage: Damage::Content,
            });
        };
        self.offset = end;
        Ok(Some((offset, record)))
    }

    /// After a [`ScanStop::Corrupt`]: moves past the damaged record if where it ends is
    /// proven, and returns that offset. Proof is the record's own length prefix, checked by
    /// its CRC (`Content`) or by a valid record starting right after it (`Crc`). Never by
    /// searching the bytes for something record-shaped: a frame's payload is the sender's
    /// choice and may hold a record with a valid CRC, so a search could replay a forgery.
    pub fn skip_damaged(&mut self) -> Option<usize> {
        let (_, end, damage) = self.damaged.take()?;
        let proven = match damage {
            Damage::Length => false,
            Damage::Content => true,
            Damage::Crc => matches!(
                Scanner {
                    bytes: self.bytes,
                    offset: end,
                    damaged: None,
                }
                .next(),
                Ok(Some(_))
            ),
        };
        if !proven {
            return None;
        }
        self.offset = end;
        Some(end)
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
                // No writer names a device twice (insert takes a repeat as a no-op).
                let id = DeviceId(r.u32()?);
                if devices.contains(id) || !devices.insert(id) {
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
                // Queue positions start at 1; no writer names a device twice.
                let repeated = targets.as_slice().iter().any(|t| t.device == target.device);
                if target.seq == 0 || repeated || !targets.push(target) {
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
            let seq = r.u64().filter(|seq| *seq > 0)?;
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
