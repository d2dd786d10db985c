//! The public API at its edges: size limits, prefix bounds, markers, I/O
//! failure, damaged tables, checkpoint and ingest round trips.

use std::path::PathBuf;
use std::sync::Arc;

use cairn_lsm::{
    Background, Db, DurabilityMode, Error, IngestOptions, KEY_BYTES_MAX, Marker, Options, SyncPolicy, VALUE_BYTES_MAX,
    WriteBatch,
};
use cairn_wal::Fs;
use cairn_wal::sim::SimDisk;

fn small() -> Options {
    let mut o = Options::default();
    o.write_buffer_bytes = 4096;
    o.block_bytes = 256;
    o.background = Background::Inline;
    o
}

#[test]
fn limits_are_clear_errors_and_write_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = Db::open(dir.path(), small()).expect("open");
    let big_key = vec![b'k'; KEY_BYTES_MAX + 1];
    assert!(matches!(db.put(big_key, "v"), Err(Error::KeyTooLarge { len, .. }) if len == KEY_BYTES_MAX + 1));
    assert!(matches!(db.put("", "v"), Err(Error::KeyTooLarge { len: 0, .. })));
    assert!(matches!(db.put("k", vec![0u8; VALUE_BYTES_MAX + 1]), Err(Error::ValueTooLarge { .. })));
    assert!(matches!(db.delete_range("b", "a"), Err(Error::EmptyRange)));
    // A batch with one bad operation writes none of them.
    let mut b = WriteBatch::new();
    b.put("good", "1").put(vec![b'x'; KEY_BYTES_MAX + 1], "2");
    assert!(db.write(&b).is_err());
    assert_eq!(db.get(b"good").expect("get"), None);
    // A batch over the bound is refused up front and poisons nothing.
    let mut huge = WriteBatch::new();
    for i in 0..3 {
        huge.put(format!("big{i}"), vec![0u8; VALUE_BYTES_MAX]);
    }
    assert!(matches!(db.write(&huge), Err(Error::BatchTooLarge { .. })));
    db.put("after", "ok").expect("still writable");
    // The largest accepted sizes work, through a flush and a reopen.
    db.put(vec![b'k'; KEY_BYTES_MAX], vec![7u8; VALUE_BYTES_MAX]).expect("largest");
    db.flush().expect("flush");
    db.close().expect("close");
    let db = Db::open(dir.path(), small()).expect("reopen");
    let v = db.get(&vec![b'k'; KEY_BYTES_MAX]).expect("get").expect("present");
    assert_eq!(v.len(), VALUE_BYTES_MAX);
}

#[test]
fn prefixes_both_ways_including_all_ff() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = Db::open(dir.path(), small()).expect("open");
    for k in [&b"a"[..], b"ab", b"ab\xff", b"ab\xff\xff", b"ac", b"\xff", b"\xff\xff", b"\xff\x00"] {
        db.put(k.to_vec(), "v").expect("put");
    }
    let keys = |it: cairn_lsm::Iter| it.map(|kv| kv.expect("kv").0.to_vec()).collect::<Vec<_>>();
    assert_eq!(keys(db.prefix(b"ab")), vec![b"ab".to_vec(), b"ab\xff".to_vec(), b"ab\xff\xff".to_vec()]);
    assert_eq!(keys(db.prefix_rev(b"ab")), vec![b"ab\xff\xff".to_vec(), b"ab\xff".to_vec(), b"ab".to_vec()]);
    assert_eq!(keys(db.prefix(b"\xff")), vec![b"\xff".to_vec(), b"\xff\x00".to_vec(), b"\xff\xff".to_vec()]);
    db.delete_prefix(b"\xff").expect("delete prefix of 0xff");
    db.delete_prefix(b"ab").expect("delete prefix");
    assert_eq!(keys(db.range::<std::ops::RangeFull, &[u8]>(..)), vec![b"a".to_vec(), b"ac".to_vec()]);
    db.flush().expect("flush");
    db.compact_range::<std::ops::RangeFull, &[u8]>(..).expect("compact");
    assert_eq!(keys(db.range_rev::<std::ops::RangeFull, &[u8]>(..)), vec![b"ac".to_vec(), b"a".to_vec()]);
}

