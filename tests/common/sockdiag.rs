//! Helpers for the privileged tests: gating, private network namespaces, SO_COOKIE.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Privileged tests run when FLOWD_PRIVILEGED_TESTS=1 (and then must pass: any setup
/// failure panics) or when running as root; otherwise they print a skip line.
pub fn should_run(name: &str) -> bool {
    if std::env::var("FLOWD_PRIVILEGED_TESTS").as_deref() == Ok("1") {
        return true;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    println!("SKIP {name}: needs root (set FLOWD_PRIVILEGED_TESTS=1 to require it)");
    false
}

/// Run `f` on a fresh thread inside a new, private network namespace with `lo` up.
/// The namespace dies with the thread.
pub fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET): privileged tests need root");
        loopback_up();
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// `ip link set lo up`, without needing the ip binary.
fn loopback_up() {
    // SAFETY: plain ioctls on a socket we own, with a zeroed ifreq naming "lo".
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        assert_eq!(libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr), 0);
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(
            libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr),
            0,
            "SIOCSIFFLAGS lo: {}",
            std::io::Error::last_os_error()
        );
    }
}

pub fn cookie(fd: &impl AsRawFd) -> u64 {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer to a live u64 with its length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "SO_COOKIE: {}", std::io::Error::last_os_error());
    v
}

pub fn inode(fd: &impl AsRawFd) -> u64 {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    flowd::discovery::procfs::socket_inode(&link).expect("socket fd")
}

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
