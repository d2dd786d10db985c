//! Snapshots: checkpoints of the applied state sent to followers behind the
//! released log, received into a staging area, and installed by swapping
//! the live state directory (see DESIGN.md, "Checkpoint" and "Install", and
//! `docs/design/kv-server.md`, "Log release and snapshots").
//!
//! Layout under the data directory:
//!
//! | path | what |
//! |---|---|
//! | `CURRENT_STATE` | the name of the live state directory (absent: `state`) |
//! | `state` or `state-<index>-<term>` | the LSM (`tables/`, `manifest/`) |
//! | `checkpoints/ckpt-<n>` | checkpoints being sent (deleted when unused) |
//! | `staging/` | transfers being received (cairn-snapshot-transfer) |
//!
//! A checkpoint's files travel flat: `tables/X` as `table.X`, `manifest/X`
//! as `manifest.X`; the receiver puts each name back in its place. A delta
//! (cairn-lsm's L0 tables since the follower's durable marker, see
//! [`cairn_lsm::Delta`]) travels as `delta.X` for each file `X` of it,
//! `delta.DELTA` included (and the blob files its tables reference); the
//! receiver checks it against its state before
//! offering it to Raft, and installs it by ingesting the tables into the
//! live state (one manifest edit) instead of swapping the directory.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use cairn_kv_client::frame;
use cairn_lsm::{Db, Options};
use cairn_raft_core::{Body, ConfState, LogIndex, Message, NodeId, Term};
use cairn_snapshot_transfer::{
    Completed, Config as TransferConfig, Frame, Receiver, Sender, SenderEvent, Source, SourceFile, Staging,
};
use rkyv::{Archive, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// The file naming the live state directory.
pub const POINTER_FILE: &str = "CURRENT_STATE";
/// The state directory of a node that never installed a snapshot.
pub const FIRST_STATE_DIR: &str = "state";
const CHECKPOINTS_DIR: &str = "checkpoints";
const STAGING_DIR: &str = "staging";
/// The prefix of a delta's files on the wire.
const DELTA_PREFIX: &str = "delta.";
const HELLO_BYTES_MAX: usize = 1 << 20;

fn io_err(what: &str, p: &Path, e: std::io::Error) -> String {
    format!("{what} {}: {e}", p.display())
}

/// The live LSM, swapped whole when a snapshot is installed. Readers take a
/// handle for the length of one request.
#[derive(Debug)]
pub struct SharedDb(RwLock<Arc<Db>>);

impl SharedDb {
    /// Shares `db`.
    pub fn new(db: Arc<Db>) -> SharedDb {
        SharedDb(RwLock::new(db))
    }
    /// The live state now.
    pub fn get(&self) -> Arc<Db> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// Makes `db` the live state; returns the one it replaces.
    pub fn replace(&self, db: Arc<Db>) -> Arc<Db> {
        std::mem::replace(&mut *self.0.write().unwrap_or_else(|e| e.into_inner()), db)
    }
}

/// The file system the node's state goes through (the real one, or
/// cairn-wal's simulated disk in crash tests).
pub type NodeFs = Arc<dyn cairn_wal::Fs>;

fn fs_err(what: &str, p: &Path, e: std::io::Error) -> String {
    io_err(what, p, e)
}

/// Reads a whole (small) file through `fs`.
fn read_all(fs: &dyn cairn_wal::Fs, p: &Path) -> std::io::Result<Vec<u8>> {
    let f = fs.open(p, cairn_wal::OpenMode::Read)?;
    let mut buf = vec![0u8; usize::try_from(f.len()?).unwrap_or(0)];
    f.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

/// Removes a directory tree (or a file) through `fs`.
pub fn remove_tree(fs: &dyn cairn_wal::Fs, p: &Path) -> std::io::Result<()> {
    match fs.read_dir(p) {
        Ok(names) => {
            for n in names {
                remove_tree(fs, &p.join(n))?;
            }
            fs.remove_dir(p)
        }
        Err(_) => fs.remove_file(p),
    }
}

/// Creates `dir` and its missing parents so that they survive a crash: each
/// new directory's parent is fsynced, top down.
pub fn create_dir_durably(fs: &dyn cairn_wal::Fs, dir: &Path) -> Result<(), String> {
    let mut made = Vec::new();
    let mut p = dir.to_path_buf();
    while !p.as_os_str().is_empty() && !fs.exists(&p).map_err(|e| fs_err("checking", &p, e))? {
        made.push(p.clone());
        p = p.parent().map(Path::to_path_buf).unwrap_or_default();
    }
    fs.create_dir_all(dir).map_err(|e| fs_err("creating", dir, e))?;
    for m in made.iter().rev() {
        let parent = m.parent().filter(|x| !x.as_os_str().is_empty()).unwrap_or(Path::new("."));
        fs.sync_dir(parent).map_err(|e| fs_err("fsync directory", parent, e))?;
    }
    Ok(())
}

/// The live state directory named by the pointer file.
pub fn live_state_dir(fs: &dyn cairn_wal::Fs, data_dir: &Path) -> Result<PathBuf, String> {
    let p = data_dir.join(POINTER_FILE);
    if !fs.exists(&p).map_err(|e| fs_err("checking", &p, e))? {
        return Ok(data_dir.join(FIRST_STATE_DIR));
    }
    let bytes = read_all(fs, &p).map_err(|e| fs_err("reading", &p, e))?;
    let name = String::from_utf8_lossy(&bytes);
    let name = name.trim();
    if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
        return Err(format!("{} names no state directory: `{name}`", p.display()));
    }
    Ok(data_dir.join(name))
}

/// Points the node at the state directory `name`: the pointer is written to
/// a temporary file, fsynced, renamed into place, and the directory fsynced.
pub fn publish_state_dir(fs: &dyn cairn_wal::Fs, data_dir: &Path, name: &str) -> Result<(), String> {
    let tmp = data_dir.join(format!("{POINTER_FILE}.tmp"));
    if fs.exists(&tmp).map_err(|e| fs_err("checking", &tmp, e))? {
        fs.remove_file(&tmp).map_err(|e| fs_err("removing", &tmp, e))?;
    }
    let f = fs.open(&tmp, cairn_wal::OpenMode::CreateNew).map_err(|e| fs_err("creating", &tmp, e))?;
    f.write_all_at(name.as_bytes(), 0).map_err(|e| fs_err("writing", &tmp, e))?;
    f.sync_data().map_err(|e| fs_err("fsync", &tmp, e))?;
    drop(f);
    let dst = data_dir.join(POINTER_FILE);
    fs.rename(&tmp, &dst).map_err(|e| fs_err("renaming into place", &dst, e))?;
    fs.sync_dir(data_dir).map_err(|e| fs_err("fsync directory", data_dir, e))
}

/// Removes state directories other than the live one (left by an install
/// that replaced them or one that crashed before it was published), and the
/// checkpoints of an earlier run.
pub fn remove_unused(fs: &dyn cairn_wal::Fs, data_dir: &Path, live: &Path) -> Result<(), String> {
    let names = fs.read_dir(data_dir).map_err(|e| fs_err("listing", data_dir, e))?;
    let mut removed = false;
    for name in names {
        let path = data_dir.join(&name);
        let is_state = name == FIRST_STATE_DIR || name.starts_with("state-");
        if (is_state && path != live) || name == CHECKPOINTS_DIR {
            tracing::info!(dir = %path.display(), "removing an unused state directory");
            remove_tree(fs, &path).map_err(|e| fs_err("removing", &path, e))?;
            removed = true;
        }
    }
    if removed {
        fs.sync_dir(data_dir).map_err(|e| fs_err("fsync directory", data_dir, e))?;
    }
    Ok(())
}

/// The flat name a checkpoint file travels under.
fn wire_name(rel: &Path) -> Option<String> {
    let mut parts = rel.components().map(|c| c.as_os_str().to_str());
    let (Some(Some(dir)), Some(Some(file)), None) = (parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    match dir {
        "tables" => Some(format!("table.{file}")),
        "manifest" => Some(format!("manifest.{file}")),
        _ => None,
    }
}

/// Where a flat name belongs in a state directory.
fn local_path(name: &str) -> Option<PathBuf> {
    let (dir, file) = if let Some(f) = name.strip_prefix("table.") {
        ("tables", f)
    } else if let Some(f) = name.strip_prefix("manifest.") {
        ("manifest", f)
    } else {
        return None;
    };
    (!file.is_empty() && !file.contains(['/', '\\']) && file != "." && file != "..").then(|| Path::new(dir).join(file))
}

/// A received checkpoint's table files, and its blob files with their ids
/// (as `Db::ingest_with_blobs` takes them), by where each name belongs.
pub fn received_lsm_files(c: &Completed) -> (Vec<PathBuf>, Vec<(u64, PathBuf)>) {
    let (mut tables, mut blobs) = (Vec::new(), Vec::new());
    for f in &c.manifest.files {
        let Some(rel) = local_path(&f.name).filter(|r| r.starts_with("tables")) else { continue };
        let file = rel.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        match cairn_lsm::blob_file_id(file) {
            Some(id) => blobs.push((id, c.dir.join(&f.name))),
            None if file.ends_with(".sst") => tables.push(c.dir.join(&f.name)),
            None => {}
        }
    }
    (tables, blobs)
}

/// A checkpoint on disk, deleted when the last transfer using it ends.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    /// Its Raft index (the state's durable marker).
    pub index: LogIndex,
    /// Its Raft term.
    pub term: Term,
    /// Each file: wire name, path, and its xxh3 when cairn-lsm recorded it
    /// (tables it wrote), so a sender need not read the file to checksum it.
    pub files: Vec<SourceFile>,
    /// A delta (L0 tables since a follower's marker), not a full checkpoint.
    pub delta: bool,
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        remove_in_background(std::mem::take(&mut self.dir), "a checkpoint");
    }
}

