//! The Raft log and hard state in cairn-wal: the [`LogStore`] raft-core reads
//! (an index of terms and a bounded cache of recent entries, older entries
//! read back from the log by range), and the WAL thread that writes what each
//! `Ready` says with group commit.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use cairn_raft_core::{ConfState, Entry, HardState, LogIndex, LogStore, Message, Term};
use cairn_wal::{Batch, Durability, Fs, UserKind, Wal, WalOptions};

/// The WAL record kind of a Raft entry (its position is the entry index).
pub const ENTRY_KIND: UserKind = UserKind::new(1);
/// The first bytes of the WAL metadata of a node, then [`RECORD_FORMAT`].
const META_MAGIC: &[u8; 7] = b"CAIRNKV";
/// The format of the records this build writes into a node's data
/// directory (as an ASCII digit after `CAIRNKV` in the log's metadata):
/// the Raft entries and hard state in the log, the markers, and the records
/// of the state without a format byte of their own (sessions, members,
/// leases). A directory of another format is refused at start with an error
/// that names both (see `docs/design/kv-server.md`, "Versions").
pub const RECORD_FORMAT: u8 = 1;

/// What the node's log could not do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The log failed.
    #[error(transparent)]
    Wal(#[from] cairn_wal::Error),
    /// The state engine failed.
    #[error(transparent)]
    Lsm(#[from] cairn_lsm::Error),
    /// Something read back is not what was written.
    #[error("corrupt {what}: {reason}")]
    Corrupt {
        /// What was read.
        what: &'static str,
        /// Why it is wrong.
        reason: String,
    },
    /// The data directory belongs to another node or cluster.
    #[error("{0}")]
    Identity(String),
    /// The data directory was written in a record format this build does not read.
    #[error("{0}")]
    Format(String),
}

/// The identity a data directory is created with and checked against at every start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    /// The node id.
    pub node_id: u64,
    /// The cluster id.
    pub cluster_id: u64,
}

impl NodeIdentity {
    fn encode(self) -> Vec<u8> {
        self.encode_as(RECORD_FORMAT)
    }
    fn encode_as(self, format: u8) -> Vec<u8> {
        let mut v = META_MAGIC.to_vec();
        v.push(b'0' + format);
        v.extend_from_slice(&self.node_id.to_le_bytes());
        v.extend_from_slice(&self.cluster_id.to_le_bytes());
        v
    }
    fn decode(b: &[u8]) -> Result<NodeIdentity, StorageError> {
        let bad = || StorageError::Corrupt { what: "log metadata", reason: "not a Cairn node's log".into() };
        if b.len() != 24 || &b[..7] != META_MAGIC {
            return Err(bad());
        }
        if b[7] != b'0' + RECORD_FORMAT {
            return Err(StorageError::Format(format!(
                "the data directory holds records of format {} (byte {:#04x}); this build reads and writes \
                 format {RECORD_FORMAT}: start it with the build that wrote it",
                b[7].wrapping_sub(b'0'),
                b[7]
            )));
        }
        let node_id = u64::from_le_bytes(b[8..16].try_into().map_err(|_| bad())?);
        let cluster_id = u64::from_le_bytes(b[16..24].try_into().map_err(|_| bad())?);
        Ok(NodeIdentity { node_id, cluster_id })
    }
}

/// Archives a record for the log; a value that cannot be archived cannot be
/// persisted, so the node stops.
fn archive<T>(v: &T) -> Vec<u8>
where
    T: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                rkyv::util::AlignedVec,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rkyv::rancor::Error,
            >,
        >,
{
    cairn_kv_client::frame::archive(v).unwrap_or_else(|e| crate::fatal(&format!("archiving a log record: {e}")))
}

/// The index and term of an archived entry, read in place (the log keeps
/// payloads 8-byte aligned).
fn entry_position(payload: &[u8]) -> Result<(LogIndex, Term), StorageError> {
    let a = rkyv::access::<<Entry as rkyv::Archive>::Archived, rkyv::rancor::Error>(payload)
        .map_err(|e| StorageError::Corrupt { what: "log entry", reason: e.to_string() })?;
    Ok((LogIndex(a.index.0.to_native()), Term(a.term.0.to_native())))
}

