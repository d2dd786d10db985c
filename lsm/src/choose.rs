//! The compaction *choice*: a pure function of the version's shape. The
//! executor (`compaction.rs`) does the I/O.

use std::collections::HashSet;

use bytes::Bytes;

use crate::types::{Seqno, TableId};

/// What the chooser knows of one table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSummary {
    /// The table.
    pub id: TableId,
    /// Smallest user key covered.
    pub smallest: Bytes,
    /// Largest user key covered (inclusive).
    pub largest: Bytes,
    /// File size.
    pub bytes: u64,
    /// Highest sequence number it holds.
    pub seq_max: Seqno,
}

impl TableSummary {
    fn overlaps(&self, lo: &[u8], hi: &[u8]) -> bool {
        self.smallest.as_ref() <= hi && lo <= self.largest.as_ref()
    }
}

/// The limits the chooser reads.
#[derive(Clone, Debug)]
pub struct ChooseConfig {
    /// L0 tables that trigger an L0 compaction.
    pub l0_trigger: usize,
    /// Target bytes of each level (index 0 unused).
    pub level_targets: Vec<u64>,
    /// Which table of a deeper level goes first.
    pub priority: CompactionPriority,
}

/// Which table of a level (below L0) a compaction takes first, among those
/// whose overlapping tables below are not being compacted (RocksDB's
/// `compaction_pri`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CompactionPriority {
    /// The table whose overlapping bytes in the next level, over its own
    /// bytes, are the fewest: the compaction that rewrites the least below
    /// for each byte it moves down (RocksDB's `kMinOverlappingRatio`, its
    /// default). Ties go to the oldest data. The default.
    #[default]
    MinOverlappingRatio,
    /// The table with the oldest data (smallest `seq_max`; RocksDB's
    /// `kOldestLargestSeqFirst`).
    OldestData,
}

/// A compaction to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The level the inputs come from.
    pub level: usize,
    /// Tables of `level`.
    pub upper: Vec<TableId>,
    /// Overlapping tables of `level + 1`.
    pub lower: Vec<TableId>,
    /// `level + 1`.
    pub output_level: usize,
    /// The one upper table can move down without a rewrite.
    pub trivial_move: bool,
    /// No deeper level holds keys in the inputs' range, so tombstones that
    /// no read view needs may be dropped.
    pub bottommost: bool,
    /// The score that chose it (≥ 1 for an automatic choice).
    pub score_percent: u64,
}

fn key_range<'a>(ts: impl Iterator<Item = &'a TableSummary>) -> Option<(Bytes, Bytes)> {
    let mut r: Option<(Bytes, Bytes)> = None;
    for t in ts {
        r = Some(match r {
            None => (t.smallest.clone(), t.largest.clone()),
            Some((lo, hi)) => (lo.min(t.smallest.clone()), hi.max(t.largest.clone())),
        });
    }
    r
}

/// Bytes by which each level exceeds its target, summed (an estimate of the
/// compaction work pending, for write backpressure). L0 counts in full once it
/// reaches its trigger.
pub fn pending_bytes(levels: &[Vec<TableSummary>], cfg: &ChooseConfig) -> u64 {
    let mut total = 0u64;
    for (l, ts) in levels.iter().enumerate() {
        let bytes: u64 = ts.iter().map(|t| t.bytes).sum();
        if l == 0 {
            if ts.len() >= cfg.l0_trigger {
                total += bytes;
            }
        } else if l + 1 < levels.len() {
            total += bytes.saturating_sub(cfg.level_targets.get(l).copied().unwrap_or(u64::MAX));
        }
    }
    total
}

/// Builds the choice for moving `upper` (tables of `level`) down one level.
/// `None` if a table involved is being compacted.
pub fn expand(
    levels: &[Vec<TableSummary>],
    level: usize,
    upper: Vec<TableId>,
    compacting: &HashSet<TableId>,
    score_percent: u64,
) -> Option<Choice> {
    let output_level = level + 1;
    if output_level >= levels.len() || upper.is_empty() || upper.iter().any(|id| compacting.contains(id)) {
        return None;
    }
    let ups: Vec<&TableSummary> = levels[level].iter().filter(|t| upper.contains(&t.id)).collect();
    let (lo, hi) = key_range(ups.iter().copied())?;
    let lower: Vec<TableId> = levels[output_level].iter().filter(|t| t.overlaps(&lo, &hi)).map(|t| t.id).collect();
    if lower.iter().any(|id| compacting.contains(id)) {
        return None;
    }
    // The output covers the union of both inputs' ranges.
    let all = ups.iter().copied().chain(levels[output_level].iter().filter(|t| lower.contains(&t.id)));
    let (lo, hi) = key_range(all)?;
    let bottommost = levels[output_level + 1..].iter().all(|ts| ts.iter().all(|t| !t.overlaps(&lo, &hi)));
    let trivial_move = upper.len() == 1 && lower.is_empty();
    Some(Choice { level, upper, lower, output_level, trivial_move, bottommost, score_percent })
}

