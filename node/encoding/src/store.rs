//! The receiver's page index: pages it already holds from earlier transfers, by hash.
//!
//! A sender offers hashes before it sends bytes; the receiver answers from its
//! [`PageStore`]. Two implementations: [`MemoryPageStore`] (tests, short-lived
//! receivers) and `SledPageStore` (feature `sled-store`, on by default), which persists
//! across restarts. Both are bounded by a byte capacity (default 2 GiB, the manual's
//! `deduplication.cache_size`) and evict the least recently used page first.
//!
//! Besides the hash index, a store keeps a **page-key index**: per VM and page key (page
//! number, or tagged RAM address for streams), the hash of the page last received there.
//! It lets a receiver name the page it already holds at a changed page's place, so the
//! sender can send an XOR delta against it (see [`crate::message`]). The key index is
//! bounded too ([`MAX_KEY_ENTRIES_PER_PAGE`] entries per page of capacity); past the
//! bound the entries of the lowest VM id are dropped first. An entry whose page was
//! evicted is harmless: the lookup of its hash fails and the page is sent whole.

use std::collections::BTreeMap;

use crate::error::StoreError;
use crate::page::{PAGE_SIZE, PageHash};

/// Default store capacity: 2 GiB of page content (the manual's `cache_size: 2GB`).
pub const DEFAULT_CAPACITY_BYTES: u64 = 2 << 30;

/// Bound of the page-key index: this many entries per page of capacity (zero pages of a
/// VM have no entry, so a few VMs' worth of keys fit).
pub const MAX_KEY_ENTRIES_PER_PAGE: u64 = 4;

