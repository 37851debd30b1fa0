//! TCP facts for `ongoing` fireflies: one targeted `SOCK_DIAG_BY_FAMILY` request per
//! tagged flow (its exact 5-tuple, no dump), answered with the socket's `tcp_info`
//! and congestion-control name, rendered as flowd-go's enrichment renders them (the
//! firefly's `netlink` object, `lean` or `full`), so collectors that read flowd-go's
//! enriched fireflies read ours.
//!
//! The field names are flowd-go's: `tcpInfo` holds the kernel's `struct tcp_info`
//! (include/uapi/linux/tcp.h) under camel-case names, `cong.algorithm` the
//! congestion control. `lean` keeps the handful of fields a collector plots (RTT,
//! cwnd, MSS, pacing, bytes sent) so the datagram stays within one MTU; `full` has
//! every `tcp_info` field. flowd-go's lean variant names the retransmit count
//! `Retransmits` (its struct field name, which carries no lean tag): kept as is.

use std::io;

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::Socket;

use crate::model::socket::{FlowKey, Protocol};

mod render;
pub use render::{render, Mode};

const NLMSG_ERROR: u16 = 2;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const INET_DIAG_INFO: u16 = 2;
const INET_DIAG_CONG: u16 = 4;
const INET_DIAG_MSG_LEN: usize = 72;
const NLMSG_HDR_LEN: usize = 16;

/// What the kernel says of one socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TcpFacts {
    /// The raw `struct tcp_info` (as long as this kernel's).
    pub info: Vec<u8>,
    /// The congestion control algorithm ("cubic", "bbr", ...).
    pub cong: Option<String>,
}

/// A `NETLINK_SOCK_DIAG` socket for targeted requests, in the namespace of the
/// thread that opened it.
pub struct TcpInfoQuery {
    socket: Socket,
    seq: u32,
    send: Vec<u8>,
    recv: Vec<u8>,
}

impl TcpInfoQuery {
    pub fn new() -> io::Result<Self> {
        // A reply is one message; a kernel that does not answer within a second is
        // treated as "no facts this round".
        let socket =
            crate::discovery::sockdiag::open_with_timeout(std::time::Duration::from_secs(1))?;
        Ok(TcpInfoQuery {
            socket,
            seq: 0,
            send: Vec::with_capacity(128),
            recv: vec![0; 8192],
        })
    }

    /// The facts of the TCP socket with this key (local end first); `Ok(None)` when
    /// the kernel has no such socket (it closed) or the flow is not TCP.
    pub fn query(&mut self, key: &FlowKey) -> io::Result<Option<TcpFacts>> {
        if key.proto != Protocol::Tcp {
            return Ok(None);
        }
        let (local, remote) = (key.local(), key.remote());
        let family = if local.is_ipv4() { AF_INET } else { AF_INET6 };
        let mut socket_id = if local.is_ipv4() {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        socket_id.source_address = local.ip();
        socket_id.source_port = local.port();
        socket_id.destination_address = remote.ip();
        socket_id.destination_port = remote.port();
        // INET_DIAG_NOCOOKIE: match on the addresses alone.
        socket_id.cookie = [0xff; 8];
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::INFO | ExtensionFlags::CONG,
                states: StateFlags::from_bits_retain(u32::MAX),
                socket_id,
            })
            .into(),
        );
        msg.finalize();
        self.send.clear();
        self.send.resize(msg.buffer_len(), 0);
        msg.serialize(&mut self.send);
        self.socket.send(&self.send, 0)?;
        loop {
            let n = self.socket.recv(&mut &mut self.recv[..], 0)?;
            let n = n.min(self.recv.len());
            match parse_reply(&self.recv[..n], self.seq) {
                Reply::Stale => continue,
                Reply::Facts(f) => return Ok(Some(f)),
                Reply::Gone => return Ok(None),
                Reply::Error(errno) => return Err(io::Error::from_raw_os_error(errno)),
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Facts(TcpFacts),
    /// ENOENT: no such socket.
    Gone,
    Error(i32),
    /// An answer to an earlier request (one that timed out): skipped.
    Stale,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// The reply to request `seq`: one `SOCK_DIAG_BY_FAMILY` message, or an error.
fn parse_reply(b: &[u8], seq: u32) -> Reply {
    let malformed = Reply::Error(libc::EBADMSG);
    let (Some(len), Some(kind), Some(got_seq)) = (u32_at(b, 0), u16_at(b, 4), u32_at(b, 8)) else {
        return malformed;
    };
    if got_seq != seq {
        return Reply::Stale;
    }
    let Some(body) = b.get(NLMSG_HDR_LEN..(len as usize).min(b.len())) else {
        return malformed;
    };
    match kind {
        NLMSG_ERROR => match u32_at(body, 0).map(|e| -(e as i32)) {
            Some(libc::ENOENT) => Reply::Gone,
            Some(0) | None => malformed,
            Some(errno) => Reply::Error(errno),
        },
        SOCK_DIAG_BY_FAMILY => {
            let mut facts = TcpFacts::default();
            let mut off = INET_DIAG_MSG_LEN;
            while let (Some(alen), Some(atype)) = (u16_at(body, off), u16_at(body, off + 2)) {
                let alen = alen as usize;
                let Some(value) = body.get(off + 4..off + alen.max(4)) else {
                    break;
                };
                match atype & 0x3fff {
                    INET_DIAG_INFO => facts.info = value.to_vec(),
                    INET_DIAG_CONG => {
                        let name = value.split(|&c| c == 0).next().unwrap_or_default();
                        facts.cong = Some(String::from_utf8_lossy(name).into_owned());
                    }
                    _ => {}
                }
                off += (alen + 3) & !3;
                if alen < 4 {
                    break;
                }
            }
            Reply::Facts(facts)
        }
        _ => malformed,
    }
}

#[cfg(test)]
mod tests;
