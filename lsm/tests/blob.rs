//! Key-value separation (`Options::blob_value_bytes_min`): values move to
//! blob files at flush, compactions move references, garbage is reclaimed,
//! damage is a clear error, and checkpoints, ingest and deltas carry the
//! blob files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cairn_lsm::{
    Background, Compression, Db, Delta, DurabilityMode, Error, IngestOptions, Marker, Options, WriteBatch, blob_file_id,
};

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

/// Blob file ids of `ckpt` with their paths, as `ingest_with_blobs` takes them.
fn blob_ids(dir: &Path, files: &[PathBuf]) -> Vec<(u64, PathBuf)> {
    let id = |p: &PathBuf| blob_file_id(p.file_name().and_then(|n| n.to_str()).expect("name")).expect("a blob file");
    files.iter().map(|p| (id(p), dir.join(p))).collect()
}

fn marked(db: &Db, marker: u64, keys: std::ops::Range<u32>, round: u32) {
    let mut b = WriteBatch::new();
    for k in keys {
        b.put(format!("k{k:03}"), value(k, round));
    }
    b.set_marker(Marker::new(marker, 1));
    db.write(&b).expect("write");
}

/// A delta's files in its directory `d`.
fn delta_files(delta: &Delta, d: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    (delta.tables.iter().map(|t| d.join(&t.file)).collect(), delta.blob_files.iter().map(|f| d.join(f)).collect())
}

#[test]
fn checkpoints_ingest_and_deltas_carry_blob_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut o = opts(10, 25);
    o.durability = DurabilityMode::Embedded;
    let db = Db::open(dir.path().join("db"), o.clone()).expect("open");
    marked(&db, 1, 0..100, 1);
    let info = db.checkpoint(dir.path().join("ckpt")).expect("checkpoint");
    assert_eq!(info.blob_files.len(), 1);
    let mut co = o.clone();
    co.create_if_missing = false;
    let c = Db::open(&info.dir, co).expect("open checkpoint");
    assert_eq!(scan(&c), scan(&db));
    drop(c);

    // Ingest without the blob files is refused and changes nothing.
    let tables: Vec<_> = info.tables.iter().map(|t| info.dir.join(&t.path)).collect();
    let a = Db::open(dir.path().join("a"), o.clone()).expect("open");
    match a.ingest(&tables, IngestOptions::new()) {
        Err(Error::Ingest { reason, .. }) => assert!(reason.contains("blob file"), "{reason}"),
        r => panic!("expected a refusal, got {r:?}"),
    }
    assert_eq!(scan(&a), BTreeMap::new());
    // With them, the files get ids of this engine (the next free ones).
    let blobs = blob_ids(&info.dir, &info.blob_files);
    assert!(blobs[0].0 > 1, "the sender's id differs from the receiver's first");
    a.ingest_with_blobs(&tables, &blobs, IngestOptions::new().marker(Marker::new(1, 1))).expect("ingest");
    assert_eq!(scan(&a), scan(&db));
    assert_eq!(blob_files(&dir.path().join("a")).len(), 1);

    // A delta carries the blob files of its tables: a's state takes db's
    // next writes, as does a third one, e, from a's (whose tables then
    // reference files by ids a gave them).
    let e = Db::open(dir.path().join("e"), o.clone()).expect("open");
    e.ingest_with_blobs(&tables, &blobs, IngestOptions::new().marker(Marker::new(1, 1))).expect("ingest");
    marked(&db, 2, 50..120, 2);
    let dd = dir.path().join("delta-2");
    let d = db.delta_checkpoint(&dd, Some(Marker::new(1, 1))).expect("delta").expect("a delta");
    assert_eq!(d.blob_files.len(), 1, "{d:?}");
    let (paths, bpaths) = delta_files(&d, &dd);
    match a.check_delta(&d, &paths, &[]) {
        Err(Error::Delta { reason }) => assert!(reason.contains("blob files"), "{reason}"),
        r => panic!("expected a refusal, got {r:?}"),
    }
    a.ingest_delta(&d, &paths, &bpaths).expect("ingest delta");
    assert_eq!(scan(&a), scan(&db));
    marked(&a, 3, 100..130, 3);
    marked(&db, 3, 100..130, 3);
    let ad = dir.path().join("delta-3");
    let d = a.delta_checkpoint(&ad, Some(Marker::new(1, 1))).expect("delta").expect("a delta");
    assert_eq!((d.tables.len(), d.blob_files.len()), (2, 2), "{d:?}");
    assert!(d.tables.iter().any(|t| t.blob_offset != 0), "a table a ingested: {d:?}");
    let (paths, bpaths) = delta_files(&d, &ad);
    e.ingest_delta(&d, &paths, &bpaths).expect("ingest delta");
    let want = scan(&db);
    assert_eq!(scan(&e), want);
    // The translated ids survive a reopen, a checkpoint and a compaction
    // (which writes references with e's own ids, and moves values).
    drop(e);
    let e = Db::open(dir.path().join("e"), o.clone()).expect("reopen");
    assert_eq!(scan(&e), want);
    let info = e.checkpoint(dir.path().join("e-ckpt")).expect("checkpoint");
    assert_eq!(info.blob_files.len(), 3);
    let mut co = o.clone();
    co.create_if_missing = false;
    assert_eq!(scan(&Db::open(&info.dir, co).expect("open checkpoint")), want);
    // The first compaction drops the overwritten values' references; the
    // next one over the same keys sees the garbage and moves the live values.
    e.compact_range::<std::ops::RangeFull, &[u8]>(..).expect("compact");
    assert_eq!(scan(&e), want);
    marked(&e, 4, 0..2, 4);
    marked(&db, 4, 0..2, 4);
    let want = scan(&db);
    e.compact_range::<std::ops::RangeFull, &[u8]>(..).expect("compact");
    assert_eq!(scan(&e), want);
    assert!(e.stats().blob_gc_bytes > 0, "the overwrites left garbage to move");
    drop(e);
    assert_eq!(scan(&Db::open(dir.path().join("e"), o).expect("reopen")), want);
}

#[test]
fn blob_ids_spread_beyond_the_bound_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut o = opts(10, 25);
    o.durability = DurabilityMode::Embedded;
    let db = Db::open(dir.path().join("db"), o.clone()).expect("open");
    marked(&db, 1, 0..10, 1);
    db.flush().expect("flush");
    marked(&db, 2, 10..20, 2);
    let dd = dir.path().join("delta");
    let mut d = db.delta_checkpoint(&dd, None).expect("delta").expect("a delta");
    assert_eq!((d.tables.len(), d.blob_files.len()), (2, 2), "{d:?}");
    // The newest table's blob file is the newer one; move its id far up, as
    // damaged input could.
    let far = 1u64 << 41;
    let id = blob_file_id(&d.blob_files[1]).expect("a blob file");
    let name = format!("{:016x}.blob", id + far);
    std::fs::rename(dd.join(&d.blob_files[1]), dd.join(&name)).expect("rename");
    d.blob_files[1] = name;
    d.tables[0].blob_offset = far;
    let (paths, blobs) = delta_files(&d, &dd);
    let f = Db::open(dir.path().join("f"), o).expect("open");
    match f.ingest_delta(&d, &paths, &blobs) {
        Err(Error::Ingest { reason, .. }) => assert!(reason.contains("span"), "{reason}"),
        r => panic!("expected a refusal, got {r:?}"),
    }
    assert_eq!(scan(&f), BTreeMap::new());
    assert_eq!(f.durable_marker(), None);
}
