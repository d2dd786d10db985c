//! The apply worker: applies committed entries in log order to the LSM, one
//! LSM batch per group of entries with the last entry's (index, term) as its
//! marker, answers the proposals waiting on those entries, and keeps the
//! session table (Raft thesis §6.3) in the replicated state.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use cairn_kv_client::protocol::{
    Compare, CompareOp, CompareTarget, ErrorCode, KeyMeta, KeyValue, Response, Session, TxnOp, TxnOpResult, WriteOp,
};
use cairn_lsm::{Db, Marker, WriteBatch};
use cairn_raft_core::{ConfState, Entry, EntryKind, Term};
use tokio::sync::{oneshot, watch};

use crate::lease::LeaseEvent;
use cairn_kv_client::protocol::{EventKind, WatchEvent};

/// What the apply worker publishes to watchers.
#[derive(Clone, Debug)]
pub enum WatchFeed {
    /// The events of one applied batch, in revision order (written to the
    /// state's history in the same batch).
    Events(Arc<WatchBatch>),
    /// A snapshot replaced the state: watchers read the history again from
    /// where they were.
    Reset,
}

use crate::state::{
    Book, CONF_KEY, Command, CommandOp, Outcome, REVISION_KEY, SESSION_PREFIX, SessionRecord, SharedBook, addr_key,
    alarm_key, attach_key, decode_value, encode_value, lease_key, load_revision, read_book, removed_key, session_key,
    user_key, write_book,
};

/// The events of one applied batch, and where they end in the stream of
/// event bytes published since the start ([`WatchBatch::end`]): a watcher
/// reading a batch sees how far behind the newest one it is.
#[derive(Debug)]
pub struct WatchBatch {
    /// The events, in revision order.
    pub events: Vec<WatchEvent>,
    /// Event bytes ([`event_bytes`]) published up to and including this batch.
    pub end: u64,
}

/// What an event holds in memory, about: its keys and values, and 64 bytes
/// for the rest.
pub fn event_bytes(e: &WatchEvent) -> u64 {
    let kv = |k: &cairn_kv_client::protocol::KeyValue| 64 + k.key.len() as u64 + k.value.len() as u64;
    kv(&e.kv) + e.prev.as_ref().map_or(0, kv)
}

/// A proposal waiting for its entry to apply.
#[derive(Debug)]
pub struct Waiter {
    /// The term it was proposed in: an entry of another term at its index replaced it.
    pub term: Term,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Response>,
}

/// Proposals waiting, by log index. The Raft task inserts right after it
/// proposes (before the entry can commit); the apply worker removes.
pub type Waiters = Arc<Mutex<HashMap<u64, Waiter>>>;

/// Work for the apply worker, in log order.
#[derive(Debug)]
pub enum ApplyJob {
    /// Committed entries, and the membership after them if one of them changed it.
    Entries {
        /// The entries, in index order.
        entries: Vec<Entry>,
        /// The membership after them, when it changed.
        conf: Option<ConfState>,
    },
    /// Hash the replicated state as of what is applied now.
    Hash {
        /// (applied index, hash).
        reply: oneshot::Sender<(u64, u64)>,
    },
    /// Replace the state by a received checkpoint (Raft said install).
    Install {
        /// The staged, verified checkpoint.
        checkpoint: cairn_snapshot_transfer::Completed,
        /// Answered once the new state is live.
        reply: oneshot::Sender<()>,
    },
}

/// Where the apply worker installs snapshots.
#[derive(Clone, Debug)]
pub struct InstallSite {
    /// The file system (the simulated disk in crash tests).
    pub fs: crate::snapshot::NodeFs,
    /// The node's data directory.
    pub data_dir: std::path::PathBuf,
    /// The options the state is opened with.
    pub options: cairn_lsm::Options,
    /// The initial cluster's addresses (under those the state records).
    pub initial: std::collections::BTreeMap<u64, String>,
    /// Crash points of the install (tests only; inert unless named).
    pub failpoints: Arc<crate::failpoint::Failpoints>,
}

/// A change to the member book, made once its batch is written.
#[derive(Debug)]
enum BookChange {
    Addr(u64, String),
    Removed(u64),
    Alarms(std::collections::BTreeSet<u64>),
}

/// Limits the state machine enforces at apply. Every replica must apply an
/// entry with the same ones, so they are replicated: a new leader's first
/// proposal is its configured limits (`CommandOp::SetLimits`); before the
/// first such entry every replica applies the built-in defaults
/// ([`ApplyLimits::defaults`]), never its own configuration.
#[derive(Clone, Copy, Debug)]
pub struct ApplyLimits {
    /// Longest key.
    pub key_bytes_max: usize,
    /// Longest value.
    pub value_bytes_max: usize,
    /// Responses kept per session.
    pub session_responses_max: usize,
    /// A session idle this long (by entry timestamps) expires, in ms.
    pub session_ttl_ms: u64,
    /// Comparisons plus operations in one transaction.
    pub txn_ops_max: usize,
    /// Leases at once.
    pub leases_max: usize,
    /// Leases at once per owner (client).
    pub leases_per_client_max: usize,
    /// Keys attached to one lease.
    pub keys_per_lease_max: usize,
}

impl ApplyLimits {
    /// The limits of the default configuration (what a state that holds
    /// none applies with).
    pub fn defaults() -> ApplyLimits {
        ApplyLimits::new(&crate::config::Limits::default(), crate::config::SESSION_TTL_DEFAULT_SECS * 1000)
    }

    /// The values a `SetLimits` entry and the stored record carry, in order.
    pub fn to_values(self) -> Vec<u64> {
        [
            self.key_bytes_max,
            self.value_bytes_max,
            self.session_responses_max,
            self.txn_ops_max,
            self.leases_max,
            self.leases_per_client_max,
            self.keys_per_lease_max,
        ]
        .into_iter()
        .map(|v| v as u64)
        .chain([self.session_ttl_ms])
        .collect()
    }

