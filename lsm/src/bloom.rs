//! A bloom filter per table, over user keys.
//!
//! On disk: `k` (u8, probes per key) followed by the bit array; bit `i` is
//! bit `i % 8` of byte `i / 8`. Probe `j` of a key with 64-bit xxh3 hash `h`
//! sets bit `(h + j * ((h >> 33) | 1)) mod m` (wrapping u64 arithmetic),
//! where `m` is the number of bits.

use xxhash_rust::xxh3::xxh3_64;

pub(crate) fn hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// Builds the filter bytes for these key hashes.
pub(crate) fn build(hashes: &[u64], bits_per_key: u32) -> Vec<u8> {
    if bits_per_key == 0 || hashes.is_empty() {
        return Vec::new();
    }
    // k = bits_per_key * ln 2, clamped.
    let k = ((bits_per_key as f64 * 0.69) as u32).clamp(1, 30) as u8;
    let bits = (hashes.len() as u64 * u64::from(bits_per_key)).max(64);
    let bytes = bits.div_ceil(8) as usize;
    let m = bytes as u64 * 8;
    let mut out = vec![0u8; bytes + 1];
    out[0] = k;
    for &h in hashes {
        let delta = (h >> 33) | 1;
        let mut x = h;
        for _ in 0..k {
            let bit = x % m;
            out[1 + (bit / 8) as usize] |= 1 << (bit % 8);
            x = x.wrapping_add(delta);
        }
    }
    out
}

/// A filter read back. An empty filter answers "maybe" for every key.
#[derive(Debug, Default)]
pub(crate) struct Bloom {
    data: Vec<u8>,
}

impl Bloom {
    /// Takes the filter bytes; a filter with `k` of 0 or above 30 is refused.
    pub(crate) fn new(data: Vec<u8>) -> Result<Bloom, String> {
        if let Some(&k) = data.first()
            && (k == 0 || k > 30 || data.len() < 2)
        {
            return Err(format!("bloom filter with {k} probes and {} bytes", data.len()));
        }
        Ok(Bloom { data })
    }

    pub(crate) fn may_contain(&self, h: u64) -> bool {
        if self.data.len() < 2 {
            return true;
        }
        let k = self.data[0];
        let bits = &self.data[1..];
        let m = bits.len() as u64 * 8;
        let delta = (h >> 33) | 1;
        let mut x = h;
        for _ in 0..k {
            let bit = x % m;
            if bits[(bit / 8) as usize] & (1 << (bit % 8)) == 0 {
                return false;
            }
            x = x.wrapping_add(delta);
        }
        true
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.data.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_few_false_positives() {
        let hashes: Vec<u64> = (0..10_000u32).map(|i| hash(&i.to_le_bytes())).collect();
        let f = Bloom::new(build(&hashes, 10)).expect("filter");
        assert!(hashes.iter().all(|&h| f.may_contain(h)));
        let fp = (10_000..110_000u32).filter(|i| f.may_contain(hash(&i.to_le_bytes()))).count();
        assert!(fp < 2_000, "false positive rate {} / 100000", fp);
    }
}
