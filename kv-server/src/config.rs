//! The node's configuration: a TOML file, flags and `CAIRN_*` environment
//! variables (flags and variables win over the file). Unknown keys and
//! unknown `CAIRN_*` variables are errors; `CAIRN_TEST_*` variables are
//! test switches and never configuration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

/// Every setting of a node, with its unit.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// This node's id (never 0, never reused).
    pub id: u64,
    /// A name for people. Default `node-<id>`.
    pub name: String,
    /// Where the node keeps its log and state. Default `cairn-data/node-<id>`.
    pub data_dir: PathBuf,
    /// Address to listen on: UDP for QUIC (peers and clients), and TCP on the
    /// same port for snapshot transfers from peers. Default `127.0.0.1:7100+id`.
    pub listen: SocketAddr,
    /// Address others reach this node at. Default: `listen`.
    pub advertise: String,
    /// The initial members, `id=host:port` each: used only to bootstrap an
    /// empty data directory. Default: this node alone.
    pub initial_cluster: BTreeMap<u64, String>,
    /// Join an existing cluster (started with an empty log, added by `member add`).
    pub join: bool,
    /// Dial these addresses instead of the advertised ones (per peer), so a
    /// test can route each link through its own relay.
    pub peer_addr_override: BTreeMap<u64, String>,
    /// Names the cluster; its id is derived from it and the initial cluster.
    pub cluster_name: String,
    /// The cluster CA certificate (PEM).
    pub tls_ca: PathBuf,
    /// This node's certificate (PEM), with SAN `node-<id>.cairn`.
    pub tls_cert: PathBuf,
    /// This node's private key (PEM).
    pub tls_key: PathBuf,
    /// Tokens clients may present.
    pub client_tokens: Vec<String>,
    /// Limits.
    pub limits: Limits,
    /// Length of a Raft tick. Default 100 ms.
    pub tick: Duration,
    /// Ticks before a follower campaigns (randomized up to twice this). Default 10.
    pub election_ticks: u32,
    /// Ticks between heartbeats. Default 1.
    pub heartbeat_ticks: u32,
    /// A session unused this long expires (by the leader's clock in entries). Default 1 h.
    pub session_ttl: Duration,
    /// Bytes of the LSM memtable. Default 64 MiB.
    pub memtable_bytes: usize,
    /// Bytes of the LSM block cache, which also bounds the tables' filters
    /// (charged against it). Default 64 MiB.
    pub block_cache_bytes: u64,
    /// Values at least this long are kept in the LSM's blob files rather
    /// than in its tables (key-value separation: compactions then move
    /// references, not the values). 0 keeps every value in the tables.
    /// Default 512 bytes.
    pub blob_value_bytes_min: usize,
    /// Bytes of the newest Raft log entries kept in memory for appends to
    /// followers (older ones are read back from the WAL). Default 64 MiB.
    pub entry_cache_bytes: u64,
    /// Bytes of a WAL segment. Default 64 MiB.
    pub wal_segment_bytes: u64,
    /// Address of the Prometheus `/metrics` endpoint (off when absent).
    pub metrics_listen: Option<SocketAddr>,
    /// Log format: `text` or `json`. Default `text`.
    pub log_format: String,
    /// Log release and snapshot transfer.
    pub snapshot: SnapshotSettings,
    /// Bytes this node's data directory may hold (log and state) before it
    /// raises the cluster's space alarm. Default 8 GiB.
    pub quota_bytes: u64,
    /// How often the node measures its data directory, ms. Default 2000.
    pub quota_check_ms: u64,
}

