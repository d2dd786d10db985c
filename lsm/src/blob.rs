//! Blob files: values kept out of the tables (key-value separation, as in
//! WiscKey and RocksDB's integrated BlobDB).
//!
//! With [`crate::Options::blob_value_bytes_min`] set, a flush writes each
//! value at least that long to a blob file of its own and stores in the
//! table, in its place, a [`BlobRef`] (kind [`crate::ValueKind::BlobRef`]).
//! Compactions then move 20-byte references instead of the values, so the
//! values are written once instead of once per level. A blob file is
//! immutable; it is removed when no table of any live version references it.
//! A compaction rewrites into a new blob file the values it keeps from blob
//! files whose garbage share reached [`crate::Options::blob_gc_garbage_percent`]
//! (see `docs/design/lsm.md` §12).
//!
//! File format (little-endian): a 16-byte header (magic `CAIRNBLB`, format
//! version u32, crc32c of those 12 bytes), then one record per value, each
//! stored as a table's data block is: the value (compressed if that shrank
//! it) and a 9-byte trailer (compression, uncompressed length, crc32c).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use cairn_wal::{Fs, FsFile, OpenMode};

use crate::block::{TRAILER_BYTES, read_block, write_block};
use crate::error::{Result, corrupt, io};
use crate::options::Compression;
use crate::purge::{EngineFile, Purger};
use crate::table::{CompressionBackoff, id_file_name, parse_id_file_name};
use crate::types::VALUE_BYTES_MAX;

/// A blob file's identifier: drawn from the same counter as table ids, so
/// unique within one engine directory.
pub(crate) type BlobId = u64;

const BLOB_MAGIC: u64 = u64::from_le_bytes(*b"CAIRNBLB");
const BLOB_FORMAT_VERSION: u32 = 1;
/// Bytes of the file header.
pub(crate) const HEADER_BYTES: u64 = 16;
/// Bytes of an encoded [`BlobRef`].
pub(crate) const REF_BYTES: usize = 20;
/// Bytes gathered before one write to the file.
const WRITE_BUFFER_BYTES: usize = 1 << 20;

/// Name of blob file `id`'s file (beside the tables).
pub(crate) fn blob_file_name(id: BlobId) -> String {
    id_file_name(id, ".blob")
}

/// Parses a blob file name.
pub(crate) fn parse_blob_file_name(name: &str) -> Option<BlobId> {
    parse_id_file_name(name, ".blob")
}

/// The id of a blob file the engine named `name` (`{id:016x}.blob`), as
/// [`Db::ingest_with_blobs`](crate::Db::ingest_with_blobs) takes it.
pub fn blob_file_id(name: &str) -> Option<u64> {
    parse_blob_file_name(name)
}

/// Where a value lives: its blob file, the offset of its record, and the
/// length of the record's payload (the value as stored, before the trailer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlobRef {
    pub(crate) file: BlobId,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

