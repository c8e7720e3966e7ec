//! `dwcp-testnet bench encoding <files...>`: the HDE encoder against `zstd -1`,
//! `zstd -3` (single thread) and lz4 on the same bytes, in one process.
//!
//! Files starting with QEMU's `QEVM` magic are treated as migration streams, others as
//! raw page images (page number = offset / 4096). When both `X-1.ext` and `X-2.ext` are
//! named, the second capture is also sent to a receiver that holds the first (the
//! cross-transfer case). Every run checks the round trip bit-exactly.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use dwcp_encoding::level::{LevelSample, choose_level, compress_sample};
use dwcp_encoding::loopback::{Wire, pump};
use dwcp_encoding::{
    DictionaryConfig, Limits, MemoryPageStore, PAGE_SIZE, PageHash, Receiver, ReceiverEvent,
    Sender, SenderConfig, SenderOutput, Sink, TransferStats,
};
use serde::Serialize;

/// Arguments of `bench encoding`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Raw guest memory images (pmemsave) or QEMU migration streams.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Link rate the adaptive level is chosen for, in Mbit/s.
    #[arg(long, default_value_t = 1000.0)]
    link_mbit: f64,
    /// Compressor cores the adaptive level may assume.
    #[arg(long, default_value_t = 2)]
    cores: u32,
    /// Skip the per-level calibration (adaptive row uses the default level).
    #[arg(long)]
    no_calibrate: bool,
    /// Also measure content-defined chunking dedup (slow on big files).
    #[arg(long)]
    cdc: bool,
    /// Also run encoder variants (levels 1 and 3, with a trained dictionary, with LDM).
    #[arg(long)]
    variants: bool,
    /// Pages per batch for every encoder row (default: the encoder's default).
    #[arg(long)]
    batch_pages: Option<usize>,
    /// zstd window log for every encoder row (default: the encoder's default).
    #[arg(long)]
    window_log: Option<u32>,
    /// Turn on zstd long-distance matching for every encoder row.
    #[arg(long)]
    ldm: bool,
    /// Write the unique non-zero pages of each raw image, in order, to
    /// `DIR/<image name>.unique` (what the encoder compresses; for trying other
    /// compressors on the same bytes, e.g. `zstd -19 --long=27`).
    #[arg(long, value_name = "DIR")]
    dump_unique: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Row {
    codec: String,
    out_bytes: u64,
    ratio: f64,
    encode_mb_s_per_core: f64,
    decode_mb_s: f64,
    zero_fraction: Option<f64>,
    dedup_hit_rate: Option<f64>,
    round_trip_ok: bool,
}

#[derive(Debug, Serialize)]
struct DedupScan {
    aligned_4k_dup_of_nonzero: f64,
    lifted_or_page_dup_of_nonzero: f64,
    cdc_dup_bytes_fraction: Option<f64>,
    cdc_chunks: Option<u64>,
}

#[derive(Debug, Serialize)]
struct CrossTransfer {
    first: String,
    first_bytes: u64,
    second_bytes: u64,
    second_over_first: f64,
    remote_hits: u64,
    delta_pages: u64,
    patch_pages: u64,
    second_offer_bytes: u64,
    second_reply_bytes: u64,
    second_mb_s_sender_and_receiver: f64,
    round_trip_ok: bool,
}

#[derive(Debug, Serialize)]
struct ImageReport {
    file: String,
    shape: &'static str,
    bytes: u64,
    rows: Vec<Row>,
    calibration: Vec<(i32, f64, f64)>,
    adaptive_level: i32,
    dict_bytes: u64,
    dict_gain: Option<f64>,
    sha256_mb_s: f64,
    scan: DedupScan,
    cross: Option<CrossTransfer>,
    target_out_vs_zstd3: f64,
}

/// CPU time of the calling thread (`/proc/thread-self/schedstat`, nanoseconds on CPU), so
/// per-core speeds stay meaningful on a shared, loaded machine. Falls back to wall time.
struct Timer {
    wall: Instant,
    cpu: Option<u64>,
}

fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

impl Timer {
    fn start() -> Self {
        Self {
            wall: Instant::now(),
            cpu: thread_cpu_ns(),
        }
    }
    fn elapsed(&self) -> Duration {
        match (self.cpu, thread_cpu_ns()) {
            (Some(a), Some(b)) if b > a => Duration::from_nanos(b - a),
            _ => self.wall.elapsed(),
        }
    }
}

