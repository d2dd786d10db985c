//! A linearizability checker for a key-value history (Wing & Gong's search
//! with Lowe's memoization, as porcupine does it), partitioned by key.
//!
//! Each key is a register: a put sets it, a delete clears it, a get must see
//! what it holds. An operation whose outcome is unknown (it timed out) has no
//! return time: it may take effect at any point after its call, or never,
//! and a get that failed is left out (it has no effect). A history is
//! linearizable when every key's sub-history is (P-compositionality).
//!
//! [`check_whole`] runs the same search over a whole history of a small key
//! space as one object, for operations that span keys (a write of several
//! keys, a transaction comparing several): those are not P-compositional by
//! key, and only the whole check sees one taking effect on some keys and not
//! yet on others.
//!
//! The search is bounded: a key whose check takes more than `steps_max`
//! steps is reported as unknown, and the caller counts it as a failure.

use std::collections::{BTreeMap, HashMap, HashSet};

/// What an operation did.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    /// Set the key to a value.
    Put(Vec<u8>),
    /// Remove the key.
    Delete,
    /// Read the key.
    Get,
    /// Compare and swap: if the key holds `expect` (`None`: absent), set it
    /// to `new`. The op's `output` says whether it swapped: `Some([1])` yes,
    /// `Some([0])` no (`None` with an unknown outcome).
    Cas {
        /// The value it must hold (`None`: absent).
        expect: Option<Vec<u8>>,
        /// The value set when it does.
        new: Vec<u8>,
    },
}

/// The `output` of a compare-and-swap that swapped.
pub const SWAPPED: &[u8] = &[1];
/// The `output` of a compare-and-swap that did not.
pub const NOT_SWAPPED: &[u8] = &[0];

/// One operation of a client, as it saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// The client that ran it (for reports).
    pub client: u64,
    /// The key.
    pub key: Vec<u8>,
    /// What it asked.
    pub input: Input,
    /// What a get saw (`None`: absent); ignored for puts and deletes.
    pub output: Option<Vec<u8>>,
    /// When it was invoked (any monotonic unit, e.g. ns since the start).
    pub call: u64,
    /// When it completed; `None` when its outcome is unknown.
    pub ret: Option<u64>,
}

/// The verdict for one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A linearization exists.
    Ok,
    /// None exists; `witness` is a smallest sub-history (by removing
    /// operations one at a time) that is still not linearizable.
    Violation {
        /// The operations of the smallest failing sub-history found.
        witness: Vec<Op>,
    },
    /// The search hit its bound.
    Unknown,
}

/// The verdicts of a whole history.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Per key with a problem: its verdict.
    pub problems: BTreeMap<Vec<u8>, Verdict>,
    /// Keys checked.
    pub keys: usize,
    /// Keys whose check hit the bound.
    pub unknown: usize,
    /// Per key: operations checked and the time the check took.
    pub per_key: BTreeMap<Vec<u8>, (usize, std::time::Duration)>,
}

impl Report {
    /// Whether every key is linearizable (a key that hit the bound is not).
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// A report for people: each failing key and its smallest failing sub-history.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} keys checked, {} not linearizable, {} hit the search bound\n",
            self.keys,
            self.problems.len() - self.unknown,
            self.unknown
        );
        for (k, v) in &self.problems {
            match v {
                Verdict::Ok => {}
                Verdict::Unknown => s.push_str(&format!("key {}: search bound hit\n", show(k))),
                Verdict::Violation { witness } => {
                    s.push_str(&format!("key {}: not linearizable; smallest failing sub-history:\n", show(k)));
                    for op in witness {
                        s.push_str(&format!("  {}\n", describe(op)));
                    }
                }
            }
        }
        s
    }
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn describe(op: &Op) -> String {
    let ret = op.ret.map_or("unknown".to_string(), |r| r.to_string());
    match &op.input {
        Input::Put(v) => format!("client {} put {} [{}, {}]", op.client, show(v), op.call, ret),
        Input::Delete => format!("client {} delete [{}, {}]", op.client, op.call, ret),
        Input::Get => format!(
            "client {} get -> {} [{}, {}]",
            op.client,
            op.output.as_deref().map_or("absent".to_string(), show),
            op.call,
            ret
        ),
        Input::Cas { expect, new } => format!(
            "client {} cas {} -> {}: {} [{}, {}]",
            op.client,
            expect.as_deref().map_or("absent".to_string(), show),
            show(new),
            match (op.ret, op.output.as_deref()) {
                (None, _) => "unknown",
                (_, Some(SWAPPED)) => "swapped",
                _ => "not swapped",
            },
            op.call,
            ret
        ),
    }
}

