//! The persisted log, as raft-core reads it.

use crate::types::{Entry, HardState, LogIndex, Term};

/// What raft-core reads of the persisted log. The driver writes it (the
/// entries and hard state of each `Ready`) and reports with
/// `RawNode::on_persisted`; kv-server implements it over cairn-wal.
pub trait LogStore {
    /// The persisted hard state.
    fn hard_state(&self) -> HardState;
    /// Index of the first entry available (entries before were compacted away).
    fn first_index(&self) -> LogIndex;
    /// Index of the last persisted entry (first_index - 1 when empty).
    fn last_index(&self) -> LogIndex;
    /// Term of the entry at `index`; `None` if it is not available
    /// (`first_index - 1` must answer: the term before the first entry).
    fn term(&self, index: LogIndex) -> Option<Term>;
    /// Entries `[lo, hi)`, at most `bytes_max` bytes (at least one if any).
    fn entries(&self, lo: LogIndex, hi: LogIndex, bytes_max: u64) -> Vec<Entry>;
}

/// An in-memory log store, for tests and the simulator.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    hard_state: HardState,
    entries: Vec<Entry>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends entries, first dropping every entry at or after the first one's
    /// index (a new leader overwrote them).
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        assert!(
            first.index.0 >= 1 && first.index.0 <= self.entries.len() as u64 + 1,
            "entries leave a hole in the log"
        );
        self.entries.truncate(first.index.0 as usize - 1);
        self.entries.extend_from_slice(entries);
    }

    /// Sets the hard state.
    pub fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    /// All entries.
    pub fn all(&self) -> &[Entry] {
        &self.entries
    }
}

impl LogStore for MemStore {
    fn hard_state(&self) -> HardState {
        self.hard_state
    }
    fn first_index(&self) -> LogIndex {
        LogIndex(1)
    }
    fn last_index(&self) -> LogIndex {
        LogIndex(self.entries.len() as u64)
    }
    fn term(&self, index: LogIndex) -> Option<Term> {
        if index.0 == 0 {
            return Some(Term(0));
        }
        self.entries.get(index.0 as usize - 1).map(|e| e.term)
    }
    fn entries(&self, lo: LogIndex, hi: LogIndex, bytes_max: u64) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for i in lo.0..hi.0 {
            let Some(e) = self.entries.get(i as usize - 1) else { break };
            bytes += e.size_bytes();
            if !out.is_empty() && bytes > bytes_max {
                break;
            }
            out.push(e.clone());
        }
        out
    }
}
