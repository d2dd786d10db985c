//! The persisted log, as raft-core reads it.

use crate::conf::ConfState;
use crate::types::{Entry, HardState, LogIndex, Term};

/// What raft-core reads of the persisted log. The driver writes it (the
/// entries and hard state of each `Ready`, and installs snapshots) and reports
/// with `RawNode::on_persisted`; kv-server implements it over cairn-wal.
pub trait LogStore {
    /// The persisted hard state.
    fn hard_state(&self) -> HardState;
    /// Index of the first entry available. Entries before it were released
    /// because a snapshot covers them: the snapshot's index is `first_index - 1`.
    fn first_index(&self) -> LogIndex;
    /// Index of the last persisted entry (`first_index - 1` when empty).
    fn last_index(&self) -> LogIndex;
    /// Term of the entry at `index`; `None` if it is not available.
    /// `first_index - 1` must answer: it is the snapshot's term.
    fn term(&self, index: LogIndex) -> Option<Term>;
    /// Entries `[lo, hi)`, at most `bytes_max` bytes (at least one if any);
    /// `lo` is at least `first_index`.
    fn entries(&self, lo: LogIndex, hi: LogIndex, bytes_max: u64) -> Vec<Entry>;
    /// The membership as of the snapshot (`first_index - 1`).
    fn snapshot_conf(&self) -> ConfState;
}

/// An in-memory log store, for tests and the simulator.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    hard_state: HardState,
    /// The snapshot the log starts after: (index, term), and the membership then.
    snapshot: (LogIndex, Term),
    snapshot_conf: ConfState,
    entries: Vec<Entry>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn pos(&self, index: LogIndex) -> Option<usize> {
        index.0.checked_sub(self.snapshot.0.0 + 1).map(|p| p as usize)
    }

    /// Appends entries, first dropping every entry at or after the first one's
    /// index (a new leader overwrote them).
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        let pos = self.pos(first.index).expect("appended entries start after the snapshot");
        assert!(pos <= self.entries.len(), "entries leave a hole in the log");
        self.entries.truncate(pos);
        self.entries.extend_from_slice(entries);
    }

    /// Sets the hard state.
    pub fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    /// Releases the entries up to `index` (a snapshot covers them); `conf` is
    /// the membership as of `index`.
    pub fn compact(&mut self, index: LogIndex, conf: ConfState) {
        if index <= self.snapshot.0 {
            return;
        }
        let term = self.term(index).expect("compact to an index in the log");
        let n = self.pos(index).map_or(0, |p| p + 1);
        self.entries.drain(..n);
        self.snapshot = (index, term);
        self.snapshot_conf = conf;
    }

    /// Installs a snapshot at (`index`, `term`): the log is emptied and starts after it.
    pub fn apply_snapshot(&mut self, index: LogIndex, term: Term, conf: ConfState) {
        self.entries.clear();
        self.snapshot = (index, term);
        self.snapshot_conf = conf;
        self.hard_state.commit = self.hard_state.commit.max(index);
    }

    /// The retained entries.
    pub fn all(&self) -> &[Entry] {
        &self.entries
    }
}

impl LogStore for MemStore {
    fn hard_state(&self) -> HardState {
        self.hard_state
    }
    fn first_index(&self) -> LogIndex {
        self.snapshot.0.next()
    }
    fn last_index(&self) -> LogIndex {
        LogIndex(self.snapshot.0.0 + self.entries.len() as u64)
    }
    fn term(&self, index: LogIndex) -> Option<Term> {
        if index == self.snapshot.0 {
            return Some(self.snapshot.1);
        }
        self.entries.get(self.pos(index)?).map(|e| e.term)
    }
    fn snapshot_conf(&self) -> ConfState {
        self.snapshot_conf.clone()
    }
    fn entries(&self, lo: LogIndex, hi: LogIndex, bytes_max: u64) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for i in lo.0..hi.0 {
            let Some(e) = self.pos(LogIndex(i)).and_then(|p| self.entries.get(p)) else { break };
            bytes += e.size_bytes();
            if !out.is_empty() && bytes > bytes_max {
                break;
            }
            out.push(e.clone());
        }
        out
    }
}
