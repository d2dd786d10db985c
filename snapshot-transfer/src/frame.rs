//! The frames a transfer exchanges, and their byte encoding.
//!
//! ```text
//! frame  = body length u32 | version u8 (FRAME_VERSION) | type u8 | check u32 | body   (little-endian)
//!          check = low 32 bits of xxh3-64 over the type byte and the body: a frame
//!          damaged on the way is refused as a whole, never half-believed
//!
//! Offer  (1) transfer id u64 | index u64 | term u64 | window bytes u32 | file count u32 |
//!            per file: name length u16 | name | length u64 | xxh3 u64
//! Have   (2) transfer id u64 | file count u32 | per file: durable offset u64
//! Chunk  (3) transfer id u64 | file u32 | offset u64 | raw length u32 | encoding u8 |
//!            raw xxh3 u64 | data length u32 | data
//! Ack    (4) transfer id u64 | file u32 | durable offset u64
//! Nack   (5) transfer id u64 | file u32 | offset u64 | reason u8
//! Done   (6) transfer id u64
//! Reject (7) transfer id u64 | reason u8 | message length u16 | message
//! Abort  (8) transfer id u64
//! ```

use crate::error::FrameError;

/// The version byte of every frame.
pub const FRAME_VERSION: u8 = 1;
/// Bytes before a frame's body: length, version, type, check.
pub const FRAME_HEADER_BYTES: usize = 10;
/// The most files a transfer manifest may list.
pub const FILES_MAX: usize = 1 << 16;
/// The longest file name.
pub const NAME_BYTES_MAX: usize = 255;

/// One file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMeta {
    /// File name inside the checkpoint directory (no path separators).
    pub name: String,
    /// Length in bytes.
    pub len: u64,
    /// xxh3-64 of the whole file.
    pub checksum: u64,
}

/// The transfer manifest: what is moved, at which Raft index and term.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Chosen by the sender; a restarted sender may choose another.
    pub transfer_id: u64,
    /// Raft index the checkpoint holds the state at.
    pub index: u64,
    /// Raft term of that index.
    pub term: u64,
    /// The files.
    pub files: Vec<FileMeta>,
}

impl Manifest {
    /// Whether two manifests describe the same checkpoint (ids aside).
    pub fn same_checkpoint(&self, other: &Manifest) -> bool {
        self.index == other.index && self.term == other.term && self.files == other.files
    }

    /// Total bytes of the files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.len).sum()
    }
}

/// How a chunk's data is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// The raw bytes.
    Raw,
    /// zstd-compressed raw bytes.
    Zstd,
}

/// Why a chunk was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NackReason {
    /// The data did not match its checksum (or did not decompress).
    Checksum,
    /// A whole file did not match the manifest checksum after it was written.
    FileChecksum,
}

/// Why a transfer was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// The receiver is taking a newer checkpoint.
    Superseded,
    /// The frame names a transfer the receiver does not know.
    UnknownTransfer,
    /// The frame breaks the protocol (a file or range outside the manifest).
    Protocol,
    /// The receiver failed to write (its disk); the transfer cannot go on.
    ReceiverIo,
    /// A file arrived whole (every chunk matched its checksum) and failed
    /// the manifest's checksum too many times: the sender's file is not what
    /// its manifest says.
    FileChecksum,
}

/// A frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Sender: this is what I send, and my window.
    Offer {
        /// The transfer manifest.
        manifest: Manifest,
        /// Raw bytes the sender keeps unacknowledged at most.
        window_bytes: u32,
    },
    /// Receiver: the durable offset I hold of every file (its length: complete).
    Have {
        /// The transfer.
        transfer_id: u64,
        /// One offset per manifest file, in manifest order.
        durable: Vec<u64>,
    },
    /// Sender: bytes of a file.
    Chunk {
        /// The transfer.
        transfer_id: u64,
        /// Index of the file in the manifest.
        file: u32,
        /// Where the bytes go in the file.
        offset: u64,
        /// Bytes after decoding.
        raw_len: u32,
        /// How `data` is encoded.
        encoding: Encoding,
        /// xxh3-64 of the raw bytes.
        raw_checksum: u64,
        /// The encoded bytes.
        data: Vec<u8>,
    },
    /// Receiver: the file is durable up to `durable`.
    Ack {
        /// The transfer.
        transfer_id: u64,
        /// File index.
        file: u32,
        /// Durable prefix of the file.
        durable: u64,
    },
    /// Receiver: send the file again from `offset`.
    Nack {
        /// The transfer.
        transfer_id: u64,
        /// File index.
        file: u32,
        /// Where to resend from.
        offset: u64,
        /// Why.
        reason: NackReason,
    },
    /// Receiver: every file is verified and durable.
    Done {
        /// The transfer.
        transfer_id: u64,
    },
    /// Receiver: no.
    Reject {
        /// The transfer refused.
        transfer_id: u64,
        /// Why, as a code.
        reason: RejectReason,
        /// Why, for people.
        message: String,
    },
    /// Sender: stop (a newer checkpoint supersedes this one).
    Abort {
        /// The transfer.
        transfer_id: u64,
    },
}