fn decode_entry(payload: &[u8]) -> Result<Entry, StorageError> {
    cairn_kv_client::frame::decode::<Entry>(payload)
        .map_err(|e| StorageError::Corrupt { what: "log entry", reason: e.to_string() })
}

/// The snapshot marker payload: the term and the membership at the marker.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Debug)]
struct MarkerPayload {
    term: Term,
    conf: ConfState,
}

/// One entry in this many has its cumulative byte count sampled (for the
/// release margin in bytes).
const SIZE_SAMPLE_EVERY: u64 = 64;

/// The persisted log as raft-core sees it. Updated by the Raft task when
/// the WAL thread reports a write durable, never before.
#[derive(Debug)]
pub struct WalStore {
    wal: Arc<Wal>,
    hard_state: HardState,
    snapshot: (LogIndex, Term),
    snapshot_conf: ConfState,
    last: LogIndex,
    /// `(first index, term)` runs: the term of every retained entry.
    terms: Vec<(LogIndex, Term)>,
    /// `(index, bytes of the retained entries up to it)`, every
    /// [`SIZE_SAMPLE_EVERY`] entries.
    sizes: VecDeque<(LogIndex, u64)>,
    /// Bytes of the retained entries up to `last` (approximate after a
    /// new leader replaced entries: to the sample before them).
    bytes_total: u64,
    /// The newest entries, at most `cache_bytes_max` bytes.
    cache: VecDeque<Entry>,
    cache_bytes: u64,
    cache_bytes_max: u64,
}

impl WalStore {
    /// Opens (or creates) the node's log in `dir`, checks its identity, and
    /// reads the term of every retained entry.
    pub fn open(
        fs: Arc<dyn Fs>,
        dir: &Path,
        identity: NodeIdentity,
        segment_bytes: u64,
        cache_bytes_max: u64,
    ) -> Result<WalStore, StorageError> {
        let mut opts = WalOptions::default();
        opts.segment_bytes_max = segment_bytes;
        opts.record_bytes_max = 64 << 20;
        let (wal, _report) = Wal::open_or_create(fs, dir, opts, &identity.encode())?;
        let found = NodeIdentity::decode(&wal.metadata())?;
        if found != identity {
            return Err(StorageError::Identity(format!(
                "the data directory {} belongs to node {} of cluster {:016x}, not node {} of cluster {:016x}",
                dir.display(),
                found.node_id,
                found.cluster_id,
                identity.node_id,
                identity.cluster_id
            )));
        }
        let hard_state = match wal.state() {
            Some(b) => cairn_kv_client::frame::decode::<HardState>(&b)
                .map_err(|e| StorageError::Corrupt { what: "hard state", reason: e.to_string() })?,
            None => HardState::default(),
        };
        let (snapshot, snapshot_conf) = match wal.snapshot_markers().last() {
            Some(m) => {
                let p = cairn_kv_client::frame::decode::<MarkerPayload>(&m.payload)
                    .map_err(|e| StorageError::Corrupt { what: "snapshot marker", reason: e.to_string() })?;
                ((LogIndex(m.position), p.term), p.conf)
            }
            None => ((LogIndex(0), Term(0)), ConfState::default()),
        };
        let mut store = WalStore {
            wal: Arc::new(wal),
            hard_state,
            snapshot,
            snapshot_conf,
            last: snapshot.0,
            terms: Vec::new(),
            sizes: VecDeque::new(),
            bytes_total: 0,
            cache: VecDeque::new(),
            cache_bytes: 0,
            cache_bytes_max,
        };
        let marker = (snapshot.0.0 > 0).then_some(snapshot.0.0);
        let wal = store.wal.clone();
        // Only each entry's index and term are needed here: read them in
        // place (validated), without deserializing the data. The cache starts
        // empty and older entries are read back from the log when asked for.
        let replay = wal.replay_from(marker)?;
        for records in replay {
            let records = records?;
            for r in records.iter().filter(|r| r.kind == ENTRY_KIND) {
                let (index, term) = entry_position(r.payload)?;
                if index.0 != r.position {
                    return Err(StorageError::Corrupt {
                        what: "log entry",
                        reason: format!("entry {} stored at position {}", index.0, r.position),
                    });
                }
                store.note_position(index, term, r.payload.len() as u64);
            }
        }
        Ok(store)
    }

