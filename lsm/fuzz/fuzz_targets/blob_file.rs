//! Arbitrary bytes as a blob reference (the first 20) and a blob file (the
//! rest): opened, the reference read, the records walked: an error, never a
//! panic.
#![no_main]

use std::sync::OnceLock;

static SCRATCH: OnceLock<tempfile::TempDir> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = SCRATCH.get_or_init(|| tempfile::tempdir().expect("scratch dir"));
    cairn_lsm::fuzzing::read_blob_file(dir.path(), data);
});
