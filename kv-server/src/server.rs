//! Starting a node: open the state and the log (recovery), start the WAL
//! thread, the apply worker, the Raft task and the QUIC endpoint, serve
//! clients, and stop cleanly on SIGTERM or SIGINT.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_kv_client::frame;
use cairn_kv_client::protocol::{Consistency, ErrorCode, Request, Response};
use cairn_lsm::{Db, DurabilityMode, Options};
use cairn_raft_core::{ConfState, LogIndex, LogStore, NodeId, RawNode, Term};
use tokio::sync::{mpsc, oneshot, watch};

use crate::apply::{Applier, ApplyJob, ApplyLimits, InstallSite, check_ops};
use crate::config::Config;
use crate::node::{MemberChange, NodeRequest, NodeTask};
use crate::peer::{self, LinkConfig};
use crate::snapshot::{Checkpoints, ReceiveState, SendContext, SharedDb};
use crate::state::{CONF_KEY, Command, CommandOp, REVISION_KEY, USER_PREFIX, decode_value, user_key};
use crate::storage::{NodeIdentity, WalFaults, WalStore, run_wal_thread};
use crate::tls::{self, NodeTls};

/// A node that could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Bad TLS material.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The log or the state.
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    /// The state engine.
    #[error(transparent)]
    Lsm(#[from] cairn_lsm::Error),
    /// Something else, said in a sentence.
    #[error("{0}")]
    Other(String),
}

/// Largest Hello frame (a token): read before the client is authenticated.
const HELLO_BYTES_MAX: usize = 4 << 10;

/// What the client handlers share.
struct Ctx {
    /// Client request bytes held at once (`requests_bytes_max`).
    requests: crate::budget::RequestBudget,
    id: u64,
    cluster_id: u64,
    tokens: Vec<String>,
    node: mpsc::Sender<NodeRequest>,
    db: Arc<SharedDb>,
    checkpoints: Arc<Checkpoints>,
    applied: watch::Receiver<u64>,
    apply_jobs: mpsc::Sender<ApplyJob>,
    limits: crate::config::Limits,
    apply_limits: ApplyLimits,
    request_timeout: Duration,
    connections: tokio::sync::Semaphore,
    book: crate::state::SharedBook,
    /// Test switch: serve linearizable reads from the local state (the seed's bug).
    read_locally_for_tests: bool,
    /// The lessor (keep-alives, time left).
    lessor: mpsc::Sender<crate::lease::LessorRequest>,
    /// Events applied, for watchers.
    watch_tx: tokio::sync::broadcast::Sender<crate::apply::WatchFeed>,
    /// Event bytes published to `watch_tx` so far.
    watch_published: Arc<std::sync::atomic::AtomicU64>,
    /// Watch streams at once.
    watchers: tokio::sync::Semaphore,
    /// Snapshot saves at once (`[snapshot] saves_max`).
    saves: tokio::sync::Semaphore,
    saves_max: usize,
    /// Test switch: watches skip the history (live events only).
    watch_skip_history_for_tests: bool,
}

/// Test switches, read from `CAIRN_TEST_*` variables (never configuration).
#[derive(Clone, Debug, Default)]
pub struct TestSwitches {
    /// `CAIRN_TEST_IGNORE_SESSIONS=1`: apply retried writes again.
    pub ignore_sessions: bool,
    /// `CAIRN_TEST_SKIP_WAL_SYNC=1`: acknowledge log writes without fdatasync.
    pub skip_wal_sync: bool,
    /// `CAIRN_TEST_FAILPOINT=...`: crash points and failing disks (see
    /// [`crate::failpoint`]; `wal-fsync-error:N` and `lsm-fsync-error:N`
    /// make the real fdatasyncs fail from the N-th on: the node must stop).
    pub failpoints: Arc<crate::failpoint::Failpoints>,
    /// `CAIRN_TEST_APPLIED_FROM_LOG=1`: break the recovery rule, taking the
    /// log's commit index as applied instead of the state's durable marker.
    pub applied_from_log: bool,
    /// `CAIRN_TEST_LOCAL_QUOTA=1`: break the disk-full rule, refusing writes
    /// at apply from this node's own disk usage instead of the replicated alarm.
    pub local_quota: bool,
    /// `CAIRN_TEST_MERGE_SNAPSHOTS=1`: break the replace-never-merge rule,
    /// ingesting a full snapshot's tables into the live state.
    pub merge_snapshots: bool,
    /// `CAIRN_TEST_CHECKPOINT_AT_APPLIED=1`: break the checkpoint rule,
    /// labelling checkpoints with the applied index instead of their
    /// durable marker (and sending no deltas).
    pub checkpoint_at_applied: bool,
    /// `CAIRN_TEST_LEASE_NO_GRACE=1`: break the lease rule: a new leader
    /// keeps the deadlines it saw as a follower.
    pub lease_no_grace: bool,
    /// `CAIRN_TEST_WATCH_SKIP_HISTORY=1`: break the watch rule, serving a
    /// watch from the live events only (a resumed watch misses what was
    /// written while it was away).
    pub watch_skip_history: bool,
    /// `CAIRN_TEST_READ_LOCALLY=1`: break the reads rule, serving
    /// linearizable reads from the local state without a read index (a
    /// leader cut off from its followers then answers stale).
    pub read_locally: bool,
    /// `CAIRN_TEST_NO_ARRIVAL_WAKE=1`: the behaviour before the wake-up: an
    /// outbound peer link (or snapshot sender) ignores the peer's own
    /// connection and waits out its backoff and dial, and a node makes its
    /// links on its first message rather than at start (a restarted follower
    /// then waits longer to hear from the leader; with a long backoff and
    /// links made at start, a cluster whose nodes start one after another
    /// would not form).
    pub no_arrival_wake: bool,
    /// `CAIRN_TEST_PEER_BACKOFF_MS=n`: an outbound peer link's backoff
    /// between dials, first and longest, ms (so a test can make it long).
    pub peer_backoff_ms: Option<u64>,
    /// `CAIRN_TEST_PEER_DIAL_MS=n`: an outbound peer link's dial timeout, ms.
    pub peer_dial_ms: Option<u64>,
    /// `CAIRN_TEST_SNAPSHOT_HANDOFF_DELAY_MS=n`: a follower's staging worker
    /// waits this long before it hands a checkpoint received whole to the
    /// node, widening the window in which a leader that was told too early
    /// (before 2026-12-06) closed the connection and the checkpoint was lost.
    pub snapshot_handoff_delay_ms: Option<u64>,
}

impl TestSwitches {
    /// Reads the switches from the environment.
    pub fn from_env() -> TestSwitches {
        let on = |k: &str| std::env::var(k).is_ok_and(|v| v == "1");
        TestSwitches {
            ignore_sessions: on("CAIRN_TEST_IGNORE_SESSIONS"),
            skip_wal_sync: on("CAIRN_TEST_SKIP_WAL_SYNC"),
            applied_from_log: on("CAIRN_TEST_APPLIED_FROM_LOG"),
            local_quota: on("CAIRN_TEST_LOCAL_QUOTA"),
            read_locally: on("CAIRN_TEST_READ_LOCALLY"),
            lease_no_grace: on("CAIRN_TEST_LEASE_NO_GRACE"),
            watch_skip_history: on("CAIRN_TEST_WATCH_SKIP_HISTORY"),
            merge_snapshots: on("CAIRN_TEST_MERGE_SNAPSHOTS"),
            checkpoint_at_applied: on("CAIRN_TEST_CHECKPOINT_AT_APPLIED"),
            no_arrival_wake: on("CAIRN_TEST_NO_ARRIVAL_WAKE"),
            peer_backoff_ms: std::env::var("CAIRN_TEST_PEER_BACKOFF_MS").ok().and_then(|v| v.parse().ok()),
            peer_dial_ms: std::env::var("CAIRN_TEST_PEER_DIAL_MS").ok().and_then(|v| v.parse().ok()),
            snapshot_handoff_delay_ms: std::env::var("CAIRN_TEST_SNAPSHOT_HANDOFF_DELAY_MS")
                .ok()
                .and_then(|v| v.parse().ok()),
            failpoints: crate::failpoint::Failpoints::from_env(),
        }
    }
}

