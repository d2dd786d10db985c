#![doc = include_str!("../README.md")]
//!
//! Raft as a deterministic state machine without I/O, in the manner of
//! etcd-raft's `RawNode` and quinn-proto: no threads, no clock, no files, no
//! randomness but what the configuration seeds.
//!
//! Built: elections with randomized timeouts, pre-vote and check-quorum; log
//! replication with per-follower progress (probe, replicate, snapshot),
//! bounded messages and bytes in flight, fast backtracking with the follower's
//! hint; the commit rule of the current term; asynchronous persistence (votes
//! and append responses wait for durability; a leader counts itself only for
//! entries reported persisted; only durable entries are applied); ReadIndex
//! reads on the leader and through followers; lease reads (off by default)
//! measured against the caller's monotonic time; leadership transfer;
//! snapshots (compaction, install or keep, Raft §7); membership changes
//! (learners, joint consensus, auto-leave). Limitations are listed in
//! `docs/design/raft-core.md`.
//!
//! # The driver loop
//!
//! 1. Call [`RawNode::tick`] (or [`RawNode::tick_at`] with the monotonic time,
//!    needed for lease reads) every tick, [`RawNode::step`] for every message
//!    that arrives, [`RawNode::propose`] / [`RawNode::propose_conf_change`] /
//!    [`RawNode::read_index`] (or [`RawNode::read_index_at`]) for clients.
//! 2. Take [`RawNode::ready`] and at once call [`RawNode::advance`] with it
//!    (before any `on_persisted` for it). Then, in this order:
//!    1. send `messages` (they may go before anything is durable);
//!    2. if `snapshot` is set, install it: replace the state machine with the
//!       staged checkpoint and make the log start after its index, with its
//!       membership;
//!    3. persist `entries` (dropping persisted entries from the first one's
//!       index) and then `hard_state`: entries before the hard state, so a
//!       torn write never keeps a commit index whose entries were lost;
//!    4. once durable, call [`RawNode::on_persisted`] with the last entry's (or
//!       the snapshot's) index and term, and only then send
//!       `persisted_messages` (those addressed to this node go to `step`);
//!    5. apply `committed_entries` in order and report with
//!       [`RawNode::on_applied`]; serve each of `read_states` once applied up
//!       to its index. The reports also make room: no more entries are
//!       handed out while [`Config::applying_bytes_max`] bytes of them await
//!       a report.
//! 3. Persistence and apply may run on other threads: the node goes on
//!    stepping and ticking meanwhile; it learns of progress only through
//!    `on_persisted`.
//! 4. When a flush makes log entries unneeded, release the log no lower than
//!    [`RawNode::retain_from`] (it keeps entries for lagging followers).
//! 5. A `Snapshot` message is the driver's cue to send a checkpoint (with
//!    cairn-snapshot-transfer); report the outcome with
//!    [`RawNode::report_snapshot`]. On the receiving side, step the message
//!    in once the checkpoint is staged.

mod conf;
mod log;
mod node;
mod progress;
mod raft;
mod storage;
mod types;

pub use conf::{ConfChange, ConfChangeItem, ConfState};
pub use node::{RawNode, Ready};
pub use progress::{Progress, ProgressState};
pub use raft::Role;
pub use storage::{LogStore, MemStore};
pub use types::{Body, Entry, EntryKind, HardState, LogIndex, Message, NodeId, ReadState, Term};

/// Configuration of a node. Every bound is here, with its unit.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// This node.
    pub id: NodeId,
    /// The membership when the node starts (as of `applied`): for a new
    /// cluster, every voter. A node added later starts with the membership it
    /// was added to, itself a learner.
    pub conf: ConfState,
    /// Ticks without a leader before a follower campaigns (randomized up to
    /// twice this); also the check-quorum period. Default 10.
    pub election_ticks: u32,
    /// Ticks between a leader's heartbeats. Default 1.
    pub heartbeat_ticks: u32,
    /// Ask before raising the term (pre-vote). Default on.
    pub pre_vote: bool,
    /// A leader that has not heard from a quorum for an election timeout
    /// steps down, and a node that hears from its leader ignores votes. Default on.
    pub check_quorum: bool,
    /// Appends in flight per follower. Default 64.
    pub inflight_msgs_max: usize,
    /// Bytes of entries per append message. Default 1 MiB.
    pub msg_bytes_max: u64,
    /// Bytes of entries in flight per follower. Default 8 MiB.
    pub inflight_bytes_max: u64,
    /// Bytes of entries handed to apply per `Ready`. Default 16 MiB.
    pub apply_bytes_max: u64,
    /// Bytes of entries handed to apply and not yet reported applied
    /// ([`RawNode::on_applied`]); while they are at or over this bound no more
    /// are handed out (at least one entry otherwise). Default 64 MiB.
    pub applying_bytes_max: u64,
    /// Bytes of proposals a leader holds before it refuses more, counted from
    /// the proposal until its entry is both committed and durable on this
    /// node. Default 64 MiB.
    pub uncommitted_bytes_max: u64,
    /// Reads waiting for confirmation (this node's and, on a leader, its
    /// followers'). Default 4096.
    pub reads_pending_max: usize,
    /// The log index `conf` is as of: membership changes at or before it are
    /// already in `conf` and are not applied again (a node added later starts
    /// with the membership it was added to, as of the change that added it).
    pub conf_index: LogIndex,
    /// Entries a leader asks the driver to keep for followers that lag (see
    /// [`RawNode::retain_from`]), at most. Default 100,000.
    pub retain_entries_max: u64,
    /// Lease reads: `Some(d)` lets a leader answer `read_index_at` at once
    /// while a quorum acknowledged it within `d` of `now`. `d` must be the
    /// shortest election timeout in real time minus the bound on clock drift
    /// between nodes; needs check-quorum. Off (`None`) by default.
    pub lease_read_duration: Option<std::time::Duration>,
    /// Seed of the election-timeout randomness.
    pub seed: u64,
    /// What the state machine has durably applied when the node starts (for
    /// Cairn, the LSM's durable marker): entries up to it are not handed out
    /// to apply again, and the commit index starts at least there.
    pub applied: LogIndex,
    /// Test-only: break one safety rule on purpose (see [`Mutation`]).
    #[doc(hidden)]
    pub mutation: Option<Mutation>,
}

