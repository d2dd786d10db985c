//! The protocol's values: ids, terms, indexes, entries, hard state, messages.
//! All are `rkyv` types, so a driver can read them in place from a log or
//! network buffer (validated with `rkyv::access`).

use rkyv::{Archive, Deserialize, Serialize};

/// A node's id. 0 is never a valid id.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[rkyv(derive(Debug, PartialEq, Eq, PartialOrd, Ord))]
pub struct NodeId(pub u64);

/// A Raft term.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[rkyv(derive(Debug, PartialEq))]
pub struct Term(pub u64);

/// A log index. Index 0 is the empty prefix before the first entry.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[rkyv(derive(Debug, PartialEq))]
pub struct LogIndex(pub u64);

impl LogIndex {
    /// The next index.
    pub fn next(self) -> LogIndex {
        LogIndex(self.0 + 1)
    }
    /// The previous index (0 stays 0).
    pub fn prev(self) -> LogIndex {
        LogIndex(self.0.saturating_sub(1))
    }
}

/// What an entry carries.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug, PartialEq))]
pub enum EntryKind {
    /// Application data, applied by the state machine.
    Normal,
    /// The empty entry a new leader appends to commit its term.
    Noop,
    /// A membership change (`ConfChange`, rkyv-encoded).
    ConfChange,
}

/// A log entry.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Entry {
    /// The term of the leader that created it.
    pub term: Term,
    /// Its position in the log.
    pub index: LogIndex,
    /// What it carries.
    pub kind: EntryKind,
    /// Application bytes (empty for a no-op), shared: a clone of an entry
    /// (for a follower's append, for apply) copies no bytes.
    pub data: bytes::Bytes,
}

impl Entry {
    /// Bytes the entry counts for in flow control.
    pub fn size_bytes(&self) -> u64 {
        self.data.len() as u64 + 24
    }
}

/// A read that is now safe: serve it from the state machine once it has
/// applied up to `index`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadState {
    /// The read index.
    pub index: LogIndex,
    /// The caller's tag.
    pub context: Vec<u8>,
}

/// The state a node must persist before it answers: its term, its vote, and
/// the commit index it knows.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct HardState {
    /// Current term.
    pub term: Term,
    /// Whom it voted for in `term`.
    pub vote: Option<NodeId>,
    /// Highest index it knows committed.
    pub commit: LogIndex,
}

/// A message between nodes.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Message {
    /// Sender.
    pub from: NodeId,
    /// Receiver.
    pub to: NodeId,
    /// The sender's term (for a pre-vote request: the term it would campaign in).
    pub term: Term,
    /// What it says.
    pub body: Body,
}

/// The kinds of message.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum Body {
    /// Would you vote for me at `term` (not changing anyone's term)?
    PreVote {
        /// Index of the candidate's last entry.
        last_index: LogIndex,
        /// Term of that entry.
        last_term: Term,
    },
    /// Answer to a pre-vote.
    PreVoteResponse {
        /// Granted or not.
        granted: bool,
    },
    /// Vote for me at `term`.
    Vote {
        /// Index of the candidate's last entry.
        last_index: LogIndex,
        /// Term of that entry.
        last_term: Term,
        /// A leadership transfer: voters do not keep their current leader's lease.
        forced: bool,
    },
    /// Answer to a vote request.
    VoteResponse {
        /// Granted or not.
        granted: bool,
    },
    /// Entries after `prev_index` (empty: a heartbeat that also carries the commit index).
    Append {
        /// Index before the first entry.
        prev_index: LogIndex,
        /// Term of that entry.
        prev_term: Term,
        /// The entries.
        entries: Vec<Entry>,
        /// The leader's commit index.
        commit: LogIndex,
        /// The leader's latest read round (0: none); echoed in the answer to
        /// confirm its leadership for pending reads.
        read_seq: u64,
    },
    /// Answer to an append.
    AppendResponse {
        /// Whether the follower's log now matches the leader's up to `index`.
        success: bool,
        /// Accepted: the last index known to match. Rejected: the `prev_index`
        /// that did not match (so the leader can tell a stale rejection).
        index: LogIndex,
        /// Rejected: the highest index at which the follower's log may still
        /// match (its last index, or `prev_index - 1`, the smaller).
        hint: LogIndex,
        /// The `read_seq` of the append answered.
        read_seq: u64,
    },
    /// Leader to follower: your log is behind what the leader still holds;
    /// take the snapshot at (`index`, `term`). The driver carries the
    /// checkpoint (cairn-snapshot-transfer) and, on the follower, steps this
    /// message in once the checkpoint is staged.
    Snapshot {
        /// Last index the snapshot covers.
        index: LogIndex,
        /// Term of that entry.
        term: Term,
        /// The membership as of `index`.
        conf: crate::ConfState,
    },
    /// Leader to its chosen successor: campaign now (leadership transfer).
    TimeoutNow,
    /// Follower to leader: give me a read index for `context`.
    ReadIndex {
        /// The caller's tag, returned with the index.
        context: Vec<u8>,
    },
    /// Leader to follower: a read index, confirmed by a quorum.
    ReadIndexResponse {
        /// Serve the read once applied up to here.
        index: LogIndex,
        /// The tag of the request.
        context: Vec<u8>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_read_in_place_and_validated() {
        let m = Message {
            from: NodeId(1),
            to: NodeId(2),
            term: Term(7),
            body: Body::Append {
                prev_index: LogIndex(9),
                prev_term: Term(6),
                entries: vec![Entry {
                    term: Term(7),
                    index: LogIndex(10),
                    kind: EntryKind::Normal,
                    data: bytes::Bytes::from_static(b"put k v"),
                }],
                commit: LogIndex(8),
                read_seq: 0,
            },
        };
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&m).expect("encode");
        let archived = rkyv::access::<ArchivedMessage, rkyv::rancor::Error>(&bytes).expect("valid");
        assert_eq!(archived.term.0, 7);
        let ArchivedBody::Append { entries, .. } = &archived.body else { panic!("an append") };
        assert_eq!(entries[0].data.as_slice(), b"put k v");
        let back: Message = rkyv::deserialize::<Message, rkyv::rancor::Error>(archived).expect("decode");
        assert_eq!(back, m);
        // Damaged bytes (invalid enum tag, pointers out of bounds) or too few
        // bytes are refused, never trusted.
        let mut ones = rkyv::util::AlignedVec::<16>::new();
        ones.extend_from_slice(&vec![0xff; bytes.len()]);
        assert!(rkyv::access::<ArchivedMessage, rkyv::rancor::Error>(&ones).is_err());
        let mut short = rkyv::util::AlignedVec::<16>::new();
        short.extend_from_slice(&bytes[..bytes.len() / 2]);
        assert!(rkyv::access::<ArchivedMessage, rkyv::rancor::Error>(&short).is_err());
    }
}
