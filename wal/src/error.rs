//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in cairn-wal.
///
/// Bad input (a record too large, a position that does not rise, a damaged file)
/// is an `Err`; a broken internal invariant is a panic. After any
/// [`Error::Io`] from a write or sync the log is [poisoned](Error::Poisoned).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What the log was doing.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file holds bytes that are not a valid log at `offset`.
    #[error(
        "corrupt log file {path} at byte {offset}: {reason}; \
         the damage is not a torn tail this recovery mode may drop, see docs/design/wal.md"
    )]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// Byte offset of the first damaged byte found.
        offset: u64,
        /// What is wrong there.
        reason: String,
    },
    /// A segment between the first and last one is missing.
    #[error("log directory {dir}: segment {missing:016x} is missing between two present segments")]
    MissingSegment {
        /// The log directory.
        dir: PathBuf,
        /// Sequence number of the missing segment.
        missing: u64,
    },
    /// A file was written by a newer (or unknown) format version.
    #[error("{path}: format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Version found in the file.
        found: u32,
        /// Version this build understands.
        supported: u32,
    },
    /// Another process (or another `Wal` in this process) holds the directory lock.
    #[error("log directory {dir} is locked by another writer; only one process may append to a log")]
    Locked {
        /// The log directory.
        dir: PathBuf,
    },
    /// `open` found no log in the directory.
    #[error("no log in {dir}: no segment file found (create the log first)")]
    NotFound {
        /// The directory.
        dir: PathBuf,
    },
    /// `create` found a log already in the directory.
    #[error("a log already exists in {dir}; open it instead of creating it")]
    AlreadyExists {
        /// The directory.
        dir: PathBuf,
    },
    /// A user record's position is not above the last accepted one.
    #[error("record position {position} does not rise above the last accepted position {last}")]
    PositionNotRising {
        /// The refused position.
        position: u64,
        /// The last position the log accepted (after truncations).
        last: u64,
    },
    /// A record or batch is larger than the configured bound.
    #[error("record of {len} bytes exceeds the limit of {max} bytes (WalOptions::record_bytes_max)")]
    RecordTooLarge {
        /// Payload length.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// A user kind outside `0..=UserKind::MAX`.
    #[error("user kind {0} is out of range (0..={max})", max = crate::UserKind::MAX)]
    KindOutOfRange(u32),
    /// A snapshot marker asked for is not in the retained log.
    #[error("no snapshot marker at position {0} in the retained log")]
    MarkerNotFound(u64),
    /// A position asked for was released or never written.
    #[error("position {position} is not in the log (retained positions: {retained})")]
    PositionNotFound {
        /// The position asked for.
        position: u64,
        /// The retained range, for the message.
        retained: String,
    },
    /// The log was opened read-only (or stopped at damage in `PointInTime` mode).
    #[error("the log is open read-only ({0}); writes are refused")]
    ReadOnly(&'static str),
    /// An earlier write or fsync failed; the log refuses every call.
    ///
    /// The kernel may have dropped dirty pages after a failed fsync, so nothing
    /// this process reads back can be trusted: exit the process and reopen.
    #[error("the log refuses all calls after an earlier I/O failure ({0}); exit the process and reopen the log")]
    Poisoned(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { op, path, source }
}

// The log is shared between threads and its errors cross them.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Error>();
};
