//! The log: group commit, segment cuts, release, and reads by position.

use std::future::Future;
use std::ops::{Bound, RangeBounds, RangeInclusive};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use crate::error::{Error, Result, io};
use crate::format::{
    self, SEGMENT_HEADER_BYTES, SegmentHeader, TERMINATOR, encode_record, frame_bytes, kind, new_salt, segment_name,
    segment_seed, spare_name,
};
use crate::fs::{Fs, FsFile, FsLock, parent_dir};
use crate::options::{Batch, Durability, Op, Pos, PrepareIn, SyncSite, UserKind, WalOptions};
use crate::prepare::{Prepared, Preparer, prepare};
use crate::read::{AlignedBuf, Records};
use crate::recover::{Access, IndexEntry, Marker, RecoveryReport, SegmentState, scan, truncate_index};

/// Initial capacity of a group's buffer.
const CHUNK_CAPACITY_BYTES: usize = 64 << 10;

/// The name of the lock file in a log directory.
pub const LOCK_FILE_NAME: &str = "LOCK";

/// A segmented, checksummed, append-only log. See the crate docs for the contract.
///
/// `Wal` is `Send + Sync`: share it (for example in an `Arc`) and call
/// [`Wal::write`] from many threads at once; concurrent writes share one fdatasync.
#[derive(Debug)]
pub struct Wal {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    opts: WalOptions,
    read_only: Option<&'static str>,
    state: Mutex<State>,
    cond: Condvar,
    /// Wakes a leader that waits for its group to grow.
    join_cond: Condvar,
    /// Wakes the committer thread (see [`Wal::write_async`]).
    commit_cond: Condvar,
    /// The committer thread, started by the first `write_async`.
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    stop_committer: AtomicBool,
    /// Touched only by the group-commit leader (one at a time).
    io: Mutex<Option<Io>>,
    /// Released segment files waiting to be recycled (at most `spare_segments_max`).
    spares: Arc<Mutex<Vec<PathBuf>>>,
    _lock: Option<Box<dyn FsLock>>,
}

struct Io {
    active: Arc<dyn FsFile>,
    active_path: PathBuf,
    preparer: Option<Preparer>,
}

impl std::fmt::Debug for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Io").field("active_path", &self.active_path).finish_non_exhaustive()
    }
}

/// The logical tail: where the next record goes, as accepted (not yet written).
#[derive(Debug)]
struct Encoder {
    seq: u64,
    seed: u32,
    offset: u64,
    header_end: u64,
    chain: u32,
    last_position: Option<u64>,
    metadata: Vec<u8>,
    state: Option<Vec<u8>>,
    marker: Option<Marker>,
    /// Whether a new segment's header repeats `marker` (see
    /// `WalOptions::repeats_marker`).
    repeat_marker: bool,
}

#[derive(Debug)]
struct Chunk {
    seq: u64,
    offset: u64,
    new_segment: Option<NewSegment>,
    bytes: Vec<u8>,
}

#[derive(Debug)]
struct NewSegment {
    first_position: u64,
    header_bytes: usize,
}

#[derive(Debug)]
enum IndexOp {
    Record { seq: u64, entry: IndexEntry },
    Truncate(u64),
    State(Vec<u8>),
    Marker { seq: u64, marker: Marker },
    Segment { seq: u64, seed: u32 },
}

/// Records accepted together and written by one leader with (at most) one fdatasync.
#[derive(Debug, Default)]
struct Group {
    ticket: u64,
    chunks: Vec<Chunk>,
    ops: Vec<IndexOp>,
    sync: bool,
    bytes: u64,
    records: u64,
    /// `submit` calls that joined the group.
    batches: u64,
}

#[derive(Debug)]
struct State {
    enc: Encoder,
    pending: Group,
    written_ticket: u64,
    durable_ticket: u64,
    leader_active: bool,
    /// A leader waits for writers to join its group.
    leader_gathering: bool,
    /// Batches in the last group written: how many writers to wait for.
    last_group_batches: u64,
    /// Tasks awaiting a [`WriteFuture`]: (group, durability, waker).
    wakers: Vec<(u64, Durability, Waker)>,
    /// The committer thread waits for work.
    committer_idle: bool,
    poisoned: Option<String>,
    segments: Vec<SegmentState>,
    state: Option<Vec<u8>>,
}

/// A batch queued by [`Wal::submit`], to be passed to [`Wal::wait`].
#[derive(Debug)]
#[must_use = "records are written only once some caller waits"]
pub struct Ticket {
    group: u64,
    durability: Durability,
    positions: Option<RangeInclusive<u64>>,
}

impl Ticket {
    /// The positions of the batch's user records (first and last), if it had any.
    pub fn positions(&self) -> Option<&RangeInclusive<u64>> {
        self.positions.as_ref()
    }
}

/// Segments a group created: (seq, path, file), in order.
type NewFiles = Vec<(u64, PathBuf, Arc<dyn FsFile>)>;

/// Records of one segment to read: (seq, seed, path, file, entries).
type Span = (u64, u32, PathBuf, Arc<dyn FsFile>, Vec<IndexEntry>);

/// Whether a new group-commit leader waits for writers to join its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gather {
    Yes,
    No,
}

/// A write queued by [`Wal::write_async`]; resolves when it is done.
#[derive(Debug)]
#[must_use = "futures do nothing unless awaited"]
pub struct WriteFuture {
    shared: Arc<Shared>,
    ticket: Ticket,
}

