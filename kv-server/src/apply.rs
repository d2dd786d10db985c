//! The apply worker: applies committed entries in log order to the LSM, one
//! LSM batch per group of entries with the last entry's (index, term) as its
//! marker, answers the proposals waiting on those entries, and keeps the
//! session table (Raft thesis §6.3) in the replicated state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cairn_kv_client::protocol::{ErrorCode, Response, Session, WriteOp};
use cairn_lsm::{Db, Marker, WriteBatch};
use cairn_raft_core::{ConfState, Entry, EntryKind, Term};
use tokio::sync::{oneshot, watch};

use crate::state::{
    Book, CONF_KEY, Command, CommandOp, Outcome, SESSION_PREFIX, SessionRecord, SharedBook, addr_key, alarm_key,
    encode_value, read_book, removed_key, session_key, user_key, write_book,
};

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

/// Limits the state machine enforces at apply (the same on every replica).
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
    sessions: HashMap<u64, SessionRecord>,
    applied: watch::Sender<u64>,
    waiters: Waiters,
    limits: ApplyLimits,
    /// Test-only: apply each write twice, ignoring the session (shows the
    /// exactly-once test catches a duplicate apply).
    pub ignore_sessions_for_tests: bool,
    /// Test-only: refuse writes from this node's own disk usage instead of
    /// the replicated alarm (breaks the disk-full rule: replicas split).
    pub local_quota_for_tests: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Test switch: merge a full snapshot's tables into the live state
    /// instead of replacing it (the seed's bug: a deleted key can come back).
    pub merge_snapshots_for_tests: bool,
}

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier").field("sessions", &self.sessions.len()).finish_non_exhaustive()
    }
}

impl Applier {
    /// A worker over `db`, loading the sessions it holds.
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
        Ok(Applier {
            shared,
            db,
            site,
            book,
            book_changes: Vec::new(),
            alarms,
            sessions,
            applied,
            waiters,
            limits,
            ignore_sessions_for_tests: false,
            local_quota_for_tests: None,
            merge_snapshots_for_tests: false,
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
            let tables: Vec<std::path::PathBuf> =
                c.manifest.files.iter().filter(|f| f.name.starts_with("table.")).map(|f| c.dir.join(&f.name)).collect();
            let marker = cairn_lsm::Marker::new(c.manifest.index, c.manifest.term);
            self.db.ingest(&tables, cairn_lsm::IngestOptions::new().marker(marker)).map_err(|e| e.to_string())?;
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
        let book =
            Book::load(&db, &self.site.initial).map_err(|e| format!("reading the installed state's members: {e}"))?;
        let old = (!delta && !merge).then(|| self.shared.replace(db.clone()));
        self.db = db;
        self.sessions = sessions;
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
            retire(old);
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
        let mut batch = WriteBatch::new();
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
        batch.set_marker(Marker::new(last.index.0, last.term.0));
        if let Err(e) = self.db.write(&batch) {
            return Err(format!("applying entries up to {} to the state: {e}", last.index.0));
        }
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
                let outcome = self.apply_write(index, cmd.time_ms, session, &ops, batch, touched);
                match outcome {
                    Outcome::Written(i) => Response::Written { index: i },
                    Outcome::Refused(code) => Response::error(code, refusal_message(code)),
                }
            }
        }
    }

    fn apply_write(
        &mut self,
        index: u64,
        time_ms: u64,
        s: Session,
        ops: &[WriteOp],
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
        let outcome = match check_ops(ops, self.limits) {
            Err(code) => Outcome::Refused(code),
            // Deletes go on, so space can be freed.
            Ok(()) if no_space && ops.iter().any(|o| matches!(o, WriteOp::Put { .. })) => {
                Outcome::Refused(ErrorCode::NoSpace)
            }
            Ok(()) => {
                for op in ops {
                    match op {
                        WriteOp::Put { key, value } => {
                            batch.put(user_key(key), encode_value(index, value));
                        }
                        WriteOp::Delete { key } => {
                            batch.delete(user_key(key));
                        }
                        WriteOp::DeleteRange { start, end } => {
                            batch.delete_range(user_key(start), user_key(end));
                        }
                    }
                }
                Outcome::Written(index)
            }
        };
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
    for op in ops {
        match op {
            WriteOp::Put { key, value } => {
                if key.is_empty() {
                    return Err(ErrorCode::BadRequest);
                }
                if key.len() > limits.key_bytes_max || value.len() > limits.value_bytes_max {
                    return Err(ErrorCode::TooLarge);
                }
            }
            WriteOp::Delete { key } => {
                if key.is_empty() {
                    return Err(ErrorCode::BadRequest);
                }
                if key.len() > limits.key_bytes_max {
                    return Err(ErrorCode::TooLarge);
                }
            }
            WriteOp::DeleteRange { start, end } => {
                if start >= end {
                    return Err(ErrorCode::BadRequest);
                }
                if start.len() > limits.key_bytes_max || end.len() > limits.key_bytes_max {
                    return Err(ErrorCode::TooLarge);
                }
            }
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
        _ => "refused",
    }
}
