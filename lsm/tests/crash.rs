//! Crash tests on cairn-wal's simulated disk (unsynced writes and directory
//! entries lost, the last write torn): crashes at random file-system
//! operations and exactly at each step of flush, compaction, checkpoint and
//! ingest. After recovery nothing synced is lost, no deleted key comes back,
//! and the durable marker matches exactly the data present.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cairn_lsm::{
    Background, Compression, Db, DurabilityMode, Hook, HookPoint, IngestOptions, Marker, Options, SyncPolicy,
    WriteBatch,
};
use cairn_wal::Fs;
use cairn_wal::sim::SimDisk;
use common::{Model, delete_range, key};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DIR: &str = "/data/lsm";
const LEADER: &str = "/data/leader";

fn options(rng: &mut impl Rng, durability: DurabilityMode) -> Options {
    let mut o = Options::default();
    o.durability = durability;
    o.background = Background::Inline;
    o.write_buffer_bytes = rng.random_range(600..3000);
    o.block_bytes = rng.random_range(64..512);
    o.table_bytes_target = rng.random_range(1024..4096);
    o.l0_compaction_trigger = rng.random_range(2..4);
    o.l1_bytes_target = 4096;
    o.level_size_multiplier = 3;
    o.levels = 4;
    o.compression_per_level = vec![Compression::None, Compression::Zstd(1)];
    o.manifest_edits_per_snapshot = rng.random_range(2..10);
    o.manifest_segment_bytes = 2048;
    o.wal_segment_bytes = rng.random_range(2048..16384);
    if rng.random_bool(0.5) {
        // Values of 4 to 15 bytes: some kept in blob files, some inline.
        o.blob_value_bytes_min = Some(rng.random_range(1..14));
        o.blob_gc_garbage_percent = [0, 25, 60][rng.random_range(0..3)];
    }
    o
}

fn random_batch(rng: &mut impl Rng, model: &mut Model) -> WriteBatch {
    let mut b = WriteBatch::new();
    let n = rng.random_range(0..4);
    fill_batch(rng, model, &mut b, n);
    b
}

fn fill_batch(rng: &mut impl Rng, model: &mut Model, b: &mut WriteBatch, n: usize) {
    for _ in 0..n {
        let k: u8 = rng.random();
        match rng.random_range(0..10) {
            0..=6 => {
                let v = format!("v{}-{}", k, rng.random::<u32>()).into_bytes();
                b.put(key(k), v.clone());
                model.insert(key(k), v);
            }
            7 | 8 => {
                b.delete(key(k));
                model.remove(&key(k));
            }
            _ => {
                let (a, e) = (key(k), key(k.saturating_add(rng.random_range(1..6))));
                if a < e {
                    b.delete_range(a.clone(), e.clone());
                    delete_range(model, &a, &e);
                }
            }
        }
    }
}

fn contents(db: &Db) -> Result<Model, String> {
    let mut m = BTreeMap::new();
    for kv in db.range::<std::ops::RangeFull, &[u8]>(..) {
        let (k, v) = kv.map_err(|e| format!("scan after recovery: {e}"))?;
        m.insert(k.to_vec(), v.to_vec());
    }
    Ok(m)
}

static FIRED: AtomicU64 = AtomicU64::new(0);

/// A hook that crashes the disk the `nth` time `point` is reached (and counts it in `FIRED`).
fn crash_hook(disk: &SimDisk, point: HookPoint, nth: u64) -> Hook {
    let disk = disk.clone();
    let seen = Arc::new(AtomicU64::new(0));
    Hook(Arc::new(move |p| {
        if p == point && seen.fetch_add(1, Ordering::SeqCst) + 1 == nth {
            FIRED.fetch_add(1, Ordering::SeqCst);
            disk.crash();
            return Err(());
        }
        Ok(())
    }))
}

enum Crash {
    AfterOps(u64),
    At(HookPoint, u64),
}

/// Embedded mode: batches carry markers 1, 2, ...; `states[i]` is the model
/// after batch `i`. After the crash the engine must hold exactly
/// `states[durable marker]`, and that marker must be at least the one the
/// last successful `flush` covered.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Break {
    Nothing,
    SkipTableSync,
    SkipBlobSync,
    RecordLatestMarker,
}

