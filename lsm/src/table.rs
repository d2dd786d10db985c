//! Tables (SSTables): writer, reader, properties and footer.
//!
//! ```text
//! data block*     (payload + 9-byte trailer each)
//! filter block    (bloom over the table's user keys; never compressed)
//! index partition* (block format: key = last internal key of a data block,
//!                 value = offset u64 LE ++ payload length u32 LE; never
//!                 compressed)
//! range-del block (block format: key = start ++ trailer(seq), value = end)
//! top index block (block format: key = last internal key of a partition,
//!                 value = the partition's handle, 12 bytes as above)
//! props block     (see `Props::encode`)
//! footer, 64 bytes:
//!   0 filter offset u64 | 8 filter len u32 | 12 range-del offset u64 | 20 len u32
//!  24 top index offset u64 | 32 len u32 | 36 props offset u64  | 44 len u32
//!  48 format version u32 | 52 crc32c of bytes 0..52 u32 | 56 magic u64
//! ```
//!
//! Data blocks end where the filter starts; index partitions lie between the
//! filter and the range-delete block. While a table is open, its top index
//! (one entry per partition) and its filter (about 1.25 bytes per key,
//! charged against the block cache's bound) stay in memory; index partitions
//! go through the block cache like data blocks, so an engine's memory stays
//! within its bounds as its data grows.
//!
//! Formats 1 and 2 (still read) had one index block of data handles in the
//! third footer slot: the reader takes it as the only partition. Format 4 is
//! format 3 with the blob files the table's references point into appended
//! to the props; a table without blob references is written in format 3.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use cairn_wal::{Fs, FsFile, OpenMode};

use crate::blob::{BlobFile, BlobId, BlobRef};
use crate::block::{
    self, Block, BlockBuilder, BlockIter, KEY_TRAILER_BYTES, TRAILER_BYTES, make_internal, split_internal,
};
use crate::bloom::{self, Bloom};
use crate::cache::BlockCache;
use crate::error::{Error, Result, corrupt, io};
use crate::options::Compression;
use crate::purge::{EngineFile, Purger};
use crate::types::{
    InternalEntry, Marker, RangeTombstone, Seqno, TableId, ValueKind, trailer, trailer_kind, trailer_seq,
};

/// The newest table format version this build writes and reads. Version 2
/// added the coverage start of L0 tables from a flush, version 3 the
/// partitioned index, version 4 the blob files a table references (in its
/// props; only tables with blob references are written in it); versions 1
/// to 3 are still read.
pub(crate) const TABLE_FORMAT_VERSION: u32 = 4;
/// The format of a table without blob references: such tables stay
/// readable by builds that read format 3.
const TABLE_FORMAT_VERSION_INLINE: u32 = 3;
/// The oldest table format version this build reads.
pub(crate) const TABLE_FORMAT_VERSION_MIN: u32 = 1;
/// "CAIRNSST" little-endian.
pub(crate) const TABLE_MAGIC: u64 = u64::from_le_bytes(*b"CAIRNSST");
const FOOTER_BYTES: usize = 64;
/// What a table's filter costs beside its bits (the `Bloom` itself).
const BLOOM_OVERHEAD_BYTES: u64 = 24;
const WRITE_BUFFER_BYTES: usize = 1 << 20;
/// Bound on one block's uncompressed size: a 16 MiB value plus a 64 KiB key
/// and headers fits.
const BLOCK_BYTES_MAX: usize = 17 << 20;

/// Name of table `id`'s file.
pub(crate) fn table_file_name(id: TableId) -> String {
    id_file_name(id, ".sst")
}

/// Parses a table file name.
pub(crate) fn parse_table_file_name(name: &str) -> Option<TableId> {
    parse_id_file_name(name, ".sst")
}

/// `{id:016x}` then `suffix`: the name of a file of the tables directory.
pub(crate) fn id_file_name(id: u64, suffix: &str) -> String {
    format!("{id:016x}{suffix}")
}

/// The id of a file named as [`id_file_name`] names it with `suffix`.
pub(crate) fn parse_id_file_name(name: &str, suffix: &str) -> Option<u64> {
    let hex = name.strip_suffix(suffix)?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// What a table holds, stored in its props block and in the manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Props {
    pub(crate) entries: u64,
    pub(crate) point_deletes: u64,
    pub(crate) range_deletes: u64,
    /// Smallest and largest sequence numbers stored (before any offset).
    pub(crate) seq_min: Seqno,
    pub(crate) seq_max: Seqno,
    /// Smallest and largest user key covered (points and range-delete bounds,
    /// inclusive; a range delete's exclusive end counts as covered).
    pub(crate) smallest: Bytes,
    pub(crate) largest: Bytes,
    /// The embedder markers the table's writes carry (L0 tables from a flush).
    pub(crate) markers: Option<(Marker, Marker)>,
    pub(crate) key_bytes: u64,
    pub(crate) value_bytes: u64,
    /// For a table from a flush: `Some(a)` says it holds every write whose
    /// marker lies in `(a, markers.1]` (`a = None`: from the first write on).
    /// `None`: unknown (a compaction's output, or a version 1 table).
    pub(crate) coverage_after: Option<Option<Marker>>,
    /// The blob files this table's references point into, by id (format 4).
    pub(crate) blob_refs: Vec<BlobRefs>,
}

/// A table's references into one blob file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct BlobRefs {
    pub(crate) file: BlobId,
    /// References to it.
    pub(crate) count: u64,
    /// Bytes of the blob file they keep live (values and record overhead).
    pub(crate) bytes: u64,
}

/// Bound on the blob files one table may reference (a sanity bound for decoding).
const BLOB_REFS_MAX: u32 = 1 << 20;

impl Props {
    /// The marker range `(after, upto]` whose every write this table holds, if known.
    pub(crate) fn coverage(&self) -> Option<(Option<Marker>, Marker)> {
        match (self.coverage_after, self.markers) {
            (Some(after), Some((_, hi))) => Some((after, hi)),
            _ => None,
        }
    }
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// A little-endian reader that reports truncation.
pub(crate) struct Reader<'a> {
    pub(crate) data: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Reader { data, pos: 0 }
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| format!("truncated at byte {} (wanted {n} more)", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    pub(crate) fn bytes(&mut self, max: usize) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(format!("length {n} above the bound {max}"));
        }
        self.take(n)
    }
    /// An optional marker as [`put_opt_marker`] wrote it.
    pub(crate) fn opt_marker(&mut self) -> Result<Option<crate::Marker>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(crate::Marker::new(self.u64()?, self.u64()?))),
            x => Err(format!("marker flag {x}")),
        }
    }
    pub(crate) fn done(&self) -> bool {
        self.pos == self.data.len()
    }
}

/// Writes an optional marker: flag u8 (0 none, 1 some), then index and term as u64 LE.
pub(crate) fn put_opt_marker(out: &mut Vec<u8>, m: Option<crate::Marker>) {
    match m {
        None => out.push(0),
        Some(m) => {
            out.push(1);
            out.extend_from_slice(&m.index.to_le_bytes());
            out.extend_from_slice(&m.term.to_le_bytes());
        }
    }
}

