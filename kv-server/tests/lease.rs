//! Leases end to end: keys attached to a lease vanish on every replica at
//! one revision when it expires or is revoked; a lease kept alive survives
//! leader changes (a new leader gives every lease its TTL plus an election
//! timeout, since keep-alives reach only the leader).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cairn_kv_client::{Consistency, ErrorCode};
use common::Cluster;

/// Waits until `key` is absent (linearizable read), at most `within`; returns how long it took.
async fn wait_gone(c: &cairn_kv_client::Client, key: &str, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if let Ok(None) = c.get(key).await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_not_kept_alive_expires_and_its_keys_vanish_everywhere_at_one_revision() {
    let cluster = Cluster::start(&[]);
    cluster.leader(Duration::from_secs(20)).await;
    let c = cluster.client();
    let granted = Instant::now();
    let id = c.lease_grant(Duration::from_secs(2)).await.expect("grant");
    c.put_with_lease("svc/a", "10.0.0.1", id).await.expect("put");
    c.put_with_lease("svc/b", "10.0.0.2", id).await.expect("put");
    let last = c.put("config", "kept").await.expect("put");
    let before = c.get_kv("config", Consistency::Linearizable).await.expect("get").1;
    let (ttl, left, keys) = c.lease_time_to_live(id).await.expect("ttl");
    assert_eq!(ttl, Duration::from_secs(2));
    assert_eq!(keys, vec![b"svc/a".to_vec(), b"svc/b".to_vec()]);
    let (kv, _) = c.get_kv("svc/a", Consistency::Linearizable).await.expect("get");
    assert_eq!(kv.expect("svc/a").meta.lease, id);
    assert!(c.lease_list().await.expect("list").contains(&id));
    let _ = (left, last);
    // Only the leader knows the time left: asked of a follower, the client is
    // sent to the leader and gets it.
    let leader = cluster.leader(Duration::from_secs(20)).await;
    let follower = cluster.ids().into_iter().find(|n| *n != leader).expect("a follower");
    let (_, left, _) = cluster.client_of(follower).lease_time_to_live(id).await.expect("ttl via a follower");
    let left = left.expect("the time left, from the leader");
    assert!(left <= Duration::from_secs(2), "{left:?} left of a 2 s lease");

    let took = wait_gone(&c, "svc/a", Duration::from_secs(10)).await.expect("the lease did not expire");
    let after_grant = granted.elapsed();
    assert!(after_grant >= Duration::from_secs(2), "expired after {after_grant:?}, before its TTL");
    assert_eq!(c.get("svc/b").await.expect("get"), None);
    assert_eq!(c.get("config").await.expect("get").as_deref(), Some(&b"kept"[..]));
    let (_, rev) = c.get_kv("config", Consistency::Linearizable).await.expect("get");
    assert_eq!(rev, before + 1, "both keys went at one revision");
    // Every replica agrees (same keys, same revision: the state hash covers both).
    cluster.converged(Duration::from_secs(20)).await;
    for id_node in 1..=3 {
        let one = cluster.client_of(id_node);
        let (v, _) = one.get_with("svc/a", Consistency::Serializable).await.expect("get");
        assert_eq!(v, None, "node {id_node} still holds an expired lease's key");
    }
    // The lease is gone: keep-alive and puts with it are refused.
    let e = c.lease_keep_alive(id).await.expect_err("a keep-alive of an expired lease");
    assert_eq!(e.code(), Some(ErrorCode::LeaseNotFound), "{e}");
    let e = c.put_with_lease("svc/c", "x", id).await.expect_err("a put with an expired lease");
    assert_eq!(e.code(), Some(ErrorCode::LeaseNotFound), "{e}");
    assert!(!c.lease_list().await.expect("list").contains(&id));
    eprintln!("a 2 s lease expired {after_grant:?} after its grant ({took:?} of waiting)");

    // Revoke: at once, one revision.
    let id2 = c.lease_grant(Duration::from_secs(60)).await.expect("grant");
    c.put_with_lease("tmp/1", "x", id2).await.expect("put");
    c.put_with_lease("tmp/2", "x", id2).await.expect("put");
    // A key moved to no lease is detached: it survives the revocation.
    c.put_with_lease("tmp/3", "x", id2).await.expect("put");
    c.put("tmp/3", "kept").await.expect("put");
    let (_, before) = c.get_kv("config", Consistency::Linearizable).await.expect("get");
    let w = c.lease_revoke(id2).await.expect("revoke");
    assert_eq!(w.revision, before + 1);
    assert_eq!(c.get("tmp/1").await.expect("get"), None);
    assert_eq!(c.get("tmp/2").await.expect("get"), None);
    assert_eq!(c.get("tmp/3").await.expect("get").as_deref(), Some(&b"kept"[..]));
    let e = c.lease_revoke(id2).await.expect_err("a second revoke");
    assert_eq!(e.code(), Some(ErrorCode::LeaseNotFound));
    cluster.converged(Duration::from_secs(20)).await;
}

/// One client may hold at most `leases_per_client_max` leases; others are
/// not held back by it, and a revocation frees a place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_holds_at_most_its_share_of_leases() {
    let cluster = Cluster::start_with_config("[limits]\nleases_per_client_max = 2\n");
    cluster.leader(Duration::from_secs(20)).await;
    let (a, b) = (cluster.client(), cluster.client());
    let first = a.lease_grant(Duration::from_secs(60)).await.expect("grant 1");
    a.lease_grant(Duration::from_secs(60)).await.expect("grant 2");
    let e = a.lease_grant(Duration::from_secs(60)).await.expect_err("a third lease for one client");
    assert_eq!(e.code(), Some(ErrorCode::TooLarge), "{e}");
    assert!(e.to_string().contains("leases_per_client_max"), "{e}");
    b.lease_grant(Duration::from_secs(60)).await.expect("another client's lease");
    a.lease_revoke(first).await.expect("revoke");
    a.lease_grant(Duration::from_secs(60)).await.expect("a grant after a revocation");
    assert_eq!(a.lease_list().await.expect("list").len(), 3);
}

