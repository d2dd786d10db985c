//! The stored history against the events the apply worker hands the
//! watchers live. The apply worker runs random writes (puts, deletes,
//! ranges, a key changed twice in one write, leases revoked, compactions,
//! several entries per batch); then, from one read view, every revision the
//! history keeps must give back exactly the live events after it (each put
//! with its value, though the stored record leaves the value out), and every
//! past state must read as it was.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use cairn_kv_client::protocol::{EventKind, KeyValue, Session, WatchEvent, WriteOp};
use cairn_kv_server::apply::{Applier, ApplyLimits, WatchFeed};
use cairn_kv_server::snapshot::SharedDb;
use cairn_kv_server::state::{Command, CommandOp, decode_value, user_key};
use cairn_raft_core::{Entry, EntryKind, LogIndex, Term};
use cairn_wal::sim::SimDisk;
use rand::{Rng, SeedableRng};

const KEYS: u64 = 8;

struct Harness {
    applier: Applier,
    db: Arc<SharedDb>,
    feed: tokio::sync::broadcast::Receiver<WatchFeed>,
    index: u64,
    client: u64,
    seq: u64,
    /// Every event handed to the watchers, in order.
    live: Vec<WatchEvent>,
}

/// Writes `revisions` revisions of puts and deletes the way builds before
/// history format 2 did (each event whole, its value included, under a key
/// without the format byte), one entry each from index 1; returns the events.
fn write_old_format(db: &cairn_lsm::Db, seed: u64, revisions: u64) -> Vec<WatchEvent> {
    use cairn_kv_client::protocol::KeyMeta;
    use cairn_kv_server::state::{REVISION_KEY, encode_value, history_key};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x01d);
    let mut state: BTreeMap<Vec<u8>, KeyValue> = BTreeMap::new();
    let mut events = Vec::new();
    let mut rev = 0;
    while rev < revisions {
        let k = key(rng.random_range(0..KEYS));
        let prev = state.get(&k).cloned();
        let mut b = cairn_lsm::WriteBatch::new();
        let e = if rng.random_range(0..4) == 0 {
            let Some(p) = prev else { continue };
            rev += 1;
            state.remove(&k);
            b.delete(user_key(&k));
            let gone =
                KeyValue { key: k, value: Vec::new(), meta: KeyMeta { mod_revision: rev, ..KeyMeta::default() } };
            WatchEvent { revision: rev, kind: EventKind::Delete, kv: gone, prev: Some(p) }
        } else {
            rev += 1;
            let (create, version) = prev.as_ref().map_or((rev, 1), |p| (p.meta.create_revision, p.meta.version + 1));
            let meta = KeyMeta { create_revision: create, mod_revision: rev, version, lease: 0 };
            let new = KeyValue { key: k.clone(), value: format!("old{rev}").into_bytes(), meta };
            b.put(user_key(&k), encode_value(meta, &new.value));
            state.insert(k, new.clone());
            WatchEvent { revision: rev, kind: EventKind::Put, kv: new, prev }
        };
        b.put(history_key(rev, 0), cairn_kv_client::frame::archive(&e).expect("archive"));
        b.put(REVISION_KEY.to_vec(), rev.to_le_bytes().to_vec());
        // One entry per revision: the apply worker goes on at the next index.
        b.set_marker(cairn_lsm::Marker::new(rev, 1));
        db.write(&b).expect("write");
        events.push(e);
    }
    events
}

/// A harness whose state first holds `old_revisions` revisions written in
/// the history format before this one (an upgraded node's state).
fn harness_over(seed: u64, skip_change_records: bool, old_revisions: u64) -> Harness {
    let disk = SimDisk::new(seed);
    let (site, rec) = common::sim::recovered(&disk, |o| {
        // Small buffers: the history is read from tables as well as memtables.
        o.write_buffer_bytes = 8 << 10;
        o.block_cache_bytes = 1 << 20;
    });
    let old = write_old_format(&rec.db, seed, old_revisions);
    let limits = ApplyLimits::new(&cairn_kv_server::config::Limits::default(), u64::MAX / 4);
    let (mut applier, db, _waiters) = common::sim::applier(site, rec.db, rec.book, limits);
    applier.skip_change_records_for_tests = skip_change_records;
    let (tx, feed) = tokio::sync::broadcast::channel(1 << 16);
    applier.watch_tx = Some(tx);
    let mut h = Harness { applier, db, feed, index: old_revisions, client: 0, seq: 0, live: old };
    h.apply(vec![CommandOp::Register]);
    h.client = h.index;
    h
}

impl Harness {
    /// Applies `ops` as consecutive entries of one batch.
    fn apply(&mut self, ops: Vec<CommandOp>) {
        let entries: Vec<Entry> = ops
            .into_iter()
            .map(|op| {
                self.index += 1;
                let data = Command { time_ms: 1, op }.encode().expect("encode");
                Entry { term: Term(1), index: LogIndex(self.index), kind: EntryKind::Normal, data: data.into() }
            })
            .collect();
        self.applier.apply(&entries, None).expect("apply");
        while let Ok(feed) = self.feed.try_recv() {
            if let WatchFeed::Events(batch) = feed {
                self.live.extend(batch.events.iter().cloned());
            }
        }
    }

    fn write(&mut self, ops: Vec<WriteOp>) -> CommandOp {
        self.seq += 1;
        let session = Session { client_id: self.client, seq: self.seq, first_unacked: self.seq };
        CommandOp::Write { session, ops }
    }

    fn revision(&self) -> u64 {
        self.live.last().map_or(0, |e| e.revision)
    }
}

