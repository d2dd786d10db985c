//! Peer transport: Raft messages as length-framed rkyv on one long-lived
//! QUIC stream per peer and direction, with a bounded queue per peer.
//!
//! Outbound, a task per peer dials it (mutual TLS, ALPN [`ALPN_PEER`]) and
//! writes the queued messages. Inbound, a connection's certificate names the
//! peer's node id; every frame must carry this cluster's id, come `from` that
//! id and be addressed to this node, or the connection is closed.

use std::time::Duration;

use cairn_kv_client::frame;
use cairn_kv_client::protocol::ALPN_PEER;
use cairn_raft_core::{Message, NodeId};
use rkyv::{Archive, Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::tls::node_dns_name;

/// A Raft message on the wire, with the cluster it belongs to.
#[derive(Archive, Serialize, Deserialize, Clone, Debug)]
#[rkyv(derive(Debug), attr(allow(missing_docs)))]
pub struct PeerFrame {
    /// The sender's cluster id.
    pub cluster_id: u64,
    /// The message.
    pub msg: Message,
}

/// Why an inbound peer frame was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerRefusal {
    /// Another cluster's frame.
    #[error("frame of cluster {got:016x}, this is cluster {want:016x}")]
    Cluster {
        /// Its cluster id.
        got: u64,
        /// Ours.
        want: u64,
    },
    /// `from` is not the authenticated node.
    #[error("message claims to be from node {claimed} over node {authenticated}'s connection")]
    Sender {
        /// What the message says.
        claimed: u64,
        /// What the certificate says.
        authenticated: u64,
    },
    /// Not addressed to this node.
    #[error("message for node {0} reached this node")]
    Recipient(u64),
    /// A removed node.
    #[error("node {0} was removed from the cluster")]
    Removed(u64),
}

/// Checks an inbound frame against the authenticated peer.
pub fn check_frame(f: &PeerFrame, cluster_id: u64, me: NodeId, authenticated: u64) -> Result<(), PeerRefusal> {
    if f.cluster_id != cluster_id {
        return Err(PeerRefusal::Cluster { got: f.cluster_id, want: cluster_id });
    }
    if f.msg.from.0 != authenticated {
        return Err(PeerRefusal::Sender { claimed: f.msg.from.0, authenticated });
    }
    if f.msg.to != me {
        return Err(PeerRefusal::Recipient(f.msg.to.0));
    }
    Ok(())
}

/// Settings of an outbound peer link.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// This cluster's id.
    pub cluster_id: u64,
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
    /// Backoff between reconnects: first and longest.
    pub backoff_min: Duration,
    /// Longest backoff.
    pub backoff_max: Duration,
}

/// Connections from peers, as they arrive: an outbound link to a peer that
/// was unreachable redials as soon as that peer connects to this node (a
/// restarted node dials its peers at once), instead of waiting out its
/// backoff or a dial begun while the peer was down.
#[derive(Debug)]
pub struct PeerArrivals {
    /// Per peer: what wakes the outbound link, and what wakes a snapshot
    /// sender dialing it.
    by_peer: std::sync::Mutex<std::collections::HashMap<u64, [std::sync::Arc<tokio::sync::Notify>; 2]>>,
    /// Off, arrivals wake nothing (only to test that they matter).
    enabled: bool,
}

impl PeerArrivals {
    /// Arrivals that wake the links and snapshot senders, or (`enabled`
    /// false) nothing.
    pub fn new(enabled: bool) -> PeerArrivals {
        PeerArrivals { by_peer: Default::default(), enabled }
    }

    fn get(&self, peer: u64, which: usize) -> std::sync::Arc<tokio::sync::Notify> {
        let mut m = self.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(peer).or_default()[which].clone()
    }

    /// What wakes the link to `peer`.
    pub fn of(&self, peer: u64) -> std::sync::Arc<tokio::sync::Notify> {
        self.get(peer, 0)
    }

    /// What wakes a snapshot sender dialing `peer` (one runs per peer at a time).
    pub fn of_snapshots(&self, peer: u64) -> std::sync::Arc<tokio::sync::Notify> {
        self.get(peer, 1)
    }

    /// `peer` has connected to this node.
    pub fn arrived(&self, peer: u64) {
        if !self.enabled {
            return;
        }
        let m = self.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get(&peer) {
            n.iter().for_each(|n| n.notify_one());
        }
    }
}

