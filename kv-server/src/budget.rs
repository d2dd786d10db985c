//! The bound on client request bytes a node holds at once
//! (`[limits] requests_bytes_max`).
//!
//! A request's payload is admitted once its frame header has announced its
//! length and before any of it is read; the bytes count until its answer is
//! handed to the stream's writer. A request that would go over the bound
//! waits (its stream is not read meanwhile, so QUIC's flow control slows the
//! client down): nothing is refused for it. Requests are counted in the
//! queues between the client and the apply worker: the proposal queue, the
//! Raft log until applied, the pending reads.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes of client requests held at once, at most `total`.
#[derive(Debug, Clone)]
pub struct RequestBudget {
    permits: Arc<Semaphore>,
    total: usize,
}

/// Bytes admitted for one request, given back when dropped.
#[derive(Debug)]
pub struct Admitted {
    _permit: Option<OwnedSemaphorePermit>,
    bytes: usize,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        metrics::gauge!("cairn_requests_bytes_held").decrement(self.bytes as f64);
    }
}

impl RequestBudget {
    /// A budget of `total` bytes (at least 1).
    pub fn new(total: usize) -> RequestBudget {
        let total = total.clamp(1, Semaphore::MAX_PERMITS).min(u32::MAX as usize);
        RequestBudget { permits: Arc::new(Semaphore::new(total)), total }
    }

    /// Waits until `len` bytes fit, then holds them (a request larger than
    /// the whole budget waits for all of it).
    pub async fn admit(&self, len: usize) -> Admitted {
        let bytes = len.min(self.total);
        let permit = match u32::try_from(bytes) {
            Ok(0) | Err(_) => None,
            // The semaphore is never closed.
            Ok(n) => self.permits.clone().acquire_many_owned(n).await.ok(),
        };
        metrics::gauge!("cairn_requests_bytes_held").increment(bytes as f64);
        Admitted { _permit: permit, bytes }
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.total - self.permits.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Many requests of random sizes at once: the bytes held never pass the
    /// budget, and every request is admitted in the end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_bytes_held_never_pass_the_budget_and_every_request_gets_in() {
        let budget = RequestBudget::new(100_000);
        let held = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..400u64 {
            let (budget, held, peak) = (budget.clone(), held.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                let len = (i.wrapping_mul(2654435761) % 40_000) as usize + if i == 7 { 150_000 } else { 0 };
                let a = budget.admit(len).await;
                let now = held.fetch_add(len.min(100_000), Ordering::SeqCst) + len.min(100_000);
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::task::yield_now().await;
                tokio::time::sleep(std::time::Duration::from_micros(200)).await;
                held.fetch_sub(len.min(100_000), Ordering::SeqCst);
                drop(a);
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let peak = peak.load(Ordering::SeqCst);
        assert!(peak <= 100_000, "{peak} bytes held at once, over the budget of 100,000");
        assert!(peak > 50_000, "the requests never overlapped ({peak} bytes at most): the test shows nothing");
        assert_eq!(budget.held(), 0);
    }
}
