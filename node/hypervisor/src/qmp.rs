//! A small typed QMP (QEMU Machine Protocol) client over a unix socket.
//!
//! Why our own client rather than a crate: the one maintained Rust QMP crate family (`qapi`,
//! `qapi-qmp`) generates bindings for the whole QAPI schema of one QEMU version and pulls in a
//! large generated API; we need about fifteen commands, a hard size limit on every message
//! (QEMU is a process running a stranger's guest, so its monitor output is input we bound), and
//! `SCM_RIGHTS` fd passing for `getfd` (migration to a socket the node owns). That fits in one
//! file that we can test line by line.
//!
//! Each [`Command`] is a `Serialize` struct with its wire name and a typed `Returns`.
//! Asynchronous events that arrive between replies are kept in a bounded queue.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use crate::error::QmpError;

/// Largest QMP message accepted from QEMU.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Most events kept between two reads of [`Qmp::take_events`].
pub const MAX_QUEUED_EVENTS: usize = 256;
/// Default time a command may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// A QMP command with typed arguments and reply.
pub trait Command: Serialize {
    /// The wire name (`query-status`).
    const NAME: &'static str;
    /// The `return` payload.
    type Returns: DeserializeOwned;
    /// Whether the command takes no arguments (omit `arguments`).
    const NO_ARGS: bool = false;
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Event {
    /// Event name, e.g. `STOP`, `RESUME`, `SHUTDOWN`, `MIGRATION`.
    pub event: String,
    /// Event data.
    #[serde(default)]
    pub data: Value,
}

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    stream: UnixStream,
    buf: Vec<u8>,
    next_id: u64,
    events: VecDeque<Event>,
    dropped_events: u64,
    /// QEMU version from the greeting, `(major, minor, micro)`.
    pub version: (u64, u64, u64),
}

#[derive(Deserialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}
#[derive(Deserialize)]
struct GreetingBody {
    version: VersionBody,
}
#[derive(Deserialize)]
struct VersionBody {
    qemu: VersionTriple,
}
#[derive(Deserialize)]
struct VersionTriple {
    major: u64,
    minor: u64,
    micro: u64,
}

