//! Table files' I/O, kept off the paths that wait and made in few requests.
//!
//! Obsolete tables are removed by the purge thread, not by the thread that
//! drops the last reference to them: closing the last descriptor of an
//! unlinked file makes the file system free its blocks (on ext4 with
//! `discard`, a trim of every extent that took up to half a second), and the
//! thread that pays for that should not be a writer or a reader.
//!
//! A compaction reads its inputs a window at a time
//! (`Options::compaction_readahead_bytes`), not a 4 KiB block per request.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use cairn_lsm::{Db, Options, WriteBatch};
use cairn_wal::{Fs, FsFile, FsLock, OpenMode, StdFs};

/// The thread names that unlinked a table file and that closed one after its
/// unlink; the reads of table files the compaction threads made.
#[derive(Debug, Default)]
struct Seen {
    unlinked: Vec<String>,
    closed: Vec<String>,
    compaction_reads: u64,
    compaction_read_bytes: u64,
}

fn thread_name() -> String {
    std::thread::current().name().unwrap_or("unnamed").to_string()
}

fn is_table(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "sst")
}

/// `StdFs`, noting which thread removes and closes table files.
#[derive(Debug, Default)]
struct Recording(Arc<Mutex<Seen>>);

#[derive(Debug)]
struct RecordingFile {
    inner: Box<dyn FsFile>,
    path: std::path::PathBuf,
    seen: Arc<Mutex<Seen>>,
}

impl Drop for RecordingFile {
    fn drop(&mut self) {
        if is_table(&self.path) && !self.path.exists() {
            self.seen.lock().expect("lock").closed.push(thread_name());
        }
    }
}

impl FsFile for RecordingFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let n = self.inner.read_at(buf, offset)?;
        if is_table(&self.path) && thread_name().starts_with("lsm-compact") {
            let mut s = self.seen.lock().expect("lock");
            s.compaction_reads += 1;
            s.compaction_read_bytes += n as u64;
        }
        Ok(n)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.inner.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

impl Fs for Recording {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>> {
        let inner = StdFs.open(path, mode)?;
        Ok(Box::new(RecordingFile { inner, path: path.to_path_buf(), seen: Arc::clone(&self.0) }))
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        StdFs.create_dir_all(path)
    }
    fn read_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        StdFs.read_dir(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        StdFs.rename(from, to)
    }
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        StdFs.hard_link(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        if is_table(path) {
            self.0.lock().expect("lock").unlinked.push(thread_name());
        }
        StdFs.remove_file(path)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        StdFs.remove_dir(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        StdFs.sync_dir(path)
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        StdFs.exists(path)
    }
    fn try_lock_exclusive(&self, path: &Path) -> io::Result<Box<dyn FsLock>> {
        StdFs.try_lock_exclusive(path)
    }
}

/// An engine in a new folder on the recording file system, with the
/// default options as `tune` changes them, and what the file system saw.
fn open_recording(tune: impl FnOnce(&mut Options)) -> (tempfile::TempDir, Db, Arc<Mutex<Seen>>) {
    let dir = tempfile::tempdir().expect("tmp");
    let fs = Recording::default();
    let seen = Arc::clone(&fs.0);
    let mut o = Options::default();
    tune(&mut o);
    let db = Db::open_with_fs(Arc::new(fs), dir.path(), o).expect("open");
    (dir, db, seen)
}

/// Tables made obsolete by a compaction while an iterator holds them, then
/// let go by this thread (dropping the iterator): who removed them?
fn removed_by(purge_queue_tables: usize) -> Seen {
    let (_dir, db, seen) = open_recording(|o| {
        o.write_buffer_bytes = 64 << 10;
        o.l0_compaction_trigger = 2;
        o.purge_queue_tables = purge_queue_tables;
    });
    let write = |round: u32| {
        let mut b = WriteBatch::new();
        for k in 0..200u32 {
            b.put(format!("key-{k:05}").into_bytes(), format!("value-{round}-{k}").repeat(8).into_bytes());
        }
        db.write(&b).expect("write");
        db.flush().expect("flush");
    };
    write(0);
    write(1);
    db.wait_idle().expect("idle");
    // The iterator holds the tables of this version.
    let held = db.range::<std::ops::RangeFull, &[u8]>(..);
    for round in 2..6 {
        write(round);
    }
    db.wait_idle().expect("idle");
    let (before, closed_before) = {
        let s = seen.lock().expect("lock");
        (s.unlinked.len(), s.closed.len())
    };
    drop(held);
    db.wait_idle().expect("idle");
    let mut s = seen.lock().expect("lock");
    assert!(s.unlinked.len() > before, "dropping the iterator removed no table: {s:?}");
    s.unlinked.drain(..before);
    s.closed.drain(..closed_before);
    let s = std::mem::take(&mut *s);
    drop(db);
    s
}

#[test]
fn obsolete_tables_are_removed_by_the_purge_thread() {
    let me = thread_name();
    let s = removed_by(256);
    assert!(s.unlinked.iter().all(|t| t == "lsm-purge"), "unlinked on {:?} (this thread is {me})", s.unlinked);
    assert!(!s.closed.is_empty() && s.closed.iter().all(|t| t == "lsm-purge"), "closed on {:?}", s.closed);
    // Teeth: without the purge thread, the thread letting go does it all.
    let s = removed_by(0);
    assert!(s.unlinked.iter().all(|t| *t == me), "{:?}", s.unlinked);
    assert!(!s.closed.is_empty() && s.closed.iter().all(|t| *t == me), "{:?}", s.closed);
}

/// Reads of table files by the compaction threads while four flushes of
/// about 1 MiB each are compacted, with `compaction_readahead_bytes` as given.
fn compaction_reads(readahead: usize) -> (u64, u64) {
    let (_dir, db, seen) = open_recording(|o| {
        o.write_buffer_bytes = 4 << 20;
        o.l0_compaction_trigger = 4;
        o.compaction_readahead_bytes = readahead;
    });
    for round in 0..4u32 {
        let mut b = WriteBatch::new();
        for k in 0..4000u32 {
            // Values that do not compress, so the tables are as large as the data.
            let mut x = u64::from(k) << 32 | u64::from(round) | 1;
            let value: Vec<u8> = (0..256)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            b.put(format!("key-{:05}", (k * 7 + round) % 16000).into_bytes(), value);
        }
        db.write(&b).expect("write");
        db.flush().expect("flush");
    }
    db.wait_idle().expect("idle");
    assert!(db.stats().compactions > 0, "nothing was compacted");
    for k in [0u32, 7, 11_993] {
        let key = format!("key-{k:05}");
        assert!(db.get(key.as_bytes()).expect("get").is_some(), "{key} is missing after the compaction");
    }
    let s = seen.lock().expect("lock");
    (s.compaction_reads, s.compaction_read_bytes)
}

#[test]
fn a_compaction_reads_its_inputs_a_window_at_a_time() {
    let (reads, bytes) = compaction_reads(256 << 10);
    // About 4 MiB of input in 256 KiB windows: some 20 reads, plus each
    // input's and output's footer, properties, filter and index.
    assert!(bytes > 2 << 20, "only {bytes} bytes of tables were read");
    assert!(reads < 150, "{reads} reads for {bytes} bytes");
    // Teeth: a read per 4 KiB block is over a thousand.
    let (reads0, bytes0) = compaction_reads(0);
    eprintln!("compaction reads: {reads} for {bytes} bytes in 256 KiB windows, {reads0} for {bytes0} without");
    assert!(reads0 > 4 * reads, "{reads0} reads for {bytes0} bytes without the window, {reads} with it");
}