/// The wall clock in ms since the epoch (what the leader writes into entries).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What recovery found: the state, the log, the membership.
#[derive(Debug)]
pub struct Recovered {
    /// The live state.
    pub db: Db,
    /// The log, repaired if an install was cut short.
    pub store: WalStore,
    /// The membership as of the state.
    pub conf: ConfState,
    /// Index of the latest membership change the state holds (0: the initial one).
    pub conf_index: u64,
    /// The state's durable marker A: what raft-core is told is applied.
    pub applied: u64,
    /// Addresses and removed ids, from the state over the initial cluster.
    pub book: crate::state::Book,
    /// How long opening the state took (with its folder's checks).
    pub state_open_time: Duration,
    /// How long opening the log took after that.
    pub log_open_time: Duration,
}

/// Recovery (docs/design/kv-server.md, "Recovery"): opens the live state
/// (durable marker A) and the log, repairs a log behind an installed state,
/// and checks that nothing between them is lost. Everything goes through
/// `site.fs`, so crash tests run it on the simulated disk.
/// `bootstrap_voters` is the initial cluster: the membership of a state that
/// never recorded a change.
pub fn recover(
    site: &InstallSite,
    identity: NodeIdentity,
    wal_segment_bytes: u64,
    entry_cache_bytes: u64,
    bootstrap_voters: &[u64],
) -> Result<Recovered, ServerError> {
    let fs = &site.fs;
    let data_dir = &site.data_dir;
    let started = Instant::now();
    crate::snapshot::create_dir_durably(&**fs, data_dir).map_err(ServerError::Other)?;
    let live = crate::snapshot::live_state_dir(&**fs, data_dir).map_err(ServerError::Other)?;
    crate::snapshot::remove_unused(&**fs, data_dir, &live).map_err(ServerError::Other)?;
    let db = Db::open_with_fs(fs.clone(), &live, site.options.clone())?;
    let state_open_time = started.elapsed();
    let durable = db.durable_marker();
    let applied = durable.map_or(0, |m| m.index);
    let log_started = Instant::now();
    let mut store = WalStore::open(fs.clone(), &data_dir.join("raft"), identity, wal_segment_bytes, entry_cache_bytes)?;
    let log_open_time = log_started.elapsed();
    let (conf, conf_index) = match db.get(CONF_KEY)? {
        Some(b) => (
            frame::decode::<ConfState>(&b)
                .map_err(|e| ServerError::Other(format!("corrupt membership in the state: {e}")))?,
            applied,
        ),
        None => (ConfState::with_voters(bootstrap_voters.iter().map(|i| NodeId(*i))), 0),
    };
    // The repair rule: a state ahead of the log, or holding another term at
    // its marker, comes from an install cut short before its log marker was
    // written; the log then starts after the state's marker.
    if let Some(m) = durable.filter(|m| m.index > 0) {
        let (a, ta) = (LogIndex(m.index), Term(m.term));
        let (snap, snap_term) = store.snapshot();
        let behind = store.last_index() < a;
        let other_term = (a > snap && store.term(a).is_some_and(|t| t != ta)) || (a == snap && snap_term != ta);
        if behind || other_term {
            tracing::warn!(
                state = a.0,
                log_last = store.last_index().0,
                "the state is ahead of the log (an install was cut short): the log now starts after the state"
            );
            store.repair_to_state(a, ta, conf.clone())?;
        }
    }
    if let Some(first) = store.first_index().0.checked_sub(1)
        && first > applied
    {
        return Err(ServerError::Other(format!(
            "the log starts after index {first} but the state holds only up to {applied}: entries in between are lost"
        )));
    }
    let book = crate::state::Book::load(&db, &site.initial)?;
    if book.removed.contains(&identity.node_id) {
        return Err(ServerError::Other(format!(
            "node {} was removed from the cluster and cannot rejoin with its old data; \
             start a new node with a new id and an empty data directory",
            identity.node_id
        )));
    }
    Ok(Recovered { db, store, conf, conf_index, applied, book, state_open_time, log_open_time })
}

