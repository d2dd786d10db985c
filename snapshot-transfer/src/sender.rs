//! The sending side, as a state machine without I/O.
//!
//! The driver loop:
//! 1. [`Sender::poll_read`]`(now)`: read that range of that file and hand the
//!    bytes to [`Sender::handle_read`] (the sender compresses and frames them);
//! 2. [`Sender::poll_frame`]: send each frame to the receiver, in order;
//! 3. [`Sender::handle_frame`] for every frame from the receiver;
//! 4. [`Sender::handle_timeout`]`(now)` once [`Sender::poll_timeout`] passes;
//!    [`Sender::reconnect`] when the link was lost and is back;
//! 5. [`Sender::poll_event`] tells when the transfer completed or failed.

use std::collections::VecDeque;
use std::time::Instant;

use crate::config::Config;
use crate::frame::{Encoding, Frame, Manifest, NackReason, RejectReason};

/// A range of a source file the driver must read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRequest {
    /// Index of the file in the manifest.
    pub file: u32,
    /// Offset to read at.
    pub offset: u64,
    /// Bytes to read.
    pub len: u32,
    epoch: u64,
}

/// What the transfer came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SenderEvent {
    /// The receiver holds every file, verified and durable.
    Completed,
    /// The receiver refused the transfer, or it was aborted.
    Failed(String),
}

/// Counters of a sender.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SenderStats {
    /// Raw file bytes put in chunks (resends included).
    pub raw_bytes_sent: u64,
    /// Bytes of chunk data on the wire (after compression).
    pub data_bytes_sent: u64,
    /// Bytes of all frames sent, headers included.
    pub wire_bytes_sent: u64,
    /// Chunks sent.
    pub chunks_sent: u64,
    /// Times the transfer was found stalled.
    pub stalls: u64,
    /// Offers sent (the first, and one per reconnect or stall before the receiver answered).
    pub offers_sent: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the receiver's `Have`.
    Offering,
    Sending,
    Done,
    Failed,
}

#[derive(Clone, Copy, Debug, Default)]
struct FileState {
    len: u64,
    /// Durable at the receiver.
    acked: u64,
    /// Next byte to read and send.
    sent: u64,
    /// `None` until the first chunk decides.
    compress: Option<bool>,
    /// Bumped whenever `sent` moves back: reads of an older epoch are dropped.
    epoch: u64,
}

/// The sender of one checkpoint.
#[derive(Debug)]
pub struct Sender {
    cfg: Config,
    manifest: Manifest,
    files: Vec<FileState>,
    /// Chunks requested or sent and not acknowledged: (file, offset, len).
    inflight: VecDeque<(u32, u64, u64)>,
    phase: Phase,
    out: VecDeque<Frame>,
    events: VecDeque<SenderEvent>,
    last_progress: Instant,
    tokens: f64,
    last_refill: Instant,
    stats: SenderStats,
}

impl Sender {
    /// A sender of `manifest`; its first frame is the offer.
    pub fn new(cfg: Config, manifest: Manifest, now: Instant) -> Self {
        let files = manifest.files.iter().map(|f| FileState { len: f.len, ..FileState::default() }).collect();
        let mut s = Sender {
            tokens: cfg.rate_bytes_per_second.map_or(0.0, |r| r as f64),
            cfg,
            manifest,
            files,
            inflight: VecDeque::new(),
            phase: Phase::Offering,
            out: VecDeque::new(),
            events: VecDeque::new(),
            last_progress: now,
            last_refill: now,
            stats: SenderStats::default(),
        };
        s.offer(now);
        s
    }

    fn offer(&mut self, now: Instant) {
        self.phase = Phase::Offering;
        self.rewind_all();
        self.last_progress = now;
        self.stats.offers_sent += 1;
        self.out
            .push_back(Frame::Offer { manifest: self.manifest.clone(), window_bytes: self.cfg.window_bytes() as u32 });
    }

    fn rewind_all(&mut self) {
        self.inflight.clear();
        for f in &mut self.files {
            f.sent = f.acked;
            f.epoch += 1;
        }
    }

    fn fail(&mut self, why: String) {
        if self.phase != Phase::Done && self.phase != Phase::Failed {
            tracing::warn!(transfer = self.manifest.transfer_id, %why, "snapshot transfer failed");
            self.phase = Phase::Failed;
            self.events.push_back(SenderEvent::Failed(why));
        }
    }

    /// The manifest being sent.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Counters so far.
    pub fn stats(&self) -> SenderStats {
        self.stats
    }

