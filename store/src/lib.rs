//! # hermod-store: the engine's storage, on disk
//!
//! The engine (`hermod-shards`) owns the [`Storage`](hermod_shards::storage::Storage) trait,
//! the key layout and the record encodings, and runs its simulation on an in-memory store.
//! This crate is the only one that links RocksDB's C++, so the engine and its tests build
//! without a C++ compiler.
//!
//! | module | owns |
//! | --- | --- |
//! | [`rocks`] | opening the database (one column family per shard, the recorded shard count), reads, atomic batch writes, RocksDB's figures for `/metrics`, the read-only visit for tools |
//! | [`datadir`] | the data directory's layout and the token-signing secret in it |
#![forbid(unsafe_code)]

pub mod datadir;
pub mod rocks;

pub use rocks::{OpenError, RocksStorage, StoreStats};
