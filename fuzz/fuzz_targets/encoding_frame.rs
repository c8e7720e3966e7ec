//! Fuzz the HDE decoders. First input byte picks the mode:
//!
//! * even: the rest is a sequence of frames cut at the lengths their headers claim, with
//!   each frame's CRC recomputed so mutations reach the payload decoders (batch bodies,
//!   zstd, control sections, references, offers); fed to a receiver with and one without
//!   a page store.
//! * odd: the rest is `[flips, (pos_lo, pos_hi, xor) * flips, data...]`: `data` goes
//!   through a real sender (pages or stream), the frames must decode bit-exactly, then the
//!   flips are applied (CRCs fixed up again) and the receiver must reject or accept them
//!   without panicking.
//!
//! Errors are the expected outcome; any panic, hang or oversized allocation is a bug.
#![no_main]

use dwcp_encoding::frame::{HEADER_LEN, peek_frame_len};
use dwcp_encoding::{
    DictionaryConfig, Limits, MemoryPageStore, Message, PAGE_SIZE, Receiver, ReceiverEvent, Sender,
    SenderConfig, SenderOutput,
};
use libfuzzer_sys::fuzz_target;

fn limits() -> Limits {
    Limits {
        max_frame_payload: 1 << 20,
        max_batch_pages: 256,
        max_literal_bytes: 1 << 20,
        max_transfer_unique_bytes: 16 << 20,
        ..Limits::default()
    }
}

fn fix_crc(frame: &mut [u8]) {
    if frame.len() < HEADER_LEN {
        return;
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&frame[..12]);
    h.update(&frame[HEADER_LEN..]);
    let c = h.finalize().to_le_bytes();
    frame[12..HEADER_LEN].copy_from_slice(&c);
}

fn feed(frames: &[Vec<u8>]) {
    let l = limits();
    let mut a = Receiver::new(l.clone()).expect("receiver");
    let mut b = Receiver::with_store(l, Box::new(MemoryPageStore::new(1 << 20))).expect("receiver");
    let (mut a_ok, mut b_ok) = (true, true);
    for f in frames {
        a_ok = a_ok && a.handle_frame(f).is_ok();
        b_ok = b_ok && b.handle_frame(f).is_ok();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let _ = Message::decode(rest, &limits());
    if mode % 2 == 0 {
        let mut frames = Vec::new();
        let mut r = rest;
        while r.len() >= HEADER_LEN {
            let n = match peek_frame_len(r, limits().max_frame_payload) {
                Ok(Some(n)) => n.min(r.len()),
                _ => break,
            };
            let mut f = r[..n].to_vec();
            fix_crc(&mut f);
            frames.push(f);
            r = &r[n..];
        }
        feed(&frames);
        return;
    }

    // Structured mode: real frames from a real sender, then corruption.
    let Some((&flips, rest)) = rest.split_first() else {
        return;
    };
    let nflips = usize::from(flips % 8);
    if rest.len() < nflips * 3 {
        return;
    }
    let (flip_bytes, payload) = rest.split_at(nflips * 3);
    let stream = mode & 2 != 0;
    let cfg = SenderConfig::default()
        .with_batch_pages(usize::from(mode >> 2).max(1))
        .with_dictionary(DictionaryConfig::Off);
    let mut s = Sender::new(cfg).expect("valid config");
    let pages_len = payload.len() - payload.len() % PAGE_SIZE;
    let r = if stream {
        s.push_stream(payload)
    } else {
        s.push_pages(0, &payload[..pages_len])
    };
    r.expect("push");
    s.finish().expect("finish");
    let mut frames = Vec::new();
    while let Some(o) = s.poll_output() {
        match o {
            SenderOutput::Send(f) => frames.push(f),
            SenderOutput::Compress(j) => s
                .handle_compressed(j.run().expect("compress"))
                .expect("in order"),
        }
    }
    // Unmodified frames decode to exactly the input.
    let mut rx = Receiver::new(limits()).expect("receiver");
    let mut out = Vec::new();
    for f in &frames {
        for ev in rx.handle_frame(f).expect("valid frames decode") {
            match ev {
                ReceiverEvent::Pages { data, .. } => out.extend_from_slice(&data),
                ReceiverEvent::Stream(b) => out.extend_from_slice(&b),
                _ => {}
            }
        }
    }
    let want = if stream {
        payload
    } else {
        &payload[..pages_len]
    };
    assert_eq!(out, want, "round trip differs");
    // Corrupt and decode again.
    if nflips > 0 && !frames.is_empty() {
        for f in flip_bytes.chunks_exact(3) {
            let total: usize = frames.iter().map(Vec::len).sum();
            let mut pos = usize::from(u16::from_le_bytes([f[0], f[1]])) % total.max(1);
            for fr in &mut frames {
                if pos < fr.len() {
                    fr[pos] ^= f[2].max(1);
                    break;
                }
                pos -= fr.len();
            }
        }
        for f in &mut frames {
            fix_crc(f);
        }
        feed(&frames);
    }
});
