//! Runs the checked-in fuzz corpus (`fuzz/corpus/frame_decoder/`) through the
//! fuzz target's entry point, and arbitrary bytes through it with proptest.

use std::path::Path;

use cairn_snapshot_transfer::frame::fuzz_decode;
use cairn_snapshot_transfer::{Encoding, FileMeta, Frame, Manifest, NackReason, RejectReason};
use proptest::prelude::*;

fn corpus_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/frame_decoder")
}

#[test]
fn frame_decoder_corpus() {
    let mut n = 0;
    for e in std::fs::read_dir(corpus_dir()).expect("corpus directory") {
        fuzz_decode(&std::fs::read(e.expect("entry").path()).expect("read"));
        n += 1;
    }
    assert!(n >= 8, "the corpus has only {n} files");
}

/// `CAIRN_TRANSFER_WRITE_CORPUS=1 cargo test -p cairn-snapshot-transfer --test fuzz_corpus` rewrites the corpus.
#[test]
fn write_corpus() {
    if std::env::var_os("CAIRN_TRANSFER_WRITE_CORPUS").is_none() {
        return;
    }
    let m = Manifest {
        transfer_id: 1,
        index: 5,
        term: 1,
        files: vec![
            FileMeta { name: "a".into(), len: 10, checksum: 0 },
            FileMeta { name: "b".into(), len: 0, checksum: 7 },
        ],
    };
    let frames = vec![
        ("offer", Frame::Offer { manifest: m, window_bytes: 1 << 20 }),
        ("have", Frame::Have { transfer_id: 1, durable: vec![3, 0] }),
        (
            "chunk",
            Frame::Chunk {
                transfer_id: 1,
                file: 0,
                offset: 2,
                raw_len: 3,
                encoding: Encoding::Raw,
                raw_checksum: 9,
                data: vec![1, 2, 3],
            },
        ),
        (
            "chunk-zstd",
            Frame::Chunk {
                transfer_id: 1,
                file: 0,
                offset: 0,
                raw_len: 10,
                encoding: Encoding::Zstd,
                raw_checksum: 9,
                data: zstd::bulk::compress(&[5u8; 10], 1).expect("zstd"),
            },
        ),
        ("ack", Frame::Ack { transfer_id: 1, file: 0, durable: 10 }),
        ("nack", Frame::Nack { transfer_id: 1, file: 0, offset: 0, reason: NackReason::Checksum }),
        ("done", Frame::Done { transfer_id: 1 }),
        ("reject", Frame::Reject { transfer_id: 1, reason: RejectReason::Superseded, message: "newer".into() }),
        ("abort", Frame::Abort { transfer_id: 1 }),
    ];
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut all = Vec::new();
    for (name, f) in &frames {
        let b = f.to_bytes();
        std::fs::write(dir.join(name), &b).expect("write");
        let mut flipped = b.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        std::fs::write(dir.join(format!("{name}-flipped")), &flipped).expect("write");
        all.extend_from_slice(&b);
    }
    std::fs::write(dir.join("stream"), &all).expect("write");
    std::fs::write(dir.join("truncated"), &all[..all.len() / 2]).expect("write");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..4096)) {
        fuzz_decode(&data);
    }

    #[test]
    fn valid_frames_with_a_flipped_bit_are_refused(len in 0usize..200, at in any::<usize>(), bit in 0u8..8) {
        let f = Frame::Chunk {
            transfer_id: 3, file: 0, offset: 0, raw_len: len as u32, encoding: Encoding::Raw,
            raw_checksum: 1, data: vec![0xab; len],
        };
        let mut b = f.to_bytes();
        let i = at % b.len();
        b[i] ^= 1 << bit;
        // Either refused, or (a flip in the length word) incomplete; never a different frame.
        if let Ok(Some((g, _))) = Frame::decode(&b, 1 << 20) {
            prop_assert_eq!(g, f);
        }
    }
}