fn put_u16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Offer { .. } => 1,
            Frame::Have { .. } => 2,
            Frame::Chunk { .. } => 3,
            Frame::Ack { .. } => 4,
            Frame::Nack { .. } => 5,
            Frame::Done { .. } => 6,
            Frame::Reject { .. } => 7,
            Frame::Abort { .. } => 8,
        }
    }

    /// The transfer the frame belongs to.
    pub fn transfer_id(&self) -> u64 {
        match self {
            Frame::Offer { manifest, .. } => manifest.transfer_id,
            Frame::Have { transfer_id, .. }
            | Frame::Chunk { transfer_id, .. }
            | Frame::Ack { transfer_id, .. }
            | Frame::Nack { transfer_id, .. }
            | Frame::Done { transfer_id }
            | Frame::Reject { transfer_id, .. }
            | Frame::Abort { transfer_id } => *transfer_id,
        }
    }

    /// Bytes of the encoded body.
    pub fn body_len(&self) -> usize {
        match self {
            Frame::Offer { manifest, .. } => 32 + manifest.files.iter().map(|f| 18 + f.name.len()).sum::<usize>(),
            Frame::Have { durable, .. } => 12 + 8 * durable.len(),
            Frame::Chunk { data, .. } => 37 + data.len(),
            Frame::Ack { .. } => 20,
            Frame::Nack { .. } => 21,
            Frame::Done { .. } | Frame::Abort { .. } => 8,
            Frame::Reject { message, .. } => 11 + message.len().min(u16::MAX as usize),
        }
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.reserve(FRAME_HEADER_BYTES + self.body_len());
        out.extend_from_slice(&[0; 4]);
        out.push(FRAME_VERSION);
        out.push(self.kind());
        out.extend_from_slice(&[0; 4]);
        match self {
            Frame::Offer { manifest, window_bytes } => {
                put_u64(out, manifest.transfer_id);
                put_u64(out, manifest.index);
                put_u64(out, manifest.term);
                put_u32(out, *window_bytes);
                put_u32(out, manifest.files.len() as u32);
                for f in &manifest.files {
                    put_u16(out, f.name.len() as u16);
                    out.extend_from_slice(f.name.as_bytes());
                    put_u64(out, f.len);
                    put_u64(out, f.checksum);
                }
            }
            Frame::Have { transfer_id, durable } => {
                put_u64(out, *transfer_id);
                put_u32(out, durable.len() as u32);
                durable.iter().for_each(|d| put_u64(out, *d));
            }
            Frame::Chunk { transfer_id, file, offset, raw_len, encoding, raw_checksum, data } => {
                put_u64(out, *transfer_id);
                put_u32(out, *file);
                put_u64(out, *offset);
                put_u32(out, *raw_len);
                out.push(match encoding {
                    Encoding::Raw => 0,
                    Encoding::Zstd => 1,
                });
                put_u64(out, *raw_checksum);
                put_u32(out, data.len() as u32);
                out.extend_from_slice(data);
            }
            Frame::Ack { transfer_id, file, durable } => {
                put_u64(out, *transfer_id);
                put_u32(out, *file);
                put_u64(out, *durable);
            }
            Frame::Nack { transfer_id, file, offset, reason } => {
                put_u64(out, *transfer_id);
                put_u32(out, *file);
                put_u64(out, *offset);
                out.push(match reason {
                    NackReason::Checksum => 0,
                    NackReason::FileChecksum => 1,
                });
            }
            Frame::Done { transfer_id } | Frame::Abort { transfer_id } => put_u64(out, *transfer_id),
            Frame::Reject { transfer_id, reason, message } => {
                put_u64(out, *transfer_id);
                out.push(match reason {
                    RejectReason::Superseded => 0,
                    RejectReason::UnknownTransfer => 1,
                    RejectReason::Protocol => 2,
                    RejectReason::ReceiverIo => 3,
                    RejectReason::FileChecksum => 4,
                });
                let m = &message.as_bytes()[..message.len().min(u16::MAX as usize)];
                put_u16(out, m.len() as u16);
                out.extend_from_slice(m);
            }
        }
        let body = out.len() - start - FRAME_HEADER_BYTES;
        debug_assert_eq!(body, self.body_len());
        out[start..start + 4].copy_from_slice(&(body as u32).to_le_bytes());
        let check = frame_check(out[start + 5], &out[start + FRAME_HEADER_BYTES..]);
        out[start + 6..start + 10].copy_from_slice(&check.to_le_bytes());
    }

    /// Encodes the frame into a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Decodes one frame from the start of `buf`; returns it and the bytes it
    /// took, `Ok(None)` if `buf` holds only part of a frame, or an error for
    /// bytes that are not a frame. `body_bytes_max` bounds what a peer can make
    /// us buffer. Never panics.
    pub fn decode(buf: &[u8], body_bytes_max: usize) -> Result<Option<(Frame, usize)>, FrameError> {
        let Some(head) = buf.get(..FRAME_HEADER_BYTES) else { return Ok(None) };
        let body_len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if head[4] != FRAME_VERSION {
            return Err(FrameError::Version(head[4]));
        }
        if body_len > body_bytes_max {
            return Err(FrameError::TooLarge { len: body_len, max: body_bytes_max });
        }
        let Some(body) = buf.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + body_len) else { return Ok(None) };
        if frame_check(head[5], body) != u32::from_le_bytes([head[6], head[7], head[8], head[9]]) {
            return Err(FrameError::Checksum);
        }
        let mut r = Reader { b: body };
        let frame = match head[5] {
            1 => {
                let (transfer_id, index, term) = (r.u64()?, r.u64()?, r.u64()?);
                let window_bytes = r.u32()?;
                let n = r.u32()? as usize;
                if n > FILES_MAX {
                    return Err(FrameError::Invalid("too many files"));
                }
                let mut files = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    let name_len = r.u16()? as usize;
                    let name = std::str::from_utf8(r.bytes(name_len)?)
                        .map_err(|_| FrameError::Invalid("file name is not UTF-8"))?;
                    check_name(name)?;
                    files.push(FileMeta { name: name.to_string(), len: r.u64()?, checksum: r.u64()? });
                }
                let mut names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
                names.sort_unstable();
                if names.windows(2).any(|w| w[0] == w[1]) {
                    return Err(FrameError::Invalid("a file name appears twice"));
                }
                Frame::Offer { manifest: Manifest { transfer_id, index, term, files }, window_bytes }
            }
            2 => {
                let transfer_id = r.u64()?;
                let n = r.u32()? as usize;
                if n > FILES_MAX {
                    return Err(FrameError::Invalid("too many files"));
                }
                let mut durable = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    durable.push(r.u64()?);
                }
                Frame::Have { transfer_id, durable }
            }
            3 => {
                let (transfer_id, file, offset, raw_len) = (r.u64()?, r.u32()?, r.u64()?, r.u32()?);
                let encoding = match r.u8()? {
                    0 => Encoding::Raw,
                    1 => Encoding::Zstd,
                    _ => return Err(FrameError::Invalid("unknown chunk encoding")),
                };
                let raw_checksum = r.u64()?;
                let len = r.u32()? as usize;
                let data = r.bytes(len)?.to_vec();
                if encoding == Encoding::Raw && data.len() != raw_len as usize {
                    return Err(FrameError::Invalid("raw chunk length differs from its raw length"));
                }
                Frame::Chunk { transfer_id, file, offset, raw_len, encoding, raw_checksum, data }
            }
            4 => Frame::Ack { transfer_id: r.u64()?, file: r.u32()?, durable: r.u64()? },
            5 => {
                let (transfer_id, file, offset) = (r.u64()?, r.u32()?, r.u64()?);
                let reason = match r.u8()? {
                    0 => NackReason::Checksum,
                    1 => NackReason::FileChecksum,
                    _ => return Err(FrameError::Invalid("unknown nack reason")),
                };
                Frame::Nack { transfer_id, file, offset, reason }
            }
            6 => Frame::Done { transfer_id: r.u64()? },
            7 => {
                let transfer_id = r.u64()?;
                let reason = match r.u8()? {
                    0 => RejectReason::Superseded,
                    1 => RejectReason::UnknownTransfer,
                    2 => RejectReason::Protocol,
                    3 => RejectReason::ReceiverIo,
                    4 => RejectReason::FileChecksum,
                    _ => return Err(FrameError::Invalid("unknown reject reason")),
                };
                let n = r.u16()? as usize;
                let message = String::from_utf8_lossy(r.bytes(n)?).into_owned();
                Frame::Reject { transfer_id, reason, message }
            }
            8 => Frame::Abort { transfer_id: r.u64()? },
            t => return Err(FrameError::Type(t)),
        };
        if !r.b.is_empty() {
            return Err(FrameError::Invalid("bytes left over after the frame's fields"));
        }
        Ok(Some((frame, FRAME_HEADER_BYTES + body_len)))
    }
}