    /// Bytes the receiver acknowledged as durable, over all files.
    pub fn acked_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.acked).sum()
    }

    fn inflight_bytes(&self) -> u64 {
        self.inflight.iter().map(|c| c.2).sum()
    }

    /// The next range to read, if the window and the rate limit allow one now.
    pub fn poll_read(&mut self, now: Instant) -> Option<ReadRequest> {
        if self.phase != Phase::Sending || self.inflight.len() >= self.cfg.window_chunks_max {
            return None;
        }
        let (i, f) = self.files.iter().enumerate().find(|(_, f)| f.sent < f.len)?;
        let len = (f.len - f.sent).min(u64::from(self.cfg.chunk_bytes_max));
        if self.inflight_bytes() + len > self.cfg.window_bytes() {
            return None;
        }
        if let Some(rate) = self.cfg.rate_bytes_per_second {
            let elapsed = now.saturating_duration_since(self.last_refill).as_secs_f64();
            self.tokens = (self.tokens + elapsed * rate as f64).min(rate.max(len) as f64);
            self.last_refill = now;
            if self.tokens < len as f64 {
                return None;
            }
            self.tokens -= len as f64;
        }
        let req = ReadRequest { file: i as u32, offset: f.sent, len: len as u32, epoch: f.epoch };
        self.files[i].sent += len;
        self.inflight.push_back((req.file, req.offset, len));
        Some(req)
    }

    /// The bytes of a range asked for by [`Sender::poll_read`]. A range the
    /// sender no longer wants (it went back since) is dropped.
    pub fn handle_read(&mut self, req: ReadRequest, data: &[u8]) {
        let Some(f) = self.files.get(req.file as usize).copied() else { return };
        if f.epoch != req.epoch || self.phase != Phase::Sending {
            return;
        }
        assert_eq!(data.len(), req.len as usize, "the driver reads exactly what was asked");
        let raw_checksum = xxhash_rust::xxh3::xxh3_64(data);
        let mut encoding = Encoding::Raw;
        let mut payload = None;
        if f.compress != Some(false) {
            let compressed = zstd::bulk::compress(data, self.cfg.zstd_level).ok();
            let saving_ok = compressed.as_ref().is_some_and(|c| {
                c.len() as u64 * 100
                    <= data.len() as u64 * 100u64.saturating_sub(u64::from(self.cfg.compress_saving_percent_min))
            });
            if f.compress.is_none() {
                self.files[req.file as usize].compress = Some(saving_ok);
            }
            if let Some(c) = compressed
                && c.len() < data.len()
                && (saving_ok || f.compress == Some(true))
            {
                encoding = Encoding::Zstd;
                payload = Some(c);
            }
        }
        let data = payload.unwrap_or_else(|| data.to_vec());
        self.stats.raw_bytes_sent += u64::from(req.len);
        self.stats.data_bytes_sent += data.len() as u64;
        self.stats.chunks_sent += 1;
        self.out.push_back(Frame::Chunk {
            transfer_id: self.manifest.transfer_id,
            file: req.file,
            offset: req.offset,
            raw_len: req.len,
            encoding,
            raw_checksum,
            data,
        });
    }

    /// The next frame to send.
    pub fn poll_frame(&mut self) -> Option<Frame> {
        let f = self.out.pop_front()?;
        self.stats.wire_bytes_sent += (crate::frame::FRAME_HEADER_BYTES + f.body_len()) as u64;
        Some(f)
    }

    /// A frame from the receiver. Frames of other transfers are ignored.
    pub fn handle_frame(&mut self, frame: Frame, now: Instant) {
        if frame.transfer_id() != self.manifest.transfer_id || matches!(self.phase, Phase::Done | Phase::Failed) {
            return;
        }
        match frame {
            Frame::Have { durable, .. } => {
                if durable.len() != self.files.len() || durable.iter().zip(&self.files).any(|(d, f)| *d > f.len) {
                    self.fail("the receiver's answer does not match the manifest".into());
                    return;
                }
                for (f, d) in self.files.iter_mut().zip(durable) {
                    f.acked = d;
                    f.sent = d;
                    f.epoch += 1;
                }
                self.inflight.clear();
                self.phase = Phase::Sending;
                self.last_progress = now;
            }
            Frame::Ack { file, durable, .. } if self.phase == Phase::Sending => {
                let Some(f) = self.files.get_mut(file as usize) else { return };
                if durable > f.acked && durable <= f.len {
                    f.acked = durable;
                    f.sent = f.sent.max(durable);
                    self.inflight.retain(|c| c.0 != file || c.1 + c.2 > durable);
                    self.last_progress = now;
                }
            }
            Frame::Nack { file, offset, reason, .. } if self.phase == Phase::Sending => {
                let Some(f) = self.files.get_mut(file as usize) else { return };
                if reason == NackReason::FileChecksum {
                    f.acked = f.acked.min(offset);
                }
                let offset = offset.max(f.acked);
                if offset < f.sent {
                    f.sent = offset;
                    f.epoch += 1;
                    self.inflight.retain(|c| c.0 != file || c.1 < offset);
                }
            }
            Frame::Done { .. } => {
                self.phase = Phase::Done;
                self.events.push_back(SenderEvent::Completed);
            }
            Frame::Reject { reason: RejectReason::UnknownTransfer, .. } => {
                // The receiver restarted and forgot us: offer again.
                self.offer(now);
            }
            Frame::Reject { reason, message, .. } => self.fail(format!("rejected ({reason:?}): {message}")),
            _ => {}
        }
    }

    /// When [`Sender::handle_timeout`] should next be called: the stall
    /// deadline, or sooner when the rate limit will allow the next chunk.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let stall = match self.phase {
            Phase::Done | Phase::Failed => return None,
            _ => self.last_progress + self.cfg.stall_timeout,
        };
        let refill = self.cfg.rate_bytes_per_second.filter(|_| self.phase == Phase::Sending).map(|rate| {
            let need = (f64::from(self.cfg.chunk_bytes_max) - self.tokens).max(0.0);
            self.last_refill + std::time::Duration::from_secs_f64(need / rate as f64)
        });
        Some(refill.map_or(stall, |r| r.min(stall)))
    }

    /// Time passed: a transfer with nothing acknowledged for `stall_timeout`
    /// resends from the last acknowledged offsets (or offers again, when it was
    /// waiting for an answer).
    pub fn handle_timeout(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Done | Phase::Failed)
            || now.saturating_duration_since(self.last_progress) < self.cfg.stall_timeout
        {
            return;
        }
        self.stats.stalls += 1;
        tracing::debug!(transfer = self.manifest.transfer_id, acked = self.acked_bytes(), "transfer stalled; resuming");
        let all_acked = self.files.iter().all(|f| f.acked == f.len);
        if self.phase == Phase::Sending && !self.inflight.is_empty() {
            self.rewind_all();
            self.last_progress = now;
        } else if self.phase == Phase::Offering || all_acked {
            // No answer to the offer, or everything acknowledged but no Done.
            self.offer(now);
        } else {
            // Nothing in flight because the rate limit holds it back: not a stall.
            self.stats.stalls -= 1;
            self.last_progress = now;
        }
    }

    /// The link was lost and is back (or the receiver restarted): offer again;
    /// the receiver answers with what it holds durably.
    pub fn reconnect(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Done | Phase::Failed) {
            self.offer(now);
        }
    }

    /// Stops the transfer (a newer checkpoint supersedes it) and tells the receiver.
    pub fn abort(&mut self) {
        if !matches!(self.phase, Phase::Done | Phase::Failed) {
            self.out.push_back(Frame::Abort { transfer_id: self.manifest.transfer_id });
            self.fail("aborted by the sender".into());
        }
    }

    /// How the transfer ended, once it has.
    pub fn poll_event(&mut self) -> Option<SenderEvent> {
        self.events.pop_front()
    }

    /// Whether the transfer completed or failed.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Done | Phase::Failed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::frame::FileMeta;

    fn sender(rate: Option<u64>, now: Instant) -> Sender {
        let cfg = Config {
            chunk_bytes_max: 1000,
            window_chunks_max: 1000,
            window_bytes_max: 1 << 30,
            rate_bytes_per_second: rate,
            stall_timeout: Duration::from_secs(1000),
            ..Config::default()
        };
        let m = Manifest {
            transfer_id: 1,
            index: 1,
            term: 1,
            files: vec![FileMeta { name: "f".into(), len: 1 << 20, checksum: 0 }],
        };
        let mut s = Sender::new(cfg, m, now);
        s.handle_frame(Frame::Have { transfer_id: 1, durable: vec![0] }, now);
        s
    }

    fn drain(s: &mut Sender, now: Instant) -> u64 {
        std::iter::from_fn(|| s.poll_read(now)).map(|r| u64::from(r.len)).sum()
    }

    #[test]
    fn the_rate_limit_bounds_bytes_per_second() {
        let t0 = Instant::now();
        let mut s = sender(Some(10_000), t0);
        // At most one second's worth at once, then the rate.
        assert!(drain(&mut s, t0) <= 10_000);
        let mut total = 0;
        for ms in (100..=5_000).step_by(100) {
            total += drain(&mut s, t0 + Duration::from_millis(ms));
        }
        assert!((45_000..=51_000).contains(&total), "{total} bytes in 5 s at 10,000 B/s");
        // Under a rate limit the window is at most half a stall timeout's worth,
        // so acknowledgements come long before the sender would call it stalled.
        let c = Config {
            chunk_bytes_max: 1000,
            window_chunks_max: 1000,
            rate_bytes_per_second: Some(10_000),
            stall_timeout: Duration::from_secs(10),
            ..Config::default()
        };
        assert_eq!(c.window_bytes(), 50_000);
        // Without a limit the window (1,000 chunks of 1,000 bytes) is the only bound.
        let mut u = sender(None, t0);
        assert_eq!(drain(&mut u, t0), 1_000_000);
    }

    #[test]
    fn the_window_bounds_chunks_and_bytes_in_flight() {
        let t0 = Instant::now();
        let mut s = sender(None, t0);
        s.cfg.window_chunks_max = 3;
        s.rewind_all();
        assert_eq!(std::iter::from_fn(|| s.poll_read(t0)).count(), 3);
        // An acknowledgement frees room.
        s.handle_frame(Frame::Ack { transfer_id: 1, file: 0, durable: 1000 }, t0);
        assert_eq!(std::iter::from_fn(|| s.poll_read(t0)).count(), 1);
        // A stale or reordered acknowledgement never moves the acknowledged offset back.
        s.handle_frame(Frame::Ack { transfer_id: 1, file: 0, durable: 500 }, t0);
        assert_eq!(s.acked_bytes(), 1000);
    }
}
