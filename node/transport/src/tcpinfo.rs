//! Path statistics of one TCP connection from the kernel: its `TCP_INFO` (smoothed RTT,
//! segments sent, segments retransmitted), read through `NETLINK_SOCK_DIAG` by the
//! connection's addresses, the way `ss -ti` does. No unsafe code of ours: `nix` has no
//! `TCP_INFO` socket option and the workspace denies `unsafe_code`.
//!
//! [`LossMeter`] turns successive readings into the loss ratio the sender core takes
//! ([`crate::Input::PathStats`]): segments retransmitted over segments sent since the last
//! reading. Retransmissions are the sender's view of loss (a lost segment is retransmitted;
//! a spurious retransmission counts too), which is what a migration's transfer suffers.
//!
//! Linux only; elsewhere [`query`] answers [`std::io::ErrorKind::Unsupported`].

use std::net::SocketAddr;

/// One `TCP_INFO` reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpPathInfo {
    /// Smoothed RTT, microseconds (`tcpi_rtt`).
    pub rtt_us: u32,
    /// Segments sent, retransmissions included (`tcpi_segs_out`; wraps at 2^32).
    pub segs_out: u32,
    /// Segments retransmitted over the connection's life (`tcpi_total_retrans`).
    pub total_retrans: u32,
    /// The kernel's delivery-rate estimate, bytes per second (`tcpi_delivery_rate`).
    pub delivery_rate: u64,
}

/// Loss between successive readings of one connection.
#[derive(Clone, Copy, Debug, Default)]
pub struct LossMeter {
    last: Option<TcpPathInfo>,
}

impl LossMeter {
    /// The share of segments sent since the previous reading that were retransmissions, in
    /// `[0, 1]`; `None` for the first reading or when nothing was sent in between.
    pub fn update(&mut self, now: &TcpPathInfo) -> Option<f64> {
        let prev = self.last.replace(*now)?;
        let sent = now.segs_out.wrapping_sub(prev.segs_out);
        // The retransmission counter never decreases; a smaller value is another socket
        // that reused the addresses: start over.
        let retrans = now.total_retrans.checked_sub(prev.total_retrans)?;
        if sent == 0 {
            return None;
        }
        Some((f64::from(retrans) / f64::from(sent)).clamp(0.0, 1.0))
    }
}

/// Reads `TCP_INFO` of the established TCP connection from `local` to `peer` (blocking: a
/// netlink round trip, tens of microseconds; call it off the async runtime).
pub fn query(local: SocketAddr, peer: SocketAddr) -> std::io::Result<TcpPathInfo> {
    imp::query(local, peer)
}

#[cfg(target_os = "linux")]
mod imp {
    use std::{io, net::SocketAddr};

    use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_sock_diag::{
        SockDiagMessage,
        constants::{AF_INET, AF_INET6, IPPROTO_TCP},
        inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla},
    };
    use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_SOCK_DIAG};

    use super::TcpPathInfo;

    fn invalid(what: impl std::fmt::Display) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {what}"))
    }

    pub(super) fn query(local: SocketAddr, peer: SocketAddr) -> io::Result<TcpPathInfo> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&NlAddr::new(0, 0))?;
        let mut id = if local.is_ipv4() {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        id.source_port = local.port();
        id.destination_port = peer.port();
        id.source_address = local.ip();
        id.destination_address = peer.ip();
        // No cookie: match by addresses.
        id.cookie = [0xff; 8];
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        let mut packet = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family: if local.is_ipv4() { AF_INET } else { AF_INET6 },
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::INFO,
                states: StateFlags::all(),
                socket_id: id,
            })
            .into(),
        );
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out[..]);
        socket.send(&out, 0)?;
        let mut buf = vec![0u8; 16 * 1024];
        let n = socket.recv(&mut &mut buf[..], 0)?;
        let reply = buf
            .get(..n)
            .ok_or_else(|| invalid("reply longer than the buffer"))?;
        let msg = NetlinkMessage::<SockDiagMessage>::deserialize(reply).map_err(invalid)?;
        match msg.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => r
                .nlas
                .iter()
                .find_map(|nla| match nla {
                    Nla::TcpInfo(i) => Some(TcpPathInfo {
                        rtt_us: i.rtt,
                        segs_out: i.segs_out,
                        total_retrans: i.total_retrans,
                        delivery_rate: i.delivery_rate,
                    }),
                    _ => None,
                })
                .ok_or_else(|| invalid("no TCP_INFO in the reply")),
            NetlinkPayload::Error(e) => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("sock_diag: no such connection ({e:?})"),
            )),
            other => Err(invalid(format!("unexpected reply {other:?}"))),
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::{io, net::SocketAddr};

    use super::TcpPathInfo;

    pub(super) fn query(_: SocketAddr, _: SocketAddr) -> io::Result<TcpPathInfo> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "TCP_INFO is read through Linux sock_diag only",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn info(segs_out: u32, total_retrans: u32) -> TcpPathInfo {
        TcpPathInfo {
            segs_out,
            total_retrans,
            ..TcpPathInfo::default()
        }
    }

    #[test]
    fn loss_is_retransmissions_over_segments_since_the_last_reading() {
        let mut m = LossMeter::default();
        assert_eq!(m.update(&info(100, 0)), None, "first reading");
        assert_eq!(m.update(&info(300, 10)), Some(0.05));
        assert_eq!(m.update(&info(300, 10)), None, "nothing sent");
        // The segment counter wraps at 2^32.
        let mut m = LossMeter::default();
        m.update(&info(u32::MAX - 49, 5));
        assert_eq!(m.update(&info(50, 6)), Some(0.01));
        // A retransmission counter going back is another socket: no figure.
        assert_eq!(m.update(&info(60, 1)), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_loopback_connection_reports_its_rtt_and_segments() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        // 4 MiB through both non-blocking ends from this one thread.
        c.set_nonblocking(true).unwrap();
        s.set_nonblocking(true).unwrap();
        let block = vec![7u8; 64 * 1024];
        let mut buf = vec![0u8; 64 * 1024];
        let (mut sent, mut got) = (0usize, 0usize);
        while got < 4 << 20 {
            if sent < 4 << 20 {
                match c.write(&block) {
                    Ok(n) => sent += n,
                    Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
                }
            }
            match s.read(&mut buf) {
                Ok(n) => got += n,
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
            }
        }
        let i = query(c.local_addr().unwrap(), c.peer_addr().unwrap()).unwrap();
        assert!(i.rtt_us > 0, "{i:?}");
        assert!(i.segs_out > 10, "{i:?}");
        // The other direction is another socket with its own figures.
        let back = query(c.peer_addr().unwrap(), c.local_addr().unwrap()).unwrap();
        assert!(back.segs_out < i.segs_out, "{back:?} vs {i:?}");
        // No such connection: an error, not a panic.
        let gone = "127.0.0.1:1".parse().unwrap();
        assert!(query(c.local_addr().unwrap(), gone).is_err());
    }
}
