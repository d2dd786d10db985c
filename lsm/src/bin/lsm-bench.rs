//! `lsm-bench`: db_bench-style workloads on cairn-lsm, the same ones (keys,
//! values, order, sizes) as `../shared/tools/lsm-bench` runs on fjall and
//! RocksDB, so the two can run one after the other and be compared.
//!
//! ```text
//! cargo run --release -p cairn-lsm --bin lsm-bench -- --num 1000000
//! ```
//!
//! Keys are 16 ASCII digits (`{i:016}`); values 100 bytes whose first half is
//! pseudo-random and second half a copy of it. Single-threaded single puts,
//! standalone mode with `SyncPolicy::None`, a 64 MiB block cache and a 64 MiB
//! write buffer by default.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cairn_lsm::{CompactionPriority, Compression, Db, DurabilityMode, Options, SyncPolicy};

struct Args {
    num: u64,
    reads: u64,
    value_size: usize,
    cache_mb: u64,
    write_buffer_mb: usize,
    wal_segment_mb: u64,
    wal_buffer_kb: usize,
    l1_mb: Option<u64>,
    table_mb: Option<u64>,
    readahead_kb: Option<usize>,
    priority: Option<CompactionPriority>,
    zstd_from_level: Option<usize>,
    blob_min: Option<usize>,
    dir: PathBuf,
    seed: u64,
    json: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: lsm-bench [--num N] [--reads N] [--value-size B] [--cache-mb M] [--write-buffer-mb M]\n\
         \x20                [--wal-segment-mb M] [--wal-buffer-kb K] [--zstd-from-level L] [--l1-mb M]\n\
         \x20                [--table-mb M] [--compaction-readahead-kb K] [--dir DIR]\n\
         \x20                [--compaction-pri min-overlap|oldest] [--blob-min B] [--seed S] [--json]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        num: 1_000_000,
        reads: 0,
        value_size: 100,
        cache_mb: 64,
        write_buffer_mb: 64,
        wal_segment_mb: 4,
        wal_buffer_kb: 8,
        l1_mb: None,
        table_mb: None,
        readahead_kb: None,
        priority: None,
        zstd_from_level: None,
        blob_min: None,
        dir: std::env::temp_dir().join("cairn-lsm-bench"),
        seed: 42,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--num" => a.num = val().parse().unwrap_or_else(|_| usage()),
            "--reads" => a.reads = val().parse().unwrap_or_else(|_| usage()),
            "--value-size" => a.value_size = val().parse().unwrap_or_else(|_| usage()),
            "--cache-mb" => a.cache_mb = val().parse().unwrap_or_else(|_| usage()),
            "--write-buffer-mb" => a.write_buffer_mb = val().parse().unwrap_or_else(|_| usage()),
            "--wal-segment-mb" => a.wal_segment_mb = val().parse().unwrap_or_else(|_| usage()),
            "--wal-buffer-kb" => a.wal_buffer_kb = val().parse().unwrap_or_else(|_| usage()),
            "--l1-mb" => a.l1_mb = Some(val().parse().unwrap_or_else(|_| usage())),
            "--table-mb" => a.table_mb = Some(val().parse().unwrap_or_else(|_| usage())),
            "--compaction-readahead-kb" => a.readahead_kb = Some(val().parse().unwrap_or_else(|_| usage())),
            "--compaction-pri" => {
                a.priority = Some(match val().as_str() {
                    "min-overlap" => CompactionPriority::MinOverlappingRatio,
                    "oldest" => CompactionPriority::OldestData,
                    _ => usage(),
                })
            }
            "--blob-min" => a.blob_min = Some(val().parse().unwrap_or_else(|_| usage())),
            "--zstd-from-level" => a.zstd_from_level = Some(val().parse().unwrap_or_else(|_| usage())),
            "--dir" => a.dir = PathBuf::from(val()),
            "--seed" => a.seed = val().parse().unwrap_or_else(|_| usage()),
            "--json" => a.json = true,
            _ => usage(),
        }
    }
    if a.reads == 0 {
        a.reads = a.num;
    }
    a
}

/// xorshift64* (the same generator as the reference harness).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn key_of(i: u64, buf: &mut Vec<u8>) {
    buf.clear();
    let _ = write!(buf, "{i:016}");
}

