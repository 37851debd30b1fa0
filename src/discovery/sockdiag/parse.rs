//! Pure parser for `SOCK_DIAG_BY_FAMILY` dump replies: bytes in, observations out.
//!
//! Kept apart from the socket I/O so it can be tested on captured bytes. It never
//! panics on input: a malformed socket record is skipped and counted, a broken netlink
//! frame (whose length cannot be trusted, so nothing after it can be either) is a typed
//! error naming the byte offset.

use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{NetlinkBuffer, NlasIterator, Parseable};
use netlink_packet_sock_diag::inet::InetResponseHeader;
use rustc_hash::FxHashSet;

use crate::model::socket::{
    Direction, FlowKey, Protocol, SockState, SocketObservation, Source, TcpStats,
};

/// Netlink control message types (include/uapi/linux/netlink.h).
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
/// Set by the kernel when a dump raced a table change (netlink.h). inet_diag does not
/// set it today; if a future kernel does, the dump cannot be trusted for ending flows.
const NLM_F_DUMP_INTR: u16 = 16;
pub(crate) const SOCK_DIAG_BY_FAMILY: u16 = 20;

/// Attribute types (include/uapi/linux/inet_diag.h). Only these are read.
const INET_DIAG_INFO: u16 = 2;
const INET_DIAG_CGROUP_ID: u16 = 21;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NETLINK_HEADER_LEN: usize = 16;

/// `sizeof(struct inet_diag_msg)`.
const INET_DIAG_MSG_LEN: usize = 72;

/// Offsets into `struct tcp_info` (include/uapi/linux/tcp.h, checked with offsetof on
/// 6.18). Older kernels send a shorter struct: fields past its end read as 0.
mod tcpi {
    pub const RTT: usize = 68;
    pub const RTTVAR: usize = 72;
    pub const SND_CWND: usize = 80;
    pub const TOTAL_RETRANS: usize = 100;
    pub const BYTES_ACKED: usize = 120;
    pub const BYTES_RECEIVED: usize = 128;
    pub const SEGS_OUT: usize = 136;
    pub const SEGS_IN: usize = 140;
}

/// A reply buffer that cannot be parsed further. The dump it belongs to is incomplete.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("netlink message at offset {offset}: {left} bytes left, too short for a header")]
    TruncatedHeader { offset: usize, left: usize },
    #[error(
        "netlink message at offset {offset}: length field {claimed} is invalid ({left} bytes left)"
    )]
    BadLength {
        offset: usize,
        claimed: usize,
        left: usize,
    },
    #[error("netlink message at offset {offset}: kernel answered error {errno} ({})", std::io::Error::from_raw_os_error(*errno))]
    Kernel { offset: usize, errno: i32 },
    #[error("netlink message at offset {offset}: NLMSG_ERROR too short to hold an errno")]
    TruncatedError { offset: usize },
    #[error("netlink message at offset {offset}: kernel reported an overrun, dump incomplete")]
    Overrun { offset: usize },
    #[error(
        "netlink message at offset {offset}: dump interrupted (NLM_F_DUMP_INTR), dump inconsistent"
    )]
    Interrupted { offset: usize },
}

/// What the caller should do after a reply buffer was parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Read more: the dump goes on.
    More,
    /// `NLMSG_DONE` seen: this request's dump is complete.
    Done,
}

/// Counters of what the parser saw and skipped. Plain fields: the parser is
/// single-threaded; the poller copies them out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParseStats {
    pub messages: u64,
    pub sockets: u64,
    pub listeners: u64,
    /// UDP sockets with no peer (or any socket with remote port 0): not flows.
    pub unconnected: u64,
    pub malformed: u64,
    pub foreign_seq: u64,
    pub unknown_types: u64,
    pub unknown_attrs: u64,
}

/// What the caller knows about the request a reply belongs to.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    pub proto: Protocol,
    pub seq: u32,
    pub netns: u64,
}

/// Local endpoints that accept connections: TCP listeners and bound, unconnected UDP
/// sockets. Reused across dumps (cleared, not reallocated). Fx hashing: the keys are
/// this host's own addresses and ports, nothing a peer chooses.
#[derive(Debug)]
pub struct Listeners {
    specific: FxHashSet<(Protocol, IpAddr, u16)>,
    wildcard: FxHashSet<(Protocol, u16)>,
    /// One bit per (protocol, port) with any listener: most sockets (clients on
    /// ephemeral ports) are classified by one bit test, without hashing.
    ports: Vec<u64>,
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners {
            specific: FxHashSet::default(),
            wildcard: FxHashSet::default(),
            ports: vec![0; 2 * 65536 / 64],
        }
    }
}

