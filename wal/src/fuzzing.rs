//! Entry points for the fuzz targets in `wal/fuzz/` and for the test that runs
//! their corpus. Not a stable API.

use std::path::Path;
use std::sync::Arc;

use crate::format::{ALIGN, Decoded, decode_record, decode_segment_header};
use crate::{Fs, OpenMode, RecoveryMode, StdFs, Wal, WalOptions};

/// Decodes every record of `data` as if it were a segment body, from offset 0,
/// with both chain seeds the header would give. Must never panic.
pub fn decode_records(data: &[u8]) {
    let salt = decode_segment_header(data).map_or(0, |h| h.salt);
    for seed in [0u32, crate::format::segment_seed(0, salt)] {
        let mut off = 0;
        let mut chain = 0;
        while off < data.len() {
            match decode_record(data, off, seed, chain) {
                Decoded::Record(f) => {
                    assert!(f.end > off && f.end <= data.len() && f.end % ALIGN == 0);
                    assert!(f.payload_offset % ALIGN == 0);
                    chain = f.chain;
                    off = f.end;
                }
                Decoded::End | Decoded::Damage(_) => break,
            }
        }
    }
}

/// Writes `data` as the only segment of a log in a fresh temporary directory
/// and opens it in every recovery mode, read-only and writable, then reads all
/// records back. Must never panic; errors are fine.
pub fn open_segment(data: &[u8], scratch: &Path) {
    let fs: Arc<dyn Fs> = Arc::new(StdFs);
    for (i, mode) in
        [RecoveryMode::Strict, RecoveryMode::TolerateTornTail, RecoveryMode::PointInTime].into_iter().enumerate()
    {
        let dir = scratch.join(format!("m{i}"));
        let _ = std::fs::remove_dir_all(&dir);
        if std::fs::create_dir_all(&dir).is_err() {
            return;
        }
        let path = dir.join(crate::format::segment_name(0, 0));
        if fs.open(&path, OpenMode::CreateNew).and_then(|f| f.write_all_at(data, 0)).is_err() {
            return;
        }
        let opts = WalOptions {
            recovery: mode,
            segment_bytes_max: 1 << 16,
            preparation: crate::Preparation::Grow,
            ..WalOptions::default()
        };
        if let Ok((wal, _)) = Wal::open_read_only(Arc::clone(&fs), &dir, opts.clone()) {
            let _ = wal.read_range(.., u64::MAX);
        }
        if let Ok((wal, _)) = Wal::open(Arc::clone(&fs), &dir, opts) {
            let _ = wal.read_range(.., u64::MAX);
            let _ = wal.append_next(crate::UserKind::new(0), b"after");
            let _ = wal.read_range(.., u64::MAX);
        }
    }
}
