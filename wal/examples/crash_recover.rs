//! Writes to a log in `./cairn-data/wal-demo`, is killed with SIGKILL in the
//! middle of its appends, and recovers: every record it acknowledged is there.
//!
//! `cargo run --release -p cairn-wal --example crash_recover`
//!
//! The parent process starts a copy of itself as a writer (four threads, one
//! durable append at a time each, printing every acknowledged position), kills
//! it with SIGKILL after about a second, then opens the log, reports what
//! recovery found, and checks every acknowledged record.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_wal::{StdFs, UserKind, Wal, WalOptions};

const K: UserKind = UserKind::new(0);

fn payload(writer: u64, i: u64) -> Vec<u8> {
    let mut v = format!("writer {writer} record {i} ").into_bytes();
    v.resize(200, b'.');
    v
}

fn opts() -> WalOptions {
    let mut o = WalOptions::default();
    o.segment_bytes_max = 4 << 20; // small segments, so the demo cuts a few
    o
}

fn writer(dir: PathBuf) -> Result<(), Box<dyn std::error::Error>> {
    let (wal, _) = Wal::open_or_create(Arc::new(StdFs), &dir, opts(), b"cairn-wal demo")?;
    let wal = Arc::new(wal);
    std::thread::scope(|s| {
        for w in 0..4u64 {
            let wal = Arc::clone(&wal);
            s.spawn(move || {
                for i in 0.. {
                    match wal.append_next(K, &payload(w, i)) {
                        Ok(p) => println!("{w} {i} {p}"),
                        Err(e) => {
                            eprintln!("append failed: {e}");
                            return;
                        }
                    }
                }
            });
        }
    });
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from("cairn-data/wal-demo");
    if std::env::args().nth(1).as_deref() == Some("writer") {
        return writer(dir);
    }
    std::fs::create_dir_all("cairn-data")?;
    println!("log directory: {}", dir.display());
    let mut child = Command::new(std::env::current_exe()?).arg("writer").stdout(Stdio::piped()).spawn()?;
    let out = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let reader = std::thread::spawn(move || {
        out.lines()
            .map_while(Result::ok)
            .filter_map(|l| {
                let f: Vec<u64> = l.split(' ').filter_map(|x| x.parse().ok()).collect();
                (f.len() == 3).then(|| (f[0], f[1], f[2]))
            })
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(1000));
    child.kill()?; // SIGKILL: no destructor, no flush, no goodbye
    child.wait()?;
    let acked = reader.join().map_err(|_| "reader thread panicked")?;
    println!("writer killed with SIGKILL after acknowledging {} durable appends", acked.len());

    let t = Instant::now();
    let (wal, report) = Wal::open(Arc::new(StdFs), &dir, opts())?;
    println!(
        "recovered in {:.1} ms: {} segments, {} records read, torn tail: {}",
        t.elapsed().as_secs_f64() * 1e3,
        report.segments_read,
        report.records_read,
        match &report.torn_tail {
            Some(tt) => format!("{} bytes dropped at byte {} of {}", tt.bytes_dropped, tt.offset, tt.path.display()),
            None => "none".into(),
        }
    );
    let mut missing = 0;
    for (w, i, p) in &acked {
        let got = wal.read_range(*p..=*p, u64::MAX)?;
        if got.get(0).map(|r| r.payload.to_vec()) != Some(payload(*w, *i)) {
            missing += 1;
        }
    }
    println!(
        "log holds positions {:?}..={:?}; acknowledged records missing or different: {missing}",
        wal.first_position(),
        wal.last_position()
    );
    if missing > 0 {
        return Err(format!("{missing} acknowledged records were lost").into());
    }
    println!("ok: every acknowledged record survived kill -9 (run again to append more)");
    Ok(())
}
