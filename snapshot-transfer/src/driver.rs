//! Drivers that carry out the state machines' work on files through [`Fs`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use xxhash_rust::xxh3::Xxh3;

use crate::error::{Error, Result, io};
use crate::frame::{FileMeta, Frame, Manifest};
use crate::fs::{Fs, FsFile, OpenMode};
use crate::receiver::{Action, RESERVED_PREFIX, Receiver};
use crate::sender::ReadRequest;

const READ_BUFFER_BYTES: usize = 1 << 20;

/// Creates `dir` and its missing ancestors, syncing the parent of each one
/// made, top down, so that none of them can vanish in a crash.
fn create_dir_durably(fs: &dyn Fs, dir: &Path) -> Result<()> {
    let mut made = Vec::new();
    let mut p = dir.to_path_buf();
    while !fs.exists(&p).map_err(io("stat", &p))? {
        made.push(p.clone());
        match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => p = parent.to_path_buf(),
            _ => break,
        }
    }
    fs.create_dir_all(dir).map_err(io("create directory", dir))?;
    for m in made.iter().rev() {
        if let Some(parent) = m.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs.sync_dir(parent).map_err(io("fsync directory", parent))?;
        }
    }
    Ok(())
}

/// xxh3-64 and length of a file, read in bounded pieces.
fn checksum_file(file: &dyn FsFile, path: &Path) -> Result<(u64, u64)> {
    let len = file.len().map_err(io("stat", path))?;
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; READ_BUFFER_BYTES];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(READ_BUFFER_BYTES as u64) as usize;
        file.read_exact_at(&mut buf[..n], off).map_err(io("read", path))?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok((h.digest(), len))
}

/// A file for [`Source::open_known`]: the name it is sent under, where it
/// is, and its xxh3-64 if the caller already knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceFile {
    /// The plain name on the wire (see [`Source::open_files`]).
    pub name: String,
    /// The file to read.
    pub path: PathBuf,
    /// xxh3-64 of the whole file, as whoever wrote it recorded it (for
    /// example `cairn_lsm::CheckpointTable::xxh3`). `None`: the file is read
    /// once to compute it. A wrong value cannot hand over damage: the
    /// receiver checks every file against it, receives a mismatching file
    /// again, and refuses the transfer after
    /// [`Config::file_checksum_failures_max`] mismatches of one file.
    ///
    /// [`Config::file_checksum_failures_max`]: crate::Config::file_checksum_failures_max
    pub xxh3: Option<u64>,
}

/// The sender's side: the files of a checkpoint, read on demand.
#[derive(Debug)]
pub struct Source {
    files: Vec<(PathBuf, Box<dyn FsFile>, u64)>,
    buf: Vec<u8>,
    /// Per file, the end of what was asked to be read ahead.
    prefetched: Vec<u64>,
}

/// How far ahead of its reads the sender asks the kernel to read a file.
const PREFETCH_BYTES: u64 = 32 << 20;

impl Source {
    /// Opens `names` in `dir` and builds the manifest (each file is read once
    /// for its checksum).
    pub fn open(
        fs: &dyn Fs,
        dir: &Path,
        names: &[String],
        index: u64,
        term: u64,
        transfer_id: u64,
    ) -> Result<(Source, Manifest)> {
        let files: Vec<(String, PathBuf)> = names.iter().map(|n| (n.clone(), dir.join(n))).collect();
        Source::open_files(fs, &files, index, term, transfer_id)
    }

    /// Opens the files at the paths given, each sent under the plain name
    /// paired with it (for a checkpoint laid out in subdirectories, whose
    /// receiver puts each name back in its place), and builds the manifest.
    pub fn open_files(
        fs: &dyn Fs,
        named: &[(String, PathBuf)],
        index: u64,
        term: u64,
        transfer_id: u64,
    ) -> Result<(Source, Manifest)> {
        let files: Vec<SourceFile> = named
            .iter()
            .map(|(name, path)| SourceFile { name: name.clone(), path: path.clone(), xxh3: None })
            .collect();
        Source::open_known(fs, &files, index, term, transfer_id)
    }

