//! The Raft task: the one owner of the `RawNode`. It ticks, steps peer
//! messages, batches proposals, and runs the ready loop: messages out at
//! once, entries and hard state to the WAL thread, committed entries to the
//! apply worker, read indexes to the readers waiting for them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_kv_client::protocol::{ErrorCode, ErrorInfo, MemberInfo, Response, StatusInfo};
use cairn_raft_core::{Body, EntryKind, LogIndex, LogStore, Message, NodeId, RawNode, Role};
use tokio::sync::{mpsc, oneshot, watch};

use crate::apply::{ApplyJob, Waiter, Waiters};
use crate::config::SnapshotSettings;
use crate::snapshot::{ReceiveState, SendContext, SendRequest, SharedDb};
use crate::storage::{MarkerJob, WalJob, WalStore};

/// Where a read's index goes.
type ReadReply = oneshot::Sender<Result<u64, ErrorInfo>>;

/// Requests to the Raft task.
#[derive(Debug)]
pub enum NodeRequest {
    /// Propose entry data; the answer comes from the apply worker once it applies.
    Propose {
        /// The command bytes (empty: a health check).
        data: Vec<u8>,
        /// Where the answer goes.
        reply: oneshot::Sender<Response>,
    },
    /// A read index for a linearizable read.
    ReadIndex {
        /// The index to wait for, or why not.
        reply: oneshot::Sender<Result<u64, ErrorInfo>>,
    },
    /// The node's view.
    Status {
        /// Where the answer goes.
        reply: oneshot::Sender<StatusInfo>,
    },
    /// The members.
    Members {
        /// Where the answer goes.
        reply: oneshot::Sender<Vec<MemberInfo>>,
    },
    /// Hand leadership to a node.
    TransferLeader {
        /// The node.
        to: u64,
        /// Ok, or why not.
        reply: oneshot::Sender<Result<(), ErrorInfo>>,
    },
    /// Whether the membership is joint (a change is still being made).
    IsJoint {
        /// Where the answer goes.
        reply: oneshot::Sender<bool>,
    },
    /// Change the membership; answered once the change applied.
    ConfChange {
        /// The change.
        change: MemberChange,
        /// `Response::Ok` once applied, or why not.
        reply: oneshot::Sender<Response>,
    },
    /// Stop: a leader first hands leadership to the most caught-up voter.
    Shutdown {
        /// Answered once the node stepped down (or gave up trying).
        reply: oneshot::Sender<()>,
    },
}

/// A membership change a client asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberChange {
    /// Add a learner.
    AddLearner(u64),
    /// Add a voter.
    AddVoter(u64),
    /// Make a caught-up learner a voter.
    Promote(u64),
    /// Remove a node.
    Remove(u64),
}

