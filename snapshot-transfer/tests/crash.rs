//! Crashes of the receiver (on the simulated disk) and restarts of the sender
//! at random points: the transfer resumes without resending durably
//! acknowledged data, and never completes with data lost in a crash. Half
//! the seeds persist on a thread of their own (`Staging::set_background_persist`).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use cairn_snapshot_transfer::{Config, Fs, Receiver, Sender, SenderEvent, Source, Staging};
use cairn_wal::sim::SimDisk;
use common::{WalFs, identical, make_checkpoint, names, root};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn config() -> Config {
    let mut c = Config::default();
    c.chunk_bytes_max = 4096;
    c.window_chunks_max = 8;
    c.window_bytes_max = 32 << 10;
    c.sync_bytes = 8 << 10;
    c
}

/// One run; `Err` describes a violation. `skip_data_sync` is the teeth switch.
fn run(seed: u64, skip_data_sync: bool, background: bool) -> Result<(), String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let src_fs: Arc<dyn Fs> = Arc::new(WalFs(SimDisk::new(seed).fs()));
    let disk = SimDisk::new(seed ^ 0x5eed);
    let count = rng.random_range(1..6);
    let files = make_checkpoint(&*src_fs, Path::new("/ckpt"), &mut rng, count, 60_000);
    let total: u64 = files.iter().map(|f| f.1.len() as u64).sum();
    let cfg = config();
    let now = Instant::now();
    let mut id = 1;
    let (mut source, manifest) =
        Source::open(&*src_fs, Path::new("/ckpt"), &names(&files), 50, 2, id).map_err(|e| e.to_string())?;
    let mut tx = Sender::new(cfg.clone(), manifest.clone(), now);
    let new_receiver = |disk: &SimDisk| {
        let fs: Arc<dyn Fs> = Arc::new(WalFs(disk.fs()));
        let mut s = Staging::new(fs, root(), vec![]);
        s.skip_data_sync_for_tests(skip_data_sync);
        s.set_background_persist(background);
        (s, Receiver::new(cfg.clone()))
    };
    let (mut staging, mut rx) = new_receiver(&disk);
    // The bound on what may still be sent: every byte not durably acknowledged.
    let mut budget = total;
    let mut sent_at_mark = 0;
    let mut crashes = 0;
    disk.crash_after_ops(rng.random_range(0..300));
    for _ in 0..100_000 {
        while let Some(req) = tx.poll_read(now) {
            let data = source.read(&req).map_err(|e| e.to_string())?;
            tx.handle_read(req, data);
        }
        let frames: Vec<_> = std::iter::from_fn(|| tx.poll_frame()).collect();
        frames.into_iter().for_each(|f| rx.handle_frame(f));
        let mut back = Vec::new();
        let crashed = staging.drive(&mut rx, &mut |f| back.push(f)).is_err();
        if crashed || (crashes < 3 && rng.random_range(0..200) == 0) {
            // The receiver's machine goes down (or, without a disk fault, the
            // sender restarts): the link is lost either way.
            let acked = tx.acked_bytes();
            if crashed {
                disk.crash();
                (staging, rx) = new_receiver(&disk);
                crashes += 1;
                if crashes < 3 {
                    disk.crash_after_ops(rng.random_range(0..400));
                }
                tx.reconnect(now);
            } else {
                id += 1;
                let mut m = manifest.clone();
                m.transfer_id = id;
                tx = Sender::new(cfg.clone(), m, now);
            }
            // From here on, only what was not durably acknowledged may be sent again.
            budget = total - acked;
            sent_at_mark = tx.stats().raw_bytes_sent;
            continue;
        }
        back.into_iter().for_each(|f| tx.handle_frame(f, now));
        let sent = tx.stats().raw_bytes_sent - sent_at_mark;
        if sent > budget {
            return Err(format!(
                "sent {sent} bytes since the last restart; only {budget} were not durably acknowledged"
            ));
        }
        match tx.poll_event() {
            Some(SenderEvent::Completed) => {
                let done = staging.take_completed().ok_or("the sender completed, the receiver did not")?;
                identical(&WalFs(disk.fs()), &done.dir, &files)?;
                // And after one more crash, the completed checkpoint is still whole.
                disk.crash();
                return identical(&WalFs(disk.fs()), &done.dir, &files).map_err(|e| format!("after a crash: {e}"));
            }
            Some(SenderEvent::Failed(why)) => return Err(format!("failed: {why}")),
            None => {}
        }
    }
    Err(format!(
        "did not complete: pending {} acked {} stats {:?} crashes {crashes}",
        staging.persist_pending(),
        tx.acked_bytes(),
        tx.stats()
    ))
}

#[test]
fn receiver_crashes_and_sender_restarts_resume_without_resending() {
    let seeds: u64 = std::env::var("CAIRN_TRANSFER_CRASH_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    for seed in 0..seeds {
        let background = seed % 2 == 1;
        if let Err(e) = run(seed, false, background) {
            panic!("seed {seed} (background persist: {background}): {e}");
        }
    }
}

/// Without the fdatasync before a range is recorded, a crash loses data the
/// receiver had acknowledged: the test above must notice.
#[test]
fn skipping_the_data_sync_is_caught() {
    for background in [false, true] {
        let caught = (0..300).find_map(|seed| run(seed, true, background).err().map(|e| (seed, e)));
        let (seed, e) = caught.expect("skipping the data fdatasync was never caught");
        eprintln!("background persist {background}: caught at seed {seed}: {e}");
    }
}