    /// Like [`Source::open_files`], but a file whose checksum the caller
    /// knows is not read to build the manifest: only its length is taken.
    pub fn open_known(
        fs: &dyn Fs,
        named: &[SourceFile],
        index: u64,
        term: u64,
        transfer_id: u64,
    ) -> Result<(Source, Manifest)> {
        let mut files = Vec::new();
        let mut metas = Vec::new();
        for SourceFile { name, path, xxh3 } in named {
            crate::frame::check_name(name)?;
            let path = path.clone();
            let f = fs.open(&path, OpenMode::Read).map_err(io("open checkpoint file", &path))?;
            let (checksum, len) = match xxh3 {
                Some(x) => (*x, f.len().map_err(io("stat", &path))?),
                None => checksum_file(&*f, &path)?,
            };
            metas.push(FileMeta { name: name.clone(), len, checksum });
            files.push((path, f, len));
        }
        let prefetched = vec![0; files.len()];
        Ok((Source { files, buf: Vec::new(), prefetched }, Manifest { transfer_id, index, term, files: metas }))
    }

    /// Reads what the sender asked for.
    pub fn read(&mut self, req: &ReadRequest) -> Result<&[u8]> {
        let (path, f, len) = self.files.get(req.file as usize).ok_or(Error::Config("read of an unknown file"))?;
        let end = req.offset + u64::from(req.len);
        if end > *len {
            return Err(Error::SourceChanged(path.clone()));
        }
        // Keep the disk reading ahead (half a window at a time) while this
        // thread frames and sends what it has.
        let ahead = &mut self.prefetched[req.file as usize];
        if *ahead < req.offset {
            *ahead = req.offset;
        }
        if *ahead < *len && *ahead < end + PREFETCH_BYTES / 2 {
            let to = (end + PREFETCH_BYTES).min(*len);
            if let Err(e) = f.prefetch(*ahead, to - *ahead) {
                tracing::debug!(error = %e, path = %path.display(), "read-ahead hint failed");
            }
            *ahead = to;
        }
        self.buf.resize(req.len as usize, 0);
        f.read_exact_at(&mut self.buf, req.offset).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Error::SourceChanged(path.clone()),
            _ => Error::Io { op: "read checkpoint file", path: path.clone(), source: e },
        })?;
        Ok(&self.buf)
    }
}

/// A checkpoint received, verified and durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completed {
    /// The staging directory holding the files.
    pub dir: PathBuf,
    /// What it holds.
    pub manifest: Manifest,
}

/// The name of the progress log in a staging directory.
pub const PROGRESS_FILE: &str = ".cairn-progress";
const PROGRESS_MAGIC: [u8; 8] = *b"CAIRNXFR";
const PROGRESS_VERSION: u32 = 1;
const PROGRESS_RECORD_BYTES: usize = 24;
const STAGING_PREFIX: &str = "checkpoint-";

#[derive(Debug)]
struct Open {
    manifest: Manifest,
    dir: PathBuf,
    /// Shared with a background persist (see [`Staging::set_background_persist`]).
    files: Vec<Arc<dyn FsFile>>,
    /// Per file, the checksum of the bytes written so far and their count,
    /// while the file has been written in order from offset 0 in this
    /// process; `None` once it was not (resumed, linked, written out of
    /// order), and then verification reads the file back.
    written: Vec<Option<Running>>,
    progress: Arc<dyn FsFile>,
    progress_len: u64,
}

/// A persist running on a thread of its own: its offsets, and the thread
/// (which fdatasyncs the files, then appends and fdatasyncs the records).
#[derive(Debug)]
struct Persisting {
    /// The checkpoint (index, term) it is for: its result is given to no
    /// other. (A sender that reconnects or restarts carries on the same
    /// checkpoint under a new transfer id; the persist is still its own.)
    checkpoint: Option<(u64, u64)>,
    offsets: Vec<(u32, u64)>,
    thread: std::thread::JoinHandle<Result<()>>,
}

/// The checksum of the bytes written to a file in order from offset 0.
struct Running {
    hash: Box<Xxh3>,
    len: u64,
}

impl Running {
    fn new() -> Running {
        Running { hash: Box::new(Xxh3::new()), len: 0 }
    }
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").field("len", &self.len).finish_non_exhaustive()
    }
}

/// The receiver's side: staging directories under a root, one per checkpoint
/// (`checkpoint-{index:016x}-{term:016x}`), each with its progress log.
///
/// The progress log makes resume safe: a range is recorded only after the
/// file's data was fsynced, and acknowledged only after the record is fsynced.
#[derive(Debug)]
pub struct Staging {
    fs: Arc<dyn Fs>,
    root: PathBuf,
    reference_dirs: Vec<PathBuf>,
    open: Option<Open>,
    completed: Option<Completed>,
    skip_data_sync: bool,
    write_behind: bool,
    background_persist: bool,
    persisting: Option<Persisting>,
}