fn value_of(i: u64, size: usize, buf: &mut Vec<u8>) {
    buf.clear();
    let mut r = Rng(i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let half = size.div_ceil(2);
    while buf.len() < half {
        buf.extend_from_slice(&r.next().to_le_bytes());
    }
    buf.truncate(half);
    let mut j = 0;
    while buf.len() < size {
        let b = buf[j];
        buf.push(b);
        j += 1;
    }
}

fn proc_status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// (apparent bytes, allocated bytes) of every file under `p`.
fn dir_size(p: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut out = (0, 0);
    let Ok(rd) = std::fs::read_dir(p) else { return out };
    for e in rd.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if m.is_dir() {
            let (a, b) = dir_size(&e.path());
            out.0 += a;
            out.1 += b;
        } else {
            out.0 += m.len();
            out.1 += m.blocks() * 512;
        }
    }
    out
}

fn options(a: &Args) -> Options {
    let mut o = Options::default();
    o.durability = DurabilityMode::Standalone(SyncPolicy::None);
    o.block_cache_bytes = a.cache_mb << 20;
    o.write_buffer_bytes = a.write_buffer_mb << 20;
    o.wal_segment_bytes = a.wal_segment_mb << 20;
    o.wal_buffer_bytes = a.wal_buffer_kb << 10;
    if let Some(m) = a.l1_mb {
        o.l1_bytes_target = m << 20;
    }
    if let Some(m) = a.table_mb {
        o.table_bytes_target = m << 20;
    }
    if let Some(k) = a.readahead_kb {
        o.compaction_readahead_bytes = k << 10;
    }
    if let Some(p) = a.priority {
        o.compaction_priority = p;
    }
    o.blob_value_bytes_min = a.blob_min;
    if let Some(z) = a.zstd_from_level {
        o.compression_per_level =
            (0..=z).map(|l| if l < z { Compression::None } else { Compression::Zstd(1) }).collect();
    }
    o
}

/// With `--blob-min`: the blob files' size and the garbage in them.
fn blob_rows(st: &cairn_lsm::Stats, a: &Args, row: &mut impl FnMut(&str, f64, &str)) {
    if a.blob_min.is_some() {
        row("blob files", mib(st.blob_bytes), "MiB");
        row("blob garbage", mib(st.blob_bytes.saturating_sub(st.blob_live_bytes)), "MiB");
        row("blob moved by compactions", mib(st.blob_gc_bytes), "MiB");
    }
}

fn fill(db: &Db, order: &[u64], a: &Args) -> f64 {
    let (mut k, mut v) = (Vec::with_capacity(16), Vec::with_capacity(a.value_size));
    let t = Instant::now();
    for &i in order {
        key_of(i, &mut k);
        value_of(i, a.value_size, &mut v);
        db.put(k.clone(), v.clone()).unwrap_or_else(|e| fail("put", e));
    }
    order.len() as f64 / t.elapsed().as_secs_f64()
}

fn fail(what: &str, e: cairn_lsm::Error) -> ! {
    eprintln!("lsm-bench: {what}: {e}");
    std::process::exit(1)
}

fn settle(db: &Db) -> f64 {
    let t = Instant::now();
    db.flush().unwrap_or_else(|e| fail("flush", e));
    db.wait_idle().unwrap_or_else(|e| fail("wait_idle", e));
    t.elapsed().as_secs_f64()
}

fn mib(b: u64) -> f64 {
    b as f64 / 1_048_576.0
}

