//! The device-token journal: every token id the relay accepts, kept on disk until its token
//! expires, so that a token refused as `TOKEN_REPLAYED` stays refused after a restart.
//!
//! Files `data_dir/tokens/<generation>.journal`, each a header and fixed 32-byte records
//! (network u32, token id u128, expiry u64, CRC-32 of those 28 bytes; little-endian). A
//! thread of its own appends what the handshakes hand it (`Auth` sends each id through a
//! bounded channel; a full channel refuses the handshake), in batches, and fdatasyncs each
//! batch at the `fsync` level. A new file is started every `ROTATE_AFTER`, and a file is
//! deleted once every token in it has expired, so the journal holds at most a little more
//! than a token lifetime of ids. At start every file is read (a torn or damaged tail ends a
//! file's reading), the live ids go back into `Auth`, and they are written again to one new
//! file, stored before the old ones go.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use codec::NetworkId;
use crossbeam_channel::{Receiver, Sender, select};

use crate::tables::auth::{Auth, SeenToken};

/// The first bytes of a journal file.
const MAGIC: &[u8; 8] = b"A7TOKJ1\n";
const RECORD_BYTES: usize = 32;
/// Records written in one batch at most.
const BATCH_MAX: usize = 4096;
/// How often a new journal file is started (the old ones go once their tokens expired).
const ROTATE_AFTER: Duration = Duration::from_secs(3600);
/// How often the thread looks for files to rotate or delete while idle.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(10);

/// What `/metrics` shows of the journal.
#[derive(Debug, Default)]
pub struct JournalMetrics {
    pub records: AtomicU64,
    pub restored: AtomicU64,
    pub write_errors: AtomicU64,
    pub files: AtomicU64,
}

/// The running journal: its thread, and the way to stop it once no handshake can come.
#[derive(Debug)]
pub struct TokenJournal {
    stop: Sender<()>,
    thread: Option<JoinHandle<()>>,
    pub metrics: Arc<JournalMetrics>,
}

/// One journal file being written.
#[derive(Debug)]
struct Segment {
    generation: u64,
    file: File,
    opened_ms: u64,
    /// The latest expiry of a token in it: it can go after that.
    expires_max_ms: u64,
}

