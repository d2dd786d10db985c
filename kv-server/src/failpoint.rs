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
//! | `wal-fsync-error` | not a crash: from the n-th fdatasync of a Raft log file on, every one fails with an I/O error (the node must stop, exit 70) |
//! | `lsm-fsync-error` | the same for the files of the state (tables, manifest, pointer file) |
//!
//! The two fsync points are a failing disk: [`FailingFs`] wraps the node's
//! file system and makes the real `fdatasync` calls return an error, so the
//! error paths of cairn-wal, cairn-lsm and the node run as they would on a
//! bad disk.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cairn_wal::{Fs, FsFile, FsLock, OpenMode};

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
    "wal-fsync-error",
    "lsm-fsync-error",
];

/// A failing disk for the fault tests: from the n-th `fdatasync` of a file
/// on, every one fails (a disk that went bad stays bad), counted apart for
/// the Raft log's files (`wal-fsync-error:n`) and the state's
/// (`lsm-fsync-error:n`). Everything else passes to the inner file system.
#[derive(Debug)]
pub struct FailingFs {
    inner: Arc<dyn Fs>,
    raft_dir: PathBuf,
    wal: Option<Arc<SyncFault>>,
    lsm: Option<Arc<SyncFault>>,
}

/// One class of files' countdown to failure.
#[derive(Debug)]
struct SyncFault {
    /// fdatasyncs left that succeed.
    left: AtomicU64,
    name: &'static str,
}

impl SyncFault {
    fn check(&self) -> io::Result<()> {
        let before = self.left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_sub(1)));
        match before {
            Ok(n) if n > 0 => Ok(()),
            _ => Err(io::Error::other(format!("fdatasync: input/output error (injected: {} failpoint)", self.name))),
        }
    }
}

impl FailingFs {
    /// `inner` itself when neither fsync point is armed; else `inner` wrapped
    /// so that the armed class of files under `data_dir` fails its syncs.
    pub fn wrap(inner: Arc<dyn Fs>, data_dir: &Path, points: &Failpoints) -> Arc<dyn Fs> {
        let fault = |name: &'static str| {
            points.count(name).map(|n| Arc::new(SyncFault { left: AtomicU64::new(n.saturating_sub(1)), name }))
        };
        let (wal, lsm) = (fault("wal-fsync-error"), fault("lsm-fsync-error"));
        if wal.is_none() && lsm.is_none() {
            return inner;
        }
        Arc::new(FailingFs { inner, raft_dir: data_dir.join("raft"), wal, lsm })
    }
}

#[derive(Debug)]
struct FailingFile {
    inner: Box<dyn FsFile>,
    fault: Option<Arc<SyncFault>>,
}

impl FsFile for FailingFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        if let Some(f) = &self.fault {
            f.check()?;
        }
        self.inner.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.start_writeback(offset, len)
    }
}

impl Fs for FailingFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>> {
        let inner = self.inner.open(path, mode)?;
        let fault = if path.starts_with(&self.raft_dir) { self.wal.clone() } else { self.lsm.clone() };
        Ok(Box::new(FailingFile { inner, fault }))
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.inner.create_dir_all(path)
    }
    fn read_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        self.inner.read_dir(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.hard_link(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_file(path)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_dir(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.inner.sync_dir(path)
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        self.inner.exists(path)
    }
    fn try_lock_exclusive(&self, path: &Path) -> io::Result<Box<dyn FsLock>> {
        self.inner.try_lock_exclusive(path)
    }
}

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
        assert_eq!(Failpoints::parse("wal-fsync-error:5").expect("parse").count("wal-fsync-error"), Some(5));
        assert!(Failpoints::parse("install-publish").is_err());
        assert!(Failpoints::parse("flush-installed:x").is_err());
    }

    #[test]
    fn a_failing_disk_fails_the_nth_sync_of_its_class_and_every_one_after() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plain: Arc<dyn Fs> = Arc::new(cairn_wal::StdFs);
        let unarmed = FailingFs::wrap(plain.clone(), dir.path(), &Failpoints::default());
        assert!(Arc::ptr_eq(&unarmed, &plain), "an unarmed disk is the plain one");
        let fs = FailingFs::wrap(plain, dir.path(), &Failpoints::parse("wal-fsync-error:2").expect("parse"));
        fs.create_dir_all(&dir.path().join("raft")).expect("mkdir");
        fs.create_dir_all(&dir.path().join("state-1")).expect("mkdir");
        let log = fs.open(&dir.path().join("raft/seg"), OpenMode::CreateNew).expect("create");
        let table = fs.open(&dir.path().join("state-1/t.sst"), OpenMode::CreateNew).expect("create");
        log.write_all_at(b"x", 0).expect("write");
        log.sync_data().expect("the first sync succeeds");
        assert!(log.sync_data().is_err(), "the second sync fails");
        assert!(log.sync_data().is_err(), "and every one after");
        table.write_all_at(b"y", 0).expect("write");
        table.sync_data().expect("the state's files are not armed");
    }
}
