#![doc = include_str!("../README.md")]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod apply;
pub mod budget;
pub mod config;
pub mod dev;
pub mod failpoint;
#[doc(hidden)]
pub mod fuzzing;
pub mod history;
pub mod lease;
pub mod node;
pub mod peer;
pub mod server;
pub mod snapshot;
pub mod state;
pub mod storage;
pub mod tls;

/// Exit code of a node stopped by an I/O failure or a broken invariant.
pub const EXIT_FATAL: i32 = 70;

/// Stops the process: after a failed write or fsync nothing this process
/// reads back can be trusted (DESIGN.md, "I/O failure"). Restart recovers
/// from what is durable.
pub fn fatal(msg: &str) -> ! {
    tracing::error!("fatal: {msg}; stopping the node");
    eprintln!("kv-server: fatal: {msg}; stopping the node");
    std::process::exit(EXIT_FATAL)
}