/// Runs a node until SIGTERM or SIGINT.
pub async fn run(cfg: Config, switches: TestSwitches) -> Result<(), ServerError> {
    let tls = NodeTls::load(&cfg.tls_ca, &cfg.tls_cert, &cfg.tls_key, cfg.id)?;
    let cluster_id = cfg.cluster_id();
    let identity = NodeIdentity { node_id: cfg.id, cluster_id };

    // Recovery: the state's durable marker A first, then the log.
    let mut opts = Options::default();
    opts.durability = DurabilityMode::Embedded;
    opts.write_buffer_bytes = cfg.memtable_bytes;
    opts.block_cache_bytes = cfg.block_cache_bytes;
    opts.blob_value_bytes_min = (cfg.blob_value_bytes_min > 0).then_some(cfg.blob_value_bytes_min);
    opts.hook = switches.failpoints.lsm_hook();
    let mut initial = cfg.initial_cluster.clone();
    initial.insert(cfg.id, cfg.advertise.clone());
    let fs: crate::snapshot::NodeFs =
        crate::failpoint::FailingFs::wrap(Arc::new(cairn_wal::StdFs), &cfg.data_dir, &switches.failpoints);
    let site = InstallSite {
        fs,
        data_dir: cfg.data_dir.clone(),
        options: opts,
        initial,
        failpoints: switches.failpoints.clone(),
    };
    let Recovered { db, store, conf, conf_index, applied: applied_index, book, state_open_time, log_open_time } =
        recover(
            &site,
            identity,
            cfg.wal_segment_bytes,
            cfg.entry_cache_bytes,
            &cfg.initial_cluster.keys().copied().collect::<Vec<_>>(),
        )?;
    tracing::info!(
        node = cfg.id,
        cluster = format_args!("{cluster_id:016x}"),
        applied = applied_index,
        last = store.last_index().0,
        state_ms = state_open_time.as_millis() as u64,
        log_ms = log_open_time.as_millis() as u64,
        "recovered"
    );
    let wal = store.wal();
    let mut rcfg = cairn_raft_core::Config::new(NodeId(cfg.id), Vec::new(), cfg.id ^ now_ms());
    rcfg.conf = conf;
    rcfg.conf_index = cairn_raft_core::LogIndex(conf_index);
    rcfg.applied = cairn_raft_core::LogIndex(applied_index);
    if switches.applied_from_log {
        rcfg.applied = store.hard_state().commit;
    }
    rcfg.election_ticks = cfg.election_ticks;
    rcfg.heartbeat_ticks = cfg.heartbeat_ticks;
    // A follower further behind than the margin gets a snapshot.
    rcfg.retain_entries_max = cfg.snapshot.release_margin_entries.max(1);
    rcfg.applying_bytes_max = cfg.limits.applying_bytes_max.max(1);
    rcfg.uncommitted_bytes_max = cfg.limits.uncommitted_bytes_max.max(1);
    let raw = RawNode::new(rcfg, store).map_err(|e| ServerError::Other(e.to_string()))?;

    // Threads: the WAL writer and the apply worker.
    let limits = cfg.limits.clone();
    let (wal_tx, wal_rx) = std::sync::mpsc::sync_channel(limits.wal_queue_max);
    let (wal_done_tx, wal_done_rx) = mpsc::channel(limits.wal_queue_max);
    let faults = WalFaults { skip_sync: switches.skip_wal_sync };
    let wal_thread = std::thread::Builder::new()
        .name("cairn-wal".into())
        .spawn(move || run_wal_thread(wal, wal_rx, wal_done_tx, 256, faults))
        .map_err(|e| ServerError::Other(format!("starting the WAL thread: {e}")))?;
    let (applied_tx, applied_rx) = watch::channel(applied_index);
    let waiters = Arc::new(Mutex::new(Default::default()));
    let apply_limits = ApplyLimits::new(&limits, cfg.session_ttl.as_millis() as u64);
    let book: crate::state::SharedBook = Arc::new(std::sync::RwLock::new(book));
    let shared = Arc::new(SharedDb::new(Arc::new(db)));
    // Every replica starts from the built-in limits; the leader's configured
    // ones reach every replica through the log (a new leader proposes them
    // first: `Loop::propose_limits` in node.rs).
    let mut applier =
        Applier::new(shared.clone(), site, book.clone(), applied_tx, waiters.clone(), ApplyLimits::defaults())?;
    applier.ignore_sessions_for_tests = switches.ignore_sessions;
    let (lease_tx, lease_events) = mpsc::channel(1024);
    applier.lease_tx = Some(lease_tx);
    let (watch_tx, _) = tokio::sync::broadcast::channel(limits.watch_buffer_batches.max(1));
    applier.watch_tx = Some(watch_tx.clone());
    let watch_published = applier.watch_published.clone();
    applier.merge_snapshots_for_tests = switches.merge_snapshots;
    let over_quota = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let used_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    if switches.local_quota {
        applier.local_quota_for_tests = Some(over_quota.clone());
    }
    let (apply_tx, apply_rx) = mpsc::channel(limits.apply_queue_max);
    let apply_thread = std::thread::Builder::new()
        .name("cairn-apply".into())
        .spawn(move || applier.run(apply_rx))
        .map_err(|e| ServerError::Other(format!("starting the apply worker: {e}")))?;

    // QUIC.
    let server_cfg = tls.server_config(Arc::new(tls::transport_config(
        limits.streams_per_connection_max,
        limits.client_window_bytes,
    )))?;
    let peer_cfg = tls.peer_client_config(Arc::new(tls::transport_config(
        limits.streams_per_connection_max,
        limits.peer_window_bytes,
    )))?;
    let socket = tls::udp_socket(cfg.listen, limits.udp_buffer_bytes)
        .map_err(|e| ServerError::Other(format!("listening on {}: {e}", cfg.listen)))?;
    let endpoint =
        quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server_cfg), socket, Arc::new(quinn::TokioRuntime))
            .map_err(|e| ServerError::Other(format!("listening on {}: {e}", cfg.listen)))?;
    // Snapshot transfers: TLS over TCP on the same address (TCP and UDP
    // ports are separate spaces).
    let snapshot_listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| ServerError::Other(format!("listening for snapshots on TCP {}: {e}", cfg.listen)))?;
    tracing::info!(listen = %cfg.listen, "listening");

    let (inbound_tx, inbound_rx) = mpsc::channel(limits.inbound_queue_max);
    let (unreachable_tx, unreachable_rx) = mpsc::channel(64);
    // Where a peer is dialed: the override, else the address the state records.
    let addr_of: Arc<dyn Fn(NodeId) -> Option<String> + Send + Sync> = {
        let (book, overrides) = (book.clone(), cfg.peer_addr_override.clone());
        Arc::new(move |p: NodeId| {
            let b = crate::state::read_book(&book);
            if b.removed.contains(&p.0) {
                return None;
            }
            overrides.get(&p.0).or_else(|| b.addrs.get(&p.0)).cloned()
        })
    };
    let backoff = switches.peer_backoff_ms.map(Duration::from_millis);
    let link_cfg = LinkConfig {
        cluster_id,
        connect_timeout: switches.peer_dial_ms.map_or(Duration::from_secs(2), Duration::from_millis),
        backoff_min: backoff.unwrap_or(Duration::from_millis(50)),
        backoff_max: backoff.unwrap_or(Duration::from_secs(1)),
    };
    let arrivals = Arc::new(peer::PeerArrivals::new(!switches.no_arrival_wake));
    let transfer_cfg = cfg.snapshot.transfer_config();
    let mut checkpoints = Checkpoints::new(&cfg.data_dir, shared.clone(), cfg.snapshot.checkpoints_max);
    if switches.checkpoint_at_applied {
        checkpoints.label_with_applied_for_tests = Some(applied_rx.clone());
    }
    let checkpoints = Arc::new(checkpoints);
    let (snapshot_done_tx, snapshot_done_rx) = mpsc::channel(16);
    let conf_index = Arc::new(std::sync::atomic::AtomicU64::new(conf_index));
    let send_ctx = SendContext {
        me: NodeId(cfg.id),
        cluster_id,
        tls: tls.snapshot_client_config()?,
        addr_of: addr_of.clone(),
        checkpoints: checkpoints.clone(),
        transfer: transfer_cfg.clone(),
        deltas: cfg.snapshot.deltas && !switches.checkpoint_at_applied,
        done: snapshot_done_tx,
        arrivals: arrivals.clone(),
        conf_index: conf_index.clone(),
    };
    let mut receive_state = ReceiveState::new(&cfg.data_dir, transfer_cfg, cfg.snapshot.deltas);
    receive_state.handoff_delay_for_tests = switches.snapshot_handoff_delay_ms.map(Duration::from_millis);
    let received = Arc::new(receive_state);
    let links = {
        let endpoint = endpoint.clone();
        let arrivals = arrivals.clone();
        let peer_queue_max = limits.peer_queue_max;
        // A peer with no known address gets no link (Raft hears it is unreachable).
        Arc::new(move |peer: NodeId| {
            let addr = addr_of(peer)?;
            let (tx, rx) = mpsc::channel(peer_queue_max);
            tokio::spawn(peer::run_link(
                endpoint.clone(),
                peer_cfg.clone(),
                peer,
                addr,
                link_cfg.clone(),
                rx,
                unreachable_tx.clone(),
                arrivals.of(peer.0),
            ));
            Some(tx)
        })
    };
    let (node_tx, node_rx) = mpsc::channel(limits.proposal_queue_max);
    let (leader_tx, leader_rx) = watch::channel((false, None));
    let (lessor_tx, lessor_rx) = mpsc::channel(limits.pending_reads_max);
    let lessor = crate::lease::Lessor::new(
        crate::lease::LessorConfig {
            check_every: Duration::from_millis(100),
            election_timeout: cfg.tick * cfg.election_ticks,
            revoke_retry: Duration::from_secs(2),
            revokes_in_flight_max: 64,
            no_grace_for_tests: switches.lease_no_grace,
            history_revisions_max: limits.history_revisions_max,
            history_retention: Duration::from_millis(limits.history_retention_ms),
        },
        leader_rx,
        lease_events,
        lessor_rx,
        node_tx.clone(),
        shared.clone(),
    );
    tokio::spawn(lessor.run());
    let task = NodeTask {
        dial_at_start: !switches.no_arrival_wake,
        leader_watch: leader_tx,
        limits: apply_limits,
        raw,
        name: cfg.name.clone(),
        cluster_id,
        tick: cfg.tick,
        requests: node_rx,
        inbound: inbound_rx,
        unreachable: unreachable_rx,
        wal_jobs: wal_tx,
        wal_done: wal_done_rx,
        apply_jobs: apply_tx.clone(),
        applied: applied_rx.clone(),
        waiters,
        links,
        book: book.clone(),
        db: shared.clone(),
        pending_reads_max: limits.pending_reads_max,
        snapshot: cfg.snapshot.clone(),
        send_ctx,
        snapshot_done: snapshot_done_rx,
        received: received.clone(),
        conf_index,
        used_bytes: used_bytes.clone(),
        quota_bytes: cfg.quota_bytes,
    };
    let node_task = tokio::spawn(task.run());

    let watchers_max = limits.watchers_max;
    let ctx = Arc::new(Ctx {
        id: cfg.id,
        cluster_id,
        tokens: cfg.client_tokens.clone(),
        node: node_tx.clone(),
        db: shared.clone(),
        checkpoints,
        applied: applied_rx,
        apply_jobs: apply_tx,
        connections: tokio::sync::Semaphore::new(limits.client_connections_max),
        book: book.clone(),
        limits,
        apply_limits,
        request_timeout: Duration::from_secs(10),
        read_locally_for_tests: switches.read_locally,
        lessor: lessor_tx,
        watch_tx,
        watch_published,
        watchers: tokio::sync::Semaphore::new(watchers_max),
        saves: tokio::sync::Semaphore::new(cfg.snapshot.saves_max),
        saves_max: cfg.snapshot.saves_max,
        requests: crate::budget::RequestBudget::new(cfg.limits.requests_bytes_max),
        watch_skip_history_for_tests: switches.watch_skip_history,
    });
    let svc = peer::PeerService {
        cluster_id,
        me: NodeId(cfg.id),
        frame_max: ctx.limits.peer_frame_bytes_max,
        inbound: inbound_tx,
        snapshots: received,
        db: shared.clone(),
        book: book.clone(),
        arrivals,
    };
    let snapshot_accept = tokio::spawn(peer::serve_snapshots(
        snapshot_listener,
        tls.snapshot_server_config()?,
        Arc::new(tokio::sync::Semaphore::new(cfg.snapshot.connections_max)),
        svc.clone(),
    ));
    let accept = tokio::spawn(accept_loop(endpoint.clone(), ctx.clone(), svc));
    let quota =
        tokio::spawn(watch_quota(cfg.clone(), used_bytes, over_quota, book, !switches.local_quota, shared.clone()));

    wait_for_signal().await;
    tracing::info!("stopping");
    let (tx, rx) = oneshot::channel();
    if node_tx.send(NodeRequest::Shutdown { reply: tx }).await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
    }
    accept.abort();
    snapshot_accept.abort();
    quota.abort();
    endpoint.close(0u32.into(), b"node stopping");
    drop(node_tx);
    drop(ctx);
    node_task.abort();
    let _ = node_task.await;
    // The Raft task owned the job senders: the threads finish their queues and stop.
    let joined = tokio::task::spawn_blocking(move || {
        let _ = wal_thread.join();
        let _ = apply_thread.join();
    });
    if tokio::time::timeout(Duration::from_secs(10), joined).await.is_err() {
        tracing::warn!("the WAL thread or the apply worker did not stop within 10 s");
    }
    let db = shared.get();
    drop(shared);
    match Arc::try_unwrap(db) {
        Ok(db) => {
            db.flush()?;
            db.close()?;
        }
        Err(db) => db.flush()?,
    }
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, ctx: Arc<Ctx>, svc: peer::PeerService) {
    while let Some(incoming) = endpoint.accept().await {
        let ctx = ctx.clone();
        let svc = svc.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "handshake failed");
                    return;
                }
            };
            let alpn = peer::alpn_of(&conn).unwrap_or_default();
            if peer::is_peer(&alpn) {
                let id = conn
                    .peer_identity()
                    .and_then(|i| i.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>().ok())
                    .and_then(|certs| certs.first().map(tls::node_id_of));
                match id {
                    Some(Ok(id)) => {
                        tls::widen_for_peer(&conn, ctx.limits.peer_window_bytes);
                        peer::serve_peer(conn, id, svc).await
                    }
                    Some(Err(e)) => {
                        tracing::warn!(remote = %conn.remote_address(), error = %e, "refused a peer certificate");
                        conn.close(3u32.into(), b"certificate names no node");
                    }
                    None => {
                        tracing::warn!(remote = %conn.remote_address(), "refused a peer without a certificate");
                        conn.close(3u32.into(), b"peers must present a certificate");
                    }
                }
            } else {
                serve_client(conn, ctx).await;
            }
        });
    }
}

