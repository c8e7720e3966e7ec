//! Checks the emulator against its own profile with real traffic between two namespaces:
//! UDP echo RTT, iperf3 UDP received rate when offered 120 % of the link rate, and iperf3
//! UDP loss when offered 50 %.

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::emulator::{Emulator, EmulatorConfig, EmulatorError, host_addr, in_namespace};
use crate::profile::Profile;

/// UDP payload iperf3 sends in the checks; the IP packet is 28 bytes larger.
pub const UDP_PAYLOAD: u64 = 1400;

/// Outcome of one measured quantity.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    /// What was measured.
    pub what: String,
    /// Expected from the profile.
    pub expected: f64,
    /// Measured.
    pub measured: f64,
    /// Allowed absolute deviation.
    pub tolerance: f64,
    /// Within tolerance.
    pub ok: bool,
}

impl Check {
    fn new(what: &str, expected: f64, measured: f64, tolerance: f64) -> Self {
        Self {
            what: what.into(),
            expected,
            measured,
            tolerance,
            ok: (measured - expected).abs() <= tolerance,
        }
    }
}

/// Everything the self-check measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// Profile checked.
    pub profile: String,
    /// The individual checks.
    pub checks: Vec<Check>,
    /// Emulator CPU use during the rate test, in cores (1.0 = one core busy).
    pub emulator_cores_at_rate: f64,
    /// What iperf3 actually sent in the rate test, Mbit/s (a sender that cannot offer 120 %
    /// of the rate cannot show the limit).
    pub offered_mbps: f64,
    /// Loss the link model drew over all tests (direction 0 -> 1), percent.
    pub model_loss_percent: f64,
    /// UDP receive-buffer overflows in the receiving namespace (drops outside the emulator).
    pub rcvbuf_errors: u64,
    /// Packets dropped because a link's in-flight line was full.
    pub overflow_drops: u64,
}

