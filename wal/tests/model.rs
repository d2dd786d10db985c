//! Model-based property test: random appends (with overwrites at lower
//! positions), states, snapshot markers, cuts, releases, clean reopens and
//! crashes, with payloads from 0 B to 1 MiB. After every reopen the log holds
//! exactly the model's durable state, and random range reads agree with it.

mod common;

use std::sync::Arc;

use cairn_wal::sim::SimDisk;
use cairn_wal::{Durability, Fs, Preparation, PrepareIn, UserKind, Wal, WalOptions};
use common::{MOp, Model, to_batch};
use proptest::prelude::*;

const DIR: &str = "/wal";

#[derive(Clone, Debug)]
enum Step {
    Write(Vec<Op>),
    Cut,
    Release(u8),
    Reopen,
    CrashReopen,
    Read(u8, u8),
}

/// A batch operation before positions are known.
#[derive(Clone, Debug)]
enum Op {
    Next { kind: u16, len: usize },
    Skip { gap: u8, kind: u16, len: usize },
    Overwrite { back: u8, kind: u16, len: usize },
    State(u8),
    Marker,
}

fn payload_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        8 => 0usize..300,
        2 => 300usize..20_000,
        1 => Just(1 << 20),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (0u16..3, payload_len()).prop_map(|(kind, len)| Op::Next { kind, len }),
        2 => (1u8..4, 0u16..3, payload_len()).prop_map(|(gap, kind, len)| Op::Skip { gap, kind, len }),
        2 => (0u8..8, 0u16..3, payload_len()).prop_map(|(back, kind, len)| Op::Overwrite { back, kind, len }),
        1 => any::<u8>().prop_map(Op::State),
        1 => Just(Op::Marker),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        12 => prop::collection::vec(op(), 1..6).prop_map(Step::Write),
        1 => Just(Step::Cut),
        2 => any::<u8>().prop_map(Step::Release),
        2 => Just(Step::Reopen),
        2 => Just(Step::CrashReopen),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Step::Read(a, b)),
    ]
}

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Turns abstract ops into model ops with concrete positions.
fn concretize(ops: &[Op], model: &Model, salt: &mut u64) -> Vec<MOp> {
    let mut m = model.clone();
    let mut out = Vec::new();
    for op in ops {
        *salt += 1;
        let mops = match *op {
            Op::Next { kind, len } => vec![MOp::Append { kind, pos: None, payload: bytes(*salt, len) }],
            Op::Skip { gap, kind, len } => {
                vec![MOp::Append { kind, pos: Some(m.next_position() + u64::from(gap)), payload: bytes(*salt, len) }]
            }
            Op::Overwrite { back, kind, len } => {
                let p = m.next_position().saturating_sub(u64::from(back) + 1);
                vec![MOp::Truncate(p), MOp::Append { kind, pos: Some(p), payload: bytes(*salt, len) }]
            }
            Op::State(s) => vec![MOp::State(vec![s; usize::from(s % 32)])],
            Op::Marker => vec![MOp::Marker(m.last.unwrap_or(0), b"t".to_vec())],
        };
        for mop in mops {
            m.apply(&mop);
            out.push(mop);
        }
    }
    out
}

fn opts() -> WalOptions {
    let mut o = WalOptions::default();
    o.segment_bytes_max = 64 << 10;
    o.preparation = Preparation::Grow;
    o.prepare_in = PrepareIn::Foreground;
    o.spare_segments_max = 1;
    o
}

