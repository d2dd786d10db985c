//! Versions (the set of live tables per level) and the edits between them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use crate::blob::{BlobFile, BlobId, BlobRef, blob_file_name};
use crate::error::Result;
use crate::table::{Reader, Table};
use crate::types::{Marker, Seqno, TableId};

/// The live tables: L0 newest first (tables may overlap), deeper levels
/// sorted by smallest key (tables never overlap).
#[derive(Debug, Clone, Default)]
pub(crate) struct Version {
    pub(crate) levels: Vec<Vec<Arc<Table>>>,
    /// The embedder's durable marker: every write whose marker is at or
    /// below it is in a table.
    pub(crate) marker: Option<Marker>,
    /// Every write with a sequence number at or below it is in a table
    /// (the standalone WAL replays from above it).
    pub(crate) flushed_seq: Seqno,
    /// The highest sequence number any table holds.
    pub(crate) last_seq: Seqno,
    /// The blob files the tables reference (rebuilt by [`Version::sort`]).
    pub(crate) blobs: BTreeMap<BlobId, Arc<BlobFile>>,
    /// Live bytes of each blob file: what the tables' references keep
    /// (rebuilt by [`Version::sort`]).
    pub(crate) blob_live: BTreeMap<BlobId, u64>,
}

impl Version {
    pub(crate) fn empty(levels: usize) -> Version {
        Version { levels: vec![Vec::new(); levels], ..Version::default() }
    }

    pub(crate) fn tables(&self) -> impl Iterator<Item = (usize, &Arc<Table>)> {
        self.levels.iter().enumerate().flat_map(|(l, ts)| ts.iter().map(move |t| (l, t)))
    }

    /// Applies an edit whose added tables are opened already (`opened`, same order as `edit.added`).
    pub(crate) fn apply(&self, edit: &Edit, opened: &[Arc<Table>]) -> Version {
        let mut v = if edit.full { Version::empty(self.levels.len()) } else { self.clone() };
        for l in &mut v.levels {
            l.retain(|t| !edit.removed.contains(&t.id));
        }
        for (a, t) in edit.added.iter().zip(opened) {
            assert_eq!(a.id, t.id, "edit and opened tables disagree");
            v.levels[a.level as usize].push(Arc::clone(t));
        }
        v.sort();
        if let Some(m) = edit.marker {
            assert!(v.marker.is_none_or(|old| old <= m), "the durable marker never falls");
            v.marker = Some(m);
        }
        if let Some(s) = edit.flushed_seq {
            v.flushed_seq = v.flushed_seq.max(s);
        }
        if let Some(s) = edit.last_seq {
            v.last_seq = v.last_seq.max(s);
        }
        v
    }

    /// Sorts each level and indexes the blob files the tables reference.
    pub(crate) fn sort(&mut self) {
        self.blobs = self.tables().flat_map(|(_, t)| t.blobs.iter()).map(|b| (b.id, Arc::clone(b))).collect();
        let mut live = BTreeMap::new();
        for r in self.tables().flat_map(|(_, t)| t.props.blob_refs.iter()) {
            *live.entry(r.file).or_insert(0) += r.bytes;
        }
        self.blob_live = live;
        if let Some(l0) = self.levels.first_mut() {
            l0.sort_by(|a, b| b.seq_max().cmp(&a.seq_max()).then(b.id.cmp(&a.id)));
        }
        for l in self.levels.iter_mut().skip(1) {
            l.sort_by(|a, b| a.props.smallest.cmp(&b.props.smallest));
        }
    }

    /// The value a stored blob reference (of a table in this version) points at.
    pub(crate) fn read_blob(&self, stored: &[u8]) -> Result<Bytes> {
        let r = BlobRef::decode(stored).ok_or_else(|| {
            crate::error::corrupt(
                Path::new("tables"),
                0,
                format!("a blob reference of {} bytes is malformed", stored.len()),
            )
        })?;
        match self.blobs.get(&r.file) {
            Some(b) => b.read(&r),
            None => Err(crate::error::corrupt(
                Path::new(&blob_file_name(r.file)),
                r.offset,
                "a table references a blob file that no live table lists",
            )),
        }
    }

    /// An edit that rebuilds this version from nothing.
    pub(crate) fn full_edit(&self, next_table_id: TableId) -> Edit {
        Edit {
            full: true,
            added: self
                .tables()
                .map(|(l, t)| Added {
                    level: l as u8,
                    id: t.id,
                    seq_offset: t.seq_offset,
                    blob_offset: t.blob_offset,
                    file_xxh3: t.file_xxh3,
                })
                .collect(),
            removed: Vec::new(),
            marker: self.marker,
            flushed_seq: Some(self.flushed_seq),
            last_seq: Some(self.last_seq),
            next_table_id: Some(next_table_id),
        }
    }

    /// Tables holding range tombstones.
    pub(crate) fn range_delete_tables(&self) -> impl Iterator<Item = &Arc<Table>> {
        self.tables().map(|(_, t)| t).filter(|t| t.props.range_deletes > 0)
    }
}

/// A table added by an edit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Added {
    pub(crate) level: u8,
    pub(crate) id: TableId,
    pub(crate) seq_offset: u64,
    /// Added (modulo 2^64) to the blob file ids its references name (tables
    /// ingested with blob files; edit format 3 on).
    pub(crate) blob_offset: u64,
    /// xxh3-64 of the whole table file, if known (edit format 2 on).
    pub(crate) file_xxh3: Option<u64>,
}

