//! Watch end to end: the history from a revision, then live events, in
//! revision order and each once; a compacted history is refused with the
//! oldest revision left; and a watcher that loses its node again and again
//! (kill -9 of the node it reads from, of the leader) receives exactly the
//! writes that were made, checked against the writers' own record.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_kv_client::protocol::{EventKind, WatchEvent, WriteOp};
use cairn_kv_client::{Client, Error, WatchMessage, WatchOptions};
use common::Cluster;

/// Receives events until `until` returns true of the events so far, at most `within`.
async fn collect(
    rx: &mut tokio::sync::mpsc::Receiver<cairn_kv_client::Result<WatchMessage>>,
    within: Duration,
    until: impl Fn(&[WatchEvent]) -> bool,
) -> Vec<WatchEvent> {
    let mut got = Vec::new();
    let deadline = Instant::now() + within;
    while !until(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(Ok(WatchMessage::Events { events, .. }))) => got.extend(events),
            Ok(Some(Ok(WatchMessage::Progress { .. }))) => {}
            Ok(Some(Err(e))) => panic!("the watch failed: {e}"),
            Ok(None) => panic!("the watch ended"),
            Err(_) => panic!("the events did not all arrive in {within:?}: {got:?}"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_delivers_history_then_live_events_in_order() {
    let cluster = Cluster::start(&[]);
    cluster.leader(Duration::from_secs(20)).await;
    let c = cluster.client();
    let w1 = c.write_full(vec![WriteOp::Put { key: b"w/a".to_vec(), value: b"1".to_vec() }]).await.expect("put");
    c.put("other", "x").await.expect("put");
    c.put("w/b", "2").await.expect("put");
    // From the history: the two writes under w/ since w1.
    let mut rx = c.watch(WatchOptions::prefix("w/").from_revision(w1.revision).with_prev_kv());
    let got = collect(&mut rx, Duration::from_secs(10), |g| g.len() >= 2).await;
    assert_eq!(got.iter().map(|e| e.kv.key.as_slice()).collect::<Vec<_>>(), [&b"w/a"[..], b"w/b"]);
    assert_eq!(got[0].revision, w1.revision);
    // Live: a put over an existing key (with its previous value), a delete, a range delete.
    c.put("w/a", "3").await.expect("put");
    c.delete("w/b").await.expect("delete");
    c.put("w/c", "4").await.expect("put");
    c.write(vec![WriteOp::DeleteRange { start: b"w/".to_vec(), end: b"w0".to_vec() }]).await.expect("range delete");
    let got = collect(&mut rx, Duration::from_secs(10), |g| g.len() >= 5).await;
    let kinds: Vec<(EventKind, &[u8])> = got.iter().map(|e| (e.kind, e.kv.key.as_slice())).collect();
    assert_eq!(
        kinds,
        [
            (EventKind::Put, &b"w/a"[..]),
            (EventKind::Delete, b"w/b"),
            (EventKind::Put, b"w/c"),
            (EventKind::Delete, b"w/a"),
            (EventKind::Delete, b"w/c"),
        ]
    );
    assert_eq!(got[0].prev.as_ref().map(|p| p.value.as_slice()), Some(&b"1"[..]));
    assert_eq!(got[0].kv.meta.version, 2);
    assert_eq!(got[3].revision, got[4].revision, "a range delete is one revision");
    assert!(got.windows(2).all(|w| w[0].revision <= w[1].revision));
    // A single key, from now: only its own changes.
    let mut one = c.watch(WatchOptions::key("solo"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.put("solo-not", "x").await.expect("put");
    c.put("solo", "y").await.expect("put");
    let got = collect(&mut one, Duration::from_secs(10), |g| !g.is_empty()).await;
    assert_eq!(got[0].kv.key, b"solo");

    // Compaction: a watch from before it is refused with the oldest revision left.
    let (_, now) = c.get_kv("solo", cairn_kv_client::Consistency::Linearizable).await.expect("get");
    c.compact(now).await.expect("compact");
    let mut old = c.watch(WatchOptions::prefix("w/").from_revision(w1.revision));
    match tokio::time::timeout(Duration::from_secs(10), old.recv()).await {
        Ok(Some(Err(Error::Compacted { oldest }))) => assert_eq!(oldest, now),
        other => panic!("expected a compacted error, got {other:?}"),
    }
    assert!(c.compact(now + 1_000).await.is_err(), "a compaction beyond the revision was accepted");
    cluster.converged(Duration::from_secs(20)).await;
}

/// With `history_retention_ms` set, the leader compacts the history older
/// than the retention by itself, and never what is younger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_older_than_its_retention_is_compacted() {
    let retention = Duration::from_millis(1500);
    let cluster = Cluster::start(&[("CAIRN_HISTORY_RETENTION_MS", "1500")]);
    cluster.leader(Duration::from_secs(20)).await;
    let c = cluster.client();
    let w1 = c.write_full(vec![WriteOp::Put { key: b"a".to_vec(), value: b"1".to_vec() }]).await.expect("put");
    let w2 = c.write_full(vec![WriteOp::Put { key: b"a".to_vec(), value: b"2".to_vec() }]).await.expect("put");
    let written = Instant::now();
    let read = c.get_kv_at("a", w1.revision, cairn_kv_client::Consistency::Linearizable).await;
    if written.elapsed() < retention {
        let (kv, _) = read.expect("a revision younger than the retention is readable");
        assert_eq!(kv.expect("a").value, b"1");
    }
    tokio::time::sleep(retention * 2).await;
    let w3 = c.write_full(vec![WriteOp::Put { key: b"a".to_vec(), value: b"3".to_vec() }]).await.expect("put");
    // The state as of `retention` ago (w2's) stays readable; older ones go.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match c.get_kv_at("a", w1.revision, cairn_kv_client::Consistency::Linearizable).await {
            Err(Error::Refused(info)) if info.code == cairn_kv_client::protocol::ErrorCode::Compacted => break,
            Ok(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("the history was not compacted by age: {other:?}"),
        }
    }
    let (kv, _) = c.get_kv_at("a", w2.revision, cairn_kv_client::Consistency::Linearizable).await.expect("read w2");
    assert_eq!(kv.expect("a").value, b"2");
    let mut old = c.watch(WatchOptions::key("a").from_revision(w1.revision));
    match tokio::time::timeout(Duration::from_secs(10), old.recv()).await {
        Ok(Some(Err(Error::Compacted { oldest }))) => assert_eq!(oldest, w3.revision),
        other => panic!("expected a compacted error, got {other:?}"),
    }
}

/// Writers put numbered values under `e/`, recording each write's revision;
/// a watcher connected to one node receives events while that node, and the
/// leader, are killed and restarted. The watcher must end with exactly the
/// written (revision, key, value) triples, in order, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_loses_its_node_again_and_again_misses_nothing_and_repeats_nothing() {
    let (seen, want) = watch_through_kills(&[]).await;
    assert_eq!(seen.len(), want.len(), "events delivered {} vs writes {}", seen.len(), want.len());
    assert_eq!(seen, want, "the watch's events differ from the writes");
    eprintln!("{} writes seen by the watcher, in order and once each, through 3 node kills", want.len());
}

/// Teeth: a node that serves a resumed watch from live events only (no
/// history) loses what was written while the watcher was away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_without_its_history_misses_events() {
    let (seen, want) = watch_through_kills(&[("CAIRN_TEST_WATCH_SKIP_HISTORY", "1")]).await;
    assert!(seen.len() < want.len(), "the switch should lose events: {} of {}", seen.len(), want.len());
}

