//! A simulated disk for crash tests (feature `sim`).
//!
//! [`SimDisk`] keeps files and directories in memory the way a real disk and
//! page cache treat them: a file's writes become durable only at
//! [`FsFile::sync_data`]; a directory's changes (create, rename, hard link,
//! unlink) only at [`Fs::sync_dir`] of that directory. [`SimDisk::crash`]
//! throws away what was not durable, except a random prefix of the pending
//! changes (the kernel may have written some back), and tears the last kept
//! write at a random byte, so a sector can end half-written. Every file handle
//! and [`SimFs`] from before a crash fails from then on, like a dead process.
//!
//! Runs are deterministic for a seed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::fs::{Fs, FsFile, FsLock, OpenMode, parent_dir};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    File(u64),
    Dir,
}

#[derive(Debug)]
enum FileOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct Inode {
    data: Vec<u8>,
    durable: Vec<u8>,
    unsynced: Vec<FileOp>,
}

#[derive(Debug, Clone)]
enum DirOp {
    Insert(PathBuf, Entry),
    Remove(PathBuf),
}

#[derive(Debug)]
struct Disk {
    rng: ChaCha8Rng,
    boot: u64,
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    names: BTreeMap<PathBuf, Entry>,
    durable_names: BTreeMap<PathBuf, Entry>,
    /// Directory changes not yet durable, in order, with the directory that owns each.
    pending: Vec<(PathBuf, DirOp)>,
    locks: HashSet<PathBuf>,
    crash_after_ops: Option<u64>,
    fail_syncs: bool,
    syncs: u64,
}

/// A simulated disk shared by the "processes" ([`SimFs`]) that use it one after another.
#[derive(Clone, Debug)]
pub struct SimDisk {
    disk: Arc<Mutex<Disk>>,
}

/// A process's view of a [`SimDisk`]: dead after the next crash.
#[derive(Clone, Debug)]
pub struct SimFs {
    disk: Arc<Mutex<Disk>>,
    boot: u64,
}

#[derive(Debug)]
struct SimFile {
    disk: Arc<Mutex<Disk>>,
    boot: u64,
    inode: u64,
    writable: bool,
}

#[derive(Debug)]
struct SimLock {
    disk: Arc<Mutex<Disk>>,
    boot: u64,
    path: PathBuf,
}
impl FsLock for SimLock {}
impl Drop for SimLock {
    fn drop(&mut self) {
        let mut d = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        if d.boot == self.boot {
            d.locks.remove(&self.path);
        }
    }
}

fn crashed() -> io::Error {
    io::Error::other("simulated machine crashed")
}

fn is_root(p: &Path) -> bool {
    p.as_os_str().is_empty() || p == Path::new("/") || p == Path::new(".")
}

impl Disk {
    /// Counts one operation toward an armed crash; `Err` once the crash happened.
    fn tick(&mut self, boot: u64) -> io::Result<()> {
        if self.boot != boot {
            return Err(crashed());
        }
        if let Some(n) = self.crash_after_ops.as_mut() {
            if *n == 0 {
                self.crash_after_ops = None;
                self.crash();
                return Err(crashed());
            }
            *n -= 1;
        }
        Ok(())
    }

    fn check(&self, boot: u64) -> io::Result<()> {
        if self.boot != boot { Err(crashed()) } else { Ok(()) }
    }

    /// A new empty file at `path` (its name pending until the parent is synced).
    fn create_file(&mut self, path: &Path) -> io::Result<u64> {
        if !self.dir_exists(&parent_dir(path)) {
            return Err(io::ErrorKind::NotFound.into());
        }
        let id = self.next_inode;
        self.next_inode += 1;
        self.inodes.insert(id, Inode::default());
        self.change(DirOp::Insert(path.to_path_buf(), Entry::File(id)));
        Ok(id)
    }

    fn dir_exists(&self, p: &Path) -> bool {
        is_root(p) || self.names.get(p) == Some(&Entry::Dir)
    }

    fn change(&mut self, op: DirOp) {
        let path = match &op {
            DirOp::Insert(p, _) | DirOp::Remove(p) => p.clone(),
        };
        apply(&mut self.names, &op);
        self.pending.push((parent_dir(&path), op));
    }

