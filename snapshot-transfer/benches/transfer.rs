//! `cargo bench -p cairn-snapshot-transfer`: a 1 GiB checkpoint moved between
//! two local directories through the state machines in memory (`run_local`:
//! frames encoded and decoded, chunks fsynced, progress recorded, every file
//! verified), against `cp -r` followed by `sync` of the same files, in the
//! same run. Two sets:
//!
//! - random: 16 files of 64 MiB of random bytes (incompressible), sent twice:
//!   with the sender computing each file's checksum (a reading pass before
//!   the first byte goes out), and with the checksums its writer recorded
//!   (taken here while writing the files, as cairn-lsm does for its tables);
//! - lsm: a checkpoint of a real cairn-lsm engine filled with about 1 GiB of
//!   tables (16-byte keys in order, 100-byte values half random and half
//!   repeated, zstd blocks, 64 MiB tables), sent with the checksums
//!   cairn-lsm recorded when it wrote each table.
//!
//! Prints seconds, MB/s, bytes on the wire against raw and zstd sizes, and
//! the peak resident memory of the transferring process (the sets are made by
//! a child process, so the engine's memory is not counted). The page cache is
//! dropped before each copy (when the bench may write
//! `/proc/sys/vm/drop_caches`).
//!
//! `CAIRN_TRANSFER_BENCH_MIB` changes the size of each set (default 1024);
//! `CAIRN_TRANSFER_BENCH_WRITE_BEHIND=0` turns the receiver's write-behind off;
//! `CAIRN_TRANSFER_BENCH_SAVING_MIN=P` sets `Config::compress_saving_percent_min`;
//! `CAIRN_TRANSFER_BENCH_BACKGROUND_PERSIST=0` persists on the receiving
//! thread; `CAIRN_TRANSFER_BENCH_ROUNDS=N` repeats each pair N times, odd
//! rounds timing the transfer before `cp`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use cairn_snapshot_transfer::{Config, Source, SourceFile, Staging, StdFs, run_local};
use rand::{Rng, SeedableRng};

const TABLE_MIB: usize = 64;

