//! Deltas: the L0 tables that carry an embedder's state from one durable
//! marker to a later one, so a follower a little behind gets only what it
//! lacks (DESIGN.md, "Delta snapshots").
//!
//! Every table a flush writes records the marker range it covers: `(after,
//! upto]`, where `after` is the last marker written before its memtable and
//! `upto` the highest marker in it. Flushes keep every tombstone, so a chain
//! of such tables, newest first, each reaching down to where the newer ones
//! start, holds every write of its range. [`Db::delta_checkpoint`] links such
//! a chain into a directory with a [`DELTA_FILE`] describing it;
//! [`Db::ingest_delta`] checks the chain against the receiving state's
//! durable marker and ingests it above all local data in one manifest edit.
//! The blob files the tables reference (their separated values) travel
//! with them; the receiver gives them ids of its own (see
//! `docs/design/lsm.md`, "Key-value separation").
//!
//! [`Db::delta_checkpoint`]: crate::Db::delta_checkpoint
//! [`Db::ingest_delta`]: crate::Db::ingest_delta

use crate::error::{Error, Result};
use crate::table::{Reader, put_opt_marker};
use crate::types::Marker;

/// The file a delta checkpoint describes itself in.
pub const DELTA_FILE: &str = "DELTA";
const MAGIC: &[u8; 16] = b"cairn-lsm delta\0";
/// Format 2 added each table's blob id offset and the blob files; format
/// 1 is still read.
const FORMAT_VERSION: u8 = 2;
/// Bound on the tables one delta may list (a sanity bound for decoding).
const TABLES_MAX: u32 = 1 << 16;
/// Bound on the blob files one delta may list (a sanity bound for decoding).
const BLOB_FILES_MAX: u32 = 1 << 20;
const FILE_NAME_BYTES_MAX: usize = 255;

/// What a delta checkpoint holds: tables that bring a state whose durable
/// marker is at least `after` to `marker`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Delta {
    /// The durable marker it was made for (`None`: an empty state). It
    /// applies to any state whose durable marker is at or above it and at
    /// or below `marker`.
    pub after: Option<Marker>,
    /// The durable marker of the state once the delta is ingested.
    pub marker: Marker,
    /// The tables hold every write up to this marker; there are no writes
    /// with a marker in `(tables_upto, marker]` (markers alone).
    pub tables_upto: Option<Marker>,
    /// The tables, newest first.
    pub tables: Vec<DeltaTable>,
    /// The blob files the tables reference, by file name in the delta's
    /// directory (`{id:016x}.blob`, the id the tables' references name
    /// after their [`DeltaTable::blob_offset`]).
    pub blob_files: Vec<String>,
}

/// One table of a delta.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeltaTable {
    /// Its file name in the delta's directory.
    pub file: String,
    /// The offset the sender added to its sequence numbers: the offsets
    /// keep the order across tables, and the receiver adds one more common
    /// offset above all its own data.
    pub seq_offset: u64,
    /// The offset the sender adds (modulo 2^64) to the blob file ids its
    /// references name, to get the ids in [`Delta::blob_files`] (non-zero
    /// for tables the sender ingested itself).
    pub blob_offset: u64,
}

