#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod error;
pub mod format;
mod fs;
mod options;
mod prepare;
mod read;
mod recover;
#[cfg(feature = "sim")]
#[cfg_attr(docsrs, doc(cfg(feature = "sim")))]
pub mod sim;
mod wal;

#[doc(hidden)]
pub mod fuzzing;

pub use error::{Error, Result};
pub use fs::{Fs, FsFile, FsLock, OpenMode, StdFs};
pub use options::{Batch, Durability, Preparation, PrepareIn, RecoveryMode, SyncSite, UserKind, WalOptions};
pub use read::{Record, Records};
pub use recover::{Marker, RecoveryReport, StopPoint, TornTail};
pub use wal::{LOCK_FILE_NAME, Replay, Ticket, Wal, WriteFuture, Written};
