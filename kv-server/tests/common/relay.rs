//! A UDP relay for one directed peer link: the dialing node's packets go
//! through it to the target and the answers come back through it, so a test
//! can drop either direction (QUIC runs over UDP: a dropped direction is a
//! one-way link, both a partition), lose a share of the packets, delay and
//! reorder packets, and send packets twice.
//!
//! Snapshot transfers run over TCP on the same port number: the relay
//! forwards TCP too, holding a blocked direction's bytes until it is
//! unblocked (a partition stalls a transfer) and delaying each piece by the
//! packets' delay. Loss and duplicates do not apply (TCP repairs them).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// A running relay (its tasks live as long as the test's runtime).
#[derive(Clone, Debug)]
pub struct Relay {
    /// Where the dialing node sends.
    pub addr: SocketAddr,
    /// Drop packets toward the target.
    forward_blocked: Arc<AtomicBool>,
    /// Drop packets back from the target.
    backward_blocked: Arc<AtomicBool>,
    /// Hold each packet toward the target this many ms (0: none); delayed
    /// packets may overtake each other, as on a real network.
    delay_ms: Arc<AtomicU64>,
    /// Percent of packets toward the target sent twice.
    duplicate_percent: Arc<AtomicU64>,
    /// Percent of packets lost, each direction.
    loss_percent: Arc<AtomicU64>,
    /// Bytes of TCP connections (snapshot transfers) forwarded toward the target.
    tcp_forwarded: Arc<AtomicU64>,
}

/// Whether the `n`-th packet falls in `percent` (a fixed pseudo-random
/// pattern of the count: splitmix64, no clock, no shared generator).
fn picked(n: u64, percent: u64) -> bool {
    if percent == 0 {
        return false;
    }
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) % 100 < percent
}

impl Relay {
    /// Starts a relay to `target` on a port of 127.0.0.1 free for both UDP and TCP.
    pub async fn start(target: SocketAddr) -> Relay {
        let (listen, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.expect("relay socket");
            let port = udp.local_addr().expect("relay address").port();
            if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
                break (Arc::new(udp), tcp);
            }
        };
        let addr = listen.local_addr().expect("relay address");
        let r = Relay {
            addr,
            forward_blocked: Arc::new(AtomicBool::new(false)),
            backward_blocked: Arc::new(AtomicBool::new(false)),
            delay_ms: Arc::new(AtomicU64::new(0)),
            duplicate_percent: Arc::new(AtomicU64::new(0)),
            loss_percent: Arc::new(AtomicU64::new(0)),
            tcp_forwarded: Arc::new(AtomicU64::new(0)),
        };
        let (fwd, back, delay) = (r.forward_blocked.clone(), r.backward_blocked.clone(), r.delay_ms.clone());
        let (dup, loss) = (r.duplicate_percent.clone(), r.loss_percent.clone());
        tokio::spawn(relay_tcp(tcp, target, fwd.clone(), back.clone(), delay.clone(), r.tcp_forwarded.clone()));
        let mut counter = 0u64;
        tokio::spawn(async move {
            let mut upstream: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let (n, src) = match listen.recv_from(&mut buf).await {
                    Ok(x) => x,
                    Err(_) => {
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                        continue;
                    }
                };
                let up = match upstream.get(&src) {
                    Some(u) => u.clone(),
                    None => {
                        let Ok(u) = UdpSocket::bind("127.0.0.1:0").await else { continue };
                        if u.connect(target).await.is_err() {
                            continue;
                        }
                        let u = Arc::new(u);
                        upstream.insert(src, u.clone());
                        let (u2, listen2, back2, loss2) = (u.clone(), listen.clone(), back.clone(), loss.clone());
                        tokio::spawn(async move {
                            let mut b = vec![0u8; 65536];
                            let mut counter = 0u64;
                            loop {
                                // A connected UDP socket reports an ICMP "port
                                // unreachable" (the target was down) as an error
                                // of the next receive: keep going.
                                match u2.recv(&mut b).await {
                                    Ok(n) => {
                                        counter += 1;
                                        let lost = picked(counter, loss2.load(Ordering::Relaxed));
                                        if !back2.load(Ordering::Relaxed) && !lost {
                                            let _ = listen2.send_to(&b[..n], src).await;
                                        }
                                    }
                                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(1)).await,
                                }
                            }
                        });
                        u
                    }
                };
                counter += 1;
                if !fwd.load(Ordering::Relaxed) && !picked(counter, loss.load(Ordering::Relaxed)) {
                    if picked(counter ^ (1 << 63), dup.load(Ordering::Relaxed)) {
                        let _ = up.send(&buf[..n]).await;
                    }
                    let d = delay.load(Ordering::Relaxed);
                    if d == 0 {
                        let _ = up.send(&buf[..n]).await;
                    } else {
                        // Up to ±25% jitter, so delayed packets also reorder.
                        let jitter = u64::from(buf[n / 2]) % (d / 2 + 1);
                        let wait = std::time::Duration::from_millis(d - d / 4 + jitter);
                        let packet = buf[..n].to_vec();
                        tokio::spawn(async move {
                            tokio::time::sleep(wait).await;
                            let _ = up.send(&packet).await;
                        });
                    }
                }
            }
        });
        r
    }

    /// Delays packets toward the target by about `ms` (0: none).
    pub fn delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::Relaxed);
    }

    /// Sends about `percent` of the packets toward the target twice (0: none).
    pub fn duplicate(&self, percent: u64) {
        self.duplicate_percent.store(percent, Ordering::Relaxed);
    }

    /// Loses about `percent` of the packets each way (0: none).
    pub fn lose(&self, percent: u64) {
        self.loss_percent.store(percent, Ordering::Relaxed);
    }

    /// Bytes of TCP connections forwarded toward the target so far.
    pub fn tcp_forwarded(&self) -> u64 {
        self.tcp_forwarded.load(Ordering::Relaxed)
    }

    /// Blocks (or unblocks) each direction.
    pub fn set(&self, forward: bool, backward: bool) {
        self.forward_blocked.store(forward, Ordering::Relaxed);
        self.backward_blocked.store(backward, Ordering::Relaxed);
    }
}

/// Forwards each TCP connection made to `listener` to `target`.
async fn relay_tcp(
    listener: TcpListener,
    target: SocketAddr,
    fwd: Arc<AtomicBool>,
    back: Arc<AtomicBool>,
    delay: Arc<AtomicU64>,
    forwarded: Arc<AtomicU64>,
) {
    while let Ok((inbound, _)) = listener.accept().await {
        let Ok(outbound) = TcpStream::connect(target).await else { continue };
        let (in_r, in_w) = inbound.into_split();
        let (out_r, out_w) = outbound.into_split();
        tokio::spawn(pipe(in_r, out_w, fwd.clone(), delay.clone(), forwarded.clone()));
        tokio::spawn(pipe(out_r, in_w, back.clone(), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))));
    }
}

/// Copies `from` to `to`, holding the bytes while `blocked`, delaying each
/// piece by `delay_ms`, and adding what it wrote to `written`.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    blocked: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while blocked.load(Ordering::Relaxed) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let d = delay_ms.load(Ordering::Relaxed);
        if d > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(d)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        written.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
}
