//! The checks the log-scanner fuzz target (`fuzz/fuzz_targets/log_scan.rs`) runs on arbitrary
//! bytes taken as a segment, here so that the target stays three lines and `cargo test`
//! replays the seed corpus through the same code (`relay/tests/log_scan_corpus.rs`).
//!
//! For any input: the scanner does not panic and ends after at most one step per record
//! header's worth of bytes; offsets only grow; every record it returns re-encodes to exactly
//! the bytes it was read from (the format has one encoding per record, so a record that
//! decodes was written that way); it goes past a damaged record only to that record's own
//! end, never for a bad length; and the intact records before the first stop, cut anywhere
//! inside the last one, read back as those records and a torn tail at the cut record.

use bytes::BytesMut;

use super::wal::{Damage, RECORD_HEADER_BYTES, ScanStop, Scanner, encode, encoded_len};

/// Runs every check on `data`, and again with every CRC the length prefixes reach made right
/// (a fuzzer seldom guesses a CRC, and the record bodies behind them are what decodes).
/// Panics (which is what a fuzzer reports) when one fails.
pub fn check(data: &[u8]) {
    let choice = data.first().copied().unwrap_or(0);
    let prefix_end = check_scan(data);
    check_torn_prefix(data, prefix_end, choice);
    let fixed = with_crcs_fixed(data);
    let prefix_end = check_scan(&fixed);
    check_torn_prefix(&fixed, prefix_end, choice);
}

/// `data` with the CRC of each record the length prefixes lead to, from the start, set to
/// that of its body.
fn with_crcs_fixed(data: &[u8]) -> Vec<u8> {
    let mut fixed = data.to_vec();
    let mut offset = 0;
    while let Some(header) = fixed.get(offset..offset + 8) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let Some(body) = fixed.get(offset + 8..offset + 8 + len) else {
            break;
        };
        let crc = crc32fast::hash(body).to_le_bytes();
        if let Some(field) = fixed.get_mut(offset + 4..offset + 8) {
            field.copy_from_slice(&crc);
        }
        offset += 8 + len.max(1);
    }
    fixed
}

/// Scans `data` to its end, going past what can be skipped; returns where the intact records
/// before the first stop end.
#[allow(clippy::indexing_slicing)] // offsets the scanner returned, checked against the length
fn check_scan(data: &[u8]) -> usize {
    let mut scanner = Scanner::new(data);
    let mut read_to = 0;
    let mut prefix_end = None;
    let steps_max = data.len() / RECORD_HEADER_BYTES + 2;
    for _ in 0..steps_max {
        match scanner.next() {
            Ok(Some((offset, record))) => {
                let end = scanner.offset();
                assert!(offset >= read_to && end <= data.len(), "{offset}..{end}");
                let mut again = BytesMut::new();
                encode(&mut again, &record);
                assert_eq!(encoded_len(&record), again.len());
                assert!(
                    again[..] == data[offset..end],
                    "the record at {offset} does not re-encode to its bytes: {record:?}"
                );
                read_to = end;
            }
            Ok(None) => {
                assert_eq!(scanner.offset(), data.len());
                return prefix_end.unwrap_or(data.len());
            }
            Err(ScanStop::TornTail { offset }) => {
                assert!(offset >= read_to && offset < data.len());
                return prefix_end.unwrap_or(offset);
            }
            Err(ScanStop::Corrupt { offset, damage }) => {
                assert!(offset >= read_to && offset < data.len());
                prefix_end.get_or_insert(offset);
                let Some(next) = scanner.skip_damaged() else {
                    return prefix_end.unwrap_or(offset);
                };
                assert!(damage != Damage::Length, "skipped past a bad length");
                let declared =
                    u32::from_le_bytes(data[offset..offset + 4].try_into().unwrap_or_default())
                        as usize;
                assert_eq!(
                    next,
                    offset + 8 + declared,
                    "skipped elsewhere than its end"
                );
                assert!(next <= data.len());
                read_to = next;
            }
        }
    }
    panic!("the scan did not end within {steps_max} steps");
}

/// The intact records of `data[..prefix_end]`, cut inside the last one at a point `choice`
/// picks: each record before it reads back the same, then a torn tail at the last one.
#[allow(clippy::indexing_slicing)] // cuts within `prefix_end`, which is within the input
fn check_torn_prefix(data: &[u8], prefix_end: usize, choice: u8) {
    let prefix = &data[..prefix_end];
    let mut offsets = Vec::new();
    let mut scanner = Scanner::new(prefix);
    while let Ok(Some((offset, _))) = scanner.next() {
        offsets.push(offset);
    }
    assert_eq!(
        scanner.offset(),
        prefix_end,
        "the intact prefix is not all records"
    );
    let Some(&last) = offsets.last() else { return };
    let cut = last + usize::from(choice) % (prefix_end - last);
    let mut torn = Scanner::new(&prefix[..cut]);
    for &offset in &offsets[..offsets.len() - 1] {
        assert!(matches!(torn.next(), Ok(Some((at, _))) if at == offset));
    }
    let expected = if cut == last {
        Ok(None)
    } else {
        Err(ScanStop::TornTail { offset: last })
    };
    assert_eq!(
        torn.next().map(|r| r.map(|(at, _)| at)),
        expected,
        "cut at {cut}"
    );
}
