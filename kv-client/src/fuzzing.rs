//! Entry points of the fuzz targets (`kv-client/fuzz/`), also run over the
//! checked-in corpus by `cargo test` (`tests/fuzz_corpus.rs`).

use crate::frame::{decode_frame, encode};
use crate::protocol::{Request, Response};

/// Largest frame the fuzz entry points accept.
const MAX: usize = 1 << 20;

/// Arbitrary bytes as a request frame and as a response frame: an error or
/// a value, never a panic; a value decoded encodes to a frame that decodes
/// to the same value.
pub fn fuzz_frames(data: &[u8]) {
    if let Ok(r) = decode_frame::<Request>(data, MAX) {
        let again = encode(&r).ok().and_then(|b| decode_frame::<Request>(&b, MAX).ok());
        assert_eq!(again.as_ref(), Some(&r), "a request does not survive a round trip");
    }
    if let Ok(r) = decode_frame::<Response>(data, MAX) {
        let again = encode(&r).ok().and_then(|b| decode_frame::<Response>(&b, MAX).ok());
        assert_eq!(again.as_ref(), Some(&r), "a response does not survive a round trip");
    }
}
