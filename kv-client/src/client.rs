//! The async client: finds the leader, retries with bounded backoff, keeps its session.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::frame::{self, FrameError};
use crate::protocol::{
    ALPN_CLIENT, Consistency, ErrorCode, ErrorInfo, MemberInfo, Request, Response, SERVER_NAME, Session, StatusInfo,
    WriteOp,
};

/// How a client connects and retries. Every bound is here.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientOptions {
    /// Nodes to try, as `host:port`.
    pub endpoints: Vec<String>,
    /// A client token the servers accept.
    pub token: String,
    /// The cluster CA certificate (PEM) that signed the nodes' certificates.
    pub ca_pem: Vec<u8>,
    /// The name checked in the servers' certificates. Default [`SERVER_NAME`].
    pub server_name: String,
    /// Longest wait for one answer. Default 5 s.
    pub request_timeout: Duration,
    /// Longest wait for a connection (QUIC and TLS handshakes, Hello). A
    /// node that does not answer in time is skipped for `connect_timeout`
    /// afterwards when another endpoint is left to try. Default 1 s.
    pub connect_timeout: Duration,
    /// Longest time a call spends retrying (leader changes, lost
    /// connections) before it gives up. Default 15 s.
    pub retry_deadline: Duration,
    /// First backoff between retries; doubles up to `backoff_max`. Default 20 ms.
    pub backoff_min: Duration,
    /// Longest backoff. Default 500 ms.
    pub backoff_max: Duration,
    /// Largest response frame accepted, in bytes. Default 64 MiB.
    pub frame_bytes_max: usize,
    /// Requests in progress at once on a connection's request pipe (see
    /// `Request::Pipe`); a call past it waits for one to end. Default 256,
    /// the nodes' default `streams_per_connection_max`.
    pub pipe_requests_max: usize,
}

impl ClientOptions {
    /// Options with defaults for these endpoints, token and CA.
    pub fn new(endpoints: Vec<String>, token: impl Into<String>, ca_pem: Vec<u8>) -> ClientOptions {
        ClientOptions {
            endpoints,
            token: token.into(),
            ca_pem,
            server_name: SERVER_NAME.to_string(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            retry_deadline: Duration::from_secs(15),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(500),
            frame_bytes_max: 64 << 20,
            pipe_requests_max: 256,
        }
    }
}

/// What a call can fail with. [`Error::certainly_not_applied`] tells a
/// caller whether a failed write may still have taken effect.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server refused the request with a definite answer.
    #[error("{}: {}", code_name(.0.code), .0.message)]
    Refused(ErrorInfo),
    /// No node answered within the retry deadline; nothing was sent to a node
    /// that may have applied it.
    #[error("cannot reach the cluster: {0}")]
    Unreachable(String),
    /// The outcome is unknown: a node may have applied the write (the
    /// connection was lost or the answer timed out, and no later attempt
    /// got an answer, or a later attempt was refused: a refusal speaks only
    /// for its own attempt). Retrying with the same session is safe while
    /// the session lives; the session makes it apply once.
    #[error("outcome unknown: {0}")]
    Indeterminate(String),
    /// The server answered something this client does not expect.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A watch asked for revisions the history no longer holds: `oldest` is
    /// the oldest revision it can start from.
    #[error("the history was compacted: the oldest revision available is {oldest}")]
    Compacted {
        /// The oldest revision watchable.
        oldest: u64,
    },
    /// The options are unusable (a bad CA file, no endpoints).
    #[error("client configuration: {0}")]
    Config(String),
}

/// Whether `req` changes the cluster's state (so that an attempt whose
/// answer was lost may have done so).
fn is_write(req: &Request) -> bool {
    matches!(
        req,
        Request::Write { .. }
            | Request::Txn { .. }
            | Request::LeaseGrant { .. }
            | Request::Compact { .. }
            | Request::LeaseRevoke { .. }
            | Request::Register
            | Request::MemberAdd { .. }
            | Request::MemberPromote { .. }
            | Request::MemberRemove { .. }
            | Request::Alarm { .. }
    )
}

/// The session a request writes under, if any.
fn session_of(req: &Request) -> Option<u64> {
    match req {
        Request::Write { session, .. } | Request::Txn { session, .. } => Some(session.client_id),
        _ => None,
    }
}

/// The error for a refusal. A refusal speaks for the attempt it answers
/// only: when an earlier attempt of the same write may have applied (its
/// answer was lost), a retry refused by a check made before the session's
/// cache is consulted (the space alarm at the node), or because the session
/// expired meanwhile (its cache went with it), says nothing of that earlier
/// attempt, so the outcome is unknown, not "did not apply".
fn refusal(e: ErrorInfo, earlier_may_have_applied: bool) -> Error {
    if earlier_may_have_applied {
        Error::Indeterminate(format!(
            "an earlier attempt may have applied; the retry was refused: {}: {}",
            code_name(e.code),
            e.message
        ))
    } else {
        Error::Refused(e)
    }
}

fn code_name(c: ErrorCode) -> &'static str {
    match c {
        ErrorCode::NotLeader => "not the leader",
        ErrorCode::Unauthorized => "unauthorized",
        ErrorCode::TooLarge => "too large",
        ErrorCode::BadRequest => "bad request",
        ErrorCode::SessionExpired => "session expired",
        ErrorCode::StaleSequence => "stale sequence number",
        ErrorCode::Unavailable => "unavailable",
        ErrorCode::Stopping => "node stopping",
        ErrorCode::NoSpace => "no space",
        ErrorCode::Busy => "busy",
        ErrorCode::LeaseNotFound => "lease not found",
        ErrorCode::Compacted => "revision compacted",
    }
}

