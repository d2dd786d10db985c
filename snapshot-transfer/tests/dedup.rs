//! A receiver that already holds some files by content gets only the others;
//! a newer checkpoint supersedes an older one and reuses its files.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use cairn_snapshot_transfer::{Config, Frame, Fs, Receiver, RejectReason, Source, Staging, StdFs, run_local};
use common::{assert_identical, make_checkpoint, names};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[test]
fn files_held_by_content_are_not_sent() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fs: Arc<dyn Fs> = Arc::new(StdFs);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let src = tmp.path().join("src");
    let files = make_checkpoint(&*fs, &src, &mut rng, 6, 50_000);
    // The follower's live directory holds files 0 and 2 identically, and file 1
    // under the same name with other content.
    let live = tmp.path().join("live");
    std::fs::create_dir_all(&live).expect("mkdir");
    std::fs::write(live.join(&files[0].0), &files[0].1).expect("write");
    std::fs::write(live.join(&files[2].0), &files[2].1).expect("write");
    std::fs::write(live.join(&files[1].0), b"not the same").expect("write");
    let (mut source, manifest) = Source::open(&*fs, &src, &names(&files), 10, 1, 1).expect("source");
    let mut staging = Staging::new(fs.clone(), tmp.path().join("staging"), vec![live]);
    let mut cfg = Config::default();
    cfg.compress_saving_percent_min = 100; // send raw, to count bytes exactly
    let (done, stats) = run_local(&cfg, &mut source, manifest, &mut staging).expect("transfer");
    assert_identical(&*fs, &done.dir, &files);
    let expected: u64 =
        files.iter().enumerate().filter(|(i, _)| *i != 0 && *i != 2).map(|(_, f)| f.1.len() as u64).sum();
    assert_eq!(stats.raw_bytes_sent, expected);
}

#[test]
fn a_newer_checkpoint_supersedes_and_reuses_the_older_one() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fs: Arc<dyn Fs> = Arc::new(StdFs);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let src = tmp.path().join("src");
    let files = make_checkpoint(&*fs, &src, &mut rng, 4, 30_000);
    let root = tmp.path().join("staging");
    let cfg = Config::default();
    // The first checkpoint (index 10) arrives whole.
    let (mut source, m10) = Source::open(&*fs, &src, &names(&files[..3]), 10, 1, 1).expect("source");
    let mut staging = Staging::new(fs.clone(), &root, vec![]);
    run_local(&cfg, &mut source, m10.clone(), &mut staging).expect("first transfer");
    // The second (index 20) shares three files: only the new one travels.
    let (mut source, m20) = Source::open(&*fs, &src, &names(&files), 20, 2, 2).expect("source");
    let (done, stats) = run_local(&cfg, &mut source, m20, &mut staging).expect("second transfer");
    assert_identical(&*fs, &done.dir, &files);
    assert_eq!(stats.raw_bytes_sent, files[3].1.len() as u64);
    // The older staging area is gone.
    let left: Vec<PathBuf> = std::fs::read_dir(&root).expect("ls").map(|e| e.expect("e").path()).collect();
    assert_eq!(left, vec![done.dir.clone()]);
}

#[test]
fn an_older_offer_or_a_foreign_chunk_is_refused() {
    let cfg = Config::default();
    let m = |index: u64, id: u64| cairn_snapshot_transfer::Manifest { transfer_id: id, index, term: 1, files: vec![] };
    let mut rx = Receiver::new(cfg);
    rx.handle_frame(Frame::Offer { manifest: m(20, 1), window_bytes: 1 << 20 });
    assert!(matches!(rx.poll_action(), Some(cairn_snapshot_transfer::Action::Prepare { .. })));
    rx.handle_prepared(&[]);
    rx.handle_frame(Frame::Offer { manifest: m(10, 2), window_bytes: 1 << 20 });
    rx.handle_frame(Frame::Chunk {
        transfer_id: 99,
        file: 0,
        offset: 0,
        raw_len: 1,
        encoding: cairn_snapshot_transfer::Encoding::Raw,
        raw_checksum: 0,
        data: vec![0],
    });
    let mut rejects = Vec::new();
    while let Some(a) = rx.poll_action() {
        if let cairn_snapshot_transfer::Action::Send(Frame::Reject { transfer_id, reason, .. }) = a {
            rejects.push((transfer_id, reason));
        }
    }
    assert_eq!(rejects, vec![(2, RejectReason::Superseded), (99, RejectReason::UnknownTransfer)]);
}

