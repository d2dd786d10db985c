//! The rkyv types of the client protocol (re-exported by `protocol`).

use rkyv::{Archive, Deserialize, Serialize};

/// A client's place in its session (the Raft thesis, §6.3): every write
/// carries it, so a retried write applies once.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub struct Session {
    /// The client id (the index of its register entry).
    pub client_id: u64,
    /// This request's sequence number (from 1, rising by one per write).
    pub seq: u64,
    /// The lowest sequence number whose response the client has not yet
    /// received: the server may forget the responses below it.
    pub first_unacked: u64,
}

/// One change in a write.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub enum WriteOp {
    /// Set a key.
    Put {
        /// The key (1 byte up to the key limit).
        key: Vec<u8>,
        /// The value (up to the value limit).
        value: Vec<u8>,
    },
    /// Set a key and attach it to a lease (deleted when the lease ends).
    PutWithLease {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// The lease (granted, not expired).
        lease: u64,
    },
    /// Remove a key (absent keys are fine).
    Delete {
        /// The key.
        key: Vec<u8>,
    },
    /// Remove every key in `[start, end)`.
    DeleteRange {
        /// First key removed.
        start: Vec<u8>,
        /// First key kept (greater than `start`).
        end: Vec<u8>,
    },
}

/// A key's revisions (etcd's meaning): the cluster revision of the write
/// that created it (since it last did not exist), of the last write to it,
/// and the number of writes since it was created.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub struct KeyMeta {
    /// Revision of the write that created the key.
    pub create_revision: u64,
    /// Revision of the last write to the key.
    pub mod_revision: u64,
    /// Writes to the key since it was created (1 after the first).
    pub version: u64,
    /// The lease the key is attached to (0: none; leases come later).
    pub lease: u64,
}

/// A key, its value and its revisions.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// Its revisions.
    pub meta: KeyMeta,
}

/// What happened to a key.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub enum EventKind {
    /// The key was set.
    Put,
    /// The key was deleted (by a delete, a range delete or its lease's end).
    Delete,
}

/// One change of a key, at a revision.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub struct WatchEvent {
    /// The revision of the write that made it.
    pub revision: u64,
    /// Put or delete.
    pub kind: EventKind,
    /// The key and, for a put, its new value and revisions (for a delete:
    /// an empty value, `mod_revision` the delete's revision).
    pub kv: KeyValue,
    /// What the key held before (when the watch asked for it).
    pub prev: Option<KeyValue>,
}

/// Why the node ended a watch.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub enum WatchEnd {
    /// The watcher fell too far behind the node's event buffer: watch again
    /// from `resume_from` (nothing before it was lost).
    TooSlow {
        /// The first revision not delivered.
        resume_from: u64,
    },
    /// The revision asked is no longer in the history: `oldest` is the
    /// oldest revision still available.
    Compacted {
        /// The oldest revision watchable.
        oldest: u64,
    },
}

/// What a transaction's comparison looks at, and the operand.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub enum CompareTarget {
    /// The value (a missing key fails every value comparison).
    Value(Vec<u8>),
    /// The version (0 for a missing key).
    Version(u64),
    /// The create revision (0 for a missing key).
    CreateRevision(u64),
    /// The modification revision (0 for a missing key).
    ModRevision(u64),
    /// Whether the key exists (`false < true` for less and greater).
    Exists(bool),
}

/// How a comparison compares: `key's field OP operand`.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub enum CompareOp {
    /// Equal.
    Equal,
    /// Not equal.
    NotEqual,
    /// The key's field is less than the operand.
    Less,
    /// The key's field is greater than the operand.
    Greater,
}

/// One comparison of a transaction.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub struct Compare {
    /// The key compared.
    pub key: Vec<u8>,
    /// The comparison.
    pub op: CompareOp,
    /// The field and the operand.
    pub target: CompareTarget,
}

/// One operation of a transaction's branch.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub enum TxnOp {
    /// Set a key; `prev_kv`: return what it held.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// Return the previous key-value.
        prev_kv: bool,
        /// Attach the key to this lease (0: none; a put without a lease detaches it).
        lease: u64,
    },
    /// Remove a key; `prev_kv`: return what it held.
    Delete {
        /// The key.
        key: Vec<u8>,
        /// Return the previous key-value.
        prev_kv: bool,
    },
    /// Remove every key in `[start, end)`.
    DeleteRange {
        /// First key removed.
        start: Vec<u8>,
        /// First key kept.
        end: Vec<u8>,
    },
    /// Read a key, as the transaction's earlier operations left it.
    Get {
        /// The key.
        key: Vec<u8>,
    },
}

