//! The log as the protocol sees it: the persisted entries (through
//! [`LogStore`]) followed by entries not yet persisted.

use crate::storage::LogStore;
use crate::types::{Entry, LogIndex, Term};

/// Batches of entries counted against a byte bound until done: (last index
/// of a batch, its bytes), in index order, and their sum.
#[derive(Debug, Default)]
pub(crate) struct Batches {
    batches: std::collections::VecDeque<(LogIndex, u64)>,
    pub(crate) bytes: u64,
}

impl Batches {
    pub(crate) fn push(&mut self, last: LogIndex, bytes: u64) {
        self.batches.push_back((last, bytes));
        self.bytes += bytes;
    }

    /// Forgets the batches whose last entry is at or below `done`.
    pub(crate) fn release_through(&mut self, done: LogIndex) {
        while let Some(&(last, bytes)) = self.batches.front() {
            if last > done {
                break;
            }
            self.batches.pop_front();
            self.bytes -= bytes;
        }
    }
}

#[derive(Debug)]
pub(crate) struct RaftLog<S> {
    pub(crate) store: S,
    /// Entries not yet reported persisted, starting at `offset`; they replace
    /// any store entries at or after `offset`.
    unstable: Vec<Entry>,
    offset: LogIndex,
    /// How many of `unstable` were handed to the driver to persist.
    handed: usize,
    /// Highest index known committed.
    pub(crate) committed: LogIndex,
    /// Highest index handed to the driver to apply.
    pub(crate) applied_handed: LogIndex,
    /// Highest index the driver reported applied.
    pub(crate) applied: LogIndex,
    /// Batches handed to apply and not yet reported applied.
    pub(crate) applying: Batches,
    /// Highest index durable here (with the term the log has there).
    pub(crate) persisted: LogIndex,
    /// A snapshot received and not yet installed by the driver.
    pub(crate) pending_snapshot: Option<(LogIndex, Term)>,
    pub(crate) pending_snapshot_conf: crate::ConfState,
    /// Whether it was handed to the driver.
    pub(crate) snapshot_handed: bool,
}

impl<S: LogStore> RaftLog<S> {
    /// A log over `store`, whose state machine has applied up to `applied`
    /// (durably: for Cairn, the LSM's durable marker).
    pub(crate) fn new(store: S, applied: LogIndex) -> Self {
        let hs = store.hard_state();
        let last = store.last_index();
        // Never hand out an entry before the snapshot or what was applied;
        // never believe a commit beyond the durable log.
        let applied = applied.max(store.first_index().prev()).min(last);
        let committed = hs.commit.max(applied).min(last);
        RaftLog {
            offset: last.next(),
            store,
            unstable: Vec::new(),
            handed: 0,
            committed,
            applied_handed: applied,
            applied,
            applying: Batches::default(),
            persisted: last,
            pending_snapshot: None,
            pending_snapshot_conf: crate::ConfState::default(),
            snapshot_handed: false,
        }
    }

    /// The index of the first entry this log still holds.
    pub(crate) fn first_index(&self) -> LogIndex {
        match self.pending_snapshot {
            Some((i, _)) => i.next(),
            None => self.store.first_index(),
        }
    }

    /// Replaces the whole log by a snapshot at (`index`, `term`) (Raft §7).
    pub(crate) fn restore(&mut self, index: LogIndex, term: Term, conf: crate::ConfState) {
        self.pending_snapshot_conf = conf;
        self.unstable.clear();
        self.handed = 0;
        self.offset = index.next();
        self.committed = index;
        self.applied_handed = index;
        self.applied = index;
        self.applying = Batches::default();
        self.persisted = index;
        self.pending_snapshot = Some((index, term));
        self.snapshot_handed = false;
    }

    pub(crate) fn last_index(&self) -> LogIndex {
        match (self.unstable.last(), self.pending_snapshot) {
            (Some(e), _) => e.index,
            (None, Some((i, _))) => i,
            (None, None) => self.store.last_index(),
        }
    }

    pub(crate) fn term(&self, i: LogIndex) -> Option<Term> {
        if !self.unstable.is_empty() && i >= self.offset {
            return self.unstable.get((i.0 - self.offset.0) as usize).map(|e| e.term);
        }
        if let Some((si, st)) = self.pending_snapshot {
            // The store still holds the old log until the driver installs the snapshot.
            return if i == si { Some(st) } else { None };
        }
        if i > self.store.last_index() {
            return None;
        }
        self.store.term(i)
    }

    pub(crate) fn last_term(&self) -> Term {
        self.term(self.last_index()).unwrap_or_default()
    }

    /// Whether a log ending at (`index`, `term`) is at least as up to date as this one.
    pub(crate) fn is_up_to_date(&self, index: LogIndex, term: Term) -> bool {
        (term, index) >= (self.last_term(), self.last_index())
    }

    /// Entries `[lo, hi)`, at most `bytes_max` bytes (at least one); `lo` at
    /// least `first_index`.
    pub(crate) fn slice(&self, lo: LogIndex, hi: LogIndex, bytes_max: u64) -> Vec<Entry> {
        let mut out = Vec::new();
        if lo >= hi || lo < self.first_index() {
            return out;
        }
        let split = if self.unstable.is_empty() { hi } else { self.offset.min(hi) };
        if lo < split {
            out = self.store.entries(lo, split, bytes_max);
            if (out.len() as u64) < split.0 - lo.0 {
                return out;
            }
        }
        let mut bytes: u64 = out.iter().map(Entry::size_bytes).sum();
        let from = lo.max(self.offset);
        for i in from.0..hi.0 {
            let Some(e) = self.unstable.get((i - self.offset.0) as usize) else { break };
            bytes += e.size_bytes();
            if !out.is_empty() && bytes > bytes_max {
                break;
            }
            out.push(e.clone());
        }
        out
    }

