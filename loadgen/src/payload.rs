//! What every loadgen message carries so its receiver can check it without asking anyone:
//! the payload header (run, phase, sequence number, scheduled and write times, sender, the
//! per-pair sequence number, class, length, checksum), the message-id layout that maps acks
//! and receipts back to ledger slots, and the payload size distribution.
//!
//! Payload layout (little-endian), then filler bytes up to `total_len`:
//!
//! ```text
//!  0 u32 magic "A7LG"   4 u32 phase        8 u64 seq          16 u64 scheduled_ns
//! 24 u64 written_ns    32 u32 sender dev  36 u32 pair_seq    40 u32 total_len
//! 44 u8  class         45 [u8;3] zero     48 u64 checksum of bytes 0..48
//! ```

use codec::MessageId;
use serde::Serialize;

use crate::population::Class;
use crate::rng::Rng;

pub const MAGIC: u32 = u32::from_le_bytes(*b"A7LG");
/// Bytes of the header; the smallest payload loadgen sends.
pub const HEADER_BYTES: usize = 56;
/// The largest payload loadgen sends (the relay's default `payload_bytes_max`).
pub const PAYLOAD_BYTES_MAX: usize = 64 * 1024;

/// The decoded payload header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadHeader {
    pub phase: u32,
    pub seq: u64,
    /// When the message was due, in ns since the run's epoch: latency starts here, so a stall
    /// anywhere (loadgen included) is counted, never hidden (no coordinated omission).
    pub scheduled_ns: u64,
    /// When loadgen actually wrote it, ns since the epoch.
    pub written_ns: u64,
    /// Global device index of the sender.
    pub sender: u32,
    /// Position among the messages this sender device wrote to this recipient user.
    pub pair_seq: u32,
    pub total_len: u32,
    pub class: Class,
}

/// Why a payload is not a valid loadgen message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadError {
    TooShort,
    BadMagic,
    BadChecksum,
    LengthMismatch,
    BadClass,
}

impl PayloadHeader {
    /// Writes the header into the first [`HEADER_BYTES`] of `out`.
    pub fn write(&self, out: &mut [u8]) {
        assert!(out.len() >= HEADER_BYTES, "payload buffer too small");
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.phase.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.scheduled_ns.to_le_bytes());
        out[24..32].copy_from_slice(&self.written_ns.to_le_bytes());
        out[32..36].copy_from_slice(&self.sender.to_le_bytes());
        out[36..40].copy_from_slice(&self.pair_seq.to_le_bytes());
        out[40..44].copy_from_slice(&self.total_len.to_le_bytes());
        out[44] = u8::try_from(self.class.index()).unwrap_or(u8::MAX);
        out[45..48].fill(0);
        let sum = checksum(&out[0..48]);
        out[48..56].copy_from_slice(&sum.to_le_bytes());
    }

    /// Reads and checks a payload (header, checksum and length).
    pub fn read(payload: &[u8]) -> Result<PayloadHeader, PayloadError> {
        let head = payload.get(..HEADER_BYTES).ok_or(PayloadError::TooShort)?;
        let u32_at =
            |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        let u64_at = |at: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&head[at..at + 8]);
            u64::from_le_bytes(bytes)
        };
        if u32_at(0) != MAGIC {
            return Err(PayloadError::BadMagic);
        }
        if u64_at(48) != checksum(&head[0..48]) {
            return Err(PayloadError::BadChecksum);
        }
        let total_len = u32_at(40);
        if total_len as usize != payload.len() {
            return Err(PayloadError::LengthMismatch);
        }
        Ok(PayloadHeader {
            phase: u32_at(4),
            seq: u64_at(8),
            scheduled_ns: u64_at(16),
            written_ns: u64_at(24),
            sender: u32_at(32),
            pair_seq: u32_at(36),
            total_len,
            class: Class::from_index(head[44]).ok_or(PayloadError::BadClass)?,
        })
    }
}

/// FNV-1a, 64 bits: enough to catch a relay that mangles bytes.
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01B3);
    }
    hash
}

/// What kind of loadgen id a `MessageId` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    Envelope {
        seq: u64,
    },
    /// A receipt from recipient device `from_device` (1-based) about envelope `seq`.
    Receipt {
        seq: u64,
        from_device: u8,
        read: bool,
    },
}

/// Message ids of one run: the high 64 bits are a random run tag (so two runs against one
/// relay never collide in its dedup window), the phase, and whether it is a receipt; the low
/// 64 bits the ledger slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdSpace {
    run_tag: u64,
}

const RECEIPT_BIT: u64 = 1 << 15;
const PHASE_MASK: u64 = RECEIPT_BIT - 1;
/// Receipt ids keep `seq` in the low 56 bits' upper part: seq << 8 | device << 1 | read.
pub const SEQ_MAX: u64 = (1 << 55) - 1;

impl IdSpace {
    pub fn new(run_tag: u64) -> IdSpace {
        IdSpace {
            run_tag: run_tag & !0xFFFF,
        }
    }

    pub fn envelope(&self, phase: u32, seq: u64) -> MessageId {
        let high = self.run_tag | (u64::from(phase) & PHASE_MASK);
        MessageId((u128::from(high) << 64) | u128::from(seq))
    }

    pub fn receipt(&self, phase: u32, seq: u64, from_device: u8, read: bool) -> MessageId {
        let high = self.run_tag | RECEIPT_BIT | (u64::from(phase) & PHASE_MASK);
        let low = (seq << 8) | (u64::from(from_device) << 1) | u64::from(read);
        MessageId((u128::from(high) << 64) | u128::from(low))
    }