/// Log release, checkpoints and snapshot transfers (the `[snapshot]` table).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct SnapshotSettings {
    /// Entries kept below the state's durable marker when the log is
    /// released, so a follower a little behind catches up from the log.
    /// Default 10,000.
    pub release_margin_entries: u64,
    /// The same margin in bytes of entries (the smaller bound wins). Default 64 MiB.
    pub release_margin_bytes: u64,
    /// How often the node checks whether it can release the log, ms. Default 1000.
    pub release_check_ms: u64,
    /// Checkpoints remembered for reuse by another transfer while one still
    /// uses them (each is deleted when no transfer uses it). Default 2.
    /// The checkpoints on disk at once are bounded by `transfers_max` plus
    /// `saves_max`: each holds at most one.
    pub checkpoints_max: usize,
    /// Snapshot transfers a leader runs at once. Default 2.
    pub transfers_max: usize,
    /// Snapshot connections (TLS over TCP, see `docs/design/kv-server.md`
    /// §5) a node accepts at once, handshakes included; one more is closed
    /// at once. A follower stages one transfer at a time, so a few suffice.
    /// Default 4.
    pub connections_max: usize,
    /// Client snapshot saves (`kv snapshot save`) a node streams at once;
    /// one more is refused as busy. Each holds a checkpoint (and so the
    /// disk space of the tables it links) until its client has read it all.
    /// Default 2.
    pub saves_max: usize,
    /// Raw bytes per chunk. Default 1 MiB.
    pub chunk_bytes: u32,
    /// Raw bytes sent and not yet acknowledged. Default 32 MiB.
    pub window_bytes: u64,
    /// Sender's rate limit, bytes per second (0: none). Default 0.
    pub rate_bytes_per_second: u64,
    /// A transfer with nothing acknowledged for this long resumes from the
    /// last acknowledged offsets, seconds. Default 10.
    pub stall_secs: u64,
    /// Send a follower whose state is a little behind only the L0 tables it
    /// lacks (a delta), when the leader's tables can show that they hold
    /// every write since the follower's durable marker; else a full
    /// checkpoint. Default true.
    pub deltas: bool,
    /// A file is sent zstd-compressed only if its first chunk shrinks by at
    /// least this many percent (100: never compress). The tables are
    /// compressed already (a second pass saved 2-3% in
    /// `docs/benchmarks.md`), and zstd's fastest level runs at about 1.5 GB/s
    /// on one core: a saving of S percent pays for its CPU only on links
    /// slower than about S% of that (15 MB/s per percent). Default 10.
    pub compress_saving_percent_min: u8,
}

impl Default for SnapshotSettings {
    fn default() -> Self {
        SnapshotSettings {
            release_margin_entries: 10_000,
            release_margin_bytes: 64 << 20,
            release_check_ms: 1000,
            checkpoints_max: 2,
            transfers_max: 2,
            connections_max: 4,
            saves_max: 2,
            chunk_bytes: 1 << 20,
            window_bytes: 32 << 20,
            rate_bytes_per_second: 0,
            stall_secs: 10,
            deltas: true,
            compress_saving_percent_min: 10,
        }
    }
}

impl SnapshotSettings {
    /// The transfer configuration these settings give.
    pub fn transfer_config(&self) -> cairn_snapshot_transfer::Config {
        let mut c = cairn_snapshot_transfer::Config::default();
        c.chunk_bytes_max = self.chunk_bytes.max(4096);
        c.window_bytes_max = self.window_bytes.max(u64::from(c.chunk_bytes_max));
        c.window_chunks_max = (c.window_bytes_max / u64::from(c.chunk_bytes_max)).clamp(1, 1024) as usize;
        c.sync_bytes = (c.window_bytes_max / 2).max(u64::from(c.chunk_bytes_max));
        c.rate_bytes_per_second = (self.rate_bytes_per_second > 0).then_some(self.rate_bytes_per_second);
        c.stall_timeout = Duration::from_secs(self.stall_secs.max(1));
        c.compress_saving_percent_min = self.compress_saving_percent_min;
        c
    }
}

