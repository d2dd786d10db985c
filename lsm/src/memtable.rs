//! The memtable: a lock-free skip list (crossbeam-skiplist) of internal keys,
//! plus the range tombstones written into it. Kept behind this small type so
//! the skip list could be swapped.

use std::cmp::Ordering;
use std::ops::Bound;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering as AtOrd};

use bytes::Bytes;
use crossbeam_skiplist::SkipMap;

use crate::types::{InternalEntry, Marker, RangeTombstone, Seqno, ValueKind, trailer};

/// Per-entry bytes charged besides key and value: the skip-list node (key
/// prefix, two `Bytes` headers, trailer, tower) and its allocation header.
pub(crate) const ENTRY_OVERHEAD_BYTES: usize = 128;
/// Keys and values are copied into chunks of at most this size (one
/// allocation and one free per chunk, not per entry); entries above a quarter
/// chunk get their own allocation.
const ARENA_CHUNK_BYTES_MAX: usize = 256 << 10;

/// The arena chunk size for a write buffer of `write_buffer_bytes`: small
/// enough that a chunk is a small part of a memtable.
pub(crate) fn arena_chunk_bytes(write_buffer_bytes: usize) -> usize {
    (write_buffer_bytes / 16).clamp(512, ARENA_CHUNK_BYTES_MAX)
}
const ITER_CHUNK: usize = 256;

/// The filter bits of a memtable for `write_buffer_bytes` with
/// `bits_per_entry` (0: none): enough for the most entries such a memtable
/// holds (each is charged at least [`ENTRY_OVERHEAD_BYTES`]).
pub(crate) fn filter_bits(write_buffer_bytes: usize, bits_per_entry: u32) -> usize {
    if bits_per_entry == 0 {
        return 0;
    }
    let entries = (write_buffer_bytes / ENTRY_OVERHEAD_BYTES).max(64);
    entries.saturating_mul(bits_per_entry as usize).next_power_of_two()
}

/// A blocked Bloom filter of a memtable's user keys: the four bits of a key
/// lie in one 64-bit word (one cache miss per probe). Bits are set before the
/// key enters the skip list, which is before the write's sequence number is
/// published (a release), so a reader that can see the key sees its bits.
#[derive(Debug)]
struct KeyFilter {
    words: Box<[AtomicU64]>,
    mask: u64,
}

impl KeyFilter {
    fn new(bits: usize) -> Option<KeyFilter> {
        let words = bits / 64;
        (words > 0).then(|| KeyFilter {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            mask: (words as u64).next_power_of_two() - 1,
        })
    }

    fn probe(&self, key: &[u8]) -> (usize, u64) {
        let h = xxhash_rust::xxh3::xxh3_64(key);
        let bits = (1u64 << (h & 63)) | (1 << ((h >> 6) & 63)) | (1 << ((h >> 12) & 63)) | (1 << ((h >> 18) & 63));
        (((h >> 24) & self.mask) as usize, bits)
    }

    fn add(&self, key: &[u8]) {
        let (w, bits) = self.probe(key);
        self.words[w].fetch_or(bits, AtOrd::Relaxed);
    }

    fn may_contain(&self, key: &[u8]) -> bool {
        let (w, bits) = self.probe(key);
        self.words[w].load(AtOrd::Relaxed) & bits == bits
    }
}

/// A memtable key. `prefix` holds the first 16 bytes of the user key, big
/// endian and zero-padded, so most comparisons are one integer compare
/// instead of a `memcmp` call; a tie falls back to the whole key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MemKey {
    prefix: u128,
    user: Bytes,
    trailer: u64,
}

use crate::table::key_prefix as prefix_of;

impl MemKey {
    fn new(user: Bytes, trailer: u64) -> MemKey {
        MemKey { prefix: prefix_of(&user), user, trailer }
    }
}

impl Ord for MemKey {
    fn cmp(&self, o: &Self) -> Ordering {
        self.prefix.cmp(&o.prefix).then_with(|| self.user.cmp(&o.user)).then(o.trailer.cmp(&self.trailer))
    }
}

impl PartialOrd for MemKey {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// One memtable.
#[derive(Debug)]
pub(crate) struct Memtable {
    pub(crate) id: u64,
    map: SkipMap<MemKey, Bytes>,
    filter: Option<KeyFilter>,
    arena: Mutex<bytes::BytesMut>,
    chunk_bytes: usize,
    range_dels: Mutex<Vec<RangeTombstone>>,
    range_del_count: AtomicUsize,
    bytes: AtomicUsize,
    seq_min: AtomicU64,
    seq_max: AtomicU64,
    markers: Mutex<Option<(Marker, Marker)>>,
    /// The marker of the last write before this memtable (`None`: nothing
    /// was written before): with its own markers, the range it covers.
    after: Mutex<Option<Marker>>,
}

impl Memtable {
    /// A memtable whose writes follow those up to the marker `after`, with
    /// a key filter of `filter_bits` bits (0: none; see [`filter_bits`]).
    pub(crate) fn new(id: u64, chunk_bytes: usize, filter_bits: usize, after: Option<Marker>) -> Memtable {
        Memtable {
            id,
            map: SkipMap::new(),
            filter: KeyFilter::new(filter_bits),
            arena: Mutex::new(bytes::BytesMut::new()),
            chunk_bytes,
            range_dels: Mutex::new(Vec::new()),
            range_del_count: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            seq_min: AtomicU64::new(u64::MAX),
            seq_max: AtomicU64::new(0),
            markers: Mutex::new(None),
            after: Mutex::new(after),
        }
    }

