//! Arbitrary bytes as the only segment of a log, opened in every recovery mode
//! (read-only and writable) and read back: an error, never a panic.
#![no_main]

use std::sync::OnceLock;

static SCRATCH: OnceLock<tempfile::TempDir> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = SCRATCH.get_or_init(|| tempfile::tempdir().expect("scratch dir"));
    cairn_wal::fuzzing::open_segment(data, dir.path());
});
