//! The byte layout of segments and records (see `docs/design/wal.md`).
//!
//! ```text
//! segment = segment header (48 B) | record* | zero word | (zeros, or stale bytes of a recycled file)
//!
//! segment header, little-endian:
//!   0  magic "CAIRNWAL"      8 B
//!   8  format version        u32   (FORMAT_VERSION)
//!  12  header records bytes  u32   (bytes of the metadata, state and marker records
//!                                  that follow: damage there is never a torn tail)
//!  16  segment seq           u64
//!  24  first position        u64   (the position bound when the segment was cut, plus one;
//!                                  a truncation record inside the segment may lower it)
//!  32  salt                  u64   (random per segment file: with the seq, the record crc seed)
//!  40  previous chain crc    u32   (the chain value after the previous segment's last record)
//!  44  header crc            u32   (crc32c of bytes 0..44)
//!
//! record, 8-byte aligned, little-endian:
//!   0  length word           u64   bit 63 = 1 (never zero), bits 32..48 kind, bits 0..32 payload length,
//!                                  bits 48..63 zero
//!   8  position              u64
//!  16  record crc            u32   crc32c over bytes 0..16 and the payload, seeded by seq and salt
//!  20  chain crc             u32   crc32c(previous chain crc, record crc)
//!  24  payload, then zero padding to a multiple of 8
//! ```

/// The format version written in every segment header.
pub const FORMAT_VERSION: u32 = 1;
/// The magic bytes at the start of every segment.
pub const MAGIC: [u8; 8] = *b"CAIRNWAL";
/// Bytes of the segment header.
pub const SEGMENT_HEADER_BYTES: usize = 48;
/// Bytes of a record header (length word, position, record crc, chain crc).
pub const RECORD_HEADER_BYTES: usize = 24;
/// Every record starts at a multiple of this, so payloads are 8-byte aligned.
pub const ALIGN: usize = 8;
/// The largest payload a record may carry: 1 GiB, so that a segment's three
/// header records (metadata, state, marker) always fit the 32-bit header field.
pub const PAYLOAD_BYTES_MAX: u64 = 1 << 30;
/// The zero word written after the last record of every write: a clean end of
/// the log, even in a recycled segment whose old bytes follow it.
pub(crate) const TERMINATOR: [u8; ALIGN] = [0; ALIGN];

const _: () = assert!(SEGMENT_HEADER_BYTES.is_multiple_of(ALIGN));
const _: () = assert!(RECORD_HEADER_BYTES.is_multiple_of(ALIGN));

const VALID_BIT: u64 = 1 << 63;
const RESERVED_MASK: u64 = 0x7fff << 48;

/// Record kinds as stored. 0 is never valid; 1..16 are built in; 16.. are user kinds.
pub(crate) mod kind {
    pub(crate) const METADATA: u16 = 1;
    pub(crate) const STATE: u16 = 2;
    pub(crate) const SNAPSHOT_MARKER: u16 = 3;
    pub(crate) const TRUNCATE: u16 = 4;
    pub(crate) const USER_BASE: u16 = 16;
}

/// Rounds `n` up to a multiple of [`ALIGN`].
pub(crate) const fn align_up(n: usize) -> usize {
    (n + ALIGN - 1) & !(ALIGN - 1)
}

/// Total bytes of a record with a payload of `len` bytes.
pub(crate) const fn frame_bytes(len: usize) -> usize {
    RECORD_HEADER_BYTES + align_up(len)
}

/// The crc seed of a segment file: binds every record to the segment file it was
/// written in (its seq, and a salt drawn when the file was cut), so a record left
/// over from another segment, or from a recycled file, never validates here.
pub fn segment_seed(seq: u64, salt: u64) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&seq.to_le_bytes()), &salt.to_le_bytes())
}

