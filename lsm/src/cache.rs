//! The block cache: uncompressed, checked blocks, bounded in bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use quick_cache::Weighter;
use quick_cache::sync::Cache;

use crate::block::Block;
use crate::error::Result;
use crate::types::TableId;

#[derive(Clone)]
struct BlockWeight;

impl Weighter<(TableId, u64), Arc<Block>> for BlockWeight {
    fn weight(&self, _key: &(TableId, u64), val: &Arc<Block>) -> u64 {
        val.memory_bytes() as u64
    }
}

/// A byte-bounded cache of blocks shared by every table of one engine
/// (quick_cache's CLOCK-Pro, sharded).
#[derive(Clone)]
pub(crate) struct BlockCache {
    inner: Arc<Inner>,
}

struct Inner {
    cache: Option<Cache<(TableId, u64), Arc<Block>, BlockWeight>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCache").finish_non_exhaustive()
    }
}

impl BlockCache {
    /// A cache of at most `bytes` (0: no cache).
    pub(crate) fn new(bytes: u64) -> BlockCache {
        let cache = (bytes > 0).then(|| {
            // About one 4 KiB block per item, for the cache's sizing.
            let items = (bytes / 4096).max(16) as usize;
            Cache::with_weighter(items, bytes, BlockWeight)
        });
        BlockCache { inner: Arc::new(Inner { cache, hits: AtomicU64::new(0), misses: AtomicU64::new(0) }) }
    }

    pub(crate) fn get_or_load(
        &self,
        table: TableId,
        offset: u64,
        load: impl FnOnce() -> Result<Arc<Block>>,
    ) -> Result<Arc<Block>> {
        let Some(cache) = &self.inner.cache else {
            self.inner.misses.fetch_add(1, Ordering::Relaxed);
            return load();
        };
        if let Some(b) = cache.get(&(table, offset)) {
            self.inner.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(b);
        }
        self.inner.misses.fetch_add(1, Ordering::Relaxed);
        let b = load()?;
        cache.insert((table, offset), Arc::clone(&b));
        Ok(b)
    }

    /// A cached block, without loading or inserting (not counted).
    pub(crate) fn peek(&self, table: TableId, offset: u64) -> Option<Arc<Block>> {
        self.inner.cache.as_ref()?.peek(&(table, offset))
    }

    /// (hits, misses) so far.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (self.inner.hits.load(Ordering::Relaxed), self.inner.misses.load(Ordering::Relaxed))
    }

    /// Bytes held now.
    pub(crate) fn bytes(&self) -> u64 {
        self.inner.cache.as_ref().map_or(0, |c| c.weight())
    }
}
