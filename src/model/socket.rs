//! Socket facts as the discovery sources report them.
//!
//! Both sources (the eBPF tracker and the sock_diag poller) speak this vocabulary, so
//! the flow table never needs to know where a fact came from beyond [`Source`].

use std::net::{IpAddr, SocketAddr};

/// A task's name (`comm`), inline: the kernel keeps at most 15 bytes, and a heap
/// string per tracked flow would cost more than the name.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Comm {
    len: u8,
    bytes: [u8; 15],
}

impl Comm {
    /// `name`, cut to 15 bytes at a character boundary.
    pub fn new(name: &str) -> Comm {
        let mut len = name.len().min(15);
        while !name.is_char_boundary(len) {
            len -= 1;
        }
        let mut bytes = [0; 15];
        bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
        Comm {
            len: len as u8,
            bytes,
        }
    }

    pub fn as_str(&self) -> &str {
        // Built from a &str cut at a character boundary in `new`.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl From<&str> for Comm {
    fn from(name: &str) -> Comm {
        Comm::new(name)
    }
}

impl std::fmt::Display for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Transport protocol of a flow. Only these two are tracked and marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn ip_proto(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
    pub fn from_ip_proto(p: u8) -> Option<Self> {
        match p {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A flow as seen from this host: `local` is the source of the packets we send.
///
/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are normalised to IPv4 by
/// [`FlowKey::new`], because such sockets send IPv4 packets on the wire.
///
/// 38 bytes rather than two `SocketAddr`s (72): the table, the marking decisions and
/// every observation hold one. Addresses are kept as IPv6, IPv4 ones mapped, which is
/// also how they are told apart.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub proto: Protocol,
    local_ip: [u8; 16],
    local_port: u16,
    remote_ip: [u8; 16],
    remote_port: u16,
}

impl FlowKey {
    pub fn new(proto: Protocol, local: SocketAddr, remote: SocketAddr) -> Self {
        FlowKey {
            proto,
            local_ip: mapped(local.ip()),
            local_port: local.port(),
            remote_ip: mapped(remote.ip()),
            remote_port: remote.port(),
        }
    }

    pub fn local(&self) -> SocketAddr {
        SocketAddr::new(unmapped(self.local_ip), self.local_port)
    }

    pub fn remote(&self) -> SocketAddr {
        SocketAddr::new(unmapped(self.remote_ip), self.remote_port)
    }

    /// Local and remote addresses as 16 bytes each, IPv4 as `::ffff:a.b.c.d`.
    pub fn ip_octets(&self) -> ([u8; 16], [u8; 16]) {
        (self.local_ip, self.remote_ip)
    }

    /// The same flow seen from the other end.
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            proto: self.proto,
            local_ip: self.remote_ip,
            local_port: self.remote_port,
            remote_ip: self.local_ip,
            remote_port: self.local_port,
        }
    }

    pub fn is_ipv6(&self) -> bool {
        self.local().is_ipv6()
    }
}

impl std::fmt::Debug for FlowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowKey")
            .field("proto", &self.proto)
            .field("local", &self.local())
            .field("remote", &self.remote())
            .finish()
    }
}

/// The id of the root of the cgroup v2 hierarchy: its directory's inode number,
/// which is the kernfs node id on 64-bit kernels (`stat -c %i /sys/fs/cgroup`).
pub const ROOT_CGROUP_ID: u64 = 1;

fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn unmapped(raw: [u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(raw);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// TCP states with the kernel's numbering (include/net/tcp_states.h).
/// UDP sockets report `Established` when connected and `Close` when not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SockState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
    NewSynRecv = 12,
}

impl SockState {
    pub fn from_kernel(v: u8) -> Option<Self> {
        use SockState::*;
        Some(match v {
            1 => Established,
            2 => SynSent,
            3 => SynRecv,
            4 => FinWait1,
            5 => FinWait2,
            6 => TimeWait,
            7 => Close,
            8 => CloseWait,
            9 => LastAck,
            10 => Listen,
            11 => Closing,
            12 => NewSynRecv,
            _ => return None,
        })
    }
}

/// Who opened the connection, from this host's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// We called connect() (active open).
    Outbound,
    /// We accepted it (passive open).
    Inbound,
    /// Not known (e.g. adopted from a dump of an established socket whose listener is gone).
    Unknown,
}

