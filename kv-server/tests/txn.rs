//! Revisions and transactions end to end: a cluster-wide revision raised by
//! one per write that changes something, per-key create and modification
//! revisions and versions, compare-then-else transactions, and
//! compare-and-swap increments that stay exact while leaders are killed.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_kv_client::protocol::{CompareOp, CompareTarget, KeyMeta, TxnOp, TxnOpResult, WriteOp};
use cairn_kv_client::{Client, Consistency, Txn};
use common::Cluster;

fn put(key: &str, value: &str, prev_kv: bool) -> TxnOp {
    TxnOp::Put { key: key.into(), value: value.into(), prev_kv, lease: 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_and_transactions_behave_as_documented() {
    let cluster = Cluster::start(&[]);
    cluster.leader(Duration::from_secs(20)).await;
    let c = cluster.client();

    // Every write that changes a key raises the revision by one.
    let w1 = c.write_full(vec![WriteOp::Put { key: b"a".to_vec(), value: b"1".to_vec() }]).await.expect("put");
    let (kv, rev) = c.get_kv("a", Consistency::Linearizable).await.expect("get");
    let kv = kv.expect("a exists");
    assert_eq!(rev, w1.revision);
    assert_eq!(
        kv.meta,
        KeyMeta { create_revision: w1.revision, mod_revision: w1.revision, version: 1, lease: 0 },
        "a new key"
    );
    let w2 = c.write_full(vec![WriteOp::Put { key: b"a".to_vec(), value: b"2".to_vec() }]).await.expect("put");
    assert_eq!(w2.revision, w1.revision + 1);
    let (kv, _) = c.get_kv("a", Consistency::Serializable).await.expect("get");
    assert_eq!(
        kv.expect("a").meta,
        KeyMeta { create_revision: w1.revision, mod_revision: w2.revision, version: 2, lease: 0 }
    );
    // A delete of an absent key changes nothing: no new revision.
    let w3 = c.write_full(vec![WriteOp::Delete { key: b"absent".to_vec() }]).await.expect("delete");
    assert_eq!(w3.revision, w2.revision);
    // Several changes in one write: one revision.
    let w4 = c
        .write_full(vec![
            WriteOp::Put { key: b"b".to_vec(), value: b"x".to_vec() },
            WriteOp::Put { key: b"c".to_vec(), value: b"y".to_vec() },
        ])
        .await
        .expect("write");
    assert_eq!(w4.revision, w2.revision + 1);
    let page = c.scan("a", None, 10, Consistency::Linearizable).await.expect("scan");
    assert_eq!(page.revision, w4.revision);
    assert_eq!(page.metas.iter().map(|m| m.mod_revision).collect::<Vec<_>>(), [w2.revision, w4.revision, w4.revision]);

    // A transaction whose comparisons hold: its branch runs, a put returns the previous value,
    // a get sees the earlier put of the same transaction.
    let t = c
        .txn(
            Txn::new()
                .when("a", CompareOp::Equal, CompareTarget::Version(2))
                .when("a", CompareOp::Equal, CompareTarget::Value(b"2".to_vec()))
                .when("missing", CompareOp::Equal, CompareTarget::Exists(false))
                .then(put("a", "3", true))
                .then(TxnOp::Get { key: b"a".to_vec() })
                .otherwise(put("a", "wrong", false)),
        )
        .await
        .expect("txn");
    assert!(t.succeeded && !t.replayed);
    assert_eq!(t.revision, w4.revision + 1);
    match &t.results[..] {
        [TxnOpResult::Put { prev: Some(prev) }, TxnOpResult::Get { kv: Some(now) }] => {
            assert_eq!(prev.value, b"2");
            assert_eq!(now.value, b"3");
            assert_eq!(now.meta.version, 3);
            assert_eq!(now.meta.mod_revision, t.revision);
        }
        other => panic!("unexpected results {other:?}"),
    }
    // One that fails: the other branch runs. A missing key fails every value comparison,
    // and has version 0.
    let t2 = c
        .txn(
            Txn::new()
                .when("missing", CompareOp::NotEqual, CompareTarget::Value(b"x".to_vec()))
                .then(put("a", "wrong", false))
                .otherwise(TxnOp::Delete { key: b"b".to_vec(), prev_kv: true })
                .otherwise(TxnOp::DeleteRange { start: b"c".to_vec(), end: b"d".to_vec() }),
        )
        .await
        .expect("txn");
    assert!(!t2.succeeded);
    assert_eq!(t2.revision, t.revision + 1, "one revision for the whole transaction");
    match &t2.results[..] {
        [TxnOpResult::Delete { deleted: 1, prev: Some(p) }, TxnOpResult::DeleteRange { deleted: 1 }] => {
            assert_eq!(p.value, b"x")
        }
        other => panic!("unexpected results {other:?}"),
    }
    assert_eq!(c.get("b").await.expect("get"), None);
    assert_eq!(c.get("a").await.expect("get").as_deref(), Some(&b"3"[..]));
    let t3 = c
        .txn(
            Txn::new()
                .when("missing", CompareOp::Equal, CompareTarget::Version(0))
                .then(TxnOp::Get { key: b"a".to_vec() }),
        )
        .await
        .expect("txn");
    assert!(t3.succeeded);
    assert_eq!(t3.revision, t2.revision, "a transaction that only reads changes nothing");
    // A recreated key starts a new life: new create revision, version 1.
    let w5 = c.write_full(vec![WriteOp::Put { key: b"b".to_vec(), value: b"again".to_vec() }]).await.expect("put");
    let (kv, _) = c.get_kv("b", Consistency::Linearizable).await.expect("get");
    assert_eq!(
        kv.expect("b").meta,
        KeyMeta { create_revision: w5.revision, mod_revision: w5.revision, version: 1, lease: 0 }
    );
    // Bad input is refused whole.
    let bad = c.txn(Txn::new().then(TxnOp::DeleteRange { start: b"z".to_vec(), end: b"a".to_vec() })).await;
    assert!(bad.is_err(), "an empty range was accepted");

    // Reads at a past revision see the state as it was then.
    let at = |key: &'static str, rev: u64| {
        let c = c.clone();
        async move {
            let (kv, read) = c.get_kv_at(key, rev, Consistency::Linearizable).await.expect("get at");
            assert_eq!(read, rev, "the revision read is the one asked");
            kv.map(|kv| (String::from_utf8(kv.value).expect("utf8"), kv.meta.version))
        }
    };
    assert_eq!(at("a", w1.revision).await, Some(("1".into(), 1)));
    assert_eq!(at("a", w2.revision).await, Some(("2".into(), 2)));
    assert_eq!(at("b", w2.revision).await, None, "b did not exist yet");
    assert_eq!(at("b", w4.revision).await, Some(("x".into(), 1)));
    assert_eq!(at("b", t2.revision).await, None, "b was deleted");
    assert_eq!(at("b", w5.revision).await, Some(("again".into(), 1)));
    let keys = |p: &cairn_kv_client::ScanPage| {
        p.pairs
            .iter()
            .map(|(k, v)| format!("{}={}", String::from_utf8_lossy(k), String::from_utf8_lossy(v)))
            .collect::<Vec<_>>()
    };
    let page = c.scan_at("", None, 0, false, Consistency::Linearizable, w4.revision).await.expect("scan at");
    assert_eq!(keys(&page), ["a=2", "b=x", "c=y"]);
    assert_eq!(page.revision, w4.revision);
    let page = c.scan_at("", None, 0, false, Consistency::Serializable, t2.revision).await.expect("scan at");
    assert_eq!(keys(&page), ["a=3"], "b and c deleted, a changed by the transaction");
    let page = c.scan_at("", None, 2, false, Consistency::Linearizable, w4.revision).await.expect("scan at");
    assert_eq!((keys(&page), page.more), (vec!["a=2".to_string(), "b=x".to_string()], true));
    let page = c.scan_at("b\0", None, 2, true, Consistency::Linearizable, w4.revision).await.expect("scan at");
    assert_eq!((keys(&page), page.more), (vec!["c=".to_string()], false), "the next page of the same state");
    let refused = |r: Result<(Option<cairn_kv_client::protocol::KeyValue>, u64), cairn_kv_client::Error>| match r {
        Err(cairn_kv_client::Error::Refused(info)) => (info.code, info.message),
        other => panic!("expected a refusal, got {other:?}"),
    };
    let (code, _) = refused(c.get_kv_at("a", w5.revision + 100, Consistency::Linearizable).await);
    assert_eq!(code, cairn_kv_client::protocol::ErrorCode::BadRequest, "a future revision");
    // Compacting at t's revision keeps every change from it on: the state
    // at the revision before it (w4's) can still be read, no earlier one.
    c.compact(t.revision).await.expect("compact");
    assert_eq!(at("a", w4.revision).await, Some(("2".into(), 2)));
    let (code, message) = refused(c.get_kv_at("a", w2.revision - 1, Consistency::Linearizable).await);
    assert_eq!(code, cairn_kv_client::protocol::ErrorCode::Compacted);
    assert!(message.contains(&format!("oldest revision readable is {}", w4.revision)), "{message}");

    // Every replica holds the same revision.
    cluster.converged(Duration::from_secs(20)).await;
}

/// `clients` clients each add one to a counter `per_client` times by
/// compare-and-swap (read the value and its modification revision, then a
/// transaction that writes value + 1 only if the revision is unchanged),
/// while the leader is killed and restarted. Every increment is retried
/// through the client's session until its outcome is definite, so the
/// counter ends at exactly the number of increments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_swap_increments_are_exact_under_leader_kills() {
    let (n, expected) = cas_increments(&[]).await;
    assert_eq!(n, expected, "increments were lost or applied twice");
}