impl Props {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.entries, self.point_deletes, self.range_deletes, self.seq_min, self.seq_max] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        put_bytes(out, &self.smallest);
        put_bytes(out, &self.largest);
        match self.markers {
            None => out.push(0),
            Some((lo, hi)) => {
                out.push(1);
                for v in [lo.index, lo.term, hi.index, hi.term] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        out.extend_from_slice(&self.key_bytes.to_le_bytes());
        out.extend_from_slice(&self.value_bytes.to_le_bytes());
        // Since version 2: the coverage start (0 unknown, 1 from the first write, 2 after a marker).
        match self.coverage_after {
            None => out.push(0),
            Some(None) => out.push(1),
            Some(Some(m)) => {
                out.push(2);
                out.extend_from_slice(&m.index.to_le_bytes());
                out.extend_from_slice(&m.term.to_le_bytes());
            }
        }
        // Since version 4, written only by tables with blob references.
        if !self.blob_refs.is_empty() {
            out.extend_from_slice(&(self.blob_refs.len() as u32).to_le_bytes());
            for r in &self.blob_refs {
                for v in [r.file, r.count, r.bytes] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }

    /// The format a table with these props is written in.
    pub(crate) fn format_version(&self) -> u32 {
        if self.blob_refs.is_empty() { TABLE_FORMAT_VERSION_INLINE } else { TABLE_FORMAT_VERSION }
    }

    /// Decodes the props of a table written in format `version`.
    pub(crate) fn decode(r: &mut Reader<'_>, version: u32) -> Result<Props, String> {
        let entries = r.u64()?;
        let point_deletes = r.u64()?;
        let range_deletes = r.u64()?;
        let seq_min = r.u64()?;
        let seq_max = r.u64()?;
        let smallest = Bytes::copy_from_slice(r.bytes(crate::KEY_BYTES_MAX)?);
        let largest = Bytes::copy_from_slice(r.bytes(crate::KEY_BYTES_MAX)?);
        let markers = match r.u8()? {
            0 => None,
            1 => {
                let (a, b, c, d) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
                Some((Marker::new(a, b), Marker::new(c, d)))
            }
            x => return Err(format!("marker flag {x}")),
        };
        let key_bytes = r.u64()?;
        let value_bytes = r.u64()?;
        let coverage_after = if version >= 2 {
            match r.u8()? {
                0 => None,
                1 => Some(None),
                2 => Some(Some(Marker::new(r.u64()?, r.u64()?))),
                x => return Err(format!("coverage flag {x}")),
            }
        } else {
            None
        };
        let mut blob_refs = Vec::new();
        if version >= 4 {
            let n = r.u32()?;
            if n > BLOB_REFS_MAX {
                return Err(format!("{n} blob files referenced, above the bound {BLOB_REFS_MAX}"));
            }
            for _ in 0..n {
                let refs = BlobRefs { file: r.u64()?, count: r.u64()?, bytes: r.u64()? };
                if blob_refs.last().is_some_and(|l: &BlobRefs| l.file >= refs.file) {
                    return Err("blob references not sorted by file".into());
                }
                blob_refs.push(refs);
            }
        }
        if !r.done() {
            return Err("trailing bytes after the props".into());
        }
        if seq_min > seq_max || smallest > largest {
            return Err("inverted sequence or key range".into());
        }
        Ok(Props {
            entries,
            point_deletes,
            range_deletes,
            seq_min,
            seq_max,
            smallest,
            largest,
            markers,
            key_bytes,
            value_bytes,
            coverage_after,
            blob_refs,
        })
    }
}

/// Settings of one table being written.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WriteSettings {
    pub(crate) block_bytes: usize,
    pub(crate) restart_interval: usize,
    pub(crate) bloom_bits_per_key: u32,
    pub(crate) compression: Compression,
    pub(crate) skip_sync: bool,
}

/// Writes one table. Entries must come in internal-key order.
pub(crate) struct TableWriter {
    file: Box<dyn FsFile>,
    path: PathBuf,
    settings: WriteSettings,
    file_offset: u64,
    out: Vec<u8>,
    block: BlockBuilder,
    /// The index partition being filled.
    index: BlockBuilder,
    /// Index partitions cut so far, written after the data.
    partitions: Vec<PartitionDraft>,
    raw: Vec<u8>,
    scratch: Vec<u8>,
    key_buf: Vec<u8>,
    hashes: Vec<u64>,
    last_user: Vec<u8>,
    has_last: bool,
    range_dels: Vec<RangeTombstone>,
    props: Props,
    has_any: bool,
    /// The smallest and largest keys so far (copied into `props` at the end:
    /// a new `Bytes` for every key written in order cost an allocation each).
    smallest: Vec<u8>,
    largest: Vec<u8>,
    /// xxh3-64 of every byte written so far (the whole file once finished).
    file_hash: xxhash_rust::xxh3::Xxh3,
    compression: CompressionBackoff,
    /// Blob references written, per blob file: (count, bytes).
    blob_refs: BTreeMap<BlobId, (u64, u64)>,
}

/// Data blocks that do not shrink are stored raw; after
/// [`CompressionBackoff::MISSES`] such blocks in a row, a table writer stops
/// trying and compresses one block in [`CompressionBackoff::PROBE_EVERY`]
/// until one shrinks again. Incompressible values (random bytes, data
/// compressed by the application) then cost no compressor time in every
/// flush and compaction, while data that compresses still does.
#[derive(Debug, Default)]
pub(crate) struct CompressionBackoff {
    /// Tried blocks in a row that did not shrink.
    misses: u32,
    /// Blocks to store raw before the next probe.
    skip: u32,
    /// Blocks handed to the compressor (for the writer's figures).
    tried: u64,
    /// Blocks stored compressed.
    compressed: u64,
}

impl CompressionBackoff {
    const MISSES: u32 = 8;
    const PROBE_EVERY: u32 = 32;

    /// The compression to try on the next block.
    pub(crate) fn pick(&mut self, configured: Compression) -> Compression {
        if configured == Compression::None {
            return configured;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return Compression::None;
        }
        self.tried += 1;
        configured
    }

    /// What became of a block tried with a compressor.
    pub(crate) fn record(&mut self, shrank: bool) {
        if shrank {
            self.compressed += 1;
            self.misses = 0;
        } else {
            self.misses += 1;
            if self.misses >= Self::MISSES {
                self.skip = Self::PROBE_EVERY - 1;
            }
        }
    }
}

/// One index partition, waiting for the data blocks to be written.
struct PartitionDraft {
    /// The finished index block.
    raw: Vec<u8>,
    /// Its last internal key (the last key of its last data block).
    last_key: Vec<u8>,
}

/// What [`TableWriter::finish`] wrote.
#[derive(Debug)]
pub(crate) struct Written {
    /// The file's size in bytes.
    pub(crate) bytes: u64,
    /// xxh3-64 of the whole file, taken on the bytes' way to the disk.
    pub(crate) file_xxh3: u64,
    /// Data blocks handed to the compressor.
    pub(crate) blocks_tried: u64,
    /// Data blocks stored compressed.
    pub(crate) blocks_compressed: u64,
}

impl std::fmt::Debug for TableWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableWriter").field("path", &self.path).finish()
    }
}

impl TableWriter {
    pub(crate) fn create(fs: &dyn Fs, path: &Path, settings: WriteSettings) -> Result<TableWriter> {
        let file = fs.open(path, OpenMode::CreateNew).map_err(io("create table", path))?;
        Ok(TableWriter {
            file,
            path: path.to_path_buf(),
            settings,
            file_offset: 0,
            out: Vec::with_capacity(WRITE_BUFFER_BYTES + settings.block_bytes * 2),
            block: BlockBuilder::new(settings.restart_interval),
            index: BlockBuilder::new(1),
            partitions: Vec::new(),
            raw: Vec::new(),
            scratch: Vec::new(),
            key_buf: Vec::new(),
            hashes: Vec::new(),
            last_user: Vec::new(),
            has_last: false,
            range_dels: Vec::new(),
            props: Props { seq_min: Seqno::MAX, ..Props::default() },
            has_any: false,
            smallest: Vec::new(),
            largest: Vec::new(),
            file_hash: xxhash_rust::xxh3::Xxh3::new(),
            compression: CompressionBackoff::default(),
            blob_refs: BTreeMap::new(),
        })
    }

