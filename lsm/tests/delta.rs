//! Deltas against a model: a leader and a follower fed the same marked
//! batches; the follower falls behind (its memtables holding writes past its
//! durable marker), the leader goes on (flushes, table compactions, batches
//! of markers alone), then the follower catches up by a delta when the
//! leader's L0 tables can show one, else by the leader's full checkpoint.
//! After each catch-up, and after a reopen, the follower holds exactly the
//! model's contents at the leader's durable marker.

mod common;

use std::path::{Path, PathBuf};

use cairn_lsm::{Background, Compression, DELTA_FILE, Db, Delta, DurabilityMode, Error, Marker, Options, WriteBatch};
use common::{Model, delete_range, key};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn options(rng: &mut impl Rng) -> Options {
    let mut o = Options::default();
    o.durability = DurabilityMode::Embedded;
    o.background = Background::Inline;
    o.write_buffer_bytes = rng.random_range(1500..6000);
    o.block_bytes = rng.random_range(64..512);
    o.table_bytes_target = rng.random_range(1024..4096);
    o.l0_compaction_trigger = rng.random_range(3..8);
    o.l1_bytes_target = 4096;
    o.level_size_multiplier = 3;
    o.levels = 4;
    o.compression_per_level = vec![Compression::None, Compression::Zstd(1)];
    // Half the engines keep the longer values in blob files (each on its
    // own: a delta may carry them to an engine that does not, and back).
    if rng.random_bool(0.5) {
        o.blob_value_bytes_min = Some(rng.random_range(4..16));
        o.blob_gc_garbage_percent = [0, 25, 60][rng.random_range(0..3)];
    }
    o
}

