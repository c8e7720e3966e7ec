//! A control channel to a running emulator: a Unix socket that takes one text command per
//! connection and answers one line. `dwcp-wan run --control <path>` serves it; the testnet
//! uses [`request`] to cut and heal links of a running `dwcp-testnet up --wan` testnet.
//!
//! Commands (host indices as in [`crate::host_addr`]):
//!
//! | command | effect | answer |
//! | --- | --- | --- |
//! | `ping` | none | `ok hosts=<n>` |
//! | `cut A B` | drop everything between A and B, both directions | `ok` |
//! | `restore A B` | undo `cut A B` | `ok` |
//! | `heal` | restore every link | `ok` |
//! | `partitions` | list cut pairs | `ok 0-2 1-2` (empty after `ok` when none) |
//! | `stats A B` | counters of the direction A -> B | `ok {json}` |
//!
//! Errors answer `error <reason>`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::emulator::Emulator;

/// Longest request line accepted.
const MAX_LINE: u64 = 256;
/// How long a client may take to send its line, and [`request`] waits for the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Executes one command line against `emu` and returns the answer line (without newline).
pub fn execute(emu: &Emulator, line: &str) -> String {
    match execute_inner(emu, line) {
        Ok(s) if s.is_empty() => "ok".into(),
        Ok(s) => format!("ok {s}"),
        Err(e) => format!("error {e}"),
    }
}

fn execute_inner(emu: &Emulator, line: &str) -> Result<String, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let pair = |w: &[&str]| -> Result<(usize, usize), String> {
        match w {
            [a, b] => Ok((
                a.parse().map_err(|_| format!("bad host {a:?}"))?,
                b.parse().map_err(|_| format!("bad host {b:?}"))?,
            )),
            _ => Err("expected two host indices".into()),
        }
    };
    match words.as_slice() {
        ["ping"] => Ok(format!("hosts={}", emu.hosts())),
        ["cut", rest @ ..] => {
            let (a, b) = pair(rest)?;
            emu.set_partitioned(a, b, true).map_err(|e| e.to_string())?;
            Ok(String::new())
        }
        ["restore", rest @ ..] => {
            let (a, b) = pair(rest)?;
            emu.set_partitioned(a, b, false)
                .map_err(|e| e.to_string())?;
            Ok(String::new())
        }
        ["heal"] => {
            for a in 0..emu.hosts() {
                for b in a + 1..emu.hosts() {
                    emu.set_partitioned(a, b, false)
                        .map_err(|e| e.to_string())?;
                }
            }
            Ok(String::new())
        }
        ["partitions"] => {
            let mut cut = Vec::new();
            for a in 0..emu.hosts() {
                for b in a + 1..emu.hosts() {
                    if emu.is_partitioned(a, b).map_err(|e| e.to_string())? {
                        cut.push(format!("{a}-{b}"));
                    }
                }
            }
            Ok(cut.join(" "))
        }
        ["stats", rest @ ..] => {
            let (a, b) = pair(rest)?;
            let s = emu.stats(a, b).map_err(|e| e.to_string())?;
            serde_json::to_string(&s).map_err(|e| e.to_string())
        }
        _ => Err(format!("unknown command {line:?}")),
    }
}

/// A control socket being served on a thread; stops and removes the socket file on drop.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `path` (replacing a stale socket file) and serves `emu` until dropped.
    pub fn start(path: &Path, emu: Arc<Emulator>) -> io::Result<Self> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("wan-control".into())
            .spawn(move || serve(&listener, &emu, &flag))?;
        Ok(Self {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(listener: &UnixListener, emu: &Emulator, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => {
                // One client at a time: commands are rare and quick.
                let _ = answer(conn, emu);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn answer(conn: UnixStream, emu: &Emulator) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(&conn).take(MAX_LINE).read_line(&mut line)?;
    let reply = execute(emu, line.trim());
    (&conn).write_all(format!("{reply}\n").as_bytes())
}

/// Errors of [`request`].
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be reached or the exchange failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The emulator refused the command.
    #[error("emulator refused `{command}`: {reason}")]
    Refused {
        /// The command.
        command: String,
        /// What it said.
        reason: String,
    },
}

/// Sends `command` to the emulator serving `socket` and returns what follows `ok`.
pub fn request(socket: &Path, command: &str) -> Result<String, ControlError> {
    let io = |source| ControlError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut conn = UnixStream::connect(socket).map_err(io)?;
    conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    conn.write_all(format!("{command}\n").as_bytes())
        .map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&conn)
        .take(1 << 16)
        .read_line(&mut reply)
        .map_err(io)?;
    let reply = reply.trim();
    if reply == "ok" {
        return Ok(String::new());
    }
    if let Some(rest) = reply.strip_prefix("ok ") {
        return Ok(rest.to_string());
    }
    Err(ControlError::Refused {
        command: command.to_string(),
        reason: reply.strip_prefix("error ").unwrap_or(reply).to_string(),
    })
}
