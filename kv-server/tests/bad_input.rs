//! Bad input is refused with a clear error while the node goes on serving.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cairn_kv_client::frame;
use cairn_kv_client::protocol::{ALPN_CLIENT, ALPN_PEER, KEY_BYTES_MAX, Request, Response, SERVER_NAME, WriteOp};
use cairn_kv_client::{Client, ErrorCode};
use cairn_kv_server::peer::PeerFrame;
use cairn_kv_server::tls;
use cairn_raft_core::{Body, Message, NodeId, Term};
use common::Cluster;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

fn roots(ca_pem: &[u8]) -> Arc<rustls::RootCertStore> {
    let mut r = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        r.add(c.expect("pem")).expect("add");
    }
    Arc::new(r)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS 1.3 client configuration trusting `ca_pem`, offering `alpn`, with
/// an optional client certificate.
fn client_tls(ca_pem: &[u8], alpn: &[u8], client_cert: Option<&tls::Pem>) -> rustls::ClientConfig {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots(ca_pem));
    let mut cfg = match client_cert {
        Some(p) => {
            let chain = vec![CertificateDer::from_pem_slice(p.cert.as_bytes()).expect("cert")];
            let key = PrivateKeyDer::from_pem_slice(p.key.as_bytes()).expect("key");
            builder.with_client_auth_cert(chain, key).expect("client cert")
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg
}

/// A TLS-over-TCP connection to a node's snapshot port (the port number of
/// its QUIC endpoint), as node 1's name, with an optional client certificate.
async fn raw_snapshot_connect(
    addr: &str,
    ca_pem: &[u8],
    client_cert: Option<&tls::Pem>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let cfg = client_tls(ca_pem, tls::ALPN_SNAPSHOT, client_cert);
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from(tls::node_dns_name(1)).expect("name");
    let connect = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp);
    tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())
}

/// Writes `bytes` on a snapshot connection and reads what comes back until
/// the node ends it: `Ok(bytes read)` or the error that ended it.
async fn snapshot_exchange(
    mut s: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    bytes: &[u8],
) -> Result<usize, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The node may have refused already: a failed write is seen by the read too.
    let _ = s.write_all(bytes).await;
    let _ = s.flush().await;
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back))
        .await
        .map_err(|_| "the node kept the connection open".to_string())?
        .map(|_| back.len())
        .map_err(|e| e.to_string())
}

/// A raw QUIC connection with the given ALPN and optional client certificate.
async fn raw_connect(
    addr: &str,
    ca_pem: &[u8],
    alpn: &[u8],
    server_name: &str,
    client_cert: Option<&tls::Pem>,
) -> Result<quinn::Connection, String> {
    let cfg = client_tls(ca_pem, alpn, client_cert);
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).expect("quic");
    let mut ep = quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).expect("endpoint");
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = ep.connect(addr.parse().expect("addr"), server_name).map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())
}

async fn exchange_raw(conn: &quinn::Connection, bytes: &[u8]) -> Result<Response, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(bytes).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    frame::read::<Response>(&mut recv, 1 << 20).await.map_err(|e| e.to_string())
}

