//! `relay log inspect`: what an operator sees of a shard's log segments, a quarantined one
//! above all: each record's offset, size, kind, whether its CRC holds, and what it refers to
//! (user, devices, message, queue positions); each damaged range with its kind and where
//! reading went on. It reads with the scanner recovery uses, so it shows what recovery would
//! keep, and it never writes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::core::wal::{RECORD_HEADER_BYTES, Record, ScanStop, Scanner};

/// What one segment held, for the closing line and the caller's total.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSummary {
    pub bytes: u64,
    pub records: u64,
    pub enqueues: u64,
    pub releases: u64,
    pub device_sets: u64,
    pub damaged_ranges: u64,
    pub damaged_bytes: u64,
}

/// Describes the records of one segment's `bytes` into `out`, one line each (with
/// `records`), then a summary line.
pub fn describe_segment(bytes: &[u8], records: bool, out: &mut String) -> SegmentSummary {
    let mut summary = SegmentSummary {
        bytes: bytes.len() as u64,
        ..SegmentSummary::default()
    };
    if records {
        let _ = writeln!(
            out,
            "  {:>10} {:>7}  {:<10} {:<4} refers to",
            "offset", "bytes", "kind", "crc"
        );
    }
    let mut scanner = Scanner::new(bytes);
    let end = loop {
        match scanner.next() {
            Ok(Some((offset, record))) => {
                let size = scanner.offset() - offset;
                match record {
                    Record::DeviceSet { .. } => summary.device_sets += 1,
                    Record::Enqueue { .. } => summary.enqueues += 1,
                    Record::Release { .. } => summary.releases += 1,
                }
                summary.records += 1;
                if records {
                    let (kind, what) = describe_record(&record);
                    let _ = writeln!(out, "  {offset:>10} {size:>7}  {kind:<10} ok   {what}");
                }
            }
            Ok(None) => break "clean end".to_string(),
            Err(ScanStop::TornTail { offset }) => {
                break format!(
                    "ends inside a record at offset {offset} ({} bytes): a torn tail if this is \
                     the shard's last segment, else damage",
                    bytes.len() - offset
                );
            }
            Err(ScanStop::Corrupt { offset, damage }) => {
                let resumed = scanner.skip_damaged();
                let to = resumed.unwrap_or(bytes.len());
                summary.damaged_ranges += 1;
                summary.damaged_bytes += (to - offset) as u64;
                let (declared, kind) = header_at(bytes, offset);
                let crc = match damage {
                    crate::core::wal::Damage::Crc => "bad",
                    crate::core::wal::Damage::Content => "ok",
                    crate::core::wal::Damage::Length => "-",
                };
                let after = match resumed {
                    Some(at) => format!("read on from {at}"),
                    None => "nothing after it can be read".to_string(),
                };
                let _ = writeln!(
                    out,
                    "  {offset:>10} {:>7}  {kind:<10} {crc:<4} DAMAGED: {} (declared length \
                     {declared}); {} bytes lost, {after}",
                    to - offset,
                    damage.name(),
                    to - offset,
                );
                if resumed.is_none() {
                    break "damaged".to_string();
                }
            }
        }
    };
    let _ = writeln!(
        out,
        "  {} bytes, {} records ({} enqueue, {} release, {} device set), {} damaged ranges \
         ({} bytes); {end}",
        summary.bytes,
        summary.records,
        summary.enqueues,
        summary.releases,
        summary.device_sets,
        summary.damaged_ranges,
        summary.damaged_bytes,
    );
    summary
}

/// The declared length and kind of the record header at `offset`, as far as they are there.
fn header_at(bytes: &[u8], offset: usize) -> (String, &'static str) {
    let header = bytes.get(offset..).unwrap_or_default();
    let declared = header
        .first_chunk::<4>()
        .map_or("?".to_string(), |len| u32::from_le_bytes(*len).to_string());
    let kind = match header.get(RECORD_HEADER_BYTES - 1) {
        Some(1) => "device_set",
        Some(2) => "enqueue",
        Some(3) => "release",
        _ => "?",
    };
    (declared, kind)
}

fn describe_record(record: &Record<'_>) -> (&'static str, String) {
    match record {
        Record::DeviceSet { user, devices } => {
            let ids: Vec<String> = devices.as_slice().iter().map(|d| d.0.to_string()).collect();
            (
                "device_set",
                format!("user {user} devices [{}]", ids.join(", ")),
            )
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
            let targets: Vec<String> = targets
                .as_slice()
                .iter()
                .map(|t| format!("d{}#{}", t.device.0, t.seq))
                .collect();
            (
                "enqueue",
                format!(
                    "message {id} from {sender} to {recipient} devices#seq [{}] frame {} B \
                     arrived_ms {arrival_ms} expires_ms {expires_at_ms}",
                    targets.join(", "),
                    frame.len()
                ),
            )
        }
        Record::Release {
            device,
            seq,
            expired,
        } => (
            "release",
            format!(
                "device {device} seq {seq} ({})",
                if *expired {
                    "expired"
                } else {
                    "acknowledged or removed"
                }
            ),
        ),
    }
}

/// The segment files `path` names: itself if a file; else the `*.log` files in it, in its
/// `quarantine/`, and in those of its `shard-N/` directories (a data directory), in order.
pub fn segment_files(path: &Path) -> Result<Vec<PathBuf>, String> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut dirs = vec![path.to_path_buf(), path.join("quarantine")];
    for entry in read_dir(path)? {
        let name = entry.file_name().map(|n| n.to_string_lossy().into_owned());
        if entry.is_dir() && name.is_some_and(|n| n.starts_with("shard-")) {
            dirs.push(entry.join("quarantine"));
            dirs.push(entry);
        }
    }
    dirs.sort();
    let mut files = Vec::new();
    for dir in dirs.iter().filter(|d| d.is_dir()) {
        let mut logs: Vec<PathBuf> = read_dir(dir)?
            .into_iter()
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        files.extend(logs);
    }
    if files.is_empty() {
        return Err(format!("{}: no log segments (*.log) here", path.display()));
    }
    Ok(files)
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(entries.filter_map(Result::ok).map(|e| e.path()).collect())
}

/// Describes every segment `path` names; with `records`, every record too.
pub fn inspect(path: &Path, records: bool) -> Result<String, String> {
    let mut out = String::new();
    let mut total = SegmentSummary::default();
    let files = segment_files(path)?;
    for file in &files {
        let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let quarantined = file
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|n| n == "quarantine");
        let _ = writeln!(
            out,
            "segment {}{}",
            file.display(),
            if quarantined { " (quarantined)" } else { "" }
        );
        let one = describe_segment(&bytes, records, &mut out);
        total.records += one.records;
        total.damaged_ranges += one.damaged_ranges;
        total.damaged_bytes += one.damaged_bytes;
    }
    let _ = writeln!(
        out,
        "{} segments, {} records, {} damaged ranges ({} bytes)",
        files.len(),
        total.records,
        total.damaged_ranges,
        total.damaged_bytes
    );
    Ok(out)
}