/// Every bound on a queue, a window, a message and a request.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct Limits {
    /// Longest key, bytes. Default and most
    /// [`cairn_kv_client::protocol::KEY_BYTES_MAX`] (64 KiB less 16 bytes).
    pub key_bytes_max: usize,
    /// Longest value, bytes. Default 1 MiB (at most 16 MiB, the LSM's limit).
    pub value_bytes_max: usize,
    /// Largest request frame, bytes. Default 4 MiB.
    pub request_bytes_max: usize,
    /// Bytes of client requests a node holds at once, from the moment a
    /// request's length is read until its answer is handed to the writer
    /// (proposals waiting, in the log, being applied). A request that would
    /// go over waits before its bytes are read, so QUIC flow control slows
    /// the client; nothing is refused. At least `request_bytes_max`, at
    /// most 4 GiB - 1.
    /// Default 64 MiB.
    pub requests_bytes_max: usize,
    /// Largest peer frame (a Raft message), bytes. Default 64 MiB.
    pub peer_frame_bytes_max: usize,
    /// Concurrent request streams per client connection, and requests in
    /// progress at once on one request pipe. Default 256.
    pub streams_per_connection_max: u32,
    /// Proposals waiting for the Raft task. Default 4096.
    pub proposal_queue_max: usize,
    /// Messages queued per peer before it is reported unreachable. Default 4096.
    pub peer_queue_max: usize,
    /// Incoming peer messages waiting for the Raft task. Default 8192.
    pub inbound_queue_max: usize,
    /// Write jobs waiting for the WAL thread. Default 1024.
    pub wal_queue_max: usize,
    /// Apply jobs waiting for the apply worker. Default 1024.
    pub apply_queue_max: usize,
    /// Bytes of committed entries handed to the apply worker and not yet
    /// applied (queued or in progress); more wait in the log until it
    /// catches up (Raft's `applying_bytes_max`). Default 64 MiB.
    pub applying_bytes_max: u64,
    /// Bytes of proposals a leader holds until they are committed and
    /// durable on it; a proposal over the bound is refused as busy (the
    /// client library retries). Raft's `uncommitted_bytes_max`. Default 64 MiB.
    pub uncommitted_bytes_max: u64,
    /// Reads waiting for a read index. Default 4096.
    pub pending_reads_max: usize,
    /// Pairs in one scan answer at most. Default 10,000.
    pub scan_pairs_max: u32,
    /// Responses kept per session. Default 1024.
    pub session_responses_max: usize,
    /// Operations in one write batch, and comparisons plus operations in
    /// one transaction. Default 1024.
    pub txn_ops_max: usize,
    /// Leases at once. Default 10,000.
    pub leases_max: usize,
    /// Leases at once granted to one client (by its session id), so that a
    /// client granting in a loop cannot take every lease. Default 1,000.
    pub leases_per_client_max: usize,
    /// Watch streams at once. Default 10,000.
    pub watchers_max: usize,
    /// Applied batches of events buffered for watchers; a watcher further
    /// behind is ended as too slow (it resumes). Default 1024.
    pub watch_buffer_batches: usize,
    /// The same bound in bytes of events (keys, values, previous values):
    /// a watcher that reads a batch with more than this published after it
    /// is ended as too slow (it resumes from the history), and one whose
    /// client takes nothing for 10 s is dropped. At least 64 KiB. Default
    /// 64 MiB.
    pub watch_buffer_bytes: u64,
    /// Revisions of history kept; the leader compacts the history beyond
    /// (checked every 10 s). Default 100,000.
    pub history_revisions_max: u64,
    /// Age of the history kept, ms (0: no bound by age, only by
    /// `history_revisions_max`). The leader samples the revision as time
    /// passes and compacts the history older than this; a new leader starts
    /// sampling afresh, so it first compacts by age once it has led this
    /// long (etcd's periodic compactor behaves the same). Default 0.
    pub history_retention_ms: u64,
    /// Keys attached to one lease. Default 10,000.
    pub keys_per_lease_max: usize,
    /// Client connections at once. Default 1024.
    pub client_connections_max: usize,
    /// QUIC flow-control window of a client connection, bytes, each way:
    /// what a client may send that the node has not read yet, and what the
    /// node buffers for a client that has not acknowledged it. From 64 KiB
    /// to 4 GiB. Default 4 MiB.
    pub client_window_bytes: u64,
    /// The same for a connection between peers (Raft messages and snapshot
    /// transfers share it). From 64 KiB to 4 GiB. Default 32 MiB.
    pub peer_window_bytes: u64,
    /// The UDP socket's kernel buffers (`SO_RCVBUF`, `SO_SNDBUF`), bytes
    /// each: datagrams that arrive while the node is busy wait there instead
    /// of being dropped (each drop costs QUIC a retransmission and a cut of
    /// its congestion window). The kernel caps them at `net.core.rmem_max`
    /// and `wmem_max`; the node logs a warning when it got less. From 64 KiB
    /// to 1 GiB. Default 4 MiB.
    pub udp_buffer_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            key_bytes_max: cairn_kv_client::protocol::KEY_BYTES_MAX,
            value_bytes_max: 1 << 20,
            request_bytes_max: 4 << 20,
            requests_bytes_max: 64 << 20,
            peer_frame_bytes_max: 64 << 20,
            streams_per_connection_max: 256,
            proposal_queue_max: 4096,
            peer_queue_max: 4096,
            inbound_queue_max: 8192,
            wal_queue_max: 1024,
            apply_queue_max: 1024,
            applying_bytes_max: 64 << 20,
            uncommitted_bytes_max: 64 << 20,
            pending_reads_max: 4096,
            scan_pairs_max: 10_000,
            session_responses_max: 1024,
            txn_ops_max: 1024,
            leases_max: 10_000,
            leases_per_client_max: 1_000,
            watchers_max: 10_000,
            watch_buffer_batches: 1024,
            watch_buffer_bytes: 64 << 20,
            history_revisions_max: 100_000,
            history_retention_ms: 0,
            keys_per_lease_max: 10_000,
            client_connections_max: 1024,
            client_window_bytes: 4 << 20,
            peer_window_bytes: 32 << 20,
            udp_buffer_bytes: 4 << 20,
        }
    }
}

