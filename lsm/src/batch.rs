//! Atomic write batches and their encoding in the standalone WAL.

use bytes::Bytes;

use crate::error::Result;
use crate::table::Reader;
use crate::types::{Marker, Seqno, check_key, check_value};

/// One operation of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Put(Bytes, Bytes),
    Delete(Bytes),
    DeleteRange(Bytes, Bytes),
}

/// Puts, deletes and range deletes applied atomically: a reader sees all of
/// them or none. Each operation takes one sequence number, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub(crate) ops: Vec<Op>,
    pub(crate) marker: Option<Marker>,
    bytes: usize,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> WriteBatch {
        WriteBatch::default()
    }

    /// Sets `key` to `value`.
    pub fn put(&mut self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> &mut Self {
        let (k, v) = (key.into(), value.into());
        self.bytes += k.len() + v.len();
        self.ops.push(Op::Put(k, v));
        self
    }

    /// Deletes `key`.
    pub fn delete(&mut self, key: impl Into<Bytes>) -> &mut Self {
        let k = key.into();
        self.bytes += k.len();
        self.ops.push(Op::Delete(k));
        self
    }

    /// Deletes every key in `[start, end)`.
    pub fn delete_range(&mut self, start: impl Into<Bytes>, end: impl Into<Bytes>) -> &mut Self {
        let (s, e) = (start.into(), end.into());
        self.bytes += s.len() + e.len();
        self.ops.push(Op::DeleteRange(s, e));
        self
    }

    /// Attaches the embedder's marker (required in embedded mode, where the
    /// batch may also be empty: a marker alone still advances).
    pub fn set_marker(&mut self, marker: Marker) -> &mut Self {
        self.marker = Some(marker);
        self
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// No operations.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Bytes of keys and values.
    pub fn payload_bytes(&self) -> usize {
        self.bytes
    }

    /// Checks every key and value against the limits.
    pub(crate) fn validate(&self) -> Result<()> {
        for op in &self.ops {
            match op {
                Op::Put(k, v) => {
                    check_key(k)?;
                    check_value(v)?;
                }
                Op::Delete(k) => check_key(k)?,
                Op::DeleteRange(s, e) => {
                    check_key(s)?;
                    check_key(e)?;
                    if e <= s {
                        return Err(crate::Error::EmptyRange);
                    }
                }
            }
        }
        Ok(())
    }

    /// Bytes of the batch's WAL encoding (what `encode` writes).
    pub fn encoded_bytes(&self) -> usize {
        let head = 1 + 8 + 1 + if self.marker.is_some() { 16 } else { 0 } + 4;
        let ops: usize = self
            .ops
            .iter()
            .map(|op| match op {
                Op::Put(k, v) | Op::DeleteRange(k, v) => 1 + 4 + k.len() + 4 + v.len(),
                Op::Delete(k) => 1 + 4 + k.len(),
            })
            .sum();
        head + ops
    }

    /// WAL payload: format u8 = 1 | first seq u64 | marker flag u8 (+ index,
    /// term u64) | count u32 | ops (tag u8, then u32-length-prefixed byte strings).
    pub(crate) fn encode(&self, first_seq: Seqno, out: &mut Vec<u8>) {
        out.clear();
        out.push(1);
        out.extend_from_slice(&first_seq.to_le_bytes());
        crate::table::put_opt_marker(out, self.marker);
        out.extend_from_slice(&(self.ops.len() as u32).to_le_bytes());
        for op in &self.ops {
            let (tag, a, b): (u8, &[u8], Option<&[u8]>) = match op {
                Op::Put(k, v) => (1, k, Some(v)),
                Op::Delete(k) => (0, k, None),
                Op::DeleteRange(s, e) => (2, s, Some(e)),
            };
            out.push(tag);
            crate::table::put_bytes(out, a);
            if let Some(b) = b {
                crate::table::put_bytes(out, b);
            }
        }
        debug_assert_eq!(out.len(), self.encoded_bytes());
    }

    /// Decodes a WAL payload into (first seq, batch).
    pub(crate) fn decode(data: &[u8]) -> Result<(Seqno, WriteBatch), String> {
        let mut r = Reader::new(data);
        let v = r.u8()?;
        if v != 1 {
            return Err(format!("batch format version {v}"));
        }
        let first = r.u64()?;
        let mut b = WriteBatch::new();
        b.marker = r.opt_marker()?;
        let n = r.u32()?;
        for _ in 0..n {
            let tag = r.u8()?;
            let a = Bytes::copy_from_slice(r.bytes(crate::KEY_BYTES_MAX)?);
            match tag {
                0 => {
                    b.delete(a);
                }
                1 => {
                    let v = Bytes::copy_from_slice(r.bytes(crate::VALUE_BYTES_MAX)?);
                    b.put(a, v);
                }
                2 => {
                    let e = Bytes::copy_from_slice(r.bytes(crate::KEY_BYTES_MAX)?);
                    b.delete_range(a, e);
                }
                t => return Err(format!("operation tag {t}")),
            }
        }
        if !r.done() {
            return Err("trailing bytes after the batch".into());
        }
        b.validate().map_err(|e| e.to_string())?;
        Ok((first, b))
    }
}
