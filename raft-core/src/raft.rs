//! The protocol: roles, elections, replication, commit.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::conf::{ConfChange, ConfState};
use crate::log::RaftLog;
use crate::progress::{Progress, ProgressState};
use crate::storage::LogStore;
use crate::types::{Body, Entry, EntryKind, HardState, LogIndex, Message, NodeId, ReadState, Term};
use crate::{Config, Mutation, ProposeError, TransferError};

/// A node's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Asking whether it could win, before raising its term (pre-vote).
    PreCandidate,
    /// Asking for votes at a raised term.
    Candidate,
    /// Leads its term.
    Leader,
}

#[derive(Debug)]
pub(crate) struct Raft<S> {
    pub(crate) cfg: Config,
    /// The membership in force (as of the entries handed out to apply).
    pub(crate) conf: ConfState,
    /// Index of the last membership change proposed by this leader.
    pending_conf_index: LogIndex,
    /// Membership changes at or before this index are already in `conf`.
    conf_index: LogIndex,
    pub(crate) term: Term,
    pub(crate) vote: Option<NodeId>,
    pub(crate) role: Role,
    pub(crate) leader: Option<NodeId>,
    pub(crate) log: RaftLog<S>,
    votes: BTreeMap<NodeId, bool>,
    pub(crate) progress: BTreeMap<NodeId, Progress>,
    election_elapsed: u32,
    heartbeat_elapsed: u32,
    randomized_timeout: u32,
    rng: ChaCha8Rng,
    pub(crate) msgs: Vec<Message>,
    pub(crate) msgs_after_persist: Vec<Message>,
    /// This leader's proposals not yet both committed and durable here.
    uncommitted: crate::log::Batches,
    /// Latest read round; every append carries it, every answer echoes it.
    read_seq: u64,
    /// Reads waiting for a quorum to confirm this leader's term.
    pending_reads: VecDeque<PendingRead>,
    /// Reads asked before this leader committed an entry of its term.
    waiting_reads: Vec<(NodeId, Vec<u8>)>,
    pub(crate) read_states: Vec<ReadState>,
    /// This election was started by a leadership transfer (votes are forced).
    forced_campaign: bool,
    /// Lease rounds sent and not yet confirmed: (read_seq, when, who acknowledged).
    lease_rounds: VecDeque<(u64, std::time::Instant, BTreeSet<NodeId>)>,
    /// The lease lasts until then (caller's clock); with the tick mutation, the tick count then.
    lease_until: Option<std::time::Instant>,
    lease_until_tick: u64,
    ticks: u64,
    /// A leadership transfer in progress, and ticks since it started.
    transferee: Option<NodeId>,
    transfer_elapsed: u32,
}

#[derive(Debug)]
struct PendingRead {
    seq: u64,
    index: LogIndex,
    context: Vec<u8>,
    from: NodeId,
    acks: BTreeSet<NodeId>,
}

impl<S: LogStore> Raft<S> {
    pub(crate) fn new(cfg: Config, store: S) -> Self {
        let hs = store.hard_state();
        // The membership as of what the state machine holds: the snapshot's if
        // the store's snapshot is newer than `applied`, else the configured one.
        let snap = store.first_index().prev();
        let (conf, conf_index) = if snap > cfg.applied {
            (store.snapshot_conf(), snap)
        } else {
            (cfg.conf.clone(), cfg.conf_index.max(cfg.applied))
        };
        let mut r = Raft {
            conf,
            conf_index,
            pending_conf_index: LogIndex(0),
            rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ cfg.id.0.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            term: hs.term,
            vote: hs.vote,
            role: Role::Follower,
            leader: None,
            log: RaftLog::new(store, cfg.applied),
            votes: BTreeMap::new(),
            progress: BTreeMap::new(),
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_timeout: 0,
            msgs: Vec::new(),
            msgs_after_persist: Vec::new(),
            uncommitted: Default::default(),
            read_seq: 0,
            pending_reads: VecDeque::new(),
            waiting_reads: Vec::new(),
            read_states: Vec::new(),
            transferee: None,
            transfer_elapsed: 0,
            forced_campaign: false,
            lease_rounds: VecDeque::new(),
            lease_until: None,
            lease_until_tick: 0,
            ticks: 0,
            cfg,
        };
        r.reset_timeout();
        r
    }

    fn mutation(&self, m: Mutation) -> bool {
        self.cfg.mutation == Some(m)
    }

