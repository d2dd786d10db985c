//! Errors.

use std::path::PathBuf;

/// Bytes that are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// A frame version this build does not speak.
    #[error("frame version {0} is not supported (this build speaks {v})", v = crate::frame::FRAME_VERSION)]
    Version(u8),
    /// An unknown frame type.
    #[error("unknown frame type {0}")]
    Type(u8),
    /// A frame larger than the receiving side accepts.
    #[error("frame body of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Body length announced.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The frame's check does not match: damaged on the way.
    #[error("frame checksum mismatch")]
    Checksum,
    /// A malformed field.
    #[error("malformed frame: {0}")]
    Invalid(&'static str),
}

/// What can go wrong in a transfer driver.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file-system call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A source file got shorter while it was being sent. (A change that keeps
    /// the length is caught by the receiver's verification, not here.)
    #[error("source file {0} changed during the transfer")]
    SourceChanged(PathBuf),
    /// A bad frame from the peer.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer refused or aborted the transfer.
    #[error("transfer failed: {0}")]
    Failed(String),
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { op, path, source }
}