/// Runs one outbound link until `rx` closes: dials `peer` at the address
/// `addr`, writes every queued message, reconnects with backoff.
/// Messages that arrive while the link is down are dropped and reported
/// (Raft retransmits); `unreachable` hears of each failure, and of each dial
/// cut short by the peer's arrival that left messages behind. While the link
/// is down, `arrived` (the peer connected to this node) ends the backoff,
/// and ends a dial in progress once per failure (a dial begun while the
/// peer was down waits out QUIC's handshake timers).
#[allow(clippy::too_many_arguments)]
pub async fn run_link(
    endpoint: quinn::Endpoint,
    client_cfg: quinn::ClientConfig,
    peer: NodeId,
    addr: String,
    cfg: LinkConfig,
    mut rx: mpsc::Receiver<Message>,
    unreachable: mpsc::Sender<NodeId>,
    arrived: std::sync::Arc<tokio::sync::Notify>,
) {
    let mut backoff = cfg.backoff_min;
    let mut restarted = false;
    'outer: loop {
        let dialing = dial(&endpoint, &client_cfg, peer, &addr, cfg.connect_timeout);
        let result = tokio::select! {
            r = dialing => r,
            _ = arrived.notified(), if !restarted => {
                tracing::debug!(peer = peer.0, "peer connected to us: dialing it again now");
                restarted = true;
                // What queued during the dial that was cut short went nowhere
                // and is stale: dropped, like after a failed dial (Raft probes
                // again rather than replaying old appends to the returning peer).
                if drop_queued(&mut rx) > 0 {
                    let _ = unreachable.try_send(peer);
                }
                continue 'outer;
            }
        };
        restarted = false;
        let conn = match result {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(peer = peer.0, error = %e, "cannot reach peer");
                let _ = unreachable.try_send(peer);
                // Drop what queued meanwhile: it is stale by the time the peer is back.
                let deadline = tokio::time::Instant::now() + backoff;
                loop {
                    tokio::select! {
                        m = rx.recv() => if m.is_none() { return },
                        _ = tokio::time::sleep_until(deadline) => break,
                        _ = arrived.notified() => break,
                    }
                }
                backoff = (backoff * 2).min(cfg.backoff_max);
                continue;
            }
        };
        backoff = cfg.backoff_min;
        let mut send = match conn.open_uni().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(peer = peer.0, error = %e, "cannot open a stream to peer");
                continue;
            }
        };
        let mut buf = Vec::new();
        while let Some(msg) = rx.recv().await {
            buf.clear();
            push_frame(&mut buf, cfg.cluster_id, peer, msg);
            // Write what queued meanwhile in one go.
            while buf.len() < (1 << 20) {
                match rx.try_recv() {
                    Ok(m) => push_frame(&mut buf, cfg.cluster_id, peer, m),
                    Err(_) => break,
                }
            }
            if let Err(e) = send.write_all(&buf).await {
                tracing::debug!(peer = peer.0, error = %e, "link to peer lost");
                let _ = unreachable.try_send(peer);
                conn.close(0u32.into(), b"write failed");
                forget_arrivals(&arrived).await;
                continue 'outer;
            }
        }
        let _ = send.finish();
        return;
    }
}

/// Forgets an arrival noted while the link was up (a `Notify` keeps one
/// permit when no one waits): it says nothing about the peer now, and would
/// cut the next dial at once and use up the one cut per dial that the
/// peer's real return needs.
async fn forget_arrivals(arrived: &tokio::sync::Notify) {
    let _ = tokio::time::timeout(Duration::ZERO, arrived.notified()).await;
}

/// Drops every message waiting in `rx`; returns how many.
fn drop_queued(rx: &mut mpsc::Receiver<Message>) -> usize {
    let mut n = 0;
    while rx.try_recv().is_ok() {
        n += 1;
    }
    n
}

fn push_frame(buf: &mut Vec<u8>, cluster_id: u64, peer: NodeId, msg: Message) {
    match frame::encode(&PeerFrame { cluster_id, msg }) {
        Ok(f) => buf.extend_from_slice(&f),
        Err(e) => tracing::error!(peer = peer.0, error = %e, "cannot encode a message"),
    }
}

/// Dials `peer` at `addr` with mutual TLS.
pub(crate) async fn dial(
    endpoint: &quinn::Endpoint,
    cfg: &quinn::ClientConfig,
    peer: NodeId,
    addr: &str,
    timeout: Duration,
) -> Result<quinn::Connection, String> {
    let sock = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("resolving {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to nothing"))?;
    let connecting = endpoint.connect_with(cfg.clone(), sock, &node_dns_name(peer.0)).map_err(|e| e.to_string())?;
    tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| format!("connecting to {addr} timed out"))?
        .map_err(|e| e.to_string())
}

/// What serving inbound peer connections needs.
#[derive(Clone, Debug)]
pub struct PeerService {
    /// This cluster's id.
    pub cluster_id: u64,
    /// This node.
    pub me: NodeId,
    /// Largest Raft message frame.
    pub frame_max: usize,
    /// The Raft task's inbound queue.
    pub inbound: mpsc::Sender<Message>,
    /// Snapshot reception.
    pub snapshots: std::sync::Arc<crate::snapshot::ReceiveState>,
    /// The live state (its tables are reused by content when a snapshot arrives).
    pub db: std::sync::Arc<crate::snapshot::SharedDb>,
    /// The member book: removed ids are refused.
    pub book: crate::state::SharedBook,
    /// Wakes the outbound link to a peer that connects.
    pub arrivals: std::sync::Arc<PeerArrivals>,
}

impl PeerService {
    /// Whether `id` was removed from the cluster (its connections are refused).
    fn is_removed(&self, id: u64) -> bool {
        crate::state::read_book(&self.book).removed.contains(&id)
    }
}