fn encode_progress_record(file: u32, offset: u64) -> [u8; PROGRESS_RECORD_BYTES] {
    let mut r = [0u8; PROGRESS_RECORD_BYTES];
    r[0..4].copy_from_slice(&file.to_le_bytes());
    r[8..16].copy_from_slice(&offset.to_le_bytes());
    let check = xxhash_rust::xxh3::xxh3_64(&r[..16]);
    r[16..24].copy_from_slice(&check.to_le_bytes());
    r
}

fn progress_records(records: &[(u32, u64)]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(records.len() * PROGRESS_RECORD_BYTES);
    for &(f, off) in records {
        buf.extend_from_slice(&encode_progress_record(f, off));
    }
    buf
}

/// Reads a progress log: the manifest it is for, and the durable offset of
/// each file (the valid prefix of records; a torn last record is ignored).
fn read_progress(fs: &dyn Fs, path: &Path) -> Option<(Manifest, Vec<u64>, u64)> {
    let f = fs.open(path, OpenMode::Read).ok()?;
    let len = f.len().ok()?;
    let mut buf = vec![0u8; usize::try_from(len).ok()?];
    f.read_exact_at(&mut buf, 0).ok()?;
    if buf.get(..8)? != PROGRESS_MAGIC || u32::from_le_bytes(buf.get(8..12)?.try_into().ok()?) != PROGRESS_VERSION {
        return None;
    }
    let mlen = u32::from_le_bytes(buf.get(12..16)?.try_into().ok()?) as usize;
    let head_end = 16usize.checked_add(mlen)?;
    let check = u64::from_le_bytes(buf.get(head_end..head_end + 8)?.try_into().ok()?);
    if xxhash_rust::xxh3::xxh3_64(&buf[..head_end]) != check {
        return None;
    }
    let (frame, _) = Frame::decode(&buf[16..head_end], mlen).ok()??;
    let Frame::Offer { manifest, .. } = frame else { return None };
    let mut durable = vec![0u64; manifest.files.len()];
    let mut at = head_end + 8;
    while let Some(r) = buf.get(at..at + PROGRESS_RECORD_BYTES) {
        let (file, offset) =
            (u32::from_le_bytes(r[0..4].try_into().ok()?), u64::from_le_bytes(r[8..16].try_into().ok()?));
        if r != encode_progress_record(file, offset) || file as usize >= durable.len() {
            break;
        }
        durable[file as usize] = offset.min(manifest.files[file as usize].len);
        at += PROGRESS_RECORD_BYTES;
    }
    Some((manifest, durable, at as u64))
}

impl Staging {
    /// Staging under `root`; files identical by content found in
    /// `reference_dirs` (for example the node's own live tables) are
    /// hard-linked instead of received.
    pub fn new(fs: Arc<dyn Fs>, root: impl Into<PathBuf>, reference_dirs: Vec<PathBuf>) -> Self {
        Staging {
            fs,
            root: root.into(),
            reference_dirs,
            open: None,
            completed: None,
            skip_data_sync: false,
            write_behind: true,
            background_persist: false,
            persisting: None,
        }
    }

    /// Whether a persist runs on a thread of its own while the receiver goes
    /// on writing what arrives (default off: [`Staging::drive`] does the
    /// persist itself, and returns when it is done). The order that makes a
    /// crash safe is the same: the files' data is fdatasynced, then the
    /// offsets are recorded and fdatasynced, then they are acknowledged. The
    /// caller must then call [`Staging::drive`] again once
    /// the persist's thread ends, even when no frame arrives, since the
    /// acknowledgements wait for it: while [`Staging::persist_pending`], call
    /// [`Staging::drive`] every millisecond or so.
    pub fn set_background_persist(&mut self, on: bool) {
        self.background_persist = on;
    }

    /// A background persist was started and [`Staging::drive`] has not yet
    /// taken its result (it may have ended already).
    pub fn persist_pending(&self) -> bool {
        self.persisting.is_some()
    }

