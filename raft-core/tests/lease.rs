//! Lease reads, scripted: served at once while a quorum recently acknowledged
//! the leader (by the caller's clock); a leader frozen past its lease, woken
//! up still believing it leads, must not serve from the lease. With the
//! test-only mutation that measures the lease in ticks (a frozen leader gets
//! none), it does, and the read is stale.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use cairn_raft_core::{Config, LogIndex, MemStore, Message, Mutation, NodeId, RawNode, Role};

struct Cluster {
    nodes: Vec<RawNode<MemStore>>,
    queue: VecDeque<Message>,
    t0: Instant,
}

impl Cluster {
    fn new(mutation: Option<Mutation>, lease: bool) -> Cluster {
        let peers: Vec<NodeId> = (1..=3).map(NodeId).collect();
        let nodes = peers
            .iter()
            .map(|&id| {
                let mut c = Config::new(id, peers.clone(), id.0);
                // 10 ticks of 2 ms, minus drift.
                c.lease_read_duration = lease.then_some(Duration::from_millis(16));
                c.mutation = mutation;
                RawNode::new(c, MemStore::new()).expect("config")
            })
            .collect();
        Cluster { nodes, queue: VecDeque::new(), t0: Instant::now() }
    }

    fn flush(&mut self, i: usize) -> Vec<LogIndex> {
        let mut reads = Vec::new();
        while let Some(rd) = self.nodes[i].ready_in_memory().expect("self") {
            self.queue.extend(rd.messages);
            reads.extend(rd.read_states.iter().map(|r| r.index));
        }
        reads
    }

    /// Delivers until quiet among `up` (others' messages are lost).
    fn settle(&mut self, up: &[usize]) {
        for &i in up {
            self.flush(i);
        }
        while let Some(m) = self.queue.pop_front() {
            let to = m.to.0 as usize - 1;
            if up.contains(&to) && up.contains(&(m.from.0 as usize - 1)) {
                self.nodes[to].step(m).expect("step");
                self.flush(to);
            }
        }
    }

    /// `ticks` ticks of 2 ms on the nodes in `up`, messages delivered among them.
    fn run(&mut self, up: &[usize], from_ms: u64, ticks: u64) -> u64 {
        let mut ms = from_ms;
        for _ in 0..ticks {
            ms += 2;
            let now = self.t0 + Duration::from_millis(ms);
            for &i in up {
                self.nodes[i].tick_at(now);
            }
            self.settle(up);
        }
        ms
    }
}

/// Returns the index a read at the woken-up old leader was served at right
/// away, if it was, and the commit index of the new leader.
fn frozen_leader(mutation: Option<Mutation>, lease: bool) -> (Option<LogIndex>, LogIndex) {
    let mut c = Cluster::new(mutation, lease);
    let all = [0, 1, 2];
    // Time passes until someone leads (with leases, nobody votes within the
    // first election timeout after starting).
    let mut ms = c.run(&all, 0, 60);
    let old = (0..3).find(|&i| c.nodes[i].role() == Role::Leader).expect("a leader");
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    // While the lease holds, a read is served at once.
    if lease {
        c.nodes[old].read_index_at(b"r1".to_vec(), c.t0 + Duration::from_millis(ms)).expect("leader");
        assert_eq!(c.flush(old).len(), 1, "a read under a valid lease is served at once");
    }
    // The leader freezes; the others elect a new leader and commit.
    ms = c.run(&others, ms, 60);
    let new = others.iter().copied().find(|&i| c.nodes[i].role() == Role::Leader).expect("a new leader");
    c.nodes[new].propose(vec![b"w".to_vec()]).expect("new leader");
    c.settle(&others);
    let new_commit = c.nodes[new].commit_index();
    // The old leader wakes up, still believing it leads, and gets a read first.
    assert_eq!(c.nodes[old].role(), Role::Leader);
    c.nodes[old].read_index_at(b"r2".to_vec(), c.t0 + Duration::from_millis(ms + 2)).expect("still thinks it leads");
    (c.flush(old).first().copied(), new_commit)
}

#[test]
fn a_frozen_leader_does_not_read_from_an_expired_lease() {
    let (served, _) = frozen_leader(None, true);
    assert_eq!(served, None, "the lease ran out while the leader was frozen");
}

#[test]
fn a_frozen_leader_confirms_before_it_serves_a_read_index() {
    let (served, _) = frozen_leader(None, false);
    assert_eq!(served, None, "no quorum confirms the woken leader");
}

/// The seed's third bug: a leader serving reads without confirming it still leads.
#[test]
fn reading_without_a_quorum_is_caught() {
    let (served, new_commit) = frozen_leader(Some(Mutation::ReadWithoutQuorum), false);
    let served = served.expect("with the mutation the stale leader serves at once");
    assert!(served < new_commit, "stale: served at {served:?}, the new leader committed {new_commit:?}");
}

#[test]
fn a_lease_counted_in_ticks_is_caught() {
    let (served, new_commit) = frozen_leader(Some(Mutation::LeaseCountsTicks), true);
    let served = served.expect("with the mutation the stale leader serves from its lease");
    assert!(served < new_commit, "stale: served at {served:?}, the new leader committed {new_commit:?}");
}

/// A leader handing over leadership serves no read from its lease: the
/// successor's forced election passes the followers' leases. (Two guards do
/// it: `transfer_leader` ends the lease, and a lease read checks that no
/// transfer is pending; removing both makes this test fail.)
#[test]
fn no_lease_read_during_a_leadership_transfer() {
    let mut c = Cluster::new(None, true);
    let all = [0, 1, 2];
    let ms = c.run(&all, 0, 60);
    let old = (0..3).find(|&i| c.nodes[i].role() == Role::Leader).expect("a leader");
    let now = c.t0 + Duration::from_millis(ms);
    c.nodes[old].read_index_at(b"before".to_vec(), now).expect("leader");
    assert_eq!(c.flush(old).len(), 1, "control: a read under a valid lease is served at once");
    // Transfer to a follower that is cut off, so the transfer stays pending.
    let target = (0..3).find(|&i| i != old).expect("a follower");
    let up: Vec<usize> = (0..3).filter(|&i| i != target).collect();
    c.nodes[old].transfer_leader(NodeId(target as u64 + 1)).expect("transfer starts");
    c.settle(&up);
    assert_eq!(c.nodes[old].role(), Role::Leader);
    // Refused outright would be safe too; accepted, it must wait for a quorum.
    if c.nodes[old].read_index_at(b"during".to_vec(), now + Duration::from_millis(1)).is_ok() {
        assert!(c.flush(old).is_empty(), "a lease read was served during a transfer");
    }
}

/// With lease reads on, a node that has just started may be inside a lease it
/// cannot know of, so it grants no vote for an election timeout.
#[test]
fn a_just_started_node_grants_no_vote_while_a_lease_may_hold() {
    let all = [0, 1, 2];
    let mut with = Cluster::new(None, true);
    with.nodes[1].campaign();
    with.settle(&all);
    assert_ne!(with.nodes[1].role(), Role::Leader, "just-started peers voted inside a possible lease");
    let mut without = Cluster::new(None, false);
    without.nodes[1].campaign();
    without.settle(&all);
    assert_eq!(without.nodes[1].role(), Role::Leader, "control: without leases the campaign wins at once");
}