fn mb_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / 1e6
}

fn is_stream(data: &[u8]) -> bool {
    data.starts_with(b"QEVM") || !data.len().is_multiple_of(PAGE_SIZE)
}

struct Encoded {
    frames: Vec<Vec<u8>>,
    stats: TransferStats,
    time: Duration,
}

fn encode(data: &[u8], stream: bool, cfg: SenderConfig) -> anyhow::Result<Encoded> {
    let t = Timer::start();
    let mut s = Sender::new(cfg)?;
    let mut frames = Vec::new();
    let chunk = 4 << 20;
    let drain = |s: &mut Sender, frames: &mut Vec<Vec<u8>>| -> anyhow::Result<()> {
        while let Some(o) = s.poll_output() {
            match o {
                SenderOutput::Send(f) => frames.push(f),
                SenderOutput::Compress(j) => s.handle_compressed(j.run()?)?,
            }
        }
        Ok(())
    };
    for (i, c) in data.chunks(chunk).enumerate() {
        if stream {
            s.push_stream(c)?;
        } else {
            s.push_pages((i * chunk / PAGE_SIZE) as u64, c)?;
        }
        drain(&mut s, &mut frames)?;
    }
    s.finish()?;
    drain(&mut s, &mut frames)?;
    ensure!(s.is_done(), "sender did not finish");
    Ok(Encoded {
        frames,
        stats: s.stats().clone(),
        time: t.elapsed(),
    })
}

/// Writes decoded data into a buffer the size of the input, as a receiver writing guest
/// memory (or feeding QEMU) would.
struct ImageSink {
    out: Vec<u8>,
    at: usize,
    overflow: bool,
}

impl Sink for ImageSink {
    fn page(&mut self, page_number: u64, data: &[u8]) {
        let off = usize::try_from(page_number)
            .unwrap_or(usize::MAX)
            .saturating_mul(PAGE_SIZE);
        match self.out.get_mut(off..off.saturating_add(PAGE_SIZE)) {
            Some(dst) => dst.copy_from_slice(data),
            None => self.overflow = true,
        }
    }
    fn stream(&mut self, bytes: &[u8]) {
        match self.out.get_mut(self.at..self.at + bytes.len()) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                self.at += bytes.len();
            }
            None => self.overflow = true,
        }
    }
}

fn decode(frames: &[Vec<u8>], len: usize) -> anyhow::Result<(Vec<u8>, Duration)> {
    let t = Timer::start();
    let mut r = Receiver::new(Limits::default())?;
    let mut sink = ImageSink {
        out: vec![0u8; len],
        at: 0,
        overflow: false,
    };
    let mut finished = false;
    for f in frames {
        let h = r.handle_frame_into(f, &mut sink)?;
        ensure!(h.reply.is_none(), "one-way transfer got a reply");
        finished |= h.finished;
    }
    ensure!(finished, "no end frame");
    ensure!(!sink.overflow, "decoded data outside the image");
    Ok((sink.out, t.elapsed()))
}

fn hde_row(
    name: String,
    data: &[u8],
    stream: bool,
    cfg: SenderConfig,
) -> anyhow::Result<(Row, TransferStats)> {
    let e = encode(data, stream, cfg)?;
    let out_bytes: u64 = e.frames.iter().map(|f| f.len() as u64).sum();
    let (back, dt) = decode(&e.frames, data.len())?;
    let ok = back == data;
    ensure!(ok, "{name}: round trip differs");
    Ok((
        Row {
            codec: name,
            out_bytes,
            ratio: data.len() as f64 / out_bytes as f64,
            encode_mb_s_per_core: mb_s(data.len() as u64, e.time),
            decode_mb_s: mb_s(data.len() as u64, dt),
            zero_fraction: Some(e.stats.zero_fraction()),
            dedup_hit_rate: Some(e.stats.dedup_hit_rate()),
            round_trip_ok: ok,
        },
        e.stats,
    ))
}

fn zstd_row(data: &[u8], level: i32) -> anyhow::Result<Row> {
    let t = Timer::start();
    let z = zstd::bulk::compress(data, level)?;
    let enc = t.elapsed();
    let t = Timer::start();
    let back = zstd::bulk::decompress(&z, data.len())?;
    let dec = t.elapsed();
    let ok = back == data;
    ensure!(ok, "zstd -{level}: round trip differs");
    Ok(Row {
        codec: format!("zstd -{level} (1 thread)"),
        out_bytes: z.len() as u64,
        ratio: data.len() as f64 / z.len() as f64,
        encode_mb_s_per_core: mb_s(data.len() as u64, enc),
        decode_mb_s: mb_s(data.len() as u64, dec),
        zero_fraction: None,
        dedup_hit_rate: None,
        round_trip_ok: ok,
    })
}