    fn crash(&mut self) {
        // A random prefix of the pending directory changes reached the disk.
        let keep = self.rng.random_range(0..=self.pending.len());
        for (_, op) in self.pending.drain(..).take(keep) {
            apply(&mut self.durable_names, &op);
        }
        let mut names = self.durable_names.clone();
        let all: Vec<PathBuf> = names.keys().cloned().collect();
        for p in all {
            let parent = parent_dir(&p);
            if !is_root(&parent) && names.get(&parent) != Some(&Entry::Dir) {
                names.remove(&p);
            }
        }
        self.durable_names = names.clone();
        self.names = names;
        // For each file, a random prefix of its unsynced writes reached the disk,
        // the last one torn at a random byte.
        let mut ids: Vec<u64> = self.inodes.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let inode = self.inodes.get_mut(&id).expect("listed above");
            let n = inode.unsynced.len();
            let keep = self.rng.random_range(0..=n);
            let ops: Vec<FileOp> = inode.unsynced.drain(..).collect();
            for (i, op) in ops.into_iter().enumerate() {
                if i > keep {
                    break;
                }
                match op {
                    FileOp::SetLen(len) if i < keep => inode.durable.resize(len as usize, 0),
                    FileOp::Write { offset, data } => {
                        let len = if i < keep { data.len() } else { self.rng.random_range(0..=data.len()) };
                        write_into(&mut inode.durable, offset, &data[..len]);
                    }
                    FileOp::SetLen(_) => {}
                }
            }
            inode.data = inode.durable.clone();
        }
        self.locks.clear();
        self.boot += 1;
    }
}

fn apply(names: &mut BTreeMap<PathBuf, Entry>, op: &DirOp) {
    match op {
        DirOp::Insert(p, e) => {
            names.insert(p.clone(), *e);
        }
        DirOp::Remove(p) => {
            names.remove(p);
        }
    }
}

fn write_into(buf: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[offset as usize..end].copy_from_slice(data);
}