/// A bounded, content-addressed set of pages held by a receiver.
pub trait PageStore {
    /// The page with this hash, if held. Counts as a use for eviction order.
    fn get(&mut self, hash: &PageHash) -> Result<Option<Vec<u8>>, StoreError>;
    /// True if the page with this hash is held (no copy; may count as a use).
    fn contains(&mut self, hash: &PageHash) -> Result<bool, StoreError> {
        Ok(self.get(hash)?.is_some())
    }
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
    /// The hash of the page last recorded at `key` of VM `vm` (page-key index). Stores
    /// without a key index return `None` (no deltas then).
    fn hash_at(&mut self, vm: u64, key: u64) -> Result<Option<PageHash>, StoreError> {
        let _ = (vm, key);
        Ok(None)
    }
    /// Records (or, with `None`, forgets) the page at `key` of VM `vm`.
    fn set_hash_at(&mut self, vm: u64, key: u64, hash: Option<PageHash>) -> Result<(), StoreError> {
        let _ = (vm, key, hash);
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
    at: BTreeMap<(u64, u64), PageHash>,
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

    fn contains(&mut self, hash: &PageHash) -> Result<bool, StoreError> {
        Ok(self.pages.contains_key(hash))
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

    fn hash_at(&mut self, vm: u64, key: u64) -> Result<Option<PageHash>, StoreError> {
        Ok(self.at.get(&(vm, key)).copied())
    }

    fn set_hash_at(&mut self, vm: u64, key: u64, hash: Option<PageHash>) -> Result<(), StoreError> {
        match hash {
            None => {
                self.at.remove(&(vm, key));
            }
            Some(h) => {
                if self.capacity_pages == 0 {
                    return Ok(());
                }
                if self.at.insert((vm, key), h).is_none() {
                    while self.at.len() as u64 > self.capacity_pages * MAX_KEY_ENTRIES_PER_PAGE {
                        self.at.pop_first();
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(feature = "sled-store")]
pub use sled_store::SledPageStore;

#[cfg(feature = "sled-store")]
mod sled_store {
    use super::{MAX_KEY_ENTRIES_PER_PAGE, PageStore, check_page};
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
        at: sled::Tree,
        at_len: u64,
        tick: u64,
        len: u64,
        capacity_pages: u64,
    }

    fn at_key(vm: u64, key: u64) -> [u8; 16] {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&vm.to_be_bytes());
        k[8..].copy_from_slice(&key.to_be_bytes());
        k
    }

    impl SledPageStore {
        /// Opens (or creates) the store in `db`, bounded to `capacity_bytes`.
        pub fn open(db: &sled::Db, capacity_bytes: u64) -> Result<Self, StoreError> {
            let pages = db.open_tree("hde_pages").map_err(backend)?;
            let ticks = db.open_tree("hde_ticks").map_err(backend)?;
            let lru = db.open_tree("hde_lru").map_err(backend)?;
            let at = db.open_tree("hde_at").map_err(backend)?;
            let at_len = at.len() as u64;
            let tick = match lru.last().map_err(backend)? {
                Some((k, _)) => decode_tick(&k)?,
                None => 0,
            };
            let len = pages.len() as u64;
            let mut s = Self {
                pages,
                ticks,
                lru,
                at,
                at_len,
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

        fn contains(&mut self, hash: &PageHash) -> Result<bool, StoreError> {
            self.pages.contains_key(hash.0).map_err(backend)
        }

        fn hash_at(&mut self, vm: u64, key: u64) -> Result<Option<PageHash>, StoreError> {
            match self.at.get(at_key(vm, key)).map_err(backend)? {
                None => Ok(None),
                Some(v) => {
                    let a: [u8; HASH_LEN] = v
                        .as_ref()
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("page-key entry is not 32 bytes"))?;
                    Ok(Some(PageHash(a)))
                }
            }
        }

        fn set_hash_at(
            &mut self,
            vm: u64,
            key: u64,
            hash: Option<PageHash>,
        ) -> Result<(), StoreError> {
            let k = at_key(vm, key);
            match hash {
                None => {
                    if self.at.remove(k).map_err(backend)?.is_some() {
                        self.at_len = self.at_len.saturating_sub(1);
                    }
                }
                Some(h) => {
                    if self.capacity_pages == 0 {
                        return Ok(());
                    }
                    if self.at.insert(k, &h.0).map_err(backend)?.is_none() {
                        self.at_len += 1;
                        while self.at_len > self.capacity_pages * MAX_KEY_ENTRIES_PER_PAGE {
                            if self.at.pop_min().map_err(backend)?.is_none() {
                                break;
                            }
                            self.at_len -= 1;
                        }
                    }
                }
            }
            Ok(())
        }

        fn flush(&mut self) -> Result<(), StoreError> {
            self.at.flush().map_err(backend)?;
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
        // The page-key index: per VM, last writer wins, None forgets.
        assert_eq!(store.hash_at(7, 100).unwrap(), None);
        store.set_hash_at(7, 100, Some(h1)).unwrap();
        store.set_hash_at(8, 100, Some(h4)).unwrap();
        assert_eq!(store.hash_at(7, 100).unwrap(), Some(h1));
        store.set_hash_at(7, 100, Some(h4)).unwrap();
        assert_eq!(store.hash_at(7, 100).unwrap(), Some(h4));
        assert_eq!(store.hash_at(8, 100).unwrap(), Some(h4));
        store.set_hash_at(7, 100, None).unwrap();
        assert_eq!(store.hash_at(7, 100).unwrap(), None);
        // Bounded: 3 pages of capacity allow 12 key entries; the lowest VM goes first.
        for k in 0..20 {
            store.set_hash_at(9, k, Some(h1)).unwrap();
        }
        assert_eq!(
            store.hash_at(8, 100).unwrap(),
            None,
            "oldest VM's keys dropped"
        );
        assert_eq!(store.hash_at(9, 0).unwrap(), None);
        assert_eq!(store.hash_at(9, 19).unwrap(), Some(h1));
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
        // sled's background flusher may hold the file lock for a moment after the handle is
        // dropped: retry the reopen instead of failing on that race.
        let mut tries = 0;
        let db = loop {
            match sled::open(dir.path()) {
                Ok(db) => break db,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => panic!("reopening the sled store: {e}"),
            }
        };
        // Reopened with a smaller bound: the oldest page goes.
        let mut s = SledPageStore::open(&db, 2 * PAGE_SIZE as u64).unwrap();
        assert_eq!(s.len(), 2);
        assert!(
            s.get(&page(1).0).unwrap().is_some(),
            "most recently used kept"
        );
    }
}