fn port_bit(proto: Protocol, port: u16) -> (usize, u64) {
    let i = usize::from(proto == Protocol::Udp) * 65536 + usize::from(port);
    (i / 64, 1 << (i % 64))
}

impl Listeners {
    pub fn clear(&mut self) {
        self.specific.clear();
        self.wildcard.clear();
        self.ports.fill(0);
    }

    pub fn insert(&mut self, proto: Protocol, local: SocketAddr) {
        let (w, b) = port_bit(proto, local.port());
        self.ports[w] |= b;
        let local = FlowKey::new(proto, local, local).local();
        if local.ip().is_unspecified() {
            self.wildcard.insert((proto, local.port()));
        } else {
            self.specific.insert((proto, local.ip(), local.port()));
        }
    }

    /// Direction heuristic: a socket whose local (address, port) is served by a
    /// listener (same address, or a wildcard listener on the port) was accepted, so it
    /// is `Inbound`; otherwise this host connected out. A client that happens to bind
    /// a listening port (SO_REUSEPORT tricks) is misclassified; the tracker, which sees
    /// connect() and accept(), overrides this for sockets it saw born. A wildcard `::`
    /// listener is taken to cover IPv4 too (dual-stack default; V6ONLY is not checked).
    pub fn direction(&self, key: &FlowKey) -> Direction {
        let port = key.local().port();
        let (w, b) = port_bit(key.proto, port);
        if self.ports[w] & b == 0 {
            return Direction::Outbound;
        }
        if self.wildcard.contains(&(key.proto, port))
            || self.specific.contains(&(key.proto, key.local().ip(), port))
        {
            Direction::Inbound
        } else {
            Direction::Outbound
        }
    }
}

/// Parse one `recv()` worth of replies to request `req`, appending flows to `out` and
/// listeners to `listeners`. Observations get `Direction::Unknown`: direction needs
/// every listener, so the poller classifies after the last request.
pub fn parse_replies(
    buf: &[u8],
    req: &Request,
    out: &mut Vec<SocketObservation>,
    listeners: &mut Listeners,
    stats: &mut ParseStats,
) -> Result<Progress, ParseError> {
    let mut offset = 0;
    while offset < buf.len() {
        let left = buf.len() - offset;
        if left < NETLINK_HEADER_LEN {
            return Err(ParseError::TruncatedHeader { offset, left });
        }
        let msg = NetlinkBuffer::new_checked(&buf[offset..]).map_err(|_| {
            let claimed = NetlinkBuffer::new(&buf[offset..]).length() as usize;
            ParseError::BadLength {
                offset,
                claimed,
                left,
            }
        })?;
        let len = msg.length() as usize;
        stats.messages += 1;
        let next = offset + align4(len);
        if msg.sequence_number() != req.seq {
            // A leftover of an earlier, aborted dump on this socket.
            stats.foreign_seq += 1;
            offset = next;
            continue;
        }
        if msg.flags() & NLM_F_DUMP_INTR != 0 {
            return Err(ParseError::Interrupted { offset });
        }
        match msg.message_type() {
            NLMSG_DONE => return Ok(Progress::Done),
            NLMSG_ERROR => {
                let p = msg.payload();
                let errno = match p.get(..4) {
                    Some(b) => i32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
                    None => return Err(ParseError::TruncatedError { offset }),
                };
                if errno != 0 {
                    return Err(ParseError::Kernel {
                        offset,
                        errno: errno.saturating_neg(),
                    });
                }
                // errno 0 is an ACK: nothing to do.
            }
            NLMSG_OVERRUN => return Err(ParseError::Overrun { offset }),
            NLMSG_NOOP => {}
            SOCK_DIAG_BY_FAMILY => {
                if parse_socket(msg.payload(), req, out, listeners, stats).is_none() {
                    stats.malformed += 1;
                    tracing::debug!(offset, len, "skipping malformed inet_diag_msg");
                }
            }
            _ => stats.unknown_types += 1,
        }
        offset = next;
    }
    Ok(Progress::More)
}

fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

