//! Runs the checked-in fuzz corpus (`lsm/fuzz/corpus/`) through the fuzz
//! targets' entry points, plus damaged copies of valid inputs and arbitrary
//! bytes: errors are fine, panics are not.

use std::path::{Path, PathBuf};

use cairn_lsm::fuzzing::{
    decode_batch, decode_block, decode_delta, decode_edit, read_blob_file, read_table, sample_inputs,
};
use proptest::prelude::*;

const TARGETS: [&str; 6] = ["block_decoder", "table_reader", "manifest_edit", "wal_batch", "delta_file", "blob_file"];

fn run(target: &str, data: &[u8], scratch: &Path) {
    match target {
        "block_decoder" => decode_block(data),
        "table_reader" => read_table(scratch, data),
        "manifest_edit" => decode_edit(data),
        "wal_batch" => decode_batch(data),
        "delta_file" => decode_delta(data),
        "blob_file" => read_blob_file(scratch, data),
        t => panic!("unknown target {t}"),
    }
}

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 2, "corpus {} has only {} files", dir.display(), files.len());
    files
}

#[test]
fn corpus_runs_without_panics() {
    let scratch = tempfile::tempdir().expect("tmp");
    for t in TARGETS {
        for f in corpus(t) {
            run(t, &std::fs::read(&f).expect("read"), scratch.path());
        }
    }
}

/// Every single-bit flip and every truncation of valid inputs.
#[test]
fn damaged_valid_inputs_are_errors_not_panics() {
    let scratch = tempfile::tempdir().expect("tmp");
    for (t, data) in sample_inputs() {
        let step = (data.len() / 400).max(1);
        for i in (0..data.len()).step_by(step) {
            let mut d = data.clone();
            d[i] ^= 1 << (i % 8);
            run(t, &d, scratch.path());
            run(t, &data[..i], scratch.path());
        }
    }
}

/// Not a check: writes the seed corpus, on request
/// (`cargo test -p cairn-lsm --test fuzz_corpus -- --ignored write_seed_corpus`).
#[test]
#[ignore = "writes the seed corpus into the source tree"]
fn write_seed_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (i, (t, data)) in sample_inputs().into_iter().enumerate() {
        let d = root.join(t);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join(format!("seed-{i:02}")), data).expect("write");
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..2048), t in 0usize..6) {
        let scratch = tempfile::tempdir().expect("tmp");
        run(TARGETS[t], &data, scratch.path());
    }
}