    /// Whether each write goes to the disk at once, around the page cache
    /// where it can ([`FsFile::write_uncached_at`]: direct I/O on Linux,
    /// else a cached write with its writeback started), so that the disk
    /// writes while more data arrives and each persist waits for less.
    /// Default on; off, writes go through the cache, the kernel writes them
    /// back when it sees fit and each persist waits for all.
    pub fn set_write_behind(&mut self, on: bool) {
        self.write_behind = on;
    }

    /// Replaces the directories searched for files identical by content
    /// (for example when the node's live tables moved).
    pub fn set_reference_dirs(&mut self, dirs: Vec<PathBuf>) {
        self.reference_dirs = dirs;
    }

    /// Test-only: record ranges without the fdatasync of their data first, to
    /// show that the crash tests catch it. Never set this in a real node.
    #[doc(hidden)]
    pub fn skip_data_sync_for_tests(&mut self, skip: bool) {
        self.skip_data_sync = skip;
    }

    /// The completed checkpoint, once there is one.
    pub fn take_completed(&mut self) -> Option<Completed> {
        self.completed.take()
    }

    fn staging_dir(&self, m: &Manifest) -> PathBuf {
        self.root.join(format!("{STAGING_PREFIX}{:016x}-{:016x}", m.index, m.term))
    }

    /// Carries out the receiver's actions until it has none; frames to send go
    /// to `send`. On an I/O error the receiver is told (it rejects the transfer)
    /// and the error is returned: the caller decides whether the node goes on.
    pub fn drive(&mut self, rx: &mut Receiver, send: &mut dyn FnMut(Frame)) -> Result<()> {
        loop {
            let r = self.finish_persist(rx, false);
            self.fail_on_error(r, rx, send)?;
            let Some(action) = rx.poll_action() else { return Ok(()) };
            let r = match action {
                Action::Send(f) => {
                    send(f);
                    Ok(())
                }
                Action::Prepare { manifest } => {
                    // A persist of the transfer this one replaces: its records
                    // are in the log (Prepare reads them back), its result is
                    // not this transfer's.
                    if let Some(p) = self.persisting.take() {
                        let _ = p.thread.join();
                    }
                    self.prepare(manifest).map(|d| rx.handle_prepared(&d))
                }
                Action::Write { file, offset, data } => self.write(file, offset, &data),
                Action::Persist { offsets } if self.background_persist => {
                    self.start_persist(offsets, rx.manifest().map(|m| (m.index, m.term)))
                }
                Action::Persist { offsets } => self.persist(&offsets).map(|()| rx.handle_persisted(&offsets)),
                // The receiver asks for these only once nothing is being
                // persisted; waiting keeps the log's records in order anyway.
                Action::Verify { file } => self
                    .finish_persist(rx, true)
                    .and_then(|()| self.verify(file))
                    .map(|ok| rx.handle_verified(file, ok)),
                Action::Reset { file } => self.finish_persist(rx, true).and_then(|()| self.reset(file)),
                Action::Complete { manifest } => {
                    self.finish_persist(rx, true).and_then(|()| self.complete(manifest)).map(|()| rx.handle_completed())
                }
            };
            self.fail_on_error(r, rx, send)?;
        }
    }

    /// On an I/O error: the receiver rejects the transfer (its frames are
    /// sent), the staging area is closed, and the error returned.
    fn fail_on_error(&mut self, r: Result<()>, rx: &mut Receiver, send: &mut dyn FnMut(Frame)) -> Result<()> {
        let Err(e) = r else { return Ok(()) };
        tracing::error!(error = %e, "snapshot receiver failed to write; rejecting the transfer");
        rx.handle_io_error(&e.to_string());
        while let Some(a) = rx.poll_action() {
            if let Action::Send(f) = a {
                send(f);
            }
        }
        if let Some(p) = self.persisting.take() {
            let _ = p.thread.join();
        }
        self.open = None;
        Err(e)
    }

    /// Takes the result of the background persist if it is done (or, with
    /// `wait`, once it is) and tells the receiver.
    fn finish_persist(&mut self, rx: &mut Receiver, wait: bool) -> Result<()> {
        if !self.persisting.as_ref().is_some_and(|p| wait || p.thread.is_finished()) {
            return Ok(());
        }
        let Some(p) = self.persisting.take() else { return Ok(()) };
        let r = p.thread.join().map_err(|_| Error::Failed("the persist thread panicked".into()))?;
        r?;
        if let Some(o) = self.open.as_mut() {
            o.progress_len += (p.offsets.len() * PROGRESS_RECORD_BYTES) as u64;
        }
        // A newer checkpoint may have replaced the transfer meanwhile (its
        // Prepare, queued, starts from what the log holds).
        if rx.manifest().map(|m| (m.index, m.term)) == p.checkpoint {
            rx.handle_persisted(&p.offsets);
        }
        Ok(())
    }

