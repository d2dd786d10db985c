//! Blocks: prefix-compressed entries with restart points, and the trailer
//! (compression, uncompressed length, crc32c) every block on disk carries.
//!
//! Uncompressed block (see `docs/design/lsm.md`):
//!
//! ```text
//! entry*: shared varint | unshared varint | value_len varint | key[shared..] | value
//! restart offsets: u32 LE each (entry offsets whose shared length is 0)
//! restart count:   u32 LE
//! ```
//!
//! A key in a block is an *internal key*: the user key followed by its 8-byte
//! little-endian trailer (`seq << 8 | kind`).

use std::cmp::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use crate::options::Compression;
use crate::types::cmp_internal;

/// Bytes after each block payload on disk: compression type u8,
/// uncompressed length u32 LE, crc32c u32 LE of payload + the first 5 bytes.
pub(crate) const TRAILER_BYTES: usize = 9;
const COMPRESSION_NONE: u8 = 0;
const COMPRESSION_ZSTD: u8 = 1;
const COMPRESSION_LZ4: u8 = 2;
/// Bytes of the trailer of an internal key.
pub(crate) const KEY_TRAILER_BYTES: usize = 8;

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Decodes a LEB128 varint at `*pos`; `None` if truncated or longer than 10 bytes.
pub(crate) fn get_varint(data: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *data.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

thread_local! {
    /// One zstd compression context per thread and level, reused: making a
    /// context costs more than compressing a 4 KiB block.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn compress_zstd(raw: &[u8], out: &mut [u8], level: i32) -> Option<usize> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, comp) = c.as_mut()?;
        comp.compress_to_buffer(raw, out).ok()
    })
}

fn decompress_zstd(data: &[u8], out: &mut [u8]) -> Result<usize, String> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new().map_err(|e| format!("zstd context: {e}"))?);
        }
        let dec = d.as_mut().ok_or("zstd context")?;
        dec.decompress_to_buffer(data, out).map_err(|e| format!("zstd block does not decompress: {e}"))
    })
}

/// Builds one uncompressed block.
#[derive(Debug)]
pub(crate) struct BlockBuilder {
    buf: Vec<u8>,
    restarts: Vec<u32>,
    restart_interval: usize,
    since_restart: usize,
    last_key: Vec<u8>,
    entries: usize,
}

impl BlockBuilder {
    pub(crate) fn new(restart_interval: usize) -> Self {
        BlockBuilder {
            buf: Vec::new(),
            restarts: Vec::new(),
            restart_interval: restart_interval.max(1),
            since_restart: 0,
            last_key: Vec::new(),
            entries: 0,
        }
    }

    /// Adds an entry; `key` is the internal key (user key + trailer).
    pub(crate) fn add(&mut self, key: &[u8], value: &[u8]) {
        let shared = if self.since_restart == 0 || self.since_restart >= self.restart_interval {
            self.restarts.push(self.buf.len() as u32);
            self.since_restart = 0;
            0
        } else {
            self.last_key.iter().zip(key).take_while(|(a, b)| a == b).count()
        };
        put_varint(&mut self.buf, shared as u64);
        put_varint(&mut self.buf, (key.len() - shared) as u64);
        put_varint(&mut self.buf, value.len() as u64);
        self.buf.extend_from_slice(&key[shared..]);
        self.buf.extend_from_slice(value);
        self.last_key.clear();
        self.last_key.extend_from_slice(key);
        self.since_restart += 1;
        self.entries += 1;
    }

    pub(crate) fn estimated_bytes(&self) -> usize {
        self.buf.len() + 4 * self.restarts.len() + 4
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries == 0
    }

    pub(crate) fn last_key(&self) -> &[u8] {
        &self.last_key
    }

    /// Finishes the block into `out` (cleared first) and resets the builder.
    pub(crate) fn finish_into(&mut self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.buf);
        for r in &self.restarts {
            out.extend_from_slice(&r.to_le_bytes());
        }
        out.extend_from_slice(&(self.restarts.len() as u32).to_le_bytes());
        self.buf.clear();
        self.restarts.clear();
        self.since_restart = 0;
        self.last_key.clear();
        self.entries = 0;
    }
}

