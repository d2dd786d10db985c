//! The engine: write path, read path, background flush and compaction,
//! checkpoints and ingest.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use cairn_wal::{Durability, Fs, FsLock, StdFs, UserKind, Wal, WalOptions};

use crate::batch::{Op, WriteBatch};
use crate::blob::{BlobFile, BlobId, BlobWriter, blob_file_name, parse_blob_file_name};
use crate::bloom;
use crate::cache::BlockCache;
use crate::choose::{self, Choice, ChooseConfig, TableSummary};
use crate::compaction::{self, Job, Output};
use crate::delta::{DELTA_FILE, Delta, DeltaTable};
use crate::error::{Error, Result, io};
use crate::iter::{Fragments, Iter, LevelIter, Merge, Pin, Source};
use crate::manifest::{Manifest, manifest_dir};
use crate::memtable::{MemIter, Memtable, sorted_range_deletes};
use crate::options::{Background, DurabilityMode, HookPoint, Options, SyncPolicy};
use crate::purge::Purger;
use crate::table::{Table, TableIter, TableWriter, WriteSettings, parse_table_file_name, table_file_name};
use crate::types::{Marker, RangeTombstone, Seqno, TableId, ValueKind, trailer_kind, trailer_seq};
use crate::version::{Added, Edit, Version};

const WAL_BATCH_KIND: UserKind = UserKind::new(1);
const LOCK_FILE: &str = "LOCK";
const TABLES_DIR: &str = "tables";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What readers see: the memtables and the version, swapped atomically.
struct SuperVersion {
    active: Arc<Memtable>,
    /// Newest first.
    sealed: Vec<Arc<Memtable>>,
    version: Arc<Version>,
    /// `choose::pending_bytes` of `version`, for write backpressure.
    pending_bytes: u64,
}

struct WriteState {
    /// WAL records gathered under `Options::wal_buffer_bytes`, not yet written.
    wal_pending: cairn_wal::Batch,
    wal_pending_bytes: usize,
    last_seq: Seqno,
    last_marker: Option<Marker>,
    next_mem_id: u64,
    buf: Vec<u8>,
}

struct VersionState {
    manifest: Manifest,
    next_table_id: TableId,
    compacting: HashSet<TableId>,
}

#[derive(Default)]
struct BgState {
    stop: bool,
    /// Bumped whenever flush or compaction installs something.
    installs: u64,
    flushing: bool,
    compactions_running: usize,
}

#[derive(Default)]
struct Counters {
    user_bytes: AtomicU64,
    flush_bytes: AtomicU64,
    compaction_read_bytes: AtomicU64,
    compaction_write_bytes: AtomicU64,
    compactions: AtomicU64,
    trivial_moves: AtomicU64,
    covered_dropped: AtomicU64,
    flushes: AtomicU64,
    stall_micros: AtomicU64,
    slowdowns: AtomicU64,
    blocks_tried: AtomicU64,
    blocks_compressed: AtomicU64,
    blob_flush_bytes: AtomicU64,
    blob_gc_bytes: AtomicU64,
}

pub(crate) struct Inner {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    tables_dir: PathBuf,
    opts: Options,
    _lock: Box<dyn FsLock>,
    cache: BlockCache,
    wal: Option<Wal>,
    write: Mutex<WriteState>,
    sv: ArcSwap<SuperVersion>,
    sv_lock: Mutex<()>,
    visible_seq: AtomicU64,
    views: Mutex<BTreeMap<Seqno, usize>>,
    vstate: Mutex<VersionState>,
    bg: Mutex<BgState>,
    bg_cond: Condvar,
    poisoned: Mutex<Option<String>>,
    /// Set with `poisoned`, read without a lock on every write.
    is_poisoned: AtomicBool,
    closed: AtomicBool,
    counters: Counters,
    /// Removes obsolete table files (with background threads).
    purger: Option<Purger>,
}

/// Stops the background threads when the last [`Db`] handle is dropped.
struct Guard {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.inner.stop_threads(&mut lock(&self.threads));
        if lock(&self.inner.poisoned).is_none() {
            let _ = self.inner.sync_wal();
        }
    }
}

/// An open engine. Cheap to clone; the last clone dropped (or [`Db::close`])
/// stops the background threads.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
    guard: Arc<Guard>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("dir", &self.inner.dir).finish_non_exhaustive()
    }
}

/// What a checkpoint holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// The checkpoint's directory (open it with [`Db::open`]).
    pub dir: PathBuf,
    /// The durable marker of the checkpoint (embedded mode).
    pub marker: Option<Marker>,
    /// The highest sequence number it holds.
    pub last_seq: Seqno,
    /// Its table files.
    pub tables: Vec<CheckpointTable>,
    /// Its blob files (relative to its directory), which the tables'
    /// separated values live in (see `Options::blob_value_bytes_min`).
    pub blob_files: Vec<PathBuf>,
}

/// One table file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointTable {
    /// The file, relative to the checkpoint's directory.
    pub path: PathBuf,
    /// xxh3-64 of the whole file, recorded when the engine wrote the table
    /// (so a sender of the checkpoint need not read it to checksum it).
    /// `None` for tables ingested from elsewhere and for tables recorded by a
    /// build before edit format 2.
    pub xxh3: Option<u64>,
}

/// How [`Db::ingest`] treats the memtables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IngestOptions {
    /// Drop every memtable, sealed ones too (embedded mode only: their writes
    /// are covered by the ingested tables). Otherwise they are flushed first.
    pub discard_memtables: bool,
    /// The marker to set, in the same manifest edit.
    pub marker: Option<Marker>,
}

impl IngestOptions {
    /// Defaults: memtables flushed first, marker unchanged.
    pub fn new() -> IngestOptions {
        IngestOptions::default()
    }
    /// Drop the memtables instead of flushing them (embedded mode).
    pub fn discard_memtables(mut self, discard: bool) -> IngestOptions {
        self.discard_memtables = discard;
        self
    }
    /// Set this marker in the same manifest edit.
    pub fn marker(mut self, marker: Marker) -> IngestOptions {
        self.marker = Some(marker);
        self
    }
}

/// Per-level figures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LevelStats {
    /// Tables in the level.
    pub tables: usize,
    /// Bytes of those tables.
    pub bytes: u64,
}

/// Engine statistics.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Stats {
    /// Per level, L0 first.
    pub levels: Vec<LevelStats>,
    /// Bytes of keys and values written by the user.
    pub user_bytes: u64,
    /// Bytes of tables written by flushes.
    pub flush_bytes: u64,
    /// Bytes of tables read by compactions.
    pub compaction_read_bytes: u64,
    /// Bytes of tables written by compactions.
    pub compaction_write_bytes: u64,
    /// (flush + compaction + blob file bytes written) / user bytes.
    pub write_amplification: f64,
    /// Flushes done.
    pub flushes: u64,
    /// Compactions done (trivial moves counted apart).
    pub compactions: u64,
    /// Tables moved down without a rewrite.
    pub trivial_moves: u64,
    /// Tables dropped whole, unread, because a newer range tombstone
    /// covers them (see `docs/design/lsm.md`, "Dropping covered tables").
    pub covered_tables_dropped: u64,
    /// Total time writes waited in stalls and slowdowns.
    pub stall_time: Duration,
    /// Writes delayed by a slowdown.
    pub slowdowns: u64,
    /// Block cache hits / (hits + misses), over data blocks and index
    /// partitions (compaction reads are not counted).
    pub cache_hit_ratio: f64,
    /// Bytes in the block cache.
    pub cache_bytes: u64,
    /// Bytes in memtables (active and sealed).
    pub memtable_bytes: u64,
    /// Sealed memtables waiting for their flush.
    pub sealed_memtables: usize,
    /// Bytes held for open tables outside the block cache: their top indexes
    /// (one entry per index partition), filters and range deletes.
    pub table_memory_bytes: u64,
    /// Of those, the filters' bytes, charged against `block_cache_bytes`
    /// (the cache holds that much less).
    pub filter_bytes: u64,
    /// Data blocks that flushes and compactions handed to the compressor
    /// (a writer stops trying blocks that do not shrink and probes one in 32;
    /// see `docs/design/lsm.md`, "Compression").
    pub blocks_compression_tried: u64,
    /// Data blocks stored compressed.
    pub blocks_compressed: u64,
    /// Blob files the live tables reference (see `Options::blob_value_bytes_min`).
    pub blob_files: usize,
    /// Bytes of those blob files.
    pub blob_bytes: u64,
    /// Of those, the bytes the live tables' references keep (the rest is
    /// garbage, reclaimed by compactions).
    pub blob_live_bytes: u64,
    /// Bytes of blob files written by flushes.
    pub blob_flush_bytes: u64,
    /// Bytes of values a compaction moved out of a blob file with garbage
    /// into a new one (record overhead included).
    pub blob_gc_bytes: u64,
}

/// A consistent view of the engine at one sequence number: every read through
/// it sees exactly the writes up to that number, across flushes and
/// compactions, until it is dropped.
pub struct ReadView {
    inner: Arc<Inner>,
    seq: Seqno,
}

impl std::fmt::Debug for ReadView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadView").field("seq", &self.seq).finish()
    }
}

impl Drop for ReadView {
    fn drop(&mut self) {
        let mut v = lock(&self.inner.views);
        if let Some(n) = v.get_mut(&self.seq) {
            *n -= 1;
            if *n == 0 {
                v.remove(&self.seq);
            }
        }
    }
}

impl ReadView {
    /// The view's sequence number.
    pub fn seq(&self) -> Seqno {
        self.seq
    }
    /// The value of `key` in this view.
    pub fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        self.inner.get_at(key, self.seq)
    }
    /// Keys in `range`, ascending, in this view.
    pub fn range<R: RangeBounds<K>, K: AsRef<[u8]>>(&self, range: R) -> Iter {
        self.inner.iter_at(bounds(&range), true, self.seq)
    }
    /// Keys in `range`, descending, in this view.
    pub fn range_rev<R: RangeBounds<K>, K: AsRef<[u8]>>(&self, range: R) -> Iter {
        self.inner.iter_at(bounds(&range), false, self.seq)
    }
    /// Keys starting with `prefix`, ascending, in this view.
    pub fn prefix(&self, prefix: &[u8]) -> Iter {
        self.inner.iter_at(prefix_bounds(prefix), true, self.seq)
    }
    /// Keys starting with `prefix`, descending, in this view.
    pub fn prefix_rev(&self, prefix: &[u8]) -> Iter {
        self.inner.iter_at(prefix_bounds(prefix), false, self.seq)
    }
}

fn bound_bytes<K: AsRef<[u8]>>(b: Bound<&K>) -> Bound<Bytes> {
    match b {
        Bound::Included(k) => Bound::Included(Bytes::copy_from_slice(k.as_ref())),
        Bound::Excluded(k) => Bound::Excluded(Bytes::copy_from_slice(k.as_ref())),
        Bound::Unbounded => Bound::Unbounded,
    }
}

fn bounds<R: RangeBounds<K>, K: AsRef<[u8]>>(r: &R) -> (Bound<Bytes>, Bound<Bytes>) {
    (bound_bytes(r.start_bound()), bound_bytes(r.end_bound()))
}

/// The smallest key after every key that starts with `prefix`, if any.
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut p = prefix.to_vec();
    while let Some(last) = p.pop() {
        if last != 0xff {
            p.push(last + 1);
            return Some(p);
        }
    }
    None
}

