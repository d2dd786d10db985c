//! Options. Every bound is here, with its unit.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::choose::CompactionPriority;

/// How a block is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Stored as is.
    None,
    /// LZ4 (lz4_flex, block format): fast to decompress, for the upper
    /// levels that reads touch most.
    Lz4,
    /// zstd at this level (1 is fast, 19 is small).
    Zstd(i32),
}

/// How writes become durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DurabilityMode {
    /// The engine keeps its own write-ahead log (a cairn-wal log in `wal/`).
    Standalone(SyncPolicy),
    /// No WAL: every batch carries an embedder's [`crate::Marker`]; the
    /// embedder keeps its own log and replays it from the durable marker that
    /// [`crate::Db::durable_marker`] reports after open. Unflushed writes are
    /// lost at a crash or a close, by design.
    Embedded,
}

/// When the standalone WAL is synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Each write returns once durable; concurrent writers share one fdatasync
    /// (cairn-wal's group commit).
    EveryWrite,
    /// Writes return once in the OS page cache; a background thread syncs the
    /// log at this interval, so a machine crash loses at most that much.
    Interval(Duration),
    /// Writes return once in the OS page cache; the log is synced only by
    /// `flush`, `sync_wal` and `close`. A process crash loses nothing; a
    /// machine crash may lose writes since the last sync.
    None,
}

/// Where flushes and table compactions run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Background {
    /// One flush thread and `compaction_threads` compaction threads.
    Threads,
    /// On the writing thread, synchronously, in a deterministic order (for
    /// simulation and crash tests; slow writes, no stalls).
    Inline,
}

/// A step of a durable operation, given to the [`Hook`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HookPoint {
    /// A flush wrote its table file (not yet synced).
    FlushTableWritten,
    /// A flush synced its table file and the tables directory.
    FlushTableSynced,
    /// A flush's manifest edit is durable.
    FlushInstalled,
    /// A compaction wrote and synced its output tables.
    CompactionTablesWritten,
    /// A compaction's manifest edit is durable (inputs not yet deleted).
    CompactionInstalled,
    /// A checkpoint linked its tables (manifest not yet written).
    CheckpointLinked,
    /// A checkpoint is complete and durable.
    CheckpointDone,
    /// Ingest linked or copied the tables into the engine (not yet installed).
    IngestLinked,
    /// Ingest's manifest edit is durable.
    IngestInstalled,
}

/// A test hook called at each [`HookPoint`]; returning `Err` makes the
/// operation fail there, as a crash would (the server's fault tests kill the
/// process from it). Inert unless set.
#[derive(Clone)]
pub struct Hook(pub Arc<dyn Fn(HookPoint) -> Result<(), ()> + Send + Sync>);

impl fmt::Debug for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hook")
    }
}