/// A version edit: one manifest record. Installed atomically.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Edit {
    /// This edit lists the whole version (it replaces, not amends).
    pub(crate) full: bool,
    pub(crate) added: Vec<Added>,
    pub(crate) removed: Vec<TableId>,
    pub(crate) marker: Option<Marker>,
    pub(crate) flushed_seq: Option<Seqno>,
    pub(crate) last_seq: Option<Seqno>,
    pub(crate) next_table_id: Option<TableId>,
}

/// Format 2 added each table's whole-file checksum, format 3 its blob id
/// offset; formats 1 and 2 are still read.
const EDIT_FORMAT_VERSION: u8 = 3;
/// Bound on the tables one edit may name (a sanity bound for decoding).
const EDIT_TABLES_MAX: u32 = 1 << 22;

impl Edit {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = vec![EDIT_FORMAT_VERSION, u8::from(self.full)];
        let opt = |out: &mut Vec<u8>, v: Option<u64>| match v {
            None => out.push(0),
            Some(x) => {
                out.push(1);
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
        crate::table::put_opt_marker(&mut out, self.marker);
        opt(&mut out, self.flushed_seq);
        opt(&mut out, self.last_seq);
        opt(&mut out, self.next_table_id);
        out.extend_from_slice(&(self.added.len() as u32).to_le_bytes());
        for a in &self.added {
            out.push(a.level);
            out.extend_from_slice(&a.id.to_le_bytes());
            out.extend_from_slice(&a.seq_offset.to_le_bytes());
            opt(&mut out, a.file_xxh3);
            out.extend_from_slice(&a.blob_offset.to_le_bytes());
        }
        out.extend_from_slice(&(self.removed.len() as u32).to_le_bytes());
        for id in &self.removed {
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    /// Decodes an edit; the error says what is wrong.
    pub(crate) fn decode(data: &[u8], levels: usize) -> Result<Edit, String> {
        let mut r = Reader::new(data);
        let v = r.u8()?;
        if !(1..=EDIT_FORMAT_VERSION).contains(&v) {
            return Err(format!("edit format version {v} (this build reads 1 to {EDIT_FORMAT_VERSION})"));
        }
        let full = match r.u8()? {
            0 => false,
            1 => true,
            x => return Err(format!("full flag {x}")),
        };
        let opt = |r: &mut Reader<'_>| -> Result<Option<u64>, String> {
            match r.u8()? {
                0 => Ok(None),
                1 => Ok(Some(r.u64()?)),
                x => Err(format!("option flag {x}")),
            }
        };
        let marker = r.opt_marker()?;
        let flushed_seq = opt(&mut r)?;
        let last_seq = opt(&mut r)?;
        let next_table_id = opt(&mut r)?;
        let n = r.u32()?;
        if n > EDIT_TABLES_MAX {
            return Err(format!("{n} added tables"));
        }
        let mut added = Vec::with_capacity(n.min(1024) as usize);
        for _ in 0..n {
            let level = r.u8()?;
            if level as usize >= levels {
                return Err(format!("table on level {level} of {levels}"));
            }
            let (id, seq_offset) = (r.u64()?, r.u64()?);
            let file_xxh3 = if v >= 2 { opt(&mut r)? } else { None };
            let blob_offset = if v >= 3 { r.u64()? } else { 0 };
            added.push(Added { level, id, seq_offset, blob_offset, file_xxh3 });
        }
        let n = r.u32()?;
        if n > EDIT_TABLES_MAX {
            return Err(format!("{n} removed tables"));
        }
        let mut removed = Vec::with_capacity(n.min(1024) as usize);
        for _ in 0..n {
            removed.push(r.u64()?);
        }
        if !r.done() {
            return Err("trailing bytes after the edit".into());
        }
        Ok(Edit { full, added, removed, marker, flushed_seq, last_seq, next_table_id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_round_trip_and_truncation() {
        let e = Edit {
            full: true,
            added: vec![
                Added { level: 2, id: 9, seq_offset: 77, blob_offset: u64::MAX - 4, file_xxh3: Some(0xfeed) },
                Added { level: 0, id: 10, seq_offset: 0, blob_offset: 0, file_xxh3: None },
            ],
            removed: vec![3, 4],
            marker: Some(Marker::new(10, 2)),
            flushed_seq: Some(5),
            last_seq: None,
            next_table_id: Some(12),
        };
        let b = e.encode();
        assert_eq!(Edit::decode(&b, 7), Ok(e));
        for n in 0..b.len() {
            assert!(Edit::decode(&b[..n], 7).is_err());
        }
        assert!(Edit::decode(&b, 2).is_err(), "level beyond the configured levels");
    }

    #[test]
    fn format_1_edits_still_decode() {
        // Written by a build before whole-file checksums: version 1, not
        // full, no marker, flushed_seq 5, no last_seq, no next id, one
        // added table (level 1, id 3, seq offset 0), none removed.
        let mut b = vec![1u8, 0, 0, 1];
        b.extend_from_slice(&5u64.to_le_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.push(1);
        b.extend_from_slice(&3u64.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        let e = Edit::decode(&b, 7).expect("a format 1 edit");
        assert_eq!(e.added, vec![Added { level: 1, id: 3, seq_offset: 0, blob_offset: 0, file_xxh3: None }]);
        assert_eq!(e.flushed_seq, Some(5));
        b[0] = 4;
        assert!(Edit::decode(&b, 7).is_err_and(|e| e.contains("format version 4")));
    }
}
