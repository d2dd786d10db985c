//! The byte bounds that keep a node's memory in hand: entries handed to apply
//! and not yet applied (`applying_bytes_max`), and a leader's proposals not
//! yet committed and durable (`uncommitted_bytes_max`).

use cairn_raft_core::{Config, LogIndex, MemStore, Message, NodeId, ProposeError, RawNode};

const ENTRY: usize = 1000; // data bytes; 1,024 with the entry's overhead
const SIZE: u64 = ENTRY as u64 + 24;

/// A single-node cluster, elected.
fn leader(applying_max: u64, apply_per_ready: u64, uncommitted_max: u64) -> RawNode<MemStore> {
    let mut c = Config::new(NodeId(1), vec![NodeId(1)], 1);
    c.applying_bytes_max = applying_max;
    c.apply_bytes_max = apply_per_ready;
    c.uncommitted_bytes_max = uncommitted_max;
    let mut n = RawNode::new(c, MemStore::new()).expect("config");
    n.campaign();
    while n.ready_in_memory().expect("ready").is_some() {}
    assert!(n.role() == cairn_raft_core::Role::Leader);
    // Apply the new term's no-op.
    let last = n.commit_index();
    n.on_applied(last);
    n
}

/// Takes every `Ready` (persisting at once), applying nothing; returns the
/// entries handed to apply, in order.
fn drain(n: &mut RawNode<MemStore>) -> Vec<LogIndex> {
    let mut handed = Vec::new();
    while let Some(rd) = n.ready_in_memory().expect("ready") {
        handed.extend(rd.committed_entries.iter().map(|e| e.index));
    }
    handed
}

#[test]
fn entries_handed_to_apply_stay_within_the_bound_until_applied() {
    // 10 entries' worth in flight at most, 4 per Ready.
    let mut n = leader(10 * SIZE, 4 * SIZE, u64::MAX);
    let first = n.commit_index().0 + 1;
    for _ in 0..100 {
        n.propose(vec![vec![7; ENTRY]]).expect("propose");
    }
    let mut handed = drain(&mut n);
    assert_eq!(handed.len(), 10, "handed before any was applied: {handed:?}");
    assert_eq!(n.commit_index().0, first + 99, "everything committed meanwhile");

    // Applying part of what was handed frees room for that much only.
    n.on_applied(LogIndex(first + 3));
    let more = drain(&mut n);
    assert_eq!(more.len(), 4, "after 4 applied: {more:?}");
    handed.extend(more);
    // Then everything, in order, as each batch is applied.
    while handed.len() < 100 {
        n.on_applied(*handed.last().expect("some"));
        let more = drain(&mut n);
        assert!(!more.is_empty() && more.len() <= 10, "{more:?}");
        handed.extend(more);
    }
    let want: Vec<LogIndex> = (first..first + 100).map(LogIndex).collect();
    assert_eq!(handed, want);
}

#[test]
fn an_entry_larger_than_the_bound_is_applied_alone() {
    let mut n = leader(SIZE / 2, SIZE / 2, u64::MAX);
    for _ in 0..3 {
        n.propose(vec![vec![1; ENTRY]]).expect("propose");
    }
    let mut handed = Vec::new();
    for round in 0..3 {
        let more = drain(&mut n);
        assert_eq!(more.len(), 1, "round {round}: {more:?}");
        n.on_applied(more[0]);
        handed.extend(more);
    }
    assert!(drain(&mut n).is_empty());
}

/// Every node's messages from its `Ready`s (persisting at once).
fn out(n: &mut RawNode<MemStore>) -> Vec<Message> {
    let mut msgs = Vec::new();
    while let Some(rd) = n.ready_in_memory().expect("ready") {
        msgs.extend(rd.messages);
    }
    msgs
}

fn deliver(nodes: &mut [RawNode<MemStore>], msgs: Vec<Message>) {
    for m in msgs {
        let to = m.to.0 as usize - 1;
        nodes[to].step(m).expect("step");
    }
}

/// Delivers until no node has anything to say.
fn settle(nodes: &mut [RawNode<MemStore>]) {
    loop {
        let msgs: Vec<Message> = nodes.iter_mut().flat_map(out).collect();
        if msgs.is_empty() {
            return;
        }
        deliver(nodes, msgs);
    }
}

#[test]
fn a_leader_refuses_proposals_while_earlier_ones_are_outstanding() {
    // Three nodes, so that what commits is up to the test.
    let peers = vec![NodeId(1), NodeId(2), NodeId(3)];
    let mut nodes: Vec<RawNode<MemStore>> = peers
        .iter()
        .map(|&id| {
            let mut c = Config::new(id, peers.clone(), id.0);
            c.uncommitted_bytes_max = 8 * SIZE;
            RawNode::new(c, MemStore::new()).expect("config")
        })
        .collect();
    nodes[0].campaign();
    settle(&mut nodes);
    assert!(nodes[0].role() == cairn_raft_core::Role::Leader);
    let batch = |n: usize| vec![vec![5u8; ENTRY]; n];

    // A (4 entries) and B (4) go out; only A reaches the followers.
    let a_last = nodes[0].propose(batch(4)).expect("A");
    let to_a = out(&mut nodes[0]);
    let b_last = nodes[0].propose(batch(4)).expect("B");
    let to_b = out(&mut nodes[0]);
    deliver(&mut nodes, to_a);
    let answers: Vec<Message> = nodes[1..].iter_mut().flat_map(out).collect();
    deliver(&mut nodes, answers);
    let held = out(&mut nodes[0]);
    let commit = nodes[0].commit_index();
    assert!(commit >= a_last && commit < b_last, "commit {commit:?}, A ends at {a_last:?}, B at {b_last:?}");

    // B's 4 are still outstanding: 5 more would pass the bound of 8, 4 do not.
    assert!(
        matches!(nodes[0].propose(batch(5)), Err(ProposeError::TooManyUncommittedBytes)),
        "a commit of earlier entries made room for entries still outstanding"
    );
    nodes[0].propose(batch(4)).expect("C fits beside B");
    assert!(matches!(nodes[0].propose(batch(1)), Err(ProposeError::TooManyUncommittedBytes)));

    // Once everything commits, the whole bound is free again.
    deliver(&mut nodes, to_b);
    deliver(&mut nodes, held);
    settle(&mut nodes);
    assert_eq!(nodes[0].commit_index(), nodes[0].last_index());
    nodes[0].propose(batch(8)).expect("a full bound after everything committed");
}
