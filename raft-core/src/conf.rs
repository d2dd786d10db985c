//! Cluster membership: voters, learners, and joint consensus.

use std::collections::{BTreeMap, BTreeSet};

use rkyv::{Archive, Deserialize, Serialize};

use crate::types::{LogIndex, NodeId};

/// Who votes and who only listens.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct ConfState {
    /// Voters (the incoming configuration while joint).
    pub voters: BTreeSet<NodeId>,
    /// The outgoing voters while in joint consensus; empty otherwise.
    pub voters_outgoing: BTreeSet<NodeId>,
    /// Receive the log, never vote or count.
    pub learners: BTreeSet<NodeId>,
    /// Leave joint consensus automatically once the joint entry is applied.
    pub auto_leave: bool,
}

/// One membership change.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ConfChangeItem {
    /// Add a voter (or promote a learner).
    AddVoter(NodeId),
    /// Add a learner (or demote a voter).
    AddLearner(NodeId),
    /// Remove a node.
    Remove(NodeId),
}

/// A membership change, carried by a `ConfChange` entry. Changes to voters go
/// through joint consensus; an empty change leaves joint consensus.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct ConfChange {
    /// The changes (empty: leave joint consensus).
    pub changes: Vec<ConfChangeItem>,
    /// Leave joint consensus automatically (otherwise the caller proposes an
    /// empty change to leave).
    pub auto_leave: bool,
}

impl ConfChange {
    /// The entry bytes.
    pub fn encode(&self) -> Vec<u8> {
        rkyv::to_bytes::<rkyv::rancor::Error>(self).map(|b| b.to_vec()).unwrap_or_default()
    }

    /// Decodes entry bytes (validated).
    pub fn decode(data: &[u8]) -> Option<ConfChange> {
        let mut aligned = rkyv::util::AlignedVec::<16>::new();
        aligned.extend_from_slice(data);
        rkyv::from_bytes::<ConfChange, rkyv::rancor::Error>(&aligned).ok()
    }
}

/// Whether a majority of `set` satisfies `yes`.
fn majority(set: &BTreeSet<NodeId>, yes: impl Fn(NodeId) -> bool) -> bool {
    set.is_empty() || set.iter().filter(|id| yes(**id)).count() > set.len() / 2
}

/// The highest index a majority of `set` has reached.
fn quorum_index(set: &BTreeSet<NodeId>, matched: &BTreeMap<NodeId, LogIndex>) -> LogIndex {
    if set.is_empty() {
        return LogIndex(u64::MAX);
    }
    let mut v: Vec<LogIndex> = set.iter().map(|id| matched.get(id).copied().unwrap_or_default()).collect();
    v.sort_unstable_by(|a, b| b.cmp(a));
    v[set.len() / 2]
}

impl ConfState {
    /// A configuration of these voters.
    pub fn with_voters(voters: impl IntoIterator<Item = NodeId>) -> Self {
        ConfState { voters: voters.into_iter().collect(), ..Self::default() }
    }

    /// Whether in joint consensus.
    pub fn is_joint(&self) -> bool {
        !self.voters_outgoing.is_empty()
    }