    /// The limits of [`ApplyLimits::to_values`]' values; `None` for another
    /// count, a value that does not fit, or keys or values beyond what the
    /// state can store.
    pub fn from_values(v: &[u64]) -> Option<ApplyLimits> {
        let [key, value, responses, txn, leases, per_client, per_lease, ttl] = *v else { return None };
        let size = |x: u64| usize::try_from(x).ok();
        let l = ApplyLimits {
            key_bytes_max: size(key)?,
            value_bytes_max: size(value)?,
            session_responses_max: size(responses)?,
            txn_ops_max: size(txn)?,
            leases_max: size(leases)?,
            leases_per_client_max: size(per_client)?,
            keys_per_lease_max: size(per_lease)?,
            session_ttl_ms: ttl,
        };
        let storable = l.key_bytes_max <= cairn_kv_client::protocol::KEY_BYTES_MAX
            && l.value_bytes_max <= cairn_lsm::VALUE_BYTES_MAX - crate::state::VALUE_HEADER_BYTES;
        storable.then_some(l)
    }

    /// The limits of `limits` that apply enforces, sessions expiring after
    /// `session_ttl_ms`.
    pub fn new(limits: &crate::config::Limits, session_ttl_ms: u64) -> ApplyLimits {
        ApplyLimits {
            key_bytes_max: limits.key_bytes_max,
            value_bytes_max: limits.value_bytes_max,
            session_responses_max: limits.session_responses_max,
            session_ttl_ms,
            txn_ops_max: limits.txn_ops_max,
            leases_max: limits.leases_max,
            leases_per_client_max: limits.leases_per_client_max,
            keys_per_lease_max: limits.keys_per_lease_max,
        }
    }
}

/// The apply worker's state.
pub struct Applier {
    shared: Arc<crate::snapshot::SharedDb>,
    db: Arc<Db>,
    site: InstallSite,
    book: SharedBook,
    book_changes: Vec<BookChange>,
    /// The raised space alarms, as of the entries applied so far.
    alarms: std::collections::BTreeSet<u64>,
    /// The cluster revision, as of the entries applied so far.
    revision: u64,
    /// User keys written by the entries of the batch being applied (LSM key
    /// to stored value, `None`: deleted): reads at apply see them before
    /// the batch reaches the LSM.
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Lease grants and revocations of the batch, for the lessor once it is written.
    lease_events: Vec<LeaseEvent>,
    /// Where lease events go (the lessor).
    pub lease_tx: Option<tokio::sync::mpsc::Sender<LeaseEvent>>,
    /// The events of the batch being applied.
    events: Vec<WatchEvent>,
    /// The oldest revision the history keeps.
    compacted: u64,
    /// Each lease's owner, as of the entries applied so far.
    leases: LeaseOwners,
    /// Where events go (the watchers).
    pub watch_tx: Option<tokio::sync::broadcast::Sender<WatchFeed>>,
    /// Event bytes published to `watch_tx` so far (shared with the watchers).
    pub watch_published: Arc<std::sync::atomic::AtomicU64>,
    sessions: HashMap<u64, SessionRecord>,
    applied: watch::Sender<u64>,
    waiters: Waiters,
    /// The limits entries are applied with now.
    limits: ApplyLimits,
    /// The limits applied while the state holds none (see [`Applier::new`]).
    initial_limits: ApplyLimits,
    /// Test-only: apply each write twice, ignoring the session (shows the
    /// exactly-once test catches a duplicate apply).
    pub ignore_sessions_for_tests: bool,
    /// Test-only: refuse writes from this node's own disk usage instead of
    /// the replicated alarm (breaks the disk-full rule: replicas split).
    pub local_quota_for_tests: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Test switch: merge a full snapshot's tables into the live state
    /// instead of replacing it (the seed's bug: a deleted key can come back).
    pub merge_snapshots_for_tests: bool,
    /// Test switch: write no record naming the change that replaced a put
    /// (breaks the history: a watch cannot find a replaced put's value).
    pub skip_change_records_for_tests: bool,
}

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier").field("sessions", &self.sessions.len()).finish_non_exhaustive()
    }
}

impl Applier {
    /// A worker over `db`, loading the sessions it holds. `limits` are the
    /// limits it applies with while the state holds none of its own (every
    /// replica must be given the same: the server gives
    /// [`ApplyLimits::defaults`]).
    pub fn new(
        shared: Arc<crate::snapshot::SharedDb>,
        site: InstallSite,
        book: SharedBook,
        applied: watch::Sender<u64>,
        waiters: Waiters,
        limits: ApplyLimits,
    ) -> Result<Applier, crate::storage::StorageError> {
        let db = shared.get();
        let sessions = load_sessions(&db)?;
        let alarms = read_book(&book).alarms.clone();
        let revision = load_revision(&db)?;
        let compacted = crate::state::load_compacted(&db)?;
        let leases = LeaseOwners::load(&db)?;
        let initial_limits = limits;
        let limits = state_limits(&db, initial_limits)?;
        Ok(Applier {
            shared,
            db,
            site,
            book,
            book_changes: Vec::new(),
            alarms,
            revision,
            pending: BTreeMap::new(),
            lease_events: Vec::new(),
            lease_tx: None,
            events: Vec::new(),
            compacted,
            leases,
            watch_tx: None,
            watch_published: Arc::default(),
            sessions,
            applied,
            waiters,
            limits,
            initial_limits,
            ignore_sessions_for_tests: false,
            local_quota_for_tests: None,
            merge_snapshots_for_tests: false,
            skip_change_records_for_tests: false,
        })
    }

    /// Runs until the job channel closes; publishes each applied index on the `applied` watch.
    pub fn run(mut self, mut jobs: tokio::sync::mpsc::Receiver<ApplyJob>) {
        while let Some(job) = jobs.blocking_recv() {
            match job {
                ApplyJob::Entries { entries, conf } => {
                    if let Err(e) = self.apply(&entries, conf.as_ref()) {
                        crate::fatal(&e);
                    }
                }
                ApplyJob::Hash { reply } => {
                    let _ = reply.send((*self.applied.borrow(), self.hash()));
                }
                ApplyJob::Install { checkpoint, reply } => {
                    if let Err(e) = self.install(&checkpoint) {
                        // Raft already counts the snapshot as taken: a node that cannot
                        // install it stops, and recovers from its own state at restart.
                        crate::fatal(&e);
                    }
                    let _ = reply.send(());
                }
            }
        }
    }