/// The result of one operation of a transaction, in order.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub enum TxnOpResult {
    /// A put; the previous key-value when asked and present.
    Put {
        /// What the key held before.
        prev: Option<KeyValue>,
    },
    /// A delete: how many keys it removed (0 or 1) and, when asked, what the key held.
    Delete {
        /// Keys removed.
        deleted: u64,
        /// What the key held before.
        prev: Option<KeyValue>,
    },
    /// A range delete: how many keys it removed.
    DeleteRange {
        /// Keys removed.
        deleted: u64,
    },
    /// A get.
    Get {
        /// The key-value, if present.
        kv: Option<KeyValue>,
    },
}

/// How fresh a read must be.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[rkyv(derive(Debug, PartialEq), attr(allow(missing_docs)))]
pub enum Consistency {
    /// Linearizable: the node confirms with a quorum (ReadIndex) and serves
    /// once it has applied up to that index. The default.
    #[default]
    Linearizable,
    /// Serializable: served from what this node has applied, possibly stale.
    Serializable,
}

/// A request.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub enum Request {
    /// The first request of a connection.
    Hello {
        /// A client token from the server's configuration.
        token: String,
    },
    /// Start a session; the answer is [`Response::Registered`].
    Register,
    /// Apply `ops` atomically, once.
    Write {
        /// The client's session.
        session: Session,
        /// The changes, applied together.
        ops: Vec<WriteOp>,
    },
    /// If every comparison holds, apply `success`, else `failure`:
    /// atomically, once (through the session), at one new revision if
    /// anything changes.
    Txn {
        /// The client's session.
        session: Session,
        /// The comparisons (all must hold).
        compares: Vec<Compare>,
        /// Operations when they hold.
        success: Vec<TxnOp>,
        /// Operations when one does not.
        failure: Vec<TxnOp>,
    },
    /// Stream the changes of the keys in `[start, end)` (`end = None`: the
    /// key `start` alone; an empty `end`: every key from `start` on) from
    /// revision `start_revision` (0: from now), on a stream of its own: the
    /// node answers [`Response::WatchProgress`] first (the revision it starts
    /// after), then [`Response::WatchEvents`] in revision order and a
    /// progress frame every `progress_ms` when idle, until the client closes
    /// the stream or the node ends it ([`Response::WatchEnded`]).
    Watch {
        /// First key.
        start: Vec<u8>,
        /// End of the range (see above).
        end: Option<Vec<u8>>,
        /// First revision to deliver (0: the next one).
        start_revision: u64,
        /// Send each event's previous key-value.
        prev_kv: bool,
        /// Idle time before a progress frame, ms (0: none).
        progress_ms: u64,
    },
    /// Drop the history below `revision` (answer: [`Response::Written`]).
    Compact {
        /// The oldest revision to keep.
        revision: u64,
    },
    /// Grant a lease of `ttl_ms` (answer: [`Response::LeaseGranted`]).
    LeaseGrant {
        /// Its time to live, ms (at least 1 s).
        ttl_ms: u64,
        /// The asking client's session id: its leases count against the
        /// cluster's `leases_per_client_max` (0: the shared anonymous budget).
        client_id: u64,
    },
    /// Restart a lease's clock (the leader only; answer: [`Response::LeaseAlive`]).
    LeaseKeepAlive {
        /// The lease.
        id: u64,
    },
    /// Revoke a lease now: its keys are deleted (answer: [`Response::Written`]).
    LeaseRevoke {
        /// The lease.
        id: u64,
    },
    /// A lease's TTL, time left and keys (answer: [`Response::LeaseInfo`]).
    LeaseTimeToLive {
        /// The lease.
        id: u64,
    },
    /// Every lease (answer: [`Response::Leases`]).
    LeaseList,
    /// Read one key.
    Get {
        /// The key.
        key: Vec<u8>,
        /// How fresh.
        consistency: Consistency,
        /// 0: the current state. Otherwise the state as it was at this
        /// revision, while the history holds it (else [`ErrorCode::Compacted`]).
        revision: u64,
    },
    /// Read keys in `[start, end)` (or from `start` to the end of the key
    /// space), in order, at most `limit` of them (0: the server's page bound).
    Scan {
        /// First key.
        start: Vec<u8>,
        /// First key not returned; `None` for no bound.
        end: Option<Vec<u8>>,
        /// Most pairs in the answer.
        limit: u32,
        /// Return keys with empty values.
        keys_only: bool,
        /// How fresh.
        consistency: Consistency,
        /// 0: the current state. Otherwise the state as it was at this
        /// revision, while the history holds it (else [`ErrorCode::Compacted`]).
        revision: u64,
    },
    /// This node's view of the cluster.
    Status {
        /// Also hash the whole replicated state (a full scan).
        with_hash: bool,
    },
    /// Can the cluster commit a proposal now? Commits an empty entry.
    Health,
    /// The members.
    MemberList,
    /// Ask the leader to hand leadership to `to`.
    TransferLeader {
        /// The node to lead.
        to: u64,
    },
    /// Add node `id`, reached at `addr`, as a learner (or straight as a voter).
    MemberAdd {
        /// The new node's id (never one used before).
        id: u64,
        /// Its peer address, `host:port`.
        addr: String,
        /// Add it as a learner (it then catches up before it is promoted).
        learner: bool,
    },
    /// Make learner `id` a voter (refused until it has caught up).
    MemberPromote {
        /// The learner.
        id: u64,
    },
    /// Remove node `id`; its id is refused for good afterwards.
    MemberRemove {
        /// The node.
        id: u64,
    },
    /// Stream a consistent checkpoint of the state: a `SnapshotHeader`
    /// frame, then the bytes of each file it lists, in order.
    SnapshotSave,
    /// Raise the space alarm for `node` (a node over its quota sends this),
    /// or clear it (`raise: false`; `node` 0 clears every node's).
    Alarm {
        /// The node over its quota (0 with `raise: false`: all).
        node: u64,
        /// Raise or clear.
        raise: bool,
    },
    /// Make this stream a request pipe (the stream's first frame; it gets
    /// no answer of its own). From then on, each frame in either direction
    /// is preceded by a request id (u64 LE): the client sends requests
    /// under ids of its choosing, and the node answers each under its id,
    /// in the order they complete. The node works on at most
    /// `streams_per_connection_max` requests of a pipe at once and reads no
    /// further until one ends. A request over the size limit is skipped and
    /// answered `TooLarge`; the pipe goes on. Watch and snapshot save need
    /// streams of their own. One pipe per connection replaces a stream per
    /// request: no stream to open, and answers that complete together leave
    /// in one write.
    Pipe,
}

