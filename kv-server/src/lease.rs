//! Leases: the leader's clock for them. A lease is granted and revoked by
//! replicated entries (the state holds each lease and the keys attached to
//! it, see [`crate::state`]); when it *expires* is decided by the leader
//! alone, which then proposes its revocation, so every replica deletes its
//! keys at the same revision.
//!
//! Keep-alives reach only the leader and are not replicated: a node that
//! takes office does not know when each lease was last kept alive, so it
//! gives every lease its whole TTL again plus an election timeout (as etcd
//! does). A leader change therefore never expires a lease that was being
//! kept alive; it can only extend one that was not.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_kv_client::protocol::{ErrorCode, ErrorInfo};
use tokio::sync::{mpsc, oneshot, watch};

use crate::node::NodeRequest;
use crate::state::{Command, CommandOp};

/// What the apply worker tells the lessor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEvent {
    /// A lease was granted (applied).
    Granted {
        /// Its id.
        id: u64,
        /// Its time to live, ms.
        ttl_ms: u64,
    },
    /// A lease was revoked (applied): its keys are gone.
    Revoked {
        /// Its id.
        id: u64,
    },
}

/// What a client asks the lessor.
#[derive(Debug)]
pub enum LessorRequest {
    /// Restart the lease's clock; the answer is its TTL.
    KeepAlive {
        /// The lease.
        id: u64,
        /// Its TTL in ms, or why not.
        reply: oneshot::Sender<Result<u64, ErrorInfo>>,
    },
    /// How long the lease has left, as this leader sees it.
    Remaining {
        /// The lease.
        id: u64,
        /// Ms left (`None`: the lessor does not know the lease yet);
        /// `NotLeader` on a node that does not lead (only the leader knows).
        reply: oneshot::Sender<Result<Option<u64>, ErrorInfo>>,
    },
}

/// The bounds and clocks of the lessor.
#[derive(Debug, Clone, Copy)]
pub struct LessorConfig {
    /// How often deadlines are checked.
    pub check_every: Duration,
    /// Added to every lease's TTL when this node takes office.
    pub election_timeout: Duration,
    /// A revocation proposed and not applied after this long is proposed again.
    pub revoke_retry: Duration,
    /// Test switch: on taking office keep the deadlines seen as a follower
    /// (breaks the lease rule: kept-alive leases expire at a leader change).
    pub no_grace_for_tests: bool,

    /// Revocations in flight at once.
    pub revokes_in_flight_max: usize,
    /// Revisions of history kept: while leading, every 10 s the lessor
    /// proposes the compaction of what lies beyond.
    pub history_revisions_max: u64,
    /// Age of history kept (zero: no bound by age).
    pub history_retention: Duration,
}

/// A `NotLeader` refusal naming the leader this node knows (its address is
/// filled in by the server).
fn not_leader(leader: Option<u64>, message: &str) -> ErrorInfo {
    ErrorInfo {
        code: ErrorCode::NotLeader,
        message: message.into(),
        leader: leader.filter(|l| *l != 0).map(|l| (l, String::new())),
    }
}

/// Samples of (time, revision) kept for compaction by age, at most.
const REVISION_SAMPLES_MAX: usize = 256;

/// How often the history's bounds are checked: every 10 s, or four times per
/// retention period when that is shorter (at least every 100 ms).
fn compaction_period(retention: Duration) -> Duration {
    let ten = Duration::from_secs(10);
    if retention.is_zero() { ten } else { (retention / 4).clamp(Duration::from_millis(100), ten) }
}

/// The revisions a leader saw as time passed, oldest first: the history
/// older than the retention ends at the newest sample at least that old.
#[derive(Debug, Default)]
struct RevisionSamples {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl RevisionSamples {
    /// Records `revision` at `now` (at most one sample per `retention /
    /// REVISION_SAMPLES_MAX`, so the samples are bounded); returns the
    /// revision the state had `retention` ago, when a sample is that old.
    fn observe(&mut self, now: Instant, revision: u64, retention: Duration) -> Option<u64> {
        let spacing = retention / REVISION_SAMPLES_MAX as u32;
        if self.samples.back().is_none_or(|(t, _)| now.duration_since(*t) >= spacing) {
            self.samples.push_back((now, revision));
        }
        let cutoff = now.checked_sub(retention)?;
        let mut old = None;
        // Drop every sample older than the newest one past the cutoff.
        while let Some(&(t, r)) = self.samples.front() {
            if t > cutoff {
                break;
            }
            old = Some(r);
            self.samples.pop_front();
        }
        if let Some(r) = old {
            // Keep it: it still marks the cutoff until a newer one passes it.
            self.samples.push_front((cutoff, r));
        }
        while self.samples.len() > REVISION_SAMPLES_MAX {
            self.samples.pop_front();
        }
        old
    }