impl Qmp {
    /// Connects to `path`, reads the greeting and leaves negotiation mode.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).await?;
        let mut qmp = Qmp {
            stream,
            buf: Vec::with_capacity(4096),
            next_id: 1,
            events: VecDeque::new(),
            dropped_events: 0,
            version: (0, 0, 0),
        };
        let greeting = tokio::time::timeout(COMMAND_TIMEOUT, qmp.read_message())
            .await
            .map_err(|_| QmpError::Timeout {
                command: "greeting",
            })??;
        let g: Greeting = serde_json::from_value(greeting)
            .map_err(|e| QmpError::Protocol(format!("bad greeting: {e}")))?;
        qmp.version = (
            g.qmp.version.qemu.major,
            g.qmp.version.qemu.minor,
            g.qmp.version.qemu.micro,
        );
        qmp.execute(&QmpCapabilities {}).await?;
        Ok(qmp)
    }

    /// Runs a command with the default timeout.
    pub async fn execute<C: Command>(&mut self, cmd: &C) -> Result<C::Returns, QmpError> {
        self.execute_with_timeout(cmd, COMMAND_TIMEOUT).await
    }

    /// Runs a command, waiting at most `timeout` for its reply.
    pub async fn execute_with_timeout<C: Command>(
        &mut self,
        cmd: &C,
        timeout: Duration,
    ) -> Result<C::Returns, QmpError> {
        let (id, line) = self.encode(cmd)?;
        tokio::time::timeout(timeout, async {
            self.stream.write_all(&line).await?;
            self.read_reply::<C>(id).await
        })
        .await
        .map_err(|_| QmpError::Timeout { command: C::NAME })?
    }

    /// Runs a command and passes `fd` with it (`SCM_RIGHTS`), as `getfd` and `add-fd` need.
    pub async fn execute_with_fd<C: Command>(
        &mut self,
        cmd: &C,
        fd: BorrowedFd<'_>,
    ) -> Result<C::Returns, QmpError> {
        let (id, line) = self.encode(cmd)?;
        let raw = [fd.as_raw_fd()];
        tokio::time::timeout(COMMAND_TIMEOUT, async {
            let mut sent = 0usize;
            while sent < line.len() {
                self.stream.writable().await?;
                let res = self.stream.try_io(Interest::WRITABLE, || {
                    let iov = [IoSlice::new(&line[sent..])];
                    // The fd travels with the first byte only.
                    let cmsgs_fd = [nix::sys::socket::ControlMessage::ScmRights(&raw)];
                    let cmsgs: &[nix::sys::socket::ControlMessage<'_>] =
                        if sent == 0 { &cmsgs_fd } else { &[] };
                    nix::sys::socket::sendmsg::<()>(
                        self.stream.as_raw_fd(),
                        &iov,
                        cmsgs,
                        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
                        None,
                    )
                    .map_err(std::io::Error::from)
                });
                match res {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(QmpError::Io(e)),
                }
            }
            self.read_reply::<C>(id).await
        })
        .await
        .map_err(|_| QmpError::Timeout { command: C::NAME })?
    }

    /// Takes the events received so far.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Events dropped because the queue was full.
    pub fn dropped_events(&self) -> u64 {
        self.dropped_events
    }

    /// Waits up to `timeout` for an event named `name` (checking queued ones first).
    pub async fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Event, QmpError> {
        if let Some(pos) = self.events.iter().position(|e| e.event == name)
            && let Some(ev) = self.events.remove(pos)
        {
            return Ok(ev);
        }
        tokio::time::timeout(timeout, async {
            loop {
                let msg = self.read_message().await?;
                if msg.get("event").is_some() {
                    let ev: Event = serde_json::from_value(msg)
                        .map_err(|e| QmpError::Protocol(format!("bad event: {e}")))?;
                    if ev.event == name {
                        return Ok(ev);
                    }
                    self.push_event(ev);
                }
            }
        })
        .await
        .map_err(|_| QmpError::Timeout {
            command: "wait-event",
        })?
    }

    fn encode<C: Command>(&mut self, cmd: &C) -> Result<(u64, Vec<u8>), QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = serde_json::Map::new();
        msg.insert("execute".into(), Value::from(C::NAME));
        if !C::NO_ARGS {
            let args = serde_json::to_value(cmd)
                .map_err(|e| QmpError::Protocol(format!("encode {}: {e}", C::NAME)))?;
            msg.insert("arguments".into(), args);
        }
        msg.insert("id".into(), Value::from(id));
        let mut line = serde_json::to_vec(&Value::Object(msg))
            .map_err(|e| QmpError::Protocol(format!("encode {}: {e}", C::NAME)))?;
        line.push(b'\n');
        Ok((id, line))
    }

    fn push_event(&mut self, ev: Event) {
        if self.events.len() >= MAX_QUEUED_EVENTS {
            self.events.pop_front();
            self.dropped_events += 1;
        }
        self.events.push_back(ev);
    }

    async fn read_reply<C: Command>(&mut self, id: u64) -> Result<C::Returns, QmpError> {
        loop {
            let msg = self.read_message().await?;
            if msg.get("event").is_some() {
                let ev: Event = serde_json::from_value(msg)
                    .map_err(|e| QmpError::Protocol(format!("bad event: {e}")))?;
                self.push_event(ev);
                continue;
            }
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                // A reply to an earlier command that timed out; skip it.
                continue;
            }
            return decode_reply::<C>(msg);
        }
    }

    /// Reads one newline-terminated JSON message, at most [`MAX_MESSAGE_BYTES`].
    async fn read_message(&mut self) -> Result<Value, QmpError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let trimmed = line.trim_ascii();
                if trimmed.is_empty() {
                    continue;
                }
                return serde_json::from_slice(trimmed)
                    .map_err(|e| QmpError::Protocol(format!("bad json: {e}")));
            }
            if self.buf.len() > MAX_MESSAGE_BYTES {
                return Err(QmpError::TooLarge {
                    limit: MAX_MESSAGE_BYTES,
                });
            }
            let mut chunk = [0u8; 8192];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn decode_reply<C: Command>(msg: Value) -> Result<C::Returns, QmpError> {
    if let Some(ret) = msg.get("return") {
        return serde_json::from_value(ret.clone())
            .map_err(|e| QmpError::Protocol(format!("bad reply to {}: {e}", C::NAME)));
    }
    if let Some(err) = msg.get("error") {
        let field = |k: &str| {
            err.get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .chars()
                .take(512)
                .collect::<String>()
        };
        return Err(QmpError::Command {
            command: C::NAME,
            class: field("class"),
            desc: field("desc"),
        });
    }
    Err(QmpError::Protocol(format!(
        "reply to {} has neither return nor error",
        C::NAME
    )))
}