/// Appends `raw` to `out` as a block on disk (compressed if that shrinks it)
/// and returns the payload length (without the trailer).
pub(crate) fn write_block(out: &mut Vec<u8>, raw: &[u8], compression: Compression, scratch: &mut Vec<u8>) -> u32 {
    let start = out.len();
    let mut kind = COMPRESSION_NONE;
    if let Compression::Zstd(level) = compression {
        scratch.clear();
        let bound = zstd::zstd_safe::compress_bound(raw.len());
        scratch.resize(bound, 0);
        if let Some(n) = compress_zstd(raw, &mut scratch[..], level)
            && n < raw.len() - raw.len() / 8
        {
            out.extend_from_slice(&scratch[..n]);
            kind = COMPRESSION_ZSTD;
        }
    }
    if compression == Compression::Lz4 {
        scratch.clear();
        scratch.resize(lz4_flex::block::get_maximum_output_size(raw.len()), 0);
        if let Ok(n) = lz4_flex::block::compress_into(raw, &mut scratch[..])
            && n < raw.len() - raw.len() / 8
        {
            out.extend_from_slice(&scratch[..n]);
            kind = COMPRESSION_LZ4;
        }
    }
    if kind == COMPRESSION_NONE {
        out.extend_from_slice(raw);
    }
    let payload_len = out.len() - start;
    out.push(kind);
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
    payload_len as u32
}

/// Checks and decompresses a block read from disk (`buf` = payload + trailer).
/// The error says what is wrong; the caller names the file and offset.
pub(crate) fn read_block(buf: &[u8], uncompressed_max: usize) -> Result<Bytes, String> {
    if buf.len() < TRAILER_BYTES {
        return Err(format!("block of {} bytes is shorter than its trailer", buf.len()));
    }
    let payload_len = buf.len() - TRAILER_BYTES;
    let t = &buf[payload_len..];
    let stored = u32::from_le_bytes([t[5], t[6], t[7], t[8]]);
    let crc = crc32c::crc32c(&buf[..payload_len + 5]);
    if crc != stored {
        return Err(format!("block checksum mismatch (stored {stored:08x}, computed {crc:08x})"));
    }
    let raw_len = u32::from_le_bytes([t[1], t[2], t[3], t[4]]) as usize;
    match t[0] {
        COMPRESSION_NONE => {
            if raw_len != payload_len {
                return Err(format!("uncompressed block says {raw_len} bytes but holds {payload_len}"));
            }
            Ok(Bytes::copy_from_slice(&buf[..payload_len]))
        }
        COMPRESSION_ZSTD => {
            if raw_len > uncompressed_max {
                return Err(format!("block claims {raw_len} uncompressed bytes, above the bound {uncompressed_max}"));
            }
            let mut out = vec![0u8; raw_len];
            let n = decompress_zstd(&buf[..payload_len], &mut out[..])?;
            if n != raw_len {
                return Err(format!("zstd block decompressed to {n} bytes, header says {raw_len}"));
            }
            Ok(Bytes::from(out))
        }
        COMPRESSION_LZ4 => {
            if raw_len > uncompressed_max {
                return Err(format!("block claims {raw_len} uncompressed bytes, above the bound {uncompressed_max}"));
            }
            let mut out = vec![0u8; raw_len];
            let n = lz4_flex::block::decompress_into(&buf[..payload_len], &mut out[..])
                .map_err(|e| format!("lz4 block does not decompress: {e}"))?;
            if n != raw_len {
                return Err(format!("lz4 block decompressed to {n} bytes, header says {raw_len}"));
            }
            Ok(Bytes::from(out))
        }
        k => Err(format!("unknown block compression type {k}")),
    }
}

/// A decoded (uncompressed, checked) block.
#[derive(Debug)]
pub(crate) struct Block {
    data: Bytes,
    restarts_at: usize,
    restart_count: usize,
}

impl Block {
    /// Parses the restart array; entries are checked as they are read.
    pub(crate) fn new(data: Bytes) -> Result<Block, String> {
        let n = data.len();
        if n < 4 {
            return Err("block shorter than its restart count".into());
        }
        let count = u32::from_le_bytes([data[n - 4], data[n - 3], data[n - 2], data[n - 1]]) as usize;
        let restarts_bytes = count.checked_mul(4).ok_or("restart count overflows")?;
        if restarts_bytes > n - 4 {
            return Err(format!("restart count {count} does not fit in a block of {n} bytes"));
        }
        let restarts_at = n - 4 - restarts_bytes;
        let b = Block { data, restarts_at, restart_count: count };
        for i in 0..count {
            if b.restart(i) as usize >= restarts_at {
                return Err(format!("restart point {i} lies outside the entries"));
            }
        }
        if count == 0 && restarts_at > 0 {
            return Err("block has entries but no restart point".into());
        }
        Ok(b)
    }

