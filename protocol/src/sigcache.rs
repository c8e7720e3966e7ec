//! A bounded, process-wide memo of signatures that verified.
//!
//! The same signed bytes are checked many times: a vote on receipt and again inside every
//! certificate that quotes it (commit certificates, checkpoint proofs, view changes,
//! participation records), a gossiped message once per duplicate, and in the simulator once
//! per simulated node. An ed25519 `verify_strict` costs tens of microseconds; a SHA-256 of the
//! signed bytes and a set lookup cost a fraction of that.
//!
//! This is the shape of Bitcoin Core's signature cache (`CSignatureCache`): only signatures
//! that **verified** are remembered, keyed by a collision-resistant hash of everything the
//! check depends on (signer key, signature, domain tag and payload). A lookup can therefore
//! only ever say "these exact bytes verified before"; a changed byte anywhere is a different
//! key and goes through the full check, and failures are never cached, so a forged message
//! costs the forger as much as before and cannot poison the cache.
//!
//! Verification is a pure function of its input, so the memo changes no result and no order
//! of events: the deterministic simulator gives the same trace with or without it. It holds at
//! most `2 * GENERATION` keys (32 bytes each, about 2.5 MiB with the set's nodes): when the
//! current generation is full it becomes the previous one and the one before is dropped, so an
//! entry survives at least `GENERATION` later insertions.

use std::{
    collections::BTreeSet,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use sha2::{Digest, Sha256};

/// Keys per generation.
pub(crate) const GENERATION: usize = 32_768;

/// SHA-256 of `signer || signature || signed bytes`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Key([u8; 32]);

struct Generations {
    current: BTreeSet<Key>,
    previous: BTreeSet<Key>,
}

static CACHE: Mutex<Generations> = Mutex::new(Generations {
    current: BTreeSet::new(),
    previous: BTreeSet::new(),
});
static HITS: AtomicU64 = AtomicU64::new(0);
static MISSES: AtomicU64 = AtomicU64::new(0);

fn lock() -> MutexGuard<'static, Generations> {
    // The sets stay consistent even if a holder panicked (every operation is one insert or
    // one lookup), so a poisoned lock is still usable.
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The key of one signature check.
pub(crate) fn key(signer: &[u8; 32], signature: &[u8; 64], signed: &[u8]) -> Key {
    let mut h = Sha256::new();
    h.update(signer);
    h.update(signature);
    h.update(signed);
    Key(h.finalize().into())
}

/// Whether these exact bytes verified before (counted as a hit or a miss).
pub(crate) fn verified_before(k: &Key) -> bool {
    let g = lock();
    let hit = g.current.contains(k) || g.previous.contains(k);
    drop(g);
    if hit {
        HITS.fetch_add(1, Ordering::Relaxed);
    } else {
        MISSES.fetch_add(1, Ordering::Relaxed);
    }
    hit
}

/// Remembers a check that succeeded.
pub(crate) fn remember(k: Key) {
    let mut g = lock();
    if g.current.len() >= GENERATION {
        g.previous = std::mem::take(&mut g.current);
    }
    g.current.insert(k);
}

/// Lookups answered from the memo and lookups that ran the full check, since the process
/// started (all threads).
pub fn signature_cache_stats() -> (u64, u64) {
    (HITS.load(Ordering::Relaxed), MISSES.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u32) -> Key {
        key(&[1; 32], &[2; 64], &i.to_le_bytes())
    }

    #[test]
    fn keys_differ_in_every_input() {
        let base = key(&[1; 32], &[2; 64], b"m");
        assert!(base != key(&[3; 32], &[2; 64], b"m"));
        assert!(base != key(&[1; 32], &[4; 64], b"m"));
        assert!(base != key(&[1; 32], &[2; 64], b"n"));
        assert!(base == key(&[1; 32], &[2; 64], b"m"));
    }

    #[test]
    fn an_entry_survives_a_generation_of_later_insertions_and_the_memo_stays_bounded() {
        // Other tests of this binary share the memo; these keys are unique to this test.
        let first = key(&[9; 32], &[9; 64], b"generation test");
        remember(first);
        for i in 0..(GENERATION as u32 - 1) {
            remember(k(i));
        }
        assert!(verified_before(&first));
        for i in 0..(2 * GENERATION as u32) {
            remember(k(1_000_000 + i));
        }
        assert!(!verified_before(&first), "an old entry is dropped");
        let g = lock();
        assert!(g.current.len() + g.previous.len() <= 2 * GENERATION);
    }
}
