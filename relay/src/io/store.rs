//! A shard's log directory: segment files named by id, read and repaired with plain blocking
//! calls at start (recovery), written through io_uring by the committer afterwards.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::core::shard::recovery::SegmentStore;

/// `data_dir/shard-N`, holding `NNNNNNNNNNNNNNNNNNNN.log` segments and `quarantine/`.
#[derive(Debug, Clone)]
pub struct ShardDir {
    pub dir: PathBuf,
}

impl ShardDir {
    pub fn new(data_dir: &Path, shard: u16) -> ShardDir {
        ShardDir {
            dir: data_dir.join(format!("shard-{shard}")),
        }
    }

    pub fn segment(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:020}.log"))
    }

    /// Makes a new segment's directory entry durable (fdatasync does not cover it).
    pub fn sync_dir(&self) -> io::Result<()> {
        fs::File::open(&self.dir)?.sync_all()
    }
}

impl SegmentStore for ShardDir {
    fn list(&mut self) -> io::Result<Vec<u64>> {
        fs::create_dir_all(&self.dir)?;
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".log")) else {
                continue;
            };
            if let Ok(id) = stem.parse::<u64>() {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    fn read(&mut self, id: u64) -> io::Result<Bytes> {
        fs::read(self.segment(id)).map(Bytes::from)
    }

    fn truncate(&mut self, id: u64, len: u64) -> io::Result<()> {
        let file = fs::OpenOptions::new().write(true).open(self.segment(id))?;
        file.set_len(len)?;
        file.sync_all()
    }

    fn append_durably(&mut self, id: u64, bytes: &[u8]) -> io::Result<()> {
        let path = self.segment(id);
        let new = !path.exists();
        let mut file = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)?;
        io::Write::write_all(&mut file, bytes)?;
        file.sync_data()?;
        if new {
            self.sync_dir()?;
        }
        Ok(())
    }

    fn remove(&mut self, id: u64) -> io::Result<()> {
        fs::remove_file(self.segment(id))?;
        self.sync_dir()
    }

    fn quarantine(&mut self, id: u64) -> io::Result<()> {
        let aside = self.quarantine_dir();
        fs::create_dir_all(&aside)?;
        fs::rename(self.segment(id), aside.join(format!("{id:020}.log")))?;
        self.sync_dir()
    }
}

impl ShardDir {
    pub fn quarantine_dir(&self) -> PathBuf {
        self.dir.join("quarantine")
    }

    /// Segment files kept in `quarantine/`, from this start and earlier ones.
    pub fn quarantined_count(&self) -> u64 {
        fs::read_dir(self.quarantine_dir()).map_or(0, |entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".log")))
                .count() as u64
        })
    }
}

/// The number of shards a data directory was written with. Users are hashed to shards, so a
/// directory can only be served with the same count; say so rather than lose track of queues.
pub fn check_layout(data_dir: &Path, shards: u16) -> Result<(), String> {
    let path = data_dir.join("shards");
    match fs::read_to_string(&path) {
        Ok(text) => {
            let found: u16 = text
                .trim()
                .parse()
                .map_err(|_| format!("{}: not a shard count", path.display()))?;
            if found != shards {
                return Err(format!(
                    "{} holds the queues of {found} shards; start with cores = {found} \
                     (changing the shard count of a data directory is not supported)",
                    data_dir.display()
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
            fs::write(&path, format!("{shards}\n")).map_err(|e| format!("{}: {e}", path.display()))
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}
