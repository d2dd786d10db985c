//! Crash points for the fault tests, inert unless named in
//! `CAIRN_TEST_FAILPOINT` (never configuration).
//!
//! `CAIRN_TEST_FAILPOINT=name[:n][,name[:n]...]` arms each named point to
//! stop the process abruptly (exit code [`CRASH_EXIT_CODE`], no flush, no
//! clean-up, as a kill would) the n-th time it is reached (default: the
//! first). The points:
//!
//! | name | where |
//! |---|---|
//! | `flush-table-written` | an LSM flush wrote its table, not yet synced |
//! | `flush-table-synced` | an LSM flush synced its table, its manifest edit not yet written |
//! | `flush-installed` | an LSM flush's manifest edit is durable |
//! | `checkpoint-linked` | a checkpoint linked its tables, no manifest yet |
//! | `checkpoint-done` | a checkpoint is complete |
//! | `install-linked` | an install placed the received files in a new state directory, not published |
//! | `install-published` | an install published the new state, before the log's snapshot marker |
//! | `wal-write-error` | not a crash: the n-th WAL group write fails as an fdatasync error would (exit 70) |

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The exit code of a crash at a failpoint.
pub const CRASH_EXIT_CODE: i32 = 134;

/// The armed points: how many more hits before each fires.
#[derive(Debug, Default)]
pub struct Failpoints {
    armed: HashMap<String, AtomicU64>,
}

impl Failpoints {
    /// Parses `name[:n],...`.
    pub fn parse(spec: &str) -> Result<Failpoints, String> {
        let mut armed = HashMap::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, n) = match part.split_once(':') {
                Some((name, n)) => (name, n.parse::<u64>().map_err(|_| format!("failpoint `{part}`: not a count"))?),
                None => (part, 1),
            };
            if !KNOWN.contains(&name) {
                return Err(format!("unknown failpoint `{name}` (known: {})", KNOWN.join(", ")));
            }
            armed.insert(name.to_string(), AtomicU64::new(n.max(1)));
        }
        Ok(Failpoints { armed })
    }

    /// The points named in `CAIRN_TEST_FAILPOINT` (none when unset); an
    /// unknown name stops the process at once, so a typo never goes unnoticed.
    pub fn from_env() -> Arc<Failpoints> {
        match std::env::var("CAIRN_TEST_FAILPOINT") {
            Ok(spec) => match Failpoints::parse(&spec) {
                Ok(f) => Arc::new(f),
                Err(e) => crate::fatal(&format!("CAIRN_TEST_FAILPOINT: {e}")),
            },
            Err(_) => Arc::new(Failpoints::default()),
        }
    }

    /// The count given for `name`, if armed (for points that are not crashes).
    pub fn count(&self, name: &str) -> Option<u64> {
        self.armed.get(name).map(|n| n.load(Ordering::Relaxed))
    }

    /// Whether `name` fires now (its count reached zero with this hit).
    pub fn fires(&self, name: &str) -> bool {
        self.armed.get(name).is_some_and(|n| n.fetch_sub(1, Ordering::AcqRel) == 1)
    }

    /// Crashes the process here if `name` fires.
    pub fn hit(&self, name: &str) {
        if self.fires(name) {
            eprintln!("kv-server: crashing at failpoint {name} (CAIRN_TEST_FAILPOINT)");
            std::process::exit(CRASH_EXIT_CODE);
        }
    }

    /// An LSM hook that crashes at the armed flush and checkpoint points.
    pub fn lsm_hook(self: &Arc<Self>) -> Option<cairn_lsm::Hook> {
        use cairn_lsm::HookPoint;
        let lsm_points = [
            "flush-table-written",
            "flush-table-synced",
            "flush-installed",
            "checkpoint-linked",
            "checkpoint-done",
            "ingest-linked",
            "ingest-installed",
        ];
        if !lsm_points.iter().any(|p| self.armed.contains_key(*p)) {
            return None;
        }
        let me = self.clone();
        Some(cairn_lsm::Hook(Arc::new(move |p| {
            let name = match p {
                HookPoint::FlushTableWritten => "flush-table-written",
                HookPoint::FlushTableSynced => "flush-table-synced",
                HookPoint::FlushInstalled => "flush-installed",
                HookPoint::CheckpointLinked => "checkpoint-linked",
                HookPoint::CheckpointDone => "checkpoint-done",
                HookPoint::IngestLinked => "ingest-linked",
                HookPoint::IngestInstalled => "ingest-installed",
                _ => return Ok(()),
            };
            me.hit(name);
            Ok(())
        })))
    }
}

const KNOWN: &[&str] = &[
    "flush-table-written",
    "flush-table-synced",
    "flush-installed",
    "checkpoint-linked",
    "checkpoint-done",
    "install-linked",
    "install-published",
    "ingest-linked",
    "ingest-installed",
    "wal-write-error",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_fire_on_their_nth_hit_and_unknown_names_are_refused() {
        let f = Failpoints::parse("install-published:3, flush-installed").expect("parse");
        assert!(!f.fires("install-published"));
        assert!(!f.fires("install-published"));
        assert!(f.fires("install-published"));
        assert!(!f.fires("install-published"));
        assert!(f.fires("flush-installed"));
        assert!(!f.fires("checkpoint-done"));
        assert_eq!(f.count("install-published"), Some(u64::MAX));
        assert_eq!(Failpoints::parse("wal-write-error:5").expect("parse").count("wal-write-error"), Some(5));
        assert!(Failpoints::parse("install-publish").is_err());
        assert!(Failpoints::parse("flush-installed:x").is_err());
    }
}
