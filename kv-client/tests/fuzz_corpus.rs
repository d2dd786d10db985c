//! Runs the checked-in fuzz corpus (`fuzz/corpus/frames/`) through the fuzz
//! target's entry point, and arbitrary bytes through it with proptest.

use std::path::Path;

use cairn_kv_client::frame::encode;
use cairn_kv_client::fuzzing::fuzz_frames;
use cairn_kv_client::protocol::{
    Compare, CompareOp, CompareTarget, Consistency, ErrorCode, EventKind, KeyMeta, KeyValue, MemberInfo, Request,
    Response, Session, SnapshotFile, SnapshotHeader, StatusInfo, TxnOp, TxnOpResult, WatchEnd, WatchEvent, WriteOp,
};
use proptest::prelude::*;

fn corpus_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/frames")
}

#[test]
fn frames_corpus() {
    let mut n = 0;
    for e in std::fs::read_dir(corpus_dir()).expect("corpus directory") {
        fuzz_frames(&std::fs::read(e.expect("entry").path()).expect("read"));
        n += 1;
    }
    assert!(n >= 16, "the corpus has only {n} files");
}

fn samples() -> Vec<(&'static str, Vec<u8>)> {
    let reqs = [
        ("hello", Request::Hello { token: "t".into() }),
        ("register", Request::Register),
        ("pipe", Request::Pipe),
        (
            "write",
            Request::Write {
                session: Session { client_id: 3, seq: 2, first_unacked: 1 },
                ops: vec![
                    WriteOp::Put { key: b"k".to_vec(), value: b"v".to_vec() },
                    WriteOp::Delete { key: b"d".to_vec() },
                    WriteOp::DeleteRange { start: b"a".to_vec(), end: b"b".to_vec() },
                ],
            },
        ),
        ("get", Request::Get { key: b"k".to_vec(), consistency: Consistency::Serializable, revision: 7 }),
        (
            "scan",
            Request::Scan {
                start: b"a".to_vec(),
                end: Some(b"z".to_vec()),
                limit: 10,
                keys_only: true,
                consistency: Consistency::Linearizable,
                revision: 0,
            },
        ),
        (
            "txn",
            Request::Txn {
                session: Session { client_id: 3, seq: 4, first_unacked: 4 },
                compares: vec![
                    Compare { key: b"k".to_vec(), op: CompareOp::Equal, target: CompareTarget::Value(b"v".to_vec()) },
                    Compare { key: b"c".to_vec(), op: CompareOp::Less, target: CompareTarget::ModRevision(9) },
                    Compare { key: b"e".to_vec(), op: CompareOp::NotEqual, target: CompareTarget::Exists(true) },
                ],
                success: vec![
                    TxnOp::Put { key: b"k".to_vec(), value: b"w".to_vec(), prev_kv: true, lease: 7 },
                    TxnOp::Get { key: b"c".to_vec() },
                ],
                failure: vec![
                    TxnOp::Delete { key: b"k".to_vec(), prev_kv: false },
                    TxnOp::DeleteRange { start: b"a".to_vec(), end: b"b".to_vec() },
                ],
            },
        ),
        (
            "watch",
            Request::Watch {
                start: b"a/".to_vec(),
                end: Some(b"a0".to_vec()),
                start_revision: 7,
                prev_kv: true,
                progress_ms: 1000,
            },
        ),
        ("compact", Request::Compact { revision: 9 }),
        ("lease-grant", Request::LeaseGrant { ttl_ms: 5000, client_id: 4 }),
        ("lease-keep-alive", Request::LeaseKeepAlive { id: 42 }),
        (
            "write-lease",
            Request::Write {
                session: Session { client_id: 3, seq: 5, first_unacked: 5 },
                ops: vec![WriteOp::PutWithLease { key: b"k".to_vec(), value: b"v".to_vec(), lease: 42 }],
            },
        ),
        ("member-add", Request::MemberAdd { id: 4, addr: "127.0.0.1:7104".into(), learner: true }),
        ("snapshot-save", Request::SnapshotSave),
        ("alarm", Request::Alarm { node: 0, raise: false }),
    ];
    let resps = [
        (
            "value",
            Response::Value {
                value: Some(b"v".to_vec()),
                index: 9,
                meta: Some(KeyMeta { create_revision: 2, mod_revision: 3, version: 2, lease: 0 }),
                revision: 4,
            },
        ),
        (
            "txn-done",
            Response::TxnDone {
                succeeded: true,
                index: 12,
                revision: 5,
                results: vec![
                    TxnOpResult::Put {
                        prev: Some(KeyValue { key: b"k".to_vec(), value: b"v".to_vec(), meta: KeyMeta::default() }),
                    },
                    TxnOpResult::Delete { deleted: 1, prev: None },
                    TxnOpResult::DeleteRange { deleted: 3 },
                    TxnOpResult::Get { kv: None },
                ],
                replayed: false,
            },
        ),
        (
            "lease-info",
            Response::LeaseInfo { id: 42, ttl_ms: 5000, remaining_ms: Some(1200), keys: vec![b"k".to_vec()] },
        ),
        ("leases", Response::Leases(vec![1, 42])),
        (
            "watch-events",
            Response::WatchEvents {
                events: vec![WatchEvent {
                    revision: 8,
                    kind: EventKind::Put,
                    kv: KeyValue { key: b"a/1".to_vec(), value: b"v".to_vec(), meta: KeyMeta::default() },
                    prev: None,
                }],
                revision: 8,
            },
        ),
        ("watch-ended", Response::WatchEnded(WatchEnd::Compacted { oldest: 5 })),
        ("status", Response::Status(StatusInfo { node_id: 1, alarms: vec![2], ..StatusInfo::default() })),
        ("members", Response::Members(vec![MemberInfo { id: 1, addr: "a:1".into(), learner: false }])),
        (
            "snapshot-header",
            Response::SnapshotHeader(SnapshotHeader {
                cluster_id: 7,
                index: 100,
                term: 2,
                voters: vec![1, 2, 3],
                learners: vec![],
                files: vec![SnapshotFile { name: "table.0000000000000001.sst".into(), len: 10, checksum: 5 }],
            }),
        ),
        ("error", Response::error(ErrorCode::NotLeader, "no")),
        (
            "error-compacted",
            Response::error(ErrorCode::Compacted, "revision 3 is compacted: the oldest revision readable is 9"),
        ),
    ];
    let mut out: Vec<(&str, Vec<u8>)> = reqs.iter().map(|(n, r)| (*n, encode(r).expect("encode"))).collect();
    out.extend(resps.iter().map(|(n, r)| (*n, encode(r).expect("encode"))));
    out
}

/// `CAIRN_CLIENT_WRITE_CORPUS=1 cargo test -p cairn-kv-client --test fuzz_corpus` rewrites the corpus.
#[test]
fn write_corpus() {
    if std::env::var_os("CAIRN_CLIENT_WRITE_CORPUS").is_none() {
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
        fuzz_frames(&data);
    }

    /// A valid frame with any one byte changed: refused, or a value that
    /// still round-trips (never a panic).
    #[test]
    fn damaged_frames_never_panic(which in 0usize..13, at in any::<usize>(), x in 1u8..=255) {
        let s = samples();
        let mut b = s[which % s.len()].1.clone();
        let i = at % b.len();
        b[i] ^= x;
        fuzz_frames(&b);
    }
}