/// The answer to a request.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub enum Response {
    /// The token was accepted.
    HelloOk {
        /// The node answering.
        node_id: u64,
        /// Its cluster.
        cluster_id: u64,
    },
    /// A new session.
    Registered {
        /// Use it in every [`Session`].
        client_id: u64,
    },
    /// The write applied (once), at this log index.
    Written {
        /// The log index of the entry that applied it.
        index: u64,
        /// The cluster revision after it (raised by one if it changed anything).
        revision: u64,
    },
    /// A transaction applied (once).
    TxnDone {
        /// Whether every comparison held (the success branch ran).
        succeeded: bool,
        /// The log index of the entry that applied it.
        index: u64,
        /// The cluster revision after it.
        revision: u64,
        /// One result per operation of the branch that ran.
        results: Vec<TxnOpResult>,
        /// This is the cached answer to a retry of a transaction that had
        /// already applied: `succeeded` and `revision` are the original's, its
        /// read results are not kept (empty).
        replayed: bool,
    },
    /// Events of a watch, in revision order.
    WatchEvents {
        /// The events.
        events: Vec<WatchEvent>,
        /// Every event of the watch up to this revision was delivered.
        revision: u64,
    },
    /// Every event of the watch up to `revision` was delivered (nothing new, or the start).
    WatchProgress {
        /// The revision.
        revision: u64,
    },
    /// The node ended the watch.
    WatchEnded(WatchEnd),
    /// A lease was granted.
    LeaseGranted {
        /// Its id (the index of the entry that granted it).
        id: u64,
        /// Its time to live, ms.
        ttl_ms: u64,
    },
    /// A lease's clock restarted.
    LeaseAlive {
        /// The lease.
        id: u64,
        /// Its time to live, ms: keep it alive well within it.
        ttl_ms: u64,
    },
    /// A lease.
    LeaseInfo {
        /// The lease.
        id: u64,
        /// Its time to live, ms.
        ttl_ms: u64,
        /// Ms left before the leader revokes it (`None`: asked of a node that does not lead).
        remaining_ms: Option<u64>,
        /// The keys attached to it.
        keys: Vec<Vec<u8>>,
    },
    /// Every lease id.
    Leases(Vec<u64>),
    /// A key's value, if present.
    Value {
        /// The value.
        value: Option<Vec<u8>>,
        /// The applied index the read was served at.
        index: u64,
        /// The key's revisions, when present.
        meta: Option<KeyMeta>,
        /// The cluster revision of the state read.
        revision: u64,
    },
    /// Pairs of a scan.
    Scanned {
        /// Key and value pairs in key order.
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
        /// More pairs follow the last one: scan again from after it.
        more: bool,
        /// The applied index the read was served at.
        index: u64,
        /// The revisions of each pair, in the same order.
        metas: Vec<KeyMeta>,
        /// The cluster revision of the state read.
        revision: u64,
    },
    /// A node's view.
    Status(StatusInfo),
    /// The cluster committed and applied an empty entry at this index.
    Healthy {
        /// Its index.
        index: u64,
    },
    /// The members.
    Members(Vec<MemberInfo>),
    /// A saved snapshot follows: the bytes of `files`, in order.
    SnapshotHeader(SnapshotHeader),
    /// Done.
    Ok,
    /// Refused or failed.
    Error(ErrorInfo),
}

