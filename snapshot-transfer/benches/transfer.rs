//! `cargo bench -p cairn-snapshot-transfer`: a 1 GiB checkpoint (16 tables of
//! 64 MiB) moved between two local directories through the state machines in
//! memory (`run_local`: frames encoded and decoded, chunks fsynced, progress
//! recorded, every file read back and verified), against `cp -r` followed by
//! `sync` of the same files, in the same run. Two sets: random bytes
//! (incompressible) and table-like bytes (half of each 100-byte value random,
//! half repeated, as in the LSM benchmarks). Prints MB/s, bytes on the wire
//! against raw and zstd sizes, and the peak resident memory of the transfer.
//!
//! `CAIRN_TRANSFER_BENCH_MIB` changes the total size (default 1024).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use cairn_snapshot_transfer::{Config, Source, Staging, StdFs, run_local};
use rand::{Rng, SeedableRng};

const TABLE_MIB: usize = 64;

fn peak_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn drop_caches() -> bool {
    Command::new("sync").status().is_ok_and(|s| s.success()) && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn write_set(dir: &Path, tables: usize, compressible: bool) -> Vec<String> {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let mut names = Vec::new();
    let mut buf = vec![0u8; TABLE_MIB << 20];
    for t in 0..tables {
        if compressible {
            for v in buf.chunks_mut(100) {
                let half = v.len() / 2;
                rng.fill(&mut v[..half]);
                v[half..].fill(b'x');
            }
        } else {
            rng.fill(&mut buf[..]);
        }
        let name = format!("{:06}.sst", t + 1);
        std::fs::write(dir.join(&name), &buf).expect("write table");
        names.push(name);
    }
    Command::new("sync").status().expect("sync");
    names
}

fn zstd_size(dir: &Path, names: &[String], chunk: usize) -> u64 {
    let mut total = 0u64;
    for n in names {
        let data = std::fs::read(dir.join(n)).expect("read");
        for c in data.chunks(chunk) {
            total += zstd::bulk::compress(c, 1).expect("zstd").len().min(c.len()) as u64;
        }
    }
    total
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list their tests
    }
    let mib: usize = std::env::var("CAIRN_TRANSFER_BENCH_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(1024);
    let tables = (mib / TABLE_MIB).max(1);
    let raw = (tables * TABLE_MIB) as f64 * 1048576.0;
    let scratch = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch under target/");
    let cfg = Config::default();
    // CAIRN_TRANSFER_BENCH_WRITE_BEHIND=0 turns the receiver's write-behind off (for an A/B).
    let write_behind = std::env::var("CAIRN_TRANSFER_BENCH_WRITE_BEHIND").map_or(true, |v| v != "0");
    let cold = drop_caches();
    println!(
        "{} tables of {TABLE_MIB} MiB; page cache dropped before each copy: {cold}; write-behind: {write_behind}",
        tables
    );
    println!(
        "| set | method | seconds | MB/s | wire bytes | raw bytes | zstd bytes (1 MiB chunks) | wire / min(raw, zstd) | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (label, compressible) in [("random", false), ("table-like", true)] {
        let src = scratch.path().join(format!("src-{label}"));
        let names = write_set(&src, tables, compressible);
        let zsize = zstd_size(&src, &names, cfg.chunk_bytes_max as usize);

        // cp + sync
        drop_caches();
        let dst = scratch.path().join(format!("cp-{label}"));
        let t = Instant::now();
        assert!(Command::new("cp").arg("-r").arg(&src).arg(&dst).status().expect("cp").success());
        assert!(Command::new("sync").status().expect("sync").success());
        let cp_s = t.elapsed().as_secs_f64();
        println!("| {label} | cp -r + sync | {cp_s:.2} | {:.0} | | {raw:.0} | | | |", raw / cp_s / 1e6);
        std::fs::remove_dir_all(&dst).expect("rm");

        // transfer
        drop_caches();
        reset_peak_rss();
        let fs = Arc::new(StdFs);
        let t = Instant::now();
        let (mut source, manifest) = Source::open(&*fs, &src, &names, 1000, 3, 1).expect("source");
        let manifest_s = t.elapsed().as_secs_f64();
        let mut staging = Staging::new(fs.clone(), scratch.path().join(format!("staging-{label}")), vec![]);
        staging.set_write_behind(write_behind);
        let (done, stats) = run_local(&cfg, &mut source, manifest, &mut staging).expect("transfer");
        let total_s = t.elapsed().as_secs_f64();
        let rss = peak_rss_kib() as f64 / 1024.0;
        let wire = stats.wire_bytes_sent as f64;
        println!(
            "| {label} | transfer (manifest checksums {manifest_s:.2} s included) | {total_s:.2} | {:.0} | {wire:.0} | {raw:.0} | {zsize} | {:.4} | {rss:.0} |",
            raw / total_s / 1e6,
            wire / raw.min(zsize as f64)
        );
        println!("| {label} | transfer / (cp + sync) throughput | | {:.0}% | | | | | |", 100.0 * cp_s / total_s);
        std::fs::remove_dir_all(&done.dir).expect("rm");
        std::fs::remove_dir_all(&src).expect("rm");
    }
}
