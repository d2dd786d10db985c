//! Key-value separation (`Options::blob_value_bytes_min`): values move to
//! blob files at flush, compactions move references, garbage is reclaimed,
//! damage is a clear error, and checkpoints, ingest and deltas know of it.

use std::collections::BTreeMap;
use std::path::Path;

use cairn_lsm::{Background, Compression, Db, DurabilityMode, Error, IngestOptions, Marker, Options, WriteBatch};

fn opts(min: usize, gc_percent: u8) -> Options {
    let mut o = Options::default();
    o.write_buffer_bytes = 64 << 10;
    o.block_bytes = 1024;
    o.table_bytes_target = 64 << 10;
    o.l1_bytes_target = 128 << 10;
    o.level_size_multiplier = 4;
    o.levels = 4;
    o.background = Background::Inline;
    o.blob_value_bytes_min = Some(min);
    o.blob_gc_garbage_percent = gc_percent;
    // Stored as written, so the test can count the live bytes.
    o.blob_compression = Compression::None;
    o
}

fn value(k: u32, round: u32) -> Vec<u8> {
    // 40 to 539 bytes, so a bound of 200 keeps some inline.
    let mut v = format!("{k}:{round}:").into_bytes();
    v.resize(40 + (k as usize * 7 + round as usize) % 500, b'a' + (round % 26) as u8);
    v
}

fn blob_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("tables"))
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "blob"))
        .collect();
    v.sort();
    v
}

fn scan(db: &Db) -> BTreeMap<Vec<u8>, Vec<u8>> {
    db.range::<std::ops::RangeFull, &[u8]>(..)
        .map(|kv| kv.expect("scan"))
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect()
}

#[test]
fn values_live_in_blob_files_and_overwrites_are_reclaimed() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = Db::open(dir.path(), opts(200, 25)).expect("open");
    let mut model = BTreeMap::new();
    for round in 0..12u32 {
        for k in 0..600u32 {
            let key = format!("key{k:05}").into_bytes();
            let v = value(k, round);
            db.put(key.clone(), v.clone()).expect("put");
            model.insert(key, v);
        }
        db.flush().expect("flush");
    }
    let before = db.stats();
    assert!(before.blob_files > 0, "{before:?}");
    assert!(before.blob_flush_bytes > 0);
    assert_eq!(scan(&db), model);
    for (k, v) in model.iter().step_by(17) {
        assert_eq!(db.get(k).expect("get").as_deref(), Some(v.as_slice()));
    }
    // Reverse scans resolve references too.
    let rev: Vec<_> = db.range_rev::<std::ops::RangeFull, &[u8]>(..).map(|kv| kv.expect("scan").0.to_vec()).collect();
    assert_eq!(rev, model.keys().rev().cloned().collect::<Vec<_>>());

    // Overwrite every other key twice more and compact: half of each older
    // blob file becomes garbage, so compactions move the other half out
    // (their garbage passed a quarter).
    for round in 12..14u32 {
        for k in (0..600u32).step_by(2) {
            let key = format!("key{k:05}").into_bytes();
            let v = value(k, round);
            db.put(key.clone(), v.clone()).expect("put");
            model.insert(key, v);
        }
        db.flush().expect("flush");
        db.compact_range::<std::ops::RangeFull, &[u8]>(..).expect("compact");
    }
    let after = db.stats();
    assert!(after.blob_gc_bytes > 0, "no value was moved out of a blob file with garbage: {after:?}");
    assert_eq!(scan(&db), model);
    // Whole-garbage files are gone from the disk, and what is left is
    // mostly live: at most the bound's share of garbage per file, plus files
    // no compaction looked at since they passed it.
    assert_eq!(blob_files(dir.path()).len(), after.blob_files, "{after:?}");
    let live_bytes: u64 = model.values().filter(|v| v.len() >= 200).map(|v| v.len() as u64 + 9).sum();
    assert_eq!(after.blob_live_bytes, live_bytes);
    assert!(after.blob_bytes <= live_bytes * 4 / 3 + 16 * after.blob_files as u64, "{after:?}");

    // A read view keeps reading the values it saw, from blob files that
    // compactions have replaced meanwhile.
    let view = db.read_view();
    let seen = model.clone();
    for k in 0..600u32 {
        let key = format!("key{k:05}").into_bytes();
        let v = value(k, 20);
        db.put(key.clone(), v.clone()).expect("put");
        model.insert(key, v);
    }
    db.flush().expect("flush");
    db.compact_range::<std::ops::RangeFull, &[u8]>(..).expect("compact");
    let through_view: BTreeMap<Vec<u8>, Vec<u8>> = view
        .range::<std::ops::RangeFull, &[u8]>(..)
        .map(|kv| kv.expect("scan"))
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect();
    assert_eq!(through_view, seen);
    drop(view);
    assert_eq!(scan(&db), model);
    // The versions the view needed stay in the tables until a compaction
    // passes over them again: referenced, so not yet garbage.
    let live_bytes: u64 = model.values().filter(|v| v.len() >= 200).map(|v| v.len() as u64 + 9).sum();
    assert!(db.stats().blob_live_bytes > live_bytes);

    // Across a reopen.
    db.close().expect("close");
    let db = Db::open(dir.path(), opts(200, 25)).expect("reopen");
    assert_eq!(scan(&db), model);
    assert!(db.stats().blob_live_bytes > live_bytes);
}