fn lz4_row(data: &[u8]) -> anyhow::Result<Row> {
    let t = Timer::start();
    let z = lz4_flex::block::compress(data);
    let enc = t.elapsed();
    let t = Timer::start();
    let back = lz4_flex::block::decompress(&z, data.len())?;
    let dec = t.elapsed();
    let ok = back == data;
    ensure!(ok, "lz4: round trip differs");
    Ok(Row {
        codec: "lz4 (lz4_flex block)".into(),
        out_bytes: z.len() as u64,
        ratio: data.len() as f64 / z.len() as f64,
        encode_mb_s_per_core: mb_s(data.len() as u64, enc),
        decode_mb_s: mb_s(data.len() as u64, dec),
        zero_fraction: None,
        dedup_hit_rate: None,
        round_trip_ok: ok,
    })
}

/// The first up to `max` bytes of non-zero pages: what calibration compresses.
/// Up to `max` bytes of non-zero pages spread evenly over the image: what calibration
/// compresses.
fn nonzero_sample(data: &[u8], max: usize) -> Vec<u8> {
    let nonzero: Vec<&[u8]> = data
        .chunks_exact(PAGE_SIZE)
        .filter(|p| p.iter().any(|&b| b != 0))
        .collect();
    let every = nonzero.len().div_ceil(max / PAGE_SIZE).max(1);
    let mut s = Vec::with_capacity(max);
    for p in nonzero.iter().step_by(every) {
        s.extend_from_slice(p);
    }
    s
}

fn calibrate(data: &[u8]) -> anyhow::Result<Vec<LevelSample>> {
    let sample = nonzero_sample(data, 4 << 20);
    if sample.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for level in [1, 2, 3, 4, 5, 6, 7, 9, 12, 15, 19] {
        let t = Timer::start();
        let n = compress_sample(&sample, level, None)?;
        let dt = t.elapsed();
        out.push(LevelSample {
            level,
            input_bytes_per_sec: sample.len() as f64 / dt.as_secs_f64().max(1e-9),
            output_per_input: n as f64 / sample.len() as f64,
        });
    }
    Ok(out)
}

fn sha_speed() -> f64 {
    let buf = vec![0x5au8; 64 << 20];
    let t = Timer::start();
    let mut x = 0u8;
    for p in buf.chunks(PAGE_SIZE) {
        x ^= PageHash::of(p).0[0];
    }
    std::hint::black_box(x);
    mb_s(buf.len() as u64, t.elapsed())
}

fn aligned_dup(data: &[u8]) -> f64 {
    let mut seen = HashSet::new();
    let (mut nz, mut dup) = (0u64, 0u64);
    for p in data.chunks_exact(PAGE_SIZE) {
        if p.iter().all(|&b| b == 0) {
            continue;
        }
        nz += 1;
        if !seen.insert(PageHash::of(p).0) {
            dup += 1;
        }
    }
    if nz == 0 { 0.0 } else { dup as f64 / nz as f64 }
}

/// Gear-hash content-defined chunking (FastCDC-style, 4 KiB average, 1-16 KiB), the
/// alternative to lifting pages out of a stream: fraction of bytes in repeated chunks.
fn cdc_dup(data: &[u8]) -> (f64, u64) {
    let mut gear = [0u64; 256];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for g in &mut gear {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *g = x;
    }
    let mask: u64 = (1 << 12) - 1;
    let (min, max) = (1024usize, 16 * 1024usize);
    let mut seen = HashSet::new();
    let (mut start, mut dup_bytes, mut chunks) = (0usize, 0u64, 0u64);
    while start < data.len() {
        let end_max = (start + max).min(data.len());
        let mut h: u64 = 0;
        let mut cut = end_max;
        let mut i = start + min.min(end_max - start);
        while i < end_max {
            h = (h << 1).wrapping_add(gear[data[i] as usize]);
            if h & mask == 0 {
                cut = i + 1;
                break;
            }
            i += 1;
        }
        let c = &data[start..cut];
        chunks += 1;
        if !seen.insert(PageHash::of(c).0) {
            dup_bytes += c.len() as u64;
        }
        start = cut;
    }
    (dup_bytes as f64 / data.len().max(1) as f64, chunks)
}

