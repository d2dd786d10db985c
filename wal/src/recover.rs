//! Opening a log: reading every retained segment, checking the chain, building
//! the position index, and treating damage as the recovery mode says.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result, io};
use crate::format::{
    self, Decoded, HeaderError, SEGMENT_HEADER_BYTES, decode_record, decode_segment_header, kind, parse_prepared_name,
    parse_segment_name, segment_seed, spare_name, valid_record_after,
};
use crate::fs::{Fs, FsFile, OpenMode};
use crate::options::RecoveryMode;
use crate::read::AlignedBuf;

/// Where a user record lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub(crate) position: u64,
    /// Offset of the frame in the segment file.
    pub(crate) offset: u64,
    /// Bytes of the frame (header, payload, padding).
    pub(crate) frame_len: u64,
}

/// A snapshot marker: a position and the caller's payload (for Raft, the term).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    /// The position the snapshot covers the log up to.
    pub position: u64,
    /// The caller's bytes stored with it.
    pub payload: Vec<u8>,
}

/// A retained segment and the records it holds.
#[derive(Debug)]
pub(crate) struct SegmentState {
    pub(crate) seq: u64,
    /// The record crc seed (from the seq and the header's salt).
    pub(crate) seed: u32,
    pub(crate) path: PathBuf,
    pub(crate) file: Arc<dyn FsFile>,
    pub(crate) records: Vec<IndexEntry>,
    pub(crate) markers: Vec<Marker>,
}

/// A damaged tail the recovery dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// The last segment.
    pub path: PathBuf,
    /// Where the valid records end.
    pub offset: u64,
    /// Bytes from `offset` up to the next zero 8-byte word: what the torn write
    /// left, dropped (and zeroed on disk when the open is writable).
    pub bytes_dropped: u64,
    /// Why the record at `offset` was not valid.
    pub reason: String,
}

/// Where a `PointInTime` recovery stopped, and what it did not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopPoint {
    /// The file with the damage.
    pub path: PathBuf,
    /// Offset of the damage.
    pub offset: u64,
    /// What is wrong there.
    pub reason: String,
    /// Bytes of that file from `offset` on, plus every later segment, not read.
    pub bytes_not_read: u64,
    /// Later segments not read at all.
    pub segments_not_read: Vec<PathBuf>,
}

/// What `open` found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// Segments read.
    pub segments_read: usize,
    /// Valid records read (all kinds, header records included).
    pub records_read: u64,
    /// A torn tail that was dropped (`TolerateTornTail`, or a read-only open).
    pub torn_tail: Option<TornTail>,
    /// Where a `PointInTime` recovery stopped.
    pub stopped_at: Option<StopPoint>,
    /// Temporary files of an unfinished segment preparation that were removed.
    pub stray_files_removed: Vec<PathBuf>,
    /// Segments the last run prepared and never used, kept as spares (renamed
    /// `{seq}.wal.spare`) so that the next preparation recycles them instead of
    /// writing a new file.
    pub prepared_kept: Vec<PathBuf>,
}

/// The result of scanning a log directory.
pub(crate) struct Scan {
    pub(crate) segments: Vec<SegmentState>,
    pub(crate) metadata: Vec<u8>,
    pub(crate) state: Option<Vec<u8>>,
    /// The bound user positions must rise above.
    pub(crate) last_position: Option<u64>,
    pub(crate) chain: u32,
    /// End of the valid records in the last segment.
    pub(crate) tail_offset: u64,
    /// End of the last segment's header records.
    pub(crate) tail_header_end: u64,
    /// The latest snapshot marker read.
    pub(crate) marker: Option<Marker>,
    /// Released segment files kept for recycling.
    pub(crate) spares: Vec<PathBuf>,
    pub(crate) report: RecoveryReport,
}

