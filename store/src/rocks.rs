//! The RocksDB store: one database per process, one column family per shard.
//!
//! Opening checks the shard count recorded at first start: keys carry their slot, so a
//! different count would route lookups to the wrong column family. Until a slot migration
//! exists, a changed count is refused with a clear error rather than silently missing data.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};

use hermod_shards::storage::{Durability, Rows, Storage, StorageError, WriteOp};

/// RocksDB's errors reach the engine as [`StorageError::Backend`].
fn backend(e: rocksdb::Error) -> StorageError {
    StorageError::Backend(Box::new(e))
}

const SHARDS_KEY: &[u8] = b"hermod/shards";

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("opening RocksDB at {path}: {source}")]
    Open {
        path: String,
        source: rocksdb::Error,
    },
    #[error(
        "data dir {path} was created with {stored} shards but this start asks for {wanted}; \
         slot migration is not implemented yet: start with --shards {stored}"
    )]
    ShardCountChanged {
        path: String,
        stored: u16,
        wanted: u16,
    },
    #[error("reading the shard count: {0}")]
    Meta(String),
}

/// What `/metrics` and the admin stats report of one shard's column family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// RocksDB's estimate of live keys (memtables and SSTs, minus deletions it knows of).
    pub keys_estimate: u64,
    pub live_data_bytes: u64,
    pub sst_bytes: u64,
    pub memtable_bytes: u64,
}

pub fn cf_name(shard: u16) -> String {
    format!("shard-{shard}")
}

/// Opens (creating if needed) the database under `path` with one column family per shard.
pub fn open(path: &Path, shards: u16) -> Result<Arc<DB>, OpenError> {
    let shown = path.display().to_string();
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    // Far below the 20k fd limit hosts often have: sockets need the rest.
    opts.set_max_open_files(512);
    opts.set_max_background_jobs(2);
    opts.set_bytes_per_sync(1 << 20);
    let mut cf_opts = Options::default();
    cf_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    // Every append looks up its message id to deduplicate, and almost every lookup misses.
    // Bloom filters in SST blocks and in the memtable make a miss cost a few hashes instead
    // of a skiplist walk per level (the skiplist search was the top user-space cost in a
    // `perf` profile of hermod-bench `direct`).
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    table.set_cache_index_and_filter_blocks(true);
    cf_opts.set_block_based_table_factory(&table);
    cf_opts.set_memtable_whole_key_filtering(true);
    cf_opts.set_memtable_prefix_bloom_ratio(0.05);
    let existing = DB::list_cf(&opts, path).unwrap_or_default();
    let mut names: Vec<String> = (0..shards).map(cf_name).collect();
    for name in existing {
        if name != "default" && !names.contains(&name) {
            names.push(name);
        }
    }
    let cfs = names
        .iter()
        .map(|n| ColumnFamilyDescriptor::new(n, cf_opts.clone()));
    let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|source| OpenError::Open {
        path: shown.clone(),
        source,
    })?;
    match db
        .get(SHARDS_KEY)
        .map_err(|e| OpenError::Meta(e.to_string()))?
    {
        Some(v) => {
            let stored = v
                .as_slice()
                .try_into()
                .map(u16::from_be_bytes)
                .map_err(|_| OpenError::Meta("bad shard count".into()))?;
            if stored != shards {
                return Err(OpenError::ShardCountChanged {
                    path: shown,
                    stored,
                    wanted: shards,
                });
            }
        }
        None => {
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            db.put_opt(SHARDS_KEY, shards.to_be_bytes(), &wo)
                .map_err(|e| OpenError::Meta(e.to_string()))?;
        }
    }
    Ok(Arc::new(db))
}

/// Visits every key of every shard's column family, read-only (works beside a running
/// server: RocksDB's read-only mode takes no lock). Returns the recorded shard count.
/// For operator tools (`hermod-tools inspect`), never for the serving path.
pub fn visit_all(path: &Path, mut visit: impl FnMut(u16, &[u8], &[u8])) -> Result<u16, OpenError> {
    let shown = path.display().to_string();
    let opts = Options::default();
    let names = DB::list_cf(&opts, path).map_err(|source| OpenError::Open {
        path: shown.clone(),
        source,
    })?;
    let db = DB::open_cf_for_read_only(&opts, path, &names, false).map_err(|source| {
        OpenError::Open {
            path: shown.clone(),
            source,
        }
    })?;
    let shards = match db
        .get(SHARDS_KEY)
        .map_err(|e| OpenError::Meta(e.to_string()))?
    {
        Some(v) => v
            .as_slice()
            .try_into()
            .map(u16::from_be_bytes)
            .map_err(|_| OpenError::Meta("bad shard count".into()))?,
        None => {
            return Err(OpenError::Meta(format!(
                "{shown} holds no Hermod shard count"
            )))
        }
    };
    for shard in 0..shards {
        let Some(cf) = db.cf_handle(&cf_name(shard)) else {
            continue;
        };
        for item in db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| OpenError::Meta(e.to_string()))?;
            visit(shard, &k, &v);
        }
    }
    Ok(shards)
}