/// Removes the directory tree `dir` on a thread of its own. Removing the
/// last link of a large file frees its blocks, which on a file system that
/// trims them (ext4 with `discard`) waits for the device: up to half a second
/// per 64 MiB table on the benchmark machine, too long for a runtime worker
/// or the apply worker. If no thread can be started, the tree stays, and the
/// next start removes it.
pub fn remove_in_background(dir: PathBuf, what: &'static str) {
    let spawned = std::thread::Builder::new().name("cairn-remove".into()).spawn(move || {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove {what}");
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start a thread to remove {what}; the next start removes it");
    }
}

/// The checkpoints a leader makes for transfers: the newest is reused while
/// it is recent enough and a transfer still uses it; each is deleted when
/// the last transfer using it ends (DESIGN.md, "Checkpoint"); at most `max`
/// are remembered for reuse.
#[derive(Debug)]
pub struct Checkpoints {
    dir: PathBuf,
    db: Arc<SharedDb>,
    live: Mutex<VecDeque<std::sync::Weak<Checkpoint>>>,
    max: usize,
    seq: AtomicU64,
    /// Names this process's checkpoints apart from an earlier run's.
    run: u64,
    /// Test switch: label checkpoints with the applied index read after
    /// they are made, not with their durable marker (breaks the checkpoint rule).
    pub label_with_applied_for_tests: Option<tokio::sync::watch::Receiver<u64>>,
}

impl Checkpoints {
    /// Checkpoints under `data_dir/checkpoints` of the live state.
    pub fn new(data_dir: &Path, db: Arc<SharedDb>, max: usize) -> Checkpoints {
        Checkpoints {
            dir: data_dir.join(CHECKPOINTS_DIR),
            db,
            live: Mutex::new(VecDeque::new()),
            max: max.max(1),
            seq: AtomicU64::new(0),
            run: rand::random::<u64>(),
            label_with_applied_for_tests: None,
        }
    }

    /// A checkpoint at `min_index` or later: the newest kept one if it is
    /// recent enough, else a new one (a forced flush and hard links).
    pub fn get(&self, min_index: LogIndex) -> Result<Arc<Checkpoint>, String> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|c| c.strong_count() > 0);
        if let Some(c) = live.back().and_then(std::sync::Weak::upgrade).filter(|c| c.index >= min_index) {
            return Ok(c);
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| io_err("creating", &self.dir, e))?;
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let dest = self.dir.join(format!("ckpt-{:016x}-{n}", self.run));
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(|e| io_err("removing", &dest, e))?;
        }
        let started = Instant::now();
        let info = self.db.get().checkpoint(&dest).map_err(|e| format!("making a checkpoint: {e}"))?;
        let mut marker = info.marker.ok_or("the checkpoint holds no Raft marker (nothing applied yet)")?;
        if let Some(applied) = &self.label_with_applied_for_tests {
            // Under load the applied index soon passes the flushed marker: wait for
            // that (at most a second) so the mislabel shows every time.
            let waited = Instant::now();
            while *applied.borrow() <= marker.index && waited.elapsed() < Duration::from_secs(1) {
                std::thread::sleep(Duration::from_millis(2));
            }
            let at = *applied.borrow();
            tracing::warn!(
                durable = marker.index,
                applied = at,
                "test switch: checkpoint labelled with the applied index"
            );
            marker.index = marker.index.max(at);
        }
        let known: std::collections::HashMap<&Path, u64> =
            info.tables.iter().filter_map(|t| Some((t.path.as_path(), t.xxh3?))).collect();
        let mut files = Vec::new();
        for sub in ["tables", "manifest"] {
            let d = dest.join(sub);
            let rd = std::fs::read_dir(&d).map_err(|e| io_err("listing", &d, e))?;
            for e in rd.filter_map(Result::ok) {
                let rel = Path::new(sub).join(e.file_name());
                if e.file_type().map(|t| t.is_file()).unwrap_or(false)
                    && let Some(name) = wire_name(&rel)
                {
                    files.push(SourceFile { name, path: e.path(), xxh3: known.get(rel.as_path()).copied() });
                }
            }
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let c = Arc::new(Checkpoint {
            dir: dest,
            index: LogIndex(marker.index),
            term: Term(marker.term),
            files,
            delta: false,
        });
        tracing::info!(
            index = marker.index,
            term = marker.term,
            files = c.files.len(),
            ms = started.elapsed().as_millis() as u64,
            "checkpoint made"
        );
        metrics::counter!("cairn_snapshot_checkpoints_total").increment(1);
        live.push_back(Arc::downgrade(&c));
        while live.len() > self.max {
            live.pop_front();
        }
        Ok(c)
    }
}

