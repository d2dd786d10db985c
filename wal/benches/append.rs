//! `cargo bench -p cairn-wal`: the WAL against a raw baseline that writes the
//! same bytes to a file prepared the same way (zero-filled and synced) with one
//! fdatasync per batch, the ceiling on this disk. Records of 100 B, 1 KiB and
//! 16 KiB in batches of 1, 16, 64 and 256; then 64 writers group-committing one
//! 1 KiB record at a time; then the two segment preparations side by side.
//!
//! The WAL runs in its steady state: after each write the log is released up to
//! its last record (as Raft does after each LSM flush), so released segments are
//! recycled. Files live under `target/` (the project disk, never tmpfs).
#![allow(missing_docs)] // the criterion macros generate an undocumented function

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_wal::{Batch, Durability, Preparation, StdFs, UserKind, Wal, WalOptions};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const SEGMENT_BYTES: u64 = 64 << 20;
const K: UserKind = UserKind::new(0);

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch dir under target/")
}

/// The raw ceiling: one zero-filled, synced file; each batch is one write of the
/// batch's framed bytes (24-byte header + payload padded to 8, like the WAL's)
/// and one fdatasync.
struct Raw {
    file: File,
    offset: u64,
}

impl Raw {
    fn new(dir: &Path) -> Raw {
        let file = File::options().read(true).write(true).create_new(true).open(dir.join("raw")).expect("raw file");
        let zeros = vec![0u8; 1 << 20];
        for i in 0..SEGMENT_BYTES / (1 << 20) {
            file.write_all_at(&zeros, i << 20).expect("zero-fill");
        }
        file.sync_all().expect("sync");
        Raw { file, offset: 0 }
    }

    fn batch(&mut self, bytes: &[u8]) {
        if self.offset + bytes.len() as u64 > SEGMENT_BYTES {
            self.offset = 0;
        }
        self.file.write_all_at(bytes, self.offset).expect("write");
        self.file.sync_data().expect("fdatasync");
        self.offset += bytes.len() as u64;
    }
}

fn framed_bytes(record: usize, batch: usize) -> Vec<u8> {
    vec![0x5a; batch * (24 + record.div_ceil(8) * 8)]
}

fn wal(dir: &Path, preparation: Preparation, spares: usize) -> Wal {
    let mut o = WalOptions::default();
    o.segment_bytes_max = SEGMENT_BYTES;
    o.preparation = preparation;
    o.spare_segments_max = spares;
    let w = Wal::create(Arc::new(StdFs), dir.join("wal"), o, b"bench").expect("create");
    // Let the background thread finish preparing the next segment.
    std::thread::sleep(Duration::from_millis(500));
    w
}

/// One durable write, then the release a flush would allow.
fn write_and_release(w: &Wal, batch: &Batch) {
    let written = w.write(batch, Durability::Sync).expect("write");
    if let Some(p) = written.positions {
        w.release_to(*p.end()).expect("release");
    }
}

fn batch_of(record: usize, n: usize) -> Batch {
    let payload = vec![0xa5u8; record];
    let mut b = Batch::new();
    for _ in 0..n {
        b.append_next(K, &payload);
    }
    b
}

fn batches(c: &mut Criterion) {
    for record in [100usize, 1024, 16 << 10] {
        let mut g = c.benchmark_group(format!("append_{record}B"));
        g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
        for n in [1usize, 16, 64, 256] {
            g.throughput(Throughput::Elements(n as u64));
            let dir = scratch();
            let mut raw = Raw::new(dir.path());
            let bytes = framed_bytes(record, n);
            g.bench_function(BenchmarkId::new("raw", n), |b| b.iter(|| raw.batch(&bytes)));
            drop(raw);
            let w = wal(dir.path(), Preparation::ZeroFill, 2);
            let batch = batch_of(record, n);
            g.bench_function(BenchmarkId::new("wal", n), |b| b.iter(|| write_and_release(&w, &batch)));
        }
        g.finish();
    }
}

/// 64 threads each append one 1 KiB record at a time; one iteration is one record.
fn group_commit(c: &mut Criterion) {
    const WRITERS: u64 = 64;
    let mut g = c.benchmark_group("group_commit_1KiB");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements(1));
    let dir = scratch();
    let w = Arc::new(wal(dir.path(), Preparation::ZeroFill, 2));
    let payload = vec![0x3cu8; 1024];
    g.bench_function(BenchmarkId::new("wal_threads", WRITERS), |b| {
        b.iter_custom(|iters| {
            let per = iters.div_ceil(WRITERS);
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..WRITERS {
                    let (w, payload) = (Arc::clone(&w), &payload);
                    s.spawn(move || {
                        for _ in 0..per {
                            let p = w.append_next(K, payload).expect("append");
                            if p % 1024 == 0 {
                                w.release_to(p).expect("release");
                            }
                        }
                    });
                }
            });
            start.elapsed().mul_f64(iters as f64 / (per * WRITERS) as f64)
        })
    });
    g.finish();
}

/// 64 tokio tasks (on 2 worker threads) each append one 1 KiB record at a time
/// through `write_async`; one iteration is one record.
fn group_commit_async(c: &mut Criterion) {
    const WRITERS: u64 = 64;
    let mut g = c.benchmark_group("group_commit_1KiB");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements(1));
    let dir = scratch();
    let w = Arc::new(wal(dir.path(), Preparation::ZeroFill, 2));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().expect("runtime");
    let mut batch = Batch::new();
    batch.append_next(K, &[0x3c; 1024]);
    let batch = Arc::new(batch);
    g.bench_function(BenchmarkId::new("wal_async_tasks", WRITERS), |b| {
        b.iter_custom(|iters| {
            let per = iters.div_ceil(WRITERS);
            let start = Instant::now();
            rt.block_on(async {
                let tasks: Vec<_> = (0..WRITERS)
                    .map(|_| {
                        let (w, batch) = (Arc::clone(&w), Arc::clone(&batch));
                        tokio::spawn(async move {
                            for _ in 0..per {
                                let written =
                                    w.write_async(&batch, Durability::Sync).expect("submit").await.expect("write");
                                let p = *written.positions.expect("positions").end();
                                if p % 1024 == 0 {
                                    w.release_to(p).expect("release");
                                }
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.expect("task");
                }
            });
            start.elapsed().mul_f64(iters as f64 / (per * WRITERS) as f64)
        })
    });
    g.finish();
}

/// How new segments are made, where it matters most (16 KiB records, batches
/// of 64: a 64 MiB segment every 60 writes): recycled spares, against new files
/// zero-filled in the background, against new files that grow.
fn preparation(c: &mut Criterion) {
    let mut g = c.benchmark_group("preparation_16KiB_x64");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements(64));
    for (name, p, spares) in
        [("recycle", Preparation::ZeroFill, 2), ("zero_fill", Preparation::ZeroFill, 0), ("grow", Preparation::Grow, 0)]
    {
        let dir = scratch();
        let w = wal(dir.path(), p, spares);
        let batch = batch_of(16 << 10, 64);
        g.bench_function(name, |b| b.iter(|| write_and_release(&w, &batch)));
    }
    g.finish();
}

criterion_group!(benches, batches, group_commit, group_commit_async, preparation);
criterion_main!(benches);