    /// Makes a received checkpoint the live state, in log order: every entry
    /// handed to apply before it is applied; none after it is yet.
    pub fn install(&mut self, c: &cairn_snapshot_transfer::Completed) -> Result<(), String> {
        let started = std::time::Instant::now();
        let at = c.manifest.index;
        let delta = crate::snapshot::is_delta(c);
        let merge = self.merge_snapshots_for_tests && !delta;
        let (name, db) = if merge {
            let (tables, blobs) = crate::snapshot::received_lsm_files(c);
            let marker = cairn_lsm::Marker::new(c.manifest.index, c.manifest.term);
            self.db
                .ingest_with_blobs(&tables, &blobs, cairn_lsm::IngestOptions::new().marker(marker))
                .map_err(|e| e.to_string())?;
            (self.db.dir().display().to_string(), self.db.clone())
        } else if delta {
            crate::snapshot::install_delta(&self.db, c)
                .map_err(|e| format!("installing the delta snapshot at {at}: {e}"))?;
            (self.db.dir().display().to_string(), self.db.clone())
        } else {
            let (name, db) = crate::snapshot::install(
                &self.site.fs,
                &self.site.data_dir,
                c,
                &self.site.options,
                &self.site.failpoints,
            )
            .map_err(|e| format!("installing the snapshot at {at}: {e}"))?;
            (name, Arc::new(db))
        };
        let sessions = load_sessions(&db).map_err(|e| format!("reading the installed state's sessions: {e}"))?;
        let revision = load_revision(&db).map_err(|e| format!("reading the installed state's revision: {e}"))?;
        let compacted = crate::state::load_compacted(&db)
            .map_err(|e| format!("reading the installed state's history bound: {e}"))?;
        let book =
            Book::load(&db, &self.site.initial).map_err(|e| format!("reading the installed state's members: {e}"))?;
        let leases = LeaseOwners::load(&db).map_err(|e| format!("reading the installed state's leases: {e}"))?;
        let limits =
            state_limits(&db, self.initial_limits).map_err(|e| format!("reading the installed state's limits: {e}"))?;
        let old = (!delta && !merge).then(|| self.shared.replace(db.clone()));
        self.db = db;
        self.sessions = sessions;
        self.revision = revision;
        self.compacted = compacted;
        self.leases = leases;
        self.limits = limits;
        if let Some(tx) = &self.watch_tx {
            let _ = tx.send(WatchFeed::Reset);
        }
        self.alarms = book.alarms.clone();
        *write_book(&self.book) = book;
        self.applied.send_replace(c.manifest.index);
        metrics::counter!("cairn_snapshot_installed_total", "kind" => if delta { "delta" } else { "full" })
            .increment(1);
        metrics::gauge!("cairn_raft_applied_index").set(c.manifest.index as f64);
        tracing::info!(
            index = c.manifest.index,
            term = c.manifest.term,
            dir = %name,
            delta,
            ms = started.elapsed().as_millis() as u64,
            "snapshot installed"
        );
        if let Some(old) = old {
            // Off this thread: the entries after the install wait for it.
            let spawned = std::thread::Builder::new().name("cairn-retire".into()).spawn(move || retire(old));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a thread to retire the replaced state; the next start removes it");
            }
        }
        Ok(())
    }
}

