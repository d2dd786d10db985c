//! Seeded simulated crashes: nothing `write` reported durable is ever lost, no
//! garbage comes back as a record, and `TolerateTornTail` recovery always
//! succeeds after a plain crash. And the teeth: skipping any one sync makes
//! these checks fail.

mod common;

use std::sync::Arc;

use cairn_wal::sim::SimDisk;
use cairn_wal::{Durability, Error, Fs, Preparation, PrepareIn, SyncSite, Wal, WalOptions};
use common::{MOp, Model, random_batch, to_batch};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DIR: &str = "/data/node/wal";

fn options(rng: &mut impl Rng, skip: Option<SyncSite>) -> WalOptions {
    let mut o = WalOptions::default();
    o.segment_bytes_max = rng.random_range(1024..6000);
    o.preparation = if rng.random() { Preparation::ZeroFill } else { Preparation::Grow };
    o.prepare_in = PrepareIn::Foreground;
    o.spare_segments_max = rng.random_range(0..3);
    o.skip_sync_for_tests = skip;
    o
}

/// One run: create, write random batches until the armed crash fires (or the
/// end), crash, reopen, compare with the model. `Err` describes a violation.
fn run(seed: u64, skip: Option<SyncSite>) -> Result<(), String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let disk = SimDisk::new(seed);
    let opts = options(&mut rng, skip);
    let mut model = Model::default();
    let mut inflight: Vec<MOp> = Vec::new();
    disk.crash_after_ops(rng.random_range(0..400));

    let fs: Arc<dyn Fs> = disk.fs();
    let created = Wal::create(fs, DIR, opts.clone(), b"cluster=7");
    if let Ok(wal) = created {
        for _ in 0..60 {
            if rng.random_range(0..10) == 0 {
                let to = rng.random_range(0..=model.next_position());
                // A release cut short by the crash may still have removed segments.
                model.released = model.released.max(to);
                if wal.release_to(to).is_err() {
                    break;
                }
                continue;
            }
            if rng.random_range(0..25) == 0 {
                if wal.cut().is_err() {
                    break;
                }
                continue;
            }
            let ops = random_batch(&mut rng, &model, 3000);
            match wal.write(&to_batch(&ops), Durability::Sync) {
                Ok(_) => ops.iter().for_each(|op| model.apply(op)),
                Err(_) => {
                    inflight = ops;
                    break;
                }
            }
        }
    }
    disk.crash();

    // Recover. The log may hold the acknowledged state plus a prefix of the
    // batch that was in flight, never anything else.
    let mut reopen_opts = opts.clone();
    reopen_opts.skip_sync_for_tests = None;
    let (wal, report) = match Wal::open(disk.fs(), DIR, reopen_opts.clone()) {
        Ok(w) => w,
        Err(Error::NotFound { .. }) if model.records.is_empty() && model.state.is_none() => return Ok(()),
        Err(e) => return Err(format!("recovery failed: {e}")),
    };
    let mut last_err = String::new();
    let mut candidates = Vec::new();
    for k in 0..=inflight.len() {
        let mut m = model.clone();
        inflight[..k].iter().for_each(|op| m.apply(op));
        match m.check(&wal) {
            Ok(()) => candidates.push(m),
            Err(e) => last_err = e,
        }
    }
    if candidates.is_empty() {
        return Err(format!("no prefix of the in-flight batch explains the log ({report:?}): {last_err}"));
    }

    // The recovered log takes new writes and keeps them across another crash.
    // (Prefixes that differ only by a truncation record look alike; the position
    // the log assigns next tells them apart.)
    let ops = vec![MOp::Append { kind: 1, pos: None, payload: b"after recovery".to_vec() }];
    let w = wal.write(&to_batch(&ops), Durability::Sync).map_err(|e| format!("write after recovery: {e}"))?;
    let assigned = w.positions.map(|p| *p.start());
    let mut m = candidates
        .into_iter()
        .find(|m| Some(m.next_position()) == assigned)
        .ok_or_else(|| format!("the log assigned position {assigned:?}, which no explaining prefix allows"))?;
    ops.iter().for_each(|op| m.apply(op));
    drop(wal);
    disk.crash();
    let (wal, _) = Wal::open(disk.fs(), DIR, reopen_opts).map_err(|e| format!("second recovery failed: {e}"))?;
    m.check(&wal).map_err(|e| format!("after the second crash: {e}"))
}

#[test]
fn a_thousand_seeded_crashes_lose_nothing_acknowledged() {
    let seeds: u64 = std::env::var("CAIRN_WAL_CRASH_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let start: u64 = std::env::var("CAIRN_WAL_CRASH_SEED_START").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    for seed in start..start + seeds {
        if let Err(e) = run(seed, None) {
            panic!("seed {seed} failed (replay: CAIRN_WAL_CRASH_SEED_START={seed} CAIRN_WAL_CRASH_SEEDS=1): {e}");
        }
    }
}

/// Skipping any one of the log's syncs must make the crash test fail.
#[test]
fn skipping_any_one_sync_is_caught() {
    for site in SyncSite::ALL {
        let caught = (0..2000).find_map(|seed| run(seed, Some(site)).err().map(|e| (seed, e)));
        match caught {
            Some((seed, e)) => eprintln!("skipping {site:?} caught at seed {seed}: {e}"),
            None => panic!("skipping {site:?} was never caught: the crash test has no teeth there"),
        }
    }
}

/// After a failed fsync the log refuses every call.
#[test]
fn a_failed_fsync_poisons_the_log() {
    let disk = SimDisk::new(1);
    let mut opts = WalOptions::default();
    opts.prepare_in = PrepareIn::Foreground;
    let wal = Wal::create(disk.fs(), DIR, opts.clone(), b"m").expect("create");
    wal.append_next(cairn_wal::UserKind::new(0), b"durable").expect("first append");
    disk.fail_syncs(true);
    let e = wal.append_next(cairn_wal::UserKind::new(0), b"lost").expect_err("the fsync fails");
    assert!(matches!(e, Error::Io { .. }), "{e}");
    disk.fail_syncs(false);
    for e in [
        wal.append_next(cairn_wal::UserKind::new(0), b"x").expect_err("poisoned"),
        wal.sync().expect_err("poisoned"),
        wal.read_range(.., 1).expect_err("poisoned"),
        wal.release_to(0).expect_err("poisoned"),
    ] {
        assert!(matches!(e, Error::Poisoned(_)), "{e}");
    }
    drop(wal);
    // A new process (after the crash that follows) finds the durable record.
    disk.crash();
    let (wal, _) = Wal::open(disk.fs(), DIR, opts).expect("reopen");
    let got = wal.read_range(.., u64::MAX).expect("read");
    assert_eq!(got.iter().map(|r| r.payload.to_vec()).collect::<Vec<_>>(), vec![b"durable".to_vec()]);
}
