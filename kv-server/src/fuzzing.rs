//! Entry points of the fuzz targets (`kv-server/fuzz/`), also run over the
//! checked-in corpus by `cargo test` (`tests/fuzz_corpus.rs`).

use cairn_kv_client::frame::decode_frame;

use crate::peer::PeerFrame;
use crate::snapshot::{SnapshotAck, SnapshotHello};
use crate::state::{Command, HistoryRecord, SessionRecord, decode_change, decode_value};

/// Largest frame the fuzz entry points accept.
const MAX: usize = 1 << 20;

/// Arbitrary bytes through every decoder of the node's own formats: a peer
/// frame, a snapshot stream's hello and its answer, an entry's command, a session record,
/// a stored value, a history record of either format, a change record. An error or a value, never a panic; a command that
/// decodes encodes to bytes that decode to the same command.
pub fn fuzz_decoders(data: &[u8]) {
    let _ = decode_frame::<PeerFrame>(data, MAX);
    let _ = decode_frame::<SnapshotHello>(data, MAX);
    if let Ok(a) = decode_frame::<SnapshotAck>(data, MAX) {
        let again = cairn_kv_client::frame::encode(&a).ok().and_then(|b| decode_frame::<SnapshotAck>(&b, MAX).ok());
        assert_eq!(again.as_ref(), Some(&a), "a snapshot answer does not survive a round trip");
    }
    if let Ok(c) = Command::decode(data) {
        let again = c.encode().ok().and_then(|b| Command::decode(&b).ok());
        assert_eq!(again.as_ref(), Some(&c), "a command does not survive a round trip");
    }
    if let Ok(s) = SessionRecord::decode(data) {
        let again = s.encode().ok().and_then(|b| SessionRecord::decode(&b).ok());
        assert_eq!(again.as_ref(), Some(&s), "a session record does not survive a round trip");
    }
    let _ = decode_value(data);
    let _ = cairn_kv_client::frame::decode::<cairn_kv_client::protocol::WatchEvent>(data);
    if let Ok(h) = HistoryRecord::decode(data) {
        let again = h.encode().ok().and_then(|b| HistoryRecord::decode(&b).ok());
        assert_eq!(again.as_ref(), Some(&h), "a history record does not survive a round trip");
    }
    // A history key of either format (13 or 14 bytes) or none, then a record.
    for cut in [13, 14, 15] {
        if let Some((key, stored)) = data.split_at_checked(cut) {
            let _ = crate::history::decode_record(key, stored);
        }
    }
    let _ = decode_change(data);
}
