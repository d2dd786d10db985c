//! Sessions (DESIGN.md, "Sessions"), at the apply worker: a retried write
//! gets its cached answer and is not applied again; a session left idle
//! longer than its time to live expires at the leader's timestamp in the
//! entries, so every replica expires the same sessions at the same index;
//! a write of an expired session (a retry included) is refused and never
//! applied; the expired records leave the replicated state at the next
//! registration. And the limits those decisions use (the time to live among
//! them) are the leader's, replicated, not each node's configuration.

mod common;

use std::sync::Arc;

use cairn_kv_client::ErrorCode;
use cairn_kv_client::protocol::{Response, Session, WriteOp};
use cairn_kv_server::apply::{Applier, ApplyLimits, Waiter, Waiters};
use cairn_kv_server::snapshot::SharedDb;
use cairn_kv_server::state::{Command, CommandOp, decode_value, session_key, user_key};
use cairn_raft_core::{Entry, EntryKind, LogIndex, Term};
use cairn_wal::sim::SimDisk;

const TTL_MS: u64 = 1_000;

/// One replica's apply worker on its own simulated disk.
struct Replica {
    applier: Applier,
    db: Arc<SharedDb>,
    waiters: Waiters,
    index: u64,
}

impl Replica {
    fn new(seed: u64, ignore_sessions: bool) -> Replica {
        let limits = ApplyLimits { session_ttl_ms: TTL_MS, ..ApplyLimits::defaults() };
        Replica::with_limits(seed, ignore_sessions, limits)
    }

    /// A replica applying with `limits` while its state holds none.
    fn with_limits(seed: u64, ignore_sessions: bool, limits: ApplyLimits) -> Replica {
        let disk = SimDisk::new(seed);
        let (site, rec) = common::sim::recovered(&disk, |_| {});
        let (mut applier, db, waiters) = common::sim::applier(site, rec.db, rec.book, limits);
        applier.ignore_sessions_for_tests = ignore_sessions;
        Replica { applier, db, waiters, index: 0 }
    }

    /// Applies one entry proposed by the leader at `time_ms`; its answer.
    fn apply(&mut self, time_ms: u64, op: CommandOp) -> Response {
        self.index += 1;
        let data = Command { time_ms, op }.encode().expect("encode");
        let entry = Entry { term: Term(1), index: LogIndex(self.index), kind: EntryKind::Normal, data: data.into() };
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        self.waiters.lock().expect("waiters").insert(self.index, Waiter { term: Term(1), reply: tx });
        self.applier.apply(&[entry], None).expect("apply");
        rx.try_recv().expect("an answer")
    }

    /// The value of user key `k`.
    fn value(&self, k: &str) -> Option<Vec<u8>> {
        let db = self.db.get();
        let stored = db.get(&user_key(k.as_bytes())).expect("get")?;
        Some(decode_value(&stored).expect("stored value").1.to_vec())
    }

    /// Whether the state holds a session record for `id`.
    fn has_session(&self, id: u64) -> bool {
        self.db.get().get(&session_key(id)).expect("get").is_some()
    }
}

fn put(client_id: u64, seq: u64, key: &str, value: &str) -> CommandOp {
    CommandOp::Write {
        session: Session { client_id, seq, first_unacked: seq },
        ops: vec![WriteOp::Put { key: key.into(), value: value.into() }],
    }
}

fn registered(r: Response) -> u64 {
    match r {
        Response::Registered { client_id } => client_id,
        other => panic!("expected a registration, got {other:?}"),
    }
}

fn expired(r: &Response) -> bool {
    matches!(r, Response::Error(e) if e.code == ErrorCode::SessionExpired)
}