    fn note_seq(&self, seq: Seqno, bytes: usize) {
        self.seq_min.fetch_min(seq, AtOrd::Relaxed);
        self.seq_max.fetch_max(seq, AtOrd::Relaxed);
        self.bytes.fetch_add(bytes, AtOrd::Relaxed);
    }

    /// Copies `user` and `value` into the arena and inserts them.
    pub(crate) fn insert(&self, user: &[u8], seq: Seqno, kind: ValueKind, value: &[u8]) {
        let need = user.len() + value.len();
        let mut charged = ENTRY_OVERHEAD_BYTES;
        let (k, v) = if need > self.chunk_bytes / 4 {
            charged += need;
            (Bytes::copy_from_slice(user), Bytes::copy_from_slice(value))
        } else {
            let mut a = self.arena.lock().unwrap_or_else(|e| e.into_inner());
            if a.capacity() - a.len() < need {
                *a = bytes::BytesMut::with_capacity(self.chunk_bytes);
                charged += self.chunk_bytes;
            }
            a.extend_from_slice(user);
            let k = a.split().freeze();
            a.extend_from_slice(value);
            (k, a.split().freeze())
        };
        if let Some(f) = &self.filter {
            f.add(user);
        }
        self.map.insert(MemKey::new(k, trailer(seq, kind)), v);
        self.note_seq(seq, charged);
    }

    pub(crate) fn insert_range_delete(&self, t: RangeTombstone) {
        let n = t.start.len() + t.end.len() + ENTRY_OVERHEAD_BYTES;
        let seq = t.seq;
        self.range_dels.lock().unwrap_or_else(|e| e.into_inner()).push(t);
        self.range_del_count.fetch_add(1, AtOrd::Release);
        self.note_seq(seq, n);
    }

    /// Records that writes up to `m` are in this memtable.
    pub(crate) fn note_marker(&self, m: Marker) {
        let mut g = self.markers.lock().unwrap_or_else(|e| e.into_inner());
        *g = Some(match *g {
            None => (m, m),
            Some((lo, hi)) => (lo.min(m), hi.max(m)),
        });
    }