    /// Records that the entry at `index` has `term`, takes `bytes`, and is the last one.
    fn note_position(&mut self, index: LogIndex, term: Term, bytes: u64) {
        if self.terms.last().map(|(_, t)| *t) != Some(term) {
            self.terms.push((index, term));
        }
        self.last = index;
        self.bytes_total += bytes;
        if index.0.is_multiple_of(SIZE_SAMPLE_EVERY) {
            self.sizes.push_back((index, self.bytes_total));
        }
    }

    /// The lowest index `i` such that the entries `i..=upto` take at most
    /// `bytes` (to `SIZE_SAMPLE_EVERY` entries), never below the first entry.
    pub fn tail_start_for_bytes(&self, upto: LogIndex, bytes: u64) -> LogIndex {
        let upto_bytes = if upto >= self.last {
            self.bytes_total
        } else {
            let at = self.sizes.partition_point(|(i, _)| *i <= upto);
            match at.checked_sub(1).and_then(|p| self.sizes.get(p)) {
                Some(&(_, b)) => b,
                None => return self.first_index(),
            }
        };
        // The first sample from which the tail fits (samples rise in index and bytes).
        let p = self.sizes.partition_point(|(i, b)| *i <= upto && upto_bytes.saturating_sub(*b) > bytes);
        match self.sizes.get(p).or(self.sizes.back()) {
            Some(&(i, _)) => i.next().min(upto).max(self.first_index()),
            None => self.first_index(),
        }
    }

    /// The snapshot marker made durable at `index` (with `term` and the
    /// membership `conf` there) and the log released below it.
    pub fn note_released(&mut self, index: LogIndex, term: Term, conf: ConfState) {
        if index <= self.snapshot.0 {
            return;
        }
        self.snapshot = (index, term);
        self.snapshot_conf = conf;
        // Keep the run holding `index + 1`; the runs before it are gone.
        let keep = self.terms.partition_point(|(i, _)| *i <= index.next()).saturating_sub(1);
        self.terms.drain(..keep);
        while self.sizes.front().is_some_and(|(i, _)| *i < index) {
            self.sizes.pop_front();
        }
        while self.cache.front().is_some_and(|e| e.index <= index) {
            if let Some(e) = self.cache.pop_front() {
                self.cache_bytes -= e.size_bytes();
            }
        }
    }

    /// An installed snapshot at (`index`, `term`) replaced the whole log.
    pub fn note_installed(&mut self, index: LogIndex, term: Term, conf: ConfState) {
        self.snapshot = (index, term);
        self.snapshot_conf = conf;
        self.last = index;
        self.terms.clear();
        self.sizes.clear();
        self.bytes_total = 0;
        self.cache.clear();
        self.cache_bytes = 0;
    }

    /// Makes the log start after (`index`, `term`), dropping every entry,
    /// durably: the recovery repair for a state ahead of the log (an install
    /// whose log marker was not written before a crash). Call before the
    /// WAL thread starts.
    pub fn repair_to_state(&mut self, index: LogIndex, term: Term, conf: ConfState) -> Result<(), StorageError> {
        let mut batch = Batch::new();
        batch.truncate_from(0);
        batch.snapshot_marker(index.0, &archive(&MarkerPayload { term, conf: conf.clone() }));
        self.wal.write(&batch, Durability::Sync)?;
        self.wal.release_to(index.0 + 1)?;
        self.note_installed(index, term, conf);
        Ok(())
    }

    /// The snapshot marker the log starts after.
    pub fn snapshot(&self) -> (LogIndex, Term) {
        self.snapshot
    }

    /// The log, shared with the WAL thread.
    pub fn wal(&self) -> Arc<Wal> {
        self.wal.clone()
    }

