//! End-to-end tests: sender and receiver over the in-memory loopback, on synthetic
//! guest memory (zero pages, repeated kernel-like pages, text, incompressible noise).

use crate::loopback::{Wire, pump};
use crate::message::{Batch, Dict, Limits, Message, Offer, Shape, Start};
use crate::page::{PAGE_SIZE, PageHash};
use crate::receiver::{Receiver, ReceiverEvent};
use crate::sender::{DictionaryConfig, Sender, SenderConfig, SenderOutput};
use crate::store::MemoryPageStore;
use crate::{DecodeError, EncodeError};
use proptest::prelude::*;

/// Seeded xorshift, so the synthetic images are the same on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A small fake guest memory image: mostly zero pages, 0xCC-filled pages, repeated
/// "kernel text" pages, text-like pages and some noise.
pub(crate) fn fake_guest_image(pages: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut img = vec![0u8; pages * PAGE_SIZE];
    let words = [
        &b"kernel "[..],
        b"page ",
        b"struct ",
        b"0x0000 ",
        b"task ",
        b"\n",
        b"mm ",
    ];
    for p in 0..pages {
        let page = &mut img[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
        match rng.next() % 10 {
            0..=4 => {}
            5 => page.fill(0xcc),
            6 => {
                // One of 8 recurring pages.
                let k = rng.next() % 8;
                for (i, b) in page.iter_mut().enumerate() {
                    *b = (k as usize * 31 + i * 7 % 251) as u8;
                }
            }
            7 | 8 => {
                let mut i = 0;
                while i < PAGE_SIZE {
                    let w = words[(rng.next() % words.len() as u64) as usize];
                    let n = w.len().min(PAGE_SIZE - i);
                    page[i..i + n].copy_from_slice(&w[..n]);
                    i += n;
                }
            }
            _ => {
                for b in page.iter_mut() {
                    *b = rng.next() as u8;
                }
            }
        }
    }
    img
}

fn small_dict() -> DictionaryConfig {
    DictionaryConfig::Train {
        sample_input_bytes: 256 << 10,
        max_sample_bytes: 128 << 10,
        dict_bytes: 8 << 10,
    }
}

struct Outcome {
    pages: Vec<(u64, Vec<u8>)>,
    stream: Vec<u8>,
    finished: bool,
    wire: Wire,
    stats: crate::TransferStats,
}

fn run(
    sender: &mut Sender,
    receiver: &mut Receiver,
    feed: &mut dyn FnMut(&mut Sender) -> bool,
) -> Outcome {
    let mut out = Outcome {
        pages: Vec::new(),
        stream: Vec::new(),
        finished: false,
        wire: Wire::default(),
        stats: Default::default(),
    };
    let mut sink = |ev: ReceiverEvent| match ev {
        ReceiverEvent::Pages { page_numbers, data } => {
            for (i, n) in page_numbers.into_iter().enumerate() {
                out.pages
                    .push((n, data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].to_vec()));
            }
        }
        ReceiverEvent::Stream(b) => out.stream.extend_from_slice(&b),
        ReceiverEvent::Finished => out.finished = true,
        ReceiverEvent::Reply(_) => unreachable!("pump routes replies"),
    };
    while feed(sender) {
        pump(sender, receiver, &mut out.wire, &mut sink).unwrap();
    }
    sender.finish().unwrap();
    pump(sender, receiver, &mut out.wire, &mut sink).unwrap();
    assert!(sender.is_done());
    out.stats = sender.stats().clone();
    out
}

fn send_image(
    sender: &mut Sender,
    receiver: &mut Receiver,
    img: &[u8],
    chunk_pages: usize,
) -> Outcome {
    let mut at = 0usize;
    run(sender, receiver, &mut |s| {
        if at >= img.len() {
            return false;
        }
        let end = (at + chunk_pages * PAGE_SIZE).min(img.len());
        s.push_pages((at / PAGE_SIZE) as u64, &img[at..end])
            .unwrap();
        at = end;
        true
    })
}