/// Runs the scenario on one replica; returns its answers, for comparison.
fn scenario(r: &mut Replica) -> Vec<Response> {
    let mut answers = Vec::new();
    let mut log = |r: &Response| answers.push(r.clone());
    // Client A registers at 0 and writes at 100.
    let a = registered(r.apply(0, CommandOp::Register));
    let first = r.apply(100, put(a, 1, "k", "1"));
    log(&first);
    assert!(matches!(first, Response::Written { .. }), "the first write applies: {first:?}");
    // Its retry (same sequence number, another value to show a second
    // application) gets the cached answer and changes nothing.
    let retry = r.apply(200, put(a, 1, "k", "retried"));
    log(&retry);
    assert_eq!(retry, first, "a retry gets the first answer");
    assert_eq!(r.value("k").as_deref(), Some(&b"1"[..]), "a retried write must not apply twice");
    // Client B registers at 500 and stays active (its last write at 1,050).
    let b = registered(r.apply(500, CommandOp::Register));
    log(&r.apply(1_050, put(b, 1, "b", "1")));
    // At 1,201 A has been idle for more than the time to live (its last
    // entry at 200): its next write is refused, not applied.
    let late = r.apply(1_201, put(a, 2, "k", "late"));
    log(&late);
    assert!(expired(&late), "a write of an expired session is refused: {late:?}");
    assert_eq!(r.value("k").as_deref(), Some(&b"1"[..]), "a refused write must not apply");
    // A retry of A's first write after the expiry: refused too, never a
    // second application.
    let old = r.apply(1_300, put(a, 1, "k", "again"));
    log(&old);
    assert!(expired(&old), "a retry of an expired session is refused: {old:?}");
    assert_eq!(r.value("k").as_deref(), Some(&b"1"[..]));
    // B, active at 1,050, still writes at 1,900.
    let still = r.apply(1_900, put(b, 2, "b", "2"));
    log(&still);
    assert!(matches!(still, Response::Written { .. }), "an active session goes on: {still:?}");
    // A registration at 3,000 drops every session idle past the time to
    // live from the replicated state (B's last entry was at 1,900).
    assert!(r.has_session(b));
    let c = registered(r.apply(3_000, CommandOp::Register));
    assert!(!r.has_session(a), "the expired session's record must leave the state");
    assert!(!r.has_session(b), "a session idle past the time to live leaves at the next registration");
    assert!(r.has_session(c));
    let gone = r.apply(3_001, put(b, 3, "b", "3"));
    log(&gone);
    assert!(expired(&gone), "a dropped session is refused: {gone:?}");
    assert_eq!(r.value("b").as_deref(), Some(&b"2"[..]));
    answers
}

#[test]
fn sessions_expire_by_the_entries_clock_the_same_on_every_replica() {
    let mut one = Replica::new(1, false);
    let mut two = Replica::new(2, false);
    let a1 = scenario(&mut one);
    let a2 = scenario(&mut two);
    assert_eq!(a1, a2, "two replicas must answer the same entries the same");
    assert_eq!(one.applier.hash(), two.applier.hash(), "two replicas must hold the same state");
}

/// Teeth: with sessions ignored (the test switch), the scenario's check of
/// "a retried write must not apply twice" fails.
#[test]
fn ignoring_sessions_is_caught() {
    let caught = std::panic::catch_unwind(|| {
        let mut r = Replica::new(3, true);
        scenario(&mut r);
    });
    assert!(caught.is_err(), "the scenario must fail when sessions are ignored");
}

/// A client registers at 0, writes at 100, and again at 5,000: expired under
/// a time to live of 1 s, not under the default hour.
fn idle_client(r: &mut Replica, set: Option<&ApplyLimits>) -> Vec<Response> {
    let mut answers = Vec::new();
    if let Some(l) = set {
        answers.push(r.apply(0, CommandOp::SetLimits { values: l.to_values() }));
    }
    let a = registered(r.apply(0, CommandOp::Register));
    answers.push(r.apply(100, put(a, 1, "k", "1")));
    answers.push(r.apply(5_000, put(a, 2, "k", "2")));
    answers
}

#[test]
fn replicas_apply_the_leaders_limits_not_their_own_configuration() {
    let short = ApplyLimits { session_ttl_ms: 1_000, ..ApplyLimits::defaults() };
    let long = ApplyLimits::defaults();
    // Teeth: replicas that apply with their own, different, limits (as each
    // node's configuration did before the limits were replicated) answer the
    // same entries differently, and the comparison sees it.
    let (mut one, mut two) = (Replica::with_limits(1, false, short), Replica::with_limits(2, false, long));
    let (a1, a2) = (idle_client(&mut one, None), idle_client(&mut two, None));
    assert_ne!(a1, a2, "replicas with different limits should split");
    assert_ne!(one.applier.hash(), two.applier.hash());
    // With the leader's limits in the log first, both apply those.
    let (mut one, mut two) = (Replica::with_limits(3, false, short), Replica::with_limits(4, false, long));
    let (a1, a2) = (idle_client(&mut one, Some(&short)), idle_client(&mut two, Some(&short)));
    assert_eq!(a1, a2, "replicas must answer alike under the replicated limits");
    assert!(expired(&a1[2]), "the leader's time to live (1 s) applies on both: {:?}", a1[2]);
    assert_eq!(one.applier.hash(), two.applier.hash(), "and hold the same state");
    // Limits the state could not apply with are refused, on every replica alike.
    let mut bad = short.to_values();
    bad.pop();
    let r = one.apply(6_000, CommandOp::SetLimits { values: bad });
    assert!(matches!(&r, Response::Error(e) if e.code == ErrorCode::BadRequest), "{r:?}");
    let mut huge = short.to_values();
    huge[0] = 1 << 20;
    let r = one.apply(6_001, CommandOp::SetLimits { values: huge });
    assert!(matches!(&r, Response::Error(e) if e.code == ErrorCode::BadRequest), "{r:?}");
    assert_eq!(ApplyLimits::from_values(&short.to_values()).map(|l| l.to_values()), Some(short.to_values()));
}