    /// Takes entries made durable (in index order; the first may replace
    /// entries from its index on).
    pub fn note_entries(&mut self, entries: Vec<Entry>) {
        let Some(first) = entries.first() else { return };
        let first_index = first.index;
        if first_index <= self.last {
            // A new leader replaced entries from `first_index` on.
            while self.terms.last().is_some_and(|(i, _)| *i >= first_index) {
                self.terms.pop();
            }
            while self.sizes.back().is_some_and(|(i, _)| *i >= first_index) {
                self.sizes.pop_back();
            }
            self.bytes_total = self.sizes.back().map_or(0, |(_, b)| *b);
            while self.cache.back().is_some_and(|e| e.index >= first_index) {
                if let Some(e) = self.cache.pop_back() {
                    self.cache_bytes -= e.size_bytes();
                }
            }
        }
        for e in entries {
            self.note_position(e.index, e.term, e.size_bytes());
            self.cache_bytes += e.size_bytes();
            self.cache.push_back(e);
        }
        while self.cache_bytes > self.cache_bytes_max && self.cache.len() > 1 {
            if let Some(e) = self.cache.pop_front() {
                self.cache_bytes -= e.size_bytes();
            }
        }
    }

    /// Takes a hard state made durable.
    pub fn note_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    fn read_from_wal(&self, lo: LogIndex, hi: LogIndex, bytes_max: u64) -> Vec<Entry> {
        let mut out = Vec::new();
        let records = match self.wal.read_range(lo.0..hi.0, bytes_max) {
            Ok(r) => r,
            Err(e) => crate::fatal(&format!("reading entries {}..{} from the log: {e}", lo.0, hi.0)),
        };
        for (expect, r) in (lo.0..).zip(records.iter().filter(|r| r.kind == ENTRY_KIND)) {
            if r.position != expect {
                break;
            }
            match decode_entry(r.payload) {
                Ok(e) => out.push(e),
                Err(e) => crate::fatal(&format!("{e}")),
            }
        }
        out
    }

    /// Bytes of entries in the cache of recent entries (at most the
    /// configured `entry_cache_bytes`, or one entry larger than it).
    pub fn cached_bytes(&self) -> u64 {
        self.cache_bytes
    }
}

impl LogStore for WalStore {
    fn hard_state(&self) -> HardState {
        self.hard_state
    }
    fn first_index(&self) -> LogIndex {
        self.snapshot.0.next()
    }
    fn last_index(&self) -> LogIndex {
        self.last
    }
    fn term(&self, index: LogIndex) -> Option<Term> {
        if index == self.snapshot.0 {
            return Some(self.snapshot.1);
        }
        if index < self.snapshot.0 || index > self.last {
            return None;
        }
        let pos = self.terms.partition_point(|(i, _)| *i <= index);
        pos.checked_sub(1).map(|p| self.terms[p].1)
    }
    fn entries(&self, lo: LogIndex, hi: LogIndex, bytes_max: u64) -> Vec<Entry> {
        let hi = hi.min(self.last.next());
        if lo >= hi {
            return Vec::new();
        }
        let cache_first = self.cache.front().map_or(self.last.next(), |e| e.index);
        let mut out =
            if lo < cache_first { self.read_from_wal(lo, hi.min(cache_first), bytes_max) } else { Vec::new() };
        let mut bytes: u64 = out.iter().map(Entry::size_bytes).sum();
        let next = out.last().map_or(lo, |e| e.index.next());
        if next < cache_first && !out.is_empty() {
            return out;
        }
        for i in next.0..hi.0 {
            let Some(e) = self.cache.get((i - cache_first.0) as usize) else { break };
            bytes += e.size_bytes();
            if !out.is_empty() && bytes > bytes_max {
                break;
            }
            out.push(e.clone());
        }
        out
    }
    fn snapshot_conf(&self) -> ConfState {
        self.snapshot_conf.clone()
    }
}

/// A snapshot marker to write: the log's new start.
#[derive(Clone, Debug)]
pub struct MarkerJob {
    /// The marker's index.
    pub index: LogIndex,
    /// The term of the entry there.
    pub term: Term,
    /// The membership as of `index`.
    pub conf: ConfState,
}

/// A write for the WAL thread: one `Ready`'s entries and hard state, or a
/// snapshot marker, in this order: an installed snapshot (the whole log is
/// dropped and starts after it), a release (a marker, then the segments
/// below it are removed), the entries, the hard state.
#[derive(Debug, Default)]
pub struct WalJob {
    /// A snapshot was installed: drop the whole log, start it after this marker.
    pub installed: Option<MarkerJob>,
    /// Release the log below this marker (written durably first).
    pub release: Option<MarkerJob>,
    /// Entries to persist (the first may replace entries from its index on).
    pub entries: Vec<Entry>,
    /// The hard state to persist after them.
    pub hard_state: Option<HardState>,
    /// Messages to send once durable.
    pub messages: Vec<Message>,
}