/// A fresh salt for a new segment file.
pub(crate) fn new_salt(seq: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(seq);
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

/// The next chain value after a record whose own crc is `record_crc`.
pub(crate) fn chain_next(prev: u32, record_crc: u32) -> u32 {
    crc32c::crc32c_append(prev, &record_crc.to_le_bytes())
}

/// The decoded segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The segment's sequence number.
    pub seq: u64,
    /// The position bound when it was cut, plus one (a truncation record in the
    /// segment may let lower positions follow).
    pub first_position: u64,
    /// Random per segment file; with `seq`, the record crc seed.
    pub salt: u64,
    /// The chain value it continues from.
    pub prev_chain: u32,
    /// Bytes of the header records (metadata, state, marker) that follow the header.
    pub header_records_bytes: u32,
}

impl SegmentHeader {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.header_records_bytes.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.first_position.to_le_bytes());
        out.extend_from_slice(&self.salt.to_le_bytes());
        out.extend_from_slice(&self.prev_chain.to_le_bytes());
        let crc = crc32c::crc32c(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(out.len() - start, SEGMENT_HEADER_BYTES);
    }
}

/// Why a segment header was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer than [`SEGMENT_HEADER_BYTES`] bytes.
    Short,
    /// The magic bytes are wrong.
    BadMagic,
    /// The header checksum does not match.
    BadChecksum,
    /// A format version this build does not read.
    Version(u32),
}

/// Decodes a segment header from the start of `buf`.
pub fn decode_segment_header(buf: &[u8]) -> Result<SegmentHeader, HeaderError> {
    let h = buf.get(..SEGMENT_HEADER_BYTES).ok_or(HeaderError::Short)?;
    if h[0..8] != MAGIC {
        return Err(HeaderError::BadMagic);
    }
    if crc32c::crc32c(&h[..44]) != le_u32(h, 44) {
        return Err(HeaderError::BadChecksum);
    }
    let version = le_u32(h, 8);
    if version != FORMAT_VERSION {
        return Err(HeaderError::Version(version));
    }
    Ok(SegmentHeader {
        seq: le_u64(h, 16),
        first_position: le_u64(h, 24),
        salt: le_u64(h, 32),
        prev_chain: le_u32(h, 40),
        header_records_bytes: le_u32(h, 12),
    })
}

/// Appends one record frame to `out` (which must be 8-aligned in length) and
/// returns the new chain value.
pub(crate) fn encode_record(
    out: &mut Vec<u8>,
    seed: u32,
    prev_chain: u32,
    kind: u16,
    position: u64,
    payload: &[u8],
) -> u32 {
    assert_eq!(out.len() % ALIGN, 0, "records start 8-byte aligned");
    assert!(kind != 0 && payload.len() as u64 <= PAYLOAD_BYTES_MAX);
    let word = VALID_BIT | (u64::from(kind) << 32) | payload.len() as u64;
    let start = out.len();
    out.extend_from_slice(&word.to_le_bytes());
    out.extend_from_slice(&position.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c_append(seed, &out[start..start + 16]), payload);
    let chain = chain_next(prev_chain, crc);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&chain.to_le_bytes());
    out.extend_from_slice(payload);
    out.resize(start + frame_bytes(payload.len()), 0);
    chain
}

/// A record decoded from a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The stored kind.
    pub kind: u16,
    /// The record's position.
    pub position: u64,
    /// Offset of the payload in the buffer.
    pub payload_offset: usize,
    /// Payload length.
    pub payload_len: usize,
    /// The record's own crc.
    pub crc: u32,
    /// The chain value after this record.
    pub chain: u32,
    /// Offset just past the frame (8-aligned).
    pub end: usize,
}

/// What [`decode_record`] found at an offset.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A valid record.
    Record(Frame),
    /// A zero length word, or the end of the buffer: the clean end of the records.
    End,
    /// Bytes that are not a valid record.
    Damage(Damage),
}