/// Encoder settings overridden from the command line for every encoder row.
static OVERRIDES: std::sync::OnceLock<(Option<usize>, Option<u32>, bool)> =
    std::sync::OnceLock::new();

fn default_cfg() -> SenderConfig {
    let mut c = SenderConfig::default();
    if let Some(&(batch, window, ldm)) = OVERRIDES.get() {
        if let Some(n) = batch {
            c = c.with_batch_pages(n);
        }
        if let Some(w) = window {
            c.window_log = w;
        }
        if ldm {
            c = c.with_long_distance(true);
        }
    }
    c
}

/// What a second capture cost: the fields `cross_transfer` fills in order (bytes and counts of
/// the transfer, the (offer, reply) bytes, the speed, and whether the round trip was exact).
type CrossFigures = (u64, u64, u64, u64, u64, (u64, u64), f64, bool);

fn cross_transfer(
    first: &[u8],
    second: &[u8],
    stream: bool,
    level: i32,
) -> anyhow::Result<CrossFigures> {
    let store: Box<dyn dwcp_encoding::PageStore + Send> = Box::new(MemoryPageStore::new(
        dwcp_encoding::store::DEFAULT_CAPACITY_BYTES,
    ));
    let mut store = Some(store);
    // The sender's own store of what it sent (for deltas and patches), kept across
    // transfers like the receiver's.
    let mut sent: Option<dwcp_encoding::sender::SenderReference> = None;
    let mut totals = Vec::new();
    let mut ok = true;
    let mut hits = 0;
    let mut deltas = 0;
    let mut patches = 0;
    let mut overhead = (0, 0);
    let mut speed = 0.0;
    for (i, data) in [first, second].into_iter().enumerate() {
        let t = Timer::start();
        let st = store.take().context("store")?;
        let mut r = Receiver::with_store(Limits::default(), st)?;
        let cfg = default_cfg()
            .with_level(level)
            .with_offers(true)
            .with_vm_id(1)
            .with_transfer_id(i as u64);
        let mut s = match sent.take() {
            Some(reference) => Sender::new(cfg)?.with_reference(reference),
            None => Sender::new(cfg)?.with_reference_store(Box::new(MemoryPageStore::new(
                dwcp_encoding::store::DEFAULT_CAPACITY_BYTES,
            ))),
        };
        let mut wire = Wire::default();
        let mut rebuilt = vec![0u8; data.len()];
        let mut at = 0usize;
        let mut bad = false;
        let mut sink = |ev: ReceiverEvent| match ev {
            ReceiverEvent::Pages {
                page_numbers,
                data: d,
            } => {
                for (k, n) in page_numbers.iter().enumerate() {
                    let off = usize::try_from(*n)
                        .unwrap_or(usize::MAX)
                        .saturating_mul(PAGE_SIZE);
                    if off.saturating_add(PAGE_SIZE) <= rebuilt.len() {
                        rebuilt[off..off + PAGE_SIZE]
                            .copy_from_slice(&d[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]);
                    } else {
                        bad = true;
                    }
                }
            }
            ReceiverEvent::Stream(b) => {
                if at + b.len() <= rebuilt.len() {
                    rebuilt[at..at + b.len()].copy_from_slice(&b);
                    at += b.len();
                } else {
                    bad = true;
                }
            }
            _ => {}
        };
        let chunk = 4 << 20;
        for (k, c) in data.chunks(chunk).enumerate() {
            if stream {
                s.push_stream(c)?;
            } else {
                s.push_pages((k * chunk / PAGE_SIZE) as u64, c)?;
            }
            pump(&mut s, &mut r, &mut wire, &mut sink)?;
        }
        s.finish()?;
        pump(&mut s, &mut r, &mut wire, &mut sink)?;
        ensure!(r.is_finished(), "cross transfer {i} did not finish");
        ok &= !bad && rebuilt == data;
        hits = s.stats().dedup_hits_remote;
        deltas = s.stats().delta_pages;
        patches = s.stats().patch_pages;
        overhead = (s.stats().offer_bytes, wire.back_bytes);
        totals.push(wire.forward_bytes + wire.back_bytes);
        speed = mb_s(data.len() as u64, t.elapsed());
        store = r.into_store();
        sent = s.take_reference();
    }
    Ok((
        totals[0], totals[1], hits, deltas, patches, overhead, speed, ok,
    ))
}

