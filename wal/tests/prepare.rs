//! A segment prepared by one run and never used is recycled by the next run,
//! not written again (docs/design/wal.md, "Segment preparation").

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use cairn_wal::{Preparation, RecoveryMode, StdFs, UserKind, Wal, WalOptions};

const K: UserKind = UserKind::new(0);

#[test]
fn a_prepared_segment_left_by_one_run_is_recycled_by_the_next() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("wal");
    let mut o = WalOptions::default();
    o.segment_bytes_max = 1 << 20;
    o.preparation = Preparation::ZeroFill;
    o.recovery = RecoveryMode::Strict;
    let payload = |p: u64| vec![(p % 251) as u8 | 1; 10_000];
    let wal = Wal::create(Arc::new(StdFs), &dir, o.clone(), b"meta").expect("create");
    wal.append(K, 1, &payload(1)).expect("append");
    // Closing waits for the preparer, which leaves segment 1 prepared and unused.
    drop(wal);
    let prepared = dir.join("0000000000000001.wal.tmp");
    let meta = std::fs::metadata(&prepared).expect("segment 1 was prepared");
    assert_eq!(meta.len(), 1 << 20, "zero-filled to the segment size");
    let inode = meta.ino();

    let (wal, report) = Wal::open(Arc::new(StdFs), &dir, o.clone()).expect("open");
    assert_eq!(report.prepared_kept, vec![dir.join("0000000000000001.wal.spare")]);
    assert!(report.stray_files_removed.is_empty(), "{:?}", report.stray_files_removed);
    // Enough records to go into segment 1 and past it.
    for p in 2..=250 {
        wal.append(K, p, &payload(p)).expect("append");
    }
    drop(wal);
    let seg1 = std::fs::read_dir(&dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("0000000000000001-")))
        .expect("segment 1 was installed");
    assert_eq!(
        std::fs::metadata(&seg1).expect("stat").ino(),
        inode,
        "segment 1 is the file prepared by the first run, renamed, not a new one"
    );

    let (wal, _) = Wal::open(Arc::new(StdFs), &dir, o).expect("reopen");
    let records = wal.read_range(.., u64::MAX).expect("read");
    assert_eq!(records.len(), 250);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.position, i as u64 + 1);
        assert_eq!(r.payload, payload(i as u64 + 1));
    }
}
