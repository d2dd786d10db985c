//! Frames: an 8-byte header (payload length as u32 LE, format version as u16
//! LE, two reserved zero bytes) and an `rkyv` archive, validated on decode.
//!
//! The header keeps the payload 8-byte aligned in the receive buffer, which
//! `rkyv` needs. Both the client protocol and the peer protocol use it.

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;
use tokio::io::AsyncRead;

/// Bytes of a frame header.
pub const HEADER_BYTES: usize = 8;
/// The frame format version this crate writes and reads.
pub const FRAME_VERSION: u16 = 1;

/// A frame that could not be read or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The stream ended cleanly before a frame began.
    #[error("the stream ended")]
    End,
    /// The stream ended or failed inside a frame.
    #[error("reading a frame: {0}")]
    Read(String),
    /// The header announced more bytes than allowed.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced payload length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A frame version this build does not know.
    #[error("frame version {0} is not supported (this build speaks version {FRAME_VERSION})")]
    Version(u16),
    /// The reserved header bytes were not zero.
    #[error("malformed frame header")]
    Header,
    /// The payload is not a valid archive of the expected type.
    #[error("malformed frame payload: {0}")]
    Payload(String),
    /// Encoding failed (a value too large for the 32-bit format).
    #[error("encoding a frame: {0}")]
    Encode(String),
}

/// Archives `value` (the payload of a frame, or an entry's data).
pub fn archive<T>(value: &T) -> Result<Vec<u8>, FrameError>
where
    T: for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>,
{
    rkyv::to_bytes::<rancor::Error>(value).map(|b| b.to_vec()).map_err(|e| FrameError::Encode(e.to_string()))
}

/// Encodes `value` as one frame (header and payload).
pub fn encode<T>(value: &T) -> Result<Vec<u8>, FrameError>
where
    T: for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>,
{
    encode_after(&[], value)
}

/// Encodes `value` as one frame of a request pipe: the request id (u64 LE),
/// then the frame (see `Request::Pipe`).
pub fn encode_tagged<T>(id: u64, value: &T) -> Result<Vec<u8>, FrameError>
where
    T: for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>,
{
    encode_after(&id.to_le_bytes(), value)
}

/// `prefix`, then `value` as one frame.
fn encode_after<T>(prefix: &[u8], value: &T) -> Result<Vec<u8>, FrameError>
where
    T: for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>,
{
    let payload = rkyv::to_bytes::<rancor::Error>(value).map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::Encode("payload over 4 GiB".into()))?;
    let mut out = Vec::with_capacity(prefix.len() + HEADER_BYTES + payload.len());
    out.extend_from_slice(prefix);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&FRAME_VERSION.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks a header; returns the payload length.
pub fn parse_header(header: &[u8; HEADER_BYTES], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != FRAME_VERSION {
        return Err(FrameError::Version(version));
    }
    if header[6] != 0 || header[7] != 0 {
        return Err(FrameError::Header);
    }
    if len > max {
        return Err(FrameError::TooLarge { len: len as u64, max: max as u64 });
    }
    Ok(len)
}

/// Decodes (and validates) a payload.
pub fn decode<T>(payload: &[u8]) -> Result<T, FrameError>
where
    T: rkyv::Archive,
    T::Archived:
        for<'a> CheckBytes<HighValidator<'a, rancor::Error>> + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
{
    // Bytes already aligned (a WAL record, most network buffers) are read in
    // place; others are copied once into an aligned buffer.
    let result = if payload.as_ptr().align_offset(16) == 0 {
        rkyv::from_bytes::<T, rancor::Error>(payload)
    } else {
        let mut aligned = AlignedVec::<16>::with_capacity(payload.len());
        aligned.extend_from_slice(payload);
        rkyv::from_bytes::<T, rancor::Error>(&aligned)
    };
    result.map_err(|e| FrameError::Payload(e.to_string()))
}

/// Decodes a whole frame held in one buffer (header and payload), as the
/// fuzz target and tests do.
pub fn decode_frame<T>(frame: &[u8], max: usize) -> Result<T, FrameError>
where
    T: rkyv::Archive,
    T::Archived:
        for<'a> CheckBytes<HighValidator<'a, rancor::Error>> + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
{
    let header: &[u8; HEADER_BYTES] =
        frame.get(..HEADER_BYTES).and_then(|h| h.try_into().ok()).ok_or(FrameError::Read("short frame".into()))?;
    let len = parse_header(header, max)?;
    let payload = &frame[HEADER_BYTES..];
    if payload.len() != len {
        return Err(FrameError::Read(format!("payload of {} bytes, header says {len}", payload.len())));
    }
    decode(payload)
}

