//! Over a link that drops, duplicates, reorders, delays and corrupts frames,
//! and disconnects: the completed set is byte-identical to the source, every
//! time; damage is never handed over.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_snapshot_transfer::{Config, Fs, Receiver, Sender, SenderEvent, SenderStats, Source, Staging};
use cairn_wal::sim::SimDisk;
use common::{Faults, Link, WalFs, assert_identical, make_checkpoint, names, root};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub(crate) fn small_config() -> Config {
    let mut c = Config::default();
    c.chunk_bytes_max = 4096;
    c.window_chunks_max = 8;
    c.window_bytes_max = 32 << 10;
    c.sync_bytes = 8 << 10;
    c.stall_timeout = Duration::from_millis(50);
    c
}

/// Runs one transfer over a faulty link; returns the steps it took and the
/// sender's counters.
fn run(seed: u64, faults: Faults, disconnect_per_mille: u32, background: bool) -> Result<(u64, SenderStats), String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let src_fs: Arc<dyn Fs> = Arc::new(WalFs(SimDisk::new(seed).fs()));
    let dst_fs: Arc<dyn Fs> = Arc::new(WalFs(SimDisk::new(seed + 1).fs()));
    let count = rng.random_range(1..6);
    let files = make_checkpoint(&*src_fs, Path::new("/ckpt"), &mut rng, count, 40_000);
    let cfg = small_config();
    let (mut source, manifest) =
        Source::open(&*src_fs, Path::new("/ckpt"), &names(&files), 100, 3, 1).map_err(|e| e.to_string())?;
    let base = Instant::now();
    let mut tx = Sender::new(cfg.clone(), manifest, base);
    let mut rx = Receiver::new(cfg.clone());
    let mut staging = Staging::new(dst_fs.clone(), root(), vec![]);
    staging.set_background_persist(background);
    let (mut to_rx, mut to_tx) = (Link::default(), Link::default());
    let body_max = cfg.frame_body_bytes_max();
    for step in 0..200_000u64 {
        let now = base + Duration::from_millis(step);
        while let Some(req) = tx.poll_read(now) {
            let data = source.read(&req).map_err(|e| e.to_string())?;
            tx.handle_read(req, data);
        }
        while let Some(f) = tx.poll_frame() {
            to_rx.send(&mut rng, faults, step, &f);
        }
        for f in to_rx.receive(step, body_max) {
            rx.handle_frame(f);
        }
        let mut back = Vec::new();
        staging.drive(&mut rx, &mut |f| back.push(f)).map_err(|e| format!("receiver I/O: {e}"))?;
        for f in &back {
            to_tx.send(&mut rng, faults, step, f);
        }
        if let Some(done) = staging.take_completed() {
            // Whatever is handed over is exactly the source.
            assert_identical(&*dst_fs, &done.dir, &files);
        }
        for f in to_tx.receive(step, body_max) {
            tx.handle_frame(f, now);
        }
        if rng.random_range(0..1000) < disconnect_per_mille {
            to_rx.cut();
            to_tx.cut();
            tx.reconnect(now);
        }
        tx.handle_timeout(now);
        match tx.poll_event() {
            Some(SenderEvent::Completed) => {
                let st = tx.stats();
                if faults.drop >= 300 && (st.stalls == 0 || st.offers_sent < 2) {
                    return Err(format!("heavy faults but {} stalls and {} offers", st.stalls, st.offers_sent));
                }
                return Ok((step, st));
            }
            Some(SenderEvent::Failed(why)) => return Err(format!("failed: {why}")),
            None => {}
        }
    }
    Err(format!("did not complete (acked {} of {})", tx.acked_bytes(), tx.manifest().total_bytes()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn completes_byte_identical_over_a_faulty_link(
        seed in any::<u64>(),
        drop in 0u32..150,
        duplicate in 0u32..100,
        corrupt in 0u32..100,
        delay in 0u64..20,
        disconnect in 0u32..5,
        background in any::<bool>(),
    ) {
        let faults = Faults { drop, duplicate, corrupt, delay_steps_max: delay };
        run(seed, faults, disconnect, background).map_err(TestCaseError::fail)?;
    }
}

#[test]
fn a_perfect_link_needs_no_stall() {
    let faults = Faults { drop: 0, duplicate: 0, corrupt: 0, delay_steps_max: 0 };
    for seed in 0..20 {
        let (steps, stats) = run(seed, faults, 0, false).expect("transfer");
        assert!(steps < 1000, "seed {seed} took {steps} steps");
        assert_eq!((stats.stalls, stats.offers_sent), (0, 1), "seed {seed}");
    }
}

/// The faults really happen: with heavy loss the sender stalls and resumes,
/// and disconnects make it offer again; the transfer still completes.
#[test]
fn heavy_faults_force_stalls_and_reoffers_yet_complete() {
    let faults = Faults { drop: 300, duplicate: 100, corrupt: 100, delay_steps_max: 30 };
    for seed in 0..10 {
        run(seed, faults, 10, seed % 2 == 1).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
}

/// A background persist still running when a newer checkpoint's offer
/// arrives: its result belongs to the replaced transfer and must not be
/// acknowledged under the new one (whose bytes were never written), and the
/// new checkpoint still arrives whole.
#[test]
fn a_replaced_transfers_persist_acknowledges_nothing_of_the_new_one() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let src_fs: Arc<dyn Fs> = Arc::new(WalFs(SimDisk::new(1).fs()));
    let dst_fs: Arc<dyn Fs> = Arc::new(WalFs(SimDisk::new(2).fs()));
    let write_set = |rng: &mut ChaCha8Rng, dir: &str| -> Vec<(String, Vec<u8>)> {
        src_fs.create_dir_all(Path::new(dir)).expect("mkdir");
        (0..3)
            .map(|i| {
                let data: Vec<u8> = (0..50_000).map(|_| rng.random()).collect();
                let name = format!("{:06}.sst", i + 1);
                let f = src_fs
                    .open(&Path::new(dir).join(&name), cairn_snapshot_transfer::OpenMode::CreateNew)
                    .expect("create");
                f.write_all_at(&data, 0).expect("write");
                f.sync_data().expect("sync");
                (name, data)
            })
            .collect()
    };
    let files_a = write_set(&mut rng, "/a");
    let files_b = write_set(&mut rng, "/b");
    let cfg = small_config();
    let (mut source_a, manifest_a) =
        Source::open(&*src_fs, Path::new("/a"), &names(&files_a), 100, 3, 1).expect("source a");
    let (mut source_b, manifest_b) =
        Source::open(&*src_fs, Path::new("/b"), &names(&files_b), 200, 3, 2).expect("source b");
    let base = Instant::now();
    let mut rx = Receiver::new(cfg.clone());
    let mut staging = Staging::new(dst_fs.clone(), root(), vec![]);
    staging.set_background_persist(true);

    // Transfer a until a persist is running, with some of it written.
    let mut tx = Sender::new(cfg.clone(), manifest_a, base);
    let mut started = false;
    for step in 0..10_000u64 {
        step_direct(&mut tx, &mut source_a, &mut rx, &mut staging, base + Duration::from_millis(step));
        if staging.persist_pending() {
            started = true;
            break;
        }
    }
    assert!(started, "no background persist started");
    // Let the persist's thread end: its result waits to be taken.
    std::thread::sleep(Duration::from_millis(100));

    // Checkpoint b's offer arrives before the result is taken.
    let mut tx = Sender::new(cfg.clone(), manifest_b, base);
    let now = base + Duration::from_secs(20);
    while let Some(req) = tx.poll_read(now) {
        let data = source_b.read(&req).expect("read b");
        tx.handle_read(req, data);
    }
    let mut offered = false;
    while let Some(f) = tx.poll_frame() {
        offered |= matches!(f, cairn_snapshot_transfer::Frame::Offer { .. });
        rx.handle_frame(f);
    }
    assert!(offered, "b's sender offered nothing");
    let mut back = Vec::new();
    staging.drive(&mut rx, &mut |f| back.push(f)).expect("drive");
    for f in &back {
        if let cairn_snapshot_transfer::Frame::Ack { transfer_id: 2, file, durable } = f {
            assert_eq!(*durable, 0, "b's file {file} acknowledged durable to {durable} before any of it was sent");
        }
        if let cairn_snapshot_transfer::Frame::Have { transfer_id: 2, durable } = f {
            assert!(durable.iter().all(|&d| d == 0), "b's files reported held: {durable:?}");
        }
    }

    // And b then completes, byte-identical.
    for f in back {
        tx.handle_frame(f, now);
    }
    for step in 0..200_000u64 {
        let now = base + Duration::from_secs(20) + Duration::from_millis(step);
        step_direct(&mut tx, &mut source_b, &mut rx, &mut staging, now);
        if let Some(done) = staging.take_completed() {
            assert_eq!(done.manifest.index, 200);
            assert_identical(&*dst_fs, &done.dir, &files_b);
            return;
        }
        if staging.persist_pending() {
            std::thread::sleep(Duration::from_millis(1));
        }
        tx.handle_timeout(now);
    }
    panic!("checkpoint b did not complete");
}

/// One step of a transfer over a perfect link: the sender's reads and frames,
/// the receiver's actions, and its answers back.
fn step_direct(tx: &mut Sender, source: &mut Source, rx: &mut Receiver, staging: &mut Staging, now: Instant) {
    while let Some(req) = tx.poll_read(now) {
        let data = source.read(&req).expect("read");
        tx.handle_read(req, data);
    }
    while let Some(f) = tx.poll_frame() {
        rx.handle_frame(f);
    }
    let mut back = Vec::new();
    staging.drive(rx, &mut |f| back.push(f)).expect("drive");
    for f in back {
        tx.handle_frame(f, now);
    }
}