/// Drops index entries at or above `position`, newest first.
pub(crate) fn truncate_index(segments: &mut [SegmentState], position: u64) {
    for seg in segments.iter_mut().rev() {
        while seg.records.last().is_some_and(|r| r.position >= position) {
            seg.records.pop();
        }
        if seg.records.last().is_some_and(|r| r.position < position) {
            break;
        }
    }
}

/// The files of a log directory.
pub(crate) struct Listing {
    /// Segments in sequence order: (seq, first position, path).
    pub(crate) segments: Vec<(u64, u64, PathBuf)>,
    /// Segments whose preparation did not finish.
    pub(crate) prepared: Vec<PathBuf>,
    /// Released segments kept for recycling.
    pub(crate) spares: Vec<PathBuf>,
}

/// Lists the files of the log directory `dir`.
pub(crate) fn list_dir(fs: &dyn Fs, dir: &Path) -> Result<Listing> {
    let mut l = Listing { segments: Vec::new(), prepared: Vec::new(), spares: Vec::new() };
    for name in fs.read_dir(dir).map_err(io("list log directory", dir))? {
        if let Some((seq, first)) = parse_segment_name(&name) {
            l.segments.push((seq, first, dir.join(&name)));
        } else if name.ends_with(".wal.tmp") {
            l.prepared.push(dir.join(&name));
        } else if name.ends_with(".wal.spare") {
            l.spares.push(dir.join(&name));
        }
    }
    l.segments.sort();
    l.spares.sort();
    Ok(l)
}

/// Reads a segment for the scan: the file up to its last nonzero byte, and
/// a little of the zeros after it. Returns the bytes and the file's length.
///
/// A segment is prepared full of zeros, so the last one is mostly zeros
/// until it fills. Those zeros are checked through one reused buffer instead
/// of being read into fresh memory (faulting in tens of MiB costs more than
/// reading them: about 0.2 s for 64 MiB on a VM). The scan sees the same as
/// if it had read everything: no record starts in zeros, and a torn tail
/// ends at the first zero word, which the slack kept after the last nonzero
/// byte holds.
fn read_segment(file: &dyn FsFile, path: &Path) -> Result<(AlignedBuf, u64)> {
    const CHUNK: u64 = 1 << 20;
    const SLACK: u64 = 4096;
    let len = file.len().map_err(io("stat segment", path))?;
    let mut chunk = vec![0u8; CHUNK.min(len) as usize];
    // Walk back from the end while the file is zeros: [end, len) is all zeros.
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let part = &mut chunk[..(end - start) as usize];
        file.read_exact_at(part, start).map_err(io("read segment", path))?;
        // OR-folding 4 KiB blocks vectorizes; only the last nonzero block is searched bytewise.
        let nonzero = part.chunks(4096).rposition(|b| b.iter().fold(0u8, |a, &x| a | x) != 0);
        if let Some(block) = nonzero {
            let b = &part[block * 4096..(block * 4096 + 4096).min(part.len())];
            let last = b.iter().rposition(|&x| x != 0).unwrap_or(0);
            end = start + (block * 4096 + last) as u64 + 1;
            break;
        }
        end = start;
    }
    let keep = (end.next_multiple_of(format::ALIGN as u64) + SLACK).min(len);
    let keep = usize::try_from(keep).map_err(|_| Error::Corrupt {
        path: path.to_path_buf(),
        offset: 0,
        reason: format!("segment of {len} bytes does not fit in memory"),
    })?;
    let mut buf = AlignedBuf::zeroed(keep);
    file.read_exact_at(buf.as_mut_slice(), 0).map_err(io("read segment", path))?;
    Ok((buf, len))
}

/// Whether the scan may change files (repair a torn tail, remove stray files).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    Write,
    ReadOnly,
}

enum Outcome {
    /// The segment ended cleanly (or its torn tail was handled) at this offset.
    End(u64),
    /// PointInTime stopped here.
    Stopped,
}

struct Scanner<'a> {
    fs: &'a dyn Fs,
    mode: RecoveryMode,
    access: Access,
    scan: Scan,
    metadata: Option<Vec<u8>>,
}

