//! The driver's interface: [`RawNode`] and [`Ready`].

use crate::raft::{Raft, Role};
use crate::storage::LogStore;
use crate::types::{Entry, HardState, LogIndex, Message, NodeId, ReadState, Term};
use crate::{Config, Mutation, ProposeError, StepError};

/// What the driver must do now. See the crate docs for the order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ready {
    /// Persist this hard state (it changed).
    pub hard_state: Option<HardState>,
    /// Persist these entries, first dropping every persisted entry at or after
    /// the first one's index.
    pub entries: Vec<Entry>,
    /// Send these now (before the writes above are durable).
    pub messages: Vec<Message>,
    /// Send these only after the writes above (and all earlier ones) are
    /// durable. Some are addressed to this node: give them to [`RawNode::step`].
    pub persisted_messages: Vec<Message>,
    /// Install this snapshot (index, term) before persisting `entries`: replace
    /// the state machine with the staged checkpoint, make the log start after
    /// it, then report with `on_persisted(index, term)` (or a later entry).
    pub snapshot: Option<(LogIndex, Term, crate::ConfState)>,
    /// Apply these, in order. They are committed and durable here.
    pub committed_entries: Vec<Entry>,
    /// Reads now safe: serve each once the state machine has applied up to its index.
    pub read_states: Vec<ReadState>,
}

impl Ready {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.hard_state.is_none()
            && self.entries.is_empty()
            && self.messages.is_empty()
            && self.persisted_messages.is_empty()
            && self.committed_entries.is_empty()
            && self.read_states.is_empty()
            && self.snapshot.is_none()
    }
}

/// A Raft node without I/O: inputs in (`tick`, `step`, `propose`, the storage's
/// reports), effects out (`ready`).
#[derive(Debug)]
pub struct RawNode<S> {
    raft: Raft<S>,
    /// The hard state last handed out.
    handed_hard_state: HardState,
}

impl<S: LogStore> RawNode<S> {
    /// A node over `store` (its persisted log and hard state).
    pub fn new(cfg: Config, store: S) -> Result<Self, crate::ConfigError> {
        cfg.validate()?;
        let handed_hard_state = store.hard_state();
        Ok(RawNode { raft: Raft::new(cfg, store), handed_hard_state })
    }

    /// Time passed by one tick.
    pub fn tick(&mut self) {
        self.raft.tick();
    }

    /// One tick at the caller's monotonic time `now` (needed for lease reads).
    pub fn tick_at(&mut self, now: std::time::Instant) {
        self.raft.tick_at(now);
    }

    /// A read at the caller's monotonic time `now`: with lease reads on and a
    /// valid lease, answered at once (in the next `Ready`); otherwise a
    /// ReadIndex round, as [`RawNode::read_index`].
    pub fn read_index_at(&mut self, context: Vec<u8>, now: std::time::Instant) -> Result<(), ProposeError> {
        self.raft.read_index_at(context, now)
    }

    /// A message from a peer (or from this node, out of `persisted_messages`).
    /// Bad input is an error or ignored, never a panic.
    pub fn step(&mut self, m: Message) -> Result<(), StepError> {
        self.raft.step(m)
    }

    /// Asks for a linearizable read; the answer comes as a `ReadState` with
    /// `context` in a later `Ready`. A read may be dropped (leader change):
    /// callers retry after a timeout.
    pub fn read_index(&mut self, context: Vec<u8>) -> Result<(), ProposeError> {
        self.raft.read_index(context)
    }