fn frame_check(kind: u8, body: &[u8]) -> u32 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&[kind]);
    h.update(body);
    h.digest() as u32
}

/// Fuzzing entry point (`fuzz/` and the corpus test): decodes a stream of
/// frames from arbitrary bytes and feeds each to a receiver and a sender.
/// Must never panic.
#[doc(hidden)]
pub fn fuzz_decode(data: &[u8]) {
    let cfg = crate::Config::default();
    let now = std::time::Instant::now();
    let manifest = Manifest {
        transfer_id: 1,
        index: 5,
        term: 1,
        files: vec![FileMeta { name: "a".into(), len: 10, checksum: 0 }],
    };
    let mut rx = crate::Receiver::new(cfg.clone());
    let mut tx = crate::Sender::new(cfg.clone(), manifest, now);
    let mut at = 0;
    while let Ok(Some((frame, n))) = Frame::decode(&data[at..], 1 << 20) {
        at += n;
        rx.handle_frame(frame.clone());
        if let Some(crate::Action::Prepare { manifest }) = rx.poll_action() {
            let durable: Vec<u64> = manifest.files.iter().map(|f| f.len / 2).collect();
            rx.handle_prepared(&durable);
        }
        while rx.poll_action().is_some() {}
        tx.handle_frame(frame, now);
        while let Some(req) = tx.poll_read(now) {
            tx.handle_read(req, &vec![0; req.len as usize]);
        }
        while tx.poll_frame().is_some() {}
    }
}