    /// Bytes held in memory (for the cache's weight).
    pub(crate) fn memory_bytes(&self) -> usize {
        self.data.len() + 64
    }

    fn restart(&self, i: usize) -> u32 {
        let p = self.restarts_at + 4 * i;
        u32::from_le_bytes([self.data[p], self.data[p + 1], self.data[p + 2], self.data[p + 3]])
    }

    /// The key of restart point `i`, in place.
    fn restart_key(&self, i: usize) -> Result<&[u8], String> {
        let d = &self.data[..self.restarts_at];
        let pos = self.restart(i) as usize;
        let mut p = pos;
        let bad = || format!("restart entry at block offset {pos} is truncated");
        let shared = get_varint(d, &mut p).ok_or_else(bad)?;
        let unshared = get_varint(d, &mut p).ok_or_else(bad)? as usize;
        get_varint(d, &mut p).ok_or_else(bad)?;
        if shared != 0 {
            return Err(format!("restart entry at block offset {pos} shares {shared} bytes"));
        }
        let end = p.checked_add(unshared).filter(|&e| e <= d.len()).ok_or_else(bad)?;
        if unshared < KEY_TRAILER_BYTES + 1 {
            return Err(format!("restart entry at block offset {pos} has a key of {unshared} bytes"));
        }
        Ok(&d[p..end])
    }

    /// Decodes the entry at `pos` given the previous key; returns the next position.
    fn decode_at(&self, pos: usize, key: &mut Vec<u8>) -> Result<(usize, std::ops::Range<usize>), String> {
        let d = &self.data[..self.restarts_at];
        let mut p = pos;
        let bad = || format!("entry at block offset {pos} is truncated");
        let shared = get_varint(d, &mut p).ok_or_else(bad)? as usize;
        let unshared = get_varint(d, &mut p).ok_or_else(bad)? as usize;
        let vlen = get_varint(d, &mut p).ok_or_else(bad)? as usize;
        if shared > key.len() {
            return Err(format!("entry at block offset {pos} shares {shared} bytes of a {}-byte key", key.len()));
        }
        let kend = p.checked_add(unshared).ok_or_else(bad)?;
        let vend = kend.checked_add(vlen).ok_or_else(bad)?;
        if vend > d.len() {
            return Err(bad());
        }
        key.truncate(shared);
        key.extend_from_slice(&d[p..kend]);
        if key.len() < KEY_TRAILER_BYTES + 1 {
            return Err(format!("entry at block offset {pos} has a key of {} bytes", key.len()));
        }
        Ok((vend, kend..vend))
    }

    /// The value bytes at `range` (shared with the block, no copy).
    pub(crate) fn value(&self, range: std::ops::Range<usize>) -> Bytes {
        self.data.slice(range)
    }
}

/// Splits an internal key into user key and trailer.
pub(crate) fn split_internal(key: &[u8]) -> (&[u8], u64) {
    let n = key.len() - KEY_TRAILER_BYTES;
    let mut t = [0u8; 8];
    t.copy_from_slice(&key[n..]);
    (&key[..n], u64::from_le_bytes(t))
}

/// Appends the internal key of (`user`, `trailer`) to `out`.
pub(crate) fn make_internal(out: &mut Vec<u8>, user: &[u8], trailer: u64) {
    out.extend_from_slice(user);
    out.extend_from_slice(&trailer.to_le_bytes());
}

/// A cursor over one block's entries, forward.
#[derive(Debug)]
pub(crate) struct BlockIter {
    block: Arc<Block>,
    next_pos: usize,
    key: Vec<u8>,
    value: std::ops::Range<usize>,
}

impl BlockIter {
    pub(crate) fn new(block: Arc<Block>) -> Self {
        BlockIter { block, next_pos: 0, key: Vec::new(), value: 0..0 }
    }

    /// Like `new`, decoding keys into `key` (a reused buffer).
    pub(crate) fn with_key_buffer(block: Arc<Block>, mut key: Vec<u8>) -> Self {
        key.clear();
        BlockIter { block, next_pos: 0, key, value: 0..0 }
    }