    /// The phase and kind of an id of this run; `None` for anything else.
    pub fn parse(&self, id: MessageId) -> Option<(u32, IdKind)> {
        let high = crate::rng::high_half(id.0);
        let low = crate::rng::low_half(id.0);
        if high & !0xFFFF != self.run_tag {
            return None;
        }
        let phase = u32::try_from(high & PHASE_MASK).ok()?;
        if high & RECEIPT_BIT == 0 {
            return Some((phase, IdKind::Envelope { seq: low }));
        }
        Some((
            phase,
            IdKind::Receipt {
                seq: low >> 8,
                from_device: u8::try_from((low >> 1) & 0x7F).ok()?,
                read: low & 1 == 1,
            },
        ))
    }
}

/// Payload sizes: short texts, media pointers (keys, digest, thumbnail hash, URL), and a few
/// large inline payloads up to 64 KiB; or one fixed size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum SizeMix {
    /// 80% texts of 64 to 512 bytes, 19% media pointers of 512 to 2,048, 1% of 8 to 64 KiB.
    Mixed,
    Fixed {
        bytes: u32,
    },
}

impl SizeMix {
    pub fn parse(text: &str) -> Result<SizeMix, String> {
        if text == "mixed" {
            return Ok(SizeMix::Mixed);
        }
        let bytes: u32 = text
            .parse()
            .map_err(|_| format!("--payload {text:?}: `mixed` or a byte count"))?;
        let bytes_usize = bytes as usize;
        if !(HEADER_BYTES..=PAYLOAD_BYTES_MAX).contains(&bytes_usize) {
            return Err(format!(
                "--payload: {HEADER_BYTES} to {PAYLOAD_BYTES_MAX} bytes"
            ));
        }
        Ok(SizeMix::Fixed { bytes })
    }

    pub fn draw(&self, rng: &mut Rng) -> u32 {
        match *self {
            SizeMix::Fixed { bytes } => bytes,
            SizeMix::Mixed => {
                let roll = rng.unit();
                if roll < 0.80 {
                    rng.between(64, 512)
                } else if roll < 0.99 {
                    rng.between(512, 2048)
                } else {
                    rng.between(8 * 1024, 64 * 1024)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PayloadHeader {
        PayloadHeader {
            phase: 3,
            seq: 123_456,
            scheduled_ns: 9_000_000_001,
            written_ns: 9_000_100_000,
            sender: 77,
            pair_seq: 5,
            total_len: 300,
            class: Class::Interop,
        }
    }

    #[test]
    fn a_header_reads_back() {
        let mut payload = vec![0xAB; 300];
        header().write(&mut payload);
        assert_eq!(PayloadHeader::read(&payload), Ok(header()));
    }

    #[test]
    fn damage_is_detected() {
        let mut payload = vec![0; 300];
        header().write(&mut payload);
        assert_eq!(
            PayloadHeader::read(&payload[..299]),
            Err(PayloadError::LengthMismatch)
        );
        assert_eq!(
            PayloadHeader::read(&payload[..20]),
            Err(PayloadError::TooShort)
        );
        let mut flipped = payload.clone();
        flipped[10] ^= 1;
        assert_eq!(
            PayloadHeader::read(&flipped),
            Err(PayloadError::BadChecksum)
        );
        let mut magic = payload.clone();
        magic[0] = b'X';
        assert_eq!(PayloadHeader::read(&magic), Err(PayloadError::BadMagic));
    }

    #[test]
    fn ids_round_trip_and_stay_apart() {
        let space = IdSpace::new(0xDEAD_BEEF_0000_1234);
        let e = space.envelope(2, 99);
        assert_eq!(space.parse(e), Some((2, IdKind::Envelope { seq: 99 })));
        let r = space.receipt(2, 99, 5, true);
        assert_eq!(
            space.parse(r),
            Some((
                2,
                IdKind::Receipt {
                    seq: 99,
                    from_device: 5,
                    read: true
                }
            ))
        );
        assert_ne!(e, r);
        assert_ne!(space.receipt(2, 99, 5, false), r);
        let other = IdSpace::new(0x1111_0000_0000_0000);
        assert_eq!(other.parse(e), None);
        let big = space.receipt(1, SEQ_MAX, 8, false);
        assert_eq!(
            space.parse(big),
            Some((
                1,
                IdKind::Receipt {
                    seq: SEQ_MAX,
                    from_device: 8,
                    read: false
                }
            ))
        );
    }

    #[test]
    fn sizes_follow_the_mix() {
        let mut rng = Rng::new(5);
        let mix = SizeMix::parse("mixed").unwrap();
        let sizes: Vec<u32> = (0..10_000).map(|_| mix.draw(&mut rng)).collect();
        assert!(sizes.iter().all(|&s| (64..=65_536).contains(&s)));
        let small = sizes.iter().filter(|&&s| s <= 512).count();
        let large = sizes.iter().filter(|&&s| s >= 8192).count();
        assert!((7500..8500).contains(&small), "{small}");
        assert!((50..200).contains(&large), "{large}");
        assert_eq!(SizeMix::parse("256").unwrap().draw(&mut rng), 256);
        assert!(SizeMix::parse("10").is_err());
        assert!(SizeMix::parse("big").is_err());
    }
}
