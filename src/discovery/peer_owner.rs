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

use netlink_packet_sock_diag::inet::ExtensionFlags;

use super::sockdiag::lookup::{u32_at, SocketLookup};
use crate::model::socket::Protocol;

/// A lookup that does not answer within this is treated as "not found".
const TIMEOUT: Duration = Duration::from_secs(1);

/// `idiag_uid` in `struct inet_diag_msg` (include/uapi/linux/inet_diag.h).
const IDIAG_UID: usize = 64;

/// One netlink socket, reused for every lookup.
pub struct PeerOwners {
    lookup: SocketLookup,
}

impl PeerOwners {
    pub fn new() -> io::Result<Self> {
        Ok(PeerOwners {
            lookup: SocketLookup::new(TIMEOUT)?,
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
        let msg = self
            .lookup
            .find_socket(proto, peer, local, ExtensionFlags::empty())?;
        Ok(msg.and_then(|m| u32_at(m, IDIAG_UID)))
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
