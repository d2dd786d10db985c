//! Bounds and tunables, each with its unit.

use std::time::Duration;

/// Configuration of a sender or receiver. Every window, buffer and timeout is here.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// Raw bytes of file data per chunk. Default 1 MiB.
    pub chunk_bytes_max: u32,
    /// Chunks sent and not yet acknowledged. Default 32.
    pub window_chunks_max: usize,
    /// Raw bytes sent and not yet acknowledged. Default 32 MiB.
    pub window_bytes_max: u64,
    /// A transfer is stalled when nothing is acknowledged for this long; the
    /// sender then resends from the last acknowledged offsets. Default 10 s.
    pub stall_timeout: Duration,
    /// Sender's rate limit in raw bytes per second, so a transfer does not
    /// starve the live log. `None`: unlimited.
    pub rate_bytes_per_second: Option<u64>,
    /// zstd level for compressed chunks. Default -1 (zstd's first fast
    /// level): on cairn-lsm tables (blocks compressed already) it compresses
    /// at about 1.5 GB/s where level 1 takes 0.45 GB/s, for 0.2% more bytes;
    /// see `docs/benchmarks.md`.
    pub zstd_level: i32,
    /// A file is sent compressed only if its first chunk shrinks by at least
    /// this many percent. Default 1.
    pub compress_saving_percent_min: u8,
    /// Receiver: bytes received before it makes them durable and acknowledges
    /// them (never more than half the sender's window). Default 16 MiB.
    pub sync_bytes: u64,
    /// Receiver: times one file may fail its manifest checksum (after every
    /// chunk of it matched its own) before the transfer is refused with
    /// [`RejectReason::FileChecksum`](crate::RejectReason::FileChecksum). Default 3.
    pub file_checksum_failures_max: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            chunk_bytes_max: 1 << 20,
            window_chunks_max: 32,
            window_bytes_max: 32 << 20,
            stall_timeout: Duration::from_secs(10),
            rate_bytes_per_second: None,
            zstd_level: -1,
            compress_saving_percent_min: 1,
            sync_bytes: 16 << 20,
            file_checksum_failures_max: 3,
        }
    }
}

impl Config {
    /// The sender's effective window in bytes (what it announces in its offer).
    /// Under a rate limit it is also at most what the rate sends in half the
    /// stall timeout, so the receiver (which acknowledges every half window)
    /// acknowledges well before the sender would count the transfer stalled.
    pub fn window_bytes(&self) -> u64 {
        let mut w = self.window_bytes_max.min(self.window_chunks_max as u64 * u64::from(self.chunk_bytes_max));
        if let Some(rate) = self.rate_bytes_per_second {
            let by_rate = (rate as f64 * self.stall_timeout.as_secs_f64() / 2.0) as u64;
            w = w.min(by_rate.max(u64::from(self.chunk_bytes_max)));
        }
        w.min(u64::from(u32::MAX))
    }

    /// The largest frame body this configuration sends or accepts.
    pub fn frame_body_bytes_max(&self) -> usize {
        // A chunk whose compressed form is larger than raw is sent raw; an offer
        // of FILES_MAX names is the other large frame.
        (self.chunk_bytes_max as usize + 64).max(crate::frame::FILES_MAX * (crate::frame::NAME_BYTES_MAX + 18) + 64)
    }

    /// Checks the bounds.
    pub fn validate(&self) -> crate::Result<()> {
        if self.chunk_bytes_max == 0
            || self.window_chunks_max == 0
            || self.window_bytes_max == 0
            || self.sync_bytes == 0
        {
            return Err(crate::Error::Config("chunk, window and sync sizes must be positive"));
        }
        if u64::from(self.chunk_bytes_max) > self.window_bytes_max {
            return Err(crate::Error::Config("a chunk must fit in the window"));
        }
        if self.compress_saving_percent_min > 100 {
            return Err(crate::Error::Config("compress_saving_percent_min is a percentage (0..=100)"));
        }
        if self.file_checksum_failures_max == 0 {
            return Err(crate::Error::Config("file_checksum_failures_max must be at least 1"));
        }
        if self.rate_bytes_per_second == Some(0) {
            return Err(crate::Error::Config("a rate limit of 0 bytes per second never sends"));
        }
        Ok(())
    }
}
