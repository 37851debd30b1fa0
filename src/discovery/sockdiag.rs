//! The sock_diag poller: full dumps of every TCP and UDP socket (IPv4 and IPv6) of one
//! network namespace over `NETLINK_SOCK_DIAG`, as [`SocketObservation`]s.
//!
//! Used by the periodic reconcile task: the dump is the ground truth the flow table is
//! corrected against, so a dump that may be partial (receive overflow, kernel error,
//! broken message) is an error, never a shorter `Vec`.

pub mod lookup;
mod parse;

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

pub use parse::{parse_replies, Listeners, ParseError, ParseStats, Progress, Request};
pub(crate) use parse::{take_socket, SocketFacts};

use crate::model::socket::{Protocol, SocketObservation};

/// Kernel receive queue for the netlink socket. A dump is paced by our reads, so this
/// only has to absorb one batch; 4 MiB also covers a slow reader under load.
const SO_RCVBUF_BYTES: usize = 4 << 20;
/// Read buffer. The kernel fills dump skbs up to 32 KiB (max_recvmsg_len cap in
/// af_netlink.c); a larger buffer costs nothing and survives a kernel raising it.
const READ_BUF_BYTES: usize = 256 << 10;
/// A dump that stalls this long is abandoned rather than blocking the daemon.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// The four dumps that make a full picture, in order.
const REQUESTS: [(&str, Protocol, u8); 4] = [
    ("tcp4", Protocol::Tcp, AF_INET),
    ("tcp6", Protocol::Tcp, AF_INET6),
    ("udp4", Protocol::Udp, AF_INET),
    ("udp6", Protocol::Udp, AF_INET6),
];

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("sock_diag: cannot open NETLINK_SOCK_DIAG socket: {0}")]
    Open(#[source] io::Error),
    #[error("sock_diag: cannot read network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sock_diag {request} dump: send failed: {source}")]
    Send {
        request: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("sock_diag {request} dump: recv failed: {source}")]
    Recv {
        request: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("sock_diag {request} dump: receive queue overflowed (ENOBUFS); dump incomplete, do not end flows from it")]
    Overflow { request: &'static str },
    #[error("sock_diag {request} dump: no reply within {RECV_TIMEOUT:?}; dump incomplete")]
    Timeout { request: &'static str },
    #[error("sock_diag {request} dump: {source}")]
    Parse {
        request: &'static str,
        #[source]
        source: ParseError,
    },
}

impl SockDiagError {
    /// True if the error means the dump is partial (rather than the poller unusable).
    pub fn is_incomplete_dump(&self) -> bool {
        !matches!(self, SockDiagError::Open(_) | SockDiagError::Netns { .. })
    }
}

/// Running totals over the poller's life.
#[derive(Debug, Clone, Copy, Default)]
pub struct PollerStats {
    pub dumps: u64,
    pub dump_errors: u64,
    pub eintr_retries: u64,
    pub reopens: u64,
    pub parse: ParseStats,
    pub last_dump_duration: Duration,
    /// Part of the last dump spent in send/recv (kernel walk and copy), the rest is
    /// parsing and classification.
    pub last_dump_io: Duration,
    pub last_dump_bytes: usize,
    pub last_dump_recvs: usize,
    pub last_dump_sockets: usize,
}

impl PollerStats {
    /// A dump begins: counted, and the last dump's figures start from zero.
    pub fn dump_started(&mut self) {
        self.dumps += 1;
        self.last_dump_io = Duration::ZERO;
        self.last_dump_bytes = 0;
        self.last_dump_recvs = 0;
        self.last_dump_sockets = 0;
    }

    /// The dump begun at `started` ended: its duration if complete, else an error.
    pub fn dump_ended(&mut self, started: Instant, complete: bool) {
        if complete {
            self.last_dump_duration = started.elapsed();
        } else {
            self.dump_errors += 1;
        }
    }
}

/// Owns one `NETLINK_SOCK_DIAG` socket and the buffers reused across dumps.
pub struct SockDiag {
    socket: Option<Socket>,
    /// Namespace the socket was opened in, if not the caller's.
    netns_path: Option<PathBuf>,
    netns: u64,
    seq: u32,
    recv_buf: Vec<u8>,
    send_buf: Vec<u8>,
    listeners: Listeners,
    /// Observations parsed but not yet handed out (TCP, UDP).
    pending_tcp: Vec<SocketObservation>,
    pending_udp: Vec<SocketObservation>,
    tcp_info: bool,
    stats: PollerStats,
}

/// Receives the parts of a dump.
type Emit<'a> = &'a mut dyn FnMut(&mut Vec<SocketObservation>);

impl SockDiag {
    /// A poller for the network namespace of the calling thread.
    pub fn new() -> Result<Self, SockDiagError> {
        let netns = netns_inode(Path::new("/proc/thread-self/ns/net"))?;
        Self::with_socket(open_socket()?, None, netns)
    }

    /// A poller for another namespace (e.g. `/var/run/netns/NAME` or
    /// `/proc/PID/ns/net`). A netlink socket stays bound to the namespace it was
    /// created in, so a short-lived thread enters the namespace, opens the socket and
    /// exits; the poller can then be used from any thread.
    pub fn in_netns(path: impl AsRef<Path>) -> Result<Self, SockDiagError> {
        let path = path.as_ref().to_path_buf();
        let netns = netns_inode(&path)?;
        let socket = open_socket_in(&path)?;
        Self::with_socket(socket, Some(path), netns)
    }

    fn with_socket(
        socket: Socket,
        netns_path: Option<PathBuf>,
        netns: u64,
    ) -> Result<Self, SockDiagError> {
        Ok(SockDiag {
            socket: Some(socket),
            netns_path,
            netns,
            seq: 0,
            recv_buf: vec![0; READ_BUF_BYTES],
            send_buf: Vec::with_capacity(128),
            listeners: Listeners::default(),
            pending_tcp: Vec::new(),
            pending_udp: Vec::new(),
            tcp_info: true,
            stats: PollerStats::default(),
        })
    }

    /// Inode of the network namespace this poller dumps.
    pub fn netns(&self) -> u64 {
        self.netns
    }

    /// Ask for `tcp_info` (default on). Off makes the dump cheaper when only the set of
    /// sockets matters; observations then carry `tcp: None`.
    pub fn set_tcp_info(&mut self, on: bool) {
        self.tcp_info = on;
    }

    pub fn stats(&self) -> &PollerStats {
        &self.stats
    }

    /// Dump every TCP (with `tcp_info`) and connected UDP socket into `out` (cleared
    /// first). Listeners and unconnected UDP sockets are used to classify direction
    /// but not returned. On error `out` holds a partial dump that must not be used to
    /// end flows.
    pub fn dump(&mut self, out: &mut Vec<SocketObservation>) -> Result<(), SockDiagError> {
        out.clear();
        self.dump_chunked(usize::MAX, &mut |part| out.append(part))
    }

    /// Dump as [`Self::dump`], handing the sockets to `emit` in parts of about
    /// `chunk`, which must leave the vector empty: a consumer then digests a large
    /// dump piece by piece instead of holding all of it. TCP parts leave as soon as
    /// they are full (the kernel lists a family's listeners before its connections, so
    /// their direction is known); UDP ones at the end of the dump (the unconnected
    /// socket that tells a connected one's direction may come after it). On error,
    /// the parts already emitted are real sockets, but the dump is incomplete.
    pub fn dump_chunked(&mut self, chunk: usize, emit: Emit<'_>) -> Result<(), SockDiagError> {
        let started = Instant::now();
        self.listeners.clear();
        self.pending_tcp.clear();
        self.pending_udp.clear();
        self.stats.dump_started();
        let result = self.dump_all(chunk.max(1), emit);
        self.stats.dump_ended(started, result.is_ok());
        if let Err(e) = &result {
            // Replies of the aborted dump may still be queued; a fresh socket is
            // simpler than draining (sequence numbers also filter them).
            self.socket = None;
            tracing::warn!(netns = self.netns, error = %e, "sock_diag dump failed");
            return result;
        }
        tracing::debug!(
            netns = self.netns,
            sockets = self.stats.last_dump_sockets,
            duration_us = self.stats.last_dump_duration.as_micros() as u64,
            "sock_diag dump complete"
        );
        Ok(())
    }

    /// Hands out the pending observations of `proto`, their direction set.
    fn flush(&mut self, proto: Protocol, emit: Emit<'_>) {
        let part = match proto {
            Protocol::Tcp => &mut self.pending_tcp,
            Protocol::Udp => &mut self.pending_udp,
        };
        if part.is_empty() {
            return;
        }
        for obs in part.iter_mut() {
            obs.direction = self.listeners.direction(&obs.key);
        }
        self.stats.last_dump_sockets += part.len();
        emit(part);
        part.clear();
    }

    fn dump_all(&mut self, chunk: usize, emit: Emit<'_>) -> Result<(), SockDiagError> {
        if self.socket.is_none() {
            self.stats.reopens += 1;
            self.socket = Some(match &self.netns_path {
                Some(p) => open_socket_in(p)?,
                None => open_socket()?,
            });
        }
        for (name, proto, family) in REQUESTS {
            self.seq = self.seq.wrapping_add(1);
            self.send_request(name, proto, family)?;
            let req = Request {
                proto,
                seq: self.seq,
                netns: self.netns,
            };
            self.read_replies(name, &req, chunk, emit)?;
            if proto == Protocol::Tcp {
                self.flush(Protocol::Tcp, emit);
            }
        }
        self.flush(Protocol::Udp, emit);
        Ok(())
    }

    fn send_request(
        &mut self,
        name: &'static str,
        proto: Protocol,
        family: u8,
    ) -> Result<(), SockDiagError> {
        let (protocol, extensions) = match proto {
            Protocol::Tcp if self.tcp_info => (IPPROTO_TCP, ExtensionFlags::INFO),
            Protocol::Tcp => (IPPROTO_TCP, ExtensionFlags::empty()),
            Protocol::Udp => (IPPROTO_UDP, ExtensionFlags::empty()),
        };
        let socket_id = if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol,
                extensions,
                // All states (bit 12, NEW_SYN_RECV, is not in StateFlags).
                states: StateFlags::from_bits_retain(u32::MAX),
                socket_id,
            })
            .into(),
        );
        msg.finalize();
        self.send_buf.clear();
        self.send_buf.resize(msg.buffer_len(), 0);
        msg.serialize(&mut self.send_buf);
        let socket = self.socket.as_ref().ok_or(SockDiagError::Send {
            request: name,
            source: io::Error::from(io::ErrorKind::NotConnected),
        })?;
        loop {
            let t = Instant::now();
            let r = socket.send(&self.send_buf, 0);
            self.stats.last_dump_io += t.elapsed();
            match r {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.stats.eintr_retries += 1,
                Err(source) => {
                    return Err(SockDiagError::Send {
                        request: name,
                        source,
                    })
                }
            }
        }
    }

    fn read_replies(
        &mut self,
        name: &'static str,
        req: &Request,
        chunk: usize,
        emit: Emit<'_>,
    ) -> Result<(), SockDiagError> {
        loop {
            let Some(socket) = self.socket.as_ref() else {
                return Err(SockDiagError::Recv {
                    request: name,
                    source: io::Error::from(io::ErrorKind::NotConnected),
                });
            };
            let t = Instant::now();
            let r = socket.recv(&mut &mut self.recv_buf[..], 0);
            self.stats.last_dump_io += t.elapsed();
            let n = match r {
                Ok(n) => n,
                Err(e) => match recv_error(name, e) {
                    None => {
                        self.stats.eintr_retries += 1;
                        continue;
                    }
                    Some(err) => return Err(err),
                },
            };
            // recv reports the datagram size even when it was cut to fit the buffer.
            let n = n.min(self.recv_buf.len());
            self.stats.last_dump_bytes += n;
            self.stats.last_dump_recvs += 1;
            let out = match req.proto {
                Protocol::Tcp => &mut self.pending_tcp,
                Protocol::Udp => &mut self.pending_udp,
            };
            let progress = parse_replies(
                &self.recv_buf[..n],
                req,
                out,
                &mut self.listeners,
                &mut self.stats.parse,
            );
            if req.proto == Protocol::Tcp && self.pending_tcp.len() >= chunk {
                self.flush(Protocol::Tcp, emit);
            }
            match progress {
                Ok(Progress::Done) => return Ok(()),
                Ok(Progress::More) => {}
                Err(source) => {
                    return Err(SockDiagError::Parse {
                        request: name,
                        source,
                    })
                }
            }
        }
    }
}