#[test]
fn embedded_markers_rise_and_survive_only_through_flushes() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut o = small();
    o.durability = DurabilityMode::Embedded;
    let db = Db::open(dir.path(), o.clone()).expect("open");
    assert!(matches!(db.put("k", "v"), Err(Error::WrongMode(_))), "a batch without a marker");
    let mut b = WriteBatch::new();
    b.put("k", "1").set_marker(Marker::new(5, 1));
    db.write(&b).expect("write");
    let mut stale = WriteBatch::new();
    stale.put("k", "0").set_marker(Marker::new(5, 1));
    assert!(matches!(db.write(&stale), Err(Error::MarkerNotRising { .. })));
    // An empty batch with a marker advances it.
    let mut m = WriteBatch::new();
    m.set_marker(Marker::new(6, 1));
    db.write(&m).expect("marker only");
    assert_eq!(db.durable_marker(), None);
    db.flush().expect("flush");
    assert_eq!(db.durable_marker(), Some(Marker::new(6, 1)));
    let mut later = WriteBatch::new();
    later.put("k", "2").set_marker(Marker::new(7, 2));
    db.write(&later).expect("write");
    db.close().expect("close");
    let db = Db::open(dir.path(), o).expect("reopen");
    assert_eq!(db.durable_marker(), Some(Marker::new(6, 1)), "unflushed writes are the embedder's to replay");
    assert_eq!(db.get(b"k").expect("get").as_deref(), Some(&b"1"[..]));
}

#[test]
fn a_failed_fsync_poisons_the_engine_and_loses_nothing_acknowledged() {
    let disk = SimDisk::new(3);
    let mut o = small();
    o.durability = DurabilityMode::Standalone(SyncPolicy::EveryWrite);
    let db = Db::open_with_fs(disk.fs(), "/data/lsm", o.clone()).expect("open");
    for i in 0..50 {
        db.put(format!("k{i:03}"), "v").expect("put");
    }
    disk.fail_syncs(true);
    assert!(db.put("lost", "v").is_err());
    match db.put("after", "v") {
        Err(Error::Poisoned(_)) => {}
        other => panic!("expected Poisoned, got {other:?}"),
    }
    drop(db);
    disk.fail_syncs(false);
    disk.crash();
    let db = Db::open_with_fs(disk.fs(), "/data/lsm", o).expect("reopen");
    for i in 0..50 {
        assert!(db.get(format!("k{i:03}").as_bytes()).expect("get").is_some(), "acknowledged k{i:03}");
    }
    assert_eq!(db.get(b"after").expect("get"), None);
}

#[test]
fn a_damaged_table_is_an_error_naming_the_file() {
    let disk = SimDisk::new(4);
    let mut o = small();
    o.durability = DurabilityMode::Standalone(SyncPolicy::None);
    o.block_cache_bytes = 0;
    let fs: Arc<dyn Fs> = disk.fs();
    let db = Db::open_with_fs(Arc::clone(&fs), "/data/lsm", o.clone()).expect("open");
    for i in 0..300 {
        db.put(format!("k{i:03}"), format!("value-{i}")).expect("put");
    }
    db.flush().expect("flush");
    let tables = db.live_tables();
    let (_, path) = tables.first().expect("a table");
    disk.flip_bit(path, 10, 3).expect("flip");
    let mut saw = false;
    for i in 0..300 {
        if let Err(e) = db.get(format!("k{i:03}").as_bytes()) {
            assert!(matches!(e, Error::Corrupt { .. }), "{e}");
            assert!(e.to_string().contains(&path.display().to_string()), "{e}");
            saw = true;
        }
    }
    assert!(saw, "no read met the damaged block");
    let scanned: Vec<_> = db.range::<std::ops::RangeFull, &[u8]>(..).collect();
    assert!(scanned.iter().any(Result::is_err), "the scan reports the damage");
}