impl Future for WriteFuture {
    type Output = Result<Written>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = self.shared.lock_state();
        if let Some(p) = &st.poisoned {
            return Poll::Ready(Err(Error::Poisoned(p.clone())));
        }
        let t = &self.ticket;
        let done = match t.durability {
            Durability::Sync => st.durable_ticket >= t.group,
            Durability::Buffered => st.written_ticket >= t.group,
        };
        if done {
            return Poll::Ready(Ok(Written { positions: t.positions.clone() }));
        }
        if !st.wakers.iter().any(|(g, _, w)| *g == t.group && w.will_wake(cx.waker())) {
            st.wakers.push((t.group, t.durability, cx.waker().clone()));
        }
        Poll::Pending
    }
}

/// What a write did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// The positions of the batch's user records (first and last), if it had any.
    pub positions: Option<RangeInclusive<u64>>,
}

impl Encoder {
    fn chunk<'g>(&self, group: &'g mut Group) -> &'g mut Chunk {
        if group.chunks.last().is_none_or(|c| c.seq != self.seq) {
            let bytes = Vec::with_capacity(CHUNK_CAPACITY_BYTES);
            group.chunks.push(Chunk { seq: self.seq, offset: self.offset, new_segment: None, bytes });
        }
        let c = group.chunks.last_mut().expect("pushed above");
        debug_assert_eq!(c.offset + c.bytes.len() as u64, self.offset);
        c
    }

    /// Encodes one record into the group; returns where it went.
    fn put(&mut self, group: &mut Group, opts: &WalOptions, kind: u16, position: u64, payload: &[u8]) -> IndexEntry {
        let frame = frame_bytes(payload.len()) as u64;
        if self.offset > self.header_end && self.offset + frame > opts.segment_bytes_max {
            self.cut(group);
        }
        let (seed, chain) = (self.seed, self.chain);
        let offset = self.offset;
        let chunk = self.chunk(group);
        self.chain = encode_record(&mut chunk.bytes, seed, chain, kind, position, payload);
        self.offset += frame;
        group.bytes += frame;
        group.records += 1;
        IndexEntry { position, offset, frame_len: frame }
    }

    /// Starts a new segment whose header records repeat the metadata, the latest
    /// state and the latest snapshot marker.
    fn cut(&mut self, group: &mut Group) {
        let seq = self.seq + 1;
        let salt = new_salt(seq);
        let seed = segment_seed(seq, salt);
        let first_position = self.last_position.map_or(0, |p| p.saturating_add(1));
        let mut records = Vec::new();
        let mut chain = self.chain;
        chain = encode_record(&mut records, seed, chain, kind::METADATA, 0, &self.metadata);
        if let Some(s) = &self.state {
            chain = encode_record(&mut records, seed, chain, kind::STATE, 0, s);
        }
        group.ops.push(IndexOp::Segment { seq, seed });
        if let Some(m) = self.marker.as_ref().filter(|_| self.repeat_marker) {
            chain = encode_record(&mut records, seed, chain, kind::SNAPSHOT_MARKER, m.position, &m.payload);
            group.ops.push(IndexOp::Marker { seq, marker: m.clone() });
        }
        let header = SegmentHeader {
            seq,
            first_position,
            salt,
            prev_chain: self.chain,
            header_records_bytes: u32::try_from(records.len()).expect("header records fit in u32"),
        };
        let mut bytes = Vec::with_capacity(SEGMENT_HEADER_BYTES + records.len());
        header.encode(&mut bytes);
        bytes.extend_from_slice(&records);
        let header_bytes = bytes.len();
        group.bytes += header_bytes as u64;
        group.chunks.push(Chunk {
            seq,
            offset: 0,
            new_segment: Some(NewSegment { first_position, header_bytes }),
            bytes,
        });
        self.seq = seq;
        self.seed = seed;
        self.offset = header_bytes as u64;
        self.header_end = header_bytes as u64;
        self.chain = chain;
    }

    /// Checks a batch without changing anything; returns the user positions it will take.
    fn check(&self, batch: &Batch) -> Result<Option<RangeInclusive<u64>>> {
        let mut last = self.last_position;
        let (mut first_user, mut last_user) = (None, None);
        for op in &batch.ops {
            match op {
                Op::User { pos, .. } => {
                    let p = match *pos {
                        Pos::At(p) => p,
                        Pos::Next => match last {
                            None => 0,
                            Some(l) => l.checked_add(1).ok_or(Error::PositionNotRising { position: l, last: l })?,
                        },
                    };
                    if let Some(l) = last
                        && p <= l
                    {
                        return Err(Error::PositionNotRising { position: p, last: l });
                    }
                    first_user.get_or_insert(p);
                    last_user = Some(p);
                    last = Some(p);
                }
                Op::Truncate { position } => last = last.min(position.checked_sub(1)),
                Op::State { .. } | Op::Marker { .. } => {}
            }
        }
        Ok(first_user.zip(last_user).map(|(a, b)| a..=b))
    }

    fn encode(&mut self, group: &mut Group, opts: &WalOptions, batch: &Batch) {
        // Room for every frame and the terminator, so the group's buffer is not
        // copied again as it grows.
        let need = batch.buf.len() + batch.ops.len() * (format::RECORD_HEADER_BYTES + format::ALIGN) + format::ALIGN;
        self.chunk(group).bytes.reserve(need);
        group.batches += 1;
        for op in &batch.ops {
            match op {
                Op::User { kind, pos, payload } => {
                    let position = match *pos {
                        Pos::At(p) => p,
                        Pos::Next => self.last_position.map_or(0, |l| l + 1),
                    };
                    let entry = self.put(group, opts, kind.stored(), position, batch.payload(payload));
                    self.last_position = Some(position);
                    group.ops.push(IndexOp::Record { seq: self.seq, entry });
                }
                Op::State { payload } => {
                    let bytes = batch.payload(payload);
                    self.put(group, opts, kind::STATE, 0, bytes);
                    self.state = Some(bytes.to_vec());
                    group.ops.push(IndexOp::State(bytes.to_vec()));
                }
                Op::Marker { position, payload } => {
                    let bytes = batch.payload(payload);
                    self.put(group, opts, kind::SNAPSHOT_MARKER, *position, bytes);
                    let marker = Marker { position: *position, payload: bytes.to_vec() };
                    self.marker = Some(marker.clone());
                    group.ops.push(IndexOp::Marker { seq: self.seq, marker });
                }
                Op::Truncate { position } => {
                    self.put(group, opts, kind::TRUNCATE, *position, &[]);
                    self.last_position = self.last_position.min(position.checked_sub(1));
                    group.ops.push(IndexOp::Truncate(*position));
                }
            }
        }
    }
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    fn new(
        fs: Arc<dyn Fs>,
        dir: PathBuf,
        opts: WalOptions,
        read_only: Option<&'static str>,
        enc: Encoder,
        segments: Vec<SegmentState>,
        state: Option<Vec<u8>>,
        io: Option<Io>,
        spares: Arc<Mutex<Vec<PathBuf>>>,
        lock: Option<Box<dyn FsLock>>,
    ) -> Shared {
        Shared {
            fs,
            dir,
            opts,
            read_only,
            state: Mutex::new(State {
                enc,
                pending: Group { ticket: 1, ..Group::default() },
                written_ticket: 0,
                durable_ticket: 0,
                leader_active: false,
                leader_gathering: false,
                last_group_batches: 0,
                wakers: Vec::new(),
                committer_idle: false,
                poisoned: None,
                segments,
                state,
            }),
            cond: Condvar::new(),
            join_cond: Condvar::new(),
            commit_cond: Condvar::new(),
            committer: Mutex::new(None),
            stop_committer: AtomicBool::new(false),
            io: Mutex::new(io),
            spares,
            _lock: lock,
        }
    }

    fn sync_file(&self, site: SyncSite, file: &dyn FsFile, path: &Path) -> Result<()> {
        #[cfg(feature = "sim")]
        if self.opts.skip_sync_for_tests == Some(site) {
            return Ok(());
        }
        let t = Instant::now();
        file.sync_data().map_err(io("fdatasync", path))?;
        self.note_sync(site, t);
        Ok(())
    }

    fn sync_dir(&self, site: SyncSite, dir: &Path) -> Result<()> {
        #[cfg(feature = "sim")]
        if self.opts.skip_sync_for_tests == Some(site) {
            return Ok(());
        }
        let t = Instant::now();
        self.fs.sync_dir(dir).map_err(io("fsync directory", dir))?;
        self.note_sync(site, t);
        Ok(())
    }

    fn note_sync(&self, site: SyncSite, t: Instant) {
        let took = t.elapsed();
        metrics::histogram!("cairn_wal_fsync_seconds").record(took.as_secs_f64());
        if took > self.opts.slow_sync_warning {
            tracing::warn!(?site, took_ms = took.as_millis() as u64, dir = %self.dir.display(), "slow fsync");
        }
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; the state it guards is still
        // consistent enough to report errors, so take it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes one group: its chunks in order (cutting segments where they say),
    /// then one fdatasync if any member asked for it.
    fn run_group(&self, io: &mut Io, group: &Group) -> Result<NewFiles> {
        let mut new_segments = Vec::new();
        for chunk in &group.chunks {
            match &chunk.new_segment {
                None => {
                    io.active.write_all_at(&chunk.bytes, chunk.offset).map_err(io_err("append", &io.active_path))?;
                }
                Some(ns) => {
                    let _span = tracing::debug_span!("cut", seq = chunk.seq).entered();
                    self.sync_file(SyncSite::CutOldSegment, &*io.active, &io.active_path)?;
                    let prepared = match &mut io.preparer {
                        Some(p) => p.take(chunk.seq)?,
                        None => self.prepare_now(chunk.seq)?,
                    };
                    let mut header = chunk.bytes[..ns.header_bytes].to_vec();
                    header.extend_from_slice(&TERMINATOR);
                    let path = self.install_segment(prepared, &header, chunk.seq, ns.first_position)?;
                    let file = Arc::clone(&path.1);
                    file.write_all_at(&chunk.bytes[ns.header_bytes..], ns.header_bytes as u64)
                        .map_err(io_err("append", &path.0))?;
                    io.active = Arc::clone(&file);
                    io.active_path = path.0.clone();
                    new_segments.push((chunk.seq, path.0, file));
                    tracing::debug!(seq = chunk.seq, first_position = ns.first_position, "cut to a new segment");
                }
            }
        }
        metrics::counter!("cairn_wal_written_bytes_total").increment(group.bytes);
        if group.sync {
            self.sync_file(SyncSite::AppendData, &*io.active, &io.active_path)?;
        }
        Ok(new_segments)
    }

    /// Takes the pending group, writes it without holding the state lock, then
    /// installs its index changes and wakes the waiters.
    fn lead<'a>(&'a self, mut st: MutexGuard<'a, State>, gather: Gather) -> Result<MutexGuard<'a, State>> {
        let sh = self;
        st.leader_active = true;
        // When the last group had many writers, give as many a moment to join
        // this one (they are waking up from the last fsync): one fdatasync then
        // serves them all, instead of a group of one followed by a large one.
        // A lone writer never waits.
        if gather == Gather::Yes && st.last_group_batches > 1 && !sh.opts.group_commit_wait.is_zero() {
            let deadline = Instant::now() + sh.opts.group_commit_wait;
            st.leader_gathering = true;
            while st.pending.batches < st.last_group_batches {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                st = sh.join_cond.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
            }
            st.leader_gathering = false;
        }
        st.last_group_batches = st.pending.batches;
        let next = Group { ticket: st.pending.ticket + 1, ..Group::default() };
        let mut group = std::mem::replace(&mut st.pending, next);
        drop(st);
        // Each write ends with a zero word, overwritten by the next write: the log
        // always has a clean end, even in a recycled file.
        for c in &mut group.chunks {
            c.bytes.extend_from_slice(&TERMINATOR);
        }
        let result = {
            let mut io = sh.io.lock().unwrap_or_else(|e| e.into_inner());
            let io = io.as_mut().expect("a writable log has its I/O state");
            sh.run_group(io, &group)
        };
        metrics::histogram!("cairn_wal_group_commit_records").record(group.records as f64);
        let mut st = sh.lock_state();
        st.leader_active = false;
        match result {
            Ok(files) => {
                st.apply(group.ops, files);
                st.written_ticket = group.ticket;
                if group.sync {
                    st.durable_ticket = group.ticket;
                }
                st.wake_tasks(false);
                sh.cond.notify_all();
                sh.commit_cond.notify_one();
                Ok(st)
            }
            Err(e) => {
                tracing::error!(error = %e, dir = %sh.dir.display(), "log write failed; the log is poisoned");
                st.poisoned = Some(e.to_string());
                st.wake_tasks(true);
                sh.cond.notify_all();
                Err(e)
            }
        }
    }

    fn prepare_now(&self, seq: u64) -> Result<Prepared> {
        prepare(&*self.fs, &self.dir, seq, self.opts.preparation, self.opts.segment_bytes_max, &self.spares)
    }

    /// Writes a prepared segment's header, syncs it, renames it into place and
    /// syncs the directory: a segment under its final name always has a valid header.
    fn install_segment(&self, p: Prepared, header: &[u8], seq: u64, first: u64) -> Result<(PathBuf, Arc<dyn FsFile>)> {
        p.file.write_all_at(header, 0).map_err(io("write segment header", &p.path))?;
        self.sync_file(SyncSite::NewSegmentHeader, &*p.file, &p.path)?;
        let path = self.dir.join(segment_name(seq, first));
        self.fs.rename(&p.path, &path).map_err(io("rename segment into place", &path))?;
        self.sync_dir(SyncSite::DirAfterRename, &self.dir)?;
        Ok((path, Arc::from(p.file)))
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    io(op, path.to_path_buf())
}

impl State {
    /// Wakes the tasks whose writes are done (or all of them, after a failure).
    fn wake_tasks(&mut self, all: bool) {
        let (written, durable) = (self.written_ticket, self.durable_ticket);
        self.wakers.retain(|(group, d, w)| {
            let done = all
                || match d {
                    Durability::Sync => *group <= durable,
                    Durability::Buffered => *group <= written,
                };
            if done {
                w.wake_by_ref();
            }
            !done
        });
    }

    fn check_usable(&self, read_only: Option<&'static str>) -> Result<()> {
        if let Some(p) = &self.poisoned {
            return Err(Error::Poisoned(p.clone()));
        }
        if let Some(why) = read_only {
            return Err(Error::ReadOnly(why));
        }
        Ok(())
    }

    fn apply(&mut self, ops: Vec<IndexOp>, mut files: NewFiles) {
        files.reverse();
        for op in ops {
            match op {
                IndexOp::Record { seq, entry } => {
                    let seg = self.segments.last_mut().expect("a log has a segment");
                    assert_eq!(seg.seq, seq, "records land in the newest segment");
                    debug_assert!(seg.records.last().is_none_or(|r| r.position < entry.position));
                    seg.records.push(entry);
                }
                IndexOp::Truncate(p) => truncate_index(&mut self.segments, p),
                IndexOp::State(s) => self.state = Some(s),
                IndexOp::Marker { seq, marker } => {
                    let seg = self.segments.iter_mut().rev().find(|s| s.seq == seq);
                    seg.expect("marker's segment is installed first").markers.push(marker);
                }
                IndexOp::Segment { seq, seed } => {
                    let (fseq, path, file) = files.pop().expect("one file per new segment");
                    assert_eq!(fseq, seq);
                    self.segments.push(SegmentState {
                        seq,
                        seed,
                        path,
                        file,
                        records: Vec::new(),
                        markers: Vec::new(),
                    });
                }
            }
        }
        metrics::gauge!("cairn_wal_segments").set(self.segments.len() as f64);
    }

    fn first_position(&self) -> Option<u64> {
        self.segments.iter().find_map(|s| s.records.first()).map(|r| r.position)
    }

    fn last_position(&self) -> Option<u64> {
        self.segments.iter().rev().find_map(|s| s.records.last()).map(|r| r.position)
    }
}

impl Wal {
    /// Creates a new log in `dir` (created if missing) whose every segment
    /// carries `metadata`. Fails if a log already exists there.
    pub fn create(fs: Arc<dyn Fs>, dir: impl AsRef<Path>, opts: WalOptions, metadata: &[u8]) -> Result<Wal> {
        let dir = dir.as_ref().to_path_buf();
        let max = opts.record_bytes_max.min(format::PAYLOAD_BYTES_MAX);
        if metadata.len() as u64 > max {
            return Err(Error::RecordTooLarge { len: metadata.len() as u64, max });
        }
        let mut made = Vec::new();
        let mut p = dir.clone();
        while !fs.exists(&p).map_err(io("stat log directory", &p))? {
            made.push(p.clone());
            p = parent_dir(&p);
        }
        fs.create_dir_all(&dir).map_err(io("create log directory", &dir))?;
        let lock = lock_dir(&*fs, &dir)?;
        let listing = crate::recover::list_dir(&*fs, &dir)?;
        if !listing.segments.is_empty() {
            return Err(Error::AlreadyExists { dir });
        }
        for t in listing.prepared {
            fs.remove_file(&t).map_err(io("remove stray prepared segment", &t))?;
        }
        let enc = Encoder {
            seq: 0,
            seed: 0,
            offset: 0,
            header_end: 0,
            chain: 0,
            last_position: None,
            metadata: metadata.to_vec(),
            state: None,
            marker: None,
            repeat_marker: opts.repeats_marker(),
        };
        let spares = Arc::new(Mutex::new(listing.spares));
        let shared =
            Shared::new(Arc::clone(&fs), dir.clone(), opts.clone(), None, enc, Vec::new(), None, None, spares, None);
        // Every directory made here must survive a crash: sync each one's parent, top down.
        for m in made.iter().rev() {
            shared.sync_dir(SyncSite::DirAfterCreate, &parent_dir(m))?;
        }
        let mut header = Vec::new();
        let salt = new_salt(0);
        let seed = segment_seed(0, salt);
        let mut records = Vec::new();
        encode_record(&mut records, seed, 0, kind::METADATA, 0, metadata);
        SegmentHeader {
            seq: 0,
            first_position: 0,
            salt,
            prev_chain: 0,
            header_records_bytes: u32::try_from(records.len())
                .map_err(|_| Error::RecordTooLarge { len: metadata.len() as u64, max: u64::from(u32::MAX) })?,
        }
        .encode(&mut header);
        header.extend_from_slice(&records);
        header.extend_from_slice(&TERMINATOR);
        let prepared = shared.prepare_now(0)?;
        shared.install_segment(prepared, &header, 0, 0)?;
        drop(shared);
        Self::open_locked(fs, dir, opts, lock).map(|(wal, _)| wal)
    }

    /// Opens the log in `dir` for appending, recovering as `opts.recovery` says.
    /// Takes an exclusive lock on the directory (`Error::Locked` if another holds it).
    pub fn open(fs: Arc<dyn Fs>, dir: impl AsRef<Path>, opts: WalOptions) -> Result<(Wal, RecoveryReport)> {
        let dir = dir.as_ref().to_path_buf();
        if !fs.exists(&dir).map_err(io("stat log directory", &dir))? {
            return Err(Error::NotFound { dir });
        }
        let lock = lock_dir(&*fs, &dir)?;
        Self::open_locked(fs, dir, opts, lock)
    }

    /// Opens the log or, if the directory holds none, creates it with `metadata`.
    pub fn open_or_create(
        fs: Arc<dyn Fs>,
        dir: impl AsRef<Path>,
        opts: WalOptions,
        metadata: &[u8],
    ) -> Result<(Wal, RecoveryReport)> {
        match Self::open(Arc::clone(&fs), dir.as_ref(), opts.clone()) {
            Err(Error::NotFound { .. }) => Ok((Self::create(fs, dir, opts, metadata)?, RecoveryReport::default())),
            other => other,
        }
    }

    /// Opens the log read-only, without the lock, for backup tools: works while
    /// another process appends (a tail still being written reads as a torn tail
    /// and is left alone). Files are held open, so segments the writer unlinks
    /// meanwhile stay readable through this handle; a segment the writer
    /// recycles meanwhile fails its checks on read (an error, never wrong data):
    /// copy promptly, or give the writer `spare_segments_max = 0`.
    pub fn open_read_only(fs: Arc<dyn Fs>, dir: impl AsRef<Path>, opts: WalOptions) -> Result<(Wal, RecoveryReport)> {
        let dir = dir.as_ref().to_path_buf();
        let s = scan(&*fs, &dir, opts.recovery, Access::ReadOnly)?;
        Self::from_scan(fs, dir, opts, None, s, Some("opened with open_read_only"))
    }

    fn open_locked(
        fs: Arc<dyn Fs>,
        dir: PathBuf,
        opts: WalOptions,
        lock: Box<dyn FsLock>,
    ) -> Result<(Wal, RecoveryReport)> {
        let _span = tracing::info_span!("wal_open", dir = %dir.display()).entered();
        let s = scan(&*fs, &dir, opts.recovery, Access::Write)?;
        let read_only = s.report.stopped_at.as_ref().map(|_| "point-in-time recovery stopped at damage");
        let r = Self::from_scan(fs, dir, opts, Some(lock), s, read_only)?;
        tracing::info!(
            segments = r.1.segments_read,
            records = r.1.records_read,
            torn_tail = r.1.torn_tail.is_some(),
            "opened log"
        );
        Ok(r)
    }

    fn from_scan(
        fs: Arc<dyn Fs>,
        dir: PathBuf,
        opts: WalOptions,
        lock: Option<Box<dyn FsLock>>,
        s: crate::recover::Scan,
        read_only: Option<&'static str>,
    ) -> Result<(Wal, RecoveryReport)> {
        let last = s.segments.last().expect("scan returns at least one segment");
        let mut spares = s.spares;
        if read_only.is_none() {
            while spares.len() > opts.spare_segments_max {
                // The oldest go first: a kept prepared segment is the last.
                let extra = spares.remove(0);
                fs.remove_file(&extra).map_err(io("remove extra spare segment", &extra))?;
            }
        }
        let spares = Arc::new(Mutex::new(spares));
        let io = if read_only.is_none() {
            let preparer = match opts.prepare_in {
                PrepareIn::Background => Some(Preparer::start(
                    Arc::clone(&fs),
                    dir.clone(),
                    opts.preparation,
                    opts.segment_bytes_max,
                    last.seq + 1,
                    Arc::clone(&spares),
                )?),
                PrepareIn::Foreground => None,
            };
            Some(Io { active: Arc::clone(&last.file), active_path: last.path.clone(), preparer })
        } else {
            None
        };
        let enc = Encoder {
            seq: last.seq,
            seed: last.seed,
            offset: s.tail_offset,
            header_end: s.tail_header_end,
            chain: s.chain,
            last_position: s.last_position,
            metadata: s.metadata,
            state: s.state.clone(),
            marker: s.marker,
            repeat_marker: opts.repeats_marker(),
        };
        metrics::gauge!("cairn_wal_segments").set(s.segments.len() as f64);
        let shared = Shared::new(fs, dir, opts, read_only, enc, s.segments, s.state, io, spares, lock);
        Ok((Wal { shared: Arc::new(shared) }, s.report))
    }

    /// Appends a batch. With [`Durability::Sync`], returns once every record of
    /// the batch is durable; concurrent callers share one fdatasync (group
    /// commit), and each caller's records keep its order. Positions are checked
    /// before anything is written: a refused batch writes nothing.
    pub fn write(&self, batch: &Batch, durability: Durability) -> Result<Written> {
        let ticket = self.submit(batch, durability)?;
        self.wait(ticket)
    }

    /// The first half of [`Wal::write`]: checks the batch and queues it for the
    /// next group commit, without waiting. The log's order of records is the
    /// order of `submit` calls, so a caller that assigns positions under its own
    /// lock calls `submit` under that lock and [`Wal::wait`] after releasing it:
    /// the fdatasync is then shared by every caller. Records are written only
    /// once some caller waits: wait on every ticket.
    pub fn submit(&self, batch: &Batch, durability: Durability) -> Result<Ticket> {
        let sh = &*self.shared;
        batch.check_sizes(sh.opts.record_bytes_max)?;
        let mut st = sh.lock_state();
        st.check_usable(sh.read_only)?;
        // Backpressure: a full pending group is written before more joins it.
        while st.pending.bytes >= sh.opts.pending_bytes_max {
            st = if st.leader_active {
                sh.cond.wait(st).unwrap_or_else(|e| e.into_inner())
            } else {
                sh.lead(st, Gather::No)?
            };
            st.check_usable(sh.read_only)?;
        }
        let positions = st.enc.check(batch)?;
        let State { enc, pending, .. } = &mut *st;
        enc.encode(pending, &sh.opts, batch);
        pending.sync |= durability == Durability::Sync;
        // Wake a gathering leader only once its group is as large as it waits for.
        if st.leader_gathering && st.pending.batches >= st.last_group_batches {
            sh.join_cond.notify_one();
        }
        let pending = &st.pending;
        Ok(Ticket { group: pending.ticket, durability, positions })
    }

    /// Appends a batch from async code: queues it like [`Wal::submit`] and
    /// returns a future that resolves when the batch is written (and durable,
    /// for `Sync`). A committer thread, started on first use, leads the group
    /// commits, so waiting costs a task wake-up rather than a thread switch:
    /// this is how many tasks share one fdatasync cheaply. The call itself may
    /// block briefly when the pending group is full (backpressure).
    pub fn write_async(&self, batch: &Batch, durability: Durability) -> Result<WriteFuture> {
        self.start_committer()?;
        let ticket = self.submit(batch, durability)?;
        if self.shared.lock_state().committer_idle {
            self.shared.commit_cond.notify_one();
        }
        Ok(WriteFuture { shared: Arc::clone(&self.shared), ticket })
    }

    fn start_committer(&self) -> Result<()> {
        let mut c = self.shared.committer.lock().unwrap_or_else(|e| e.into_inner());
        if c.is_some() {
            return Ok(());
        }
        let sh = Arc::clone(&self.shared);
        let handle = std::thread::Builder::new()
            .name("cairn-wal-commit".into())
            .spawn(move || {
                let mut st = sh.lock_state();
                while !sh.stop_committer.load(Ordering::Acquire) {
                    let work = st.pending.batches > 0 || st.pending.sync || !st.pending.chunks.is_empty();
                    if work && !st.leader_active && st.poisoned.is_none() {
                        st = match sh.lead(st, Gather::Yes) {
                            Ok(st) => st,
                            Err(_) => sh.lock_state(),
                        };
                    } else {
                        st.committer_idle = true;
                        st = sh.commit_cond.wait(st).unwrap_or_else(|e| e.into_inner());
                        st.committer_idle = false;
                    }
                }
            })
            .map_err(io("spawn committer thread", "cairn-wal-commit"))?;
        *c = Some(handle);
        Ok(())
    }

    /// The second half of [`Wal::write`]: waits until the submitted batch is
    /// written (and durable, for `Sync`), leading the group commit if no one is.
    pub fn wait(&self, ticket: Ticket) -> Result<Written> {
        let st = self.shared.lock_state();
        self.wait_for(st, ticket.group, ticket.durability)?;
        Ok(Written { positions: ticket.positions })
    }

    /// Waits until group `ticket` is written (and durable, for `Sync`), leading
    /// the group commit when no one else does.
    fn wait_for<'a>(&'a self, mut st: MutexGuard<'a, State>, ticket: u64, durability: Durability) -> Result<()> {
        let sh = &*self.shared;
        loop {
            if let Some(p) = &st.poisoned {
                return Err(Error::Poisoned(p.clone()));
            }
            let done = match durability {
                Durability::Sync => st.durable_ticket >= ticket,
                Durability::Buffered => st.written_ticket >= ticket,
            };
            if done {
                return Ok(());
            }
            if !st.leader_active && st.pending.ticket == ticket {
                st = sh.lead(st, Gather::Yes)?;
            } else {
                st = sh.cond.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    /// Appends one user record at `position` and waits until it is durable.
    pub fn append(&self, kind: UserKind, position: u64, payload: &[u8]) -> Result<()> {
        let mut b = Batch::new();
        b.append(kind, position, payload);
        self.write(&b, Durability::Sync).map(|_| ())
    }

    /// Appends one user record at the next position (assigned by the log),
    /// waits until it is durable, and returns the position.
    pub fn append_next(&self, kind: UserKind, payload: &[u8]) -> Result<u64> {
        let mut b = Batch::new();
        b.append_next(kind, payload);
        let w = self.write(&b, Durability::Sync)?;
        Ok(*w.positions.expect("one user record").start())
    }

    /// Durably sets the state record.
    pub fn set_state(&self, state: &[u8]) -> Result<()> {
        let mut b = Batch::new();
        b.set_state(state);
        self.write(&b, Durability::Sync).map(|_| ())
    }

    /// Durably appends a snapshot marker.
    pub fn snapshot_marker(&self, position: u64, payload: &[u8]) -> Result<()> {
        let mut b = Batch::new();
        b.snapshot_marker(position, payload);
        self.write(&b, Durability::Sync).map(|_| ())
    }

    /// Durably drops every record at or above `position`.
    pub fn truncate_from(&self, position: u64) -> Result<()> {
        let mut b = Batch::new();
        b.truncate_from(position);
        self.write(&b, Durability::Sync).map(|_| ())
    }

    /// Makes every record written so far durable.
    pub fn sync(&self) -> Result<()> {
        let sh = &*self.shared;
        let mut st = sh.lock_state();
        st.check_usable(sh.read_only)?;
        st.pending.sync = true;
        let ticket = st.pending.ticket;
        self.wait_for(st, ticket, Durability::Sync)
    }

    /// Cuts to a new segment now (durably), even if the current one is not full.
    pub fn cut(&self) -> Result<()> {
        let sh = &*self.shared;
        let mut st = sh.lock_state();
        st.check_usable(sh.read_only)?;
        let State { enc, pending, .. } = &mut *st;
        enc.cut(pending);
        pending.sync = true;
        let ticket = pending.ticket;
        self.wait_for(st, ticket, Durability::Sync)
    }

    /// Removes the segments whose user records all lie below `position` (never
    /// the newest segment). Returns how many were removed.
    ///
    /// The state and the latest snapshot marker survive: every segment's header
    /// records repeat them. A caller that replays from a snapshot marker writes
    /// that marker before releasing the log below it.
    pub fn release_to(&self, position: u64) -> Result<usize> {
        let sh = &*self.shared;
        let removed: Vec<SegmentState> = {
            let mut st = sh.lock_state();
            st.check_usable(sh.read_only)?;
            let n = st.segments.len();
            let k = st.segments[..n - 1]
                .iter()
                .take_while(|s| s.records.last().is_none_or(|r| r.position < position))
                .count();
            let removed = st.segments.drain(..k).collect();
            metrics::gauge!("cairn_wal_segments").set(st.segments.len() as f64);
            removed
        };
        if removed.is_empty() {
            return Ok(0);
        }
        // Spares join the pool only after the directory fsync: a spare recycled
        // before its rename is durable could come back under its old segment name
        // holding a new header.
        let room = sh.opts.spare_segments_max.saturating_sub(sh.spares.lock().unwrap_or_else(|e| e.into_inner()).len());
        let mut new_spares = Vec::new();
        for seg in &removed {
            if new_spares.len() < room {
                let spare = sh.dir.join(spare_name(seg.seq));
                sh.fs.rename(&seg.path, &spare).map_err(io("keep released segment as a spare", &seg.path))?;
                new_spares.push(spare);
            } else {
                sh.fs.remove_file(&seg.path).map_err(io("remove released segment", &seg.path))?;
            }
            tracing::debug!(seq = seg.seq, path = %seg.path.display(), "released segment");
        }
        if let Err(e) = sh.fs.sync_dir(&sh.dir) {
            let e = Error::Io { op: "fsync directory after release", path: sh.dir.clone(), source: e };
            sh.lock_state().poisoned = Some(e.to_string());
            sh.cond.notify_all();
            return Err(e);
        }
        sh.spares.lock().unwrap_or_else(|e| e.into_inner()).extend(new_spares);
        Ok(removed.len())
    }

    /// Reads the user records with positions in `range`, in order, stopping once
    /// more than `bytes_max` payload bytes are read (at least one record is
    /// returned if any is in range). Only written records are seen. Each record
    /// is checked against its checksum again. Fails with `PositionNotFound` when
    /// the range starts below the first retained record.
    pub fn read_range(&self, range: impl RangeBounds<u64>, bytes_max: u64) -> Result<Records> {
        let sh = &*self.shared;
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => Some(e),
            Bound::Excluded(&e) => e.checked_sub(1),
            Bound::Unbounded => Some(u64::MAX),
        };
        let mut spans: Vec<Span> = Vec::new();
        {
            let st = sh.lock_state();
            if let Some(p) = &st.poisoned {
                return Err(Error::Poisoned(p.clone()));
            }
            let Some(end) = end else { return Ok(Records::default()) };
            if let Some(first) = st.first_position()
                && start < first
                && matches!(range.start_bound(), Bound::Included(_) | Bound::Excluded(_))
            {
                return Err(Error::PositionNotFound {
                    position: start,
                    retained: format!("{first}..={}", st.last_position().unwrap_or(first)),
                });
            }
            let mut bytes = 0u64;
            'segs: for seg in &st.segments {
                let from = seg.records.partition_point(|r| r.position < start);
                let mut picked = Vec::new();
                for r in &seg.records[from..] {
                    if r.position > end || (bytes >= bytes_max && (!picked.is_empty() || !spans.is_empty())) {
                        if !picked.is_empty() {
                            spans.push((seg.seq, seg.seed, seg.path.clone(), Arc::clone(&seg.file), picked));
                        }
                        break 'segs;
                    }
                    bytes += r.frame_len;
                    picked.push(*r);
                }
                if !picked.is_empty() {
                    spans.push((seg.seq, seg.seed, seg.path.clone(), Arc::clone(&seg.file), picked));
                }
            }
        }
        let mut out = Records::default();
        for (seq, seed, path, file, entries) in spans {
            let (Some(first), Some(last)) = (entries.first(), entries.last()) else { continue };
            let base = first.offset;
            let len = usize::try_from(last.offset + last.frame_len - base).expect("span fits in memory");
            let mut buf = AlignedBuf::zeroed(len);
            file.read_exact_at(buf.as_mut_slice(), base).map_err(io("read segment", &path))?;
            let mut checked = Vec::with_capacity(entries.len());
            for e in &entries {
                let at = (e.offset - base) as usize;
                match format::check_record(buf.as_slice(), at, seed) {
                    Some(f) if f.position == e.position && f.kind >= kind::USER_BASE => {
                        checked.push((UserKind::from_stored(f.kind), f.position, f.payload_offset, f.payload_len));
                    }
                    _ => {
                        // A segment released (and recycled) while we read is no corruption.
                        let st = sh.lock_state();
                        if !st.segments.iter().any(|s| s.seq == seq) {
                            return Err(Error::PositionNotFound {
                                position: e.position,
                                retained: format!("{:?}..={:?}", st.first_position(), st.last_position()),
                            });
                        }
                        return Err(Error::Corrupt {
                            path,
                            offset: e.offset,
                            reason: format!("record at position {} no longer matches its checksum", e.position),
                        });
                    }
                }
            }
            let b = out.push_buf(buf);
            for (kind, position, start, len) in checked {
                out.push(b, kind, position, start, len);
            }
        }
        Ok(out)
    }

    /// Replays the user records after the snapshot marker at `marker` (or all
    /// retained records for `None`), in bounded batches read from disk.
    pub fn replay_from(&self, marker: Option<u64>) -> Result<Replay<'_>> {
        let next = match marker {
            None => 0,
            Some(m) => {
                if !self.snapshot_markers().iter().any(|x| x.position == m) {
                    return Err(Error::MarkerNotFound(m));
                }
                m.checked_add(1).ok_or(Error::MarkerNotFound(m))?
            }
        };
        let first = self.first_position();
        Ok(Replay { wal: self, next: Some(next.max(first.unwrap_or(0))), bytes_max: REPLAY_BATCH_BYTES })
    }

    /// The metadata given at create.
    pub fn metadata(&self) -> Vec<u8> {
        self.shared.lock_state().enc.metadata.clone()
    }

    /// The latest written state record.
    pub fn state(&self) -> Option<Vec<u8>> {
        self.shared.lock_state().state.clone()
    }

    /// The written snapshot markers of the retained segments, oldest first
    /// (the repeats in segment headers counted once).
    pub fn snapshot_markers(&self) -> Vec<Marker> {
        let st = self.shared.lock_state();
        let mut out: Vec<Marker> = Vec::new();
        for m in st.segments.iter().flat_map(|s| &s.markers) {
            if out.last() != Some(m) {
                out.push(m.clone());
            }
        }
        out
    }

    /// Position of the first retained user record.
    pub fn first_position(&self) -> Option<u64> {
        self.shared.lock_state().first_position()
    }

    /// Position of the last written user record.
    pub fn last_position(&self) -> Option<u64> {
        self.shared.lock_state().last_position()
    }

    /// Number of segment files retained.
    pub fn segment_count(&self) -> usize {
        self.shared.lock_state().segments.len()
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Closes the log: stops the preparer thread and releases the lock.
    /// Dropping the `Wal` does the same.
    pub fn close(self) {}
}

/// Bytes of records read per batch by [`Replay`].
const REPLAY_BATCH_BYTES: u64 = 4 << 20;

/// Iterator over the records after a snapshot marker, read from disk in bounded batches.
#[derive(Debug)]
pub struct Replay<'a> {
    wal: &'a Wal,
    next: Option<u64>,
    bytes_max: u64,
}