async fn serve_client(conn: quinn::Connection, ctx: Arc<Ctx>) {
    let Ok(_permit) = ctx.connections.try_acquire() else {
        conn.close(4u32.into(), b"too many connections");
        return;
    };
    // The first stream must authenticate.
    let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
    let hello = frame::read::<Request>(&mut recv, HELLO_BYTES_MAX).await;
    let ok = matches!(&hello, Ok(Request::Hello { token }) if ctx.tokens.iter().any(|t| t == token));
    let resp = if ok {
        Response::HelloOk { node_id: ctx.id, cluster_id: ctx.cluster_id }
    } else {
        tracing::warn!(remote = %conn.remote_address(), "refused a client: no valid token");
        Response::error(ErrorCode::Unauthorized, "the token is not valid for this cluster")
    };
    if let Ok(bytes) = frame::encode(&resp) {
        let _ = send.write_all(&bytes).await;
    }
    let _ = send.finish();
    if !ok {
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
        conn.close(5u32.into(), b"unauthorized");
        return;
    }
    // Let the hello's stream go: held, it kept one of the connection's
    // `streams_per_connection_max` places for the connection's life.
    drop((send, recv));
    loop {
        let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let read =
                frame::read_payload_admitted(&mut recv, ctx.limits.request_bytes_max, |len| ctx.requests.admit(len))
                    .await;
            let (request, admitted) = match read {
                Ok((payload, admitted)) => (frame::decode::<Request>(&payload), Some(admitted)),
                Err(e) => (Err(e), None),
            };
            // Held until the answer is written; a stream that outlives its
            // request (a pipe, a watch, a snapshot save) holds none.
            let _admitted = admitted
                .filter(|_| !matches!(request, Ok(Request::Pipe | Request::Watch { .. } | Request::SnapshotSave)));
            let resp = match request {
                Ok(Request::Pipe) => {
                    serve_pipe(ctx, send, recv).await;
                    return;
                }
                Ok(Request::Watch { start, end, start_revision, prev_kv, progress_ms }) => {
                    let w = WatchSpec { start, end, start_revision, prev_kv, progress_ms };
                    if let Err(e) = serve_watch(&ctx, w, &mut send).await {
                        tracing::debug!(error = %e, "a watch ended");
                    }
                    let _ = send.finish();
                    return;
                }
                Ok(Request::SnapshotSave) => match save_snapshot(&ctx, &mut send).await {
                    Ok(()) => {
                        let _ = send.finish();
                        return;
                    }
                    Err(SaveError::Before(r)) => r,
                    Err(SaveError::During(e)) => {
                        tracing::warn!(error = %e, "a snapshot save broke off");
                        let _ = send.reset(1u32.into());
                        return;
                    }
                },
                Ok(req) => handle(&ctx, req).await,
                Err(e) => refuse_frame(e),
            };
            match frame::encode(&resp) {
                Ok(bytes) => {
                    let _ = send.write_all(&bytes).await;
                }
                Err(e) => tracing::error!(error = %e, "cannot encode a response"),
            }
            let _ = send.finish();
        });
    }
}

/// The answer to a request frame that could not be read.
fn refuse_frame(e: frame::FrameError) -> Response {
    match e {
        frame::FrameError::TooLarge { len, max } => {
            Response::error(ErrorCode::TooLarge, format!("a request of {len} bytes is over the limit of {max}"))
        }
        e => Response::error(ErrorCode::BadRequest, format!("malformed request: {e}")),
    }
}

/// Serves a request pipe (see [`Request::Pipe`]) until the client ends its
/// side: at most `streams_per_connection_max` requests in progress, the
/// answers written by one task that gathers those ready together into one
/// write.
async fn serve_pipe(ctx: Arc<Ctx>, send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let in_flight = ctx.limits.streams_per_connection_max.max(1) as usize;
    let (tx, rx) = mpsc::channel::<Vec<u8>>(in_flight);
    let writer = tokio::spawn(frame::write_pipe(send, rx, Vec::new()));
    // One task runs every request of the pipe (most of them wait on the Raft
    // task), rather than a task spawned per request.
    let (jobs, mut taken) = mpsc::channel::<PipeJob>(in_flight);
    let runner = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt as _;
            let mut running = futures_util::stream::FuturesUnordered::new();
            loop {
                tokio::select! {
                    job = taken.recv() => match job {
                        Some(job) => running.push(serve_pipe_request(&ctx, job, &tx)),
                        None => break,
                    },
                    Some(()) = running.next(), if !running.is_empty() => {}
                }
            }
            while running.next().await.is_some() {}
        })
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(in_flight));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else { break };
        let read =
            frame::read_tagged_admitted(&mut recv, ctx.limits.request_bytes_max, |len| ctx.requests.admit(len)).await;
        let (id, payload) = match read {
            Ok(next) => next,
            Err(frame::FrameError::End) => break,
            Err(e) => {
                tracing::debug!(error = %e, "a request pipe broke off");
                break;
            }
        };
        if jobs.send(PipeJob { id, payload, permit }).await.is_err() {
            break;
        }
    }
    // The writer finishes the stream once every request taken has been answered.
    drop(jobs);
    let _ = runner.await;
    let _ = writer.await;
}

/// A request read from a pipe, with what it holds until answered.
struct PipeJob {
    id: u64,
    payload: Result<(Vec<u8>, crate::budget::Admitted), frame::FrameError>,
    permit: tokio::sync::OwnedSemaphorePermit,
}

