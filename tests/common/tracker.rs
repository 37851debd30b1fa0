//! Helpers for the privileged tracker tests: starting the tracker and waiting for
//! its events.
#![allow(dead_code)]

use super::{cookie, inode, Netns};

use std::{
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use std::{
    io,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::OwnedFd,
};

use flowd::discovery::tracker::{Tracker, TrackerConfig};
use flowd::discovery::tracker_event::{EventKind, TrackerEvent};
use flowd::model::socket::SockState;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrStorage};

pub fn start(cfg: &TrackerConfig) -> Tracker {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    Tracker::start(cfg).expect("Tracker::start")
}

/// A named condition on one event.
pub type Expect<'a> = (&'a str, &'a dyn Fn(&TrackerEvent) -> bool);

/// A tracker watched for one namespace's events. It keeps polling while test code
/// runs in the namespace: the ring buffer is host-wide, and other activity on the
/// host would fill it (and drop our records) if nobody read it meanwhile.
pub struct Probe {
    pub tracker: Tracker,
    netns: u64,
    seen: Vec<TrackerEvent>,
}

impl std::ops::Deref for Probe {
    type Target = Tracker;
    fn deref(&self) -> &Tracker {
        &self.tracker
    }
}

impl Probe {
    /// Per attached program, the runs the kernel skipped because the same program
    /// was already running on that CPU (a softirq interrupting it).
    pub fn recursion_misses(&self) -> Vec<(&'static str, u64)> {
        let ids: Vec<(u32, &'static str)> = self
            .tracker
            .attached_programs()
            .iter()
            .map(|p| (p.id, p.name))
            .collect();
        libbpf_rs::query::ProgInfoIter::default()
            .filter_map(|info| {
                let (_, name) = ids.iter().find(|(id, _)| *id == info.id)?;
                Some((*name, info.recursion_misses))
            })
            .collect()
    }

    pub fn new(cfg: &TrackerConfig, ns: &Netns) -> Probe {
        Probe {
            tracker: start(cfg),
            netns: ns.inode(),
            seen: Vec::new(),
        }
    }

    /// The namespace's events seen so far.
    pub fn seen(&self) -> &[TrackerEvent] {
        &self.seen
    }

    /// Polls the ring once (up to 10 ms), keeping the namespace's events.
    pub fn poll_once(&mut self) {
        let (netns, seen) = (self.netns, &mut self.seen);
        self.tracker
            .poll_events(Duration::from_millis(10), &mut |ev| {
                if ev.observation.netns == netns {
                    seen.push(ev);
                }
            })
            .expect("poll_events");
    }

    /// Runs `f` in the namespace (see [`NetNs::run`]) while polling.
    pub fn run<T: Send + 'static>(
        &mut self,
        ns: &Netns,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let h = ns.run(f);
        while !h.is_finished() {
            self.poll_once();
        }
        h.join().expect("netns thread panicked")
    }

