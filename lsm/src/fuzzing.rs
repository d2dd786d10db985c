//! Entry points for the fuzz targets (`lsm/fuzz/`) and their corpus test.
//! Not a stable API.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use crate::block::{Block, BlockIter, read_block};
use crate::cache::BlockCache;
use crate::table::{Table, TableIter};

/// Decodes `data` as a block on disk (payload + trailer) and walks it:
/// must return an error or entries, never panic.
pub fn decode_block(data: &[u8]) {
    let raw = match read_block(data, 1 << 20) {
        Ok(r) => r,
        // Also try the bytes as an already uncompressed block.
        Err(_) => Bytes::copy_from_slice(data),
    };
    if let Ok(b) = Block::new(raw) {
        let b = Arc::new(b);
        let mut it = BlockIter::new(Arc::clone(&b));
        let mut n = 0;
        while let Ok(true) = it.advance() {
            n += 1;
            if n > 100_000 {
                break;
            }
        }
        let mut it = BlockIter::new(Arc::clone(&b));
        let _ = it.seek(b"key", u64::MAX);
        let _ = BlockIter::collect_all(&b);
    }
}

/// Writes `data` as a table file in `dir`, opens it, and reads every entry
/// forward and backward and a few point lookups: errors are fine, panics are not.
pub fn read_table(dir: &Path, data: &[u8]) {
    let path = dir.join("fuzz.sst");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let fs: Arc<dyn cairn_wal::Fs> = Arc::new(cairn_wal::StdFs);
    if let Ok(t) = Table::open(fs, &path, 1, 0, BlockCache::new(1 << 20)) {
        let t = Arc::new(t);
        for forward in [true, false] {
            let mut it = TableIter::new(Arc::clone(&t), forward, None);
            let mut n = 0;
            while let Ok(Some(_)) = it.next_entry() {
                n += 1;
                if n > 100_000 {
                    break;
                }
            }
        }
        for k in [&b"a"[..], b"key", b"zzzz"] {
            let _ = t.get(k, crate::bloom::hash(k), crate::SEQNO_MAX);
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Reads `data` as a blob reference (its first 20 bytes) and a blob file
/// (the rest), written to `dir`: opens the file, reads what the reference
/// points at, and records of every short length at the first offset.
/// Errors are fine, panics are not.
pub fn read_blob_file(dir: &Path, data: &[u8]) {
    use crate::blob::{BlobFile, BlobRef, HEADER_BYTES, REF_BYTES};
    let (head, file) = data.split_at(data.len().min(REF_BYTES));
    let path = dir.join("fuzz.blob");
    if std::fs::write(&path, file).is_err() {
        return;
    }
    let fs: Arc<dyn cairn_wal::Fs> = Arc::new(cairn_wal::StdFs);
    if let Ok(b) = BlobFile::open(fs, &path, 1, None) {
        if let Some(r) = BlobRef::decode(head) {
            let _ = b.read(&BlobRef { file: 1, ..r });
        }
        // Records of every short length from the header on.
        for len in 0..(file.len() as u32).min(512) {
            let _ = b.read(&BlobRef { file: 1, offset: HEADER_BYTES, len });
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Decodes `data` as a manifest edit: an error or an edit, never a panic.
pub fn decode_edit(data: &[u8]) {
    let _ = crate::version::Edit::decode(data, 7);
}

/// Decodes `data` as a WAL batch payload: an error or a batch, never a panic.
pub fn decode_batch(data: &[u8]) {
    let _ = crate::batch::WriteBatch::decode(data);
}

/// Decodes `data` as a delta file: an error or a delta, never a panic.
pub fn decode_delta(data: &[u8]) {
    let _ = crate::Delta::decode(data);
}

/// Valid inputs for each target (`block_decoder`, `table_reader`,
/// `manifest_edit`, `wal_batch`, `delta_file`, `blob_file`), written by the real encoders: the seed corpus.
pub fn sample_inputs() -> Vec<(&'static str, Vec<u8>)> {
    use crate::block::{BlockBuilder, make_internal, write_block};
    use crate::options::Compression;
    let mut out = Vec::new();
    for (interval, compression) in [(1, Compression::None), (4, Compression::Lz4), (16, Compression::Zstd(3))] {
        let mut b = BlockBuilder::new(interval);
        for i in 0..40u32 {
            let mut k = Vec::new();
            make_internal(&mut k, format!("key{i:05}").as_bytes(), (u64::from(i) << 8) | 1);
            b.add(&k, format!("value-{i}-{}", "x".repeat(i as usize)).as_bytes());
        }
        let mut raw = Vec::new();
        b.finish_into(&mut raw);
        let mut disk = Vec::new();
        write_block(&mut disk, &raw, compression, &mut Vec::new());
        out.push(("block_decoder", disk));
        out.push(("block_decoder", raw));
    }
    let dir = std::env::temp_dir().join(format!("cairn-lsm-samples-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for compression in [Compression::None, Compression::Lz4, Compression::Zstd(1)] {
        let o = crate::Options {
            durability: crate::DurabilityMode::Embedded,
            background: crate::Background::Inline,
            block_bytes: 256,
            compression_per_level: vec![compression],
            ..crate::Options::default()
        };
        let sub = dir.join(format!("{compression:?}"));
        if let Ok(db) = crate::Db::open(&sub, o) {
            let mut b = crate::WriteBatch::new();
            for i in 0..60u32 {
                b.put(format!("key{i:04}"), format!("v{i}").repeat(5));
            }
            b.delete("key0007").delete_range("key0010", "key0020").set_marker(crate::Marker::new(5, 1));
            if db.write(&b).is_ok() && db.flush().is_ok() {
                for (_, p) in db.live_tables() {
                    if let Ok(bytes) = std::fs::read(&p) {
                        out.push(("table_reader", bytes));
                    }
                }
            }
            let mut enc = Vec::new();
            b.encode(42, &mut enc);
            out.push(("wal_batch", enc));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let e = crate::version::Edit {
        full: true,
        added: vec![crate::version::Added { level: 1, id: 3, seq_offset: 0, blob_offset: 5, file_xxh3: Some(7) }],
        removed: vec![1, 2],
        marker: Some(crate::Marker::new(9, 2)),
        flushed_seq: Some(17),
        last_seq: Some(20),
        next_table_id: Some(4),
    };
    out.push(("manifest_edit", e.encode()));
    out.push(("manifest_edit", crate::version::Edit::default().encode()));
    let d = crate::Delta {
        after: Some(crate::Marker::new(3, 1)),
        marker: crate::Marker::new(9, 2),
        tables_upto: Some(crate::Marker::new(8, 2)),
        tables: vec![
            crate::DeltaTable { file: crate::table::table_file_name(7), seq_offset: 0, blob_offset: 0 },
            crate::DeltaTable { file: crate::table::table_file_name(5), seq_offset: 100, blob_offset: 9 },
        ],
        blob_files: vec![crate::blob::blob_file_name(11), crate::blob::blob_file_name(12)],
    };
    out.push(("delta_file", d.encode()));
    out.push((
        "delta_file",
        crate::Delta { after: None, tables_upto: None, tables: Vec::new(), blob_files: Vec::new(), ..d }.encode(),
    ));
    // A table with blob references (format 4) and its blob file, after a
    // reference to its third value.
    let o = crate::Options {
        durability: crate::DurabilityMode::Embedded,
        background: crate::Background::Inline,
        block_bytes: 256,
        blob_value_bytes_min: Some(12),
        ..crate::Options::default()
    };
    let sub = dir.join("blobs");
    if let Ok(db) = crate::Db::open(&sub, o) {
        let mut b = crate::WriteBatch::new();
        for i in 0..40u32 {
            b.put(format!("key{i:04}"), format!("v{i}").repeat(1 + i as usize % 9));
        }
        b.delete("key0003").set_marker(crate::Marker::new(2, 1));
        if db.write(&b).is_ok() && db.flush().is_ok() {
            for (_, p) in db.live_tables() {
                if let Ok(bytes) = std::fs::read(&p) {
                    out.push(("table_reader", bytes));
                }
            }
            let blobs = std::fs::read_dir(sub.join("tables")).into_iter().flatten().flatten();
            for e in blobs.filter(|e| e.path().extension().is_some_and(|x| x == "blob")) {
                if let Ok(bytes) = std::fs::read(e.path()) {
                    let mut data = Vec::new();
                    let r = crate::blob::BlobRef { file: 1, offset: crate::blob::HEADER_BYTES, len: 0 };
                    data.extend_from_slice(&r.encode());
                    data.extend_from_slice(&bytes);
                    out.push(("blob_file", data));
                    let third = bytes.len() as u64 / 3;
                    let r = crate::blob::BlobRef { file: 1, offset: third, len: 20 };
                    let mut data = r.encode().to_vec();
                    data.extend_from_slice(&bytes);
                    out.push(("blob_file", data));
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}
