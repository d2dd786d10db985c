//! The replicated state: the commands entries carry, and how the applied
//! state is laid out in the LSM.
//!
//! Keys of the LSM (one byte of namespace first, so later issues can add
//! their own without touching these):
//!
//! | prefix | key | value |
//! |---|---|---|
//! | `k` | user key | [`VALUE_FORMAT`], create revision, modification revision, version, lease (u64 LE each), the value |
//! | `s` | client id (u64 BE) | a [`SessionRecord`] (rkyv) |
//! | `m` | `conf` | the membership (`ConfState`, rkyv) as of the marker |
//! | `m` | `addr/` node id (u64 BE) | the node's peer address (UTF-8) |
//! | `m` | `removed/` node id (u64 BE) | empty: the id was removed, for good |
//! | `m` | `alarm/` node id (u64 BE) | empty: the node's space alarm is raised |
//! | `m` | `revision` | the cluster revision (u64 LE): raised by one by each write that changes a key |
//! | `l` | lease id (u64 BE) | its time to live in ms (u64 LE) |
//! | `L` | lease id (u64 BE), user key | empty: the key is attached to the lease |
//! | `r` | revision (u64 BE), event number in it (u32 BE), [`HISTORY_FORMAT`] | a [`HistoryRecord`] (rkyv): a put's value is not in it (see below) |
//! | `r` | revision (u64 BE), event number in it (u32 BE) | a [`cairn_kv_client::protocol::WatchEvent`] (rkyv), value included: written by builds before [`HISTORY_FORMAT`], still read |
//! | `c` | revision (u64 BE), user key | the change that replaced the key's put of that revision: its revision (u64 LE), event number (u32 LE) |
//! | `m` | `compacted` | the oldest revision the history keeps (u64 LE; absent: 0) |
//!
//! Each value is stored once. A put's history record leaves its value out:
//! while the key is at that revision, the value is the key's `k` record;
//! once a later change (put or delete) replaces it, that change's record
//! holds it as its `prev`, and a `c` record names that change. (A change
//! made twice to one key within one write keeps the earlier value in its own
//! record instead.) Past reads use only `prev`; a watch reading the history
//! finds each put's value through the `c` record or the `k` record.

/// Namespace of user keys.
pub const USER_PREFIX: u8 = b'k';
/// Namespace of sessions.
pub const SESSION_PREFIX: u8 = b's';
/// Namespace of node metadata.
pub const META_PREFIX: u8 = b'm';
/// The key of the membership.
pub const CONF_KEY: &[u8] = b"mconf";
/// The prefix of member addresses.
pub const ADDR_PREFIX: &[u8] = b"maddr/";
/// The prefix of removed node ids.
pub const REMOVED_PREFIX: &[u8] = b"mremoved/";
/// The prefix of raised space alarms.
pub const ALARM_PREFIX: &[u8] = b"malarm/";
/// Namespace of leases.
pub const LEASE_PREFIX: u8 = b'l';
/// Namespace of the keys attached to leases.
pub const ATTACH_PREFIX: u8 = b'L';
/// Namespace of the history.
pub const HISTORY_PREFIX: u8 = b'r';
/// The format byte that ends the key of a [`HistoryRecord`] (a key
/// without it holds a whole `WatchEvent`, as builds before it wrote).
pub const HISTORY_FORMAT: u8 = 2;
/// Namespace of the records naming the change that replaced a put.
pub const CHANGED_PREFIX: u8 = b'c';
/// The key of the oldest revision the history keeps.
pub const COMPACTED_KEY: &[u8] = b"mcompacted";
/// The key of the cluster revision.
pub const REVISION_KEY: &[u8] = b"mrevision";
/// The key of the limits the state machine applies with (the leader's, see
/// [`CommandOp::SetLimits`]): a format byte (1), then u64 LE values.
pub const LIMITS_KEY: &[u8] = b"mlimits";
/// The format byte of the limits record.
const LIMITS_FORMAT: u8 = 1;
/// The format byte of a stored value (2: with revisions; 1, before them, is
/// refused with a clear error).
pub const VALUE_FORMAT: u8 = 2;
/// Bytes before a stored value's user bytes.
pub const VALUE_HEADER_BYTES: usize = 33;

pub use records::{Command, CommandOp, HistoryRecord, Outcome, PrevValue, SessionRecord};

use cairn_kv_client::protocol::KeyMeta;