    pub(crate) fn hard_state(&self) -> HardState {
        HardState { term: self.term, vote: self.vote, commit: self.log.committed }
    }

    /// Whether the nodes `yes` holds for form a quorum of the configuration.
    fn quorum(&self, yes: impl Fn(NodeId) -> bool + Copy) -> bool {
        self.conf.quorum(yes)
    }

    fn reset_timeout(&mut self) {
        let e = self.cfg.election_ticks;
        self.randomized_timeout = e + self.rng.random_range(0..e);
        self.election_elapsed = 0;
    }

    fn send(&mut self, to: NodeId, term: Term, body: Body) {
        self.msgs.push(Message { from: self.cfg.id, to, term, body });
    }

    fn send_after_persist(&mut self, to: NodeId, term: Term, body: Body) {
        self.msgs_after_persist.push(Message { from: self.cfg.id, to, term, body });
    }

    fn others(&self) -> Vec<NodeId> {
        self.conf.members().into_iter().filter(|p| *p != self.cfg.id).collect()
    }

    fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        if term > self.term {
            self.term = term;
            self.vote = None;
        }
        self.role = Role::Follower;
        self.leader = leader;
        self.votes.clear();
        self.progress.clear();
        // Reads not yet confirmed are dropped: their callers retry. The lease ends.
        self.pending_reads.clear();
        self.lease_rounds.clear();
        self.lease_until = None;
        self.lease_until_tick = 0;
        self.waiting_reads.clear();
        self.transferee = None;
        self.reset_timeout();
    }

    // ---- elections ----

    /// A tick at the caller's time `now`: a leader with lease reads starts a
    /// lease round (confirmed by the answers to the heartbeats it sends now).
    pub(crate) fn tick_at(&mut self, now: std::time::Instant) {
        // No lease rounds during a leadership transfer: the successor's forced
        // votes pass the followers' leases.
        if self.role == Role::Leader && self.cfg.lease_read_duration.is_some() && self.transferee.is_none() {
            self.read_seq += 1;
            let me = self.cfg.id;
            self.lease_rounds.push_back((self.read_seq, now, BTreeSet::from([me])));
            while self.lease_rounds.len() > 2 * self.cfg.election_ticks as usize {
                self.lease_rounds.pop_front();
            }
        }
        self.tick();
    }

    pub(crate) fn tick(&mut self) {
        self.ticks += 1;
        match self.role {
            Role::Leader => {
                let limit = (self.cfg.election_ticks / 2).max(1);
                let me = self.cfg.id;
                for (id, pr) in self.progress.iter_mut() {
                    if *id != me {
                        pr.tick(limit);
                    }
                }
                self.heartbeat_elapsed += 1;
                self.election_elapsed += 1;
                if self.transferee.is_some() {
                    self.transfer_elapsed += 1;
                    if self.transfer_elapsed >= self.cfg.election_ticks {
                        self.transferee = None; // abandoned: the leader goes on
                    }
                }
                // Leave joint consensus if that is due and was missed (a leader
                // change between the joint entry and its leave).
                if self.conf.is_joint() && self.conf.auto_leave && self.pending_conf_index <= self.log.applied_handed {
                    let _ = self.propose_conf_change(ConfChange::default());
                }
                if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks {
                    self.heartbeat_elapsed = 0;
                    self.broadcast_append(true);
                }
                if self.election_elapsed >= self.cfg.election_ticks {
                    self.election_elapsed = 0;
                    if self.cfg.check_quorum && !self.quorum_active() {
                        self.become_follower(self.term, None);
                    }
                }
            }
            _ => {
                self.election_elapsed += 1;
                if self.election_elapsed >= self.randomized_timeout {
                    self.campaign();
                } else if matches!(self.role, Role::Candidate | Role::PreCandidate)
                    && self.election_elapsed.is_multiple_of(self.cfg.heartbeat_ticks)
                {
                    self.resend_vote_requests();
                }
            }
        }
    }

    fn quorum_active(&mut self) -> bool {
        let me = self.cfg.id;
        let active: BTreeSet<NodeId> =
            self.progress.iter().filter(|(id, pr)| **id == me || pr.recent_active).map(|(id, _)| *id).collect();
        for pr in self.progress.values_mut() {
            pr.recent_active = false;
        }
        self.quorum(|id| active.contains(&id))
    }

    pub(crate) fn campaign_now(&mut self) {
        if self.role != Role::Leader {
            self.campaign();
        }
    }

    fn campaign(&mut self) {
        // Learners and removed nodes never campaign; nor does a node whose
        // membership may be stale: committed changes not yet applied, or a
        // snapshot received and not yet installed.
        if !self.conf.is_voter(self.cfg.id) || self.log.pending_snapshot.is_some() || self.unapplied_conf_change() {
            return;
        }
        // With pre-vote, every timeout starts a new pre-vote round (a round that
        // got no answers, say while cut off, never turns into a real election);
        // only a won pre-vote raises the term.
        if self.cfg.pre_vote {
            self.role = Role::PreCandidate;
            self.leader = None;
            self.votes.clear();
            self.votes.insert(self.cfg.id, true);
            self.reset_timeout();
            let (last_index, last_term, term) = (self.log.last_index(), self.log.last_term(), Term(self.term.0 + 1));
            for p in self.others() {
                self.send(p, term, Body::PreVote { last_index, last_term });
            }
            self.check_votes();
        } else {
            self.start_election(false);
        }
    }

    fn start_election(&mut self, forced: bool) {
        self.forced_campaign = forced;
        self.term = Term(self.term.0 + 1);
        self.vote = Some(self.cfg.id);
        self.role = Role::Candidate;
        self.leader = None;
        self.votes.clear();
        self.reset_timeout();
        let (last_index, last_term, term) = (self.log.last_index(), self.log.last_term(), self.term);
        // Our own vote counts only once it is durable: it comes back to us
        // through the driver after the hard state is persisted.
        let me = self.cfg.id;
        if self.mutation(Mutation::VoteBeforePersist) {
            self.votes.insert(me, true);
        } else {
            self.send_after_persist(me, term, Body::VoteResponse { granted: true });
        }
        for p in self.others() {
            self.send(p, term, Body::Vote { last_index, last_term, forced });
        }
        self.check_votes();
    }

    /// Asks again the peers that have not answered (a request or its answer
    /// may be lost; waiting for the next election would raise the term).
    fn resend_vote_requests(&mut self) {
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        let silent: Vec<NodeId> = self.others().into_iter().filter(|p| !self.votes.contains_key(p)).collect();
        for p in silent {
            match self.role {
                Role::PreCandidate => {
                    let term = Term(self.term.0 + 1);
                    self.send(p, term, Body::PreVote { last_index, last_term });
                }
                Role::Candidate => {
                    let (term, forced) = (self.term, self.forced_campaign);
                    self.send(p, term, Body::Vote { last_index, last_term, forced });
                }
                _ => {}
            }
        }
    }

    fn check_votes(&mut self) {
        let votes = &self.votes;
        let granted = self.conf.quorum(|id| votes.get(&id) == Some(&true));
        let lost = self.conf.quorum_lost(|id| votes.get(&id) == Some(&false));
        if granted {
            match self.role {
                Role::PreCandidate => self.start_election(false),
                Role::Candidate => self.become_leader(),
                _ => {}
            }
        } else if lost {
            self.become_follower(self.term, None);
        }
    }

    fn in_lease(&self) -> bool {
        // With lease reads, a node that just started may be inside a leader's
        // lease it cannot know of: it respects one for an election timeout.
        let just_started = self.cfg.lease_read_duration.is_some() && self.ticks < u64::from(self.cfg.election_ticks);
        self.cfg.check_quorum
            && (self.leader.is_some() || just_started)
            && self.election_elapsed < self.cfg.election_ticks
    }

    /// Whether a committed membership change is not yet handed out to apply.
    fn unapplied_conf_change(&self) -> bool {
        let (from, to) = (self.log.applied_handed.next(), self.log.committed.next());
        from < to && self.log.slice(from, to, u64::MAX).iter().any(|e| e.kind == EntryKind::ConfChange)
    }

    fn become_leader(&mut self) {
        self.role = Role::Leader;
        // Any entry in our log may be a membership change not yet applied: no
        // new change until all of it is applied (as etcd does).
        self.pending_conf_index = self.log.last_index().next();
        self.leader = Some(self.cfg.id);
        self.votes.clear();
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        self.uncommitted = Default::default();
        self.transferee = None;
        let next = self.log.last_index().next();
        self.progress = self.conf.members().into_iter().map(|p| (p, Progress::new(next))).collect();
        let me = self.cfg.id;
        if let Some(pr) = self.progress.get_mut(&me) {
            pr.matched = self.log.persisted;
            pr.become_replicate();
        }
        // A no-op of the new term: once committed, everything before it is.
        let e = Entry { term: self.term, index: next, kind: EntryKind::Noop, data: bytes::Bytes::new() };
        self.log.append(&[e]);
        self.broadcast_append(false);
    }

    // ---- proposals ----

    pub(crate) fn propose(&mut self, batch: Vec<Vec<u8>>) -> Result<LogIndex, ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader { leader: self.leader });
        }
        if self.transferee.is_some() {
            return Err(ProposeError::TransferInProgress);
        }
        let bytes: u64 = batch.iter().map(|d| d.len() as u64 + 24).sum();
        if self.uncommitted.bytes + bytes > self.cfg.uncommitted_bytes_max && self.uncommitted.bytes > 0 {
            return Err(ProposeError::TooManyUncommittedBytes);
        }
        let mut index = self.log.last_index();
        let entries: Vec<Entry> = batch
            .into_iter()
            .map(|data| {
                index = index.next();
                Entry { term: self.term, index, kind: EntryKind::Normal, data: data.into() }
            })
            .collect();
        self.uncommitted.push(index, bytes);
        self.log.append(&entries);
        self.broadcast_append(false);
        Ok(index)
    }

    pub(crate) fn uncommitted_bytes(&self) -> u64 {
        if self.role == Role::Leader { self.uncommitted.bytes } else { 0 }
    }

    /// Forgets the proposals that are now committed and durable here: they
    /// leave the bound on uncommitted bytes (and enter the one on applying).
    fn release_uncommitted(&mut self) {
        self.uncommitted.release_through(self.log.committed.min(self.log.persisted));
    }

    // ---- replication ----

    fn broadcast_append(&mut self, heartbeat: bool) {
        for p in self.others() {
            self.send_append(p, heartbeat);
        }
    }

    /// Sends what `to` needs, if flow control allows; a heartbeat always goes
    /// (empty, at an index the follower is known to hold, when nothing else may).
    fn send_append(&mut self, to: NodeId, heartbeat: bool) {
        let (inflight_max, bytes_max) = (self.cfg.inflight_msgs_max, self.cfg.msg_bytes_max);
        let Some(pr) = self.progress.get(&to) else { return };
        let can = pr.can_send(inflight_max, self.cfg.inflight_bytes_max);
        let probe = pr.state == ProgressState::Probe;
        let last = self.log.last_index();
        // The follower needs entries this leader released: send a snapshot.
        if can && pr.next <= last && (pr.next < self.log.first_index() || self.log.term(pr.next.prev()).is_none()) {
            let index = self.log.first_index().prev();
            let Some(term) = self.log.term(index) else { return };
            if let Some(pr) = self.progress.get_mut(&to) {
                pr.become_snapshot(index);
            }
            let (t, conf) = (self.term, self.log.store.snapshot_conf());
            self.send(to, t, Body::Snapshot { index, term, conf });
            return;
        }
        let (prev, entries, counts) = if can && pr.next <= last {
            (pr.next.prev(), self.log.slice(pr.next, last.next(), bytes_max), true)
        } else if heartbeat && can && probe {
            (pr.next.prev(), Vec::new(), true)
        } else if heartbeat {
            (pr.matched, Vec::new(), false)
        } else {
            return;
        };
        // A heartbeat at an index this leader released goes at the snapshot
        // point instead: a follower that lacks it refuses, which leads to a snapshot.
        let prev = if !counts && self.log.term(prev).is_none() { self.log.first_index().prev() } else { prev };
        let Some(prev_term) = self.log.term(prev) else { return };
        let commit = self.log.committed;
        let sent_end = entries.last().map(|e| e.index);
        let sent_bytes: u64 = entries.iter().map(Entry::size_bytes).sum();
        if counts && let Some(pr) = self.progress.get_mut(&to) {
            match pr.state {
                ProgressState::Probe => pr.probe_sent = true,
                ProgressState::Replicate => {
                    if let Some(end) = sent_end {
                        pr.next = end.next();
                        pr.inflight.push_back((end, sent_bytes));
                    }
                }
                ProgressState::Snapshot(_) => {}
            }
        }
        let (term, read_seq) = (self.term, self.read_seq);
        self.send(to, term, Body::Append { prev_index: prev, prev_term, entries, commit, read_seq });
    }

    fn maybe_commit(&mut self) {
        let me = self.cfg.id;
        let matched: BTreeMap<NodeId, LogIndex> = self
            .progress
            .iter()
            .map(|(id, pr)| {
                let m = if *id != me {
                    pr.matched
                } else if self.mutation(Mutation::LeaderCountsUnpersisted) {
                    self.log.last_index()
                } else {
                    self.log.persisted
                };
                (*id, m)
            })
            .collect();
        // A quorum of voters (of both configurations while joint); learners
        // and a removed leader do not count.
        let n = self.conf.committed(&matched);
        if n == LogIndex(u64::MAX) {
            return;
        }
        // Only an entry of the current term is committed by counting replicas
        // (Raft §5.4.2, Figure 8); earlier ones are committed with it.
        let current_term = self.log.term(n) == Some(self.term);
        if n > self.log.committed && (current_term || self.mutation(Mutation::CommitEarlierTerm)) {
            self.log.commit_to(n);
            self.release_uncommitted();
            self.broadcast_append(false);
            // The first commit of this term: reads that waited for it may start.
            for (from, context) in std::mem::take(&mut self.waiting_reads) {
                self.leader_read(from, context);
            }
        }
    }

    pub(crate) fn on_persisted(&mut self, index: LogIndex, term: Term) {
        self.log.on_persisted(index, term);
        if self.role == Role::Leader {
            let me = self.cfg.id;
            let persisted = self.log.persisted;
            if let Some(pr) = self.progress.get_mut(&me) {
                pr.matched = pr.matched.max(persisted);
            }
            self.maybe_commit();
            self.release_uncommitted();
        }
    }

    // ---- messages ----

    pub(crate) fn step(&mut self, m: Message) -> Result<(), crate::StepError> {
        // Messages from nodes this node does not know yet are taken: a lagging
        // node must hear from a leader added after the membership it holds.
        // Refusing removed nodes is the transport's job (it knows them from the
        // replicated state); here they never count toward any quorum.
        if m.to != self.cfg.id || m.from.0 == 0 || m.from == self.cfg.id && !matches!(m.body, Body::VoteResponse { .. })
        {
            return Err(crate::StepError::UnknownPeer(m.from));
        }
        if m.term > self.term {
            match &m.body {
                // A pre-vote never changes anyone's term.
                Body::PreVote { .. } => {}
                Body::PreVoteResponse { granted: true } if self.role == Role::PreCandidate => {}
                // A grant that arrives late (no longer campaigning) changes nothing.
                Body::PreVoteResponse { granted: true } => return Ok(()),
                Body::Vote { forced: false, .. } if self.in_lease() => return Ok(()),
                Body::Append { .. } => self.become_follower(m.term, Some(m.from)),
                _ => self.become_follower(m.term, None),
            }
        } else if m.term < self.term {
            match m.body {
                // Tell a stale leader (or pre-candidate) our term, so it steps down.
                Body::Append { .. } => self.send(
                    m.from,
                    self.term,
                    Body::AppendResponse { success: false, index: LogIndex(0), hint: LogIndex(0), read_seq: 0 },
                ),
                Body::PreVote { .. } => self.send(m.from, self.term, Body::PreVoteResponse { granted: false }),
                _ => {}
            }
            return Ok(());
        }
        match m.body {
            Body::PreVote { last_index, last_term } => {
                let granted = m.term > self.term && !self.in_lease() && self.log.is_up_to_date(last_index, last_term);
                let term = if granted { m.term } else { self.term };
                self.send(m.from, term, Body::PreVoteResponse { granted });
            }
            Body::Vote { last_index, last_term, .. } => {
                let can = self.vote.is_none_or(|v| v == m.from) && self.log.is_up_to_date(last_index, last_term);
                if can {
                    self.vote = Some(m.from);
                    self.election_elapsed = 0;
                    let term = self.term;
                    // The vote is a promise: it goes only once it is durable.
                    if self.mutation(Mutation::VoteBeforePersist) {
                        self.send(m.from, term, Body::VoteResponse { granted: true });
                    } else {
                        self.send_after_persist(m.from, term, Body::VoteResponse { granted: true });
                    }
                } else {
                    self.send(m.from, self.term, Body::VoteResponse { granted: false });
                }
            }
            Body::PreVoteResponse { granted } if self.role == Role::PreCandidate => {
                self.votes.insert(m.from, granted);
                self.check_votes();
            }
            Body::VoteResponse { granted } if self.role == Role::Candidate && m.term == self.term => {
                self.votes.insert(m.from, granted);
                self.check_votes();
            }
            Body::Append { prev_index, prev_term, entries, commit, read_seq } => {
                if self.role != Role::Follower || self.leader != Some(m.from) {
                    self.become_follower(self.term, Some(m.from));
                }
                self.election_elapsed = 0;
                self.handle_append(m.from, prev_index, prev_term, &entries, commit, read_seq);
            }
            Body::AppendResponse { success, index, hint, read_seq } if self.role == Role::Leader => {
                self.confirm_reads(m.from, read_seq);
                self.handle_append_response(m.from, success, index, hint);
            }
            Body::Snapshot { index, term, conf } => {
                if self.role != Role::Follower || self.leader != Some(m.from) {
                    self.become_follower(self.term, Some(m.from));
                }
                self.election_elapsed = 0;
                self.handle_snapshot(m.from, index, term, conf);
            }
            // Our leader hands over: campaign now, past pre-vote and leases
            // (unless this node may not campaign at all).
            Body::TimeoutNow
                if self.role == Role::Follower
                    && self.leader == Some(m.from)
                    && self.conf.is_voter(self.cfg.id)
                    && self.log.pending_snapshot.is_none()
                    && !self.unapplied_conf_change() =>
            {
                self.start_election(true);
            }
            Body::ReadIndex { context } if self.role == Role::Leader => self.leader_read(m.from, context),
            Body::ReadIndexResponse { index, context } if self.role == Role::Follower => {
                self.read_states.push(ReadState { index, context });
            }
            _ => {}
        }
        Ok(())
    }

    fn handle_append(
        &mut self,
        from: NodeId,
        prev: LogIndex,
        prev_term: Term,
        entries: &[Entry],
        commit: LogIndex,
        read_seq: u64,
    ) {
        let term = self.term;
        // Bad input from the network is ignored, never trusted: entries must
        // follow `prev` one by one, with terms that never go down and never
        // above the sender's.
        let well_formed = entries.iter().enumerate().all(|(k, e)| e.index.0 == prev.0 + 1 + k as u64 && e.term <= term)
            && entries.windows(2).all(|w| w[0].term <= w[1].term)
            && entries.first().is_none_or(|e| e.term >= prev_term);
        if !well_formed {
            return;
        }
        if prev < self.log.committed {
            // Everything up to our commit index matches any leader's log.
            let index = self.log.committed;
            let body = Body::AppendResponse { success: true, index, hint: index, read_seq };
            self.send_after_persist(from, term, body);
            return;
        }
        // An entry that conflicts at or below our commit index would replace a
        // committed entry: no correct leader sends that; ignore the message.
        if entries.iter().any(|e| e.index <= self.log.committed && self.log.term(e.index).is_some_and(|t| t != e.term))
        {
            return;
        }
        match self.log.maybe_append(prev, prev_term, entries) {
            Some(last_new) => {
                self.log.commit_to(commit.min(last_new));
                let body = Body::AppendResponse { success: true, index: last_new, hint: last_new, read_seq };
                self.send_after_persist(from, term, body);
            }
            None => {
                let hint = self.log.last_index().min(prev.prev());
                self.send(from, term, Body::AppendResponse { success: false, index: prev, hint, read_seq });
            }
        }
    }

    fn handle_snapshot(&mut self, from: NodeId, index: LogIndex, term: Term, conf: ConfState) {
        let me_term = self.term;
        if index <= self.log.committed {
            // We have it already.
            let c = self.log.committed;
            let body = Body::AppendResponse { success: true, index: c, hint: c, read_seq: 0 };
            self.send_after_persist(from, me_term, body);
            return;
        }
        if self.log.term(index) == Some(term) {
            // Our log holds the snapshot's last entry: keep what follows (Raft §7).
            self.log.commit_to(index);
        } else {
            // Otherwise the whole log is discarded and the snapshot installed,
            // with the membership as of its index.
            self.log.restore(index, term, conf.clone());
            self.conf = conf;
            self.conf_index = index;
        }
        let body = Body::AppendResponse { success: true, index, hint: index, read_seq: 0 };
        self.send_after_persist(from, me_term, body);
    }

    /// The driver finished (or gave up) sending the snapshot to `peer`.
    pub(crate) fn report_snapshot(&mut self, peer: NodeId, success: bool) {
        if let Some(pr) = self.progress.get_mut(&peer)
            && let ProgressState::Snapshot(index) = pr.state
        {
            if success {
                pr.next = pr.next.max(index.next());
            } else {
                pr.next = pr.matched.next();
            }
            pr.become_probe();
            // Wait for the follower's answer (or the next heartbeat) before probing.
            pr.probe_sent = true;
        }
    }

    // ---- reads ----

    // ---- membership ----

    /// Proposes a membership change. One at a time: refused while an earlier
    /// one is not yet applied.
    pub(crate) fn propose_conf_change(&mut self, cc: ConfChange) -> Result<LogIndex, ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader { leader: self.leader });
        }
        if self.transferee.is_some() {
            return Err(ProposeError::TransferInProgress);
        }
        if self.pending_conf_index > self.log.applied_handed {
            return Err(ProposeError::ConfChangePending);
        }
        self.conf.apply(&cc).map_err(ProposeError::InvalidConfChange)?;
        let index = self.log.last_index().next();
        let e = Entry { term: self.term, index, kind: EntryKind::ConfChange, data: cc.encode().into() };
        self.log.append(&[e]);
        self.pending_conf_index = index;
        self.broadcast_append(false);
        Ok(index)
    }

    /// A committed membership change was handed out to apply: it takes effect now.
    pub(crate) fn apply_conf_change(&mut self, e: &Entry) {
        if e.index <= self.conf_index {
            return; // already in the membership this node started with
        }
        self.conf_index = e.index;
        let Some(cc) = ConfChange::decode(&e.data) else { return };
        let Ok(next) = self.conf.apply(&cc) else { return };
        self.conf = next;
        if self.role != Role::Leader {
            return;
        }
        let last = self.log.last_index();
        let members = self.conf.members();
        self.progress.retain(|id, _| members.contains(id));
        for id in members {
            self.progress.entry(id).or_insert_with(|| Progress::new(last.next()));
        }
        if !self.conf.is_voter(self.cfg.id) {
            // Removed: a leader that is no longer a voter steps down.
            self.become_follower(self.term, None);
            return;
        }
        if self.conf.is_joint() && self.conf.auto_leave {
            let _ = self.propose_conf_change(ConfChange::default());
        }
        self.maybe_commit();
    }

    /// A read at the caller's time `now`: served at once under a valid lease,
    /// otherwise as [`Raft::read_index`].
    pub(crate) fn read_index_at(&mut self, context: Vec<u8>, now: std::time::Instant) -> Result<(), ProposeError> {
        let lease_valid = if self.mutation(Mutation::LeaseCountsTicks) {
            self.lease_until.is_some() && self.ticks < self.lease_until_tick
        } else {
            self.lease_until.is_some_and(|u| now < u)
        };
        if self.role == Role::Leader
            && lease_valid
            && self.transferee.is_none()
            && self.log.term(self.log.committed) == Some(self.term)
        {
            let index = self.log.committed;
            self.read_states.push(ReadState { index, context });
            return Ok(());
        }
        self.read_index(context)
    }

    /// A linearizable read: on the leader, a read index confirmed by a quorum;
    /// on a follower, asked of the leader.
    pub(crate) fn read_index(&mut self, context: Vec<u8>) -> Result<(), ProposeError> {
        if self.pending_reads.len() + self.waiting_reads.len() >= self.cfg.reads_pending_max {
            return Err(ProposeError::TooManyReads);
        }
        match (self.role, self.leader) {
            (Role::Leader, _) => {
                self.leader_read(self.cfg.id, context);
                Ok(())
            }
            (_, Some(leader)) => {
                let term = self.term;
                self.send(leader, term, Body::ReadIndex { context });
                Ok(())
            }
            (_, None) => Err(ProposeError::NotLeader { leader: None }),
        }
    }

    fn leader_read(&mut self, from: NodeId, context: Vec<u8>) {
        // Followers' requests count against the same bound (dropped beyond it:
        // they retry).
        if self.pending_reads.len() + self.waiting_reads.len() >= self.cfg.reads_pending_max {
            return;
        }
        // Until an entry of this term is committed, the commit index may lag
        // what earlier leaders committed (Raft thesis 6.4).
        if self.log.term(self.log.committed) != Some(self.term) {
            self.waiting_reads.push((from, context));
            return;
        }
        let index = self.log.committed;
        let me = self.cfg.id;
        if self.quorum(|id| id == me) || self.mutation(Mutation::ReadWithoutQuorum) {
            self.release_read(from, index, context);
            return;
        }
        self.read_seq += 1;
        let acks = BTreeSet::from([self.cfg.id]);
        self.pending_reads.push_back(PendingRead { seq: self.read_seq, index, context, from, acks });
        self.broadcast_append(true);
    }

    fn confirm_reads(&mut self, from: NodeId, read_seq: u64) {
        if let Some(d) = self.cfg.lease_read_duration {
            for r in self.lease_rounds.iter_mut().filter(|r| r.0 <= read_seq) {
                r.2.insert(from);
            }
            // The newest round a quorum acknowledged: no other leader can be
            // elected before `start + d` (they heard from us at `start` or later).
            let conf = &self.conf;
            if let Some(pos) = self.lease_rounds.iter().rposition(|r| conf.quorum(|id| r.2.contains(&id))) {
                let start = self.lease_rounds[pos].1;
                self.lease_until = Some(self.lease_until.map_or(start + d, |u| u.max(start + d)));
                self.lease_until_tick = self.ticks + u64::from(self.cfg.election_ticks);
                self.lease_rounds.drain(..=pos);
            }
        }
        for r in self.pending_reads.iter_mut().filter(|r| r.seq <= read_seq) {
            r.acks.insert(from);
        }
        while self.pending_reads.front().is_some_and(|r| self.conf.quorum(|id| r.acks.contains(&id))) {
            let r = self.pending_reads.pop_front().expect("front");
            self.release_read(r.from, r.index, r.context);
        }
    }

    fn release_read(&mut self, from: NodeId, index: LogIndex, context: Vec<u8>) {
        if from == self.cfg.id {
            self.read_states.push(ReadState { index, context });
        } else {
            let term = self.term;
            self.send(from, term, Body::ReadIndexResponse { index, context });
        }
    }

    // ---- leadership transfer ----

    pub(crate) fn transfer_leader(&mut self, to: NodeId) -> Result<(), TransferError> {
        if self.role != Role::Leader {
            return Err(TransferError::NotLeader { leader: self.leader });
        }
        if !self.conf.is_voter(to) {
            return Err(TransferError::UnknownPeer(to));
        }
        if to == self.cfg.id {
            return Ok(());
        }
        self.transferee = Some(to);
        self.transfer_elapsed = 0;
        // The successor's forced votes pass the followers' leases: ours ends.
        self.lease_until = None;
        self.lease_until_tick = 0;
        self.lease_rounds.clear();
        self.maybe_send_timeout_now(to);
        Ok(())
    }

    fn maybe_send_timeout_now(&mut self, to: NodeId) {
        let last = self.log.last_index();
        let caught_up = self.progress.get(&to).is_some_and(|p| p.matched == last);
        if caught_up {
            let term = self.term;
            self.send(to, term, Body::TimeoutNow);
        } else {
            self.send_append(to, false);
        }
    }

    /// The transport could not reach `peer`: stop sending ahead to it.
    pub(crate) fn report_unreachable(&mut self, peer: NodeId) {
        if let Some(pr) = self.progress.get_mut(&peer)
            && pr.state == ProgressState::Replicate
        {
            pr.next = pr.matched.next();
            pr.become_probe();
        }
    }

    fn handle_append_response(&mut self, from: NodeId, success: bool, index: LogIndex, hint: LogIndex) {
        let last = self.log.last_index();
        let Some(pr) = self.progress.get_mut(&from) else { return };
        pr.recent_active = true;
        if success {
            if index > last {
                return; // not an index of our log: ignore
            }
            let moved = pr.on_success(index);
            if matches!(pr.state, ProgressState::Probe)
                || matches!(pr.state, ProgressState::Snapshot(s) if pr.matched >= s)
            {
                pr.become_replicate();
            }
            if moved {
                self.maybe_commit();
            }
            if self.transferee == Some(from) {
                self.maybe_send_timeout_now(from);
            }
            self.send_append(from, false);
        } else if pr.on_reject(index, hint) {
            self.send_append(from, false);
        }
    }
}