/// Checks a whole history, key by key; `steps_max` bounds each key's search.
pub fn check(ops: &[Op], steps_max: u64) -> Report {
    let mut by_key: BTreeMap<Vec<u8>, Vec<Op>> = BTreeMap::new();
    for op in ops {
        // A get that failed has no effect and saw nothing: leave it out.
        if op.input == Input::Get && op.ret.is_none() {
            continue;
        }
        by_key.entry(op.key.clone()).or_default().push(op.clone());
    }
    let mut report = Report { keys: by_key.len(), ..Report::default() };
    for (k, h) in by_key {
        let started = std::time::Instant::now();
        let verdict = check_key(&h, steps_max);
        report.per_key.insert(k.clone(), (h.len(), started.elapsed()));
        match verdict {
            Some(true) => {}
            Some(false) => {
                let witness = minimize(h, steps_max);
                report.problems.insert(k, Verdict::Violation { witness });
            }
            None => {
                report.unknown += 1;
                report.problems.insert(k, Verdict::Unknown);
            }
        }
    }
    report
}

/// Removes operations one at a time while the history stays not
/// linearizable (each check bounded): a small failing sub-history. A put is
/// removed only when no remaining get saw its value, and a delete only when
/// no remaining get saw the key absent, so the witness never shows a
/// violation the removal made up (a read of a value no longer written).
fn minimize(mut h: Vec<Op>, steps_max: u64) -> Vec<Op> {
    let removable = |h: &[Op], i: usize| match &h[i].input {
        Input::Get => true,
        Input::Put(v) => !h.iter().any(|o| o.input == Input::Get && o.output.as_ref() == Some(v)),
        Input::Delete => !h.iter().any(|o| o.input == Input::Get && o.output.is_none()),
        // A swap writes like a put; one that did not swap constrains like a get.
        Input::Cas { new, .. } => !h.iter().any(|o| {
            (o.input == Input::Get && o.output.as_ref() == Some(new))
                || matches!(&o.input, Input::Cas { expect: Some(e), .. } if e == new)
        }),
    };
    // Gets first (they constrain the most), then the writes.
    for pass_gets in [true, false] {
        let mut i = 0;
        while i < h.len() {
            if (h[i].input == Input::Get) != pass_gets || !removable(&h, i) {
                i += 1;
                continue;
            }
            let mut smaller = h.clone();
            smaller.remove(i);
            if check_key(&smaller, steps_max) == Some(false) {
                h = smaller;
            } else {
                i += 1;
            }
        }
    }
    h
}

#[derive(Clone, Copy, Debug)]
struct Event {
    op: usize,
    is_call: bool,
    time: u64,
}

/// Whether one key's history is linearizable: `Some(true)`, `Some(false)`,
/// or `None` when the search took more than `steps_max` steps.
pub fn check_key(h: &[Op], steps_max: u64) -> Option<bool> {
    // Values as small ids; state: the id held, or none.
    let mut ids: HashMap<Vec<u8>, u32> = HashMap::new();
    let mut id_of = |v: &[u8]| -> u32 {
        let next = ids.len() as u32 + 1;
        *ids.entry(v.to_vec()).or_insert(next)
    };
    #[derive(Clone, Copy)]
    enum In {
        Put(u32),
        Del,
        Get(u32), // 0: absent
        // expect (0: absent), new, swapped (None: unknown outcome)
        Cas(u32, u32, Option<bool>),
    }
    let inputs: Vec<In> = h
        .iter()
        .map(|op| match &op.input {
            Input::Put(v) => In::Put(id_of(v)),
            Input::Delete => In::Del,
            Input::Get => In::Get(op.output.as_deref().map_or(0, &mut id_of)),
            Input::Cas { expect, new } => In::Cas(
                expect.as_deref().map_or(0, &mut id_of),
                id_of(new),
                op.ret.map(|_| op.output.as_deref() == Some(SWAPPED)),
            ),
        })
        .collect();
    let times: Vec<(u64, Option<u64>)> = h.iter().map(|op| (op.call, op.ret)).collect();
    search(
        &times,
        0u32,
        |op, &state| match inputs[op] {
            In::Put(v) => Some(v),
            In::Del => Some(0),
            In::Get(v) => (v == state).then_some(state),
            In::Cas(expect, new, swapped) => {
                let holds = expect == state;
                match swapped {
                    Some(true) => holds.then_some(new),
                    Some(false) => (!holds).then_some(state),
                    None => Some(if holds { new } else { state }),
                }
            }
        },
        steps_max,
    )
}

