#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod batch;
mod blob;
mod block;
mod bloom;
mod cache;
pub mod choose;
mod compaction;
mod db;
mod delta;
mod error;
mod iter;
mod manifest;
mod memtable;
mod options;
mod purge;
mod table;
mod types;
mod version;

#[doc(hidden)]
pub mod fuzzing;

pub use batch::WriteBatch;
pub use blob::blob_file_id;
pub use choose::CompactionPriority;
pub use db::{CheckpointInfo, CheckpointTable, Db, IngestOptions, LevelStats, ReadView, Stats};
pub use delta::{DELTA_FILE, Delta, DeltaTable};
pub use error::{Error, Result};
pub use iter::Iter;
pub use options::{Background, Compression, DurabilityMode, Hook, HookPoint, Options, SyncPolicy};
pub use types::{KEY_BYTES_MAX, Marker, SEQNO_MAX, Seqno, TableId, VALUE_BYTES_MAX, ValueKind};