/// What a failed recv means: `None` to retry (EINTR), else the error that makes the
/// dump incomplete. ENOBUFS: the kernel dropped replies, so sockets are missing.
fn recv_error(request: &'static str, e: io::Error) -> Option<SockDiagError> {
    match e.raw_os_error() {
        Some(libc::EINTR) => None,
        Some(libc::ENOBUFS) => Some(SockDiagError::Overflow { request }),
        Some(libc::EAGAIN) => Some(SockDiagError::Timeout { request }),
        _ => Some(SockDiagError::Recv { request, source: e }),
    }
}

/// Inode number of a network namespace file: the id the tracker reports too.
pub fn netns_inode(path: &Path) -> Result<u64, SockDiagError> {
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| SockDiagError::Netns {
            path: path.to_path_buf(),
            source,
        })
}

/// A sock_diag netlink socket talking to the kernel, whose reads give up after
/// `timeout`: the one way every sock_diag user here (dumps, the targeted lookups of
/// announcers and of enriched flows) opens one.
pub fn open_with_timeout(timeout: Duration) -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    set_rcvtimeo(&socket, &tv)?;
    Ok(socket)
}

fn open_socket() -> Result<Socket, SockDiagError> {
    let socket = open_with_timeout(RECV_TIMEOUT).map_err(SockDiagError::Open)?;
    // The kernel caps SO_RCVBUF at rmem_max unless we are privileged; try the forcing
    // variant first (root) and fall back silently.
    let size = SO_RCVBUF_BYTES as libc::c_int;
    if setsockopt_int(&socket, libc::SO_RCVBUFFORCE, size).is_err() {
        let _ = socket.set_rx_buf_sz(SO_RCVBUF_BYTES);
    }
    Ok(socket)
}