/// Wing & Gong's search with Lowe's memoization over operations given by
/// their (call, return) times (`None`: unknown outcome, may take effect any
/// time after its call, or never) and a model: `step(op, state)` is the
/// state after `op` if `op` may take effect in `state`, else `None`.
/// `Some(true)`: a linearization exists; `Some(false)`: none does; `None`:
/// more than `steps_max` steps.
fn search<S: Clone + Eq + std::hash::Hash>(
    times: &[(u64, Option<u64>)],
    init: S,
    step: impl Fn(usize, &S) -> Option<S>,
    steps_max: u64,
) -> Option<bool> {
    let n = times.len();
    if n == 0 {
        return Some(true);
    }
    // Events in time order; at equal times calls come first (more concurrency allowed).
    let mut events: Vec<Event> = Vec::with_capacity(2 * n);
    for (i, &(call, ret)) in times.iter().enumerate() {
        events.push(Event { op: i, is_call: true, time: call });
        events.push(Event { op: i, is_call: false, time: ret.unwrap_or(u64::MAX) });
    }
    events.sort_by_key(|e| (e.time, !e.is_call));
    // A doubly linked list over the events: node 0 is the head, nodes 1..=m
    // the events in order, node m + 1 the tail.
    let m = events.len();
    let tail = m + 1;
    let mut next: Vec<usize> = (1..=m + 2).collect();
    let mut prev: Vec<usize> = (0..m + 2).map(|i| i.saturating_sub(1)).collect();
    let mut call_node = vec![0usize; n];
    let mut ret_node = vec![0usize; n];
    for (j, e) in events.iter().enumerate() {
        if e.is_call {
            call_node[e.op] = j + 1;
        } else {
            ret_node[e.op] = j + 1;
        }
    }
    fn unlink(next: &mut [usize], prev: &mut [usize], x: usize) {
        let (p, nx) = (prev[x], next[x]);
        next[p] = nx;
        prev[nx] = p;
    }
    // Undoes `unlink(x)`; links are restored in the reverse order they were removed.
    fn relink(next: &mut [usize], prev: &mut [usize], x: usize) {
        let (p, nx) = (prev[x], next[x]);
        next[p] = x;
        prev[nx] = x;
    }
    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, S)> = HashSet::new();
    let mut state = init;
    let mut stack: Vec<(usize, S)> = Vec::new(); // (op, state before it)
    let mut cur = next[0];
    let mut steps = 0u64;
    while next[0] != tail {
        steps += 1;
        if steps > steps_max {
            return None;
        }
        if cur == tail {
            return Some(false);
        }
        let e = events[cur - 1];
        if e.is_call {
            let mut moved = false;
            if let Some(after) = step(e.op, &state) {
                linearized[e.op / 64] |= 1 << (e.op % 64);
                if cache.insert((linearized.clone(), after.clone())) {
                    moved = true;
                    stack.push((e.op, std::mem::replace(&mut state, after)));
                    unlink(&mut next, &mut prev, call_node[e.op]);
                    unlink(&mut next, &mut prev, ret_node[e.op]);
                    cur = next[0];
                } else {
                    linearized[e.op / 64] &= !(1 << (e.op % 64));
                }
            }
            if !moved {
                cur = next[cur];
            }
        } else {
            // An operation's return reached before it was linearized: the
            // prefix chosen cannot be extended; undo its last choice.
            let Some((op, before)) = stack.pop() else { return Some(false) };
            linearized[op / 64] &= !(1 << (op % 64));
            state = before;
            relink(&mut next, &mut prev, ret_node[op]);
            relink(&mut next, &mut prev, call_node[op]);
            cur = next[call_node[op]];
        }
    }
    Some(true)
}