    fn note_key(&mut self, key: &[u8]) {
        if !self.has_any || key < self.smallest.as_slice() {
            self.smallest.clear();
            self.smallest.extend_from_slice(key);
        }
        if !self.has_any || key > self.largest.as_slice() {
            self.largest.clear();
            self.largest.extend_from_slice(key);
        }
        self.has_any = true;
    }

    fn note_seq(&mut self, seq: Seqno) {
        self.props.seq_min = self.props.seq_min.min(seq);
        self.props.seq_max = self.props.seq_max.max(seq);
    }

    /// Adds one version of a key.
    pub(crate) fn add(&mut self, user: &[u8], trailer_: u64, value: &[u8]) -> Result<()> {
        if !self.has_last || self.last_user != user {
            self.hashes.push(bloom::hash(user));
            if self.has_any && self.has_last {
                debug_assert!(self.last_user.as_slice() < user, "keys out of order");
            }
            self.last_user.clear();
            self.last_user.extend_from_slice(user);
            self.has_last = true;
        }
        self.props.entries += 1;
        match trailer_kind(trailer_) {
            Some(ValueKind::Delete) => self.props.point_deletes += 1,
            Some(ValueKind::BlobRef) => {
                let r = BlobRef::decode(value).ok_or_else(|| {
                    corrupt(&self.path, 0, format!("a blob reference of {} bytes is malformed", value.len()))
                })?;
                let e = self.blob_refs.entry(r.file).or_default();
                e.0 += 1;
                e.1 += r.record_bytes();
            }
            _ => {}
        }
        self.props.key_bytes += user.len() as u64;
        self.props.value_bytes += value.len() as u64;
        self.note_seq(trailer_seq(trailer_));
        self.note_key(user);
        self.key_buf.clear();
        make_internal(&mut self.key_buf, user, trailer_);
        self.block.add(&self.key_buf, value);
        if self.block.estimated_bytes() >= self.settings.block_bytes {
            self.finish_data_block()?;
        }
        Ok(())
    }

    /// Adds a range tombstone.
    pub(crate) fn add_range_delete(&mut self, t: RangeTombstone) {
        self.note_key(&t.start);
        self.note_key(&t.end);
        self.note_seq(t.seq);
        self.props.range_deletes += 1;
        self.range_dels.push(t);
    }

    /// Records the markers of the writes this table holds.
    pub(crate) fn set_markers(&mut self, m: Option<(Marker, Marker)>) {
        self.props.markers = m;
    }

    /// Records where the marker range this table covers starts (a flush: the
    /// memtable's start), see [`Props::coverage`].
    pub(crate) fn set_coverage_after(&mut self, after: Option<Marker>) {
        self.props.coverage_after = Some(after);
    }

    /// Bytes written so far (approximately the file size).
    pub(crate) fn bytes_written(&self) -> u64 {
        self.file_offset + self.out.len() as u64 + self.block.estimated_bytes() as u64
    }

    pub(crate) fn is_empty(&self) -> bool {
        !self.has_any
    }

    fn finish_data_block(&mut self) -> Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let last_key = self.block.last_key().to_vec();
        self.block.finish_into(&mut self.raw);
        let offset = self.file_offset + self.out.len() as u64;
        let compression = self.compression.pick(self.settings.compression);
        let len = block::write_block(&mut self.out, &self.raw, compression, &mut self.scratch);
        if compression != Compression::None {
            // A block is stored raw unless compressing shrank it.
            self.compression.record((len as usize) < self.raw.len());
        }
        let mut handle = Vec::with_capacity(12);
        handle.extend_from_slice(&offset.to_le_bytes());
        handle.extend_from_slice(&len.to_le_bytes());
        self.index.add(&last_key, &handle);
        if self.index.estimated_bytes() >= self.settings.block_bytes {
            self.cut_partition();
        }
        if self.out.len() >= WRITE_BUFFER_BYTES {
            self.flush_buffer()?;
        }
        Ok(())
    }

    /// Ends the index partition being filled.
    fn cut_partition(&mut self) {
        if self.index.is_empty() {
            return;
        }
        let last_key = self.index.last_key().to_vec();
        let mut raw = Vec::new();
        self.index.finish_into(&mut raw);
        self.partitions.push(PartitionDraft { raw, last_key });
    }

    fn flush_buffer(&mut self) -> Result<()> {
        self.file.write_all_at(&self.out, self.file_offset).map_err(io("write table", &self.path))?;
        // Writeback begins as the table grows, not all at its final sync: a
        // 64 MiB burst at that sync holds up the Raft log's fsyncs behind it.
        // A hint only; a failing write shows at the sync.
        let _ = self.file.start_writeback(self.file_offset, self.out.len() as u64);
        self.file_hash.update(&self.out);
        self.file_offset += self.out.len() as u64;
        self.out.clear();
        Ok(())
    }

    fn write_meta_block(&mut self, raw: &[u8]) -> (u64, u32) {
        let offset = self.file_offset + self.out.len() as u64;
        let len = block::write_block(&mut self.out, raw, Compression::None, &mut self.scratch);
        (offset, len)
    }

    /// Writes the filter, the index partitions, the range-delete, top index
    /// and props blocks and the footer, syncs the file, and returns its size
    /// and whole-file checksum.
    pub(crate) fn finish(mut self) -> Result<Written> {
        assert!(self.has_any, "an empty table is never written");
        self.finish_data_block()?;
        self.cut_partition();
        let filter = bloom::build(&self.hashes, self.settings.bloom_bits_per_key);
        let (f_off, f_len) = self.write_meta_block(&filter);
        let mut top = BlockBuilder::new(1);
        for part in std::mem::take(&mut self.partitions) {
            let (off, len) = self.write_meta_block(&part.raw);
            let mut v = Vec::with_capacity(12);
            v.extend_from_slice(&off.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
            top.add(&part.last_key, &v);
            if self.out.len() >= WRITE_BUFFER_BYTES {
                self.flush_buffer()?;
            }
        }
        let mut rd = BlockBuilder::new(1);
        self.range_dels.sort_by(|a, b| a.start.cmp(&b.start).then(b.seq.cmp(&a.seq)));
        for t in &self.range_dels {
            let mut k = Vec::new();
            make_internal(&mut k, &t.start, trailer(t.seq, ValueKind::Delete));
            rd.add(&k, &t.end);
        }
        let mut raw = Vec::new();
        rd.finish_into(&mut raw);
        let (r_off, r_len) = self.write_meta_block(&raw);
        top.finish_into(&mut raw);
        let (i_off, i_len) = self.write_meta_block(&raw);
        raw.clear();
        if self.props.seq_min == Seqno::MAX {
            self.props.seq_min = 0;
        }
        self.props.smallest = Bytes::copy_from_slice(&self.smallest);
        self.props.largest = Bytes::copy_from_slice(&self.largest);
        self.props.blob_refs =
            self.blob_refs.iter().map(|(&file, &(count, bytes))| BlobRefs { file, count, bytes }).collect();
        self.props.encode(&mut raw);
        let (p_off, p_len) = self.write_meta_block(&raw);
        let mut footer = Vec::with_capacity(FOOTER_BYTES);
        for (off, len) in [(f_off, f_len), (r_off, r_len), (i_off, i_len), (p_off, p_len)] {
            footer.extend_from_slice(&off.to_le_bytes());
            footer.extend_from_slice(&len.to_le_bytes());
        }
        footer.extend_from_slice(&self.props.format_version().to_le_bytes());
        let crc = crc32c::crc32c(&footer);
        footer.extend_from_slice(&crc.to_le_bytes());
        footer.extend_from_slice(&TABLE_MAGIC.to_le_bytes());
        debug_assert_eq!(footer.len(), FOOTER_BYTES);
        self.out.extend_from_slice(&footer);
        self.flush_buffer()?;
        if !self.settings.skip_sync {
            self.file.sync_data().map_err(io("fsync table", &self.path))?;
        }
        Ok(Written {
            bytes: self.file_offset,
            file_xxh3: self.file_hash.digest(),
            blocks_tried: self.compression.tried,
            blocks_compressed: self.compression.compressed,
        })
    }
}