impl Report {
    /// All checks passed.
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

/// Errors of the self-check.
#[derive(Debug, thiserror::Error)]
pub enum SelfCheckError {
    /// Emulator failure.
    #[error(transparent)]
    Emulator(#[from] EmulatorError),
    /// iperf3 missing or failing.
    #[error("iperf3 failed: {0}")]
    Iperf(String),
    /// The profile has no rate to check against.
    #[error("profile has no rate limit; rate and loss checks need one")]
    NoRate,
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `iperf3 -s` in host `i` (port `port`), killed when the guard drops.
fn iperf_server(emu: &Emulator, i: usize, port: u16) -> Result<KillOnDrop, SelfCheckError> {
    let child = emu
        .command(i, "iperf3")
        .args([
            "-s",
            "-1",
            "-J",
            "-B",
            &host_addr(i).to_string(),
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            SelfCheckError::Iperf(format!("cannot start iperf3 (apt-get install iperf3): {e}"))
        })?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(KillOnDrop(child))
}

/// Runs an iperf3 client in host `from` against host `to` and returns its JSON output.
pub fn iperf_client(
    emu: &Emulator,
    from: usize,
    to: usize,
    port: u16,
    extra: &[&str],
) -> Result<serde_json::Value, SelfCheckError> {
    let mut cmd: Command = emu.command(from, "iperf3");
    cmd.args([
        "-c",
        &host_addr(to).to_string(),
        "-p",
        &port.to_string(),
        "-J",
    ])
    .args(extra)
    .stdin(Stdio::null());
    let out = cmd
        .output()
        .map_err(|e| SelfCheckError::Iperf(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| SelfCheckError::Iperf(format!("bad JSON: {e}")))?;
    if let Some(err) = v.get("error") {
        return Err(SelfCheckError::Iperf(err.to_string()));
    }
    Ok(v)
}

/// Measures the UDP echo RTT from host 0 to host 1 (median of the replies), in ms, and the
/// number of probes answered.
pub fn udp_rtt_ms(emu: &Emulator, probes: u32) -> Result<(f64, u32), SelfCheckError> {
    // A fresh port per call: the echo server of an earlier call (e.g. one whose probes a
    // partition dropped, "stop" included) may still hold its port until its read timeout.
    static NEXT_PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(7777);
    let port = NEXT_PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let server_addr = SocketAddr::from((host_addr(1), port));
    let echo = in_namespace(emu.namespace(1), move || -> std::io::Result<()> {
        let s = UdpSocket::bind(server_addr)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            if &buf[..n] == b"stop" {
                break;
            }
            s.send_to(&buf[..n], from)?;
        }
        Ok(())
    })?;
    std::thread::sleep(Duration::from_millis(100));
    let client = in_namespace(emu.namespace(0), move || -> std::io::Result<Vec<f64>> {
        let s = UdpSocket::bind((host_addr(0), 0))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut rtts = Vec::new();
        let mut buf = [0u8; 64];
        for i in 0..probes {
            let t0 = Instant::now();
            s.send_to(&i.to_be_bytes(), server_addr)?;
            // Wait for this probe's echo (skip late echoes of earlier ones).
            while let Ok((n, _)) = s.recv_from(&mut buf) {
                if n == 4 && buf[..4] == i.to_be_bytes() {
                    rtts.push(t0.elapsed().as_secs_f64() * 1000.0);
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for _ in 0..3 {
            s.send_to(b"stop", server_addr)?;
        }
        Ok(rtts)
    })?;
    let mut rtts = client
        .join()
        .map_err(|_| SelfCheckError::Iperf("rtt thread panicked".into()))?
        .map_err(|e| SelfCheckError::Iperf(format!("udp echo: {e}")))?;
    let _ = echo.join();
    rtts.sort_by(f64::total_cmp);
    let median = rtts.get(rtts.len() / 2).copied().unwrap_or(f64::NAN);
    Ok((median, u32::try_from(rtts.len()).unwrap_or(u32::MAX)))
}

/// Runs the self-check of `profile` with `seconds` per iperf3 run.
pub fn run(profile: &Profile, seconds: u32, seed: u64) -> Result<Report, SelfCheckError> {
    let rate = profile.rate_bps().ok_or(SelfCheckError::NoRate)?;
    let emu = Emulator::start(EmulatorConfig {
        hosts: 2,
        profile: profile.clone(),
        seed,
    })?;
    let mut checks = Vec::new();

    // RTT: small packets, so serialisation adds ~nothing; jitter adds its mean both ways.
    let (rtt, answered) = udp_rtt_ms(&emu, 20)?;
    let expected_rtt = (profile.rtt_ns + profile.jitter_ns) as f64 / 1e6;
    checks.push(Check::new(
        "rtt_ms (udp echo, median)",
        expected_rtt,
        rtt,
        0.03 * expected_rtt + 1.0,
    ));
    if answered == 0 {
        checks.push(Check::new("rtt probes answered", 20.0, 0.0, 19.0));
    }

    let wire = UDP_PAYLOAD as f64 / (UDP_PAYLOAD + 28) as f64;
    let p = profile.loss.mean();
    let secs = seconds.to_string();
    let len = UDP_PAYLOAD.to_string();

    // Rate: offer 120 %; the receiver gets the link rate minus random loss.
    let cpu0 = emu.cpu_seconds();
    let t0 = Instant::now();
    let v = {
        let _srv = iperf_server(&emu, 1, 5201)?;
        let offered = format!("{}", (rate * 1.2) as u64);
        iperf_client(
            &emu,
            0,
            1,
            5201,
            &[
                "-u",
                "-b",
                &offered,
                "-l",
                &len,
                "-t",
                &secs,
                "-w",
                "2M",
                "--get-server-output",
            ],
        )?
    };
    let cores = (emu.cpu_seconds() - cpu0) / t0.elapsed().as_secs_f64();
    let offered_mbps = v["end"]["sum_sent"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e6;
    let got = steady_receiver_bps(&v)
        .ok_or_else(|| SelfCheckError::Iperf("no server intervals in iperf3 output".into()))?;
    let expected = rate * wire * (1.0 - p);
    checks.push(Check::new(
        "received_mbps at 120% offered (udp)",
        expected / 1e6,
        got / 1e6,
        0.05 * expected / 1e6,
    ));

    // Loss: offer 50 %, so the queue never overflows; loss is the wire's only.
    if p > 0.0 {
        let v = {
            let _srv = iperf_server(&emu, 1, 5202)?;
            let offered = format!("{}", (rate * 0.5) as u64);
            iperf_client(
                &emu,
                0,
                1,
                5202,
                &["-u", "-b", &offered, "-l", &len, "-t", &secs, "-w", "2M"],
            )?
        };
        let lost = v["end"]["sum"]["lost_percent"].as_f64().unwrap_or(f64::NAN);
        let packets = v["end"]["sum"]["packets"].as_f64().unwrap_or(0.0).max(1.0);
        // Binomial 3-sigma, at least a tenth of the rate.
        let sigma = (p * (1.0 - p) / packets).sqrt() * 100.0;
        checks.push(Check::new(
            "loss_percent at 50% offered (udp)",
            p * 100.0,
            lost,
            (3.0 * sigma).max(0.1 * p * 100.0),
        ));
    }
    let s = emu.stats(0, 1)?;
    let model_loss = s.dropped_loss as f64 / s.offered.max(1) as f64;
    let rcvbuf_errors = udp_rcvbuf_errors(&emu, 1);
    Ok(Report {
        offered_mbps,
        model_loss_percent: model_loss * 100.0,
        rcvbuf_errors,
        overflow_drops: emu.overflow_drops(),
        profile: profile.name.clone(),
        checks,
        emulator_cores_at_rate: cores,
    })
}

/// Mean receiver-side rate over the server's intervals, skipping the first second (queue
/// fill and the delay line at the start and end of a run would bias a whole-run mean).
fn steady_receiver_bps(v: &serde_json::Value) -> Option<f64> {
    let intervals = v["server_output_json"]["intervals"].as_array()?;
    let rates: Vec<f64> = intervals
        .iter()
        .filter(|i| i["sum"]["start"].as_f64().is_some_and(|s| s >= 0.99))
        .filter(|i| i["sum"]["seconds"].as_f64().is_some_and(|s| s > 0.5))
        .filter_map(|i| i["sum"]["bits_per_second"].as_f64())
        .collect();
    (!rates.is_empty()).then(|| rates.iter().sum::<f64>() / rates.len() as f64)
}

/// `RcvbufErrors` of UDP in host `i`'s namespace.
fn udp_rcvbuf_errors(emu: &Emulator, i: usize) -> u64 {
    let Ok(out) = emu.command(i, "cat").arg("/proc/net/snmp").output() else {
        return 0;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}