/// One shard's view of the database. Cheap to clone; `Send`, so the driver can move a clone
/// into a blocking-pool closure to write.
#[derive(Clone)]
pub struct RocksStorage {
    db: Arc<DB>,
    cf: Arc<str>,
}

impl RocksStorage {
    pub fn new(db: Arc<DB>, shard: u16) -> RocksStorage {
        RocksStorage {
            db,
            cf: cf_name(shard).into(),
        }
    }

    fn handle(&self) -> Result<&rocksdb::ColumnFamily, StorageError> {
        self.db.cf_handle(&self.cf).ok_or(StorageError::Closed)
    }

    /// Writes one commit atomically under the durability mode. Blocks (fsync in `Fsync` mode):
    /// call from a blocking thread, never from a reactor.
    pub fn write(&self, ops: &[WriteOp], durability: Durability) -> Result<(), StorageError> {
        let cf = self.handle()?;
        let mut batch = WriteBatch::default();
        for op in ops {
            match op {
                WriteOp::Put(k, v) => batch.put_cf(cf, k, v),
                WriteOp::Delete(k) => batch.delete_cf(cf, k),
            }
        }
        let mut wo = WriteOptions::default();
        match durability {
            Durability::Fsync => wo.set_sync(true),
            Durability::Wal => wo.set_sync(false),
            Durability::Memory => wo.disable_wal(true),
        }
        self.db.write_opt(batch, &wo).map_err(backend)?;
        Ok(())
    }

    /// Flushes memtables to SST files; used at shutdown in `memory` mode so a clean stop keeps data.
    /// RocksDB's own figures for this shard's column family. Each is an in-memory property
    /// read (no I/O), cheap enough for the tick; a property RocksDB cannot give reads as 0.
    pub fn stats(&self) -> StoreStats {
        let Ok(cf) = self.handle() else {
            return StoreStats::default();
        };
        let prop = |name: &str| {
            self.db
                .property_int_value_cf(cf, name)
                .ok()
                .flatten()
                .unwrap_or(0)
        };
        StoreStats {
            keys_estimate: prop("rocksdb.estimate-num-keys"),
            live_data_bytes: prop("rocksdb.estimate-live-data-size"),
            sst_bytes: prop("rocksdb.total-sst-files-size"),
            memtable_bytes: prop("rocksdb.cur-size-all-mem-tables"),
        }
    }

    pub fn flush(&self) -> Result<(), StorageError> {
        self.db.flush_cf(self.handle()?).map_err(backend)?;
        Ok(())
    }
}

impl Storage for RocksStorage {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.db.get_cf(self.handle()?, key).map_err(backend)
    }

    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        reverse: bool,
    ) -> Result<Rows, StorageError> {
        let cf = self.handle()?;
        let mode = if reverse {
            IteratorMode::From(end, Direction::Reverse)
        } else {
            IteratorMode::From(start, Direction::Forward)
        };
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, mode) {
            let (k, v) = item.map_err(backend)?;
            let k: &[u8] = &k;
            if reverse {
                if k >= end {
                    continue; // the seek lands on `end` itself when present: exclusive bound
                }
                if k < start {
                    break;
                }
            } else if k >= end {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hermod_shards::ids::{ConvId, UserId};
    use hermod_shards::storage::{contract, keys};

    #[test]
    fn write_scan_and_refuse_changed_shard_count() {
        let dir = tempdir();
        let db = open(&dir, 2).unwrap();
        let s = RocksStorage::new(db.clone(), 1);
        contract::check_scans(&s, &|ops| s.write(ops, Durability::Wal).unwrap());
        let c = ConvId::direct(UserId(1), UserId(2));
        assert!(
            RocksStorage::new(db.clone(), 0)
                .get(&keys::message(c, 1))
                .unwrap()
                .is_none(),
            "shards are isolated"
        );
        drop(s);
        drop(db);
        let Err(err) = open(&dir, 3) else {
            panic!("a changed shard count must be refused")
        };
        assert!(
            matches!(
                err,
                OpenError::ShardCountChanged {
                    stored: 2,
                    wanted: 3,
                    ..
                }
            ),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "hermod-rocks-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