#[test]
fn a_leftover_blob_file_is_removed_and_a_missing_one_is_an_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = Db::open(dir.path(), opts(10, 25)).expect("open");
    for k in 0..50u32 {
        db.put(format!("k{k}"), value(k, 0)).expect("put");
    }
    db.flush().expect("flush");
    db.close().expect("close");
    let leftover = dir.path().join("tables").join("00000000000fffff.blob");
    std::fs::write(&leftover, b"interrupted flush").expect("write");
    let db = Db::open(dir.path(), opts(10, 25)).expect("reopen");
    assert!(!leftover.exists(), "a blob file no table references survived the open");
    db.close().expect("close");
    let files = blob_files(dir.path());
    assert_eq!(files.len(), 1);
    std::fs::remove_file(&files[0]).expect("remove");
    match Db::open(dir.path(), opts(10, 25)) {
        Err(Error::Io { path, .. }) => assert_eq!(path, files[0]),
        other => panic!("expected an error naming the blob file, got {other:?}"),
    }
}

#[test]
fn a_damaged_value_is_an_error_naming_the_blob_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = Db::open(dir.path(), opts(10, 25)).expect("open");
    db.put("a", vec![b'x'; 100]).expect("put");
    db.put("b", vec![b'y'; 100]).expect("put");
    db.flush().expect("flush");
    db.close().expect("close");
    let files = blob_files(dir.path());
    let mut data = std::fs::read(&files[0]).expect("read");
    // The first record (key "a"), right after the 16-byte header.
    data[16 + 2] ^= 0xff;
    std::fs::write(&files[0], &data).expect("write");
    let db = Db::open(dir.path(), opts(10, 25)).expect("reopen");
    match db.get(b"a") {
        Err(Error::Corrupt { path, .. }) => assert_eq!(path, files[0]),
        other => panic!("expected corruption, got {other:?}"),
    }
    assert_eq!(db.get(b"b").expect("get").as_deref(), Some(&[b'y'; 100][..]));
    let errs = db.range::<std::ops::RangeFull, &[u8]>(..).filter(|kv| kv.is_err()).count();
    assert_eq!(errs, 1);
}

#[test]
fn checkpoints_carry_blob_files_and_ingest_and_deltas_refuse_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut o = opts(10, 25);
    o.durability = DurabilityMode::Embedded;
    let db = Db::open(dir.path().join("db"), o.clone()).expect("open");
    let mut b = WriteBatch::new();
    for k in 0..100u32 {
        b.put(format!("k{k:03}"), value(k, 1));
    }
    b.set_marker(Marker::new(1, 1));
    db.write(&b).expect("write");
    let info = db.checkpoint(dir.path().join("ckpt")).expect("checkpoint");
    assert_eq!(info.blob_files.len(), 1);
    let mut co = o.clone();
    co.create_if_missing = false;
    let c = Db::open(&info.dir, co).expect("open checkpoint");
    assert_eq!(scan(&c), scan(&db));
    drop(c);
    // Ingest wants tables that hold their values.
    let tables: Vec<_> = info.tables.iter().map(|t| info.dir.join(&t.path)).collect();
    let other = Db::open(dir.path().join("other"), opts(10, 25)).expect("open");
    match other.ingest(&tables, IngestOptions::new()) {
        Err(Error::Ingest { reason, .. }) => assert!(reason.contains("blob"), "{reason}"),
        r => panic!("expected a refusal, got {r:?}"),
    }
    assert_eq!(scan(&other), BTreeMap::new());
    // A delta of such tables is not made: a full checkpoint is needed.
    let mut b = WriteBatch::new();
    b.put("later", vec![b'z'; 50]).set_marker(Marker::new(2, 1));
    db.write(&b).expect("write");
    assert_eq!(db.delta_checkpoint(dir.path().join("delta"), Some(Marker::new(1, 1))).expect("delta"), None);
}