/// Closes a replaced state once no reader holds it (waiting a little), and
/// removes its directory; otherwise the next start removes it.
fn retire(old: Arc<Db>) {
    let dir = old.dir().to_path_buf();
    let mut old = old;
    for _ in 0..100 {
        match Arc::try_unwrap(old) {
            Ok(db) => {
                if let Err(e) = db.close() {
                    tracing::warn!(error = %e, "closing the replaced state");
                }
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the replaced state");
                }
                return;
            }
            Err(back) => {
                old = back;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
    tracing::info!(dir = %dir.display(), "the replaced state is still read; the next start removes it");
}

/// Who holds each lease (derived from the `l` records, kept in memory so
/// that a grant checks its limits without a scan).
#[derive(Debug, Default)]
struct LeaseOwners {
    owner_of: HashMap<u64, u64>,
    count: HashMap<u64, usize>,
}

impl LeaseOwners {
    fn load(db: &Db) -> Result<LeaseOwners, crate::storage::StorageError> {
        let mut o = LeaseOwners::default();
        for (id, _, owner) in crate::state::load_leases(db)? {
            o.granted(id, owner);
        }
        Ok(o)
    }

    fn held_by(&self, owner: u64) -> usize {
        self.count.get(&owner).copied().unwrap_or(0)
    }

    fn granted(&mut self, id: u64, owner: u64) {
        if self.owner_of.insert(id, owner).is_none() {
            *self.count.entry(owner).or_default() += 1;
        }
    }

    fn revoked(&mut self, id: u64) {
        if let Some(owner) = self.owner_of.remove(&id)
            && let Some(n) = self.count.get_mut(&owner)
        {
            *n -= 1;
            if *n == 0 {
                self.count.remove(&owner);
            }
        }
    }
}

/// The sessions the state holds.
fn load_sessions(db: &Db) -> Result<HashMap<u64, SessionRecord>, crate::storage::StorageError> {
    let mut sessions = HashMap::new();
    {
        for kv in db.prefix(&[SESSION_PREFIX]) {
            let (k, v) = kv?;
            let id = k.get(1..9).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).ok_or_else(|| {
                crate::storage::StorageError::Corrupt { what: "session key", reason: format!("{k:?}") }
            })?;
            let rec = SessionRecord::decode(&v)
                .map_err(|e| crate::storage::StorageError::Corrupt { what: "session", reason: e.to_string() })?;
            sessions.insert(id, rec);
        }
    }
    Ok(sessions)
}

impl Applier {
    /// Applies `entries` (in index order) as one LSM batch with the last
    /// entry's marker, then answers their waiters.
    pub fn apply(&mut self, entries: &[Entry], conf: Option<&ConfState>) -> Result<(), String> {
        let Some(last) = entries.last() else { return Ok(()) };
        let started = std::time::Instant::now();
        let mut batch = WriteBatch::new();
        let revision_before = self.revision;
        self.pending.clear();
        self.events.clear();
        let mut answers: Vec<(u64, Term, Response)> = Vec::with_capacity(entries.len());
        let mut touched: Vec<u64> = Vec::new();
        for e in entries {
            let resp = match e.kind {
                EntryKind::Normal if e.data.is_empty() => Response::Healthy { index: e.index.0 },
                EntryKind::Normal => match Command::decode(&e.data) {
                    Ok(cmd) => self.apply_command(e.index.0, cmd, &mut batch, &mut touched),
                    Err(err) => {
                        // Every replica decodes the same bytes the same way: skipping is deterministic.
                        tracing::error!(index = e.index.0, error = %err, "an entry holds no valid command; skipped");
                        Response::error(ErrorCode::BadRequest, "the entry holds no valid command")
                    }
                },
                EntryKind::ConfChange => {
                    if let Some(cc) = cairn_raft_core::ConfChange::decode(&e.data) {
                        for item in &cc.changes {
                            if let cairn_raft_core::ConfChangeItem::Remove(id) = item {
                                batch.put(removed_key(id.0), Vec::new());
                                self.book_changes.push(BookChange::Removed(id.0));
                            }
                        }
                    }
                    Response::Ok
                }
                EntryKind::Noop => Response::Ok,
            };
            answers.push((e.index.0, e.term, resp));
        }
        touched.sort_unstable();
        touched.dedup();
        for id in touched {
            match self.sessions.get(&id) {
                Some(rec) => batch.put(session_key(id), archived(rec.encode())),
                None => batch.delete(session_key(id)),
            };
        }
        if let Some(conf) = conf {
            batch.put(CONF_KEY.to_vec(), archived(cairn_kv_client::frame::archive(conf)));
        }
        if self.revision != revision_before {
            batch.put(REVISION_KEY.to_vec(), self.revision.to_le_bytes().to_vec());
        }
        self.pending.clear();
        batch.set_marker(Marker::new(last.index.0, last.term.0));
        let commands = started.elapsed();
        if let Err(e) = self.db.write(&batch) {
            return Err(format!("applying entries up to {} to the state: {e}", last.index.0));
        }
        let written = started.elapsed();
        if !self.events.is_empty() {
            let events = std::mem::take(&mut self.events);
            if let Some(tx) = &self.watch_tx {
                let bytes: u64 = events.iter().map(event_bytes).sum();
                let end = self.watch_published.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed) + bytes;
                // No watcher: nothing to do (send only fails without receivers).
                let _ = tx.send(WatchFeed::Events(Arc::new(WatchBatch { events, end })));
            }
        }
        if let Some(tx) = &self.lease_tx {
            for e in self.lease_events.drain(..) {
                if tx.blocking_send(e).is_err() {
                    break;
                }
            }
        }
        self.lease_events.clear();
        if !self.book_changes.is_empty() {
            let mut book = write_book(&self.book);
            for c in self.book_changes.drain(..) {
                match c {
                    BookChange::Addr(id, addr) => {
                        book.addrs.insert(id, addr);
                    }
                    BookChange::Removed(id) => {
                        book.removed.insert(id);
                    }
                    BookChange::Alarms(a) => book.alarms = a,
                }
            }
        }
        self.applied.send_replace(last.index.0);
        metrics::gauge!("cairn_raft_applied_index").set(last.index.0 as f64);
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        for (index, term, resp) in answers {
            if let Some(w) = waiters.remove(&index) {
                let resp = if w.term == term {
                    resp
                } else {
                    Response::error(
                        ErrorCode::NotLeader,
                        "a new leader replaced the proposal before it committed; it did not apply",
                    )
                };
                let _ = w.reply.send(resp);
            }
        }
        drop(waiters);
        crate::note_slow(
            "apply",
            started.elapsed(),
            format_args!(
                "applying {} entries: commands (state reads) {} ms, state write {} ms",
                entries.len(),
                commands.as_millis(),
                (written - commands).as_millis()
            ),
        );
        Ok(())
    }

    fn apply_command(&mut self, index: u64, cmd: Command, batch: &mut WriteBatch, touched: &mut Vec<u64>) -> Response {
        match cmd.op {
            CommandOp::Noop => Response::Healthy { index },
            CommandOp::Alarm { node, raise } => {
                if raise && node != 0 {
                    if self.alarms.insert(node) {
                        tracing::warn!(node, "space alarm raised: writes other than deletes are refused");
                        batch.put(alarm_key(node), Vec::new());
                    }
                } else {
                    let cleared: Vec<u64> = if node == 0 {
                        std::mem::take(&mut self.alarms).into_iter().collect()
                    } else {
                        self.alarms.take(&node).into_iter().collect()
                    };
                    for n in cleared {
                        tracing::info!(node = n, "space alarm cleared");
                        batch.delete(alarm_key(n));
                    }
                }
                self.book_changes.push(BookChange::Alarms(self.alarms.clone()));
                Response::Ok
            }
            CommandOp::SetMember { id, addr } => {
                let removed = read_book(&self.book).removed.contains(&id)
                    || self.book_changes.iter().any(|c| matches!(c, BookChange::Removed(r) if *r == id));
                if removed || id == 0 || addr.is_empty() {
                    return Response::error(
                        ErrorCode::BadRequest,
                        format!(
                            "node id {id} was removed from the cluster (ids are never reused) or the address is empty"
                        ),
                    );
                }
                batch.put(addr_key(id), addr.clone().into_bytes());
                self.book_changes.push(BookChange::Addr(id, addr));
                Response::Ok
            }
            CommandOp::SetLimits { values } => match ApplyLimits::from_values(&values) {
                Some(limits) => {
                    // The entries after this one, in this batch too, apply with them.
                    batch.put(crate::state::LIMITS_KEY.to_vec(), crate::state::encode_limits(&values));
                    self.limits = limits;
                    Response::Ok
                }
                None => Response::error(ErrorCode::BadRequest, "limits the state cannot apply with"),
            },
            CommandOp::Register => {
                // Expired sessions are dropped here, at an entry: every replica drops the same ones.
                let ttl = self.limits.session_ttl_ms;
                let expired: Vec<u64> = self
                    .sessions
                    .iter()
                    .filter(|(_, r)| r.last_active_ms.saturating_add(ttl) < cmd.time_ms)
                    .map(|(id, _)| *id)
                    .collect();
                for id in expired {
                    self.sessions.remove(&id);
                    touched.push(id);
                }
                self.sessions.insert(
                    index,
                    SessionRecord { last_active_ms: cmd.time_ms, first_unacked: 1, responses: Vec::new() },
                );
                touched.push(index);
                Response::Registered { client_id: index }
            }
            CommandOp::Write { session, ops } => {
                let mut body = Body::Write(&ops);
                let outcome = self.apply_write(index, cmd.time_ms, session, &mut body, batch, touched);
                outcome_response(outcome, None)
            }
            CommandOp::Compact { revision } => {
                if revision > self.revision {
                    return Response::error(
                        ErrorCode::BadRequest,
                        format!("revision {revision} is in the future (the cluster is at {})", self.revision),
                    );
                }
                if revision > self.compacted {
                    batch.delete_range(crate::state::history_key(0, 0), crate::state::history_key(revision, 0));
                    batch.delete_range(crate::state::changed_key(0, &[]), crate::state::changed_key(revision, &[]));
                    batch.put(crate::state::COMPACTED_KEY.to_vec(), revision.to_le_bytes().to_vec());
                    self.compacted = revision;
                    tracing::info!(revision, "history compacted");
                }
                Response::Written { index, revision: self.revision }
            }
            CommandOp::LeaseGrant { ttl_ms, owner } => {
                if !(LEASE_TTL_MIN_MS..=LEASE_TTL_MAX_MS).contains(&ttl_ms) {
                    return Response::error(
                        ErrorCode::BadRequest,
                        format!("a lease's TTL is {LEASE_TTL_MIN_MS} ms to {LEASE_TTL_MAX_MS} ms"),
                    );
                }
                if self.leases.owner_of.len() >= self.limits.leases_max {
                    return Response::error(ErrorCode::TooLarge, "too many leases (leases_max)");
                }
                if self.leases.held_by(owner) >= self.limits.leases_per_client_max {
                    return Response::error(
                        ErrorCode::TooLarge,
                        format!("client {owner} holds leases_per_client_max leases; revoke one first"),
                    );
                }
                self.leases.granted(index, owner);
                let (k, v) = (lease_key(index), crate::state::encode_lease(ttl_ms, owner));
                batch.put(k.clone(), v.clone());
                self.pending.insert(k, Some(v));
                self.lease_events.push(LeaseEvent::Granted { id: index, ttl_ms });
                Response::LeaseGranted { id: index, ttl_ms }
            }
            CommandOp::LeaseRevoke { id } => {
                let mut m = Mutation {
                    db: &self.db,
                    pending: &mut self.pending,
                    batch,
                    next: self.revision + 1,
                    changed: false,
                    events: &mut self.events,
                    event_n: 0,
                    compacted: self.compacted,
                    skip_change_records: self.skip_change_records_for_tests,
                };
                if m.stored(&lease_key(id)).is_none() {
                    return Response::error(ErrorCode::LeaseNotFound, format!("lease {id} does not exist"));
                }
                let lo = attach_key(id, &[]);
                let hi = attach_key(id + 1, &[]);
                for a in m.keys_in(&lo, &hi) {
                    let key = a[9..].to_vec();
                    if m.get(&key).is_some_and(|kv| kv.meta.lease == id) {
                        m.delete(&key);
                    }
                    m.remove(&a);
                }
                m.remove(&lease_key(id));
                if m.changed {
                    self.revision += 1;
                }
                self.leases.revoked(id);
                self.lease_events.push(LeaseEvent::Revoked { id });
                tracing::debug!(lease = id, revision = self.revision, "lease revoked");
                Response::Written { index, revision: self.revision }
            }
            CommandOp::Txn { session, compares, success, failure } => {
                let mut body = Body::Txn { compares: &compares, success: &success, failure: &failure, results: None };
                let outcome = self.apply_write(index, cmd.time_ms, session, &mut body, batch, touched);
                let results = match body {
                    Body::Txn { results, .. } => results,
                    Body::Write(_) => None,
                };
                outcome_response(outcome, results)
            }
        }
    }

    fn apply_write(
        &mut self,
        index: u64,
        time_ms: u64,
        s: Session,
        body: &mut Body<'_>,
        batch: &mut WriteBatch,
        touched: &mut Vec<u64>,
    ) -> Outcome {
        let ttl = self.limits.session_ttl_ms;
        let Some(rec) = self.sessions.get_mut(&s.client_id) else {
            return Outcome::Refused(ErrorCode::SessionExpired);
        };
        if rec.last_active_ms.saturating_add(ttl) < time_ms {
            self.sessions.remove(&s.client_id);
            touched.push(s.client_id);
            return Outcome::Refused(ErrorCode::SessionExpired);
        }
        touched.push(s.client_id);
        rec.last_active_ms = rec.last_active_ms.max(time_ms);
        if !self.ignore_sessions_for_tests {
            if let Ok(i) = rec.responses.binary_search_by_key(&s.seq, |(q, _)| *q) {
                return rec.responses[i].1;
            }
            if s.seq < rec.first_unacked {
                return Outcome::Refused(ErrorCode::StaleSequence);
            }
        }
        let no_space = match &self.local_quota_for_tests {
            Some(local) => local.load(std::sync::atomic::Ordering::Relaxed),
            None => !self.alarms.is_empty(),
        };
        let (checked, puts) = match body {
            Body::Write(ops) => (check_ops(ops, self.limits), ops.iter().any(|o| matches!(o, WriteOp::Put { .. }))),
            Body::Txn { compares, success, failure, .. } => (
                check_txn(compares, success, failure, self.limits),
                success.iter().chain(failure.iter()).any(|o| matches!(o, TxnOp::Put { .. })),
            ),
        };
        let leases: Vec<u64> = match body {
            Body::Write(ops) => ops
                .iter()
                .filter_map(|o| match o {
                    WriteOp::PutWithLease { lease, .. } => Some(*lease),
                    _ => None,
                })
                .collect(),
            Body::Txn { success, failure, .. } => success
                .iter()
                .chain(failure.iter())
                .filter_map(|o| match o {
                    TxnOp::Put { lease, .. } if *lease != 0 => Some(*lease),
                    _ => None,
                })
                .collect(),
        };
        let lease_missing = leases.iter().any(|id| {
            let k = lease_key(*id);
            match self.pending.get(&k) {
                Some(v) => v.is_none(),
                None => !matches!(self.db.get(&k), Ok(Some(_))),
            }
        });
        // A lease may hold at most keys_per_lease_max keys (counted with
        // every put of this write that names it, an upper bound).
        let over = |id: u64| {
            let now = keys_in(&self.db, &self.pending, &attach_key(id, &[]), &attach_key(id + 1, &[])).len();
            now + leases.iter().filter(|l| **l == id).count() > self.limits.keys_per_lease_max
        };
        let checked = if checked.is_ok() && lease_missing {
            Err(ErrorCode::LeaseNotFound)
        } else if checked.is_ok() && leases.iter().any(|id| over(*id)) {
            Err(ErrorCode::TooLarge)
        } else {
            checked
        };
        let outcome = match checked {
            Err(code) => Outcome::Refused(code),
            // Deletes go on, so space can be freed.
            Ok(()) if no_space && puts => Outcome::Refused(ErrorCode::NoSpace),
            Ok(()) => {
                let mut m = Mutation {
                    db: &self.db,
                    pending: &mut self.pending,
                    batch,
                    next: self.revision + 1,
                    changed: false,
                    events: &mut self.events,
                    event_n: 0,
                    compacted: self.compacted,
                    skip_change_records: self.skip_change_records_for_tests,
                };
                let outcome = match body {
                    Body::Write(ops) => {
                        for op in ops.iter() {
                            match op {
                                WriteOp::Put { key, value } => {
                                    m.put(key, value, 0);
                                }
                                WriteOp::PutWithLease { key, value, lease } => {
                                    m.put(key, value, *lease);
                                }
                                WriteOp::Delete { key } => {
                                    m.delete(key);
                                }
                                WriteOp::DeleteRange { start, end } => {
                                    m.delete_range(start, end);
                                }
                            }
                        }
                        None
                    }
                    Body::Txn { compares, success, failure, results } => {
                        let succeeded = compares.iter().all(|c| m.holds(c));
                        let branch = if succeeded { success } else { failure };
                        let mut out = Vec::with_capacity(branch.len());
                        for op in branch.iter() {
                            out.push(match op {
                                TxnOp::Put { key, value, prev_kv, lease } => {
                                    let prev = m.put(key, value, *lease);
                                    TxnOpResult::Put { prev: prev.filter(|_| *prev_kv) }
                                }
                                TxnOp::Delete { key, prev_kv } => {
                                    let prev = m.delete(key);
                                    TxnOpResult::Delete {
                                        deleted: u64::from(prev.is_some()),
                                        prev: prev.filter(|_| *prev_kv),
                                    }
                                }
                                TxnOp::DeleteRange { start, end } => {
                                    TxnOpResult::DeleteRange { deleted: m.delete_range(start, end) }
                                }
                                TxnOp::Get { key } => TxnOpResult::Get { kv: m.get(key) },
                            });
                        }
                        *results = Some(out);
                        Some(succeeded)
                    }
                };
                if m.changed {
                    self.revision += 1;
                }
                match outcome {
                    None => Outcome::Written { index, revision: self.revision },
                    Some(succeeded) => Outcome::Txn { index, revision: self.revision, succeeded },
                }
            }
        };
        let Some(rec) = self.sessions.get_mut(&s.client_id) else { return outcome };
        rec.first_unacked = rec.first_unacked.max(s.first_unacked.min(s.seq));
        let floor = rec.first_unacked;
        rec.responses.retain(|(q, _)| *q >= floor);
        // Kept in seq order; this seq is not in the list (answered above otherwise).
        let at = rec.responses.partition_point(|(q, _)| *q < s.seq);
        rec.responses.insert(at, (s.seq, outcome));
        let max = self.limits.session_responses_max.max(1);
        if rec.responses.len() > max {
            let drop = rec.responses.len() - max;
            rec.responses.drain(..drop);
            rec.first_unacked = rec.first_unacked.max(rec.responses.first().map_or(floor, |(q, _)| *q));
        }
        outcome
    }

    /// xxh3 of every key and value of the replicated state, in key order.
    pub fn hash(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for kv in self.db.range::<std::ops::RangeFull, &[u8]>(..) {
            match kv {
                Ok((k, v)) => {
                    h.update(&(k.len() as u64).to_le_bytes());
                    h.update(&k);
                    h.update(&(v.len() as u64).to_le_bytes());
                    h.update(&v);
                }
                Err(e) => crate::fatal(&format!("reading the state to hash it: {e}")),
            }
        }
        h.digest()
    }
}

