//! The file-system seam the drivers use, so tests can run them on a simulated disk.
//!
//! (This crate depends on no other Cairn crate, so it has its own small trait;
//! Cairn's tests adapt cairn-wal's simulated disk to it.)

use std::fmt::Debug;
use std::io;
use std::path::Path;

/// How to open a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Read only; must exist.
    Read,
    /// Read and write; must exist.
    ReadWrite,
    /// Read and write; must not exist.
    CreateNew,
}

/// An open file with positional I/O.
pub trait FsFile: Send + Sync + Debug {
    /// Reads up to `buf.len()` bytes at `offset`; 0 at end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// fdatasync.
    fn sync_data(&self) -> io::Result<()>;
    /// Length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Starts writing the `len` bytes at `offset` back to the disk without
    /// waiting for them: a hint, so that a later [`FsFile::sync_data`] has
    /// less left to wait for, and the disk works while more data arrives.
    /// The default does nothing.
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Starts reading the `len` bytes at `offset` into the cache without
    /// waiting for them: a hint, so that a later read finds them there and
    /// the disk reads while the reader works. The default does nothing.
    fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Fills `buf` from `offset` or fails with `UnexpectedEof`.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset)? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }
}

/// Directory and file operations. Directory changes are durable after
/// [`Fs::sync_dir`] of the parent.
pub trait Fs: Send + Sync + Debug {
    /// Opens a file.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>>;
    /// Creates a directory and its parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Names in a directory.
    fn read_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Creates hard link `to` of `from`.
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Removes an empty directory.
    fn remove_dir(&self, path: &Path) -> io::Result<()>;
    /// fsync of a directory.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Whether the path exists.
    fn exists(&self, path: &Path) -> io::Result<bool>;
}

/// The real file system (Unix).
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
    /// On Linux, `posix_fadvise(POSIX_FADV_DONTNEED)`: the kernel starts
    /// writeback of the range's dirty pages at once and does not wait for it
    /// (pages still dirty or under writeback stay cached). Elsewhere nothing.
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        self.advise(offset, len, Advice::DontNeed)
    }
    /// On Linux, `posix_fadvise(POSIX_FADV_WILLNEED)`: the kernel starts
    /// reading the range and does not wait for it. Elsewhere nothing.
    fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.advise(offset, len, Advice::WillNeed)
    }
}

/// The `posix_fadvise` hints [`StdFile`] gives.
#[derive(Clone, Copy)]
enum Advice {
    DontNeed,
    WillNeed,
}

impl StdFile {
    /// `posix_fadvise` on Linux (a range beyond `i64` is left alone); nothing elsewhere.
    fn advise(&self, offset: u64, len: u64, advice: Advice) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        {
            use nix::fcntl::PosixFadviseAdvice as A;
            let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else { return Ok(()) };
            let a = match advice {
                Advice::DontNeed => A::POSIX_FADV_DONTNEED,
                Advice::WillNeed => A::POSIX_FADV_WILLNEED,
            };
            nix::fcntl::posix_fadvise(&self.0, offset, len, a).map_err(io::Error::from)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (offset, len, advice);
            Ok(())
        }
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
        let mut v = Vec::new();
        for e in std::fs::read_dir(path)? {
            v.push(e?.file_name().to_string_lossy().into_owned());
        }
        v.sort();
        Ok(v)
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
}