impl Error {
    /// Whether a write that failed with this error certainly did not apply.
    pub fn certainly_not_applied(&self) -> bool {
        match self {
            Error::Refused(info) => info.code.certainly_not_applied(),
            Error::Unreachable(_) | Error::Config(_) | Error::Compacted { .. } => true,
            Error::Indeterminate(_) | Error::Protocol(_) => false,
        }
    }
    /// The server's error code, if the server answered.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Refused(info) => Some(info.code),
            _ => None,
        }
    }
}

/// A result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Default)]
struct SessionState {
    client_id: Option<u64>,
    next_seq: u64,
    inflight: BTreeSet<u64>,
}

#[derive(Debug)]
struct Inner {
    endpoint: quinn::Endpoint,
    opts: ClientOptions,
    /// The connection in use.
    conn: tokio::sync::Mutex<Option<Link>>,
    /// Where the last redirect pointed.
    leader_hint: Mutex<Option<String>>,
    session: Mutex<SessionState>,
    /// Round-robin position in `endpoints`.
    next_endpoint: Mutex<usize>,
    /// Endpoints that failed to connect, and when.
    failed: Mutex<HashMap<String, Instant>>,
    /// Whether a connection was ever made (else closing has no node to tell).
    connected_once: AtomicBool,
}

/// An authenticated connection to a node and its request pipe.
#[derive(Clone, Debug)]
struct Link {
    conn: quinn::Connection,
    pipe: Arc<Pipe>,
}

impl Link {
    fn usable(&self) -> bool {
        self.conn.close_reason().is_none() && !self.pipe.state.broken.load(Ordering::Acquire)
    }
}

/// Answers awaited on a pipe, by request id.
type Waiting = HashMap<u64, tokio::sync::oneshot::Sender<std::result::Result<Response, String>>>;

/// The client's side of a request pipe (see `Request::Pipe`): callers hand
/// their tagged frames to a writer task, which gathers those queued together
/// into one write; a reader task hands each answer to the caller waiting for
/// its id. When the last `Pipe` is dropped the writer finishes the stream,
/// the node finishes its side, and both tasks end.
#[derive(Debug)]
struct Pipe {
    out: tokio::sync::mpsc::Sender<Vec<u8>>,
    state: Arc<PipeState>,
    next_id: AtomicU64,
    /// Bounds the requests in progress (`pipe_requests_max`).
    permits: tokio::sync::Semaphore,
}

#[derive(Debug, Default)]
struct PipeState {
    waiting: Mutex<Waiting>,
    broken: AtomicBool,
}

impl PipeState {
    /// Marks the pipe broken and fails every call waiting on it.
    fn break_off(&self, reason: &str) {
        self.broken.store(true, Ordering::Release);
        for (_, tx) in lock(&self.waiting).drain() {
            let _ = tx.send(Err(reason.to_string()));
        }
    }
}

impl Pipe {
    /// Opens a pipe on `conn` and starts its writer and reader tasks.
    async fn open(conn: &quinn::Connection, opts: &ClientOptions) -> std::result::Result<Pipe, String> {
        let (send, mut recv) = conn.open_bi().await.map_err(|e| format!("opening a request pipe: {e}"))?;
        let opener = frame::encode(&Request::Pipe).map_err(|e| e.to_string())?;
        let queue = opts.pipe_requests_max.max(1);
        let (out, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(queue);
        let state = Arc::new(PipeState::default());
        let writer_state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = frame::write_pipe(send, rx, opener).await {
                writer_state.break_off(&format!("the request pipe broke: {e}"));
            }
        });
        let reader_state = state.clone();
        let max = opts.frame_bytes_max;
        tokio::spawn(async move {
            let reason = loop {
                let (id, payload) = match frame::read_tagged(&mut recv, max).await {
                    Ok(next) => next,
                    Err(FrameError::End) => break "the node ended the request pipe".to_string(),
                    Err(e) => break format!("the request pipe broke: {e}"),
                };
                let answer = payload.and_then(|p| frame::decode::<Response>(&p)).map_err(|e| e.to_string());
                if let Some(tx) = lock(&reader_state.waiting).remove(&id) {
                    let _ = tx.send(answer);
                }
            };
            reader_state.break_off(&reason);
        });
        Ok(Pipe { out, state, next_id: AtomicU64::new(1), permits: tokio::sync::Semaphore::new(queue) })
    }

    /// Sends `req` and waits for its answer.
    async fn call(&self, req: &Request) -> std::result::Result<Response, String> {
        let _permit = self.permits.acquire().await.map_err(|e| e.to_string())?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = frame::encode_tagged(id, req).map_err(|e| e.to_string())?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&self.state.waiting).insert(id, tx);
        // Forgets the id if this call is dropped (its deadline passed) before the answer.
        struct Forget<'a>(&'a PipeState, u64);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                lock(&self.0.waiting).remove(&self.1);
            }
        }
        let _forget = Forget(&self.state, id);
        if self.state.broken.load(Ordering::Acquire) {
            return Err("the request pipe is broken".into());
        }
        self.out.send(bytes).await.map_err(|_| "the request pipe is closed".to_string())?;
        rx.await.map_err(|_| "the request pipe closed before an answer".to_string())?
    }
}

/// A client of a Cairn cluster. Cheap to clone; clones share the connection and session.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

/// A scanned page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanPage {
    /// Pairs in key order.
    pub pairs: Vec<(Vec<u8>, Vec<u8>)>,
    /// More pairs follow the last one.
    pub more: bool,
    /// The applied index the page was read at.
    pub index: u64,
    /// The revisions of each pair, in the same order.
    pub metas: Vec<crate::protocol::KeyMeta>,
    /// The cluster revision of the state read.
    pub revision: u64,
}

