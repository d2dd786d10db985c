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
