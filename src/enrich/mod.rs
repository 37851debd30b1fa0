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

use netlink_packet_sock_diag::inet::ExtensionFlags;

use crate::discovery::sockdiag::lookup::{u16_at, SocketLookup};
use crate::model::socket::{FlowKey, Protocol};

mod render;
pub use render::{render, Mode};

const INET_DIAG_INFO: u16 = 2;
const INET_DIAG_CONG: u16 = 4;
/// `struct inet_diag_msg`; the attributes follow it.
const INET_DIAG_MSG_LEN: usize = 72;

/// What the kernel says of one socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TcpFacts {
    /// The raw `struct tcp_info` (as long as this kernel's).
    pub info: Vec<u8>,
    /// The congestion control algorithm ("cubic", "bbr", ...).
    pub cong: Option<String>,
}

/// Targeted `tcp_info` requests, in the namespace of the thread that opened them.
pub struct TcpInfoQuery {
    lookup: SocketLookup,
}

impl TcpInfoQuery {
    pub fn new() -> io::Result<Self> {
        // A kernel that does not answer within a second: "no facts this round".
        Ok(TcpInfoQuery {
            lookup: SocketLookup::new(std::time::Duration::from_secs(1))?,
        })
    }

    /// The facts of the TCP socket with this key (local end first); `Ok(None)` when
    /// the kernel has no such socket (it closed) or the flow is not TCP.
    pub fn query(&mut self, key: &FlowKey) -> io::Result<Option<TcpFacts>> {
        if key.proto != Protocol::Tcp {
            return Ok(None);
        }
        let msg = self.lookup.find_socket(
            Protocol::Tcp,
            key.local(),
            key.remote(),
            ExtensionFlags::INFO | ExtensionFlags::CONG,
        )?;
        Ok(msg.map(facts))
    }
}

/// The `tcp_info` and congestion-control attributes of one socket's record.
fn facts(msg: &[u8]) -> TcpFacts {
    let mut facts = TcpFacts::default();
    let mut off = INET_DIAG_MSG_LEN;
    while let (Some(alen), Some(atype)) = (u16_at(msg, off), u16_at(msg, off + 2)) {
        let alen = alen as usize;
        let Some(value) = msg.get(off + 4..off + alen.max(4)) else {
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
    facts
}

#[cfg(test)]
mod tests;
