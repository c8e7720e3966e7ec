//! Guest pages: the 4 KiB unit of dedup, zero detection and SHA-256 page hashes.

use sha2::{Digest, Sha256};

/// Size of one guest page, the unit of deduplication.
pub const PAGE_SIZE: usize = 4096;
/// Length of a page hash (SHA-256).
pub const HASH_LEN: usize = 32;

/// SHA-256 of a page's 4096 bytes: the identity of its content.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct PageHash(pub [u8; HASH_LEN]);

impl PageHash {
    /// Hashes one page (any length works; pages are 4096 bytes).
    ///
    /// `sha2` picks its SHA-NI backend at run time (through `cpufeatures`, on the `sha`
    /// and `sse4.1` CPUID bits) and falls back to portable code elsewhere.
    pub fn of(page: &[u8]) -> Self {
        Self(Sha256::digest(page).into())
    }

    /// A short id (the first 8 bytes, little-endian), used to name dictionaries.
    pub fn short_id(&self) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(a)
    }
}

/// True when every byte of `page` is zero. Works 64 bytes at a time so the compiler
/// vectorises it, and stops at the first non-zero block.
pub fn is_zero(page: &[u8]) -> bool {
    let mut chunks = page.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, &b| a | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&p));
        p[PAGE_SIZE - 1] = 1;
        assert!(!is_zero(&p));
        p[PAGE_SIZE - 1] = 0;
        p[0] = 0x80;
        assert!(!is_zero(&p));
        assert!(is_zero(&[0u8; 7]));
        assert!(!is_zero(&[0, 0, 3]));
    }

    #[test]
    fn hash_is_sha256() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        let h = PageHash::of(b"abc");
        assert_eq!(
            h.0[..4],
            [0xba, 0x78, 0x16, 0xbf],
            "sha256(abc) starts ba7816bf"
        );
        assert_ne!(
            PageHash::of(&[0u8; PAGE_SIZE]),
            PageHash::of(&[1u8; PAGE_SIZE])
        );
    }
}
