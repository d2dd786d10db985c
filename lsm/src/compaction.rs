//! The compaction executor: merges input tables into output tables, keeping
//! for each live read view the newest version at or below its sequence
//! number, and dropping tombstones only at the bottom and only when no read
//! view needs them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use cairn_wal::Fs;

use crate::blob::{BlobFile, BlobId, BlobRef, BlobWriter};
use crate::error::{Result, corrupt};
use crate::iter::{LevelIter, Merge, Source};
use crate::table::{Table, TableWriter, WriteSettings};
use crate::types::{RangeTombstone, Seqno, TableId, ValueKind, trailer_kind};

/// A table a compaction wrote.
#[derive(Debug)]
pub(crate) struct Output {
    pub(crate) id: TableId,
    pub(crate) path: PathBuf,
    pub(crate) bytes: u64,
    pub(crate) file_xxh3: u64,
    /// Data blocks handed to the compressor, and stored compressed.
    pub(crate) blocks: (u64, u64),
}

/// What a compaction needs besides its inputs.
pub(crate) struct Job<'a> {
    pub(crate) fs: &'a dyn Fs,
    /// Sequence numbers of the live read views, ascending.
    pub(crate) views: &'a [Seqno],
    pub(crate) bottommost: bool,
    pub(crate) settings: WriteSettings,
    pub(crate) table_bytes_target: u64,
    /// Bytes each input is read at a time (`Options::compaction_readahead_bytes`).
    pub(crate) readahead_bytes: usize,
    /// Allocates the next table id and its path.
    pub(crate) new_table: &'a mut dyn FnMut() -> (TableId, PathBuf),
    /// The blob files the inputs reference (to read values being moved).
    pub(crate) blobs: &'a BTreeMap<BlobId, Arc<BlobFile>>,
    /// Blob files with enough garbage: the values kept from them move into
    /// a new blob file.
    pub(crate) gc: &'a BTreeSet<BlobId>,
    /// Allocates the id and path of that new blob file.
    pub(crate) new_blob: &'a mut dyn FnMut() -> (BlobId, PathBuf),
    /// How that blob file compresses values.
    pub(crate) blob_compression: crate::options::Compression,
    /// Test-only: leave that blob file unsynced.
    pub(crate) skip_blob_sync: bool,
}

/// The blob file a compaction wrote (values moved out of blob files with garbage), synced.
#[derive(Debug)]
pub(crate) struct BlobOutput {
    pub(crate) id: BlobId,
    pub(crate) bytes: u64,
}

/// The stripe of a sequence number: how many read views are below it. Two
/// versions in one stripe are seen by exactly the same views.
fn stripe(views: &[Seqno], seq: Seqno) -> usize {
    views.partition_point(|&v| v < seq)
}

struct Writer {
    w: TableWriter,
    id: TableId,
    path: PathBuf,
    lower: Option<Bytes>,
}

fn clip(ts: &[RangeTombstone], lower: Option<&Bytes>, upper: Option<&Bytes>) -> Vec<RangeTombstone> {
    ts.iter()
        .filter_map(|t| {
            let start = match lower {
                Some(l) if *l > t.start => l.clone(),
                _ => t.start.clone(),
            };
            let end = match upper {
                Some(u) if *u < t.end => u.clone(),
                _ => t.end.clone(),
            };
            (start < end).then_some(RangeTombstone { start, end, seq: t.seq })
        })
        .collect()
}

