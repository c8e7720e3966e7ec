//! The I/O shell: network namespaces with a TUN device each, and threads that move IP packets
//! between the TUNs through the [`Link`] model.
//!
//! Host `i` lives in namespace `dwcpwan-<pid>-<i>` with interface `wan0` at
//! `10.233.0.<i+1>/24`. A reader thread per host reads packets its kernel routes into
//! `wan0`, asks the link `(i, j)` for a verdict and hands delivered packets to that link's
//! writer thread, which writes them into host `j`'s TUN at the delivery instant.
//!
//! Everything created is removed by [`Emulator::shutdown`] or on drop (also when start-up
//! fails half way), and [`cleanup_stale`] removes namespaces left by processes that died.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::link::{Link, LinkConfig, LinkStats, Nanos, Verdict};
use crate::profile::Profile;
use crate::tun::open_tun;

/// Prefix of every namespace the emulator creates.
pub const NS_PREFIX: &str = "dwcpwan-";
/// Interface name inside each namespace.
pub const IFACE: &str = "wan0";
/// Most packets in flight on one link direction (delay line plus queue); more are dropped.
pub const MAX_IN_FLIGHT_PACKETS: usize = 65_536;
/// Largest packet read from a TUN (MTU is 1500; room for anything the kernel sends).
const MAX_PACKET: usize = 65_536;
/// How often idle threads look at the stop flag.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// A packet on its way to a link's writer, with its delivery instant.
type PacketTx = SyncSender<(Nanos, Vec<u8>)>;

/// Errors of the emulator shell.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// An `ip` command failed.
    #[error("`ip {args}` failed: {stderr}")]
    Ip {
        /// The arguments.
        args: String,
        /// What it printed.
        stderr: String,
    },
    /// A system call failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Bad argument.
    #[error("{0}")]
    Invalid(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> EmulatorError {
    let what = what.into();
    move |source| EmulatorError::Io { what, source }
}

/// Runs `ip` with the given arguments.
pub fn ip(args: &[&str]) -> Result<String, EmulatorError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io_err("cannot run `ip` (package iproute2)"))?;
    if !out.status.success() {
        return Err(EmulatorError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace the emulator uses. One this process created is deleted on drop after
/// killing what runs in it; one it was given ([`Emulator::attach`]) is left to its owner.
#[derive(Debug)]
pub struct Namespace {
    name: String,
    owned: bool,
}

impl Namespace {
    fn create(name: String) -> Result<Self, EmulatorError> {
        ip(&["netns", "add", &name])?;
        Ok(Self { name, owned: true })
    }

    /// The namespace name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if self.owned {
            delete_namespace(&self.name);
        }
    }
}

fn delete_namespace(name: &str) {
    if let Ok(pids) = ip(&["netns", "pids", name]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let _ = ip(&["netns", "delete", name]);
}

/// Deletes namespaces named `dwcpwan-<pid>-*` whose process no longer runs (left by a crash
/// or `kill -9`). Returns the names removed.
pub fn cleanup_stale() -> Vec<String> {
    let Ok(list) = ip(&["netns", "list"]) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            delete_namespace(name);
            removed.push(name.to_string());
        }
    }
    removed
}

/// Runs `f` on a new thread that has entered namespace `ns`, and returns its result. Threads
/// the closure spawns (a tokio runtime, for example) inherit the namespace.
pub fn in_namespace<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, EmulatorError> {
    let path = format!("/run/netns/{ns}");
    let fd = File::open(&path).map_err(io_err(format!("cannot open {path}")))?;
    std::thread::Builder::new()
        .name(format!("ns-{ns}"))
        .spawn(move || {
            // Failing to enter would run the closure in the wrong namespace: never do that.
            nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("setns into a namespace this process created");
            f()
        })
        .map_err(io_err("cannot spawn thread"))
}

/// What to emulate.
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// Number of hosts (2..=200).
    pub hosts: usize,
    /// The profile applied to every link direction.
    pub profile: Profile,
    /// Seed for loss and jitter draws (each link direction derives its own).
    pub seed: u64,
}

struct Shared {
    stop: AtomicBool,
    hosts: usize,
    links: Vec<Mutex<Link>>,
    tuns: Vec<File>,
    origin: Instant,
    tids: Mutex<Vec<i32>>,
    /// Packets dropped because a link's in-flight line was full.
    overflow: AtomicU64,
}

impl Shared {
    fn now(&self) -> Nanos {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A running emulator. Dropping it stops the threads and deletes the namespaces.
pub struct Emulator {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    namespaces: Vec<Namespace>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("namespaces", &self.namespaces)
            .finish_non_exhaustive()
    }
}

/// The address of host `i` inside its namespace.
pub fn host_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 233, 0, u8::try_from(i + 1).unwrap_or(255))
}

fn host_of(dst: [u8; 4]) -> Option<usize> {
    (dst[0] == 10 && dst[1] == 233 && dst[2] == 0 && dst[3] >= 1).then(|| usize::from(dst[3]) - 1)
}