impl Config {
    /// A configuration with defaults.
    /// A configuration with defaults; `peers` are the voters, this node among them.
    pub fn new(id: NodeId, peers: Vec<NodeId>, seed: u64) -> Self {
        Config {
            id,
            conf: ConfState::with_voters(peers),
            election_ticks: 10,
            heartbeat_ticks: 1,
            pre_vote: true,
            check_quorum: true,
            inflight_msgs_max: 64,
            msg_bytes_max: 1 << 20,
            inflight_bytes_max: 8 << 20,
            apply_bytes_max: 16 << 20,
            applying_bytes_max: 64 << 20,
            uncommitted_bytes_max: 64 << 20,
            reads_pending_max: 4096,
            lease_read_duration: None,
            retain_entries_max: 100_000,
            conf_index: LogIndex(0),
            seed,
            applied: LogIndex(0),
            mutation: None,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.id.0 == 0 || self.conf.members().contains(&NodeId(0)) {
            return Err(ConfigError("node id 0 is reserved"));
        }
        if self.election_ticks <= self.heartbeat_ticks || self.heartbeat_ticks == 0 {
            return Err(ConfigError("election_ticks must exceed heartbeat_ticks, which must be positive"));
        }
        if self.lease_read_duration.is_some() && !self.check_quorum {
            return Err(ConfigError("lease reads need check_quorum"));
        }
        if self.inflight_msgs_max == 0 || self.msg_bytes_max == 0 || self.inflight_bytes_max == 0 {
            return Err(ConfigError("flow-control bounds must be positive"));
        }
        Ok(())
    }
}

/// A rule the simulator's mutation tests break on purpose, to show they catch it.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// Send a vote before it is persisted.
    VoteBeforePersist,
    /// Commit an entry of an earlier term by counting replicas (Figure 8).
    CommitEarlierTerm,
    /// A leader counts its own entries toward commit before they are persisted.
    LeaderCountsUnpersisted,
    /// Hand out committed entries to apply before they are durable here.
    ApplyUnpersisted,
    /// A leader serves a read index without confirming it still leads.
    ReadWithoutQuorum,
    /// A lease measured in ticks instead of the caller's time (a frozen leader
    /// gets no ticks, so its lease never runs out).
    LeaseCountsTicks,
}

/// An invalid configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid raft configuration: {0}")]
pub struct ConfigError(&'static str);

/// Why a proposal was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProposeError {
    /// Only the leader takes proposals.
    #[error("not the leader (the leader is {leader:?})")]
    NotLeader {
        /// The leader, if known.
        leader: Option<NodeId>,
    },
    /// Too many proposal bytes are waiting for commit.
    #[error("too many uncommitted bytes; retry later")]
    TooManyUncommittedBytes,
    /// Too many reads are waiting for confirmation.
    #[error("too many reads waiting; retry later")]
    TooManyReads,
    /// Leadership is being handed over.
    #[error("a leadership transfer is in progress; retry at the new leader")]
    TransferInProgress,
    /// An earlier membership change is not yet applied.
    #[error("a membership change is still pending; retry once it is applied")]
    ConfChangePending,
    /// The membership change does not apply to the current membership.
    #[error("invalid membership change: {0}")]
    InvalidConfChange(&'static str),
}

/// Why a leadership transfer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// Only the leader hands over.
    #[error("not the leader (the leader is {leader:?})")]
    NotLeader {
        /// The leader, if known.
        leader: Option<NodeId>,
    },
    /// Not a voter of this cluster.
    #[error("{0:?} is not a voter of this cluster")]
    UnknownPeer(NodeId),
}

/// A message refused by `step`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StepError {
    /// Addressed to another node, or from id 0 (reserved), or from this node
    /// itself (other than its own vote).
    #[error("message from {0:?} refused: misaddressed or from a reserved id")]
    UnknownPeer(NodeId),
}
