//! Arbitrary bytes as a write batch from the standalone WAL: an error, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cairn_lsm::fuzzing::decode_batch(data);
});