/// Reads one frame's payload from a stream (a QUIC stream, or TLS over TCP):
/// `Err(FrameError::End)` if the stream ended before the frame began.
pub async fn read_payload<R: AsyncRead + Unpin + ?Sized>(recv: &mut R, max: usize) -> Result<Vec<u8>, FrameError> {
    read_payload_admitted(recv, max, |_| std::future::ready(())).await.map(|(payload, ())| payload)
}

/// [`read_payload`], waiting for `admit(len)` once the header has announced
/// the payload's length and before any of it is read (a node bounds the
/// request bytes it holds this way); returns what `admit` gave with the
/// payload.
pub async fn read_payload_admitted<R: AsyncRead + Unpin + ?Sized, A, F>(
    recv: &mut R,
    max: usize,
    admit: impl FnOnce(usize) -> F,
) -> Result<(Vec<u8>, A), FrameError>
where
    F: std::future::Future<Output = A>,
{
    let mut header = [0u8; HEADER_BYTES];
    read_start(recv, &mut header).await?;
    let len = parse_header(&header, max)?;
    let admitted = admit(len).await;
    Ok((read_exactly(recv, len).await?, admitted))
}

/// Reads the next frame of a request pipe (see `Request::Pipe`): its id and
/// payload, or its id and [`FrameError::TooLarge`] for a frame over `max`,
/// whose bytes are read and dropped so that the pipe stays in step (the
/// caller answers that request with an error and goes on). `Err(End)`: the
/// stream ended between frames; any other `Err`: the pipe cannot go on.
pub async fn read_tagged<R: AsyncRead + Unpin + ?Sized>(
    recv: &mut R,
    max: usize,
) -> Result<(u64, Result<Vec<u8>, FrameError>), FrameError> {
    let (id, read) = read_tagged_admitted(recv, max, |_| std::future::ready(())).await?;
    Ok((id, read.map(|(payload, ())| payload)))
}

/// [`read_tagged`], waiting for `admit(len)` once the header has announced
/// the payload's length and before any of it is read; returns what `admit`
/// gave with the payload (a frame over `max` is not admitted).
pub async fn read_tagged_admitted<R: AsyncRead + Unpin + ?Sized, A, F>(
    recv: &mut R,
    max: usize,
    admit: impl FnOnce(usize) -> F,
) -> Result<(u64, Result<(Vec<u8>, A), FrameError>), FrameError>
where
    F: std::future::Future<Output = A>,
{
    use tokio::io::AsyncReadExt;
    let mut id = [0u8; 8];
    read_start(recv, &mut id).await?;
    let id = u64::from_le_bytes(id);
    let mut header = [0u8; HEADER_BYTES];
    recv.read_exact(&mut header).await.map_err(|e| FrameError::Read(e.to_string()))?;
    match parse_header(&header, max) {
        Ok(len) => {
            let admitted = admit(len).await;
            Ok((id, Ok((read_exactly(recv, len).await?, admitted))))
        }
        Err(FrameError::TooLarge { len, max }) => {
            let skipped = tokio::io::copy(&mut (&mut *recv).take(len), &mut tokio::io::sink())
                .await
                .map_err(|e| FrameError::Read(e.to_string()))?;
            if skipped != len {
                return Err(FrameError::Read(format!("stream ended after {skipped} of {len} payload bytes")));
            }
            Ok((id, Err(FrameError::TooLarge { len, max })))
        }
        Err(e) => Err(e),
    }
}

/// Bytes of frames gathered into one write on a request pipe, at most (a
/// single larger frame goes alone).
pub const PIPE_WRITE_BYTES: usize = 256 << 10;