type Triples = Vec<(u64, Vec<u8>, Vec<u8>)>;
/// Each write's revision, key and value.
type Written = BTreeMap<u64, (Vec<u8>, Vec<u8>)>;

/// The scenario of the two tests above: what the watcher saw and what was written.
async fn watch_through_kills(env: &[(&str, &str)]) -> (Triples, Triples) {
    let mut cluster = Cluster::start(env);
    cluster.leader(Duration::from_secs(20)).await;
    let written: Arc<Mutex<Written>> = Arc::default();
    let c = cluster.client();
    let (_, start) = c.get_kv("e/", cairn_kv_client::Consistency::Linearizable).await.expect("get");
    // The watcher reads from node 1 first (it moves on when node 1 dies).
    let watcher = Client::new(cluster.options()).expect("client");
    let mut rx = watcher.watch(WatchOptions::prefix("e/").from_revision(start + 1));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2u64 {
        let mut o = cluster.options();
        o.retry_deadline = Duration::from_secs(20);
        let c = Client::new(o).expect("client");
        let (written, stop) = (written.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (k, v) = (format!("e/{w}/{}", n % 20).into_bytes(), format!("{w}-{n}").into_bytes());
                match c.write_full(vec![WriteOp::Put { key: k.clone(), value: v.clone() }]).await {
                    Ok(r) => {
                        written.lock().expect("written").insert(r.revision, (k, v));
                    }
                    Err(e) => panic!("writer {w}: a write's outcome stayed unknown: {e}"),
                }
                n += 1;
            }
        }));
    }
    let got: Arc<Mutex<Vec<WatchEvent>>> = Arc::default();
    let reader = {
        let got = got.clone();
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                match m {
                    Ok(WatchMessage::Events { events, .. }) => got.lock().expect("got").extend(events),
                    Ok(WatchMessage::Progress { .. }) => {}
                    Err(e) => panic!("the watch failed: {e}"),
                }
            }
        })
    };
    // Kill the watcher's node, then the leader, then node 1 again.
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let victim = if round == 1 { cluster.leader(Duration::from_secs(20)).await } else { 1 };
        cluster.kill(victim);
        tokio::time::sleep(Duration::from_millis(700)).await;
        cluster.start_node(victim);
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    let end = c.write_full(vec![WriteOp::Put { key: b"e/end".to_vec(), value: b"end".to_vec() }]).await.expect("put");
    written.lock().expect("written").insert(end.revision, (b"e/end".to_vec(), b"end".to_vec()));
    // Wait for the last write to reach the watcher (at most 60 s; with the
    // test switch it may never come).
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && !got.lock().expect("got").iter().any(|e| e.kv.value == b"end") {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reader.abort();
    let want: Triples = written.lock().expect("written").iter().map(|(r, (k, v))| (*r, k.clone(), v.clone())).collect();
    let seen: Triples =
        got.lock().expect("got").iter().map(|e| (e.revision, e.kv.key.clone(), e.kv.value.clone())).collect();
    (seen, want)
}