#[test]
fn checkpoint_opens_and_ingest_shifts_sequence_numbers() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = Db::open(dir.path().join("src"), small()).expect("open");
    for i in 0..200 {
        src.put(format!("k{i:03}"), "old").expect("put");
    }
    src.delete_range("k050", "k100").expect("range delete");
    let info = src.checkpoint(dir.path().join("ckpt")).expect("checkpoint");
    assert!(!info.tables.is_empty());
    // A destination with many later writes takes the checkpoint's tables on top.
    let dst = Db::open(dir.path().join("dst"), small()).expect("open");
    for i in 0..400 {
        dst.put(format!("k{:03}", i % 200), "newer locally").expect("put");
    }
    let files: Vec<PathBuf> = info.tables.iter().map(|t| dir.path().join("ckpt").join(&t.path)).collect();
    dst.ingest(&files, IngestOptions::new()).expect("ingest");
    // Ingested data is newer than everything local: its range delete and values win.
    assert_eq!(dst.get(b"k000").expect("get").as_deref(), Some(&b"old"[..]));
    assert_eq!(dst.get(b"k075").expect("get"), None);
    dst.put("k000", "newest").expect("put");
    assert_eq!(dst.get(b"k000").expect("get").as_deref(), Some(&b"newest"[..]));
    dst.compact_range::<std::ops::RangeFull, &[u8]>(..).expect("compact");
    assert_eq!(dst.get(b"k075").expect("get"), None);
    assert_eq!(dst.get(b"k000").expect("get").as_deref(), Some(&b"newest"[..]));
    assert_eq!(dst.range::<std::ops::RangeFull, &[u8]>(..).count(), 150);
    assert!(matches!(dst.checkpoint(dir.path().join("ckpt")), Err(Error::AlreadyExists { .. })));

    // The checkpoint opens as an engine of its own (which may then compact it:
    // ingest from a checkpoint before opening it).
    src.put("k000", "after checkpoint").expect("put");
    let mut co = small();
    co.create_if_missing = false;
    let ck = Db::open(dir.path().join("ckpt"), co).expect("open checkpoint");
    assert_eq!(ck.get(b"k000").expect("get").as_deref(), Some(&b"old"[..]));
    assert_eq!(ck.get(b"k075").expect("get"), None);
    assert_eq!(ck.range::<std::ops::RangeFull, &[u8]>(..).count(), 150);
    drop(ck);
}

#[test]
fn writes_stall_by_a_bounded_amount_when_l0_is_full() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut o = Options::default();
    o.durability = DurabilityMode::Standalone(SyncPolicy::None);
    o.write_buffer_bytes = 2048;
    // No compaction will run (trigger out of reach), so L0 only grows.
    o.l0_compaction_trigger = 1000;
    o.l0_slowdown_tables = 2;
    o.l0_stop_tables = 4;
    o.stall_duration_max = std::time::Duration::from_millis(300);
    let db = Db::open(dir.path(), o).expect("open");
    let start = std::time::Instant::now();
    let mut stalled = None;
    for i in 0..100_000u32 {
        match db.put(format!("k{i:06}"), vec![b'v'; 100]) {
            Ok(()) => {}
            Err(e) => {
                stalled = Some(e);
                break;
            }
        }
    }
    let e = stalled.expect("writes must stall once L0 is at its stop limit");
    assert!(matches!(e, Error::StallTimeout { .. }), "{e}");
    assert!(start.elapsed() < std::time::Duration::from_secs(30));
    let st = db.stats();
    assert!(st.levels[0].tables >= 4, "{st:?}");
    assert!(st.slowdowns > 0 && st.stall_time >= std::time::Duration::from_millis(300), "{st:?}");
    // Reads still work during a stall.
    assert!(db.get(b"k000001").expect("get").is_some());
}

/// Every table of a checkpoint carries the xxh3 of its whole file as the
/// engine wrote it: after flushes and compactions, through reopen (edits and
/// full versions in the manifest), and in the checkpoint's own manifest. A
/// table ingested from elsewhere has none.
#[test]
fn checkpoint_tables_carry_whole_file_checksums() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut o = small();
    o.manifest_edits_per_snapshot = 3; // full versions in the manifest, not only edits
    let check = |info: &cairn_lsm::CheckpointInfo, want_known: bool| {
        assert!(!info.tables.is_empty());
        for t in &info.tables {
            let bytes = std::fs::read(info.dir.join(&t.path)).expect("read table");
            let actual = xxhash_rust::xxh3::xxh3_64(&bytes);
            match t.xxh3 {
                Some(x) => assert_eq!(x, actual, "{}: the recorded checksum is the file's", t.path.display()),
                None => assert!(!want_known, "{}: no checksum recorded", t.path.display()),
            }
        }
    };
    let db = Db::open(dir.path().join("db"), o.clone()).expect("open");
    for i in 0..3000 {
        db.put(format!("k{:05}", (i * 7919) % 3000), format!("value {i}")).expect("put");
    }
    db.delete_range("k00100", "k00200").expect("range delete");
    db.compact_range("k00000".as_bytes().."k01000".as_bytes()).expect("compact");
    let first = db.checkpoint(dir.path().join("c1")).expect("checkpoint");
    check(&first, true);
    assert!(first.tables.iter().all(|t| t.xxh3.is_some()));
    db.close().expect("close");

    let db = Db::open(dir.path().join("db"), o.clone()).expect("reopen");
    check(&db.checkpoint(dir.path().join("c2")).expect("checkpoint"), true);
    let copy = Db::open(&first.dir, o.clone()).expect("open the checkpoint");
    check(&copy.checkpoint(dir.path().join("c3")).expect("checkpoint of the checkpoint"), true);

    // Ingested tables: no recorded checksum, and the others keep theirs.
    let files: Vec<PathBuf> = first.tables.iter().map(|t| first.dir.join(&t.path)).collect();
    db.ingest(&files, IngestOptions::new()).expect("ingest");
    let mixed = db.checkpoint(dir.path().join("c4")).expect("checkpoint");
    check(&mixed, false);
    assert!(mixed.tables.iter().any(|t| t.xxh3.is_none()));
    assert!(mixed.tables.iter().any(|t| t.xxh3.is_some()));
}