/// Whether keys `[smallest, largest]` may meet the range `(lo, hi)`
/// (conservative: an excluded bound counts as included).
fn overlaps_bounds(lo: &Bound<Bytes>, hi: &Bound<Bytes>, smallest: &[u8], largest: &[u8]) -> bool {
    let below = matches!(lo, Bound::Included(k) | Bound::Excluded(k) if largest < k.as_ref());
    let above = matches!(hi, Bound::Included(k) | Bound::Excluded(k) if smallest > k.as_ref());
    !below && !above
}

fn prefix_bounds(prefix: &[u8]) -> (Bound<Bytes>, Bound<Bytes>) {
    let lo = Bound::Included(Bytes::copy_from_slice(prefix));
    let hi = match prefix_end(prefix) {
        Some(e) => Bound::Excluded(Bytes::from(e)),
        None => Bound::Unbounded,
    };
    (lo, hi)
}

fn wal_err(what: &'static str) -> impl FnOnce(cairn_wal::Error) -> Error {
    move |source| Error::Log { what, source }
}

impl Db {
    /// Opens (or creates) an engine in `dir` on the real file system.
    pub fn open(dir: impl AsRef<Path>, opts: Options) -> Result<Db> {
        Self::open_with_fs(Arc::new(StdFs), dir, opts)
    }

    /// Opens (or creates) an engine in `dir` through `fs` (for example cairn-wal's simulated disk).
    pub fn open_with_fs(fs: Arc<dyn Fs>, dir: impl AsRef<Path>, opts: Options) -> Result<Db> {
        let dir = dir.as_ref().to_path_buf();
        let _span = tracing::info_span!("lsm_open", dir = %dir.display()).entered();
        assert!(opts.levels >= 2, "an engine needs at least two levels");
        let exists = fs.exists(&manifest_dir(&dir)).map_err(io("stat manifest", &dir))?;
        if !exists && !opts.create_if_missing {
            return Err(Error::NotFound { dir });
        }
        // Every directory made here must survive a crash: sync each one's parent, top down.
        let mut made = Vec::new();
        let mut p = dir.clone();
        while !p.as_os_str().is_empty() && !fs.exists(&p).map_err(io("stat directory", &p))? {
            made.push(p.clone());
            p = p.parent().map(Path::to_path_buf).unwrap_or_default();
        }
        fs.create_dir_all(&dir).map_err(io("create directory", &dir))?;
        for m in made.iter().rev() {
            let parent = m.parent().filter(|x| !x.as_os_str().is_empty()).unwrap_or(Path::new("."));
            fs.sync_dir(parent).map_err(io("fsync parent directory", parent))?;
        }
        let lock_path = dir.join(LOCK_FILE);
        let lock = fs.try_lock_exclusive(&lock_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                Error::Locked { dir: dir.clone() }
            } else {
                Error::Io { op: "lock directory", path: lock_path.clone(), source: e }
            }
        })?;
        let tables_dir = dir.join(TABLES_DIR);
        if !fs.exists(&tables_dir).map_err(io("stat tables directory", &tables_dir))? {
            fs.create_dir_all(&tables_dir).map_err(io("create tables directory", &tables_dir))?;
            fs.sync_dir(&dir).map_err(io("fsync directory", &dir))?;
        }
        let cache = BlockCache::new(opts.block_cache_bytes);
        let purge = match opts.background {
            Background::Threads if opts.purge_queue_tables > 0 => {
                Some(Purger::start(opts.purge_queue_tables).map_err(io("spawn purge thread", &PathBuf::new()))?)
            }
            _ => None,
        };
        let purger = purge.as_ref().map(|(p, _)| p.clone());
        let opened = if exists {
            match Manifest::open(
                Arc::clone(&fs),
                &dir,
                opts.manifest_segment_bytes,
                opts.manifest_edits_per_snapshot,
                opts.levels,
            ) {
                // A crash during the very first open left a manifest directory
                // without a segment: nothing was ever installed.
                Err(Error::Log { source: cairn_wal::Error::NotFound { .. }, .. }) if opts.create_if_missing => None,
                Err(Error::Log { source: cairn_wal::Error::NotFound { .. }, .. }) => {
                    return Err(Error::NotFound { dir });
                }
                other => Some(other?),
            }
        } else {
            None
        };
        let (manifest, version, next_table_id) = if let Some((m, edits)) = opened {
            // Fold the edits first: only the tables live at the end are opened.
            let mut live: std::collections::BTreeMap<TableId, Added> = std::collections::BTreeMap::new();
            let mut v = Version::empty(opts.levels);
            let mut next_id = 1;
            for e in &edits {
                if e.full {
                    live.clear();
                }
                for id in &e.removed {
                    live.remove(id);
                }
                for a in &e.added {
                    live.insert(a.id, a.clone());
                    next_id = next_id.max(a.id + 1);
                }
                if let Some(n) = e.next_table_id {
                    next_id = next_id.max(n);
                }
                let meta_only = Edit { added: Vec::new(), removed: Vec::new(), full: false, ..e.clone() };
                v = v.apply(&meta_only, &[]);
            }
            let mut blobs: BTreeMap<BlobId, Arc<BlobFile>> = BTreeMap::new();
            for (id, a) in live {
                let t = Table::open(
                    Arc::clone(&fs),
                    &tables_dir.join(table_file_name(id)),
                    id,
                    a.seq_offset,
                    cache.clone(),
                )?
                .with_blob_offset(a.blob_offset)
                .with_blobs(|bid| {
                    if let Some(b) = blobs.get(&bid) {
                        return Ok(Arc::clone(b));
                    }
                    let path = tables_dir.join(blob_file_name(bid));
                    let b = Arc::new(BlobFile::open(Arc::clone(&fs), &path, bid, purger.clone())?);
                    blobs.insert(bid, Arc::clone(&b));
                    Ok(b)
                })?;
                v.levels[a.level as usize].push(Arc::new(t.with_file_xxh3(a.file_xxh3).with_purger(purger.clone())));
            }
            v.sort();
            (m, v, next_id)
        } else {
            let v = Version::empty(opts.levels);
            let m = Manifest::create(
                Arc::clone(&fs),
                &dir,
                opts.manifest_segment_bytes,
                opts.manifest_edits_per_snapshot,
                &v.full_edit(1),
            )?;
            (m, v, 1)
        };
        // Tables not in the manifest, and blob files no table references, are
        // leftovers of an interrupted flush, compaction or ingest: remove them.
        let live: HashSet<TableId> = version.tables().map(|(_, t)| t.id).collect();
        for name in fs.read_dir(&tables_dir).map_err(io("list tables", &tables_dir))? {
            let p = tables_dir.join(&name);
            let keep = match (parse_table_file_name(&name), parse_blob_file_name(&name)) {
                (Some(id), _) => live.contains(&id),
                (None, Some(id)) => version.blobs.contains_key(&id),
                (None, None) => false,
            };
            if !keep {
                tracing::info!(path = %p.display(), "removing a file no table in the manifest lists");
                fs.remove_file(&p).map_err(io("remove leftover table", &p))?;
            }
        }
        let mut last_seq = version.last_seq;
        let mut last_marker = version.marker;
        let chunk_bytes = crate::memtable::arena_chunk_bytes(opts.write_buffer_bytes);
        let filter_bits = crate::memtable::filter_bits(opts.write_buffer_bytes, opts.memtable_bloom_bits_per_entry);
        let mut active = Arc::new(Memtable::new(1, chunk_bytes, filter_bits, last_marker));
        let mut sealed: Vec<Arc<Memtable>> = Vec::new();
        let mut next_mem_id = 2;
        let wal = match opts.durability {
            DurabilityMode::Embedded => None,
            DurabilityMode::Standalone(_) => {
                let mut wo = WalOptions::default();
                wo.segment_bytes_max = opts.wal_segment_bytes;
                wo.spare_segments_max = 1;
                wo.record_bytes_max = opts.batch_bytes_max as u64;
                if opts.background == Background::Inline {
                    // Every file-system call on the caller's thread, in a fixed order.
                    wo.prepare_in = cairn_wal::PrepareIn::Foreground;
                }
                let (wal, report) = Wal::open_or_create(Arc::clone(&fs), dir.join("wal"), wo, b"cairn-lsm wal v1")
                    .map_err(wal_err("open WAL"))?;
                if report.torn_tail.is_some() {
                    tracing::warn!(?report, "the WAL had a torn tail (a crash during a write); it was dropped");
                }
                for batch in wal.replay_from(None).map_err(wal_err("replay WAL"))? {
                    let batch = batch.map_err(wal_err("read WAL"))?;
                    for r in batch.iter() {
                        if r.position <= version.flushed_seq {
                            continue;
                        }
                        let (first, b) = WriteBatch::decode(r.payload)
                            .map_err(|e| crate::error::corrupt(&dir.join("wal"), r.position, e))?;
                        // The newest replayed memtable stays active, the others are sealed.
                        if active.approximate_bytes() >= opts.write_buffer_bytes {
                            let full = std::mem::replace(
                                &mut active,
                                Arc::new(Memtable::new(next_mem_id, chunk_bytes, filter_bits, last_marker)),
                            );
                            sealed.insert(0, full);
                            next_mem_id += 1;
                        }
                        apply_batch(&active, &b, first);
                        last_seq = last_seq.max(first + b.len() as u64 - 1);
                        if let Some(m) = b.marker {
                            last_marker = Some(last_marker.map_or(m, |x| x.max(m)));
                        }
                    }
                }
                Some(wal)
            }
        };
        Self::start(
            fs,
            dir,
            tables_dir,
            opts,
            lock,
            cache,
            wal,
            manifest,
            version,
            next_table_id,
            active,
            sealed,
            last_seq,
            last_marker,
            next_mem_id,
            purge,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        fs: Arc<dyn Fs>,
        dir: PathBuf,
        tables_dir: PathBuf,
        opts: Options,
        lock: Box<dyn FsLock>,
        cache: BlockCache,
        wal: Option<Wal>,
        manifest: Manifest,
        version: Version,
        next_table_id: TableId,
        active: Arc<Memtable>,
        sealed: Vec<Arc<Memtable>>,
        last_seq: Seqno,
        last_marker: Option<Marker>,
        next_mem_id: u64,
        purge: Option<(Purger, JoinHandle<()>)>,
    ) -> Result<Db> {
        let (purger, purge_thread) = purge.unzip();
        let inner = Arc::new(Inner {
            purger,
            fs,
            dir,
            tables_dir,
            cache,
            wal,
            write: Mutex::new(WriteState {
                wal_pending: cairn_wal::Batch::new(),
                wal_pending_bytes: 0,
                last_seq,
                last_marker,
                next_mem_id,
                buf: Vec::new(),
            }),
            sv: ArcSwap::from_pointee(SuperVersion { active, sealed, version: Arc::new(version), pending_bytes: 0 }),
            sv_lock: Mutex::new(()),
            visible_seq: AtomicU64::new(last_seq),
            views: Mutex::new(BTreeMap::new()),
            vstate: Mutex::new(VersionState { manifest, next_table_id, compacting: HashSet::new() }),
            bg: Mutex::new(BgState::default()),
            bg_cond: Condvar::new(),
            poisoned: Mutex::new(None),
            is_poisoned: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            counters: Counters::default(),
            _lock: lock,
            opts,
        });
        {
            let cur = inner.sv.load_full();
            let pending_bytes = choose::pending_bytes(&Inner::summaries(&cur.version), &inner.choose_config());
            inner.sv.store(Arc::new(SuperVersion {
                active: Arc::clone(&cur.active),
                sealed: cur.sealed.clone(),
                version: Arc::clone(&cur.version),
                pending_bytes,
            }));
        }
        let mut threads: Vec<JoinHandle<()>> = purge_thread.into_iter().collect();
        if inner.opts.background == Background::Threads {
            let i = Arc::clone(&inner);
            threads.push(
                std::thread::Builder::new()
                    .name("lsm-flush".into())
                    .spawn(move || i.flush_loop())
                    .map_err(io("spawn flush thread", &PathBuf::new()))?,
            );
            for n in 0..inner.opts.compaction_threads.max(1) {
                let i = Arc::clone(&inner);
                threads.push(
                    std::thread::Builder::new()
                        .name(format!("lsm-compact-{n}"))
                        .spawn(move || i.compaction_loop())
                        .map_err(io("spawn compaction thread", &PathBuf::new()))?,
                );
            }
            if let DurabilityMode::Standalone(SyncPolicy::Interval(every)) = inner.opts.durability {
                let i = Arc::clone(&inner);
                threads.push(
                    std::thread::Builder::new()
                        .name("lsm-wal-sync".into())
                        .spawn(move || i.sync_loop(every))
                        .map_err(io("spawn sync thread", &PathBuf::new()))?,
                );
            }
        }
        let db = Db { guard: Arc::new(Guard { inner: Arc::clone(&inner), threads: Mutex::new(threads) }), inner };
        db.inner.wake_background();
        if db.inner.opts.background == Background::Inline {
            db.inner.run_inline()?;
        }
        Ok(db)
    }

    /// Sets `key` to `value`.
    pub fn put(&self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Result<()> {
        let mut b = WriteBatch::new();
        b.put(key, value);
        self.write(&b)
    }

    /// Deletes `key`.
    pub fn delete(&self, key: impl Into<Bytes>) -> Result<()> {
        let mut b = WriteBatch::new();
        b.delete(key);
        self.write(&b)
    }

    /// Deletes every key in `[start, end)` (one range tombstone).
    pub fn delete_range(&self, start: impl Into<Bytes>, end: impl Into<Bytes>) -> Result<()> {
        let mut b = WriteBatch::new();
        b.delete_range(start, end);
        self.write(&b)
    }

    /// Deletes every key starting with `prefix` (one range tombstone).
    pub fn delete_prefix(&self, prefix: &[u8]) -> Result<()> {
        crate::types::check_key(prefix)?;
        match prefix_end(prefix) {
            Some(end) => self.delete_range(Bytes::copy_from_slice(prefix), end),
            None => {
                // Every byte is 0xff: no finite end; delete the range up to
                // the largest possible key, then that key.
                let mut b = WriteBatch::new();
                b.delete_range(Bytes::copy_from_slice(prefix), vec![0xff; crate::KEY_BYTES_MAX]);
                b.delete(vec![0xff; crate::KEY_BYTES_MAX]);
                self.write(&b)
            }
        }
    }

    /// Applies a batch atomically.
    pub fn write(&self, batch: &WriteBatch) -> Result<()> {
        self.inner.write(batch)
    }

    /// The value of `key`, as of the latest write.
    pub fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        crate::types::check_key(key)?;
        self.inner.get_at(key, self.inner.visible_seq.load(Ordering::Acquire))
    }

    /// Keys in `range`, ascending.
    pub fn range<R: RangeBounds<K>, K: AsRef<[u8]>>(&self, range: R) -> Iter {
        self.inner.iter_at(bounds(&range), true, self.inner.visible_seq.load(Ordering::Acquire))
    }

    /// Keys in `range`, descending.
    pub fn range_rev<R: RangeBounds<K>, K: AsRef<[u8]>>(&self, range: R) -> Iter {
        self.inner.iter_at(bounds(&range), false, self.inner.visible_seq.load(Ordering::Acquire))
    }

    /// Keys starting with `prefix`, ascending.
    pub fn prefix(&self, prefix: &[u8]) -> Iter {
        self.inner.iter_at(prefix_bounds(prefix), true, self.inner.visible_seq.load(Ordering::Acquire))
    }

    /// Keys starting with `prefix`, descending.
    pub fn prefix_rev(&self, prefix: &[u8]) -> Iter {
        self.inner.iter_at(prefix_bounds(prefix), false, self.inner.visible_seq.load(Ordering::Acquire))
    }

    /// A read view pinned at the latest write.
    pub fn read_view(&self) -> ReadView {
        let mut v = lock(&self.inner.views);
        let seq = self.inner.visible_seq.load(Ordering::Acquire);
        *v.entry(seq).or_insert(0) += 1;
        ReadView { inner: Arc::clone(&self.inner), seq }
    }

    /// The sequence number of the latest visible write.
    pub fn last_seq(&self) -> Seqno {
        self.inner.visible_seq.load(Ordering::Acquire)
    }

    /// The durable marker: every batch whose marker is at or below it is in a
    /// table, synced, and survives a crash (embedded mode).
    pub fn durable_marker(&self) -> Option<Marker> {
        self.inner.sv.load().version.marker
    }

    /// Seals the active memtable and waits until every memtable is flushed;
    /// in standalone mode also syncs the WAL.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush_all()
    }

    /// Syncs the standalone WAL (a no-op in embedded mode).
    pub fn sync_wal(&self) -> Result<()> {
        self.inner.sync_wal()
    }

    /// Compacts every table overlapping `range`, level by level, down to the
    /// last level that holds data, dropping what no read view needs.
    pub fn compact_range<R: RangeBounds<K>, K: AsRef<[u8]>>(&self, range: R) -> Result<()> {
        let (lo, hi) = bounds(&range);
        self.inner.flush_all()?;
        self.inner.compact_range(lo, hi)
    }

    /// Writes a checkpoint into `dest` (which must not exist): a forced flush,
    /// then hard links of the live tables and a new manifest holding their
    /// version. Open it with [`Db::open`]; its marker is the durable marker.
    pub fn checkpoint(&self, dest: impl AsRef<Path>) -> Result<CheckpointInfo> {
        self.inner.checkpoint(dest.as_ref())
    }

    /// Adds externally built tables (for example another engine's L0 tables)
    /// as L0 tables, their sequence numbers shifted by one offset above all
    /// local data, in one manifest edit. The files are hard-linked (copied if
    /// linking fails). Tables are taken as written: their sequence numbers
    /// and blob file ids as stored (a table its engine ingested itself
    /// carries offsets only that engine's manifest records: open such a
    /// checkpoint with [`Db::open`] instead). A table that keeps values in
    /// blob files is refused; see [`Db::ingest_with_blobs`].
    pub fn ingest(&self, tables: &[PathBuf], opts: IngestOptions) -> Result<()> {
        self.ingest_with_blobs(tables, &[], opts)
    }

    /// [`Db::ingest`] for tables that keep values in blob files (see
    /// `Options::blob_value_bytes_min`): `blob_files` are the files their
    /// references name, each with the id the references use (the number
    /// in its name where the engine wrote it, see [`crate::blob_file_id`]). They
    /// are linked (copied if linking fails) under ids of this engine, in
    /// the same manifest edit; the tables' references are translated as
    /// they are read. A table referencing a blob file not given is refused
    /// ([`Error::Ingest`]); a given file no table references is left alone.
    pub fn ingest_with_blobs(
        &self,
        tables: &[PathBuf],
        blob_files: &[(u64, PathBuf)],
        opts: IngestOptions,
    ) -> Result<()> {
        let tables: Vec<IngestTable> =
            tables.iter().map(|p| IngestTable { path: p.clone(), seq_offset: 0, blob_offset: 0 }).collect();
        self.inner.ingest(&tables, blob_files, opts, false)
    }

    /// Embedded mode: makes a delta checkpoint in `dest` (a new directory)
    /// that brings a state whose durable marker is `after` to this one's:
    /// after a forced flush, the L0 tables that hold every write above
    /// `after` are hard-linked in and described by a [`DELTA_FILE`].
    /// `Ok(None)` (and no directory) when the tables cannot show that: some
    /// were merged by a table compaction since, or `after` is not below this
    /// state's durable marker. Send a full [`Db::checkpoint`] then. The blob
    /// files the tables reference are linked in too ([`Delta::blob_files`]).
    pub fn delta_checkpoint(&self, dest: impl AsRef<Path>, after: Option<Marker>) -> Result<Option<Delta>> {
        self.inner.delta_checkpoint(dest.as_ref(), after)
    }

    /// Embedded mode: ingests a delta made by [`Db::delta_checkpoint`]
    /// (`tables[i]` is the file of `delta.tables[i]`, `blob_files[i]` the
    /// file of `delta.blob_files[i]`), after checking that
    /// its tables hold every write from this state's durable marker on, in
    /// one manifest edit: every memtable is dropped (their writes lie inside
    /// the delta), the tables come in above all local data with their order
    /// kept, and the durable marker becomes `delta.marker`.
    pub fn ingest_delta(&self, delta: &Delta, tables: &[PathBuf], blob_files: &[PathBuf]) -> Result<()> {
        self.inner.check_delta(delta, tables, blob_files)?;
        self.inner.ingest_delta(delta, tables, blob_files)
    }

    /// Embedded mode: the checks of [`Db::ingest_delta`] alone (the tables'
    /// props against this state's durable marker), changing nothing. A
    /// delta that passes them now passes them later (the marker only rises)
    /// unless the state moves past the delta's marker.
    pub fn check_delta(&self, delta: &Delta, tables: &[PathBuf], blob_files: &[PathBuf]) -> Result<()> {
        self.inner.check_delta(delta, tables, blob_files)
    }

    /// Statistics, also published as `metrics` gauges.
    pub fn stats(&self) -> Stats {
        self.inner.stats()
    }

    /// Waits until no flush or compaction is pending or running.
    pub fn wait_idle(&self) -> Result<()> {
        self.inner.wait_idle()
    }

    /// The engine's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Stops background work, syncs the standalone WAL and closes. In embedded
    /// mode, unflushed writes are dropped (call [`Db::flush`] first to keep them).
    pub fn close(self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Release);
        self.guard.inner.stop_threads(&mut lock(&self.guard.threads));
        if let Some(p) = lock(&self.inner.poisoned).clone() {
            return Err(Error::Poisoned(p));
        }
        self.inner.sync_wal()
    }

    /// The table files live now with their levels (for tests and tools).
    pub fn live_tables(&self) -> Vec<(usize, PathBuf)> {
        let sv = self.inner.sv.load();
        sv.version.tables().map(|(l, t)| (l, t.path().to_path_buf())).collect()
    }
}