    /// Whether `id` votes (in either configuration).
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.voters_outgoing.contains(&id)
    }

    /// Every member: voters of both configurations and learners.
    pub fn members(&self) -> BTreeSet<NodeId> {
        self.voters.iter().chain(&self.voters_outgoing).chain(&self.learners).copied().collect()
    }

    /// Whether the nodes for which `yes` holds form a quorum (of both
    /// configurations while joint).
    pub fn quorum(&self, yes: impl Fn(NodeId) -> bool + Copy) -> bool {
        majority(&self.voters, yes) && majority(&self.voters_outgoing, yes)
    }

    /// Whether the nodes for which `no` holds make a quorum impossible.
    pub fn quorum_lost(&self, no: impl Fn(NodeId) -> bool + Copy) -> bool {
        !self.quorum(|id| !no(id))
    }

    /// The highest index committed by these matched indexes.
    pub fn committed(&self, matched: &BTreeMap<NodeId, LogIndex>) -> LogIndex {
        quorum_index(&self.voters, matched).min(quorum_index(&self.voters_outgoing, matched))
    }

    /// The configuration after `cc`, or why it cannot be applied.
    pub fn apply(&self, cc: &ConfChange) -> Result<ConfState, &'static str> {
        let mut next = self.clone();
        if cc.changes.is_empty() {
            if !self.is_joint() {
                return Err("not in joint consensus: nothing to leave");
            }
            next.voters_outgoing.clear();
            next.auto_leave = false;
            return Ok(next);
        }
        let voters_change = cc.changes.iter().any(|c| match c {
            ConfChangeItem::AddVoter(id) => !self.voters.contains(id),
            ConfChangeItem::AddLearner(id) | ConfChangeItem::Remove(id) => self.voters.contains(id),
        });
        if voters_change {
            if self.is_joint() {
                return Err("already in joint consensus: leave it first");
            }
            next.voters_outgoing = self.voters.clone();
            next.auto_leave = cc.auto_leave;
        }
        for c in &cc.changes {
            match *c {
                ConfChangeItem::AddVoter(id) => {
                    next.learners.remove(&id);
                    next.voters.insert(id);
                }
                ConfChangeItem::AddLearner(id) => {
                    next.voters.remove(&id);
                    next.learners.insert(id);
                }
                ConfChangeItem::Remove(id) => {
                    next.voters.remove(&id);
                    next.learners.remove(&id);
                }
            }
        }
        if next.voters.is_empty() {
            return Err("a configuration needs at least one voter");
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u64]) -> BTreeSet<NodeId> {
        v.iter().map(|i| NodeId(*i)).collect()
    }

    #[test]
    fn joint_quorum_needs_both_majorities() {
        let c = ConfState { voters: ids(&[1, 2, 3]), voters_outgoing: ids(&[3, 4, 5]), ..Default::default() };
        assert!(!c.quorum(|id| [1, 2].contains(&id.0)));
        assert!(c.quorum(|id| [1, 2, 4, 5].contains(&id.0)));
        assert!(c.quorum(|id| [2, 3, 4].contains(&id.0)));
        let matched: BTreeMap<NodeId, LogIndex> =
            [(1, 9), (2, 8), (3, 7), (4, 3), (5, 2)].map(|(i, m)| (NodeId(i), LogIndex(m))).into();
        // Incoming {1,2,3} commits 8; outgoing {3,4,5} only 3.
        assert_eq!(c.committed(&matched), LogIndex(3));
    }

    #[test]
    fn changes_to_voters_go_through_joint_consensus() {
        let c = ConfState::with_voters(ids(&[1, 2, 3]));
        let add4 = ConfChange { changes: vec![ConfChangeItem::AddVoter(NodeId(4))], auto_leave: true };
        let j = c.apply(&add4).expect("enter joint");
        assert!(j.is_joint() && j.voters == ids(&[1, 2, 3, 4]) && j.voters_outgoing == ids(&[1, 2, 3]));
        assert!(
            j.apply(&add4).is_err()
                || j.apply(&ConfChange { changes: vec![ConfChangeItem::Remove(NodeId(1))], auto_leave: true }).is_err()
        );
        let left = j.apply(&ConfChange::default()).expect("leave");
        assert!(!left.is_joint() && left.voters == ids(&[1, 2, 3, 4]));
        // Learners change without joint consensus.
        let l = left
            .apply(&ConfChange { changes: vec![ConfChangeItem::AddLearner(NodeId(5))], auto_leave: false })
            .expect("learner");
        assert!(!l.is_joint() && l.learners == ids(&[5]));
        assert_eq!(ConfChange::decode(&add4.encode()), Some(add4));
    }
}