fn key(i: u64) -> Vec<u8> {
    format!("key-{i}").into_bytes()
}

/// A random write over a few keys: puts (some twice to one key, some with
/// the current lease), deletes, a range delete.
fn random_ops(rng: &mut rand::rngs::StdRng, rev: u64, lease: u64) -> Vec<WriteOp> {
    let n = rng.random_range(1..=3);
    (0..n)
        .map(|i| {
            let k = key(rng.random_range(0..KEYS));
            match rng.random_range(0..10) {
                0..=5 => WriteOp::Put { key: k, value: format!("v{rev}.{i}").into_bytes() },
                6 if lease != 0 => WriteOp::PutWithLease { key: k, value: format!("l{rev}.{i}").into_bytes(), lease },
                6 | 7 => WriteOp::Delete { key: k },
                8 => {
                    let a = rng.random_range(0..KEYS);
                    WriteOp::DeleteRange { start: key(a), end: key(a + 2) }
                }
                _ => WriteOp::Put { key: k, value: Vec::new() },
            }
        })
        .collect()
}

/// The state after each revision, from the live events.
fn states(live: &[WatchEvent]) -> Vec<BTreeMap<Vec<u8>, KeyValue>> {
    let mut state = BTreeMap::new();
    let mut out = vec![state.clone()];
    for e in live {
        while out.len() as u64 <= e.revision {
            out.push(state.clone());
        }
        match e.kind {
            EventKind::Put => state.insert(e.kv.key.clone(), e.kv.clone()),
            EventKind::Delete => state.remove(&e.kv.key),
        };
        out[e.revision as usize] = state.clone();
    }
    out
}

/// Checks the stored history against the live events; the first mismatch.
fn check(h: &Harness, compacted: u64) -> Result<(), String> {
    let db = h.db.get();
    let view = db.read_view();
    let current = h.revision();
    let states = states(&h.live);
    for after in compacted.saturating_sub(1)..=current {
        let read: Vec<WatchEvent> = cairn_kv_server::history::events(&view, after, current, |_| true)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("history after {after}: {e}"))?;
        let expected: Vec<&WatchEvent> = h.live.iter().filter(|e| e.revision > after).collect();
        if read.len() != expected.len() {
            return Err(format!("history after {after}: {} events read, {} live", read.len(), expected.len()));
        }
        for (r, e) in read.iter().zip(&expected) {
            if r != *e {
                return Err(format!("history after {after}: read {r:?}, live {e:?}"));
            }
        }
        let undo = cairn_kv_server::history::undo_to(&view, after, |_| true).map_err(|e| e.to_string())?;
        let mut past = BTreeMap::new();
        for item in view.range(user_key(b"")..user_key(b"\xff")) {
            let (k, v) = item.map_err(|e| e.to_string())?;
            let (meta, value) = decode_value(&v)?;
            past.insert(k[1..].to_vec(), KeyValue { key: k[1..].to_vec(), value: value.to_vec(), meta });
        }
        for (k, v) in undo.before {
            match v {
                Some(v) => past.insert(k, v),
                None => past.remove(&k),
            };
        }
        if past != states[after as usize] {
            return Err(format!("the state at revision {after} reads {past:?}, was {:?}", states[after as usize]));
        }
    }
    Ok(())
}

fn run(seed: u64, skip_change_records: bool) -> Result<(), String> {
    run_over(seed, skip_change_records, 0)
}

fn run_over(seed: u64, skip_change_records: bool, old_revisions: u64) -> Result<(), String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut h = harness_over(seed, skip_change_records, old_revisions);
    let mut compacted = 0;
    let mut lease = 0;
    for round in 0..150u64 {
        let mut batch = Vec::new();
        for _ in 0..rng.random_range(1..=4) {
            let op = match rng.random_range(0..20) {
                0 if lease == 0 => CommandOp::LeaseGrant { ttl_ms: 10_000, owner: h.client },
                1 if lease != 0 => CommandOp::LeaseRevoke { id: std::mem::take(&mut lease) },
                _ => {
                    let ops = random_ops(&mut rng, round, lease);
                    h.write(ops)
                }
            };
            let grant = matches!(op, CommandOp::LeaseGrant { .. });
            batch.push(op);
            if grant {
                // A lease's id is its entry's index.
                lease = h.index + batch.len() as u64;
            }
        }
        h.apply(batch);
        if round % 40 == 39 {
            compacted = h.revision().saturating_sub(rng.random_range(5..30)).max(compacted);
            h.apply(vec![CommandOp::Compact { revision: compacted }]);
        }
        if round % 25 == 24 {
            check(&h, compacted)?;
        }
    }
    check(&h, compacted)
}

#[test]
fn the_stored_history_gives_back_every_live_event_and_past_state() {
    for seed in 1..=6 {
        if let Err(e) = run(seed, false) {
            panic!("seed {seed}: {e}");
        }
    }
}

/// An upgraded node: its state holds history written by a build before
/// history format 2 (values in every event); the apply worker goes on over
/// it, replacing and deleting keys whose last put is in the old format. The
/// two formats read as one history, and past states read across the seam.
#[test]
fn a_history_of_both_formats_reads_as_one() {
    for seed in 1..=4 {
        if let Err(e) = run_over(seed, false, 60) {
            panic!("seed {seed}: {e}");
        }
    }
}

/// The test's teeth: without the records naming the change that replaced a
/// put, the values of replaced puts are lost, and the check says so.
#[test]
fn without_change_records_the_check_fails() {
    let failed = (1..=6).filter(|&seed| run(seed, true).is_err()).count();
    assert_eq!(failed, 6, "every seed must catch the lost values");
}