/// A pipe frame of an unknown frame version.
fn bad_version_tagged() -> Vec<u8> {
    let mut f = frame::encode_tagged(12, &Request::Status { with_hash: false }).expect("encode");
    f[8 + 4] = 99;
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_the_node_keeps_serving() {
    let cluster = Cluster::start(&[]);
    let good = cluster.client();
    good.put("before", "1").await.expect("put");
    let ca = std::fs::read(cluster.layout.dir.join("certs/ca.pem")).expect("ca");
    let node1 = cluster.endpoint(1);

    // A wrong token.
    let mut o = cluster.options();
    o.token = "not-the-token".into();
    o.retry_deadline = Duration::from_secs(3);
    let err = Client::new(o).expect("client").put("x", "y").await.expect_err("wrong token");
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized), "{err}");
    assert!(err.to_string().contains("token"), "{err}");

    // An oversized value, and a request frame over the request limit.
    let err = good.put("big", vec![0u8; (1 << 20) + 1]).await.expect_err("oversized value");
    assert_eq!(err.code(), Some(ErrorCode::TooLarge), "{err}");
    let err = good.put("huge", vec![0u8; 5 << 20]).await.expect_err("oversized request");
    assert_eq!(err.code(), Some(ErrorCode::TooLarge), "{err}");
    // Keys: the limit (64 KiB less 16 bytes) is stored, read, watched in the
    // history and deleted (its LSM keys carry prefixes); one byte more is
    // refused; so is a write batch of more operations than a transaction
    // may hold (1,024).
    let longest = vec![b'k'; KEY_BYTES_MAX];
    good.put(longest.clone(), "at the limit").await.expect("a key at the limit");
    assert_eq!(good.get(longest.clone()).await.expect("get").as_deref(), Some(&b"at the limit"[..]));
    good.delete(longest.clone()).await.expect("delete the longest key");
    let err = good.put(vec![b'k'; KEY_BYTES_MAX + 1], "x").await.expect_err("oversized key");
    assert_eq!(err.code(), Some(ErrorCode::TooLarge), "{err}");
    let err = good.get(vec![b'k'; KEY_BYTES_MAX + 1]).await.expect_err("oversized key in a get");
    assert_eq!(err.code(), Some(ErrorCode::TooLarge), "{err}");
    let many: Vec<WriteOp> =
        (0..1025).map(|i| WriteOp::Put { key: format!("m{i}").into(), value: b"v".to_vec() }).collect();
    let err = good.write(many).await.expect_err("a batch of 1,025 operations");
    assert_eq!(err.code(), Some(ErrorCode::TooLarge), "{err}");
    let many: Vec<WriteOp> =
        (0..1024).map(|i| WriteOp::Put { key: format!("m{i}").into(), value: b"v".to_vec() }).collect();
    good.write(many).await.expect("a batch of 1,024 operations");

    // Malformed frames on an authenticated client connection.
    let conn = raw_connect(&node1, &ca, ALPN_CLIENT, SERVER_NAME, None).await.expect("connect");
    let hello = frame::encode(&Request::Hello { token: cluster.layout.token.clone() }).expect("encode");
    assert!(matches!(exchange_raw(&conn, &hello).await, Ok(Response::HelloOk { .. })));
    let mut garbage = vec![16, 0, 0, 0, 1, 0, 0, 0];
    garbage.extend_from_slice(&[0xAB; 16]);
    match exchange_raw(&conn, &garbage).await {
        Ok(Response::Error(e)) => assert_eq!(e.code, ErrorCode::BadRequest, "{}", e.message),
        other => panic!("garbage answered with {other:?}"),
    }
    let mut bad_version = frame::encode(&Request::Status { with_hash: false }).expect("encode");
    bad_version[4] = 99;
    match exchange_raw(&conn, &bad_version).await {
        Ok(Response::Error(e)) => assert!(e.message.contains("version 99"), "{}", e.message),
        other => panic!("a frame of version 99 answered with {other:?}"),
    }
    // The same connection still works.
    assert!(matches!(
        exchange_raw(&conn, &frame::encode(&Request::Status { with_hash: false }).expect("e")).await,
        Ok(Response::Status(_))
    ));

    // The same on a request pipe: each bad frame is answered under its id
    // and the pipe goes on; a frame that breaks the framing ends the pipe,
    // not the connection.
    let (mut send, mut recv) = conn.open_bi().await.expect("pipe");
    let mut bytes = frame::encode(&Request::Pipe).expect("encode");
    let status = Request::Status { with_hash: false };
    bytes.extend(frame::encode_tagged(7, &status).expect("encode"));
    bytes.extend(8u64.to_le_bytes());
    bytes.extend(&garbage);
    bytes.extend(9u64.to_le_bytes());
    let oversized = 5usize << 20;
    bytes.extend((oversized as u32).to_le_bytes());
    bytes.extend([1, 0, 0, 0]);
    bytes.extend(vec![0u8; oversized]);
    let watch = Request::Watch { start: b"a".to_vec(), end: None, start_revision: 0, prev_kv: false, progress_ms: 0 };
    bytes.extend(frame::encode_tagged(10, &watch).expect("encode"));
    bytes.extend(frame::encode_tagged(11, &status).expect("encode"));
    send.write_all(&bytes).await.expect("write");
    let mut answers = std::collections::BTreeMap::new();
    while answers.len() < 5 {
        let (id, payload) = frame::read_tagged(&mut recv, 1 << 20).await.expect("an answer");
        answers.insert(id, frame::decode::<Response>(&payload.expect("payload")).expect("decode"));
    }
    assert!(matches!(answers.get(&7), Some(Response::Status(_))), "{answers:?}");
    assert!(matches!(answers.get(&11), Some(Response::Status(_))), "{answers:?}");
    for (id, code) in [(8, ErrorCode::BadRequest), (9, ErrorCode::TooLarge), (10, ErrorCode::BadRequest)] {
        match answers.get(&id) {
            Some(Response::Error(e)) => assert_eq!(e.code, code, "request {id}: {}", e.message),
            other => panic!("request {id} answered with {other:?}"),
        }
    }
    send.write_all(&bad_version_tagged()).await.expect("write");
    let end = frame::read_tagged(&mut recv, 1 << 20).await;
    assert!(matches!(end, Err(frame::FrameError::End)), "the pipe went on after a frame of version 99: {end:?}");
    assert!(matches!(
        exchange_raw(&conn, &frame::encode(&Request::Status { with_hash: false }).expect("e")).await,
        Ok(Response::Status(_))
    ));

    // A peer certificate from another CA: the handshake fails.
    let other_ca = tls::generate_ca("intruder").expect("ca");
    let forged = tls::generate_node(&other_ca, 2, &[]).expect("node");
    let r = raw_connect(&node1, &ca, ALPN_PEER, &tls::node_dns_name(1), Some(&forged)).await;
    match r {
        Err(e) => assert!(e.to_lowercase().contains("cert"), "the handshake failed for another reason: {e}"),
        Ok(c) => {
            // TLS 1.3 may finish the client side before the server rejects the certificate.
            let reason = tokio::time::timeout(Duration::from_secs(5), c.closed()).await.expect("closed in time");
            assert!(reason.to_string().to_lowercase().contains("cert"), "{reason}");
        }
    }

    // A validly signed certificate of node 3 whose messages claim to be from node 2.
    let certs = cluster.layout.dir.join("certs");
    let node3 = tls::Pem {
        cert: std::fs::read_to_string(certs.join("node-3.pem")).expect("cert"),
        key: std::fs::read_to_string(certs.join("node-3.key")).expect("key"),
    };
    let conn = raw_connect(&node1, &ca, ALPN_PEER, &tls::node_dns_name(1), Some(&node3)).await.expect("peer connect");
    let mut send = conn.open_uni().await.expect("uni");
    let status = good.status_of(&node1, false).await.expect("status");
    let spoof = PeerFrame {
        cluster_id: status.cluster_id,
        msg: Message { from: NodeId(2), to: NodeId(1), term: Term(status.term + 100), body: Body::TimeoutNow },
    };
    send.write_all(&frame::encode(&spoof).expect("encode")).await.expect("write");
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.expect("closed in time");
    assert!(reason.to_string().contains("claims to be from node 2"), "{reason}");
    // A frame of another cluster, on node 3's own identity.
    let conn = raw_connect(&node1, &ca, ALPN_PEER, &tls::node_dns_name(1), Some(&node3)).await.expect("peer connect");
    let mut send = conn.open_uni().await.expect("uni");
    let foreign = PeerFrame {
        cluster_id: status.cluster_id ^ 1,
        msg: Message { from: NodeId(3), to: NodeId(1), term: Term(status.term + 100), body: Body::TimeoutNow },
    };
    send.write_all(&frame::encode(&foreign).expect("encode")).await.expect("write");
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.expect("closed in time");
    assert!(reason.to_string().contains("cluster"), "{reason}");
    // A node of an older build (peer protocol version 1), with a valid
    // certificate: refused at the handshake, no frame exchanged.
    let r = raw_connect(&node1, &ca, b"cairn-peer/1", &tls::node_dns_name(1), Some(&node3)).await;
    match r {
        Err(e) => assert!(e.to_lowercase().contains("protocol"), "the handshake failed for another reason: {e}"),
        Ok(_) => panic!("a peer of protocol version 1 was accepted"),
    }

    // A client connection that sends what the node does not read (a stream
    // opened beside the first, unfinished, hello) gets no more than the
    // client window (4 MiB) buffered, not a stream's 8 MiB.
    let conn = raw_connect(&node1, &ca, ALPN_CLIENT, SERVER_NAME, None).await.expect("connect");
    let (mut first, _r1) = conn.open_bi().await.expect("first stream");
    first.write_all(&[8]).await.expect("write");
    let (mut second, _r2) = conn.open_bi().await.expect("second stream");
    let chunk = vec![0u8; 64 << 10];
    let mut sent = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, second.write(&chunk)).await {
        sent += n;
    }
    assert!(sent > 1 << 20, "only {sent} bytes went out: the test does not measure the window");
    assert!(sent <= (4 << 20) + (64 << 10), "{sent} bytes were taken unread by the node");
    conn.close(0u32.into(), b"done");

    // The snapshot port (TLS over TCP) refuses a leader without a certificate,
    // with another CA's certificate, and one whose hello claims another
    // node or cluster, or that sends bytes that are not a frame: no
    // acknowledgement comes back, and each refusal is logged with its reason.
    let hello = |from: u64, cluster: u64| {
        frame::encode(&cairn_kv_server::snapshot::SnapshotHello {
            cluster_id: cluster,
            from: NodeId(from),
            to: NodeId(1),
            term: Term(status.term + 100),
            conf: Default::default(),
        })
        .expect("encode")
    };
    for (cert, bytes, what) in [
        (None, hello(3, status.cluster_id), "no certificate"),
        (Some(&forged), hello(2, status.cluster_id), "another CA's certificate"),
        (Some(&node3), hello(2, status.cluster_id), "a hello claiming node 2 over node 3's certificate"),
        (Some(&node3), hello(3, status.cluster_id ^ 1), "a hello of another cluster"),
        (Some(&node3), vec![0xff; 64], "bytes that are not a frame"),
    ] {
        match raw_snapshot_connect(&node1, &ca, cert).await {
            Err(e) => {
                assert!(e.to_lowercase().contains("cert"), "{what}: the handshake failed for another reason: {e}")
            }
            // TLS 1.3 may finish the client side before the server refuses the certificate.
            Ok(s) => match snapshot_exchange(s, &bytes).await {
                Ok(n) => assert_eq!(n, 0, "{what}: the node answered"),
                Err(e) => assert!(!e.contains("kept the connection open"), "{what}: {e}"),
            },
        }
    }
    // The node may close a connection before its log line is written: wait
    // for each reason, for at most 5 s.
    let reasons = [
        "refused a snapshot connection: TLS handshake failed",
        "a snapshot stream claims cluster",
        "frame version 65535 is not supported",
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(cluster.layout.dir.join("node-1.log")).expect("log");
        let missing: Vec<_> = reasons.iter().filter(|r| !log.contains(*r)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "node 1 did not log {missing:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // None of it disturbed the cluster: same term, and it still serves.
    good.put("after", "2").await.expect("put after");
    assert_eq!(good.get("before").await.expect("get").as_deref(), Some(&b"1"[..]));
    let after = good.status_of(&node1, false).await.expect("status");
    assert_eq!(after.term, status.term, "a refused message changed the term");
}

/// A watcher whose client stops reading is not buffered without bound: once
/// more event bytes than `watch_buffer_bytes` were published after the batch
/// it reads next, the node ends it as too slow (its client would resume
/// from the history), letting go of what it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_does_not_read_is_ended_not_buffered() {
    let cluster = Cluster::start_with_config("[limits]\nwatch_buffer_bytes = 1048576\n");
    cluster.leader(Duration::from_secs(20)).await;
    let ca = std::fs::read(cluster.layout.dir.join("certs").join("ca.pem")).expect("ca");
    let conn = raw_connect(&cluster.endpoint(1), &ca, ALPN_CLIENT, SERVER_NAME, None).await.expect("connect");
    let hello = frame::encode(&Request::Hello { token: cluster.layout.token.clone() }).expect("encode");
    assert!(matches!(exchange_raw(&conn, &hello).await, Ok(Response::HelloOk { .. })));
    let (mut send, mut recv) = conn.open_bi().await.expect("watch stream");
    let watch = Request::Watch {
        start: b"slow/".to_vec(),
        end: Some(b"slow0".to_vec()),
        start_revision: 0,
        prev_kv: false,
        progress_ms: 0,
    };
    send.write_all(&frame::encode(&watch).expect("encode")).await.expect("watch");
    let _ = send.finish();
    match frame::read::<Response>(&mut recv, 1 << 20).await {
        Ok(Response::WatchProgress { .. }) => {}
        other => panic!("the watch did not start: {other:?}"),
    }
    // 12 MiB of events while the watcher's client reads nothing: QUIC's flow
    // control soon stops the node's writes, and the buffer fills behind them.
    let c = cluster.client();
    let value = vec![7u8; 128 << 10];
    for i in 0..96 {
        c.put(format!("slow/{i:03}"), value.clone()).await.expect("put");
    }
    // Now read: some events, then the end (within the 10 s a stuck watcher gets).
    let mut events = 0;
    loop {
        assert!(events < 96, "every event arrived: the watcher was buffered, not ended as too slow");
        match tokio::time::timeout(Duration::from_secs(20), frame::read::<Response>(&mut recv, 16 << 20)).await {
            Ok(Ok(Response::WatchEvents { events: e, .. })) => events += e.len(),
            Ok(Ok(Response::WatchProgress { .. })) => {}
            Ok(Ok(Response::WatchEnded(cairn_kv_client::protocol::WatchEnd::TooSlow { resume_from }))) => {
                assert!(resume_from > 0);
                break;
            }
            other => panic!("after {events} events the watch went on with {other:?}, not ended as too slow"),
        }
    }
}

