//! Records read back from disk, in 8-byte-aligned buffers.

use crate::UserKind;

/// A byte buffer whose start is 8-byte aligned, so that every payload in it
/// (which starts at a multiple of 8 in the file) is 8-byte aligned in memory
/// and can be handed to `rkyv::access` without a copy.
#[derive(Clone, Debug, Default)]
pub(crate) struct AlignedBuf {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBuf {
    pub(crate) fn zeroed(len: usize) -> Self {
        AlignedBuf { words: vec![0; len.div_ceil(8)], len }
    }
    pub(crate) fn as_slice(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len]
    }
}

#[derive(Clone, Copy, Debug)]
struct Item {
    buf: usize,
    kind: UserKind,
    position: u64,
    start: usize,
    len: usize,
}

/// A run of user records read from the log, in position order.
#[derive(Clone, Debug, Default)]
pub struct Records {
    bufs: Vec<AlignedBuf>,
    items: Vec<Item>,
}

/// One user record, borrowed from [`Records`]. `payload` is 8-byte aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// The record's kind.
    pub kind: UserKind,
    /// The record's position.
    pub position: u64,
    /// The payload, starting at an 8-byte-aligned address.
    pub payload: &'a [u8],
}

impl Records {
    pub(crate) fn push_buf(&mut self, buf: AlignedBuf) -> usize {
        self.bufs.push(buf);
        self.bufs.len() - 1
    }

    pub(crate) fn push(&mut self, buf: usize, kind: UserKind, position: u64, start: usize, len: usize) {
        debug_assert_eq!(start % 8, 0);
        debug_assert!(start + len <= self.bufs[buf].len);
        self.items.push(Item { buf, kind, position, start, len });
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The record at `i`.
    pub fn get(&self, i: usize) -> Option<Record<'_>> {
        let it = self.items.get(i)?;
        Some(Record {
            kind: it.kind,
            position: it.position,
            payload: &self.bufs[it.buf].as_slice()[it.start..it.start + it.len],
        })
    }

    /// The records in position order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Record<'_>> + '_ {
        self.items.iter().map(|it| Record {
            kind: it.kind,
            position: it.position,
            payload: &self.bufs[it.buf].as_slice()[it.start..it.start + it.len],
        })
    }

    /// Position of the last record.
    pub fn last_position(&self) -> Option<u64> {
        self.items.last().map(|i| i.position)
    }
}