fn apply_batch(mem: &Memtable, b: &WriteBatch, first: Seqno) {
    for (seq, op) in (first..).zip(b.ops.iter()) {
        match op {
            Op::Put(k, v) => mem.insert(k, seq, ValueKind::Put, v),
            Op::Delete(k) => mem.insert(k, seq, ValueKind::Delete, &[]),
            Op::DeleteRange(s, e) => mem.insert_range_delete(RangeTombstone { start: s.clone(), end: e.clone(), seq }),
        }
    }
    if let Some(m) = b.marker {
        mem.note_marker(m);
    }
}

impl Inner {
    fn memtable_filter_bits(&self) -> usize {
        crate::memtable::filter_bits(self.opts.write_buffer_bytes, self.opts.memtable_bloom_bits_per_entry)
    }

    fn check_usable(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        if self.is_poisoned.load(Ordering::Acquire)
            && let Some(p) = lock(&self.poisoned).clone()
        {
            return Err(Error::Poisoned(p));
        }
        Ok(())
    }

    /// Records a failure of a write or fsync: no further writes.
    fn poison(&self, e: Error) -> Error {
        tracing::error!(error = %e, "the engine stops accepting writes");
        let mut p = lock(&self.poisoned);
        if p.is_none() {
            *p = Some(e.to_string());
        }
        self.is_poisoned.store(true, Ordering::Release);
        drop(p);
        self.bg_cond.notify_all();
        e
    }