impl SimDisk {
    /// An empty disk whose random choices follow `seed`.
    pub fn new(seed: u64) -> Self {
        SimDisk {
            disk: Arc::new(Mutex::new(Disk {
                rng: ChaCha8Rng::seed_from_u64(seed),
                boot: 0,
                inodes: HashMap::new(),
                next_inode: 1,
                names: BTreeMap::new(),
                durable_names: BTreeMap::new(),
                pending: Vec::new(),
                locks: HashSet::new(),
                crash_after_ops: None,
                fail_syncs: false,
                syncs: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A file system for the current boot.
    pub fn fs(&self) -> Arc<SimFs> {
        let boot = self.lock().boot;
        Arc::new(SimFs { disk: Arc::clone(&self.disk), boot })
    }

    /// Crashes the machine now: what was not durable is lost (but for a random,
    /// torn prefix), and every handle from before fails from now on.
    pub fn crash(&self) {
        let mut d = self.lock();
        d.crash_after_ops = None;
        d.crash();
    }

    /// Crashes the machine when the `n`-th next file-system operation (write,
    /// sync, create, rename, remove, ...) is attempted; that operation fails.
    pub fn crash_after_ops(&self, n: u64) {
        self.lock().crash_after_ops = Some(n);
    }

    /// Whether an armed crash has happened.
    pub fn crash_pending(&self) -> bool {
        self.lock().crash_after_ops.is_some()
    }

    /// From now on every fdatasync and directory fsync fails with an I/O error,
    /// and the changes it would have made durable are dropped (as Linux may do
    /// after a failed fsync), while reads still return them.
    pub fn fail_syncs(&self, fail: bool) {
        self.lock().fail_syncs = fail;
    }

    /// Number of successful syncs (file and directory) so far.
    pub fn sync_count(&self) -> u64 {
        self.lock().syncs
    }

    /// Flips bit `bit` of byte `offset` of a file, durably (bit rot).
    pub fn flip_bit(&self, path: &Path, offset: u64, bit: u8) -> io::Result<()> {
        let mut d = self.lock();
        let Some(Entry::File(id)) = d.names.get(path).copied() else {
            return Err(io::ErrorKind::NotFound.into());
        };
        let inode = d.inodes.get_mut(&id).ok_or(io::ErrorKind::NotFound)?;
        for buf in [&mut inode.data, &mut inode.durable] {
            if let Some(b) = buf.get_mut(offset as usize) {
                *b ^= 1 << (bit % 8);
            }
        }
        Ok(())
    }

    /// The current contents of a file.
    pub fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        let d = self.lock();
        match d.names.get(path) {
            Some(Entry::File(id)) => Ok(d.inodes[id].data.clone()),
            _ => Err(io::ErrorKind::NotFound.into()),
        }
    }
}

impl SimFs {
    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Fs for SimFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>> {
        let mut d = self.lock();
        d.check(self.boot)?;
        let inode = match (mode, d.names.get(path).copied()) {
            (OpenMode::CreateNew, Some(_)) => return Err(io::ErrorKind::AlreadyExists.into()),
            (OpenMode::CreateNew, None) => {
                d.tick(self.boot)?;
                d.create_file(path)?
            }
            (_, Some(Entry::File(id))) => id,
            (_, Some(Entry::Dir)) => return Err(io::Error::other("is a directory")),
            (_, None) => return Err(io::ErrorKind::NotFound.into()),
        };
        Ok(Box::new(SimFile { disk: Arc::clone(&self.disk), boot: self.boot, inode, writable: mode != OpenMode::Read }))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut d = self.lock();
        d.check(self.boot)?;
        let mut missing = Vec::new();
        let mut p = path.to_path_buf();
        while !d.dir_exists(&p) {
            if d.names.contains_key(&p) {
                return Err(io::Error::other("not a directory"));
            }
            missing.push(p.clone());
            p = parent_dir(&p);
        }
        for m in missing.into_iter().rev() {
            d.tick(self.boot)?;
            d.change(DirOp::Insert(m, Entry::Dir));
        }
        Ok(())
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let d = self.lock();
        d.check(self.boot)?;
        if !d.dir_exists(path) {
            return Err(io::ErrorKind::NotFound.into());
        }
        Ok(d.names
            .keys()
            .filter(|p| parent_dir(p) == path)
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut d = self.lock();
        d.tick(self.boot)?;
        let e = d.names.get(from).copied().ok_or(io::ErrorKind::NotFound)?;
        d.change(DirOp::Remove(from.to_path_buf()));
        d.change(DirOp::Insert(to.to_path_buf(), e));
        Ok(())
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut d = self.lock();
        d.tick(self.boot)?;
        let e @ Entry::File(_) = d.names.get(from).copied().ok_or(io::ErrorKind::NotFound)? else {
            return Err(io::Error::other("is a directory"));
        };
        if d.names.contains_key(to) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        d.change(DirOp::Insert(to.to_path_buf(), e));
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut d = self.lock();
        d.tick(self.boot)?;
        match d.names.get(path) {
            Some(Entry::File(_)) => {
                d.change(DirOp::Remove(path.to_path_buf()));
                Ok(())
            }
            Some(Entry::Dir) => Err(io::Error::other("is a directory")),
            None => Err(io::ErrorKind::NotFound.into()),
        }
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        let mut d = self.lock();
        d.tick(self.boot)?;
        match d.names.get(path) {
            Some(Entry::Dir) => {
                if d.names.keys().any(|p| parent_dir(p) == path) {
                    return Err(io::Error::other("directory not empty"));
                }
                d.change(DirOp::Remove(path.to_path_buf()));
                Ok(())
            }
            Some(Entry::File(_)) => Err(io::Error::other("not a directory")),
            None => Err(io::ErrorKind::NotFound.into()),
        }
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut d = self.lock();
        d.tick(self.boot)?;
        let ops: Vec<(PathBuf, DirOp)> = std::mem::take(&mut d.pending);
        let (mine, rest): (Vec<_>, Vec<_>) = ops.into_iter().partition(|(dir, _)| dir == path);
        d.pending = rest;
        if d.fail_syncs {
            return Err(io::Error::other("simulated EIO on directory fsync"));
        }
        for (_, op) in &mine {
            apply(&mut d.durable_names, op);
        }
        d.syncs += 1;
        Ok(())
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        let d = self.lock();
        d.check(self.boot)?;
        Ok(is_root(path) || d.names.contains_key(path))
    }

    fn try_lock_exclusive(&self, path: &Path) -> io::Result<Box<dyn FsLock>> {
        let mut d = self.lock();
        d.check(self.boot)?;
        if !d.names.contains_key(path) {
            d.tick(self.boot)?;
            d.create_file(path)?;
        }
        if !d.locks.insert(path.to_path_buf()) {
            return Err(io::Error::new(io::ErrorKind::WouldBlock, "lock held"));
        }
        Ok(Box::new(SimLock { disk: Arc::clone(&self.disk), boot: self.boot, path: path.to_path_buf() }))
    }
}

impl SimFile {
    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl FsFile for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let d = self.lock();
        d.check(self.boot)?;
        let data = &d.inodes[&self.inode].data;
        let start = (offset as usize).min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::other("file opened read-only"));
        }
        let mut d = self.lock();
        d.tick(self.boot)?;
        let inode = d.inodes.get_mut(&self.inode).ok_or(io::ErrorKind::NotFound)?;
        write_into(&mut inode.data, offset, buf);
        inode.unsynced.push(FileOp::Write { offset, data: buf.to_vec() });
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut d = self.lock();
        d.tick(self.boot)?;
        let fail = d.fail_syncs;
        let inode = d.inodes.get_mut(&self.inode).ok_or(io::ErrorKind::NotFound)?;
        let ops = std::mem::take(&mut inode.unsynced);
        if fail {
            return Err(io::Error::other("simulated EIO on fdatasync"));
        }
        for op in ops {
            match op {
                FileOp::Write { offset, data } => write_into(&mut inode.durable, offset, &data),
                FileOp::SetLen(len) => inode.durable.resize(len as usize, 0),
            }
        }
        d.syncs += 1;
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let d = self.lock();
        d.check(self.boot)?;
        Ok(d.inodes[&self.inode].data.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut d = self.lock();
        d.tick(self.boot)?;
        let inode = d.inodes.get_mut(&self.inode).ok_or(io::ErrorKind::NotFound)?;
        inode.data.resize(len as usize, 0);
        inode.unsynced.push(FileOp::SetLen(len));
        Ok(())
    }
}