mod records {
    use cairn_kv_client::frame::{self, FrameError};
    use cairn_kv_client::protocol::{
        Compare, ErrorCode, EventKind, KeyMeta, KeyValue, Session, TxnOp, WatchEvent, WriteOp,
    };
    use rkyv::{Archive, Deserialize, Serialize};

    /// What an entry asks the state machine to do.
    #[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
    #[rkyv(derive(Debug), attr(allow(missing_docs)))]
    pub struct Command {
        /// The proposing leader's wall clock, in ms since the epoch: the only
        /// clock the state machine reads (session expiry), so every replica
        /// decides the same.
        pub time_ms: u64,
        /// The operation.
        pub op: CommandOp,
    }

    /// The operations.
    #[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
    #[rkyv(derive(Debug), attr(allow(missing_docs)))]
    pub enum CommandOp {
        /// Open a session; its id is this entry's index.
        Register,
        /// A client write.
        Write {
            /// The client's session.
            session: Session,
            /// The changes, applied together.
            ops: Vec<WriteOp>,
        },
        /// A client transaction.
        Txn {
            /// The client's session.
            session: Session,
            /// All must hold for `success` to run.
            compares: Vec<Compare>,
            /// Run when they hold.
            success: Vec<TxnOp>,
            /// Run otherwise.
            failure: Vec<TxnOp>,
        },
        /// Nothing (a health check).
        Noop,
        /// Raise node `node`'s space alarm, or clear it (node 0: every one).
        Alarm {
            /// The node.
            node: u64,
            /// Raise or clear.
            raise: bool,
        },
        /// Drop the history below `revision`.
        Compact {
            /// The oldest revision kept.
            revision: u64,
        },
        /// Grant a lease; its id is this entry's index.
        LeaseGrant {
            /// Its time to live, ms.
            ttl_ms: u64,
            /// The client it counts against (`leases_per_client_max`).
            owner: u64,
        },
        /// Revoke a lease (a client's request, or the leader's on expiry):
        /// its keys are deleted at one revision.
        LeaseRevoke {
            /// The lease.
            id: u64,
        },
        /// Record the peer address of node `id` (before it is added).
        SetMember {
            /// The node.
            id: u64,
            /// Its peer address.
            addr: String,
        },
        /// The limits every replica applies the following entries with (the
        /// leader's configured ones), in the order of
        /// `ApplyLimits::to_values`.
        SetLimits {
            /// The values.
            values: Vec<u64>,
        },
    }

    impl Command {
        /// Encodes the command as entry data.
        pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
            frame::archive(self)
        }
        /// Decodes entry data.
        pub fn decode(data: &[u8]) -> Result<Command, FrameError> {
            frame::decode(data)
        }
    }

    /// A cached answer to a write, kept in its session.
    #[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
    #[rkyv(derive(Debug), attr(allow(missing_docs)))]
    pub enum Outcome {
        /// Applied at this index, leaving this revision.
        Written {
            /// The entry's index.
            index: u64,
            /// The cluster revision after it.
            revision: u64,
        },
        /// A transaction applied at this index (its reads are not kept).
        Txn {
            /// The entry's index.
            index: u64,
            /// The cluster revision after it.
            revision: u64,
            /// Whether its comparisons held.
            succeeded: bool,
        },
        /// Refused at apply (deterministically) with this code.
        Refused(ErrorCode),
    }

    /// One change of a user key in the history (the LSM key holds its
    /// revision and its number within the revision).
    #[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
    #[rkyv(derive(Debug), attr(allow(missing_docs)))]
    pub struct HistoryRecord {
        /// Put or delete.
        pub kind: EventKind,
        /// The user key.
        pub key: Vec<u8>,
        /// The key's revisions after the change (a delete: only
        /// `mod_revision`, the delete's revision).
        pub meta: KeyMeta,
        /// The value, when this record holds it: a delete's (empty), or a
        /// put's replaced within the same write. `None`: a put whose value
        /// is the key's record or the `prev` of the change that replaced it.
        pub value: Option<Vec<u8>>,
        /// What the key held before the change.
        pub prev: Option<PrevValue>,
    }

    /// A key's value and revisions before a change.
    #[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
    #[rkyv(derive(Debug), attr(allow(missing_docs)))]
    pub struct PrevValue {
        /// Its revisions.
        pub meta: KeyMeta,
        /// Its user bytes.
        pub value: Vec<u8>,
    }

    impl PrevValue {
        /// As the key-value `key` held.
        pub fn into_kv(self, key: Vec<u8>) -> KeyValue {
            KeyValue { key, value: self.value, meta: self.meta }
        }
    }

    impl HistoryRecord {
        /// The record of event `e`, holding `value` (see [`HistoryRecord::value`]).
        pub fn of(e: &WatchEvent, value: Option<Vec<u8>>) -> HistoryRecord {
            HistoryRecord {
                kind: e.kind,
                key: e.kv.key.clone(),
                meta: e.kv.meta,
                value,
                prev: e.prev.as_ref().map(|p| PrevValue { meta: p.meta, value: p.value.clone() }),
            }
        }

        /// Encodes the record.
        pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
            frame::archive(self)
        }
        /// Decodes a record.
        pub fn decode(data: &[u8]) -> Result<HistoryRecord, FrameError> {
            frame::decode(data)
        }
    }

    /// A session in the replicated state.
    #[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
    #[rkyv(derive(Debug), attr(allow(missing_docs)))]
    pub struct SessionRecord {
        /// Time of the last entry of this client (leader clock, ms).
        pub last_active_ms: u64,
        /// Sequence numbers below this were acknowledged by the client and
        /// their responses dropped.
        pub first_unacked: u64,
        /// Responses of recent sequence numbers, ascending.
        pub responses: Vec<(u64, Outcome)>,
    }

    impl SessionRecord {
        /// Encodes the record.
        pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
            frame::archive(self)
        }
        /// Decodes a record.
        pub fn decode(data: &[u8]) -> Result<SessionRecord, FrameError> {
            frame::decode(data)
        }
    }
}

