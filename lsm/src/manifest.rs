//! The manifest: version edits kept as a cairn-wal log in `manifest/`.
//!
//! Each edit is one record (kind 1) at the next position, appended with
//! `Durability::Sync`: an edit is installed once its record is durable. Every
//! `manifest_edits_per_snapshot` edits a full version is written as the log's
//! snapshot marker (repeated in each later segment header), the log is cut and
//! the segments before it released; open replays the edits after the newest
//! snapshot marker on top of it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_wal::{Fs, Preparation, RecoveryMode, UserKind, Wal, WalOptions};

use crate::error::{Error, Result};
use crate::version::Edit;

const EDIT_KIND: UserKind = UserKind::new(1);
/// The log's metadata: this magic, then the initial full version. It is part
/// of the first segment's header, so a manifest exists whole or not at all.
const METADATA_MAGIC: &[u8] = b"cairn-lsm manifest v1\0";

/// The open manifest log.
#[derive(Debug)]
pub(crate) struct Manifest {
    wal: Wal,
    edits_since_snapshot: u64,
    edits_per_snapshot: u64,
}

fn wal_options(segment_bytes: u64) -> WalOptions {
    let mut o = WalOptions::default();
    o.segment_bytes_max = segment_bytes;
    o.preparation = Preparation::Grow;
    o.prepare_in = cairn_wal::PrepareIn::Foreground;
    o.spare_segments_max = 0;
    o.recovery = RecoveryMode::TolerateTornTail;
    o
}

fn log_err(what: &'static str) -> impl FnOnce(cairn_wal::Error) -> Error {
    move |source| Error::Log { what, source }
}

pub(crate) fn manifest_dir(dir: &Path) -> PathBuf {
    dir.join("manifest")
}

impl Manifest {
    /// Creates a manifest whose base is `initial` (a full edit), atomically.
    pub(crate) fn create(
        fs: Arc<dyn Fs>,
        dir: &Path,
        segment_bytes: u64,
        per_snapshot: u64,
        initial: &Edit,
    ) -> Result<Manifest> {
        let mut metadata = METADATA_MAGIC.to_vec();
        metadata.extend_from_slice(&initial.encode());
        let wal = Wal::create(fs, manifest_dir(dir), wal_options(segment_bytes), &metadata)
            .map_err(log_err("create manifest"))?;
        Ok(Manifest { wal, edits_since_snapshot: 0, edits_per_snapshot: per_snapshot.max(1) })
    }

    /// Opens the manifest and returns it with every edit since the newest full one.
    pub(crate) fn open(
        fs: Arc<dyn Fs>,
        dir: &Path,
        segment_bytes: u64,
        per_snapshot: u64,
        levels: usize,
    ) -> Result<(Manifest, Vec<Edit>)> {
        let mdir = manifest_dir(dir);
        let (wal, _report) = Wal::open(fs, &mdir, wal_options(segment_bytes)).map_err(log_err("open manifest"))?;
        let mut edits = Vec::new();
        let marker = wal.snapshot_markers().pop();
        match &marker {
            Some(m) => {
                edits.push(Edit::decode(&m.payload, levels).map_err(|e| crate::error::corrupt(&mdir, m.position, e))?)
            }
            None => {
                let meta = wal.metadata();
                let base = meta
                    .strip_prefix(METADATA_MAGIC)
                    .ok_or_else(|| crate::error::corrupt(&mdir, 0, "not a cairn-lsm manifest (metadata magic)"))?;
                edits.push(Edit::decode(base, levels).map_err(|e| crate::error::corrupt(&mdir, 0, e))?);
            }
        }
        for batch in wal.replay_from(marker.map(|m| m.position)).map_err(log_err("replay manifest"))? {
            let batch = batch.map_err(log_err("read manifest"))?;
            for r in batch.iter() {
                edits.push(
                    Edit::decode(r.payload, levels)
                        .map_err(|e| crate::error::corrupt(&mdir, r.position, format!("edit: {e}")))?,
                );
            }
        }
        if edits.first().is_none_or(|e| !e.full) {
            return Err(crate::error::corrupt(&mdir, 0, "the manifest does not start with a full version"));
        }
        let n = edits.len() as u64;
        Ok((Manifest { wal, edits_since_snapshot: n, edits_per_snapshot: per_snapshot.max(1) }, edits))
    }

    /// Appends `edit` durably. `full_after` gives the full version after it,
    /// written as a snapshot when enough edits have accumulated.
    pub(crate) fn append(&mut self, edit: &Edit, full_after: impl FnOnce() -> Edit) -> Result<()> {
        let pos = self.wal.append_next(EDIT_KIND, &edit.encode()).map_err(log_err("write manifest"))?;
        self.edits_since_snapshot += 1;
        if self.edits_since_snapshot >= self.edits_per_snapshot {
            let full = full_after();
            self.wal.snapshot_marker(pos, &full.encode()).map_err(log_err("write manifest snapshot"))?;
            self.wal.cut().map_err(log_err("cut manifest"))?;
            self.wal.release_to(pos + 1).map_err(log_err("release manifest"))?;
            self.edits_since_snapshot = 0;
        }
        Ok(())
    }
}
