#![doc = include_str!("../README.md")]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod config;
mod driver;
mod error;
pub mod frame;
mod fs;
mod local;
mod receiver;
mod sender;

pub use config::Config;
pub use driver::{Completed, PROGRESS_FILE, Source, SourceFile, Staging, is_reserved_name};
pub use error::{Error, FrameError, Result};
pub use frame::{Encoding, FileMeta, Frame, Manifest, NackReason, RejectReason};
pub use fs::{Fs, FsFile, OpenMode, StdFs};
pub use local::run_local;
pub use receiver::{Action, RESERVED_PREFIX, Receiver};
pub use sender::{ReadRequest, Sender, SenderEvent, SenderStats};
