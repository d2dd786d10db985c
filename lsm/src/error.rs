//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in cairn-lsm.
///
/// Bad input (a key too large, a damaged file) is an `Err`; a broken internal
/// invariant is a panic. After any failed write or fsync the engine refuses
/// writes ([`Error::Poisoned`]) until it is reopened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What the engine was doing.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file holds bytes that are not valid.
    #[error("corrupt file {path} at byte {offset}: {reason}")]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// Byte offset of the damaged part (its start, for a block).
        offset: u64,
        /// What is wrong there.
        reason: String,
    },
    /// A file was written by an unknown format version.
    #[error("{path}: format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Version found in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The manifest or the engine's own WAL failed.
    #[error("{what}: {source}")]
    Log {
        /// Which log (manifest or WAL) and what was done.
        what: &'static str,
        /// The log's error.
        #[source]
        source: cairn_wal::Error,
    },
    /// A key is longer than [`crate::KEY_BYTES_MAX`] or empty.
    #[error("key of {len} bytes refused: keys are 1 to {max} bytes")]
    KeyTooLarge {
        /// The key's length.
        len: usize,
        /// The largest accepted.
        max: usize,
    },
    /// A value is longer than [`crate::VALUE_BYTES_MAX`].
    #[error("value of {len} bytes refused: values are at most {max} bytes")]
    ValueTooLarge {
        /// The value's length.
        len: usize,
        /// The largest accepted.
        max: usize,
    },
    /// A batch larger than `Options::batch_bytes_max`.
    #[error("write batch of {len} bytes refused: batches are at most {max} bytes (Options::batch_bytes_max)")]
    BatchTooLarge {
        /// The batch's encoded size.
        len: usize,
        /// The largest accepted.
        max: usize,
    },
    /// A range delete whose end is not above its start.
    #[error("empty or inverted range: the end must sort after the start")]
    EmptyRange,
    /// A batch's marker does not rise above the last one written.
    #[error("marker {given:?} does not rise above the last written marker {last:?}")]
    MarkerNotRising {
        /// The refused marker.
        given: crate::Marker,
        /// The last one accepted.
        last: crate::Marker,
    },
    /// The operation needs the other durability mode.
    #[error("{0}")]
    WrongMode(&'static str),
    /// A previous write or fsync failed: the engine refuses writes until reopened.
    #[error("the engine refuses writes after an earlier failure ({0}); reopen it")]
    Poisoned(String),
    /// Writes were stalled longer than `Options::stall_duration_max`.
    #[error("write stalled for {waited_ms} ms waiting for {reason}; background work is not keeping up")]
    StallTimeout {
        /// How long it waited.
        waited_ms: u64,
        /// What it waited for.
        reason: &'static str,
    },
    /// Another process (or handle) has the directory open.
    #[error("{dir} is in use by another engine (its lock is held)")]
    Locked {
        /// The directory.
        dir: PathBuf,
    },
    /// `open` found no engine in the directory and `create_if_missing` is off.
    #[error("no engine in {dir} (set create_if_missing to create one)")]
    NotFound {
        /// The directory.
        dir: PathBuf,
    },
    /// A checkpoint destination already exists.
    #[error("checkpoint destination {dir} already exists")]
    AlreadyExists {
        /// The directory.
        dir: PathBuf,
    },
    /// The engine was closed.
    #[error("the engine is closed")]
    Closed,
    /// A table given to ingest is unusable.
    #[error("cannot ingest {path}: {reason}")]
    Ingest {
        /// The table file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A delta (see [`crate::Delta`]) that cannot be applied to this state.
    #[error("cannot apply the delta: {reason}")]
    Delta {
        /// Why.
        reason: String,
    },
    /// The embedder's test hook asked for a failure at this step.
    #[error("test hook stopped the engine at {0:?}")]
    Hook(crate::HookPoint),
}

/// `Result` with this crate's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io<'a>(op: &'static str, path: &'a std::path::Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io { op, path: path.to_path_buf(), source }
}

pub(crate) fn corrupt(path: &std::path::Path, offset: u64, reason: impl Into<String>) -> Error {
    Error::Corrupt { path: path.to_path_buf(), offset, reason: reason.into() }
}