/// The first 16 bytes of a key as a big-endian integer (zero-padded): its
/// order agrees with the keys' order wherever the two prefixes differ.
pub(crate) fn key_prefix(key: &[u8]) -> u128 {
    let mut b = [0u8; 16];
    let n = key.len().min(16);
    b[..n].copy_from_slice(&key[..n]);
    u128::from_be_bytes(b)
}

/// One entry of an index: the last internal key of what it points at (a
/// data block, or an index partition) and that block's handle.
#[derive(Debug, Clone, Copy)]
struct IndexEntry {
    /// The first 16 bytes of the user key, big endian, zero-padded: most
    /// binary-search steps compare this and never touch the key bytes.
    prefix: u128,
    /// The user key is `keys[key_at..key_at + key_len]`.
    key_at: u32,
    key_len: u32,
    last_trailer: u64,
    offset: u64,
    len: u32,
}

/// A decoded index block: entries in internal-key order, their user keys in
/// one buffer.
#[derive(Debug, Default)]
pub(crate) struct Index {
    entries: Vec<IndexEntry>,
    keys: Vec<u8>,
}

/// Parses a 12-byte block handle.
fn parse_handle(v: &[u8]) -> Option<(u64, u32)> {
    let off = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let len = u32::from_le_bytes(v.get(8..12)?.try_into().ok()?);
    Some((off, len))
}

/// Whether the block `(off, len)` (and its trailer) lies inside `[from, to)`.
fn handle_within((off, len): (u64, u32), from: u64, to: u64) -> bool {
    off >= from && off.checked_add(u64::from(len) + TRAILER_BYTES as u64).is_some_and(|end| end <= to)
}

impl Index {
    /// Decodes an index block whose handles must point inside `[from, to)`.
    fn decode(raw: Bytes, from: u64, to: u64) -> Result<Index, String> {
        let block = Arc::new(Block::new(raw)?);
        let mut out = Index::default();
        let mut it = BlockIter::new(block);
        while it.advance()? {
            let (u, t) = split_internal(it.key());
            let v = it.value();
            if v.len() != 12 {
                return Err(format!("handle of {} bytes", v.len()));
            }
            let h = parse_handle(&v).ok_or("handle")?;
            if !handle_within(h, from, to) {
                return Err(format!("block handle {}+{} lies outside {from}..{to}", h.0, h.1));
            }
            if let Some(prev) = out.entries.last()
                && crate::types::cmp_internal(out.user(out.entries.len() - 1), prev.last_trailer, u, t)
                    != std::cmp::Ordering::Less
            {
                return Err("index keys out of order".into());
            }
            let key_at = u32::try_from(out.keys.len()).map_err(|_| "index keys above 4 GiB")?;
            out.keys.extend_from_slice(u);
            out.entries.push(IndexEntry {
                prefix: key_prefix(u),
                key_at,
                key_len: u.len() as u32,
                last_trailer: t,
                offset: h.0,
                len: h.1,
            });
        }
        out.entries.shrink_to_fit();
        out.keys.shrink_to_fit();
        Ok(out)
    }

    /// An index of one entry (formats 1 and 2: the whole index block as the
    /// only partition, after every key of the table).
    fn single(largest: &[u8], handle: (u64, u32)) -> Index {
        Index {
            entries: vec![IndexEntry {
                prefix: key_prefix(largest),
                key_at: 0,
                key_len: largest.len() as u32,
                last_trailer: 0,
                offset: handle.0,
                len: handle.1,
            }],
            keys: largest.to_vec(),
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    /// The user key of entry `e` (one of `self.entries`).
    fn key_of(&self, e: &IndexEntry) -> &[u8] {
        let at = e.key_at as usize;
        &self.keys[at..at + e.key_len as usize]
    }

    fn user(&self, i: usize) -> &[u8] {
        self.key_of(&self.entries[i])
    }

    fn handle(&self, i: usize) -> (u64, u32) {
        (self.entries[i].offset, self.entries[i].len)
    }

    /// The first entry whose last internal key is ≥ `(key, trailer)`.
    fn find(&self, key: &[u8], trailer: u64) -> usize {
        let kp = key_prefix(key);
        self.entries.partition_point(|e| match e.prefix.cmp(&kp) {
            std::cmp::Ordering::Less => true,
            std::cmp::Ordering::Greater => false,
            std::cmp::Ordering::Equal => {
                crate::types::cmp_internal(self.key_of(e), e.last_trailer, key, trailer) == std::cmp::Ordering::Less
            }
        })
    }

    /// The first entry whose last user key is > `key` (`inclusive`) or ≥ `key`.
    fn find_user(&self, key: &[u8], inclusive: bool) -> usize {
        self.entries.partition_point(|e| if inclusive { self.key_of(e) <= key } else { self.key_of(e) < key })
    }

    /// Bytes held in memory.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<IndexEntry>() + self.keys.capacity() + 72
    }
}

/// (offset, payload length) of the footer's four slots: the filter,
/// range-delete, index (format 3: the top index) and props blocks.
type BlockHandles = [(u64, u32); 4];

/// Reads and checks a table's footer (magic, crc, handles inside the file,
/// version) and its props block: the block handles, the props, the file
/// size and the format version.
fn read_footer_and_props(file: &dyn FsFile, path: &Path) -> Result<(BlockHandles, Props, u64, u32)> {
    let size = file.len().map_err(io("stat table", path))?;
    if size < FOOTER_BYTES as u64 {
        return Err(corrupt(path, 0, format!("{size} bytes is too short for a table")));
    }
    let mut footer = [0u8; FOOTER_BYTES];
    file.read_exact_at(&mut footer, size - FOOTER_BYTES as u64).map_err(io("read table footer", path))?;
    let foot_at = size - FOOTER_BYTES as u64;
    let magic = u64::from_le_bytes(footer[56..64].try_into().map_err(|_| corrupt(path, foot_at, "footer"))?);
    if magic != TABLE_MAGIC {
        return Err(corrupt(path, foot_at + 56, "bad magic: not a cairn-lsm table"));
    }
    let crc = u32::from_le_bytes(footer[52..56].try_into().map_err(|_| corrupt(path, foot_at, "footer"))?);
    if crc32c::crc32c(&footer[..52]) != crc {
        return Err(corrupt(path, foot_at, "footer checksum mismatch"));
    }
    let mut r = Reader::new(&footer[..52]);
    let mut handles: BlockHandles = [(0, 0); 4];
    for h in &mut handles {
        let off = r.u64().map_err(|e| corrupt(path, foot_at, e))?;
        let len = r.u32().map_err(|e| corrupt(path, foot_at, e))?;
        if off.checked_add(u64::from(len) + TRAILER_BYTES as u64).is_none_or(|end| end > foot_at) {
            return Err(corrupt(path, foot_at, format!("block handle {off}+{len} lies outside the file")));
        }
        *h = (off, len);
    }
    let version = r.u32().map_err(|e| corrupt(path, foot_at, e))?;
    if !(TABLE_FORMAT_VERSION_MIN..=TABLE_FORMAT_VERSION).contains(&version) {
        return Err(Error::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
            supported: TABLE_FORMAT_VERSION,
        });
    }
    let pr = handles[3];
    let props_raw = read_meta_block(file, path, pr)?;
    let props =
        Props::decode(&mut Reader::new(&props_raw), version).map_err(|e| corrupt(path, pr.0, format!("props: {e}")))?;
    Ok((handles, props, size, version))
}

