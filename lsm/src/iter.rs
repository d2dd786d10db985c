//! Merging iterators: the sources (memtables, L0 tables, levels), their
//! merge in internal-key order, range-tombstone fragments, and the public
//! iterator that turns versions into visible key-value pairs.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::ops::Bound;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::Result;
use crate::memtable::MemIter;
use crate::table::{Table, TableIter};
use crate::types::{InternalEntry, RangeTombstone, Seqno, ValueKind, cmp_internal, trailer_kind};
use crate::version::Version;

/// The tables of one level ≥ 1, concatenated (they never overlap).
pub(crate) struct LevelIter {
    tables: Vec<Arc<Table>>,
    next: usize,
    forward: bool,
    start: Option<Vec<u8>>,
    cur: Option<TableIter>,
    /// Set for a compaction's forward scan: each table is read this many
    /// bytes at a time, outside the block cache ([`TableIter::reading_ahead`]).
    readahead: Option<usize>,
}

impl LevelIter {
    /// `tables` sorted by key; iterates them in `forward` order from `start`.
    pub(crate) fn new(mut tables: Vec<Arc<Table>>, forward: bool, start: Option<&[u8]>) -> LevelIter {
        if !forward {
            tables.reverse();
        }
        if let Some(s) = start {
            // Skip the tables entirely before the start (in iteration order).
            if forward {
                tables.retain(|t| t.props.largest.as_ref() >= s);
            } else {
                tables.retain(|t| t.props.smallest.as_ref() <= s);
            }
        }
        LevelIter { tables, next: 0, forward, start: start.map(<[u8]>::to_vec), cur: None, readahead: None }
    }

    /// Reads each table as a compaction does: `bytes` at a time, without
    /// filling the block cache. One table's window is held at a time.
    pub(crate) fn reading_ahead(mut self, bytes: usize) -> LevelIter {
        self.readahead = Some(bytes);
        self
    }

    fn next_entry(&mut self) -> Result<Option<InternalEntry>> {
        loop {
            if let Some(c) = &mut self.cur {
                if let Some(e) = c.next_entry()? {
                    return Ok(Some(e));
                }
                self.cur = None;
            }
            let Some(t) = self.tables.get(self.next) else { return Ok(None) };
            let start = if self.next == 0 { self.start.as_deref() } else { None };
            let it = TableIter::new(Arc::clone(t), self.forward, start);
            self.cur = Some(match self.readahead {
                Some(bytes) => it.reading_ahead(bytes),
                None => it,
            });
            self.next += 1;
        }
    }
}

/// One input of a merge.
pub(crate) enum Source {
    Mem(MemIter),
    Table(TableIter),
    Level(LevelIter),
}

impl Source {
    fn next_entry(&mut self) -> Result<Option<InternalEntry>> {
        match self {
            Source::Mem(m) => Ok(m.next_entry()),
            Source::Table(t) => t.next_entry(),
            Source::Level(l) => l.next_entry(),
        }
    }
}

struct HeapItem {
    e: InternalEntry,
    src: usize,
    forward: bool,
}

impl Ord for HeapItem {
    fn cmp(&self, o: &Self) -> Ordering {
        let c = cmp_internal(&self.e.user, self.e.trailer, &o.e.user, o.e.trailer).then(self.src.cmp(&o.src));
        // BinaryHeap pops the greatest: reverse for a forward (ascending) merge.
        if self.forward { c.reverse() } else { c }
    }
}
impl PartialOrd for HeapItem {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl PartialEq for HeapItem {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for HeapItem {}

/// Every version from every source, in internal-key order (forward) or its
/// reverse (backward: user keys descending, each key's versions oldest first).
pub(crate) struct Merge {
    sources: Vec<Source>,
    heap: BinaryHeap<HeapItem>,
    forward: bool,
    started: bool,
}

impl Merge {
    pub(crate) fn new(sources: Vec<Source>, forward: bool) -> Merge {
        Merge { heap: BinaryHeap::with_capacity(sources.len()), sources, forward, started: false }
    }