/// Reads the log in `dir`.
pub(crate) fn scan(fs: &dyn Fs, dir: &Path, mode: RecoveryMode, access: Access) -> Result<Scan> {
    let Listing { segments: segs, prepared: tmps, spares } = list_dir(fs, dir)?;
    if segs.is_empty() {
        return Err(Error::NotFound { dir: dir.to_path_buf() });
    }
    let mut report = RecoveryReport::default();
    let mut spares = spares;
    if access == Access::Write {
        for t in tmps {
            // A prepared segment, finished or not, is as good as a spare: nothing
            // in it validates as a record of the segment it will become (zeros
            // end a scan, and every record's crc is seeded by its segment's seq
            // and salt), and a short file grows as it is written. It goes last,
            // so it is recycled first and kept when spares are trimmed.
            let seq = t.file_name().and_then(|n| n.to_str()).and_then(parse_prepared_name);
            match seq.map(|seq| dir.join(spare_name(seq))) {
                Some(to) if !fs.exists(&to).map_err(io("stat", &to))? => {
                    fs.rename(&t, &to).map_err(io("keep prepared segment as a spare", &t))?;
                    report.prepared_kept.push(to.clone());
                    spares.push(to);
                }
                _ => {
                    fs.remove_file(&t).map_err(io("remove stray prepared segment", &t))?;
                    report.stray_files_removed.push(t);
                }
            }
        }
    }
    let mut s = Scanner {
        fs,
        mode,
        access,
        scan: Scan {
            segments: Vec::new(),
            metadata: Vec::new(),
            state: None,
            last_position: None,
            chain: 0,
            tail_offset: 0,
            tail_header_end: 0,
            marker: None,
            spares,
            report,
        },
        metadata: None,
    };
    for (i, (seq, first, path)) in segs.iter().enumerate() {
        if i > 0 && *seq != segs[i - 1].0 + 1 {
            let missing = segs[i - 1].0 + 1;
            if mode == RecoveryMode::PointInTime {
                s.stop(path, 0, format!("segment {missing:016x} is missing before this one"), 0, &segs[i..]);
                break;
            }
            return Err(Error::MissingSegment { dir: dir.to_path_buf(), missing });
        }
        let is_last = i + 1 == segs.len();
        match s.segment(*seq, *first, path, is_last, &segs[i + 1..])? {
            Outcome::End(off) => s.scan.tail_offset = off,
            Outcome::Stopped => break,
        }
    }
    s.scan.metadata = s.metadata.unwrap_or_default();
    if s.scan.segments.is_empty() {
        // PointInTime stopped at the first segment's header: nothing to open.
        let stop = s.scan.report.stopped_at.as_ref().map(|p| (p.path.clone(), p.offset, p.reason.clone()));
        let (path, offset, reason) = stop.unwrap_or_else(|| (dir.to_path_buf(), 0, "no readable segment".into()));
        return Err(Error::Corrupt { path, offset, reason });
    }
    Ok(s.scan)
}

