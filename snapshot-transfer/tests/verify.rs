//! Verification of received files: a file this process wrote in order from
//! offset 0 is checked by the checksum taken of its bytes on their way to the
//! disk, without reading it back; a file it did not write that way (here: one
//! hard-linked from a reference directory) is read back whole. And each write
//! starts its own writeback unless write-behind is off. A sender given the
//! files' checksums reads each byte once; a wrong one is refused, never
//! handed over.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cairn_snapshot_transfer::{
    Config, Error, Fs, FsFile, OpenMode, PROGRESS_FILE, Source, SourceFile, Staging, StdFs, run_local,
};
use common::{assert_identical, make_checkpoint, names};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Default)]
struct Counts {
    /// Bytes read from staged data files.
    staged_reads: AtomicU64,
    /// Bytes read from the source directory.
    source_reads: AtomicU64,
    /// Writeback hints given.
    hints: AtomicU64,
    /// Writes made around the page cache.
    uncached: AtomicU64,
}

/// The real file system, counting reads of staged files and writeback hints.
#[derive(Debug)]
struct CountingFs {
    staging: PathBuf,
    source: PathBuf,
    counts: Arc<Counts>,
}

#[derive(Debug)]
struct CountingFile {
    inner: Box<dyn FsFile>,
    staged: bool,
    source: bool,
    counts: Arc<Counts>,
}

impl FsFile for CountingFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let n = self.inner.read_at(buf, offset)?;
        if self.staged {
            self.counts.staged_reads.fetch_add(n as u64, Ordering::Relaxed);
        }
        if self.source {
            self.counts.source_reads.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn start_writeback(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.counts.hints.fetch_add(1, Ordering::Relaxed);
        self.inner.start_writeback(offset, len)
    }
    fn write_uncached_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.counts.uncached.fetch_add(1, Ordering::Relaxed);
        self.inner.write_uncached_at(buf, offset)
    }
}

impl Fs for CountingFs {
    fn open(&self, path: &Path, mode: OpenMode) -> std::io::Result<Box<dyn FsFile>> {
        let staged = path.starts_with(&self.staging) && path.file_name().is_some_and(|n| n != PROGRESS_FILE);
        let source = path.starts_with(&self.source);
        Ok(Box::new(CountingFile { inner: StdFs.open(path, mode)?, staged, source, counts: self.counts.clone() }))
    }
    fn create_dir_all(&self, path: &Path) -> std::io::Result<()> {
        StdFs.create_dir_all(path)
    }
    fn read_dir(&self, path: &Path) -> std::io::Result<Vec<String>> {
        StdFs.read_dir(path)
    }
    fn hard_link(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        StdFs.hard_link(from, to)
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        StdFs.remove_file(path)
    }
    fn remove_dir(&self, path: &Path) -> std::io::Result<()> {
        StdFs.remove_dir(path)
    }
    fn sync_dir(&self, path: &Path) -> std::io::Result<()> {
        StdFs.sync_dir(path)
    }
    fn exists(&self, path: &Path) -> std::io::Result<bool> {
        StdFs.exists(path)
    }
}

/// Chunk size of these transfers: several chunks per file.
const CHUNK: u32 = 8 << 10;

fn small_chunks() -> Config {
    let mut cfg = Config::default();
    cfg.chunk_bytes_max = CHUNK;
    cfg.sync_bytes = 32 << 10;
    cfg
}

/// `files` (held in `src`) for [`Source::open_known`], each with the
/// checksum `sum(index, content)` gives.
fn listed(src: &Path, files: &[(String, Vec<u8>)], sum: impl Fn(usize, &[u8]) -> u64) -> Vec<SourceFile> {
    files
        .iter()
        .enumerate()
        .map(|(i, (n, data))| SourceFile { name: n.clone(), path: src.join(n), xxh3: Some(sum(i, data)) })
        .collect()
}

