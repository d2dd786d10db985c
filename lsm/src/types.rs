//! Domain integers and the internal key.

use std::cmp::Ordering;

/// A sequence number: every put, delete and range delete gets the next one.
/// 56 bits: the low byte of a stored trailer holds the [`ValueKind`].
pub type Seqno = u64;

/// The largest sequence number.
pub const SEQNO_MAX: Seqno = (1 << 56) - 1;

/// The largest key, in bytes.
pub const KEY_BYTES_MAX: usize = 64 << 10;
/// The largest value, in bytes.
pub const VALUE_BYTES_MAX: usize = 16 << 20;

/// What an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum ValueKind {
    /// A point tombstone.
    Delete = 0,
    /// A value.
    Put = 1,
    /// A value kept in a blob file: the stored value is a reference to it
    /// (see `Options::blob_value_bytes_min`). Reads see a put.
    BlobRef = 2,
}

impl ValueKind {
    /// A value (inline or in a blob file), not a tombstone.
    pub(crate) fn is_value(self) -> bool {
        matches!(self, ValueKind::Put | ValueKind::BlobRef)
    }

    pub(crate) fn from_u8(b: u8) -> Option<ValueKind> {
        match b {
            0 => Some(ValueKind::Delete),
            1 => Some(ValueKind::Put),
            2 => Some(ValueKind::BlobRef),
            _ => None,
        }
    }
}

/// An embedder's ordered marker (for Cairn: the Raft index and term of the
/// last entry of a batch). Compared by index, then term.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Marker {
    /// The index (Raft log index for Cairn).
    pub index: u64,
    /// The term of that index.
    pub term: u64,
}

impl Marker {
    /// A marker.
    pub const fn new(index: u64, term: u64) -> Marker {
        Marker { index, term }
    }
}

/// A table's identifier, unique within one engine directory.
pub type TableId = u64;

/// Packs a sequence number and a kind into a trailer.
pub(crate) fn trailer(seq: Seqno, kind: ValueKind) -> u64 {
    debug_assert!(seq <= SEQNO_MAX);
    (seq << 8) | kind as u64
}

pub(crate) fn trailer_seq(t: u64) -> Seqno {
    t >> 8
}

pub(crate) fn trailer_kind(t: u64) -> Option<ValueKind> {
    ValueKind::from_u8((t & 0xff) as u8)
}

/// Internal key order: user key ascending, then trailer (sequence number) descending.
pub(crate) fn cmp_internal(a_key: &[u8], a_trailer: u64, b_key: &[u8], b_trailer: u64) -> Ordering {
    a_key.cmp(b_key).then(b_trailer.cmp(&a_trailer))
}

pub(crate) fn check_key(key: &[u8]) -> crate::Result<()> {
    if key.is_empty() || key.len() > KEY_BYTES_MAX {
        return Err(crate::Error::KeyTooLarge { len: key.len(), max: KEY_BYTES_MAX });
    }
    Ok(())
}

pub(crate) fn check_value(value: &[u8]) -> crate::Result<()> {
    if value.len() > VALUE_BYTES_MAX {
        return Err(crate::Error::ValueTooLarge { len: value.len(), max: VALUE_BYTES_MAX });
    }
    Ok(())
}

/// A range tombstone: deletes every key in `[start, end)` written below `seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RangeTombstone {
    pub(crate) start: bytes::Bytes,
    pub(crate) end: bytes::Bytes,
    pub(crate) seq: Seqno,
}

impl RangeTombstone {
    pub(crate) fn covers(&self, key: &[u8]) -> bool {
        self.start.as_ref() <= key && key < self.end.as_ref()
    }
}

/// One version of one key, as iterators yield it.
#[derive(Clone, Debug)]
pub(crate) struct InternalEntry {
    pub(crate) user: bytes::Bytes,
    pub(crate) trailer: u64,
    pub(crate) value: bytes::Bytes,
}

impl InternalEntry {
    pub(crate) fn seq(&self) -> Seqno {
        trailer_seq(self.trailer)
    }
}