impl Scanner<'_> {
    fn stop(&mut self, path: &Path, offset: u64, reason: String, bytes_left: u64, later: &[(u64, u64, PathBuf)]) {
        let mut bytes_not_read = bytes_left;
        for (_, _, p) in later {
            if let Ok(f) = self.fs.open(p, OpenMode::Read) {
                bytes_not_read += f.len().unwrap_or(0);
            }
        }
        tracing::warn!(path = %path.display(), offset, %reason, "point-in-time recovery stopped at damage");
        self.scan.report.stopped_at = Some(StopPoint {
            path: path.to_path_buf(),
            offset,
            reason,
            bytes_not_read,
            segments_not_read: later.iter().map(|(_, _, p)| p.clone()).collect(),
        });
    }

    fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> Error {
        Error::Corrupt { path: path.to_path_buf(), offset, reason: reason.into() }
    }

    fn segment(
        &mut self,
        seq: u64,
        first: u64,
        path: &Path,
        is_last: bool,
        later: &[(u64, u64, PathBuf)],
    ) -> Result<Outcome> {
        let mode = if is_last && self.access == Access::Write { OpenMode::ReadWrite } else { OpenMode::Read };
        let file: Arc<dyn FsFile> = Arc::from(self.fs.open(path, mode).map_err(io("open segment", path))?);
        let (buf, file_len) = read_segment(&*file, path)?;
        let bytes = buf.as_slice();
        self.scan.report.segments_read += 1;

        let header = match decode_segment_header(bytes) {
            Ok(h) => Ok(h),
            Err(HeaderError::Version(found)) => {
                return Err(Error::UnsupportedVersion {
                    path: path.to_path_buf(),
                    found,
                    supported: format::FORMAT_VERSION,
                });
            }
            Err(e) => Err(format!("segment header: {e:?}")),
        };
        let header = header.and_then(|h| {
            if h.seq != seq || h.first_position != first {
                Err(format!(
                    "segment header names seq {:016x} and first position {:016x}, the file name another",
                    h.seq, h.first_position
                ))
            } else if !self.scan.segments.is_empty() && h.prev_chain != self.scan.chain {
                Err("segment does not continue the checksum chain of the previous segment".into())
            } else {
                Ok(h)
            }
        });
        let header = match header {
            Ok(h) => h,
            Err(reason) => {
                // Headers are synced before the segment is renamed into place: damage
                // here never comes from a crash.
                if self.mode == RecoveryMode::PointInTime {
                    self.stop(path, 0, reason, file_len, later);
                    return Ok(Outcome::Stopped);
                }
                return Err(Self::corrupt(path, 0, reason));
            }
        };
        if self.scan.segments.is_empty() {
            self.scan.last_position = header.first_position.checked_sub(1);
        }
        let seed = segment_seed(seq, header.salt);
        self.scan.segments.push(SegmentState {
            seq,
            seed,
            path: path.to_path_buf(),
            file: Arc::clone(&file),
            records: Vec::new(),
            markers: Vec::new(),
        });
        let header_end = SEGMENT_HEADER_BYTES + header.header_records_bytes as usize;
        self.scan.tail_header_end = header_end as u64;
        let mut chain = header.prev_chain;
        let mut off = SEGMENT_HEADER_BYTES;
        loop {
            let (damage_at, reason, search_from) = match decode_record(bytes, off, seed, chain) {
                Decoded::Record(f) => {
                    let payload = &bytes[f.payload_offset..f.payload_offset + f.payload_len];
                    let applied = if off == SEGMENT_HEADER_BYTES && f.kind != kind::METADATA {
                        Err("segment does not start with a metadata record".to_string())
                    } else {
                        self.apply(f.kind, f.position, payload, off as u64, (f.end - off) as u64)
                    };
                    if let Err(reason) = applied {
                        // A record that is valid but makes no sense here is never a torn tail.
                        if self.mode == RecoveryMode::PointInTime {
                            self.scan.chain = chain;
                            self.stop(path, off as u64, reason, file_len - off as u64, later);
                            return Ok(Outcome::Stopped);
                        }
                        return Err(Self::corrupt(path, off as u64, reason));
                    }
                    chain = f.chain;
                    off = f.end;
                    self.scan.report.records_read += 1;
                    continue;
                }
                Decoded::End => match valid_record_after(bytes, off, seed) {
                    None if off >= header_end => {
                        self.scan.chain = chain;
                        return Ok(Outcome::End(off as u64));
                    }
                    None => (off, "the segment ends inside its header records".to_string(), off),
                    Some(_) => (off, "a zero length word".to_string(), off),
                },
                Decoded::Damage(d) => (off, d.to_string(), off + format::ALIGN),
            };
            self.scan.chain = chain;
            return self.damage(path, &file, bytes, seed, damage_at, header_end, reason, search_from, is_last, later);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn damage(
        &mut self,
        path: &Path,
        file: &Arc<dyn FsFile>,
        bytes: &[u8],
        seed: u32,
        at: usize,
        header_end: usize,
        reason: String,
        search_from: usize,
        is_last: bool,
        later: &[(u64, u64, PathBuf)],
    ) -> Result<Outcome> {
        let valid_after = valid_record_after(bytes, search_from, seed);
        // The dropped bytes: the words from `at` up to the next zero word (the end of
        // what the torn write left; a recycled file's older bytes may follow it).
        let tail_len = bytes[at..]
            .chunks(format::ALIGN)
            .position(|w| w.iter().all(|&b| b == 0))
            .map_or(bytes.len() - at, |w| w * format::ALIGN) as u64;
        let torn = is_last && valid_after.is_none() && at >= header_end;
        match self.mode {
            RecoveryMode::PointInTime => {
                if torn && self.access == Access::ReadOnly {
                    // A writer may be in the middle of an append: an unfinished tail.
                    self.note_torn(path, at, tail_len, reason);
                    return Ok(Outcome::End(at as u64));
                }
                let file_len = file.len().map_err(io("stat segment", path))?;
                self.stop(path, at as u64, reason, file_len - at as u64, later);
                Ok(Outcome::Stopped)
            }
            RecoveryMode::TolerateTornTail if torn => {
                if self.access == Access::Write && tail_len > 0 {
                    let zeros = vec![0u8; tail_len as usize];
                    file.write_all_at(&zeros, at as u64).map_err(io("zero torn tail", path))?;
                    file.sync_data().map_err(io("fdatasync after zeroing torn tail", path))?;
                }
                self.note_torn(path, at, tail_len, reason);
                Ok(Outcome::End(at as u64))
            }
            RecoveryMode::Strict if torn && self.access == Access::ReadOnly => {
                self.note_torn(path, at, tail_len, reason);
                Ok(Outcome::End(at as u64))
            }
            _ => {
                let reason = match valid_after {
                    Some(v) => format!("{reason}, and a valid record follows at byte {v}"),
                    None if !is_last => format!("{reason}, in a segment that is not the last"),
                    None => reason,
                };
                Err(Self::corrupt(path, at as u64, reason))
            }
        }
    }

    fn note_torn(&mut self, path: &Path, at: usize, bytes_dropped: u64, reason: String) {
        tracing::warn!(path = %path.display(), offset = at, bytes_dropped, %reason, "dropped torn tail of the log");
        self.scan.report.torn_tail =
            Some(TornTail { path: path.to_path_buf(), offset: at as u64, bytes_dropped, reason });
    }

    /// Applies one valid record to the scan state; `Err` is a reason for corruption.
    fn apply(&mut self, kind: u16, position: u64, payload: &[u8], offset: u64, frame_len: u64) -> Result<(), String> {
        match kind {
            kind::METADATA => match &self.metadata {
                None => self.metadata = Some(payload.to_vec()),
                Some(m) if m == payload => {}
                Some(_) => return Err("metadata differs from the first segment's".into()),
            },
            kind::STATE => self.scan.state = Some(payload.to_vec()),
            kind::SNAPSHOT_MARKER => {
                let seg = self.scan.segments.last_mut().ok_or("marker outside a segment")?;
                let m = Marker { position, payload: payload.to_vec() };
                self.scan.marker = Some(m.clone());
                seg.markers.push(m);
            }
            kind::TRUNCATE => {
                truncate_index(&mut self.scan.segments, position);
                self.scan.last_position = self.scan.last_position.min(position.checked_sub(1));
            }
            _ => {
                if let Some(last) = self.scan.last_position
                    && position <= last
                {
                    return Err(format!("record position {position} does not rise above {last}"));
                }
                self.scan.last_position = Some(position);
                let seg = self.scan.segments.last_mut().ok_or("record outside a segment")?;
                seg.records.push(IndexEntry { position, offset, frame_len });
            }
        }
        Ok(())
    }
}