    fn clear(&mut self) {
        self.samples.clear();
    }
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    revoking_since: Option<Instant>,
}

/// The lessor task: owns the deadlines while this node leads.
pub struct Lessor {
    cfg: LessorConfig,
    /// Whether this node leads now, and the leader it knows.
    leader: watch::Receiver<(bool, Option<u64>)>,
    events: mpsc::Receiver<LeaseEvent>,
    requests: mpsc::Receiver<LessorRequest>,
    node: mpsc::Sender<NodeRequest>,
    db: Arc<crate::snapshot::SharedDb>,
    leases: HashMap<u64, Lease>,
    leading: bool,
    samples: RevisionSamples,
}

impl std::fmt::Debug for Lessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lessor").field("leases", &self.leases.len()).field("leading", &self.leading).finish()
    }
}

impl Lessor {
    /// A lessor over the live state `db`, proposing through `node`.
    pub fn new(
        cfg: LessorConfig,
        leader: watch::Receiver<(bool, Option<u64>)>,
        events: mpsc::Receiver<LeaseEvent>,
        requests: mpsc::Receiver<LessorRequest>,
        node: mpsc::Sender<NodeRequest>,
        db: Arc<crate::snapshot::SharedDb>,
    ) -> Lessor {
        Lessor {
            cfg,
            leader,
            events,
            requests,
            node,
            db,
            leases: HashMap::new(),
            leading: false,
            samples: RevisionSamples::default(),
        }
    }