impl Checkpoints {
    /// A delta for a follower whose state's durable marker is `after`: the
    /// leader's L0 tables that hold every write since, if they can show it.
    /// Made for one transfer (not kept for others).
    pub fn get_delta(&self, after: Option<cairn_lsm::Marker>) -> Result<Option<Arc<Checkpoint>>, String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io_err("creating", &self.dir, e))?;
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let dest = self.dir.join(format!("delta-{:016x}-{n}", self.run));
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(|e| io_err("removing", &dest, e))?;
        }
        let started = Instant::now();
        let Some(delta) = self.db.get().delta_checkpoint(&dest, after).map_err(|e| format!("making a delta: {e}"))?
        else {
            return Ok(None);
        };
        let mut files: Vec<SourceFile> = delta
            .tables
            .iter()
            .map(|t| t.file.as_str())
            .chain(delta.blob_files.iter().map(String::as_str))
            .chain([cairn_lsm::DELTA_FILE])
            .map(|f| SourceFile { name: format!("{DELTA_PREFIX}{f}"), path: dest.join(f), xxh3: None })
            .collect();
        files.sort_by(|a, b| a.name.cmp(&b.name));
        tracing::info!(
            index = delta.marker.index,
            after = after.map(|m| m.index),
            tables = delta.tables.len(),
            blob_files = delta.blob_files.len(),
            ms = started.elapsed().as_millis() as u64,
            "delta made"
        );
        metrics::counter!("cairn_snapshot_deltas_total").increment(1);
        Ok(Some(Arc::new(Checkpoint {
            dir: dest,
            index: LogIndex(delta.marker.index),
            term: Term(delta.marker.term),
            files,
            delta: true,
        })))
    }
}

/// The follower's answer to a [`SnapshotHello`]: its state's durable
/// marker, and whether it takes a delta.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub struct SnapshotAck {
    /// `(index, term)` of the follower's durable marker (`None`: an empty state).
    pub durable: Option<(u64, u64)>,
    /// False after a delta this follower could not use: send a full checkpoint.
    pub accepts_delta: bool,
    /// `(index, term)` of the newest checkpoint this follower received in
    /// full and has not installed yet (Raft will have it installed).
    pub pending: Option<(u64, u64)>,
}

impl SnapshotAck {
    /// Whether the follower already holds, or is about to install, a state
    /// at or past `min_index`: then nothing needs sending. (A leader asks
    /// again when the follower rejects an append while its install runs.)
    pub fn holds(&self, min_index: LogIndex) -> bool {
        self.durable.max(self.pending).is_some_and(|(i, _)| i >= min_index.0)
    }
}

/// Opens the transfer stream: who sends, in which term, and the membership
/// as of the checkpoint. The follower answers with a [`SnapshotAck`]; then
/// cairn-snapshot-transfer frames follow both ways.
#[derive(Archive, Serialize, Deserialize, Clone, Debug)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub struct SnapshotHello {
    /// The sender's cluster id.
    pub cluster_id: u64,
    /// The leader sending.
    pub from: NodeId,
    /// The follower receiving.
    pub to: NodeId,
    /// The leader's term.
    pub term: Term,
    /// The membership as of the checkpoint.
    pub conf: ConfState,
}

/// A leader's request to send a snapshot to a follower.
#[derive(Debug)]
pub struct SendRequest {
    /// The follower.
    pub to: NodeId,
    /// The leader's term.
    pub term: Term,
    /// The snapshot index Raft asked for (the checkpoint is at or after it).
    pub min_index: LogIndex,
    /// The membership to install with it.
    pub conf: ConfState,
}

/// What a sender needs.
#[derive(Clone)]
pub struct SendContext {
    /// This node.
    pub me: NodeId,
    /// The cluster id.
    pub cluster_id: u64,
    /// TLS toward followers' snapshot listeners (this node's certificate,
    /// the CA's roots, ALPN [`crate::tls::ALPN_SNAPSHOT`]).
    pub tls: Arc<rustls::ClientConfig>,
    /// The address of each peer.
    pub addr_of: Arc<dyn Fn(NodeId) -> Option<String> + Send + Sync>,
    /// The checkpoints.
    pub checkpoints: Arc<Checkpoints>,
    /// Transfer bounds.
    pub transfer: TransferConfig,
    /// Send deltas when the follower's state allows.
    pub deltas: bool,
    /// Where the outcome goes: (peer, bytes of checkpoint sent, or `None`
    /// if the transfer failed; 0 when the follower held the state already).
    pub done: mpsc::Sender<(NodeId, Option<u64>)>,
    /// Peers connecting to this node: a follower that connects while the
    /// sender waits between two dials to it is dialed again at once.
    pub arrivals: Arc<crate::peer::PeerArrivals>,
    /// Index of the latest membership change applied, kept by the Raft task.
    pub conf_index: Arc<AtomicU64>,
}

impl std::fmt::Debug for SendContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendContext").field("me", &self.me).finish_non_exhaustive()
    }
}

/// Sends a checkpoint to `req.to`, then reports the outcome.
pub async fn send_snapshot(ctx: SendContext, req: SendRequest) {
    let to = req.to;
    let started = Instant::now();
    let r = send_inner(&ctx, req).await;
    let sent = match r {
        Ok(bytes) => {
            tracing::info!(peer = to.0, bytes, ms = started.elapsed().as_millis() as u64, "snapshot sent");
            if bytes > 0 {
                metrics::counter!("cairn_snapshot_sent_total").increment(1);
            }
            Some(bytes)
        }
        Err(e) => {
            tracing::warn!(peer = to.0, error = %e, "snapshot transfer failed");
            metrics::counter!("cairn_snapshot_send_failures_total").increment(1);
            None
        }
    };
    let _ = ctx.done.send((to, sent)).await;
}

/// Fails when a membership change was applied after `min_index`, the
/// snapshot index a transfer was asked for. The transfer's hello carries the
/// membership as of that request, which is then stale for a checkpoint made
/// since (a dial may wait seconds for the follower): the follower would
/// install the state with an older membership, and never replay the change,
/// which lies below the checkpoint's index. Raft asks again, with the new
/// membership. (`conf_index` is raised before a change is handed to apply,
/// so a checkpoint that holds a change sees it here.)
fn membership_unchanged(conf_index: &AtomicU64, min_index: LogIndex) -> Result<(), String> {
    let at = conf_index.load(Ordering::Acquire);
    if at > min_index.0 {
        return Err(format!(
            "a membership change at {at} was applied after the snapshot index {} asked for; Raft asks again",
            min_index.0
        ));
    }
    Ok(())
}

/// One attempt to reach a follower for a snapshot (a handshake on loopback
/// or a LAN takes a few ms; on a loaded machine, tens).
const DIAL_ATTEMPT: Duration = Duration::from_millis(500);

/// The pause between two attempts to reach a follower (cut short when it
/// connects to this node).
const DIAL_PAUSE: Duration = Duration::from_millis(50);

/// Frames between a snapshot sender and the task writing its stream (each
/// at most a chunk, 1 MiB by default; the sender's window bounds the rest).
const SEND_QUEUE_FRAMES: usize = 4;