/// A session's time to live when the configuration names none, seconds.
pub const SESSION_TTL_DEFAULT_SECS: u64 = 3600;
/// Default of [`Config::blob_value_bytes_min`]: the 1 KiB values of a
/// bulk load go to blob files, coordination data (a few hundred bytes)
/// stays in the tables.
pub const BLOB_VALUE_BYTES_MIN_DEFAULT: usize = 512;

/// The TOML file: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    id: Option<u64>,
    name: Option<String>,
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    advertise: Option<String>,
    initial_cluster: Option<String>,
    join: Option<bool>,
    peer_addr_override: Option<String>,
    cluster_name: Option<String>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_tokens: Option<Vec<String>>,
    client_token_file: Option<PathBuf>,
    tick_ms: Option<u64>,
    election_ticks: Option<u32>,
    heartbeat_ticks: Option<u32>,
    session_ttl_secs: Option<u64>,
    memtable_bytes: Option<usize>,
    block_cache_bytes: Option<u64>,
    blob_value_bytes_min: Option<usize>,
    entry_cache_bytes: Option<u64>,
    wal_segment_bytes: Option<u64>,
    metrics_listen: Option<SocketAddr>,
    log_format: Option<String>,
    limits: Option<Limits>,
    snapshot: Option<SnapshotSettings>,
    quota_bytes: Option<u64>,
    quota_check_ms: Option<u64>,
}

/// Flags of `kv-server run` (each also a `CAIRN_*` variable).
#[derive(Debug, Default, clap::Args)]
pub struct RunArgs {
    /// A TOML configuration file.
    #[arg(long, env = "CAIRN_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's id.
    #[arg(long, env = "CAIRN_ID")]
    pub id: Option<u64>,
    /// A name for people.
    #[arg(long, env = "CAIRN_NAME")]
    pub name: Option<String>,
    /// Data directory.
    #[arg(long, env = "CAIRN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on (UDP for QUIC, TCP on the same port for
    /// snapshot transfers).
    #[arg(long, env = "CAIRN_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address others reach this node at.
    #[arg(long, env = "CAIRN_ADVERTISE")]
    pub advertise: Option<String>,
    /// Initial members: `1=host:port,2=host:port,...` (bootstrap only).
    #[arg(long, env = "CAIRN_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// Join an existing cluster.
    #[arg(long, env = "CAIRN_JOIN")]
    pub join: bool,
    /// Dial peers here instead: `2=host:port,...`.
    #[arg(long, env = "CAIRN_PEER_ADDR_OVERRIDE")]
    pub peer_addr_override: Option<String>,
    /// Cluster name.
    #[arg(long, env = "CAIRN_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// CA certificate (PEM).
    #[arg(long, env = "CAIRN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Node certificate (PEM).
    #[arg(long, env = "CAIRN_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Node private key (PEM).
    #[arg(long, env = "CAIRN_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// A file with one client token per line.
    #[arg(long, env = "CAIRN_CLIENT_TOKEN_FILE")]
    pub client_token_file: Option<PathBuf>,
    /// Tick length in milliseconds.
    #[arg(long, env = "CAIRN_TICK_MS")]
    pub tick_ms: Option<u64>,
    /// Prometheus endpoint address.
    #[arg(long, env = "CAIRN_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log format: text or json.
    #[arg(long, env = "CAIRN_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Bytes of the LSM memtable (a flush, which lets the log be released, follows when it fills).
    #[arg(long, env = "CAIRN_MEMTABLE_BYTES")]
    pub memtable_bytes: Option<usize>,
    /// Values at least this long go to the LSM's blob files (0: none do).
    #[arg(long, env = "CAIRN_BLOB_VALUE_BYTES_MIN")]
    pub blob_value_bytes_min: Option<usize>,
    /// Entries kept below the state's durable marker when the log is released.
    #[arg(long, env = "CAIRN_RELEASE_MARGIN_ENTRIES")]
    pub release_margin_entries: Option<u64>,
    /// Send deltas to followers a little behind (`[snapshot] deltas`).
    #[arg(long, env = "CAIRN_SNAPSHOT_DELTAS")]
    pub snapshot_deltas: Option<bool>,
    /// Bytes the data directory may hold before the space alarm is raised.
    #[arg(long, env = "CAIRN_QUOTA_BYTES")]
    pub quota_bytes: Option<u64>,
    /// Bytes of a WAL segment (a new one is made, and the log can be released, a segment at a time).
    #[arg(long, env = "CAIRN_WAL_SEGMENT_BYTES")]
    pub wal_segment_bytes: Option<u64>,
    /// How often the data directory is measured against the quota, ms.
    #[arg(long, env = "CAIRN_QUOTA_CHECK_MS")]
    pub quota_check_ms: Option<u64>,
    /// Age of the watch history kept, ms (0: bounded by revisions only);
    /// overrides `[limits] history_retention_ms`.
    #[arg(long, env = "CAIRN_HISTORY_RETENTION_MS")]
    pub history_retention_ms: Option<u64>,
    /// Bytes of client requests held at once; overrides `[limits]
    /// requests_bytes_max`.
    #[arg(long, env = "CAIRN_REQUESTS_BYTES_MAX")]
    pub requests_bytes_max: Option<usize>,
}