fn run_embedded(seed: u64, crash: Crash, broken: Break) -> Result<(), String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let disk = SimDisk::new(seed);
    let mut opts = options(&mut rng, DurabilityMode::Embedded);
    opts.skip_table_sync_for_tests = broken == Break::SkipTableSync;
    if broken == Break::SkipBlobSync {
        opts.skip_blob_sync_for_tests = true;
        opts.blob_value_bytes_min = Some(1);
    }
    opts.record_latest_marker_for_tests = broken == Break::RecordLatestMarker;
    let mut run_opts = opts.clone();
    match crash {
        Crash::AfterOps(n) => disk.crash_after_ops(n),
        Crash::At(p, nth) => run_opts.hook = Some(crash_hook(&disk, p, nth)),
    }
    let fs: Arc<dyn Fs> = disk.fs();
    let mut states: Vec<Model> = vec![Model::new()];
    let mut flushed_marker = 0u64;
    let mut model = Model::new();
    let mut checkpoint: Option<(PathBuf, u64)> = None;
    'run: {
        let Ok(db) = Db::open_with_fs(Arc::clone(&fs), DIR, run_opts.clone()) else { break 'run };
        for i in 1..=120u64 {
            let mut next = model.clone();
            let mut b = random_batch(&mut rng, &mut next);
            b.set_marker(Marker::new(i, 1));
            if db.write(&b).is_err() {
                break 'run;
            }
            model = next;
            states.push(model.clone());
            match rng.random_range(0..40) {
                0..=2 => {
                    if db.flush().is_err() {
                        break 'run;
                    }
                    flushed_marker = i;
                }
                3 => {
                    if db.compact_range::<std::ops::RangeFull, &[u8]>(..).is_err() {
                        break 'run;
                    }
                    flushed_marker = i;
                }
                4 if checkpoint.is_none() => {
                    let dest = PathBuf::from(format!("/data/ckpt-{i}"));
                    match db.checkpoint(&dest) {
                        Ok(info) => {
                            let m = info.marker.map_or(0, |m| m.index);
                            if m != i {
                                return Err(format!("checkpoint marker {m}, expected {i}"));
                            }
                            flushed_marker = i;
                            checkpoint = Some((dest, i));
                        }
                        Err(_) => break 'run,
                    }
                }
                5 => {
                    // Delta ingest: the engine reports its durable marker f; a
                    // "leader" builds L0 tables of the changes after f; the
                    // engine drops its memtables and ingests them at marker S.
                    let f = db.durable_marker().map_or(0, |m| m.index);
                    let target = i + 1000;
                    let mut lopts = opts.clone();
                    lopts.hook = None;
                    let Ok(leader) = Db::open_with_fs(Arc::clone(&fs), LEADER, lopts) else { break 'run };
                    let mut after = states[f as usize].clone();
                    let mut lb = WriteBatch::new();
                    fill_batch(&mut rng, &mut after, &mut lb, 20);
                    lb.set_marker(Marker::new(target, 2));
                    if leader.write(&lb).is_err() || leader.flush().is_err() {
                        break 'run;
                    }
                    let files: Vec<PathBuf> = leader.live_tables().into_iter().map(|(_, p)| p).collect();
                    // The blob files its tables' values went to (with separation on).
                    let tdir = Path::new(LEADER).join("tables");
                    let names = fs.read_dir(&tdir).unwrap_or_default();
                    let blobs: Vec<(u64, PathBuf)> =
                        names.iter().filter_map(|n| Some((cairn_lsm::blob_file_id(n)?, tdir.join(n)))).collect();
                    drop(leader);
                    states.resize(target as usize + 1, Model::new());
                    states[target as usize] = after;
                    let o = IngestOptions::new().discard_memtables(true).marker(Marker::new(target, 2));
                    if db.ingest_with_blobs(&files, &blobs, o).is_ok() {
                        flushed_marker = target;
                    }
                    // Either way the run ends: after a crash the engine holds
                    // the old state or the new one.
                    break 'run;
                }
                _ => {}
            }
        }
    }
    disk.crash();
    let fs: Arc<dyn Fs> = disk.fs();
    let db = Db::open_with_fs(Arc::clone(&fs), DIR, opts.clone()).map_err(|e| format!("reopen: {e}"))?;
    let m = db.durable_marker().map_or(0, |m| m.index);
    if m < flushed_marker {
        return Err(format!("durable marker {m} below the last flushed marker {flushed_marker}"));
    }
    let expect = states.get(m as usize).ok_or_else(|| format!("durable marker {m} was never written"))?;
    let got = contents(&db)?;
    if &got != expect {
        return Err(format!(
            "contents at durable marker {m} differ from the model ({} vs {} keys)",
            got.len(),
            expect.len()
        ));
    }
    if let Some((dir, at)) = checkpoint {
        drop(db);
        let mut co = opts.clone();
        co.create_if_missing = false;
        let c = Db::open_with_fs(Arc::clone(&fs), &dir, co).map_err(|e| format!("open checkpoint: {e}"))?;
        if c.durable_marker().map_or(0, |m| m.index) != at || contents(&c)? != states[at as usize] {
            return Err(format!("checkpoint {} does not hold the state at marker {at}", dir.display()));
        }
    }
    Ok(())
}

