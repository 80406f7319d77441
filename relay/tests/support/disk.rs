//! A simulated disk for one shard's log: segment files whose writes land in a volatile buffer
//! (the page cache) and become durable only when synced. A crash keeps a random prefix of
//! what was not synced, so the last record may be torn; writes and syncs fail when the seed
//! says so. Reads see the page cache, as the relay's loader does.

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use bytes::Bytes;
use devkit::sim::SimRng;
use relay::core::shard::recovery::SegmentStore;

#[derive(Debug, Default, Clone)]
struct SegmentFile {
    /// On the platter: survives a crash.
    durable: Vec<u8>,
    /// Written after the last sync: a crash keeps some prefix of it, maybe none.
    volatile: Vec<u8>,
}

/// The seed's disk faults, in percent per call.
#[derive(Debug, Default, Clone, Copy)]
pub struct DiskFaults {
    pub write_fails: u64,
    pub sync_fails: u64,
}

#[derive(Debug, Default)]
pub struct SimDisk {
    files: BTreeMap<u64, SegmentFile>,
    pub quarantined: BTreeSet<u64>,
    pub faults: DiskFaults,
    /// What the faults did, for the run's summary.
    pub failed_writes: u64,
    pub failed_syncs: u64,
    pub torn_crashes: u64,
}

impl SimDisk {
    /// Appends `bytes` to `segment`'s file; a failing write may leave a prefix of them behind.
    pub fn write(&mut self, rng: &mut SimRng, segment: u64, bytes: &[u8]) -> io::Result<()> {
        let file = self.files.entry(segment).or_default();
        if rng.chance(self.faults.write_fails) {
            let kept = rng.below(bytes.len() as u64 + 1) as usize;
            file.volatile.extend_from_slice(&bytes[..kept]);
            self.failed_writes += 1;
            return Err(io::Error::other("simulated write failure"));
        }
        file.volatile.extend_from_slice(bytes);
        Ok(())
    }

    /// fdatasync of one segment file: on success everything written to it is durable; on
    /// failure nothing more is (and what was written stays at the mercy of a crash).
    pub fn sync(&mut self, rng: &mut SimRng, segment: u64) -> io::Result<()> {
        if rng.chance(self.faults.sync_fails) {
            self.failed_syncs += 1;
            return Err(io::Error::other("simulated sync failure"));
        }
        if let Some(file) = self.files.get_mut(&segment) {
            let volatile = std::mem::take(&mut file.volatile);
            file.durable.extend_from_slice(&volatile);
        }
        Ok(())
    }

    /// The shard let go of a segment: it is gone at once, durably.
    pub fn delete(&mut self, segment: u64) {
        self.files.remove(&segment);
    }

    /// Reads `len` bytes at `offset` (through the page cache); `None` if they are not there.
    pub fn read_at(&self, segment: u64, offset: u64, len: u32) -> Option<Bytes> {
        let file = self.files.get(&segment)?;
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len as usize)?;
        let mut whole = file.durable.clone();
        whole.extend_from_slice(&file.volatile);
        whole.get(start..end).map(Bytes::copy_from_slice)
    }

    /// Power is lost: of what was not synced, each file keeps a random prefix (all, none, or
    /// a cut anywhere, tearing a record). Files are written in order, so once one file lost
    /// something, the later ones keep nothing unsynced.
    pub fn crash(&mut self, rng: &mut SimRng) {
        let mut cut = false;
        for file in self.files.values_mut() {
            let volatile = std::mem::take(&mut file.volatile);
            if volatile.is_empty() {
                continue;
            }
            let kept = if cut {
                0
            } else {
                match rng.below(3) {
                    0 => 0,
                    1 => volatile.len(),
                    _ => rng.below(volatile.len() as u64) as usize,
                }
            };
            if kept < volatile.len() {
                cut = true;
                if kept > 0 {
                    self.torn_crashes += 1;
                }
            }
            file.durable.extend_from_slice(&volatile[..kept]);
        }
    }
}

impl SegmentStore for SimDisk {
    fn list(&mut self) -> io::Result<Vec<u64>> {
        Ok(self.files.keys().copied().collect())
    }

    fn read(&mut self, id: u64) -> io::Result<Bytes> {
        let file = self.files.get(&id).cloned().unwrap_or_default();
        let mut whole = file.durable;
        whole.extend_from_slice(&file.volatile);
        Ok(Bytes::from(whole))
    }

    fn truncate(&mut self, id: u64, len: u64) -> io::Result<()> {
        if let Some(file) = self.files.get_mut(&id) {
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            file.durable.truncate(len);
            file.volatile.clear();
        }
        Ok(())
    }

    /// Recovery's own writes: no faults (a failing disk is the committer's to meet).
    fn append_durably(&mut self, id: u64, bytes: &[u8]) -> io::Result<()> {
        self.files
            .entry(id)
            .or_default()
            .durable
            .extend_from_slice(bytes);
        Ok(())
    }

    fn remove(&mut self, id: u64) -> io::Result<()> {
        self.files.remove(&id);
        Ok(())
    }

    fn quarantine(&mut self, id: u64) -> io::Result<()> {
        self.files.remove(&id);
        self.quarantined.insert(id);
        Ok(())
    }
}