/// The writer of a request pipe, either side: writes `first` (if any), then
/// the frames that arrive on `rx`, those queued together gathered into one
/// write of up to [`PIPE_WRITE_BYTES`]; finishes the stream once `rx` closes.
pub async fn write_pipe(
    mut send: quinn::SendStream,
    mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    first: Vec<u8>,
) -> Result<(), quinn::WriteError> {
    let mut buf = first;
    loop {
        if buf.is_empty() {
            match rx.recv().await {
                Some(next) => buf = next,
                None => break,
            }
        }
        while buf.len() < PIPE_WRITE_BYTES {
            match rx.try_recv() {
                Ok(more) => buf.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        send.write_all(&buf).await?;
        buf.clear();
    }
    let _ = send.finish();
    Ok(())
}

/// Fills `buf` with the first bytes of a frame: `Err(End)` if the stream
/// ended cleanly before it.
async fn read_start<R: AsyncRead + Unpin + ?Sized>(recv: &mut R, buf: &mut [u8]) -> Result<(), FrameError> {
    use tokio::io::AsyncReadExt;
    let mut got = 0;
    while got < buf.len() {
        match recv.read(&mut buf[got..]).await {
            Ok(0) if got == 0 => return Err(FrameError::End),
            Ok(0) => {
                return Err(FrameError::Read(format!(
                    "stream ended after {got} of a frame's first {} bytes",
                    buf.len()
                )));
            }
            Ok(n) => got += n,
            Err(e) => return Err(FrameError::Read(e.to_string())),
        }
    }
    Ok(())
}

/// Reads `len` payload bytes.
async fn read_exactly<R: AsyncRead + Unpin + ?Sized>(recv: &mut R, len: usize) -> Result<Vec<u8>, FrameError> {
    use tokio::io::AsyncReadExt;
    // The buffer grows with what arrives, so an announced length costs
    // memory only once the peer actually sends the bytes.
    let mut payload = Vec::with_capacity(len.min(64 << 10));
    recv.take(len as u64).read_to_end(&mut payload).await.map_err(|e| FrameError::Read(e.to_string()))?;
    if payload.len() != len {
        return Err(FrameError::Read(format!("stream ended after {} of {len} payload bytes", payload.len())));
    }
    Ok(payload)
}

/// Reads and decodes one frame from a stream.
pub async fn read<T>(recv: &mut (impl AsyncRead + Unpin + ?Sized), max: usize) -> Result<T, FrameError>
where
    T: rkyv::Archive,
    T::Archived:
        for<'a> CheckBytes<HighValidator<'a, rancor::Error>> + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
{
    let payload = read_payload(recv, max).await?;
    decode(&payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Request, Response};

    #[test]
    fn frames_round_trip_and_bad_headers_are_refused() {
        let req = Request::Get { key: b"k".to_vec(), consistency: Default::default(), revision: 0 };
        let f = encode(&req).expect("encode");
        assert_eq!(decode_frame::<Request>(&f, 1 << 20).expect("decode"), req);
        let mut bad = f.clone();
        bad[4] = 9;
        assert!(matches!(decode_frame::<Request>(&bad, 1 << 20), Err(FrameError::Version(9))));
        let mut bad = f.clone();
        bad[7] = 1;
        assert!(matches!(decode_frame::<Request>(&bad, 1 << 20), Err(FrameError::Header)));
        assert!(matches!(decode_frame::<Request>(&f, 4), Err(FrameError::TooLarge { .. })));
        let mut bad = f.clone();
        let n = bad.len();
        bad[n - 3] ^= 0xff;
        // A flipped byte is either refused or decodes to some valid value; never a panic.
        let _ = decode_frame::<Request>(&bad, 1 << 20);
        assert!(decode_frame::<Response>(&f[..HEADER_BYTES], 1 << 20).is_err());
    }
}

#[cfg(test)]
mod fuzz_like {
    use super::*;
    use crate::protocol::{Request, Response};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Any bytes: decoding returns an error or a value, never panics.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame::<Request>(&bytes, 1 << 20);
            let _ = decode_frame::<Response>(&bytes, 1 << 20);
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Response>(&bytes);
        }

        /// A valid frame with bytes flipped: never a panic.
        #[test]
        fn decoding_damaged_frames_never_panics(key in proptest::collection::vec(any::<u8>(), 0..64), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut f = encode(&Request::Get { key, consistency: Default::default(), revision: 0 }).expect("encode");
            for (pos, x) in flips {
                let n = f.len();
                f[pos % n] ^= x;
            }
            let _ = decode_frame::<Request>(&f, 1 << 20);
        }
    }
}