/// Sends `files` (held in `src`) to a staging area under `tmp` through the
/// counting file system, with `reference` directories, write-behind and the
/// checksums handed to the sender (`None`: it computes them) as given;
/// checks the result is identical and returns the counts.
fn transfer_counted(
    tmp: &Path,
    src: &Path,
    files: &[(String, Vec<u8>)],
    reference: Vec<PathBuf>,
    write_behind: bool,
    known: Option<Vec<u64>>,
) -> Arc<Counts> {
    let cfg = small_chunks();
    let counts = Arc::new(Counts::default());
    let root = tmp.join("staging");
    let fs: Arc<dyn Fs> =
        Arc::new(CountingFs { staging: root.clone(), source: src.to_path_buf(), counts: counts.clone() });
    let (mut source, manifest) = match known {
        None => Source::open(&*fs, src, &names(files), 10, 1, 1).expect("source"),
        Some(sums) => Source::open_known(&*fs, &listed(src, files, |i, _| sums[i]), 10, 1, 1).expect("source"),
    };
    let mut staging = Staging::new(fs.clone(), &root, reference);
    staging.set_write_behind(write_behind);
    staging.set_background_persist(true);
    let (done, _) = run_local(&cfg, &mut source, manifest, &mut staging).expect("transfer");
    assert_identical(&StdFs, &done.dir, files);
    counts
}

#[test]
fn files_written_in_order_are_not_read_back_and_a_linked_one_is() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let src = tmp.path().join("src");
    let files = make_checkpoint(&StdFs, &src, &mut rng, 4, 100_000);
    // The receiver already holds file 1 by content: it is linked, not sent.
    let live = tmp.path().join("live");
    std::fs::create_dir_all(&live).expect("mkdir");
    std::fs::write(live.join(&files[1].0), &files[1].1).expect("write");
    let counts = transfer_counted(tmp.path(), &src, &files, vec![live], true, None);
    // Only the linked file was read back, whole.
    assert_eq!(counts.staged_reads.load(Ordering::Relaxed), files[1].1.len() as u64);
    let sent_chunks: u64 =
        files.iter().enumerate().filter(|(i, _)| *i != 1).map(|(_, f)| f.1.len().div_ceil(CHUNK as usize) as u64).sum();
    // Every chunk went to the disk at once (direct I/O where the file system
    // has it: the chunks are 8 KiB at 8 KiB offsets, each file's last one
    // shorter), and the files still read back identical (checked above).
    assert_eq!(counts.uncached.load(Ordering::Relaxed), sent_chunks, "every chunk written around the cache");
}

#[test]
fn without_write_behind_no_writeback_is_started() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let src = tmp.path().join("src");
    let files = make_checkpoint(&StdFs, &src, &mut rng, 3, 50_000);
    let counts = transfer_counted(tmp.path(), &src, &files, vec![], false, None);
    assert_eq!(counts.hints.load(Ordering::Relaxed), 0);
    assert_eq!(counts.uncached.load(Ordering::Relaxed), 0);
    assert_eq!(counts.staged_reads.load(Ordering::Relaxed), 0);
}

#[test]
fn known_checksums_spare_the_senders_reading_pass() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let src = tmp.path().join("src");
    let files = make_checkpoint(&StdFs, &src, &mut rng, 4, 60_000);
    let total: u64 = files.iter().map(|f| f.1.len() as u64).sum();
    let computed = transfer_counted(&tmp.path().join("a"), &src, &files, vec![], true, None);
    assert_eq!(computed.source_reads.load(Ordering::Relaxed), 2 * total, "a checksum pass, then the chunks");
    let sums = files.iter().map(|f| xxhash_rust::xxh3::xxh3_64(&f.1)).collect();
    let known = transfer_counted(&tmp.path().join("b"), &src, &files, vec![], true, Some(sums));
    assert_eq!(known.source_reads.load(Ordering::Relaxed), total, "each byte read once, to be sent");
}

#[test]
fn a_wrong_known_checksum_is_refused_and_never_handed_over() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let src = tmp.path().join("src");
    let files = make_checkpoint(&StdFs, &src, &mut rng, 3, 40_000);
    // File 1's recorded checksum is not its content's (a table damaged on the
    // sender's disk after it was written, say).
    let listed = listed(&src, &files, |i, data| xxhash_rust::xxh3::xxh3_64(data) ^ u64::from(i == 1));
    let fs: Arc<dyn Fs> = Arc::new(StdFs);
    let (mut source, manifest) = Source::open_known(&*fs, &listed, 10, 1, 1).expect("source");
    let cfg = small_chunks();
    let mut staging = Staging::new(fs.clone(), tmp.path().join("staging"), vec![]);
    let err = run_local(&cfg, &mut source, manifest, &mut staging).expect_err("a file that never matches");
    match &err {
        Error::Failed(why) => assert!(why.contains("FileChecksum") && why.contains("3 times"), "{why}"),
        other => panic!("unexpected error: {other}"),
    }
    assert!(staging.take_completed().is_none(), "nothing handed over");
}