/// The channels and handles the Raft task works with.
pub struct NodeTask {
    /// Make the links to every member at start (the first message makes a
    /// link otherwise).
    pub dial_at_start: bool,
    /// The node.
    pub raw: RawNode<WalStore>,
    /// This node's name.
    pub name: String,
    /// The cluster id.
    pub cluster_id: u64,
    /// Tick length.
    pub tick: Duration,
    /// Client and control requests.
    pub requests: mpsc::Receiver<NodeRequest>,
    /// Messages from peers.
    pub inbound: mpsc::Receiver<Message>,
    /// Peers reported unreachable by their links.
    pub unreachable: mpsc::Receiver<NodeId>,
    /// Jobs for the WAL thread.
    pub wal_jobs: std::sync::mpsc::SyncSender<WalJob>,
    /// Jobs the WAL thread finished.
    pub wal_done: mpsc::Receiver<WalJob>,
    /// Jobs for the apply worker.
    pub apply_jobs: mpsc::Sender<ApplyJob>,
    /// The index the apply worker reached.
    pub applied: watch::Receiver<u64>,
    /// Proposals waiting for apply.
    pub waiters: Waiters,
    /// A queue per peer; a full queue reports the peer unreachable.
    pub links: Arc<dyn Fn(NodeId) -> Option<mpsc::Sender<Message>> + Send + Sync>,
    /// The address of each member (for leader hints and the member list),
    /// and the removed ids.
    pub book: crate::state::SharedBook,
    /// The state (for sizes in status, and its durable marker for release).
    pub db: Arc<SharedDb>,
    /// Reads waiting for confirmation, at most.
    pub pending_reads_max: usize,
    /// Log release and snapshot settings.
    pub snapshot: SnapshotSettings,
    /// What snapshot senders need.
    pub send_ctx: SendContext,
    /// Outcomes of snapshot transfers: (peer, success).
    pub snapshot_done: mpsc::Receiver<(NodeId, Option<u64>)>,
    /// Checkpoints received and not yet installed.
    pub received: Arc<ReceiveState>,
    /// Index of the latest membership change applied (or in the state),
    /// raised before the change goes to apply; snapshot senders read it.
    pub conf_index: Arc<AtomicU64>,
    /// Bytes of the data directory, as last measured.
    pub used_bytes: Arc<std::sync::atomic::AtomicU64>,
    /// The space quota.
    pub quota_bytes: u64,
    /// `(this node leads, the leader known)`, for the lessor.
    pub leader_watch: watch::Sender<(bool, Option<u64>)>,
    /// This node's configured apply limits: its first proposal as a new
    /// leader, so that every entry of its term applies with them.
    pub limits: crate::apply::ApplyLimits,
}

impl std::fmt::Debug for NodeTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTask").field("id", &self.raw.id()).finish_non_exhaustive()
    }
}

struct Loop {
    t: NodeTask,
    peers: HashMap<NodeId, mpsc::Sender<Message>>,
    /// Reads waiting for a read index, by the context of the request that
    /// asks it for all of them.
    reads: HashMap<u64, Vec<ReadReply>>,
    read_seq: u64,
    last_term: u64,
    last_leader: Option<NodeId>,
    shutdown: Option<(oneshot::Sender<()>, tokio::time::Instant)>,
    transfers: HashMap<NodeId, tokio::task::JoinHandle<()>>,
    /// Whether this node is in the membership (as last applied).
    member: bool,
    release_in_flight: bool,
    snapshots_installed: u64,
    deltas_installed: u64,
    snapshots_sent: u64,
}

impl NodeTask {
    /// Runs the task until every request sender is dropped, or a shutdown completes.
    pub async fn run(self) {
        let mut ticker = tokio::time::interval(self.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut l = Loop {
            t: self,
            peers: HashMap::new(),
            reads: HashMap::new(),
            read_seq: 0,
            last_term: 0,
            last_leader: None,
            shutdown: None,
            transfers: HashMap::new(),
            member: false,
            release_in_flight: false,
            snapshots_installed: 0,
            deltas_installed: 0,
            snapshots_sent: 0,
        };
        l.member = l.t.raw.conf_state().members().contains(&l.t.raw.id());
        // Dial every peer at once: a restarted node's connection wakes the
        // leader's link and snapshot sender toward it (see `PeerArrivals`),
        // instead of waiting for this node's first message (an election
        // timeout away).
        let me = l.t.raw.id();
        let members = if l.t.dial_at_start { l.t.raw.conf_state().members() } else { Default::default() };
        for p in members.into_iter().filter(|p| *p != me) {
            if let Some(link) = (l.t.links)(p) {
                l.peers.insert(p, link);
            }
        }
        let mut release_check = tokio::time::interval(Duration::from_millis(l.t.snapshot.release_check_ms.max(10)));
        release_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                due = ticker.tick() => {
                    // A late tick means this task could not run: a blocked
                    // worker thread, or no CPU for it.
                    crate::note_slow("raft_tick", due.elapsed(), format_args!("the Raft task's tick came late"));
                    l.t.raw.tick();
                    if l.shutdown_done() { return; }
                }
                m = l.t.inbound.recv() => match m {
                    Some(m) => {
                        l.step(m);
                        for _ in 0..256 {
                            match l.t.inbound.try_recv() { Ok(m) => l.step(m), Err(_) => break }
                        }
                    }
                    None => return,
                },
                r = l.t.requests.recv() => match r {
                    Some(r) => l.handle_requests(r),
                    None => return,
                },
                Some(job) = l.t.wal_done.recv() => {
                    l.persisted(job);
                    while let Ok(job) = l.t.wal_done.try_recv() { l.persisted(job); }
                }
                Ok(()) = l.t.applied.changed() => {
                    let a = *l.t.applied.borrow_and_update();
                    l.t.raw.on_applied(LogIndex(a));
                }
                Some(p) = l.t.unreachable.recv() => l.t.raw.report_unreachable(p),
                Some((peer, sent)) = l.t.snapshot_done.recv() => {
                    l.transfers.remove(&peer);
                    // A follower that held the state already was sent nothing.
                    if sent.is_some_and(|b| b > 0) { l.snapshots_sent += 1; }
                    l.t.raw.report_snapshot(peer, sent.is_some());
                }
                _ = release_check.tick() => {
                    l.maybe_release();
                    l.report_memory();
                }
            }
            l.process_ready();
        }
    }
}

