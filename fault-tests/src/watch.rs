//! A checker for what a watcher received against the writes that were made.
//!
//! The linearizability checker looks at one key at a time; a watch sees the
//! whole key space in revision order, so it checks what a split check
//! cannot: that writes of several keys are atomic (one revision), that the
//! revision order agrees with real time across keys, and that nothing was
//! lost, repeated or made up across reconnects, leader changes and snapshot
//! installs.
//!
//! The writes must carry values unique to each write (a write of several
//! keys puts the same value on each); deletes carry none and are checked
//! through the replay of the keys' states.

use std::collections::{BTreeMap, HashMap, HashSet};

/// One event a watcher received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The revision of the write.
    pub revision: u64,
    /// The key.
    pub key: Vec<u8>,
    /// The new value (`None`: the key was deleted).
    pub value: Option<Vec<u8>>,
    /// What the event says the key held before (`None`: absent).
    pub prev: Option<Vec<u8>>,
    /// The key's version after a put (0 for a delete).
    pub version: u64,
}

/// Whether a write took effect, as its client learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It was acknowledged as applied.
    Applied,
    /// It was acknowledged as not applied (a compare that failed).
    NotApplied,
    /// Unknown (it timed out): either is allowed.
    Unknown,
}

/// A write of a unique value to one or more keys, atomically.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// The keys it puts `value` on.
    pub keys: Vec<Vec<u8>>,
    /// The value, unique to this write.
    pub value: Vec<u8>,
    /// Invocation time.
    pub call: u64,
    /// Completion time (`None`: unknown outcome).
    pub ret: Option<u64>,
    /// What its client learned.
    pub outcome: Outcome,
}

/// What the check saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchReport {
    /// Events checked.
    pub events: usize,
    /// Revisions covered.
    pub revisions: u64,
    /// Writes found applied (of every outcome).
    pub applied: usize,
    /// Writes of several keys found applied, each at one revision.
    pub multi_key: usize,
}