    /// Hands leadership to `to` once its log is caught up; proposals are
    /// refused meanwhile. Abandoned after an election timeout.
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), crate::TransferError> {
        self.raft.transfer_leader(to)
    }

    /// The transport could not reach `peer`: the leader stops sending ahead to it.
    pub fn report_unreachable(&mut self, peer: NodeId) {
        self.raft.report_unreachable(peer);
    }

    /// Starts an election now (with pre-vote if configured), as if the
    /// election timeout had passed.
    pub fn campaign(&mut self) {
        self.raft.campaign_now();
    }

    /// Proposes a membership change; returns its index. Changes to voters go
    /// through joint consensus (left automatically with `auto_leave`).
    pub fn propose_conf_change(&mut self, cc: crate::ConfChange) -> Result<LogIndex, ProposeError> {
        self.raft.propose_conf_change(cc)
    }

    /// The membership in force (as of the entries handed out to apply).
    pub fn conf_state(&self) -> &crate::ConfState {
        &self.raft.conf
    }

    /// Proposes a batch of entries; returns the index of the last one.
    pub fn propose(&mut self, batch: Vec<Vec<u8>>) -> Result<LogIndex, ProposeError> {
        self.raft.propose(batch)
    }

    /// What to do now. Call [`RawNode::advance`] with it once taken.
    pub fn ready(&mut self) -> Ready {
        let r = &mut self.raft;
        let hs = r.hard_state();
        let apply_unpersisted = r.cfg.mutation == Some(Mutation::ApplyUnpersisted);
        Ready {
            hard_state: (hs != self.handed_hard_state).then_some(hs),
            entries: r.log.unhanded().to_vec(),
            messages: std::mem::take(&mut r.msgs),
            persisted_messages: std::mem::take(&mut r.msgs_after_persist),
            snapshot: r.log.snapshot_to_install().map(|(i, t)| (i, t, r.log.pending_snapshot_conf.clone())),
            committed_entries: r.log.to_apply(r.cfg.apply_bytes_max, r.cfg.applying_bytes_max, apply_unpersisted),
            read_states: std::mem::take(&mut r.read_states),
        }
    }

    /// The driver took `ready`: its entries are being persisted, its committed
    /// entries applied.
    pub fn advance(&mut self, ready: &Ready) {
        if let Some(hs) = ready.hard_state {
            self.handed_hard_state = hs;
        }
        self.raft.log.mark_handed(ready.entries.len());
        if ready.snapshot.is_some() {
            self.raft.log.snapshot_handed = true;
        }
        self.raft.log.handed_to_apply(&ready.committed_entries);
        // Membership changes take effect as they are handed out to apply.
        for e in ready.committed_entries.iter().filter(|e| e.kind == crate::EntryKind::ConfChange) {
            self.raft.apply_conf_change(e);
        }
    }

    /// The storage made the log durable up to `index`, whose entry has `term`.
    pub fn on_persisted(&mut self, index: LogIndex, term: Term) {
        if let Some((si, _)) = self.raft.log.pending_snapshot
            && si <= index
        {
            self.raft.log.snapshot_installed(si);
        }
        self.raft.on_persisted(index, term);
    }

    /// The state machine has applied up to `index` (the driver's report).
    pub fn on_applied(&mut self, index: LogIndex) {
        self.raft.log.applied_to(index);
    }

    /// What the driver reported applied.
    pub fn applied(&self) -> LogIndex {
        self.raft.log.applied
    }

    /// Bytes of entries handed out to apply and not yet reported applied
    /// (bounded by [`Config::applying_bytes_max`](crate::Config::applying_bytes_max)).
    pub fn applying_bytes(&self) -> u64 {
        self.raft.log.applying.bytes
    }

    /// Bytes of this leader's proposals not yet committed and durable here
    /// (bounded by [`Config::uncommitted_bytes_max`](crate::Config::uncommitted_bytes_max)).
    pub fn uncommitted_bytes(&self) -> u64 {
        self.raft.uncommitted_bytes()
    }

    /// The lowest index the driver should keep when it releases the log (a
    /// flush made entries unneeded): on a leader, entries from a follower's
    /// match on are kept for it (a slow snapshot transfer then does not end
    /// behind the log and loop, etcd#4055), but never more than
    /// `retain_entries_max` below the last index. Never above what was applied.
    pub fn retain_from(&self) -> LogIndex {
        let r = &self.raft;
        let applied = r.log.applied.max(r.log.first_index().prev());
        let floor = LogIndex(r.log.last_index().0.saturating_sub(r.cfg.retain_entries_max));
        let me = r.cfg.id;
        let lagging = r
            .progress
            .iter()
            .filter(|(id, _)| **id != me)
            .map(|(_, p)| match p.state {
                crate::ProgressState::Snapshot(i) => i.next(),
                _ => p.matched.next(),
            })
            .min();
        lagging.map_or(applied, |l| l.max(floor)).min(applied)
    }

    /// The driver finished sending the snapshot a `Snapshot` message asked
    /// for to `peer` (`success`), or gave up.
    pub fn report_snapshot(&mut self, peer: NodeId, success: bool) {
        self.raft.report_snapshot(peer, success);
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.raft.cfg.id
    }
    /// Current role.
    pub fn role(&self) -> Role {
        self.raft.role
    }
    /// Current term.
    pub fn term(&self) -> Term {
        self.raft.term
    }
    /// The leader this node follows, if known.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.leader
    }
    /// The commit index this node knows.
    pub fn commit_index(&self) -> LogIndex {
        self.raft.log.committed
    }
    /// Last index of the log (persisted or not).
    pub fn last_index(&self) -> LogIndex {
        self.raft.log.last_index()
    }
    /// The log store.
    pub fn store(&self) -> &S {
        &self.raft.log.store
    }
    /// The log store, for the driver to write what a `Ready` said.
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.raft.log.store
    }
    /// A leader's view of each voter (empty on other roles).
    pub fn progress(&self) -> Vec<(NodeId, crate::Progress)> {
        self.raft.progress.iter().map(|(id, p)| (*id, p.clone())).collect()
    }

    /// The whole log as this node sees it, persisted or not (for tests).
    pub fn log_entries(&self) -> Vec<Entry> {
        self.raft.log.all_entries()
    }
}