/// Reads and checks one whole block at `(offset, payload length)`.
fn read_meta_block(file: &dyn FsFile, path: &Path, (off, len): (u64, u32)) -> Result<Bytes> {
    let mut buf = vec![0u8; len as usize + TRAILER_BYTES];
    file.read_exact_at(&mut buf, off).map_err(io("read table block", path))?;
    block::read_block(&buf, BLOCK_BYTES_MAX).map_err(|e| corrupt(path, off, e))
}

/// A table's props, read from its footer and props block only (for ingest,
/// before the table is linked in and opened).
pub(crate) fn read_props(fs: &dyn Fs, path: &Path) -> Result<Props> {
    let file = fs.open(path, OpenMode::Read).map_err(io("open table", path))?;
    read_footer_and_props(&*file, path).map(|(_, p, _, _)| p)
}

/// An open table. Its top index, filter and range deletes stay in memory
/// (the filter charged against the block cache's bound); index partitions
/// and data blocks go through the block cache.
pub(crate) struct Table {
    pub(crate) id: TableId,
    /// The file, removed when the table drops after `mark_obsolete`.
    f: EngineFile,
    /// One entry per index partition.
    top: Index,
    /// Held while the table is open, charged against the block cache's
    /// bound (see [`BlockCache::charge`] and [`Table::filter_bytes`]).
    bloom: Bloom,
    /// Data blocks end here, where the filter starts.
    data_end: u64,
    /// Format 3: each partition's last key must equal its top index entry's.
    check_partition_keys: bool,
    /// Range tombstones, sequence numbers shifted by `seq_offset`.
    pub(crate) range_dels: Vec<RangeTombstone>,
    pub(crate) props: Props,
    pub(crate) file_bytes: u64,
    /// Added to every stored sequence number (tables ingested from elsewhere).
    pub(crate) seq_offset: u64,
    /// Added (modulo 2^64) to the blob file id of every stored reference
    /// (tables ingested with blob files, which got ids of this engine):
    /// references leave the table with this engine's ids, and
    /// `props.blob_refs` holds them too.
    pub(crate) blob_offset: u64,
    /// xxh3-64 of the whole file, recorded when this engine wrote it (`None`
    /// for tables ingested from elsewhere or recorded by an older build).
    pub(crate) file_xxh3: Option<u64>,
    cache: BlockCache,
    /// The blob files `props.blob_refs` names, in the same order (by id).
    pub(crate) blobs: Vec<Arc<BlobFile>>,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").field("id", &self.id).field("path", &self.f.path()).finish()
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        self.cache.charge(self.filter_bytes(), false);
    }
}

impl Table {
    /// Opens a table: reads and checks the footer, props, top index and
    /// range deletes. Every error names the file.
    pub(crate) fn open(fs: Arc<dyn Fs>, path: &Path, id: TableId, seq_offset: u64, cache: BlockCache) -> Result<Table> {
        let file = fs.open(path, OpenMode::Read).map_err(io("open table", path))?;
        let (handles, props, size, version) = read_footer_and_props(&*file, path)?;
        let read = |h: (u64, u32)| read_meta_block(&*file, path, h);
        let [f, rd, ix, _] = handles;
        let bloom = Bloom::new(read(f)?.to_vec()).map_err(|e| corrupt(path, f.0, format!("filter: {e}")))?;
        let top = if version >= 3 {
            // Index partitions lie between the filter and the range deletes.
            let bad_ix = |e: String| corrupt(path, ix.0, format!("top index block: {e}"));
            Index::decode(read(ix)?, f.0, rd.0).map_err(bad_ix)?
        } else {
            // The whole index block is the one partition.
            Index::single(&props.largest, ix)
        };
        let bad_rd = |e: String| corrupt(path, rd.0, format!("range-delete block: {e}"));
        let rd_block = Arc::new(Block::new(read(rd)?).map_err(bad_rd)?);
        let mut range_dels = Vec::new();
        let mut it = BlockIter::new(rd_block);
        while it.advance().map_err(bad_rd)? {
            let (u, t) = split_internal(it.key());
            let end = it.value();
            if end.as_ref() <= u {
                return Err(bad_rd("empty range".into()));
            }
            range_dels.push(RangeTombstone { start: Bytes::copy_from_slice(u), end, seq: trailer_seq(t) + seq_offset });
        }
        if range_dels.len() as u64 != props.range_deletes {
            return Err(bad_rd(format!("{} range deletes, props say {}", range_dels.len(), props.range_deletes)));
        }
        let table = Table {
            id,
            f: EngineFile::new(fs, path, file),
            top,
            bloom,
            data_end: f.0,
            check_partition_keys: version >= 3,
            range_dels,
            props,
            file_bytes: size,
            seq_offset,
            blob_offset: 0,
            file_xxh3: None,
            cache,
            blobs: Vec::new(),
        };
        // Given back when the table drops.
        table.cache.charge(table.filter_bytes(), true);
        Ok(table)
    }

    pub(crate) fn path(&self) -> &Path {
        self.f.path()
    }

    /// The same table with its recorded whole-file checksum.
    pub(crate) fn with_file_xxh3(mut self, file_xxh3: Option<u64>) -> Table {
        self.file_xxh3 = file_xxh3;
        self
    }

    /// The same table with its references' blob file ids shifted by
    /// `offset` (modulo 2^64). Before [`Table::with_blobs`].
    pub(crate) fn with_blob_offset(mut self, offset: u64) -> Table {
        self.blob_offset = offset;
        for r in &mut self.props.blob_refs {
            r.file = r.file.wrapping_add(offset);
        }
        self.props.blob_refs.sort_by_key(|r| r.file);
        self
    }

    /// A stored value as it leaves the table: a blob reference gets this
    /// engine's blob file id.
    fn out_value(&self, trailer: u64, value: Bytes) -> Result<Bytes> {
        if self.blob_offset == 0 || trailer_kind(trailer) != Some(ValueKind::BlobRef) {
            return Ok(value);
        }
        let mut r = BlobRef::decode(&value).ok_or_else(|| {
            corrupt(self.f.path(), 0, format!("a blob reference of {} bytes is malformed", value.len()))
        })?;
        r.file = r.file.wrapping_add(self.blob_offset);
        Ok(Bytes::copy_from_slice(&r.encode()))
    }

    /// The same table holding the blob files it references, each found by
    /// `find` (which errs for a missing file).
    pub(crate) fn with_blobs(mut self, mut find: impl FnMut(BlobId) -> Result<Arc<BlobFile>>) -> Result<Table> {
        self.blobs = self.props.blob_refs.iter().map(|r| find(r.file)).collect::<Result<_>>()?;
        Ok(self)
    }

    /// The same table, its file removed through `purger` once obsolete.
    pub(crate) fn with_purger(mut self, purger: Option<Purger>) -> Table {
        self.f.set_purger(purger);
        self
    }

    /// Deletes the file once the last reader lets go.
    pub(crate) fn mark_obsolete(&self) {
        self.f.mark_obsolete();
    }

    /// Smallest sequence number, after the offset.
    pub(crate) fn seq_min(&self) -> Seqno {
        self.props.seq_min + self.seq_offset
    }

