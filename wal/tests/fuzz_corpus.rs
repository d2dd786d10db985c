//! Runs the checked-in fuzz corpus (`wal/fuzz/corpus/`) through the fuzz
//! targets' entry points, and arbitrary bytes through them with proptest.

use std::path::{Path, PathBuf};

use cairn_wal::fuzzing::{decode_records, open_segment};
use proptest::prelude::*;

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 8, "corpus {} has only {} files", dir.display(), files.len());
    files
}

#[test]
fn record_decoder_corpus() {
    for f in corpus("record_decoder") {
        decode_records(&std::fs::read(&f).expect("read"));
    }
}

#[test]
fn segment_reader_corpus() {
    let scratch = tempfile::tempdir().expect("tmp");
    for f in corpus("segment_reader") {
        open_segment(&std::fs::read(&f).expect("read"), scratch.path());
    }
}

/// Rewrites the corpus from real logs: `CAIRN_WAL_WRITE_CORPUS=1 cargo test -p cairn-wal --test fuzz_corpus`.
#[test]
fn write_corpus() {
    if std::env::var_os("CAIRN_WAL_WRITE_CORPUS").is_none() {
        return;
    }
    use std::sync::Arc;
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("wal");
    let mut o = cairn_wal::WalOptions::default();
    o.segment_bytes_max = 1024;
    o.preparation = cairn_wal::Preparation::Grow;
    let wal = cairn_wal::Wal::create(Arc::new(cairn_wal::StdFs), &dir, o, b"fuzz-meta").expect("create");
    let k = cairn_wal::UserKind::new(2);
    wal.set_state(b"hs").expect("state");
    for p in 0..40u64 {
        wal.append(k, p, &vec![p as u8; (p as usize * 13) % 120]).expect("append");
        if p == 20 {
            wal.snapshot_marker(19, b"t").expect("marker");
            wal.truncate_from(18).expect("truncate");
        }
    }
    drop(wal);
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("ls")
        .map(|e| e.expect("e").path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    segs.sort();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for target in ["record_decoder", "segment_reader"] {
        std::fs::create_dir_all(root.join(target)).expect("mkdir");
    }
    let first = std::fs::read(&segs[0]).expect("read");
    let mut samples: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), vec![]),
        ("header-only".into(), first[..cairn_wal::format::SEGMENT_HEADER_BYTES].to_vec()),
        ("torn-in-record".into(), first[..first.len() - 5].to_vec()),
        ("zero-tail".into(), [first.clone(), vec![0; 64]].concat()),
        ("all-ones".into(), vec![0xff; 256]),
    ];
    for (i, s) in segs.iter().enumerate().take(4) {
        samples.push((format!("segment-{i}"), std::fs::read(s).expect("read")));
    }
    for (i, at) in [0usize, 9, 17, 40, 41, 64, 70].into_iter().enumerate() {
        let mut b = first.clone();
        if at < b.len() {
            b[at] ^= 0x10;
        }
        samples.push((format!("flip-{i}-at-{at}"), b));
    }
    // Records alone (no header), for the record decoder.
    samples.push(("records-only".into(), first[cairn_wal::format::SEGMENT_HEADER_BYTES..].to_vec()));
    for (name, bytes) in samples {
        for target in ["record_decoder", "segment_reader"] {
            std::fs::write(root.join(target).join(&name), &bytes).expect("write");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(data in prop::collection::vec(any::<u8>(), 0..2048)) {
        decode_records(&data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_the_segment_reader(data in prop::collection::vec(any::<u8>(), 0..1024)) {
        let scratch = tempfile::tempdir().expect("tmp");
        open_segment(&data, scratch.path());
    }
}
