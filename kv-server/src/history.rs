//! Reads at a past revision, from the watch history.
//!
//! The state keeps each key's current value under `k` and every change, with
//! the key's previous value, under `r` (by revision; a put's own value is
//! not repeated there, see [`crate::state`]). The state of a key at
//! revision `R` is its current value if no change after `R` touched it, and
//! otherwise the previous value recorded by the first change after `R`. So a
//! read at `R` reads the current state and the history `(R, now]` from one
//! read view, and undoes the changes. Its cost grows with the writes since
//! `R` (every event after `R` is read, whatever the key), never with the size
//! of the state; the history is bounded by `history_revisions_max`.
//! No index by key is written: puts pay nothing for this.

use std::collections::BTreeMap;

use cairn_kv_client::frame;
use cairn_kv_client::protocol::{EventKind, KeyValue, WatchEvent};
use cairn_lsm::ReadView;

use crate::state::{
    COMPACTED_KEY, HISTORY_FORMAT, HistoryRecord, PrevValue, REVISION_KEY, changed_key, decode_change, decode_value,
    event_key, history_key, user_key, view_u64,
};

/// One stored history record: its revision, number within the revision,
/// and the record (a record of the format before [`HISTORY_FORMAT`], a whole
/// event, is read as one that holds its value).
pub fn decode_record(lsm_key: &[u8], stored: &[u8]) -> Result<(u64, u32, HistoryRecord), String> {
    let damaged = |why: String| format!("a damaged history record {lsm_key:?}: {why}");
    let revision = lsm_key.get(1..9).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes);
    let n = lsm_key.get(9..13).and_then(|b| <[u8; 4]>::try_from(b).ok()).map(u32::from_be_bytes);
    let (Some(revision), Some(n)) = (revision, n) else {
        return Err(damaged("the key is not a history key".into()));
    };
    match lsm_key.get(13..) {
        Some([]) => {
            let e: WatchEvent = frame::decode(stored).map_err(|e| damaged(e.to_string()))?;
            let record = HistoryRecord {
                kind: e.kind,
                key: e.kv.key,
                meta: e.kv.meta,
                value: Some(e.kv.value),
                prev: e.prev.map(|p| PrevValue { meta: p.meta, value: p.value }),
            };
            Ok((revision, n, record))
        }
        Some([HISTORY_FORMAT]) => {
            let record = HistoryRecord::decode(stored).map_err(|e| damaged(e.to_string()))?;
            if record.value.is_none() && record.kind != EventKind::Put {
                return Err(damaged("a delete without its (empty) value".into()));
            }
            Ok((revision, n, record))
        }
        _ => Err(damaged("a history format this build does not read".into())),
    }
}

/// The event a history record stands for, as `view` sees the state: a put
/// whose value the record leaves out finds it in the `prev` of the change
/// that replaced it (named by a `c` record), else in the key's record.
pub fn resolve(view: &ReadView, revision: u64, record: HistoryRecord) -> Result<WatchEvent, String> {
    let HistoryRecord { kind, key, meta, value, prev } = record;
    let value = match value {
        Some(v) => v,
        None => find_value(view, revision, &key)?,
    };
    let prev = prev.map(|p| p.into_kv(key.clone()));
    Ok(WatchEvent { revision, kind, kv: KeyValue { key, value, meta }, prev })
}

/// Where the value of `key`'s put of `revision` is kept (see [`resolve`]).
fn find_value(view: &ReadView, revision: u64, key: &[u8]) -> Result<Vec<u8>, String> {
    let read = |k: &[u8]| view.get(k).map_err(|e| format!("reading the history: {e}"));
    let lost = |why: &str| format!("the value of the put of {key:?} at revision {revision} {why}");
    if let Some(c) = read(&changed_key(revision, key))? {
        let (r, n) = decode_change(&c).ok_or_else(|| lost("has a damaged change record"))?;
        let at = event_key(r, n);
        let stored = read(&at)?.ok_or_else(|| lost("names a change the history does not hold"))?;
        let (_, _, change) = decode_record(&at, &stored)?;
        return match change.prev {
            Some(p) if p.meta.mod_revision == revision && change.key == key => Ok(p.value),
            _ => Err(lost("is not the one its change replaced")),
        };
    }
    let stored = read(&user_key(key))?.ok_or_else(|| lost("is neither replaced nor current"))?;
    let (meta, value) = decode_value(&stored)?;
    if meta.mod_revision != revision {
        return Err(lost(&format!("was replaced at {} with no change record", meta.mod_revision)));
    }
    Ok(value.to_vec())
}

