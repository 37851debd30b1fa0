//! The socket iterators' records (`struct flowd_sock_record`, bpf/flowd.h): bytes
//! in, [`SocketFacts`] out, pure so it can be tested on exact bytes.
//!
//! A record this reader does not understand is an error, never a skipped socket: the
//! iterator is the reconcile's ground truth, and a socket left out of it would end a
//! live flow.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub use crate::bpf::sockiter::types::flowd_sock_record as RawRecord;
use crate::bpf::sockiter::types::{flowd_family, flowd_sock_record_flag};
use crate::discovery::sockdiag::SocketFacts;
use crate::model::socket::{Protocol, SockState, TcpStats};

/// Bytes per record (the BPF side asserts the same size).
pub const RECORD_SIZE: usize = std::mem::size_of::<RawRecord>();

use crate::model::socket::ROOT_CGROUP_ID;

const FULL: u8 = flowd_sock_record_flag::FLOWD_SR_FULL.0 as u8;
const NO_COOKIE: u8 = flowd_sock_record_flag::FLOWD_SR_NO_COOKIE.0 as u8;
const CGROUP_ROOT: u8 = flowd_sock_record_flag::FLOWD_SR_CGROUP_ROOT.0 as u8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("socket record has unknown address family {0}")]
    Family(u8),
    #[error("socket record has untracked IP protocol {0}")]
    Protocol(u8),
    #[error("socket record has unknown state {0}")]
    State(u8),
    /// Linux < 5.12: the socket never got a cookie and the iterator cannot give it
    /// one; a sock_diag dump does (and then the iterator can read it).
    #[error("socket {local} -> {remote} has no cookie yet (this kernel cannot assign one from an iterator)")]
    NoCookie {
        local: SocketAddr,
        remote: SocketAddr,
    },
    #[error("a verify walk returned a socket record")]
    Unexpected,
}

/// Copies the record at the start of `bytes` (at least [`RECORD_SIZE`] long; no
/// alignment assumed).
pub fn read(bytes: &[u8]) -> RawRecord {
    assert!(bytes.len() >= RECORD_SIZE, "socket record cut short");
    // SAFETY: the length is checked; RawRecord is plain old data (integers and
    // arrays only), so any bit pattern is a valid value; read_unaligned makes no
    // alignment assumption about the read buffer.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<RawRecord>()) }
}

/// The facts a sock_diag dump gives of the same socket. `with_tcp_info`: fill
/// `tcp` as a dump that asked for `INET_DIAG_INFO` would (full TCP sockets only).
pub fn decode(r: &RawRecord, with_tcp_info: bool) -> Result<SocketFacts, RecordError> {
    let proto = Protocol::from_ip_proto(r.protocol).ok_or(RecordError::Protocol(r.protocol))?;
    if SockState::from_kernel(r.state).is_none() {
        return Err(RecordError::State(r.state));
    }
    let local = addr(r.family, &r.saddr, r.sport)?;
    let remote = addr(r.family, &r.daddr, r.dport)?;
    if r.flags & NO_COOKIE != 0 {
        return Err(RecordError::NoCookie { local, remote });
    }
    let full = r.flags & FULL != 0;
    let cgroup_id = full.then_some(if r.flags & CGROUP_ROOT != 0 {
        ROOT_CGROUP_ID
    } else {
        r.cgroup_id
    });
    let tcp = (full && with_tcp_info && proto == Protocol::Tcp).then_some(TcpStats {
        rtt_us: r.rtt_us,
        rttvar_us: r.rttvar_us,
        snd_cwnd: r.snd_cwnd,
        total_retrans: r.total_retrans,
        bytes_acked: r.bytes_acked,
        bytes_received: r.bytes_received,
        segs_out: r.segs_out,
        segs_in: r.segs_in,
    });
    Ok(SocketFacts {
        proto,
        local,
        remote,
        state: r.state,
        cookie: r.cookie,
        // sock_diag's idiag_inode is 32 bits; socket inodes (get_next_ino) fit.
        inode: r.inode as u32,
        uid: r.uid,
        cgroup_id,
        tcp,
    })
}

