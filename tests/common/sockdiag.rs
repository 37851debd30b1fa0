//! Helpers for the sock_diag tests: raw sockets built exactly as a test needs them.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub fn netns_inode() -> u64 {
    flowd::discovery::sockdiag::netns_inode(std::path::Path::new("/proc/thread-self/ns/net"))
        .unwrap()
}

pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
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