/// The log filter variable (read by the tracing set-up, not a flag).
pub const LOG_FILTER_VAR: &str = "CAIRN_LOG";

/// The `CAIRN_*` variables a setting reads: every [`RunArgs`] flag's, and [`LOG_FILTER_VAR`].
fn known_vars() -> Vec<String> {
    use clap::Args;
    let cmd = RunArgs::augment_args(clap::Command::new("run"));
    let mut vars: Vec<String> =
        cmd.get_arguments().filter_map(|a| a.get_env()).map(|v| v.to_string_lossy().into_owned()).collect();
    vars.push(LOG_FILTER_VAR.to_string());
    vars
}

/// Refuses `CAIRN_*` variables no setting reads (a typo would otherwise be ignored).
pub fn check_env(vars: impl Iterator<Item = String>) -> Result<(), ConfigError> {
    let known = known_vars();
    for v in vars {
        if v.starts_with("CAIRN_") && !v.starts_with("CAIRN_TEST_") && !known.contains(&v) {
            return Err(ConfigError(format!("unknown environment variable {v} (known: {})", known.join(", "))));
        }
    }
    Ok(())
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_members(s: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| ConfigError(format!("`{part}` is not `id=host:port`")))?;
        let id: u64 = id.trim().parse().map_err(|_| ConfigError(format!("`{id}` is not a node id")))?;
        if id == 0 {
            return Err(ConfigError("node id 0 is reserved".into()));
        }
        if out.insert(id, addr.trim().to_string()).is_some() {
            return Err(ConfigError(format!("node {id} is listed twice")));
        }
    }
    Ok(out)
}