/// One operation over a small key space, for [`check_whole`]: the check
/// that is not split by key, so that a write of several keys at once is one
/// operation and must take effect on all of them at one point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MultiOp {
    /// The client that ran it.
    pub client: u64,
    /// What it asked and, for a read or a transaction, what it saw.
    pub input: MultiInput,
    /// When it was invoked.
    pub call: u64,
    /// When it completed; `None` when its outcome is unknown.
    pub ret: Option<u64>,
}

/// What a [`MultiOp`] did. A value of `None` is an absent key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MultiInput {
    /// Read one key, which held `output`.
    Get {
        /// The key.
        key: Vec<u8>,
        /// What it held (`None`: absent).
        output: Option<Vec<u8>>,
    },
    /// Set (`Some`) or remove (`None`) each key, all at once.
    Write(Vec<(Vec<u8>, Option<Vec<u8>>)>),
    /// If every key holds its expected value, do `writes`, all at once.
    Txn {
        /// Each key and the value it must hold (`None`: absent).
        compares: Vec<(Vec<u8>, Option<Vec<u8>>)>,
        /// What it writes when they all hold.
        writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
        /// Whether it did (`None`: the outcome is unknown).
        swapped: Option<bool>,
    },
}

/// Whether a whole history over a small key space is linearizable, checked
/// as one object (the state of every key) rather than key by key: slower,
/// and it catches what the per-key check cannot, a multi-key write seen
/// half applied (one key's new value read, then another key's old value).
/// A get that failed (no return) is left out. `Some(true)`, `Some(false)`,
/// or `None` when the search took more than `steps_max` steps.
pub fn check_whole(ops: &[MultiOp], steps_max: u64) -> Option<bool> {
    let ops: Vec<&MultiOp> =
        ops.iter().filter(|o| !(matches!(o.input, MultiInput::Get { .. }) && o.ret.is_none())).collect();
    // Keys and values as small ids; the state holds each key's value id (0: absent).
    let mut keys: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut values: HashMap<Vec<u8>, u32> = HashMap::new();
    let mut pair = |k: &[u8], v: Option<&[u8]>| -> (usize, u32) {
        let next_key = keys.len();
        let key = *keys.entry(k.to_vec()).or_insert(next_key);
        let next_value = values.len() as u32 + 1;
        (key, v.map_or(0, |v| *values.entry(v.to_vec()).or_insert(next_value)))
    };
    type Pairs = Vec<(usize, u32)>;
    enum In {
        Get(usize, u32),
        Txn(Pairs, Pairs, Option<bool>),
    }
    let mut inputs = Vec::with_capacity(ops.len());
    for o in &ops {
        let mut ids = |list: &[(Vec<u8>, Option<Vec<u8>>)]| -> Pairs {
            list.iter().map(|(k, v)| pair(k, v.as_deref())).collect()
        };
        inputs.push(match &o.input {
            MultiInput::Get { key, output } => {
                let (k, v) = pair(key, output.as_deref());
                In::Get(k, v)
            }
            MultiInput::Write(w) => In::Txn(Vec::new(), ids(w), Some(true)),
            MultiInput::Txn { compares, writes, swapped } => {
                In::Txn(ids(compares), ids(writes), if o.ret.is_some() { *swapped } else { None })
            }
        });
    }
    let init = vec![0u32; keys.len()];
    let times: Vec<(u64, Option<u64>)> = ops.iter().map(|o| (o.call, o.ret)).collect();
    search(
        &times,
        init,
        |op, state: &Vec<u32>| match &inputs[op] {
            In::Get(k, v) => (state[*k] == *v).then(|| state.clone()),
            In::Txn(compares, writes, swapped) => {
                let holds = compares.iter().all(|(k, v)| state[*k] == *v);
                let apply = || {
                    let mut after = state.clone();
                    for (k, v) in writes {
                        after[*k] = *v;
                    }
                    after
                };
                match swapped {
                    Some(true) => holds.then(apply),
                    Some(false) => (!holds).then(|| state.clone()),
                    None => Some(if holds { apply() } else { state.clone() }),
                }
            }
        },
        steps_max,
    )
}