/// Options of an engine.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Options {
    /// Create the directory and an empty engine if none exists. Default true.
    pub create_if_missing: bool,
    /// How writes become durable. Default standalone, [`SyncPolicy::EveryWrite`].
    pub durability: DurabilityMode,
    /// A memtable is sealed once it holds this many bytes (keys, values and
    /// per-entry overhead). Default 64 MiB.
    pub write_buffer_bytes: usize,
    /// Sealed memtables that may wait for their flush while serving reads;
    /// writes stall beyond it. Default 1 (as RocksDB's two write buffers).
    pub sealed_memtables_max: usize,
    /// Uncompressed bytes of a data block before it is cut; a table's index
    /// partitions are cut at the same size. Default 4 KiB.
    pub block_bytes: usize,
    /// Keys between two restart points of a data block. Default 16.
    pub block_restart_interval: usize,
    /// Bloom filter bits per key (0: no filter). Default 10 (about 1% false positives).
    pub bloom_bits_per_key: u32,
    /// Filter bits per memtable entry (0: no filter). Each memtable keeps a
    /// filter of its keys so a point read of a key it lacks skips the skip
    /// list (RocksDB's `memtable_whole_key_filtering`); sized for the most
    /// entries a memtable of `write_buffer_bytes` can hold. Default 8.
    pub memtable_bloom_bits_per_entry: u32,
    /// Compression of each level's data blocks; the last entry applies to
    /// every deeper level. Default: LZ4 on L0 and L1, zstd level 1 below.
    pub compression_per_level: Vec<Compression>,
    /// Bound on the block cache: uncompressed data blocks and the tables'
    /// index partitions, plus the open tables' filters, which are held
    /// outside the cache and charged against this bound (about 1.25 bytes
    /// per key at 10 bits per key; the cache keeps at least an eighth for
    /// itself). Only a small top index per table and its range deletes are
    /// held beyond it. Default 64 MiB.
    pub block_cache_bytes: u64,
    /// Target size of a table written by a compaction. Default 64 MiB.
    pub table_bytes_target: u64,
    /// Number of levels (L0 included). Default 7.
    pub levels: usize,
    /// L0 tables that start a compaction into L1. Default 4.
    pub l0_compaction_trigger: usize,
    /// L0 tables from which every write is delayed by `slowdown_delay`. Default 20.
    pub l0_slowdown_tables: usize,
    /// L0 tables from which writes stall. Default 36.
    pub l0_stop_tables: usize,
    /// Target size of L1; each deeper level is `level_size_multiplier` times
    /// the one above. Default 256 MiB.
    pub l1_bytes_target: u64,
    /// Growth factor between levels. Default 10.
    pub level_size_multiplier: u64,
    /// Which table of a level below L0 a compaction takes first. Default
    /// [`CompactionPriority::MinOverlappingRatio`].
    pub compaction_priority: CompactionPriority,
    /// Bytes above the level targets from which writes are delayed. Default 64 GiB.
    pub pending_compaction_bytes_slowdown: u64,
    /// Bytes above the level targets from which writes stall. Default 256 GiB.
    pub pending_compaction_bytes_stop: u64,
    /// Delay added to a write while a slowdown limit is passed. Default 1 ms.
    pub slowdown_delay: Duration,
    /// Longest a write waits in a stall before failing with `StallTimeout`. Default 60 s.
    pub stall_duration_max: Duration,
    /// Bytes a compaction reads from each input table at a time: one read
    /// serves the data blocks inside it, rather than a read per block
    /// (RocksDB's `compaction_readahead_size`). A compaction holds one such
    /// window per input table it is reading (every L0 input at once, one
    /// table at a time of each deeper level), freed as each input ends. 0: a
    /// read per block. Default 1 MiB.
    pub compaction_readahead_bytes: usize,
    /// Compaction threads (with [`Background::Threads`]). Default 1.
    pub compaction_threads: usize,
    /// Where background work runs. Default [`Background::Threads`].
    pub background: Background,
    /// With [`Background::Threads`]: obsolete table files queued for the
    /// purge thread, which removes them so that the thread dropping a table
    /// does not wait for the file system to free its blocks; beyond it, the
    /// dropping thread removes the file itself. 0: no purge thread, every
    /// file is removed by the thread dropping its table. Default 256.
    pub purge_queue_tables: usize,
    /// The largest write batch, in bytes of its encoding (`WriteBatch::encoded_bytes`);
    /// a larger one is refused with `Error::BatchTooLarge` before anything is
    /// written. Also the standalone WAL's record bound. Default 32 MiB (one
    /// largest key and value fit).
    pub batch_bytes_max: usize,
    /// Segment size of the standalone WAL. Default 16 MiB.
    pub wal_segment_bytes: u64,
    /// With [`SyncPolicy::None`] or [`SyncPolicy::Interval`]: bytes of WAL
    /// records gathered in memory before one write to the OS. 0 (the default)
    /// writes every batch to the OS as it is made, so a crash of the process
    /// loses nothing; above 0 a crash of the process may lose up to this many
    /// bytes of the latest writes (never part of a batch, never an older write
    /// while keeping a newer one). `flush`, `sync_wal` and `close` write them out.
    pub wal_buffer_bytes: usize,
    /// Key-value separation: a flush writes every value at least this many
    /// bytes long to a blob file and keeps in the table a 20-byte reference
    /// to it, so that compactions move the reference, not the value (as
    /// WiscKey and RocksDB's BlobDB). `None` (the default): every value
    /// stays in the tables. Tables with references are written in table
    /// format 4. [`crate::Db::ingest`] and deltas do not take such tables
    /// (a delta checkpoint answers that a full checkpoint is needed).
    pub blob_value_bytes_min: Option<usize>,
    /// A compaction rewrites the values it keeps from a blob file into a
    /// new one once at least this percentage of the file is garbage (values
    /// no table references any more); a file nothing references is removed
    /// whole. 0 rewrites on every compaction, 100 never. Default 25: at most
    /// about a third more disk than the live values, and each byte of
    /// garbage reclaimed costs at most three of rewritten values.
    pub blob_gc_garbage_percent: u8,
    /// Compression of each value in a blob file, kept only where it shrinks
    /// the value (after 8 values in a row that do not shrink, one in 32 is
    /// tried). Default LZ4.
    pub blob_compression: Compression,
    /// Segment size of the manifest log. Default 1 MiB.
    pub manifest_segment_bytes: u64,
    /// Manifest edits after which a full version is written and older
    /// manifest segments are released. Default 1000.
    pub manifest_edits_per_snapshot: u64,
    /// Test hook. Default none.
    pub hook: Option<Hook>,
    /// Test-only: skip the fdatasync of new tables, to show the crash tests fail.
    #[doc(hidden)]
    pub skip_table_sync_for_tests: bool,
    /// Test-only: skip the fdatasync of new blob files, to show the crash
    /// tests fail.
    #[doc(hidden)]
    pub skip_blob_sync_for_tests: bool,
    /// Test-only: drop tables a range tombstone covers even when a read view
    /// older than the tombstone still needs them, to show the tests fail.
    #[doc(hidden)]
    pub drop_covered_ignoring_views_for_tests: bool,
    /// Test-only: a flush records the latest marker written instead of the
    /// sealed memtable's, to show the crash tests fail.
    #[doc(hidden)]
    pub record_latest_marker_for_tests: bool,
    /// Test-only: a delta's tables are each shifted on their own, one above
    /// the other in the order given (newest first), instead of by one common
    /// offset: the order across tables is lost, to show the delta tests fail.
    #[doc(hidden)]
    pub delta_shift_each_table_for_tests: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            create_if_missing: true,
            durability: DurabilityMode::Standalone(SyncPolicy::EveryWrite),
            write_buffer_bytes: 64 << 20,
            sealed_memtables_max: 1,
            block_bytes: 4 << 10,
            block_restart_interval: 16,
            bloom_bits_per_key: 10,
            memtable_bloom_bits_per_entry: 8,
            compression_per_level: vec![Compression::Lz4, Compression::Lz4, Compression::Zstd(1)],
            block_cache_bytes: 64 << 20,
            table_bytes_target: 64 << 20,
            levels: 7,
            l0_compaction_trigger: 4,
            l0_slowdown_tables: 20,
            l0_stop_tables: 36,
            l1_bytes_target: 256 << 20,
            level_size_multiplier: 10,
            compaction_priority: CompactionPriority::default(),
            pending_compaction_bytes_slowdown: 64 << 30,
            pending_compaction_bytes_stop: 256 << 30,
            slowdown_delay: Duration::from_millis(1),
            stall_duration_max: Duration::from_secs(60),
            compaction_readahead_bytes: 1 << 20,
            compaction_threads: 1,
            background: Background::Threads,
            purge_queue_tables: 256,
            batch_bytes_max: 32 << 20,
            wal_segment_bytes: 16 << 20,
            wal_buffer_bytes: 0,
            blob_value_bytes_min: None,
            blob_gc_garbage_percent: 25,
            blob_compression: Compression::Lz4,
            manifest_segment_bytes: 1 << 20,
            manifest_edits_per_snapshot: 1000,
            hook: None,
            skip_table_sync_for_tests: false,
            skip_blob_sync_for_tests: false,
            drop_covered_ignoring_views_for_tests: false,
            record_latest_marker_for_tests: false,
            delta_shift_each_table_for_tests: false,
        }
    }
}

impl Options {
    /// The compression of `level`'s data blocks.
    pub fn compression_for(&self, level: usize) -> Compression {
        self.compression_per_level
            .get(level)
            .or(self.compression_per_level.last())
            .copied()
            .unwrap_or(Compression::None)
    }

    /// The target size of level `level` (≥ 1).
    pub fn level_bytes_target(&self, level: usize) -> u64 {
        let mut t = self.l1_bytes_target;
        for _ in 1..level {
            t = t.saturating_mul(self.level_size_multiplier);
        }
        t
    }

    pub(crate) fn hook(&self, p: HookPoint) -> crate::Result<()> {
        match &self.hook {
            Some(h) => (h.0)(p).map_err(|()| crate::Error::Hook(p)),
            None => Ok(()),
        }
    }
}