    /// Starts a persist on a thread of its own.
    fn start_persist(&mut self, offsets: Vec<(u32, u64)>, checkpoint: Option<(u64, u64)>) -> Result<()> {
        // The receiver keeps one persist outstanding at a time.
        debug_assert!(self.persisting.is_none(), "one persist at a time");
        let o = self.open.as_ref().ok_or(Error::Config("no staging area open"))?;
        let mut files = Vec::new();
        if !self.skip_data_sync {
            for &(file, _) in &offsets {
                let h = o.files.get(file as usize).ok_or(Error::Config("file outside the manifest"))?;
                files.push((Arc::clone(h), o.dir.join(&o.manifest.files[file as usize].name)));
            }
        }
        let records = progress_records(&offsets);
        let (progress, at, path) = (Arc::clone(&o.progress), o.progress_len, o.dir.join(PROGRESS_FILE));
        let thread = std::thread::Builder::new()
            .name("cairn-xfer-persist".into())
            .spawn(move || {
                for (f, p) in &files {
                    f.sync_data().map_err(io("fdatasync staged file", p))?;
                }
                progress.write_all_at(&records, at).map_err(io("write progress", &path))?;
                progress.sync_data().map_err(io("fdatasync progress", &path))
            })
            .map_err(|e| Error::Io { op: "start the persist thread", path: o.dir.clone(), source: e })?;
        self.persisting = Some(Persisting { checkpoint, offsets, thread });
        Ok(())
    }

    fn with_file<T>(&self, file: u32, f: impl FnOnce(&dyn FsFile, &Path) -> Result<T>) -> Result<T> {
        let o = self.open.as_ref().ok_or(Error::Config("no staging area open"))?;
        let h = o.files.get(file as usize).ok_or(Error::Config("file outside the manifest"))?;
        f(&**h, &o.dir.join(&o.manifest.files[file as usize].name))
    }

    fn append_progress(&mut self, records: &[(u32, u64)]) -> Result<()> {
        let o = self.open.as_mut().ok_or(Error::Config("no staging area open"))?;
        let buf = progress_records(records);
        let path = o.dir.join(PROGRESS_FILE);
        o.progress.write_all_at(&buf, o.progress_len).map_err(io("write progress", &path))?;
        o.progress.sync_data().map_err(io("fdatasync progress", &path))?;
        o.progress_len += buf.len() as u64;
        Ok(())
    }