    fn wake_background(&self) {
        self.bg_cond.notify_all();
    }

    fn stop_threads(&self, threads: &mut Vec<JoinHandle<()>>) {
        lock(&self.bg).stop = true;
        self.bg_cond.notify_all();
        if let Some(p) = &self.purger {
            p.stop();
        }
        for t in threads.drain(..) {
            let _ = t.join();
        }
    }

    fn write(&self, batch: &WriteBatch) -> Result<()> {
        self.check_usable()?;
        batch.validate()?;
        let len = batch.encoded_bytes();
        if len > self.opts.batch_bytes_max {
            return Err(Error::BatchTooLarge { len, max: self.opts.batch_bytes_max });
        }
        let embedded = self.opts.durability == DurabilityMode::Embedded;
        if batch.is_empty() && batch.marker.is_none() {
            return Ok(());
        }
        if self.opts.background == Background::Threads {
            self.maybe_stall()?;
        }
        let mut w = lock(&self.write);
        self.check_usable()?;
        if let (Some(m), Some(last)) = (batch.marker, w.last_marker)
            && m <= last
        {
            return Err(Error::MarkerNotRising { given: m, last });
        }
        if embedded && batch.marker.is_none() {
            return Err(Error::WrongMode("in embedded mode every batch carries a marker"));
        }
        let first = w.last_seq + 1;
        let last = w.last_seq + batch.len() as u64;
        if last > crate::types::SEQNO_MAX {
            return Err(Error::WrongMode("sequence numbers exhausted"));
        }
        if self.sv.load().active.approximate_bytes() >= self.opts.write_buffer_bytes {
            self.seal(&mut w)?;
        }
        let mut ticket = None;
        if let (Some(wal), DurabilityMode::Standalone(policy)) = (&self.wal, self.opts.durability)
            && !batch.is_empty()
        {
            let mut buf = std::mem::take(&mut w.buf);
            batch.encode(first, &mut buf);
            if policy != SyncPolicy::EveryWrite && self.opts.wal_buffer_bytes > 0 {
                w.wal_pending.append(WAL_BATCH_KIND, last, &buf);
                w.wal_pending_bytes += buf.len();
                w.buf = buf;
                if w.wal_pending_bytes >= self.opts.wal_buffer_bytes {
                    self.drain_wal_buffer(&mut w)?;
                }
            } else {
                let mut wb = cairn_wal::Batch::new();
                wb.append(WAL_BATCH_KIND, last, &buf);
                w.buf = buf;
                let d = if policy == SyncPolicy::EveryWrite { Durability::Sync } else { Durability::Buffered };
                let t = wal.submit(&wb, d).map_err(|e| self.poison(wal_err("write WAL")(e)))?;
                ticket = Some(t);
            }
        }
        let sv = self.sv.load();
        apply_batch(&sv.active, batch, first);
        if !batch.is_empty() {
            w.last_seq = last;
        }
        if batch.marker.is_some() {
            w.last_marker = batch.marker;
        }
        let sync_each = self.opts.durability == DurabilityMode::Standalone(SyncPolicy::EveryWrite);
        if !sync_each {
            self.visible_seq.store(w.last_seq, Ordering::Release);
        }
        drop(w);
        if let (Some(wal), Some(t)) = (&self.wal, ticket) {
            wal.wait(t).map_err(|e| self.poison(wal_err("write WAL")(e)))?;
        }
        if sync_each {
            self.visible_seq.fetch_max(last, Ordering::AcqRel);
        }
        self.counters.user_bytes.fetch_add(batch.payload_bytes() as u64, Ordering::Relaxed);
        if self.opts.background == Background::Inline {
            self.run_inline()?;
        }
        Ok(())
    }

    /// Writes the gathered WAL records to the OS (the write lock is held).
    fn drain_wal_buffer(&self, w: &mut WriteState) -> Result<()> {
        if w.wal_pending.is_empty() {
            return Ok(());
        }
        if let Some(wal) = &self.wal {
            wal.write(&w.wal_pending, Durability::Buffered).map_err(|e| self.poison(wal_err("write WAL")(e)))?;
        }
        w.wal_pending.clear();
        w.wal_pending_bytes = 0;
        Ok(())
    }

    /// Writes out the gathered WAL records and syncs the WAL.
    fn sync_wal(&self) -> Result<()> {
        let Some(wal) = &self.wal else { return Ok(()) };
        self.drain_wal_buffer(&mut lock(&self.write))?;
        wal.sync().map_err(|e| self.poison(wal_err("sync WAL")(e)))
    }

    /// Seals the active memtable (the write lock is held). Waits while too
    /// many sealed memtables wait for their flush.
    fn seal(&self, w: &mut WriteState) -> Result<()> {
        if self.opts.background == Background::Threads {
            let start = Instant::now();
            let mut bg = lock(&self.bg);
            while self.sv.load().sealed.len() >= self.opts.sealed_memtables_max.max(1) {
                self.check_usable()?;
                if start.elapsed() > self.opts.stall_duration_max {
                    let waited = start.elapsed();
                    self.counters.stall_micros.fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
                    return Err(Error::StallTimeout {
                        waited_ms: waited.as_millis() as u64,
                        reason: "sealed memtables to flush",
                    });
                }
                bg = self.bg_cond.wait_timeout(bg, Duration::from_millis(10)).unwrap_or_else(|e| e.into_inner()).0;
            }
            drop(bg);
            let waited = start.elapsed();
            if waited > Duration::from_micros(100) {
                self.counters.stall_micros.fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
            }
        }
        let _g = lock(&self.sv_lock);
        let cur = self.sv.load_full();
        let id = w.next_mem_id;
        w.next_mem_id += 1;
        let mut sealed = Vec::with_capacity(cur.sealed.len() + 1);
        sealed.push(Arc::clone(&cur.active));
        sealed.extend(cur.sealed.iter().cloned());
        self.sv.store(Arc::new(SuperVersion {
            active: Arc::new(Memtable::new(
                id,
                crate::memtable::arena_chunk_bytes(self.opts.write_buffer_bytes),
                self.memtable_filter_bits(),
                w.last_marker,
            )),
            sealed,
            version: Arc::clone(&cur.version),
            pending_bytes: cur.pending_bytes,
        }));
        drop(_g);
        // Take the background lock before notifying: the flush thread checks
        // `sealed` and waits under that lock, so without it this notify could
        // fall between its check and its wait and be lost (a hang the model
        // test with background threads hit once).
        drop(lock(&self.bg));
        self.bg_cond.notify_all();
        Ok(())
    }

    fn summaries(v: &Version) -> Vec<Vec<TableSummary>> {
        v.levels
            .iter()
            .map(|ts| {
                ts.iter()
                    .map(|t| TableSummary {
                        id: t.id,
                        smallest: t.props.smallest.clone(),
                        largest: t.props.largest.clone(),
                        bytes: t.file_bytes,
                        seq_max: t.seq_max(),
                    })
                    .collect()
            })
            .collect()
    }

    fn choose_config(&self) -> ChooseConfig {
        ChooseConfig {
            l0_trigger: self.opts.l0_compaction_trigger,
            level_targets: (0..self.opts.levels)
                .map(|l| if l == 0 { 0 } else { self.opts.level_bytes_target(l) })
                .collect(),
            priority: self.opts.compaction_priority,
        }
    }

