//! Arbitrary bytes as a block on disk (payload + trailer) and as an
//! uncompressed block, iterated, sought and collected: an error, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cairn_lsm::fuzzing::decode_block(data);
});