/// A random batch at `marker` (sometimes of the marker alone), applied to the model too.
fn batch(rng: &mut impl Rng, model: &mut Model, marker: u64) -> WriteBatch {
    let mut b = WriteBatch::new();
    let n = if rng.random_range(0..6) == 0 { 0 } else { rng.random_range(1..5) };
    for _ in 0..n {
        let k: u8 = rng.random();
        match rng.random_range(0..10) {
            0..=6 => {
                let v = format!("v{k}-{marker}-{}", rng.random::<u16>()).into_bytes();
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
    b.set_marker(Marker::new(marker, 1 + marker / 50));
    b
}

/// A delta's table files and blob files in its directory `d`.
fn files(delta: &Delta, d: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    (delta.tables.iter().map(|t| d.join(&t.file)).collect(), delta.blob_files.iter().map(|f| d.join(f)).collect())
}

fn contents(db: &Db) -> Model {
    db.range::<std::ops::RangeFull, &[u8]>(..)
        .map(|kv| kv.expect("scan"))
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect()
}

#[derive(Debug, Default)]
struct Outcome {
    deltas: u64,
    delta_tables: u64,
    fulls: u64,
}

/// One run: `rounds` of the follower falling behind and catching up.
fn run(seed: u64, dir: &Path, broken: bool) -> Result<Outcome, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut lo = options(&mut rng);
    let mut fo = options(&mut rng);
    lo.delta_shift_each_table_for_tests = broken;
    fo.delta_shift_each_table_for_tests = broken;
    let mut ldir = dir.join("leader");
    let mut leader = Db::open(&ldir, lo.clone()).map_err(|e| e.to_string())?;
    let mut fdir = dir.join("follower-0");
    let mut follower = Db::open(&fdir, fo.clone()).map_err(|e| e.to_string())?;
    let mut model = Model::new();
    let mut marker = 0u64;
    let mut out = Outcome::default();
    for round in 0..rng.random_range(2..6) {
        // Both hold the same state now: sometimes they swap roles, so that
        // deltas also carry tables the leader ingested itself (their blob
        // files under ids the leader gave them).
        if round > 0 && rng.random_bool(0.3) {
            std::mem::swap(&mut leader, &mut follower);
            std::mem::swap(&mut lo, &mut fo);
            std::mem::swap(&mut ldir, &mut fdir);
        }
        // Both apply the same batches; each flushes at its own moments.
        for _ in 0..rng.random_range(0..60) {
            marker += 1;
            let b = batch(&mut rng, &mut model, marker);
            leader.write(&b).map_err(|e| e.to_string())?;
            follower.write(&b).map_err(|e| e.to_string())?;
            if rng.random_range(0..25) == 0 {
                follower.flush().map_err(|e| e.to_string())?;
            }
        }
        // The follower stops applying; the leader goes on.
        let f = follower.durable_marker();
        for _ in 0..rng.random_range(1..50) {
            marker += 1;
            let b = batch(&mut rng, &mut model, marker);
            leader.write(&b).map_err(|e| e.to_string())?;
            if rng.random_range(0..30) == 0 {
                leader.flush().map_err(|e| e.to_string())?;
            }
        }
        let ddir = dir.join(format!("delta-{round}"));
        match leader.delta_checkpoint(&ddir, f).map_err(|e| e.to_string())? {
            Some(delta) => {
                let read = Delta::decode(&std::fs::read(ddir.join(DELTA_FILE)).map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?;
                if read != delta {
                    return Err("the delta file differs from what was returned".into());
                }
                let (paths, blobs) = files(&delta, &ddir);
                follower.ingest_delta(&delta, &paths, &blobs).map_err(|e| format!("round {round}: ingest: {e}"))?;
                out.deltas += 1;
                out.delta_tables += delta.tables.len() as u64;
                if follower.durable_marker() != Some(delta.marker) || leader.durable_marker() != Some(delta.marker) {
                    return Err(format!("round {round}: markers {:?} / {:?}", follower.durable_marker(), delta.marker));
                }
            }
            None => {
                // A full checkpoint replaces the follower's state.
                let cdir = dir.join(format!("follower-{}", round + 1));
                leader.checkpoint(&cdir).map_err(|e| e.to_string())?;
                follower.close().map_err(|e| e.to_string())?;
                fdir = cdir;
                follower = Db::open(&fdir, fo.clone()).map_err(|e| e.to_string())?;
                out.fulls += 1;
            }
        }
        let got = contents(&follower);
        if got != model {
            return Err(format!("round {round}: the follower differs from the model after catching up ({out:?})"));
        }
        // Both go on; the follower's state survives a reopen.
        for _ in 0..rng.random_range(0..20) {
            marker += 1;
            let b = batch(&mut rng, &mut model, marker);
            leader.write(&b).map_err(|e| e.to_string())?;
            follower.write(&b).map_err(|e| e.to_string())?;
        }
        follower.flush().map_err(|e| e.to_string())?;
        follower.close().map_err(|e| e.to_string())?;
        follower = Db::open(&fdir, fo.clone()).map_err(|e| e.to_string())?;
        if contents(&follower) != model {
            return Err(format!("round {round}: the follower differs from the model after a reopen"));
        }
    }
    Ok(out)
}

fn cases() -> u32 {
    if std::env::var_os("CAIRN_LONG").is_some() { 1000 } else { 64 }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_follower_caught_up_by_deltas_or_checkpoints_matches_the_model(seed in any::<u64>()) {
        let dir = tempfile::tempdir().expect("tmp");
        if let Err(e) = run(seed, dir.path(), false) {
            panic!("seed {seed}: {e}");
        }
    }
}

#[test]
fn deltas_are_used_and_carry_several_tables() {
    let mut total = Outcome::default();
    for seed in 0..24 {
        let dir = tempfile::tempdir().expect("tmp");
        let o = run(seed, dir.path(), false).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        total.deltas += o.deltas;
        total.delta_tables += o.delta_tables;
        total.fulls += o.fulls;
    }
    eprintln!("{total:?}");
    // The test would prove little if every catch-up were a full checkpoint.
    assert!(total.deltas >= 12 && total.fulls >= 3, "{total:?}");
    assert!(total.delta_tables > total.deltas, "some deltas hold several tables: {total:?}");
}

#[test]
fn shifting_each_table_on_its_own_is_caught() {
    let failed = (0..24).filter(|&seed| run(seed, tempfile::tempdir().expect("tmp").path(), true).is_err()).count();
    assert!(failed > 0, "losing the order across a delta's tables must break some run");
}

#[test]
fn a_delta_that_does_not_reach_the_state_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut o = options(&mut rng);
    o.l0_compaction_trigger = 100;
    let leader = Db::open(dir.path().join("l"), o.clone()).expect("open");
    let follower = Db::open(dir.path().join("f"), o.clone()).expect("open");
    let mut model = Model::new();
    for m in 1..=10 {
        let b = batch(&mut rng, &mut model, m);
        leader.write(&b).expect("write");
        follower.write(&b).expect("write");
    }
    follower.flush().expect("flush");
    leader.flush().expect("flush");
    let at10 = model.clone();
    for m in 11..=30 {
        let b = batch(&mut rng, &mut model, m);
        leader.write(&b).expect("write");
        if m == 20 {
            leader.flush().expect("flush");
        }
    }
    // Made for a state at 20: it lacks (10, 20] for the follower at 10.
    let d = leader.delta_checkpoint(dir.path().join("d"), Some(Marker::new(20, 1))).expect("delta").expect("some");
    let (paths, blobs) = files(&d, &dir.path().join("d"));
    match follower.ingest_delta(&d, &paths, &blobs) {
        Err(Error::Delta { reason }) => assert!(reason.contains("do not bring"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(contents(&follower), at10);
    assert_eq!(follower.durable_marker(), Some(Marker::new(10, 1)));
    // Nothing to send for a state already there.
    assert!(leader.delta_checkpoint(dir.path().join("e"), Some(Marker::new(30, 1))).expect("delta").is_none());
    assert!(!dir.path().join("e").exists());
    // The right one works.
    let d = leader.delta_checkpoint(dir.path().join("g"), Some(Marker::new(10, 1))).expect("delta").expect("some");
    let (paths, blobs) = files(&d, &dir.path().join("g"));
    follower.ingest_delta(&d, &paths, &blobs).expect("ingest");
    assert_eq!(contents(&follower), model);
}