/// Where a fact came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Tracker,
    SockDiag,
}

/// A subset of the kernel's `struct tcp_info`, enough for inspect and fireflies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpStats {
    pub rtt_us: u32,
    pub rttvar_us: u32,
    pub snd_cwnd: u32,
    pub total_retrans: u32,
    pub bytes_acked: u64,
    pub bytes_received: u64,
    pub segs_out: u32,
    pub segs_in: u32,
}

/// A TCP socket's byte counters (tcp_info `bytes_acked`, `bytes_received`), as the
/// tracker reads them when the socket closes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpBytes {
    pub acked: u64,
    pub received: u64,
}

/// One observation of one socket at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketObservation {
    pub key: FlowKey,
    /// The kernel's socket cookie (`SO_COOKIE`, `bpf_get_socket_cookie`, sock_diag
    /// `id.cookie`): the join key between the tracker and sock_diag.
    pub cookie: u64,
    /// Inode of the network namespace the socket lives in.
    pub netns: u64,
    pub state: SockState,
    pub direction: Direction,
    /// Socket inode (0 for TIME_WAIT and request sockets).
    pub inode: u64,
    pub uid: Option<u32>,
    pub pid: Option<u32>,
    pub comm: Option<Comm>,
    /// cgroup v2 id (the inode number of the cgroup directory).
    pub cgroup_id: Option<u64>,
    pub tcp: Option<TcpStats>,
    /// The byte counters alone, when the source knows no more of tcp_info (the
    /// tracker, at close).
    pub tcp_bytes: Option<TcpBytes>,
    pub source: Source,
}

#[cfg(test)]
mod tests {
    use super::Comm;

    #[test]
    fn comm_keeps_fifteen_bytes_and_never_splits_a_character() {
        assert_eq!(Comm::new("xrootd").as_str(), "xrootd");
        assert_eq!(Comm::new("").as_str(), "");
        assert_eq!(
            Comm::new("fts_url_copy_process").as_str(),
            "fts_url_copy_pr"
        );
        // 14 ASCII bytes, then a 3-byte character that does not fit.
        assert_eq!(
            Comm::new("abcdefghijklmn\u{fffd}").as_str(),
            "abcdefghijklmn"
        );
        assert_eq!(std::mem::size_of::<Option<Comm>>(), 17);
    }

    #[test]
    fn flow_keys_are_compact_and_give_back_their_addresses() {
        use super::{FlowKey, Protocol};
        use std::net::SocketAddr;
        assert_eq!(std::mem::size_of::<FlowKey>(), 38);
        let v6: SocketAddr = "[fd00::1]:1094".parse().unwrap();
        let peer: SocketAddr = "[fd00::2]:40000".parse().unwrap();
        let k = FlowKey::new(Protocol::Tcp, v6, peer);
        assert_eq!((k.local(), k.remote(), k.is_ipv6()), (v6, peer, true));
        // A v4-mapped socket sends IPv4: it is an IPv4 flow.
        let mapped = FlowKey::new(
            Protocol::Udp,
            "[::ffff:10.0.0.1]:53".parse().unwrap(),
            "[::ffff:10.0.0.2]:5353".parse().unwrap(),
        );
        let v4 = FlowKey::new(
            Protocol::Udp,
            "10.0.0.1:53".parse().unwrap(),
            "10.0.0.2:5353".parse().unwrap(),
        );
        assert_eq!(mapped, v4);
        assert_eq!(v4.local(), "10.0.0.1:53".parse::<SocketAddr>().unwrap());
        assert!(!v4.is_ipv6());
    }
}