/// Standalone mode, every write synced: an acknowledged batch is never lost;
/// the batch in flight at the crash is there entirely or not at all.
fn run_standalone(seed: u64, crash: Crash) -> Result<(), String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let disk = SimDisk::new(seed);
    let opts = options(&mut rng, DurabilityMode::Standalone(SyncPolicy::EveryWrite));
    let mut run_opts = opts.clone();
    match crash {
        Crash::AfterOps(n) => disk.crash_after_ops(n),
        Crash::At(p, nth) => run_opts.hook = Some(crash_hook(&disk, p, nth)),
    }
    let mut model = Model::new();
    let mut in_flight: Option<Model> = None;
    'run: {
        let Ok(db) = Db::open_with_fs(disk.fs(), DIR, run_opts) else { break 'run };
        for _ in 0..150 {
            let mut next = model.clone();
            let b = random_batch(&mut rng, &mut next);
            if db.write(&b).is_err() {
                in_flight = Some(next);
                break 'run;
            }
            model = next;
            if rng.random_range(0..30) == 0 && db.compact_range::<std::ops::RangeFull, &[u8]>(..).is_err() {
                break 'run;
            }
        }
    }
    disk.crash();
    let db = Db::open_with_fs(disk.fs(), DIR, opts).map_err(|e| format!("reopen: {e}"))?;
    let got = contents(&db)?;
    if got != model && Some(&got) != in_flight.as_ref() {
        return Err(format!("after recovery {} keys; acknowledged state has {}", got.len(), model.len()));
    }
    Ok(())
}

fn seeds() -> u64 {
    if std::env::var_os("CAIRN_LONG").is_some() { 5000 } else { 500 }
}

#[test]
fn embedded_crash_at_random_operations() {
    for seed in 0..seeds() {
        let n = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed).random_range(0..2500);
        run_embedded(seed, Crash::AfterOps(n), Break::Nothing)
            .unwrap_or_else(|e| panic!("seed {seed}, crash after {n} ops: {e}"));
    }
}

#[test]
fn standalone_crash_at_random_operations() {
    for seed in 0..seeds() {
        let n = ChaCha8Rng::seed_from_u64(seed ^ 0xfeed).random_range(0..2500);
        run_standalone(seed, Crash::AfterOps(n)).unwrap_or_else(|e| panic!("seed {seed}, crash after {n} ops: {e}"));
    }
}

const POINTS: [HookPoint; 9] = [
    HookPoint::FlushTableWritten,
    HookPoint::FlushTableSynced,
    HookPoint::FlushInstalled,
    HookPoint::CompactionTablesWritten,
    HookPoint::CompactionInstalled,
    HookPoint::CheckpointLinked,
    HookPoint::CheckpointDone,
    HookPoint::IngestLinked,
    HookPoint::IngestInstalled,
];

#[test]
fn crash_exactly_at_each_step() {
    for p in POINTS {
        let before = FIRED.load(Ordering::SeqCst);
        for seed in 0..24u64 {
            let nth = 1 + seed % 3;
            run_embedded(seed, Crash::At(p, nth), Break::Nothing)
                .unwrap_or_else(|e| panic!("{p:?} #{nth}, seed {seed}: {e}"));
            if matches!(p, HookPoint::FlushTableWritten | HookPoint::FlushInstalled | HookPoint::CompactionInstalled) {
                run_standalone(seed, Crash::At(p, nth))
                    .unwrap_or_else(|e| panic!("standalone {p:?}, seed {seed}: {e}"));
            }
        }
        let fired = FIRED.load(Ordering::SeqCst) - before;
        assert!(fired >= 5, "{p:?}: the crash fired in only {fired} runs");
    }
}

/// Of 60 random-crash runs with `broken`, how many the checks caught.
fn failures_with(broken: Break) -> usize {
    (0..60u64)
        .filter(|&seed| {
            let n = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed).random_range(0..2500);
            run_embedded(seed, Crash::AfterOps(n), broken).is_err()
        })
        .count()
}

/// The teeth: with table fsyncs skipped, crashes lose data the durable
/// marker claims.
#[test]
fn skipping_the_table_sync_is_caught() {
    let failures = failures_with(Break::SkipTableSync);
    assert!(failures > 0, "no crash caught the skipped table fsync");
}

/// The teeth: with blob files left unsynced, crashes lose the values that
/// durable tables reference.
#[test]
fn skipping_the_blob_sync_is_caught() {
    let failures = failures_with(Break::SkipBlobSync);
    assert!(failures > 0, "no crash caught the skipped blob fsync");
}

/// The teeth: a flush that records the latest marker written (the active
/// memtable's) instead of the sealed memtable's claims writes it does not hold.
#[test]
fn recording_the_latest_marker_is_caught() {
    let failures = failures_with(Break::RecordLatestMarker);
    assert!(failures > 0, "no crash caught the wrong marker");
}

#[test]
fn a_partial_checkpoint_is_refused() {
    let disk = SimDisk::new(7);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut o = options(&mut rng, DurabilityMode::Embedded);
    o.hook = Some(crash_hook(&disk, HookPoint::CheckpointLinked, 1));
    let db = Db::open_with_fs(disk.fs(), DIR, o.clone()).expect("open");
    let mut b = WriteBatch::new();
    b.put("a", "1").set_marker(Marker::new(1, 1));
    db.write(&b).expect("write");
    assert!(db.checkpoint("/data/ckpt").is_err());
    drop(db);
    let mut co = o;
    co.hook = None;
    co.create_if_missing = false;
    match Db::open_with_fs(disk.fs(), Path::new("/data/ckpt"), co) {
        Err(cairn_lsm::Error::NotFound { .. }) => {}
        other => panic!("a partial checkpoint opened: {other:?}"),
    }
}
