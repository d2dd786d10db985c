//! Bad input from the network (unknown senders, stale or future terms,
//! indexes beyond the log, malformed appends, commit indexes beyond the log)
//! is refused or ignored, never a panic.

use cairn_raft_core::{Body, ConfState, Config, Entry, EntryKind, LogIndex, MemStore, Message, NodeId, RawNode, Term};
use proptest::prelude::*;

fn node_with_log(leader: bool) -> RawNode<MemStore> {
    let peers: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let mut n = RawNode::new(Config::new(NodeId(1), peers, 5), MemStore::new()).expect("config");
    if leader {
        n.campaign();
        for from in [2, 3] {
            let rd = n.ready();
            n.advance(&rd);
            let _ = n.step(Message {
                from: NodeId(from),
                to: NodeId(1),
                term: Term(1),
                body: Body::PreVoteResponse { granted: true },
            });
        }
        let rd = n.ready();
        n.advance(&rd);
        n.store_mut().append(&rd.entries);
        if let Some(hs) = rd.hard_state {
            n.store_mut().set_hard_state(hs);
        }
        for m in rd.persisted_messages {
            let _ = n.step(m);
        }
        let _ = n.step(Message {
            from: NodeId(2),
            to: NodeId(1),
            term: n.term(),
            body: Body::VoteResponse { granted: true },
        });
    }
    n
}

fn body() -> impl Strategy<Value = Body> {
    let idx = || (0u64..40).prop_map(LogIndex);
    let term = || (0u64..6).prop_map(Term);
    let entries = prop::collection::vec((0u64..40, 0u64..6), 0..6).prop_map(|v| {
        v.into_iter()
            .map(|(i, t)| Entry { term: Term(t), index: LogIndex(i), kind: EntryKind::Normal, data: vec![1].into() })
            .collect()
    });
    prop_oneof![
        (idx(), term(), entries, idx(), any::<u64>()).prop_map(|(prev_index, prev_term, entries, commit, read_seq)| {
            Body::Append { prev_index, prev_term, entries, commit, read_seq }
        }),
        (any::<bool>(), idx(), idx(), any::<u64>()).prop_map(|(success, index, hint, read_seq)| Body::AppendResponse {
            success,
            index,
            hint,
            read_seq
        }),
        (idx(), term(), any::<bool>()).prop_map(|(last_index, last_term, forced)| Body::Vote {
            last_index,
            last_term,
            forced
        }),
        any::<bool>().prop_map(|granted| Body::VoteResponse { granted }),
        (idx(), term()).prop_map(|(last_index, last_term)| Body::PreVote { last_index, last_term }),
        any::<bool>().prop_map(|granted| Body::PreVoteResponse { granted }),
        (idx(), term()).prop_map(|(index, term)| Body::Snapshot {
            index,
            term,
            conf: ConfState::with_voters([NodeId(1), NodeId(2)])
        }),
        Just(Body::TimeoutNow),
        (idx(), any::<u8>()).prop_map(|(index, c)| Body::ReadIndexResponse { index, context: vec![c] }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_messages_never_panic(msgs in prop::collection::vec((0u64..6, 0u64..6, body()), 1..30), leader in any::<bool>()) {
        let mut n = node_with_log(leader);
        for (from, term, body) in msgs {
            let _ = n.step(Message { from: NodeId(from), to: NodeId(1), term: Term(term), body });
            // The driver side: persist and report, as a real one would.
            let rd = n.ready();
            n.advance(&rd);
            n.persist_in_memory(&rd);
            for m in rd.persisted_messages {
                let _ = n.step(m);
            }
            prop_assert!(n.commit_index() <= n.last_index());
        }
    }
}