fn partner_of(path: &Path, all: &[PathBuf]) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let (stem, ext) = name.rsplit_once('.')?;
    let base = stem.strip_suffix("-2")?;
    let want = format!("{base}-1.{ext}");
    all.iter()
        .find(|p| p.file_name().and_then(|n| n.to_str()) == Some(want.as_str()))
        .cloned()
}

fn bench_file(path: &Path, args: &Args, sha: f64) -> anyhow::Result<ImageReport> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let stream = is_stream(&data);
    let page_view: &[u8] = if stream { &[] } else { &data };
    if let (Some(dir), false) = (&args.dump_unique, stream) {
        let mut seen = HashSet::new();
        let mut unique = Vec::new();
        for p in data.chunks_exact(PAGE_SIZE) {
            if p.iter().any(|&b| b != 0) && seen.insert(PageHash::of(p).0) {
                unique.extend_from_slice(p);
            }
        }
        let name = path.file_name().context("image file name")?;
        let mut out = dir.join(name);
        out.as_mut_os_string().push(".unique");
        std::fs::write(&out, &unique).with_context(|| format!("writing {}", out.display()))?;
    }
    let calibration = if args.no_calibrate {
        Vec::new()
    } else if stream {
        // Calibrate on the stream's own bytes (page-size chunks of it).
        calibrate(&data[..data.len() - data.len() % PAGE_SIZE])?
    } else {
        calibrate(page_view)?
    };
    let link = args.link_mbit * 1e6 / 8.0;
    let adaptive = choose_level(&calibration, link, args.cores, 1.2)
        .unwrap_or(dwcp_encoding::sender::DEFAULT_LEVEL);

    let mut rows = Vec::new();
    let (row, st) = hde_row(
        format!("hde default (L{})", dwcp_encoding::sender::DEFAULT_LEVEL),
        &data,
        stream,
        default_cfg(),
    )?;
    rows.push(row);
    let (row, _) = hde_row(
        format!("hde adaptive (L{adaptive})"),
        &data,
        stream,
        default_cfg().with_level(adaptive),
    )?;
    rows.push(row);
    if args.variants {
        for level in [1, 3] {
            let (row, _) = hde_row(
                format!("hde L{level}"),
                &data,
                stream,
                default_cfg().with_level(level),
            )?;
            rows.push(row);
        }
        let (row, _) = hde_row(
            "hde default + dictionary".into(),
            &data,
            stream,
            default_cfg().with_dictionary(DictionaryConfig::manual()),
        )?;
        rows.push(row);
        let (row, _) = hde_row(
            "hde default + LDM".into(),
            &data,
            stream,
            default_cfg().with_long_distance(true),
        )?;
        rows.push(row);
    }
    rows.push(zstd_row(&data, 1)?);
    rows.push(zstd_row(&data, 3)?);
    rows.push(lz4_row(&data)?);

    let scan = DedupScan {
        aligned_4k_dup_of_nonzero: aligned_dup(&data[..data.len() - data.len() % PAGE_SIZE]),
        lifted_or_page_dup_of_nonzero: st.dedup_hit_rate(),
        cdc_dup_bytes_fraction: None,
        cdc_chunks: None,
    };
    let scan = if args.cdc {
        let (f, n) = cdc_dup(&data);
        DedupScan {
            cdc_dup_bytes_fraction: Some(f),
            cdc_chunks: Some(n),
            ..scan
        }
    } else {
        scan
    };
    let cross = match partner_of(path, &args.files) {
        Some(first) => {
            let a =
                std::fs::read(&first).with_context(|| format!("reading {}", first.display()))?;
            let (fb, sb, hits, deltas, patches, (offer_bytes, reply_bytes), speed, ok) =
                cross_transfer(&a, &data, stream, dwcp_encoding::sender::DEFAULT_LEVEL)?;
            ensure!(ok, "cross transfer round trip differs");
            Some(CrossTransfer {
                first: first.display().to_string(),
                first_bytes: fb,
                second_bytes: sb,
                second_over_first: sb as f64 / fb as f64,
                remote_hits: hits,
                delta_pages: deltas,
                patch_pages: patches,
                second_offer_bytes: offer_bytes,
                second_reply_bytes: reply_bytes,
                second_mb_s_sender_and_receiver: speed,
                round_trip_ok: ok,
            })
        }
        None => None,
    };
    let z3 = rows
        .iter()
        .find(|r| r.codec.starts_with("zstd -3"))
        .map_or(1, |r| r.out_bytes);
    Ok(ImageReport {
        file: path.display().to_string(),
        shape: if stream { "stream" } else { "pages" },
        bytes: data.len() as u64,
        target_out_vs_zstd3: rows[0].out_bytes as f64 / z3 as f64,
        rows,
        calibration: calibration
            .iter()
            .map(|s| (s.level, s.input_bytes_per_sec / 1e6, s.output_per_input))
            .collect(),
        adaptive_level: adaptive,
        dict_bytes: st.dict_bytes,
        dict_gain: st.dict_gain,
        sha256_mb_s: sha,
        scan,
        cross,
    })
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{:.1}%", x * 100.0))
}