    /// Runs until the node stops.
    pub async fn run(mut self) {
        let mut check = tokio::time::interval(self.cfg.check_every);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut compaction = tokio::time::interval(compaction_period(self.cfg.history_retention));
        compaction.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = check.tick() => self.expire().await,
                _ = compaction.tick() => self.maybe_compact(Instant::now()),
                changed = self.leader.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let (leading, _) = *self.leader.borrow_and_update();
                    if leading && !self.leading {
                        self.take_office();
                    }
                    self.leading = leading;
                }
                e = self.events.recv() => match e {
                    Some(LeaseEvent::Granted { id, ttl_ms }) => {
                        let ttl = Duration::from_millis(ttl_ms);
                        self.leases.insert(id, Lease { ttl, deadline: Instant::now() + ttl, revoking_since: None });
                    }
                    Some(LeaseEvent::Revoked { id }) => {
                        self.leases.remove(&id);
                    }
                    None => return,
                },
                r = self.requests.recv() => match r {
                    Some(r) => self.answer(r),
                    None => return,
                },
            }
        }
    }

    /// Every lease in the state gets its whole TTL plus an election timeout.
    fn take_office(&mut self) {
        let now = Instant::now();
        if self.cfg.no_grace_for_tests {
            tracing::warn!("test switch: the follower's lease deadlines are kept");
            return;
        }

        match crate::state::load_leases(&self.db.get()) {
            Ok(all) => {
                self.leases = all
                    .into_iter()
                    .map(|(id, ttl_ms, _)| {
                        let ttl = Duration::from_millis(ttl_ms);
                        (id, Lease { ttl, deadline: now + ttl + self.cfg.election_timeout, revoking_since: None })
                    })
                    .collect();
                tracing::info!(leases = self.leases.len(), "leading: every lease's clock restarted");
            }
            Err(e) => crate::fatal(&format!("reading the leases from the state: {e}")),
        }
    }

    fn answer(&mut self, r: LessorRequest) {
        let (leading, leader) = *self.leader.borrow();
        match r {
            LessorRequest::KeepAlive { id, reply } => {
                let answer = if !leading {
                    Err(not_leader(leader, "keep-alives go to the leader"))
                } else {
                    match self.leases.get_mut(&id) {
                        Some(l) if l.revoking_since.is_none() => {
                            l.deadline = Instant::now() + l.ttl;
                            Ok(l.ttl.as_millis() as u64)
                        }
                        _ => Err(ErrorInfo {
                            code: ErrorCode::LeaseNotFound,
                            message: format!("lease {id} is unknown, expired or revoked"),
                            leader: None,
                        }),
                    }
                };
                let _ = reply.send(answer);
            }
            LessorRequest::Remaining { id, reply } => {
                let answer = if leading {
                    Ok(self
                        .leases
                        .get(&id)
                        .map(|l| l.deadline.saturating_duration_since(Instant::now()).as_millis() as u64))
                } else {
                    Err(not_leader(leader, "a lease's time left is known to the leader"))
                };
                let _ = reply.send(answer);
            }
        }
    }

    /// Proposes a compaction of the history beyond `history_revisions_max`
    /// revisions or older than `history_retention` (while leading).
    fn maybe_compact(&mut self, now: Instant) {
        if !self.leading {
            self.samples.clear();
            return;
        }
        let db = self.db.get();
        let (Ok(revision), Ok(compacted)) = (crate::state::load_revision(&db), crate::state::load_compacted(&db))
        else {
            return;
        };
        let keep = self.cfg.history_revisions_max.max(1);
        let mut below = revision.saturating_sub(keep);
        if !self.cfg.history_retention.is_zero()
            && let Some(then) = self.samples.observe(now, revision, self.cfg.history_retention)
        {
            // Keep every change after the state as it was `retention` ago.
            below = below.max((then + 1).min(revision));
        }
        if below <= compacted {
            return;
        }
        if self.propose(CommandOp::Compact { revision: below }) {
            tracing::info!(below, "compacting the history");
        }
    }

    /// Proposes `op` without waiting for it; false when the node's queue is full.
    fn propose(&self, op: CommandOp) -> bool {
        let Ok(data) = (Command { time_ms: crate::server::now_ms(), op }).encode() else { return false };
        let (reply, _answer) = oneshot::channel();
        self.node.try_send(NodeRequest::Propose { data, reply }).is_ok()
    }

    /// Proposes the revocation of every lease past its deadline (while leading).
    async fn expire(&mut self) {
        if !self.leading {
            return;
        }
        let now = Instant::now();
        let in_flight =
            self.leases.values().filter(|l| l.revoking_since.is_some_and(|s| now - s < self.cfg.revoke_retry)).count();
        let mut room = self.cfg.revokes_in_flight_max.saturating_sub(in_flight);
        let due: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now && l.revoking_since.is_none_or(|s| now - s >= self.cfg.revoke_retry))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if room == 0 {
                break;
            }
            room -= 1;
            if let Some(l) = self.leases.get_mut(&id) {
                l.revoking_since = Some(now);
            }
            tracing::info!(lease = id, "lease expired: revoking it");
            metrics::counter!("cairn_lease_expired_total").increment(1);
            if !self.propose(CommandOp::LeaseRevoke { id }) {
                // A full queue: proposed again at a later check.
                if let Some(l) = self.leases.get_mut(&id) {
                    l.revoking_since = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_samples_name_the_revision_of_retention_ago() {
        let retention = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut s = RevisionSamples::default();
        // Revision 10 * i at second i.
        let mut last = None;
        for i in 0..=300u64 {
            let got = s.observe(t0 + Duration::from_secs(i), 10 * i, retention);
            if i < 60 {
                assert_eq!(got, None, "nothing is {retention:?} old at second {i}");
            } else {
                // Samples are a second apart here, so the answer is exact
                // to the spacing (60 s / 256 < 1 s).
                assert_eq!(got, Some(10 * (i - 60)), "at second {i}");
            }
            last = got.or(last);
            assert!(s.samples.len() <= REVISION_SAMPLES_MAX);
        }
        assert_eq!(last, Some(2400));
        // Sampled often, the samples stay bounded.
        let mut s = RevisionSamples::default();
        for i in 0..100_000u64 {
            s.observe(t0 + Duration::from_millis(i), i, retention);
            assert!(s.samples.len() <= REVISION_SAMPLES_MAX + 1);
        }
        assert_eq!(compaction_period(Duration::ZERO), Duration::from_secs(10));
        assert_eq!(compaction_period(Duration::from_secs(2)), Duration::from_millis(500));
        assert_eq!(compaction_period(Duration::from_millis(10)), Duration::from_millis(100));
    }
}