// Every LSM key made from a user key (`k`, `c` + revision, `a` + lease id)
// fits cairn-lsm's limit when the user key is within the protocol's.
const _: () = assert!(cairn_kv_client::protocol::KEY_BYTES_MAX + 9 <= cairn_lsm::KEY_BYTES_MAX);

/// The LSM key of user key `key`.
pub fn user_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(USER_PREFIX);
    k.extend_from_slice(key);
    k
}

/// The LSM key of node `id`'s address.
pub fn addr_key(id: u64) -> Vec<u8> {
    [ADDR_PREFIX, &id.to_be_bytes()].concat()
}

/// The LSM key of node `id`'s space alarm.
pub fn alarm_key(id: u64) -> Vec<u8> {
    [ALARM_PREFIX, &id.to_be_bytes()].concat()
}

/// The LSM key recording that node `id` was removed.
pub fn removed_key(id: u64) -> Vec<u8> {
    [REMOVED_PREFIX, &id.to_be_bytes()].concat()
}

/// Who the members are reached at and which ids were removed: loaded from
/// the state at start and after an install, kept up to date by the apply
/// worker, read by the links, the peer service and the Raft task.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Book {
    /// Peer address of each node known.
    pub addrs: std::collections::BTreeMap<u64, String>,
    /// Ids removed from the cluster, refused for good.
    pub removed: std::collections::BTreeSet<u64>,
    /// Nodes whose space alarm is raised: writes other than deletes are refused.
    pub alarms: std::collections::BTreeSet<u64>,
}

/// The book, shared.
pub type SharedBook = std::sync::Arc<std::sync::RwLock<Book>>;

impl Book {
    /// The book the state `db` holds, over the initial cluster's addresses.
    pub fn load(
        db: &cairn_lsm::Db,
        initial: &std::collections::BTreeMap<u64, String>,
    ) -> Result<Book, crate::storage::StorageError> {
        let mut b = Book { addrs: initial.clone(), ..Book::default() };
        let id_of = |k: &[u8], prefix: &[u8]| {
            k.get(prefix.len()..)
                .and_then(|x| <[u8; 8]>::try_from(x).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| crate::storage::StorageError::Corrupt { what: "member key", reason: format!("{k:?}") })
        };
        for kv in db.prefix(ADDR_PREFIX) {
            let (k, v) = kv?;
            b.addrs.insert(id_of(&k, ADDR_PREFIX)?, String::from_utf8_lossy(&v).into_owned());
        }
        for kv in db.prefix(REMOVED_PREFIX) {
            let (k, _) = kv?;
            b.removed.insert(id_of(&k, REMOVED_PREFIX)?);
        }
        for kv in db.prefix(ALARM_PREFIX) {
            let (k, _) = kv?;
            b.alarms.insert(id_of(&k, ALARM_PREFIX)?);
        }
        Ok(b)
    }
}

