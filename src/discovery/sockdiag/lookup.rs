//! Targeted sock_diag requests: one socket, named by its addresses, asked for with
//! `SOCK_DIAG_BY_FAMILY` without `NLM_F_DUMP`, so the kernel answers from one hash
//! lookup instead of walking every socket of the host. The one place such requests
//! are built and their replies told apart; its users (the owner of a local
//! announcer's socket, the `tcp_info` of an enriched flow) read what they need from
//! the reply.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::Socket;

use crate::model::socket::Protocol;

const NLMSG_ERROR: u16 = 2;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
pub const NLMSG_HDR_LEN: usize = 16;

/// A `NETLINK_SOCK_DIAG` socket for targeted requests, in the network namespace of
/// the thread that opened it, reused for every request.
pub struct SocketLookup {
    socket: Socket,
    seq: u32,
    send: Vec<u8>,
    recv: Vec<u8>,
}

/// What the kernel said to one request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reply<'a> {
    /// The socket's `inet_diag_msg` and its attributes (netlink header stripped).
    Found(&'a [u8]),
    /// ENOENT: no such socket.
    Gone,
    Error(i32),
    /// An answer to an earlier request (one that timed out): skipped.
    Stale,
}

impl SocketLookup {
    /// Reads that get no answer within `timeout` fail (EAGAIN), so a caller is
    /// never stuck on a kernel that does not reply.
    pub fn new(timeout: Duration) -> io::Result<Self> {
        Ok(SocketLookup {
            socket: super::open_with_timeout(timeout)?,
            seq: 0,
            send: Vec::with_capacity(128),
            // One socket's reply: the message, tcp_info and a few small attributes.
            recv: vec![0; 8192],
        })
    }

    /// The kernel's record of the `proto` socket whose id is `src` -> `dst` (as the
    /// kernel's lookup for that protocol takes them), with the `extensions` asked
    /// for; `Ok(None)` when there is no such socket in this namespace.
    pub fn find(
        &mut self,
        proto: Protocol,
        src: SocketAddr,
        dst: SocketAddr,
        extensions: ExtensionFlags,
    ) -> io::Result<Option<&[u8]>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family: if src.is_ipv4() { AF_INET } else { AF_INET6 },
                protocol: match proto {
                    Protocol::Tcp => IPPROTO_TCP,
                    Protocol::Udp => IPPROTO_UDP,
                },
                extensions,
                states: StateFlags::from_bits_retain(u32::MAX),
                socket_id: SocketId {
                    source_port: src.port(),
                    destination_port: dst.port(),
                    source_address: src.ip(),
                    destination_address: dst.ip(),
                    interface_id: 0,
                    // All 0xff (INET_DIAG_NOCOOKIE): match on the addresses alone.
                    cookie: [0xff; 8],
                },
            })
            .into(),
        );
        msg.finalize();
        self.send.clear();
        self.send.resize(msg.buffer_len(), 0);
        msg.serialize(&mut self.send);
        self.socket.send(&self.send, 0)?;
        loop {
            let n = match self.socket.recv(&mut &mut self.recv[..], 0) {
                Ok(n) => n.min(self.recv.len()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            // Classified twice so the borrow of `recv` is returned only once found.
            match classify(&self.recv[..n], self.seq) {
                Reply::Stale => continue,
                Reply::Found(_) => break,
                Reply::Gone => return Ok(None),
                Reply::Error(errno) => return Err(io::Error::from_raw_os_error(errno)),
            }
        }
        let len = u32_at(&self.recv, 0).unwrap_or(0) as usize;
        Ok(self.recv.get(NLMSG_HDR_LEN..len.min(self.recv.len())))
    }
}

impl SocketLookup {
    /// The kernel's record of the `proto` socket bound to `own` that talks to
    /// `other`, as [`SocketLookup::find`] gives it.
    pub fn find_socket(
        &mut self,
        proto: Protocol,
        own: SocketAddr,
        other: SocketAddr,
        extensions: ExtensionFlags,
    ) -> io::Result<Option<&[u8]>> {
        // The kernel's UDP lookup takes the socket's own end as the destination
        // ("src and dst are swapped for historical reasons", udp_diag.c); TCP's
        // takes it as the source.
        let (src, dst) = match proto {
            Protocol::Tcp => (own, other),
            Protocol::Udp => (other, own),
        };
        self.find(proto, src, dst, extensions)
    }

    /// Whether a socket of this namespace has the 5-tuple `key` (local end first).
    pub fn exists(&mut self, key: &crate::model::socket::FlowKey) -> io::Result<bool> {
        Ok(self
            .find_socket(
                key.proto,
                key.local(),
                key.remote(),
                ExtensionFlags::empty(),
            )?
            .is_some())
    }
}

pub(crate) fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

pub(crate) fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// The reply to request `seq`: one `SOCK_DIAG_BY_FAMILY` message, or an error.
pub(crate) fn classify(b: &[u8], seq: u32) -> Reply<'_> {
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
        SOCK_DIAG_BY_FAMILY => Reply::Found(body),
        _ => malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_to_earlier_requests_and_errors_are_told_apart() {
        let mut err = vec![0u8; 36];
        err[0..4].copy_from_slice(&36u32.to_ne_bytes());
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[8..12].copy_from_slice(&5u32.to_ne_bytes());
        err[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert_eq!(classify(&err, 5), Reply::Gone);
        assert_eq!(classify(&err, 6), Reply::Stale);
        err[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert_eq!(classify(&err, 5), Reply::Error(libc::EPERM));
        assert_eq!(classify(&err[..10], 5), Reply::Error(libc::EBADMSG));
        let mut found = err.clone();
        found[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        found[0..4].copy_from_slice(&30u32.to_ne_bytes());
        assert_eq!(classify(&found, 5), Reply::Found(&found[16..30]));
    }

    /// A live loopback connection found by its addresses, from either end; a
    /// 4-tuple with no socket is "gone", not an error.
    #[test]
    fn a_socket_is_found_by_its_addresses_alone() {
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut lookup = SocketLookup::new(Duration::from_secs(1)).unwrap();
        let (local, peer) = (client.local_addr().unwrap(), client.peer_addr().unwrap());
        let msg = lookup
            .find(Protocol::Tcp, local, peer, ExtensionFlags::empty())
            .unwrap()
            .expect("the client's socket")
            .to_vec();
        // inet_diag_msg: family, state, ..., then the id's source port (big endian).
        assert_eq!(msg[0], AF_INET);
        assert_eq!(u16::from_be_bytes([msg[4], msg[5]]), local.port());
        assert_eq!(u16::from_be_bytes([msg[6], msg[7]]), peer.port());
        let nobody = "127.0.0.1:9".parse().unwrap();
        assert_eq!(
            lookup
                .find(Protocol::Tcp, nobody, peer, ExtensionFlags::empty())
                .unwrap(),
            None
        );
        drop(server);
    }
}