async fn serve_pipe_request(ctx: &Ctx, job: PipeJob, tx: &mpsc::Sender<Vec<u8>>) {
    let PipeJob { id, payload, permit } = job;
    // `handle` refuses a watch, a snapshot save or a pipe: each needs a stream of its own.
    let (request, admitted) = match payload {
        Ok((p, admitted)) => (frame::decode::<Request>(&p), Some(admitted)),
        Err(e) => (Err(e), None),
    };
    let resp = match request {
        Ok(req) => handle(ctx, req).await,
        Err(e) => refuse_frame(e),
    };
    match frame::encode_tagged(id, &resp) {
        Ok(bytes) => {
            let _ = tx.send(bytes).await;
        }
        Err(e) => tracing::error!(error = %e, "cannot encode a response"),
    }
    drop(admitted);
    drop(permit);
}

/// Answers one request, and records how long that took in
/// `cairn_request_seconds` by the request's kind: from a decoded request to
/// its answer, the encoding and the network left out (a client's latency
/// beyond it was spent in the client, the network or the QUIC stack).
async fn handle(ctx: &Ctx, req: Request) -> Response {
    let kind = match &req {
        Request::Write { .. } => "write",
        Request::Txn { .. } => "txn",
        Request::Get { .. } => "get",
        Request::Scan { .. } => "scan",
        _ => "other",
    };
    let started = Instant::now();
    let resp = handle_request(ctx, req).await;
    metrics::histogram!("cairn_request_seconds", "kind" => kind).record(started.elapsed().as_secs_f64());
    resp
}

async fn handle_request(ctx: &Ctx, req: Request) -> Response {
    match req {
        Request::Hello { .. } => Response::HelloOk { node_id: ctx.id, cluster_id: ctx.cluster_id },
        Request::SnapshotSave => Response::error(ErrorCode::BadRequest, "a snapshot save is a stream of its own"),
        Request::Watch { .. } => Response::error(ErrorCode::BadRequest, "a watch is a stream of its own"),
        Request::Pipe => Response::error(ErrorCode::BadRequest, "a pipe is a stream of its own"),
        Request::Compact { revision } => {
            propose_command(ctx, Command { time_ms: now_ms(), op: CommandOp::Compact { revision } }).await
        }
        Request::Register => propose_command(ctx, Command { time_ms: now_ms(), op: CommandOp::Register }).await,
        Request::Write { session, ops } => {
            if let Err(code) = check_ops(&ops, ctx.apply_limits) {
                return Response::error(code, crate::apply::refusal_message(code));
            }
            // Refused early here; the replicated alarm decides at apply.
            if !crate::state::read_book(&ctx.book).alarms.is_empty()
                && ops.iter().any(|o| matches!(o, cairn_kv_client::protocol::WriteOp::Put { .. }))
            {
                return Response::error(ErrorCode::NoSpace, crate::apply::refusal_message(ErrorCode::NoSpace));
            }
            propose_command(ctx, Command { time_ms: now_ms(), op: CommandOp::Write { session, ops } }).await
        }
        Request::Txn { session, compares, success, failure } => {
            if let Err(code) = crate::apply::check_txn(&compares, &success, &failure, ctx.apply_limits) {
                return Response::error(code, crate::apply::refusal_message(code));
            }
            let puts =
                success.iter().chain(&failure).any(|o| matches!(o, cairn_kv_client::protocol::TxnOp::Put { .. }));
            if puts && !crate::state::read_book(&ctx.book).alarms.is_empty() {
                return Response::error(ErrorCode::NoSpace, crate::apply::refusal_message(ErrorCode::NoSpace));
            }
            let op = CommandOp::Txn { session, compares, success, failure };
            propose_command(ctx, Command { time_ms: now_ms(), op }).await
        }
        Request::LeaseGrant { ttl_ms, client_id } => {
            let op = CommandOp::LeaseGrant { ttl_ms, owner: client_id };
            propose_command(ctx, Command { time_ms: now_ms(), op }).await
        }
        Request::LeaseRevoke { id } => {
            propose_command(ctx, Command { time_ms: now_ms(), op: CommandOp::LeaseRevoke { id } }).await
        }
        Request::LeaseKeepAlive { id } => {
            let (reply, rx) = oneshot::channel();
            if ctx.lessor.try_send(crate::lease::LessorRequest::KeepAlive { id, reply }).is_err() {
                return Response::error(ErrorCode::Busy, "the lessor's queue is full");
            }
            match rx.await {
                Ok(Ok(ttl_ms)) => Response::LeaseAlive { id, ttl_ms },
                Ok(Err(e)) => lessor_refusal(ctx, e),
                Err(_) => Response::error(ErrorCode::Stopping, "the node is stopping"),
            }
        }
        Request::LeaseTimeToLive { id } => {
            // Only the leader knows the time left: a follower sends the client there.
            let (reply, rx) = oneshot::channel();
            if ctx.lessor.try_send(crate::lease::LessorRequest::Remaining { id, reply }).is_err() {
                return Response::error(ErrorCode::Busy, "the lessor's queue is full");
            }
            let remaining_ms = match rx.await {
                Ok(Ok(left)) => left,
                Ok(Err(e)) => return lessor_refusal(ctx, e),
                Err(_) => return Response::error(ErrorCode::Stopping, "the node is stopping"),
            };
            if let Err(r) = read_barrier(ctx, Consistency::Linearizable).await {
                return r;
            }
            let view = ctx.db.get().read_view();
            let ttl_ms = match view.get(&crate::state::lease_key(id)) {
                Ok(Some(v)) => match crate::state::decode_lease(&v) {
                    Some((ttl, _)) => ttl,
                    None => return Response::error(ErrorCode::Unavailable, "a malformed lease record"),
                },
                Ok(None) => return Response::error(ErrorCode::LeaseNotFound, format!("lease {id} does not exist")),
                Err(e) => return Response::error(ErrorCode::Unavailable, format!("reading the state: {e}")),
            };
            let mut keys = Vec::new();
            let (lo, hi) = (crate::state::attach_key(id, &[]), crate::state::attach_key(id + 1, &[]));
            for kv in view.range(lo..hi) {
                match kv {
                    Ok((k, _)) => keys.push(k[9..].to_vec()),
                    Err(e) => return Response::error(ErrorCode::Unavailable, format!("reading the state: {e}")),
                }
            }
            Response::LeaseInfo { id, ttl_ms, remaining_ms, keys }
        }
        Request::LeaseList => {
            if let Err(r) = read_barrier(ctx, Consistency::Linearizable).await {
                return r;
            }
            match crate::state::load_leases(&ctx.db.get()) {
                Ok(all) => Response::Leases(all.into_iter().map(|(id, _, _)| id).collect()),
                Err(e) => Response::error(ErrorCode::Unavailable, format!("reading the state: {e}")),
            }
        }
        Request::Get { key, consistency, revision: at } => {
            if key.len() > ctx.limits.key_bytes_max {
                return Response::error(ErrorCode::TooLarge, "the key is over the limit");
            }
            let index = match read_barrier(ctx, consistency).await {
                Ok(i) => i,
                Err(r) => return r,
            };
            // One read view: the value and the revision of the same state.
            let view = ctx.db.get().read_view();
            let revision = match crate::state::view_u64(&view, REVISION_KEY) {
                Ok(r) => r,
                Err(e) => return Response::error(ErrorCode::Unavailable, format!("reading the state: {e}")),
            };
            if at != 0 {
                let undo = match crate::history::undo_to(&view, at, |k| k == key.as_slice()) {
                    Ok(u) => u,
                    Err(e) => return past_read_refusal(e),
                };
                if let Some(before) = undo.before.get(&key) {
                    let (value, meta) = before.clone().map(|kv| (kv.value, kv.meta)).unzip();
                    return Response::Value { value, index, meta, revision: at };
                }
            }
            let revision = if at != 0 { at } else { revision };
            match view.get(&user_key(&key)) {
                Ok(Some(v)) => match decode_value(&v) {
                    Ok((meta, v)) => Response::Value { value: Some(v.to_vec()), index, meta: Some(meta), revision },
                    Err(e) => Response::error(ErrorCode::Unavailable, e),
                },
                Ok(None) => Response::Value { value: None, index, meta: None, revision },
                Err(e) => Response::error(ErrorCode::Unavailable, format!("reading the state: {e}")),
            }
        }
        Request::Scan { start, end, limit, keys_only, consistency, revision: at } => {
            let index = match read_barrier(ctx, consistency).await {
                Ok(i) => i,
                Err(r) => return r,
            };
            let limit =
                if limit == 0 { ctx.limits.scan_pairs_max } else { limit.min(ctx.limits.scan_pairs_max) } as usize;
            let lo = user_key(&start);
            let hi = match &end {
                Some(e) => user_key(e),
                None => vec![USER_PREFIX + 1],
            };
            let view = ctx.db.get().read_view();
            let revision = match crate::state::view_u64(&view, REVISION_KEY) {
                Ok(r) => r,
                Err(e) => return Response::error(ErrorCode::Unavailable, format!("reading the state: {e}")),
            };
            if lo >= hi {
                let revision = if at != 0 { at } else { revision };
                return Response::Scanned { pairs: Vec::new(), more: false, index, metas: Vec::new(), revision };
            }
            // At a past revision: the keys changed since, as they were then.
            let mut before = std::collections::BTreeMap::new();
            if at != 0 {
                let covers = |k: &[u8]| k >= start.as_slice() && end.as_ref().is_none_or(|e| k < e.as_slice());
                match crate::history::undo_to(&view, at, covers) {
                    Ok(u) => before = u.before,
                    Err(e) => return past_read_refusal(e),
                }
            }
            let mut undone = before.into_iter().peekable();
            let mut current = view.range(lo..hi).peekable();
            let mut pairs = Vec::new();
            let mut metas = Vec::new();
            let mut more = false;
            loop {
                // The next key of the merge: the current state's, unless the
                // history says what a key at or before it held at the revision.
                let (take_undone, same_key) = match (undone.peek(), current.peek()) {
                    (_, Some(Err(e))) => {
                        return Response::error(ErrorCode::Unavailable, format!("reading the state: {e}"));
                    }
                    (Some((uk, _)), Some(Ok((k, _)))) => (uk.as_slice() <= &k[1..], uk.as_slice() == &k[1..]),
                    (Some(_), None) => (true, false),
                    (None, Some(Ok(_))) => (false, false),
                    (None, None) => break,
                };
                let (k, v, meta) = if take_undone {
                    let Some((_, kv)) = undone.next() else { break };
                    if same_key {
                        current.next();
                    }
                    match kv {
                        Some(kv) => (kv.key, kv.value, kv.meta),
                        None => continue,
                    }
                } else {
                    let Some(Ok((k, v))) = current.next() else { break };
                    match decode_value(&v) {
                        Ok((meta, v)) => (k[1..].to_vec(), if keys_only { Vec::new() } else { v.to_vec() }, meta),
                        Err(e) => return Response::error(ErrorCode::Unavailable, e),
                    }
                };
                if pairs.len() == limit {
                    more = true;
                    break;
                }
                pairs.push((k, if keys_only { Vec::new() } else { v }));
                metas.push(meta);
            }
            let revision = if at != 0 { at } else { revision };
            Response::Scanned { pairs, more, index, metas, revision }
        }
        Request::Status { with_hash } => {
            let mut s = match ask(ctx, |reply| NodeRequest::Status { reply }).await {
                Ok(s) => s,
                Err(r) => return r,
            };
            if with_hash {
                let (tx, rx) = oneshot::channel();
                if ctx.apply_jobs.send(ApplyJob::Hash { reply: tx }).await.is_ok() {
                    s.state_hash = rx.await.ok();
                }
            }
            Response::Status(s)
        }
        Request::Health => propose(ctx, Vec::new()).await,
        Request::MemberList => {
            ask(ctx, |reply| NodeRequest::Members { reply }).await.map_or_else(|r| r, Response::Members)
        }
        Request::MemberAdd { id, addr, learner } => {
            if id == 0 || addr.is_empty() || addr.len() > 1024 {
                return Response::error(ErrorCode::BadRequest, "a member needs an id above 0 and a peer address");
            }
            // The address first (replicated), so the leader can reach the node once it is a member.
            let cmd = Command { time_ms: now_ms(), op: CommandOp::SetMember { id, addr } };
            match propose_command(ctx, cmd).await {
                Response::Ok => {}
                other => return other,
            }
            let change = if learner { MemberChange::AddLearner(id) } else { MemberChange::AddVoter(id) };
            member_change(ctx, change).await
        }
        Request::Alarm { node, raise } => {
            propose_command(ctx, Command { time_ms: now_ms(), op: CommandOp::Alarm { node, raise } }).await
        }
        Request::MemberPromote { id } => member_change(ctx, MemberChange::Promote(id)).await,
        Request::MemberRemove { id } => member_change(ctx, MemberChange::Remove(id)).await,
        Request::TransferLeader { to } => match ask(ctx, |reply| NodeRequest::TransferLeader { to, reply }).await {
            Ok(Ok(())) => Response::Ok,
            Ok(Err(e)) => Response::Error(e),
            Err(r) => r,
        },
    }
}

