//! Model-based property test: random puts, deletes, range deletes, batches,
//! scans both ways, read views held across flushes and compactions, and
//! reopens; every read must agree with a `BTreeMap`. Set `CAIRN_LONG=1` for
//! a long run.

mod common;

use std::ops::Bound;
use std::path::Path;

use bytes::Bytes;
use cairn_lsm::{Background, Compression, Db, DurabilityMode, Options, ReadView, SyncPolicy, WriteBatch};
use common::{Model, delete_range, key, scan};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum BOp {
    Put(u8, u16),
    Delete(u8),
    DeleteRange(u8, u8),
}

#[derive(Clone, Debug)]
enum Op {
    Put(u8, u16),
    Delete(u8),
    DeleteRange(u8, u8),
    Batch(Vec<BOp>),
    Get(u8),
    Scan(Option<u8>, Option<u8>, bool),
    TakeView,
    DropView(u8),
    ViewGet(u8, u8),
    ViewScan(u8, Option<u8>, Option<u8>, bool),
    Flush,
    CompactAll,
    Reopen,
}

fn bop() -> impl Strategy<Value = BOp> {
    prop_oneof![
        (any::<u8>(), any::<u16>()).prop_map(|(k, v)| BOp::Put(k, v)),
        any::<u8>().prop_map(BOp::Delete),
        (any::<u8>(), 1u8..8).prop_map(|(k, n)| BOp::DeleteRange(k, n)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        20 => (any::<u8>(), any::<u16>()).prop_map(|(k, v)| Op::Put(k, v)),
        5 => any::<u8>().prop_map(Op::Delete),
        2 => (any::<u8>(), 1u8..12).prop_map(|(k, n)| Op::DeleteRange(k, n)),
        // Wide ones cover whole tables below L0, which are then dropped unread.
        1 => (any::<u8>(), 12u8..=255).prop_map(|(k, n)| Op::DeleteRange(k, n)),
        3 => prop::collection::vec(bop(), 1..6).prop_map(Op::Batch),
        8 => any::<u8>().prop_map(Op::Get),
        3 => (any::<Option<u8>>(), any::<Option<u8>>(), any::<bool>()).prop_map(|(a, b, f)| Op::Scan(a, b, f)),
        2 => Just(Op::TakeView),
        1 => any::<u8>().prop_map(Op::DropView),
        3 => (any::<u8>(), any::<u8>()).prop_map(|(v, k)| Op::ViewGet(v, k)),
        2 => (any::<u8>(), any::<Option<u8>>(), any::<Option<u8>>(), any::<bool>())
            .prop_map(|(v, a, b, f)| Op::ViewScan(v, a, b, f)),
        2 => Just(Op::Flush),
        1 => Just(Op::CompactAll),
        1 => Just(Op::Reopen),
    ]
}

fn value(k: u8, v: u16) -> Vec<u8> {
    // Sizes vary so blocks and tables split at different places.
    let n = (v % 97) as usize;
    let mut out = format!("v{k}-{v}-").into_bytes();
    out.extend(std::iter::repeat_n(b'x', n));
    out
}

fn options(threads: bool, seed: u8) -> Options {
    let mut o = Options::default();
    o.durability = DurabilityMode::Standalone(SyncPolicy::None);
    o.write_buffer_bytes = 1500 + (seed as usize % 4) * 700;
    o.block_bytes = 128 + (seed as usize % 3) * 200;
    o.block_restart_interval = 1 + seed as usize % 5;
    o.table_bytes_target = 2048;
    // A high trigger keeps range tombstones in L0 over older tables below,
    // where the tables they cover whole are dropped unread.
    o.l0_compaction_trigger = if seed % 4 == 3 { 8 } else { 2 };
    o.l1_bytes_target = 4096;
    o.level_size_multiplier = 3;
    o.levels = 4;
    o.compression_per_level =
        if seed.is_multiple_of(2) { vec![Compression::None, Compression::Zstd(1)] } else { vec![Compression::Zstd(3)] };
    o.block_cache_bytes = if seed.is_multiple_of(3) { 0 } else { 64 << 10 };
    o.background = if threads { Background::Threads } else { Background::Inline };
    o.manifest_edits_per_snapshot = 7;
    o.manifest_segment_bytes = 4096;
    o.wal_segment_bytes = 8192;
    if seed % 4 >= 2 {
        // Values of 6 to 110 bytes: some kept in blob files, some inline;
        // garbage collected at every compaction, at a quarter, or never.
        o.blob_value_bytes_min = Some(8 + (seed as usize / 4) % 64);
        o.blob_gc_garbage_percent = [0, 25, 100][seed as usize % 3];
        o.blob_compression = if seed % 8 == 2 { Compression::None } else { Compression::Lz4 };
    }
    o
}

fn collect(it: cairn_lsm::Iter) -> Vec<(Vec<u8>, Vec<u8>)> {
    it.map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec()))).collect::<Result<_, _>>().expect("scan")
}

fn range(lo: Option<u8>, hi: Option<u8>) -> (Bound<Bytes>, Bound<Bytes>) {
    (
        lo.map_or(Bound::Unbounded, |l| Bound::Included(Bytes::from(key(l)))),
        hi.map_or(Bound::Unbounded, |h| Bound::Excluded(Bytes::from(key(h)))),
    )
}