/// A watch: which keys, from which revision, what to deliver.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchOptions {
    /// First key.
    pub start: Vec<u8>,
    /// `None`: the key `start` alone; `Some(end)`: keys in `[start, end)`;
    /// `Some(empty)`: every key from `start` on.
    pub end: Option<Vec<u8>>,
    /// First revision delivered (0: from the next write on).
    pub start_revision: u64,
    /// Deliver each event's previous key-value.
    pub prev_kv: bool,
    /// Progress when nothing happens for this long (zero: the node's default of 5 s).
    pub progress: Duration,
}

impl WatchOptions {
    /// The changes of one key.
    pub fn key(key: impl Into<Vec<u8>>) -> WatchOptions {
        WatchOptions { start: key.into(), ..WatchOptions::default() }
    }
    /// The changes of every key that starts with `prefix`.
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> WatchOptions {
        let start = prefix.into();
        let mut end = start.clone();
        while end.last() == Some(&0xff) {
            end.pop();
        }
        match end.last_mut() {
            Some(b) => *b += 1,
            None => end.clear(),
        }
        WatchOptions { start, end: Some(end), ..WatchOptions::default() }
    }
    /// From revision `revision` on (what the history still holds).
    pub fn from_revision(mut self, revision: u64) -> WatchOptions {
        self.start_revision = revision;
        self
    }
    /// With each event's previous key-value.
    pub fn with_prev_kv(mut self) -> WatchOptions {
        self.prev_kv = true;
        self
    }
    /// With progress after `every` of quiet.
    pub fn with_progress(mut self, every: Duration) -> WatchOptions {
        self.progress = every;
        self
    }
}

/// What a watch delivers, in revision order, each event once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchMessage {
    /// Events; every event of the watch up to `revision` has now been delivered.
    Events {
        /// The events, in revision order.
        events: Vec<crate::protocol::WatchEvent>,
        /// Delivered up to here.
        revision: u64,
    },
    /// Nothing new up to `revision`.
    Progress {
        /// Delivered up to here.
        revision: u64,
    },
}

enum WatchStop {
    /// Give up and tell the caller.
    Fatal(Error),
    /// Reconnect (to any node) and resume.
    Retry(String),
}

/// What a write left: the log index that applied it and the cluster
/// revision after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// The log index of the entry that applied it.
    pub index: u64,
    /// The cluster revision after it.
    pub revision: u64,
}

/// A transaction: comparisons, and the operations of each branch. Build it
/// with [`Txn::new`] and the `when`/`then`/`otherwise` methods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    /// All must hold for `success` to run.
    pub compares: Vec<crate::protocol::Compare>,
    /// Run when every comparison holds.
    pub success: Vec<crate::protocol::TxnOp>,
    /// Run otherwise.
    pub failure: Vec<crate::protocol::TxnOp>,
}

impl Txn {
    /// An empty transaction (it succeeds and does nothing).
    pub fn new() -> Txn {
        Txn::default()
    }
    /// Adds a comparison.
    pub fn when(
        mut self,
        key: impl Into<Vec<u8>>,
        op: crate::protocol::CompareOp,
        target: crate::protocol::CompareTarget,
    ) -> Txn {
        self.compares.push(crate::protocol::Compare { key: key.into(), op, target });
        self
    }
    /// Adds an operation to the success branch.
    pub fn then(mut self, op: crate::protocol::TxnOp) -> Txn {
        self.success.push(op);
        self
    }
    /// Adds an operation to the failure branch.
    pub fn otherwise(mut self, op: crate::protocol::TxnOp) -> Txn {
        self.failure.push(op);
        self
    }
}

/// What a transaction did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether every comparison held.
    pub succeeded: bool,
    /// The log index of the entry that applied it.
    pub index: u64,
    /// The cluster revision after it.
    pub revision: u64,
    /// One result per operation of the branch that ran (empty when `replayed`).
    pub results: Vec<crate::protocol::TxnOpResult>,
    /// The answer to a retry of a transaction that had already applied
    /// (its read results are not kept).
    pub replayed: bool,
}

enum ConnErr {
    /// The node answered Hello with a refusal (a bad token).
    Refused(ErrorInfo),
    Failed(String),
}

impl From<String> for ConnErr {
    fn from(s: String) -> ConnErr {
        ConnErr::Failed(s)
    }
}

enum Attempt {
    Done(Response),
    /// Retry (after a redirect, at once; otherwise after a backoff).
    Retry {
        reason: String,
        may_have_applied: bool,
        redirect: bool,
    },
}