    /// Largest sequence number, after the offset.
    pub(crate) fn seq_max(&self) -> Seqno {
        self.props.seq_max + self.seq_offset
    }

    /// The bytes charged against the block cache for the filter.
    fn filter_bytes(&self) -> u64 {
        self.bloom.memory_bytes() as u64 + BLOOM_OVERHEAD_BYTES
    }

    /// Memory held outside the block cache (top index, filter, range deletes).
    pub(crate) fn memory_bytes(&self) -> usize {
        self.top.memory_bytes()
            + self.filter_bytes() as usize
            + self.range_dels.iter().map(|t| t.start.len() + t.end.len() + 48).sum::<usize>()
    }

    /// Index partition `p`, through the cache.
    fn partition(&self, p: usize, fill_cache: bool) -> Result<Arc<Index>> {
        let h = self.top.handle(p);
        self.cache.get_or_load(self.id, h.0, fill_cache, || {
            let bad = |e: String| corrupt(self.f.path(), h.0, format!("index partition: {e}"));
            let part =
                Index::decode(read_meta_block(self.f.file(), self.f.path(), h)?, 0, self.data_end).map_err(bad)?;
            if self.check_partition_keys {
                let last = part.len().checked_sub(1).ok_or_else(|| bad("empty".into()))?;
                if part.user(last) != self.top.user(p)
                    || part.entries[last].last_trailer != self.top.entries[p].last_trailer
                {
                    return Err(bad("its last key differs from the top index's".into()));
                }
            }
            Ok(Arc::new(part))
        })
    }

    /// The data block at `handle`, through the cache; `fill_cache = false`
    /// (compaction reads) uses a cached block but does not insert one.
    fn block(&self, (offset, len): (u64, u32), fill_cache: bool) -> Result<Arc<Block>> {
        self.cache.get_or_load(self.id, offset, fill_cache, || {
            let mut buf = vec![0u8; len as usize + TRAILER_BYTES];
            self.f.file().read_exact_at(&mut buf, offset).map_err(io("read table block", self.f.path()))?;
            self.decode_block(&buf, offset)
        })
    }

    /// Checks and decodes the stored block `buf` read at `offset`.
    fn decode_block(&self, buf: &[u8], offset: u64) -> Result<Arc<Block>> {
        let raw = block::read_block(buf, BLOCK_BYTES_MAX).map_err(|m| corrupt(self.f.path(), offset, m))?;
        Block::new(raw).map(Arc::new).map_err(|m| corrupt(self.f.path(), offset, m))
    }

    /// The data block at `handle` for a forward scan that reads ahead: a
    /// cached block is used, else the block comes from `ra`'s window, which is
    /// refilled with one read of up to `ra.bytes` from the block on when it
    /// does not hold the block. Nothing is inserted into the cache.
    fn block_ahead(&self, (offset, len): (u64, u32), ra: &mut ReadAhead) -> Result<Arc<Block>> {
        self.cache.get_or_load(self.id, offset, false, || {
            let need = len as usize + TRAILER_BYTES;
            let end = offset + need as u64;
            if offset < ra.at || end > ra.at + ra.buf.len() as u64 {
                // The window ends at the data blocks' end. (Decoding the
                // index checked that every handle, trailer included, lies
                // before it; `max(end)` only keeps the subtraction safe.)
                let n = (ra.bytes as u64).max(need as u64).min(self.data_end.max(end) - offset) as usize;
                ra.buf.resize(n, 0);
                ra.at = offset;
                if let Err(e) = self.f.file().read_exact_at(&mut ra.buf, offset) {
                    ra.buf.clear();
                    return Err(io("read table blocks", self.f.path())(e));
                }
            }
            let at = (offset - ra.at) as usize;
            self.decode_block(&ra.buf[at..at + need], offset)
        })
    }

    fn shift(&self, t: u64) -> u64 {
        t + (self.seq_offset << 8)
    }

    /// The newest version of `key` with sequence number ≤ `snap`, if any.
    pub(crate) fn get(&self, key: &[u8], hash: u64, snap: Seqno) -> Result<Option<(u64, Bytes)>> {
        if snap < self.seq_min() || key < self.props.smallest.as_ref() || key > self.props.largest.as_ref() {
            return Ok(None);
        }
        if !self.bloom.may_contain(hash) {
            return Ok(None);
        }
        let stored_snap = (snap - self.seq_offset).min(crate::types::SEQNO_MAX);
        let target = (stored_snap << 8) | 0xff;
        let p = self.top.find(key, target);
        if p == self.top.len() {
            return Ok(None);
        }
        let part = self.partition(p, true)?;
        let i = part.find(key, target);
        if i == part.len() {
            return Ok(None);
        }
        let handle = part.handle(i);
        let block = self.block(handle, true)?;
        let mut it = BlockIter::with_key_buffer(block, KEY_BUF.with(|b| std::mem::take(&mut *b.borrow_mut())));
        let at = handle.0;
        let found = it.seek(key, target).map_err(|m| corrupt(self.f.path(), at, m));
        let out = match found {
            Ok(true) => {
                let (u, t) = split_internal(it.key());
                if u != key {
                    Ok(None)
                } else if trailer_kind(t).is_none() {
                    Err(corrupt(self.f.path(), at, format!("unknown value kind {}", t & 0xff)))
                } else {
                    self.out_value(t, it.value()).map(|v| Some((self.shift(t), v)))
                }
            }
            Ok(false) => Ok(None),
            Err(e) => Err(e),
        };
        KEY_BUF.with(|b| *b.borrow_mut() = it.into_key_buffer());
        out
    }
}