impl Loop {
    fn step(&mut self, m: Message) {
        if let Err(e) = self.t.raw.step(m) {
            tracing::debug!(error = %e, "message not stepped");
        }
    }

    fn leader_hint(&self) -> Option<(u64, String)> {
        let l = self.t.raw.leader()?;
        crate::state::read_book(&self.t.book).addrs.get(&l.0).map(|a| (l.0, a.clone()))
    }

    fn not_leader(&self) -> ErrorInfo {
        let leader = self.leader_hint();
        let message = match &leader {
            Some((id, addr)) => format!("node {} is not the leader; node {id} at {addr} is", self.t.raw.id().0),
            None => {
                format!("node {} is not the leader and knows of none (an election may be running)", self.t.raw.id().0)
            }
        };
        ErrorInfo { code: ErrorCode::NotLeader, message, leader }
    }

    fn handle_requests(&mut self, first: NodeRequest) {
        let mut batch: Vec<(Vec<u8>, oneshot::Sender<Response>)> = Vec::new();
        let mut reads: Vec<ReadReply> = Vec::new();
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(r) = next.take() {
            match r {
                NodeRequest::Propose { data, reply } => batch.push((data, reply)),
                NodeRequest::ReadIndex { reply } => reads.push(reply),
                other => self.handle_other(other),
            }
            taken += 1;
            if taken < 1024 {
                next = self.t.requests.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            self.propose(batch);
        }
        if !reads.is_empty() {
            self.read_batch(reads);
        }
    }

    /// Asks one read index for every read in `replies` (they all arrived
    /// before it is asked, so the index it returns serves each of them
    /// linearizably): one round of heartbeats per batch, not per read, as
    /// etcd's read loop does.
    fn read_batch(&mut self, mut replies: Vec<ReadReply>) {
        // Few rounds are outstanding at once (usually one), so counting is cheap.
        let waiting: usize = self.reads.values().map(Vec::len).sum();
        let room = self.t.pending_reads_max.saturating_sub(waiting);
        if replies.len() > room {
            for reply in replies.drain(room..) {
                let _ = reply.send(Err(ErrorInfo {
                    code: ErrorCode::Busy,
                    message: "too many reads waiting for a read index".into(),
                    leader: None,
                }));
            }
        }
        if replies.is_empty() {
            return;
        }
        let fail = |replies: Vec<ReadReply>, message: String| {
            for reply in replies {
                let _ =
                    reply.send(Err(ErrorInfo { code: ErrorCode::Unavailable, message: message.clone(), leader: None }));
            }
        };
        if self.t.raw.leader().is_none() {
            return fail(replies, "no leader known (an election may be running)".into());
        }
        self.read_seq += 1;
        let ctx = self.read_seq.to_le_bytes().to_vec();
        match self.t.raw.read_index(ctx) {
            Ok(()) => {
                metrics::counter!("cairn_read_index_requests_total").increment(1);
                self.reads.insert(self.read_seq, replies);
            }
            Err(e) => fail(replies, format!("cannot get a read index: {e}")),
        }
    }

    /// A new leader's first proposal: its configured limits, ahead of every
    /// client request of its term (`CommandOp::SetLimits`; see
    /// `docs/design/kv-server.md`, "Limits are replicated").
    fn propose_limits(&mut self, term: u64) {
        let op = crate::state::CommandOp::SetLimits { values: self.t.limits.to_values() };
        match (crate::state::Command { time_ms: crate::server::now_ms(), op }).encode() {
            Ok(data) => {
                let (reply, mut answer) = oneshot::channel();
                self.propose(vec![(data, reply)]);
                // A refusal comes at once; the entries of this term then apply
                // with the limits the state holds.
                if let Ok(Response::Error(e)) = answer.try_recv() {
                    tracing::warn!(term, error = %e.message, "could not propose this node's limits");
                }
            }
            Err(e) => tracing::error!(term, error = %e, "cannot encode this node's limits"),
        }
    }

    fn propose(&mut self, batch: Vec<(Vec<u8>, oneshot::Sender<Response>)>) {
        if self.t.raw.role() != Role::Leader || self.shutdown.is_some() {
            let e = self.not_leader();
            for (_, reply) in batch {
                let _ = reply.send(Response::Error(e.clone()));
            }
            return;
        }
        let n = batch.len() as u64;
        let (datas, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let bytes: usize = datas.iter().map(Vec::len).sum();
        match self.t.raw.propose(datas) {
            Ok(last) => {
                let term = self.t.raw.term();
                let mut w = self.t.waiters.lock().unwrap_or_else(|e| e.into_inner());
                for (i, reply) in replies.into_iter().enumerate() {
                    w.insert(last.0 + 1 - n + i as u64, Waiter { term, reply });
                }
                metrics::counter!("cairn_raft_proposals_total").increment(n);
                metrics::counter!("cairn_raft_proposal_bytes_total").increment(bytes as u64);
            }
            Err(e) => {
                let info = match e {
                    cairn_raft_core::ProposeError::NotLeader { .. } => self.not_leader(),
                    other => ErrorInfo { code: ErrorCode::Busy, message: other.to_string(), leader: None },
                };
                for reply in replies {
                    let _ = reply.send(Response::Error(info.clone()));
                }
            }
        }
    }

    fn handle_other(&mut self, r: NodeRequest) {
        match r {
            NodeRequest::Propose { .. } => unreachable!("handled by the caller"),
            NodeRequest::ReadIndex { reply } => self.read_batch(vec![reply]),
            NodeRequest::Status { reply } => {
                let _ = reply.send(self.status());
            }
            NodeRequest::Members { reply } => {
                let conf = self.t.raw.conf_state().clone();
                let book = crate::state::read_book(&self.t.book);
                let mut out = Vec::new();
                for id in conf.members() {
                    out.push(MemberInfo {
                        id: id.0,
                        addr: book.addrs.get(&id.0).cloned().unwrap_or_default(),
                        learner: conf.learners.contains(&id),
                    });
                }
                let _ = reply.send(out);
            }
            NodeRequest::ConfChange { change, reply } => self.conf_change(change, reply),
            NodeRequest::IsJoint { reply } => {
                let _ = reply.send(self.t.raw.conf_state().is_joint());
            }
            NodeRequest::TransferLeader { to, reply } => {
                let r = if self.t.raw.role() != Role::Leader {
                    Err(self.not_leader())
                } else {
                    self.t.raw.transfer_leader(NodeId(to)).map_err(|e| ErrorInfo {
                        code: ErrorCode::BadRequest,
                        message: e.to_string(),
                        leader: None,
                    })
                };
                let _ = reply.send(r);
            }
            NodeRequest::Shutdown { reply } => {
                if self.t.raw.role() == Role::Leader {
                    let me = self.t.raw.id();
                    let best = self
                        .t
                        .raw
                        .progress()
                        .into_iter()
                        .filter(|(id, _)| *id != me && self.t.raw.conf_state().is_voter(*id))
                        .max_by_key(|(_, p)| p.matched);
                    if let Some((id, _)) = best {
                        tracing::info!(to = id.0, "shutting down: handing leadership over");
                        let _ = self.t.raw.transfer_leader(id);
                    }
                }
                self.shutdown = Some((reply, tokio::time::Instant::now() + Duration::from_secs(3)));
            }
        }
    }

    fn conf_change(&mut self, change: MemberChange, reply: oneshot::Sender<Response>) {
        use cairn_raft_core::{ConfChange, ConfChangeItem};
        let refuse = |reply: oneshot::Sender<Response>, code: ErrorCode, message: String| {
            let _ = reply.send(Response::Error(ErrorInfo { code, message, leader: None }));
        };
        if self.t.raw.role() != Role::Leader {
            let _ = reply.send(Response::Error(self.not_leader()));
            return;
        }
        let conf = self.t.raw.conf_state().clone();
        let members = conf.members();
        let (item, id) = match change {
            MemberChange::AddLearner(id) | MemberChange::AddVoter(id) => {
                if crate::state::read_book(&self.t.book).removed.contains(&id) {
                    return refuse(
                        reply,
                        ErrorCode::BadRequest,
                        format!("node id {id} was removed; ids are never reused"),
                    );
                }
                if members.contains(&NodeId(id)) {
                    return refuse(reply, ErrorCode::BadRequest, format!("node {id} is a member already"));
                }
                let item = if matches!(change, MemberChange::AddLearner(_)) {
                    ConfChangeItem::AddLearner(NodeId(id))
                } else {
                    ConfChangeItem::AddVoter(NodeId(id))
                };
                (item, id)
            }
            MemberChange::Promote(id) => {
                if !conf.learners.contains(&NodeId(id)) {
                    return refuse(reply, ErrorCode::BadRequest, format!("node {id} is not a learner"));
                }
                // A learner far behind would stall commits once it votes: wait until it caught up.
                let matched =
                    self.t.raw.progress().into_iter().find(|(p, _)| p.0 == id).map_or(0, |(_, p)| p.matched.0);
                let commit = self.t.raw.commit_index().0;
                let slack = self.t.snapshot.release_margin_entries.clamp(1, 1000);
                if matched + slack < commit {
                    return refuse(
                        reply,
                        ErrorCode::Busy,
                        format!("learner {id} has not caught up yet (at {matched}, the log commits {commit})"),
                    );
                }
                (ConfChangeItem::AddVoter(NodeId(id)), id)
            }
            MemberChange::Remove(id) => {
                if !members.contains(&NodeId(id)) {
                    return refuse(reply, ErrorCode::BadRequest, format!("node {id} is not a member"));
                }
                (ConfChangeItem::Remove(NodeId(id)), id)
            }
        };
        match self.t.raw.propose_conf_change(ConfChange { changes: vec![item], auto_leave: true }) {
            Ok(index) => {
                tracing::info!(?change, index = index.0, "membership change proposed");
                let term = self.t.raw.term();
                self.t.waiters.lock().unwrap_or_else(|e| e.into_inner()).insert(index.0, Waiter { term, reply });
            }
            Err(cairn_raft_core::ProposeError::NotLeader { .. }) => {
                let _ = reply.send(Response::Error(self.not_leader()));
            }
            Err(e) => refuse(reply, ErrorCode::Busy, format!("membership change of node {id} not proposed now: {e}")),
        }
    }

    fn shutdown_done(&mut self) -> bool {
        let done = match &self.shutdown {
            Some((_, deadline)) => self.t.raw.role() != Role::Leader || tokio::time::Instant::now() >= *deadline,
            None => false,
        };
        if done && let Some((reply, _)) = self.shutdown.take() {
            let _ = reply.send(());
        }
        done
    }

    fn status(&self) -> StatusInfo {
        let raw = &self.t.raw;
        let role = match raw.role() {
            Role::Leader => "leader",
            Role::Candidate => "candidate",
            Role::PreCandidate => "pre-candidate",
            Role::Follower if raw.conf_state().learners.contains(&raw.id()) => "learner",
            Role::Follower => "follower",
        };
        let db = self.t.db.get();
        let lsm = db.stats();
        StatusInfo {
            node_id: raw.id().0,
            name: self.t.name.clone(),
            cluster_id: self.t.cluster_id,
            leader_id: raw.leader().map_or(0, |l| l.0),
            role: role.into(),
            term: raw.term().0,
            commit: raw.commit_index().0,
            applied: raw.applied().0,
            last_index: raw.last_index().0,
            wal_bytes: dir_bytes(raw.store().wal().dir()),
            lsm_bytes: lsm.levels.iter().map(|l| l.bytes).sum::<u64>() + lsm.blob_bytes,
            durable_index: db.durable_marker().map_or(0, |m| m.index),
            first_index: raw.store().first_index().0,
            snapshots_installed: self.snapshots_installed,
            deltas_installed: self.deltas_installed,
            snapshots_sent: self.snapshots_sent,
            alarms: crate::state::read_book(&self.t.book).alarms.iter().copied().collect(),
            used_bytes: self.t.used_bytes.load(std::sync::atomic::Ordering::Relaxed),
            quota_bytes: self.t.quota_bytes,
            state_hash: None,
        }
    }

    fn send(&mut self, m: Message) {
        let me = self.t.raw.id();
        if m.to == me {
            self.step(m);
            return;
        }
        if let Body::Snapshot { index, conf, .. } = &m.body {
            self.start_transfer(m.to, m.term, *index, conf.clone());
            return;
        }
        let to = m.to;
        let link = match self.peers.get(&to) {
            Some(l) => l.clone(),
            None => match (self.t.links)(to) {
                Some(l) => {
                    self.peers.insert(to, l.clone());
                    l
                }
                None => {
                    self.t.raw.report_unreachable(to);
                    return;
                }
            },
        };
        if link.try_send(m).is_err() {
            metrics::counter!("cairn_peer_queue_full_total").increment(1);
            self.t.raw.report_unreachable(to);
        }
    }

    /// A membership change took effect: links to nodes no longer members
    /// close; a node that was removed stops.
    fn membership_changed(&mut self, conf: &cairn_raft_core::ConfState) {
        let members = conf.members();
        self.peers.retain(|id, _| members.contains(id));
        let me = self.t.raw.id();
        let member = members.contains(&me);
        // A node joining sees older changes before its own: only a member that stops being one leaves.
        if self.member && !member {
            tracing::warn!("this node was removed from the cluster; stopping");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM);
        }
        self.member = member;
    }

    /// Raft asked for a snapshot to `to`: a transfer task sends a checkpoint
    /// at `index` or later and reports back.
    fn start_transfer(
        &mut self,
        to: NodeId,
        term: cairn_raft_core::Term,
        index: LogIndex,
        conf: cairn_raft_core::ConfState,
    ) {
        self.transfers.retain(|_, h| !h.is_finished());
        if self.transfers.contains_key(&to) {
            return;
        }
        if self.transfers.len() >= self.t.snapshot.transfers_max || self.conf_index_after(index) {
            // Not now: Raft probes again and asks later.
            self.t.raw.report_snapshot(to, false);
            return;
        }
        tracing::info!(peer = to.0, index = index.0, "sending a snapshot");
        let req = SendRequest { to, term, min_index: index, conf };
        let h = tokio::spawn(crate::snapshot::send_snapshot(self.t.send_ctx.clone(), req));
        self.transfers.insert(to, h);
    }

    /// Whether a membership change after `index` is applied already (the
    /// membership as of a checkpoint at `index` is then not the current one,
    /// and this node does not keep older ones).
    fn conf_index_after(&self, index: LogIndex) -> bool {
        self.t.conf_index.load(Ordering::Acquire) > index.0
    }

    /// Releases the log below the state's durable marker less the margin,
    /// keeping what lagging followers and transfers need: a snapshot marker
    /// first, then the segments below it (DESIGN.md, "Release").
    fn maybe_release(&mut self) {
        if self.release_in_flight {
            return;
        }
        let durable = self.t.db.get().durable_marker().map_or(0, |m| m.index);
        let s = &self.t.snapshot;
        let store = self.t.raw.store();
        let by_entries = durable.saturating_sub(s.release_margin_entries) + 1;
        let by_bytes = store.tail_start_for_bytes(LogIndex(durable), s.release_margin_bytes).0;
        let keep_from = by_entries.max(by_bytes).min(self.t.raw.retain_from().0).min(durable + 1);
        let (marker, _) = store.snapshot();
        if keep_from <= marker.0 + 1 {
            return;
        }
        let index = LogIndex(keep_from - 1);
        let Some(term) = store.term(index) else { return };
        if self.conf_index_after(index) {
            return;
        }
        let conf = self.t.raw.conf_state().clone();
        tracing::debug!(index = index.0, durable, "releasing the log");
        self.release_in_flight = true;
        self.wal_send(WalJob { release: Some(MarkerJob { index, term, conf }), ..WalJob::default() });
    }

    fn wal_send(&mut self, job: WalJob) {
        // A full queue blocks this task (backpressure), not the runtime's other tasks.
        let sent = match self.t.wal_jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(std::sync::mpsc::TrySendError::Full(job)) => {
                let tx = self.t.wal_jobs.clone();
                let started = Instant::now();
                let r = tokio::task::block_in_place(move || tx.send(job).map_err(|_| ()));
                crate::note_slow("log_queue", started.elapsed(), format_args!("waiting for room in the log's queue"));
                r
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => Err(()),
        };
        if sent.is_err() {
            crate::fatal("the WAL thread stopped");
        }
    }

    fn apply_send(&mut self, job: ApplyJob) {
        let sent = match self.t.apply_jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(job)) => {
                let tx = self.t.apply_jobs.clone();
                let started = Instant::now();
                let r = tokio::task::block_in_place(move || tx.blocking_send(job)).map_err(|_| ());
                crate::note_slow("apply_queue", started.elapsed(), format_args!("waiting for room in the apply queue"));
                r
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
        };
        if sent.is_err() {
            crate::fatal("the apply worker stopped");
        }
    }