/// A task stopped when its handle goes (a sender that fails stops its writer).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Appends `bytes` read from a transfer stream to `inbuf` and hands every
/// whole frame in it to `each`, keeping the start of a partial one.
fn take_frames(
    inbuf: &mut Vec<u8>,
    bytes: &[u8],
    body_max: usize,
    mut each: impl FnMut(Frame),
) -> Result<(), cairn_snapshot_transfer::FrameError> {
    inbuf.extend_from_slice(bytes);
    let mut used_total = 0;
    let r = loop {
        match Frame::decode(&inbuf[used_total..], body_max) {
            Ok(Some((f, used))) => {
                used_total += used;
                each(f);
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    inbuf.drain(..used_total);
    r
}

/// Where a snapshot sender's time went, for its log line.
#[derive(Debug, Default)]
struct SendProfile {
    /// Reading the checkpoint's files.
    read: Duration,
    /// Checksumming, compressing and framing chunks.
    frame: Duration,
    /// Waiting for room in the writer's queue (the connection's flow control).
    queue_full: Duration,
    /// Waiting for the follower's acknowledgements (the window is full).
    waiting: Duration,
}

/// Writes the frames of `rx` to `send`, then ends the stream (TLS's
/// close_notify and TCP's FIN).
async fn write_frames(mut send: impl AsyncWrite + Unpin, mut rx: mpsc::Receiver<bytes::Bytes>) -> Result<(), String> {
    while let Some(b) = rx.recv().await {
        send.write_all(&b).await.map_err(|e| format!("writing to the follower: {e}"))?;
    }
    send.shutdown().await.map_err(|e| format!("ending the stream to the follower: {e}"))
}

/// A snapshot connection to a follower: TLS over TCP.
type SnapshotStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// How long a snapshot connection may hold data sent and not acknowledged
/// by the other end before it is dropped (Linux's `TCP_USER_TIMEOUT`).
const SNAPSHOT_UNACKED_MAX: Duration = Duration::from_secs(5);

/// The keep-alive of a snapshot connection: a probe after 2 s of quiet, then
/// every second; 3 unanswered end it.
const SNAPSHOT_KEEPALIVE: (Duration, Duration, u32) = (Duration::from_secs(2), Duration::from_secs(1), 3);

/// Sets a snapshot connection's socket options, both ends: no Nagle delay,
/// keep-alive probes and a bound on unacknowledged data. A peer that
/// vanishes (a crashed machine, a partition) sends no reset, and a TCP
/// connection without these would wait for it for ever, holding a transfer
/// slot and a checkpoint on the leader and the staging area on the follower;
/// QUIC's idle timeout (2 s) did this for the peer links.
pub(crate) fn tune_snapshot_socket(tcp: &tokio::net::TcpStream) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let s = socket2::SockRef::from(tcp);
    let (idle, interval, retries) = SNAPSHOT_KEEPALIVE;
    let keepalive = socket2::TcpKeepalive::new().with_time(idle).with_interval(interval);
    #[cfg(target_os = "linux")]
    let keepalive = keepalive.with_retries(retries);
    #[cfg(not(target_os = "linux"))]
    let _ = retries;
    s.set_tcp_keepalive(&keepalive)?;
    #[cfg(target_os = "linux")]
    s.set_tcp_user_timeout(Some(SNAPSHOT_UNACKED_MAX))?;
    Ok(())
}

/// Dials follower `to` at `addr` for a snapshot transfer: TCP to the port
/// number of its QUIC endpoint, then mutual TLS, the follower's certificate
/// checked against node `to`'s name; all within `timeout`.
async fn dial_snapshot(
    tls: &Arc<rustls::ClientConfig>,
    to: NodeId,
    addr: &str,
    timeout: Duration,
) -> Result<SnapshotStream, String> {
    let name = rustls_pki_types::ServerName::try_from(crate::tls::node_dns_name(to.0)).map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(tls.clone());
    let dial = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connecting to {addr}: {e}"))?;
        tune_snapshot_socket(&tcp).map_err(|e| format!("setting up the connection to {addr}: {e}"))?;
        connector.connect(name, tcp).await.map_err(|e| format!("TLS with {addr}: {e}"))
    };
    tokio::time::timeout(timeout, dial).await.map_err(|_| format!("connecting to {addr} timed out"))?
}

/// Bytes a snapshot stream's reader takes from the connection at once.
const READ_BUFFER_BYTES: usize = 64 << 10;

async fn send_inner(ctx: &SendContext, req: SendRequest) -> Result<u64, String> {
    let addr = (ctx.addr_of)(req.to).ok_or_else(|| format!("no address known for node {}", req.to.0))?;
    // Attempts again and again for up to 5 s: a follower that was down is
    // served as soon as it listens again. A stopped node refuses a TCP
    // connection at once; the pause between attempts is cut short when the
    // follower connects to this node (a restarted node dials its peers at once).
    let give_up = Instant::now() + Duration::from_secs(5);
    let arrived = ctx.arrivals.of_snapshots(req.to.0);
    let stream = loop {
        match dial_snapshot(&ctx.tls, req.to, &addr, DIAL_ATTEMPT).await {
            Ok(s) => break s,
            Err(e) if Instant::now() >= give_up => return Err(e),
            Err(e) => {
                tracing::debug!(peer = req.to.0, error = %e, "snapshot dial failed; trying again");
                tokio::select! {
                    _ = arrived.notified() => {}
                    _ = tokio::time::sleep(DIAL_PAUSE) => {}
                }
            }
        }
    };
    let (mut recv, mut send) = tokio::io::split(stream);
    let hello = SnapshotHello { cluster_id: ctx.cluster_id, from: ctx.me, to: req.to, term: req.term, conf: req.conf };
    let hb = frame::encode(&hello).map_err(|e| e.to_string())?;
    send.write_all(&hb).await.map_err(|e| format!("writing to the follower: {e}"))?;
    let ack = tokio::time::timeout(ctx.transfer.stall_timeout, frame::read::<SnapshotAck>(&mut recv, HELLO_BYTES_MAX))
        .await
        .map_err(|_| "the follower did not answer the snapshot hello".to_string())?
        .map_err(|e| format!("the follower's answer: {e}"))?;
    if ack.holds(req.min_index) {
        tracing::info!(
            peer = req.to.0,
            min_index = req.min_index.0,
            durable = ?ack.durable,
            pending = ?ack.pending,
            "the follower holds a state at or past the index asked for; nothing to send"
        );
        return Ok(0);
    }
    let checkpoints = ctx.checkpoints.clone();
    let min = req.min_index;
    let after = ack.durable.map(|(i, t)| cairn_lsm::Marker::new(i, t));
    let try_delta = ctx.deltas && ack.accepts_delta;
    let ckpt = tokio::task::spawn_blocking(move || -> Result<Arc<Checkpoint>, String> {
        if try_delta && let Some(d) = checkpoints.get_delta(after)?.filter(|d| d.index >= min) {
            return Ok(d);
        }
        checkpoints.get(min)
    })
    .await
    .map_err(|e| format!("the checkpoint task failed: {e}"))??;
    membership_unchanged(&ctx.conf_index, req.min_index)?;
    if ckpt.delta {
        tracing::info!(peer = req.to.0, index = ckpt.index.0, files = ckpt.files.len(), "sending a delta");
    }
    let transfer_id = rand::random::<u64>();
    let (ckpt2, idx, term) = (ckpt.clone(), ckpt.index.0, ckpt.term.0);
    let (mut source, manifest) = tokio::task::spawn_blocking(move || {
        Source::open_known(&cairn_snapshot_transfer::StdFs, &ckpt2.files, idx, term, transfer_id)
    })
    .await
    .map_err(|e| format!("the checkpoint task failed: {e}"))?
    .map_err(|e| format!("reading the checkpoint: {e}"))?;
    let total = manifest.total_bytes();
    let cfg = ctx.transfer.clone();
    let body_max = cfg.frame_body_bytes_max();
    let mut tx = Sender::new(cfg.clone(), manifest, Instant::now());
    // The stream is written by a task of its own, so that reading and
    // framing the next chunk overlaps with QUIC sending this one; the queue
    // between them holds at most `SEND_QUEUE_FRAMES` frames.
    let (wtx, wrx) = mpsc::channel::<bytes::Bytes>(SEND_QUEUE_FRAMES);
    let mut writer = AbortOnDrop(tokio::spawn(write_frames(send, wrx)));
    let mut pending: Option<bytes::Bytes> = None;
    let mut inbuf: Vec<u8> = Vec::new();
    let mut rbuf = vec![0u8; READ_BUFFER_BYTES];
    let mut prof = SendProfile::default();
    loop {
        match tx.poll_event() {
            Some(SenderEvent::Completed) => break,
            Some(SenderEvent::Failed(why)) => return Err(why),
            None => {}
        }
        if pending.is_none() {
            if let Some(f) = tx.poll_frame() {
                let mut out = Vec::new();
                f.encode(&mut out);
                pending = Some(out.into());
                continue;
            }
            // Reads are small (a chunk) and local: done in place, and the
            // chunk checksummed (and compressed) from the read buffer.
            if let Some(r) = tx.poll_read(Instant::now()) {
                tokio::task::block_in_place(|| {
                    let t = Instant::now();
                    let data = source.read(&r).map_err(|e| format!("reading the checkpoint: {e}"))?;
                    prof.read += t.elapsed();
                    let t = Instant::now();
                    tx.handle_read(r, data);
                    prof.frame += t.elapsed();
                    Ok::<_, String>(())
                })?;
                continue;
            }
        }
        let wait = tx.poll_timeout().map_or(cfg.stall_timeout, |t| t.saturating_duration_since(Instant::now()));
        let t = Instant::now();
        tokio::select! {
            permit = wtx.reserve(), if pending.is_some() => {
                // A closed queue means the writer stopped: its error comes below.
                if let (Ok(p), Some(b)) = (permit, pending.take()) {
                    p.send(b);
                }
                prof.queue_full += t.elapsed();
            }
            n = recv.read(&mut rbuf) => {
                let n = n.map_err(|e| format!("reading from the follower: {e}"))?;
                if n == 0 {
                    return Err("the follower closed the stream".into());
                }
                take_frames(&mut inbuf, &rbuf[..n], body_max, |f| tx.handle_frame(f, Instant::now()))
                    .map_err(|e| format!("a malformed frame from the follower: {e}"))?;
                prof.waiting += t.elapsed();
            }
            r = &mut writer.0 => {
                return Err(r.map_err(|e| format!("the snapshot writer failed: {e}"))?.err().unwrap_or_else(|| "the snapshot writer stopped".into()));
            }
            _ = tokio::time::sleep(wait.max(Duration::from_millis(1))) => {
                tx.handle_timeout(Instant::now());
                prof.waiting += t.elapsed();
            }
        }
    }
    drop(wtx);
    (&mut writer.0).await.map_err(|e| format!("the snapshot writer failed: {e}"))??;
    // The stream is ended; the follower ends its side once it has read it
    // all (at most 2 s is given). Closing first could reset the connection
    // under its last frames.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while matches!(recv.read(&mut rbuf).await, Ok(n) if n > 0) {}
    })
    .await;
    drop(ckpt);
    tracing::info!(
        peer = req.to.0,
        read_ms = prof.read.as_millis() as u64,
        frame_ms = prof.frame.as_millis() as u64,
        queue_full_ms = prof.queue_full.as_millis() as u64,
        waiting_ms = prof.waiting.as_millis() as u64,
        wire_bytes = tx.stats().wire_bytes_sent,
        "snapshot stream done"
    );
    Ok(total)
}

