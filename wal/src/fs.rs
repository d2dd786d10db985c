//! The file-system seam: every byte the log reads or writes goes through [`Fs`].
//!
//! [`StdFs`] is the real thing (Unix). With the `sim` feature,
//! [`crate::sim::SimDisk`] provides a simulated disk that loses what was not
//! made durable when it "crashes"; other Cairn crates run their crash tests on it.

use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};

/// How [`Fs::open`] opens a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Read only; the file must exist.
    Read,
    /// Read and write; the file must exist.
    ReadWrite,
    /// Read and write; the file must not exist yet.
    CreateNew,
}

/// An open file. Offsets are explicit: there is no cursor to share.
pub trait FsFile: Send + Sync + Debug {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (0 at end of file).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`, growing the file if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the file's data durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// The file's length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Sets the file's length (truncates or extends with zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Asks the system to start writing the `len` bytes at `offset` to the
    /// disk now, without waiting: a hint, so that a large file written in
    /// pieces reaches the disk as it goes rather than in one burst at its
    /// [`FsFile::sync_data`] (which stalls other files' syncs behind it).
    /// Durability still comes only from `sync_data`. The default does nothing.
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Fills `buf` from `offset`; fails with `UnexpectedEof` if the file is shorter.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset)? {
                0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                n => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }
}

/// A held lock; dropping it releases the lock.
pub trait FsLock: Send + Sync + Debug {}

/// The file-system operations the log needs, so that tests can substitute a
/// simulated disk. Directory changes (create, rename, hard link, unlink) are
/// durable only after [`Fs::sync_dir`] on the parent directory.
pub trait Fs: Send + Sync + Debug {
    /// Opens a file.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>>;
    /// Creates a directory and its missing parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Lists the names of the entries of a directory (files and directories).
    fn read_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Renames a file, replacing `to` if it exists.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Creates a hard link `to` of the file `from`.
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Removes an empty directory.
    fn remove_dir(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries durable (fsync of the directory).
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Whether a file or directory exists at `path`.
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// Takes an exclusive lock named by `path` (the file is created if needed),
    /// or fails with `WouldBlock` when another holder has it.
    fn try_lock_exclusive(&self, path: &Path) -> io::Result<Box<dyn FsLock>>;
}

/// The real file system, through `std::fs` (Unix only: positional I/O).
#[derive(Clone, Copy, Debug, Default)]
pub struct StdFs;

#[derive(Debug)]
struct StdFile(std::fs::File);

impl FsFile for StdFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(&self.0, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    /// On Linux, `posix_fadvise(POSIX_FADV_DONTNEED)` on the range just
    /// written: the kernel starts writeback of its dirty pages and returns;
    /// pages still dirty or under writeback stay cached (so a table just
    /// written is still read from memory). Elsewhere nothing.
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        {
            let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else { return Ok(()) };
            nix::fcntl::posix_fadvise(&self.0, offset, len, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED)
                .map_err(io::Error::from)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (offset, len);
            Ok(())
        }
    }
}

#[derive(Debug)]
struct StdLock(#[allow(dead_code)] std::fs::File);
impl FsLock for StdLock {}
impl Drop for StdLock {
    fn drop(&mut self) {
        // Closing the descriptor releases the lock as well; unlock explicitly anyway.
        let _ = self.0.unlock();
    }
}

impl Fs for StdFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>> {
        let mut o = std::fs::OpenOptions::new();
        match mode {
            OpenMode::Read => o.read(true),
            OpenMode::ReadWrite => o.read(true).write(true),
            OpenMode::CreateNew => o.read(true).write(true).create_new(true),
        };
        Ok(Box::new(StdFile(o.open(path)?)))
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }
    fn read_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(path)? {
            names.push(e?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::hard_link(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::File::open(path)?.sync_all()
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }
    fn try_lock_exclusive(&self, path: &Path) -> io::Result<Box<dyn FsLock>> {
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        match f.try_lock() {
            Ok(()) => Ok(Box::new(StdLock(f))),
            Err(std::fs::TryLockError::WouldBlock) => {
                Err(io::Error::new(io::ErrorKind::WouldBlock, "lock held by another process"))
            }
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

/// The parent directory of `path` (`.` for a bare name).
pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writeback_hints_lose_nothing_and_keep_pages_readable() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("f");
        let f = StdFs.open(&p, OpenMode::CreateNew).expect("create");
        let piece: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        for i in 0..3u64 {
            f.write_all_at(&piece, i << 20).expect("write");
            f.start_writeback(i << 20, piece.len() as u64).expect("hint");
            // The piece just hinted reads back at once, as the ones before.
            let mut back = vec![0u8; piece.len()];
            for j in 0..=i {
                f.read_exact_at(&mut back, j << 20).expect("read");
                assert!(back == piece, "piece {j} after the hint on {i}");
            }
        }
        // Ranges past the end and empty ones are fine.
        f.start_writeback(10 << 20, 0).expect("empty hint");
        f.start_writeback(u64::MAX, 1).expect("out-of-range hint is ignored");
        f.sync_data().expect("sync");
        assert_eq!(f.len().expect("len"), 3 << 20);
    }
}