    pub(crate) fn next_entry(&mut self) -> Result<Option<InternalEntry>> {
        if !self.started {
            self.started = true;
            for i in 0..self.sources.len() {
                if let Some(e) = self.sources[i].next_entry()? {
                    self.heap.push(HeapItem { e, src: i, forward: self.forward });
                }
            }
        }
        let Some(top) = self.heap.pop() else { return Ok(None) };
        if let Some(e) = self.sources[top.src].next_entry()? {
            self.heap.push(HeapItem { e, src: top.src, forward: self.forward });
        }
        Ok(Some(top.e))
    }
}

/// Range tombstones as non-overlapping fragments, each with the highest
/// sequence number covering it.
#[derive(Debug, Default)]
pub(crate) struct Fragments {
    bounds: Vec<Bytes>,
    /// `seqs[i]` covers `[bounds[i], bounds[i + 1])`; 0 = nothing.
    seqs: Vec<Seqno>,
}

impl Fragments {
    /// Fragments of the tombstones visible at `snap`.
    pub(crate) fn new(ts: &[RangeTombstone], snap: Seqno) -> Fragments {
        let ts: Vec<&RangeTombstone> = ts.iter().filter(|t| t.seq <= snap && t.start < t.end).collect();
        if ts.is_empty() {
            return Fragments::default();
        }
        let mut bounds: Vec<Bytes> = ts.iter().flat_map(|t| [t.start.clone(), t.end.clone()]).collect();
        bounds.sort();
        bounds.dedup();
        let mut seqs = vec![0; bounds.len()];
        for t in ts {
            let lo = bounds.partition_point(|b| *b < t.start);
            let hi = bounds.partition_point(|b| *b < t.end);
            for s in &mut seqs[lo..hi] {
                *s = (*s).max(t.seq);
            }
        }
        Fragments { bounds, seqs }
    }

    /// The highest sequence number of a tombstone covering `key` (0 if none).
    pub(crate) fn covering(&self, key: &[u8]) -> Seqno {
        let i = self.bounds.partition_point(|b| b.as_ref() <= key);
        if i == 0 { 0 } else { self.seqs[i - 1] }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.bounds.is_empty()
    }
}

/// Keeps the sources of an iterator alive (memtables and tables it reads).
pub(crate) type Pin = Arc<dyn Send + Sync>;

/// An iterator over visible key-value pairs, in key order (or reverse), as of
/// one sequence number. Holds the memtables and tables it reads (they stay
/// readable even if flushed or compacted meanwhile).
pub struct Iter {
    _pin: Pin,
    /// The version read, to resolve blob references.
    version: Arc<Version>,
    merge: Merge,
    snap: Seqno,
    lower: Bound<Bytes>,
    upper: Bound<Bytes>,
    forward: bool,
    fragments: Fragments,
    pending: Option<InternalEntry>,
    done: bool,
}

impl std::fmt::Debug for Iter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iter").field("snap", &self.snap).field("forward", &self.forward).finish_non_exhaustive()
    }
}

fn above(b: &Bound<Bytes>, k: &[u8]) -> bool {
    match b {
        Bound::Included(u) => k > u.as_ref(),
        Bound::Excluded(u) => k >= u.as_ref(),
        Bound::Unbounded => false,
    }
}

fn below(b: &Bound<Bytes>, k: &[u8]) -> bool {
    match b {
        Bound::Included(l) => k < l.as_ref(),
        Bound::Excluded(l) => k <= l.as_ref(),
        Bound::Unbounded => false,
    }
}

impl Iter {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        pin: Pin,
        version: Arc<Version>,
        merge: Merge,
        snap: Seqno,
        lower: Bound<Bytes>,
        upper: Bound<Bytes>,
        forward: bool,
        fragments: Fragments,
    ) -> Iter {
        Iter { _pin: pin, version, merge, snap, lower, upper, forward, fragments, pending: None, done: false }
    }

    fn step(&mut self) -> Result<Option<(Bytes, Bytes)>> {
        while !self.done {
            let first = match self.pending.take() {
                Some(e) => e,
                None => match self.merge.next_entry()? {
                    Some(e) => e,
                    None => {
                        self.done = true;
                        return Ok(None);
                    }
                },
            };
            if (self.forward && above(&self.upper, &first.user)) || (!self.forward && below(&self.lower, &first.user)) {
                self.done = true;
                return Ok(None);
            }
            let mut best = (first.seq() <= self.snap).then_some(first.clone());
            loop {
                match self.merge.next_entry()? {
                    Some(e) if e.user == first.user => {
                        if e.seq() <= self.snap && best.as_ref().is_none_or(|b| e.seq() > b.seq()) {
                            best = Some(e);
                        }
                    }
                    other => {
                        self.pending = other;
                        break;
                    }
                }
            }
            let exhausted = self.pending.is_none();
            let out_of_range = below(&self.lower, &first.user) || above(&self.upper, &first.user);
            let result = match best {
                Some(b) if !out_of_range && trailer_kind(b.trailer).is_some_and(ValueKind::is_value) => {
                    (self.fragments.is_empty() || self.fragments.covering(&b.user) <= b.seq()).then_some(b)
                }
                _ => None,
            };
            if exhausted {
                self.done = true;
            }
            if let Some(b) = result {
                if trailer_kind(b.trailer) == Some(ValueKind::BlobRef) {
                    return Ok(Some((b.user, self.version.read_blob(&b.value)?)));
                }
                return Ok(Some((b.user, b.value)));
            }
        }
        Ok(None)
    }
}

impl Iterator for Iter {
    type Item = Result<(Bytes, Bytes)>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.step() {
            Ok(Some(kv)) => Some(Ok(kv)),
            Ok(None) => None,
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}
