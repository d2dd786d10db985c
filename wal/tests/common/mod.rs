//! A plain in-memory model of the log, shared by the tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;

use cairn_wal::{Batch, UserKind, Wal};
use rand::Rng;

/// One operation on the log, as the model sees it.
#[derive(Clone, Debug)]
pub enum MOp {
    Append { kind: u16, pos: Option<u64>, payload: Vec<u8> },
    State(Vec<u8>),
    Marker(u64, Vec<u8>),
    Truncate(u64),
}

/// What the log should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    pub records: BTreeMap<u64, (u16, Vec<u8>)>,
    pub state: Option<Vec<u8>>,
    pub last: Option<u64>,
    /// The highest position passed to `release_to`.
    pub released: u64,
    /// The latest snapshot marker written: position and payload.
    pub marker: Option<(u64, Vec<u8>)>,
}

impl Model {
    pub fn apply(&mut self, op: &MOp) {
        match op {
            MOp::Append { kind, pos, payload } => {
                let p = pos.unwrap_or_else(|| self.last.map_or(0, |l| l + 1));
                self.records.insert(p, (*kind, payload.clone()));
                self.last = Some(p);
            }
            MOp::State(s) => self.state = Some(s.clone()),
            MOp::Marker(p, d) => self.marker = Some((*p, d.clone())),
            MOp::Truncate(p) => {
                self.records.split_off(p);
                self.last = self.last.min(p.checked_sub(1));
            }
        }
    }

    pub fn next_position(&self) -> u64 {
        self.last.map_or(0, |l| l + 1)
    }

    /// Compares the log with the model: every record the log returns is the
    /// model's, the log holds a contiguous suffix of the model's records, and
    /// nothing at or above the release point is missing.
    pub fn check(&self, wal: &Wal) -> Result<(), String> {
        let got = wal.read_range(.., u64::MAX).map_err(|e| format!("read_range: {e}"))?;
        let got: Vec<(u64, u16, Vec<u8>)> =
            got.iter().map(|r| (r.position, r.kind.get(), r.payload.to_vec())).collect();
        let first = got.first().map(|g| g.0);
        let want: Vec<(u64, u16, Vec<u8>)> = self
            .records
            .iter()
            .filter(|(p, _)| match first {
                Some(f) => **p >= f,
                None => **p >= self.released,
            })
            .map(|(p, (k, v))| (*p, *k, v.clone()))
            .collect();
        if got != want {
            let show = |v: &[(u64, u16, Vec<u8>)]| {
                v.iter().map(|(p, k, d)| format!("{p}:{k}:{}B", d.len())).collect::<Vec<_>>()
            };
            return Err(format!("records differ:\n  log:   {:?}\n  model: {:?}", show(&got), show(&want)));
        }
        if let Some(f) = first
            && f > self.released
            && self.records.range(self.released..f).next().is_some()
        {
            return Err(format!("records from {} (the release point) up to {f} are missing", self.released));
        }
        if wal.state() != self.state {
            return Err(format!("state differs: log {:?}, model {:?}", wal.state(), self.state));
        }
        // The latest marker outlives the release of the segment it was
        // written in: every new segment's header repeats it.
        let marker = wal.snapshot_markers().last().map(|m| (m.position, m.payload.clone()));
        if marker != self.marker {
            return Err(format!("latest snapshot marker differs: log {marker:?}, model {:?}", self.marker));
        }
        Ok(())
    }
}

pub fn to_batch(ops: &[MOp]) -> Batch {
    let mut b = Batch::new();
    for op in ops {
        match op {
            MOp::Append { kind, pos: Some(p), payload } => b.append(UserKind::new(*kind), *p, payload),
            MOp::Append { kind, pos: None, payload } => b.append_next(UserKind::new(*kind), payload),
            MOp::State(s) => b.set_state(s),
            MOp::Marker(p, d) => b.snapshot_marker(*p, d),
            MOp::Truncate(p) => b.truncate_from(*p),
        };
    }
    b
}

/// A random payload: mostly small, sometimes large enough to cross segments.
pub fn payload(rng: &mut impl Rng, big: usize) -> Vec<u8> {
    let len = match rng.random_range(0..10) {
        0 => 0,
        1 => rng.random_range(0..=big),
        _ => rng.random_range(1..200),
    };
    (0..len).map(|_| rng.random()).collect()
}

/// A random batch that respects the position rule, given the model before it.
pub fn random_batch(rng: &mut impl Rng, model: &Model, big: usize) -> Vec<MOp> {
    let mut m = model.clone();
    let mut ops = Vec::new();
    for _ in 0..rng.random_range(1..8) {
        let op = match rng.random_range(0..20) {
            0 => MOp::State((0..rng.random_range(0..40)).map(|_| rng.random()).collect()),
            1 if m.last.is_some() => {
                let l = m.last.unwrap_or(0);
                MOp::Truncate(rng.random_range(l.saturating_sub(6)..=l))
            }
            2 => MOp::Marker(m.last.unwrap_or(0), b"term".to_vec()),
            3 => {
                let p = m.next_position() + rng.random_range(0..3);
                MOp::Append { kind: rng.random_range(0..4), pos: Some(p), payload: payload(rng, big) }
            }
            _ => MOp::Append { kind: rng.random_range(0..4), pos: None, payload: payload(rng, big) },
        };
        m.apply(&op);
        ops.push(op);
    }
    ops
}