/// Why bytes are not a valid record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Damage {
    /// The length word has the wrong shape (valid bit clear or reserved bits set).
    LengthWord,
    /// Kind 0 or a built-in kind this build does not know.
    Kind(u16),
    /// The frame runs past the end of the segment.
    PastEnd,
    /// The record's own checksum does not match.
    Checksum,
    /// The record is valid on its own but does not continue the chain.
    Chain,
    /// Fewer than 8 non-zero bytes at the end of the buffer.
    Trailing,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::LengthWord => f.write_str("malformed length word"),
            Damage::Kind(k) => write!(f, "unknown record kind {k}"),
            Damage::PastEnd => f.write_str("record runs past the end of the segment"),
            Damage::Checksum => f.write_str("record checksum mismatch"),
            Damage::Chain => f.write_str("record does not continue the checksum chain"),
            Damage::Trailing => f.write_str("stray bytes after the last record"),
        }
    }
}

fn known_kind(k: u16) -> bool {
    (kind::METADATA..=kind::TRUNCATE).contains(&k) || k >= kind::USER_BASE
}

/// Decodes the record at `offset` (8-aligned) of `buf`. `seed` is the segment's
/// seed, `prev_chain` the chain value before this record. Never panics.
pub fn decode_record(buf: &[u8], offset: usize, seed: u32, prev_chain: u32) -> Decoded {
    debug_assert_eq!(offset % ALIGN, 0);
    let rest = buf.get(offset..).unwrap_or_default();
    if rest.len() < ALIGN {
        return if rest.iter().all(|&b| b == 0) { Decoded::End } else { Decoded::Damage(Damage::Trailing) };
    }
    let word = le_u64(rest, 0);
    if word == 0 {
        return Decoded::End;
    }
    match check_alone(rest, seed) {
        Err(d) => Decoded::Damage(d),
        Ok(mut frame) => {
            if frame.chain != chain_next(prev_chain, frame.crc) {
                return Decoded::Damage(Damage::Chain);
            }
            frame.payload_offset += offset;
            frame.end += offset;
            Decoded::Record(frame)
        }
    }
}

/// Checks the record at the start of `rest` on its own (not the chain).
fn check_alone(rest: &[u8], seed: u32) -> Result<Frame, Damage> {
    if rest.len() < RECORD_HEADER_BYTES {
        return Err(Damage::PastEnd);
    }
    let word = le_u64(rest, 0);
    if word & VALID_BIT == 0 || word & RESERVED_MASK != 0 {
        return Err(Damage::LengthWord);
    }
    let kind = ((word >> 32) & 0xffff) as u16;
    if !known_kind(kind) {
        return Err(Damage::Kind(kind));
    }
    let len = (word & 0xffff_ffff) as usize;
    let end = RECORD_HEADER_BYTES.checked_add(align_up(len)).ok_or(Damage::PastEnd)?;
    if end > rest.len() {
        return Err(Damage::PastEnd);
    }
    let payload = &rest[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + len];
    let crc = crc32c::crc32c_append(crc32c::crc32c_append(seed, &rest[..16]), payload);
    if crc != le_u32(rest, 16) {
        return Err(Damage::Checksum);
    }
    Ok(Frame {
        kind,
        position: le_u64(rest, 8),
        payload_offset: RECORD_HEADER_BYTES,
        payload_len: len,
        crc,
        chain: le_u32(rest, 20),
        end,
    })
}

/// Checks the record at `offset` on its own (not the chain); offsets in the
/// returned frame are relative to `buf`.
pub(crate) fn check_record(buf: &[u8], offset: usize, seed: u32) -> Option<Frame> {
    let mut f = check_alone(buf.get(offset..)?, seed).ok()?;
    f.payload_offset += offset;
    f.end += offset;
    Some(f)
}

