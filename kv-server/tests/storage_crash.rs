//! The node's storage code on cairn-wal's simulated disk (unsynced writes
//! lost, the last sector torn): the log (`WalStore` and the WAL jobs the
//! Raft task writes), the state (cairn-lsm in embedded mode, flushing every
//! few writes), the apply worker, log release, install and recovery, driven
//! by a single-voter raft-core node, with crashes at random points of every
//! file-system operation. After each crash, recovery must bring back every
//! acknowledged write, apply each entry exactly once and in order (never one
//! the log does not hold), and an install cut short must leave either the
//! old state or the new one whole.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cairn_kv_client::protocol::{Response, Session, WriteOp};
use cairn_kv_server::apply::{Applier, ApplyLimits, InstallSite, Waiter, Waiters};
use cairn_kv_server::failpoint::Failpoints;
use cairn_kv_server::server::recover;
use cairn_kv_server::snapshot::{NodeFs, SharedDb};
use cairn_kv_server::state::{Command, CommandOp, decode_value, user_key};
use cairn_kv_server::storage::{MarkerJob, NodeIdentity, WalFaults, WalJob, WalStore, write_job};
use cairn_lsm::{Background, Db, DurabilityMode, Options, WriteBatch};
use cairn_raft_core::{ConfState, Entry, LogIndex, LogStore, NodeId, RawNode, Role, Term};
use cairn_snapshot_transfer::{Completed, FileMeta, Manifest};
use cairn_wal::sim::SimDisk;
use rand::{Rng, SeedableRng};
use tokio::sync::{oneshot, watch};

const DIR: &str = "/node";
const ID: NodeIdentity = NodeIdentity { node_id: 1, cluster_id: 7 };

fn options() -> Options {
    let mut o = Options::default();
    o.durability = DurabilityMode::Embedded;
    o.background = Background::Inline;
    o.write_buffer_bytes = 4 << 10;
    o.block_cache_bytes = 1 << 20;
    o.manifest_segment_bytes = 4096;
    o
}

fn site(fs: NodeFs, dir: &str) -> InstallSite {
    InstallSite {
        fs,
        data_dir: PathBuf::from(dir),
        options: options(),
        initial: BTreeMap::from([(1, "127.0.0.1:1".to_string())]),
        failpoints: Arc::new(Failpoints::default()),
    }
}

/// One boot of the node: a raft-core node over the recovered log, and the
/// apply worker over the recovered state, run synchronously.
struct Node {
    raw: RawNode<WalStore>,
    applier: Applier,
    db: Arc<SharedDb>,
    waiters: Waiters,
    last_written: Option<u64>,
    /// The highest index applied, checked to rise by exactly one entry at a time.
    applied: u64,
    /// How the log is written (the sync skipped when a rule is broken so).
    faults: WalFaults,
}

/// How a boot reads the recovery result: as written, or with the recovery
/// rule broken (applied taken from the log's commit index, as the server's
/// `CAIRN_TEST_APPLIED_FROM_LOG` does).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Rule {
    Kept,
    AppliedFromLog,
    /// The release rule broken: segments released without the snapshot
    /// marker written first.
    ReleaseWithoutMarker,
    /// The log written without fdatasync (the server's
    /// `CAIRN_TEST_SKIP_WAL_SYNC`): writes acknowledged before they are durable.
    SkipLogSync,
}

fn boot(fs: NodeFs, seed: u64, rule: Rule) -> Result<Node, String> {
    let site = site(fs, DIR);
    let rec = recover(&site, ID, 16 << 10, 1 << 20, &[1]).map_err(|e| format!("recovery: {e}"))?;
    if std::env::var_os("CAIRN_CRASH_DEBUG").is_some() {
        eprintln!(
            "boot: applied {} log {:?}..={:?} hs {:?}",
            rec.applied,
            rec.store.first_index(),
            rec.store.last_index(),
            rec.store.hard_state()
        );
    }
    // Replay never meets a hole: every entry from the log's first index on
    // is in the WAL (DESIGN.md, Release).
    let (first, last) = (rec.store.first_index(), rec.store.last_index());
    if let Some(p) = rec.store.wal().first_position()
        && last >= first
        && p > first.0
    {
        return Err(format!("RULE: the log starts at {} but the WAL holds entries only from {p}", first.0));
    }
    if rec.applied > rec.store.last_index().0 {
        return Err(format!(
            "the state ({}) is ahead of the recovered log ({})",
            rec.applied,
            rec.store.last_index().0
        ));
    }
    let mut cfg = cairn_raft_core::Config::new(NodeId(1), Vec::new(), seed);
    cfg.conf = rec.conf;
    cfg.applied = LogIndex(rec.applied);
    if rule == Rule::AppliedFromLog {
        cfg.applied = rec.store.hard_state().commit.max(LogIndex(rec.applied));
    }
    let applied = cfg.applied.0;
    let last_written = Some(rec.store.last_index().0);
    let raw = RawNode::new(cfg, rec.store).map_err(|e| e.to_string())?;
    let db = Arc::new(SharedDb::new(Arc::new(rec.db)));
    let waiters: Waiters = Arc::new(Mutex::new(HashMap::new()));
    let (tx, _rx) = watch::channel(applied);
    let limits = ApplyLimits::new(&cairn_kv_server::config::Limits::default(), u64::MAX / 4);
    let book = Arc::new(std::sync::RwLock::new(rec.book));
    let applier = Applier::new(db.clone(), site, book, tx, waiters.clone(), limits).map_err(|e| e.to_string())?;
    let faults = WalFaults { skip_sync: rule == Rule::SkipLogSync };
    Ok(Node { raw, applier, db, waiters, last_written, applied, faults })
}