/// What a client write asks: plain operations, or a transaction (whose
/// results the apply fills in).
enum Body<'a> {
    Write(&'a [WriteOp]),
    Txn { compares: &'a [Compare], success: &'a [TxnOp], failure: &'a [TxnOp], results: Option<Vec<TxnOpResult>> },
}

/// The answer to a write's outcome (`results`: a transaction's, when it
/// applied now rather than being a retry's cached outcome).
fn outcome_response(outcome: Outcome, results: Option<Vec<TxnOpResult>>) -> Response {
    match outcome {
        Outcome::Written { index, revision } => Response::Written { index, revision },
        Outcome::Txn { index, revision, succeeded } => Response::TxnDone {
            succeeded,
            index,
            revision,
            replayed: results.is_none(),
            results: results.unwrap_or_default(),
        },
        Outcome::Refused(code) => Response::error(code, refusal_message(code)),
    }
}

/// One write's changes to user keys: reads see the state as the batch
/// being applied left it; every change goes into the batch and the pending
/// overlay; `next` is the revision the write gets if it changes anything.
struct Mutation<'a> {
    db: &'a Db,
    pending: &'a mut BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    batch: &'a mut WriteBatch,
    next: u64,
    changed: bool,
    /// The events of the batch (this write's are added, revision `next`).
    events: &'a mut Vec<WatchEvent>,
    /// Events of this write so far (their number within the revision).
    event_n: u32,
    /// The oldest revision the history keeps.
    compacted: u64,
    /// Test switch: write no `c` records (a watch then cannot find the
    /// value of a replaced put).
    skip_change_records: bool,
}