impl Delta {
    /// The file's bytes: magic, format version, fields, then a crc32c of
    /// everything before it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.push(FORMAT_VERSION);
        put_opt_marker(&mut out, self.after);
        put_opt_marker(&mut out, Some(self.marker));
        put_opt_marker(&mut out, self.tables_upto);
        out.extend_from_slice(&(self.tables.len() as u32).to_le_bytes());
        for t in &self.tables {
            crate::table::put_bytes(&mut out, t.file.as_bytes());
            out.extend_from_slice(&t.seq_offset.to_le_bytes());
            out.extend_from_slice(&t.blob_offset.to_le_bytes());
        }
        out.extend_from_slice(&(self.blob_files.len() as u32).to_le_bytes());
        for f in &self.blob_files {
            crate::table::put_bytes(&mut out, f.as_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a delta file; the error says what is wrong.
    pub fn decode(data: &[u8]) -> Result<Delta> {
        Self::decode_inner(data).map_err(|reason| Error::Delta { reason: format!("a malformed delta file: {reason}") })
    }

    fn decode_inner(data: &[u8]) -> Result<Delta, String> {
        let Some((body, crc)) = data.split_last_chunk::<4>() else {
            return Err(format!("{} bytes", data.len()));
        };
        if crc32c::crc32c(body) != u32::from_le_bytes(*crc) {
            return Err("checksum mismatch".into());
        }
        let mut r = Reader::new(body);
        if r.take(MAGIC.len())? != MAGIC {
            return Err("bad magic".into());
        }
        let v = r.u8()?;
        if !(1..=FORMAT_VERSION).contains(&v) {
            return Err(format!("format version {v} (this build reads 1 to {FORMAT_VERSION})"));
        }
        let after = r.opt_marker()?;
        let marker = r.opt_marker()?.ok_or("no target marker")?;
        let tables_upto = r.opt_marker()?;
        if after.is_some_and(|a| a > marker) || tables_upto.is_some_and(|t| t > marker) {
            return Err("a marker above the target".into());
        }
        let n = r.u32()?;
        if n > TABLES_MAX {
            return Err(format!("{n} tables"));
        }
        let mut tables = Vec::with_capacity(n.min(1024) as usize);
        for _ in 0..n {
            let file = std::str::from_utf8(r.bytes(FILE_NAME_BYTES_MAX)?).map_err(|_| "a file name not in UTF-8")?;
            if crate::table::parse_table_file_name(file).is_none() {
                return Err(format!("`{file}` is not a table file name"));
            }
            let seq_offset = r.u64()?;
            let blob_offset = if v >= 2 { r.u64()? } else { 0 };
            tables.push(DeltaTable { file: file.to_string(), seq_offset, blob_offset });
        }
        let mut blob_files = Vec::new();
        if v >= 2 {
            let n = r.u32()?;
            if n > BLOB_FILES_MAX {
                return Err(format!("{n} blob files"));
            }
            let mut last = None;
            for _ in 0..n {
                let file =
                    std::str::from_utf8(r.bytes(FILE_NAME_BYTES_MAX)?).map_err(|_| "a file name not in UTF-8")?;
                let Some(id) = crate::blob::parse_blob_file_name(file) else {
                    return Err(format!("`{file}` is not a blob file name"));
                };
                if last >= Some(id) {
                    return Err("blob files not sorted by id".into());
                }
                last = Some(id);
                blob_files.push(file.to_string());
            }
        }
        if !r.done() {
            return Err("trailing bytes".into());
        }
        Ok(Delta { after, marker, tables_upto, tables, blob_files })
    }
}

/// The marker range `(after, upto]` whose every write a table holds.
pub(crate) type Coverage = (Option<Marker>, Marker);

/// Picks from `tables` (newest first, each with its coverage if known)
/// those that together hold every write with a marker in `(after, upto]`:
/// each picked table reaches at least up to where the newer picked ones
/// start. Tables wholly inside what newer ones cover are left out (their
/// writes are all in those). The error says where the chain breaks.
pub(crate) fn chain<T>(
    tables: impl IntoIterator<Item = (Option<Coverage>, T)>,
    after: Option<Marker>,
    upto: Option<Marker>,
) -> Result<Vec<T>, String> {
    // Every write in (covered_from, upto] is in a picked table.
    let mut covered_from = upto;
    let mut picked = Vec::new();
    for (cov, t) in tables {
        if covered_from <= after {
            break;
        }
        let Some((start, end)) = cov else {
            return Err(format!("a table of unknown coverage stands below {covered_from:?}"));
        };
        if Some(end) < covered_from {
            return Err(format!("no table holds the writes in ({end:?}, {covered_from:?}]"));
        }
        if start >= covered_from {
            continue;
        }
        picked.push(t);
        covered_from = start;
    }
    if covered_from > after {
        return Err(format!("the tables reach back to {covered_from:?}, not to {after:?}"));
    }
    Ok(picked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(i: u64) -> Marker {
        Marker::new(i, 1)
    }

    fn cov(a: Option<u64>, b: u64) -> Option<Coverage> {
        Some((a.map(m), m(b)))
    }

    #[test]
    fn a_chain_reaches_down_without_a_gap() {
        // Newest first: (20, 30], (10, 20], (0, 10], (None, 0].
        let ts = [(cov(Some(20), 30), 'c'), (cov(Some(10), 20), 'b'), (cov(Some(0), 10), 'a'), (cov(None, 0), 'z')];
        assert_eq!(chain(ts, Some(m(15)), Some(m(30))), Ok(vec!['c', 'b']));
        assert_eq!(chain(ts, Some(m(20)), Some(m(30))), Ok(vec!['c']));
        assert_eq!(chain(ts, Some(m(30)), Some(m(30))), Ok(vec![]));
        assert_eq!(chain(ts, None, Some(m(30))), Ok(vec!['c', 'b', 'a', 'z']));
        // A gap: (10, 20] is missing.
        let gap = [(cov(Some(20), 30), 'c'), (cov(Some(0), 10), 'a')];
        assert!(chain(gap, Some(m(5)), Some(m(30))).is_err());
        // Unknown coverage (a compaction's output) below the need.
        let unknown = [(cov(Some(20), 30), 'c'), (None, 'x')];
        assert!(chain(unknown, Some(m(5)), Some(m(30))).is_err());
        assert_eq!(chain(unknown, Some(m(25)), Some(m(30))), Ok(vec!['c']));
        // The tables do not reach back far enough.
        assert!(chain([(cov(Some(20), 30), 'c')], Some(m(5)), Some(m(30))).is_err());
        // Nothing newer than the tables: they must reach `upto`.
        assert!(chain([(cov(Some(20), 30), 'c')], Some(m(25)), Some(m(31))).is_err());
    }

    #[test]
    fn a_table_inside_a_newer_one_is_left_out_and_overlaps_are_fine() {
        // An ingested table (5, 30] above the node's own (10, 20].
        let ts = [(cov(Some(5), 30), 'n'), (cov(Some(10), 20), 'o'), (cov(Some(0), 5), 'a')];
        assert_eq!(chain(ts, Some(m(8)), Some(m(30))), Ok(vec!['n']));
        assert_eq!(chain(ts, Some(m(2)), Some(m(30))), Ok(vec!['n', 'a']));
    }

    #[test]
    fn the_file_round_trips_and_damage_is_refused() {
        let d = Delta {
            after: Some(m(3)),
            marker: m(9),
            tables_upto: Some(m(8)),
            tables: vec![
                DeltaTable { file: "0000000000000007.sst".into(), seq_offset: 0, blob_offset: 0 },
                DeltaTable { file: "0000000000000005.sst".into(), seq_offset: 100, blob_offset: u64::MAX - 2 },
            ],
            blob_files: vec!["0000000000000003.blob".into(), "0000000000000006.blob".into()],
        };
        let b = d.encode();
        assert_eq!(Delta::decode(&b).expect("decodes"), d);
        for n in 0..b.len() {
            assert!(Delta::decode(&b[..n]).is_err(), "truncated at {n}");
        }
        for i in 0..b.len() {
            let mut x = b.clone();
            x[i] ^= 0x10;
            assert!(Delta::decode(&x).is_err(), "flipped byte {i}");
        }
        let mut bad = d.clone();
        bad.tables[0].file = "../x.sst".into();
        assert!(Delta::decode(&bad.encode()).is_err());
        let mut bad = d.clone();
        bad.blob_files[0] = "../x.blob".into();
        assert!(Delta::decode(&bad.encode()).is_err());
        let mut bad = d.clone();
        bad.blob_files.reverse();
        assert!(Delta::decode(&bad.encode()).is_err(), "blob files out of order");
    }

    #[test]
    fn a_format_1_file_still_reads() {
        // Format 1: no blob offsets, no blob files.
        let mut b = MAGIC.to_vec();
        b.push(1);
        put_opt_marker(&mut b, None);
        put_opt_marker(&mut b, Some(m(9)));
        put_opt_marker(&mut b, Some(m(9)));
        b.extend_from_slice(&1u32.to_le_bytes());
        crate::table::put_bytes(&mut b, b"0000000000000007.sst");
        b.extend_from_slice(&5u64.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let d = Delta::decode(&b).expect("decodes");
        assert_eq!(d.tables, vec![DeltaTable { file: "0000000000000007.sst".into(), seq_offset: 5, blob_offset: 0 }]);
        assert!(d.blob_files.is_empty());
    }
}
