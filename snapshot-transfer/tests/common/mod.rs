//! Shared test helpers: cairn-wal's simulated disk behind this crate's `Fs`,
//! checkpoint files, and a faulty link.
#![allow(dead_code, unreachable_pub)]

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_snapshot_transfer::{Frame, Fs, FsFile, OpenMode};
use rand::Rng;

/// cairn-wal's simulated disk (or any cairn-wal `Fs`) as this crate's `Fs`.
#[derive(Debug, Clone)]
pub struct WalFs(pub Arc<dyn cairn_wal::Fs>);

#[derive(Debug)]
struct WalFile(Box<dyn cairn_wal::FsFile>);

impl FsFile for WalFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

impl Fs for WalFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>> {
        let m = match mode {
            OpenMode::Read => cairn_wal::OpenMode::Read,
            OpenMode::ReadWrite => cairn_wal::OpenMode::ReadWrite,
            OpenMode::CreateNew => cairn_wal::OpenMode::CreateNew,
        };
        Ok(Box::new(WalFile(self.0.open(path, m)?)))
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.0.create_dir_all(path)
    }
    fn read_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        self.0.read_dir(path)
    }
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.0.hard_link(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.0.remove_file(path)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.0.remove_dir(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.0.sync_dir(path)
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        self.0.exists(path)
    }
}

/// Writes a checkpoint of files into `dir`: some compressible, some random,
/// some empty. Returns their names and contents.
pub fn make_checkpoint(
    fs: &dyn Fs,
    dir: &Path,
    rng: &mut impl Rng,
    files: usize,
    size_max: usize,
) -> Vec<(String, Vec<u8>)> {
    fs.create_dir_all(dir).expect("mkdir");
    let mut out = Vec::new();
    for i in 0..files {
        let len = match rng.random_range(0..6) {
            0 => 0,
            1 => rng.random_range(1..64),
            _ => rng.random_range(1..=size_max),
        };
        let data: Vec<u8> = if rng.random() {
            (0..len).map(|_| rng.random()).collect()
        } else {
            (0..len).map(|j| (j / 97 % 7) as u8).collect()
        };
        let name = format!("{:06}.sst", i + 1);
        let f = fs.open(&dir.join(&name), OpenMode::CreateNew).expect("create");
        f.write_all_at(&data, 0).expect("write");
        f.sync_data().expect("sync");
        out.push((name, data));
    }
    fs.sync_dir(dir).expect("sync dir");
    out
}

/// Reads a whole file.
pub fn read_all(fs: &dyn Fs, path: &Path) -> std::io::Result<Vec<u8>> {
    let f = fs.open(path, OpenMode::Read)?;
    let mut buf = vec![0; f.len()? as usize];
    f.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

/// Whether `dir` holds exactly `files`.
pub fn identical(fs: &dyn Fs, dir: &Path, files: &[(String, Vec<u8>)]) -> Result<(), String> {
    for (name, data) in files {
        match read_all(fs, &dir.join(name)) {
            Ok(got) if got == *data => {}
            Ok(_) => return Err(format!("{name} differs from the source")),
            Err(e) => return Err(format!("{name}: {e}")),
        }
    }
    Ok(())
}

/// Panics unless `dir` holds exactly `files`.
pub fn assert_identical(fs: &dyn Fs, dir: &Path, files: &[(String, Vec<u8>)]) {
    if let Err(e) = identical(fs, dir, files) {
        panic!("{e}");
    }
}

/// Fault rates of a [`Link`], in per mille per frame.
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    pub drop: u32,
    pub duplicate: u32,
    pub corrupt: u32,
    pub delay_steps_max: u64,
}

/// One direction of a faulty link: frames as bytes, delivered after a random
/// delay (so reordered), sometimes dropped, duplicated or corrupted.
#[derive(Debug, Default)]
pub struct Link {
    queue: VecDeque<(u64, Vec<u8>)>,
    pub delivered: u64,
    pub dropped: u64,
    pub corrupted: u64,
}

impl Link {
    pub fn send(&mut self, rng: &mut impl Rng, faults: Faults, step: u64, frame: &Frame) {
        let bytes = frame.to_bytes();
        if rng.random_range(0..1000) < faults.drop {
            self.dropped += 1;
            return;
        }
        let copies = if rng.random_range(0..1000) < faults.duplicate { 2 } else { 1 };
        for _ in 0..copies {
            let mut b = bytes.clone();
            if rng.random_range(0..1000) < faults.corrupt {
                let i = rng.random_range(0..b.len());
                b[i] ^= 1 << rng.random_range(0..8);
                self.corrupted += 1;
            }
            let at = step + rng.random_range(0..=faults.delay_steps_max);
            let pos = self.queue.iter().position(|(t, _)| *t > at).unwrap_or(self.queue.len());
            self.queue.insert(pos, (at, b));
        }
    }

    /// Frames due at `step` that decode (damaged ones are dropped, as a transport would).
    pub fn receive(&mut self, step: u64, body_max: usize) -> Vec<Frame> {
        let mut out = Vec::new();
        while self.queue.front().is_some_and(|(t, _)| *t <= step) {
            let (_, b) = self.queue.pop_front().expect("front");
            if let Ok(Some((f, n))) = Frame::decode(&b, body_max)
                && n == b.len()
            {
                self.delivered += 1;
                out.push(f);
            }
        }
        out
    }

    /// The connection broke: everything in flight is gone.
    pub fn cut(&mut self) {
        self.queue.clear();
    }
}

pub fn names(files: &[(String, Vec<u8>)]) -> Vec<String> {
    files.iter().map(|(n, _)| n.clone()).collect()
}

pub fn root() -> PathBuf {
    PathBuf::from("/recv")
}