impl RawNode<crate::MemStore> {
    /// The persistence steps of the driver loop for an in-memory store, all at
    /// once (tests, simulations, benchmarks): install `rd.snapshot`, append
    /// `rd.entries`, set `rd.hard_state`, then report them persisted. Call after
    /// [`RawNode::advance`]; sending `persisted_messages` remains the caller's.
    pub fn persist_in_memory(&mut self, rd: &Ready) {
        let store = self.store_mut();
        if let Some((index, term, conf)) = rd.snapshot.clone() {
            store.apply_snapshot(index, term, conf);
        }
        store.append(&rd.entries);
        if let Some(hs) = rd.hard_state {
            store.set_hard_state(hs);
        }
        match (rd.entries.last(), &rd.snapshot) {
            (Some(last), _) => self.on_persisted(last.index, last.term),
            (None, Some((index, term, _))) => self.on_persisted(*index, *term),
            (None, None) => {}
        }
    }

    /// One whole turn of the driver loop for an in-memory store: take the
    /// [`Ready`] (`None` if there is nothing to do), [`advance`](RawNode::advance),
    /// [`persist_in_memory`](RawNode::persist_in_memory), and step the
    /// `persisted_messages` addressed to this node. The returned `Ready` has
    /// every message still to send in `messages` (the unpersisted ones first,
    /// then the persisted ones for other nodes, in order) and an empty
    /// `persisted_messages`; its entries, committed entries, snapshot and read
    /// states are left for the caller to inspect.
    pub fn ready_in_memory(&mut self) -> Result<Option<Ready>, StepError> {
        let mut rd = self.ready();
        if rd.is_empty() {
            return Ok(None);
        }
        self.advance(&rd);
        self.persist_in_memory(&rd);
        let me = self.id();
        for m in std::mem::take(&mut rd.persisted_messages) {
            if m.to == me {
                self.step(m)?;
            } else {
                rd.messages.push(m);
            }
        }
        Ok(Some(rd))
    }
}
