//! The receiving side, as a state machine without I/O.
//!
//! The driver loop: feed every frame to [`Receiver::handle_frame`], then carry
//! out each [`Action`] from [`Receiver::poll_action`] in order, reporting back
//! where the action says. The rules that make a crash safe live here:
//! a range is acknowledged only after the driver made it durable and recorded
//! it ([`Action::Persist`]); a transfer completes only after every file was
//! read back and matched its checksum ([`Action::Verify`]).

use std::collections::{BTreeMap, VecDeque};

use crate::config::Config;
use crate::frame::{Encoding, Frame, Manifest, NackReason, RejectReason};

/// Names starting with this are the receiver's own files in a staging directory.
pub const RESERVED_PREFIX: &str = ".cairn-";

/// What the driver must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this frame to the sender.
    Send(Frame),
    /// Open (or create) the staging area for `manifest`, bring in files it
    /// already holds elsewhere (identical by content), drop the staging areas of
    /// older checkpoints, then call [`Receiver::handle_prepared`] with the
    /// durable offset of every file.
    Prepare {
        /// The checkpoint.
        manifest: Manifest,
    },
    /// Write these raw bytes of file `file` at `offset` (not yet durable).
    Write {
        /// File index in the manifest.
        file: u32,
        /// Offset.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Make the files durable up to these offsets (fdatasync), then record the
    /// offsets durably, then call [`Receiver::handle_persisted`] with them.
    Persist {
        /// (file, offset) pairs.
        offsets: Vec<(u32, u64)>,
    },
    /// Read the whole file back, compare its length and checksum with the
    /// manifest, and call [`Receiver::handle_verified`].
    Verify {
        /// File index.
        file: u32,
    },
    /// The file failed verification: durably record offset 0 for it, then
    /// unlink it and create it anew (never truncate: it may be a hard link).
    Reset {
        /// File index.
        file: u32,
    },
    /// Every file is verified: fsync the staging directory (and its parent),
    /// then call [`Receiver::handle_completed`]; the checkpoint is the caller's.
    Complete {
        /// The checkpoint.
        manifest: Manifest,
    },
}

#[derive(Debug, Default)]
struct FileState {
    len: u64,
    durable: u64,
    /// Received, written, not yet durable: start -> end.
    received: BTreeMap<u64, u64>,
    verified: bool,
    verifying: bool,
    /// Times the whole file failed its manifest checksum in this transfer.
    checksum_failures: u32,
}

impl FileState {
    /// End of the received bytes contiguous from `durable`.
    fn contiguous(&self) -> u64 {
        let mut end = self.durable;
        for (&s, &e) in &self.received {
            if s > end {
                break;
            }
            end = end.max(e);
        }
        end
    }

    fn insert(&mut self, start: u64, end: u64) {
        let (mut s, mut e) = (start, end);
        let overlapping: Vec<u64> =
            self.received.range(..=end).filter(|(rs, re)| **re >= start && **rs <= end).map(|(rs, _)| *rs).collect();
        for k in overlapping {
            if let Some(v) = self.received.remove(&k) {
                s = s.min(k);
                e = e.max(v);
            }
        }
        self.received.insert(s, e);
    }

    fn covered(&self, start: u64, end: u64) -> bool {
        end <= self.durable
            || self.received.range(..=start).next_back().is_some_and(|(_, &e)| e >= end)
            || (start < self.durable && self.contiguous() >= end)
    }
}

#[derive(Debug)]
struct Active {
    manifest: Manifest,
    window_bytes: u64,
    prepared: bool,
    files: Vec<FileState>,
    persisting: bool,
    completing: bool,
    completed: bool,
}

/// The receiver of checkpoints: at most one transfer at a time, the newest.
#[derive(Debug)]
pub struct Receiver {
    cfg: Config,
    active: Option<Active>,
    actions: VecDeque<Action>,
}

impl Receiver {
    /// A receiver with no transfer.
    pub fn new(cfg: Config) -> Self {
        Receiver { cfg, active: None, actions: VecDeque::new() }
    }

    fn send(&mut self, f: Frame) {
        self.actions.push_back(Action::Send(f));
    }

