//! Membership changes end to end: a node joins as a learner under write
//! load, catches up, is promoted; an original member is removed and cannot
//! come back with its old data.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_kv_client::{Consistency, Error};
use common::Cluster;

/// Retries a membership call refused as busy (a learner still catching up,
/// a change still pending) until `deadline`.
async fn until_done<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let end = Instant::now() + deadline;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                assert!(Instant::now() < end, "{what}: still failing after {deadline:?}: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_joins_under_load_is_promoted_and_a_removed_member_cannot_rejoin() {
    let mut cluster = Cluster::start(&[("CAIRN_MEMTABLE_BYTES", "1048576"), ("CAIRN_RELEASE_MARGIN_ENTRIES", "200")]);
    let leader = cluster.leader(Duration::from_secs(20)).await;
    let c = cluster.client();

    // Writers keep writing through every change.
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2 {
        let (client, acked, stop) = (cluster.client(), acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (k, v) = (format!("m{w}-{i:06}"), format!("value {i}"));
                match client.put(k.clone(), v.clone()).await {
                    Ok(_) => {
                        acked.lock().expect("lock").insert(k, v);
                    }
                    Err(e) if !e.certainly_not_applied() => {}
                    Err(e) => panic!("writer {w}: refused during a membership change: {e}"),
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Node 4 joins as a learner.
    let addr4 = cluster.start_joiner(4);
    let started = Instant::now();
    let members = until_done("member add", Duration::from_secs(30), || c.member_add(4, addr4.clone(), true)).await;
    assert!(members.iter().any(|m| m.id == 4 && m.learner), "node 4 is not a learner: {members:?}");
    // A second add of the same id is refused (it is a member already).
    assert!(c.member_add(4, addr4.clone(), true).await.is_err());

    // It catches up, then is promoted (refused as busy until it has caught up).
    let members = until_done("member promote", Duration::from_secs(60), || c.member_promote(4)).await;
    assert!(members.iter().any(|m| m.id == 4 && !m.learner), "node 4 is not a voter: {members:?}");
    let joined = started.elapsed();

    // An original follower is removed.
    let removed = (1..=3).find(|i| *i != leader).expect("a follower");
    let members = until_done("member remove", Duration::from_secs(30), || c.member_remove(removed)).await;
    assert!(!members.iter().any(|m| m.id == removed), "node {removed} is still a member: {members:?}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }

    // The removed node stops by itself once it applies its removal, or is
    // stopped here if it never learned of it.
    if cluster.wait_exit(removed, Duration::from_secs(5)).is_none() {
        cluster.kill(removed);
    }
    let (applied, _) = cluster.converged(Duration::from_secs(60)).await;
    let acked = acked.lock().expect("lock").clone();
    assert!(!acked.is_empty());
    let four = cluster.client_of(4);
    for (k, v) in &acked {
        let (got, _) = four.get_with(k.clone(), Consistency::Serializable).await.expect("get on node 4");
        assert_eq!(got.as_deref(), Some(v.as_bytes()), "node 4 lacks acknowledged write {k}");
    }
    eprintln!(
        "{} acknowledged writes; node 4 joined and was promoted in {joined:?}; converged at {applied}",
        acked.len()
    );

    // Its id is refused for good: it cannot be added again, and started
    // with its old data it never takes part again.
    assert!(c.member_add(removed, cluster.endpoint(removed), true).await.is_err(), "a removed id was added again");
    cluster.start_node(removed);
    match cluster.wait_exit(removed, Duration::from_secs(5)) {
        Some(code) => {
            assert_ne!(code, 0, "the removed node started again");
            eprintln!("the removed node refused to start (exit code {code})");
        }
        None => {
            c.put("after-removal", "1").await.expect("put");
            tokio::time::sleep(Duration::from_secs(2)).await;
            let s = c.status_of(&cluster.endpoint(removed), false).await;
            let leader_now = c.status(false).await.expect("status");
            if let Ok(s) = s {
                assert!(s.applied < leader_now.commit, "the removed node still follows the log: {s:?}");
                assert_ne!(s.role, "leader");
            }
            eprintln!("the removed node runs but is refused by the members");
            cluster.kill(removed);
        }
    }
    c.put("the-end", "1").await.expect("the cluster serves after the changes");
}