fn print(r: &ImageReport, args: &Args) {
    println!("\n== {} ({} bytes, {}) ==", r.file, r.bytes, r.shape);
    println!(
        "{:<24} {:>12} {:>7} {:>14} {:>10} {:>7} {:>7}",
        "codec", "out bytes", "ratio", "enc MB/s/core", "dec MB/s", "zero", "dedup"
    );
    for row in &r.rows {
        println!(
            "{:<24} {:>12} {:>6.2}x {:>14.0} {:>10.0} {:>7} {:>7}",
            row.codec,
            row.out_bytes,
            row.ratio,
            row.encode_mb_s_per_core,
            row.decode_mb_s,
            opt(row.zero_fraction),
            opt(row.dedup_hit_rate)
        );
    }
    println!(
        "out(hde default) / out(zstd -3) = {:.3}  (target <= 0.8: {})",
        r.target_out_vs_zstd3,
        if r.target_out_vs_zstd3 <= 0.8 {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "dictionary {} bytes, gain on its first batch {}; adaptive level {} for {} Mbit/s x {} cores",
        r.dict_bytes,
        opt(r.dict_gain),
        r.adaptive_level,
        args.link_mbit,
        args.cores
    );
    if !r.calibration.is_empty() {
        let cal: Vec<String> = r
            .calibration
            .iter()
            .map(|(l, s, o)| format!("L{l} {s:.0} MB/s {:.2}x", 1.0 / o))
            .collect();
        println!(
            "calibration (4 MiB of non-zero pages, 1 core): {}",
            cal.join(", ")
        );
    }
    println!(
        "dedup of non-zero 4 KiB units: aligned blocks {:.1}%, our pages {:.1}%{}",
        r.scan.aligned_4k_dup_of_nonzero * 100.0,
        r.scan.lifted_or_page_dup_of_nonzero * 100.0,
        match (r.scan.cdc_dup_bytes_fraction, r.scan.cdc_chunks) {
            (Some(f), Some(n)) =>
                format!(", CDC (4 KiB avg) {:.1}% of bytes in {n} chunks", f * 100.0),
            _ => String::new(),
        }
    );
    if let Some(c) = &r.cross {
        println!(
            "second capture to a receiver holding {}: {} bytes vs {} first = {:.3} (target <= 0.3: {}), {} pages held, {} sent as XOR deltas, {} as patches; of the second transfer's bytes {} were hash offers and {} replies; sender and receiver together (one thread) ran at {:.0} MB/s",
            c.first,
            c.second_bytes,
            c.first_bytes,
            c.second_over_first,
            if c.second_over_first <= 0.3 {
                "met"
            } else {
                "NOT met"
            },
            c.remote_hits,
            c.delta_pages,
            c.patch_pages,
            c.second_offer_bytes,
            c.second_reply_bytes,
            c.second_mb_s_sender_and_receiver
        );
    }
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    OVERRIDES.get_or_init(|| (args.batch_pages, args.window_log, args.ldm));
    let sha = sha_speed();
    let sha_ni = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains(" sha_ni"));
    let mut reports = Vec::new();
    for f in &args.files {
        let r = bench_file(f, &args, sha)?;
        if !args.json {
            print(&r, &args);
        }
        reports.push(r);
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "sha256_mb_s": sha,
                "cpu_sha_ni": sha_ni,
                "images": reports,
            }))?
        );
    } else {
        println!("\nSHA-256 of 4 KiB pages: {sha:.0} MB/s on one core (CPU sha_ni flag: {sha_ni})");
    }
    Ok(())
}