    fn reject(&mut self, transfer_id: u64, reason: RejectReason, message: &str) {
        self.send(Frame::Reject { transfer_id, reason, message: message.into() });
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The checkpoint being received, if any.
    pub fn manifest(&self) -> Option<&Manifest> {
        self.active.as_ref().map(|a| &a.manifest)
    }

    /// A frame from the sender.
    pub fn handle_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Offer { manifest, window_bytes } => self.offer(manifest, u64::from(window_bytes)),
            Frame::Chunk { transfer_id, file, offset, raw_len, encoding, raw_checksum, data } => {
                self.chunk(transfer_id, file, offset, raw_len, encoding, raw_checksum, data)
            }
            // The staging area stays: a later checkpoint may reuse its files.
            Frame::Abort { transfer_id }
                if self.active.as_ref().is_some_and(|a| a.manifest.transfer_id == transfer_id && !a.completed) =>
            {
                self.active = None;
            }
            // Frames only a receiver sends: ignore.
            _ => {}
        }
    }

    fn offer(&mut self, manifest: Manifest, window_bytes: u64) {
        let id = manifest.transfer_id;
        if let Some(a) = &mut self.active {
            if a.manifest.same_checkpoint(&manifest) {
                // A reconnect, or a restarted sender: carry on under its new id.
                a.manifest.transfer_id = id;
                a.window_bytes = window_bytes;
                if a.completed {
                    self.send(Frame::Done { transfer_id: id });
                } else if a.prepared {
                    let durable = a.files.iter().map(|f| f.durable).collect();
                    self.send(Frame::Have { transfer_id: id, durable });
                }
                return;
            }
            if (manifest.index, manifest.term) <= (a.manifest.index, a.manifest.term) {
                let msg = format!("receiving a newer checkpoint at index {}", a.manifest.index);
                self.reject(id, RejectReason::Superseded, &msg);
                return;
            }
        }
        let files = manifest.files.iter().map(|f| FileState { len: f.len, ..FileState::default() }).collect();
        self.active = Some(Active {
            manifest: manifest.clone(),
            window_bytes,
            prepared: false,
            files,
            persisting: false,
            completing: false,
            completed: false,
        });
        self.actions.push_back(Action::Prepare { manifest });
    }

    /// The staging area is ready; `durable[i]` is what file `i` holds durably.
    pub fn handle_prepared(&mut self, durable: &[u64]) {
        let Some(a) = &mut self.active else { return };
        assert_eq!(durable.len(), a.files.len(), "one offset per file");
        for (f, d) in a.files.iter_mut().zip(durable) {
            assert!(*d <= f.len, "durable offset beyond the file");
            f.durable = *d;
            f.received.clear();
        }
        a.prepared = true;
        let have = Frame::Have { transfer_id: a.manifest.transfer_id, durable: durable.to_vec() };
        self.send(have);
        self.after_progress();
    }

    #[allow(clippy::too_many_arguments)]
    fn chunk(&mut self, id: u64, file: u32, offset: u64, raw_len: u32, enc: Encoding, checksum: u64, data: Vec<u8>) {
        let chunk_max = self.cfg.chunk_bytes_max;
        let Some(a) = self.active.as_mut().filter(|a| a.manifest.transfer_id == id && a.prepared) else {
            self.reject(id, RejectReason::UnknownTransfer, "no such transfer here (offer it again)");
            return;
        };
        if a.completed {
            // Our Done may have been lost: say it again, or the sender resends forever.
            self.send(Frame::Done { transfer_id: id });
            return;
        }
        let Some(f) = a.files.get_mut(file as usize) else {
            self.reject(id, RejectReason::Protocol, "chunk names a file outside the manifest");
            return;
        };
        let end = offset.checked_add(u64::from(raw_len));
        if raw_len > chunk_max || end.is_none_or(|e| e > f.len) || (raw_len == 0 && f.len > 0) {
            self.reject(id, RejectReason::Protocol, "chunk outside its file or larger than the chunk limit");
            return;
        }
        let end = end.unwrap_or(offset);
        if f.covered(offset, end) {
            // A duplicate (or a resend after a lost acknowledgement): say again what is durable.
            let durable = f.durable;
            self.send(Frame::Ack { transfer_id: id, file, durable });
            return;
        }
        // A raw chunk's bytes are the frame's own: moved, not copied.
        let raw = match enc {
            Encoding::Raw => Some(data),
            Encoding::Zstd => zstd::bulk::decompress(&data, raw_len as usize).ok(),
        };
        let Some(raw) = raw.filter(|r| r.len() == raw_len as usize && xxhash_rust::xxh3::xxh3_64(r) == checksum) else {
            let offset = offset.max(f.durable);
            self.send(Frame::Nack { transfer_id: id, file, offset, reason: NackReason::Checksum });
            return;
        };
        f.insert(offset, end);
        self.actions.push_back(Action::Write { file, offset, data: raw });
        self.after_progress();
    }

    /// Starts a persist when enough is received, or a verification when
    /// everything is durable.
    fn after_progress(&mut self) {
        let Some(a) = &mut self.active else { return };
        if !a.prepared || a.persisting || a.completing || a.completed {
            return;
        }
        let threshold = self.cfg.sync_bytes.min(a.window_bytes / 2).max(1);
        let mut pending = 0;
        let mut offsets = Vec::new();
        let mut finishes_file = false;
        for (i, f) in a.files.iter().enumerate() {
            let c = f.contiguous();
            if c > f.durable {
                pending += c - f.durable;
                finishes_file |= c == f.len;
                offsets.push((i as u32, c));
            }
        }
        if !offsets.is_empty() && (pending >= threshold || finishes_file) {
            a.persisting = true;
            self.actions.push_back(Action::Persist { offsets });
            return;
        }
        if offsets.is_empty() && a.files.iter().all(|f| f.durable == f.len) {
            let mut all_verified = true;
            for (i, f) in a.files.iter_mut().enumerate() {
                if !f.verified {
                    all_verified = false;
                    if !f.verifying {
                        f.verifying = true;
                        self.actions.push_back(Action::Verify { file: i as u32 });
                    }
                }
            }
            if all_verified {
                a.completing = true;
                self.actions.push_back(Action::Complete { manifest: a.manifest.clone() });
            }
        }
    }

    /// The offsets of an [`Action::Persist`] are durable.
    pub fn handle_persisted(&mut self, offsets: &[(u32, u64)]) {
        let Some(a) = &mut self.active else { return };
        a.persisting = false;
        let id = a.manifest.transfer_id;
        let mut acks = Vec::new();
        for &(file, off) in offsets {
            let Some(f) = a.files.get_mut(file as usize) else { continue };
            if off > f.durable {
                f.durable = off;
                let below: Vec<u64> = f.received.range(..off).map(|(s, _)| *s).collect();
                for s in below {
                    if let Some(e) = f.received.remove(&s)
                        && e > off
                    {
                        f.received.insert(off, e);
                    }
                }
            }
            acks.push(Frame::Ack { transfer_id: id, file, durable: f.durable });
        }
        acks.into_iter().for_each(|f| self.send(f));
        self.after_progress();
    }

    /// The result of an [`Action::Verify`].
    pub fn handle_verified(&mut self, file: u32, matches: bool) {
        let Some(a) = &mut self.active else { return };
        let id = a.manifest.transfer_id;
        let Some(f) = a.files.get_mut(file as usize) else { return };
        f.verifying = false;
        if matches {
            f.verified = true;
        } else {
            f.durable = 0;
            f.received.clear();
            f.checksum_failures += 1;
            let failures = f.checksum_failures;
            self.actions.push_back(Action::Reset { file });
            if failures >= self.cfg.file_checksum_failures_max {
                // The chunks arrived whole (each has its own checksum) and
                // still the file differs: the sender's file is not what its
                // manifest says. Receiving it again cannot help.
                tracing::error!(transfer = id, file, failures, "a received file keeps failing its checksum; refusing");
                self.active = None;
                let why = format!(
                    "file {file} failed its manifest checksum {failures} times: the sender's file differs from its manifest"
                );
                self.reject(id, RejectReason::FileChecksum, &why);
                return;
            }
            tracing::warn!(transfer = id, file, "a received file does not match its checksum; receiving it again");
            self.send(Frame::Nack { transfer_id: id, file, offset: 0, reason: NackReason::FileChecksum });
        }
        self.after_progress();
    }

    /// The staging directory is durable; the transfer is complete.
    pub fn handle_completed(&mut self) {
        let Some(a) = &mut self.active else { return };
        a.completing = false;
        a.completed = true;
        let id = a.manifest.transfer_id;
        self.send(Frame::Done { transfer_id: id });
    }

    /// The driver failed to write (its disk): the transfer cannot go on here.
    pub fn handle_io_error(&mut self, message: &str) {
        if let Some(a) = self.active.take() {
            self.reject(a.manifest.transfer_id, RejectReason::ReceiverIo, message);
        }
    }
}