/// Checks the events a watcher of every written key received from revision
/// 1 up to `final_revision` against the `writes` and the state read at the
/// end (`final_state`, each key's value or `None`). Returns the first
/// violation found, in words.
pub fn check_watch(
    events: &[Event],
    writes: &[Write],
    final_state: &BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    final_revision: u64,
) -> Result<WatchReport, String> {
    // Revision order, each (revision, key) once, every revision present.
    let mut seen = HashSet::new();
    let mut expected = 1u64;
    for (i, w) in events.windows(2).enumerate() {
        if w[1].revision < w[0].revision {
            return Err(format!("event {} at revision {} after revision {}", i + 1, w[1].revision, w[0].revision));
        }
    }
    for e in events {
        if !seen.insert((e.revision, e.key.clone())) {
            return Err(format!("key {:?} twice at revision {}", show(&e.key), e.revision));
        }
        if e.revision == expected {
            expected += 1;
        } else if e.revision > expected {
            return Err(format!("no event at revision {expected} (the next is at {})", e.revision));
        }
    }
    if expected != final_revision + 1 {
        return Err(format!("events end at revision {}, the cluster is at {final_revision}", expected - 1));
    }

    // Replay: each event's previous value is the state the events before it left.
    let mut state: BTreeMap<Vec<u8>, (Vec<u8>, u64)> = BTreeMap::new();
    for e in events {
        let before = state.get(&e.key);
        if before.map(|(v, _)| v) != e.prev.as_ref() {
            return Err(format!(
                "at revision {}, key {:?}: the event's previous value {:?} is not what the events before left ({:?})",
                e.revision,
                show(&e.key),
                e.prev.as_deref().map(show),
                before.map(|(v, _)| show(v))
            ));
        }
        match &e.value {
            Some(v) => {
                let version = before.map_or(1, |(_, n)| n + 1);
                if e.version != version {
                    return Err(format!(
                        "at revision {}, key {:?}: version {} where the events give {version}",
                        e.revision,
                        show(&e.key),
                        e.version
                    ));
                }
                state.insert(e.key.clone(), (v.clone(), version));
            }
            None => {
                if before.is_none() {
                    return Err(format!("at revision {}: a delete of the absent key {:?}", e.revision, show(&e.key)));
                }
                state.remove(&e.key);
            }
        }
    }
    for (k, want) in final_state {
        let got = state.get(k).map(|(v, _)| v);
        if got != want.as_ref() {
            return Err(format!(
                "key {:?}: the events leave {:?}, the final read gave {:?}",
                show(k),
                got.map(|v| show(v)),
                want.as_deref().map(show)
            ));
        }
    }

    // Each write: all its keys at one revision, or none; as its client learned.
    let mut by_value: HashMap<&[u8], Vec<&Event>> = HashMap::new();
    for e in events {
        if let Some(v) = &e.value {
            by_value.entry(v.as_slice()).or_default().push(e);
        }
    }
    let mut revision_of: Vec<(u64, u64, u64)> = Vec::new(); // (call, ret, revision) of acknowledged writes
    let mut report = WatchReport { events: events.len(), revisions: final_revision, ..WatchReport::default() };
    let mut known: HashSet<&[u8]> = HashSet::new();
    for w in writes {
        if !known.insert(w.value.as_slice()) {
            return Err(format!("two writes of the value {:?}: values must be unique", show(&w.value)));
        }
        let found = by_value.get(w.value.as_slice()).map(Vec::as_slice).unwrap_or_default();
        if found.is_empty() {
            if w.outcome == Outcome::Applied {
                return Err(format!("the acknowledged write of {:?} to {:?} has no event", show(&w.value), keys(w)));
            }
            continue;
        }
        if w.outcome == Outcome::NotApplied {
            return Err(format!("the write of {:?}, acknowledged as not applied, has events", show(&w.value)));
        }
        let mut got: Vec<&[u8]> = found.iter().map(|e| e.key.as_slice()).collect();
        let mut want: Vec<&[u8]> = w.keys.iter().map(Vec::as_slice).collect();
        got.sort();
        want.sort();
        if got != want {
            return Err(format!(
                "the write of {:?} to {:?} has events on {:?}",
                show(&w.value),
                keys(w),
                got.iter().map(|k| show(k)).collect::<Vec<_>>()
            ));
        }
        let revision = found[0].revision;
        if found.iter().any(|e| e.revision != revision) {
            return Err(format!(
                "the write of {:?} to {:?} is split across revisions {:?}",
                show(&w.value),
                keys(w),
                found.iter().map(|e| e.revision).collect::<Vec<_>>()
            ));
        }
        report.applied += 1;
        if w.keys.len() > 1 {
            report.multi_key += 1;
        }
        if let Some(ret) = w.ret {
            revision_of.push((w.call, ret, revision));
        }
    }
    for (v, evs) in &by_value {
        if !known.contains(v) {
            return Err(format!("revision {}: a value never written: {:?}", evs[0].revision, show(v)));
        }
    }

    // Real time: a write acknowledged before another began has a lower revision.
    let mut by_ret = revision_of.clone();
    by_ret.sort_by_key(|(_, ret, _)| *ret);
    // The highest revision among writes acknowledged up to each point.
    let mut max_rev = Vec::with_capacity(by_ret.len());
    let mut top = 0u64;
    for (_, _, r) in &by_ret {
        top = top.max(*r);
        max_rev.push(top);
    }
    for (call, _, rev) in &revision_of {
        let before = by_ret.partition_point(|(_, ret, _)| ret < call);
        if before > 0 && max_rev[before - 1] >= *rev {
            let (_, _, earlier) = by_ret[..before].iter().max_by_key(|(_, _, r)| *r).copied().unwrap_or_default();
            return Err(format!(
                "a write at revision {rev} began after a write at revision {earlier} was acknowledged: \
                 revisions disagree with real time"
            ));
        }
    }
    Ok(report)
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn keys(w: &Write) -> Vec<String> {
    w.keys.iter().map(|k| show(k)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(revision: u64, key: &str, value: &str, prev: Option<&str>, version: u64) -> Event {
        Event {
            revision,
            key: key.into(),
            value: Some(value.into()),
            prev: prev.map(|p| p.as_bytes().to_vec()),
            version,
        }
    }

    fn del(revision: u64, key: &str, prev: &str) -> Event {
        Event { revision, key: key.into(), value: None, prev: Some(prev.into()), version: 0 }
    }

    fn write(keys: &[&str], value: &str, call: u64, ret: Option<u64>, outcome: Outcome) -> Write {
        Write { keys: keys.iter().map(|k| k.as_bytes().to_vec()).collect(), value: value.into(), call, ret, outcome }
    }

    type State = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

    fn fin(pairs: &[(&str, Option<&str>)]) -> State {
        pairs.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec()))).collect()
    }

    /// a=1 (rev 1), a,b=2 together (rev 2), b deleted (rev 3), a=3 (rev 4,
    /// unknown outcome); a CAS that failed wrote nothing.
    fn good() -> (Vec<Event>, Vec<Write>, State) {
        let events = vec![
            put(1, "a", "1", None, 1),
            put(2, "a", "2", Some("1"), 2),
            put(2, "b", "2", None, 1),
            del(3, "b", "2"),
            put(4, "a", "3", Some("2"), 3),
        ];
        let writes = vec![
            write(&["a"], "1", 0, Some(10), Outcome::Applied),
            write(&["a", "b"], "2", 11, Some(20), Outcome::Applied),
            write(&["a"], "3", 21, None, Outcome::Unknown),
            write(&["b"], "never", 22, Some(30), Outcome::NotApplied),
            write(&["c"], "lost-in-timeout", 23, None, Outcome::Unknown),
        ];
        (events, writes, fin(&[("a", Some("3")), ("b", None), ("c", None)]))
    }

    #[test]
    fn a_faithful_watch_passes() {
        let (e, w, f) = good();
        let r = check_watch(&e, &w, &f, 4).expect("a faithful watch");
        assert_eq!((r.events, r.applied, r.multi_key), (5, 3, 1));
    }

    fn fails(e: &[Event], w: &[Write], f: &State, rev: u64, words: &str) {
        match check_watch(e, w, f, rev) {
            Ok(r) => panic!("accepted ({r:?}); expected a failure about {words:?}"),
            Err(msg) => assert!(msg.contains(words), "{msg:?} does not say {words:?}"),
        }
    }

    #[test]
    fn lost_repeated_reordered_or_made_up_events_fail() {
        let (e, w, f) = good();
        // A lost event (revision 3's delete).
        let lost: Vec<_> = e.iter().filter(|x| x.revision != 3).cloned().collect();
        fails(&lost, &w, &f, 4, "no event at revision 3");
        // A repeated event (a resume that started one revision too early).
        let mut rep = e.clone();
        rep.insert(1, e[0].clone());
        fails(&rep, &w, &f, 4, "twice at revision 1");
        // Out of order.
        let mut swapped = e.clone();
        swapped.swap(3, 4);
        fails(&swapped, &w, &f, 4, "after revision");
        // The stream stops early.
        fails(&e[..4], &w, &f, 4, "events end at revision 3");
        // A value nobody wrote.
        let mut made_up = e.clone();
        made_up[4].value = Some(b"x".to_vec());
        fails(&made_up, &w, &fin(&[("a", Some("x"))]), 4, "a value never written");
        // A previous value that is not what came before.
        let mut bad_prev = e.clone();
        bad_prev[1].prev = None;
        fails(&bad_prev, &w, &f, 4, "previous value");
    }

    #[test]
    fn writes_that_are_split_lost_or_wrongly_reported_fail() {
        let (e, w, f) = good();
        // The two-key write at two revisions.
        let mut split = e.clone();
        split[2].revision = 3;
        split[3].revision = 4;
        split[4].revision = 5;
        fails(&split, &w, &f, 5, "split across revisions");
        // An acknowledged write with no event (and a final state to match).
        let mut lost = e.clone();
        lost.remove(0);
        lost[0].prev = None;
        lost[0].version = 1;
        lost[3].version = 2;
        for x in &mut lost {
            x.revision -= 1;
        }
        fails(&lost, &w, &f, 3, "has no event");
        // A write refused as not applied that applied.
        let mut w2 = w.clone();
        w2[0].outcome = Outcome::NotApplied;
        fails(&e, &w2, &f, 4, "acknowledged as not applied");
        // A final read that disagrees with the events.
        fails(&e, &w, &fin(&[("a", Some("2"))]), 4, "the final read gave");
    }

    #[test]
    fn revisions_against_real_time_fail() {
        let (e, mut w, f) = good();
        // The write at revision 1 began after the one at revision 2 was acknowledged.
        w[0].call = 25;
        w[0].ret = Some(26);
        fails(&e, &w, &f, 4, "disagree with real time");
    }
}