    /// Installs the snapshot Raft handed out: the apply worker swaps the
    /// state (after every entry handed to it before), and this task waits.
    fn install(&mut self, index: LogIndex, term: cairn_raft_core::Term, conf: cairn_raft_core::ConfState) -> MarkerJob {
        let Some(checkpoint) = self.t.received.take(index, term) else {
            crate::fatal(&format!(
                "Raft asked to install a snapshot at ({}, {}) that was not received",
                index.0, term.0
            ));
        };
        let delta = crate::snapshot::is_delta(&checkpoint);
        let (tx, rx) = oneshot::channel();
        self.apply_send(ApplyJob::Install { checkpoint, reply: tx });
        if tokio::task::block_in_place(|| rx.blocking_recv()).is_err() {
            crate::fatal("the apply worker stopped during an install");
        }
        self.snapshots_installed += 1;
        self.deltas_installed += u64::from(delta);
        self.t.conf_index.fetch_max(index.0, Ordering::AcqRel);
        self.membership_changed(&conf);
        MarkerJob { index, term, conf }
    }

    fn persisted(&mut self, job: WalJob) {
        let mut last = job.entries.last().map(|e| (e.index, e.term));
        if let Some(m) = job.installed {
            self.t.raw.store_mut().note_installed(m.index, m.term, m.conf);
            last = last.or(Some((m.index, m.term)));
        }
        if let Some(m) = job.release {
            self.t.raw.store_mut().note_released(m.index, m.term, m.conf);
            self.release_in_flight = false;
        }
        if let Some(hs) = job.hard_state {
            self.t.raw.store_mut().note_hard_state(hs);
        }
        self.t.raw.store_mut().note_entries(job.entries);
        if let Some((i, t)) = last {
            self.t.raw.on_persisted(i, t);
        }
        for m in job.messages {
            self.send(m);
        }
    }