impl Mutation<'_> {
    fn stored(&self, lsm_key: &[u8]) -> Option<Vec<u8>> {
        if let Some(v) = self.pending.get(lsm_key) {
            return v.clone();
        }
        match self.db.get(lsm_key) {
            Ok(v) => v.map(|b| b.to_vec()),
            Err(e) => crate::fatal(&format!("reading the state at apply: {e}")),
        }
    }

    fn get(&self, key: &[u8]) -> Option<KeyValue> {
        let stored = self.stored(&user_key(key))?;
        match decode_value(&stored) {
            Ok((meta, value)) => Some(KeyValue { key: key.to_vec(), value: value.to_vec(), meta }),
            Err(e) => crate::fatal(&format!("a stored value cannot be read at apply: {e}")),
        }
    }

    /// Records a change of a user key in the history (in the same batch)
    /// and for the watchers. The record of a put leaves its value out (it
    /// is the key's record); the value this change replaces is kept once,
    /// as the record's `prev`, and a `c` record tells the replaced put's
    /// record where it went (see [`crate::state`]).
    fn event(&mut self, kind: EventKind, kv: KeyValue, prev: Option<KeyValue>) {
        use crate::state::{HistoryRecord, changed_key, encode_change, event_key};
        if let Some(p) = &prev {
            let replaced = p.meta.mod_revision;
            if replaced == self.next {
                // Replaced within this write: one `c` record per key and
                // revision could not tell its puts apart, so the earlier
                // record keeps its value itself.
                let first = self.events.len() - self.event_n as usize;
                let earlier = self.events[first..].iter().enumerate().rev().find(|(_, e)| e.kv.key == kv.key);
                if let Some((j, e)) = earlier {
                    let record = HistoryRecord::of(e, Some(e.kv.value.clone()));
                    self.batch.put(event_key(self.next, j as u32), archived(record.encode()));
                }
            } else if replaced >= self.compacted && !self.skip_change_records {
                self.batch.put(changed_key(replaced, &kv.key), encode_change(self.next, self.event_n));
            }
        }
        let e = WatchEvent { revision: self.next, kind, kv, prev };
        // A put's value is the key's record (or, once replaced, the replacing change's `prev`).
        let value = match kind {
            EventKind::Put => None,
            EventKind::Delete => Some(Vec::new()),
        };
        self.batch.put(event_key(self.next, self.event_n), archived(HistoryRecord::of(&e, value).encode()));
        self.event_n += 1;
        self.events.push(e);
    }

    /// Writes (or removes) one LSM key, through the overlay.
    fn set(&mut self, k: Vec<u8>, v: Option<Vec<u8>>) {
        match &v {
            Some(v) => self.batch.put(k.clone(), v.clone()),
            None => self.batch.delete(k.clone()),
        };
        self.pending.insert(k, v);
    }

    /// Removes one LSM key (not a user key: no revision of its own).
    fn remove(&mut self, k: &[u8]) {
        self.set(k.to_vec(), None);
    }

    /// The LSM keys in `[lo, hi)`, as the overlay leaves them.
    fn keys_in(&self, lo: &[u8], hi: &[u8]) -> std::collections::BTreeSet<Vec<u8>> {
        keys_in(self.db, self.pending, lo, hi)
    }

    /// Sets `key` (attached to `lease`, 0: none); returns what it held.
    fn put(&mut self, key: &[u8], value: &[u8], lease: u64) -> Option<KeyValue> {
        let prev = self.get(key);
        let meta = match &prev {
            Some(p) => KeyMeta {
                create_revision: p.meta.create_revision,
                mod_revision: self.next,
                version: p.meta.version + 1,
                lease,
            },
            None => KeyMeta { create_revision: self.next, mod_revision: self.next, version: 1, lease },
        };
        let old_lease = prev.as_ref().map_or(0, |p| p.meta.lease);
        if old_lease != 0 && old_lease != lease {
            self.remove(&attach_key(old_lease, key));
        }
        if lease != 0 && old_lease != lease {
            self.set(attach_key(lease, key), Some(Vec::new()));
        }
        let k = user_key(key);
        let v = encode_value(meta, value);
        self.batch.put(k.clone(), v.clone());
        self.pending.insert(k, Some(v));
        self.changed = true;
        self.event(EventKind::Put, KeyValue { key: key.to_vec(), value: value.to_vec(), meta }, prev.clone());
        prev
    }

    /// Removes `key`; returns what it held (an absent key changes nothing).
    fn delete(&mut self, key: &[u8]) -> Option<KeyValue> {
        let prev = self.get(key)?;
        if prev.meta.lease != 0 {
            self.remove(&attach_key(prev.meta.lease, key));
        }
        let k = user_key(key);
        self.batch.delete(k.clone());
        self.pending.insert(k, None);
        self.changed = true;
        let gone = KeyValue {
            key: key.to_vec(),
            value: Vec::new(),
            meta: KeyMeta { mod_revision: self.next, ..KeyMeta::default() },
        };
        self.event(EventKind::Delete, gone, Some(prev.clone()));
        Some(prev)
    }

    /// Removes every key in `[start, end)`; returns how many there were.
    fn delete_range(&mut self, start: &[u8], end: &[u8]) -> u64 {
        let present = self.keys_in(&user_key(start), &user_key(end));
        for k in &present {
            self.delete(&k[1..]);
        }
        present.len() as u64
    }

    /// Whether a comparison holds (a missing key: version and revisions 0,
    /// every value comparison false).
    fn holds(&self, c: &Compare) -> bool {
        fn cmp<T: Ord>(a: T, op: CompareOp, b: T) -> bool {
            match op {
                CompareOp::Equal => a == b,
                CompareOp::NotEqual => a != b,
                CompareOp::Less => a < b,
                CompareOp::Greater => a > b,
            }
        }
        let kv = self.get(&c.key);
        let meta = kv.as_ref().map(|kv| kv.meta).unwrap_or_default();
        match &c.target {
            CompareTarget::Value(v) => kv.is_some_and(|kv| cmp(kv.value.as_slice(), c.op, v.as_slice())),
            CompareTarget::Version(n) => cmp(meta.version, c.op, *n),
            CompareTarget::CreateRevision(n) => cmp(meta.create_revision, c.op, *n),
            CompareTarget::ModRevision(n) => cmp(meta.mod_revision, c.op, *n),
            CompareTarget::Exists(b) => cmp(kv.is_some(), c.op, *b),
        }
    }
}