/// A file name must name a file inside the staging directory, nothing else.
pub(crate) fn check_name(name: &str) -> Result<(), FrameError> {
    let ok = !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && !name.starts_with(crate::receiver::RESERVED_PREFIX);
    if ok { Ok(()) } else { Err(FrameError::Invalid("file name is not a plain file name")) }
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.b.len() < n {
            return Err(FrameError::Invalid("frame body ends early"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.bytes(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frame_round_trips() {
        let m = Manifest {
            transfer_id: 9,
            index: 100,
            term: 3,
            files: vec![FileMeta { name: "000012.sst".into(), len: 5, checksum: 77 }],
        };
        let frames = vec![
            Frame::Offer { manifest: m, window_bytes: 1 << 20 },
            Frame::Have { transfer_id: 9, durable: vec![0, 5] },
            Frame::Chunk {
                transfer_id: 9,
                file: 0,
                offset: 4,
                raw_len: 3,
                encoding: Encoding::Raw,
                raw_checksum: 1,
                data: vec![1, 2, 3],
            },
            Frame::Ack { transfer_id: 9, file: 0, durable: 5 },
            Frame::Nack { transfer_id: 9, file: 0, offset: 2, reason: NackReason::FileChecksum },
            Frame::Done { transfer_id: 9 },
            Frame::Reject { transfer_id: 9, reason: RejectReason::Superseded, message: "newer".into() },
            Frame::Abort { transfer_id: 9 },
        ];
        let mut buf = Vec::new();
        frames.iter().for_each(|f| f.encode(&mut buf));
        let mut at = 0;
        for f in &frames {
            let (g, n) = Frame::decode(&buf[at..], 1 << 20).expect("valid").expect("complete");
            assert_eq!(&g, f);
            // Every strict prefix is incomplete, never an error.
            for cut in 0..n {
                assert_eq!(Frame::decode(&buf[at..at + cut], 1 << 20), Ok(None));
            }
            at += n;
        }
        assert_eq!(at, buf.len());
    }

    #[test]
    fn hostile_names_are_refused() {
        for name in ["", "..", "a/b", "../x", "x\0", ".cairn-progress"] {
            let m = Manifest {
                transfer_id: 1,
                index: 1,
                term: 1,
                files: vec![FileMeta { name: name.into(), len: 1, checksum: 1 }],
            };
            let bytes = Frame::Offer { manifest: m, window_bytes: 1 }.to_bytes();
            assert!(Frame::decode(&bytes, 1 << 20).is_err(), "{name:?}");
        }
    }
}