/// A client connection holds at most `streams_per_connection_max` streams at
/// once (QUIC's stream credit, from the node's `[limits]`): with a limit of 4
/// and 4 requests held half-sent, a fifth stream cannot open; once one of
/// them is completed and answered it can, and the connection serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_holds_at_most_its_stream_limit() {
    let cluster = Cluster::start_with_config("[limits]\nstreams_per_connection_max = 4\n");
    cluster.leader(Duration::from_secs(20)).await;
    let ca = std::fs::read(cluster.layout.dir.join("certs/ca.pem")).expect("ca");
    let node1 = cluster.layout.endpoints[0].clone();
    let conn = raw_connect(&node1, &ca, ALPN_CLIENT, SERVER_NAME, None).await.expect("connect");
    let hello = frame::encode(&Request::Hello { token: cluster.layout.token.clone() }).expect("encode");
    assert!(matches!(exchange_raw(&conn, &hello).await, Ok(Response::HelloOk { .. })));
    // Four requests, each stopped after its frame header: the node holds
    // four streams (the hello's place comes back once it is answered).
    let status = frame::encode(&Request::Status { with_hash: false }).expect("encode");
    let mut held = Vec::new();
    for i in 0..4 {
        let (mut send, recv) = tokio::time::timeout(Duration::from_secs(5), conn.open_bi())
            .await
            .unwrap_or_else(|_| panic!("stream {i} of 4 did not open"))
            .expect("open");
        send.write_all(&status[..8]).await.expect("write");
        held.push((send, recv));
    }
    let fifth = tokio::time::timeout(Duration::from_millis(500), conn.open_bi()).await;
    assert!(fifth.is_err(), "a fifth stream opened beyond the limit of 4");
    // Completing one request frees a place: a fifth opens and is served.
    let (mut send, mut recv) = held.pop().expect("held");
    send.write_all(&status[8..]).await.expect("write");
    let _ = send.finish();
    let answer = frame::read::<Response>(&mut recv, 1 << 20).await;
    assert!(matches!(answer, Ok(Response::Status(_))), "the completed request: {answer:?}");
    drop(recv);
    // The place comes back once QUIC counts the stream closed on both sides
    // (its end acknowledged each way) and the node sends new credit: a few
    // round trips; once, under CI's load of three clusters at once, it had
    // not come back after 5 s (not explained). The bound here is only
    // against a place that never comes back.
    let served = tokio::time::timeout(Duration::from_secs(30), exchange_raw(&conn, &status)).await;
    assert!(matches!(served, Ok(Ok(Response::Status(_)))), "the fifth stream after one ended: {served:?}");
}