impl Config {
    /// The configuration from flags (and variables) over a file over defaults.
    pub fn load(args: &RunArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|e| ConfigError(format!("reading {}: {e}", p.display())))?;
                toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError(format!("{}: {e}", p.display())))?
            }
            None => FileConfig::default(),
        };
        let id = args.id.or(file.id).ok_or_else(|| ConfigError("the node id is required (--id or CAIRN_ID)".into()))?;
        if id == 0 {
            return Err(ConfigError("node id 0 is reserved".into()));
        }
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7100u16.saturating_add(id.min(900) as u16))));
        let advertise = args.advertise.clone().or(file.advertise).unwrap_or_else(|| listen.to_string());
        let initial_cluster = match args.initial_cluster.as_deref().or(file.initial_cluster.as_deref()) {
            Some(s) => parse_members(s)?,
            None => BTreeMap::from([(id, advertise.clone())]),
        };
        let join = args.join || file.join.unwrap_or(false);
        if !join && !initial_cluster.contains_key(&id) {
            return Err(ConfigError(format!(
                "node {id} is not in the initial cluster (start it with --join to add it later)"
            )));
        }
        let peer_addr_override = match args.peer_addr_override.as_deref().or(file.peer_addr_override.as_deref()) {
            Some(s) => parse_members(s)?,
            None => BTreeMap::new(),
        };
        let certs = PathBuf::from("certs");
        let mut client_tokens = file.client_tokens.unwrap_or_default();
        if let Some(p) = args.client_token_file.as_ref().or(file.client_token_file.as_ref()) {
            client_tokens.extend(read_tokens(p)?);
        }
        if client_tokens.is_empty() {
            return Err(ConfigError("no client token configured (client_tokens or --client-token-file)".into()));
        }
        let log_format = args.log_format.clone().or(file.log_format).unwrap_or_else(|| "text".into());
        if log_format != "text" && log_format != "json" {
            return Err(ConfigError(format!("log format `{log_format}` is neither `text` nor `json`")));
        }
        let mut limits = file.limits.unwrap_or_default();
        if let Some(ms) = args.history_retention_ms {
            limits.history_retention_ms = ms;
        }
        if let Some(b) = args.requests_bytes_max {
            limits.requests_bytes_max = b;
        }
        if limits.requests_bytes_max < limits.request_bytes_max {
            return Err(ConfigError(format!(
                "limits: requests_bytes_max ({}) must be at least request_bytes_max ({})",
                limits.requests_bytes_max, limits.request_bytes_max
            )));
        }
        if limits.requests_bytes_max > u32::MAX as usize {
            return Err(ConfigError(format!(
                "limits: requests_bytes_max ({}) must be at most 4 GiB - 1 ({})",
                limits.requests_bytes_max,
                u32::MAX
            )));
        }
        let mut snapshot = file.snapshot.unwrap_or_default();
        if let Some(d) = args.snapshot_deltas {
            snapshot.deltas = d;
        }
        if let Some(n) = args.release_margin_entries {
            snapshot.release_margin_entries = n;
        }
        if snapshot.compress_saving_percent_min > 100 {
            return Err(ConfigError("snapshot: compress_saving_percent_min is a percentage (0 to 100)".into()));
        }
        if snapshot.checkpoints_max == 0
            || snapshot.transfers_max == 0
            || snapshot.saves_max == 0
            || snapshot.connections_max == 0
        {
            return Err(ConfigError(
                "snapshot: checkpoints_max, transfers_max, saves_max and connections_max must be at least 1".into(),
            ));
        }
        // A stored value is the value behind a header; both must fit cairn-lsm.
        let value_max = cairn_lsm::VALUE_BYTES_MAX - crate::state::VALUE_HEADER_BYTES;
        if limits.value_bytes_max > value_max
            || limits.key_bytes_max > cairn_kv_client::protocol::KEY_BYTES_MAX
            || limits.key_bytes_max == 0
        {
            return Err(ConfigError(format!(
                "limits: keys at most {} bytes (64 KiB less 16), values at most {value_max} bytes (16 MiB less \
                 the stored value's header)",
                cairn_kv_client::protocol::KEY_BYTES_MAX
            )));
        }
        let window = 64u64 << 10..=u64::from(u32::MAX);
        if !window.contains(&limits.client_window_bytes) || !window.contains(&limits.peer_window_bytes) {
            return Err(ConfigError("limits: client_window_bytes and peer_window_bytes from 64 KiB to 4 GiB".into()));
        }
        if limits.watch_buffer_bytes < 64 << 10 {
            return Err(ConfigError("limits: watch_buffer_bytes must be at least 64 KiB".into()));
        }
        if !(64u64 << 10..=1 << 30).contains(&limits.udp_buffer_bytes) {
            return Err(ConfigError("limits: udp_buffer_bytes from 64 KiB to 1 GiB".into()));
        }
        if limits.applying_bytes_max == 0 || limits.uncommitted_bytes_max == 0 {
            return Err(ConfigError("limits: applying_bytes_max and uncommitted_bytes_max must be positive".into()));
        }
        let cfg = Config {
            id,
            name: args.name.clone().or(file.name).unwrap_or_else(|| format!("node-{id}")),
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(format!("cairn-data/node-{id}"))),
            listen,
            advertise,
            initial_cluster,
            join,
            peer_addr_override,
            cluster_name: args.cluster_name.clone().or(file.cluster_name).unwrap_or_else(|| "cairn".into()),
            tls_ca: args.tls_ca.clone().or(file.tls_ca).unwrap_or_else(|| certs.join("ca.pem")),
            tls_cert: args.tls_cert.clone().or(file.tls_cert).unwrap_or_else(|| certs.join(format!("node-{id}.pem"))),
            tls_key: args.tls_key.clone().or(file.tls_key).unwrap_or_else(|| certs.join(format!("node-{id}.key"))),
            client_tokens,
            limits,
            tick: Duration::from_millis(args.tick_ms.or(file.tick_ms).unwrap_or(100).max(1)),
            election_ticks: file.election_ticks.unwrap_or(10),
            heartbeat_ticks: file.heartbeat_ticks.unwrap_or(1),
            session_ttl: Duration::from_secs(file.session_ttl_secs.unwrap_or(SESSION_TTL_DEFAULT_SECS)),
            memtable_bytes: args.memtable_bytes.or(file.memtable_bytes).unwrap_or(64 << 20).max(64 << 10),
            block_cache_bytes: file.block_cache_bytes.unwrap_or(64 << 20),
            blob_value_bytes_min: args
                .blob_value_bytes_min
                .or(file.blob_value_bytes_min)
                .unwrap_or(BLOB_VALUE_BYTES_MIN_DEFAULT),
            entry_cache_bytes: file.entry_cache_bytes.unwrap_or(64 << 20),
            wal_segment_bytes: args.wal_segment_bytes.or(file.wal_segment_bytes).unwrap_or(64 << 20).max(64 << 10),
            metrics_listen: args.metrics_listen.or(file.metrics_listen),
            log_format,
            snapshot,
            quota_bytes: args.quota_bytes.or(file.quota_bytes).unwrap_or(8 << 30),
            quota_check_ms: args.quota_check_ms.or(file.quota_check_ms).unwrap_or(2000).max(100),
        };
        Ok(cfg)
    }

    /// The cluster id: a hash of the cluster name and the initial members
    /// (the same on every node bootstrapped together).
    pub fn cluster_id(&self) -> u64 {
        let mut s = self.cluster_name.clone();
        for (id, addr) in &self.initial_cluster {
            s.push_str(&format!(";{id}={addr}"));
        }
        xxhash_rust::xxh3::xxh3_64(s.as_bytes()).max(1)
    }

    /// The address to dial for `peer`: the override, else the initial cluster's.
    pub fn peer_addr(&self, peer: u64) -> Option<String> {
        self.peer_addr_override.get(&peer).or_else(|| self.initial_cluster.get(&peer)).cloned()
    }
}