    /// Opens or creates the staging area, links in what it already holds
    /// elsewhere, and drops the staging areas of older checkpoints.
    fn prepare(&mut self, manifest: Manifest) -> Result<Vec<u64>> {
        let fs = Arc::clone(&self.fs);
        let dir = self.staging_dir(&manifest);
        self.open = None;
        create_dir_durably(&*fs, &self.root)?;
        if let Some(parent) = self.root.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs.sync_dir(parent).map_err(io("fsync staging root's parent", parent))?;
        }
        let progress_path = dir.join(PROGRESS_FILE);
        let previous = if fs.exists(&dir).map_err(io("stat", &dir))? {
            read_progress(&*fs, &progress_path).filter(|(m, _, _)| m.same_checkpoint(&manifest))
        } else {
            fs.create_dir_all(&dir).map_err(io("create staging directory", &dir))?;
            None
        };
        // Always: a directory made before a process crash may not be durable yet.
        fs.sync_dir(&self.root).map_err(io("fsync staging root", &self.root))?;
        let (mut durable, progress, progress_len) = match previous {
            Some((_, durable, len)) => {
                let p = fs.open(&progress_path, OpenMode::ReadWrite).map_err(io("open progress", &progress_path))?;
                (durable, p, len)
            }
            None => {
                // Not ours (or unreadable): start this staging area afresh.
                for name in fs.read_dir(&dir).map_err(io("list staging directory", &dir))? {
                    fs.remove_file(&dir.join(&name)).map_err(io("remove stale staged file", dir.join(&name)))?;
                }
                let mut head = Vec::new();
                head.extend_from_slice(&PROGRESS_MAGIC);
                head.extend_from_slice(&PROGRESS_VERSION.to_le_bytes());
                let m = Frame::Offer { manifest: manifest.clone(), window_bytes: 0 }.to_bytes();
                head.extend_from_slice(&(m.len() as u32).to_le_bytes());
                head.extend_from_slice(&m);
                let check = xxhash_rust::xxh3::xxh3_64(&head);
                head.extend_from_slice(&check.to_le_bytes());
                let p = fs.open(&progress_path, OpenMode::CreateNew).map_err(io("create progress", &progress_path))?;
                p.write_all_at(&head, 0).map_err(io("write progress", &progress_path))?;
                p.sync_data().map_err(io("fdatasync progress", &progress_path))?;
                (vec![0; manifest.files.len()], p, head.len() as u64)
            }
        };
        // Bring in files identical by content from older staging areas and the
        // reference directories.
        let mut linked = Vec::new();
        for (i, meta) in manifest.files.iter().enumerate() {
            if durable[i] == meta.len {
                continue;
            }
            if let Some(src) = self.find_identical(meta, &dir)? {
                let dst = dir.join(&meta.name);
                if fs.exists(&dst).map_err(io("stat", &dst))? {
                    fs.remove_file(&dst).map_err(io("remove partial file", &dst))?;
                }
                if fs.hard_link(&src, &dst).is_ok() {
                    tracing::debug!(file = %meta.name, from = %src.display(), "reusing a file held locally");
                    linked.push((i as u32, meta.len));
                    durable[i] = meta.len; // recorded below, once the link is durable
                }
            }
        }
        // Every file exists (and its name is durable) before any offset in it is recorded.
        let mut files = Vec::with_capacity(manifest.files.len());
        for (i, meta) in manifest.files.iter().enumerate() {
            let p = dir.join(&meta.name);
            // A file with nothing recorded is made anew, never written into: it
            // may be a hard link (to a live table) left by a reset cut short.
            if durable[i] == 0 && fs.exists(&p).map_err(io("stat", &p))? {
                fs.remove_file(&p).map_err(io("remove unrecorded staged file", &p))?;
            }
            let f = if fs.exists(&p).map_err(io("stat", &p))? {
                let f = fs.open(&p, OpenMode::ReadWrite).map_err(io("open staged file", &p))?;
                durable[i] = durable[i].min(f.len().map_err(io("stat", &p))?);
                f
            } else {
                durable[i] = 0;
                fs.open(&p, OpenMode::CreateNew).map_err(io("create staged file", &p))?
            };
            files.push(Arc::from(f));
        }
        fs.sync_dir(&dir).map_err(io("fsync staging directory", &dir))?;
        let written = durable.iter().map(|&d| (d == 0).then(Running::new)).collect();
        self.open = Some(Open {
            manifest: manifest.clone(),
            dir: dir.clone(),
            files,
            written,
            progress: Arc::from(progress),
            progress_len,
        });
        if !linked.is_empty() {
            self.append_progress(&linked)?;
        }
        self.remove_older(&manifest)?;
        Ok(durable)
    }

    /// A file with the same name, length and checksum in an older staging area
    /// (by its progress log) or a reference directory (read to compare).
    fn find_identical(&self, meta: &FileMeta, exclude: &Path) -> Result<Option<PathBuf>> {
        let fs = &*self.fs;
        for name in fs.read_dir(&self.root).map_err(io("list staging root", &self.root))? {
            let other = self.root.join(&name);
            if !name.starts_with(STAGING_PREFIX) || other == exclude {
                continue;
            }
            if let Some((m, durable, _)) = read_progress(fs, &other.join(PROGRESS_FILE))
                && let Some(i) = m.files.iter().position(|f| f == meta)
                && durable[i] == meta.len
            {
                return Ok(Some(other.join(&meta.name)));
            }
        }
        for d in &self.reference_dirs {
            let p = d.join(&meta.name);
            if let Ok(f) = fs.open(&p, OpenMode::Read)
                && f.len().ok() == Some(meta.len)
                && checksum_file(&*f, &p)?.0 == meta.checksum
            {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }

    fn remove_older(&self, m: &Manifest) -> Result<()> {
        let fs = &*self.fs;
        for name in fs.read_dir(&self.root).map_err(io("list staging root", &self.root))? {
            let Some(rest) = name.strip_prefix(STAGING_PREFIX) else { continue };
            let mut parts = rest.split('-').map(|x| u64::from_str_radix(x, 16).ok());
            let (Some(Some(index)), Some(Some(term))) = (parts.next(), parts.next()) else { continue };
            if (index, term) < (m.index, m.term) {
                let d = self.root.join(&name);
                for f in fs.read_dir(&d).map_err(io("list old staging directory", &d))? {
                    fs.remove_file(&d.join(&f)).map_err(io("remove old staged file", d.join(&f)))?;
                }
                fs.remove_dir(&d).map_err(io("remove old staging directory", &d))?;
            }
        }
        fs.sync_dir(&self.root).map_err(io("fsync staging root", &self.root))
    }

    /// Writes received bytes (to the disk at once, unless turned off), and carries the file's running checksum on when they follow what was
    /// written before.
    fn write(&mut self, file: u32, offset: u64, data: &[u8]) -> Result<()> {
        let write_behind = self.write_behind;
        self.with_file(file, |f, p| {
            if write_behind {
                f.write_uncached_at(data, offset).map_err(io("write staged file", p))
            } else {
                f.write_all_at(data, offset).map_err(io("write staged file", p))
            }
        })?;
        if let Some(slot) = self.open.as_mut().and_then(|o| o.written.get_mut(file as usize)) {
            *slot = match slot.take() {
                Some(mut r) if r.len == offset => {
                    r.hash.update(data);
                    r.len += data.len() as u64;
                    Some(r)
                }
                _ => None,
            };
        }
        Ok(())
    }

    fn persist(&mut self, offsets: &[(u32, u64)]) -> Result<()> {
        for &(file, _) in offsets.iter().filter(|_| !self.skip_data_sync) {
            self.with_file(file, |f, p| f.sync_data().map_err(io("fdatasync staged file", p)))?;
        }
        self.append_progress(offsets)
    }

    fn verify(&self, file: u32) -> Result<bool> {
        let o = self.open.as_ref().ok_or(Error::Config("no staging area open"))?;
        let meta = o.manifest.files.get(file as usize).ok_or(Error::Config("file outside the manifest"))?;
        // Written in order by this process: the bytes were checksummed on
        // their way to the file; nothing else wrote to it since.
        if let Some(Some(r)) = o.written.get(file as usize)
            && r.len == meta.len
        {
            let f = &o.files[file as usize];
            let len = f.len().map_err(io("stat", &o.dir.join(&meta.name)))?;
            return Ok(len == meta.len && r.hash.digest() == meta.checksum);
        }
        let (sum, len) = checksum_file(&*o.files[file as usize], &o.dir.join(&meta.name))?;
        Ok(len == meta.len && sum == meta.checksum)
    }

    fn reset(&mut self, file: u32) -> Result<()> {
        // Record offset 0 first: a crash between the two leaves a file longer
        // than its recorded offset, which is safe. Then unlink and create the
        // file anew rather than truncating it: it may be a hard link to a file
        // elsewhere (a live table), which must not change.
        self.append_progress(&[(file, 0)])?;
        let fs = Arc::clone(&self.fs);
        let o = self.open.as_mut().ok_or(Error::Config("no staging area open"))?;
        let meta = o.manifest.files.get(file as usize).ok_or(Error::Config("file outside the manifest"))?;
        let p = o.dir.join(&meta.name);
        fs.remove_file(&p).map_err(io("remove damaged staged file", &p))?;
        o.files[file as usize] = Arc::from(fs.open(&p, OpenMode::CreateNew).map_err(io("create staged file", &p))?);
        o.written[file as usize] = Some(Running::new());
        fs.sync_dir(&o.dir).map_err(io("fsync staging directory", &o.dir))
    }

    fn complete(&mut self, manifest: Manifest) -> Result<()> {
        let o = self.open.as_ref().ok_or(Error::Config("no staging area open"))?;
        self.fs.sync_dir(&o.dir).map_err(io("fsync staging directory", &o.dir))?;
        self.fs.sync_dir(&self.root).map_err(io("fsync staging root", &self.root))?;
        self.completed = Some(Completed { dir: o.dir.clone(), manifest });
        Ok(())
    }
}

/// Whether `name` is one of the receiver's own files in a staging directory.
pub fn is_reserved_name(name: &str) -> bool {
    name.starts_with(RESERVED_PREFIX)
}