/// The events in revisions `(after, upto]` of the keys `covers` accepts,
/// each with its value, from one read view.
pub fn events<'a>(
    view: &'a ReadView,
    after: u64,
    upto: u64,
    covers: impl Fn(&[u8]) -> bool + 'a,
) -> impl Iterator<Item = Result<WatchEvent, String>> + 'a {
    let lo = history_key(after.saturating_add(1), 0);
    let hi = history_key(upto.saturating_add(1), 0);
    view.range(lo..hi).filter_map(move |kv| {
        let (k, v) = match kv {
            Ok(kv) => kv,
            Err(e) => return Some(Err(format!("reading the history: {e}"))),
        };
        match decode_record(&k, &v) {
            Err(e) => Some(Err(e)),
            Ok((_, _, record)) if !covers(&record.key) => None,
            Ok((revision, _, record)) => Some(resolve(view, revision, record)),
        }
    })
}

/// Why a read at a past revision could not be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PastReadError {
    /// The revision is after the state's revision.
    Future {
        /// The revision asked.
        asked: u64,
        /// The state's revision.
        current: u64,
    },
    /// The history no longer holds the changes after the revision.
    Compacted {
        /// The revision asked.
        asked: u64,
        /// The oldest revision readable.
        oldest: u64,
    },
    /// The state could not be read, or a record is damaged.
    Storage(String),
}

impl std::fmt::Display for PastReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PastReadError::Future { asked, current } => {
                write!(f, "revision {asked} is in the future (the cluster is at {current})")
            }
            PastReadError::Compacted { asked, oldest } => {
                write!(f, "revision {asked} is compacted: the oldest revision readable is {oldest}")
            }
            PastReadError::Storage(e) => write!(f, "reading the history: {e}"),
        }
    }
}

impl std::error::Error for PastReadError {}

/// What a past read needs: the keys changed after the revision, each with
/// what it held at the revision (`None`: absent), for the keys `covers` picks.
#[derive(Debug, Default)]
pub struct Undo {
    /// The state's current revision.
    pub current: u64,
    /// Each key changed after the revision asked, and its value then.
    pub before: BTreeMap<Vec<u8>, Option<KeyValue>>,
    /// Events read (all keys).
    pub events_read: u64,
}