/// Reads the shared book.
pub fn read_book(b: &SharedBook) -> std::sync::RwLockReadGuard<'_, Book> {
    b.read().unwrap_or_else(|e| e.into_inner())
}

/// Writes the shared book.
pub fn write_book(b: &SharedBook) -> std::sync::RwLockWriteGuard<'_, Book> {
    b.write().unwrap_or_else(|e| e.into_inner())
}

/// The LSM key of the `n`-th event of `revision`.
pub fn history_key(revision: u64, n: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(13);
    k.push(HISTORY_PREFIX);
    k.extend_from_slice(&revision.to_be_bytes());
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// The LSM key of the `n`-th event of `revision`, as this build writes it
/// (a [`HistoryRecord`]); [`history_key`] bounds ranges of both formats.
pub fn event_key(revision: u64, n: u32) -> Vec<u8> {
    let mut k = history_key(revision, n);
    k.push(HISTORY_FORMAT);
    k
}

/// The LSM key naming the change that replaced `key`'s put of `revision`
/// (`key` empty: the bound of a range by revision).
pub fn changed_key(revision: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + key.len());
    k.push(CHANGED_PREFIX);
    k.extend_from_slice(&revision.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// A `c` record's value: the replacing change's revision and event number.
pub fn encode_change(revision: u64, n: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&revision.to_le_bytes());
    v.extend_from_slice(&n.to_le_bytes());
    v
}

/// Reads a `c` record's value.
pub fn decode_change(v: &[u8]) -> Option<(u64, u32)> {
    let r = v.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_le_bytes)?;
    let n = v.get(8..).and_then(|b| <[u8; 4]>::try_from(b).ok()).map(u32::from_le_bytes)?;
    Some((r, n))
}

/// The oldest revision the history keeps (0 before any compaction).
pub fn load_compacted(db: &cairn_lsm::Db) -> Result<u64, crate::storage::StorageError> {
    read_revision(db.get(COMPACTED_KEY)?.as_deref())
}

/// The LSM key of lease `id`.
pub fn lease_key(id: u64) -> Vec<u8> {
    let mut k = vec![LEASE_PREFIX];
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// The LSM key recording that user key `key` is attached to lease `id`.
pub fn attach_key(id: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + key.len());
    k.push(ATTACH_PREFIX);
    k.extend_from_slice(&id.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// A lease record: its TTL in ms and the client it counts against (u64 LE
/// each).
pub fn encode_lease(ttl_ms: u64, owner: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&ttl_ms.to_le_bytes());
    v.extend_from_slice(&owner.to_le_bytes());
    v
}

/// Reads a lease record: `(ttl in ms, owner)`; a record of 8 bytes (before
/// owners were recorded) has owner 0.
pub fn decode_lease(v: &[u8]) -> Option<(u64, u64)> {
    let word = |i: usize| v.get(i..i + 8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_le_bytes);
    match v.len() {
        8 => Some((word(0)?, 0)),
        16 => Some((word(0)?, word(8)?)),
        _ => None,
    }
}

/// Every lease the state holds: `(id, ttl in ms, owner)`.
pub fn load_leases(db: &cairn_lsm::Db) -> Result<Vec<(u64, u64, u64)>, crate::storage::StorageError> {
    let mut out = Vec::new();
    for kv in db.prefix(&[LEASE_PREFIX]) {
        let (k, v) = kv?;
        let bad = || crate::storage::StorageError::Corrupt { what: "lease", reason: format!("{k:?}") };
        let id = <[u8; 8]>::try_from(&k[1..]).map(u64::from_be_bytes).map_err(|_| bad())?;
        let (ttl, owner) = decode_lease(&v).ok_or_else(bad)?;
        out.push((id, ttl, owner));
    }
    Ok(out)
}

/// The LSM key of session `id`.
pub fn session_key(id: u64) -> Vec<u8> {
    let mut k = vec![SESSION_PREFIX];
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// A stored value: format, revisions, user bytes.
pub fn encode_value(meta: KeyMeta, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(VALUE_HEADER_BYTES + value.len());
    v.push(VALUE_FORMAT);
    for x in [meta.create_revision, meta.mod_revision, meta.version, meta.lease] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.extend_from_slice(value);
    v
}

/// The revisions and user bytes of a stored value, or why it is not one.
pub fn decode_value(stored: &[u8]) -> Result<(KeyMeta, &[u8]), String> {
    match stored.first() {
        Some(&VALUE_FORMAT) if stored.len() >= VALUE_HEADER_BYTES => {
            let u = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&stored[1 + 8 * i..9 + 8 * i]);
                u64::from_le_bytes(b)
            };
            let meta = KeyMeta { create_revision: u(0), mod_revision: u(1), version: u(2), lease: u(3) };
            Ok((meta, &stored[VALUE_HEADER_BYTES..]))
        }
        Some(&VALUE_FORMAT) => Err(format!("a stored value of {} bytes is shorter than its header", stored.len())),
        Some(&f) => Err(format!("stored value of format {f}, this build reads format {VALUE_FORMAT}")),
        None => Err("empty stored value".into()),
    }
}