impl Node {
    /// Runs the ready loop until there is nothing to do: entries and hard
    /// state written durably (one WAL job per `Ready`), then applied.
    fn settle(&mut self) -> Result<(), String> {
        for _ in 0..1000 {
            let rd = self.raw.ready();
            if rd.is_empty() {
                return Ok(());
            }
            self.raw.advance(&rd);
            for m in rd.messages {
                let _ = self.raw.step(m);
            }
            let job = WalJob { entries: rd.entries, hard_state: rd.hard_state, ..WalJob::default() };
            let wal = self.raw.store().wal();
            write_job(&wal, &job, &mut self.last_written, self.faults).map_err(|e| format!("log write: {e}"))?;
            let last = job.entries.last().map(|e| (e.index, e.term));
            if let Some(hs) = job.hard_state {
                self.raw.store_mut().note_hard_state(hs);
            }
            self.raw.store_mut().note_entries(job.entries);
            if let Some((i, t)) = last {
                self.raw.on_persisted(i, t);
            }
            for m in rd.persisted_messages {
                let _ = self.raw.step(m);
            }
            if let (Some(first), Some(last)) = (rd.committed_entries.first(), rd.committed_entries.last()) {
                if first.index.0 != self.applied + 1 {
                    return Err(format!(
                        "RULE: entry {} handed to apply after {} (an entry applied twice or skipped)",
                        first.index.0, self.applied
                    ));
                }
                let last = last.index.0;
                self.applier.apply(&rd.committed_entries, None).map_err(|e| format!("apply: {e}"))?;
                self.applied = last;
                self.raw.on_applied(LogIndex(last));
            }
        }
        Err("the ready loop did not settle".into())
    }

    fn lead(&mut self) -> Result<(), String> {
        self.raw.campaign();
        self.settle()?;
        if self.raw.role() != Role::Leader {
            return Err("a single voter did not become leader".into());
        }
        // The new term's first entry commits everything durable before it.
        self.settle()
    }

    fn propose(&mut self, cmd: &Command) -> Result<oneshot::Receiver<Response>, String> {
        let data = cmd.encode().map_err(|e| e.to_string())?;
        let index = self.raw.propose(vec![data]).map_err(|e| e.to_string())?;
        let (tx, rx) = oneshot::channel();
        let term = self.raw.term();
        self.waiters.lock().expect("waiters").insert(index.0, Waiter { term, reply: tx });
        self.settle()?;
        Ok(rx)
    }

    /// Releases the log below the state's durable marker less a margin,
    /// a snapshot marker first, as the Raft task does.
    fn release(&mut self, margin: u64) -> Result<(), String> {
        let durable = self.db.get().durable_marker().map_or(0, |m| m.index);
        let keep_from = durable.saturating_sub(margin) + 1;
        let store = self.raw.store();
        if keep_from <= store.snapshot().0.0 + 1 {
            return Ok(());
        }
        let index = LogIndex(keep_from - 1);
        let Some(term) = store.term(index) else { return Ok(()) };
        let conf = ConfState::with_voters([NodeId(1)]);
        let job = WalJob { release: Some(MarkerJob { index, term, conf: conf.clone() }), ..WalJob::default() };
        let wal = store.wal();
        write_job(&wal, &job, &mut self.last_written, self.faults).map_err(|e| format!("release: {e}"))?;
        self.raw.store_mut().note_released(index, term, conf);
        Ok(())
    }

    fn value(&self, key: &str) -> Option<Vec<u8>> {
        let v = self.db.get().get(&user_key(key.as_bytes())).expect("read")?;
        Some(decode_value(&v).expect("stored value").1.to_vec())
    }
}