/// The empty reply most commands give.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Empty {}

macro_rules! no_arg_command {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $ret:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, Serialize)]
        pub struct $ty {}
        impl Command for $ty {
            const NAME: &'static str = $name;
            type Returns = $ret;
            const NO_ARGS: bool = true;
        }
    };
}

no_arg_command!(
    /// Leaves capabilities negotiation mode.
    QmpCapabilities, "qmp_capabilities", Empty);
no_arg_command!(
    /// Pauses all vCPUs.
    Stop, "stop", Empty);
no_arg_command!(
    /// Resumes all vCPUs.
    Cont, "cont", Empty);
no_arg_command!(
    /// Presses the ACPI power button.
    SystemPowerdown, "system_powerdown", Empty);
no_arg_command!(
    /// Exits QEMU at once.
    Quit, "quit", Empty);
no_arg_command!(
    /// Run state of the VM.
    QueryStatus, "query-status", StatusInfo);
no_arg_command!(
    /// vCPUs and their host thread ids.
    QueryCpusFast, "query-cpus-fast", Vec<CpuInfoFast>);
no_arg_command!(
    /// Migration status and statistics.
    QueryMigrate, "query-migrate", MigrationInfo);
no_arg_command!(
    /// Cancels an outgoing migration.
    MigrateCancel, "migrate_cancel", Empty);
no_arg_command!(
    /// Result of the last dirty-rate measurement.
    QueryDirtyRate, "query-dirty-rate", DirtyRateInfo);
no_arg_command!(
    /// Guest RAM size.
    QueryMemorySizeSummary, "query-memory-size-summary", MemorySizeSummary);

/// `query-status` reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// `running`, `paused`, `inmigrate`, `postmigrate`, `shutdown`, ...
    pub status: String,
    /// Whether vCPUs run.
    pub running: bool,
}

/// One element of `query-cpus-fast`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CpuInfoFast {
    /// vCPU index.
    #[serde(rename = "cpu-index")]
    pub cpu_index: u64,
    /// Host thread id running the vCPU.
    #[serde(rename = "thread-id")]
    pub thread_id: u64,
}

/// `query-memory-size-summary` reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MemorySizeSummary {
    /// Base RAM in bytes.
    #[serde(rename = "base-memory")]
    pub base_memory: u64,
}

/// RAM statistics inside `query-migrate`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct MigrationRam {
    /// Bytes sent.
    #[serde(default)]
    pub transferred: u64,
    /// Bytes left.
    #[serde(default)]
    pub remaining: u64,
    /// Total guest RAM.
    #[serde(default)]
    pub total: u64,
    /// Pages dirtied per second.
    #[serde(default, rename = "dirty-pages-rate")]
    pub dirty_pages_rate: u64,
    /// Current throughput, Mbit/s.
    #[serde(default)]
    pub mbps: f64,
    /// Completed pre-copy passes.
    #[serde(default, rename = "dirty-sync-count")]
    pub dirty_sync_count: u64,
    /// Page size.
    #[serde(default, rename = "page-size")]
    pub page_size: u64,
}

/// `query-migrate` reply.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct MigrationInfo {
    /// `none`, `setup`, `active`, `completed`, `failed`, `cancelled`, ...
    #[serde(default)]
    pub status: Option<String>,
    /// RAM statistics.
    #[serde(default)]
    pub ram: Option<MigrationRam>,
    /// Elapsed or total time, ms.
    #[serde(default, rename = "total-time")]
    pub total_time: Option<u64>,
    /// Actual downtime, ms (when completed).
    #[serde(default)]
    pub downtime: Option<u64>,
    /// Expected downtime, ms (while active).
    #[serde(default, rename = "expected-downtime")]
    pub expected_downtime: Option<u64>,
    /// Error text when failed.
    #[serde(default, rename = "error-desc")]
    pub error_desc: Option<String>,
}

