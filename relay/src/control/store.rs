//! The control plane's state on disk: one redb database (`control.redb` in the data
//! directory). redb is a pure-Rust embedded B-tree store with ACID transactions, crash-safe
//! commits (copy-on-write pages, checksummed roots) and serialized writers; that last
//! property is what makes "a one-time prekey is handed out exactly once" a plain
//! read-remove-commit. Records are JSON: small, rare next to data-plane traffic, and
//! readable by an auditor with any redb tool.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub type Table = TableDefinition<'static, &'static str, &'static [u8]>;

/// Partner networks by id (decimal).
pub const PARTNERS: Table = TableDefinition::new("partners");
/// Users by `network:user-hex`.
pub const USERS: Table = TableDefinition::new("users");
/// `<identifier hash hex>|<network, 10 digits>` → user key: identifiers are per network.
pub const IDENTIFIERS: Table = TableDefinition::new("identifiers");
/// `<former identifier hash hex>|<network>` → where it moved, during the grace period.
pub const MOVED: Table = TableDefinition::new("moved");
/// Message requests by id (20 decimal digits, so keys sort by id).
pub const REQUESTS: Table = TableDefinition::new("requests");
/// Indexes of the requests: `pair|<recipient>|<admits>` and `net|<network>|<id>` → id.
pub const REQUEST_INDEX: Table = TableDefinition::new("request_index");
/// `<accepted user key>|<acceptor user key>`: who accepted a user, for its opt-out.
pub const ACCEPTED_BY: Table = TableDefinition::new("accepted_by");
/// Device key records by `network:user-hex:device`.
pub const DEVICE_KEYS: Table = TableDefinition::new("device_keys");
/// One-time prekeys and KeyPackages by `network:user-hex:device|kind|sequence`.
pub const ONE_TIME_KEYS: Table = TableDefinition::new("one_time_keys");
/// The event feed by `<audience network, 10 digits>|<sequence, 20 digits>`.
pub const EVENTS: Table = TableDefinition::new("events");
/// Counters (`next_request`, `next_event`, ...).
pub const META: Table = TableDefinition::new("meta");

const ALL: [Table; 11] = [
    PARTNERS,
    USERS,
    IDENTIFIERS,
    MOVED,
    REQUESTS,
    REQUEST_INDEX,
    ACCEPTED_BY,
    DEVICE_KEYS,
    ONE_TIME_KEYS,
    EVENTS,
    META,
];

/// A storage failure, with what failed.
#[derive(Debug)]
pub struct StoreError(pub String);

impl<E: std::fmt::Display> From<E> for StoreError {
    fn from(e: E) -> StoreError {
        StoreError(e.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug)]
pub struct Store {
    db: Database,
}

impl Store {
    pub fn open(path: &Path) -> StoreResult<Store> {
        let db =
            Database::create(path).map_err(|e| StoreError(format!("{}: {e}", path.display())))?;
        let tx = db.begin_write()?;
        for table in ALL {
            tx.open_table(table)?;
        }
        tx.commit()?;
        Ok(Store { db })
    }

    pub fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> StoreResult<Option<T>> {
        self.reader()?.get(table, key)
    }

    /// One read transaction for many lookups (a consistent view, and one transaction's
    /// set-up instead of one per lookup: a bulk discovery makes two per identifier).
    pub fn reader(&self) -> StoreResult<Reader> {
        Ok(Reader {
            tx: self.db.begin_read()?,
        })
    }

    /// Every record whose key starts with `prefix`, in key order.
    pub fn scan<T: DeserializeOwned>(
        &self,
        table: Table,
        prefix: &str,
    ) -> StoreResult<Vec<(String, T)>> {
        self.reader()?.scan(table, prefix)
    }

