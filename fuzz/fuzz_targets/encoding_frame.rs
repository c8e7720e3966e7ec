//! Fuzz the HDE decoders: the frame/message decoder on arbitrary bytes, and a receiver
//! fed a sequence of frames cut from the input (with and without a page store), which
//! exercises decompression, control parsing, references, offers and limits. Any panic,
//! hang or oversized allocation is a bug; errors are the expected outcome.
#![no_main]

use dwcp_encoding::{Limits, MemoryPageStore, Message, Receiver};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_frame_payload: 1 << 20,
        max_batch_pages: 256,
        max_literal_bytes: 1 << 20,
        max_transfer_unique_bytes: 16 << 20,
        ..Limits::default()
    };
    let _ = Message::decode(data, &limits);

    // Split the input into frames at the length each header claims.
    let mut rx = Receiver::new(limits.clone()).expect("receiver");
    let mut rx_store =
        Receiver::with_store(limits.clone(), Box::new(MemoryPageStore::new(1 << 20)))
            .expect("receiver");
    let mut rest = data;
    while rest.len() >= dwcp_encoding::frame::HEADER_LEN {
        let n = match dwcp_encoding::frame::peek_frame_len(rest, limits.max_frame_payload) {
            Ok(Some(n)) => n.min(rest.len()),
            _ => break,
        };
        let (frame, tail) = rest.split_at(n);
        let _ = rx.handle_frame(frame);
        let _ = rx_store.handle_frame(frame);
        rest = tail;
    }
});