impl Emulator {
    /// Creates the namespaces and TUNs and starts forwarding. Removes stale namespaces of
    /// earlier crashed runs first.
    pub fn start(cfg: EmulatorConfig) -> Result<Self, EmulatorError> {
        if !(2..=200).contains(&cfg.hosts) {
            return Err(EmulatorError::Invalid(format!(
                "hosts must be 2..=200, got {}",
                cfg.hosts
            )));
        }
        cleanup_stale();
        let pid = std::process::id();
        static RUN: AtomicU64 = AtomicU64::new(0);
        let run = RUN.fetch_add(1, Ordering::Relaxed);
        let mut namespaces = Vec::with_capacity(cfg.hosts);
        for i in 0..cfg.hosts {
            // Pushed before configuring so a failure below still deletes it.
            namespaces.push(Namespace::create(format!("{NS_PREFIX}{pid}-{run}x{i}"))?);
        }
        Self::build(namespaces, cfg)
    }

    /// Like [`Emulator::start`], but host `i` is the existing namespace `names[i]` (created by
    /// the caller, e.g. the testnet). The emulator adds its TUN `wan0` with
    /// [`host_addr`]`(i)` to each; the TUNs vanish when the emulator stops, the namespaces
    /// and whatever runs in them stay (the caller removes them).
    pub fn attach(names: &[String], profile: Profile, seed: u64) -> Result<Self, EmulatorError> {
        if !(2..=200).contains(&names.len()) {
            return Err(EmulatorError::Invalid(format!(
                "hosts must be 2..=200, got {}",
                names.len()
            )));
        }
        let mut namespaces = Vec::with_capacity(names.len());
        for name in names {
            let path = format!("/run/netns/{name}");
            if let Err(e) = std::fs::metadata(&path) {
                let present: Vec<String> = std::fs::read_dir("/run/netns")
                    .map(|d| {
                        d.flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                return Err(EmulatorError::Invalid(format!(
                    "no network namespace {name} ({path}: {e}; present: {})",
                    present.join(" ")
                )));
            }
            namespaces.push(Namespace {
                name: name.clone(),
                owned: false,
            });
        }
        let cfg = EmulatorConfig {
            hosts: names.len(),
            profile,
            seed,
        };
        Self::build(namespaces, cfg)
    }

    /// Adds the TUNs to `namespaces` and starts the threads; on failure the namespaces drop
    /// (owned ones are deleted).
    fn build(namespaces: Vec<Namespace>, cfg: EmulatorConfig) -> Result<Self, EmulatorError> {
        let mut tuns = Vec::with_capacity(cfg.hosts);
        for (i, namespace) in namespaces.iter().enumerate() {
            let ns = namespace.name().to_string();
            let tun = in_namespace(&ns, || open_tun(IFACE))?
                .join()
                .map_err(|_| EmulatorError::Invalid("tun thread panicked".into()))?
                .map_err(io_err(format!("cannot create TUN {IFACE} in {ns}")))?;
            let addr = format!("{}/24", host_addr(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", IFACE])?;
            // A long TUN ring: a reader thread that is briefly descheduled must not turn into
            // packet loss the profile did not ask for.
            ip(&[
                "-n",
                &ns,
                "link",
                "set",
                IFACE,
                "mtu",
                "1500",
                "txqueuelen",
                "10000",
                "up",
            ])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            tuns.push(tun);
        }
        let link_cfg = cfg.profile.link_config();
        let n = cfg.hosts;
        let links = (0..n * n)
            .map(|k| {
                let seed = cfg.seed ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                Mutex::new(Link::new(link_cfg.clone(), seed))
            })
            .collect();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            hosts: n,
            links,
            tuns,
            origin: Instant::now(),
            tids: Mutex::new(Vec::new()),
            overflow: AtomicU64::new(0),
        });
        let mut emu = Self {
            shared,
            threads: Vec::new(),
            namespaces,
        };
        // Writers first: one per ordered pair.
        let mut senders: Vec<Option<PacketTx>> = vec![None; n * n];
        for from in 0..n {
            for to in 0..n {
                if from == to {
                    continue;
                }
                let (tx, rx) = mpsc::sync_channel(MAX_IN_FLIGHT_PACKETS);
                senders[from * n + to] = Some(tx);
                let sh = Arc::clone(&emu.shared);
                emu.spawn(format!("wan-w{from}-{to}"), move || writer(sh, to, rx))?;
            }
        }
        for host in 0..n {
            let sh = Arc::clone(&emu.shared);
            let txs: Vec<_> = senders[host * n..(host + 1) * n].to_vec();
            emu.spawn(format!("wan-r{host}"), move || reader(sh, host, txs))?;
        }
        Ok(emu)
    }

    fn spawn(
        &mut self,
        name: String,
        f: impl FnOnce() + Send + 'static,
    ) -> Result<(), EmulatorError> {
        let sh = Arc::clone(&self.shared);
        let h = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                if let Ok(mut t) = sh.tids.lock() {
                    t.push(nix::unistd::gettid().as_raw());
                }
                f()
            })
            .map_err(io_err("cannot spawn thread"))?;
        self.threads.push(h);
        Ok(())
    }