    /// Appends entries, replacing every entry at or after the first one's index.
    pub(crate) fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        assert!(first.index <= self.last_index().next(), "append leaves a hole");
        assert!(first.index > self.committed, "a committed entry is never replaced");
        if !self.unstable.is_empty() && first.index >= self.offset {
            let keep = (first.index.0 - self.offset.0) as usize;
            self.unstable.truncate(keep);
            self.handed = self.handed.min(keep);
        } else {
            self.unstable.clear();
            self.offset = first.index;
            self.handed = 0;
        }
        self.unstable.extend_from_slice(entries);
        self.persisted = self.persisted.min(first.index.prev());
    }

    /// A follower's append: checks the previous entry, skips entries already
    /// present with the same term, replaces from the first conflict. Returns
    /// the last index the message covers, or `None` when `prev` does not match.
    pub(crate) fn maybe_append(&mut self, prev: LogIndex, prev_term: Term, entries: &[Entry]) -> Option<LogIndex> {
        if self.term(prev) != Some(prev_term) {
            return None;
        }
        let last_new = LogIndex(prev.0 + entries.len() as u64);
        if let Some(pos) = entries.iter().position(|e| self.term(e.index) != Some(e.term)) {
            self.append(&entries[pos..]);
        }
        Some(last_new)
    }

    /// Entries to hand to the driver to persist (not handed before).
    pub(crate) fn unhanded(&self) -> &[Entry] {
        &self.unstable[self.handed..]
    }

    pub(crate) fn mark_handed(&mut self, n: usize) {
        self.handed = (self.handed + n).min(self.unstable.len());
    }

    /// The driver made the log durable up to `index`, whose entry had `term`.
    /// A report about entries replaced since is ignored.
    pub(crate) fn on_persisted(&mut self, index: LogIndex, term: Term) {
        if self.term(index) != Some(term) {
            return;
        }
        if !self.unstable.is_empty() && index >= self.offset {
            let n = ((index.0 - self.offset.0 + 1) as usize).min(self.handed);
            self.unstable.drain(..n);
            self.handed -= n;
            self.offset = LogIndex(self.offset.0 + n as u64);
        }
        // Everything up to `index` is durable only if nothing before it is
        // still waiting (entries are persisted in order).
        let durable_to = if self.unstable.is_empty() { index } else { index.min(self.offset.prev()) };
        self.persisted = self.persisted.max(durable_to);
    }

    /// Committed entries to hand to the driver to apply: only entries already
    /// durable here (`persisted`), unless `apply_unpersisted` (a test mutation);
    /// at most `bytes_max`, and none while `applying_max` bytes or more were
    /// handed out and not yet reported applied (at least one entry otherwise,
    /// so an entry larger than the bound still goes, alone).
    pub(crate) fn to_apply(&self, bytes_max: u64, applying_max: u64, apply_unpersisted: bool) -> Vec<Entry> {
        let limit = if apply_unpersisted { self.committed } else { self.committed.min(self.persisted) };
        if limit <= self.applied_handed || self.applying.bytes >= applying_max {
            return Vec::new();
        }
        let room = applying_max - self.applying.bytes;
        self.slice(self.applied_handed.next(), limit.next(), bytes_max.min(room))
    }

    /// The driver took `entries` (from [`RaftLog::to_apply`]) to apply.
    pub(crate) fn handed_to_apply(&mut self, entries: &[Entry]) {
        let Some(last) = entries.last() else { return };
        self.applied_handed = self.applied_handed.max(last.index);
        self.applying.push(last.index, entries.iter().map(Entry::size_bytes).sum());
    }

    /// The driver applied up to `index`: batches wholly applied leave the
    /// bytes being applied.
    pub(crate) fn applied_to(&mut self, index: LogIndex) {
        self.applied = self.applied.max(index.min(self.applied_handed));
        self.applying.release_through(self.applied);
    }

    pub(crate) fn commit_to(&mut self, index: LogIndex) {
        if index > self.committed {
            assert!(index <= self.last_index(), "commit index {index:?} beyond the log");
            self.committed = index;
        }
    }

    /// The whole log as it stands (store then unstable), for tests.
    pub(crate) fn all_entries(&self) -> Vec<Entry> {
        self.slice(self.first_index(), self.last_index().next(), u64::MAX)
    }

    /// The snapshot to hand to the driver, if not handed yet.
    pub(crate) fn snapshot_to_install(&self) -> Option<(LogIndex, Term)> {
        self.pending_snapshot.filter(|_| !self.snapshot_handed)
    }

    /// The driver installed the snapshot: the store now starts after it.
    pub(crate) fn snapshot_installed(&mut self, index: LogIndex) {
        if self.pending_snapshot.is_some_and(|(i, _)| i == index) && self.store.first_index() == index.next() {
            self.pending_snapshot = None;
        }
    }
}
