//! Per-transfer statistics, the source of the manual's HDE metrics.

/// What a sender did in one transfer. The node's metrics layer turns these into
/// `dwcp_hde_compression_ratio` ([`TransferStats::compression_ratio`]) and
/// `dwcp_hde_dedup_hit_rate` ([`TransferStats::dedup_hit_rate`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TransferStats {
    /// Input bytes: pages × 4096, or stream bytes.
    pub bytes_in: u64,
    /// Bytes of every frame the sender emitted (start, dictionary, offers, batches, end).
    pub bytes_out: u64,
    /// Bytes of those frames that were offers (hash lists).
    pub offer_bytes: u64,
    /// Bytes of replies received from the receiver (missing sets).
    pub reply_bytes: u64,
    /// Pages seen (including lifted stream pages).
    pub pages: u64,
    /// Pages that were all zero (sent as a flag).
    pub zero_pages: u64,
    /// Pages that repeated an earlier page of this transfer (sent as a reference).
    pub dedup_hits_local: u64,
    /// Pages the receiver already held from earlier transfers (sent as a reference).
    pub dedup_hits_remote: u64,
    /// Pages whose bytes were sent (compressed), including delta pages.
    pub new_pages: u64,
    /// Of those, pages sent as an XOR delta against a page the receiver held at the
    /// same key.
    pub delta_pages: u64,
    /// Pages sent as a zstd patch against similar pages the receiver held (counted
    /// apart from `new_pages`: their bytes are in the batch's patch section).
    pub patch_pages: u64,
    /// Stream bytes that were not lifted pages (headers, device state).
    pub literal_bytes: u64,
    /// Batches sent.
    pub batches: u64,
    /// zstd level of the last batch.
    pub level: i32,
    /// Id of the dictionary in use, 0 for none.
    pub dict_id: u64,
    /// Size of that dictionary (sent once, counted in `bytes_out`).
    pub dict_bytes: u64,
    /// Measured on the first batch that used the dictionary: 1 - (bytes with dictionary
    /// / bytes without). `None` when no dictionary was used.
    pub dict_gain: Option<f64>,
}

impl TransferStats {
    /// The manual's `dwcp_hde_compression_ratio`: the fraction of bytes saved,
    /// `1 - bytes_out / bytes_in` (target 0.5-0.7, alert below 0.3).
    pub fn compression_ratio(&self) -> f64 {
        if self.bytes_in == 0 {
            return 0.0;
        }
        1.0 - (self.bytes_out + self.reply_bytes) as f64 / self.bytes_in as f64
    }

    /// The manual's `dwcp_hde_dedup_hit_rate`: of the non-zero pages, the fraction sent as
    /// a reference (within or across transfers).
    pub fn dedup_hit_rate(&self) -> f64 {
        let nonzero = self.pages - self.zero_pages;
        if nonzero == 0 {
            return 0.0;
        }
        (self.dedup_hits_local + self.dedup_hits_remote) as f64 / nonzero as f64
    }

    /// Fraction of pages that were zero.
    pub fn zero_fraction(&self) -> f64 {
        if self.pages == 0 {
            return 0.0;
        }
        self.zero_pages as f64 / self.pages as f64
    }
}

/// What a receiver did in one transfer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReceiveStats {
    /// Bytes of frames received.
    pub frame_bytes: u64,
    /// Bytes reconstructed (pages × 4096 or stream bytes).
    pub bytes_out: u64,
    /// Pages reconstructed.
    pub pages: u64,
    /// Pages taken from the page store (held from earlier transfers).
    pub held_pages: u64,
    /// Pages added to the page store.
    pub stored_pages: u64,
    /// Pages rebuilt from an XOR delta against a held base page.
    pub delta_pages: u64,
    /// Pages rebuilt from a zstd patch against held similar pages.
    pub patch_pages: u64,
    /// Batches decoded.
    pub batches: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios() {
        let s = TransferStats {
            bytes_in: 1000,
            bytes_out: 300,
            pages: 10,
            zero_pages: 6,
            dedup_hits_local: 1,
            dedup_hits_remote: 1,
            ..TransferStats::default()
        };
        assert!((s.compression_ratio() - 0.7).abs() < 1e-12);
        assert!((s.dedup_hit_rate() - 0.5).abs() < 1e-12);
        assert!((s.zero_fraction() - 0.6).abs() < 1e-12);
        assert_eq!(TransferStats::default().dedup_hit_rate(), 0.0);
    }
}