fn read_tokens(p: &Path) -> Result<Vec<String>, ConfigError> {
    let text = std::fs::read_to_string(p).map_err(|e| ConfigError(format!("reading {}: {e}", p.display())))?;
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_variables_are_refused() {
        assert!(toml::from_str::<FileConfig>("id = 1\nlisten_addr = \"x\"").is_err());
        assert!(toml::from_str::<FileConfig>("[limits]\nvalue_bytes = 3").is_err());
        assert!(toml::from_str::<FileConfig>("id = 1\n[limits]\nvalue_bytes_max = 3").is_ok());
        assert!(check_env(["CAIRN_ID".to_string(), "CAIRN_TEST_FAILPOINT".into(), "PATH".into()].into_iter()).is_ok());
        assert!(check_env(["CAIRN_DATADIR".to_string()].into_iter()).is_err());
    }

    #[test]
    fn a_request_budget_below_one_request_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, "t\n").expect("tokens");
        let args = |budget: usize| RunArgs {
            id: Some(1),
            client_token_file: Some(tokens.clone()),
            requests_bytes_max: Some(budget),
            ..RunArgs::default()
        };
        let err = Config::load(&args(1 << 20)).expect_err("a budget under request_bytes_max");
        assert!(err.0.contains("requests_bytes_max"), "{}", err.0);
        assert_eq!(Config::load(&args(4 << 20)).expect("the smallest budget").limits.requests_bytes_max, 4 << 20);
        let err = Config::load(&args(1 << 32)).expect_err("a budget of 4 GiB");
        assert!(err.0.contains("at most 4 GiB"), "{}", err.0);
        assert!(Config::load(&args(u32::MAX as usize)).is_ok(), "the largest budget");
        let cfg = Config::load(&RunArgs { requests_bytes_max: None, ..args(0) }).expect("defaults");
        assert_eq!(cfg.limits.requests_bytes_max, 64 << 20);
    }

    /// Loads node 1's configuration from a file holding `table` (such as
    /// `limits`) with the keys of `body`.
    fn load_table(table: &str, body: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, "t\n").expect("tokens");
        let file = dir.path().join("cairn.toml");
        std::fs::write(&file, format!("id = 1\n[{table}]\n{body}\n")).expect("config");
        Config::load(&RunArgs { config: Some(file), client_token_file: Some(tokens), ..RunArgs::default() })
    }

    #[test]
    fn windows_and_raft_byte_bounds_are_checked() {
        let load = |limits: &str| load_table("limits", limits);
        for bad in [
            "client_window_bytes = 1000",
            "peer_window_bytes = 5000000000",
            "applying_bytes_max = 0",
            "udp_buffer_bytes = 1000",
            "udp_buffer_bytes = 2000000000",
            "watch_buffer_bytes = 0",
        ] {
            let err = load(bad).expect_err(bad);
            assert!(err.0.contains(bad.split(' ').next().unwrap_or_default()), "{bad}: {}", err.0);
        }
        let cfg = load("client_window_bytes = 65536\npeer_window_bytes = 4294967295").expect("the bounds");
        assert_eq!((cfg.limits.client_window_bytes, cfg.limits.peer_window_bytes), (65536, 4294967295));
        let cfg = load("").expect("defaults");
        assert_eq!((cfg.limits.client_window_bytes, cfg.limits.peer_window_bytes), (4 << 20, 32 << 20));
        assert_eq!((cfg.limits.applying_bytes_max, cfg.limits.uncommitted_bytes_max), (64 << 20, 64 << 20));
        assert_eq!(cfg.limits.udp_buffer_bytes, 4 << 20);
    }

    #[test]
    fn key_and_value_limits_leave_room_for_the_state_records() {
        let load = |limits: &str| load_table("limits", limits);
        let key_max = cairn_kv_client::protocol::KEY_BYTES_MAX;
        let value_max = cairn_lsm::VALUE_BYTES_MAX - crate::state::VALUE_HEADER_BYTES;
        let cfg = load(&format!("key_bytes_max = {key_max}\nvalue_bytes_max = {value_max}")).expect("the largest");
        assert_eq!((cfg.limits.key_bytes_max, cfg.limits.value_bytes_max), (key_max, value_max));
        for bad in [
            format!("key_bytes_max = {}", key_max + 1),
            "key_bytes_max = 65536".to_string(),
            "key_bytes_max = 0".to_string(),
            format!("value_bytes_max = {}", value_max + 1),
            "value_bytes_max = 16777216".to_string(),
        ] {
            let err = load(&bad).expect_err(&bad);
            assert!(err.0.contains("keys at most"), "{bad}: {}", err.0);
        }
    }

    #[test]
    fn snapshot_compression_is_a_percentage_handed_to_the_transfer() {
        let load = |snapshot: &str| load_table("snapshot", snapshot);
        let err = load("compress_saving_percent_min = 101").expect_err("over 100%");
        assert!(err.0.contains("compress_saving_percent_min"), "{}", err.0);
        let cfg = load("").expect("defaults");
        assert_eq!(cfg.snapshot.transfer_config().compress_saving_percent_min, 10);
        let cfg = load("compress_saving_percent_min = 1").expect("1%");
        assert_eq!(cfg.snapshot.transfer_config().compress_saving_percent_min, 1);
        for zero in ["checkpoints_max = 0", "transfers_max = 0", "saves_max = 0"] {
            let err = load(zero).expect_err(zero);
            assert!(err.0.contains("at least 1"), "{zero}: {}", err.0);
        }
        assert_eq!(load("saves_max = 3").expect("3").snapshot.saves_max, 3);
    }

    #[test]
    fn members_parse_and_bad_ones_are_refused() {
        let m = parse_members("1=a:1, 2=b:2").expect("parse");
        assert_eq!(m.len(), 2);
        assert!(parse_members("0=a:1").is_err());
        assert!(parse_members("1=a:1,1=b:2").is_err());
        assert!(parse_members("x").is_err());
    }
}