/// The changes to undo to see the state of `view` as it was at `revision`,
/// for the keys `covers` accepts. `revision` must be at most the current one
/// and at least the oldest the history holds (the compacted revision minus
/// one: the history then holds every change after it).
pub fn undo_to(view: &ReadView, revision: u64, covers: impl Fn(&[u8]) -> bool) -> Result<Undo, PastReadError> {
    let current = view_u64(view, REVISION_KEY).map_err(PastReadError::Storage)?;
    if revision > current {
        return Err(PastReadError::Future { asked: revision, current });
    }
    let compacted = view_u64(view, COMPACTED_KEY).map_err(PastReadError::Storage)?;
    // The history keeps every change at `compacted` and later, so the state
    // at `compacted - 1` can be rebuilt, and no earlier one.
    let oldest = compacted.saturating_sub(1);
    if revision < oldest {
        return Err(PastReadError::Compacted { asked: revision, oldest });
    }
    let mut undo = Undo { current, ..Undo::default() };
    if revision == current {
        return Ok(undo);
    }
    let lo = history_key(revision + 1, 0);
    let hi = history_key(current.saturating_add(1), 0);
    for kv in view.range(lo..hi) {
        let (k, v) = kv.map_err(|e| PastReadError::Storage(e.to_string()))?;
        undo.events_read += 1;
        let (_, _, record) = decode_record(&k, &v).map_err(PastReadError::Storage)?;
        if !covers(&record.key) || undo.before.contains_key(&record.key) {
            continue;
        }
        // The first change after the revision recorded what the key held at it.
        let prev = record.prev.map(|p| p.into_kv(record.key.clone()));
        undo.before.insert(record.key, prev);
    }
    Ok(undo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{encode_value, user_key};
    use cairn_kv_client::protocol::{EventKind, KeyMeta};
    use cairn_lsm::{Db, Options, WriteBatch};

    fn kv(key: &[u8], value: &[u8], rev: u64, create: u64, version: u64) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value: value.to_vec(),
            meta: KeyMeta { create_revision: create, mod_revision: rev, version, lease: 0 },
        }
    }

    /// Writes puts and deletes the way builds before history format 2 did
    /// (value under `k`, whole event under `r`, revision under `m`), keeping
    /// a model of every revision's state, then checks every past read and
    /// the watch's reading of the history against it. (The format written
    /// now is checked through the apply worker: `tests/history.rs`.)
    #[test]
    fn undoing_the_history_gives_each_past_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path(), Options::default()).expect("open");
        let mut state: BTreeMap<Vec<u8>, KeyValue> = BTreeMap::new();
        let mut past: Vec<BTreeMap<Vec<u8>, KeyValue>> = vec![state.clone()];
        let mut written = Vec::new();
        let mut seed = 7u64;
        for rev in 1..=300u64 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let key = format!("k{}", (seed >> 33) % 12).into_bytes();
            let delete = (seed >> 20).is_multiple_of(4);
            let prev = state.get(&key).cloned();
            let mut b = WriteBatch::new();
            let e = if delete {
                let Some(p) = prev.clone() else {
                    past.push(state.clone());
                    b.put(REVISION_KEY.to_vec(), rev.to_le_bytes().to_vec());
                    db.write(&b).expect("write");
                    continue;
                };
                state.remove(&key);
                b.delete(user_key(&key));
                WatchEvent { revision: rev, kind: EventKind::Delete, kv: kv(&key, b"", rev, 0, 0), prev: Some(p) }
            } else {
                let (create, version) =
                    prev.as_ref().map_or((rev, 1), |p| (p.meta.create_revision, p.meta.version + 1));
                let new = kv(&key, format!("v{rev}").as_bytes(), rev, create, version);
                b.put(user_key(&key), encode_value(new.meta, &new.value));
                state.insert(key.clone(), new.clone());
                WatchEvent { revision: rev, kind: EventKind::Put, kv: new, prev }
            };
            b.put(history_key(rev, 0), frame::archive(&e).expect("archive"));
            written.push(e);
            b.put(REVISION_KEY.to_vec(), rev.to_le_bytes().to_vec());
            db.write(&b).expect("write");
            past.push(state.clone());
        }
        let view = db.read_view();
        // Records of this format hold their values: a watch reads them back as written.
        for after in [0, 150, 299] {
            let read: Vec<WatchEvent> = events(&view, after, 300, |_| true).collect::<Result<_, _>>().expect("events");
            let expected: Vec<WatchEvent> = written.iter().filter(|e| e.revision > after).cloned().collect();
            assert_eq!(read, expected, "the events after {after}");
        }
        for (r, expected) in past.iter().enumerate() {
            let undo = undo_to(&view, r as u64, |_| true).expect("undo");
            let mut got = BTreeMap::new();
            for item in view.range(user_key(b"")..vec![crate::state::USER_PREFIX + 1]) {
                let (k, v) = item.expect("read");
                let key = k[1..].to_vec();
                if undo.before.contains_key(&key) {
                    continue;
                }
                let (meta, value) = crate::state::decode_value(&v).expect("decode");
                got.insert(key.clone(), KeyValue { key, value: value.to_vec(), meta });
            }
            for (k, v) in undo.before {
                if let Some(v) = v {
                    got.insert(k, v);
                }
            }
            assert_eq!(&got, expected, "the state at revision {r}");
        }
        assert_eq!(undo_to(&view, 301, |_| true).err(), Some(PastReadError::Future { asked: 301, current: 300 }));
        // Compact below 100: revision 99 is still readable, 98 is not.
        let mut b = WriteBatch::new();
        b.delete_range(history_key(0, 0), history_key(100, 0));
        b.put(COMPACTED_KEY.to_vec(), 100u64.to_le_bytes().to_vec());
        db.write(&b).expect("compact");
        let view = db.read_view();
        assert!(undo_to(&view, 99, |_| true).is_ok());
        assert_eq!(undo_to(&view, 98, |_| true).err(), Some(PastReadError::Compacted { asked: 98, oldest: 99 }));
    }
}