    /// Polls until every predicate matched some event of the namespace (each may
    /// match a different one) or the deadline passes; returns all of them.
    pub fn wait_for(&mut self, deadline: Duration, preds: &[Expect<'_>]) -> Vec<TrackerEvent> {
        self.try_wait_for(deadline, preds)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::wait_for`], saying what is missing instead of panicking.
    pub fn try_wait_for(
        &mut self,
        deadline: Duration,
        preds: &[Expect<'_>],
    ) -> Result<Vec<TrackerEvent>, String> {
        let end = Instant::now() + super::patient(deadline);
        let done = |seen: &[TrackerEvent]| preds.iter().all(|(_, p)| seen.iter().any(p));
        while !done(&self.seen) && Instant::now() < end {
            self.poll_once();
        }
        for (name, p) in preds {
            if !self.seen.iter().any(p) {
                return Err(format!(
                    "no event matched `{name}` (drops: {:?}, recursion misses: {:?}); events of the netns: {:#?}",
                    self.tracker.drops(),
                    self.recursion_misses(),
                    self.seen
                ));
            }
        }
        Ok(self.seen.clone())
    }

    /// Whether the kernel skipped any run of this tracker's programs.
    pub fn kernel_skipped_a_run(&self) -> bool {
        self.recursion_misses().iter().any(|(_, n)| *n > 0)
    }
}

pub fn setsockopt_int(fd: &impl AsRawFd, level: i32, name: i32, v: i32) {
    // SAFETY: valid fd, pointer to an int of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&v as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(
        r,
        0,
        "setsockopt({level},{name}): {}",
        std::io::Error::last_os_error()
    );
}

/// Changes uid of the calling thread only (raw syscall: glibc's setresuid would
/// change every thread of the test process).
pub fn thread_setuid(uid: u32) {
    // SAFETY: plain syscall, arguments are integers.
    let r = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
    assert_eq!(
        r,
        0,
        "setresuid({uid}): {}",
        std::io::Error::last_os_error()
    );
}

pub fn default_cfg() -> TrackerConfig {
    TrackerConfig::default()
}

pub const WAIT: Duration = Duration::from_secs(5);

pub fn is(ev: &TrackerEvent, kind: EventKind, cookie: u64) -> bool {
    ev.kind == kind && ev.observation.cookie == cookie
}

pub fn tcp_change(ev: &TrackerEvent, cookie: u64, old: SockState, new: SockState) -> bool {
    is(ev, EventKind::TcpState, cookie) && ev.old_state == Some(old) && ev.observation.state == new
}

pub fn raw_socket(family: AddressFamily, ty: SockType) -> OwnedFd {
    socket::socket(family, ty, SockFlag::empty(), None).expect("socket()")
}

pub fn raw_connect(fd: &OwnedFd, to: SocketAddr) -> io::Result<()> {
    socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(to)).map_err(io::Error::from)
}

pub fn local_of(fd: &OwnedFd) -> SocketAddr {
    let ss: SockaddrStorage = socket::getsockname(fd.as_raw_fd()).expect("getsockname");
    if let Some(v4) = ss.as_sockaddr_in() {
        SocketAddr::from((v4.ip(), v4.port()))
    } else {
        let v6 = ss.as_sockaddr_in6().expect("inet socket");
        SocketAddr::from((v6.ip(), v6.port()))
    }
}

pub struct TcpPair {
    pub client_cookie: u64,
    pub server_cookie: u64,
    pub client_inode: u64,
    pub server_inode: u64,
    pub client_local: SocketAddr,
    pub server_local: SocketAddr,
}

/// connect + accept in the namespace; `finish` decides how both ends are closed.
pub fn tcp_pair(
    t: &mut Probe,
    ns: &Netns,
    listen: &'static str,
    connect_ip: &'static str,
    finish: fn(TcpStream, TcpStream),
) -> TcpPair {
    t.run(ns, move || {
        let l = TcpListener::bind(listen).expect("bind");
        let to = SocketAddr::new(
            connect_ip.parse().expect("ip"),
            l.local_addr().unwrap().port(),
        );
        let c = TcpStream::connect(to).expect("connect");
        let (a, _) = l.accept().expect("accept");
        let p = TcpPair {
            client_cookie: cookie(&c),
            server_cookie: cookie(&a),
            client_inode: inode(&c),
            server_inode: inode(&a),
            client_local: c.local_addr().unwrap(),
            server_local: a.local_addr().unwrap(),
        };
        finish(c, a);
        p
    })
}

pub fn graceful(c: TcpStream, a: TcpStream) {
    drop(c);
    std::thread::sleep(Duration::from_millis(20));
    drop(a);
}

/// `n` loopback TCP connections in `ns`, each connected, accepted and closed in
/// turn (about a dozen tracker events apiece).
pub fn burst(ns: &Netns, n: usize) {
    ns.enter(move || {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = l.local_addr().unwrap();
        for _ in 0..n {
            let c = TcpStream::connect(to).unwrap();
            let (a, _) = l.accept().unwrap();
            drop((c, a));
        }
    });
}
