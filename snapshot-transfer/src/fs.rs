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
    /// Writes all of `buf` at `offset` around the page cache where the file
    /// system allows it, so that the bytes neither cost a copy into the cache
    /// nor wait there for writeback: durable, as any write, only after
    /// [`FsFile::sync_data`]. The default is [`FsFile::write_all_at`] followed
    /// by [`FsFile::start_writeback`].
    fn write_uncached_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)?;
        self.start_writeback(offset, buf.len() as u64)
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
struct StdFile {
    file: std::fs::File,
    path: std::path::PathBuf,
    /// The same file opened for direct I/O, on first use (`None` inside:
    /// the file system refused it, so writes go through the cache).
    direct: std::sync::OnceLock<Option<std::fs::File>>,
}

/// Offsets, lengths and buffer addresses of direct writes are multiples of
/// this (the largest logical block size of common disks).
const DIRECT_ALIGN: usize = 4096;

thread_local! {
    /// A thread's aligned copy of the bytes of its last direct write (the
    /// caller's buffer has no alignment to rely on), reused so that its pages
    /// stay in memory.
    static DIRECT_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl FsFile for StdFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(&self.file, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.file, buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    /// On Linux, an aligned range (offset and length multiples of 4 KiB) is
    /// written with `O_DIRECT` from an aligned copy: the disk reads it by DMA,
    /// no page is allocated, filled and written back (on this project's test
    /// machine that copy into the cache was most of a snapshot receiver's
    /// CPU). Anything else, or a file system without direct I/O, goes
    /// through the cache with its writeback started at once.
    fn write_uncached_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let aligned =
            offset.is_multiple_of(DIRECT_ALIGN as u64) && buf.len().is_multiple_of(DIRECT_ALIGN) && !buf.is_empty();
        match self.direct_file().filter(|_| aligned) {
            Some(direct) => DIRECT_BUF.with(|cell| {
                let mut copy = cell.borrow_mut();
                if copy.len() < buf.len() + DIRECT_ALIGN {
                    copy.resize(buf.len() + DIRECT_ALIGN, 0);
                }
                let start = copy.as_ptr().align_offset(DIRECT_ALIGN);
                let aligned_buf = &mut copy[start..start + buf.len()];
                aligned_buf.copy_from_slice(buf);
                match std::os::unix::fs::FileExt::write_all_at(direct, aligned_buf, offset) {
                    // A file system that opened the file for direct I/O and
                    // still refuses this write: through the cache then.
                    Err(e) if e.kind() == io::ErrorKind::InvalidInput => self.write_behind(buf, offset),
                    r => r,
                }
            }),
            None => self.write_behind(buf, offset),
        }
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
    fn new(file: std::fs::File, path: &Path) -> StdFile {
        StdFile { file, path: path.to_path_buf(), direct: std::sync::OnceLock::new() }
    }

    /// A cached write whose writeback starts at once.
    fn write_behind(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)?;
        self.start_writeback(offset, buf.len() as u64)
    }

    /// The file opened again for direct writes, if the system allows it.
    fn direct_file(&self) -> Option<&std::fs::File> {
        self.direct
            .get_or_init(|| {
                #[cfg(target_os = "linux")]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    let r = std::fs::OpenOptions::new()
                        .write(true)
                        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
                        .open(&self.path);
                    if let Err(e) = &r {
                        tracing::debug!(error = %e, path = %self.path.display(), "no direct I/O: writing through the cache");
                    }
                    r.ok()
                }
                #[cfg(not(target_os = "linux"))]
                {
                    None
                }
            })
            .as_ref()
    }

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
            nix::fcntl::posix_fadvise(&self.file, offset, len, a).map_err(io::Error::from)
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
        Ok(Box::new(StdFile::new(o.open(path)?, path)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncached_writes_read_back_whatever_their_alignment() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("f");
        let f = StdFs.open(&path, OpenMode::CreateNew).expect("create");
        let block: Vec<u8> = (0..64 << 10).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut model = vec![0u8; 200_000];
        // Aligned (direct where the file system has it), then unaligned
        // offsets and lengths (through the cache), then a cached write
        // overwritten by an aligned uncached one, and the reverse.
        let writes: [(usize, usize, bool); 6] = [
            (0, 65_536, true),
            (65_536, 4_096, true),
            (70_000, 30_000, true),
            (131_072, 65_536, false),
            (131_072, 65_536, true),
            (196_608, 3_392, false),
        ];
        for (n, (offset, len, uncached)) in writes.into_iter().enumerate() {
            let data: Vec<u8> = block[..len].iter().map(|b| b.wrapping_add(n as u8)).collect();
            if uncached {
                f.write_uncached_at(&data, offset as u64).expect("uncached write");
            } else {
                f.write_all_at(&data, offset as u64).expect("cached write");
            }
            model[offset..offset + len].copy_from_slice(&data);
        }
        f.write_all_at(&[7; 4096], 0).expect("cached over direct");
        model[..4096].fill(7);
        f.sync_data().expect("sync");
        let mut back = vec![0u8; model.len()];
        f.read_exact_at(&mut back, 0).expect("read");
        assert!(back == model, "the file differs from what was written");
        assert_eq!(std::fs::read(&path).expect("read again"), model);
    }
}