    pub(crate) fn markers(&self) -> Option<(Marker, Marker)> {
        *self.markers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The marker its coverage starts after.
    pub(crate) fn after(&self) -> Option<Marker> {
        *self.after.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves its coverage start back to `to` (an older memtable that held
    /// markers but no data was flushed without a table: its range joins this one).
    pub(crate) fn extend_after(&self, to: Option<Marker>) {
        let mut g = self.after.lock().unwrap_or_else(|e| e.into_inner());
        *g = (*g).min(to);
    }

    pub(crate) fn approximate_bytes(&self) -> usize {
        self.bytes.load(AtOrd::Relaxed)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty() && self.range_del_count.load(AtOrd::Acquire) == 0
    }

    pub(crate) fn seq_range(&self) -> (Seqno, Seqno) {
        (self.seq_min.load(AtOrd::Relaxed), self.seq_max.load(AtOrd::Relaxed))
    }

    /// The newest version of `key` with sequence number ≤ `snap`.
    pub(crate) fn get(&self, key: &[u8], snap: Seqno) -> Option<(u64, Bytes)> {
        if self.filter.as_ref().is_some_and(|f| !f.may_contain(key)) {
            return None;
        }
        let probe = MemKey::new(Bytes::copy_from_slice(key), (snap << 8) | 0xff);
        let e = self.map.lower_bound(Bound::Included(&probe))?;
        (e.key().user.as_ref() == key).then(|| (e.key().trailer, e.value().clone()))
    }

    pub(crate) fn has_range_deletes(&self) -> bool {
        self.range_del_count.load(AtOrd::Acquire) > 0
    }

    /// Copies of the range tombstones.
    pub(crate) fn range_deletes(&self) -> Vec<RangeTombstone> {
        if !self.has_range_deletes() {
            return Vec::new();
        }
        self.range_dels.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The highest sequence number ≤ `snap` of a range tombstone covering `key`.
    pub(crate) fn covering_range_delete(&self, key: &[u8], snap: Seqno) -> Option<Seqno> {
        if !self.has_range_deletes() {
            return None;
        }
        let g = self.range_dels.lock().unwrap_or_else(|e| e.into_inner());
        g.iter().filter(|t| t.seq <= snap && t.covers(key)).map(|t| t.seq).max()
    }

    pub(crate) fn entry_count(&self) -> usize {
        self.map.len()
    }

    /// Calls `f` with every entry in order (user key, trailer, value),
    /// borrowed: for a flush, which reads a sealed memtable once. Unlike
    /// [`MemIter`] it copies no handle of a key or value into a buffer.
    pub(crate) fn for_each_entry<E>(&self, mut f: impl FnMut(&[u8], u64, &[u8]) -> Result<(), E>) -> Result<(), E> {
        for e in self.map.iter() {
            let k = e.key();
            f(&k.user, k.trailer, e.value())?;
        }
        Ok(())
    }
}

/// Iterates a memtable in chunks copied out under short borrows, so the
/// iterator owns its memtable handle.
pub(crate) struct MemIter {
    mem: std::sync::Arc<Memtable>,
    forward: bool,
    /// The last key handed out (exclusive bound of the next chunk).
    after: Option<MemKey>,
    start: Option<MemKey>,
    buf: std::collections::VecDeque<InternalEntry>,
    done: bool,
}

impl MemIter {
    /// Forward from the first version of `start`, or backward from the last version of `start`.
    pub(crate) fn new(mem: std::sync::Arc<Memtable>, forward: bool, start: Option<&[u8]>) -> MemIter {
        let start = start.map(|k| MemKey::new(Bytes::copy_from_slice(k), if forward { u64::MAX } else { 0 }));
        MemIter { mem, forward, after: None, start, buf: Default::default(), done: false }
    }

    fn refill(&mut self) {
        let mut push = |k: &MemKey, v: &Bytes| {
            self.buf.push_back(InternalEntry { user: k.user.clone(), trailer: k.trailer, value: v.clone() });
        };
        let map = &self.mem.map;
        let lo: Bound<&MemKey>;
        let hi: Bound<&MemKey>;
        if self.forward {
            lo = match (&self.after, &self.start) {
                (Some(a), _) => Bound::Excluded(a),
                (None, Some(s)) => Bound::Included(s),
                (None, None) => Bound::Unbounded,
            };
            for e in map.range::<MemKey, _>((lo, Bound::Unbounded)).take(ITER_CHUNK) {
                push(e.key(), e.value());
            }
        } else {
            hi = match (&self.after, &self.start) {
                (Some(a), _) => Bound::Excluded(a),
                (None, Some(s)) => Bound::Included(s),
                (None, None) => Bound::Unbounded,
            };
            for e in map.range::<MemKey, _>((Bound::Unbounded, hi)).rev().take(ITER_CHUNK) {
                push(e.key(), e.value());
            }
        }
        match self.buf.back() {
            Some(e) => self.after = Some(MemKey::new(e.user.clone(), e.trailer)),
            None => self.done = true,
        }
    }

    pub(crate) fn next_entry(&mut self) -> Option<InternalEntry> {
        if self.buf.is_empty() && !self.done {
            self.refill();
        }
        self.buf.pop_front()
    }
}

/// Iterates a memtable's range tombstones, ordered by start key.
pub(crate) fn sorted_range_deletes(mem: &Memtable) -> Vec<RangeTombstone> {
    let mut v = mem.range_deletes();
    v.sort_by(|a, b| a.start.cmp(&b.start).then(b.seq.cmp(&a.seq)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_filter_never_hides_a_key_and_rejects_most_absent_ones() {
        let bits = filter_bits(1 << 20, 8);
        let full: usize = (1 << 20) / ENTRY_OVERHEAD_BYTES;
        assert_eq!(bits, (full * 8).next_power_of_two());
        let m = Memtable::new(1, 4096, bits, None);
        let n = 2_000u64;
        for i in 0..n {
            m.insert(format!("key-{i}").as_bytes(), i + 1, ValueKind::Put, b"v");
        }
        for i in 0..n {
            assert!(m.get(format!("key-{i}").as_bytes(), u64::MAX >> 8).is_some(), "key-{i} hidden");
        }
        let absent = 100_000u64;
        let passed = (0..absent)
            .filter(|i| m.filter.as_ref().expect("filter").may_contain(format!("other-{i}").as_bytes()))
            .count();
        // 2,000 keys in 1,024 words of 64 bits, 4 bits each: about 2 in 10,000 pass.
        assert!(passed < (absent / 200) as usize, "{passed} of {absent} absent keys passed the filter");
        // Without a filter, the same answers.
        let plain = Memtable::new(2, 4096, 0, None);
        plain.insert(b"a", 1, ValueKind::Put, b"v");
        assert!(plain.get(b"a", 10).is_some() && plain.get(b"b", 10).is_none());
    }
}
