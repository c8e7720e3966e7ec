//! Fuzz the HDE decoders. First input byte picks the mode:
//!
//! * even: the rest is a sequence of frames cut at the lengths their headers claim, with
//!   each frame's CRC recomputed so mutations reach the payload decoders (batch bodies,
//!   zstd, control sections, references, offers); fed to a receiver with and one without
//!   a page store.
//! * odd: the rest is `[flips, (pos_lo, pos_hi, xor) * flips, data...]`: `data` goes
//!   through a real sender (pages or stream), the frames must decode bit-exactly, then the
//!   flips are applied (CRCs fixed up again) and the receiver must reject or accept them
//!   without panicking. With bit 6 of the mode byte set, `data` is first sent (with hash
//!   offers, a receiver page store and a sender reference store) and then sent again with
//!   every 61st byte changed, so the second transfer carries held pages, XOR deltas and
//!   patches; its frames are checked and corrupted the same way, against a receiver that
//!   holds the first transfer.
//!
//! Errors are the expected outcome; any panic, hang or oversized allocation is a bug.
#![no_main]

use dwcp_encoding::frame::{HEADER_LEN, peek_frame_len};
use dwcp_encoding::loopback::{Wire, pump};
use dwcp_encoding::{
    DictionaryConfig, Limits, MemoryPageStore, Message, PAGE_SIZE, PageStore, Receiver,
    ReceiverEvent, Sender, SenderConfig, SenderOutput,
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
    if mode & 0x40 != 0 {
        second_transfer(mode, flip_bytes, payload);
        return;
    }
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

/// Sends `data` and then a changed copy through a real sender with offers and stores,
/// checks both round trips, and returns the second transfer's frames.
fn two_transfers(mode: u8, data: &[u8]) -> Vec<Vec<u8>> {
    let stream = mode & 2 != 0;
    let pages_len = data.len() - data.len() % PAGE_SIZE;
    let first: Vec<u8> = if stream {
        data.to_vec()
    } else {
        data[..pages_len].to_vec()
    };
    let mut second = first.clone();
    for b in second.iter_mut().step_by(61) {
        *b ^= 0x5a;
    }
    let cfg = SenderConfig::default()
        .with_batch_pages(usize::from((mode >> 2) & 0x0f).max(1))
        .with_offers(true)
        .with_vm_id(7)
        .with_dictionary(DictionaryConfig::Off);
    let mut store: Option<Box<dyn PageStore + Send>> =
        Some(Box::new(MemoryPageStore::new(16 << 20)));
    let mut reference = None;
    let mut second_frames = Vec::new();
    for (i, input) in [&first, &second].into_iter().enumerate() {
        let mut r = Receiver::with_store(limits(), store.take().expect("store")).expect("receiver");
        let s = Sender::new(cfg.clone()).expect("valid config");
        let mut s = match reference.take() {
            Some(rf) => s.with_reference(rf),
            None => s.with_reference_store(Box::new(MemoryPageStore::new(16 << 20))),
        };
        let mut out = Vec::new();
        let mut sink = |ev: ReceiverEvent| match ev {
            ReceiverEvent::Pages { data, .. } => out.extend_from_slice(&data),
            ReceiverEvent::Stream(b) => out.extend_from_slice(&b),
            _ => {}
        };
        // Record the frames the sender emits; replies go back to it. Push a page at a
        // time so the in-flight bound is never hit.
        let mut frames = Vec::new();
        for (k, chunk) in input.chunks(PAGE_SIZE).enumerate() {
            if stream {
                s.push_stream(chunk).expect("push");
            } else {
                s.push_pages(k as u64, chunk).expect("push");
            }
            pump_recording(&mut s, &mut r, &mut frames, &mut sink);
        }
        s.finish().expect("finish");
        pump_recording(&mut s, &mut r, &mut frames, &mut sink);
        assert_eq!(&out, input, "round trip {i} differs");
        if i == 1 {
            second_frames = frames;
        }
        store = r.into_store();
        reference = s.take_reference();
    }
    second_frames
}

fn pump_recording(
    s: &mut Sender,
    r: &mut Receiver,
    frames: &mut Vec<Vec<u8>>,
    sink: &mut dyn FnMut(ReceiverEvent),
) {
    while let Some(o) = s.poll_output() {
        match o {
            SenderOutput::Compress(j) => s
                .handle_compressed(j.run().expect("compress"))
                .expect("in order"),
            SenderOutput::Send(f) => {
                for ev in r.handle_frame(&f).expect("valid frames decode") {
                    match ev {
                        ReceiverEvent::Reply(reply) => s.handle_reply(&reply).expect("reply"),
                        other => sink(other),
                    }
                }
                frames.push(f);
            }
        }
    }
}

fn second_transfer(mode: u8, flip_bytes: &[u8], data: &[u8]) {
    let mut frames = two_transfers(mode, data);
    if flip_bytes.is_empty() || frames.is_empty() {
        return;
    }
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
    // A receiver holding the first transfer (sent again, unmodified, to rebuild its
    // store) decodes the corrupted second transfer: errors are fine, panics are not.
    let stream = mode & 2 != 0;
    let pages_len = data.len() - data.len() % PAGE_SIZE;
    let first: &[u8] = if stream { data } else { &data[..pages_len] };
    let cfg = SenderConfig::default()
        .with_batch_pages(usize::from((mode >> 2) & 0x0f).max(1))
        .with_offers(true)
        .with_vm_id(7)
        .with_dictionary(DictionaryConfig::Off);
    let mut r =
        Receiver::with_store(limits(), Box::new(MemoryPageStore::new(16 << 20))).expect("receiver");
    let mut s = Sender::new(cfg).expect("valid config");
    let mut ignore = |_: ReceiverEvent| {};
    let mut wire = Wire::default();
    for (k, chunk) in first.chunks(PAGE_SIZE).enumerate() {
        if stream {
            s.push_stream(chunk).expect("push");
        } else {
            s.push_pages(k as u64, chunk).expect("push");
        }
        pump(&mut s, &mut r, &mut wire, &mut ignore).expect("first transfer");
    }
    s.finish().expect("finish");
    pump(&mut s, &mut r, &mut wire, &mut ignore).expect("first transfer");
    let mut r = Receiver::with_store(limits(), r.into_store().expect("store")).expect("receiver");
    for f in &frames {
        if r.handle_frame(f).is_err() {
            break;
        }
    }
}
