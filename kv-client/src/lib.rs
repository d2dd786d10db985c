#![doc = include_str!("../README.md")]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod client;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod protocol;
mod wire;

pub use client::{Client, ClientOptions, Error, Result, ScanPage, Txn, TxnResult, WatchMessage, WatchOptions, Written};
pub use protocol::{Consistency, ErrorCode, Request, Response, WriteOp};