/// Bytes of the tables of `below` (a level below L0: sorted by key, not
/// overlapping) that overlap `t`, per 1,024 bytes of `t`.
fn overlap_ratio(t: &TableSummary, below: &[TableSummary]) -> u128 {
    let first = below.partition_point(|b| b.largest < t.smallest);
    let overlapping: u64 =
        below[first..].iter().take_while(|b| b.overlaps(&t.smallest, &t.largest)).map(|b| b.bytes).sum();
    u128::from(overlapping) * 1024 / u128::from(t.bytes.max(1))
}

/// Chooses the most urgent compaction, or `None` when every level is within
/// its limits. Pure: depends only on its arguments.
///
/// - L0's score is its table count over the trigger; a deeper level's is its
///   bytes over its target; the last level never compacts.
/// - From L0 every table is taken (they may overlap each other).
/// - From a deeper level, one table whose overlapping tables below are not
///   being compacted, in the order `cfg.priority` sets.
pub fn choose(levels: &[Vec<TableSummary>], compacting: &HashSet<TableId>, cfg: &ChooseConfig) -> Option<Choice> {
    let mut scored: Vec<(u64, usize)> = Vec::new();
    for (l, ts) in levels.iter().enumerate().take(levels.len().saturating_sub(1)) {
        let score = if l == 0 {
            (ts.len() as u64 * 100) / cfg.l0_trigger.max(1) as u64
        } else {
            let bytes: u64 = ts.iter().filter(|t| !compacting.contains(&t.id)).map(|t| t.bytes).sum();
            let target = cfg.level_targets.get(l).copied().unwrap_or(u64::MAX).max(1);
            (u128::from(bytes) * 100 / u128::from(target)) as u64
        };
        if score >= 100 {
            scored.push((score, l));
        }
    }
    scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (score, l) in scored {
        if l == 0 {
            let upper: Vec<TableId> = levels[0].iter().map(|t| t.id).collect();
            if let Some(c) = expand(levels, 0, upper, compacting, score) {
                return Some(c);
            }
            continue;
        }
        let mut candidates: Vec<&TableSummary> = levels[l].iter().filter(|t| !compacting.contains(&t.id)).collect();
        match cfg.priority {
            CompactionPriority::OldestData => candidates.sort_by_key(|t| (t.seq_max, t.id)),
            CompactionPriority::MinOverlappingRatio => {
                let below = &levels[l + 1];
                candidates.sort_by_cached_key(|t| (overlap_ratio(t, below), t.seq_max, t.id));
            }
        }
        for t in candidates {
            if let Some(c) = expand(levels, l, vec![t.id], compacting, score) {
                return Some(c);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: u64, lo: &str, hi: &str, bytes: u64, seq: u64) -> TableSummary {
        TableSummary {
            id,
            smallest: Bytes::copy_from_slice(lo.as_bytes()),
            largest: Bytes::copy_from_slice(hi.as_bytes()),
            bytes,
            seq_max: seq,
        }
    }

    fn cfg() -> ChooseConfig {
        ChooseConfig {
            l0_trigger: 4,
            level_targets: vec![0, 100, 1000, 10_000],
            priority: CompactionPriority::default(),
        }
    }

    #[test]
    fn the_table_with_the_least_overlap_below_goes_first() {
        // L1 over its target of 100. Table 10 (the oldest data) sits over
        // 500 bytes of L2, table 11 over 40, table 12 over 40 as well but is
        // twice 11's size, so its ratio is half of 11's.
        let l1 = vec![t(10, "a", "c", 100, 5), t(11, "d", "f", 100, 9), t(12, "g", "i", 200, 7)];
        let l2 = vec![
            t(20, "a", "b", 250, 1),
            t(21, "b", "c", 250, 1),
            t(22, "d", "e", 40, 1),
            t(23, "g", "h", 40, 1),
            t(24, "x", "z", 999, 1),
        ];
        let levels = vec![vec![], l1, l2, vec![]];
        let c = choose(&levels, &HashSet::new(), &cfg()).expect("L1 is over its target");
        assert_eq!((c.upper.clone(), c.lower.clone()), (vec![12], vec![23]), "40 / 200 is the least");
        // Busy below 12: the next least, 11, goes.
        let busy: HashSet<TableId> = [23].into_iter().collect();
        let c = choose(&levels, &busy, &cfg()).expect("another table");
        assert_eq!((c.upper.clone(), c.lower.clone()), (vec![11], vec![22]));
        // Oldest data first takes 10, whatever lies below it.
        let oldest = ChooseConfig { priority: CompactionPriority::OldestData, ..cfg() };
        let c = choose(&levels, &HashSet::new(), &oldest).expect("L1 is over its target");
        assert_eq!((c.upper.clone(), c.lower.clone()), (vec![10], vec![20, 21]));
        // Equal ratios: the oldest data goes first.
        let l1 = vec![t(10, "a", "c", 100, 5), t(11, "d", "f", 100, 3)];
        let l2 = vec![t(20, "a", "b", 50, 1), t(21, "d", "e", 50, 1)];
        let c = choose(&[vec![], l1, l2, vec![]], &HashSet::new(), &cfg()).expect("over");
        assert_eq!(c.upper, vec![11]);
    }

    #[test]
    fn nothing_to_do_below_the_limits() {
        let levels = vec![vec![t(1, "a", "b", 10, 5)], vec![t(2, "a", "z", 50, 1)], vec![], vec![]];
        assert_eq!(choose(&levels, &HashSet::new(), &cfg()), None);
    }

    #[test]
    fn l0_takes_every_table_and_the_overlapping_l1_tables() {
        let l0 = (1..=4).map(|i| t(i, "c", "f", 10, 100 - i)).collect();
        let l1 = vec![t(10, "a", "b", 10, 1), t(11, "d", "e", 10, 1), t(12, "g", "h", 10, 1)];
        let levels = vec![l0, l1, vec![t(20, "a", "z", 10, 0)], vec![]];
        let c = choose(&levels, &HashSet::new(), &cfg()).expect("a choice");
        assert_eq!((c.level, c.output_level), (0, 1));
        assert_eq!(c.upper, vec![1, 2, 3, 4]);
        assert_eq!(c.lower, vec![11]);
        assert!(!c.trivial_move);
        assert!(!c.bottommost, "L2 holds keys in the range");
    }

    #[test]
    fn the_most_urgent_level_wins_and_busy_tables_are_skipped() {
        let l1 = vec![t(10, "a", "c", 150, 7), t(11, "d", "f", 150, 3)];
        let l2 = vec![t(20, "d", "e", 10, 1)];
        let levels = vec![vec![t(1, "x", "y", 1, 9)], l1, l2, vec![]];
        let oldest = ChooseConfig { priority: CompactionPriority::OldestData, ..cfg() };
        let c = choose(&levels, &HashSet::new(), &oldest).expect("L1 is over its target");
        assert_eq!((c.level, c.upper.clone(), c.lower.clone()), (1, vec![11], vec![20]), "oldest data first");
        assert!(c.bottommost);
        // Table 20 busy: 11 cannot go; 10 moves down trivially.
        let busy: HashSet<TableId> = [20].into_iter().collect();
        let c = choose(&levels, &busy, &oldest).expect("another table");
        assert_eq!(c.upper, vec![10]);
        assert!(c.trivial_move);
    }

    #[test]
    fn the_last_level_never_compacts() {
        let levels = vec![vec![], vec![], vec![], vec![t(1, "a", "z", 1 << 40, 1)]];
        assert_eq!(choose(&levels, &HashSet::new(), &cfg()), None);
    }

    #[test]
    fn pending_bytes_counts_the_excess() {
        let levels = vec![vec![], vec![t(1, "a", "b", 150, 1)], vec![t(2, "a", "b", 900, 1)], vec![]];
        assert_eq!(pending_bytes(&levels, &cfg()), 50);
    }
}
