//! Removal of obsolete table and blob files on a thread of their own.
//!
//! A table a compaction replaced is deleted when its last reader lets go,
//! which may be any thread: a writer or a reader that held the old version.
//! Unlinking is cheap, but closing the last descriptor of an unlinked file
//! makes the file system free its blocks there and then; on ext4 mounted
//! with `discard` that waits for the device to trim every extent, which took
//! 0.1-0.5 s per 64 MiB table on the benchmark machine and stalled the
//! writer that happened to drop it (`docs/benchmarks.md`). So the dropping
//! thread hands the file to the purge thread (RocksDB's background purge
//! does the same), through a bounded queue; when the queue is full or the
//! thread is gone, the dropping thread removes the file itself, as before.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;

use cairn_wal::{Fs, FsFile};

/// An open file of the engine (a table's or a blob file's) that is removed,
/// through the purge thread when there is one, when it is dropped after
/// [`EngineFile::mark_obsolete`]: the last reader holding it lets go.
pub(crate) struct EngineFile {
    fs: Arc<dyn Fs>,
    path: PathBuf,
    file: Box<dyn FsFile>,
    obsolete: AtomicBool,
    /// Where the obsolete file goes to be removed (none: removed by the
    /// thread that drops it).
    purger: Option<Purger>,
}

impl EngineFile {
    pub(crate) fn new(fs: Arc<dyn Fs>, path: &Path, file: Box<dyn FsFile>) -> EngineFile {
        EngineFile { fs, path: path.to_path_buf(), file, obsolete: AtomicBool::new(false), purger: None }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn file(&self) -> &dyn FsFile {
        &*self.file
    }

    /// Obsolete files go to `purger`'s thread to be removed.
    pub(crate) fn set_purger(&mut self, purger: Option<Purger>) {
        self.purger = purger;
    }

    /// Removes the file once the last holder lets go.
    pub(crate) fn mark_obsolete(&self) {
        self.obsolete.store(true, Ordering::Release);
    }
}

impl Drop for EngineFile {
    fn drop(&mut self) {
        if self.obsolete.load(Ordering::Acquire) {
            let job = Purge {
                fs: Arc::clone(&self.fs),
                path: std::mem::take(&mut self.path),
                file: std::mem::replace(&mut self.file, Box::new(Dropped)),
            };
            match &self.purger {
                Some(p) => p.submit(job),
                None => drop(job),
            }
        }
    }
}

/// Stands in for a dropped file once it went to be removed.
#[derive(Debug)]
struct Dropped;

impl Dropped {
    fn err<T>() -> std::io::Result<T> {
        Err(std::io::Error::other("the file is dropped"))
    }
}

impl FsFile for Dropped {
    fn read_at(&self, _: &mut [u8], _: u64) -> std::io::Result<usize> {
        Self::err()
    }
    fn write_all_at(&self, _: &[u8], _: u64) -> std::io::Result<()> {
        Self::err()
    }
    fn sync_data(&self) -> std::io::Result<()> {
        Self::err()
    }
    fn len(&self) -> std::io::Result<u64> {
        Self::err()
    }
    fn set_len(&self, _: u64) -> std::io::Result<()> {
        Self::err()
    }
}

/// An obsolete table's file, removed where this is dropped: unlinked, then
/// closed (the last descriptor: the blocks are freed then).
pub(crate) struct Purge {
    pub(crate) fs: Arc<dyn Fs>,
    pub(crate) path: PathBuf,
    /// Held to be closed after the unlink.
    #[expect(dead_code, reason = "held to be closed after the unlink")]
    pub(crate) file: Box<dyn FsFile>,
}

impl Drop for Purge {
    fn drop(&mut self) {
        if let Err(e) = self.fs.remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove an obsolete table");
        }
        // `file` closes after this.
    }
}

enum Msg {
    Purge(Purge),
    Stop,
}

/// The handle tables hand their files to.
#[derive(Clone)]
pub(crate) struct Purger {
    tx: SyncSender<Msg>,
    /// Files queued or being removed.
    pending: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Purger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Purger").field("pending", &self.pending.load(Ordering::Relaxed)).finish()
    }
}

impl Purger {
    /// Starts the purge thread (`lsm-purge`) with a queue of `queue` files.
    pub(crate) fn start(queue: usize) -> std::io::Result<(Purger, JoinHandle<()>)> {
        let (tx, rx) = sync_channel(queue.max(1));
        let pending = Arc::new(AtomicUsize::new(0));
        let p = Arc::clone(&pending);
        let h = std::thread::Builder::new().name("lsm-purge".into()).spawn(move || run(rx, p))?;
        Ok((Purger { tx, pending }, h))
    }

    /// Removes `job`'s file on the purge thread, or here when its queue is
    /// full or the thread is gone.
    pub(crate) fn submit(&self, job: Purge) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        if let Err(TrySendError::Full(m) | TrySendError::Disconnected(m)) = self.tx.try_send(Msg::Purge(job)) {
            drop(m);
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Whether no file waits or is being removed.
    pub(crate) fn idle(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0
    }

    /// Asks the thread to stop once it removed every file queued before.
    pub(crate) fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
    }
}

fn run(rx: Receiver<Msg>, pending: Arc<AtomicUsize>) {
    while let Ok(Msg::Purge(job)) = rx.recv() {
        drop(job);
        pending.fetch_sub(1, Ordering::AcqRel);
    }
    // Stopped: what was queued since goes with the queue, removed as it drops.
    while let Ok(m) = rx.try_recv() {
        let queued = matches!(m, Msg::Purge(_));
        drop(m);
        if queued {
            pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_wal::OpenMode;

    fn job(dir: &std::path::Path, name: &str) -> Purge {
        let fs: Arc<dyn Fs> = Arc::new(cairn_wal::StdFs);
        let path = dir.join(name);
        let file = fs.open(&path, OpenMode::CreateNew).expect("create");
        file.write_all_at(b"table", 0).expect("write");
        Purge { fs, path, file }
    }

    #[test]
    fn files_are_removed_on_the_thread_and_inline_when_it_stopped() {
        let dir = tempfile::tempdir().expect("tmp");
        let (p, h) = Purger::start(4).expect("start");
        for i in 0..10 {
            p.submit(job(dir.path(), &format!("t{i}")));
        }
        p.stop();
        h.join().expect("join");
        assert!(p.idle());
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0, "every queued file is removed");
        // After the thread is gone the caller removes the file itself.
        p.submit(job(dir.path(), "late"));
        assert!(p.idle());
        assert!(!dir.path().join("late").exists());
    }
}