impl Client {
    /// A client with these options. Connects lazily, at the first call.
    pub fn new(opts: ClientOptions) -> Result<Client> {
        if opts.endpoints.is_empty() {
            return Err(Error::Config("no endpoints given".into()));
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&opts.ca_pem) {
            let cert = cert.map_err(|e| Error::Config(format!("reading the CA certificate: {e}")))?;
            roots.add(cert).map_err(|e| Error::Config(format!("the CA certificate is not usable: {e}")))?;
        }
        if roots.is_empty() {
            return Err(Error::Config("the CA file holds no certificate".into()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN_CLIENT.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| Error::Config(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
        let mut transport = quinn::TransportConfig::default();
        // A node that dies silently is noticed within 2 s (the idle timeout,
        // the smaller of both sides' wins), and the request goes elsewhere.
        transport.keep_alive_interval(Some(Duration::from_millis(500)));
        if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(2)) {
            transport.max_idle_timeout(Some(idle));
        }
        cfg.transport_config(Arc::new(transport));
        let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| Error::Config(format!("opening a UDP socket: {e}")))?;
        endpoint.set_default_client_config(cfg);
        Ok(Client {
            inner: Arc::new(Inner {
                endpoint,
                opts,
                conn: tokio::sync::Mutex::new(None),
                leader_hint: Mutex::new(None),
                session: Mutex::new(SessionState::default()),
                next_endpoint: Mutex::new(0),
                failed: Mutex::new(HashMap::new()),
                connected_once: AtomicBool::new(false),
            }),
        })
    }

    /// Sets `key` to `value`; returns the log index that applied it.
    pub async fn put(&self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Result<u64> {
        self.write(vec![WriteOp::Put { key: key.into(), value: value.into() }]).await
    }

    /// Removes `key`; returns the log index that applied it.
    pub async fn delete(&self, key: impl Into<Vec<u8>>) -> Result<u64> {
        self.write(vec![WriteOp::Delete { key: key.into() }]).await
    }

    /// Applies `ops` atomically and exactly once (retrying through leader
    /// changes with the same session sequence number).
    pub async fn write(&self, ops: Vec<WriteOp>) -> Result<u64> {
        self.write_full(ops).await.map(|w| w.index)
    }

    /// Sends a write with an explicit session and sequence number (for
    /// tests of exactly-once delivery, and callers that keep their own session).
    pub async fn write_with(&self, client_id: u64, seq: u64, ops: Vec<WriteOp>) -> Result<u64> {
        self.write_full_with(client_id, seq, ops).await.map(|w| w.index)
    }

    /// [`Client::write`], returning the revision too.
    pub async fn write_full(&self, ops: Vec<WriteOp>) -> Result<Written> {
        let (client_id, seq) = self.next_seq().await?;
        let result = self.write_full_with(client_id, seq, ops).await;
        self.finished(seq);
        result
    }

    /// A write of the session ended: it is no longer in flight. (A session
    /// the cluster reports expired is forgotten where the answer arrives,
    /// in [`Client::call`].)
    fn finished(&self, seq: u64) {
        lock(&self.inner.session).inflight.remove(&seq);
    }

    /// The cluster no longer knows session `client_id`: the next write
    /// registers a new one.
    fn forget_session(&self, client_id: u64) {
        let mut s = lock(&self.inner.session);
        if s.client_id == Some(client_id) {
            *s = SessionState::default();
        }
    }

    async fn write_full_with(&self, client_id: u64, seq: u64, ops: Vec<WriteOp>) -> Result<Written> {
        let first_unacked = lock(&self.inner.session).inflight.first().copied().unwrap_or(seq).min(seq);
        let req = Request::Write { session: Session { client_id, seq, first_unacked }, ops };
        match self.call(&req).await? {
            Response::Written { index, revision } => Ok(Written { index, revision }),
            other => Err(unexpected(&other)),
        }
    }

    /// The session and a new sequence number, marked in flight.
    async fn next_seq(&self) -> Result<(u64, u64)> {
        let client_id = self.session_id().await?;
        let mut s = lock(&self.inner.session);
        s.next_seq += 1;
        let seq = s.next_seq;
        s.inflight.insert(seq);
        Ok((client_id, seq))
    }

    /// Runs a transaction atomically and exactly once: retried through
    /// leader changes with the same session sequence number, so a retry of
    /// one that already applied gets its outcome (`replayed`), never a
    /// second application.
    pub async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        let (client_id, seq) = self.next_seq().await?;
        let r = self.txn_with(client_id, seq, txn).await;
        self.finished(seq);
        r
    }

    /// Sends a transaction with an explicit session and sequence number
    /// (for tests of exactly-once delivery, and callers that keep their own
    /// session).
    pub async fn txn_with(&self, client_id: u64, seq: u64, txn: Txn) -> Result<TxnResult> {
        let first_unacked = lock(&self.inner.session).inflight.first().copied().unwrap_or(seq).min(seq);
        let req = Request::Txn {
            session: Session { client_id, seq, first_unacked },
            compares: txn.compares,
            success: txn.success,
            failure: txn.failure,
        };
        match self.call(&req).await? {
            Response::TxnDone { succeeded, index, revision, results, replayed } => {
                Ok(TxnResult { succeeded, index, revision, results, replayed })
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Watches keys: the returned channel delivers their changes from the
    /// revision asked, in revision order, each exactly once, across
    /// disconnects and leader changes (the watch resumes, on any node, from
    /// the revision after the last one delivered). It ends with an error when
    /// the history no longer holds the revision to resume from
    /// ([`Error::Compacted`]) or the request is refused; dropping the
    /// receiver ends it.
    pub fn watch(&self, opts: WatchOptions) -> tokio::sync::mpsc::Receiver<Result<WatchMessage>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let c = self.clone();
        tokio::spawn(async move { c.run_watch(opts, tx).await });
        rx
    }

    async fn run_watch(&self, opts: WatchOptions, tx: tokio::sync::mpsc::Sender<Result<WatchMessage>>) {
        let mut next = opts.start_revision;
        let mut backoff = self.inner.opts.backoff_min;
        loop {
            if tx.is_closed() {
                return;
            }
            match self.watch_stream(&opts, &mut next, &tx).await {
                Ok(true) => return,
                Ok(false) => backoff = self.inner.opts.backoff_min,
                Err(WatchStop::Fatal(e)) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Err(WatchStop::Retry(_reason)) => {
                    self.drop_connection().await;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.inner.opts.backoff_max);
                }
            }
        }
    }

    /// One watch stream. `Ok(true)`: the caller is gone; `Ok(false)`: resume now.
    async fn watch_stream(
        &self,
        opts: &WatchOptions,
        next: &mut u64,
        tx: &tokio::sync::mpsc::Sender<Result<WatchMessage>>,
    ) -> std::result::Result<bool, WatchStop> {
        let conn = match self.current_connection().await {
            Ok(c) => c,
            Err(ConnErr::Refused(e)) => return Err(WatchStop::Fatal(Error::Refused(e))),
            Err(ConnErr::Failed(reason)) => return Err(WatchStop::Retry(reason)),
        };
        let broke = |e: &dyn std::fmt::Display| WatchStop::Retry(format!("the watch stream broke: {e}"));
        let (mut send, mut recv) = conn.conn.open_bi().await.map_err(|e| broke(&e))?;
        let req = Request::Watch {
            start: opts.start.clone(),
            end: opts.end.clone(),
            start_revision: *next,
            prev_kv: opts.prev_kv,
            progress_ms: opts.progress.as_millis() as u64,
        };
        let bytes = frame::encode(&req).map_err(|e| WatchStop::Fatal(Error::Protocol(e.to_string())))?;
        send.write_all(&bytes).await.map_err(|e| broke(&e))?;
        let _ = send.finish();
        let max = self.inner.opts.frame_bytes_max;
        loop {
            let r = frame::read::<Response>(&mut recv, max).await.map_err(|e| broke(&e))?;
            let msg = match r {
                Response::WatchProgress { revision } => {
                    *next = (*next).max(revision + 1);
                    WatchMessage::Progress { revision }
                }
                Response::WatchEvents { events, revision } => {
                    *next = (*next).max(revision + 1);
                    WatchMessage::Events { events, revision }
                }
                Response::WatchEnded(crate::protocol::WatchEnd::TooSlow { resume_from }) => {
                    *next = resume_from;
                    return Ok(false);
                }
                Response::WatchEnded(crate::protocol::WatchEnd::Compacted { oldest }) => {
                    return Err(WatchStop::Fatal(Error::Compacted { oldest }));
                }
                Response::Error(e)
                    if matches!(e.code, ErrorCode::Busy | ErrorCode::Stopping | ErrorCode::Unavailable) =>
                {
                    return Err(WatchStop::Retry(e.message));
                }
                Response::Error(e) => return Err(WatchStop::Fatal(Error::Refused(e))),
                other => return Err(WatchStop::Fatal(unexpected(&other))),
            };
            if tx.send(Ok(msg)).await.is_err() {
                return Ok(true);
            }
        }
    }

    /// Drops the history below `revision` (watches cannot start before it then).
    pub async fn compact(&self, revision: u64) -> Result<Written> {
        match self.call(&Request::Compact { revision }).await? {
            Response::Written { index, revision } => Ok(Written { index, revision }),
            other => Err(unexpected(&other)),
        }
    }

    /// Grants a lease of `ttl` (rounded to ms; at least 1 s); returns its id.
    /// Keep it alive with [`Client::lease_keep_alive`] well within `ttl`.
    pub async fn lease_grant(&self, ttl: Duration) -> Result<u64> {
        let client_id = self.session_id().await?;
        match self.call(&Request::LeaseGrant { ttl_ms: ttl.as_millis() as u64, client_id }).await? {
            Response::LeaseGranted { id, .. } => Ok(id),
            other => Err(unexpected(&other)),
        }
    }

    /// Restarts the lease's clock (at the leader); returns its TTL.
    pub async fn lease_keep_alive(&self, id: u64) -> Result<Duration> {
        match self.call(&Request::LeaseKeepAlive { id }).await? {
            Response::LeaseAlive { ttl_ms, .. } => Ok(Duration::from_millis(ttl_ms)),
            other => Err(unexpected(&other)),
        }
    }

    /// Revokes a lease now; its keys are deleted at one revision.
    pub async fn lease_revoke(&self, id: u64) -> Result<Written> {
        match self.call(&Request::LeaseRevoke { id }).await? {
            Response::Written { index, revision } => Ok(Written { index, revision }),
            other => Err(unexpected(&other)),
        }
    }

    /// A lease's TTL, the time it has left (as the leader sees it; `None`
    /// when the node asked does not lead) and its keys.
    pub async fn lease_time_to_live(&self, id: u64) -> Result<(Duration, Option<Duration>, Vec<Vec<u8>>)> {
        match self.call(&Request::LeaseTimeToLive { id }).await? {
            Response::LeaseInfo { ttl_ms, remaining_ms, keys, .. } => {
                Ok((Duration::from_millis(ttl_ms), remaining_ms.map(Duration::from_millis), keys))
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Every lease id.
    pub async fn lease_list(&self) -> Result<Vec<u64>> {
        match self.call(&Request::LeaseList).await? {
            Response::Leases(ids) => Ok(ids),
            other => Err(unexpected(&other)),
        }
    }

    /// Sets `key` to `value`, attached to `lease` (deleted when it ends).
    pub async fn put_with_lease(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: u64,
    ) -> Result<Written> {
        self.write_full(vec![WriteOp::PutWithLease { key: key.into(), value: value.into(), lease }]).await
    }

    /// Reads `key` with its revisions; returns the key-value (if present)
    /// and the cluster revision of the state read.
    pub async fn get_kv(
        &self,
        key: impl Into<Vec<u8>>,
        consistency: Consistency,
    ) -> Result<(Option<crate::protocol::KeyValue>, u64)> {
        self.get_kv_at(key, 0, consistency).await
    }

    /// Reads `key` as it was at `revision` (0: now), while the cluster's
    /// history holds that revision ([`ErrorCode::Compacted`] once it does
    /// not); returns the key-value then and the revision read.
    pub async fn get_kv_at(
        &self,
        key: impl Into<Vec<u8>>,
        revision: u64,
        consistency: Consistency,
    ) -> Result<(Option<crate::protocol::KeyValue>, u64)> {
        let key = key.into();
        match self.call(&Request::Get { key: key.clone(), consistency, revision }).await? {
            Response::Value { value, meta, revision, .. } => {
                Ok((value.zip(meta).map(|(value, meta)| crate::protocol::KeyValue { key, value, meta }), revision))
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Reads `key` linearizably.
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<Option<Vec<u8>>> {
        self.get_with(key, Consistency::Linearizable).await.map(|(v, _)| v)
    }

    /// Reads `key` with a chosen consistency; returns the value and the
    /// applied index it was read at.
    pub async fn get_with(&self, key: impl Into<Vec<u8>>, consistency: Consistency) -> Result<(Option<Vec<u8>>, u64)> {
        match self.call(&Request::Get { key: key.into(), consistency, revision: 0 }).await? {
            Response::Value { value, index, .. } => Ok((value, index)),
            other => Err(unexpected(&other)),
        }
    }

    /// Reads up to `limit` pairs in `[start, end)` (`end = None`: to the end).
    pub async fn scan(
        &self,
        start: impl Into<Vec<u8>>,
        end: Option<Vec<u8>>,
        limit: u32,
        consistency: Consistency,
    ) -> Result<ScanPage> {
        self.scan_with(start, end, limit, false, consistency).await
    }

    /// [`Client::scan`], with the values left out when `keys_only`.
    pub async fn scan_with(
        &self,
        start: impl Into<Vec<u8>>,
        end: Option<Vec<u8>>,
        limit: u32,
        keys_only: bool,
        consistency: Consistency,
    ) -> Result<ScanPage> {
        self.scan_at(start, end, limit, keys_only, consistency, 0).await
    }

    /// [`Client::scan_with`] on the state as it was at `revision` (0: now),
    /// while the cluster's history holds that revision. Page through a past
    /// state by asking the same revision again from after the last key.
    pub async fn scan_at(
        &self,
        start: impl Into<Vec<u8>>,
        end: Option<Vec<u8>>,
        limit: u32,
        keys_only: bool,
        consistency: Consistency,
        revision: u64,
    ) -> Result<ScanPage> {
        let req = Request::Scan { start: start.into(), end, limit, keys_only, consistency, revision };
        match self.call(&req).await? {
            Response::Scanned { pairs, more, index, metas, revision } => {
                Ok(ScanPage { pairs, more, index, metas, revision })
            }
            other => Err(unexpected(&other)),
        }
    }

    /// The status of the node this client is connected to (or the first it reaches).
    pub async fn status(&self, with_hash: bool) -> Result<StatusInfo> {
        match self.call(&Request::Status { with_hash }).await? {
            Response::Status(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// The status of one node, by address, without redirects or retries.
    pub async fn status_of(&self, addr: &str, with_hash: bool) -> Result<StatusInfo> {
        let sock = resolve(addr).await?;
        let link = self.connect(sock).await.map_err(|e| match e {
            ConnErr::Refused(info) => Error::Refused(info),
            ConnErr::Failed(s) => Error::Unreachable(s),
        })?;
        let deadline = Instant::now() + self.inner.opts.request_timeout;
        let answer = self.exchange(&link, &Request::Status { with_hash }, deadline).await;
        link.conn.close(0u32.into(), b"done");
        match answer {
            Ok(Response::Status(s)) => Ok(s),
            Ok(Response::Error(e)) => Err(Error::Refused(e)),
            Ok(other) => Err(unexpected(&other)),
            Err(e) => Err(Error::Unreachable(e)),
        }
    }

    /// Commits an empty entry through the leader: the cluster can make progress.
    pub async fn health(&self) -> Result<u64> {
        match self.call(&Request::Health).await? {
            Response::Healthy { index } => Ok(index),
            other => Err(unexpected(&other)),
        }
    }

    /// The members.
    pub async fn members(&self) -> Result<Vec<MemberInfo>> {
        match self.call(&Request::MemberList).await? {
            Response::Members(m) => Ok(m),
            other => Err(unexpected(&other)),
        }
    }

    /// Adds node `id` at peer address `addr` as a learner (or a voter);
    /// returns the members once the change applied.
    pub async fn member_add(&self, id: u64, addr: impl Into<String>, learner: bool) -> Result<Vec<MemberInfo>> {
        self.member_change(&Request::MemberAdd { id, addr: addr.into(), learner }).await
    }

    /// Makes learner `id` a voter (refused until it has caught up); returns the members.
    pub async fn member_promote(&self, id: u64) -> Result<Vec<MemberInfo>> {
        self.member_change(&Request::MemberPromote { id }).await
    }

    /// Removes node `id` (its id is refused for good); returns the members.
    pub async fn member_remove(&self, id: u64) -> Result<Vec<MemberInfo>> {
        self.member_change(&Request::MemberRemove { id }).await
    }

    async fn member_change(&self, req: &Request) -> Result<Vec<MemberInfo>> {
        match self.call(req).await? {
            Response::Members(m) => Ok(m),
            other => Err(unexpected(&other)),
        }
    }

    /// Saves a consistent checkpoint of the state taken by the node this
    /// client talks to: writes the snapshot file (the header frame, then
    /// each file's bytes) to `out`, checking each file's checksum as it
    /// arrives; `progress(done, total)` hears of every piece. Returns the
    /// header.
    pub async fn snapshot_save(
        &self,
        out: &mut dyn std::io::Write,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<crate::protocol::SnapshotHeader> {
        let conn = match self.current_connection().await {
            Ok(c) => c,
            Err(ConnErr::Refused(e)) => return Err(Error::Refused(e)),
            Err(ConnErr::Failed(reason)) => return Err(Error::Unreachable(reason)),
        };
        let lost = |e: &dyn std::fmt::Display| Error::Unreachable(format!("the snapshot stream broke: {e}"));
        let (mut send, mut recv) = conn.conn.open_bi().await.map_err(|e| lost(&e))?;
        let bytes = frame::encode(&Request::SnapshotSave).map_err(|e| Error::Protocol(e.to_string()))?;
        send.write_all(&bytes).await.map_err(|e| lost(&e))?;
        let _ = send.finish();
        let max = self.inner.opts.frame_bytes_max;
        let header = match frame::read::<Response>(&mut recv, max).await.map_err(|e| lost(&e))? {
            Response::SnapshotHeader(h) => h,
            Response::Error(e) => return Err(Error::Refused(e)),
            other => return Err(unexpected(&other)),
        };
        let io = |e: std::io::Error| Error::Config(format!("writing the snapshot: {e}"));
        out.write_all(
            &frame::encode(&Response::SnapshotHeader(header.clone())).map_err(|e| Error::Protocol(e.to_string()))?,
        )
        .map_err(io)?;
        let total = header.total_bytes();
        let mut done = 0u64;
        let mut buf = vec![0u8; 256 << 10];
        for f in &header.files {
            let mut left = f.len;
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            while left > 0 {
                let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = recv
                    .read(&mut buf[..want])
                    .await
                    .map_err(|e| lost(&e))?
                    .ok_or_else(|| lost(&format!("the node ended the stream inside {}", f.name)))?;
                h.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(io)?;
                left -= n as u64;
                done += n as u64;
                progress(done, total);
            }
            if h.digest() != f.checksum {
                return Err(Error::Protocol(format!("{} arrived damaged (checksum mismatch)", f.name)));
            }
        }
        out.flush().map_err(io)?;
        Ok(header)
    }

    /// Raises the space alarm of `node`, or clears it (`raise: false`; node 0: every node's).
    pub async fn alarm(&self, node: u64, raise: bool) -> Result<()> {
        match self.call(&Request::Alarm { node, raise }).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Asks the leader to hand leadership to node `to`.
    pub async fn transfer_leader(&self, to: u64) -> Result<()> {
        match self.call(&Request::TransferLeader { to }).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// This client's session id, registering on first use.
    pub async fn session_id(&self) -> Result<u64> {
        if let Some(id) = lock(&self.inner.session).client_id {
            return Ok(id);
        }
        let id = match self.call(&Request::Register).await? {
            Response::Registered { client_id } => client_id,
            other => return Err(unexpected(&other)),
        };
        let mut s = lock(&self.inner.session);
        Ok(*s.client_id.get_or_insert(id))
    }

    /// Sends `req`, following redirects and retrying until the deadline.
    pub async fn call(&self, req: &Request) -> Result<Response> {
        let opts = &self.inner.opts;
        let deadline = Instant::now() + opts.retry_deadline;
        let mut backoff = opts.backoff_min;
        let mut may_have_applied = false;
        let mut last_reason;
        loop {
            match self.attempt(req, deadline).await {
                Attempt::Done(Response::Error(e)) => {
                    if e.code == ErrorCode::SessionExpired
                        && let Some(id) = session_of(req)
                    {
                        self.forget_session(id);
                    }
                    return Err(refusal(e, may_have_applied && is_write(req)));
                }
                Attempt::Done(resp) => return Ok(resp),
                Attempt::Retry { reason, may_have_applied: m, redirect } => {
                    may_have_applied |= m;
                    last_reason = reason;
                    if redirect {
                        backoff = opts.backoff_min;
                    } else {
                        let now = Instant::now();
                        if now + backoff >= deadline {
                            break;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(opts.backoff_max);
                    }
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        if may_have_applied && is_write(req) {
            Err(Error::Indeterminate(last_reason))
        } else {
            Err(Error::Unreachable(last_reason))
        }
    }

    async fn attempt(&self, req: &Request, deadline: Instant) -> Attempt {
        let conn = match self.current_connection().await {
            Ok(c) => c,
            Err(ConnErr::Refused(e)) => return Attempt::Done(Response::Error(e)),
            Err(ConnErr::Failed(reason)) => return Attempt::Retry { reason, may_have_applied: false, redirect: false },
        };
        let attempt_deadline = deadline.min(Instant::now() + self.inner.opts.request_timeout);
        match self.exchange(&conn, req, attempt_deadline).await {
            Ok(Response::Error(e)) if e.code == ErrorCode::NotLeader => {
                self.drop_connection().await;
                let redirect = e.leader.as_ref().map(|(_, addr)| addr.clone());
                let has_hint = redirect.is_some();
                *lock(&self.inner.leader_hint) = redirect;
                Attempt::Retry { reason: e.message, may_have_applied: false, redirect: has_hint }
            }
            Ok(Response::Error(e)) if matches!(e.code, ErrorCode::Unavailable | ErrorCode::Stopping) => {
                self.drop_connection().await;
                Attempt::Retry { reason: e.message, may_have_applied: true, redirect: false }
            }
            Ok(Response::Error(e)) if e.code == ErrorCode::Busy => {
                Attempt::Retry { reason: e.message, may_have_applied: false, redirect: false }
            }
            Ok(resp) => Attempt::Done(resp),
            Err(reason) => {
                self.drop_connection().await;
                Attempt::Retry { reason, may_have_applied: true, redirect: false }
            }
        }
    }

    async fn drop_connection(&self) {
        if let Some(link) = self.inner.conn.lock().await.take() {
            link.conn.close(0u32.into(), b"retrying elsewhere");
        }
    }

    /// The connection in use, or a new one to the leader hint or the next endpoint.
    async fn current_connection(&self) -> std::result::Result<Link, ConnErr> {
        let mut guard = self.inner.conn.lock().await;
        if let Some(link) = guard.as_ref() {
            if link.usable() {
                return Ok(link.clone());
            }
            link.conn.close(0u32.into(), b"the request pipe broke");
        }
        let opts = &self.inner.opts;
        // Skip an endpoint that just failed to connect while another is left.
        let recently_failed = |e: &str| {
            lock(&self.inner.failed).get(e).is_some_and(|t| t.elapsed() < opts.connect_timeout.max(opts.backoff_max))
        };
        let hint = lock(&self.inner.leader_hint).take().filter(|h| !recently_failed(h));
        let target = hint.unwrap_or_else(|| {
            let mut i = lock(&self.inner.next_endpoint);
            let n = opts.endpoints.len();
            let pick = (0..n).map(|k| (*i + k) % n).find(|k| !recently_failed(&opts.endpoints[*k])).unwrap_or(*i % n);
            *i = pick + 1;
            opts.endpoints[pick].clone()
        });
        let connected = match resolve(&target).await {
            Ok(addr) => self.connect(addr).await,
            Err(e) => Err(ConnErr::Failed(e.to_string())),
        };
        match connected {
            Ok(link) => {
                lock(&self.inner.failed).remove(&target);
                *guard = Some(link.clone());
                Ok(link)
            }
            Err(e) => {
                if matches!(e, ConnErr::Failed(_)) {
                    lock(&self.inner.failed).insert(target, Instant::now());
                }
                Err(e)
            }
        }
    }

    /// A new authenticated connection to `addr`, with its request pipe.
    async fn connect(&self, addr: SocketAddr) -> std::result::Result<Link, ConnErr> {
        let opts = &self.inner.opts;
        let connecting =
            self.inner.endpoint.connect(addr, &opts.server_name).map_err(|e| format!("connecting to {addr}: {e}"))?;
        let conn = tokio::time::timeout(opts.connect_timeout.min(opts.request_timeout), connecting)
            .await
            .map_err(|_| format!("connecting to {addr}: timed out"))?
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let deadline = Instant::now() + opts.connect_timeout.min(opts.request_timeout);
        match self.exchange_on_stream(&conn, &Request::Hello { token: opts.token.clone() }, deadline).await? {
            Response::HelloOk { .. } => {
                let pipe = Pipe::open(&conn, opts).await.map_err(ConnErr::Failed)?;
                self.inner.connected_once.store(true, Ordering::Release);
                Ok(Link { conn, pipe: Arc::new(pipe) })
            }
            Response::Error(e) => Err(ConnErr::Refused(e)),
            other => Err(ConnErr::Failed(format!("{addr} answered Hello with {other:?}"))),
        }
    }

    /// One request on the pipe of `link`.
    async fn exchange(&self, link: &Link, req: &Request, deadline: Instant) -> std::result::Result<Response, String> {
        match tokio::time::timeout_at(deadline.into(), link.pipe.call(req)).await {
            Ok(r) => r,
            Err(_) => Err("timed out waiting for an answer".into()),
        }
    }

    /// One request on a new stream of `conn` (the Hello, before the pipe).
    async fn exchange_on_stream(
        &self,
        conn: &quinn::Connection,
        req: &Request,
        deadline: Instant,
    ) -> std::result::Result<Response, String> {
        let max = self.inner.opts.frame_bytes_max;
        let fut = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            let bytes = frame::encode(req).map_err(|e| e.to_string())?;
            send.write_all(&bytes).await.map_err(|e| e.to_string())?;
            let _ = send.finish();
            frame::read::<Response>(&mut recv, max).await.map_err(|e| match e {
                FrameError::End => "the node closed the stream without an answer".to_string(),
                e => e.to_string(),
            })
        };
        match tokio::time::timeout_at(deadline.into(), fut).await {
            Ok(r) => r,
            Err(_) => Err("timed out waiting for an answer".into()),
        }
    }

    /// Closes the client and its clones: every connection, an attempt to a
    /// dead node included, is closed at once; waits at most 250 ms for the
    /// nodes to hear of it (QUIC's draining period, about three round trips
    /// and the peer's ack delay), unless no node was ever reached.
    pub async fn close(&self) {
        self.drop_connection().await;
        self.inner.endpoint.close(0u32.into(), b"client closed");
        if self.inner.connected_once.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(Duration::from_millis(250), self.inner.endpoint.wait_idle()).await;
        }
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| Error::Unreachable(format!("resolving {addr}: {e}")))?
        .next()
        .ok_or_else(|| Error::Unreachable(format!("{addr} resolves to no address")))
}

fn unexpected(r: &Response) -> Error {
    Error::Protocol(format!("unexpected answer {r:?}"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(code: ErrorCode) -> ErrorInfo {
        ErrorInfo { code, message: "m".into(), leader: None }
    }

    /// A refusal is "did not apply" only when no earlier attempt of the
    /// write may have applied; after one, the outcome is unknown (a retry
    /// of a write that applied, refused because its session expired since,
    /// must not be reported as not applied).
    #[test]
    fn a_refusal_after_a_lost_answer_leaves_the_outcome_unknown() {
        for code in [ErrorCode::SessionExpired, ErrorCode::NoSpace, ErrorCode::TooLarge] {
            assert!(matches!(refusal(info(code), false), Error::Refused(i) if i.code == code));
            match refusal(info(code), true) {
                Error::Indeterminate(m) => {
                    assert!(m.contains("may have applied") && m.contains(code_name(code)), "{m}")
                }
                other => panic!("{code:?} after a lost answer: {other:?}"),
            }
        }
        let s = Session { client_id: 7, seq: 3, first_unacked: 3 };
        let w = Request::Write { session: s, ops: Vec::new() };
        assert!(is_write(&w) && is_write(&Request::Register));
        assert_eq!(session_of(&w), Some(7));
        assert_eq!(session_of(&Request::Register), None);
        assert!(!is_write(&Request::SnapshotSave));
    }
}