fn scan_db(db: &Db, lo: Option<u8>, hi: Option<u8>, fwd: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
    if let (Some(l), Some(h)) = (lo, hi)
        && key(l) >= key(h)
    {
        return Vec::new();
    }
    let r = range(lo, hi);
    collect(if fwd { db.range(r) } else { db.range_rev(r) })
}

fn scan_view(v: &ReadView, lo: Option<u8>, hi: Option<u8>, fwd: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
    if let (Some(l), Some(h)) = (lo, hi)
        && key(l) >= key(h)
    {
        return Vec::new();
    }
    let r = range(lo, hi);
    collect(if fwd { v.range(r) } else { v.range_rev(r) })
}

fn run(ops: Vec<Op>, threads: bool, seed: u8, dir: &Path) {
    let opts = options(threads, seed);
    let mut db = Db::open(dir, opts.clone()).expect("open");
    let mut model = Model::new();
    let mut views: Vec<(ReadView, Model)> = Vec::new();
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Put(k, v) => {
                db.put(key(k), value(k, v)).expect("put");
                model.insert(key(k), value(k, v));
            }
            Op::Delete(k) => {
                db.delete(key(k)).expect("delete");
                model.remove(&key(k));
            }
            Op::DeleteRange(k, n) => {
                let (a, b) = (key(k), key(k.saturating_add(n)));
                if a < b {
                    db.delete_range(a.clone(), b.clone()).expect("delete_range");
                    delete_range(&mut model, &a, &b);
                }
            }
            Op::Batch(bops) => {
                let mut b = WriteBatch::new();
                let mut next = model.clone();
                for o in bops {
                    match o {
                        BOp::Put(k, v) => {
                            b.put(key(k), value(k, v));
                            next.insert(key(k), value(k, v));
                        }
                        BOp::Delete(k) => {
                            b.delete(key(k));
                            next.remove(&key(k));
                        }
                        BOp::DeleteRange(k, n) => {
                            let (a, c) = (key(k), key(k.saturating_add(n)));
                            if a < c {
                                b.delete_range(a.clone(), c.clone());
                                delete_range(&mut next, &a, &c);
                            }
                        }
                    }
                }
                db.write(&b).expect("batch");
                model = next;
            }
            Op::Get(k) => {
                let got = db.get(&key(k)).expect("get").map(|b| b.to_vec());
                assert_eq!(got.as_ref(), model.get(&key(k)), "step {step}: get {k}");
            }
            Op::Scan(lo, hi, fwd) => {
                assert_eq!(scan_db(&db, lo, hi, fwd), scan(&model, lo, hi, fwd), "step {step}: scan");
            }
            Op::TakeView => {
                if views.len() < 4 {
                    views.push((db.read_view(), model.clone()));
                }
            }
            Op::DropView(i) => {
                if !views.is_empty() {
                    let n = views.len();
                    views.remove(i as usize % n);
                }
            }
            Op::ViewGet(i, k) => {
                if let Some((v, m)) = views.get(i as usize % views.len().max(1)) {
                    let got = v.get(&key(k)).expect("view get").map(|b| b.to_vec());
                    assert_eq!(got.as_ref(), m.get(&key(k)), "step {step}: view get {k}");
                }
            }
            Op::ViewScan(i, lo, hi, fwd) => {
                if let Some((v, m)) = views.get(i as usize % views.len().max(1)) {
                    assert_eq!(scan_view(v, lo, hi, fwd), scan(m, lo, hi, fwd), "step {step}: view scan");
                }
            }
            Op::Flush => db.flush().expect("flush"),
            Op::CompactAll => db.compact_range::<std::ops::RangeFull, &[u8]>(..).expect("compact"),
            Op::Reopen => {
                views.clear();
                db.close().expect("close");
                db = Db::open(dir, opts.clone()).expect("reopen");
            }
        }
    }
    // Everything agrees at the end, also after waiting for compactions.
    db.wait_idle().expect("idle");
    assert_eq!(scan_db(&db, None, None, true), scan(&model, None, None, true), "final scan");
    for (v, m) in &views {
        assert_eq!(scan_view(v, None, None, true), scan(m, None, None, true), "final view scan");
    }
    drop(views);
    // With no view left, what a newer range tombstone covers whole may go.
    db.wait_idle().expect("idle");
    assert_eq!(scan_db(&db, None, None, true), scan(&model, None, None, true), "scan without views");
    db.close().expect("close");
    let db = Db::open(dir, opts).expect("final reopen");
    assert_eq!(scan_db(&db, None, None, false), scan(&model, None, None, false), "after reopen");
}

fn cases() -> u32 {
    if std::env::var_os("CAIRN_LONG").is_some() { 2000 } else { 128 }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn agrees_with_a_btreemap_inline(ops in prop::collection::vec(op(), 1..300), seed in any::<u8>()) {
        let dir = tempfile::tempdir().expect("tmp");
        run(ops, false, seed, dir.path());
    }

    #[test]
    fn agrees_with_a_btreemap_with_background_threads(ops in prop::collection::vec(op(), 1..200), seed in any::<u8>()) {
        let dir = tempfile::tempdir().expect("tmp");
        run(ops, true, seed, dir.path());
    }
}