    /// Delays or stalls a write while background work lags (bounded).
    fn maybe_stall(&self) -> Result<()> {
        let start = Instant::now();
        let mut slowed = false;
        loop {
            let sv = self.sv.load();
            let l0 = sv.version.levels[0].len();
            let pending = sv.pending_bytes;
            drop(sv);
            let stop = l0 >= self.opts.l0_stop_tables || pending >= self.opts.pending_compaction_bytes_stop;
            if stop {
                self.check_usable()?;
                if start.elapsed() > self.opts.stall_duration_max {
                    let waited = start.elapsed();
                    self.counters.stall_micros.fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
                    return Err(Error::StallTimeout {
                        waited_ms: waited.as_millis() as u64,
                        reason: if l0 >= self.opts.l0_stop_tables {
                            "L0 tables to compact"
                        } else {
                            "pending compaction bytes"
                        },
                    });
                }
                let bg = lock(&self.bg);
                let _ = self.bg_cond.wait_timeout(bg, Duration::from_millis(10));
                continue;
            }
            if !slowed && (l0 >= self.opts.l0_slowdown_tables || pending >= self.opts.pending_compaction_bytes_slowdown)
            {
                slowed = true;
                self.counters.slowdowns.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(self.opts.slowdown_delay);
                continue;
            }
            break;
        }
        let waited = start.elapsed();
        if waited > Duration::from_micros(50) {
            self.counters.stall_micros.fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    fn get_at(&self, key: &[u8], snap: Seqno) -> Result<Option<Bytes>> {
        let sv = self.sv.load();
        let mut found: Option<(u64, Bytes)> = None;
        for m in std::iter::once(&sv.active).chain(sv.sealed.iter()) {
            if m.entry_count() == 0 {
                continue;
            }
            if let Some(x) = m.get(key, snap) {
                found = Some(x);
                break;
            }
        }
        if found.is_none() {
            let h = bloom::hash(key);
            'levels: for (l, ts) in sv.version.levels.iter().enumerate() {
                if l == 0 {
                    for t in ts {
                        if let Some(x) = t.get(key, h, snap)? {
                            found = Some(x);
                            break 'levels;
                        }
                    }
                } else {
                    let i = ts.partition_point(|t| t.props.largest.as_ref() < key);
                    for t in ts[i..].iter().take_while(|t| t.props.smallest.as_ref() <= key) {
                        if let Some(x) = t.get(key, h, snap)? {
                            found = Some(x);
                            break 'levels;
                        }
                    }
                }
            }
        }
        let Some((trailer, value)) = found else { return Ok(None) };
        let seq = trailer_seq(trailer);
        let mut tomb = 0;
        for m in std::iter::once(&sv.active).chain(sv.sealed.iter()) {
            if let Some(s) = m.covering_range_delete(key, snap) {
                tomb = tomb.max(s);
            }
        }
        for t in sv.version.range_delete_tables() {
            for r in &t.range_dels {
                if r.seq <= snap && r.covers(key) {
                    tomb = tomb.max(r.seq);
                }
            }
        }
        if tomb > seq {
            return Ok(None);
        }
        match trailer_kind(trailer) {
            Some(ValueKind::Put) => Ok(Some(value)),
            Some(ValueKind::BlobRef) => sv.version.read_blob(&value).map(Some),
            _ => Ok(None),
        }
    }

    fn iter_at(&self, (lo, hi): (Bound<Bytes>, Bound<Bytes>), forward: bool, snap: Seqno) -> Iter {
        let sv = self.sv.load_full();
        let start: Option<&[u8]> = match (forward, &lo, &hi) {
            (true, Bound::Included(k) | Bound::Excluded(k), _) => Some(k),
            (false, _, Bound::Included(k) | Bound::Excluded(k)) => Some(k),
            _ => None,
        };
        let mut sources = Vec::new();
        let mut tombs: Vec<RangeTombstone> = Vec::new();
        for m in std::iter::once(&sv.active).chain(sv.sealed.iter()) {
            sources.push(Source::Mem(MemIter::new(Arc::clone(m), forward, start)));
            tombs.extend(m.range_deletes());
        }
        let in_range = |t: &Table| overlaps_bounds(&lo, &hi, &t.props.smallest, &t.props.largest);
        for (l, ts) in sv.version.levels.iter().enumerate() {
            let ts: Vec<Arc<Table>> = ts.iter().filter(|t| in_range(t)).cloned().collect();
            for t in &ts {
                tombs.extend(t.range_dels.iter().cloned());
            }
            if l == 0 {
                for t in ts {
                    sources.push(Source::Table(TableIter::new(t, forward, start)));
                }
            } else if !ts.is_empty() {
                sources.push(Source::Level(LevelIter::new(ts, forward, start)));
            }
        }
        let fragments = Fragments::new(&tombs, snap);
        let version = Arc::clone(&sv.version);
        let pin: Pin = sv;
        Iter::new(pin, version, Merge::new(sources, forward), snap, lo, hi, forward, fragments)
    }

    fn settings(&self, level: usize) -> WriteSettings {
        WriteSettings {
            block_bytes: self.opts.block_bytes,
            restart_interval: self.opts.block_restart_interval,
            bloom_bits_per_key: self.opts.bloom_bits_per_key,
            compression: self.opts.compression_for(level),
            skip_sync: self.opts.skip_table_sync_for_tests,
        }
    }

    fn new_table_id(&self) -> (TableId, PathBuf) {
        let mut vs = lock(&self.vstate);
        let id = vs.next_table_id;
        vs.next_table_id += 1;
        (id, self.tables_dir.join(table_file_name(id)))
    }

    /// Links the blob files an ingest brings (`(id at the sender, path)`)
    /// under ids of this engine: the sender's, shifted by one offset onto
    /// a block of fresh ids, so their order is kept. Returns the shift
    /// (mod 2^64) and the opened files by local id.
    fn link_blob_files(&self, used: &BTreeMap<BlobId, &PathBuf>) -> Result<(u64, BTreeMap<BlobId, Arc<BlobFile>>)> {
        let shift = match (used.keys().next(), used.keys().next_back()) {
            (Some(&lo), Some(&hi)) => self.reserve_ids(hi - lo)?.wrapping_sub(lo),
            _ => 0,
        };
        let mut linked = BTreeMap::new();
        for (id, p) in used {
            let local = id.wrapping_add(shift);
            let to = self.tables_dir.join(blob_file_name(local));
            if self.fs.hard_link(p, &to).is_err() {
                copy_file(&*self.fs, p, &to)?;
            }
            linked.insert(local, Arc::new(BlobFile::open(Arc::clone(&self.fs), &to, local, self.purger.clone())?));
        }
        Ok((shift, linked))
    }

    /// Reserves a block of consecutive ids of the tables' counter for blob
    /// files whose ids at their sender span `span + 1` values; the first.
    /// A span above [`BLOB_ID_SPAN_MAX`] (no engine writes that many files)
    /// is refused, so damaged input cannot use up the id space.
    fn reserve_ids(&self, span: u64) -> Result<TableId> {
        let refuse = || Error::Ingest {
            path: self.tables_dir.clone(),
            reason: format!("the blob files' ids span {span} values, above the bound {BLOB_ID_SPAN_MAX}"),
        };
        if span > BLOB_ID_SPAN_MAX {
            return Err(refuse());
        }
        let mut vs = lock(&self.vstate);
        let first = vs.next_table_id;
        vs.next_table_id = first.checked_add(span + 1).ok_or_else(refuse)?;
        Ok(first)
    }

    /// A new blob file's id (from the tables' counter) and path.
    fn new_blob_id(&self) -> (BlobId, PathBuf) {
        let (id, _) = self.new_table_id();
        (id, self.tables_dir.join(blob_file_name(id)))
    }

    fn skip_blob_sync(&self) -> bool {
        self.opts.skip_table_sync_for_tests || self.opts.skip_blob_sync_for_tests
    }

    /// Opens blob file `id`, written by this engine.
    fn open_blob(&self, id: BlobId) -> Result<Arc<BlobFile>> {
        let path = self.tables_dir.join(blob_file_name(id));
        BlobFile::open(Arc::clone(&self.fs), &path, id, self.purger.clone()).map(Arc::new)
    }

    fn sync_tables_dir(&self) -> Result<()> {
        if self.opts.skip_table_sync_for_tests {
            return Ok(());
        }
        self.fs.sync_dir(&self.tables_dir).map_err(io("fsync tables directory", &self.tables_dir))
    }

    /// Installs `edit` (tables in `opened`) under the version lock: manifest
    /// first, then the in-memory version. `change_sv` adjusts the memtables.
    fn install(
        &self,
        vs: &mut VersionState,
        edit: Edit,
        opened: &[Arc<Table>],
        change_sv: impl FnOnce(&SuperVersion) -> (Arc<Memtable>, Vec<Arc<Memtable>>),
    ) -> Result<Arc<Version>> {
        let cur = self.sv.load_full();
        let next = Arc::new(cur.version.apply(&edit, opened));
        let mut edit = edit;
        edit.next_table_id = Some(vs.next_table_id);
        let next_id = vs.next_table_id;
        let full = || next.full_edit(next_id);
        vs.manifest.append(&edit, full).map_err(|e| self.poison(e))?;
        let _g = lock(&self.sv_lock);
        let cur = self.sv.load_full();
        let (active, sealed) = change_sv(&cur);
        let pending_bytes = choose::pending_bytes(&Self::summaries(&next), &self.choose_config());
        self.sv.store(Arc::new(SuperVersion { active, sealed, version: Arc::clone(&next), pending_bytes }));
        drop(_g);
        for id in &edit.removed {
            if !edit.added.iter().any(|a| a.id == *id)
                && let Some((_, t)) = cur.version.tables().find(|(_, t)| t.id == *id)
            {
                t.mark_obsolete();
            }
        }
        for (id, b) in &cur.version.blobs {
            if !next.blobs.contains_key(id) {
                b.mark_obsolete();
            }
        }
        lock(&self.bg).installs += 1;
        self.bg_cond.notify_all();
        self.publish_metrics(&next);
        Ok(next)
    }

    /// Flushes the oldest sealed memtable. Returns false if there is none.
    fn flush_one(&self) -> Result<bool> {
        self.flush_one_retiring(&mut None)
    }

    /// Flushes the oldest sealed memtable; returns whether there was one. The
    /// flushed memtable is handed back through `retired`, so that the flush
    /// thread frees it (every node of its skiplist) after it has told the
    /// writers waiting for the flush, not before.
    fn flush_one_retiring(&self, retired: &mut Option<Arc<Memtable>>) -> Result<bool> {
        let sv = self.sv.load_full();
        let Some(mem) = sv.sealed.last().cloned() else { return Ok(false) };
        drop(sv);
        let _span = tracing::info_span!("lsm_flush", memtable = mem.id).entered();
        let mut opened = Vec::new();
        let has_data = mem.entry_count() > 0 || mem.has_range_deletes();
        if has_data {
            let (id, path) = self.new_table_id();
            let mut w = TableWriter::create(&*self.fs, &path, self.settings(0)).map_err(|e| self.poison(e))?;
            let res = (|| {
                let mut blob: Option<BlobWriter> = None;
                let separate = self.opts.blob_value_bytes_min;
                mem.for_each_entry(|user, trailer, value| match separate {
                    Some(min) if value.len() >= min && trailer_kind(trailer) == Some(ValueKind::Put) => {
                        let b = match &mut blob {
                            Some(b) => b,
                            None => {
                                let (bid, bpath) = self.new_blob_id();
                                let skip = self.skip_blob_sync();
                                blob.insert(BlobWriter::create(
                                    &*self.fs,
                                    &bpath,
                                    bid,
                                    self.opts.blob_compression,
                                    skip,
                                )?)
                            }
                        };
                        let r = b.add(value)?;
                        w.add(user, crate::types::trailer(trailer_seq(trailer), ValueKind::BlobRef), &r.encode())
                    }
                    _ => w.add(user, trailer, value),
                })?;
                for t in sorted_range_deletes(&mem) {
                    w.add_range_delete(t);
                }
                w.set_markers(mem.markers());
                w.set_coverage_after(mem.after());
                self.opts.hook(HookPoint::FlushTableWritten)?;
                // The blob file is synced before the table that references it.
                let blob = match blob {
                    Some(b) => {
                        let bid = b.id();
                        let bytes = b.finish()?;
                        self.counters.blob_flush_bytes.fetch_add(bytes, Ordering::Relaxed);
                        Some(self.open_blob(bid)?)
                    }
                    None => None,
                };
                let written = w.finish()?;
                self.sync_tables_dir()?;
                self.opts.hook(HookPoint::FlushTableSynced)?;
                self.counters.flush_bytes.fetch_add(written.bytes, Ordering::Relaxed);
                self.counters.blocks_tried.fetch_add(written.blocks_tried, Ordering::Relaxed);
                self.counters.blocks_compressed.fetch_add(written.blocks_compressed, Ordering::Relaxed);
                Table::open(Arc::clone(&self.fs), &path, id, 0, self.cache.clone())?
                    .with_purger(self.purger.clone())
                    .with_file_xxh3(Some(written.file_xxh3))
                    .with_blobs(|bid| {
                        blob.clone().filter(|b| b.id == bid).ok_or_else(|| {
                            crate::error::corrupt(&path, 0, format!("references blob file {bid:016x}, not the flush's"))
                        })
                    })
            })();
            match res {
                Ok(t) => opened.push(Arc::new(t)),
                Err(e) => return Err(self.poison(e)),
            }
        }
        let mut vs = lock(&self.vstate);
        // Ingest may have discarded this memtable meanwhile.
        if !self.sv.load().sealed.last().is_some_and(|m| Arc::ptr_eq(m, &mem)) {
            drop(vs);
            if let Some(t) = opened.pop() {
                t.mark_obsolete();
                // The flush's own blob file: no other table references it.
                for b in &t.blobs {
                    b.mark_obsolete();
                }
            }
            return Ok(true);
        }
        let (_, seq_max) = mem.seq_range();
        let edit = Edit {
            added: opened
                .iter()
                .map(|t| Added { level: 0, id: t.id, seq_offset: 0, blob_offset: 0, file_xxh3: t.file_xxh3 })
                .collect(),
            marker: if self.opts.record_latest_marker_for_tests {
                lock(&self.write).last_marker
            } else {
                mem.markers().map(|(_, hi)| hi)
            },
            flushed_seq: has_data.then_some(seq_max),
            last_seq: has_data.then_some(seq_max),
            ..Edit::default()
        };
        let flushed = edit.flushed_seq;
        self.install(&mut vs, edit, &opened, |cur| {
            let mut sealed = cur.sealed.clone();
            let gone = sealed.pop();
            debug_assert!(gone.is_some_and(|g| Arc::ptr_eq(&g, &mem)));
            (Arc::clone(&cur.active), sealed)
        })?;
        if !has_data {
            // A memtable of markers alone leaves no table: the next memtable's
            // coverage starts where this one's did (nothing was written between).
            let sv = self.sv.load();
            sv.sealed.last().unwrap_or(&sv.active).extend_after(mem.after());
        }
        drop(vs);
        self.opts.hook(HookPoint::FlushInstalled).map_err(|e| self.poison(e))?;
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        if let (Some(wal), Some(s)) = (&self.wal, flushed) {
            wal.release_to(s + 1).map_err(|e| self.poison(wal_err("release WAL")(e)))?;
        }
        *retired = Some(mem);
        Ok(true)
    }

    fn live_views(&self) -> Vec<Seqno> {
        lock(&self.views).keys().copied().collect()
    }

    /// Marks the choice's tables as being compacted and returns them.
    fn claim(vs: &mut VersionState, v: &Version, c: Choice) -> (Choice, Vec<Arc<Table>>) {
        let ids: HashSet<TableId> = c.upper.iter().chain(c.lower.iter()).copied().collect();
        let tables = v.tables().filter(|(_, t)| ids.contains(&t.id)).map(|(_, t)| Arc::clone(t)).collect();
        vs.compacting.extend(ids);
        (c, tables)
    }

    /// Runs a claimed compaction, then releases its tables.
    fn run_claimed(&self, c: &Choice, tables: Vec<Arc<Table>>) -> Result<()> {
        lock(&self.bg).compactions_running += 1;
        let r = self.execute(c, tables);
        {
            let mut vs = lock(&self.vstate);
            for id in c.upper.iter().chain(c.lower.iter()) {
                vs.compacting.remove(id);
            }
        }
        lock(&self.bg).compactions_running -= 1;
        self.bg_cond.notify_all();
        r
    }

    /// A compaction's inputs as runs of tables that do not overlap, each
    /// sorted by key: every L0 table alone, and each deeper level's tables
    /// together (so a compaction reads one table of such a level at a time).
    fn runs(c: &Choice, inputs: &[Arc<Table>]) -> Vec<Vec<Arc<Table>>> {
        let of = |ids: &[TableId]| -> Vec<Arc<Table>> {
            let mut run: Vec<Arc<Table>> = inputs.iter().filter(|t| ids.contains(&t.id)).cloned().collect();
            run.sort_by(|a, b| a.props.smallest.cmp(&b.props.smallest));
            run
        };
        let mut runs =
            if c.level == 0 { of(&c.upper).into_iter().map(|t| vec![t]).collect() } else { vec![of(&c.upper)] };
        runs.push(of(&c.lower));
        runs.retain(|r| !r.is_empty());
        runs
    }

    /// Runs one chosen compaction to its install.
    fn execute(&self, c: &Choice, inputs: Vec<Arc<Table>>) -> Result<()> {
        let _span =
            tracing::info_span!("lsm_compaction", level = c.level, upper = c.upper.len(), lower = c.lower.len())
                .entered();
        if c.trivial_move {
            let t = &inputs[0];
            let edit = Edit {
                added: vec![Added {
                    level: c.output_level as u8,
                    id: t.id,
                    seq_offset: t.seq_offset,
                    blob_offset: t.blob_offset,
                    file_xxh3: t.file_xxh3,
                }],
                removed: vec![t.id],
                ..Edit::default()
            };
            let mut vs = lock(&self.vstate);
            self.install(&mut vs, edit, std::slice::from_ref(t), |cur| (Arc::clone(&cur.active), cur.sealed.clone()))?;
            self.counters.trivial_moves.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let views = self.live_views();
        let mut outputs: Vec<Output> = Vec::new();
        let mut alloc = || self.new_table_id();
        let mut alloc_blob = || self.new_blob_id();
        // The inputs' blob files, and those of them whose garbage share
        // reached the bound (live bytes counted over the whole version).
        let mut blobs: BTreeMap<BlobId, Arc<BlobFile>> =
            inputs.iter().flat_map(|t| t.blobs.iter()).map(|b| (b.id, Arc::clone(b))).collect();
        let gc = self.blob_gc_candidates(&blobs);
        let job = Job {
            fs: &*self.fs,
            views: &views,
            bottommost: c.bottommost,
            settings: self.settings(c.output_level),
            table_bytes_target: self.opts.table_bytes_target,
            readahead_bytes: self.opts.compaction_readahead_bytes,
            new_table: &mut alloc,
            blobs: &blobs,
            gc: &gc,
            new_blob: &mut alloc_blob,
            blob_compression: self.opts.blob_compression,
            skip_blob_sync: self.skip_blob_sync(),
        };
        let read: u64 = inputs.iter().map(|t| t.file_bytes).sum();
        let mut moved = None;
        let res = compaction::run(&Self::runs(c, &inputs), job, &mut outputs, &mut moved)
            .and_then(|()| {
                if let Some(m) = &moved {
                    self.counters.blob_gc_bytes.fetch_add(m.bytes, Ordering::Relaxed);
                    blobs.insert(m.id, self.open_blob(m.id)?);
                }
                Ok(())
            })
            .and_then(|()| self.sync_tables_dir())
            .and_then(|()| self.opts.hook(HookPoint::CompactionTablesWritten))
            .and_then(|()| {
                outputs
                    .iter()
                    .map(|o| {
                        let t = Table::open(Arc::clone(&self.fs), &o.path, o.id, 0, self.cache.clone())?
                            .with_purger(self.purger.clone())
                            .with_file_xxh3(Some(o.file_xxh3))
                            .with_blobs(|id| {
                                blobs.get(&id).cloned().ok_or_else(|| {
                                    crate::error::corrupt(&o.path, 0, format!("references unknown blob file {id:016x}"))
                                })
                            })?;
                        Ok(Arc::new(t))
                    })
                    .collect::<Result<Vec<_>>>()
            });
        let opened = match res {
            Ok(o) => o,
            Err(e) => return Err(self.poison(e)),
        };
        let written: u64 = outputs.iter().map(|o| o.bytes).sum();
        for o in &outputs {
            self.counters.blocks_tried.fetch_add(o.blocks.0, Ordering::Relaxed);
            self.counters.blocks_compressed.fetch_add(o.blocks.1, Ordering::Relaxed);
        }
        let edit = Edit {
            added: outputs
                .iter()
                .map(|o| Added {
                    level: c.output_level as u8,
                    id: o.id,
                    seq_offset: 0,
                    blob_offset: 0,
                    file_xxh3: Some(o.file_xxh3),
                })
                .collect(),
            removed: c.upper.iter().chain(c.lower.iter()).copied().collect(),
            ..Edit::default()
        };
        let mut vs = lock(&self.vstate);
        self.install(&mut vs, edit, &opened, |cur| (Arc::clone(&cur.active), cur.sealed.clone()))?;
        drop(vs);
        self.opts.hook(HookPoint::CompactionInstalled).map_err(|e| self.poison(e))?;
        self.counters.compactions.fetch_add(1, Ordering::Relaxed);
        self.counters.compaction_read_bytes.fetch_add(read, Ordering::Relaxed);
        self.counters.compaction_write_bytes.fetch_add(written, Ordering::Relaxed);
        Ok(())
    }

    /// Of `blobs`, the files at least `Options::blob_gc_garbage_percent`
    /// garbage: bytes of the file past its header that no table of the
    /// current version references.
    fn blob_gc_candidates(&self, blobs: &BTreeMap<BlobId, Arc<BlobFile>>) -> BTreeSet<BlobId> {
        let pct = u64::from(self.opts.blob_gc_garbage_percent);
        if blobs.is_empty() || pct >= 100 {
            return BTreeSet::new();
        }
        let live = &self.sv.load().version.blob_live;
        blobs
            .values()
            .filter(|b| {
                let total = b.bytes.saturating_sub(crate::blob::HEADER_BYTES);
                let garbage = total.saturating_sub(live.get(&b.id).copied().unwrap_or(0));
                garbage * 100 >= pct * total
            })
            .map(|b| b.id)
            .collect()
    }

    /// The tables of level 1 and below that a range tombstone in this version
    /// covers whole: every key of the table inside the tombstone's range and
    /// every entry older than it. A table's bounds include its own range
    /// tombstones' extents, so what those hide lies inside the covering
    /// tombstone's range, below its sequence number: it stays hidden. Not a
    /// table a compaction holds, and only under a tombstone that every read
    /// view sees (`oldest_view` is the oldest view's sequence number; an older
    /// view still reads the table). L0 is left alone: its tables' marker
    /// coverage makes deltas.
    fn covered_tables(v: &Version, compacting: &HashSet<TableId>, oldest_view: Option<Seqno>) -> Vec<TableId> {
        let tombstones: Vec<&RangeTombstone> = v
            .range_delete_tables()
            .flat_map(|t| t.range_dels.iter())
            .filter(|r| oldest_view.is_none_or(|s| s >= r.seq))
            .collect();
        if tombstones.is_empty() {
            return Vec::new();
        }
        v.tables()
            .filter(|(l, t)| *l >= 1 && !compacting.contains(&t.id))
            .filter(|(_, t)| {
                tombstones.iter().any(|r| {
                    r.seq > t.seq_max()
                        && r.start.as_ref() <= t.props.smallest.as_ref()
                        && t.props.largest.as_ref() < r.end.as_ref()
                })
            })
            .map(|(_, t)| t.id)
            .collect()
    }

    /// Drops, by one manifest edit and without reading them, the tables a
    /// newer range tombstone covers whole ([`Inner::covered_tables`]).
    fn drop_covered_once(&self) -> Result<bool> {
        let mut vs = lock(&self.vstate);
        let v = Arc::clone(&self.sv.load().version);
        let oldest_view =
            if self.opts.drop_covered_ignoring_views_for_tests { None } else { self.live_views().into_iter().min() };
        let ids = Self::covered_tables(&v, &vs.compacting, oldest_view);
        if ids.is_empty() {
            return Ok(false);
        }
        let bytes: u64 = v.tables().filter(|(_, t)| ids.contains(&t.id)).map(|(_, t)| t.file_bytes).sum();
        let n = ids.len() as u64;
        let edit = Edit { removed: ids, ..Edit::default() };
        self.install(&mut vs, edit, &[], |cur| (Arc::clone(&cur.active), cur.sealed.clone()))?;
        self.counters.covered_dropped.fetch_add(n, Ordering::Relaxed);
        tracing::debug!(tables = n, bytes, "dropped tables a range tombstone covers");
        Ok(true)
    }

    fn compact_once(&self) -> Result<bool> {
        if self.drop_covered_once()? {
            return Ok(true);
        }
        let picked = {
            let mut vs = lock(&self.vstate);
            let v = Arc::clone(&self.sv.load().version);
            choose::choose(&Self::summaries(&v), &vs.compacting, &self.choose_config())
                .map(|c| Self::claim(&mut vs, &v, c))
        };
        let Some((c, inputs)) = picked else { return Ok(false) };
        self.run_claimed(&c, inputs).map(|()| true)
    }

    fn run_inline(&self) -> Result<()> {
        while self.flush_one()? {}
        while self.compact_once()? {}
        Ok(())
    }

    fn flush_loop(&self) {
        loop {
            {
                let mut bg = lock(&self.bg);
                loop {
                    if bg.stop {
                        return;
                    }
                    if !self.is_poisoned.load(Ordering::Acquire) && !self.sv.load().sealed.is_empty() {
                        bg.flushing = true;
                        break;
                    }
                    // A timeout as well, so no missed notify can stall flushes for good.
                    bg = self.bg_cond.wait_timeout(bg, Duration::from_millis(200)).unwrap_or_else(|e| e.into_inner()).0;
                }
            }
            let mut retired = None;
            let r = self.flush_one_retiring(&mut retired);
            lock(&self.bg).flushing = false;
            self.bg_cond.notify_all();
            drop(retired);
            if let Err(e) = r {
                tracing::error!(error = %e, "flush failed");
            }
        }
    }

    fn compaction_loop(&self) {
        loop {
            {
                let mut bg = lock(&self.bg);
                if bg.stop {
                    return;
                }
                if self.is_poisoned.load(Ordering::Acquire) {
                    bg = self.bg_cond.wait(bg).unwrap_or_else(|e| e.into_inner());
                    drop(bg);
                    continue;
                }
            }
            match self.compact_once() {
                Ok(true) => continue,
                Ok(false) => {
                    let bg = lock(&self.bg);
                    if bg.stop {
                        return;
                    }
                    let seen = bg.installs;
                    let _ =
                        self.bg_cond.wait_timeout_while(bg, Duration::from_secs(1), |b| !b.stop && b.installs == seen);
                }
                Err(e) => tracing::error!(error = %e, "compaction failed"),
            }
        }
    }

    fn sync_loop(&self, every: Duration) {
        let mut bg = lock(&self.bg);
        while !bg.stop {
            bg = self.bg_cond.wait_timeout(bg, every).unwrap_or_else(|e| e.into_inner()).0;
            drop(bg);
            let _ = self.sync_wal();
            bg = lock(&self.bg);
        }
    }

    /// Seals the active memtable if it holds anything (a marker alone counts).
    fn seal_unless_empty(&self, w: &mut WriteState) -> Result<()> {
        let active = Arc::clone(&self.sv.load().active);
        if !active.is_empty() || active.markers().is_some() {
            self.seal(w)?;
        }
        Ok(())
    }

    fn wait_flushed(&self) -> Result<()> {
        if self.opts.background == Background::Inline {
            while self.flush_one()? {}
            return Ok(());
        }
        let mut bg = lock(&self.bg);
        loop {
            self.check_usable()?;
            if self.sv.load().sealed.is_empty() && !bg.flushing {
                return Ok(());
            }
            bg = self.bg_cond.wait_timeout(bg, Duration::from_millis(50)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn flush_all(&self) -> Result<()> {
        self.check_usable()?;
        self.seal_unless_empty(&mut lock(&self.write))?;
        self.wait_flushed()?;
        self.sync_wal()
    }

    fn wait_idle(&self) -> Result<()> {
        if self.opts.background == Background::Inline {
            return self.run_inline();
        }
        let mut bg = lock(&self.bg);
        loop {
            self.check_usable()?;
            let sv = self.sv.load();
            let work = !sv.sealed.is_empty()
                || bg.flushing
                || bg.compactions_running > 0
                || self.purger.as_ref().is_some_and(|p| !p.idle())
                || choose::choose(&Self::summaries(&sv.version), &HashSet::new(), &self.choose_config()).is_some()
                || !Self::covered_tables(&sv.version, &HashSet::new(), self.live_views().into_iter().min()).is_empty();
            drop(sv);
            if !work {
                return Ok(());
            }
            bg = self.bg_cond.wait_timeout(bg, Duration::from_millis(20)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Moves every table overlapping the range down, level by level, into the
    /// deepest level that holds data (L1 at least); the last step is a
    /// bottommost rewrite, which drops what no read view needs.
    fn compact_range(&self, lo: Bound<Bytes>, hi: Bound<Bytes>) -> Result<()> {
        let overlaps = |t: &TableSummary| overlaps_bounds(&lo, &hi, &t.smallest, &t.largest);
        let deepest = {
            let v = Arc::clone(&self.sv.load().version);
            v.levels.iter().rposition(|l| !l.is_empty()).unwrap_or(0).max(1)
        };
        for level in 0..deepest {
            loop {
                let picked = {
                    let mut vs = lock(&self.vstate);
                    let v = Arc::clone(&self.sv.load().version);
                    let sums = Self::summaries(&v);
                    let upper: Vec<TableId> = sums[level].iter().filter(|t| overlaps(t)).map(|t| t.id).collect();
                    if upper.is_empty() {
                        break;
                    }
                    choose::expand(&sums, level, upper, &vs.compacting, 0).map(|mut c| {
                        // A move into the bottom is rewritten, so that it drops tombstones.
                        c.trivial_move &= !c.bottommost;
                        Self::claim(&mut vs, &v, c)
                    })
                };
                match picked {
                    // A table involved is busy with a background compaction: wait for it.
                    None => std::thread::sleep(Duration::from_millis(5)),
                    Some((c, tables)) => {
                        self.run_claimed(&c, tables)?;
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    fn checkpoint(&self, dest: &Path) -> Result<CheckpointInfo> {
        let _span = tracing::info_span!("lsm_checkpoint", dest = %dest.display()).entered();
        self.flush_all()?;
        // What a range tombstone covers whole need not travel with the checkpoint.
        // One call drops every table covered now; dropping uncovers none.
        self.drop_covered_once()?;
        let vs = lock(&self.vstate);
        let v = Arc::clone(&self.sv.load().version);
        if self.fs.exists(dest).map_err(io("stat checkpoint", dest))? {
            return Err(Error::AlreadyExists { dir: dest.to_path_buf() });
        }
        // The manifest is written last: a checkpoint without one is
        // incomplete, and `Options::create_if_missing = false` refuses it.
        let tdir = dest.join(TABLES_DIR);
        self.fs.create_dir_all(&tdir).map_err(io("create checkpoint", &tdir))?;
        let parent = dest.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        self.fs.sync_dir(&parent).map_err(io("fsync checkpoint parent", &parent))?;
        self.fs.sync_dir(dest).map_err(io("fsync checkpoint", dest))?;
        let mut tables = Vec::new();
        for (_, t) in v.tables() {
            let name = table_file_name(t.id);
            let to = tdir.join(&name);
            self.fs.hard_link(t.path(), &to).map_err(io("link table into checkpoint", &to))?;
            tables.push(CheckpointTable { path: PathBuf::from(TABLES_DIR).join(name), xxh3: t.file_xxh3 });
        }
        let mut blob_files = Vec::new();
        for b in v.blobs.values() {
            let name = blob_file_name(b.id);
            let to = tdir.join(&name);
            self.fs.hard_link(b.path(), &to).map_err(io("link blob file into checkpoint", &to))?;
            blob_files.push(PathBuf::from(TABLES_DIR).join(name));
        }
        self.fs.sync_dir(&tdir).map_err(io("fsync checkpoint tables", &tdir))?;
        self.opts.hook(HookPoint::CheckpointLinked)?;
        let m = Manifest::create(
            Arc::clone(&self.fs),
            dest,
            self.opts.manifest_segment_bytes,
            self.opts.manifest_edits_per_snapshot,
            &v.full_edit(vs.next_table_id),
        )?;
        drop(m);
        self.fs.sync_dir(dest).map_err(io("fsync checkpoint", dest))?;
        self.opts.hook(HookPoint::CheckpointDone)?;
        Ok(CheckpointInfo { dir: dest.to_path_buf(), marker: v.marker, last_seq: v.last_seq, tables, blob_files })
    }

    fn delta_checkpoint(&self, dest: &Path, after: Option<Marker>) -> Result<Option<Delta>> {
        let _span = tracing::info_span!("lsm_delta_checkpoint", dest = %dest.display()).entered();
        if self.wal.is_some() {
            return Err(Error::WrongMode("deltas need embedded mode (markers)"));
        }
        self.flush_all()?;
        // Holding the version lock: no table compaction removes a table while it is linked.
        let _vs = lock(&self.vstate);
        let sv = self.sv.load_full();
        let Some(marker) = sv.version.marker else { return Ok(None) };
        if after >= Some(marker) {
            return Ok(None);
        }
        // Writes above the oldest memtable's start are in memtables, not
        // tables: up to there, the tables hold everything (memtables of
        // markers alone, flushed without a table, moved that start back).
        let tables_upto = sv.sealed.last().unwrap_or(&sv.active).after().min(Some(marker));
        let l0 = sv.version.levels.first().map(Vec::as_slice).unwrap_or_default();
        let picked = match crate::delta::chain(l0.iter().map(|t| (t.props.coverage(), t)), after, tables_upto) {
            Ok(p) => p,
            Err(why) => {
                tracing::debug!(?after, ?marker, why, "no delta: a full checkpoint is needed");
                return Ok(None);
            }
        };
        if self.fs.exists(dest).map_err(io("stat checkpoint", dest))? {
            return Err(Error::AlreadyExists { dir: dest.to_path_buf() });
        }
        self.fs.create_dir_all(dest).map_err(io("create checkpoint", dest))?;
        let parent = dest.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        self.fs.sync_dir(&parent).map_err(io("fsync checkpoint parent", &parent))?;
        let mut tables = Vec::new();
        let mut blobs = BTreeMap::new();
        for t in picked {
            let file = table_file_name(t.id);
            let to = dest.join(&file);
            self.fs.hard_link(t.path(), &to).map_err(io("link table into delta", &to))?;
            tables.push(DeltaTable { file, seq_offset: t.seq_offset, blob_offset: t.blob_offset });
            blobs.extend(t.blobs.iter().map(|b| (b.id, b)));
        }
        let mut blob_files = Vec::with_capacity(blobs.len());
        for (id, b) in blobs {
            let file = blob_file_name(id);
            let to = dest.join(&file);
            self.fs.hard_link(b.path(), &to).map_err(io("link blob file into delta", &to))?;
            blob_files.push(file);
        }
        let delta = Delta { after, marker, tables_upto, tables, blob_files };
        let p = dest.join(DELTA_FILE);
        let f = self.fs.open(&p, cairn_wal::OpenMode::CreateNew).map_err(io("create delta file", &p))?;
        f.write_all_at(&delta.encode(), 0).map_err(io("write delta file", &p))?;
        f.sync_data().map_err(io("fsync delta file", &p))?;
        drop(f);
        self.fs.sync_dir(dest).map_err(io("fsync checkpoint", dest))?;
        Ok(Some(delta))
    }

    fn check_delta(&self, delta: &Delta, paths: &[PathBuf], blob_paths: &[PathBuf]) -> Result<()> {
        let bad = |reason: String| Error::Delta { reason };
        if self.wal.is_some() {
            return Err(Error::WrongMode("deltas need embedded mode (markers)"));
        }
        if paths.len() != delta.tables.len() {
            return Err(bad(format!("{} files for {} tables", paths.len(), delta.tables.len())));
        }
        if blob_paths.len() != delta.blob_files.len() {
            return Err(bad(format!("{} files for {} blob files", blob_paths.len(), delta.blob_files.len())));
        }
        let given = delta_blob_ids(delta)?;
        let durable = self.sv.load().version.marker;
        if durable > Some(delta.marker) {
            return Err(bad(format!("this state ({durable:?}) is ahead of the delta ({:?})", delta.marker)));
        }
        let mut covs = Vec::with_capacity(paths.len());
        let mut last_max = None;
        for (p, t) in paths.iter().zip(&delta.tables) {
            let props = crate::table::read_props(&*self.fs, p)
                .map_err(|e| Error::Ingest { path: p.clone(), reason: e.to_string() })?;
            check_blob_refs(p, &props, t.blob_offset, |id| given.contains(&id))?;
            let seq_max = props.seq_max.saturating_add(t.seq_offset);
            if last_max.is_some_and(|l| seq_max > l) {
                return Err(bad(format!("{} is not listed newest first", p.display())));
            }
            last_max = Some(seq_max);
            covs.push((props.coverage(), ()));
        }
        // Every listed table is ingested (the chain may leave out one wholly inside a newer one: harmless).
        crate::delta::chain(covs, durable, delta.tables_upto.min(Some(delta.marker)))
            .map_err(|why| bad(format!("its tables do not bring this state from {durable:?}: {why}")))?;
        Ok(())
    }

    fn ingest_delta(&self, delta: &Delta, paths: &[PathBuf], blob_paths: &[PathBuf]) -> Result<()> {
        let _span =
            tracing::info_span!("lsm_ingest_delta", tables = paths.len(), blob_files = blob_paths.len()).entered();
        let tables: Vec<IngestTable> = paths
            .iter()
            .zip(&delta.tables)
            .map(|(p, t)| IngestTable { path: p.clone(), seq_offset: t.seq_offset, blob_offset: t.blob_offset })
            .collect();
        let blobs: Vec<(BlobId, PathBuf)> =
            delta_blob_ids(delta)?.into_iter().zip(blob_paths.iter().cloned()).collect();
        self.ingest(&tables, &blobs, IngestOptions::new().discard_memtables(true).marker(delta.marker), true)
    }

    /// Ingests `tables`, all shifted by one more sequence number offset
    /// above every local write, with the blob files `blobs` (`(id the
    /// tables' references name after their blob offset, path)`), which get
    /// ids of this engine. `delta`: the memtables must hold nothing above
    /// the new marker.
    fn ingest(&self, tables: &[IngestTable], blobs: &[(BlobId, PathBuf)], o: IngestOptions, delta: bool) -> Result<()> {
        let _span = tracing::info_span!("lsm_ingest", tables = tables.len(), blob_files = blobs.len()).entered();
        self.check_usable()?;
        if o.discard_memtables && self.wal.is_some() {
            return Err(Error::WrongMode("discard_memtables needs embedded mode (the WAL would bring them back)"));
        }
        if !o.discard_memtables {
            self.flush_all()?;
        }
        let mut w = lock(&self.write);
        if !o.discard_memtables {
            // Writes that arrived since the flush: flush them too, holding the write lock.
            self.seal_unless_empty(&mut w)?;
            self.wait_flushed()?;
        }
        if let (Some(m), Some(last)) = (o.marker, w.last_marker)
            && m < last
            && (delta || !o.discard_memtables)
        {
            return Err(Error::MarkerNotRising { given: m, last });
        }
        // Read each table's properties to learn its sequence numbers (with
        // the offset it already has).
        let mut ranges = Vec::new();
        let given: BTreeMap<BlobId, &PathBuf> = blobs.iter().map(|(id, p)| (*id, p)).collect();
        let mut used = BTreeMap::new();
        for t in tables {
            let p = &t.path;
            let props = crate::table::read_props(&*self.fs, p)
                .map_err(|e| Error::Ingest { path: p.clone(), reason: e.to_string() })?;
            check_blob_refs(p, &props, t.blob_offset, |id| given.contains_key(&id))?;
            used.extend(props.blob_refs.iter().map(|r| {
                let id = r.file.wrapping_add(t.blob_offset);
                (id, given[&id])
            }));
            let shifted = (props.seq_min.checked_add(t.seq_offset), props.seq_max.checked_add(t.seq_offset));
            let (Some(lo), Some(hi)) = shifted else {
                return Err(Error::Ingest { path: p.clone(), reason: "sequence numbers overflow".into() });
            };
            ranges.push((lo, hi));
        }
        // A delta may hold no table (markers alone since the state's own): it still sets the marker.
        let Some(seq_min) = ranges.iter().map(|r| r.0).min().or(delta.then_some(w.last_seq + 1)) else {
            return Ok(());
        };
        // One common offset above all local data: the order inside and
        // across the tables is kept.
        let offset = (w.last_seq + 1).saturating_sub(seq_min);
        let mut offsets: Vec<u64> = tables.iter().map(|t| t.seq_offset + offset).collect();
        if delta && self.opts.delta_shift_each_table_for_tests {
            // Each table on its own, one above the other in list order.
            let raw_min = ranges.iter().zip(tables).map(|(r, t)| r.0 - t.seq_offset).max().unwrap_or(0);
            let mut base = (w.last_seq + 1).max(raw_min);
            for ((o, r), t) in offsets.iter_mut().zip(&ranges).zip(tables) {
                *o = base - (r.0 - t.seq_offset);
                base += r.1 - r.0 + 1;
            }
        }
        let seq_max =
            ranges.iter().zip(&offsets).zip(tables).map(|((r, o), t)| r.1 - t.seq_offset + o).max().unwrap_or(0);
        let new_last = seq_max.max(w.last_seq);
        let (blob_shift, linked) = self.link_blob_files(&used)?;
        let mut opened = Vec::new();
        let mut added = Vec::new();
        for (t, off) in tables.iter().zip(&offsets) {
            let (id, to) = self.new_table_id();
            if self.fs.hard_link(&t.path, &to).is_err() {
                copy_file(&*self.fs, &t.path, &to)?;
            }
            let blob_offset = t.blob_offset.wrapping_add(blob_shift);
            let opened_table = Table::open(Arc::clone(&self.fs), &to, id, *off, self.cache.clone())?
                .with_purger(self.purger.clone())
                .with_blob_offset(blob_offset)
                .with_blobs(|b| {
                    linked.get(&b).cloned().ok_or_else(|| {
                        crate::error::corrupt(&to, 0, format!("references blob file {b:016x}, not ingested with it"))
                    })
                })?;
            added.push(Added { level: 0, id, seq_offset: *off, blob_offset, file_xxh3: None });
            opened.push(Arc::new(opened_table));
        }
        self.sync_tables_dir()?;
        self.opts.hook(HookPoint::IngestLinked)?;
        let mut vs = lock(&self.vstate);
        let edit =
            Edit { added, marker: o.marker, flushed_seq: Some(new_last), last_seq: Some(new_last), ..Edit::default() };
        let next_mem = w.next_mem_id;
        w.next_mem_id += 1;
        let next_after = match o.marker {
            Some(m) => Some(w.last_marker.map_or(m, |x| x.max(m))),
            None => w.last_marker,
        };
        self.install(&mut vs, edit, &opened, |cur| {
            if o.discard_memtables {
                let chunk = crate::memtable::arena_chunk_bytes(self.opts.write_buffer_bytes);
                (Arc::new(Memtable::new(next_mem, chunk, self.memtable_filter_bits(), next_after)), Vec::new())
            } else {
                (Arc::clone(&cur.active), cur.sealed.clone())
            }
        })?;
        drop(vs);
        w.last_seq = new_last;
        if let Some(m) = o.marker {
            w.last_marker = Some(w.last_marker.map_or(m, |x| x.max(m)));
        }
        self.visible_seq.store(new_last, Ordering::Release);
        drop(w);
        self.opts.hook(HookPoint::IngestInstalled)?;
        self.wake_background();
        if self.opts.background == Background::Inline {
            self.run_inline()?;
        }
        Ok(())
    }

    fn stats(&self) -> Stats {
        let sv = self.sv.load();
        let c = &self.counters;
        let user = c.user_bytes.load(Ordering::Relaxed);
        let flush = c.flush_bytes.load(Ordering::Relaxed);
        let cw = c.compaction_write_bytes.load(Ordering::Relaxed);
        let (hits, misses) = self.cache.counts();
        Stats {
            levels: sv
                .version
                .levels
                .iter()
                .map(|ts| LevelStats { tables: ts.len(), bytes: ts.iter().map(|t| t.file_bytes).sum() })
                .collect(),
            user_bytes: user,
            flush_bytes: flush,
            compaction_read_bytes: c.compaction_read_bytes.load(Ordering::Relaxed),
            compaction_write_bytes: cw,
            write_amplification: if user == 0 {
                0.0
            } else {
                let blobs = c.blob_flush_bytes.load(Ordering::Relaxed) + c.blob_gc_bytes.load(Ordering::Relaxed);
                (flush + cw + blobs) as f64 / user as f64
            },
            flushes: c.flushes.load(Ordering::Relaxed),
            compactions: c.compactions.load(Ordering::Relaxed),
            trivial_moves: c.trivial_moves.load(Ordering::Relaxed),
            covered_tables_dropped: c.covered_dropped.load(Ordering::Relaxed),
            stall_time: Duration::from_micros(c.stall_micros.load(Ordering::Relaxed)),
            slowdowns: c.slowdowns.load(Ordering::Relaxed),
            cache_hit_ratio: if hits + misses == 0 { 0.0 } else { hits as f64 / (hits + misses) as f64 },
            cache_bytes: self.cache.bytes(),
            memtable_bytes: std::iter::once(&sv.active)
                .chain(sv.sealed.iter())
                .map(|m| m.approximate_bytes() as u64)
                .sum(),
            sealed_memtables: sv.sealed.len(),
            table_memory_bytes: sv.version.tables().map(|(_, t)| t.memory_bytes() as u64).sum(),
            filter_bytes: self.cache.charged(),
            blocks_compression_tried: c.blocks_tried.load(Ordering::Relaxed),
            blocks_compressed: c.blocks_compressed.load(Ordering::Relaxed),
            blob_files: sv.version.blobs.len(),
            blob_bytes: sv.version.blobs.values().map(|b| b.bytes).sum(),
            blob_live_bytes: sv.version.blob_live.values().sum(),
            blob_flush_bytes: c.blob_flush_bytes.load(Ordering::Relaxed),
            blob_gc_bytes: c.blob_gc_bytes.load(Ordering::Relaxed),
        }
    }

    fn publish_metrics(&self, v: &Version) {
        for (l, ts) in v.levels.iter().enumerate() {
            let level = l.to_string();
            metrics::gauge!("cairn_lsm_level_tables", "level" => level.clone()).set(ts.len() as f64);
            metrics::gauge!("cairn_lsm_level_bytes", "level" => level)
                .set(ts.iter().map(|t| t.file_bytes).sum::<u64>() as f64);
        }
        if !v.blobs.is_empty() {
            metrics::gauge!("cairn_lsm_blob_bytes").set(v.blobs.values().map(|b| b.bytes).sum::<u64>() as f64);
            metrics::gauge!("cairn_lsm_blob_live_bytes").set(v.blob_live.values().sum::<u64>() as f64);
        }
        let c = &self.counters;
        metrics::gauge!("cairn_lsm_stall_seconds").set(c.stall_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let (h, m) = self.cache.counts();
        if h + m > 0 {
            metrics::gauge!("cairn_lsm_cache_hit_ratio").set(h as f64 / (h + m) as f64);
        }
    }
}

/// Bound on the span of the blob file ids one ingest brings (ids are drawn
/// from a counter that a table or blob file advances by one).
const BLOB_ID_SPAN_MAX: u64 = 1 << 40;

/// A table to ingest: its file and the offsets its sender adds to its
/// sequence numbers and (modulo 2^64) to its references' blob file ids.
struct IngestTable {
    path: PathBuf,
    seq_offset: u64,
    blob_offset: u64,
}

/// The ids of a delta's blob files (from their names, which decoding checked).
fn delta_blob_ids(delta: &Delta) -> Result<Vec<BlobId>> {
    delta
        .blob_files
        .iter()
        .map(|f| {
            parse_blob_file_name(f).ok_or_else(|| Error::Delta { reason: format!("`{f}` is not a blob file name") })
        })
        .collect()
}

/// Refuses a table to ingest whose references (their ids shifted by
/// `blob_offset`) name a blob file not `given`.
fn check_blob_refs(
    path: &Path,
    props: &crate::table::Props,
    blob_offset: u64,
    given: impl Fn(BlobId) -> bool,
) -> Result<()> {
    match props.blob_refs.iter().map(|r| r.file.wrapping_add(blob_offset)).find(|id| !given(*id)) {
        None => Ok(()),
        Some(id) => Err(Error::Ingest {
            path: path.to_path_buf(),
            reason: format!("it references values in blob file {id:016x}, which is not given with it"),
        }),
    }
}

fn copy_file(fs: &dyn Fs, from: &Path, to: &Path) -> Result<()> {
    let src = fs.open(from, cairn_wal::OpenMode::Read).map_err(io("open table to copy", from))?;
    let dst = fs.open(to, cairn_wal::OpenMode::CreateNew).map_err(io("create table copy", to))?;
    let len = src.len().map_err(io("stat table to copy", from))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = ((len - off) as usize).min(buf.len());
        src.read_exact_at(&mut buf[..n], off).map_err(io("read table to copy", from))?;
        dst.write_all_at(&buf[..n], off).map_err(io("write table copy", to))?;
        off += n as u64;
    }
    dst.sync_data().map_err(io("fsync table copy", to))?;
    Ok(())
}
