//! Group commit. Writes accumulate in the *open* batch; when no batch is in flight the driver
//! takes the open batch (`poll_commit`) and writes it as one atomic RocksDB batch. While it is in
//! flight the next batch fills, so the batch size adapts to load with no timer: one message
//! when idle, thousands under load. Effects that must wait for durability (acks, fan-out,
//! replies) ride with the batch (see `effects.rs`) and run, in order, when it completes.
//!
//! Reads that must see this shard's own pending writes (accounts, membership index) go
//! through `get_latest`, which looks at the open and in-flight batches before storage. Reads
//! of messages never do: a message is visible only once durable.

use std::collections::HashMap;

use super::Shard;
use crate::ids::{ConnId, Slot};
use crate::limits::SLOTS;
use crate::protocol::{error_frame, ErrorCode};
use crate::storage::{keys, Commit, Record, Storage, StorageError, WriteOp};

/// Writes and the effects `E` that wait for them.
pub(super) struct Batch<E> {
    ops: Vec<WriteOp>,
    /// Latest value per key written in this batch (`None`: deleted).
    overlay: HashMap<Vec<u8>, Option<Vec<u8>>>,
    pub(super) deferred: Vec<E>,
}

impl<E> Default for Batch<E> {
    fn default() -> Self {
        Batch {
            ops: Vec::new(),
            overlay: HashMap::new(),
            deferred: Vec::new(),
        }
    }
}

/// The open batch and the one in flight. Generic over the effect type so this file knows
/// nothing of what runs once a batch is durable (that is `effects.rs`).
pub(super) struct Commits<E> {
    open: Batch<E>,
    inflight: Option<(u64, Batch<E>)>,
    next_id: u64,
}

impl<E> Default for Commits<E> {
    fn default() -> Self {
        Commits {
            open: Batch::default(),
            inflight: None,
            next_id: 0,
        }
    }
}

impl<E> Commits<E> {
    pub(super) fn is_idle(&self) -> bool {
        self.inflight.is_none() && self.open.ops.is_empty() && self.open.deferred.is_empty()
    }

    /// Write operations waiting for a commit (the driver's admission gate reads this).
    pub(super) fn open_ops(&self) -> usize {
        self.open.ops.len()
    }

    pub(super) fn defer(&mut self, effect: E) {
        self.open.deferred.push(effect);
    }

    /// The batch in flight, now finished: `id` must be its id (commits complete in order).
    pub(super) fn finish(&mut self, id: u64) -> Batch<E> {
        let Some((inflight_id, batch)) = self.inflight.take() else {
            panic!("commit {id} completed but none is in flight");
        };
        assert_eq!(inflight_id, id, "commits complete in order, one at a time");
        batch
    }

    /// Empties the open batch (built on one that failed): its effects, to fail them too.
    pub(super) fn abandon_open(&mut self) -> Vec<E> {
        std::mem::take(&mut self.open).deferred
    }

    pub(super) fn start(&mut self) -> Option<Commit> {
        if self.inflight.is_some() || (self.open.ops.is_empty() && self.open.deferred.is_empty()) {
            return None;
        }
        let mut batch = std::mem::take(&mut self.open);
        self.next_id += 1;
        let ops = std::mem::take(&mut batch.ops);
        self.inflight = Some((self.next_id, batch));
        Some(Commit {
            id: self.next_id,
            ops,
        })
    }
}

impl<S: Storage> Shard<S> {
    pub(super) fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        let open = &mut self.commits.open;
        open.overlay.insert(key.clone(), Some(value.clone()));
        open.ops.push(WriteOp::Put(key, value));
    }

    /// A write that `get_latest` need not see: message records and dedup keys, which are only
    /// read once durable. Skips the overlay copy on the hottest path.
    pub(super) fn put_unread(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.commits.open.ops.push(WriteOp::Put(key, value));
    }

    pub(super) fn delete(&mut self, key: Vec<u8>) {
        let open = &mut self.commits.open;
        open.overlay.insert(key.clone(), None);
        open.ops.push(WriteOp::Delete(key));
    }

    /// The record under `key` including this shard's own writes not yet durable.
    pub(super) fn latest<R: Record>(&self, key: &[u8]) -> Result<Option<R>, StorageError> {
        self.get_latest(key)?
            .map(|b| R::decode(key, &b))
            .transpose()
    }

    /// Every stored `tag` row of the slots this shard owns (read at start-up: unconfirmed
    /// blocks, push tokens, bots). A slot that cannot be read is logged with `what` is lost
    /// and skipped: start-up goes on without it.
    pub(super) fn own_rows(&self, tag: u8, what: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        for slot in 0..SLOTS {
            if self.cfg.placement.shard_of(Slot(slot)) != self.cfg.shard {
                continue;
            }
            let prefix = keys::slot_tag(slot, tag);
            match self
                .storage
                .scan(&prefix, &keys::prefix_end(&prefix), usize::MAX, false)
            {
                Ok(rows) => out.extend(rows),
                Err(e) => tracing::error!(error = %e, slot, "{what} not read"),
            }
        }
        out
    }

    /// The value of `key` including this shard's own writes not yet durable.
    pub(super) fn get_latest(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        if let Some(v) = self.commits.open.overlay.get(key) {
            return Ok(v.clone());
        }
        if let Some((_, batch)) = &self.commits.inflight {
            if let Some(v) = batch.overlay.get(key) {
                return Ok(v.clone());
            }
        }
        self.storage.get(key)
    }

    pub(super) fn internal_error(&mut self, conn: ConnId, rid: Option<u64>, err: &StorageError) {
        tracing::error!(shard = %self.cfg.shard, error = %err, "storage read failed");
        self.count_error(ErrorCode::Internal);
        self.send(
            conn,
            error_frame(rid, ErrorCode::Internal, "storage read failed"),
        );
    }
}
