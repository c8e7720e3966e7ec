//! The receiver's page index: pages it already holds from earlier transfers, by hash.
//!
//! A sender offers hashes before it sends bytes; the receiver answers from its
//! [`PageStore`]. Two implementations: [`MemoryPageStore`] (tests, short-lived
//! receivers) and `SledPageStore` (feature `sled-store`, on by default), which persists
//! across restarts. Both are bounded by a byte capacity (default 2 GiB, the manual's
//! `deduplication.cache_size`) and evict the least recently used page first.

use std::collections::BTreeMap;

use crate::error::StoreError;
use crate::page::{PAGE_SIZE, PageHash};

/// Default store capacity: 2 GiB of page content (the manual's `cache_size: 2GB`).
pub const DEFAULT_CAPACITY_BYTES: u64 = 2 << 30;

/// A bounded, content-addressed set of pages held by a receiver.
pub trait PageStore {
    /// The page with this hash, if held. Counts as a use for eviction order.
    fn get(&mut self, hash: &PageHash) -> Result<Option<Vec<u8>>, StoreError>;
    /// Stores a page under its hash (the caller has verified the hash), evicting the
    /// least recently used pages if the capacity is exceeded.
    fn insert(&mut self, hash: PageHash, page: &[u8]) -> Result<(), StoreError>;
    /// Number of pages held.
    fn len(&self) -> u64;
    /// True when no page is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Capacity in bytes of page content.
    fn capacity_bytes(&self) -> u64;
    /// Makes inserted pages durable (no-op for memory).
    fn flush(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

fn check_page(page: &[u8]) -> Result<(), StoreError> {
    if page.len() != PAGE_SIZE {
        return Err(StoreError::BadPageSize {
            expected: PAGE_SIZE,
            got: page.len(),
        });
    }
    Ok(())
}

/// An in-memory [`PageStore`] with LRU eviction.
#[derive(Debug, Default)]
pub struct MemoryPageStore {
    pages: BTreeMap<PageHash, (Box<[u8]>, u64)>,
    lru: BTreeMap<u64, PageHash>,
    tick: u64,
    capacity_pages: u64,
}

impl MemoryPageStore {
    /// A store holding at most `capacity_bytes` of page content (rounded down to pages).
    pub fn new(capacity_bytes: u64) -> Self {
        Self {
            capacity_pages: capacity_bytes / PAGE_SIZE as u64,
            ..Self::default()
        }
    }

    fn touch(&mut self, hash: &PageHash) {
        self.tick += 1;
        let tick = self.tick;
        if let Some((_, t)) = self.pages.get_mut(hash) {
            self.lru.remove(t);
            *t = tick;
            self.lru.insert(tick, *hash);
        }
    }
}

impl PageStore for MemoryPageStore {
    fn get(&mut self, hash: &PageHash) -> Result<Option<Vec<u8>>, StoreError> {
        self.touch(hash);
        Ok(self.pages.get(hash).map(|(p, _)| p.to_vec()))
    }

    fn insert(&mut self, hash: PageHash, page: &[u8]) -> Result<(), StoreError> {
        check_page(page)?;
        if self.capacity_pages == 0 {
            return Ok(());
        }
        if self.pages.contains_key(&hash) {
            self.touch(&hash);
            return Ok(());
        }
        while self.pages.len() as u64 >= self.capacity_pages {
            let Some((_, old)) = self.lru.pop_first() else {
                break;
            };
            self.pages.remove(&old);
        }
        self.tick += 1;
        self.pages.insert(hash, (page.into(), self.tick));
        self.lru.insert(self.tick, hash);
        Ok(())
    }

    fn len(&self) -> u64 {
        self.pages.len() as u64
    }

    fn capacity_bytes(&self) -> u64 {
        self.capacity_pages * PAGE_SIZE as u64
    }
}

#[cfg(feature = "sled-store")]
pub use sled_store::SledPageStore;

#[cfg(feature = "sled-store")]
mod sled_store {
    use super::{PageStore, check_page};
    use crate::error::StoreError;
    use crate::page::{HASH_LEN, PAGE_SIZE, PageHash};

    fn backend(e: sled::Error) -> StoreError {
        StoreError::Backend(e.to_string())
    }

    /// A sled-backed [`PageStore`]: three trees, `pages` (hash → content), `ticks`
    /// (hash → last use) and `lru` (last use → hash), so the least recently used page is
    /// the first key of `lru`. Survives restarts; the page count is recounted at open.
    #[derive(Debug)]
    pub struct SledPageStore {
        pages: sled::Tree,
        ticks: sled::Tree,
        lru: sled::Tree,
        tick: u64,
        len: u64,
        capacity_pages: u64,
    }

    impl SledPageStore {
        /// Opens (or creates) the store in `db`, bounded to `capacity_bytes`.
        pub fn open(db: &sled::Db, capacity_bytes: u64) -> Result<Self, StoreError> {
            let pages = db.open_tree("hde_pages").map_err(backend)?;
            let ticks = db.open_tree("hde_ticks").map_err(backend)?;
            let lru = db.open_tree("hde_lru").map_err(backend)?;
            let tick = match lru.last().map_err(backend)? {
                Some((k, _)) => decode_tick(&k)?,
                None => 0,
            };
            let len = pages.len() as u64;
            let mut s = Self {
                pages,
                ticks,
                lru,
                tick,
                len,
                capacity_pages: capacity_bytes / PAGE_SIZE as u64,
            };
            s.evict_to(s.capacity_pages)?;
            Ok(s)
        }

        fn evict_to(&mut self, max: u64) -> Result<(), StoreError> {
            while self.len > max {
                let Some((k, h)) = self.lru.pop_min().map_err(backend)? else {
                    break;
                };
                let _ = k;
                self.ticks.remove(&h).map_err(backend)?;
                if self.pages.remove(&h).map_err(backend)?.is_some() {
                    self.len -= 1;
                }
            }
            Ok(())
        }

        fn touch(&mut self, hash: &PageHash) -> Result<(), StoreError> {
            self.tick += 1;
            let new = self.tick.to_be_bytes();
            if let Some(old) = self.ticks.insert(hash.0, &new).map_err(backend)? {
                self.lru.remove(old).map_err(backend)?;
            }
            self.lru.insert(new, &hash.0).map_err(backend)?;
            Ok(())
        }
    }

    fn decode_tick(k: &[u8]) -> Result<u64, StoreError> {
        let a: [u8; 8] = k
            .try_into()
            .map_err(|_| StoreError::Corrupt("lru key is not 8 bytes"))?;
        Ok(u64::from_be_bytes(a))
    }

    impl PageStore for SledPageStore {
        fn get(&mut self, hash: &PageHash) -> Result<Option<Vec<u8>>, StoreError> {
            let Some(v) = self.pages.get(hash.0).map_err(backend)? else {
                return Ok(None);
            };
            if v.len() != PAGE_SIZE {
                return Err(StoreError::Corrupt("stored page is not 4096 bytes"));
            }
            self.touch(hash)?;
            Ok(Some(v.to_vec()))
        }

        fn insert(&mut self, hash: PageHash, page: &[u8]) -> Result<(), StoreError> {
            check_page(page)?;
            if self.capacity_pages == 0 {
                return Ok(());
            }
            if self.pages.insert(hash.0, page).map_err(backend)?.is_none() {
                self.len += 1;
            }
            self.touch(&hash)?;
            self.evict_to(self.capacity_pages)
        }

        fn len(&self) -> u64 {
            self.len
        }

        fn capacity_bytes(&self) -> u64 {
            self.capacity_pages * PAGE_SIZE as u64
        }

        fn flush(&mut self) -> Result<(), StoreError> {
            self.pages.flush().map_err(backend)?;
            self.ticks.flush().map_err(backend)?;
            self.lru.flush().map_err(backend)?;
            Ok(())
        }
    }

    const _: () = assert!(HASH_LEN == 32);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(i: u8) -> (PageHash, Vec<u8>) {
        let p = vec![i; PAGE_SIZE];
        (PageHash::of(&p), p)
    }

    fn exercise(store: &mut dyn PageStore) {
        assert!(store.is_empty());
        for i in 1..=3 {
            let (h, p) = page(i);
            store.insert(h, &p).unwrap();
        }
        assert_eq!(store.len(), 3);
        // Use page 1, so page 2 is now the least recently used.
        let (h1, p1) = page(1);
        assert_eq!(store.get(&h1).unwrap(), Some(p1));
        let (h4, p4) = page(4);
        store.insert(h4, &p4).unwrap();
        assert_eq!(store.len(), 3, "bounded to three pages");
        assert_eq!(store.get(&page(2).0).unwrap(), None, "LRU page evicted");
        assert!(store.get(&page(3).0).unwrap().is_some());
        assert!(store.get(&h1).unwrap().is_some());
        assert!(matches!(
            store.insert(h4, &[0u8; 10]),
            Err(StoreError::BadPageSize { .. })
        ));
        store.flush().unwrap();
    }

    #[test]
    fn memory_store_evicts_lru() {
        let mut s = MemoryPageStore::new(3 * PAGE_SIZE as u64);
        exercise(&mut s);
    }

    #[cfg(feature = "sled-store")]
    #[test]
    fn sled_store_evicts_lru_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let mut s = SledPageStore::open(&db, 3 * PAGE_SIZE as u64).unwrap();
            exercise(&mut s);
            db.flush().unwrap();
        }
        let db = sled::open(dir.path()).unwrap();
        // Reopened with a smaller bound: the oldest page goes.
        let mut s = SledPageStore::open(&db, 2 * PAGE_SIZE as u64).unwrap();
        assert_eq!(s.len(), 2);
        assert!(
            s.get(&page(1).0).unwrap().is_some(),
            "most recently used kept"
        );
    }
}