/// A transaction sent twice with the same session sequence number (a
/// client's retry after a lost answer) applies once: the retry gets the
/// first outcome, marked replayed. Teeth: with `CAIRN_TEST_IGNORE_SESSIONS=1`
/// the retry applies again (its comparison now fails), which the same
/// checks catch.
async fn retried_txn(env: &[(&str, &str)]) -> (cairn_kv_client::TxnResult, cairn_kv_client::TxnResult, Vec<u8>) {
    let cluster = Cluster::start(env);
    cluster.leader(Duration::from_secs(20)).await;
    let c = cluster.client();
    let id = c.session_id().await.expect("session");
    let cas = || {
        Txn::new()
            .when("once", CompareOp::Equal, CompareTarget::ModRevision(0))
            .then(TxnOp::Put { key: b"once".to_vec(), value: b"1".to_vec(), prev_kv: false, lease: 0 })
            .otherwise(TxnOp::Put { key: b"once".to_vec(), value: b"2".to_vec(), prev_kv: false, lease: 0 })
    };
    let first = c.txn_with(id, 1, cas()).await.expect("txn");
    let again = c.txn_with(id, 1, cas()).await.expect("retry");
    let v = c.get("once").await.expect("get").expect("once");
    (first, again, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_transaction_applies_once() {
    let (first, again, v) = retried_txn(&[]).await;
    assert!(first.succeeded && !first.replayed);
    assert!(again.succeeded && again.replayed, "the retry got {again:?}");
    assert_eq!(again.revision, first.revision);
    assert_eq!(v, b"1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignoring_sessions_applies_a_retried_transaction_twice() {
    let (first, again, v) = retried_txn(&[("CAIRN_TEST_IGNORE_SESSIONS", "1")]).await;
    assert!(first.succeeded);
    assert!(!again.succeeded && !again.replayed, "the switch should make the retry apply again: {again:?}");
    assert_eq!(v, b"2", "the second application ran the other branch");
}

/// The run of the increment test above: returns the final counter and the number of increments.
async fn cas_increments(env: &[(&str, &str)]) -> (u64, u64) {
    let mut cluster = Cluster::start(env);
    cluster.leader(Duration::from_secs(20)).await;
    let (clients, per_client) = (4u64, 120u64);
    let conflicts = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..clients {
        let mut o = cluster.options();
        o.retry_deadline = Duration::from_secs(30);
        let c = Client::new(o).expect("client");
        let conflicts = conflicts.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_client {
                loop {
                    let (kv, _) = c.get_kv("counter", Consistency::Linearizable).await.expect("read the counter");
                    let (n, rev) = match &kv {
                        Some(kv) => {
                            (String::from_utf8_lossy(&kv.value).parse::<u64>().expect("a number"), kv.meta.mod_revision)
                        }
                        None => (0, 0),
                    };
                    let t = Txn::new().when("counter", CompareOp::Equal, CompareTarget::ModRevision(rev)).then(
                        TxnOp::Put {
                            key: b"counter".to_vec(),
                            value: (n + 1).to_string().into_bytes(),
                            prev_kv: false,
                            lease: 0,
                        },
                    );
                    match c.txn(t).await {
                        Ok(r) if r.succeeded => break,
                        Ok(_) => {
                            conflicts.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("client {w}: an increment's outcome stayed unknown: {e}"),
                    }
                }
            }
        }));
    }
    let started = Instant::now();
    let mut kills = 0;
    while !tasks.iter().all(|t| t.is_finished()) && kills < 4 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let leader = cluster.leader(Duration::from_secs(20)).await;
        cluster.kill(leader);
        kills += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.start_node(leader);
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let c = cluster.client();
    let v = c.get("counter").await.expect("get").expect("the counter exists");
    let n: u64 = String::from_utf8_lossy(&v).parse().expect("a number");
    eprintln!(
        "{} increments by {clients} clients in {:?} with {kills} leader kills; {} compare failures retried; \
         the counter reads {n}",
        clients * per_client,
        started.elapsed(),
        conflicts.load(Ordering::Relaxed)
    );
    assert!(kills >= 1, "the run ended before any leader was killed");
    cluster.converged(Duration::from_secs(30)).await;
    (n, clients * per_client)
}