thread_local! {
    /// The key buffer point lookups decode into, reused (no allocation per get).
    static KEY_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A window of a table file read at once for a forward scan, so that a
/// compaction reads its inputs in reads of `bytes` rather than one block
/// (4 KiB) at a time: as RocksDB's `compaction_readahead_size`. Freed when
/// the scan ends.
#[derive(Debug)]
struct ReadAhead {
    /// Size of one read.
    bytes: usize,
    /// File offset of `buf[0]`.
    at: u64,
    buf: Vec<u8>,
}

/// Iterates one table forward or backward, yielding every version.
pub(crate) struct TableIter {
    table: Arc<Table>,
    fill_cache: bool,
    /// With [`TableIter::reading_ahead`], for a forward scan.
    ahead: Option<ReadAhead>,
    forward: bool,
    /// Set once the first partition is loaded (lazily: creating an iterator
    /// does no I/O and cannot fail).
    positioned: bool,
    /// The partition being walked, and its number.
    part: Option<Arc<Index>>,
    part_no: usize,
    /// Next data block of `part` to load (forward), or one past it (backward).
    next_block: usize,
    cur: Option<BlockIter>,
    cur_at: u64,
    back: Vec<(Vec<u8>, Bytes)>,
    seek: Option<Vec<u8>>,
}

impl TableIter {
    /// A forward iterator from the first key ≥ `start`, or a backward one from
    /// the last block that may hold keys ≤ `start` (the caller skips the rest).
    pub(crate) fn new(table: Arc<Table>, forward: bool, start: Option<&[u8]>) -> TableIter {
        TableIter {
            table,
            fill_cache: true,
            ahead: None,
            forward,
            positioned: false,
            part: None,
            part_no: 0,
            next_block: 0,
            cur: None,
            cur_at: 0,
            back: Vec::new(),
            seek: start.map(<[u8]>::to_vec),
        }
    }

    /// A forward scan that reads the data blocks `bytes` at a time (0: a
    /// block at a time) and does not add them to the block cache. Holds at
    /// most `bytes` (or one larger block) until the scan ends.
    pub(crate) fn reading_ahead(mut self, bytes: usize) -> TableIter {
        self.fill_cache = false;
        if self.forward && bytes > 0 {
            self.ahead = Some(ReadAhead { bytes, at: 0, buf: Vec::new() });
        }
        self
    }

    fn entry(&self, key: &[u8], value: Bytes) -> Result<InternalEntry> {
        if key.len() < KEY_TRAILER_BYTES + 1 {
            return Err(corrupt(self.table.f.path(), 0, "short key"));
        }
        let (u, t) = split_internal(key);
        if trailer_kind(t).is_none() {
            return Err(corrupt(self.table.f.path(), 0, format!("unknown value kind {}", t & 0xff)));
        }
        let value = self.table.out_value(t, value)?;
        Ok(InternalEntry { user: Bytes::copy_from_slice(u), trailer: self.table.shift(t), value })
    }

    /// Loads partition `p` as the one being walked.
    fn enter(&mut self, p: usize) -> Result<Arc<Index>> {
        let part = self.table.partition(p, self.fill_cache)?;
        self.part = Some(Arc::clone(&part));
        self.part_no = p;
        Ok(part)
    }

    /// The handle of the next data block in iteration order, or `None` at the end.
    fn next_handle(&mut self) -> Result<Option<(u64, u32)>> {
        let parts = self.table.top.len();
        if !self.positioned {
            self.positioned = true;
            if parts == 0 {
                return Ok(None);
            }
            let start = self.seek.clone();
            if self.forward {
                let p = start.as_deref().map_or(0, |k| self.table.top.find_user(k, false));
                if p == parts {
                    return Ok(None);
                }
                let part = self.enter(p)?;
                self.next_block = start.as_deref().map_or(0, |k| part.find_user(k, false));
            } else {
                let p = start.as_deref().map_or(parts, |k| self.table.top.find_user(k, true));
                if p == parts {
                    self.next_block = self.enter(parts - 1)?.len();
                } else {
                    let part = self.enter(p)?;
                    let k = start.as_deref().unwrap_or_default();
                    self.next_block = (part.find_user(k, true) + 1).min(part.len());
                }
            }
        }
        loop {
            let Some(part) = &self.part else { return Ok(None) };
            if self.forward {
                if self.next_block < part.len() {
                    self.next_block += 1;
                    return Ok(Some(part.handle(self.next_block - 1)));
                }
                if self.part_no + 1 >= parts {
                    self.part = None;
                    return Ok(None);
                }
                self.enter(self.part_no + 1)?;
                self.next_block = 0;
            } else {
                if self.next_block > 0 {
                    self.next_block -= 1;
                    return Ok(Some(part.handle(self.next_block)));
                }
                if self.part_no == 0 {
                    self.part = None;
                    return Ok(None);
                }
                self.next_block = self.enter(self.part_no - 1)?.len();
            }
        }
    }

    /// The next version, or `None` at the end.
    pub(crate) fn next_entry(&mut self) -> Result<Option<InternalEntry>> {
        if self.forward {
            loop {
                if let Some(it) = &mut self.cur {
                    let at = self.cur_at;
                    if it.advance().map_err(|m| corrupt(self.table.f.path(), at, m))? {
                        if let Some(s) = &self.seek {
                            if split_internal(it.key()).0 < s.as_slice() {
                                continue;
                            }
                            self.seek = None;
                        }
                        let (u, t) = split_internal(it.key());
                        if trailer_kind(t).is_none() {
                            return Err(corrupt(self.table.f.path(), at, format!("unknown value kind {}", t & 0xff)));
                        }
                        return Ok(Some(InternalEntry {
                            user: Bytes::copy_from_slice(u),
                            trailer: self.table.shift(t),
                            value: self.table.out_value(t, it.value())?,
                        }));
                    }
                    self.cur = None;
                }
                let Some(h) = self.next_handle()? else {
                    self.ahead = None;
                    return Ok(None);
                };
                let b = match &mut self.ahead {
                    Some(ra) => self.table.block_ahead(h, ra)?,
                    None => self.table.block(h, self.fill_cache)?,
                };
                self.cur_at = h.0;
                self.cur = Some(BlockIter::new(b));
            }
        } else {
            loop {
                if let Some((k, v)) = self.back.pop() {
                    return self.entry(&k, v).map(Some);
                }
                let Some(h) = self.next_handle()? else { return Ok(None) };
                let b = self.table.block(h, self.fill_cache)?;
                self.back = BlockIter::collect_all(&b).map_err(|m| corrupt(self.table.f.path(), h.0, m))?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Versions of key `i`: most keys have 2, every 97th has 60 (so its
    /// versions span data blocks and index partitions).
    fn versions(i: u64) -> u64 {
        if i.is_multiple_of(97) { 60 } else { 2 }
    }

    fn key(i: u64) -> Vec<u8> {
        format!("key{i:06}").into_bytes()
    }

    /// Writes keys `0..n` (even numbers only), version `j` of key `i` at
    /// sequence number `i * 100 + j`, newest first.
    fn write(dir: &Path, n: u64, block_bytes: usize) -> PathBuf {
        let path = dir.join(table_file_name(1));
        let settings = WriteSettings {
            block_bytes,
            restart_interval: 4,
            bloom_bits_per_key: 10,
            compression: Compression::None,
            skip_sync: true,
        };
        let mut w = TableWriter::create(&cairn_wal::StdFs, &path, settings).expect("create");
        for i in (0..n).step_by(2) {
            for j in (0..versions(i)).rev() {
                w.add(&key(i), trailer(i * 100 + j, ValueKind::Put), format!("{i}-{j}").as_bytes()).expect("add");
            }
        }
        w.finish().expect("finish");
        path
    }

    #[test]
    fn partitioned_tables_answer_right_and_hold_little_memory() {
        let dir = tempfile::tempdir().expect("tmp");
        let n = 20_000;
        let path = write(dir.path(), n, 256);
        let cache_cap = 256 << 10;
        let cache = BlockCache::new(cache_cap);
        let t = Arc::new(Table::open(Arc::new(cairn_wal::StdFs), &path, 1, 0, cache.clone()).expect("open"));
        let blocks: usize = (0..t.top.len()).map(|p| t.partition(p, false).expect("partition").len()).sum();
        assert!(t.top.len() >= 20, "{} partitions", t.top.len());
        // A flat index held every block's key and handle; only one entry per
        // partition stays in memory now (a partition is cut at `block_bytes`
        // of index: here 6-7 blocks, at the default 4 KiB about 100).
        assert!(t.top.len() * 5 < blocks, "{} partitions for {blocks} blocks", t.top.len());
        assert!(
            t.top.memory_bytes() < t.top.len() * 100,
            "{} bytes for {} partitions",
            t.top.memory_bytes(),
            t.top.len()
        );
        // The filter is held, and charged against the cache's bound.
        assert!(t.filter_bytes() > 0);
        assert_eq!(cache.charged(), t.filter_bytes());
        // (The cache rounds its capacity up to a multiple of its shard count.)
        let left = cache_cap - t.filter_bytes();
        assert!((left..left + 256).contains(&cache.capacity()), "capacity {} for {left}", cache.capacity());
        for i in 0..n + 2 {
            let k = key(i);
            let h = bloom::hash(&k);
            for snap in [i * 100, i * 100 + 1, i * 100 + 30, i * 100 + 99] {
                let got = t.get(&k, h, snap).expect("get").map(|(tr, v)| (trailer_seq(tr), v));
                let want = (i % 2 == 0 && i < n).then(|| {
                    let j = (snap - i * 100).min(versions(i) - 1);
                    (i * 100 + j, Bytes::from(format!("{i}-{j}")))
                });
                assert_eq!(got, want, "key {i} at {snap}");
            }
            if i > 0 {
                // Older than every version of the key.
                assert_eq!(
                    t.get(&k, h, i * 100 - 1).expect("get").filter(|(_, v)| v.starts_with(format!("{i}-").as_bytes())),
                    None
                );
            }
        }
        assert!(cache.bytes() <= cache_cap, "cache holds {} bytes", cache.bytes());
        // Scans from every kind of start, both ways, see every version in order.
        let all: Vec<(Vec<u8>, u64)> =
            (0..n).step_by(2).flat_map(|i| (0..versions(i)).rev().map(move |j| (key(i), i * 100 + j))).collect();
        for start in [None, Some(0), Some(1), Some(97 * 2), Some(97 * 4 + 1), Some(n / 2), Some(n - 2), Some(n + 5)] {
            let sk = start.map(key);
            let want: Vec<_> = all.iter().filter(|(k, _)| sk.as_ref().is_none_or(|s| k >= s)).cloned().collect();
            // Through the cache, and reading ahead by windows smaller than a
            // block, of a few blocks, and of the whole table.
            for ahead in [None, Some(0), Some(1), Some(5000), Some(1 << 20)] {
                let mut fwd = Vec::new();
                let mut it = TableIter::new(Arc::clone(&t), true, sk.as_deref());
                if let Some(bytes) = ahead {
                    it = it.reading_ahead(bytes);
                }
                while let Some(e) = it.next_entry().expect("next") {
                    fwd.push((e.user.to_vec(), trailer_seq(e.trailer)));
                }
                assert_eq!(fwd, want, "forward from {start:?}, reading ahead {ahead:?}");
                assert!(it.ahead.is_none(), "the window is freed at the end");
            }
            let mut back = Vec::new();
            let mut it = TableIter::new(Arc::clone(&t), false, sk.as_deref()).reading_ahead(1 << 20);
            while let Some(e) = it.next_entry().expect("next") {
                if sk.as_ref().is_none_or(|s| e.user.as_ref() <= s.as_slice()) {
                    back.push((e.user.to_vec(), trailer_seq(e.trailer)));
                }
            }
            let mut want: Vec<_> = all.iter().filter(|(k, _)| sk.as_ref().is_none_or(|s| k <= s)).cloned().collect();
            want.reverse();
            assert_eq!(back, want, "backward from {start:?}");
        }
        drop(t);
        assert_eq!(cache.charged(), 0, "closing gives the charge back");
        assert!((cache_cap..cache_cap + 256).contains(&cache.capacity()), "capacity {}", cache.capacity());
    }

    /// Writes `n` keys with 1 KiB values from `value(i)` under `compression`
    /// and returns what the writer says of its blocks; every value reads back.
    fn write_values(n: u64, compression: Compression, value: impl Fn(u64) -> Vec<u8>) -> Written {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(table_file_name(1));
        let settings = WriteSettings {
            block_bytes: 4096,
            restart_interval: 16,
            bloom_bits_per_key: 10,
            compression,
            skip_sync: true,
        };
        let mut w = TableWriter::create(&cairn_wal::StdFs, &path, settings).expect("create");
        for i in 0..n {
            w.add(&key(i), trailer(i + 1, ValueKind::Put), &value(i)).expect("add");
        }
        let written = w.finish().expect("finish");
        let t = Arc::new(Table::open(Arc::new(cairn_wal::StdFs), &path, 1, 0, BlockCache::new(1 << 20)).expect("open"));
        for i in (0..n).step_by(7) {
            let k = key(i);
            let (_, v) = t.get(&k, bloom::hash(&k), crate::SEQNO_MAX).expect("get").expect("present");
            assert_eq!(v, value(i), "key {i}");
        }
        written
    }

    #[test]
    fn incompressible_blocks_stop_being_compressed_until_a_probe_shrinks() {
        use rand::{Rng, SeedableRng};
        let random = |i: u64| {
            let mut v = vec![0u8; 1024];
            rand_chacha::ChaCha8Rng::seed_from_u64(i).fill(&mut v[..]);
            v
        };
        let text = |i: u64| {
            format!("{{\"id\": {i}, \"name\": \"some text that repeats\"}} ").repeat(24).into_bytes()[..1024].to_vec()
        };
        let n = 4000; // about 1,000 blocks of 4 KiB
        for compression in [Compression::Lz4, Compression::Zstd(1)] {
            // Random values: tried 8 times, then one block in 32.
            let w = write_values(n, compression, random);
            assert_eq!(w.blocks_compressed, 0, "{compression:?}");
            let blocks = n / 4; // four 1 KiB values per 4 KiB block
            assert!(w.blocks_tried <= 8 + blocks / 32 + 2, "{compression:?}: tried {} blocks", w.blocks_tried);
            assert!(w.blocks_tried >= 8 + blocks / 40, "{compression:?}: tried {} blocks", w.blocks_tried);
            // Compressible values: every block is tried and stored compressed.
            let w = write_values(n, compression, text);
            assert_eq!(w.blocks_tried, w.blocks_compressed, "{compression:?}");
            assert!(w.blocks_compressed >= n / 40, "{compression:?}: {} compressed", w.blocks_compressed);
            // Random, then compressible: the probe finds the change within 32 blocks.
            let w = write_values(n, compression, |i| if i < n / 2 { random(i) } else { text(i) });
            let text_blocks = (n / 2) * 1024 / 4096 * 95 / 100;
            assert!(w.blocks_compressed + 32 >= text_blocks, "{compression:?}: {} compressed", w.blocks_compressed);
        }
        // Off: nothing tried.
        let w = write_values(n, Compression::None, text);
        assert_eq!((w.blocks_tried, w.blocks_compressed), (0, 0));
    }

    /// Tables written by earlier builds (formats 1 and 2: one index block,
    /// one filter) read as before: the seed corpus holds such files, written
    /// by the fuzz sample writer (60 keys `key0000..`, values `v{i}` x 5,
    /// `key0007` deleted, `[key0010, key0020)` range-deleted).
    #[test]
    fn tables_of_formats_1_and_2_still_read() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/table_reader");
        for (name, version) in [("seed-06", 1), ("seed-08", 1), ("v2-seed-06", 2), ("v2-seed-10", 2)] {
            let path = dir.join(name);
            let t = Arc::new(
                Table::open(Arc::new(cairn_wal::StdFs), &path, 1, 0, BlockCache::new(1 << 20)).expect("open old table"),
            );
            let (_, _, _, v) =
                read_footer_and_props(&*cairn_wal::StdFs.open(&path, OpenMode::Read).expect("open"), &path)
                    .expect("footer");
            assert_eq!(v, version, "{name}");
            assert_eq!(t.range_dels.len(), 1, "{name}");
            let mut puts = 0;
            let mut it = TableIter::new(Arc::clone(&t), true, None);
            while let Some(e) = it.next_entry().expect("next") {
                if trailer_kind(e.trailer) == Some(ValueKind::Put) {
                    let i: usize = std::str::from_utf8(&e.user[3..]).expect("utf8").parse().expect("key");
                    assert_eq!(e.value, format!("v{i}").repeat(5).as_bytes(), "{name}");
                    puts += 1;
                }
            }
            assert!(puts >= 40, "{name}: {puts} puts");
            let k = b"key0042";
            let (_, v) = t.get(k, bloom::hash(k), crate::SEQNO_MAX).expect("get").expect("present");
            assert_eq!(v, "v42".repeat(5).as_bytes(), "{name}");
            assert_eq!(t.get(b"key0099", bloom::hash(b"key0099"), crate::SEQNO_MAX).expect("get"), None);
        }
    }
}
