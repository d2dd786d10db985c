//! A seeded, deterministic simulation of a Raft cluster in one thread: a
//! network that delays, reorders, drops and duplicates messages and partitions
//! nodes; storage that persists asynchronously and loses what was not yet
//! durable when a node crashes; crashes and restarts; client proposals. After
//! every step it checks the safety properties; then, with faults stopped, that
//! the cluster elects a leader and commits again.
//!
//! `RAFT_SIM_SEEDS=n` runs more seeds; a failure prints the seed and the
//! command that replays it.

use std::collections::{BTreeMap, VecDeque};

use cairn_raft_core::{
    Body, ConfChange, ConfChangeItem, ConfState, Config, Entry, EntryKind, HardState, LogIndex, LogStore, MemStore,
    Message, Mutation, NodeId, RawNode, Role, StepError, Term,
};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const STEPS: u64 = 2000;
/// Node slots: the initial voters, then nodes added later.
const SLOTS: usize = 7;

/// A write a node's storage is doing: it becomes durable at `done_at`.
struct PendingWrite {
    done_at: u64,
    snapshot: Option<(LogIndex, Term, ConfState)>,
    entries: Vec<Entry>,
    hard_state: Option<HardState>,
    after: Vec<Message>,
}

struct SimNode {
    id: NodeId,
    node: Option<RawNode<MemStore>>,
    /// The durable store while the node is down.
    disk: MemStore,
    pending: VecDeque<PendingWrite>,
    last_applied: u64,
    was_leader_in: Option<Term>,
    leader_log: Vec<Entry>,
    /// Down after a crash in the middle of a write; back at this step.
    restart_at: Option<u64>,
    /// Frozen (SIGSTOP) until this step: no ticks, no messages, no progress.
    paused_until: Option<u64>,
    /// Started (a member at some point); nodes are added once, never reused.
    started: bool,
    /// The membership it started with, and after each change it applied.
    conf_history: Vec<(u64, ConfState)>,
    /// The index its starting membership is as of (0 for the first voters).
    start_index: u64,
    /// Applied, not yet reported to the node (an apply worker that reports late).
    /// (applied index, step from which it is reported).
    apply_report: Option<(LogIndex, u64)>,
}

impl SimNode {
    fn conf_at(&self, index: u64) -> ConfState {
        self.conf_history.iter().rev().find(|(i, _)| *i <= index).map(|(_, c)| c.clone()).unwrap_or_default()
    }
}

#[derive(Default, Debug)]
struct Coverage {
    elections: u64,
    crashes: u64,
    partitions: u64,
    committed: u64,
    transfers: u64,
    reads_served: u64,
    snapshots_installed: u64,
    conf_changes: u64,
    /// Times a node had committed entries it did not hand out because too
    /// many bytes were being applied.
    apply_paused: u64,
}

struct Sim {
    rng: ChaCha8Rng,
    nodes: Vec<SimNode>,
    peers: Vec<NodeId>,
    net: Vec<(u64, Message)>,
    /// group[i] of node i; messages cross only within a group.
    group: Vec<u8>,
    step: u64,
    leaders: BTreeMap<Term, NodeId>,
    /// index -> (term, data) of every entry any node applied.
    applied: BTreeMap<u64, (Term, Vec<u8>)>,
    mutation: Option<Mutation>,
    cov: Coverage,
    next_data: u64,
    faults: bool,
    /// Reads asked: context -> the highest index applied anywhere when asked.
    reads: BTreeMap<u64, u64>,
    next_read: u64,
    /// The monotonic clock: one millisecond per step.
    base: Instant,
}