/// A lease kept alive through two leader kills; the scenario returns
/// whether its key was still there after them.
async fn kept_alive_through_leader_kills(env: &[(&str, &str)]) -> bool {
    let mut cluster = Cluster::start(env);
    cluster.leader(Duration::from_secs(20)).await;
    let c = cluster.client();
    let id = c.lease_grant(Duration::from_secs(3)).await.expect("grant");
    c.put_with_lease("leader-election/me", "node-a", id).await.expect("put");
    let stop = Arc::new(AtomicBool::new(false));
    let keeper = {
        let (c, stop) = (cluster.client(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let _ = c.lease_keep_alive(id).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let leader = cluster.leader(Duration::from_secs(20)).await;
        cluster.kill(leader);
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.start_node(leader);
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let alive = c.get("leader-election/me").await.expect("get").is_some();
    stop.store(true, Ordering::Relaxed);
    let _ = keeper.await;
    if alive {
        // Without keep-alives it ends: TTL + election timeout at most, plus the checks.
        assert!(
            wait_gone(&c, "leader-election/me", Duration::from_secs(15)).await.is_some(),
            "the lease never expired once its keep-alives stopped"
        );
    }
    alive
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_lease_survives_leader_changes() {
    assert!(kept_alive_through_leader_kills(&[]).await, "a kept-alive lease expired across a leader change");
}

/// Teeth: a new leader that keeps the deadlines it saw as a follower (a
/// lease's grant time plus its TTL: it never saw the keep-alives) instead of
/// giving every lease its TTL again expires a lease that was kept alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_without_the_grace_period_expires_a_kept_alive_lease() {
    assert!(
        !kept_alive_through_leader_kills(&[("CAIRN_TEST_LEASE_NO_GRACE", "1")]).await,
        "the switch should expire the lease at the first leader change"
    );
}

/// The lock recipe of `docs/recipes.md` under leader kills: three clients
/// take turns holding `locks/x` (a transaction that creates it, attached to
/// their lease, kept alive), and while holding it write `resource` fenced by
/// the lock's create revision (a transaction that writes only while the lock
/// key is still the one they created). Checked from the history: sorted by
/// revision, the fenced writes that applied never go back to an older
/// holder's token, every token is the create revision the holder got, and
/// at least two holders wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_recipe_never_lets_an_old_holder_write_after_a_new_one() {
    use cairn_kv_client::Txn;
    use cairn_kv_client::protocol::{CompareOp, CompareTarget, TxnOp};
    let mut cluster = Cluster::start(&[]);
    cluster.leader(Duration::from_secs(20)).await;
    let writes: Arc<std::sync::Mutex<Vec<(u64, u64, u64)>>> = Arc::default(); // (revision, token, client)
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..3u64 {
        let mut o = cluster.options();
        o.retry_deadline = Duration::from_secs(10);
        let c = cairn_kv_client::Client::new(o).expect("client");
        let (writes, stop) = (writes.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut held = 0;
            while !stop.load(Ordering::Relaxed) {
                let Ok(lease) = c.lease_grant(Duration::from_secs(2)).await else { continue };
                let acquire =
                    Txn::new().when("locks/x", CompareOp::Equal, CompareTarget::CreateRevision(0)).then(TxnOp::Put {
                        key: b"locks/x".to_vec(),
                        value: format!("c{w}").into_bytes(),
                        prev_kv: false,
                        lease,
                    });
                let token = match c.txn(acquire).await {
                    Ok(r) if r.succeeded => r.revision,
                    _ => {
                        let _ = c.lease_revoke(lease).await;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                held += 1;
                for n in 0..5 {
                    let _ = c.lease_keep_alive(lease).await;
                    let fenced = Txn::new()
                        .when("locks/x", CompareOp::Equal, CompareTarget::CreateRevision(token))
                        .then(TxnOp::Put {
                            key: b"resource".to_vec(),
                            value: format!("c{w}-{n}").into_bytes(),
                            prev_kv: false,
                            lease: 0,
                        });
                    if let Ok(r) = c.txn(fenced).await
                        && r.succeeded
                        && !r.replayed
                    {
                        writes.lock().expect("writes").push((r.revision, token, w));
                    }
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
                let _ = c.lease_revoke(lease).await;
            }
            held
        }));
    }
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let leader = cluster.leader(Duration::from_secs(20)).await;
        cluster.kill(leader);
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.start_node(leader);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut holds = 0;
    for t in tasks {
        holds += t.await.expect("client task");
    }
    let mut writes = writes.lock().expect("writes").clone();
    writes.sort();
    let holders: std::collections::BTreeSet<u64> = writes.iter().map(|(_, t, _)| *t).collect();
    assert!(holders.len() >= 2, "fewer than two holders wrote: {writes:?}");
    for pair in writes.windows(2) {
        assert!(pair[1].1 >= pair[0].1, "an older holder wrote after a newer one: {pair:?}");
        assert!(pair[1].0 > pair[0].0, "two fenced writes at one revision: {pair:?}");
    }
    for (rev, token, _) in &writes {
        assert!(rev > token, "a fenced write at {rev} before its lock was taken at {token}");
    }
    eprintln!("{holds} holds, {} fenced writes by {} holders, through 2 leader kills", writes.len(), holders.len());
    cluster.converged(Duration::from_secs(20)).await;
}