/// Writes, flushes, releases and crashes, over `boots` boots of one seed;
/// returns the first broken promise.
fn run_seed(seed: u64, boots: u32, rule: Rule) -> Result<(), String> {
    cairn_kv_server::storage::RELEASE_WITHOUT_MARKER_FOR_TESTS
        .store(rule == Rule::ReleaseWithoutMarker, std::sync::atomic::Ordering::Relaxed);
    let disk = SimDisk::new(seed);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    for b in 0..boots {
        let mut node = match boot(disk.fs(), seed ^ u64::from(b), rule) {
            Ok(n) => n,
            Err(e) => return Err(format!("boot {b}: {e}")),
        };
        node.lead().map_err(|e| format!("boot {b}: {e}"))?;
        // Every acknowledged write is back.
        for (k, v) in &acked {
            if node.value(k).as_deref() != Some(v.as_bytes()) {
                return Err(format!("RULE: boot {b}: acknowledged write {k} lost (found {:?})", node.value(k)));
            }
        }
        disk.crash_after_ops(rng.random_range(0..3000));
        let crashed = (|| -> Result<(), String> {
            let rx = node.propose(&Command { time_ms: 1, op: CommandOp::Register })?;
            let client_id = match rx.blocking_recv() {
                Ok(Response::Registered { client_id }) => client_id,
                other => return Err(format!("register: {other:?}")),
            };
            for seq in 1..=200u64 {
                let (k, v) =
                    (format!("k{b}-{seq:04}"), format!("value {seq} of boot {b} {}", "x".repeat(seq as usize % 50)));
                let cmd = Command {
                    time_ms: 1,
                    op: CommandOp::Write {
                        session: Session { client_id, seq, first_unacked: seq },
                        ops: vec![WriteOp::Put { key: k.clone().into_bytes(), value: v.clone().into_bytes() }],
                    },
                };
                let rx = node.propose(&cmd)?;
                match rx.blocking_recv() {
                    Ok(Response::Written { .. }) => {
                        acked.insert(k, v);
                    }
                    other => return Err(format!("write: {other:?}")),
                }
                if seq % 25 == 0 {
                    node.release(20)?;
                }
            }
            Ok(())
        })();
        if let Err(e) = crashed
            && e.starts_with("RULE")
        {
            return Err(format!("boot {b}: {e}"));
        }
        drop(node);
        disk.crash();
    }
    Ok(())
}

/// Crashes at random points of writes, flushes and releases, 48 seeds of 4
/// boots: nothing acknowledged is lost, every entry applies once, in order.
/// With the recovery rule broken on purpose (applied taken from the log's
/// commit index instead of the state's durable marker), some seed loses an
/// acknowledged write or skips an entry; with the release rule broken (log
/// segments released before the snapshot marker is written), a recovered
/// log has a hole before its first entry; with the log's fdatasync skipped
/// (`CAIRN_TEST_SKIP_WAL_SYNC`), an acknowledged write is lost; the test
/// sees all three.
#[test]
fn the_node_storage_keeps_every_acknowledged_write_through_crashes() {
    for seed in 0..48 {
        if let Err(e) = run_seed(seed, 4, Rule::Kept) {
            panic!("seed {seed}: {e}");
        }
    }
    for broken in [Rule::AppliedFromLog, Rule::ReleaseWithoutMarker, Rule::SkipLogSync] {
        let caught = (0..48).find_map(|seed| run_seed(seed, 4, broken).err().map(|e| (seed, e)));
        let (seed, e) = caught.unwrap_or_else(|| panic!("with {broken:?} no seed failed: the test has no teeth"));
        assert!(e.contains("RULE"), "{broken:?}: seed {seed} failed for another reason: {e}");
    }
    cairn_kv_server::storage::RELEASE_WITHOUT_MARKER_FOR_TESTS.store(false, std::sync::atomic::Ordering::Relaxed);
}

/// The state of a node at `index`: keys `prefix0000..` with the marker.
fn write_state(fs: &NodeFs, dir: &Path, prefix: &str, keys: u32, index: u64) -> Db {
    let db = Db::open_with_fs(fs.clone(), dir, options()).expect("open");
    let mut b = WriteBatch::new();
    for i in 0..keys {
        b.put(
            user_key(format!("{prefix}{i:04}").as_bytes()),
            cairn_kv_server::state::encode_value(
                cairn_kv_client::protocol::KeyMeta {
                    create_revision: index,
                    mod_revision: index,
                    version: 1,
                    lease: 0,
                },
                b"v",
            ),
        );
    }
    b.set_marker(cairn_lsm::Marker::new(index, 1));
    db.write(&b).expect("write");
    db.flush().expect("flush");
    db
}

fn keys_of(db: &Db) -> Vec<Vec<u8>> {
    db.range::<std::ops::RangeFull, &[u8]>(..).map(|kv| kv.expect("read").0.to_vec()).collect()
}