    fn process_ready(&mut self) {
        for _ in 0..64 {
            let rd = self.t.raw.ready();
            if rd.is_empty() {
                break;
            }
            self.t.raw.advance(&rd);
            for m in rd.messages {
                self.send(m);
            }
            let installed = rd.snapshot.clone().map(|(index, term, conf)| self.install(index, term, conf));
            if installed.is_some()
                || !rd.entries.is_empty()
                || rd.hard_state.is_some()
                || !rd.persisted_messages.is_empty()
            {
                self.wal_send(WalJob {
                    installed,
                    release: None,
                    entries: rd.entries,
                    hard_state: rd.hard_state,
                    messages: rd.persisted_messages,
                });
            }
            if !rd.committed_entries.is_empty() {
                let changed =
                    rd.committed_entries.iter().filter(|e| e.kind == EntryKind::ConfChange).map(|e| e.index.0).max();
                let conf = changed.map(|i| {
                    self.t.conf_index.fetch_max(i, Ordering::AcqRel);
                    self.t.raw.conf_state().clone()
                });
                if let Some(conf) = &conf {
                    self.membership_changed(conf);
                }
                self.apply_send(ApplyJob::Entries { entries: rd.committed_entries, conf });
            }
            for rs in rd.read_states {
                let Some(id) = rs.context.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes) else {
                    continue;
                };
                if let Some(replies) = self.reads.remove(&id) {
                    for reply in replies {
                        let _ = reply.send(Ok(rs.index.0));
                    }
                }
            }
        }
        let term = self.t.raw.term().0;
        let leader = self.t.raw.leader();
        if term != self.last_term || leader != self.last_leader {
            let me = self.t.raw.id();
            self.t.leader_watch.send_replace((leader == Some(me), leader.map(|l| l.0)));
            if leader != self.last_leader {
                metrics::counter!("cairn_raft_leader_changes_total").increment(1);
                tracing::info!(term, leader = leader.map(|l| l.0), "leader changed");
            }
            // Reads waiting on an old term's leader will not be confirmed: fail them.
            if term != self.last_term {
                for reply in self.reads.drain().flat_map(|(_, r)| r) {
                    let _ = reply.send(Err(ErrorInfo {
                        code: ErrorCode::Unavailable,
                        message: "the term changed while the read waited".into(),
                        leader: None,
                    }));
                }
            }
            self.last_term = term;
            self.last_leader = leader;
            if leader == Some(me) {
                self.propose_limits(term);
            }
            // Only a leader sends snapshots.
            if self.t.raw.role() != Role::Leader {
                for (_, h) in self.transfers.drain() {
                    h.abort();
                }
            }
            metrics::gauge!("cairn_raft_term").set(term as f64);
        }
        metrics::gauge!("cairn_raft_commit_index").set(self.t.raw.commit_index().0 as f64);
        metrics::gauge!("cairn_raft_is_leader").set(if self.t.raw.role() == Role::Leader { 1.0 } else { 0.0 });
    }

    /// Samples the bytes the Raft task holds (on the release check's tick).
    fn report_memory(&self) {
        metrics::gauge!("cairn_raft_applying_bytes").set(self.t.raw.applying_bytes() as f64);
        metrics::gauge!("cairn_raft_uncommitted_bytes").set(self.t.raw.uncommitted_bytes() as f64);
        metrics::gauge!("cairn_raft_entry_cache_bytes").set(self.t.raw.store().cached_bytes() as f64);
    }
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(Result::ok).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}
