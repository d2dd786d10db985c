//! Certificates and TLS: a cluster CA, node certificates that carry the node
//! id (SAN `node-<id>.cairn`), and the QUIC configurations built from them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cairn_kv_client::protocol::{ALPN_CLIENT, ALPN_PEER, SERVER_NAME};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A TLS setup that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("tls: {0}")]
pub struct TlsError(pub String);

fn err(what: impl std::fmt::Display) -> TlsError {
    TlsError(what.to_string())
}

/// The ALPN of a snapshot transfer's TLS-over-TCP connection.
pub const ALPN_SNAPSHOT: &[u8] = b"cairn-snapshot/1";

/// The DNS name that binds a certificate to node `id`.
pub fn node_dns_name(id: u64) -> String {
    format!("node-{id}.cairn")
}

/// The node id a peer certificate is bound to: its one `node-<id>.cairn` SAN.
pub fn node_id_of(cert: &CertificateDer<'_>) -> Result<u64, TlsError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| err(format!("bad certificate: {e}")))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| err(format!("bad SAN extension: {e}")))?
        .ok_or_else(|| err("the certificate has no SAN"))?;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => {
            d.strip_prefix("node-").and_then(|r| r.strip_suffix(".cairn")).and_then(|i| i.parse::<u64>().ok())
        }
        _ => None,
    });
    match (ids.next(), ids.next()) {
        (Some(id), None) if id != 0 => Ok(id),
        (None, _) => Err(err("the certificate names no node (no node-<id>.cairn SAN)")),
        _ => Err(err("the certificate names more than one node")),
    }
}

/// Generated PEM files.
#[derive(Debug, Clone)]
pub struct Pem {
    /// Certificate.
    pub cert: String,
    /// Private key.
    pub key: String,
}

/// Generates a cluster CA.
pub fn generate_ca(cluster_name: &str) -> Result<Pem, TlsError> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, format!("{cluster_name} cluster CA"));
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let cert = params.self_signed(&key).map_err(err)?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
}

/// Generates node `id`'s certificate, signed by the CA, valid for peers
/// (`node-<id>.cairn`) and clients ([`SERVER_NAME`], and `hosts`).
pub fn generate_node(ca: &Pem, id: u64, hosts: &[String]) -> Result<Pem, TlsError> {
    let ca_key = rcgen::KeyPair::from_pem(&ca.key).map_err(err)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.cert, ca_key).map_err(err)?;
    let mut names = vec![node_dns_name(id), SERVER_NAME.to_string()];
    names.extend(hosts.iter().cloned());
    let mut params = rcgen::CertificateParams::new(names).map_err(err)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, node_dns_name(id));
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let cert = params.signed_by(&key, &issuer).map_err(err)?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
}

/// Writes a CA and node certificates `ids` into `dir` (`ca.pem`, `ca.key`,
/// `node-<id>.pem`, `node-<id>.key`), keeping files that exist.
pub fn write_cluster_certs(dir: &Path, cluster_name: &str, ids: &[u64], hosts: &[String]) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
    let ca_cert = dir.join("ca.pem");
    let ca_key = dir.join("ca.key");
    let ca = if ca_cert.exists() && ca_key.exists() {
        Pem { cert: read_string(&ca_cert)?, key: read_string(&ca_key)? }
    } else {
        let ca = generate_ca(cluster_name)?;
        write_private(&ca_key, &ca.key)?;
        write_file(&ca_cert, &ca.cert)?;
        ca
    };
    for &id in ids {
        let cert = dir.join(format!("node-{id}.pem"));
        let key = dir.join(format!("node-{id}.key"));
        if cert.exists() && key.exists() {
            continue;
        }
        let pem = generate_node(&ca, id, hosts)?;
        write_private(&key, &pem.key)?;
        write_file(&cert, &pem.cert)?;
    }
    Ok(())
}

fn read_string(p: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(p).map_err(|e| err(format!("reading {}: {e}", p.display())))
}

fn write_file(p: &Path, s: &str) -> Result<(), TlsError> {
    std::fs::write(p, s).map_err(|e| err(format!("writing {}: {e}", p.display())))
}

fn write_private(p: &Path, s: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(p)
        .map_err(|e| err(format!("writing {}: {e}", p.display())))?;
    f.write_all(s.as_bytes()).map_err(|e| err(format!("writing {}: {e}", p.display())))
}