/// Sets up a node whose state and log reach `old` (keys `old-*`), and a
/// received checkpoint at `new` (keys `new-*`) staged on the same disk.
fn install_setup(disk: &SimDisk) -> (Completed, Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let fs: NodeFs = disk.fs();
    let node = Path::new(DIR);
    fs.create_dir_all(node).expect("mkdir");
    // The node: a log with entries 1..=5 and a state at 5.
    let old_db = write_state(&fs, &node.join("state"), "old-", 30, 5);
    let old_keys = keys_of(&old_db);
    old_db.close().expect("close");
    let mut store = WalStore::open(fs.clone(), &node.join("raft"), ID, 16 << 10, 1 << 20).expect("log");
    let entries: Vec<Entry> = (1..=5)
        .map(|i| Entry {
            term: Term(1),
            index: LogIndex(i),
            kind: cairn_raft_core::EntryKind::Normal,
            data: Default::default(),
        })
        .collect();
    let wal = store.wal();
    write_job(&wal, &WalJob { entries: entries.clone(), ..WalJob::default() }, &mut None, WalFaults::default())
        .expect("log write");
    store.note_entries(entries);
    drop(store);
    // The leader's checkpoint at 40, staged flat as a transfer leaves it.
    let leader = Path::new("/leader");
    let ldb = write_state(&fs, &leader.join("state"), "new-", 50, 40);
    let new_keys = keys_of(&ldb);
    let info = ldb.checkpoint(leader.join("ckpt")).expect("checkpoint");
    let staged = node.join("staging/checkpoint-x");
    fs.create_dir_all(&staged).expect("mkdir");
    let mut files = Vec::new();
    for sub in ["tables", "manifest"] {
        for name in fs.read_dir(&info.dir.join(sub)).expect("list") {
            let wire = format!("{}.{name}", if sub == "tables" { "table" } else { "manifest" });
            fs.hard_link(&info.dir.join(sub).join(&name), &staged.join(&wire)).expect("link");
            files.push(FileMeta { name: wire, len: 0, checksum: 0 });
        }
    }
    fs.sync_dir(&staged).expect("sync");
    fs.sync_dir(&node.join("staging")).expect("sync");
    fs.sync_dir(node).expect("sync");
    drop(ldb);
    let manifest = Manifest { transfer_id: 1, index: 40, term: 1, files };
    (Completed { dir: staged, manifest }, old_keys, new_keys)
}

/// An install crashed at every file-system operation in turn: recovery
/// finds the old state with its log, or the new state with a log that starts
/// after it, never a mix, and never a state ahead of its log.
#[test]
fn an_install_cut_short_anywhere_leaves_the_old_state_or_the_new_one() {
    let mut outcomes = BTreeMap::new();
    for at in 0.. {
        let disk = SimDisk::new(at);
        let (completed, old_keys, new_keys) = install_setup(&disk);
        let mut node = boot(disk.fs(), at, Rule::Kept).expect("boot");
        node.settle().expect("settle");
        disk.crash_after_ops(at);
        let done = (|| -> Result<(), String> {
            node.applier.install(&completed)?;
            let conf = ConfState::with_voters([NodeId(1)]);
            let job =
                WalJob { installed: Some(MarkerJob { index: LogIndex(40), term: Term(1), conf }), ..WalJob::default() };
            write_job(&node.raw.store().wal(), &job, &mut node.last_written, node.faults).map_err(|e| e.to_string())
        })();
        let finished = done.is_ok();
        drop(node);
        disk.crash();
        let rec =
            recover(&site(disk.fs(), DIR), ID, 16 << 10, 1 << 20, &[1]).expect("recovery after a cut-short install");
        let keys = keys_of(&rec.db);
        let which = if keys == new_keys {
            assert_eq!(rec.applied, 40, "crash point {at}: the new state's marker");
            assert_eq!(
                rec.store.first_index(),
                LogIndex(41),
                "crash point {at}: the log does not start after the new state"
            );
            "new"
        } else if keys == old_keys {
            assert_eq!(rec.applied, 5, "crash point {at}: the old state's marker");
            assert!(rec.store.last_index() >= LogIndex(5), "crash point {at}: the old log lost entries");
            "old"
        } else {
            panic!("crash point {at}: the state is neither the old one nor the new one ({} keys)", keys.len());
        };
        *outcomes.entry(which).or_insert(0u32) += 1;
        if finished {
            assert_eq!(which, "new", "a completed install came back as the old state");
            break;
        }
        assert!(at < 5000, "the install never completed");
    }
    assert!(outcomes.contains_key("old") && outcomes.contains_key("new"), "{outcomes:?}");
}
