//! A plain model of the engine for property tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ops::Bound;

/// The expected contents.
pub(crate) type Model = BTreeMap<Vec<u8>, Vec<u8>>;

/// Keys in a small space, so operations collide.
pub(crate) fn key(i: u8) -> Vec<u8> {
    format!("k{:02}", i % 48).into_bytes()
}

/// The model's answer to a scan.
pub(crate) fn scan(m: &Model, lo: Option<u8>, hi: Option<u8>, forward: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
    let lo = lo.map_or(Bound::Unbounded, |l| Bound::Included(key(l)));
    let hi = hi.map_or(Bound::Unbounded, |h| Bound::Excluded(key(h)));
    if let (Bound::Included(l), Bound::Excluded(h)) = (&lo, &hi)
        && l >= h
    {
        return Vec::new();
    }
    let v: Vec<_> = m.range::<Vec<u8>, _>((lo, hi)).map(|(k, v)| (k.clone(), v.clone())).collect();
    if forward { v } else { v.into_iter().rev().collect() }
}

pub(crate) fn delete_range(m: &mut Model, a: &[u8], b: &[u8]) {
    let doomed: Vec<Vec<u8>> =
        m.range::<[u8], _>((Bound::Included(a), Bound::Excluded(b))).map(|(k, _)| k.clone()).collect();
    for k in doomed {
        m.remove(&k);
    }
}