/// Bytes of the files under `dir`, recursively.
fn tree_bytes(dir: &std::path::Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// Measures the data directory every `quota_check_ms`; over the quota, asks
/// the cluster (as a client, through the leader) to raise this node's space
/// alarm, so every replica refuses writes at the same entry (DESIGN.md,
/// "Disk full"). With `propose` false (a test switch) it only records.
async fn watch_quota(
    cfg: Config,
    used: Arc<std::sync::atomic::AtomicU64>,
    over: Arc<std::sync::atomic::AtomicBool>,
    book: crate::state::SharedBook,
    propose: bool,
    db: Arc<SharedDb>,
) {
    use std::sync::atomic::Ordering;
    let mut client: Option<cairn_kv_client::Client> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(cfg.quota_check_ms)).await;
        let dir = cfg.data_dir.clone();
        let Ok((bytes, wal_bytes)) =
            tokio::task::spawn_blocking(move || (tree_bytes(&dir), tree_bytes(&dir.join("raft")))).await
        else {
            continue;
        };
        used.store(bytes, Ordering::Relaxed);
        metrics::gauge!("cairn_data_dir_bytes").set(bytes as f64);
        metrics::gauge!("cairn_wal_bytes").set(wal_bytes as f64);
        // The LSM publishes its levels, stalls and cache hits itself; the rest here.
        let st = db.get().stats();
        metrics::gauge!("cairn_lsm_compaction_read_bytes").set(st.compaction_read_bytes as f64);
        metrics::gauge!("cairn_lsm_compaction_write_bytes").set(st.compaction_write_bytes as f64);
        metrics::gauge!("cairn_lsm_flush_bytes").set(st.flush_bytes as f64);
        metrics::gauge!("cairn_lsm_memtable_bytes").set(st.memtable_bytes as f64);
        metrics::gauge!("cairn_lsm_write_amplification").set(st.write_amplification);
        metrics::gauge!("cairn_lsm_slowdowns").set(st.slowdowns as f64);
        // Memory: the block cache's items, and what open tables hold beside it
        // (top indexes, filters, range deletes; the filters are charged
        // against the cache's bound).
        metrics::gauge!("cairn_lsm_cache_bytes").set(st.cache_bytes as f64);
        metrics::gauge!("cairn_lsm_table_memory_bytes").set(st.table_memory_bytes as f64);
        metrics::gauge!("cairn_lsm_filter_bytes").set(st.filter_bytes as f64);
        let is_over = bytes > cfg.quota_bytes;
        over.store(is_over, Ordering::Relaxed);
        if !is_over || !propose || crate::state::read_book(&book).alarms.contains(&cfg.id) {
            continue;
        }
        tracing::warn!(used = bytes, quota = cfg.quota_bytes, "over the space quota: raising the space alarm");
        if client.is_none() {
            let endpoints: Vec<String> = crate::state::read_book(&book).addrs.values().cloned().collect();
            let (Some(token), Ok(ca)) = (cfg.client_tokens.first(), std::fs::read(&cfg.tls_ca)) else {
                tracing::error!("cannot raise the space alarm: no client token or CA certificate");
                continue;
            };
            match cairn_kv_client::Client::new(cairn_kv_client::ClientOptions::new(endpoints, token.clone(), ca)) {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::error!(error = %e, "cannot raise the space alarm");
                    continue;
                }
            }
        }
        if let Some(c) = &client
            && let Err(e) = c.alarm(cfg.id, true).await
        {
            tracing::warn!(error = %e, "raising the space alarm failed; trying again");
        }
    }
}