/// A file that fails verification is unlinked and received anew; when it was a
/// hard link to a live file (from a reference directory), the live file is
/// never touched.
#[test]
fn a_reset_never_changes_a_linked_live_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fs: Arc<dyn Fs> = Arc::new(StdFs);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let src = tmp.path().join("src");
    let files = make_checkpoint(&*fs, &src, &mut rng, 1, 20_000);
    let live = tmp.path().join("live");
    std::fs::create_dir_all(&live).expect("mkdir");
    std::fs::write(live.join(&files[0].0), &files[0].1).expect("write");
    let (_, manifest) = Source::open(&*fs, &src, &names(&files), 10, 1, 1).expect("source");
    let mut staging = Staging::new(fs.clone(), tmp.path().join("staging"), vec![live.clone()]);
    let mut rx = Receiver::new(Config::default());
    rx.handle_frame(Frame::Offer { manifest, window_bytes: 1 << 20 });
    staging.drive(&mut rx, &mut |_| {}).expect("prepare, link, verify, complete");
    let done = staging.take_completed().expect("complete from the linked file alone");
    // Pretend the staged copy failed its check: the receiver resets it.
    rx.handle_verified(0, false);
    staging.drive(&mut rx, &mut |_| {}).expect("reset");
    assert_eq!(std::fs::read(live.join(&files[0].0)).expect("live"), files[0].1, "the live file changed");
    assert_eq!(std::fs::metadata(done.dir.join(&files[0].0)).expect("staged").len(), 0);
}

/// A receiver that completed answers any late chunk with Done again, so a
/// sender whose Done was lost does not resend forever.
#[test]
fn a_completed_receiver_repeats_done() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fs: Arc<dyn Fs> = Arc::new(StdFs);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("a"), b"abc").expect("write");
    let (_, manifest) = Source::open(&*fs, &src, &["a".to_string()], 10, 1, 4).expect("source");
    let mut staging = Staging::new(fs.clone(), tmp.path().join("staging"), vec![]);
    let mut rx = Receiver::new(Config::default());
    let mut out = Vec::new();
    rx.handle_frame(Frame::Offer { manifest, window_bytes: 1 << 20 });
    staging.drive(&mut rx, &mut |f| out.push(f)).expect("prepare");
    rx.handle_frame(Frame::Chunk {
        transfer_id: 4,
        file: 0,
        offset: 0,
        raw_len: 3,
        encoding: cairn_snapshot_transfer::Encoding::Raw,
        raw_checksum: xxhash_rust::xxh3::xxh3_64(b"abc"),
        data: b"abc".to_vec(),
    });
    staging.drive(&mut rx, &mut |f| out.push(f)).expect("drive");
    staging.drive(&mut rx, &mut |f| out.push(f)).expect("drive");
    assert!(out.iter().any(|f| matches!(f, Frame::Done { transfer_id: 4 })), "{out:?}");
    out.clear();
    rx.handle_frame(Frame::Chunk {
        transfer_id: 4,
        file: 0,
        offset: 0,
        raw_len: 3,
        encoding: cairn_snapshot_transfer::Encoding::Raw,
        raw_checksum: 0,
        data: b"abc".to_vec(),
    });
    staging.drive(&mut rx, &mut |f| out.push(f)).expect("drive");
    assert_eq!(out, vec![Frame::Done { transfer_id: 4 }]);
}