fn check_range(wal: &Wal, model: &Model, a: u8, b: u8) -> Result<(), TestCaseError> {
    // Below the first retained record (or the release point, when everything
    // was released) the log may hold nothing the model still remembers.
    let first = wal.first_position().unwrap_or(model.released);
    let hi = model.next_position() + 2;
    let (a, b) = (u64::from(a) % hi, u64::from(b) % hi);
    let (lo, hi) = (first.max(a.min(b)), a.max(b));
    if lo > hi {
        return Ok(());
    }
    let got = wal.read_range(lo..=hi, u64::MAX).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let got: Vec<(u64, Vec<u8>)> = got.iter().map(|r| (r.position, r.payload.to_vec())).collect();
    let want: Vec<(u64, Vec<u8>)> = model.records.range(lo..=hi).map(|(p, (_, v))| (*p, v.clone())).collect();
    prop_assert_eq!(got, want, "range {}..={}", lo, hi);
    // A bounded read returns a non-empty prefix of the same run.
    let bounded = wal.read_range(lo..=hi, 1).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(bounded.len() <= 1 || model.records.range(lo..=hi).count() > 1);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_model_through_reopen_and_crash(steps in prop::collection::vec(step(), 1..40), seed in any::<u64>()) {
        let disk = SimDisk::new(seed);
        let fs: Arc<dyn Fs> = disk.fs();
        let mut wal = Wal::create(fs, DIR, opts(), b"meta").map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut model = Model::default();
        let mut salt = seed;
        for step in steps {
            match step {
                Step::Write(ops) => {
                    let mops = concretize(&ops, &model, &mut salt);
                    wal.write(&to_batch(&mops), Durability::Sync).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    mops.iter().for_each(|m| model.apply(m));
                }
                Step::Cut => wal.cut().map_err(|e| TestCaseError::fail(e.to_string()))?,
                Step::Release(r) => {
                    let to = u64::from(r) % (model.next_position() + 1);
                    wal.release_to(to).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    model.released = model.released.max(to);
                }
                Step::Reopen | Step::CrashReopen => {
                    drop(wal);
                    if matches!(step, Step::CrashReopen) {
                        disk.crash();
                    }
                    let (w, report) = Wal::open(disk.fs(), DIR, opts()).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    // Every write was acknowledged: nothing may be torn.
                    prop_assert!(report.torn_tail.is_none(), "{:?}", report);
                    wal = w;
                    model.check(&wal).map_err(TestCaseError::fail)?;
                    prop_assert_eq!(wal.metadata(), b"meta".to_vec());
                }
                Step::Read(a, b) => check_range(&wal, &model, a, b)?,
            }
        }
        model.check(&wal).map_err(TestCaseError::fail)?;
        // Positions assigned by the log continue after the model's last one.
        let p = wal.append_next(UserKind::new(0), b"end").map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(p, model.next_position());
    }
}

/// Records 0..20 over several segments, a snapshot marker at 9, more
/// records in later segments, a release to 10 (the marker's segment goes),
/// then a reopen: the model check must still find the marker (each new
/// segment's header repeats it). Returns the check's complaint, if any.
fn marker_through_release(skip_repeat: bool) -> Result<(), String> {
    let disk = SimDisk::new(7);
    let mut o = opts();
    o.skip_marker_repeat_for_tests = skip_repeat;
    let wal = Wal::create(disk.fs(), DIR, o.clone(), b"meta").map_err(|e| e.to_string())?;
    let mut model = Model::default();
    let write = |wal: &Wal, model: &mut Model, mops: Vec<MOp>| -> Result<(), String> {
        wal.write(&to_batch(&mops), Durability::Sync).map_err(|e| e.to_string())?;
        mops.iter().for_each(|m| model.apply(m));
        Ok(())
    };
    for i in 0..10u64 {
        write(&wal, &mut model, vec![MOp::Append { kind: 0, pos: None, payload: bytes(i, 10_000) }])?;
    }
    write(&wal, &mut model, vec![MOp::Marker(9, b"term 1".to_vec())])?;
    for i in 10..20u64 {
        wal.cut().map_err(|e| e.to_string())?;
        write(&wal, &mut model, vec![MOp::Append { kind: 0, pos: None, payload: bytes(i, 10_000) }])?;
    }
    wal.release_to(10).map_err(|e| e.to_string())?;
    model.released = 10;
    model.check(&wal)?;
    drop(wal);
    let (wal, _) = Wal::open(disk.fs(), DIR, o).map_err(|e| e.to_string())?;
    model.check(&wal)
}

#[test]
fn the_latest_marker_outlives_the_release_of_its_segment() {
    marker_through_release(false).expect("the marker after the release");
    // Teeth: with the marker left out of new segment headers, the check fails.
    let e = marker_through_release(true).expect_err("a lost marker must be caught");
    assert!(e.contains("snapshot marker"), "{e}");
}
