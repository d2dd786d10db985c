//! Arbitrary bytes through the frame decoder (and the receiver, for frames
//! that decode): an error, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cairn_snapshot_transfer::frame::fuzz_decode(data);
});
