//! Log release and snapshots end to end: a follower that fell behind the
//! released log catches up by a checkpoint sent over QUIC, installed by
//! replacing its state.

mod common;

use std::time::{Duration, Instant};

use cairn_kv_client::Consistency;
use cairn_kv_client::protocol::WriteOp;
use common::Cluster;

const KEYS: usize = 100_000;
const PER_WRITE: usize = 100;

/// A follower stopped while 100,000 keys are written with a small release
/// margin comes back behind the leader's log: it catches up by a snapshot
/// (its installed-snapshot counter rises), its state hashes the same as the
/// leader's at the same applied index, and a key deleted while it was away
/// is gone (the snapshot replaced its state, it did not merge into it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_released_log_catches_up_by_a_snapshot() {
    let mut cluster = Cluster::start(&[("CAIRN_MEMTABLE_BYTES", "1048576"), ("CAIRN_RELEASE_MARGIN_ENTRIES", "50")]);
    let leader = cluster.leader(Duration::from_secs(20)).await;
    let follower = (1..=3).find(|i| *i != leader).expect("a follower");
    let c = cluster.client();
    c.put("doomed", "still here").await.expect("put");
    c.put("kept", "v0").await.expect("put");
    cluster.converged(Duration::from_secs(20)).await;
    let before = c.status_of(&cluster.endpoint(follower), false).await.expect("status");
    assert!(cluster.stop(follower), "the follower did not stop cleanly");

    let started = Instant::now();
    for w in 0..KEYS / PER_WRITE {
        let ops = (0..PER_WRITE)
            .map(|i| {
                let k = w * PER_WRITE + i;
                WriteOp::Put {
                    key: format!("key-{k:07}").into_bytes(),
                    value: format!("value-{k}-{}", "v".repeat(64)).into_bytes(),
                }
            })
            .collect();
        c.write(ops).await.expect("write");
    }
    c.delete("doomed").await.expect("delete");
    c.put("kept", "v1").await.expect("put");
    let wrote = started.elapsed();

    // The leader releases its log past where the follower stopped.
    let leader_ep = cluster.endpoint(leader);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = c.status_of(&leader_ep, false).await.expect("status");
        if s.first_index > before.last_index + 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the leader did not release its log: {s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let restarted = Instant::now();
    cluster.start_node(follower);
    let (applied, hash) = cluster.converged(Duration::from_secs(90)).await;
    let caught_up = restarted.elapsed();
    let s = c.status_of(&cluster.endpoint(follower), false).await.expect("status");
    assert!(s.snapshots_installed >= 1, "the follower caught up without a snapshot: {s:?}");
    let ls = c.status_of(&leader_ep, false).await.expect("status");
    assert!(ls.snapshots_sent >= 1, "the leader reports no snapshot sent: {ls:?}");
    let one = cluster.client_of(follower);
    let (v, _) = one.get_with("doomed", Consistency::Serializable).await.expect("get");
    assert_eq!(v, None, "a key deleted while the follower was away came back");
    let (v, _) = one.get_with("kept", Consistency::Serializable).await.expect("get");
    assert_eq!(v.as_deref(), Some(&b"v1"[..]));
    let (v, _) = one.get_with(format!("key-{:07}", KEYS - 1), Consistency::Serializable).await.expect("get");
    assert!(v.is_some(), "the last key written is missing on the follower");
    eprintln!(
        "wrote {KEYS} keys in {wrote:?}; follower caught up by snapshot in {caught_up:?} \
         (applied {applied}, hash {hash:016x}, leader log starts at {})",
        ls.first_index
    );

    // The installed state survives a restart of the follower (its log starts
    // at the snapshot marker, its state directory is the installed one).
    assert!(cluster.stop(follower), "the follower did not stop cleanly");
    cluster.start_node(follower);
    c.put("after", "1").await.expect("put");
    cluster.converged(Duration::from_secs(30)).await;
}

/// `snapshot save` streams a checkpoint to a client; `kv-server restore`
/// makes a new member's data directory of it (refusing one that holds data
/// already); the member started with `--join` and added catches up from the
/// leader's log after the snapshot, without a transfer, and hashes the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_snapshot_restores_into_a_new_member() {
    let mut cluster = Cluster::start(&[]);
    cluster.leader(Duration::from_secs(20)).await;
    let c = cluster.client();
    for w in 0..20 {
        let ops = (0..100)
            .map(|i| WriteOp::Put { key: format!("s-{w:02}-{i:03}").into_bytes(), value: vec![b'x'; 200] })
            .collect();
        c.write(ops).await.expect("write");
    }
    let file = cluster.dir.path().join("saved.snapshot");
    let mut out = std::fs::File::create(&file).expect("create");
    let mut calls = 0u64;
    let header = c.snapshot_save(&mut out, &mut |_, _| calls += 1).await.expect("snapshot save");
    drop(out);
    assert!(header.index > 0 && !header.files.is_empty() && calls > 0, "{header:?}");
    assert!(std::fs::metadata(&file).expect("stat").len() > header.total_bytes());
    c.put("after-save", "1").await.expect("put");

    let addr4 = cluster.prepare_joiner(4);
    let restore = |cluster: &Cluster| {
        let mut args = cluster.run_args(4);
        args[0] = "restore".into();
        args.extend(["--snapshot".into(), file.display().to_string()]);
        std::process::Command::new(env!("CARGO_BIN_EXE_kv-server")).args(args).output().expect("run restore")
    };
    let out = restore(&cluster);
    assert!(out.status.success(), "restore failed: {}", String::from_utf8_lossy(&out.stderr));
    let again = restore(&cluster);
    assert!(!again.status.success(), "a second restore into the same directory was accepted");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already holds"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    cluster.start_node(4);
    c.member_add(4, addr4, true).await.expect("member add");
    cluster.converged(Duration::from_secs(60)).await;
    let s = c.status_of(&cluster.endpoint(4), false).await.expect("status");
    assert_eq!(s.snapshots_installed, 0, "the restored member needed a snapshot transfer: {s:?}");
    let four = cluster.client_of(4);
    let (v, _) = four.get_with("after-save", Consistency::Serializable).await.expect("get");
    assert_eq!(v.as_deref(), Some(&b"1"[..]));
    let (v, _) = four.get_with("s-00-000", Consistency::Serializable).await.expect("get");
    assert_eq!(v.map(|v| v.len()), Some(200));

    // A damaged snapshot file is refused with a clear error and creates nothing.
    let mut bytes = std::fs::read(&file).expect("read");
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    let bad = cluster.dir.path().join("damaged.snapshot");
    std::fs::write(&bad, &bytes).expect("write");
    let dir5 = cluster.dir.path().join("restore-5");
    let mut args = cluster.run_args(4);
    args[0] = "restore".into();
    let i = args.iter().position(|a| a == "--data-dir").expect("flag") + 1;
    args[i] = dir5.display().to_string();
    args.extend(["--snapshot".into(), bad.display().to_string()]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kv-server")).args(args).output().expect("run restore");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("damaged"), "{err}");
}