/// The history as JSON lines, one operation per line (`client`, `key`,
/// `input` of `put`/`delete`/`get`, `value` of a put, `output` of a get
/// (`null`: absent), `call`, `ret` (`null`: outcome unknown)); keys and values
/// as UTF-8 with invalid bytes replaced.
pub fn history_json(ops: &[Op]) -> String {
    fn text(b: &[u8]) -> String {
        let mut out = String::from("\"");
        for c in String::from_utf8_lossy(b).chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }
    let mut s = String::new();
    for op in ops {
        let (input, value) = match &op.input {
            Input::Put(v) => ("put", text(v)),
            Input::Delete => ("delete", "null".to_string()),
            Input::Get => ("get", "null".to_string()),
            Input::Cas { expect, new } => (
                "cas",
                format!("{{\"expect\":{},\"new\":{}}}", expect.as_deref().map_or("null".to_string(), text), text(new)),
            ),
        };
        let output = match (&op.input, &op.output) {
            (Input::Get, Some(v)) => text(v),
            (Input::Cas { .. }, Some(v)) => (v.as_slice() == SWAPPED).to_string(),
            _ => "null".to_string(),
        };
        let ret = op.ret.map_or("null".to_string(), |r| r.to_string());
        s.push_str(&format!(
            "{{\"client\":{},\"key\":{},\"input\":\"{input}\",\"value\":{value},\"output\":{output},\"call\":{},\"ret\":{ret}}}\n",
            op.client,
            text(&op.key),
            op.call
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(c: u64, v: &str, call: u64, ret: u64) -> Op {
        Op { client: c, key: b"k".to_vec(), input: Input::Put(v.into()), output: None, call, ret: Some(ret) }
    }
    fn del(c: u64, call: u64, ret: u64) -> Op {
        Op { client: c, key: b"k".to_vec(), input: Input::Delete, output: None, call, ret: Some(ret) }
    }
    fn get(c: u64, saw: Option<&str>, call: u64, ret: u64) -> Op {
        Op { client: c, key: b"k".to_vec(), input: Input::Get, output: saw.map(|s| s.into()), call, ret: Some(ret) }
    }
    fn unknown(mut op: Op) -> Op {
        op.ret = None;
        op
    }
    fn cas(c: u64, expect: Option<&str>, new: &str, swapped: bool, call: u64, ret: u64) -> Op {
        Op {
            client: c,
            key: b"k".to_vec(),
            input: Input::Cas { expect: expect.map(|e| e.into()), new: new.into() },
            output: Some(if swapped { SWAPPED } else { NOT_SWAPPED }.to_vec()),
            call,
            ret: Some(ret),
        }
    }
    const B: u64 = 1_000_000;

    fn kv(k: &str, v: Option<&str>) -> (Vec<u8>, Option<Vec<u8>>) {
        (k.into(), v.map(|v| v.into()))
    }
    fn mget(c: u64, k: &str, saw: Option<&str>, call: u64, ret: u64) -> MultiOp {
        MultiOp {
            client: c,
            input: MultiInput::Get { key: k.into(), output: saw.map(|s| s.into()) },
            call,
            ret: Some(ret),
        }
    }
    fn mwrite(c: u64, w: &[(&str, Option<&str>)], call: u64, ret: Option<u64>) -> MultiOp {
        MultiOp { client: c, input: MultiInput::Write(w.iter().map(|(k, v)| kv(k, *v)).collect()), call, ret }
    }

    #[test]
    fn a_multi_key_write_seen_half_applied_is_caught_only_by_the_whole_check() {
        // A write of a and b with an unknown outcome; client 2 reads a's new
        // value, then b's old one: each key alone is fine (the write takes
        // effect before the first read for a, after the second for b), the
        // whole history is not.
        let w = mwrite(1, &[("a", Some("1")), ("b", Some("1"))], 0, None);
        let ra = mget(2, "a", Some("1"), 10 * B, 11 * B);
        let rb = mget(2, "b", None, 20 * B, 21 * B);
        let per_key: Vec<Op> = vec![
            Op { client: 1, key: b"a".to_vec(), input: Input::Put(b"1".to_vec()), output: None, call: 0, ret: None },
            Op { client: 1, key: b"b".to_vec(), input: Input::Put(b"1".to_vec()), output: None, call: 0, ret: None },
            Op {
                client: 2,
                key: b"a".to_vec(),
                input: Input::Get,
                output: Some(b"1".to_vec()),
                call: 10 * B,
                ret: Some(11 * B),
            },
            Op { client: 2, key: b"b".to_vec(), input: Input::Get, output: None, call: 20 * B, ret: Some(21 * B) },
        ];
        assert!(check(&per_key, 1_000_000).ok(), "each key alone is linearizable");
        assert_eq!(check_whole(&[w.clone(), ra.clone(), rb], 1_000_000), Some(false));
        // Both keys read new: fine.
        let rb_new = mget(2, "b", Some("1"), 20 * B, 21 * B);
        assert_eq!(check_whole(&[w, ra, rb_new], 1_000_000), Some(true));
    }

    #[test]
    fn multi_key_transactions() {
        let init = mwrite(1, &[("a", Some("0")), ("b", Some("0"))], 0, Some(B));
        let txn = |c: u64, from: &str, to: &str, swapped: Option<bool>, call: u64, ret: Option<u64>| MultiOp {
            client: c,
            input: MultiInput::Txn {
                compares: vec![kv("a", Some(from)), kv("b", Some(from))],
                writes: vec![kv("a", Some(to)), kv("b", Some(to))],
                swapped,
            },
            call,
            ret,
        };
        // Two transfers from 0: one swaps, the other must not.
        let ok = [
            init.clone(),
            txn(2, "0", "x", Some(true), 2 * B, Some(3 * B)),
            txn(3, "0", "y", Some(false), 4 * B, Some(5 * B)),
        ];
        assert_eq!(check_whole(&ok, 1_000_000), Some(true));
        // Both say they swapped from 0, one after the other: a lost update.
        let lost = [
            init.clone(),
            txn(2, "0", "x", Some(true), 2 * B, Some(3 * B)),
            txn(3, "0", "y", Some(true), 4 * B, Some(5 * B)),
        ];
        assert_eq!(check_whole(&lost, 1_000_000), Some(false));
        // One that did not swap although both keys held 0 throughout.
        let refused =
            [init.clone(), txn(2, "0", "x", Some(false), 2 * B, Some(3 * B)), mget(3, "a", Some("0"), 4 * B, 5 * B)];
        assert_eq!(check_whole(&refused, 1_000_000), Some(false));
        // An unknown outcome may or may not have applied.
        let maybe = [init.clone(), txn(2, "0", "x", None, 2 * B, None), mget(3, "b", Some("x"), 4 * B, 5 * B)];
        assert_eq!(check_whole(&maybe, 1_000_000), Some(true));
        let maybe_not = [init, txn(2, "0", "x", None, 2 * B, None), mget(3, "b", Some("0"), 4 * B, 5 * B)];
        assert_eq!(check_whole(&maybe_not, 1_000_000), Some(true));
    }

    #[test]
    fn compare_and_swap_histories() {
        // Two increments from 0: one swaps, the other sees its value.
        let ok = [
            put(1, "0", 0, 1),
            cas(1, Some("0"), "1", true, 2, 5),
            cas(2, Some("0"), "1", false, 3, 6),
            cas(2, Some("1"), "2", true, 7, 8),
            get(3, Some("2"), 9, 10),
        ];
        assert_eq!(check_key(&ok, B), Some(true));
        // Both swapped from the same value: a lost update.
        let lost = [put(1, "0", 0, 1), cas(1, Some("0"), "1", true, 2, 3), cas(2, Some("0"), "1", true, 4, 5)];
        assert_eq!(check_key(&lost, B), Some(false));
        // A swap that failed although the value was there, alone.
        let wrong = [put(1, "0", 0, 1), cas(2, Some("0"), "1", false, 2, 3), get(3, Some("0"), 4, 5)];
        assert_eq!(check_key(&wrong, B), Some(false));
        // A swap on an absent key.
        assert_eq!(check_key(&[cas(1, None, "a", true, 0, 1), get(2, Some("a"), 2, 3)], B), Some(true));
        // An unknown outcome may have swapped or not.
        let maybe = [put(1, "0", 0, 1), unknown(cas(1, Some("0"), "1", true, 2, 3)), get(2, Some("1"), 4, 5)];
        assert_eq!(check_key(&maybe, B), Some(true));
        let maybe_not = [put(1, "0", 0, 1), unknown(cas(1, Some("0"), "1", true, 2, 3)), get(2, Some("0"), 4, 5)];
        assert_eq!(check_key(&maybe_not, B), Some(true));
        let report = check(&lost, B);
        assert!(!report.ok() && report.describe().contains("cas"), "{}", report.describe());
    }

    #[test]
    fn sequential_and_concurrent_histories_pass() {
        assert_eq!(
            check_key(&[put(1, "a", 0, 1), get(2, Some("a"), 2, 3), del(1, 4, 5), get(2, None, 6, 7)], B),
            Some(true)
        );
        // Overlapping puts: a later read may see either, but then must stay.
        let h = [put(1, "a", 0, 10), put(2, "b", 0, 10), get(3, Some("a"), 11, 12), get(3, Some("a"), 13, 14)];
        assert_eq!(check_key(&h, B), Some(true));
        // A read concurrent with a put may see the old or the new value.
        assert_eq!(
            check_key(&[put(1, "a", 0, 1), put(1, "b", 2, 10), get(2, Some("a"), 3, 4), get(3, Some("b"), 5, 6)], B),
            Some(true)
        );
    }

    #[test]
    fn a_stale_read_is_rejected() {
        let h = [put(1, "a", 0, 1), put(1, "b", 2, 3), get(2, Some("a"), 4, 5)];
        assert_eq!(check_key(&h, B), Some(false));
    }

    #[test]
    fn a_lost_write_is_rejected() {
        // An acknowledged put, then reads that never see it.
        let h = [put(1, "a", 0, 1), get(2, None, 2, 3)];
        assert_eq!(check_key(&h, B), Some(false));
    }

    #[test]
    fn a_read_of_a_value_never_written_is_rejected() {
        let h = [put(1, "a", 0, 1), get(2, Some("zzz"), 2, 3)];
        assert_eq!(check_key(&h, B), Some(false));
    }

    #[test]
    fn reordered_writes_are_rejected() {
        // b was written after a completed; a reader sees b, then a later reader sees a.
        let h = [put(1, "a", 0, 1), put(1, "b", 2, 3), get(2, Some("b"), 4, 5), get(3, Some("a"), 6, 7)];
        assert_eq!(check_key(&h, B), Some(false));
    }

    #[test]
    fn a_write_of_unknown_outcome_may_or_may_not_have_happened() {
        // It happened (seen later) ...
        let h = [put(1, "a", 0, 1), unknown(put(2, "b", 2, 0)), get(3, Some("b"), 10, 11)];
        assert_eq!(check_key(&h, B), Some(true));
        // ... or it did not (never seen).
        let h = [put(1, "a", 0, 1), unknown(put(2, "b", 2, 0)), get(3, Some("a"), 10, 11)];
        assert_eq!(check_key(&h, B), Some(true));
        // But not before it was invoked.
        let h = [put(1, "a", 0, 1), get(3, Some("b"), 2, 3), unknown(put(2, "b", 5, 0))];
        assert_eq!(check_key(&h, B), Some(false));
    }

    #[test]
    fn a_history_is_checked_per_key_and_the_report_names_a_small_failing_part() {
        let mut ops = vec![put(1, "a", 0, 1), put(1, "b", 2, 3), get(2, Some("a"), 4, 5)];
        for i in 0..20u64 {
            ops.push(get(3, Some("b"), 10 + 2 * i, 11 + 2 * i));
        }
        let mut other = put(4, "x", 0, 1);
        other.key = b"other".to_vec();
        ops.push(other);
        let r = check(&ops, B);
        assert!(!r.ok());
        assert_eq!(r.keys, 2);
        let Some(Verdict::Violation { witness }) = r.problems.get(b"k".as_slice()) else { panic!("{r:?}") };
        assert_eq!(witness.len(), 3, "{}", r.describe());
        assert!(r.describe().contains("get -> a"), "{}", r.describe());
    }

    #[test]
    fn the_search_bound_reports_unknown() {
        // Many concurrent puts and a read: a tiny bound cannot finish.
        let mut h = Vec::new();
        for i in 0..12u64 {
            h.push(put(i, &format!("v{i}"), 0, 100));
        }
        h.push(get(99, Some("v7"), 101, 102));
        assert_eq!(check_key(&h, 5), None);
        assert_eq!(check_key(&h, 10_000_000), Some(true));
    }

    /// A register whose operations take effect at a point inside their
    /// interval: what it produces is linearizable by construction.
    fn simulated(seed: &[(u8, u8, u8)]) -> Vec<Op> {
        // Each op: kind, start, length; its effect happens at start + length/2.
        let mut ops: Vec<(u64, Op)> = Vec::new();
        for (i, &(kind, start, len)) in seed.iter().enumerate() {
            let call = u64::from(start) * 10;
            let ret = call + u64::from(len) * 10 + 1;
            let point = call + (ret - call) / 2;
            let input = match kind % 4 {
                0 => Input::Put(format!("v{i}").into_bytes()),
                1 => Input::Delete,
                2 => Input::Get,
                _ => Input::Cas {
                    expect: i.checked_sub(1).filter(|_| i % 2 == 1).map(|p| format!("v{p}").into_bytes()),
                    new: format!("v{i}").into_bytes(),
                },
            };
            ops.push((
                point * 1000 + i as u64,
                Op { client: i as u64, key: b"k".to_vec(), input, output: None, call, ret: Some(ret) },
            ));
        }
        ops.sort_by_key(|(p, _)| *p);
        let mut state: Option<Vec<u8>> = None;
        for (_, op) in &mut ops {
            match &op.input {
                Input::Put(v) => state = Some(v.clone()),
                Input::Delete => state = None,
                Input::Get => op.output = state.clone(),
                Input::Cas { expect, new } => {
                    let swapped = *expect == state;
                    if swapped {
                        state = Some(new.clone());
                    }
                    op.output = Some(if swapped { SWAPPED } else { NOT_SWAPPED }.to_vec());
                }
            }
        }
        ops.into_iter().map(|(_, o)| o).collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 300, failure_persistence: None, ..Default::default() })]

        #[test]
        fn histories_of_a_real_register_pass_and_a_read_of_an_unwritten_value_fails(
            seed in proptest::collection::vec((0u8..3, 0u8..40, 0u8..6), 1..40),
            which in 0usize..40,
        ) {
            let h = simulated(&seed);
            proptest::prop_assert_eq!(check_key(&h, 50_000_000), Some(true));
            let gets: Vec<usize> = (0..h.len()).filter(|i| h[*i].input == Input::Get).collect();
            if !gets.is_empty() {
                let mut bad = h.clone();
                bad[gets[which % gets.len()]].output = Some(b"never written".to_vec());
                proptest::prop_assert_eq!(check_key(&bad, 50_000_000), Some(false));
            }
        }
    }

    #[test]
    fn the_history_as_json_lines_escapes_text() {
        let ops = vec![
            Op {
                client: 1,
                key: b"k\"1".to_vec(),
                input: Input::Put(b"a\\b\n".to_vec()),
                output: None,
                call: 5,
                ret: None,
            },
            Op { client: 2, key: b"k".to_vec(), input: Input::Get, output: Some(b"v".to_vec()), call: 6, ret: Some(9) },
        ];
        let j = history_json(&ops);
        assert_eq!(
            j,
            "{\"client\":1,\"key\":\"k\\\"1\",\"input\":\"put\",\"value\":\"a\\\\b\\u000a\",\"output\":null,\"call\":5,\"ret\":null}\n\
             {\"client\":2,\"key\":\"k\",\"input\":\"get\",\"value\":null,\"output\":\"v\",\"call\":6,\"ret\":9}\n"
        );
    }
}
