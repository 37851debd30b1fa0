//! Who owns the local socket at the other end of a datagram or connection: one
//! targeted `NETLINK_SOCK_DIAG` request (no dump) for the socket with that exact
//! address and port, answered with its owner's uid.
//!
//! Used to authenticate local announcements: a UDP datagram carries no
//! credentials, but its source socket is in this network namespace when it was
//! sent from this host, and the kernel knows who created it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::Socket;

use crate::model::socket::Protocol;

/// A lookup that does not answer within this is treated as "not found".
const TIMEOUT: Duration = Duration::from_secs(1);

/// One netlink socket, reused for every lookup.
pub struct PeerOwners {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl PeerOwners {
    pub fn new() -> io::Result<Self> {
        let socket = super::sockdiag::open_with_timeout(TIMEOUT)?;
        Ok(PeerOwners {
            socket,
            seq: 0,
            buf: vec![0; 16 << 10],
        })
    }

    /// The uid owning the `proto` socket bound to `peer` that talks to `local` (the
    /// receiving socket's address: for UDP, a sender that never connect()ed is found
    /// whatever `local` is). `Ok(None)`: no such socket in this namespace (a remote
    /// sender, or one that has closed its socket since).
    pub fn owner(
        &mut self,
        proto: Protocol,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> io::Result<Option<u32>> {
        let (peer, local) = same_family(peer, local);
        // The kernel's UDP lookup takes the socket's own end as the destination
        // ("src and dst are swapped for historical reasons", udp_diag.c); TCP's
        // takes it as the source.
        let (src, dst) = match proto {
            Protocol::Udp => (local, peer),
            Protocol::Tcp => (peer, local),
        };
        let family = if peer.is_ipv4() { AF_INET } else { AF_INET6 };
        let protocol = match proto {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        };
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::from_bits_retain(u32::MAX),
                socket_id: SocketId {
                    source_port: src.port(),
                    destination_port: dst.port(),
                    source_address: src.ip(),
                    destination_address: dst.ip(),
                    interface_id: 0,
                    // All 0xff: "no cookie", match by addresses only.
                    cookie: [0xff; 8],
                },
            })
            .into(),
        );
        msg.finalize();
        let mut out = vec![0; msg.buffer_len()];
        msg.serialize(&mut out);
        self.socket.send(&out, 0)?;
        loop {
            let n = match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => n.min(self.buf.len()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let reply = NetlinkMessage::<SockDiagMessage>::deserialize(&self.buf[..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            if reply.header.sequence_number != self.seq {
                // The answer to an earlier lookup that timed out.
                continue;
            }
            return match reply.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    Ok(Some(r.header.uid))
                }
                NetlinkPayload::Error(e) => match e.code.map(|c| -c.get()) {
                    Some(libc::ENOENT) => Ok(None),
                    Some(code) => Err(io::Error::from_raw_os_error(code)),
                    None => Ok(None),
                },
                _ => Ok(None),
            };
        }
    }
}

/// Both addresses in one family: an IPv4 peer seen on an IPv6 socket arrives as
/// `::ffff:a.b.c.d`, and its socket is in the IPv4 tables.
fn same_family(peer: SocketAddr, local: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v4 = |a: SocketAddr| match a.ip().to_canonical() {
        IpAddr::V4(ip) => Some(SocketAddr::new(IpAddr::V4(ip), a.port())),
        IpAddr::V6(_) => None,
    };
    match (v4(peer), local.ip()) {
        (Some(p), _) => {
            let l = v4(local).unwrap_or_else(|| {
                let ip = if local.ip().is_unspecified() {
                    Ipv4Addr::UNSPECIFIED
                } else {
                    Ipv4Addr::LOCALHOST
                };
                SocketAddr::new(ip.into(), local.port())
            });
            (p, l)
        }
        (None, IpAddr::V4(ip)) => {
            let l = if ip.is_unspecified() {
                Ipv6Addr::UNSPECIFIED
            } else {
                ip.to_ipv6_mapped()
            };
            (peer, SocketAddr::new(l.into(), local.port()))
        }
        (None, IpAddr::V6(_)) => (peer, local),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_peer_is_looked_up_in_the_ipv4_tables() {
        let (p, l) = same_family(
            "[::ffff:127.0.0.1]:5000".parse().unwrap(),
            "[::]:10514".parse().unwrap(),
        );
        assert_eq!(p, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(l, "0.0.0.0:10514".parse().unwrap());
    }

    /// Needs no privilege: any user may ask sock_diag about sockets of its
    /// namespace, and a socket this test opens is its own.
    #[test]
    fn the_owner_of_a_local_udp_sender_is_found_and_a_closed_one_is_not() {
        let me = nix::unistd::geteuid().as_raw();
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let local = rx.local_addr().unwrap();
        let mut owners = PeerOwners::new().unwrap();
        for connect in [false, true] {
            let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            if connect {
                tx.connect(local).unwrap();
            }
            let peer = tx.local_addr().unwrap();
            assert_eq!(
                owners.owner(Protocol::Udp, peer, local).unwrap(),
                Some(me),
                "connected: {connect}"
            );
            drop(tx);
            assert_eq!(owners.owner(Protocol::Udp, peer, local).unwrap(), None);
        }
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, peer) = l.accept().unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        assert_eq!(
            owners
                .owner(Protocol::Tcp, peer, l.local_addr().unwrap())
                .unwrap(),
            Some(me)
        );
    }
}
