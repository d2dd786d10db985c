//! 16 threads appending at once: every record is present, and each thread's
//! records keep its call order, whether the log assigns positions or the
//! callers assign them under their own lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cairn_wal::{Batch, Durability, StdFs, UserKind, Wal, WalOptions};

const THREADS: u64 = 16;
const PER_THREAD: u64 = 150;
const K: UserKind = UserKind::new(3);

fn opts() -> WalOptions {
    let mut o = WalOptions::default();
    o.segment_bytes_max = 64 << 10; // several cuts during the run
    o
}

fn payload(t: u64, i: u64) -> Vec<u8> {
    let mut v = format!("{t}:{i}:").into_bytes();
    v.resize(40 + (i as usize % 200), b'x');
    v
}

fn parse(p: &[u8]) -> (u64, u64) {
    let s = std::str::from_utf8(p).expect("utf8");
    let mut it = s.split(':');
    let t = it.next().and_then(|x| x.parse().ok()).expect("thread");
    let i = it.next().and_then(|x| x.parse().ok()).expect("index");
    (t, i)
}

/// Reopens the log and checks that every record is there once, in call order per thread.
fn verify(dir: &std::path::Path) {
    let (wal, _) = Wal::open(Arc::new(StdFs), dir, opts()).expect("reopen");
    let recs = wal.read_range(.., u64::MAX).expect("read");
    assert_eq!(recs.len() as u64, THREADS * PER_THREAD);
    let mut next: HashMap<u64, u64> = HashMap::new();
    let mut last_pos = None;
    for r in recs.iter() {
        assert!(last_pos < Some(r.position), "positions rise");
        last_pos = Some(r.position);
        let (t, i) = parse(r.payload);
        assert_eq!(r.payload, payload(t, i));
        let n = next.entry(t).or_insert(0);
        assert_eq!(*n, i, "thread {t}'s records keep its order");
        *n += 1;
    }
    assert!(next.values().all(|&n| n == PER_THREAD));
}

#[test]
fn positions_assigned_by_the_log() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("wal");
    let wal = Arc::new(Wal::create(Arc::new(StdFs), &dir, opts(), b"m").expect("create"));
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let wal = Arc::clone(&wal);
            s.spawn(move || {
                for i in 0..PER_THREAD {
                    wal.append_next(K, &payload(t, i)).expect("append");
                }
            });
        }
    });
    assert!(wal.segment_count() > 1);
    drop(wal);
    verify(&dir);
}

#[test]
fn positions_assigned_under_the_callers_lock() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("wal");
    let wal = Arc::new(Wal::create(Arc::new(StdFs), &dir, opts(), b"m").expect("create"));
    let next = Arc::new(Mutex::new(100u64));
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (wal, next) = (Arc::clone(&wal), Arc::clone(&next));
            s.spawn(move || {
                for i in 0..PER_THREAD {
                    let ticket = {
                        let mut n = next.lock().expect("lock");
                        let mut b = Batch::new();
                        b.append(K, *n, &payload(t, i));
                        *n += 2; // positions with gaps, like sequence numbers
                        wal.submit(&b, Durability::Sync).expect("submit")
                    };
                    wal.wait(ticket).expect("durable");
                }
            });
        }
    });
    drop(wal);
    verify(&dir);
}

#[test]
fn async_tasks_share_fsyncs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("wal");
    let wal = Arc::new(Wal::create(Arc::new(StdFs), &dir, opts(), b"m").expect("create"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().expect("runtime");
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..THREADS {
            let wal = Arc::clone(&wal);
            tasks.push(tokio::spawn(async move {
                for i in 0..PER_THREAD {
                    let mut b = Batch::new();
                    b.append_next(K, &payload(t, i));
                    wal.write_async(&b, Durability::Sync).expect("submit").await.expect("durable");
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    });
    drop(wal);
    verify(&dir);
}