    /// Records from key `start` on while their keys start with `prefix`, at most `limit`.
    pub fn scan_from<T: DeserializeOwned>(
        &self,
        table: Table,
        start: &str,
        prefix: &str,
        limit: usize,
    ) -> StoreResult<Vec<T>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(table)?;
        let mut out = Vec::new();
        for entry in table.range(start..)? {
            let (key, value) = entry?;
            if !key.value().starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push(serde_json::from_slice(value.value())?);
        }
        Ok(out)
    }

    /// Runs `work` in one write transaction, committed only if it returns `Ok`. Writers are
    /// serialized, so `work` sees no concurrent change.
    pub fn write<R, E: From<StoreError>>(
        &self,
        work: impl FnOnce(&mut Tx<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        let tx = self.db.begin_write().map_err(StoreError::from)?;
        let mut handle = Tx { tx: &tx };
        let result = work(&mut handle)?;
        tx.commit().map_err(StoreError::from)?;
        Ok(result)
    }
}

/// A read transaction's view, with JSON values.
pub struct Reader {
    tx: redb::ReadTransaction,
}

impl Reader {
    pub fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> StoreResult<Option<T>> {
        let table = self.tx.open_table(table)?;
        match table.get(key)? {
            Some(value) => Ok(Some(serde_json::from_slice(value.value())?)),
            None => Ok(None),
        }
    }

    /// Every record whose key starts with `prefix`, in key order.
    pub fn scan<T: DeserializeOwned>(
        &self,
        table: Table,
        prefix: &str,
    ) -> StoreResult<Vec<(String, T)>> {
        let table = self.tx.open_table(table)?;
        let mut out = Vec::new();
        for entry in table.range(prefix..)? {
            let (key, value) = entry?;
            if !key.value().starts_with(prefix) {
                break;
            }
            out.push((
                key.value().to_string(),
                serde_json::from_slice(value.value())?,
            ));
        }
        Ok(out)
    }
}

/// A write transaction's view, with JSON values.
pub struct Tx<'a> {
    tx: &'a redb::WriteTransaction,
}

impl Tx<'_> {
    pub fn get<T: DeserializeOwned>(&mut self, table: Table, key: &str) -> StoreResult<Option<T>> {
        let table = self.tx.open_table(table)?;
        match table.get(key)? {
            Some(value) => Ok(Some(serde_json::from_slice(value.value())?)),
            None => Ok(None),
        }
    }

    pub fn put<T: Serialize>(&mut self, table: Table, key: &str, value: &T) -> StoreResult<()> {
        let bytes = serde_json::to_vec(value)?;
        let mut table = self.tx.open_table(table)?;
        table.insert(key, bytes.as_slice())?;
        Ok(())
    }

    pub fn delete(&mut self, table: Table, key: &str) -> StoreResult<()> {
        let mut table = self.tx.open_table(table)?;
        table.remove(key)?;
        Ok(())
    }

    /// Keys starting with `prefix`, in order, at most `limit`.
    pub fn keys(&mut self, table: Table, prefix: &str, limit: usize) -> StoreResult<Vec<String>> {
        let table = self.tx.open_table(table)?;
        let mut out = Vec::new();
        for entry in table.range(prefix..)? {
            let (key, _) = entry?;
            if !key.value().starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push(key.value().to_string());
        }
        Ok(out)
    }

    /// Removes and returns the first record whose key starts with `prefix`.
    pub fn take_first<T: DeserializeOwned>(
        &mut self,
        table: Table,
        prefix: &str,
    ) -> StoreResult<Option<(String, T)>> {
        let Some(key) = self.keys(table, prefix, 1)?.into_iter().next() else {
            return Ok(None);
        };
        let value = self.get(table, &key)?;
        self.delete(table, &key)?;
        Ok(value.map(|v| (key, v)))
    }

    /// Increments the counter `name` and returns its new value (the first is 1).
    pub fn next(&mut self, name: &str) -> StoreResult<u64> {
        let value = self.get::<u64>(META, name)?.unwrap_or(0) + 1;
        self.put(META, name, &value)?;
        Ok(value)
    }
}