fn open_socket_in(path: &Path) -> Result<Socket, SockDiagError> {
    let file = std::fs::File::open(path).map_err(|source| SockDiagError::Netns {
        path: path.to_path_buf(),
        source,
    })?;
    let path_owned = path.to_path_buf();
    // setns affects only the calling thread: do it in a throwaway one.
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
            SockDiagError::Netns {
                path: path_owned,
                source: io::Error::from(e),
            }
        })?;
        open_socket()
    })
    .join()
    .unwrap_or_else(|_| {
        Err(SockDiagError::Open(io::Error::other(
            "netns helper thread panicked",
        )))
    })
}

fn setsockopt_int(socket: &Socket, opt: libc::c_int, val: libc::c_int) -> io::Result<()> {
    // SAFETY: valid fd, pointer to a live c_int of the advertised length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_rcvtimeo(socket: &Socket, tv: &libc::timeval) -> io::Result<()> {
    // SAFETY: valid fd, pointer to a live timeval of the advertised length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod io_tests {
    use super::*;

    fn errno(n: i32) -> io::Error {
        io::Error::from_raw_os_error(n)
    }

    #[test]
    fn eintr_is_retried() {
        assert!(recv_error("tcp4", errno(libc::EINTR)).is_none());
    }

    #[test]
    fn enobufs_is_an_incomplete_dump_error_naming_the_request() {
        let e = recv_error("udp6", errno(libc::ENOBUFS)).unwrap();
        assert!(matches!(e, SockDiagError::Overflow { request: "udp6" }));
        assert!(e.is_incomplete_dump());
        assert!(e.to_string().contains("udp6") && e.to_string().contains("incomplete"));
    }

    #[test]
    fn timeout_and_other_errors_are_typed() {
        assert!(matches!(
            recv_error("tcp6", errno(libc::EAGAIN)),
            Some(SockDiagError::Timeout { request: "tcp6" })
        ));
        let e = recv_error("tcp4", errno(libc::EBADF)).unwrap();
        assert!(matches!(
            e,
            SockDiagError::Recv {
                request: "tcp4",
                ..
            }
        ));
        assert!(e.is_incomplete_dump());
    }
}