/// Why a snapshot save stopped: before its header (an answer can still
/// say why) or during its bytes (the stream is reset).
enum SaveError {
    Before(Response),
    During(String),
}

/// Streams a checkpoint of the state to a client: a `SnapshotHeader` frame,
/// then each file's bytes in order.
async fn save_snapshot(ctx: &Ctx, send: &mut quinn::SendStream) -> Result<(), SaveError> {
    use cairn_kv_client::protocol::{SnapshotFile, SnapshotHeader};
    use tokio::io::AsyncReadExt;
    let unavailable = |m: String| SaveError::Before(Response::error(ErrorCode::Unavailable, m));
    // Held until the last byte is queued: each save pins a checkpoint.
    let _save = ctx.saves.try_acquire().map_err(|_| {
        SaveError::Before(Response::error(
            ErrorCode::Busy,
            format!(
                "{} snapshot saves are running on this node ([snapshot] saves_max); try again when one ends",
                ctx.saves_max
            ),
        ))
    })?;
    let applied = *ctx.applied.borrow();
    let checkpoints = ctx.checkpoints.clone();
    let ckpt = tokio::task::spawn_blocking(move || {
        let c = checkpoints.get(LogIndex(applied))?;
        // The transfer's source takes the checksums cairn-lsm recorded and
        // reads the other files once for theirs.
        let (_, manifest) =
            cairn_snapshot_transfer::Source::open_known(&cairn_snapshot_transfer::StdFs, &c.files, 0, 0, 0)
                .map_err(|e| format!("reading the checkpoint: {e}"))?;
        let files = manifest
            .files
            .into_iter()
            .map(|f| SnapshotFile { name: f.name, len: f.len, checksum: f.checksum })
            .collect::<Vec<_>>();
        Ok::<_, String>((c, files))
    })
    .await
    .map_err(|e| unavailable(format!("the checkpoint task failed: {e}")))?
    .map_err(unavailable)?;
    let (ckpt, files) = ckpt;
    let members = ask(ctx, |reply| NodeRequest::Members { reply }).await.map_err(SaveError::Before)?;
    let header = SnapshotHeader {
        cluster_id: ctx.cluster_id,
        index: ckpt.index.0,
        term: ckpt.term.0,
        voters: members.iter().filter(|m| !m.learner).map(|m| m.id).collect(),
        learners: members.iter().filter(|m| m.learner).map(|m| m.id).collect(),
        files,
    };
    let during = |e: &dyn std::fmt::Display| SaveError::During(e.to_string());
    let bytes = frame::encode(&Response::SnapshotHeader(header.clone())).map_err(|e| during(&e))?;
    send.write_all(&bytes).await.map_err(|e| during(&e))?;
    let mut buf = vec![0u8; 256 << 10];
    for (cairn_snapshot_transfer::SourceFile { path, .. }, meta) in ckpt.files.iter().zip(&header.files) {
        let mut f = tokio::fs::File::open(path).await.map_err(|e| during(&e))?;
        let mut left = meta.len;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = f.read(&mut buf[..want]).await.map_err(|e| during(&e))?;
            if n == 0 {
                return Err(SaveError::During(format!("{} shrank while it was sent", path.display())));
            }
            send.write_all(&buf[..n]).await.map_err(|e| during(&e))?;
            left -= n as u64;
        }
    }
    tracing::info!(index = header.index, bytes = header.total_bytes(), "snapshot saved by a client");
    Ok(())
}

/// Proposes a membership change and answers with the members once it applied.
async fn member_change(ctx: &Ctx, change: MemberChange) -> Response {
    let asked = ask(ctx, |reply| NodeRequest::ConfChange { change, reply });
    match tokio::time::timeout(ctx.request_timeout, asked).await {
        Ok(Ok(Response::Ok)) => {}
        Ok(Ok(other)) | Ok(Err(other)) => return other,
        Err(_) => {
            return Response::error(ErrorCode::Unavailable, "the change did not apply in time; it may still apply");
        }
    }
    // A change of voters goes through joint consensus, left by an entry the
    // leader proposes itself: answer once it is left.
    let deadline = tokio::time::Instant::now() + ctx.request_timeout;
    loop {
        match ask(ctx, |reply| NodeRequest::IsJoint { reply }).await {
            Ok(false) => break,
            Ok(true) if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            Ok(true) => {
                return Response::error(ErrorCode::Unavailable, "the change applied; leaving joint consensus is slow");
            }
            Err(r) => return r,
        }
    }
    ask(ctx, |reply| NodeRequest::Members { reply }).await.map_or_else(|r| r, Response::Members)
}

/// The lessor's refusal, with the leader's address filled in.
fn lessor_refusal(ctx: &Ctx, mut e: cairn_kv_client::protocol::ErrorInfo) -> Response {
    if e.code == ErrorCode::NotLeader
        && let Some((l, _)) = e.leader.take()
    {
        let addr = crate::state::read_book(&ctx.book).addrs.get(&l).cloned().unwrap_or_default();
        e.leader = Some((l, addr));
    }
    Response::Error(e)
}

/// The answer to a read at a revision that cannot be served.
fn past_read_refusal(e: crate::history::PastReadError) -> Response {
    use crate::history::PastReadError;
    let code = match e {
        PastReadError::Future { .. } => ErrorCode::BadRequest,
        PastReadError::Compacted { .. } => ErrorCode::Compacted,
        PastReadError::Storage(_) => ErrorCode::Unavailable,
    };
    Response::error(code, e.to_string())
}

/// A watch as asked.
struct WatchSpec {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
    start_revision: u64,
    prev_kv: bool,
    progress_ms: u64,
}

impl WatchSpec {
    fn covers(&self, key: &[u8]) -> bool {
        match &self.end {
            None => key == self.start.as_slice(),
            Some(e) if e.is_empty() => key >= self.start.as_slice(),
            Some(e) => key >= self.start.as_slice() && key < e.as_slice(),
        }
    }
}

/// Events per frame of a watch at most.
const WATCH_FRAME_EVENTS_MAX: usize = 256;
/// Idle time after which a watch sends progress anyway (a gone client shows
/// as a failed write), when it asked for none.
const WATCH_KEEPALIVE: Duration = Duration::from_secs(5);

async fn write_frame(send: &mut quinn::SendStream, r: &Response) -> Result<(), String> {
    let bytes = frame::encode(r).map_err(|e| e.to_string())?;
    send.write_all(&bytes).await.map_err(|e| format!("the watcher is gone: {e}"))
}

/// A watcher whose client takes nothing for this long is dropped: while it
/// waits it reads no batch, so it could not see how far behind it is.
const WATCH_STUCK: Duration = Duration::from_secs(10);

/// [`write_frame`] for live events, which gives up after [`WATCH_STUCK`].
async fn write_watch_frame(send: &mut quinn::SendStream, r: &Response) -> Result<(), String> {
    match tokio::time::timeout(WATCH_STUCK, write_frame(send, r)).await {
        Ok(r) => r,
        Err(_) => {
            let _ = send.reset(1u32.into());
            Err(format!("the watcher took nothing for {} s: dropped", WATCH_STUCK.as_secs()))
        }
    }
}