/// One run of the covered-tables scenario: a range tombstone over keys that
/// sit in tables of L1 and below, while a read view older than the tombstone
/// is open, then after it closes. `Err` says what went wrong.
fn covered_tables_scenario(ignore_views: bool) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut o = small();
    o.drop_covered_ignoring_views_for_tests = ignore_views;
    let db = Db::open(dir.path().join("db"), o.clone()).map_err(|e| e.to_string())?;
    for i in 0..2000 {
        db.put(format!("a{i:04}"), format!("old {i}")).map_err(|e| e.to_string())?;
    }
    db.put("b", "outside").map_err(|e| e.to_string())?;
    db.compact_range::<std::ops::RangeFull, &[u8]>(..).map_err(|e| e.to_string())?;
    let deep = |db: &Db| db.stats().levels.iter().skip(1).map(|l| l.tables).sum::<usize>();
    let before = deep(&db);
    if before < 2 {
        return Err(format!("only {before} tables below L0"));
    }
    let view = db.read_view();
    db.delete_range("a", "a9").map_err(|e| e.to_string())?;
    db.flush().map_err(|e| e.to_string())?;
    db.wait_idle().map_err(|e| e.to_string())?;
    // The view still reads every old value.
    for i in [0, 777, 1999] {
        let got = view.get(format!("a{i:04}").as_bytes()).map_err(|e| e.to_string())?;
        if got.as_deref() != Some(format!("old {i}").as_bytes()) {
            return Err(format!("the view older than the tombstone read a{i:04} as {got:?}"));
        }
    }
    drop(view);
    // A checkpoint leaves the covered tables behind.
    let ckpt = db.checkpoint(dir.path().join("ckpt")).map_err(|e| e.to_string())?;
    if ckpt.tables.len() >= before {
        return Err(format!("the checkpoint holds {} tables, the engine had {before} below L0", ckpt.tables.len()));
    }
    db.wait_idle().map_err(|e| e.to_string())?;
    let s = db.stats();
    if s.covered_tables_dropped == 0 || deep(&db) >= before {
        return Err(format!(
            "nothing dropped: {} dropped, {} -> {} tables",
            s.covered_tables_dropped,
            before,
            deep(&db)
        ));
    }
    let check = |db: &Db| -> Result<(), String> {
        for i in [0, 777, 1999] {
            if let Some(v) = db.get(format!("a{i:04}").as_bytes()).map_err(|e| e.to_string())? {
                return Err(format!("a{i:04} deleted, read {v:?}"));
            }
        }
        match db.get(b"b").map_err(|e| e.to_string())? {
            Some(v) if v.as_ref() == b"outside" => Ok(()),
            other => Err(format!("b read {other:?}")),
        }
    };
    check(&db)?;
    db.close().map_err(|e| e.to_string())?;
    let db = Db::open(dir.path().join("db"), o.clone()).map_err(|e| e.to_string())?;
    check(&db)?;
    check(&Db::open(&ckpt.dir, o).map_err(|e| e.to_string())?)
}

/// Tables a newer range tombstone covers whole are dropped unread, but not
/// while a read view older than the tombstone is open; and the check fails
/// when the engine is told to ignore views.
#[test]
fn a_range_tombstone_drops_the_tables_it_covers_but_not_under_an_older_view() {
    covered_tables_scenario(false).expect("covered tables");
    let e = covered_tables_scenario(true).expect_err("ignoring views must be caught");
    assert!(e.contains("the view older than the tombstone"), "{e}");
}