/// The cluster revision a state holds (0 before the first write).
pub fn load_revision(db: &cairn_lsm::Db) -> Result<u64, crate::storage::StorageError> {
    read_revision(db.get(REVISION_KEY)?.as_deref())
}

/// A u64 record of the state (the revision, the history bound) as `view`
/// sees it (absent: 0).
pub fn view_u64(view: &cairn_lsm::ReadView, key: &[u8]) -> Result<u64, String> {
    let stored = view.get(key).map_err(|e| e.to_string())?;
    read_revision(stored.as_deref()).map_err(|e| e.to_string())
}

/// The stored limits record of the state: `values` behind a format byte.
pub fn encode_limits(values: &[u64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + 8 * values.len());
    v.push(LIMITS_FORMAT);
    for x in values {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

/// The limits the state holds (none before the first `SetLimits`).
pub fn load_limits(db: &cairn_lsm::Db) -> Result<Option<Vec<u64>>, crate::storage::StorageError> {
    let Some(b) = db.get(LIMITS_KEY)? else { return Ok(None) };
    let bad = |reason: String| crate::storage::StorageError::Corrupt { what: "limits record", reason };
    match b.split_first() {
        Some((&LIMITS_FORMAT, rest)) if rest.len() % 8 == 0 => {
            Ok(Some(rest.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect()))
        }
        Some((&LIMITS_FORMAT, rest)) => Err(bad(format!("{} bytes of values", rest.len()))),
        Some((f, _)) => Err(bad(format!("format {f}, this build reads format {LIMITS_FORMAT}"))),
        None => Err(bad("empty".into())),
    }
}

/// Decodes the stored cluster revision.
pub fn read_revision(stored: Option<&[u8]>) -> Result<u64, crate::storage::StorageError> {
    match stored {
        None => Ok(0),
        Some(b) => <[u8; 8]>::try_from(b).map(u64::from_le_bytes).map_err(|_| crate::storage::StorageError::Corrupt {
            what: "revision",
            reason: format!("{} bytes", b.len()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_kv_client::protocol::{Session, WriteOp};

    #[test]
    fn commands_and_sessions_round_trip() {
        let c = Command {
            time_ms: 5,
            op: CommandOp::Write {
                session: Session { client_id: 1, seq: 2, first_unacked: 2 },
                ops: vec![WriteOp::Put { key: b"a".to_vec(), value: b"b".to_vec() }],
            },
        };
        assert_eq!(Command::decode(&c.encode().expect("encode")).expect("decode"), c);
        let s = SessionRecord {
            last_active_ms: 1,
            first_unacked: 3,
            responses: vec![(3, Outcome::Written { index: 9, revision: 4 })],
        };
        assert_eq!(SessionRecord::decode(&s.encode().expect("encode")).expect("decode"), s);
        assert!(Command::decode(b"garbage").is_err());
        let meta = KeyMeta { create_revision: 2, mod_revision: 5, version: 3, lease: 0 };
        assert_eq!(decode_value(&encode_value(meta, b"xy")).expect("value"), (meta, &b"xy"[..]));
        assert!(decode_value(&[2, 0]).is_err());
        assert!(decode_value(&[1, 0, 0, 0, 0, 0, 0, 0, 0, b'x']).is_err(), "format 1 is refused");
    }
}

#[cfg(test)]
mod fuzz_like {
    use super::*;
    use crate::peer::PeerFrame;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Entry data, session records and peer frames from arbitrary bytes:
        /// an error or a value, never a panic.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Command::decode(&bytes);
            let _ = SessionRecord::decode(&bytes);
            let _ = cairn_kv_client::frame::decode::<PeerFrame>(&bytes);
            let _ = cairn_kv_client::frame::decode_frame::<PeerFrame>(&bytes, 1 << 20);
            let _ = decode_value(&bytes);
        }
    }
}