fn main() {
    let a = parse_args();
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_start = proc_status_kb("VmRSS:");
    std::fs::create_dir_all(&a.dir).unwrap_or_else(|e| {
        eprintln!("lsm-bench: create {}: {e}", a.dir.display());
        std::process::exit(1)
    });
    let seq: Vec<u64> = (0..a.num).collect();
    let mut rnd = seq.clone();
    let mut r = Rng(a.seed);
    for i in (1..rnd.len()).rev() {
        let j = r.below(i as u64 + 1) as usize;
        rnd.swap(i, j);
    }
    eprintln!(
        "num={} reads={} key=16B value={}B cache={}MiB write_buffer={}MiB wal_buffer={}KiB compression={:?} dir={}",
        a.num,
        a.reads,
        a.value_size,
        a.cache_mb,
        a.write_buffer_mb,
        a.wal_buffer_kb,
        options(&a).compression_per_level,
        a.dir.display()
    );
    let mut rows: Vec<(String, f64, String)> = Vec::new();
    let mut row = |name: &str, v: f64, unit: &str| {
        eprintln!(
            "  {name:<24} {v:>14.2} {unit:<10} (RSS {} MiB, peak {} MiB)",
            proc_status_kb("VmRSS:") / 1024,
            proc_status_kb("VmHWM:") / 1024
        );
        rows.push((name.to_string(), v, unit.to_string()));
    };

    let p = a.dir.join("cairn-seq");
    let _ = std::fs::remove_dir_all(&p);
    {
        let db = Db::open(&p, options(&a)).unwrap_or_else(|e| fail("open", e));
        row("fillseq", fill(&db, &seq, &a), "ops/s");
        row("fillseq flush+idle", settle(&db), "s");
        db.close().unwrap_or_else(|e| fail("close", e));
    }
    let _ = std::fs::remove_dir_all(&p);

    let p = a.dir.join("cairn-rnd");
    let _ = std::fs::remove_dir_all(&p);
    let db = Db::open(&p, options(&a)).unwrap_or_else(|e| fail("open", e));
    row("fillrandom", fill(&db, &rnd, &a), "ops/s");
    row("fillrandom flush+idle", settle(&db), "s");
    let (ap, al) = dir_size(&p);
    row("size apparent", mib(ap), "MiB");
    row("size allocated", mib(al), "MiB");
    for sub in ["tables", "manifest", "wal"] {
        row(&format!("  allocated {sub}"), mib(dir_size(&p.join(sub)).1), "MiB");
    }
    let st = db.stats();
    row("write amplification", st.write_amplification, "x");
    blob_rows(&st, &a, &mut row);

    let mut r = Rng(a.seed ^ 0xABCD_EF01);
    let mut k = Vec::with_capacity(16);
    let t = Instant::now();
    let mut found = 0u64;
    for _ in 0..a.reads {
        key_of(r.below(a.num), &mut k);
        if db.get(&k).unwrap_or_else(|e| fail("get", e)).is_some() {
            found += 1;
        }
    }
    row("readrandom", a.reads as f64 / t.elapsed().as_secs_f64(), "ops/s");
    if found != a.reads {
        eprintln!("lsm-bench: readrandom found {found} of {} keys", a.reads);
        std::process::exit(1);
    }

    let t = Instant::now();
    let mut n = 0u64;
    for kv in db.range::<std::ops::RangeFull, &[u8]>(..) {
        kv.unwrap_or_else(|e| fail("scan", e));
        n += 1;
    }
    row("scan", n as f64 / t.elapsed().as_secs_f64(), "entries/s");
    if n != a.num {
        eprintln!("lsm-bench: scan saw {n} of {} keys", a.num);
        std::process::exit(1);
    }

    let t = Instant::now();
    let mut hits = 0u64;
    for _ in 0..a.reads {
        // Keys between the stored ones: 17 bytes, never written.
        key_of(r.below(a.num), &mut k);
        k.push(b'x');
        if db.get(&k).unwrap_or_else(|e| fail("get", e)).is_some() {
            hits += 1;
        }
    }
    row("readmissing", a.reads as f64 / t.elapsed().as_secs_f64(), "ops/s");
    assert_eq!(hits, 0, "a missing key was found");

    let seeks = (a.reads / 10).max(1);
    let t = Instant::now();
    for _ in 0..seeks {
        key_of(r.below(a.num), &mut k);
        let c = db.range(k.clone()..).take(100).count();
        std::hint::black_box(c);
    }
    row("seekrandom+scan100", seeks as f64 / t.elapsed().as_secs_f64(), "ops/s");

    let t = Instant::now();
    let mut v = Vec::new();
    for _ in 0..a.num {
        let i = r.below(a.num);
        key_of(i, &mut k);
        value_of(i ^ 1, a.value_size, &mut v);
        db.put(k.clone(), v.clone()).unwrap_or_else(|e| fail("put", e));
    }
    row("overwrite", a.num as f64 / t.elapsed().as_secs_f64(), "ops/s");
    row("overwrite flush+idle", settle(&db), "s");
    row("size after overwrite", mib(dir_size(&p).1), "MiB");
    let st = db.stats();
    row("write amplification", st.write_amplification, "x");
    blob_rows(&st, &a, &mut row);
    row("cache hit ratio", st.cache_hit_ratio, "");
    row("stall time", st.stall_time.as_secs_f64(), "s");
    db.close().unwrap_or_else(|e| fail("close", e));
    let _ = std::fs::remove_dir_all(&p);
    row("peak RSS", proc_status_kb("VmHWM:") as f64 / 1024.0, "MiB");
    row("RSS at start", rss_start as f64 / 1024.0, "MiB");
    if a.json {
        let items: Vec<String> = rows
            .iter()
            .map(|(n, v, u)| format!("{{\"name\":\"{}\",\"value\":{v},\"unit\":\"{u}\"}}", n.trim()))
            .collect();
        println!("[{}]", items.join(","));
    }
}