impl TokenJournal {
    /// Reads the journal under `data_dir`, gives the live ids back to `auth`, and starts the
    /// thread that records every id `auth` accepts from now on. `sync`: fdatasync each batch;
    /// `pending_max`: ids waiting for the thread at most (past it handshakes are refused with
    /// `TOKEN_JOURNAL_BUSY`).
    pub fn open(
        data_dir: &Path,
        auth: &Auth,
        sync: bool,
        pending_max: u32,
        now_ms: u64,
    ) -> Result<TokenJournal, String> {
        let dir = data_dir.join("tokens");
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let old = list(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut live = Vec::new();
        for (_, path) in &old {
            read_file(path, now_ms, &mut live);
        }
        let restored = auth.restore_tokens(now_ms, &live);
        let generation = old.last().map_or(1, |(g, _)| g + 1);
        let mut segment = Segment::create(&dir, generation, now_ms)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        // The live ids, stored in the new file before the old files go.
        segment
            .append(&live)
            .and_then(|()| segment.file.sync_data())
            .and_then(|()| File::open(&dir)?.sync_all())
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        for (_, path) in &old {
            let _ = fs::remove_file(path);
        }
        if restored > 0 {
            tracing::info!("{restored} device token ids restored against replay");
        }
        let metrics = Arc::new(JournalMetrics::default());
        metrics.restored.store(restored as u64, Ordering::Relaxed);
        metrics.files.store(1, Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::bounded(pending_max.max(1) as usize);
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
        auth.attach_journal(tx);
        let writer = Writer {
            dir,
            current: segment,
            sealed: Vec::new(),
            sync,
            metrics: metrics.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("relay-tokens".into())
            .spawn(move || writer.run(&rx, &stop_rx))
            .map_err(|e| format!("starting the token journal: {e}"))?;
        Ok(TokenJournal {
            stop: stop_tx,
            thread: Some(thread),
            metrics,
        })
    }

    /// Writes what is pending and stops (call once no handshake can come any more).
    pub fn stop(mut self) {
        let _ = self.stop.send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Writer {
    dir: PathBuf,
    current: Segment,
    /// Earlier files: (generation, latest expiry).
    sealed: Vec<(u64, u64)>,
    sync: bool,
    metrics: Arc<JournalMetrics>,
}

impl Writer {
    fn run(mut self, rx: &Receiver<SeenToken>, stop: &Receiver<()>) {
        let mut batch = Vec::with_capacity(BATCH_MAX);
        loop {
            select! {
                recv(rx) -> seen => match seen {
                    Ok(seen) => {
                        batch.push(seen);
                        while batch.len() < BATCH_MAX {
                            match rx.try_recv() {
                                Ok(seen) => batch.push(seen),
                                Err(_) => break,
                            }
                        }
                        self.write(&batch);
                        batch.clear();
                    }
                    Err(_) => return,
                },
                recv(stop) -> _ => {
                    batch.extend(rx.try_iter());
                    self.write(&batch);
                    return;
                },
                default(HOUSEKEEPING_EVERY) => self.housekeep(),
            }
        }
    }

    fn write(&mut self, batch: &[SeenToken]) {
        if batch.is_empty() {
            return;
        }
        self.housekeep();
        let written = self.current.append(batch).and_then(|()| {
            if self.sync {
                self.current.file.sync_data()
            } else {
                Ok(())
            }
        });
        match written {
            Ok(()) => {
                self.metrics
                    .records
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                // The ids stay refused while the relay runs; a restart would forget them.
                self.metrics.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!("token journal: {e}: these device tokens are not stored");
            }
        }
    }

    /// Starts a new file every `ROTATE_AFTER`; deletes files whose tokens all expired.
    fn housekeep(&mut self) {
        let now_ms = devkit::now_ms();
        let age_ms = u64::try_from(ROTATE_AFTER.as_millis()).unwrap_or(u64::MAX);
        if now_ms.saturating_sub(self.current.opened_ms) >= age_ms {
            match Segment::create(&self.dir, self.current.generation + 1, now_ms) {
                Ok(next) => {
                    let old = std::mem::replace(&mut self.current, next);
                    self.sealed.push((old.generation, old.expires_max_ms));
                }
                Err(e) => tracing::error!("token journal: a new file: {e}"),
            }
        }
        let dir = &self.dir;
        self.sealed.retain(|&(generation, expires_max_ms)| {
            if expires_max_ms > now_ms {
                return true;
            }
            fs::remove_file(path_of(dir, generation)).is_err()
        });
        self.metrics
            .files
            .store(self.sealed.len() as u64 + 1, Ordering::Relaxed);
    }
}

impl Segment {
    fn create(dir: &Path, generation: u64, now_ms: u64) -> io::Result<Segment> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path_of(dir, generation))?;
        file.write_all(MAGIC)?;
        Ok(Segment {
            generation,
            file,
            opened_ms: now_ms,
            expires_max_ms: 0,
        })
    }

    fn append(&mut self, tokens: &[SeenToken]) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(tokens.len() * RECORD_BYTES);
        for token in tokens {
            bytes.extend_from_slice(&encode(token));
            self.expires_max_ms = self.expires_max_ms.max(token.expires_at_ms);
        }
        self.file.write_all(&bytes)
    }
}

fn path_of(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{generation:020}.journal"))
}

/// The journal files under `dir`, by generation.
fn list(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let generation = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".journal"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(generation) = generation {
            files.push((generation, path));
        }
    }
    files.sort_unstable();
    Ok(files)
}

fn encode(token: &SeenToken) -> [u8; RECORD_BYTES] {
    let mut record = [0u8; RECORD_BYTES];
    record[..4].copy_from_slice(&token.network.0.to_le_bytes());
    record[4..20].copy_from_slice(&token.token_id.to_le_bytes());
    record[20..28].copy_from_slice(&token.expires_at_ms.to_le_bytes());
    let crc = crc32fast::hash(&record[..28]);
    record[28..].copy_from_slice(&crc.to_le_bytes());
    record
}

fn decode(record: &[u8]) -> Option<SeenToken> {
    let field = |range: std::ops::Range<usize>| record.get(range);
    let crc = u32::from_le_bytes(field(28..32)?.try_into().ok()?);
    if crc32fast::hash(field(0..28)?) != crc {
        return None;
    }
    Some(SeenToken {
        network: NetworkId(u32::from_le_bytes(field(0..4)?.try_into().ok()?)),
        token_id: u128::from_le_bytes(field(4..20)?.try_into().ok()?),
        expires_at_ms: u64::from_le_bytes(field(20..28)?.try_into().ok()?),
    })
}

/// Adds the unexpired ids of the file at `path` to `live`. A torn last record (a crash in a
/// write) or a damaged one ends the file: what follows it cannot be trusted.
fn read_file(path: &Path, now_ms: u64, live: &mut Vec<SeenToken>) {
    let mut bytes = Vec::new();
    if let Err(e) = File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)) {
        tracing::error!("token journal {}: {e}", path.display());
        return;
    }
    let Some(records) = bytes.strip_prefix(MAGIC.as_slice()) else {
        tracing::warn!("token journal {}: not a journal file", path.display());
        return;
    };
    for record in records.chunks(RECORD_BYTES) {
        let Some(token) = (record.len() == RECORD_BYTES)
            .then(|| decode(record))
            .flatten()
        else {
            tracing::warn!(
                "token journal {}: a torn or damaged record; the rest of the file is skipped",
                path.display()
            );
            return;
        };
        if token.expires_at_ms > now_ms {
            live.push(token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: u128, expires_at_ms: u64) -> SeenToken {
        SeenToken {
            network: NetworkId(2),
            token_id: id,
            expires_at_ms,
        }
    }

    #[test]
    fn records_round_trip_and_a_torn_or_damaged_tail_ends_the_file() {
        let dir = std::env::temp_dir().join(format!("a7-tokens-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut segment = Segment::create(&dir, 1, 0).unwrap();
        segment
            .append(&[token(1, 100), token(2, 5), token(3, 200)])
            .unwrap();
        drop(segment);
        let path = path_of(&dir, 1);
        let mut live = Vec::new();
        read_file(&path, 10, &mut live);
        assert_eq!(
            live,
            [token(1, 100), token(3, 200)],
            "the expired one is gone"
        );
        // A torn record at the end, then a damaged one in the middle.
        let mut bytes = fs::read(&path).unwrap();
        bytes.extend_from_slice(&encode(&token(4, 300))[..7]);
        fs::write(&path, &bytes).unwrap();
        live.clear();
        read_file(&path, 10, &mut live);
        assert_eq!(live.len(), 2);
        bytes[MAGIC.len() + RECORD_BYTES + 3] ^= 0xFF;
        fs::write(&path, &bytes).unwrap();
        live.clear();
        read_file(&path, 10, &mut live);
        assert_eq!(live, [token(1, 100)]);
        let _ = fs::remove_dir_all(&dir);
    }
}