/// Whether any record valid on its own (for this segment's seed) starts at an
/// 8-aligned offset at or after `from`: used to tell a torn tail (nothing valid
/// follows) from damage in the middle of the log.
pub(crate) fn valid_record_after(buf: &[u8], from: usize, seed: u32) -> Option<usize> {
    let mut off = align_up(from);
    while off + RECORD_HEADER_BYTES <= buf.len() {
        if check_alone(&buf[off..], seed).is_ok() {
            return Some(off);
        }
        off += ALIGN;
    }
    None
}

/// Little-endian u64 at `at`; callers have checked the bounds.
pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Little-endian u32 at `at`; callers have checked the bounds.
pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// The file name of segment `seq` whose first position is `first`.
pub fn segment_name(seq: u64, first: u64) -> String {
    format!("{seq:016x}-{first:016x}.wal")
}

/// The name a released segment waits under until it is recycled.
pub(crate) fn spare_name(seq: u64) -> String {
    format!("{seq:016x}.wal.spare")
}

/// The temporary name a segment is prepared under.
pub(crate) fn prepared_name(seq: u64) -> String {
    format!("{seq:016x}.wal.tmp")
}

/// The `seq` of a prepared segment's name (see [`prepared_name`]).
pub(crate) fn parse_prepared_name(name: &str) -> Option<u64> {
    let seq = name.strip_suffix(".wal.tmp")?;
    if seq.len() != 16 {
        return None;
    }
    u64::from_str_radix(seq, 16).ok()
}

/// Parses `{seq:016x}-{first:016x}.wal`.
pub(crate) fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".wal")?;
    let (seq, first) = stem.split_once('-')?;
    if seq.len() != 16 || first.len() != 16 {
        return None;
    }
    Some((u64::from_str_radix(seq, 16).ok()?, u64::from_str_radix(first, 16).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_alignment() {
        let mut buf = Vec::new();
        let seed = segment_seed(7, 1);
        let c1 = encode_record(&mut buf, seed, 5, kind::USER_BASE, 42, b"hello");
        let c2 = encode_record(&mut buf, seed, c1, kind::STATE, 0, b"");
        assert_eq!(buf.len(), frame_bytes(5) + frame_bytes(0));
        let Decoded::Record(f) = decode_record(&buf, 0, seed, 5) else { panic!("first record") };
        assert_eq!((f.kind, f.position, &buf[f.payload_offset..][..f.payload_len]), (16, 42, &b"hello"[..]));
        assert_eq!(f.payload_offset % ALIGN, 0);
        let Decoded::Record(g) = decode_record(&buf, f.end, seed, c1) else { panic!("second record") };
        assert_eq!(g.chain, c2);
        assert_eq!(decode_record(&buf, g.end, seed, c2), Decoded::End);
        // Another segment's seed, or a broken chain, is refused.
        assert_eq!(decode_record(&buf, 0, segment_seed(7, 2), 5), Decoded::Damage(Damage::Checksum));
        assert_eq!(decode_record(&buf, 0, seed, 6), Decoded::Damage(Damage::Chain));
    }

    #[test]
    fn header_round_trip() {
        let h = SegmentHeader { seq: 3, first_position: 99, salt: 5, prev_chain: 0xdead, header_records_bytes: 32 };
        let mut buf = Vec::new();
        h.encode(&mut buf);
        assert_eq!(decode_segment_header(&buf), Ok(h));
        buf[17] ^= 1;
        assert_eq!(decode_segment_header(&buf), Err(HeaderError::BadChecksum));
    }

    #[test]
    fn names() {
        assert_eq!(parse_segment_name(&segment_name(1, 0xabc)), Some((1, 0xabc)));
        assert_eq!(parse_segment_name("0000000000000001.wal.tmp"), None);
        assert_eq!(parse_segment_name("x-y.wal"), None);
        assert_eq!(parse_prepared_name(&prepared_name(0x1f)), Some(0x1f));
        assert_eq!(parse_prepared_name(&spare_name(1)), None);
        assert_eq!(parse_prepared_name("x.wal.tmp"), None);
    }
}