impl BlobRef {
    /// The 20 bytes stored in a table in the value's place.
    pub(crate) fn encode(&self) -> [u8; REF_BYTES] {
        let mut b = [0u8; REF_BYTES];
        b[..8].copy_from_slice(&self.file.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decodes a stored reference; `None` unless it is exactly 20 bytes of
    /// a reference past the header to a record no longer than the largest value.
    pub(crate) fn decode(b: &[u8]) -> Option<BlobRef> {
        let b: &[u8; REF_BYTES] = b.try_into().ok()?;
        let file = u64::from_le_bytes(b[..8].try_into().ok()?);
        let offset = u64::from_le_bytes(b[8..16].try_into().ok()?);
        let len = u32::from_le_bytes(b[16..].try_into().ok()?);
        (offset >= HEADER_BYTES && len as usize <= VALUE_BYTES_MAX).then_some(BlobRef { file, offset, len })
    }

    /// Bytes of the file the record takes (payload and trailer).
    pub(crate) fn record_bytes(&self) -> u64 {
        u64::from(self.len) + TRAILER_BYTES as u64
    }
}

fn header() -> [u8; HEADER_BYTES as usize] {
    let mut h = [0u8; HEADER_BYTES as usize];
    h[..8].copy_from_slice(&BLOB_MAGIC.to_le_bytes());
    h[8..12].copy_from_slice(&BLOB_FORMAT_VERSION.to_le_bytes());
    let crc = crc32c::crc32c(&h[..12]);
    h[12..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Writes one blob file. Values are appended; [`BlobWriter::finish`] syncs it.
pub(crate) struct BlobWriter {
    file: Box<dyn FsFile>,
    path: PathBuf,
    id: BlobId,
    /// Bytes written to the file so far.
    written: u64,
    out: Vec<u8>,
    skip_sync: bool,
    compression: Compression,
    backoff: CompressionBackoff,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter").field("path", &self.path).finish()
    }
}

impl BlobWriter {
    /// Creates blob file `id` at `path` (which must not exist); values are
    /// compressed with `compression` where that shrinks them (backing off
    /// as a table writer does when they do not).
    pub(crate) fn create(
        fs: &dyn Fs,
        path: &Path,
        id: BlobId,
        compression: Compression,
        skip_sync: bool,
    ) -> Result<BlobWriter> {
        let file = fs.open(path, OpenMode::CreateNew).map_err(io("create blob file", path))?;
        let mut out = Vec::with_capacity(WRITE_BUFFER_BYTES + (64 << 10));
        out.extend_from_slice(&header());
        Ok(BlobWriter {
            file,
            path: path.to_path_buf(),
            id,
            written: 0,
            out,
            skip_sync,
            compression,
            backoff: CompressionBackoff::default(),
            scratch: Vec::new(),
        })
    }

    /// The file's id.
    pub(crate) fn id(&self) -> BlobId {
        self.id
    }

    /// Appends `value` and returns where it lies.
    pub(crate) fn add(&mut self, value: &[u8]) -> Result<BlobRef> {
        debug_assert!(value.len() <= VALUE_BYTES_MAX);
        let offset = self.written + self.out.len() as u64;
        let compression = self.backoff.pick(self.compression);
        let len = write_block(&mut self.out, value, compression, &mut self.scratch);
        if compression != Compression::None {
            self.backoff.record((len as usize) < value.len());
        }
        if self.out.len() >= WRITE_BUFFER_BYTES {
            self.write_out()?;
        }
        Ok(BlobRef { file: self.id, offset, len })
    }

    fn write_out(&mut self) -> Result<()> {
        self.file.write_all_at(&self.out, self.written).map_err(io("write blob file", &self.path))?;
        // Writeback starts as the file grows (as for tables); a hint only.
        let _ = self.file.start_writeback(self.written, self.out.len() as u64);
        self.written += self.out.len() as u64;
        self.out.clear();
        Ok(())
    }

    /// Writes what is buffered and syncs the file; returns its size.
    pub(crate) fn finish(mut self) -> Result<u64> {
        self.write_out()?;
        if !self.skip_sync {
            self.file.sync_data().map_err(io("fsync blob file", &self.path))?;
        }
        Ok(self.written)
    }
}

/// An open blob file. Removed (through the purger, as a table) when dropped
/// after [`BlobFile::mark_obsolete`].
pub(crate) struct BlobFile {
    pub(crate) id: BlobId,
    /// The file, removed when dropped after `mark_obsolete`.
    f: EngineFile,
    /// The file's size.
    pub(crate) bytes: u64,
}

impl std::fmt::Debug for BlobFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobFile").field("id", &self.id).field("path", &self.f.path()).finish()
    }
}

impl BlobFile {
    /// Opens blob file `id` and checks its header.
    pub(crate) fn open(fs: Arc<dyn Fs>, path: &Path, id: BlobId, purger: Option<Purger>) -> Result<BlobFile> {
        let file = fs.open(path, OpenMode::Read).map_err(io("open blob file", path))?;
        let bytes = file.len().map_err(io("stat blob file", path))?;
        if bytes < HEADER_BYTES {
            return Err(corrupt(path, 0, format!("{bytes} bytes is too short for a blob file")));
        }
        let mut h = [0u8; HEADER_BYTES as usize];
        file.read_exact_at(&mut h, 0).map_err(io("read blob file header", path))?;
        let want = header();
        if h[..8] != want[..8] {
            return Err(corrupt(path, 0, "bad magic: not a cairn-lsm blob file"));
        }
        if crc32c::crc32c(&h[..12]).to_le_bytes() != h[12..] {
            return Err(corrupt(path, 0, "header checksum mismatch"));
        }
        let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if version != BLOB_FORMAT_VERSION {
            return Err(crate::Error::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version,
                supported: BLOB_FORMAT_VERSION,
            });
        }
        let mut f = EngineFile::new(fs, path, file);
        f.set_purger(purger);
        Ok(BlobFile { id, f, bytes })
    }

