//! Helpers for the sock_diag tests: raw sockets built exactly as a test needs them.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub fn netns_inode() -> u64 {
    flowd::discovery::sockdiag::netns_inode(std::path::Path::new("/proc/thread-self/ns/net"))
        .unwrap()
}

pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The sockets both full-dump sources are checked on, kept open by the value:
/// TCP listeners on IPv4, IPv6 and dual-stack; connections seen from both ends
/// over IPv4 (`c4`, bound to port 40000 and owned by uid 1234), IPv6 and
/// IPv4-mapped IPv6 (`cm`); a bound UDP socket (`us`, port 5002) and two
/// connected ones (`uc` to it, `u6` over IPv6). Ports 5000-5004 and 40000.
pub struct SocketSet {
    pub l4: TcpListener,
    pub l6: TcpListener,
    pub ldual: TcpListener,
    pub c4: OwnedFd,
    pub s4: TcpStream,
    pub c6: TcpStream,
    pub s6: TcpStream,
    pub cm: OwnedFd,
    pub sm: TcpStream,
    pub us: UdpSocket,
    pub uc: UdpSocket,
    pub u6: UdpSocket,
}

impl SocketSet {
    /// Opens the set in the calling thread's network namespace.
    pub fn open() -> SocketSet {
        let l4 = TcpListener::bind("127.0.0.1:5000").unwrap();
        let l6 = TcpListener::bind("[::1]:5001").unwrap();
        let ldual = TcpListener::bind("[::]:5003").unwrap();
        // A socket created with fsuid 1234 is owned by uid 1234 (sk_uid).
        // SAFETY: setfsuid only changes this thread's filesystem uid.
        unsafe { libc::setfsuid(1234) };
        let c4 = connect_from(
            libc::AF_INET,
            libc::SOCK_STREAM,
            Some(addr("127.0.0.1:40000")),
            addr("127.0.0.1:5000"),
        );
        // SAFETY: as above.
        unsafe { libc::setfsuid(0) };
        let (s4, _) = l4.accept().unwrap();
        let c6 = TcpStream::connect("[::1]:5001").unwrap();
        let (s6, _) = l6.accept().unwrap();
        let cm = connect_from(
            libc::AF_INET6,
            libc::SOCK_STREAM,
            None,
            addr("[::ffff:127.0.0.1]:5003"),
        );
        let (sm, _) = ldual.accept().unwrap();
        let us = UdpSocket::bind("127.0.0.1:5002").unwrap();
        let uc = UdpSocket::bind("127.0.0.1:0").unwrap();
        uc.connect("127.0.0.1:5002").unwrap();
        let u6 = UdpSocket::bind("[::1]:0").unwrap();
        u6.connect("[::1]:5004").unwrap();
        SocketSet {
            l4,
            l6,
            ldual,
            c4,
            s4,
            c6,
            s6,
            cm,
            sm,
            us,
            uc,
            u6,
        }
    }
}

/// Create a socket of `domain`/`ty`, optionally bind it, connect it; as an OwnedFd.
pub fn connect_from(
    domain: i32,
    ty: i32,
    local: Option<SocketAddr>,
    remote: SocketAddr,
) -> OwnedFd {
    // SAFETY: raw socket calls on an fd we own; sockaddrs built by `sockaddr`.
    unsafe {
        let fd = libc::socket(domain, ty, 0);
        assert!(fd >= 0);
        let fd = OwnedFd::from_raw_fd(fd);
        if let Some(l) = local {
            let (sa, len) = sockaddr(l);
            assert_eq!(
                libc::bind(fd.as_raw_fd(), sa.as_ptr().cast(), len),
                0,
                "bind {l}: {}",
                std::io::Error::last_os_error()
            );
        }
        let (sa, len) = sockaddr(remote);
        assert_eq!(
            libc::connect(fd.as_raw_fd(), sa.as_ptr().cast(), len),
            0,
            "connect {remote}: {}",
            std::io::Error::last_os_error()
        );
        fd
    }
}

pub fn sockaddr(a: SocketAddr) -> ([u8; 28], libc::socklen_t) {
    let mut buf = [0u8; 28];
    match a {
        SocketAddr::V4(v4) => {
            let s = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in is 16 bytes, buf is 28.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (&s as *const libc::sockaddr_in).cast::<u8>(),
                    buf.as_mut_ptr(),
                    16,
                )
            };
            (buf, 16)
        }
        SocketAddr::V6(v6) => {
            let s = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 is 28 bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (&s as *const libc::sockaddr_in6).cast::<u8>(),
                    buf.as_mut_ptr(),
                    28,
                )
            };
            (buf, 28)
        }
    }
}