    /// Gives the key buffer back for reuse.
    pub(crate) fn into_key_buffer(self) -> Vec<u8> {
        self.key
    }

    /// Moves to the next entry; false at the end.
    pub(crate) fn advance(&mut self) -> Result<bool, String> {
        if self.next_pos >= self.block.restarts_at {
            return Ok(false);
        }
        let (next, v) = self.block.decode_at(self.next_pos, &mut self.key)?;
        self.next_pos = next;
        self.value = v;
        Ok(true)
    }

    /// The current internal key.
    pub(crate) fn key(&self) -> &[u8] {
        &self.key
    }

    pub(crate) fn value(&self) -> Bytes {
        self.block.value(self.value.clone())
    }

    /// Positions so that the next `advance` lands on the first entry whose
    /// internal key is at or after (`user`, `trailer`); returns whether such an
    /// entry exists (then it is the current one).
    pub(crate) fn seek(&mut self, user: &[u8], trailer: u64) -> Result<bool, String> {
        // Binary search the restart points: the last restart whose key < target.
        // A restart entry shares nothing, so its key is read in place.
        let (mut lo, mut hi) = (0usize, self.block.restart_count);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let k = self.block.restart_key(mid)?;
            let (ku, kt) = split_internal(k);
            if cmp_internal(ku, kt, user, trailer) == Ordering::Less {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        self.next_pos = if lo == 0 { 0 } else { self.block.restart(lo - 1) as usize };
        self.key.clear();
        while self.advance()? {
            let (ku, kt) = split_internal(&self.key);
            if cmp_internal(ku, kt, user, trailer) != Ordering::Less {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Every entry of the block, in order (for backward iteration).
    pub(crate) fn collect_all(block: &Arc<Block>) -> Result<Vec<(Vec<u8>, Bytes)>, String> {
        let mut it = BlockIter::new(Arc::clone(block));
        let mut out = Vec::new();
        while it.advance()? {
            out.push((it.key.clone(), it.value()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ik(user: &str, seq: u64) -> Vec<u8> {
        let mut v = Vec::new();
        make_internal(&mut v, user.as_bytes(), seq << 8 | 1);
        v
    }

    #[test]
    fn build_seek_and_iterate() {
        let mut b = BlockBuilder::new(3);
        let keys: Vec<String> = (0..50).map(|i| format!("key{i:04}")).collect();
        for k in &keys {
            b.add(&ik(k, 7), k.as_bytes());
        }
        let mut raw = Vec::new();
        b.finish_into(&mut raw);
        for c in [Compression::None, Compression::Lz4, Compression::Zstd(3)] {
            let mut disk = Vec::new();
            let mut scratch = Vec::new();
            write_block(&mut disk, &raw, c, &mut scratch);
            let back = read_block(&disk, 1 << 20).expect("read");
            let block = Arc::new(Block::new(back).expect("block"));
            let mut it = BlockIter::new(Arc::clone(&block));
            let mut n = 0;
            while it.advance().expect("advance") {
                let (u, _) = split_internal(it.key());
                assert_eq!(u, keys[n].as_bytes());
                assert_eq!(&it.value()[..], keys[n].as_bytes());
                n += 1;
            }
            assert_eq!(n, 50);
            let mut it = BlockIter::new(Arc::clone(&block));
            assert!(it.seek(b"key0021", u64::MAX).expect("seek"));
            assert_eq!(split_internal(it.key()).0, b"key0021");
            assert!(it.seek(b"key00215", u64::MAX).expect("seek"));
            assert_eq!(split_internal(it.key()).0, b"key0022");
            assert!(!it.seek(b"zzz", u64::MAX).expect("seek"));
        }
    }

    #[test]
    fn damage_is_an_error() {
        let mut b = BlockBuilder::new(2);
        b.add(&ik("a", 1), b"x");
        let mut raw = Vec::new();
        b.finish_into(&mut raw);
        let mut disk = Vec::new();
        write_block(&mut disk, &raw, Compression::None, &mut Vec::new());
        for i in 0..disk.len() {
            let mut d = disk.clone();
            d[i] ^= 0x10;
            assert!(read_block(&d, 1 << 20).is_err(), "flip at {i} not caught");
        }
    }
}
