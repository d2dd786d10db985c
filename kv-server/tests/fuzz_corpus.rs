//! Runs the checked-in fuzz corpus (`fuzz/corpus/decoders/`) through the fuzz
//! target's entry point, and arbitrary bytes through it with proptest.

use std::path::Path;

use cairn_kv_client::frame::encode;
use cairn_kv_client::protocol::{Session, WriteOp};
use cairn_kv_server::fuzzing::fuzz_decoders;
use cairn_kv_server::peer::PeerFrame;
use cairn_kv_server::snapshot::{SnapshotAck, SnapshotHello};
use cairn_kv_server::state::{Command, CommandOp, HistoryRecord, Outcome, PrevValue, SessionRecord, encode_value};
use cairn_raft_core::{Body, ConfState, Entry, EntryKind, LogIndex, Message, NodeId, Term};
use proptest::prelude::*;

fn corpus_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decoders")
}

#[test]
fn decoders_corpus() {
    let mut n = 0;
    for e in std::fs::read_dir(corpus_dir()).expect("corpus directory") {
        fuzz_decoders(&std::fs::read(e.expect("entry").path()).expect("read"));
        n += 1;
    }
    assert!(n >= 16, "the corpus has only {n} files");
}

fn samples() -> Vec<(&'static str, Vec<u8>)> {
    let append = Message {
        from: NodeId(1),
        to: NodeId(2),
        term: Term(3),
        body: Body::Append {
            prev_index: LogIndex(4),
            prev_term: Term(3),
            entries: vec![Entry {
                term: Term(3),
                index: LogIndex(5),
                kind: EntryKind::Normal,
                data: b"x".to_vec().into(),
            }],
            commit: LogIndex(4),
            read_seq: 0,
        },
    };
    let cmd = Command {
        time_ms: 1,
        op: CommandOp::Write {
            session: Session { client_id: 1, seq: 1, first_unacked: 1 },
            ops: vec![WriteOp::Put { key: b"k".to_vec(), value: b"v".to_vec() }],
        },
    };
    vec![
        ("peer-append", encode(&PeerFrame { cluster_id: 9, msg: append }).expect("encode")),
        (
            "snapshot-hello",
            encode(&SnapshotHello {
                cluster_id: 9,
                from: NodeId(1),
                to: NodeId(2),
                term: Term(3),
                conf: ConfState::with_voters([NodeId(1), NodeId(2), NodeId(3)]),
            })
            .expect("encode"),
        ),
        (
            "snapshot-ack",
            encode(&SnapshotAck { durable: Some((7, 2)), accepts_delta: true, pending: Some((9, 2)) }).expect("encode"),
        ),
        (
            "snapshot-ack-empty",
            encode(&SnapshotAck { durable: None, accepts_delta: false, pending: None }).expect("encode"),
        ),
        ("command-write", cmd.encode().expect("encode")),
        (
            "command-alarm",
            Command { time_ms: 2, op: CommandOp::Alarm { node: 3, raise: true } }.encode().expect("encode"),
        ),
        (
            "history-event",
            cairn_kv_client::frame::archive(&cairn_kv_client::protocol::WatchEvent {
                revision: 4,
                kind: cairn_kv_client::protocol::EventKind::Delete,
                kv: cairn_kv_client::protocol::KeyValue {
                    key: b"k".to_vec(),
                    value: Vec::new(),
                    meta: cairn_kv_client::protocol::KeyMeta::default(),
                },
                prev: None,
            })
            .expect("encode"),
        ),
        (
            "history-record",
            HistoryRecord {
                kind: cairn_kv_client::protocol::EventKind::Put,
                key: b"k".to_vec(),
                meta: cairn_kv_client::protocol::KeyMeta { create_revision: 2, mod_revision: 5, version: 2, lease: 0 },
                value: None,
                prev: Some(PrevValue {
                    meta: cairn_kv_client::protocol::KeyMeta {
                        create_revision: 2,
                        mod_revision: 2,
                        version: 1,
                        lease: 0,
                    },
                    value: b"old".to_vec(),
                }),
            }
            .encode()
            .expect("encode"),
        ),
        ("history-key-and-record", {
            let mut b = cairn_kv_server::state::event_key(5, 0);
            b.extend(
                HistoryRecord {
                    kind: cairn_kv_client::protocol::EventKind::Delete,
                    key: b"k".to_vec(),
                    meta: cairn_kv_client::protocol::KeyMeta::default(),
                    value: Some(Vec::new()),
                    prev: None,
                }
                .encode()
                .expect("encode"),
            );
            b
        }),
        (
            "command-lease-grant",
            Command { time_ms: 3, op: CommandOp::LeaseGrant { ttl_ms: 5000, owner: 4 } }.encode().expect("encode"),
        ),
        (
            "command-lease-revoke",
            Command { time_ms: 3, op: CommandOp::LeaseRevoke { id: 42 } }.encode().expect("encode"),
        ),
        (
            "command-member",
            Command { time_ms: 2, op: CommandOp::SetMember { id: 4, addr: "h:1".into() } }.encode().expect("encode"),
        ),
        (
            "session",
            SessionRecord {
                last_active_ms: 1,
                first_unacked: 2,
                responses: vec![(2, Outcome::Written { index: 7, revision: 3 })],
            }
            .encode()
            .expect("encode"),
        ),
        (
            "value",
            encode_value(
                cairn_kv_client::protocol::KeyMeta { create_revision: 2, mod_revision: 5, version: 2, lease: 0 },
                b"hello",
            ),
        ),
    ]
}

/// `CAIRN_SERVER_WRITE_CORPUS=1 cargo test -p cairn-kv-server --test fuzz_corpus` rewrites the corpus.
#[test]
fn write_corpus() {
    if std::env::var_os("CAIRN_SERVER_WRITE_CORPUS").is_none() {
        return;
    }
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).expect("mkdir");
    for (name, b) in samples() {
        std::fs::write(dir.join(name), &b).expect("write");
        let mut flipped = b.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x5a;
        std::fs::write(dir.join(format!("{name}-flipped")), &flipped).expect("write");
        std::fs::write(dir.join(format!("{name}-truncated")), &b[..b.len() / 2]).expect("write");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..2048)) {
        fuzz_decoders(&data);
    }

    /// A valid encoding with any one byte changed: refused or decoded, never a panic.
    #[test]
    fn damaged_encodings_never_panic(which in 0usize..64, at in any::<usize>(), x in 1u8..=255) {
        let s = samples();
        let mut b = s[which % s.len()].1.clone();
        let i = at % b.len();
        b[i] ^= x;
        fuzz_decoders(&b);
    }
}