    pub(crate) fn path(&self) -> &Path {
        self.f.path()
    }

    /// Reads and checks the value `r` points at.
    pub(crate) fn read(&self, r: &BlobRef) -> Result<Bytes> {
        debug_assert_eq!(r.file, self.id);
        let end = r.offset.checked_add(r.record_bytes()).filter(|&e| e <= self.bytes);
        if r.offset < HEADER_BYTES || end.is_none() {
            return Err(corrupt(
                self.f.path(),
                r.offset,
                format!("a reference to {} bytes lies outside the file of {} bytes", r.len, self.bytes),
            ));
        }
        let mut buf = vec![0u8; r.record_bytes() as usize];
        self.f.file().read_exact_at(&mut buf, r.offset).map_err(io("read blob file", self.f.path()))?;
        read_block(&buf, VALUE_BYTES_MAX).map_err(|e| corrupt(self.f.path(), r.offset, format!("value: {e}")))
    }

    /// Removes the file once the last holder lets go.
    pub(crate) fn mark_obsolete(&self) {
        self.f.mark_obsolete();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_damage_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let fs: Arc<dyn Fs> = Arc::new(cairn_wal::StdFs);
        let path = dir.path().join(blob_file_name(7));
        let mut w = BlobWriter::create(&*fs, &path, 7, Compression::Lz4, false).expect("create");
        // Compressible and incompressible values, and empty ones.
        let values: Vec<Vec<u8>> = (0..2000u32)
            .map(|i| {
                let n = (i as usize * 37) % 3000;
                if i % 3 == 0 {
                    (0..n).map(|j| (j as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect()
                } else {
                    vec![(i % 251) as u8; n]
                }
            })
            .collect();
        let refs: Vec<BlobRef> = values.iter().map(|v| w.add(v).expect("add")).collect();
        let size = w.finish().expect("finish");
        let f = BlobFile::open(Arc::clone(&fs), &path, 7, None).expect("open");
        assert_eq!(f.bytes, size);
        for (v, r) in values.iter().zip(&refs) {
            assert_eq!(BlobRef::decode(&r.encode()), Some(*r));
            assert_eq!(f.read(r).expect("read").as_ref(), v.as_slice());
        }
        // A reference past the end, or to the wrong length, is an error.
        let last = refs[refs.len() - 1];
        assert!(f.read(&BlobRef { len: last.len + 1, ..last }).is_err());
        assert!(f.read(&BlobRef { offset: refs[5].offset + 1, ..refs[5] }).is_err());
        // A flipped byte in a value is found.
        let mut data = std::fs::read(&path).expect("read");
        let at = refs[9].offset as usize + 1;
        data[at] ^= 1;
        std::fs::write(&path, &data).expect("write");
        let f = BlobFile::open(Arc::clone(&fs), &path, 7, None).expect("open");
        assert!(matches!(f.read(&refs[9]), Err(crate::Error::Corrupt { .. })));
        assert!(f.read(&refs[8]).is_ok());
        // A damaged header is refused at open.
        data[3] ^= 1;
        std::fs::write(&path, &data).expect("write");
        assert!(BlobFile::open(fs, &path, 7, None).is_err());
        assert_eq!(parse_blob_file_name(&blob_file_name(0xabc)), Some(0xabc));
        assert_eq!(parse_blob_file_name("00000000000abc.sst"), None);
    }

    #[test]
    fn short_or_bad_references_do_not_decode() {
        let r = BlobRef { file: 1, offset: HEADER_BYTES, len: 10 };
        let e = r.encode();
        assert_eq!(BlobRef::decode(&e[..19]), None);
        assert_eq!(BlobRef::decode(&BlobRef { offset: 3, ..r }.encode()), None);
        assert_eq!(BlobRef::decode(&BlobRef { len: u32::MAX, ..r }.encode()), None);
    }
}
