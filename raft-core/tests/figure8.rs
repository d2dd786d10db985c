//! Figure 8 of the Raft paper, scripted: a leader must not commit an entry of
//! an earlier term by counting its replicas. With the test-only mutation that
//! does, an entry is applied and later overwritten; with the real rule, never.

use std::collections::BTreeMap;

use cairn_raft_core::{Body, Config, EntryKind, MemStore, Message, Mutation, NodeId, RawNode, Role, Term};

/// What a node applied at an index.
type Applied = (Term, EntryKind, Vec<u8>);

struct Cluster {
    nodes: Vec<RawNode<MemStore>>,
    queue: Vec<Message>,
    /// Per node: index -> (term, kind, data) applied.
    applied: Vec<BTreeMap<u64, Applied>>,
}

impl Cluster {
    fn new(mutation: Option<Mutation>) -> Cluster {
        let peers: Vec<NodeId> = (1..=5).map(NodeId).collect();
        let nodes = peers
            .iter()
            .map(|&id| {
                let mut c = Config::new(id, peers.clone(), 1);
                c.pre_vote = false;
                c.check_quorum = false;
                c.election_ticks = 1000;
                c.msg_bytes_max = 1; // one entry per append
                c.mutation = mutation;
                RawNode::new(c, MemStore::new()).expect("config")
            })
            .collect();
        Cluster { nodes, queue: Vec::new(), applied: vec![BTreeMap::new(); 5] }
    }

    /// Persists synchronously and applies; queues what the node sends.
    fn flush(&mut self, i: usize) {
        while let Some(rd) = self.nodes[i].ready_in_memory().expect("to itself") {
            self.queue.extend(rd.messages);
            for e in rd.committed_entries {
                self.applied[i].insert(e.index.0, (e.term, e.kind, e.data.to_vec()));
            }
        }
    }

    /// Delivers queued messages `allow` lets through (dropping the others)
    /// until nothing more is sent.
    fn deliver(&mut self, allow: &dyn Fn(&Message) -> bool) {
        for i in 0..5 {
            self.flush(i);
        }
        while !self.queue.is_empty() {
            for m in std::mem::take(&mut self.queue) {
                if allow(&m) {
                    let to = m.to.0 as usize - 1;
                    self.nodes[to].step(m).expect("step");
                    self.flush(to);
                }
            }
        }
    }

    fn campaign(&mut self, i: usize) {
        self.nodes[i].campaign();
        self.flush(i);
    }
}

fn among(ids: &'static [u64]) -> impl Fn(&Message) -> bool {
    move |m| ids.contains(&m.from.0) && ids.contains(&m.to.0)
}

fn carries_index(m: &Message, index: u64) -> bool {
    matches!(&m.body, Body::Append { entries, .. } if entries.iter().any(|e| e.index.0 == index))
}

/// Runs the scenario; returns whether two nodes applied different entries at one index.
fn scenario(mutation: Option<Mutation>) -> bool {
    let mut c = Cluster::new(mutation);
    // Term 1: S1 leads; its no-op (index 1) commits everywhere.
    c.campaign(0);
    c.deliver(&|_| true);
    assert_eq!(c.nodes[0].role(), Role::Leader);
    // S1 appends X at index 2; only S2 gets it. S1 is then cut off.
    c.nodes[0].propose(vec![b"X".to_vec()]).expect("leader");
    c.deliver(&among(&[1, 2]));
    // Term 2: S5 wins with S3 and S4; its no-op at index 2 reaches no one. S1
    // hears S5's vote request (and refuses it: its log is longer), so it steps down.
    c.campaign(4);
    c.deliver(&|m| (among(&[3, 4, 5])(m) || (m.from.0 == 5 && m.to.0 == 1)) && !matches!(m.body, Body::Append { .. }));
    assert_eq!(c.nodes[4].role(), Role::Leader);
    assert_eq!(c.nodes[0].role(), Role::Follower);
    // Term 3: S1 wins with S2, S3 and S4 (S5 hears the request and steps down).
    // X reaches S3 (its first append, carrying index 3 after prev 2, is refused
    // and S1 backs off to send index 2 alone); S1's own no-op (index 3) then
    // reaches only S2. S4 hears nothing but the vote.
    c.campaign(0);
    let index3_to_s3 = std::cell::Cell::new(0);
    c.deliver(&|m| {
        let votes = matches!(m.body, Body::Vote { .. } | Body::VoteResponse { .. });
        if m.to.0 == 3 && carries_index(m, 3) {
            index3_to_s3.set(index3_to_s3.get() + 1);
            return index3_to_s3.get() == 1;
        }
        (votes && (among(&[1, 2, 3, 4])(m) || (m.from.0 == 1 && m.to.0 == 5))) || among(&[1, 2])(m) || among(&[1, 3])(m)
    });
    assert_eq!(c.nodes[0].role(), Role::Leader);
    assert_eq!(c.nodes[0].term(), Term(3));
    // S1 is cut off again. Term 4: S5 wins with S3 and S4 and overwrites index 2.
    c.campaign(4);
    c.deliver(&among(&[3, 4, 5]));
    assert_eq!(c.nodes[4].role(), Role::Leader);
    assert_eq!(c.nodes[4].term(), Term(4));
    // Did two nodes apply different entries at the same index?
    let mut seen: BTreeMap<u64, Applied> = BTreeMap::new();
    let mut conflict = false;
    for a in &c.applied {
        for (i, e) in a {
            match seen.get(i) {
                Some(x) if x != e => conflict = true,
                Some(_) => {}
                None => {
                    seen.insert(*i, e.clone());
                }
            }
        }
    }
    conflict
}

#[test]
fn an_earlier_terms_entry_is_not_committed_by_counting_replicas() {
    assert!(!scenario(None), "the real commit rule let two nodes apply different entries");
}

#[test]
fn the_figure_8_mutation_is_caught() {
    assert!(scenario(Some(Mutation::CommitEarlierTerm)), "counting replicas of an earlier term went unnoticed");
}
