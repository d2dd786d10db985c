//! `cargo bench -p cairn-raft-core`: a 3-node cluster in memory (MemStore,
//! persistence done at once, messages delivered at once): committed entries
//! per second for 100-byte proposals in batches of 1 and 64, and the cost of
//! one follower `step` + `ready` + `advance` cycle for a one-entry append.
#![allow(missing_docs)] // the criterion macros generate an undocumented function

use std::collections::VecDeque;

use cairn_raft_core::{Body, Config, Entry, EntryKind, LogIndex, MemStore, Message, NodeId, RawNode, Role, Term};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

struct Cluster {
    nodes: Vec<RawNode<MemStore>>,
    queue: VecDeque<Message>,
    applied: Vec<u64>,
}

impl Cluster {
    fn new() -> Cluster {
        let peers: Vec<NodeId> = (1..=3).map(NodeId).collect();
        let nodes = peers
            .iter()
            .map(|&id| RawNode::new(Config::new(id, peers.clone(), 9), MemStore::new()).expect("config"))
            .collect();
        let mut c = Cluster { nodes, queue: VecDeque::new(), applied: vec![0; 3] };
        c.nodes[0].campaign();
        c.pump();
        assert_eq!(c.nodes[0].role(), Role::Leader);
        c
    }

    fn handle_ready(&mut self, i: usize) -> bool {
        let Some(rd) = self.nodes[i].ready_in_memory().expect("self") else {
            return false;
        };
        self.queue.extend(rd.messages);
        if let Some(e) = rd.committed_entries.last() {
            self.applied[i] = e.index.0;
        }
        true
    }

    fn pump(&mut self) {
        loop {
            let mut busy = false;
            for i in 0..3 {
                busy |= self.handle_ready(i);
            }
            while let Some(m) = self.queue.pop_front() {
                let to = m.to.0 as usize - 1;
                self.nodes[to].step(m).expect("step");
                busy = true;
            }
            if !busy {
                return;
            }
        }
    }
}

fn commit_throughput(c: &mut Criterion) {
    let mut g = c.benchmark_group("commit_100B");
    for batch in [1usize, 64] {
        g.throughput(Throughput::Elements(batch as u64));
        let mut cl = Cluster::new();
        let payload = vec![0x5au8; 100];
        g.bench_function(BenchmarkId::new("batch", batch), |b| {
            b.iter(|| {
                let last = cl.nodes[0].propose(vec![payload.clone(); batch]).expect("leader");
                cl.pump();
                assert!(cl.applied[0] >= last.0);
            })
        });
    }
    g.finish();
}

fn step_ready_cycle(c: &mut Criterion) {
    let peers: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let mut follower = RawNode::new(Config::new(NodeId(2), peers, 3), MemStore::new()).expect("config");
    let mut index = 0u64;
    c.bench_function("follower_step_ready_advance_1_entry", |b| {
        b.iter(|| {
            index += 1;
            let entry =
                Entry { term: Term(1), index: LogIndex(index), kind: EntryKind::Normal, data: vec![0; 100].into() };
            let m = Message {
                from: NodeId(1),
                to: NodeId(2),
                term: Term(1),
                body: Body::Append {
                    prev_index: LogIndex(index - 1),
                    prev_term: Term(if index == 1 { 0 } else { 1 }),
                    entries: vec![entry],
                    commit: LogIndex(index - 1),
                    read_seq: 0,
                },
            };
            follower.step(m).expect("step");
            let rd = follower.ready();
            follower.advance(&rd);
            follower.store_mut().append(&rd.entries);
            if let Some(hs) = rd.hard_state {
                follower.store_mut().set_hard_state(hs);
            }
            follower.on_persisted(LogIndex(index), Term(1));
            rd
        })
    });
}

criterion_group!(benches, commit_throughput, step_ready_cycle);
criterion_main!(benches);