/// `query-dirty-rate` reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DirtyRateInfo {
    /// `unstarted`, `measuring` or `measured`.
    pub status: String,
    /// MiB/s, when measured.
    #[serde(default, rename = "dirty-rate")]
    pub dirty_rate: Option<i64>,
}

/// Starts a dirty-rate measurement over `calc-time` seconds.
#[derive(Debug, Clone, Serialize)]
pub struct CalcDirtyRate {
    /// Seconds to measure.
    #[serde(rename = "calc-time")]
    pub calc_time: u64,
}
impl Command for CalcDirtyRate {
    const NAME: &'static str = "calc-dirty-rate";
    type Returns = Empty;
}

/// Sends the VM's migration stream to `uri` (`fd:NAME`, `unix:PATH`, `tcp:HOST:PORT`).
#[derive(Debug, Clone, Serialize)]
pub struct Migrate {
    /// Destination.
    pub uri: String,
}
impl Command for Migrate {
    const NAME: &'static str = "migrate";
    type Returns = Empty;
}

/// Starts receiving a migration stream on `uri` (needs `-incoming defer`).
#[derive(Debug, Clone, Serialize)]
pub struct MigrateIncoming {
    /// Source.
    pub uri: String,
}
impl Command for MigrateIncoming {
    const NAME: &'static str = "migrate-incoming";
    type Returns = Empty;
}

/// Sets migration parameters; absent fields are left unchanged.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrateSetParameters {
    /// Maximum downtime, ms.
    #[serde(rename = "downtime-limit", skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// Maximum bandwidth, bytes/s.
    #[serde(rename = "max-bandwidth", skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
}
impl Command for MigrateSetParameters {
    const NAME: &'static str = "migrate-set-parameters";
    type Returns = Empty;
}

/// Receives the fd passed with this message and names it.
#[derive(Debug, Clone, Serialize)]
pub struct GetFd {
    /// Name to refer to the fd as `fd:NAME`.
    pub fdname: String,
}
impl Command for GetFd {
    const NAME: &'static str = "getfd";
    type Returns = Empty;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_return_and_error() {
        let ok: StatusInfo = decode_reply::<QueryStatus>(
            serde_json::json!({"return": {"status": "running", "singlestep": false, "running": true}, "id": 1}),
        )
        .unwrap();
        assert_eq!(ok.status, "running");
        let err = decode_reply::<Cont>(
            serde_json::json!({"error": {"class": "GenericError", "desc": "nope"}, "id": 2}),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "qmp command 'cont' failed: GenericError: nope"
        );
        let bad = decode_reply::<Cont>(serde_json::json!({"id": 3})).unwrap_err();
        assert!(matches!(bad, QmpError::Protocol(_)));
    }

    /// A fake QMP server on a socketpair checks framing, ids, events and the size limit.
    #[tokio::test]
    async fn client_against_fake_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, \"capabilities\": []}}\r\n").await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            let req: Value = serde_json::from_slice(&buf[..n]).unwrap();
            assert_eq!(req["execute"], "qmp_capabilities");
            assert!(req.get("arguments").is_none());
            s.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\r\n", req["id"]).as_bytes())
                .await
                .unwrap();
            let n = s.read(&mut buf).await.unwrap();
            let req: Value = serde_json::from_slice(&buf[..n]).unwrap();
            assert_eq!(req["execute"], "migrate-set-parameters");
            assert_eq!(req["arguments"], serde_json::json!({"downtime-limit": 300}));
            // An event first, then the reply.
            s.write_all(
                b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"STOP\"}\r\n",
            )
            .await
            .unwrap();
            s.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\r\n", req["id"]).as_bytes())
                .await
                .unwrap();
            let _ = s.read(&mut buf).await.unwrap();
            // An oversized message.
            let big = vec![b'x'; MAX_MESSAGE_BYTES + 10];
            let _ = s.write_all(&big).await;
        });
        let mut q = Qmp::connect(&path).await.unwrap();
        assert_eq!(q.version, (7, 2, 22));
        q.execute(&MigrateSetParameters {
            downtime_limit: Some(300),
            max_bandwidth: None,
        })
        .await
        .unwrap();
        let evs = q.take_events();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].event, "STOP");
        let err = q.execute(&QueryStatus {}).await.unwrap_err();
        assert!(matches!(err, QmpError::TooLarge { .. }), "{err:?}");
        server.await.unwrap();
    }
}