/// The node's TLS material, loaded.
#[derive(Debug)]
pub struct NodeTls {
    roots: Arc<rustls::RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl NodeTls {
    /// Loads the CA, the node certificate and key, and checks the
    /// certificate is bound to `id`.
    pub fn load(ca: &Path, cert: &Path, key: &Path, id: u64) -> Result<NodeTls, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).map_err(|e| err(format!("{}: {e}", ca.display())))? {
            roots.add(c.map_err(|e| err(format!("{}: {e}", ca.display())))?).map_err(err)?;
        }
        let chain: Vec<_> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| err(format!("{}: {e}", cert.display())))?
            .collect::<Result<_, _>>()
            .map_err(|e| err(format!("{}: {e}", cert.display())))?;
        let first = chain.first().ok_or_else(|| err(format!("{} holds no certificate", cert.display())))?;
        let bound = node_id_of(first)?;
        if bound != id {
            return Err(err(format!("{} is node {bound}'s certificate, not node {id}'s", cert.display())));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| err(format!("{}: {e}", key.display())))?;
        Ok(NodeTls { roots: Arc::new(roots), chain, key })
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// The server side: both ALPNs; client certificates verified against the
    /// CA when presented (peers must present one; clients present a token).
    pub fn server_config(&self, transport: Arc<quinn::TransportConfig>) -> Result<quinn::ServerConfig, TlsError> {
        let tls = self.server_tls(vec![ALPN_PEER.to_vec(), ALPN_CLIENT.to_vec()], false)?;
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(err)?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
        cfg.transport_config(transport);
        Ok(cfg)
    }

    /// The server side of snapshot transfers (TLS over TCP, ALPN
    /// [`ALPN_SNAPSHOT`]): only peers, each with a certificate the CA signed.
    pub fn snapshot_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        Ok(Arc::new(self.server_tls(vec![ALPN_SNAPSHOT.to_vec()], true)?))
    }

    /// The client side of snapshot transfers: presents this node's
    /// certificate, verifies the follower's against the CA.
    pub fn snapshot_client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        Ok(Arc::new(self.peer_client_tls(ALPN_SNAPSHOT)?))
    }

    /// TLS 1.3 with this node's certificate, offering `alpns`; a client
    /// certificate must be presented if `peers_only`, and is verified against
    /// the CA whenever it is.
    fn server_tls(&self, alpns: Vec<Vec<u8>>, peers_only: bool) -> Result<rustls::ServerConfig, TlsError> {
        let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots.clone(), Self::provider());
        let verifier =
            if peers_only { builder.build() } else { builder.allow_unauthenticated().build() }.map_err(err)?;
        let mut tls = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(err)?;
        tls.alpn_protocols = alpns;
        Ok(tls)
    }

    /// TLS 1.3 toward a peer: this node's certificate, the CA's roots, `alpn`.
    fn peer_client_tls(&self, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
        let mut tls = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(err)?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(err)?;
        tls.alpn_protocols = vec![alpn.to_vec()];
        Ok(tls)
    }

    /// The client side toward peers: presents this node's certificate,
    /// verifies the peer's against the CA.
    pub fn peer_client_config(&self, transport: Arc<quinn::TransportConfig>) -> Result<quinn::ClientConfig, TlsError> {
        let tls = self.peer_client_tls(ALPN_PEER)?;
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(err)?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
        cfg.transport_config(transport);
        Ok(cfg)
    }
}

/// The QUIC transport settings of a node: `window` bytes of flow control
/// each way per connection (a stream gets at most 8 MiB of it). The node's
/// listening endpoint starts every connection with the client window; a
/// connection that turns out to be a peer's is widened to the peer window
/// ([`widen_for_peer`]), since a window can grow once set, never shrink.
pub fn transport_config(streams_per_connection_max: u32, window: u64) -> quinn::TransportConfig {
    let window = window_bytes(window);
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(streams_per_connection_max.into());
    t.max_concurrent_uni_streams(16u32.into());
    // A peer (or client) that died is noticed within 2 s: its link redials
    // (a restarted peer is reached again) and clients try another node.
    t.keep_alive_interval(Some(Duration::from_millis(400)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(2)) {
        t.max_idle_timeout(Some(idle));
    }
    t.stream_receive_window(quinn::VarInt::from_u32(8 << 20));
    t.receive_window(quinn::VarInt::from_u32(window));
    t.send_window(window.into());
    t
}

/// The node's UDP socket, bound to `addr`, with kernel buffers of `buffer`
/// bytes each way (or what the kernel allows: a warning says when it capped
/// them).
pub fn udp_socket(addr: std::net::SocketAddr, buffer: u64) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let want = usize::try_from(buffer).unwrap_or(usize::MAX);
    // A buffer the kernel refuses is no reason not to serve: the default stays.
    let _ = socket.set_recv_buffer_size(want);
    let _ = socket.set_send_buffer_size(want);
    // Linux reports twice what it grants (its bookkeeping overhead).
    let (rcv, snd) = (socket.recv_buffer_size()?, socket.send_buffer_size()?);
    let granted = if cfg!(target_os = "linux") { rcv.min(snd) / 2 } else { rcv.min(snd) };
    if granted < want {
        tracing::warn!(
            wanted = want,
            receive = rcv,
            send = snd,
            "the kernel capped the UDP buffers; raise net.core.rmem_max and net.core.wmem_max \
             (sysctl) to at least [limits] udp_buffer_bytes, or datagrams are dropped under load"
        );
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A window in the range the configuration allows (64 KiB to 4 GiB - 1).
fn window_bytes(window: u64) -> u32 {
    window.clamp(64 << 10, u64::from(u32::MAX)) as u32
}

/// Gives an accepted connection that proved to be a peer's the peer window.
pub fn widen_for_peer(conn: &quinn::Connection, window: u64) {
    let window = window_bytes(window);
    conn.set_receive_window(quinn::VarInt::from_u32(window));
    conn.set_send_window(window.into());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_certificates_carry_their_id() {
        let ca = generate_ca("t").expect("ca");
        let n = generate_node(&ca, 7, &["localhost".into()]).expect("node");
        let der = CertificateDer::from_pem_slice(n.cert.as_bytes()).expect("pem");
        assert_eq!(node_id_of(&der).expect("id"), 7);
        let ca_der = CertificateDer::from_pem_slice(ca.cert.as_bytes()).expect("pem");
        assert!(node_id_of(&ca_der).is_err());
    }
}