/// One `struct inet_diag_msg` plus attributes. `None` if malformed.
fn parse_socket(
    payload: &[u8],
    req: &Request,
    out: &mut Vec<SocketObservation>,
    listeners: &mut Listeners,
    stats: &mut ParseStats,
) -> Option<()> {
    let hdr = InetResponseHeader::parse(payload.get(..INET_DIAG_MSG_LEN)?).ok()?;
    let id = &hdr.socket_id;
    // The kernel stores the cookie as two host-order u32, low word first
    // (sock_diag_save_cookie).
    let c = id.cookie;
    let cookie = u64::from(u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        | u64::from(u32::from_ne_bytes([c[4], c[5], c[6], c[7]])) << 32;
    let mut facts = SocketFacts {
        proto: req.proto,
        local: SocketAddr::new(id.source_address, id.source_port),
        remote: SocketAddr::new(id.destination_address, id.destination_port),
        state: hdr.state,
        cookie,
        inode: hdr.inode,
        uid: hdr.uid,
        cgroup_id: None,
        tcp: None,
    };
    // Attributes are only read for sockets that become observations.
    if hdr.state != SockState::Listen as u8 && id.destination_port != 0 {
        for nla in NlasIterator::new(&payload[INET_DIAG_MSG_LEN..]) {
            let nla = nla.ok()?;
            match nla.kind() & NLA_TYPE_MASK {
                INET_DIAG_INFO if req.proto == Protocol::Tcp => {
                    facts.tcp = Some(tcp_stats(nla.value()))
                }
                INET_DIAG_CGROUP_ID => facts.cgroup_id = Some(read_u64(nla.value(), 0)),
                _ => stats.unknown_attrs += 1,
            }
        }
    }
    take_socket(&facts, req.netns, out, listeners, stats)
}

/// One socket as a full dump reports it (`struct inet_diag_msg` and attributes, or
/// the socket iterator's record carrying the same values), before it is classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SocketFacts {
    pub proto: Protocol,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// `idiag_state`: the kernel's TCP state numbering.
    pub state: u8,
    pub cookie: u64,
    /// `idiag_inode` (32 bits in sock_diag's message).
    pub inode: u32,
    pub uid: u32,
    pub cgroup_id: Option<u64>,
    pub tcp: Option<TcpStats>,
}

/// What a dump does with one socket, whichever source reported it: a listener (or
/// a bound, unconnected UDP socket) goes to `listeners`, a socket with a peer
/// becomes an observation in `out`. `None` for a state the kernel does not have.
pub(crate) fn take_socket(
    facts: &SocketFacts,
    netns: u64,
    out: &mut Vec<SocketObservation>,
    listeners: &mut Listeners,
    stats: &mut ParseStats,
) -> Option<()> {
    let state = SockState::from_kernel(facts.state)?;
    if state == SockState::Listen {
        stats.listeners += 1;
        listeners.insert(facts.proto, facts.local);
        return Some(());
    }
    if facts.remote.port() == 0 {
        stats.unconnected += 1;
        if facts.proto == Protocol::Udp && facts.local.port() != 0 {
            listeners.insert(facts.proto, facts.local);
        }
        return Some(());
    }
    // TIME_WAIT and request sockets are mini-sockets: the kernel fills uid and inode
    // with 0, which means "unknown" here, not root.
    let mini = facts.inode == 0 && matches!(state, SockState::TimeWait | SockState::NewSynRecv);
    stats.sockets += 1;
    out.push(SocketObservation {
        key: FlowKey::new(facts.proto, facts.local, facts.remote),
        cookie: facts.cookie,
        netns,
        state,
        direction: Direction::Unknown,
        inode: u64::from(facts.inode),
        uid: (!mini).then_some(facts.uid),
        pid: None,
        comm: None,
        cgroup_id: facts.cgroup_id,
        tcp: facts.tcp,
        tcp_bytes: None,
        source: Source::SockDiag,
    });
    Some(())
}

fn tcp_stats(v: &[u8]) -> TcpStats {
    TcpStats {
        rtt_us: read_u32(v, tcpi::RTT),
        rttvar_us: read_u32(v, tcpi::RTTVAR),
        snd_cwnd: read_u32(v, tcpi::SND_CWND),
        total_retrans: read_u32(v, tcpi::TOTAL_RETRANS),
        bytes_acked: read_u64(v, tcpi::BYTES_ACKED),
        bytes_received: read_u64(v, tcpi::BYTES_RECEIVED),
        segs_out: read_u32(v, tcpi::SEGS_OUT),
        segs_in: read_u32(v, tcpi::SEGS_IN),
    }
}

/// Host-order u32 at `off`, 0 if the buffer is shorter (older kernel's tcp_info).
fn read_u32(v: &[u8], off: usize) -> u32 {
    v.get(off..off + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_ne_bytes)
}

fn read_u64(v: &[u8], off: usize) -> u64 {
    v.get(off..off + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_ne_bytes)
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
