//! Arbitrary bytes as a table file, opened, iterated both ways and probed by
//! point lookups: an error, never a panic.
#![no_main]

use std::sync::OnceLock;

static SCRATCH: OnceLock<tempfile::TempDir> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = SCRATCH.get_or_init(|| tempfile::tempdir().expect("scratch dir"));
    cairn_lsm::fuzzing::read_table(dir.path(), data);
});
