//! Readers and scans during flushes and compactions see consistent views:
//! writers move money between accounts in atomic batches (the total never
//! changes) while readers check the total through read views and scans.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use cairn_lsm::{Db, DurabilityMode, Options, SyncPolicy, WriteBatch};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const ACCOUNTS: u64 = 200;
const START: u64 = 1000;

fn account(i: u64) -> Vec<u8> {
    format!("acct/{i:04}").into_bytes()
}

fn total_of(it: cairn_lsm::Iter) -> (u64, u64) {
    let mut sum = 0;
    let mut n = 0;
    for kv in it {
        let (_, v) = kv.expect("scan");
        sum += std::str::from_utf8(&v).expect("utf8").parse::<u64>().expect("number");
        n += 1;
    }
    (sum, n)
}

#[test]
fn views_and_scans_stay_consistent_during_background_work() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut o = Options::default();
    o.durability = DurabilityMode::Standalone(SyncPolicy::None);
    o.write_buffer_bytes = 16 << 10;
    o.table_bytes_target = 16 << 10;
    o.l0_compaction_trigger = 2;
    o.l1_bytes_target = 64 << 10;
    o.level_size_multiplier = 4;
    o.block_bytes = 512;
    let db = Db::open(dir.path(), o).expect("open");
    let mut b = WriteBatch::new();
    for i in 0..ACCOUNTS {
        b.put(account(i), START.to_string());
    }
    db.write(&b).expect("seed");
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (db, stop) = (db.clone(), Arc::clone(&stop));
            thread::spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(w);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) && n < 6000 {
                    // Read-modify-write under a view: a transfer between two accounts.
                    let (a, c) = (rng.random_range(0..ACCOUNTS), rng.random_range(0..ACCOUNTS));
                    if a == c {
                        continue;
                    }
                    let _g = TRANSFER.lock().expect("lock");
                    let get = |k| -> u64 {
                        std::str::from_utf8(&db.get(&account(k)).expect("get").expect("present"))
                            .expect("utf8")
                            .parse()
                            .expect("number")
                    };
                    let (va, vc) = (get(a), get(c));
                    let amount = rng.random_range(0..=va.min(50));
                    let mut b = WriteBatch::new();
                    b.put(account(a), (va - amount).to_string()).put(account(c), (vc + amount).to_string());
                    // Padding keys so memtables fill and flushes and compactions run.
                    b.put(format!("pad/{w}/{n:08}"), vec![b'p'; 200]);
                    db.write(&b).expect("write");
                    n += 1;
                }
            })
        })
        .collect();
    let mut checks = 0;
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    while checks < 300 {
        let view = db.read_view();
        let (sum, n) = total_of(view.prefix(b"acct/"));
        assert_eq!((sum, n), (ACCOUNTS * START, ACCOUNTS), "scan of a view");
        let (sum, _) = total_of(view.prefix_rev(b"acct/"));
        assert_eq!(sum, ACCOUNTS * START, "backward scan of a view");
        // Point reads through the same view agree with its scan.
        let i = rng.random_range(0..ACCOUNTS);
        let a = view.get(&account(i)).expect("get").expect("present");
        let from_scan = view.range(account(i)..).next().expect("one").expect("ok").1;
        assert_eq!(a, from_scan);
        let (sum, _) = total_of(db.prefix(b"acct/"));
        assert_eq!(sum, ACCOUNTS * START, "scan of the latest state");
        checks += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().expect("writer");
    }
    db.wait_idle().expect("idle");
    let st = db.stats();
    assert!(st.flushes > 0 && st.compactions + st.trivial_moves > 0, "background work ran: {st:?}");
    let (sum, _) = total_of(db.prefix(b"acct/"));
    assert_eq!(sum, ACCOUNTS * START);
}

static TRANSFER: std::sync::Mutex<()> = std::sync::Mutex::new(());