/// Test-only faults of the WAL thread (from `CAIRN_TEST_*` variables).
#[derive(Clone, Copy, Debug, Default)]
pub struct WalFaults {
    /// Acknowledge writes without fdatasync.
    pub skip_sync: bool,
}

impl WalFaults {
    /// How a job's records are written: synced, unless the switch says not.
    pub fn durability(self) -> Durability {
        if self.skip_sync { Durability::Buffered } else { Durability::Sync }
    }
}

/// Test-only: release the log without writing the snapshot marker first
/// (breaks the release rule; the storage crash test sets it to show that it
/// catches it).
#[doc(hidden)]
pub static RELEASE_WITHOUT_MARKER_FOR_TESTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Adds one job's records to `batch`, in the order the log needs: an
/// installed snapshot drops the whole log and starts it after its marker; a
/// release writes its marker (the segments below go once it is durable:
/// `release_to` says where); entries (a truncate first when they replace
/// written ones); the hard state last.
pub fn add_job(batch: &mut Batch, job: &WalJob, last_written: &mut Option<u64>, release_to: &mut Option<u64>) {
    if let Some(m) = &job.installed {
        batch.truncate_from(0);
        batch.snapshot_marker(m.index.0, &archive(&MarkerPayload { term: m.term, conf: m.conf.clone() }));
        *last_written = Some(m.index.0);
        *release_to = Some(m.index.0 + 1);
    }
    if let Some(m) = &job.release {
        if !RELEASE_WITHOUT_MARKER_FOR_TESTS.load(std::sync::atomic::Ordering::Relaxed) {
            batch.snapshot_marker(m.index.0, &archive(&MarkerPayload { term: m.term, conf: m.conf.clone() }));
        }
        *release_to = Some(release_to.unwrap_or(0).max(m.index.0 + 1));
    }
    if let Some(first) = job.entries.first()
        && last_written.is_some_and(|l| first.index.0 <= l)
    {
        batch.truncate_from(first.index.0);
    }
    for e in &job.entries {
        batch.append(ENTRY_KIND, e.index.0, &archive(e));
        *last_written = Some(e.index.0);
    }
    if let Some(hs) = &job.hard_state {
        batch.set_state(&archive(hs));
    }
}

/// Writes one job durably and releases what it allows (the crash tests
/// drive the log this way, one job at a time, as the WAL thread would).
pub fn write_job(
    wal: &cairn_wal::Wal,
    job: &WalJob,
    last_written: &mut Option<u64>,
    faults: WalFaults,
) -> Result<(), cairn_wal::Error> {
    let mut batch = Batch::new();
    let mut release_to = None;
    add_job(&mut batch, job, last_written, &mut release_to);
    if !batch.is_empty() {
        wal.write(&batch, faults.durability())?;
    }
    if let Some(to) = release_to {
        wal.release_to(to)?;
    }
    Ok(())
}

