//! `Options::compaction_thread_nice`: the compaction threads lower their own
//! CPU priority, the flush thread keeps the process's. Its own test binary
//! (one process), so no other test's engine threads are seen.
#![cfg(target_os = "linux")]

use std::time::{Duration, Instant};

use cairn_lsm::{Db, Options};

/// The nice value of each thread of this process whose name starts with `prefix`.
fn nice_of(prefix: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("list threads") {
        let task = task.expect("thread entry").path();
        let Ok(comm) = std::fs::read_to_string(task.join("comm")) else { continue };
        if !comm.trim_end().starts_with(prefix) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(task.join("stat")) else { continue };
        // The fields after the parenthesised name start with the third, the
        // state; the nice value is the nineteenth.
        let (_, rest) = stat.rsplit_once(')').expect("stat has the name in parentheses");
        let nice = rest.split_whitespace().nth(19 - 3).expect("nice field").parse().expect("nice is a number");
        out.push(nice);
    }
    out
}

/// Waits until every thread named `prefix*` has the nice value `want` (the
/// threads set it as they start), and returns what was last seen.
fn wait_for(prefix: &str, want: i32) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = nice_of(prefix);
        if (!seen.is_empty() && seen.iter().all(|&n| n == want)) || Instant::now() > deadline {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn compaction_threads_take_the_nice_value_and_the_flush_thread_does_not() {
    let base = nice_of("").first().copied().expect("this thread");
    let dir = tempfile::tempdir().expect("tempdir");

    let mut opts = Options::default();
    opts.compaction_threads = 2;
    opts.compaction_thread_nice = 7;
    let db = Db::open(dir.path(), opts).expect("open");
    assert_eq!(wait_for("lsm-compact-", 7), vec![7, 7], "both compaction threads lower themselves");
    assert_eq!(nice_of("lsm-flush"), vec![base], "the flush thread keeps the process's priority");
    db.put(&b"k"[..], &b"v"[..]).expect("put");
    db.close().expect("close");
    assert!(nice_of("lsm-compact-").is_empty(), "close ends the threads");

    // Past 19 is clamped; 0 leaves the threads as they are.
    let mut opts = Options::default();
    opts.compaction_thread_nice = 200;
    let db = Db::open(dir.path(), opts).expect("reopen");
    assert_eq!(wait_for("lsm-compact-", 19), vec![19]);
    db.close().expect("close");
    let db = Db::open(dir.path(), Options::default()).expect("reopen");
    assert_eq!(wait_for("lsm-compact-", base), vec![base]);
    assert_eq!(db.get(&b"k"[..]).expect("get").as_deref(), Some(&b"v"[..]));
    db.close().expect("close");
}