/// Stops `follower`, writes `writes` batches of 100 keys, and waits until
/// the leader's log starts past where the follower stopped.
async fn leave_behind(cluster: &mut Cluster, leader: u64, follower: u64, writes: usize) {
    let c = cluster.client();
    let before = c.status_of(&cluster.endpoint(follower), false).await.expect("status");
    assert!(cluster.stop(follower), "the follower did not stop cleanly");
    for w in 0..writes {
        let ops = (0..100)
            .map(|i| WriteOp::Put { key: format!("b-{w:05}-{i:03}").into_bytes(), value: vec![b'y'; 100] })
            .collect();
        c.write(ops).await.expect("write");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = c.status_of(&cluster.endpoint(leader), false).await.expect("status");
        if s.first_index > before.last_index + 1 {
            return;
        }
        assert!(Instant::now() < deadline, "the leader did not release its log: {s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A follower that crashes right after an install published the new state,
/// before the log's snapshot marker was written, comes back by the repair
/// rule (the log then starts after the state) and converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_crashes_during_an_install_recovers_by_the_repair_rule() {
    let mut cluster = Cluster::start(&[("CAIRN_MEMTABLE_BYTES", "1048576"), ("CAIRN_RELEASE_MARGIN_ENTRIES", "50")]);
    let leader = cluster.leader(Duration::from_secs(20)).await;
    let follower = (1..=3).find(|i| *i != leader).expect("a follower");
    leave_behind(&mut cluster, leader, follower, 200).await;
    cluster.node_env.insert(follower, vec![("CAIRN_TEST_FAILPOINT".into(), "install-published".into())]);
    cluster.start_node(follower);
    let code = cluster.wait_exit(follower, Duration::from_secs(60));
    assert_eq!(code, Some(cairn_kv_server::failpoint::CRASH_EXIT_CODE), "the follower did not crash at the install");
    cluster.start_node(follower);
    cluster.converged(Duration::from_secs(60)).await;
    let log = std::fs::read_to_string(cluster.layout.dir.join(format!("node-{follower}.log"))).expect("log");
    assert!(log.contains("the state is ahead of the log"), "the restart did not take the repair path");
    let one = cluster.client_of(follower);
    let (v, _) = one.get_with("b-00199-099", Consistency::Serializable).await.expect("get");
    assert!(v.is_some(), "the last key written is missing on the follower");
}

/// A leader that crashes while it makes a checkpoint for a follower (its
/// tables linked, no manifest yet) leaves nothing that breaks a restart: the
/// unfinished checkpoint is removed, and the follower catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_crashes_making_a_checkpoint_recovers() {
    let mut cluster = Cluster::start(&[("CAIRN_MEMTABLE_BYTES", "1048576"), ("CAIRN_RELEASE_MARGIN_ENTRIES", "50")]);
    let leader = cluster.leader(Duration::from_secs(20)).await;
    let follower = (1..=3).find(|i| *i != leader).expect("a follower");
    leave_behind(&mut cluster, leader, follower, 100).await;
    // Restart the leader with the crash point armed, and make it lead again.
    assert!(cluster.stop(leader));
    cluster.node_env.insert(leader, vec![("CAIRN_TEST_FAILPOINT".into(), "checkpoint-linked".into())]);
    cluster.start_node(leader);
    let c = cluster.client();
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.leader(Duration::from_secs(20)).await != leader {
        let _ = c.transfer_leader(leader).await;
        assert!(Instant::now() < deadline, "node {leader} did not take the lead back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The follower comes back behind the released log: the armed leader
    // makes a checkpoint for it and crashes there.
    cluster.start_node(follower);
    let code = cluster.wait_exit(leader, Duration::from_secs(30));
    assert_eq!(code, Some(cairn_kv_server::failpoint::CRASH_EXIT_CODE), "the leader did not crash at the checkpoint");
    let dir = cluster.layout.dir.join(format!("node-{leader}/checkpoints"));
    let left: Vec<std::path::PathBuf> =
        std::fs::read_dir(&dir).expect("checkpoints").map(|e| e.expect("entry").path()).collect();
    assert!(!left.is_empty(), "the crash left no checkpoint behind");
    cluster.start_node(leader);
    cluster.converged(Duration::from_secs(60)).await;
    for p in left {
        assert!(!p.exists(), "the restart did not remove the unfinished checkpoint {}", p.display());
    }
}
