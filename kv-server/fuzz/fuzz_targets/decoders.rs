//! Arbitrary bytes through the node's decoders (peer frames, the snapshot
//! hello, entry commands, session records, stored values): never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cairn_kv_server::fuzzing::fuzz_decoders(data);
});
