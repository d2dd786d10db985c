//! The block cache: uncompressed, checked blocks and the tables' index
//! partitions, bounded in bytes together with the filters of open tables
//! (held outside it, charged against its bound).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use quick_cache::Weighter;
use quick_cache::sync::Cache;

use crate::block::Block;
use crate::error::Result;
use crate::table::Index;
use crate::types::TableId;

/// One cached item: what a table's file holds at one offset.
#[derive(Clone)]
pub(crate) enum Cached {
    /// A data block.
    Block(Arc<Block>),
    /// An index partition, decoded.
    Index(Arc<Index>),
}

impl Cached {
    fn memory_bytes(&self) -> usize {
        match self {
            Cached::Block(b) => b.memory_bytes(),
            Cached::Index(i) => i.memory_bytes(),
        }
    }
}

/// Takes one kind out of a [`Cached`].
pub(crate) trait CacheKind: Sized {
    fn wrap(v: Arc<Self>) -> Cached;
    fn unwrap(c: Cached) -> Option<Arc<Self>>;
}

macro_rules! cache_kind {
    ($t:ty, $v:ident) => {
        impl CacheKind for $t {
            fn wrap(v: Arc<Self>) -> Cached {
                Cached::$v(v)
            }
            fn unwrap(c: Cached) -> Option<Arc<Self>> {
                match c {
                    Cached::$v(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
cache_kind!(Block, Block);
cache_kind!(Index, Index);

#[derive(Clone)]
struct Weight;

impl Weighter<(TableId, u64), Cached> for Weight {
    fn weight(&self, _key: &(TableId, u64), val: &Cached) -> u64 {
        val.memory_bytes() as u64
    }
}

/// A byte-bounded cache of blocks and index partitions shared by every table
/// of one engine (quick_cache's CLOCK-Pro, sharded). Memory held elsewhere
/// for the engine's tables (their filters) is charged against the same
/// bound with [`BlockCache::charge`]: the cache's own capacity shrinks by it.
#[derive(Clone)]
pub(crate) struct BlockCache {
    inner: Arc<Inner>,
}

struct Inner {
    cache: Option<Cache<(TableId, u64), Cached, Weight>>,
    /// The bound, for cached items and charged bytes together.
    bound: u64,
    /// Bytes charged from outside (see [`BlockCache::charge`]).
    charged: AtomicU64,
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
            Cache::with_weighter(items, bytes, Weight)
        });
        BlockCache {
            inner: Arc::new(Inner {
                cache,
                bound: bytes,
                charged: AtomicU64::new(0),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
            }),
        }
    }

    /// Charges `bytes` held elsewhere against the bound (`add = false`: gives
    /// them back). The cache keeps at least an eighth of the bound for its
    /// own items: charges beyond seven eighths are counted, not enforced.
    pub(crate) fn charge(&self, bytes: u64, add: bool) {
        let charged = if add {
            self.inner.charged.fetch_add(bytes, Ordering::AcqRel) + bytes
        } else {
            self.inner.charged.fetch_sub(bytes, Ordering::AcqRel) - bytes
        };
        if let Some(cache) = &self.inner.cache {
            let bound = self.inner.bound;
            cache.set_capacity(bound.saturating_sub(charged).max(bound / 8));
        }
    }

    /// Bytes charged from outside now.
    pub(crate) fn charged(&self) -> u64 {
        self.inner.charged.load(Ordering::Acquire)
    }

    /// The capacity left for cached items now.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> u64 {
        self.inner.cache.as_ref().map_or(0, |c| c.capacity())
    }

    /// The item of kind `T` at `(table, offset)`, loaded (and inserted) on a
    /// miss. `fill = false` (compaction reads) uses a cached item but does not
    /// insert one, and is not counted as a hit or a miss. An item of another
    /// kind at the same place (only a damaged file can point two kinds at one
    /// offset) is not used or replaced.
    pub(crate) fn get_or_load<T: CacheKind>(
        &self,
        table: TableId,
        offset: u64,
        fill: bool,
        load: impl FnOnce() -> Result<Arc<T>>,
    ) -> Result<Arc<T>> {
        let Some(cache) = &self.inner.cache else {
            if fill {
                self.inner.misses.fetch_add(1, Ordering::Relaxed);
            }
            return load();
        };
        let found = if fill { cache.get(&(table, offset)) } else { cache.peek(&(table, offset)) };
        match found.map(T::unwrap) {
            Some(Some(v)) => {
                if fill {
                    self.inner.hits.fetch_add(1, Ordering::Relaxed);
                }
                Ok(v)
            }
            Some(None) => load(),
            None if fill => {
                self.inner.misses.fetch_add(1, Ordering::Relaxed);
                let v = load()?;
                cache.insert((table, offset), T::wrap(Arc::clone(&v)));
                Ok(v)
            }
            None => load(),
        }
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