/// Runs a compaction of `runs` (all versions of every key in their range)
/// and returns the tables written, synced. On error the caller deletes them.
/// Each run is a list of tables sorted by key that do not overlap (an L0
/// table alone, or a level's inputs), read one table after the other.
pub(crate) fn run(
    runs: &[Vec<Arc<Table>>],
    job: Job<'_>,
    outputs: &mut Vec<Output>,
    blob_out: &mut Option<BlobOutput>,
) -> Result<()> {
    let views = job.views;
    let mut all_ts: Vec<RangeTombstone> = runs.iter().flatten().flat_map(|t| t.range_dels.iter().cloned()).collect();
    all_ts.sort_by(|a, b| a.start.cmp(&b.start).then(b.seq.cmp(&a.seq)));
    let kept_ts: Vec<RangeTombstone> =
        all_ts.iter().filter(|t| !(job.bottommost && stripe(views, t.seq) == 0)).cloned().collect();
    let covered = |key: &[u8], seq: Seqno| -> bool {
        let n = all_ts.partition_point(|t| t.start.as_ref() <= key);
        all_ts[..n].iter().any(|t| t.seq > seq && key < t.end.as_ref() && stripe(views, t.seq) == stripe(views, seq))
    };
    let sources = runs
        .iter()
        .map(|run| Source::Level(LevelIter::new(run.clone(), true, None).reading_ahead(job.readahead_bytes)))
        .collect();
    let mut merge = Merge::new(sources, true);
    let mut cur: Option<Writer> = None;
    let mut last_user: Option<Bytes> = None;
    let mut last_stripe = usize::MAX;
    let mut split_at: Option<Bytes> = None;
    let mut moved: Option<BlobWriter> = None;
    let finish = |w: Writer, upper: Option<&Bytes>, outputs: &mut Vec<Output>| -> Result<()> {
        let mut tw = w.w;
        for t in clip(&kept_ts, w.lower.as_ref(), upper) {
            tw.add_range_delete(t);
        }
        if tw.is_empty() {
            drop(tw);
            job.fs.remove_file(&w.path).map_err(crate::error::io("remove empty table", &w.path))?;
            return Ok(());
        }
        let written = tw.finish()?;
        outputs.push(Output {
            id: w.id,
            path: w.path,
            bytes: written.bytes,
            file_xxh3: written.file_xxh3,
            blocks: (written.blocks_tried, written.blocks_compressed),
        });
        Ok(())
    };
    while let Some(e) = merge.next_entry()? {
        let new_key = last_user.as_ref() != Some(&e.user);
        if new_key {
            last_stripe = usize::MAX;
            if let Some(w) = &cur
                && w.w.bytes_written() >= job.table_bytes_target
            {
                split_at = Some(e.user.clone());
            }
            last_user = Some(e.user.clone());
        }
        let s = stripe(views, e.seq());
        if s == last_stripe {
            continue; // shadowed by a newer version that the same views see
        }
        last_stripe = s;
        if !all_ts.is_empty() && covered(&e.user, e.seq()) {
            continue;
        }
        if job.bottommost && s == 0 && trailer_kind(e.trailer) == Some(ValueKind::Delete) {
            continue;
        }
        if let Some(k) = split_at.take()
            && let Some(w) = cur.take()
        {
            finish(w, Some(&k), outputs)?;
            let (id, path) = (job.new_table)();
            let tw = TableWriter::create(job.fs, &path, job.settings)?;
            cur = Some(Writer { w: tw, id, path, lower: Some(k) });
        }
        if cur.is_none() {
            let (id, path) = (job.new_table)();
            let tw = TableWriter::create(job.fs, &path, job.settings)?;
            cur = Some(Writer { w: tw, id, path, lower: None });
        }
        let Some(w) = &mut cur else { continue };
        if !job.gc.is_empty()
            && trailer_kind(e.trailer) == Some(ValueKind::BlobRef)
            && let Some(r) = BlobRef::decode(&e.value)
            && job.gc.contains(&r.file)
        {
            let from = job.blobs.get(&r.file).ok_or_else(|| {
                corrupt(&w.path, 0, format!("an input references blob file {:016x}, which is not live", r.file))
            })?;
            let value = from.read(&r)?;
            let to = match &mut moved {
                Some(b) => b,
                None => {
                    let (id, path) = (job.new_blob)();
                    moved.insert(BlobWriter::create(job.fs, &path, id, job.blob_compression, job.skip_blob_sync)?)
                }
            };
            w.w.add(&e.user, e.trailer, &to.add(&value)?.encode())?;
        } else {
            w.w.add(&e.user, e.trailer, &e.value)?;
        }
    }
    match cur.take() {
        Some(w) => finish(w, None, outputs)?,
        None if !kept_ts.is_empty() => {
            let (id, path) = (job.new_table)();
            let tw = TableWriter::create(job.fs, &path, job.settings)?;
            finish(Writer { w: tw, id, path, lower: None }, None, outputs)?;
        }
        None => {}
    }
    if let Some(b) = moved {
        let id = b.id();
        *blob_out = Some(BlobOutput { id, bytes: b.finish()? });
    }
    Ok(())
}