fn peak_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Syncs, waits a second (the file system's discards of files removed
/// just before, on a disk mounted with `discard`, are otherwise still
/// running in the next timed section), and drops the page cache; whether
/// it could drop it.
fn drop_caches() -> bool {
    let synced = Command::new("sync").status().is_ok_and(|s| s.success());
    std::thread::sleep(std::time::Duration::from_secs(1));
    synced && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// The random set: files of random bytes, each with the xxh3 taken while
/// writing it.
fn random_set(dir: &Path, mib: usize) -> Vec<SourceFile> {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let mut buf = vec![0u8; TABLE_MIB << 20];
    let mut files = Vec::new();
    for t in 0..(mib / TABLE_MIB).max(1) {
        rng.fill(&mut buf[..]);
        let name = format!("{:06}.sst", t + 1);
        std::fs::write(dir.join(&name), &buf).expect("write file");
        files.push(SourceFile { path: dir.join(&name), name, xxh3: Some(xxhash_rust::xxh3::xxh3_64(&buf)) });
    }
    files
}

/// The lsm set: a cairn-lsm engine written until its tables hold `mib` MiB,
/// then checkpointed into `ckpt`. Returns the checkpoint's files (tables
/// with their recorded checksums, and its manifest).
fn lsm_set(db_dir: &Path, ckpt: &Path, mib: usize) -> Vec<SourceFile> {
    let mut o = cairn_lsm::Options::default();
    o.durability = cairn_lsm::DurabilityMode::Standalone(cairn_lsm::SyncPolicy::None);
    o.compression_per_level = vec![cairn_lsm::Compression::Zstd(1)];
    let db = cairn_lsm::Db::open(db_dir, o).expect("open lsm");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let target = (mib as u64) << 20;
    let mut n: u128 = 0;
    let table_bytes = |db: &cairn_lsm::Db| db.stats().levels.iter().map(|l| l.bytes).sum::<u64>();
    while table_bytes(&db) < target {
        for _ in 0..64 {
            let mut b = cairn_lsm::WriteBatch::new();
            for _ in 0..1000 {
                let mut v = [b'x'; 100];
                rng.fill(&mut v[..50]);
                b.put(n.to_be_bytes().to_vec(), v.to_vec());
                n += 1;
            }
            db.write(&b).expect("write");
        }
    }
    db.flush().expect("flush");
    db.wait_idle().expect("idle");
    let info = db.checkpoint(ckpt).expect("checkpoint");
    db.close().expect("close");
    let mut files: Vec<SourceFile> = info
        .tables
        .iter()
        .map(|t| SourceFile {
            name: t.path.file_name().and_then(|n| n.to_str()).expect("table name").to_string(),
            path: ckpt.join(&t.path),
            xxh3: t.xxh3,
        })
        .collect();
    assert!(files.iter().all(|f| f.xxh3.is_some()), "cairn-lsm records every table's checksum");
    let mdir = ckpt.join("manifest");
    for e in std::fs::read_dir(&mdir).expect("list manifest").filter_map(Result::ok) {
        let name = format!("manifest.{}", e.file_name().to_string_lossy());
        files.push(SourceFile { name, path: e.path(), xxh3: None });
    }
    println!("lsm set: {} keys, {} files", n, files.len());
    files
}

fn sizes(files: &[SourceFile], chunk: usize) -> (u64, u64) {
    let (mut raw, mut z) = (0u64, 0u64);
    for f in files {
        let data = std::fs::read(&f.path).expect("read");
        raw += data.len() as u64;
        for c in data.chunks(chunk) {
            z += zstd::bulk::compress(c, 1).expect("zstd").len().min(c.len()) as u64;
        }
    }
    (raw, z)
}

/// `cp -r` + `sync` of `dir`, page cache dropped first; seconds.
fn cp_sync(dir: &Path, dst: &Path) -> f64 {
    drop_caches();
    let t = Instant::now();
    assert!(Command::new("cp").arg("-r").arg(dir).arg(dst).status().expect("cp").success());
    assert!(Command::new("sync").status().expect("sync").success());
    let s = t.elapsed().as_secs_f64();
    std::fs::remove_dir_all(dst).expect("rm");
    s
}

struct Run {
    seconds: f64,
    manifest_seconds: f64,
    wire: u64,
    rss_mib: f64,
}

fn transfer(cfg: &Config, files: &[SourceFile], staging: PathBuf, write_behind: bool) -> Run {
    drop_caches();
    reset_peak_rss();
    let fs = Arc::new(StdFs);
    let t = Instant::now();
    let (mut source, manifest) = Source::open_known(&*fs, files, 1000, 3, 1).expect("source");
    let manifest_seconds = t.elapsed().as_secs_f64();
    let mut staging = Staging::new(fs.clone(), staging, vec![]);
    staging.set_write_behind(write_behind);
    staging.set_background_persist(std::env::var("CAIRN_TRANSFER_BENCH_BACKGROUND_PERSIST").map_or(true, |v| v != "0"));
    let (done, stats) = run_local(cfg, &mut source, manifest, &mut staging).expect("transfer");
    let seconds = t.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&done.dir).expect("rm");
    Run { seconds, manifest_seconds, wire: stats.wire_bytes_sent, rss_mib: peak_rss_kib() as f64 / 1024.0 }
}

const SETS_INDEX: &str = "sets.tsv";

/// The child's work: makes both sets under `scratch` and lists their files
/// in `SETS_INDEX` (set, name, path, xxh3 or `-`).
fn make_sets(scratch: &Path, mib: usize) {
    let mut index = String::new();
    let random = random_set(&scratch.join("src-random"), mib);
    let lsm = lsm_set(&scratch.join("lsm-db"), &scratch.join("src-lsm"), mib);
    for (set, files) in [("random", &random), ("lsm", &lsm)] {
        for f in files {
            let x = f.xxh3.map_or("-".to_string(), |x| x.to_string());
            index.push_str(&format!("{set}\t{}\t{}\t{x}\n", f.name, f.path.display()));
        }
    }
    std::fs::write(scratch.join(SETS_INDEX), index).expect("write the index");
    Command::new("sync").status().expect("sync");
}

fn read_sets(scratch: &Path, set: &str) -> Vec<SourceFile> {
    let index = std::fs::read_to_string(scratch.join(SETS_INDEX)).expect("read the index");
    index
        .lines()
        .filter_map(|l| {
            let v: Vec<&str> = l.split('\t').collect();
            (v.len() == 4 && v[0] == set).then(|| SourceFile {
                name: v[1].to_string(),
                path: PathBuf::from(v[2]),
                xxh3: v[3].parse().ok(),
            })
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list their tests
    }
    let mib: usize = std::env::var("CAIRN_TRANSFER_BENCH_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(1024);
    if let Some(i) = args.iter().position(|a| a == "--make-sets") {
        make_sets(Path::new(&args[i + 1]), mib);
        return;
    }
    let scratch = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch under target/");
    let mut cfg = Config::default();
    if let Some(p) = std::env::var("CAIRN_TRANSFER_BENCH_SAVING_MIN").ok().and_then(|s| s.parse().ok()) {
        cfg.compress_saving_percent_min = p;
    }
    let write_behind = std::env::var("CAIRN_TRANSFER_BENCH_WRITE_BEHIND").map_or(true, |v| v != "0");
    println!(
        "sets of {mib} MiB; page cache dropped before each copy: {}; write-behind: {write_behind}; compress when a sample saves {}%",
        drop_caches(),
        cfg.compress_saving_percent_min
    );
    let exe = std::env::current_exe().expect("this bench's path");
    assert!(Command::new(exe).arg("--make-sets").arg(scratch.path()).status().expect("make sets").success());
    let random_dir = scratch.path().join("src-random");
    let random = read_sets(scratch.path(), "random");
    let lsm_ckpt = scratch.path().join("src-lsm");
    let lsm = read_sets(scratch.path(), "lsm");
    println!(
        "| set | method | seconds | MB/s | % of cp + sync | wire bytes | raw bytes | zstd bytes (1 MiB chunks) | wire / min(raw, zstd) | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let unknown: Vec<SourceFile> = random.iter().map(|f| SourceFile { xxh3: None, ..f.clone() }).collect();
    let runs: [(&str, &Path, &[SourceFile], &str); 3] = [
        ("random", &random_dir, &unknown, "transfer, checksums computed"),
        ("random", &random_dir, &random, "transfer, checksums known"),
        ("lsm", &lsm_ckpt, &lsm, "transfer, checksums from cairn-lsm"),
    ];
    let rounds: usize = std::env::var("CAIRN_TRANSFER_BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let sized: Vec<(u64, u64)> = runs.iter().map(|(_, _, f, _)| sizes(f, cfg.chunk_bytes_max as usize)).collect();
    for round in 0..rounds {
        for ((label, dir, files, method), &(raw, z)) in runs.iter().zip(&sized) {
            // Odd rounds time the transfer first: the disk's state after
            // the previous section should favour neither.
            let staging = scratch.path().join(format!("staging-{label}"));
            let (cp, r) = if round % 2 == 0 {
                let cp = cp_sync(dir, &scratch.path().join("cp"));
                (cp, transfer(&cfg, files, staging, write_behind))
            } else {
                let r = transfer(&cfg, files, staging, write_behind);
                (cp_sync(dir, &scratch.path().join("cp")), r)
            };
            let mb = |s: f64| raw as f64 / s / 1e6;
            println!("| {label} | cp -r + sync | {cp:.2} | {:.0} | | | {raw} | | | |", mb(cp));
            println!(
                "| {label} | {method} (manifest {:.2} s) | {:.2} | {:.0} | {:.0}% | {} | {raw} | {z} | {:.4} | {:.0} |",
                r.manifest_seconds,
                r.seconds,
                mb(r.seconds),
                100.0 * cp / r.seconds,
                r.wire,
                r.wire as f64 / raw.min(z) as f64,
                r.rss_mib
            );
        }
    }
}