/// The LSM keys in `[lo, hi)` of `db` as the overlay `pending` leaves them.
fn keys_in(
    db: &Db,
    pending: &BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    lo: &[u8],
    hi: &[u8],
) -> std::collections::BTreeSet<Vec<u8>> {
    let mut present = std::collections::BTreeSet::new();
    for kv in db.range(lo.to_vec()..hi.to_vec()) {
        match kv {
            Ok((k, _)) => {
                present.insert(k.to_vec());
            }
            Err(e) => crate::fatal(&format!("reading the state at apply: {e}")),
        }
    }
    for (k, v) in pending.range(lo.to_vec()..hi.to_vec()) {
        if v.is_some() {
            present.insert(k.clone());
        } else {
            present.remove(k);
        }
    }
    present
}

/// Shortest lease TTL granted, ms.
pub const LEASE_TTL_MIN_MS: u64 = 1_000;
/// Longest lease TTL granted, ms (a week).
pub const LEASE_TTL_MAX_MS: u64 = 7 * 24 * 3_600_000;

/// The limits `db` holds, or `initial` when it holds none yet.
fn state_limits(db: &Db, initial: ApplyLimits) -> Result<ApplyLimits, crate::storage::StorageError> {
    match crate::state::load_limits(db)? {
        None => Ok(initial),
        Some(values) => ApplyLimits::from_values(&values).ok_or_else(|| crate::storage::StorageError::Corrupt {
            what: "limits record",
            reason: format!("values {values:?}"),
        }),
    }
}

