//! Arbitrary bytes through the record and segment-header decoders: an error, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cairn_wal::fuzzing::decode_records(data);
});
