//! kill -9 of a real child process appending with sync at random moments:
//! every record the child reported durable is there after reopen.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cairn_wal::{StdFs, UserKind, Wal, WalOptions};
use rand::{Rng, SeedableRng};

const CHILD_ENV: &str = "CAIRN_WAL_KILL9_CHILD_DIR";
const K: UserKind = UserKind::new(1);
const WRITERS: u64 = 4;

fn opts() -> WalOptions {
    let mut o = WalOptions::default();
    o.segment_bytes_max = 256 << 10; // cuts happen while we kill
    o
}

fn payload(t: u64, i: u64) -> Vec<u8> {
    let mut v = format!("{t}/{i}/").into_bytes();
    v.resize(64 + (i as usize * 37) % 3000, b'k');
    v
}

/// The child: appends forever from several threads and prints `ACK t i position`
/// after each append returns (that is, once it is durable).
#[test]
fn kill9_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV).map(PathBuf::from) else { return };
    let (wal, _) = Wal::open_or_create(Arc::new(StdFs), &dir, opts(), b"kill9").expect("open");
    let start = wal.last_position().map_or(0, |p| p + 1);
    let wal = Arc::new(wal);
    std::thread::scope(|s| {
        for t in 0..WRITERS {
            let wal = Arc::clone(&wal);
            s.spawn(move || {
                for i in start.. {
                    let p = wal.append_next(K, &payload(t, i)).expect("append");
                    println!("ACK {t} {i} {p}");
                }
            });
        }
    });
}

fn run_child_and_kill(dir: &Path, after: Duration) -> Vec<(u64, u64, u64)> {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["kill9_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut acks = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let f: Vec<u64> =
                line.strip_prefix("ACK ").map_or(vec![], |l| l.split(' ').filter_map(|x| x.parse().ok()).collect());
            if f.len() == 3 {
                acks.push((f[0], f[1], f[2]));
            }
        }
        acks
    });
    std::thread::sleep(after);
    child.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
    child.wait().expect("reap");
    reader.join().expect("reader")
}

#[test]
fn acknowledged_records_survive_kill_9() {
    let seed: u64 = std::env::var("CAIRN_WAL_KILL9_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |d| d.as_nanos() as u64)
    });
    eprintln!("kill9 seed {seed} (replay with CAIRN_WAL_KILL9_SEED={seed})");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("wal");
    let mut total = 0;
    for round in 0..5 {
        let acks = run_child_and_kill(&dir, Duration::from_millis(rng.random_range(150..600)));
        let (wal, report) = Wal::open(Arc::new(StdFs), &dir, opts()).expect("recover after kill -9");
        for (t, i, p) in &acks {
            let got = wal.read_range(*p..=*p, u64::MAX).expect("read");
            let rec = got.get(0).unwrap_or_else(|| panic!("round {round}: acknowledged position {p} is missing"));
            assert_eq!(rec.position, *p);
            assert_eq!(rec.payload, payload(*t, *i), "round {round}: position {p} holds another record");
        }
        total += acks.len();
        eprintln!(
            "round {round}: {} acknowledged, all present; torn tail: {:?}",
            acks.len(),
            report.torn_tail.map(|t| t.bytes_dropped)
        );
    }
    assert!(total > 0, "the child never acknowledged anything");
}