fn addr(family: u8, raw: &[u8; 16], port: u16) -> Result<SocketAddr, RecordError> {
    let ip = match u32::from(family) {
        f if f == flowd_family::FLOWD_AF_INET.0 => {
            IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
        }
        f if f == flowd_family::FLOWD_AF_INET6.0 => IpAddr::V6(Ipv6Addr::from(*raw)),
        _ => return Err(RecordError::Family(family)),
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An established IPv6 TCP socket, byte by byte as the BPF program writes it
    /// on x86-64 (little-endian), offsets from bpf/flowd.h.
    fn established_v6_bytes() -> Vec<u8> {
        let mut b = vec![0u8; 112];
        b[0..8].copy_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes()); // cookie
        b[8..16].copy_from_slice(&4242u64.to_le_bytes()); // inode
        b[16..24].copy_from_slice(&77u64.to_le_bytes()); // cgroup_id
        b[24..32].copy_from_slice(&1000u64.to_le_bytes()); // bytes_acked
        b[32..40].copy_from_slice(&2000u64.to_le_bytes()); // bytes_received
        b[40..56].copy_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        b[56..72].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        b[72..76].copy_from_slice(&1001u32.to_le_bytes()); // uid
        b[76..80].copy_from_slice(&150u32.to_le_bytes()); // rtt_us
        b[80..84].copy_from_slice(&30u32.to_le_bytes()); // rttvar_us
        b[84..88].copy_from_slice(&10u32.to_le_bytes()); // snd_cwnd
        b[88..92].copy_from_slice(&2u32.to_le_bytes()); // total_retrans
        b[92..96].copy_from_slice(&5u32.to_le_bytes()); // segs_out
        b[96..100].copy_from_slice(&6u32.to_le_bytes()); // segs_in
        b[100..102].copy_from_slice(&1094u16.to_le_bytes()); // sport
        b[102..104].copy_from_slice(&40000u16.to_le_bytes()); // dport
        b[104] = 10; // AF_INET6
        b[105] = 6; // TCP
        b[106] = 1; // ESTABLISHED
        b[107] = FULL;
        b
    }

    #[test]
    fn a_record_decodes_from_exact_bytes() {
        assert_eq!(RECORD_SIZE, 112);
        let bytes = established_v6_bytes();
        let f = decode(&read(&bytes), true).unwrap();
        assert_eq!(
            f,
            SocketFacts {
                proto: Protocol::Tcp,
                local: "[fd00::1]:1094".parse().unwrap(),
                remote: "[fd00::2]:40000".parse().unwrap(),
                state: 1,
                cookie: 0x0102_0304_0506_0708,
                inode: 4242,
                uid: 1001,
                cgroup_id: Some(77),
                tcp: Some(TcpStats {
                    rtt_us: 150,
                    rttvar_us: 30,
                    snd_cwnd: 10,
                    total_retrans: 2,
                    bytes_acked: 1000,
                    bytes_received: 2000,
                    segs_out: 5,
                    segs_in: 6,
                }),
            }
        );
        // A dump that did not ask for tcp_info has none, as from sock_diag.
        assert_eq!(decode(&read(&bytes), false).unwrap().tcp, None);
    }

    #[test]
    fn mini_sockets_ipv4_and_the_cgroup_root_decode_as_sock_diag_reports_them() {
        let mut b = vec![0u8; 112];
        b[0..8].copy_from_slice(&9u64.to_le_bytes());
        b[40..44].copy_from_slice(&[127, 0, 0, 1]);
        b[56..60].copy_from_slice(&[127, 0, 0, 2]);
        b[100..102].copy_from_slice(&5000u16.to_le_bytes());
        b[102..104].copy_from_slice(&6000u16.to_le_bytes());
        b[104] = 2;
        b[105] = 6;
        b[106] = 6; // TIME_WAIT, not full: no cgroup, no tcp_info
        let f = decode(&read(&b), true).unwrap();
        assert_eq!(f.local, "127.0.0.1:5000".parse::<SocketAddr>().unwrap());
        assert_eq!(f.remote, "127.0.0.2:6000".parse::<SocketAddr>().unwrap());
        assert_eq!((f.inode, f.uid, f.cgroup_id, f.tcp), (0, 0, None, None));
        b[105] = 17;
        b[106] = 7;
        b[107] = FULL | CGROUP_ROOT;
        let f = decode(&read(&b), true).unwrap();
        assert_eq!(
            (f.proto, f.cgroup_id, f.tcp),
            (Protocol::Udp, Some(1), None)
        );
    }

    #[test]
    fn records_the_reader_cannot_name_are_errors() {
        let good = established_v6_bytes();
        let with = |i: usize, v: u8| {
            let mut b = good.clone();
            b[i] = v;
            decode(&read(&b), true)
        };
        assert_eq!(with(104, 1), Err(RecordError::Family(1)));
        assert_eq!(with(105, 1), Err(RecordError::Protocol(1)));
        assert_eq!(with(106, 0), Err(RecordError::State(0)));
        let e = with(107, FULL | NO_COOKIE).unwrap_err();
        assert!(e.to_string().contains("[fd00::1]:1094 -> [fd00::2]:40000"));
    }
}