/// Runs the WAL thread: takes jobs, writes every job waiting at once with one
/// fdatasync (group commit), reports each job back in order. A write error
/// stops the process (see DESIGN.md, "I/O failure").
pub fn run_wal_thread(
    wal: Arc<Wal>,
    jobs: std::sync::mpsc::Receiver<WalJob>,
    done: tokio::sync::mpsc::Sender<WalJob>,
    group_jobs_max: usize,
    faults: WalFaults,
) {
    let mut last_written: Option<u64> = wal.last_position();
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while group.len() < group_jobs_max {
            match jobs.try_recv() {
                Ok(j) => group.push(j),
                Err(_) => break,
            }
        }
        let mut batch = Batch::new();
        let mut release_to: Option<u64> = None;
        for job in &group {
            add_job(&mut batch, job, &mut last_written, &mut release_to);
        }
        if !batch.is_empty() {
            let started = std::time::Instant::now();
            let durability = faults.durability();
            if let Err(e) = wal.write(&batch, durability) {
                crate::fatal(&format!("writing the Raft log: {e}"));
            }
            let took = started.elapsed();
            metrics::histogram!("cairn_wal_write_seconds").record(took.as_secs_f64());
            crate::note_slow("log_write", took, format_args!("a log write of {} jobs and its sync", group.len()));
            metrics::counter!("cairn_wal_groups_total").increment(1);
        }
        // The marker is durable: the segments below it may go.
        if let Some(to) = release_to {
            let started = std::time::Instant::now();
            let released = wal.release_to(to);
            crate::note_slow("log_release", started.elapsed(), format_args!("releasing the log below {to}"));
            match released {
                Ok(n) => {
                    metrics::counter!("cairn_wal_segments_released_total").increment(n as u64);
                }
                Err(e) => crate::fatal(&format!("releasing the Raft log below {to}: {e}")),
            }
        }
        for job in group {
            if done.blocking_send(job).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_raft_core::EntryKind;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { term: Term(term), index: LogIndex(index), kind: EntryKind::Normal, data: vec![index as u8; 10].into() }
    }

    #[test]
    fn the_store_reads_back_through_the_cache_and_the_log_and_keeps_terms_after_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs: Arc<dyn Fs> = Arc::new(cairn_wal::StdFs);
        let id = NodeIdentity { node_id: 1, cluster_id: 9 };
        let mut s = WalStore::open(fs.clone(), dir.path(), id, 1 << 20, 200).expect("open");
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        let (dtx, mut drx) = tokio::sync::mpsc::channel(16);
        let wal = s.wal();
        let t = std::thread::spawn(move || run_wal_thread(wal, rx, dtx, 8, WalFaults::default()));
        let batch1: Vec<Entry> = (1..=20).map(|i| entry(i, 1)).collect();
        tx.send(WalJob { entries: batch1, ..WalJob::default() }).expect("send");
        // A new leader replaces 15.. with term 2.
        let batch2: Vec<Entry> = (15..=25).map(|i| entry(i, 2)).collect();
        let hs = HardState { term: Term(2), vote: Some(cairn_raft_core::NodeId(2)), commit: LogIndex(12) };
        tx.send(WalJob { entries: batch2, hard_state: Some(hs), ..WalJob::default() }).expect("send");
        for _ in 0..2 {
            let job = drx.blocking_recv().expect("done");
            s.note_entries(job.entries);
            if let Some(h) = job.hard_state {
                s.note_hard_state(h);
            }
        }
        drop(tx);
        t.join().expect("thread");
        assert_eq!(s.last_index(), LogIndex(25));
        assert_eq!(s.term(LogIndex(14)), Some(Term(1)));
        assert_eq!(s.term(LogIndex(15)), Some(Term(2)));
        // The cache holds only the newest few (200 bytes); older ones come from the log.
        let all = s.entries(LogIndex(1), LogIndex(26), u64::MAX);
        assert_eq!(all.len(), 25);
        assert!(all.iter().enumerate().all(|(i, e)| e.index.0 == i as u64 + 1));
        assert_eq!(all[16].term, Term(2));
        drop(s);
        let s = WalStore::open(fs.clone(), dir.path(), id, 1 << 20, 200).expect("reopen");
        assert_eq!(s.last_index(), LogIndex(25));
        assert_eq!(s.term(LogIndex(15)), Some(Term(2)));
        assert_eq!(s.hard_state(), hs);
        // After a reopen the cache is empty: every entry comes back from the log.
        let again = s.entries(LogIndex(1), LogIndex(26), u64::MAX);
        assert_eq!(again, all);
        drop(s);
        let other = NodeIdentity { node_id: 2, cluster_id: 9 };
        assert!(matches!(WalStore::open(fs, dir.path(), other, 1 << 20, 200), Err(StorageError::Identity(_))));
    }

    #[test]
    fn a_log_of_another_record_format_is_refused_naming_both() {
        let id = NodeIdentity { node_id: 3, cluster_id: 0xabc };
        let meta = id.encode();
        assert_eq!(&meta[..8], b"CAIRNKV1", "format 1 reads the directories written before the format byte was named");
        assert_eq!(NodeIdentity::decode(&meta).expect("decode"), id);
        match NodeIdentity::decode(&id.encode_as(2)) {
            Err(StorageError::Format(m)) => {
                assert!(m.contains("format 2") && m.contains(&format!("format {RECORD_FORMAT}")), "{m}");
            }
            other => panic!("a log of record format 2 must be refused: {other:?}"),
        }
        let mut foreign = meta.clone();
        foreign[0] = b'X';
        assert!(matches!(NodeIdentity::decode(&foreign), Err(StorageError::Corrupt { .. })));
    }

    fn run_jobs(s: &mut WalStore, jobs: Vec<WalJob>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        let (dtx, mut drx) = tokio::sync::mpsc::channel(16);
        let wal = s.wal();
        let t = std::thread::spawn(move || run_wal_thread(wal, rx, dtx, 8, WalFaults::default()));
        let n = jobs.len();
        for j in jobs {
            tx.send(j).expect("send");
        }
        for _ in 0..n {
            let job = drx.blocking_recv().expect("done");
            if let Some(m) = job.installed {
                s.note_installed(m.index, m.term, m.conf);
            }
            if let Some(m) = job.release {
                s.note_released(m.index, m.term, m.conf);
            }
            s.note_entries(job.entries);
        }
        drop(tx);
        t.join().expect("thread");
    }

    fn marker(index: u64, term: u64) -> MarkerJob {
        MarkerJob {
            index: LogIndex(index),
            term: Term(term),
            conf: ConfState::with_voters([cairn_raft_core::NodeId(1)]),
        }
    }

    /// Release: a marker first, then the segments below it go; the log
    /// reopens at the marker with the term of the entry before its first.
    /// Install: the whole log is dropped and starts after the snapshot, also
    /// after a reopen. The repair does the same before the WAL thread runs.
    #[test]
    fn release_and_install_move_the_start_of_the_log_durably() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs: Arc<dyn Fs> = Arc::new(cairn_wal::StdFs);
        let id = NodeIdentity { node_id: 1, cluster_id: 9 };
        let open = || WalStore::open(fs.clone(), dir.path(), id, 8 << 10, 1 << 10).expect("open");
        let mut s = open();
        let mut jobs: Vec<WalJob> = (0..30)
            .map(|b| WalJob {
                entries: (b * 10 + 1..=b * 10 + 10).map(|i| entry(i, 1 + i / 150)).collect(),
                ..WalJob::default()
            })
            .collect();
        jobs.push(WalJob { release: Some(marker(200, 2)), ..WalJob::default() });
        run_jobs(&mut s, jobs);
        assert_eq!((s.first_index(), s.last_index()), (LogIndex(201), LogIndex(300)));
        assert_eq!(s.term(LogIndex(200)), Some(Term(2)));
        assert_eq!(s.term(LogIndex(199)), None);
        assert!(s.wal().segment_count() < 30, "no segment was released");
        let tail = s.entries(LogIndex(201), LogIndex(301), u64::MAX);
        assert_eq!(tail.len(), 100);
        // The byte margin: the newest ~1000 bytes are a few dozen entries.
        let from = s.tail_start_for_bytes(LogIndex(300), 1000);
        assert!(from > LogIndex(201) && from <= LogIndex(300), "{from:?}");
        drop(s);
        let mut s = open();
        assert_eq!((s.first_index(), s.last_index()), (LogIndex(201), LogIndex(300)));
        assert_eq!(s.term(LogIndex(200)), Some(Term(2)));
        assert_eq!(s.entries(LogIndex(201), LogIndex(301), u64::MAX), tail);

        run_jobs(
            &mut s,
            vec![WalJob { installed: Some(marker(1000, 7)), entries: vec![entry(1001, 7)], ..WalJob::default() }],
        );
        assert_eq!((s.first_index(), s.last_index()), (LogIndex(1001), LogIndex(1001)));
        drop(s);
        let mut s = open();
        assert_eq!((s.first_index(), s.last_index()), (LogIndex(1001), LogIndex(1001)));
        assert_eq!(s.term(LogIndex(1000)), Some(Term(7)));
        assert_eq!(s.snapshot_conf(), ConfState::with_voters([cairn_raft_core::NodeId(1)]));

        s.repair_to_state(LogIndex(2000), Term(8), ConfState::default()).expect("repair");
        drop(s);
        let s = open();
        assert_eq!((s.first_index(), s.last_index()), (LogIndex(2001), LogIndex(2000)));
        assert_eq!(s.term(LogIndex(2000)), Some(Term(8)));
    }
}