/// What a saved snapshot holds (the first frame of a snapshot file).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub struct SnapshotHeader {
    /// The cluster it comes from.
    pub cluster_id: u64,
    /// The Raft index the state is at.
    pub index: u64,
    /// The term of that index.
    pub term: u64,
    /// The voters as of the snapshot.
    pub voters: Vec<u64>,
    /// The learners as of the snapshot.
    pub learners: Vec<u64>,
    /// The files whose bytes follow, in order.
    pub files: Vec<SnapshotFile>,
}

/// One file of a saved snapshot.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub struct SnapshotFile {
    /// Its name (`table.X` or `manifest.X`).
    pub name: String,
    /// Its length in bytes.
    pub len: u64,
    /// xxh3-64 of its bytes.
    pub checksum: u64,
}

impl SnapshotHeader {
    /// Bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.len).sum()
    }
}

/// A node's view of the cluster.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub struct StatusInfo {
    /// This node.
    pub node_id: u64,
    /// Its name.
    pub name: String,
    /// Its cluster.
    pub cluster_id: u64,
    /// The leader it knows (0: none).
    pub leader_id: u64,
    /// Its role: "leader", "follower", "candidate", "pre-candidate" or "learner".
    pub role: String,
    /// Current term.
    pub term: u64,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// Last log index.
    pub last_index: u64,
    /// Bytes of the Raft log on disk.
    pub wal_bytes: u64,
    /// Bytes of the applied state's tables and blob files on disk.
    pub lsm_bytes: u64,
    /// The LSM's durable marker index (what survives a crash without replay).
    pub durable_index: u64,
    /// Index of the first entry the log still holds (those before it were
    /// released: a snapshot covers them).
    pub first_index: u64,
    /// Snapshots this node installed since it started.
    pub snapshots_installed: u64,
    /// Of those, deltas (L0 tables added to its own state, not a whole new state).
    pub deltas_installed: u64,
    /// Snapshots (checkpoints or deltas) this node sent whole since it
    /// started; a transfer that found the follower holding the state
    /// already sent nothing and is not counted.
    pub snapshots_sent: u64,
    /// Nodes whose space alarm is raised (writes other than deletes are refused).
    pub alarms: Vec<u64>,
    /// Bytes this node's data directory holds (log and state), as last measured.
    pub used_bytes: u64,
    /// This node's space quota in bytes.
    pub quota_bytes: u64,
    /// `(applied index, xxh3 of every replicated key and value)` when asked.
    pub state_hash: Option<(u64, u64)>,
}

/// A member.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub struct MemberInfo {
    /// Node id.
    pub id: u64,
    /// Its address.
    pub addr: String,
    /// A learner (not voting).
    pub learner: bool,
}

/// What went wrong.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug, PartialEq), attr(allow(missing_docs)))]
pub enum ErrorCode {
    /// This node is not the leader; `leader` says who is, if known. The write did not apply.
    NotLeader,
    /// No valid token (or no Hello first). Did not apply.
    Unauthorized,
    /// A key, value or request over the limits. Did not apply.
    TooLarge,
    /// A malformed or invalid request. Did not apply.
    BadRequest,
    /// The session expired or is unknown: register again. Did not apply.
    SessionExpired,
    /// A response for this sequence number was already acknowledged and
    /// dropped: the client reused a sequence number. Did not apply now.
    StaleSequence,
    /// The node could not finish in time (an election, a lost quorum). The
    /// write may have applied: retry with the same session and sequence.
    Unavailable,
    /// The node is shutting down. The write may have applied.
    Stopping,
    /// The cluster refuses writes: its space alarm is raised. Did not apply.
    NoSpace,
    /// Too many requests queued; retry later. Did not apply.
    Busy,
    /// The lease does not exist (never granted, expired or revoked). Did not apply.
    LeaseNotFound,
    /// A read at a revision the history no longer holds; the message names
    /// the oldest revision readable.
    Compacted,
}

impl ErrorCode {
    /// Whether a write answered with this error certainly did not apply.
    pub fn certainly_not_applied(self) -> bool {
        !matches!(self, ErrorCode::Unavailable | ErrorCode::Stopping)
    }
}

/// An error answer.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub struct ErrorInfo {
    /// The kind.
    pub code: ErrorCode,
    /// One sentence for a person.
    pub message: String,
    /// For [`ErrorCode::NotLeader`]: the leader's id and address, if known.
    pub leader: Option<(u64, String)>,
}

impl Response {
    /// An error response.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        Response::Error(ErrorInfo { code, message: message.into(), leader: None })
    }
}
