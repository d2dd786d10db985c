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

/// How long one step of the node's hot path may take before it is logged
/// as slow (as etcd warns of an apply or a `fdatasync` that took too long):
/// a log write, an apply batch, the Raft task's wait for its tick, or its
/// wait for room in the log's or the apply worker's queue.
pub const SLOW_STEP: std::time::Duration = std::time::Duration::from_millis(100);

/// Logs a step that took longer than [`SLOW_STEP`] (a warning naming
/// `what`, with `detail`) and counts it in `cairn_slow_steps_total{what}`.
pub fn note_slow(what: &'static str, took: std::time::Duration, detail: std::fmt::Arguments<'_>) {
    if took >= SLOW_STEP {
        tracing::warn!(what, ms = took.as_millis() as u64, "slow step: {detail}");
        metrics::counter!("cairn_slow_steps_total", "what" => what).increment(1);
    }
}

/// Stops the process: after a failed write or fsync nothing this process
/// reads back can be trusted (DESIGN.md, "I/O failure"). Restart recovers
/// from what is durable.
pub fn fatal(msg: &str) -> ! {
    tracing::error!("fatal: {msg}; stopping the node");
    eprintln!("kv-server: fatal: {msg}; stopping the node");
    std::process::exit(EXIT_FATAL)
}