/// Checks a transaction against the limits.
pub fn check_txn(
    compares: &[Compare],
    success: &[TxnOp],
    failure: &[TxnOp],
    limits: ApplyLimits,
) -> Result<(), ErrorCode> {
    if compares.len() + success.len() + failure.len() > limits.txn_ops_max {
        return Err(ErrorCode::TooLarge);
    }
    for c in compares {
        check_key(&c.key, limits)?;
        if let CompareTarget::Value(v) = &c.target {
            check_value(v, limits)?;
        }
    }
    for op in success.iter().chain(failure) {
        match op {
            TxnOp::Put { key, value, .. } => {
                check_key(key, limits)?;
                check_value(value, limits)?;
            }
            TxnOp::Delete { key, .. } | TxnOp::Get { key } => check_key(key, limits)?,
            TxnOp::DeleteRange { start, end } => check_range(start, end, limits)?,
        }
    }
    Ok(())
}

/// A key: not empty, not over the limit.
fn check_key(key: &[u8], limits: ApplyLimits) -> Result<(), ErrorCode> {
    if key.is_empty() {
        Err(ErrorCode::BadRequest)
    } else if key.len() > limits.key_bytes_max {
        Err(ErrorCode::TooLarge)
    } else {
        Ok(())
    }
}

/// A value: not over the limit.
fn check_value(value: &[u8], limits: ApplyLimits) -> Result<(), ErrorCode> {
    if value.len() > limits.value_bytes_max { Err(ErrorCode::TooLarge) } else { Ok(()) }
}

/// A range `[start, end)`: not empty, bounds not over the key limit.
fn check_range(start: &[u8], end: &[u8], limits: ApplyLimits) -> Result<(), ErrorCode> {
    if start >= end {
        Err(ErrorCode::BadRequest)
    } else if start.len() > limits.key_bytes_max || end.len() > limits.key_bytes_max {
        Err(ErrorCode::TooLarge)
    } else {
        Ok(())
    }
}

/// The bytes of an archived record of the state, or a stop: a state that
/// cannot be written must not be answered from.
fn archived(r: Result<Vec<u8>, cairn_kv_client::frame::FrameError>) -> Vec<u8> {
    r.unwrap_or_else(|e| crate::fatal(&format!("archiving a record of the state: {e}")))
}

/// Checks the operations of a write against the limits.
pub fn check_ops(ops: &[WriteOp], limits: ApplyLimits) -> Result<(), ErrorCode> {
    if ops.is_empty() {
        return Err(ErrorCode::BadRequest);
    }
    // Bounded like a transaction: each operation may become an event, a
    // history record and a change at one revision.
    if ops.len() > limits.txn_ops_max {
        return Err(ErrorCode::TooLarge);
    }
    for op in ops {
        match op {
            WriteOp::Put { key, value } | WriteOp::PutWithLease { key, value, .. } => {
                check_key(key, limits)?;
                check_value(value, limits)?;
            }
            WriteOp::Delete { key } => check_key(key, limits)?,
            WriteOp::DeleteRange { start, end } => check_range(start, end, limits)?,
        }
    }
    Ok(())
}

/// The sentence for a refusal at apply.
pub fn refusal_message(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::SessionExpired => "the session expired or is unknown; register again",
        ErrorCode::StaleSequence => "this sequence number was already acknowledged; use a new one",
        ErrorCode::TooLarge => "a key or value is over the limit",
        ErrorCode::NoSpace => "the cluster's space alarm is raised: only deletes are accepted until it is cleared",
        ErrorCode::BadRequest => "the write is malformed (an empty key, no operation, or an empty range)",
        ErrorCode::LeaseNotFound => "a lease the write names does not exist (never granted, expired or revoked)",
        _ => "refused",
    }
}