/// Sends the history's events of `w` in `(after, upto]` from the live state; returns `upto`.
async fn watch_history(
    ctx: &Ctx,
    w: &WatchSpec,
    after: u64,
    send: &mut quinn::SendStream,
) -> Result<Result<u64, u64>, String> {
    let view = ctx.db.get().read_view();
    let upto = crate::state::view_u64(&view, REVISION_KEY)?;
    let compacted = crate::state::view_u64(&view, crate::state::COMPACTED_KEY)?;
    if after + 1 < compacted {
        return Ok(Err(compacted));
    }
    let mut out: Vec<cairn_kv_client::protocol::WatchEvent> = Vec::new();
    for e in crate::history::events(&view, after, upto, |k| w.covers(k)) {
        let mut e = e?;
        if !w.prev_kv {
            e.prev = None;
        }
        // Frames hold whole revisions, so "delivered up to" is exact.
        if let Some(last) = out.last().map(|l| l.revision)
            && out.len() >= WATCH_FRAME_EVENTS_MAX
            && last != e.revision
        {
            write_frame(send, &Response::WatchEvents { events: std::mem::take(&mut out), revision: last }).await?;
        }
        out.push(e);
    }
    if out.is_empty() {
        write_frame(send, &Response::WatchProgress { revision: upto }).await?;
    } else {
        write_frame(send, &Response::WatchEvents { events: out, revision: upto }).await?;
    }
    Ok(Ok(upto))
}

/// Serves one watch stream: the history from the revision asked, then the
/// events as they apply, in revision order, each once; progress when idle.
async fn serve_watch(ctx: &Ctx, w: WatchSpec, send: &mut quinn::SendStream) -> Result<(), String> {
    let Ok(_permit) = ctx.watchers.try_acquire() else {
        return write_frame(send, &Response::error(ErrorCode::Busy, "too many watches (watchers_max)")).await;
    };
    if w.start.len() > ctx.limits.key_bytes_max || w.end.as_ref().is_some_and(|e| e.len() > ctx.limits.key_bytes_max) {
        return write_frame(send, &Response::error(ErrorCode::TooLarge, "a key of the watch is over the limit")).await;
    }
    // Subscribe first, then read the history: an event applied in between
    // is in both and goes out once (by revision); none falls between.
    let mut feed = ctx.watch_tx.subscribe();
    let after = if w.start_revision == 0 {
        crate::state::view_u64(&ctx.db.get().read_view(), REVISION_KEY)?
    } else {
        w.start_revision - 1
    };
    let compacted = crate::state::load_compacted(&ctx.db.get()).map_err(|e| e.to_string())?;
    if after + 1 < compacted {
        let end = cairn_kv_client::protocol::WatchEnd::Compacted { oldest: compacted };
        return write_frame(send, &Response::WatchEnded(end)).await;
    }
    write_frame(send, &Response::WatchProgress { revision: after }).await?;
    let history = if ctx.watch_skip_history_for_tests {
        let now = crate::state::load_revision(&ctx.db.get()).map_err(|e| e.to_string())?;
        Ok(now)
    } else {
        watch_history(ctx, &w, after, send).await?
    };
    let mut sent = match history {
        Ok(upto) => upto.max(after),
        Err(oldest) => {
            return write_frame(send, &Response::WatchEnded(cairn_kv_client::protocol::WatchEnd::Compacted { oldest }))
                .await;
        }
    };
    let idle = if w.progress_ms == 0 { WATCH_KEEPALIVE } else { Duration::from_millis(w.progress_ms) };
    loop {
        let next = tokio::time::timeout(idle, feed.recv()).await;
        match next {
            Err(_) => write_frame(send, &Response::WatchProgress { revision: sent }).await?,
            Ok(Ok(crate::apply::WatchFeed::Events(batch))) => {
                let Some(top) = batch.events.last().map(|e| e.revision) else { continue };
                if top <= sent {
                    continue;
                }
                // Further behind the newest batch than the buffer's bytes: end
                // it as too slow (its client resumes from the history), so the
                // batches it holds in the buffer are let go.
                let behind = ctx.watch_published.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(batch.end);
                if behind > ctx.limits.watch_buffer_bytes {
                    let end = cairn_kv_client::protocol::WatchEnd::TooSlow { resume_from: sent + 1 };
                    return write_frame(send, &Response::WatchEnded(end)).await;
                }
                let out: Vec<_> = batch
                    .events
                    .iter()
                    .filter(|e| e.revision > sent && w.covers(&e.kv.key))
                    .map(|e| {
                        let mut e = e.clone();
                        if !w.prev_kv {
                            e.prev = None;
                        }
                        e
                    })
                    .collect();
                sent = top;
                // Frames hold whole revisions; the last one says `top`.
                let mut frame_events: Vec<cairn_kv_client::protocol::WatchEvent> = Vec::new();
                for e in out {
                    if let Some(last) = frame_events.last().map(|l| l.revision)
                        && frame_events.len() >= WATCH_FRAME_EVENTS_MAX
                        && last != e.revision
                    {
                        let events = std::mem::take(&mut frame_events);
                        write_watch_frame(send, &Response::WatchEvents { events, revision: last }).await?;
                    }
                    frame_events.push(e);
                }
                if !frame_events.is_empty() {
                    write_watch_frame(send, &Response::WatchEvents { events: frame_events, revision: top }).await?;
                }
            }
            Ok(Ok(crate::apply::WatchFeed::Reset)) => match watch_history(ctx, &w, sent, send).await? {
                Ok(upto) => sent = sent.max(upto),
                Err(oldest) => {
                    let end = cairn_kv_client::protocol::WatchEnd::Compacted { oldest };
                    return write_frame(send, &Response::WatchEnded(end)).await;
                }
            },
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                let end = cairn_kv_client::protocol::WatchEnd::TooSlow { resume_from: sent + 1 };
                return write_frame(send, &Response::WatchEnded(end)).await;
            }
            Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return Ok(()),
        }
    }
}

/// Sends a request to the Raft task and waits for its answer.
async fn ask<T>(ctx: &Ctx, make: impl FnOnce(oneshot::Sender<T>) -> NodeRequest) -> Result<T, Response> {
    let stopping = || Response::error(ErrorCode::Stopping, "the node is stopping");
    let (tx, rx) = oneshot::channel();
    ctx.node.send(make(tx)).await.map_err(|_| stopping())?;
    rx.await.map_err(|_| stopping())
}

/// Waits until a read at `consistency` may be served; returns the applied index it is served at.
async fn read_barrier(ctx: &Ctx, consistency: Consistency) -> Result<u64, Response> {
    let mut applied = ctx.applied.clone();
    if consistency == Consistency::Serializable || ctx.read_locally_for_tests {
        return Ok(*applied.borrow());
    }
    let (tx, rx) = oneshot::channel();
    if ctx.node.try_send(NodeRequest::ReadIndex { reply: tx }).is_err() {
        return Err(Response::error(ErrorCode::Busy, "the node's request queue is full"));
    }
    let index = match tokio::time::timeout(ctx.request_timeout, rx).await {
        Ok(Ok(Ok(i))) => i,
        Ok(Ok(Err(e))) => return Err(Response::Error(e)),
        Ok(Err(_)) => return Err(Response::error(ErrorCode::Stopping, "the node is stopping")),
        Err(_) => return Err(Response::error(ErrorCode::Unavailable, "no read index in time (no quorum?)")),
    };
    match tokio::time::timeout(ctx.request_timeout, applied.wait_for(|a| *a >= index)).await {
        Ok(Ok(a)) => Ok((*a).max(index)),
        Ok(Err(_)) => Err(Response::error(ErrorCode::Stopping, "the node is stopping")),
        Err(_) => Err(Response::error(ErrorCode::Unavailable, "this node did not apply up to the read index in time")),
    }
}

async fn propose_command(ctx: &Ctx, cmd: Command) -> Response {
    match cmd.encode() {
        Ok(data) => propose(ctx, data).await,
        Err(e) => Response::error(ErrorCode::BadRequest, format!("the request cannot be archived: {e}")),
    }
}

async fn propose(ctx: &Ctx, data: Vec<u8>) -> Response {
    let (tx, rx) = oneshot::channel();
    match ctx.node.try_send(NodeRequest::Propose { data, reply: tx }) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            return Response::error(ErrorCode::Busy, "the node's proposal queue is full; retry later");
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            return Response::error(ErrorCode::Stopping, "the node is stopping");
        }
    }
    match tokio::time::timeout(ctx.request_timeout, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Response::error(ErrorCode::Stopping, "the node stopped before the write applied; it may have"),
        Err(_) => Response::error(ErrorCode::Unavailable, "the write did not apply in time; it may still apply"),
    }
}