/// The receiving side's shared state: one staging area, used by one
/// transfer at a time, and the checkpoints received and not yet installed.
#[derive(Debug)]
pub struct ReceiveState {
    staging: Arc<tokio::sync::Mutex<Staging>>,
    received: Mutex<Vec<Completed>>,
    /// The newest checkpoint taken for install (an install either completes
    /// or stops the node), so that a leader asking again while it runs is
    /// told the follower has it.
    taken: Mutex<Option<(u64, u64)>>,
    transfer: TransferConfig,
    /// A delta failed its checks here (or deltas are off): ask for full
    /// checkpoints until one is received.
    refuse_deltas: std::sync::atomic::AtomicBool,
    deltas: bool,
    /// Test switch: the staging worker waits this long before it hands a
    /// completed checkpoint over (see `TestSwitches::snapshot_handoff_delay_ms`).
    pub handoff_delay_for_tests: Option<Duration>,
}

impl ReceiveState {
    /// Staging under `data_dir/staging`; files found by content in the
    /// live state's tables are linked, not received. `deltas`: accept deltas.
    pub fn new(data_dir: &Path, transfer: TransferConfig, deltas: bool) -> ReceiveState {
        let staging = Staging::new(Arc::new(cairn_snapshot_transfer::StdFs), data_dir.join(STAGING_DIR), Vec::new());
        ReceiveState {
            staging: Arc::new(tokio::sync::Mutex::new(staging)),
            received: Mutex::new(Vec::new()),
            taken: Mutex::new(None),
            transfer,
            refuse_deltas: std::sync::atomic::AtomicBool::new(!deltas),
            deltas,
            handoff_delay_for_tests: None,
        }
    }

    /// Takes the received checkpoint at (`index`, `term`), dropping older ones.
    pub fn take(&self, index: LogIndex, term: Term) -> Option<Completed> {
        let mut r = self.received.lock().unwrap_or_else(|e| e.into_inner());
        let pos = r.iter().position(|c| c.manifest.index == index.0 && c.manifest.term == term.0)?;
        let c = r.swap_remove(pos);
        r.retain(|o| o.manifest.index > index.0);
        let mut t = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        *t = (*t).max(Some((index.0, term.0)));
        Some(c)
    }