/// Serves an inbound peer connection from authenticated node `from`: reads
/// frames from its one-way streams and hands valid messages to the Raft task
/// (dropping them when its queue is full: Raft retransmits). Snapshot
/// transfers come over TLS over TCP instead ([`serve_snapshots`]).
pub async fn serve_peer(conn: quinn::Connection, from: u64, svc: PeerService) {
    let PeerService { cluster_id, me, frame_max, inbound, .. } = svc.clone();
    if svc.is_removed(from) {
        tracing::warn!(peer = from, "refused a connection from a removed node");
        conn.close(6u32.into(), PeerRefusal::Removed(from).to_string().as_bytes());
        return;
    }
    svc.arrivals.arrived(from);
    loop {
        let Ok(mut recv) = conn.accept_uni().await else { return };
        let inbound = inbound.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            loop {
                let f = match frame::read::<PeerFrame>(&mut recv, frame_max).await {
                    Ok(f) => f,
                    Err(frame::FrameError::End) => return,
                    Err(frame::FrameError::Read(e)) => {
                        tracing::debug!(peer = from, error = %e, "peer stream ended");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(peer = from, error = %e, "malformed frame from peer; closing its connection");
                        conn.close(1u32.into(), b"malformed frame");
                        return;
                    }
                };
                if let Err(e) = check_frame(&f, cluster_id, me, from) {
                    tracing::warn!(peer = from, error = %e, "refused a peer frame; closing its connection");
                    conn.close(2u32.into(), e.to_string().as_bytes());
                    return;
                }
                if inbound.try_send(f.msg).is_err() {
                    metrics::counter!("cairn_peer_inbound_dropped_total").increment(1);
                }
            }
        });
    }
}

/// How long a snapshot connection's TLS handshake may take.
const SNAPSHOT_HANDSHAKE: Duration = Duration::from_secs(5);

/// Accepts snapshot transfers: TLS over TCP on the port number of the
/// node's QUIC endpoint, ALPN [`crate::tls::ALPN_SNAPSHOT`], each leader
/// authenticated by its certificate as on the QUIC side. At most `slots`
/// connections at once (handshakes included); one more is closed at once.
///
/// Bulk data goes over TCP because QUIC's per-datagram work costs about twice
/// the CPU per byte here (`docs/design/kv-server.md` §5).
pub async fn serve_snapshots(
    listener: tokio::net::TcpListener,
    tls: std::sync::Arc<rustls::ServerConfig>,
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    svc: PeerService,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin.
                tracing::warn!(error = %e, "accepting a snapshot connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%remote, "refused a snapshot connection: too many at once");
            continue;
        };
        let (acceptor, svc) = (acceptor.clone(), svc.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = crate::snapshot::tune_snapshot_socket(&tcp) {
                tracing::warn!(%remote, error = %e, "refused a snapshot connection: setting up its socket failed");
                return;
            }
            let stream = match tokio::time::timeout(SNAPSHOT_HANDSHAKE, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(%remote, error = %e, "refused a snapshot connection: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%remote, "refused a snapshot connection: TLS handshake timed out");
                    return;
                }
            };
            // The verifier required a certificate the CA signed; it must also name a node.
            let from = match stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(crate::tls::node_id_of)
            {
                Some(Ok(id)) => id,
                Some(Err(e)) => {
                    tracing::warn!(%remote, error = %e, "refused a snapshot connection's certificate");
                    return;
                }
                None => {
                    tracing::warn!(%remote, "refused a snapshot connection without a certificate");
                    return;
                }
            };
            if svc.is_removed(from) {
                tracing::warn!(peer = from, "refused a snapshot connection from a removed node");
                return;
            }
            let (recv, send) = tokio::io::split(stream);
            if let Err(e) = crate::snapshot::receive_snapshot(send, recv, from, svc).await {
                tracing::warn!(peer = from, error = %e, "snapshot reception failed");
            }
        });
    }
}

/// The ALPN a connection negotiated.
pub fn alpn_of(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?.protocol
}

/// Whether `alpn` is the peer protocol.
pub fn is_peer(alpn: &[u8]) -> bool {
    alpn == ALPN_PEER
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_raft_core::{Body, Term};

    #[test]
    fn frames_from_another_sender_cluster_or_recipient_are_refused() {
        let f = PeerFrame {
            cluster_id: 7,
            msg: Message { from: NodeId(2), to: NodeId(1), term: Term(1), body: Body::TimeoutNow },
        };
        assert_eq!(check_frame(&f, 7, NodeId(1), 2), Ok(()));
        assert!(matches!(check_frame(&f, 8, NodeId(1), 2), Err(PeerRefusal::Cluster { .. })));
        assert!(matches!(check_frame(&f, 7, NodeId(1), 3), Err(PeerRefusal::Sender { claimed: 2, authenticated: 3 })));
        assert!(matches!(check_frame(&f, 7, NodeId(3), 2), Err(PeerRefusal::Recipient(1))));
        let bytes = frame::encode(&f).expect("encode");
        let back: PeerFrame = frame::decode_frame(&bytes, 1 << 20).expect("decode");
        assert_eq!(back.msg, f.msg);
    }
}
