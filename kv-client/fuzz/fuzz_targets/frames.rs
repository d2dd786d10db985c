//! Arbitrary bytes as a client request frame and a response frame: an error
//! or a value that survives a round trip, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cairn_kv_client::fuzzing::fuzz_frames(data);
});