    /// Number of hosts.
    pub fn hosts(&self) -> usize {
        self.shared.hosts
    }

    /// Namespace name of host `i`.
    pub fn namespace(&self, i: usize) -> &str {
        self.namespaces[i].name()
    }

    /// A command that runs `program` inside host `i`'s namespace.
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.namespace(i), program]);
        c
    }

    fn link(&self, from: usize, to: usize) -> Result<&Mutex<Link>, EmulatorError> {
        let n = self.shared.hosts;
        if from >= n || to >= n || from == to {
            return Err(EmulatorError::Invalid(format!("no link {from}->{to}")));
        }
        Ok(&self.shared.links[from * n + to])
    }

    /// Cuts (or restores) both directions between hosts `a` and `b`.
    pub fn set_partitioned(&self, a: usize, b: usize, cut: bool) -> Result<(), EmulatorError> {
        for (x, y) in [(a, b), (b, a)] {
            lock(self.link(x, y)?).set_partitioned(cut);
        }
        Ok(())
    }

    /// Whether the direction `from -> to` is cut.
    pub fn is_partitioned(&self, from: usize, to: usize) -> Result<bool, EmulatorError> {
        Ok(lock(self.link(from, to)?).is_partitioned())
    }

    /// Replaces the configuration of the direction `from -> to`.
    pub fn set_link(&self, from: usize, to: usize, cfg: LinkConfig) -> Result<(), EmulatorError> {
        lock(self.link(from, to)?).set_config(cfg);
        Ok(())
    }

    /// Counters of the direction `from -> to`.
    pub fn stats(&self, from: usize, to: usize) -> Result<LinkStats, EmulatorError> {
        Ok(lock(self.link(from, to)?).stats())
    }

    /// Packets dropped because a link's in-flight line was full (should stay 0).
    pub fn overflow_drops(&self) -> u64 {
        self.shared.overflow.load(Ordering::Relaxed)
    }

    /// CPU time (user + system) used so far by the emulator's own threads, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let tids = self
            .shared
            .tids
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default();
        let ticks: u64 = tids.iter().map(|t| thread_ticks(*t)).sum();
        ticks as f64 / clock_ticks_per_sec()
    }

    /// Stops forwarding and deletes every namespace (also done on drop).
    pub fn shutdown(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Namespaces drop with `self`.
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop_threads();
        // Kill what runs inside and delete namespaces in reverse order of creation.
        while let Some(ns) = self.namespaces.pop() {
            drop(ns);
        }
    }
}

fn lock(m: &Mutex<Link>) -> std::sync::MutexGuard<'_, Link> {
    // A panic while holding the lock cannot leave a Link half-updated in a way that matters
    // to an emulator; keep forwarding.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn reader(sh: Arc<Shared>, host: usize, txs: Vec<Option<PacketTx>>) {
    let mut buf = vec![0u8; MAX_PACKET];
    let mut tun = &sh.tuns[host];
    let timeout = PollTimeout::try_from(IDLE_POLL.as_millis() as i32).unwrap_or(PollTimeout::NONE);
    while !sh.stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(tun.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
        loop {
            let n = match tun.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            // IPv4 only: version nibble 4 and a full header.
            if n < 20 || buf[0] >> 4 != 4 {
                continue;
            }
            let dst = [buf[16], buf[17], buf[18], buf[19]];
            let Some(to) = host_of(dst).filter(|&t| t < sh.hosts && t != host) else {
                continue;
            };
            let now = sh.now();
            let verdict = lock(&sh.links[host * sh.hosts + to]).on_packet(now, n);
            if let Verdict::Deliver(at) = verdict
                && let Some(tx) = &txs[to]
            {
                match tx.try_send((at, buf[..n].to_vec())) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        sh.overflow.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(TrySendError::Disconnected(_)) => return,
                }
            }
        }
    }
}

fn writer(sh: Arc<Shared>, to: usize, rx: mpsc::Receiver<(Nanos, Vec<u8>)>) {
    let mut line: VecDeque<(Nanos, Vec<u8>)> = VecDeque::new();
    let mut out = &sh.tuns[to];
    while !sh.stop.load(Ordering::Relaxed) {
        let now = sh.now();
        while line.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, pkt)) = line.pop_front() {
                // A full TUN queue or a closing interface loses the packet, like a wire.
                let _ = out.write(&pkt);
            }
        }
        let wait = line
            .front()
            .map_or(IDLE_POLL, |(at, _)| Duration::from_nanos(at - now))
            .min(IDLE_POLL);
        match rx.recv_timeout(wait) {
            Ok(p) => {
                line.push_back(p);
                while let Ok(p) = rx.try_recv() {
                    line.push_back(p);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                if line.is_empty() {
                    return;
                }
                std::thread::sleep(wait);
            }
        }
    }
}

fn thread_ticks(tid: i32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")) else {
        return 0;
    };
    // Fields after the command name in parentheses; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // `rest` starts at field 3 (state), so field k is at index k - 3.
    get(14 - 3) + get(15 - 3)
}

fn clock_ticks_per_sec() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |v| v as f64)
}
