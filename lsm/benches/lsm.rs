//! Criterion benchmarks of cairn-lsm's hot paths (see also `src/bin/lsm-bench.rs`).
#![allow(missing_docs)] // the criterion macros generate an undocumented function

use std::hint::black_box;

use cairn_lsm::{Db, DurabilityMode, Options, SyncPolicy};
use criterion::{Criterion, criterion_group, criterion_main};

fn options() -> Options {
    let mut o = Options::default();
    o.durability = DurabilityMode::Standalone(SyncPolicy::None);
    o
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tmp");
    let db = Db::open(dir.path(), options()).expect("open");
    let value = vec![7u8; 100];
    let mut i = 0u64;
    c.bench_function("put_16B_100B_memtable", |b| {
        b.iter(|| {
            i += 1;
            db.put(format!("{:016}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % 1_000_000_000), value.clone())
                .expect("put");
        })
    });
    // Point reads of keys the memtable lacks (the apply path of a store that
    // reads each key before it writes it), with and without the memtable's
    // key filter, and of keys it holds.
    for bits in [8, 0] {
        let dir = tempfile::tempdir().expect("tmp");
        let mut o = options();
        o.memtable_bloom_bits_per_entry = bits;
        let mdb = Db::open(dir.path(), o).expect("open");
        for k in 0..100_000u64 {
            mdb.put(format!("m{k:015}"), value.clone()).expect("put");
        }
        let mut j = 0u64;
        c.bench_function(&format!("get_miss_memtable_filter_{bits}"), |b| {
            b.iter(|| {
                j = (j + 7919) % 100_000;
                black_box(mdb.get(format!("m{j:015}x").as_bytes()).expect("get"));
            })
        });
        c.bench_function(&format!("get_hit_memtable_filter_{bits}"), |b| {
            b.iter(|| {
                j = (j + 7919) % 100_000;
                black_box(mdb.get(format!("m{j:015}").as_bytes()).expect("get"));
            })
        });
    }
    for k in 0..100_000u64 {
        db.put(format!("k{k:015}"), value.clone()).expect("put");
    }
    db.flush().expect("flush");
    db.wait_idle().expect("idle");
    let mut j = 0u64;
    c.bench_function("get_hit_table", |b| {
        b.iter(|| {
            j = (j + 7919) % 100_000;
            black_box(db.get(format!("k{j:015}").as_bytes()).expect("get"));
        })
    });
    c.bench_function("scan_100", |b| {
        b.iter(|| {
            j = (j + 7919) % 100_000;
            let n = db.range(format!("k{j:015}").into_bytes()..).take(100).count();
            black_box(n);
        })
    });
    // The same reads of 1 KiB values, kept in the tables or in blob files
    // (`Options::blob_value_bytes_min`): what the second file access costs.
    for blob in [false, true] {
        let dir = tempfile::tempdir().expect("tmp");
        let mut o = options();
        o.blob_value_bytes_min = blob.then_some(512);
        let bdb = Db::open(dir.path(), o).expect("open");
        let big: Vec<u8> = (0..1024u32).map(|x| x.wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect();
        for k in 0..100_000u64 {
            bdb.put(format!("b{k:015}"), big.clone()).expect("put");
        }
        bdb.flush().expect("flush");
        bdb.wait_idle().expect("idle");
        let name = if blob { "blob" } else { "inline" };
        c.bench_function(&format!("get_hit_table_1KiB_{name}"), |b| {
            b.iter(|| {
                j = (j + 7919) % 100_000;
                black_box(bdb.get(format!("b{j:015}").as_bytes()).expect("get"));
            })
        });
        c.bench_function(&format!("scan_100_1KiB_{name}"), |b| {
            b.iter(|| {
                j = (j + 7919) % 100_000;
                black_box(bdb.range(format!("b{j:015}").into_bytes()..).take(100).count());
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