fn assert_image(out: &Outcome, img: &[u8]) {
    assert!(out.finished);
    assert_eq!(out.pages.len(), img.len() / PAGE_SIZE);
    for (i, (n, p)) in out.pages.iter().enumerate() {
        assert_eq!(*n, i as u64);
        assert!(
            p[..] == img[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
            "page {i} differs"
        );
    }
}

#[test]
fn image_round_trip_one_way_with_dictionary() {
    let img = fake_guest_image(1024, 7);
    let cfg = SenderConfig::default()
        .with_batch_pages(100)
        .with_dictionary(small_dict());
    let mut s = Sender::new(cfg).unwrap();
    let mut r = Receiver::new(Limits::default()).unwrap();
    let out = send_image(&mut s, &mut r, &img, 77);
    assert_image(&out, &img);
    let st = &out.stats;
    assert_eq!(st.pages, 1024);
    assert_eq!(st.bytes_in, img.len() as u64);
    let zeros = img
        .chunks(PAGE_SIZE)
        .filter(|p| p.iter().all(|&b| b == 0))
        .count() as u64;
    assert_eq!(st.zero_pages, zeros);
    assert!(
        st.dedup_hits_local > 50,
        "0xCC and recurring pages dedup: {st:?}"
    );
    assert_ne!(st.dict_id, 0, "dictionary trained");
    assert!(st.dict_gain.is_some());
    assert_eq!(st.bytes_out, out.wire.forward_bytes);
    assert!(st.compression_ratio() > 0.5, "{st:?}");
    assert_eq!(r.stats().bytes_out, img.len() as u64);
}

#[test]
fn second_transfer_to_a_receiver_that_holds_the_first_sends_far_less() {
    let first = fake_guest_image(1024, 11);
    // The second capture: the same guest with 2 % of pages rewritten with noise.
    let mut second = first.clone();
    let mut rng = Rng(99);
    for _ in 0..20 {
        let p = (rng.next() % 1024) as usize;
        for b in &mut second[p * PAGE_SIZE..(p + 1) * PAGE_SIZE] {
            *b = rng.next() as u8;
        }
    }
    let store = Box::new(MemoryPageStore::new(64 << 20));
    let mut r = Receiver::with_store(Limits::default(), store).unwrap();
    let cfg = || {
        SenderConfig::default()
            .with_batch_pages(128)
            .with_offers(true)
            .with_dictionary(DictionaryConfig::Off)
    };
    let mut s = Sender::new(cfg()).unwrap();
    let a = send_image(&mut s, &mut r, &first, 300);
    assert_image(&a, &first);
    let store = r.into_store().unwrap();
    assert!(store.len() > 100);
    let mut r = Receiver::with_store(Limits::default(), store).unwrap();
    let mut s = Sender::new(cfg().with_transfer_id(2)).unwrap();
    let b = send_image(&mut s, &mut r, &second, 300);
    assert_image(&b, &second);
    let first_bytes = a.wire.forward_bytes + a.wire.back_bytes;
    let second_bytes = b.wire.forward_bytes + b.wire.back_bytes;
    assert!(
        second_bytes * 10 <= first_bytes * 3,
        "second {second_bytes} vs first {first_bytes}"
    );
    assert!(b.stats.dedup_hits_remote > 0);
    assert_eq!(r.stats().held_pages, b.stats.dedup_hits_remote);
}

/// Second capture with small in-place edits on most non-zero pages (a database that
/// rewrote a few rows per page): with a reference store on the sender, changed pages go
/// as XOR deltas against the page the receiver holds at the same page number.
#[test]
fn changed_pages_go_as_deltas_against_the_held_page() {
    let first = fake_guest_image(1024, 21);
    let mut second = first.clone();
    let mut rng = Rng(7);
    let mut edited = 0;
    for p in 0..1024 {
        let page = &mut second[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
        if page.iter().all(|&b| b == 0) || page.iter().all(|&b| b == 0xcc) {
            continue;
        }
        edited += 1;
        for _ in 0..3 {
            let at = (rng.next() % (PAGE_SIZE as u64 - 64)) as usize;
            for b in &mut page[at..at + 64] {
                *b = rng.next() as u8;
            }
        }
    }
    assert!(edited > 200);
    let cfg = || {
        SenderConfig::default()
            .with_batch_pages(128)
            .with_offers(true)
            .with_vm_id(42)
    };
    let mut bytes = Vec::new();
    for with_reference in [false, true] {
        let store = Box::new(MemoryPageStore::new(64 << 20));
        let mut r = Receiver::with_store(Limits::default(), store).unwrap();
        let mut s = Sender::new(cfg()).unwrap();
        if with_reference {
            s = s.with_reference_store(Box::new(MemoryPageStore::new(64 << 20)));
        }
        let a = send_image(&mut s, &mut r, &first, 300);
        assert_image(&a, &first);
        assert_eq!(a.stats.delta_pages, 0, "nothing held yet");
        let reference = s.take_reference_store();
        let mut r = Receiver::with_store(Limits::default(), r.into_store().unwrap()).unwrap();
        let mut s = Sender::new(cfg().with_transfer_id(2)).unwrap();
        if let Some(st) = reference {
            s = s.with_reference_store(st);
        }
        let b = send_image(&mut s, &mut r, &second, 300);
        assert_image(&b, &second);
        if with_reference {
            assert!(b.stats.delta_pages > 100, "{} deltas", b.stats.delta_pages);
            assert_eq!(r.stats().delta_pages, b.stats.delta_pages);
        } else {
            assert_eq!(b.stats.delta_pages, 0);
        }
        bytes.push(b.wire.forward_bytes + b.wire.back_bytes);
    }
    assert!(
        bytes[1] * 2 < bytes[0],
        "with deltas {} vs without {}",
        bytes[1],
        bytes[0]
    );
}

/// The stream shape: lifted pages carry their RAM address as key, so a changed page of
/// a second migration stream also goes as a delta.
#[test]
fn stream_pages_go_as_deltas_by_ram_address() {
    let img = fake_guest_image(400, 9);
    let pages: Vec<Vec<u8>> = img
        .chunks(PAGE_SIZE)
        .filter(|p| p.iter().any(|&b| b != 0) && p.iter().any(|&b| b != 0xcc))
        .map(|p| p.to_vec())
        .collect();
    let mut changed = pages.clone();
    for (i, p) in changed.iter_mut().enumerate() {
        p[(i * 37) % PAGE_SIZE] ^= 0xa5;
    }
    let streams = [
        crate::qemu::tests::synthetic_stream(&pages),
        crate::qemu::tests::synthetic_stream(&changed),
    ];
    let cfg = SenderConfig::default()
        .with_offers(true)
        .with_batch_pages(50);
    let mut store: Option<Box<dyn crate::PageStore + Send>> =
        Some(Box::new(MemoryPageStore::new(64 << 20)));
    let mut sent: Option<Box<dyn crate::PageStore + Send>> =
        Some(Box::new(MemoryPageStore::new(64 << 20)));
    let mut deltas = Vec::new();
    for stream in &streams {
        let mut r = Receiver::with_store(Limits::default(), store.take().unwrap()).unwrap();
        let mut s = Sender::new(cfg.clone())
            .unwrap()
            .with_reference_store(sent.take().unwrap());
        let mut at = 0;
        let out = run(&mut s, &mut r, &mut |s| {
            if at >= stream.len() {
                return false;
            }
            let end = (at + 7777).min(stream.len());
            s.push_stream(&stream[at..end]).unwrap();
            at = end;
            true
        });
        assert!(out.finished);
        assert!(out.stream == *stream, "stream round trip");
        deltas.push(out.stats.delta_pages);
        store = r.into_store();
        sent = s.take_reference_store();
    }
    assert_eq!(deltas[0], 0);
    // Pages that were in-transfer repeats the first time have no recorded key (stream
    // items other than offered candidates carry none), so not every page finds a base.
    assert!(
        deltas[1] * 4 >= pages.len() as u64 * 3,
        "{deltas:?} of {}",
        pages.len()
    );
}

/// Pages that hold shifted copies of parts of pages sent before (what a freed process
/// heap full of database page images looks like) go as zstd patches against the similar
/// pages the sender proposes and the receiver holds.
#[test]
fn shifted_copies_go_as_patches_against_proposed_pages() {
    // First capture: 200 distinct "text" pages then zeros.
    let mut rng = Rng(3);
    let words = [
        &b"alpha "[..],
        b"beta ",
        b"gamma ",
        b"delta ",
        b"user42@example.org ",
    ];
    let mut first = vec![0u8; 400 * PAGE_SIZE];
    let mut i = 0;
    while i < 200 * PAGE_SIZE {
        let w = if rng.next().is_multiple_of(4) {
            format!("{:x} ", rng.next()).into_bytes()
        } else {
            words[(rng.next() % 5) as usize].to_vec()
        };
        let n = w.len().min(200 * PAGE_SIZE - i);
        first[i..i + n].copy_from_slice(&w[..n]);
        i += n;
    }
    // Second capture: the same, plus pages 200..300 each made of the tail of page k and
    // the head of page k+7, shifted by a 48-byte "allocator header".
    let mut second = first.clone();
    for j in 0..100 {
        let k = (j * 13) % 190;
        let dst = &mut second[(200 + j) * PAGE_SIZE..(201 + j) * PAGE_SIZE];
        let cut = 1000 + j * 17;
        dst[..PAGE_SIZE - cut].copy_from_slice(&first[k * PAGE_SIZE + cut..(k + 1) * PAGE_SIZE]);
        dst[PAGE_SIZE - cut..PAGE_SIZE - cut + 48].fill(0xee);
        let rest = cut - 48;
        dst[PAGE_SIZE - rest..]
            .copy_from_slice(&first[(k + 7) * PAGE_SIZE..(k + 7) * PAGE_SIZE + rest]);
    }
    let cfg = SenderConfig::default()
        .with_offers(true)
        .with_batch_pages(64);
    let store = Box::new(MemoryPageStore::new(64 << 20));
    let mut r = Receiver::with_store(Limits::default(), store).unwrap();
    let mut s = Sender::new(cfg.clone())
        .unwrap()
        .with_reference_store(Box::new(MemoryPageStore::new(64 << 20)));
    let a = send_image(&mut s, &mut r, &first, 100);
    assert_image(&a, &first);
    let reference = s.take_reference().unwrap();
    let mut r = Receiver::with_store(Limits::default(), r.into_store().unwrap()).unwrap();
    let mut s = Sender::new(cfg.with_transfer_id(2))
        .unwrap()
        .with_reference(reference);
    let b = send_image(&mut s, &mut r, &second, 100);
    assert_image(&b, &second);
    assert!(b.stats.patch_pages >= 80, "{} patches", b.stats.patch_pages);
    assert_eq!(r.stats().patch_pages, b.stats.patch_pages);
    let second_bytes = b.wire.forward_bytes + b.wire.back_bytes;
    // 100 new pages of text would take tens of KB; patches take a few hundred bytes each.
    assert!(second_bytes < 100 * 600, "{second_bytes} bytes");
}

/// With a small pinning budget the receiver answers "missing" instead of copying more
/// held pages and bases out of its store: more bytes, same pages, bounded memory.
#[test]
fn pinning_budget_bounds_receiver_memory_and_still_round_trips() {
    let first = fake_guest_image(512, 31);
    let mut second = first.clone();
    for p in 0..512 {
        second[p * PAGE_SIZE + 8] ^= 1;
    }
    let mut bytes = Vec::new();
    for budget in [u64::MAX, 4 * PAGE_SIZE as u64] {
        let limits = Limits {
            max_pinned_bytes: budget,
            ..Limits::default()
        };
        let cfg = SenderConfig::default()
            .with_offers(true)
            .with_batch_pages(64);
        let mut r =
            Receiver::with_store(limits.clone(), Box::new(MemoryPageStore::new(64 << 20))).unwrap();
        let mut s = Sender::new(cfg.clone())
            .unwrap()
            .with_reference_store(Box::new(MemoryPageStore::new(64 << 20)));
        assert_image(&send_image(&mut s, &mut r, &first, 600), &first);
        let reference = s.take_reference().unwrap();
        let mut r = Receiver::with_store(limits, r.into_store().unwrap()).unwrap();
        let mut s = Sender::new(cfg).unwrap().with_reference(reference);
        let b = send_image(&mut s, &mut r, &second, 600);
        assert_image(&b, &second);
        bytes.push((b.stats.delta_pages, b.wire.forward_bytes));
    }
    assert!(bytes[0].0 > 100, "{bytes:?}");
    assert!(bytes[1].0 <= 4, "{bytes:?}");
    assert!(bytes[1].1 > bytes[0].1, "{bytes:?}");
}

/// A different VM id must not pick up another VM's pages as bases.
#[test]
fn delta_bases_are_per_vm() {
    let first = fake_guest_image(256, 5);
    let mut second = first.clone();
    for p in 0..256 {
        second[p * PAGE_SIZE + 100] ^= 0x5a;
    }
    let store = Box::new(MemoryPageStore::new(64 << 20));
    let mut r = Receiver::with_store(Limits::default(), store).unwrap();
    let cfg = SenderConfig::default()
        .with_offers(true)
        .with_batch_pages(64);
    let mut s = Sender::new(cfg.clone().with_vm_id(1))
        .unwrap()
        .with_reference_store(Box::new(MemoryPageStore::new(64 << 20)));
    let a = send_image(&mut s, &mut r, &first, 100);
    assert_image(&a, &first);
    let reference = s.take_reference_store().unwrap();
    let mut r = Receiver::with_store(Limits::default(), r.into_store().unwrap()).unwrap();
    let mut s = Sender::new(cfg.with_vm_id(2))
        .unwrap()
        .with_reference_store(reference);
    let b = send_image(&mut s, &mut r, &second, 100);
    assert_image(&b, &second);
    assert_eq!(b.stats.delta_pages, 0);
}

#[test]
fn delta_ops_without_a_base_and_unknown_kinds_are_rejected() {
    let mut r = Receiver::new(Limits::default()).unwrap();
    r.handle_frame(&start_frame(Shape::Pages)).unwrap();
    assert!(matches!(
        r.handle_frame(&batch(0, 0, vec![0, 4], 1)),
        Err(DecodeError::Malformed { .. })
    ));
    for kind in 5..8u8 {
        assert!(matches!(
            r.handle_frame(&batch(0, 0, vec![0, kind], 0)),
            Err(DecodeError::Malformed { .. })
        ));
    }
}

#[test]
fn sparse_and_descending_page_numbers_round_trip() {
    let img = fake_guest_image(40, 3);
    let numbers: Vec<u64> = vec![5, 4, 1_000_000, 0, u64::MAX, 7, 8, 9, 3, u64::MAX - 1];
    let mut s = Sender::new(
        SenderConfig::default()
            .with_batch_pages(3)
            .with_dictionary(DictionaryConfig::Off),
    )
    .unwrap();
    let mut r = Receiver::new(Limits::default()).unwrap();
    let mut i = 0;
    let out = run(&mut s, &mut r, &mut |s| {
        if i >= numbers.len() {
            return false;
        }
        s.push_pages(numbers[i], &img[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])
            .unwrap();
        i += 1;
        true
    });
    assert!(out.finished);
    for (i, (n, p)) in out.pages.iter().enumerate() {
        assert_eq!(*n, numbers[i]);
        assert!(p[..] == img[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
    }
}

#[test]
fn stream_round_trip_lifts_pages() {
    let img = fake_guest_image(300, 5);
    let pages: Vec<Vec<u8>> = img
        .chunks(PAGE_SIZE)
        .filter(|p| p.iter().any(|&b| b != 0))
        .map(|p| p.to_vec())
        .collect();
    let stream = crate::qemu::tests::synthetic_stream(&pages);
    let cfg = SenderConfig::default()
        .with_batch_pages(50)
        .with_dictionary(small_dict());
    let mut s = Sender::new(cfg).unwrap();
    let mut r = Receiver::new(Limits::default()).unwrap();
    let mut at = 0;
    let out = run(&mut s, &mut r, &mut |s| {
        if at >= stream.len() {
            return false;
        }
        let end = (at + 10_007).min(stream.len());
        s.push_stream(&stream[at..end]).unwrap();
        at = end;
        true
    });
    assert!(out.finished);
    assert!(out.stream == stream, "stream differs");
    assert_eq!(out.stats.pages, pages.len() as u64 + 1, "every page lifted");
    assert!(out.stats.dedup_hits_local > 20);
}

#[test]
fn parallel_jobs_in_any_order_give_the_same_frames() {
    let img = fake_guest_image(600, 9);
    let frames_inline = {
        let mut s = Sender::new(
            SenderConfig::default()
                .with_batch_pages(64)
                .with_dictionary(small_dict()),
        )
        .unwrap();
        s.push_pages(0, &img).unwrap();
        s.finish().unwrap();
        let mut frames = Vec::new();
        while let Some(o) = s.poll_output() {
            match o {
                SenderOutput::Send(f) => frames.push(f),
                SenderOutput::Compress(j) => s.handle_compressed(j.run().unwrap()).unwrap(),
            }
        }
        frames
    };
    let mut s = Sender::new(
        SenderConfig::default()
            .with_batch_pages(64)
            .with_dictionary(small_dict()),
    )
    .unwrap();
    s.push_pages(0, &img).unwrap();
    s.finish().unwrap();
    let mut frames = Vec::new();
    let mut jobs = Vec::new();
    loop {
        while let Some(o) = s.poll_output() {
            match o {
                SenderOutput::Send(f) => frames.push(f),
                SenderOutput::Compress(j) => jobs.push(j),
            }
        }
        if jobs.is_empty() {
            break;
        }
        // Run on two threads, hand back in reverse order.
        let mid = jobs.len() / 2;
        let tail = jobs.split_off(mid);
        let (a, b) = std::thread::scope(|sc| {
            let h = sc.spawn(move || {
                tail.into_iter()
                    .map(|j| j.run().unwrap())
                    .collect::<Vec<_>>()
            });
            let a: Vec<_> = jobs.drain(..).map(|j| j.run().unwrap()).collect();
            (a, h.join().unwrap())
        });
        for d in b.into_iter().rev().chain(a.into_iter().rev()) {
            s.handle_compressed(d).unwrap();
        }
    }
    assert!(s.is_done());
    assert_eq!(frames, frames_inline);
}

fn start_frame(shape: Shape) -> Vec<u8> {
    Message::Start(Start {
        transfer_id: 1,
        shape,
        vm_id: 0,
    })
    .encode()
    .unwrap()
}

fn batch(seq: u64, dict_id: u64, control: Vec<u8>, new_pages: u32) -> Vec<u8> {
    let mut body = vec![1u8; new_pages as usize * PAGE_SIZE];
    body.extend_from_slice(&control);
    Message::Batch(Batch {
        seq,
        shape: Shape::Pages,
        compressed: false,
        level: 1,
        dict_id,
        items: (control.len() / 2) as u32,
        new_pages,
        control_len: control.len() as u32,
        literal_len: 0,
        patch_len: 0,
        body,
    })
    .encode()
    .unwrap()
}

#[test]
fn receiver_rejects_bad_references_with_clear_errors() {
    let mut r = Receiver::new(Limits::default()).unwrap();
    assert!(matches!(
        r.handle_frame(&batch(0, 0, vec![0, 1], 1)),
        Err(DecodeError::Unexpected { .. })
    ));
    r.handle_frame(&start_frame(Shape::Pages)).unwrap();
    // Reference to unique page 5 when none is known.
    assert_eq!(
        r.handle_frame(&batch(0, 0, vec![0, 2 | (5 << 3)], 0)),
        Err(DecodeError::UnknownPageRef {
            batch: 0,
            index: 5,
            known: 0
        })
    );
    // Held page without an offer.
    assert_eq!(
        r.handle_frame(&batch(0, 0, vec![0, 3], 0)),
        Err(DecodeError::NotHeld { batch: 0, index: 0 })
    );
    // Out of order.
    assert_eq!(
        r.handle_frame(&batch(4, 0, vec![0, 0], 0)),
        Err(DecodeError::UnexpectedBatch {
            expected: 0,
            got: 4
        })
    );
    // Unknown dictionary (needs a compressed body to be looked up).
    let f = Message::Batch(Batch {
        seq: 0,
        shape: Shape::Pages,
        compressed: true,
        level: 1,
        dict_id: 42,
        items: 1,
        new_pages: 0,
        control_len: 2,
        literal_len: 0,
        patch_len: 0,
        body: vec![1, 2, 3],
    })
    .encode()
    .unwrap();
    assert_eq!(
        r.handle_frame(&f),
        Err(DecodeError::UnknownDictionary { batch: 0, id: 42 })
    );
    // A dictionary whose id is not its hash.
    let d = Message::Dict(Dict {
        id: 7,
        bytes: vec![1; 100],
    })
    .encode()
    .unwrap();
    assert!(matches!(
        r.handle_frame(&d),
        Err(DecodeError::Malformed { .. })
    ));
    // Garbage compressed body.
    let f = Message::Batch(Batch {
        seq: 0,
        shape: Shape::Pages,
        compressed: true,
        level: 1,
        dict_id: 0,
        items: 1,
        new_pages: 0,
        control_len: 2,
        literal_len: 0,
        patch_len: 0,
        body: vec![1, 2, 3],
    })
    .encode()
    .unwrap();
    assert!(matches!(
        r.handle_frame(&f),
        Err(DecodeError::Decompress { .. })
    ));
    // A valid batch still decodes after all that.
    let evs = r.handle_frame(&batch(0, 0, vec![0, 1, 0, 2], 1)).unwrap();
    let [ReceiverEvent::Pages { page_numbers, data }] = &evs[..] else {
        panic!("expected pages, got {evs:?}");
    };
    assert_eq!(page_numbers, &[0, 1]);
    assert!(data.iter().all(|&b| b == 1));
}

#[test]
fn offer_with_wrong_hash_is_caught_when_storing() {
    let store = Box::new(MemoryPageStore::new(1 << 20));
    let mut r = Receiver::with_store(Limits::default(), store).unwrap();
    r.handle_frame(&start_frame(Shape::Pages)).unwrap();
    let offer = Message::Offer(Offer {
        batch: 0,
        hashes: vec![PageHash::of(b"not this page")],
        keys: None,
        proposals: Vec::new(),
    })
    .encode()
    .unwrap();
    let evs = r.handle_frame(&offer).unwrap();
    assert!(matches!(&evs[..], [ReceiverEvent::Reply(_)]));
    assert_eq!(
        r.handle_frame(&batch(0, 0, vec![0, 1], 1)),
        Err(DecodeError::HashMismatch { batch: 0 })
    );
}

#[test]
fn sender_rejects_misuse() {
    let mut s = Sender::new(SenderConfig::default()).unwrap();
    assert_eq!(
        s.push_pages(0, &[0u8; 100]),
        Err(EncodeError::NotPageAligned(100))
    );
    s.push_pages(0, &[0u8; PAGE_SIZE]).unwrap();
    assert_eq!(s.push_stream(b"abc"), Err(EncodeError::ShapeMismatch));
    s.finish().unwrap();
    assert_eq!(
        s.push_pages(0, &[0u8; PAGE_SIZE]),
        Err(EncodeError::Finished)
    );
    assert!(s.handle_reply(b"garbage").is_err());
    assert!(Sender::new(SenderConfig::default().with_level(25)).is_err());
}

#[test]
fn in_flight_is_bounded() {
    let mut cfg = SenderConfig::default()
        .with_batch_pages(1)
        .with_offers(true)
        .with_dictionary(DictionaryConfig::Off);
    cfg.max_in_flight = 2;
    let mut s = Sender::new(cfg).unwrap();
    s.push_pages(0, &[1u8; PAGE_SIZE]).unwrap();
    s.push_pages(1, &[2u8; PAGE_SIZE]).unwrap();
    assert_eq!(
        s.push_pages(2, &[3u8; PAGE_SIZE]),
        Err(EncodeError::Busy(2))
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn any_image_round_trips(seed in any::<u64>(), pages in 1usize..40, batch in 1usize..9, offers in any::<bool>(), level in 1i32..6) {
        let img = fake_guest_image(pages, seed);
        let cfg = SenderConfig::default()
            .with_batch_pages(batch)
            .with_offers(offers)
            .with_level(level)
            .with_dictionary(DictionaryConfig::Off);
        let mut s = Sender::new(cfg).unwrap();
        let store = Box::new(MemoryPageStore::new(1 << 20));
        let mut r = Receiver::with_store(Limits::default(), store).unwrap();
        let out = send_image(&mut s, &mut r, &img, 7);
        assert_image(&out, &img);
    }

    #[test]
    fn any_byte_stream_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..20_000), chunk in 1usize..5000) {
        let mut s = Sender::new(SenderConfig::default().with_dictionary(DictionaryConfig::Off)).unwrap();
        let mut r = Receiver::new(Limits::default()).unwrap();
        let mut at = 0;
        let out = run(&mut s, &mut r, &mut |s| {
            if at >= bytes.len() { return false; }
            let end = (at + chunk).min(bytes.len());
            s.push_stream(&bytes[at..end]).unwrap();
            at = end;
            true
        });
        prop_assert!(out.finished);
        prop_assert_eq!(out.stream, bytes);
    }

    #[test]
    fn corrupted_frames_never_panic_the_receiver(seed in any::<u64>(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
        let img = fake_guest_image(20, seed);
        let mut s = Sender::new(SenderConfig::default().with_batch_pages(8).with_dictionary(DictionaryConfig::Off)).unwrap();
        s.push_pages(0, &img).unwrap();
        s.finish().unwrap();
        let mut frames = Vec::new();
        while let Some(o) = s.poll_output() {
            match o {
                SenderOutput::Send(f) => frames.push(f),
                SenderOutput::Compress(j) => s.handle_compressed(j.run().unwrap()).unwrap(),
            }
        }
        let mut r = Receiver::new(Limits::default()).unwrap();
        for (k, (idx, v)) in flips.iter().enumerate() {
            let n = frames.len();
            let f = &mut frames[k % n];
            let i = idx.index(f.len());
            f[i] ^= v | 1;
        }
        let mut failed = false;
        for f in &frames {
            if r.handle_frame(f).is_err() {
                failed = true;
                break;
            }
        }
        prop_assert!(failed, "a corrupted frame must be rejected");
    }
}