fn cfg(id: NodeId, peers: &[NodeId], seed: u64, mutation: Option<Mutation>) -> Config {
    let mut c = Config::new(id, peers.to_vec(), seed);
    c.mutation = mutation;
    // Half the seeds run without pre-vote: more candidates in the same term.
    c.pre_vote = seed % 4 < 2;
    // One seed in five runs without check-quorum: a cut-off leader keeps
    // believing it leads, and only the read protocol keeps its reads fresh.
    c.check_quorum = seed % 5 != 4;
    // A third send one entry per append: entries of an old term and the new
    // leader's no-op then reach followers separately (Figure 8's shape).
    if seed.is_multiple_of(3) {
        c.msg_bytes_max = 1;
    }
    c.inflight_msgs_max = 8;
    // Three seeds in seven hand out at most about three entries to apply until
    // they are reported applied (the reports come late, see `process_ready`).
    if seed % 7 < 3 {
        c.applying_bytes_max = 100;
    }
    // Keep at most 30 entries for lagging followers: beyond that they get snapshots.
    c.retain_entries_max = 30;
    // A quarter of the seeds serve reads from leases: ticks are 2 ms apart, the
    // shortest election timeout is 10 ticks (20 ms), the drift bound 4 ms.
    if seed % 4 == 1 {
        c.check_quorum = true;
        c.lease_read_duration = Some(Duration::from_millis(16));
    }
    c
}

impl Sim {
    /// `n` voters to start with; up to `SLOTS` nodes, the others added later.
    fn new(seed: u64, n: usize, mutation: Option<Mutation>) -> Sim {
        let peers: Vec<NodeId> = (1..=n as u64).map(NodeId).collect();
        let conf0 = ConfState::with_voters(peers.clone());
        let nodes = (1..=SLOTS as u64)
            .map(NodeId)
            .map(|id| {
                let started = id.0 <= n as u64;
                SimNode {
                    id,
                    node: started
                        .then(|| RawNode::new(cfg(id, &peers, seed, mutation), MemStore::new()).expect("config")),
                    disk: MemStore::new(),
                    pending: VecDeque::new(),
                    last_applied: 0,
                    was_leader_in: None,
                    leader_log: Vec::new(),
                    restart_at: None,
                    paused_until: None,
                    started,
                    conf_history: vec![(0, conf0.clone())],
                    start_index: 0,
                    apply_report: None,
                }
            })
            .collect();
        Sim {
            rng: ChaCha8Rng::seed_from_u64(seed),
            nodes,
            group: vec![0; SLOTS],
            peers,
            net: Vec::new(),
            step: 0,
            leaders: BTreeMap::new(),
            applied: BTreeMap::new(),
            mutation,
            cov: Coverage::default(),
            next_data: 0,
            faults: true,
            reads: BTreeMap::new(),
            next_read: 0,
            base: Instant::now(),
        }
    }

    fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.step)
    }

    fn paused(&self, i: usize) -> bool {
        self.nodes[i].paused_until.is_some_and(|t| t > self.step)
    }

    /// The node that leads and is not frozen (a frozen one takes no requests).
    fn live_leader(&self) -> Option<usize> {
        (0..self.nodes.len())
            .find(|&i| !self.paused(i) && self.nodes[i].node.as_ref().is_some_and(|x| x.role() == Role::Leader))
    }

    fn idx(&self, id: NodeId) -> usize {
        id.0 as usize - 1
    }

    fn send(&mut self, m: Message) {
        // A frozen node's buffers are not drained: what is sent to it meanwhile is lost.
        let to = self.idx(m.to);
        if self.faults && (self.paused(to) || self.rng.random_range(0..100) < 5) {
            // Dropped. A lost snapshot is a failed transfer, which the driver reports.
            let from = self.idx(m.from);
            if matches!(m.body, Body::Snapshot { .. })
                && let Some(leader) = self.nodes[from].node.as_mut()
            {
                leader.report_snapshot(m.to, false);
            }
            return;
        }
        let copies = if self.faults && self.rng.random_range(0..100) < 3 { 2 } else { 1 };
        for _ in 0..copies {
            let delay = if self.faults { self.rng.random_range(1..6) } else { 1 };
            self.net.push((self.step + delay, m.clone()));
        }
    }

    /// At the leader: add a never-used node as a learner, promote a learner,
    /// or remove a voter (keeping at least three), through joint consensus.
    fn change_membership(&mut self, seed: u64) {
        let Some(li) = self.live_leader() else {
            return;
        };
        let conf = self.nodes[li].node.as_ref().map(|x| x.conf_state().clone()).unwrap_or_default();
        let fresh = self.nodes.iter().find(|n| !n.started).map(|n| n.id);
        let learner = conf.learners.iter().next().copied();
        let voters: Vec<NodeId> = conf.voters.iter().copied().collect();
        let item = match self.rng.random_range(0..3) {
            0 if fresh.is_some() => ConfChangeItem::AddLearner(fresh.unwrap_or(NodeId(0))),
            1 if learner.is_some() => ConfChangeItem::AddVoter(learner.unwrap_or(NodeId(0))),
            2 if voters.len() > 3 => ConfChangeItem::Remove(voters[self.rng.random_range(0..voters.len())]),
            _ => return,
        };
        let cc = ConfChange { changes: vec![item], auto_leave: true };
        let Some(leader) = self.nodes[li].node.as_mut() else { return };
        let Ok(index) = leader.propose_conf_change(cc.clone()) else {
            return;
        };
        self.cov.conf_changes += 1;
        if let ConfChangeItem::AddLearner(id) = item {
            // The new node starts empty, with the membership it is added to.
            let i = self.idx(id);
            let start_conf = conf.apply(&cc).unwrap_or(conf);
            let mut c = cfg(id, &[], seed, self.mutation);
            c.conf = start_conf.clone();
            c.conf_index = index;
            let n = &mut self.nodes[i];
            n.started = true;
            n.start_index = index.0;
            n.conf_history = vec![(index.0, start_conf)];
            n.node = Some(RawNode::new(c, MemStore::new()).expect("config"));
        }
    }

    fn crash(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if let Some(node) = n.node.take() {
            // What was durable survives; writes in flight are lost.
            n.disk = node.store().clone();
            n.pending.clear();
            n.was_leader_in = None;
            n.apply_report = None;
            self.cov.crashes += 1;
        }
    }

    fn restart(&mut self, i: usize, seed: u64) {
        let peers = self.peers.clone();
        let mutation = self.mutation;
        let n = &mut self.nodes[i];
        if n.node.is_none() && n.started {
            let mut c = cfg(n.id, &peers, seed, mutation);
            // The state machine restarts from the snapshot the store holds,
            // with the membership as of it, then replays the log after it.
            c.applied = n.disk.first_index().prev();
            let as_of = c.applied.0.max(n.start_index);
            c.conf = n.conf_at(as_of);
            c.conf_index = LogIndex(as_of);
            n.conf_history.retain(|(k, _)| *k <= as_of);
            n.last_applied = c.applied.0;
            n.node = Some(RawNode::new(c, n.disk.clone()).expect("config"));
        }
    }

    fn faults_step(&mut self, seed: u64) {
        let n = self.nodes.len();
        for i in 0..n {
            if self.nodes[i].restart_at.is_some_and(|t| t <= self.step) {
                self.nodes[i].restart_at = None;
                self.restart(i, seed);
            }
        }
        let r = self.rng.random_range(0..1000);
        if r < 10 {
            let i = self.rng.random_range(0..n);
            self.crash(i);
        } else if r < 39 {
            let i = self.rng.random_range(0..n);
            self.restart(i, seed);
        } else if r < 41 {
            // A node freezes (SIGSTOP) for a while; time goes on without it.
            let i = self.rng.random_range(0..n);
            self.nodes[i].paused_until = Some(self.step + self.rng.random_range(30..80));
        } else if r < 42 {
            // The leader freezes, long enough for another to be elected; it
            // wakes up still believing it leads.
            if let Some(i) = self.live_leader() {
                self.nodes[i].paused_until = Some(self.step + self.rng.random_range(40..90));
            }
        } else if r < 43 {
            for g in self.group.iter_mut() {
                *g = self.rng.random_range(0..2);
            }
            self.cov.partitions += 1;
        } else if r < 55 {
            self.group.iter_mut().for_each(|g| *g = 0);
        }
    }

    fn run_step(&mut self, seed: u64) -> Result<(), String> {
        self.step += 1;
        if self.faults {
            self.faults_step(seed);
        }
        // Ticks.
        if self.step.is_multiple_of(2) {
            let now = self.now();
            for i in 0..self.nodes.len() {
                if self.paused(i) {
                    continue;
                }
                if let Some(node) = self.nodes[i].node.as_mut() {
                    node.tick_at(now);
                }
            }
        }
        // Deliveries.
        let now = self.step;
        let mut due = Vec::new();
        self.net.retain(|(t, m)| {
            if *t <= now {
                due.push(m.clone());
                false
            } else {
                true
            }
        });
        for m in due {
            let (from, to) = (self.idx(m.from), self.idx(m.to));
            let snapshot = matches!(m.body, Body::Snapshot { .. });
            let receiver = m.to;
            let delivered = self.group[from] == self.group[to] && self.nodes[to].node.is_some() && !self.paused(to);
            if delivered && let Some(node) = self.nodes[to].node.as_mut() {
                match node.step(m) {
                    // A removed node (or one not added yet, as the receiver sees it) is refused.
                    Ok(()) => {}
                    Err(StepError::UnknownPeer(p)) => return Err(format!("step: a message from {p:?} refused")),
                    Err(e) => return Err(format!("step: {e}")),
                }
            }
            if snapshot && let Some(leader) = self.nodes[from].node.as_mut() {
                leader.report_snapshot(receiver, delivered);
            }
        }
        // Compaction: now and then a node releases its log up to a little
        // before what it applied (a flush of the state machine).
        for n in self.nodes.iter_mut() {
            // Not while a snapshot install is pending: the store still holds the
            // old log, whose tail may never have been committed.
            let installing = n.pending.iter().any(|w| w.snapshot.is_some());
            if let Some(node) = n.node.as_mut()
                && !installing
                && n.last_applied > 20
                && self.rng.random_range(0..100) < 3
            {
                // Release no lower than the node asks (it keeps entries for lagging followers).
                let to = LogIndex(n.last_applied - self.rng.random_range(0..10)).min(node.retain_from().prev());
                if to >= node.store().first_index() && to <= node.store().last_index() {
                    let conf = n.conf_history.iter().rev().find(|(k, _)| *k <= to.0).map(|(_, c)| c.clone());
                    if let Some(node) = n.node.as_mut() {
                        node.store_mut().compact(to, conf.unwrap_or_default());
                    }
                }
            }
        }
        // Proposals.
        if self.rng.random_range(0..100) < 30
            && let Some(li) = self.live_leader()
            && let Some(node) = self.nodes[li].node.as_mut()
        {
            self.next_data += 1;
            let _ = node.propose(vec![self.next_data.to_le_bytes().to_vec()]);
        }
        // Membership changes, at the leader, one at a time.
        if self.faults && self.rng.random_range(0..1000) < 8 {
            self.change_membership(seed);
        }
        // Leadership transfers and reads.
        if self.rng.random_range(0..100) < 1 {
            let to = NodeId(self.rng.random_range(1..=self.nodes.len() as u64));
            if let Some(li) = self.live_leader()
                && let Some(node) = self.nodes[li].node.as_mut()
                && node.id() != to
                && node.transfer_leader(to).is_ok()
            {
                self.cov.transfers += 1;
            }
        }
        if self.rng.random_range(0..100) < 10 {
            let i = self.rng.random_range(0..self.nodes.len());
            let applied_anywhere = self.applied.keys().next_back().copied().unwrap_or(0);
            self.next_read += 1;
            let ctx = self.next_read;
            let now = self.now();
            let paused = self.paused(i);
            if let Some(node) = self.nodes[i].node.as_mut().filter(|_| !paused)
                && node.read_index_at(ctx.to_le_bytes().to_vec(), now).is_ok()
            {
                self.reads.insert(ctx, applied_anywhere);
            }
        }
        // Ready: send, hand writes to storage, apply.
        for i in 0..self.nodes.len() {
            if !self.paused(i) {
                self.process_ready(i)?;
            }
        }
        // Storage completes writes in order.
        for i in 0..self.nodes.len() {
            if !self.paused(i) {
                self.complete_writes(i)?;
            }
        }
        self.check()
    }

    fn process_ready(&mut self, i: usize) -> Result<(), String> {
        let sn = &mut self.nodes[i];
        let Some(node) = sn.node.as_mut() else { return Ok(()) };
        if let Some((a, _)) = sn.apply_report.take_if(|(_, at)| *at <= self.step) {
            node.on_applied(a);
        }
        let ready = node.ready();
        if node.applying_bytes() >= 100 && node.commit_index().0 > sn.last_applied {
            self.cov.apply_paused += 1;
        }
        node.advance(&ready);
        // Linearizable reads: a read index covers every write applied anywhere
        // before the read was asked.
        for rs in &ready.read_states {
            let ctx = u64::from_le_bytes(rs.context.clone().try_into().map_err(|_| "bad read context")?);
            let floor = self.reads.get(&ctx).copied().ok_or("a read nobody asked for")?;
            if rs.index.0 < floor {
                return Err(format!(
                    "stale read at node {}: index {} but {} was applied before the read began",
                    i + 1,
                    rs.index.0,
                    floor
                ));
            }
            self.cov.reads_served += 1;
        }
        // Only entries durable here are applied (checked against the durable store).
        for e in &ready.committed_entries {
            let durable = node.store().term(e.index) == Some(e.term);
            if !durable {
                return Err(format!("node {} applied entry {} before it was durable", i + 1, e.index.0));
            }
        }
        // Most writes are quick; one in ten is slow (a busy disk).
        let delay = if self.faults && self.rng.random_range(0..10) == 0 {
            self.rng.random_range(10..30)
        } else {
            self.rng.random_range(0..4)
        };
        let done_at = self.nodes[i].pending.back().map_or(self.step, |p| p.done_at).max(self.step + delay);
        if let Some((index, _, conf)) = &ready.snapshot {
            let index = *index;
            // Kept with the earlier history: if the install is lost in a
            // crash, the node restarts from its old log and membership.
            self.nodes[i].conf_history.push((index.0, conf.clone()));
            // The state machine is replaced by the leader's at `index`: every
            // entry up to it was committed (applied somewhere).
            if (1..=index.0).any(|k| !self.applied.contains_key(&k)) {
                return Err(format!("node {} installs a snapshot at {} beyond what was committed", i + 1, index.0));
            }
            self.nodes[i].last_applied = index.0;
            self.cov.snapshots_installed += 1;
        }
        // Track the membership after each change handed out (for compaction).
        for e in ready.committed_entries.iter().filter(|e| e.kind == EntryKind::ConfChange) {
            let (since, last) = self.nodes[i].conf_history.last().cloned().unwrap_or_default();
            if e.index.0 <= since {
                continue; // already in the membership it holds
            }
            if let Some(next) = ConfChange::decode(&e.data).and_then(|cc| last.apply(&cc).ok()) {
                self.nodes[i].conf_history.push((e.index.0, next));
            }
        }
        self.nodes[i].pending.push_back(PendingWrite {
            done_at,
            snapshot: ready.snapshot.clone(),
            entries: ready.entries,
            hard_state: ready.hard_state,
            after: ready.persisted_messages,
        });
        let hard_state_changed = self.nodes[i].pending.back().is_some_and(|w| w.hard_state.is_some());
        // A new term or vote not yet durable is the moment a crash matters most.
        let durable = self.nodes[i].node.as_ref().map(|n| n.store().hard_state()).unwrap_or_default();
        let vote_changed = self.nodes[i]
            .pending
            .back()
            .and_then(|w| w.hard_state)
            .is_some_and(|hs| (hs.term, hs.vote) != (durable.term, durable.vote));
        for m in ready.messages {
            self.send(m);
        }
        // A crash between handing a write to storage and its completion: what
        // was sent is out, what was not durable is lost.
        let crash_percent = if vote_changed { 15 } else { 2 };
        if self.faults && hard_state_changed && self.rng.random_range(0..100) < crash_percent {
            self.crash(i);
            self.nodes[i].restart_at = Some(self.step + self.rng.random_range(1..8));
            return Ok(());
        }
        if let Some(last) = ready.committed_entries.last() {
            // With faults, a third of the reports come a few steps late (and
            // while one is late, so are those after it).
            let late = self.nodes[i].apply_report;
            if late.is_some() || self.faults && self.rng.random_range(0..3) == 0 {
                let at = late.map_or(self.step + self.rng.random_range(1..6), |(_, at)| at);
                self.nodes[i].apply_report = Some((last.index, at));
            } else if let Some(node) = self.nodes[i].node.as_mut() {
                node.on_applied(last.index);
            }
        }
        for e in ready.committed_entries {
            let n = &mut self.nodes[i];
            if e.index.0 != n.last_applied + 1 {
                return Err(format!("node {} applied {} after {}", i + 1, e.index.0, n.last_applied));
            }
            n.last_applied = e.index.0;
            match self.applied.get(&e.index.0) {
                Some((t, d)) if (*t, d.as_slice()) != (e.term, &e.data[..]) => {
                    return Err(format!(
                        "state machine safety: node {} applied {:?} at index {}, another node applied term {:?}",
                        i + 1,
                        e.term,
                        e.index.0,
                        t
                    ));
                }
                Some(_) => {}
                None => {
                    self.applied.insert(e.index.0, (e.term, e.data.to_vec()));
                    self.cov.committed += 1;
                }
            }
        }
        Ok(())
    }

    fn complete_writes(&mut self, i: usize) -> Result<(), String> {
        loop {
            let n = &mut self.nodes[i];
            let Some(node) = n.node.as_mut() else { return Ok(()) };
            if n.pending.front().is_none_or(|p| p.done_at > self.step) {
                return Ok(());
            }
            let w = n.pending.pop_front().expect("front");
            if let Some((index, term, conf)) = w.snapshot.clone() {
                node.store_mut().apply_snapshot(index, term, conf);
            }
            // Only committed entries are compacted, and committed entries are
            // never overwritten: a write below the snapshot breaks both.
            if let Some(first) = w.entries.first()
                && first.index < node.store().first_index()
            {
                return Err(format!(
                    "node {} was asked to overwrite entry {} that its snapshot (up to {}) covers",
                    i + 1,
                    first.index.0,
                    node.store().first_index().0 - 1
                ));
            }
            node.store_mut().append(&w.entries);
            if let Some(hs) = w.hard_state {
                node.store_mut().set_hard_state(hs);
            }
            match (w.entries.last(), &w.snapshot) {
                (Some(last), _) => node.on_persisted(last.index, last.term),
                (None, Some((index, term, _))) => node.on_persisted(*index, *term),
                (None, None) => {}
            }
            let me = n.id;
            for m in w.after {
                if m.to == me {
                    if let Some(node) = self.nodes[i].node.as_mut() {
                        node.step(m).map_err(|e| format!("step to self: {e}"))?;
                    }
                } else {
                    self.send(m);
                }
            }
        }
    }

    fn check(&mut self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            let Some(node) = self.nodes[i].node.as_ref() else { continue };
            if node.role() != Role::Leader {
                self.nodes[i].was_leader_in = None;
                continue;
            }
            let term = node.term();
            // Election safety: one leader per term, ever.
            match self.leaders.get(&term) {
                Some(l) if *l != node.id() => {
                    return Err(format!("two leaders in term {}: {} and {}", term.0, l.0, node.id().0));
                }
                Some(_) => {}
                None => {
                    self.leaders.insert(term, node.id());
                    self.cov.elections += 1;
                }
            }
            let log = node.log_entries();
            let first = log.first().map_or(node.last_index().next().0, |e| e.index.0);
            let at = |idx: u64| log.get(idx.checked_sub(first)? as usize);
            if self.nodes[i].was_leader_in != Some(term) {
                // Leader completeness: a new leader holds every entry applied
                // anywhere (those its snapshot covers, it holds there).
                for (idx, (t, _)) in self.applied.range(first..) {
                    if at(*idx).map(|e| e.term) != Some(*t) {
                        return Err(format!("leader {} of term {} lacks committed entry {idx}", i + 1, term.0));
                    }
                }
            } else {
                // A leader never overwrites or removes its entries (compaction aside).
                for e in self.nodes[i].leader_log.iter().filter(|e| e.index.0 >= first) {
                    if at(e.index.0) != Some(e) {
                        return Err(format!("leader {} changed its own log in term {}", i + 1, term.0));
                    }
                }
            }
            self.nodes[i].was_leader_in = Some(term);
            self.nodes[i].leader_log = log;
        }
        if self.step.is_multiple_of(5) {
            self.check_log_matching()?;
        }
        Ok(())
    }

    /// Logs that hold an entry with the same index and term are identical up
    /// to it (where both still hold entries: prefixes may be compacted).
    fn check_log_matching(&self) -> Result<(), String> {
        let logs: Vec<BTreeMap<u64, Entry>> = self
            .nodes
            .iter()
            .map(|n| {
                let v = n.node.as_ref().map_or_else(|| n.disk.all().to_vec(), |x| x.log_entries());
                v.into_iter().map(|e| (e.index.0, e)).collect()
            })
            .collect();
        for a in 0..logs.len() {
            for b in a + 1..logs.len() {
                // The highest index where both hold an entry of the same term...
                let same = logs[a].iter().rev().find(|(i, e)| logs[b].get(i).is_some_and(|f| f.term == e.term));
                let Some((&k, _)) = same else { continue };
                // ...and every index below it that both still hold must match.
                for (i, e) in logs[a].range(..=k) {
                    if let Some(f) = logs[b].get(i)
                        && f != e
                    {
                        return Err(format!(
                            "log matching: nodes {} and {} agree at {k} but differ at {i}",
                            a + 1,
                            b + 1
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Faults stop: everyone up, one network, reliable delivery. A leader must
    /// emerge and a new proposal must commit on every node.
    fn liveness(&mut self, seed: u64) -> Result<(), String> {
        self.faults = false;
        self.nodes.iter_mut().for_each(|n| n.paused_until = None);
        self.group.iter_mut().for_each(|g| *g = 0);
        for i in 0..self.nodes.len() {
            self.restart(i, seed);
        }
        let target = self.next_data + 1_000_000;
        let mut proposed_at = None;
        for _ in 0..600 {
            self.run_step(seed)?;
            // A client retries a proposal that a deposed leader dropped.
            let target_applied = self.applied.values().any(|(_, d)| *d == target.to_le_bytes().to_vec());
            if !target_applied && proposed_at.is_some_and(|p| self.step >= p + 50) {
                proposed_at = None;
            }
            if proposed_at.is_none() {
                for n in self.nodes.iter_mut() {
                    if let Some(node) = n.node.as_mut()
                        && node.role() == Role::Leader
                        && node.propose(vec![target.to_le_bytes().to_vec()]).is_ok()
                    {
                        proposed_at = Some(self.step);
                        break;
                    }
                }
            }
            // Every member of the leader's configuration applied it.
            let members = self
                .nodes
                .iter()
                .find_map(|n| n.node.as_ref().filter(|x| x.role() == Role::Leader).map(|x| x.conf_state().members()));
            let target_index =
                self.applied.iter().find(|(_, (_, d))| *d == target.to_le_bytes().to_vec()).map(|(i, _)| *i);
            let everywhere = members.is_some_and(|m| {
                self.nodes
                    .iter()
                    .filter(|n| m.contains(&n.id))
                    .all(|n| target_index.is_some_and(|t| n.node.is_some() && n.last_applied >= t))
            });
            if everywhere {
                return Ok(());
            }
        }
        let state: Vec<String> = self
            .nodes
            .iter()
            .map(|n| match n.node.as_ref() {
                Some(x) => format!(
                    "{}:{:?} t{} commit {} last {} applied {} pending {} progress {:?}",
                    n.id.0,
                    x.role(),
                    x.term().0,
                    x.commit_index().0,
                    x.last_index().0,
                    n.last_applied,
                    n.pending.len(),
                    x.progress()
                        .iter()
                        .map(|(id, p)| (id.0, p.matched.0, p.next.0, p.state, p.inflight_len()))
                        .collect::<Vec<_>>()
                ),
                None => format!("{}: down", n.id.0),
            })
            .collect();
        Err(format!(
            "liveness: no commit on every node within 600 steps after faults stopped (proposed at {proposed_at:?}); {state:?}"
        ))
    }
}

fn run(seed: u64, n: usize, mutation: Option<Mutation>) -> Result<Coverage, String> {
    let mut sim = Sim::new(seed, n, mutation);
    for _ in 0..STEPS {
        sim.run_step(seed).map_err(|e| format!("step {}: {e}", sim.step))?;
    }
    sim.liveness(seed)?;
    Ok(sim.cov)
}

fn seeds() -> u64 {
    std::env::var("RAFT_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(300)
}

#[test]
fn simulated_clusters_stay_safe_and_live() {
    let mut total = Coverage::default();
    for seed in 0..seeds() {
        let n = if seed.is_multiple_of(2) { 3 } else { 5 };
        match run(seed, n, None) {
            Ok(c) => {
                total.elections += c.elections;
                total.crashes += c.crashes;
                total.partitions += c.partitions;
                total.committed += c.committed;
                total.transfers += c.transfers;
                total.reads_served += c.reads_served;
                total.snapshots_installed += c.snapshots_installed;
                total.conf_changes += c.conf_changes;
                total.apply_paused += c.apply_paused;
            }
            Err(e) => panic!(
                "seed {seed} ({n} nodes): {e}\nreplay: RAFT_SIM_SEED={seed} cargo test -p cairn-raft-core --test sim replay -- --ignored"
            ),
        }
    }
    eprintln!("covered over {} seeds: {total:?}", seeds());
    assert!(total.elections > seeds() && total.crashes > seeds() && total.committed > seeds() * 100);
    assert!(total.transfers > seeds() && total.reads_served > seeds() * 10);
    assert!(total.snapshots_installed > seeds() / 2, "snapshots rarely happen: {}", total.snapshots_installed);
    assert!(total.conf_changes > seeds(), "membership rarely changes: {}", total.conf_changes);
    assert!(total.apply_paused > seeds(), "applying never paused: {}", total.apply_paused);
}

#[test]
#[ignore]
fn replay() {
    let seed: u64 = std::env::var("RAFT_SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let n = if seed.is_multiple_of(2) { 3 } else { 5 };
    run(seed, n, None).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
}

/// Each mutation breaks a safety rule; the simulator must catch it within the CI seeds.
#[test]
fn the_simulator_has_teeth() {
    // Figure 8 (Mutation::CommitEarlierTerm), a lease counted in ticks
    // (Mutation::LeaseCountsTicks) and reads served without a quorum
    // (Mutation::ReadWithoutQuorum, caught here too on some seeds, but the
    // window is narrow) need interleavings random faults rarely build:
    // tests/figure8.rs and tests/lease.rs script them.
    for m in [Mutation::VoteBeforePersist, Mutation::LeaderCountsUnpersisted, Mutation::ApplyUnpersisted] {
        let caught = (0..seeds())
            .find_map(|seed| run(seed, if seed.is_multiple_of(2) { 3 } else { 5 }, Some(m)).err().map(|e| (seed, e)));
        match caught {
            Some((seed, e)) => eprintln!("{m:?} caught at seed {seed}: {e}"),
            None => panic!("{m:?} was not caught in {} seeds", seeds()),
        }
    }
}
