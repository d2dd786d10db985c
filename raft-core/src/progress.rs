//! What a leader knows of each follower's log.

use crate::types::LogIndex;

/// How the leader sends to a follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// Where the logs match is unknown: one append at a time, each answered
    /// before the next.
    Probe,
    /// The logs match up to `matched`: appends are sent ahead, up to the
    /// in-flight bound.
    Replicate,
    /// The follower needs entries the leader released: a snapshot at this
    /// index is being sent; nothing else is until `report_snapshot`.
    Snapshot(LogIndex),
}

/// A follower as the leader sees it.
#[derive(Clone, Debug)]
pub struct Progress {
    /// Highest index known to match the leader's log.
    pub matched: LogIndex,
    /// Next index to send.
    pub next: LogIndex,
    /// How to send.
    pub state: ProgressState,
    /// Probe: an append is out, waiting for its answer.
    pub(crate) probe_sent: bool,
    /// Replicate: (last index, bytes) of the appends sent and not yet acknowledged.
    pub(crate) inflight: std::collections::VecDeque<(LogIndex, u64)>,
    /// Heard from since the last check-quorum.
    pub(crate) recent_active: bool,
    /// Leader ticks with appends in flight and no progress: appends (or their
    /// answers) may be lost.
    pub(crate) stalled_ticks: u32,
}

impl Progress {
    pub(crate) fn new(next: LogIndex) -> Self {
        Progress {
            matched: LogIndex(0),
            next,
            state: ProgressState::Probe,
            probe_sent: false,
            inflight: Default::default(),
            recent_active: true,
            stalled_ticks: 0,
        }
    }

    pub(crate) fn become_probe(&mut self) {
        self.state = ProgressState::Probe;
        self.probe_sent = false;
        self.inflight.clear();
        self.next = self.next.max(self.matched.next());
    }

    pub(crate) fn become_replicate(&mut self) {
        self.state = ProgressState::Replicate;
        self.inflight.clear();
        self.next = self.matched.next();
    }

    /// The follower accepted up to `index`. Returns whether it moved forward.
    pub(crate) fn on_success(&mut self, index: LogIndex) -> bool {
        self.probe_sent = false;
        while self.inflight.front().is_some_and(|e| e.0 <= index) {
            self.inflight.pop_front();
        }
        if index > self.matched {
            self.matched = index;
            self.next = self.next.max(index.next());
            self.stalled_ticks = 0;
            return true;
        }
        false
    }

    /// A leader tick. Appends in flight with no progress for `limit` ticks
    /// were probably lost: send again from `matched` (probe).
    pub(crate) fn tick(&mut self, limit: u32) {
        // A probe (or its answer) may be lost: probe again every heartbeat.
        if self.state == ProgressState::Probe {
            self.probe_sent = false;
        }
        if self.state == ProgressState::Replicate && !self.inflight.is_empty() {
            self.stalled_ticks += 1;
            if self.stalled_ticks >= limit {
                self.stalled_ticks = 0;
                self.next = self.matched.next();
                self.become_probe();
            }
        } else {
            self.stalled_ticks = 0;
        }
    }

    /// The follower rejected `rejected` (a prev index) with `hint`. A stale or
    /// reordered rejection is ignored; `next` never goes below `matched + 1`.
    /// Returns whether the rejection was taken.
    pub(crate) fn on_reject(&mut self, rejected: LogIndex, hint: LogIndex) -> bool {
        // While a snapshot is on its way, refusals of heartbeats say nothing new:
        // only `report_snapshot` ends that state (else every heartbeat would
        // restart the transfer).
        if rejected <= self.matched || matches!(self.state, ProgressState::Snapshot(_)) {
            return false;
        }
        if self.state == ProgressState::Probe && rejected != self.next.prev() {
            return false;
        }
        self.next = rejected.min(hint.next()).max(self.matched.next());
        self.become_probe();
        true
    }

    /// Appends in flight (replicate state).
    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    /// Bytes of entries in flight.
    pub fn inflight_bytes(&self) -> u64 {
        self.inflight.iter().map(|e| e.1).sum()
    }

    pub(crate) fn become_snapshot(&mut self, index: LogIndex) {
        self.state = ProgressState::Snapshot(index);
        self.inflight.clear();
        self.probe_sent = false;
    }

    pub(crate) fn can_send(&self, inflight_max: usize, inflight_bytes_max: u64) -> bool {
        match self.state {
            ProgressState::Snapshot(_) => false,
            ProgressState::Probe => !self.probe_sent,
            ProgressState::Replicate => {
                self.inflight.len() < inflight_max && self.inflight_bytes() < inflight_bytes_max
            }
        }
    }
}
