//! Arbitrary bytes as a delta file: an error, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cairn_lsm::fuzzing::decode_delta(data);
});