impl Iterator for Replay<'_> {
    type Item = Result<Records>;
    fn next(&mut self) -> Option<Self::Item> {
        let from = self.next?;
        match self.wal.read_range(from.., self.bytes_max) {
            Ok(r) if r.is_empty() => {
                self.next = None;
                None
            }
            Ok(r) => {
                self.next = r.last_position().and_then(|p| p.checked_add(1));
                Some(Ok(r))
            }
            Err(e) => {
                self.next = None;
                Some(Err(e))
            }
        }
    }
}

fn lock_dir(fs: &dyn Fs, dir: &Path) -> Result<Box<dyn FsLock>> {
    let path = dir.join(LOCK_FILE_NAME);
    fs.try_lock_exclusive(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::WouldBlock {
            Error::Locked { dir: dir.to_path_buf() }
        } else {
            Error::Io { op: "lock log directory", path, source: e }
        }
    })
}

impl Drop for Wal {
    fn drop(&mut self) {
        let handle = self.shared.committer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            self.shared.stop_committer.store(true, Ordering::Release);
            // Take the state lock so the committer is either leading or waiting.
            drop(self.shared.lock_state());
            self.shared.commit_cond.notify_all();
            let _ = h.join();
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Stop the preparer before the lock is released.
        if let Ok(mut io) = self.io.lock() {
            io.take();
        }
    }
}