    /// The newest checkpoint received in full and not installed yet: waiting
    /// in `received`, or taken and being installed.
    fn pending(&self) -> Option<(u64, u64)> {
        let waiting = self
            .received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|c| (c.manifest.index, c.manifest.term))
            .max();
        waiting.max(*self.taken.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// How often a receiver with a persist running and no frame arriving looks
/// whether the persist ended.
const PERSIST_POLL: Duration = Duration::from_millis(1);

/// Receives a checkpoint on a connection the leader `from` opened; once it
/// is staged and verified, steps Raft's snapshot message in through `inbound`.
pub async fn receive_snapshot(
    mut send: impl AsyncWrite + Unpin,
    mut recv: impl AsyncRead + Unpin,
    from: u64,
    svc: crate::peer::PeerService,
) -> Result<(), String> {
    let crate::peer::PeerService { cluster_id, me, inbound, snapshots: state, db, .. } = svc;
    let hello =
        tokio::time::timeout(state.transfer.stall_timeout, frame::read::<SnapshotHello>(&mut recv, HELLO_BYTES_MAX))
            .await
            .map_err(|_| "the leader sent no hello".to_string())?
            .map_err(|e| e.to_string())?;
    if hello.cluster_id != cluster_id || hello.from.0 != from || hello.to != me {
        return Err(format!(
            "a snapshot stream claims cluster {:016x}, from {}, to {} over node {from}'s connection",
            hello.cluster_id, hello.from.0, hello.to.0
        ));
    }
    let mut staging = state.staging.clone().lock_owned().await;
    let live = db.get();
    let reference = live.dir().join("tables");
    let pending = state.pending();
    let ack = SnapshotAck {
        durable: live.durable_marker().map(|m| (m.index, m.term)),
        accepts_delta: !state.refuse_deltas.load(Ordering::Relaxed),
        pending,
    };
    drop(live);
    tracing::info!(
        peer = from,
        durable = ?ack.durable,
        pending = ?ack.pending,
        accepts_delta = ack.accepts_delta,
        "a snapshot is coming"
    );
    let ab = frame::encode(&ack).map_err(|e| e.to_string())?;
    send.write_all(&ab).await.map_err(|e| format!("answering the leader: {e}"))?;
    staging.set_reference_dirs(vec![reference]);
    let cfg = state.transfer.clone();
    let body_max = cfg.frame_body_bytes_max();
    // The chunks are checked, decompressed and written by a thread of its own
    // while this task goes on reading the stream; bounded queues each way.
    let (ftx, frx) = mpsc::channel::<Frame>(RECEIVE_QUEUE_FRAMES);
    let (otx, mut orx) = mpsc::channel::<Staged>(RECEIVE_QUEUE_FRAMES);
    let delay = state.handoff_delay_for_tests;
    let mut worker = tokio::task::spawn_blocking(move || stage_frames(staging, Receiver::new(cfg), frx, otx, delay));
    let mut decoded: VecDeque<Frame> = VecDeque::new();
    let mut inbuf: Vec<u8> = Vec::new();
    let mut rbuf = vec![0u8; READ_BUFFER_BYTES];
    let (mut recv_wait, mut bytes_in) = (Duration::ZERO, 0u64);
    loop {
        let t = Instant::now();
        tokio::select! {
            permit = ftx.reserve(), if !decoded.is_empty() => {
                // A closed queue means the worker stopped: its outcome comes through `orx`.
                if let (Ok(p), Some(f)) = (permit, decoded.pop_front()) {
                    p.send(f);
                }
            }
            n = recv.read(&mut rbuf), if decoded.is_empty() => {
                let n = n.map_err(|e| format!("the leader's stream broke: {e}"))?;
                if n == 0 {
                    break;
                }
                recv_wait += t.elapsed();
                bytes_in += n as u64;
                take_frames(&mut inbuf, &rbuf[..n], body_max, |f| decoded.push_back(f))
                    .map_err(|e| format!("a malformed frame: {e}"))?;
            }
            staged = orx.recv() => match staged {
                Some(Staged::Send(out)) => {
                    send.write_all(&out).await.map_err(|e| format!("answering the leader: {e}"))?;
                }
                Some(Staged::Completed(c, prof)) => {
                    tracing::info!(
                        peer = from,
                        recv_wait_ms = recv_wait.as_millis() as u64,
                        bytes_in,
                        stage_ms = prof.stage.as_millis() as u64,
                        worker_idle_ms = prof.idle.as_millis() as u64,
                        "snapshot stream received"
                    );
                    let (index, term) = (LogIndex(c.manifest.index), Term(c.manifest.term));
                    if is_delta(&c) {
                        let live = db.get();
                        if live.durable_marker().is_some_and(|m| (m.index, m.term) >= (index.0, term.0)) {
                            // The state passed the delta meanwhile (it caught up from the log): nothing to do.
                            tracing::info!(index = index.0, "a delta arrived after the state passed it; dropped");
                            remove_staged(&c.dir);
                            continue;
                        }
                        if let Err(e) = tokio::task::block_in_place(|| check_delta(&live, &c)) {
                            state.refuse_deltas.store(true, Ordering::Relaxed);
                            remove_staged(&c.dir);
                            return Err(format!("a delta at {} this state cannot use: {e}", index.0));
                        }
                    } else {
                        state.refuse_deltas.store(!state.deltas, Ordering::Relaxed);
                    }
                    tracing::info!(index = index.0, term = term.0, bytes = c.manifest.total_bytes(), "snapshot received");
                    metrics::counter!("cairn_snapshot_received_total").increment(1);
                    state.received.lock().unwrap_or_else(|e| e.into_inner()).push(c);
                    let msg = Message {
                        from: hello.from,
                        to: me,
                        term: hello.term,
                        body: Body::Snapshot { index, term, conf: hello.conf.clone() },
                    };
                    if inbound.send(msg).await.is_err() {
                        return Err("the node is stopping".into());
                    }
                }
                // The worker stopped: a staging error (after its refusal went out).
                None => {
                    return (&mut worker).await.map_err(|e| format!("the staging worker failed: {e}"))?;
                }
            },
        }
    }
    // The leader finished the stream: let the worker drain what it has.
    drop(ftx);
    while let Some(staged) = orx.recv().await {
        if let Staged::Send(out) = staged {
            // The leader may be gone already: nothing more to say.
            let _ = send.write_all(&out).await;
        }
    }
    // Our side ends too: the leader waits for it before it lets go.
    let _ = send.shutdown().await;
    worker.await.map_err(|e| format!("the staging worker failed: {e}"))?
}

/// Frames between a snapshot stream's reader and its staging worker, and
/// answers the other way.
const RECEIVE_QUEUE_FRAMES: usize = 8;

/// Where a staging worker's time went.
#[derive(Debug, Default)]
struct StageProfile {
    /// Handling frames: checks, decompression, writes.
    stage: Duration,
    /// Waiting for frames.
    idle: Duration,
}

/// What a staging worker hands back to the stream's task.
enum Staged {
    /// Encoded frames for the leader.
    Send(Vec<u8>),
    /// A checkpoint received whole.
    Completed(Completed, StageProfile),
}

/// The staging worker: feeds each frame to `rx`, carries out its actions
/// in `staging` and hands back the answers and every completed checkpoint.
/// While a persist runs in the background it also wakes without a frame, so
/// that its acknowledgements go out as soon as it ends. Ends when the frames
/// end or the stream's task is gone.
fn stage_frames(
    mut staging: tokio::sync::OwnedMutexGuard<Staging>,
    mut rx: Receiver,
    mut frames: mpsc::Receiver<Frame>,
    answers: mpsc::Sender<Staged>,
    handoff_delay: Option<Duration>,
) -> Result<(), String> {
    let rt = tokio::runtime::Handle::current();
    let mut prof = StageProfile::default();
    staging.set_background_persist(true);
    loop {
        let t = Instant::now();
        let frame = if staging.persist_pending() {
            match rt.block_on(tokio::time::timeout(PERSIST_POLL, frames.recv())) {
                Ok(None) => return Ok(()),
                Ok(f) => f,
                Err(_) => None,
            }
        } else {
            match frames.blocking_recv() {
                None => return Ok(()),
                f => f,
            }
        };
        prof.idle += t.elapsed();
        let t = Instant::now();
        let mut out = Vec::new();
        if let Some(f) = frame {
            rx.handle_frame(f);
        }
        // Also the acknowledgements of a persist that ended meanwhile.
        let r = staging.drive(&mut rx, &mut |f| f.encode(&mut out)).map_err(|e| format!("staging: {e}"));
        prof.stage += t.elapsed();
        // A completed checkpoint goes to the stream's task before the
        // acknowledgement that tells the leader it arrived: once told, the
        // leader closes the connection, and a task that saw the close first
        // ended without the checkpoint (the leader then sent it all again).
        if r.is_ok()
            && let Some(c) = staging.take_completed()
        {
            if let Some(d) = handoff_delay {
                std::thread::sleep(d);
            }
            if answers.blocking_send(Staged::Completed(c, std::mem::take(&mut prof))).is_err() {
                return Ok(());
            }
        }
        if !out.is_empty() && answers.blocking_send(Staged::Send(out)).is_err() {
            return Ok(());
        }
        r?;
    }
}

/// Whether a received file set is a delta.
pub fn is_delta(c: &Completed) -> bool {
    c.manifest.files.iter().any(|f| f.name.strip_prefix(DELTA_PREFIX) == Some(cairn_lsm::DELTA_FILE))
}

/// A received delta: its description, its tables' paths and its blob files' paths.
fn read_delta(c: &Completed) -> Result<(cairn_lsm::Delta, Vec<PathBuf>, Vec<PathBuf>), String> {
    let p = c.dir.join(format!("{DELTA_PREFIX}{}", cairn_lsm::DELTA_FILE));
    let bytes = std::fs::read(&p).map_err(|e| io_err("reading", &p, e))?;
    let delta = cairn_lsm::Delta::decode(&bytes).map_err(|e| e.to_string())?;
    if (delta.marker.index, delta.marker.term) != (c.manifest.index, c.manifest.term) {
        return Err(format!(
            "the delta leads to ({}, {}), the transfer says ({}, {})",
            delta.marker.index, delta.marker.term, c.manifest.index, c.manifest.term
        ));
    }
    let path_of = |file: &str| {
        let name = format!("{DELTA_PREFIX}{file}");
        if !c.manifest.files.iter().any(|f| f.name == name) {
            return Err(format!("the delta lists {file} and the transfer does not hold it"));
        }
        Ok(c.dir.join(name))
    };
    let paths = delta.tables.iter().map(|t| path_of(&t.file)).collect::<Result<Vec<_>, _>>()?;
    let blob_paths = delta.blob_files.iter().map(|f| path_of(f)).collect::<Result<Vec<_>, _>>()?;
    if c.manifest.files.len() != paths.len() + blob_paths.len() + 1 {
        return Err("the transfer holds files the delta does not list".into());
    }
    Ok((delta, paths, blob_paths))
}

/// Checks a received delta against the live state (changing nothing).
fn check_delta(db: &Db, c: &Completed) -> Result<(), String> {
    let (delta, paths, blob_paths) = read_delta(c)?;
    db.check_delta(&delta, &paths, &blob_paths).map_err(|e| e.to_string())
}

/// Installs a received delta into the live state `db`: its tables are
/// ingested above the local data and the durable marker set to the
/// snapshot's, in one manifest edit (the memtables, whose writes lie inside
/// the delta, are dropped). The caller then writes the log's snapshot marker.
pub fn install_delta(db: &Db, c: &Completed) -> Result<(), String> {
    let (delta, paths, blob_paths) = read_delta(c)?;
    db.ingest_delta(&delta, &paths, &blob_paths).map_err(|e| e.to_string())?;
    remove_staged(&c.dir);
    Ok(())
}

/// Removes a received file set from the staging area (a failure is only logged:
/// the next start clears what is left).
fn remove_staged(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a staging directory");
    }
}

/// Installs a received checkpoint as the live state: its files are linked
/// into a new state directory, which is opened and checked against the
/// snapshot, then published through the pointer file. Returns the new
/// state. The caller swaps it in and writes the log's snapshot marker.
pub fn install(
    fs: &NodeFs,
    data_dir: &Path,
    c: &Completed,
    opts: &Options,
    failpoints: &crate::failpoint::Failpoints,
) -> Result<(String, Db), String> {
    let (index, term) = (c.manifest.index, c.manifest.term);
    let name = format!("state-{index:016x}-{term:016x}");
    let dest = data_dir.join(&name);
    if fs.exists(&dest).map_err(|e| fs_err("checking", &dest, e))? {
        remove_tree(&**fs, &dest).map_err(|e| fs_err("removing", &dest, e))?;
    }
    for sub in ["tables", "manifest"] {
        let d = dest.join(sub);
        fs.create_dir_all(&d).map_err(|e| fs_err("creating", &d, e))?;
    }
    for f in &c.manifest.files {
        let rel = local_path(&f.name).ok_or_else(|| format!("the checkpoint holds an unknown file `{}`", f.name))?;
        let (src, dst) = (c.dir.join(&f.name), dest.join(rel));
        fs.hard_link(&src, &dst).map_err(|e| fs_err("placing", &dst, e))?;
    }
    for d in [dest.join("tables"), dest.join("manifest"), dest.clone(), data_dir.to_path_buf()] {
        fs.sync_dir(&d).map_err(|e| fs_err("fsync directory", &d, e))?;
    }
    failpoints.hit("install-linked");
    let mut o = opts.clone();
    o.create_if_missing = false;
    let db = Db::open_with_fs(fs.clone(), &dest, o).map_err(|e| format!("opening the received state: {e}"))?;
    match db.durable_marker() {
        Some(m) if m.index == index && m.term == term => {}
        other => {
            return Err(format!("the received state's marker is {other:?}, not the snapshot's ({index}, {term})"));
        }
    }
    publish_state_dir(&**fs, data_dir, &name)?;
    failpoints.hit("install-published");
    if let Err(e) = remove_tree(&**fs, &c.dir) {
        tracing::warn!(dir = %c.dir.display(), error = %e, "cannot remove a staging directory");
    }
    Ok((name, db))
}

/// Largest header frame of a snapshot file.
const SNAPSHOT_HEADER_BYTES_MAX: usize = 64 << 20;

/// Creates a node's data directory from a snapshot file saved with
/// `Client::snapshot_save` (`kv snapshot save`): the state from the file's
/// bytes, each checked against its checksum, and a log that starts after
/// the snapshot. The directory must hold no node's data yet. The node then
/// starts with `--join` (a new member) and catches up from the leader.
pub fn restore(cfg: &crate::config::Config, file: &Path) -> Result<cairn_kv_client::protocol::SnapshotHeader, String> {
    use std::io::{Read, Write};
    let data_dir = &cfg.data_dir;
    if data_dir.join("raft").exists() || live_state_dir(&cairn_wal::StdFs, data_dir)?.exists() {
        return Err(format!(
            "{} already holds a node's data; restore creates a new one and needs an empty directory",
            data_dir.display()
        ));
    }
    let mut f = std::io::BufReader::new(std::fs::File::open(file).map_err(|e| io_err("opening", file, e))?);
    let mut head = [0u8; frame::HEADER_BYTES];
    f.read_exact(&mut head).map_err(|e| format!("{} is not a snapshot file: {e}", file.display()))?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len > SNAPSHOT_HEADER_BYTES_MAX {
        return Err(format!("{} is not a snapshot file (a header of {len} bytes)", file.display()));
    }
    let mut whole = head.to_vec();
    whole.resize(frame::HEADER_BYTES + len, 0);
    f.read_exact(&mut whole[frame::HEADER_BYTES..])
        .map_err(|e| format!("{} ends inside its header: {e}", file.display()))?;
    let header = match frame::decode_frame::<cairn_kv_client::protocol::Response>(&whole, SNAPSHOT_HEADER_BYTES_MAX) {
        Ok(cairn_kv_client::protocol::Response::SnapshotHeader(h)) => h,
        Ok(_) => return Err(format!("{} is not a snapshot file", file.display())),
        Err(e) => return Err(format!("{} is not a snapshot file: {e}", file.display())),
    };
    let cluster_id = cfg.cluster_id();
    if header.cluster_id != cluster_id {
        return Err(format!(
            "the snapshot is of cluster {:016x}, this configuration names cluster {cluster_id:016x} \
             (the same --cluster-name and --initial-cluster as the cluster's members are needed)",
            header.cluster_id
        ));
    }
    create_dir_durably(&cairn_wal::StdFs, data_dir)?;
    let name = format!("state-{:016x}-{:016x}", header.index, header.term);
    let dest = data_dir.join(&name);
    for sub in ["tables", "manifest"] {
        let d = dest.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| io_err("creating", &d, e))?;
    }
    let mut buf = vec![0u8; 1 << 20];
    for meta in &header.files {
        let rel =
            local_path(&meta.name).ok_or_else(|| format!("the snapshot holds an unknown file `{}`", meta.name))?;
        let path = dest.join(rel);
        let mut out = std::fs::File::create(&path).map_err(|e| io_err("creating", &path, e))?;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut left = meta.len;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            f.read_exact(&mut buf[..want]).map_err(|e| format!("{} ends inside {}: {e}", file.display(), meta.name))?;
            h.update(&buf[..want]);
            out.write_all(&buf[..want]).map_err(|e| io_err("writing", &path, e))?;
            left -= want as u64;
        }
        if h.digest() != meta.checksum {
            return Err(format!("{} in {} is damaged (checksum mismatch)", meta.name, file.display()));
        }
        out.sync_all().map_err(|e| io_err("fsync", &path, e))?;
    }
    if f.read(&mut buf[..1]).map_err(|e| io_err("reading", file, e))? != 0 {
        return Err(format!("{} holds bytes after its last file", file.display()));
    }
    for d in [dest.join("tables"), dest.join("manifest"), dest.clone(), data_dir.to_path_buf()] {
        cairn_wal::Fs::sync_dir(&cairn_wal::StdFs, &d).map_err(|e| fs_err("fsync directory", &d, e))?;
    }
    let mut o = Options::default();
    o.durability = cairn_lsm::DurabilityMode::Embedded;
    o.create_if_missing = false;
    let db = Db::open(&dest, o).map_err(|e| format!("opening the restored state: {e}"))?;
    let marker = db.durable_marker();
    db.close().map_err(|e| format!("closing the restored state: {e}"))?;
    if marker.map(|m| (m.index, m.term)) != Some((header.index, header.term)) {
        return Err(format!(
            "the restored state's marker is {marker:?}, not the header's ({}, {})",
            header.index, header.term
        ));
    }
    publish_state_dir(&cairn_wal::StdFs, data_dir, &name)?;
    let identity = crate::storage::NodeIdentity { node_id: cfg.id, cluster_id };
    let fs: Arc<dyn cairn_wal::Fs> = Arc::new(cairn_wal::StdFs);
    let mut store =
        crate::storage::WalStore::open(fs, &data_dir.join("raft"), identity, cfg.wal_segment_bytes, 1 << 20)
            .map_err(|e| format!("creating the log: {e}"))?;
    let conf = ConfState {
        voters: header.voters.iter().map(|i| NodeId(*i)).collect(),
        learners: header.learners.iter().map(|i| NodeId(*i)).collect(),
        ..ConfState::default()
    };
    store
        .repair_to_state(LogIndex(header.index), Term(header.term), conf)
        .map_err(|e| format!("writing the log's snapshot marker: {e}"))?;
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_holding_the_index_gets_nothing_sent() {
        let ack = |durable, pending| SnapshotAck { durable, accepts_delta: true, pending };
        assert!(!ack(None, None).holds(LogIndex(1)));
        assert!(!ack(Some((99, 1)), None).holds(LogIndex(100)), "behind: send");
        assert!(ack(Some((100, 1)), None).holds(LogIndex(100)), "installed already");
        assert!(ack(Some((3, 1)), Some((120, 2))).holds(LogIndex(100)), "received, installing");
        assert!(!ack(Some((3, 1)), Some((80, 2))).holds(LogIndex(100)), "received an older one: send");
    }

    #[test]
    fn a_membership_change_after_the_index_asked_for_stops_the_transfer() {
        let conf_index = AtomicU64::new(40);
        assert!(membership_unchanged(&conf_index, LogIndex(40)).is_ok(), "the change is inside the snapshot");
        assert!(membership_unchanged(&conf_index, LogIndex(100)).is_ok());
        conf_index.fetch_max(101, Ordering::AcqRel);
        let e = membership_unchanged(&conf_index, LogIndex(100)).expect_err("applied after the index");
        assert!(e.contains("101") && e.contains("100"), "{e}");
    }

    #[test]
    fn checkpoint_paths_travel_flat_and_come_back() {
        for rel in ["tables/0000000000000001.sst", "manifest/00000001-0000000000000000.log"] {
            let name = wire_name(Path::new(rel)).expect("a known file");
            assert!(!name.contains('/'));
            assert_eq!(local_path(&name).as_deref(), Some(Path::new(rel)));
        }
        assert_eq!(wire_name(Path::new("LOCK")), None);
        assert_eq!(wire_name(Path::new("other/x")), None);
        assert_eq!(local_path("table."), None);
        assert_eq!(local_path("table.."), None);
        assert_eq!(local_path("x.y"), None);
    }

    #[test]
    fn the_pointer_names_the_live_state_and_unused_ones_are_removed() {
        let d = tempfile::tempdir().expect("tempdir");
        let fs = cairn_wal::StdFs;
        assert_eq!(live_state_dir(&fs, d.path()).expect("default"), d.path().join(FIRST_STATE_DIR));
        std::fs::create_dir_all(d.path().join(FIRST_STATE_DIR)).expect("mkdir");
        std::fs::create_dir_all(d.path().join("state-1-1")).expect("mkdir");
        std::fs::create_dir_all(d.path().join("raft")).expect("mkdir");
        publish_state_dir(&fs, d.path(), "state-1-1").expect("publish");
        let live = live_state_dir(&fs, d.path()).expect("live");
        assert_eq!(live, d.path().join("state-1-1"));
        remove_unused(&fs, d.path(), &live).expect("clean");
        assert!(!d.path().join(FIRST_STATE_DIR).exists());
        assert!(live.exists() && d.path().join("raft").exists());
        std::fs::write(d.path().join(POINTER_FILE), "../elsewhere").expect("write");
        assert!(live_state_dir(&fs, d.path()).is_err());
    }

    /// A snapshot connection notices a peer that vanished without a reset:
    /// keep-alive probes, and (Linux) a bound on unacknowledged data. Only
    /// the options are checked here; dropping a live peer's packets needs a
    /// firewall rule a test cannot set.
    #[tokio::test]
    async fn snapshot_sockets_probe_and_bound_unacknowledged_data() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listen");
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let s = socket2::SockRef::from(&tcp);
        assert!(!s.keepalive().expect("keepalive"), "keep-alive is on before the options are set");
        tune_snapshot_socket(&tcp).expect("tune");
        assert!(tcp.nodelay().expect("nodelay"));
        assert!(s.keepalive().expect("keepalive"));
        assert_eq!(s.tcp_keepalive_time().expect("time"), SNAPSHOT_KEEPALIVE.0);
        #[cfg(target_os = "linux")]
        {
            assert_eq!(s.tcp_keepalive_interval().expect("interval"), SNAPSHOT_KEEPALIVE.1);
            assert_eq!(s.tcp_keepalive_retries().expect("retries"), SNAPSHOT_KEEPALIVE.2);
            assert_eq!(s.tcp_user_timeout().expect("user timeout"), Some(SNAPSHOT_UNACKED_MAX));
        }
    }
}
