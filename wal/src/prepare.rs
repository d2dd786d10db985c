//! The background thread that prepares the next segment before it is needed.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::error::{Error, Result, io};
use crate::format::prepared_name;
use crate::fs::{Fs, FsFile, OpenMode};
use crate::options::Preparation;

/// A segment file ready to become the next segment.
pub(crate) struct Prepared {
    pub(crate) seq: u64,
    pub(crate) path: PathBuf,
    pub(crate) file: Box<dyn FsFile>,
}

/// Keeps one prepared segment ready, made by a background thread.
pub(crate) struct Preparer {
    requests: Option<mpsc::SyncSender<u64>>,
    results: mpsc::Receiver<Result<Prepared>>,
    thread: Option<JoinHandle<()>>,
}

const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// Makes the file for segment `seq` under its temporary name: a recycled spare
/// when one is waiting (its blocks are allocated and written already, and its
/// old bytes never validate: every record's crc is seeded by the new segment's
/// seq and salt), otherwise a new file prepared as `how` says.
pub(crate) fn prepare(
    fs: &dyn Fs,
    dir: &std::path::Path,
    seq: u64,
    how: Preparation,
    size: u64,
    spares: &Mutex<Vec<PathBuf>>,
) -> Result<Prepared> {
    let path = dir.join(prepared_name(seq));
    if fs.exists(&path).map_err(io("stat", &path))? {
        fs.remove_file(&path).map_err(io("remove stale prepared segment", &path))?;
    }
    let spare = spares.lock().unwrap_or_else(|e| e.into_inner()).pop();
    if let Some(spare) = spare {
        fs.rename(&spare, &path).map_err(io("recycle spare segment", &spare))?;
        let file = fs.open(&path, OpenMode::ReadWrite).map_err(io("open recycled segment", &path))?;
        metrics::counter!("cairn_wal_segments_recycled_total").increment(1);
        return Ok(Prepared { seq, path, file });
    }
    let file = fs.open(&path, OpenMode::CreateNew).map_err(io("create segment", &path))?;
    if how == Preparation::ZeroFill {
        let zeros = vec![0u8; ZERO_CHUNK_BYTES];
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(ZERO_CHUNK_BYTES as u64) as usize;
            file.write_all_at(&zeros[..n], off).map_err(io("zero-fill segment", &path))?;
            off += n as u64;
        }
        // Not needed for correctness (the header sync before the rename covers the
        // file), but it moves the block allocation off the append path.
        file.sync_data().map_err(io("fdatasync prepared segment", &path))?;
    }
    Ok(Prepared { seq, path, file })
}

impl Preparer {
    /// Starts the thread and asks it for segment `first_seq`.
    pub(crate) fn start(
        fs: Arc<dyn Fs>,
        dir: PathBuf,
        how: Preparation,
        size: u64,
        first_seq: u64,
        spares: Arc<Mutex<Vec<PathBuf>>>,
    ) -> Result<Self> {
        let (req_tx, req_rx) = mpsc::sync_channel::<u64>(1);
        let (res_tx, res_rx) = mpsc::sync_channel::<Result<Prepared>>(1);
        let thread = std::thread::Builder::new()
            .name("cairn-wal-prepare".into())
            .spawn(move || {
                while let Ok(seq) = req_rx.recv() {
                    let _span = tracing::debug_span!("prepare_segment", seq).entered();
                    if res_tx.send(prepare(&*fs, &dir, seq, how, size, &spares)).is_err() {
                        break;
                    }
                }
            })
            .map_err(io("spawn preparer thread", "cairn-wal-prepare"))?;
        req_tx.send(first_seq).map_err(|_| Error::Poisoned("segment preparer stopped".into()))?;
        Ok(Preparer { requests: Some(req_tx), results: res_rx, thread: Some(thread) })
    }

    /// Takes the prepared segment `seq` (waiting for it if needed) and asks for the next.
    pub(crate) fn take(&mut self, seq: u64) -> Result<Prepared> {
        let stopped = || Error::Poisoned("segment preparer stopped".into());
        let prepared = self.results.recv().map_err(|_| stopped())??;
        assert_eq!(prepared.seq, seq, "segments are prepared in order");
        self.requests.as_ref().ok_or_else(stopped)?.send(seq + 1).map_err(|_| stopped())?;
        Ok(prepared)
    }
}

impl Drop for Preparer {
    fn drop(&mut self) {
        // Closing the request channel ends the thread's loop; a prepared file left
        // under its temporary name is removed by the next open.
        self.requests = None;
        while self.results.try_recv().is_ok() {}
        if let Some(t) = self.thread.take() {
            // The thread may be blocked sending its last result: drain until it ends.
            while !t.is_finished() {
                if self.results.recv_timeout(std::time::Duration::from_millis(10)).is_err() && t.is_finished() {
                    break;
                }
            }
            let _ = t.join();
        }
    }
}
