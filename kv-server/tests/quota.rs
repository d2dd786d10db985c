//! Disk full (DESIGN.md): a node over its space quota raises a replicated
//! alarm, so every replica refuses writes at the same entry.

mod common;

use std::time::Duration;

use cairn_kv_client::{Consistency, Error, ErrorCode};
use common::Cluster;

const NODE: u64 = 3;

/// What the scenario saw: puts refused for want of space, and whether the
/// replicas still agree.
struct Seen {
    refused: usize,
    converged: bool,
}

/// Node 3 alone gets a quota a little above what it holds, then 64 KiB puts
/// go in until well past it.
async fn quota_scenario(local_rule: bool) -> Seen {
    let mut cluster = Cluster::start(&[("CAIRN_QUOTA_CHECK_MS", "200"), ("CAIRN_WAL_SEGMENT_BYTES", "1048576")]);
    cluster.leader(Duration::from_secs(20)).await;
    let c = cluster.client();
    c.put("before", "1").await.expect("put");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let used = c.status_of(&cluster.endpoint(NODE), false).await.expect("status").used_bytes;
    assert!(used > 0, "node {NODE} reports no bytes used");
    assert!(cluster.stop(NODE));
    let mut env = vec![("CAIRN_QUOTA_BYTES".to_string(), (used + (1 << 20)).to_string())];
    if local_rule {
        env.push(("CAIRN_TEST_LOCAL_QUOTA".into(), "1".into()));
    }
    cluster.node_env.insert(NODE, env);
    cluster.start_node(NODE);
    cluster.converged(Duration::from_secs(30)).await;

    let mut refused = 0;
    for i in 0..80 {
        match c.put(format!("big-{i:03}"), vec![b'q'; 64 << 10]).await {
            Ok(_) => {}
            Err(Error::Refused(e)) if e.code == ErrorCode::NoSpace => {
                assert!(e.code.certainly_not_applied());
                refused += 1;
            }
            Err(e) => panic!("put {i}: {e}"),
        }
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    if refused > 0 {
        // Reads and deletes go on, so space can be freed.
        let (v, _) = c.get_with("before", Consistency::Linearizable).await.expect("get");
        assert_eq!(v.as_deref(), Some(&b"1"[..]));
        c.delete("big-000").await.expect("a delete is accepted under the alarm");
        for id in 1..=3 {
            let s = c.status_of(&cluster.endpoint(id), false).await.expect("status");
            assert_eq!(s.alarms, vec![NODE], "node {id} does not show the alarm: {s:?}");
        }
    }
    let converged = cluster.try_converged(Duration::from_secs(if local_rule { 5 } else { 30 })).await.is_ok();
    if !local_rule && refused > 0 {
        // Once the node has room again and the alarm is cleared, puts go on.
        assert!(cluster.stop(NODE));
        cluster.start_node(NODE);
        cluster.converged(Duration::from_secs(30)).await;
        c.alarm(0, false).await.expect("clear the alarm");
        c.put("after-clear", "1").await.expect("a put after the alarm was cleared");
    }
    Seen { refused, converged }
}

/// One node over its quota stops every replica from taking puts at the
/// same entry (the refusals are certain: the writes did not apply), while
/// reads and deletes go on, and the replicas keep one state; clearing the
/// alarm lets puts in again. With the rule broken on purpose (each node
/// refuses from its own disk), the replicas split and the test sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_over_its_quota_raises_the_alarm_for_the_whole_cluster() {
    let seen = quota_scenario(false).await;
    assert!(seen.refused > 0, "no put was refused although node {NODE} went over its quota");
    assert!(seen.converged, "the replicas differ under the alarm");
    let broken = quota_scenario(true).await;
    assert!(!broken.converged, "with each node deciding from its own disk the replicas still agreed: no teeth");
}
