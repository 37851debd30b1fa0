//! The eBPF socket tracker: loads bpf/tracker.bpf.c, attaches what this host allows,
//! and turns ring-buffer records into [`SocketObservation`]s.
//!
//! Feature detection happens once, in [`Tracker::start`]: the programs wanted by the
//! configuration are loaded together; if the kernel refuses, each is probed alone
//! and only those that load are kept; each attach may fail on its own. What ended
//! up active is in [`Tracker::features`] and logged at info (warn for what is off).
//!
//! Lifetimes of the skeleton: see `tracker_progs` (one leaked 8-byte slot per load).
//!
//! Threads: [`Tracker`] is `Send`; polling blocks. The daemon runs
//! [`Tracker::run_until`] on a dedicated `std::thread` (or `spawn_blocking`) and
//! forwards each observation into a bounded tokio channel with `blocking_send`;
//! [`Tracker::epoll_fd`] is there for an `AsyncFd` integration instead.
//!
//! Detach: every attachment is a BPF link owned by an fd held here (no pinning), so
//! dropping the Tracker detaches everything, the cgroup programs included.

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    time::Duration,
};

use libbpf_rs::{Link, MapCore, MapFlags, RingBuffer, RingBufferBuilder};
use tracing::{debug, info, warn};

use crate::features::{Feature, KernelFeatures};

use super::{
    cgroup2::find_cgroup2_mount,
    tracker_event::{decode, parse_record, RawRecord, TrackerEvent},
    tracker_progs::{load_degrading, Prog},
};
use crate::model::socket::SocketObservation;

/// How much of the tracker to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackerMode {
    /// Every hook this host allows (tracepoint, cgroup sockops, UDP hooks).
    Full,
    /// Only tp_btf/inet_sock_set_state: no cgroup attachment at all.
    TracepointOnly,
    /// Load nothing; `poll` returns at once. The sock_diag poller does the work.
    Disabled,
}

/// Tracker configuration; defaults in [`TrackerConfig::default`].
#[derive(Debug, Clone)]
pub struct TrackerConfig {
    pub mode: TrackerMode,
    /// Ring buffer size in bytes: a power of two, multiple of the page size.
    /// One record is 128 bytes (+8 header): the 1 MiB default holds ~7700 events,
    /// enough for bursts of ~27k connections/s on 2 cores (benches/tracker_rate.rs).
    pub ring_bytes: u32,
    /// Where cgroup2 is mounted; `None`: read /proc/self/mountinfo.
    pub cgroup2_path: Option<PathBuf>,
    /// UDP hooks. The connect hook is a tp_btf on sys_exit, which also reports
    /// accept(): attached, it puts every syscall of the host on the kernel's
    /// traced exit path (~80 ns a syscall on this machine, the program itself a
    /// load and two compares; `cargo bench --bench tracker_rate`).
    pub udp: bool,
    /// Report only the sockets of this network namespace (its inode); `None`: the
    /// whole host's. The programs drop the others before the ring buffer, so busy
    /// containers cost neither ring space nor the reader's time.
    pub only_netns: Option<u32>,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            mode: TrackerMode::Full,
            ring_bytes: 1024 * 1024,
            cgroup2_path: None,
            udp: true,
            only_netns: None,
        }
    }
}

/// What is active after [`Tracker::start`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Features {
    /// tp_btf/inet_sock_set_state: every TCP state change, closes included.
    pub tcp_state: bool,
    /// cgroup sockops: tuple at connect before the SYN, accept.
    pub sockops: bool,
    /// UDP connect() seen (tp_btf/sys_exit).
    pub udp_connect: bool,
    /// accept() seen (tp_btf/sys_exit, with sockops for the accepted socket's
    /// cookie): an accepted connection's owner and inode without a dump.
    pub accept: bool,
    /// UDP cookies guaranteed at connect (cgroup connect4/connect6).
    pub udp_cookie: bool,
    /// Release of connected UDP sockets (cgroup sock_release).
    pub udp_release: bool,
    /// Softirq context tracked (tp_btf/softirq_entry+exit): pid/comm of tracepoint
    /// events are marked valid whenever the owner's task ran the transition, not
    /// only for connect/listen/close.
    pub owner_context: bool,
    /// The cgroup2 directory the cgroup programs are attached to.
    pub cgroup2: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("ring buffer size {0} bytes is not a power of two multiple of the page size")]
    RingSize(u32),
    #[error("opening the tracker BPF object (bpf/tracker.bpf.c): {0}")]
    Open(#[source] libbpf_rs::Error),
    #[error("loading tracker BPF programs [{programs}]: {source}{refusal}")]
    Load {
        programs: String,
        /// What the verifier said, when it refused a program.
        refusal: String,
        #[source]
        source: libbpf_rs::Error,
    },
    #[error("opening cgroup2 directory {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no TCP source could be attached (tp_btf/inet_sock_set_state and cgroup sockops \
         both failed; their errors are logged above): flowd-rs needs root and kernel BTF"
    )]
    NoTcpSource,
    #[error("reading tracker ring buffer flowd_events: {0}")]
    Poll(#[source] libbpf_rs::Error),
    #[error("reading tracker drop counter map flowd_drops: {0}")]
    Drops(#[source] libbpf_rs::Error),
}

pub type Result<T, E = TrackerError> = std::result::Result<T, E>;

/// The programs `cfg` asks for, in attach order. softirq_exit before softirq_entry:
/// the other way, a softirq running between the two attaches sets its CPU's flag and
/// nothing clears it until that CPU's next softirq, so the owner of a socket opened
/// meanwhile would be reported unknown.
fn wanted_programs(cfg: &TrackerConfig, cgroup: bool) -> Vec<Prog> {
    let mut wanted = vec![Prog::TcpState, Prog::SoftirqExit, Prog::SoftirqEntry];
    if cgroup {
        wanted.push(Prog::Sockops);
    }
    // sys_exit reports UDP connects and, where sockops gives the accepted sockets
    // their cookies, accepts. Not attached for accepts alone: it puts every
    // syscall of the host on the traced exit path (~80 ns each here, benches/
    // tracker_rate.rs), more than the dumps it saves.
    if cfg.udp && cfg.mode == TrackerMode::Full {
        wanted.push(Prog::SysExit);
        if cgroup {
            wanted.extend([Prog::Connect4, Prog::Connect6, Prog::SockRelease]);
        }
    } else if cgroup && !KernelFeatures::detect().has(Feature::TracingCookie) {
        // The connect hooks also give TCP sockets the cookie their first state
        // change is reported under (bpf/tracker.bpf.c, flowd_tracing_cookie).
        wanted.extend([Prog::Connect4, Prog::Connect6]);
    }
    wanted
}

/// Loads, without attaching anything, the programs `cfg` asks for (cgroup ones
/// included): each program's name and whether this kernel accepted it.
pub fn check_programs(cfg: &TrackerConfig) -> Result<Vec<(&'static str, bool)>> {
    if cfg.mode == TrackerMode::Disabled {
        return Ok(Vec::new());
    }
    let wanted = wanted_programs(cfg, cfg.mode == TrackerMode::Full);
    let (_skel, loaded) = load_degrading(&wanted, cfg)?;
    Ok(wanted
        .iter()
        .map(|p| (p.name(), loaded.contains(p)))
        .collect())
}

pub use super::tracker_progs::AttachedProgram;
use super::tracker_progs::TrackerSkel;

struct Active {
    // Field order is drop order: stop reading, detach, then free the object.
    ring: RingBuffer<'static>,
    _links: Vec<Link>,
    skel: TrackerSkel<'static>,
    rx: mpsc::Receiver<RawRecord>,
    /// The programs attached, for their kernel statistics.
    progs: Vec<Prog>,
}

/// A running tracker. Dropping it detaches and unloads every program.
pub struct Tracker {
    active: Option<Active>,
    features: Features,
    attached: Vec<AttachedProgram>,
    decode_errors: Arc<AtomicU64>,
}

impl Tracker {
    /// Loads and attaches the tracker as far as this host allows (see module doc).
    pub fn start(cfg: &TrackerConfig) -> Result<Tracker> {
        let decode_errors = Arc::new(AtomicU64::new(0));
        if cfg.mode == TrackerMode::Disabled {
            info!("tracker disabled by configuration");
            return Ok(Tracker {
                active: None,
                features: Features::default(),
                attached: Vec::new(),
                decode_errors,
            });
        }
        let page = page_size();
        if !cfg.ring_bytes.is_power_of_two() || cfg.ring_bytes < page {
            return Err(TrackerError::RingSize(cfg.ring_bytes));
        }
        let mut features = Features::default();
        let cgroup = match cfg.mode {
            TrackerMode::Full => open_cgroup2(cfg.cgroup2_path.as_deref())?,
            _ => None,
        };
        // Attached in this order (see wanted_programs).
        let wanted = wanted_programs(cfg, cgroup.is_some());
        let (mut skel, loaded) = load_degrading(&wanted, cfg)?;
        // The accept report needs the cookie sockops gives an accepted socket.
        let wanted_sockops = loaded.contains(&Prog::Sockops);

        let mut links = Vec::new();
        let mut softirq = 0;
        let mut attached = Vec::new();
        let mut progs = Vec::new();
        for p in loaded {
            let cg = if p.is_cgroup() {
                cgroup.as_ref().map(|(_, f)| f)
            } else {
                None
            };
            match p.attach(&skel, cg) {
                Ok(link) => {
                    links.push(link);
                    progs.push(p);
                    attached.push(AttachedProgram {
                        name: p.name(),
                        id: p.id(&skel).unwrap_or(0),
                        cgroup: p.is_cgroup(),
                    });
                    match p {
                        Prog::TcpState => features.tcp_state = true,
                        Prog::Sockops => features.sockops = true,
                        Prog::SysExit => {
                            features.udp_connect = cfg.udp;
                            features.accept = wanted_sockops;
                        }
                        Prog::Connect4 | Prog::Connect6 => features.udp_cookie = true,
                        Prog::SockRelease => features.udp_release = true,
                        Prog::SoftirqEntry => softirq += 1,
                        Prog::SoftirqExit => softirq += 1,
                    }
                }
                Err(e) => {
                    warn!(program = p.name(), error = %e, "tracker: attach failed, program disabled")
                }
            }
        }
        features.owner_context = softirq == 2;
        if features.owner_context {
            // Only now that both softirq programs run can the flag be trusted.
            if let Some(bss) = skel.maps.bss_data.as_deref_mut() {
                bss.flowd_softirq_tracking = 1;
            }
        }
        if !features.tcp_state && !features.sockops {
            return Err(TrackerError::NoTcpSource);
        }
        if !features.tcp_state {
            // Without the tracepoint, sockops' STATE_CB reports the state changes
            // (closes included) of the sockets it saw open.
            if let Some(bss) = skel.maps.bss_data.as_deref_mut() {
                bss.flowd_state_cb_all = 1;
            }
        }
        if features.sockops || features.udp_release || features.udp_cookie {
            features.cgroup2 = cgroup.map(|(p, _)| p);
        }

        let (tx, rx) = mpsc::channel();
        let errs = Arc::clone(&decode_errors);
        let mut builder = RingBufferBuilder::new();
        builder
            .add(&skel.maps.flowd_events, move |data: &[u8]| {
                match parse_record(data) {
                    Ok(r) => {
                        // The receiver lives as long as the ring buffer (same struct).
                        let _ = tx.send(r);
                    }
                    Err(_) => {
                        errs.fetch_add(1, Ordering::Relaxed);
                    }
                }
                0
            })
            .map_err(TrackerError::Open)?;
        let ring = builder.build().map_err(TrackerError::Open)?;
        log_features(&features, cfg);
        Ok(Tracker {
            active: Some(Active {
                ring,
                _links: links,
                skel,
                rx,
                progs,
            }),
            features,
            attached,
            decode_errors,
        })
    }

    /// The programs attached (kernel ids: `bpftool prog show id N`).
    pub fn attached_programs(&self) -> &[AttachedProgram] {
        &self.attached
    }

    pub fn features(&self) -> &Features {
        &self.features
    }

    /// False when disabled by configuration.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Waits up to `timeout` for records and hands each decoded one to `f`.
    /// Returns how many were delivered. Undecodable records are counted
    /// ([`Tracker::decode_errors`]), not returned as errors.
    pub fn poll_events(
        &mut self,
        timeout: Duration,
        f: &mut impl FnMut(TrackerEvent),
    ) -> Result<usize> {
        let Some(a) = &self.active else {
            return Ok(0);
        };
        match a.ring.poll(timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == libbpf_rs::ErrorKind::Interrupted => {}
            Err(e) => return Err(TrackerError::Poll(e)),
        }
        let mut n = 0;
        while let Ok(raw) = a.rx.try_recv() {
            match decode(&raw) {
                Ok(ev) => {
                    n += 1;
                    f(ev);
                }
                Err(e) => {
                    self.decode_errors.fetch_add(1, Ordering::Relaxed);
                    debug!(error = %e, "tracker: record skipped");
                }
            }
        }
        Ok(n)
    }

    /// Like [`Tracker::poll_events`], but only observations naming a full 5-tuple
    /// (both ports set): drops the tracepoint's CLOSE->SYN_SENT of an unbound
    /// socket and listening sockets, which are not flows.
    pub fn poll(
        &mut self,
        timeout: Duration,
        f: &mut impl FnMut(SocketObservation),
    ) -> Result<usize> {
        let mut n = 0;
        self.poll_events(timeout, &mut |ev| {
            if ev.has_full_tuple() {
                n += 1;
                f(ev.observation);
            }
        })?;
        Ok(n)
    }

    /// Polls until `stop` is set (checked every `tick`); for a dedicated thread.
    pub fn run_until(
        &mut self,
        stop: &AtomicBool,
        tick: Duration,
        f: &mut impl FnMut(SocketObservation),
    ) -> Result<()> {
        while !stop.load(Ordering::Relaxed) {
            if self.active.is_none() {
                std::thread::sleep(tick);
                continue;
            }
            self.poll(tick, f)?;
        }
        Ok(())
    }

    /// The ring buffer's epoll fd (readable when records are waiting), for
    /// `tokio::io::unix::AsyncFd`; then call `poll(Duration::ZERO, ..)`.
    pub fn epoll_fd(&self) -> Option<i32> {
        self.active.as_ref().map(|a| a.ring.epoll_fd())
    }

    /// Records the kernel could not queue because the ring buffer was full,
    /// summed over CPUs since start.
    pub fn drops(&self) -> Result<u64> {
        let Some(a) = &self.active else {
            return Ok(0);
        };
        let vals = a
            .skel
            .maps
            .flowd_drops
            .lookup_percpu(&0u32.to_ne_bytes(), MapFlags::ANY)
            .map_err(TrackerError::Drops)?
            .unwrap_or_default();
        Ok(vals
            .iter()
            .filter_map(|v| v.get(..8).and_then(|b| b.try_into().ok()))
            .map(u64::from_ne_bytes)
            .sum())
    }

    /// Per attached program, the runs the kernel skipped because the program was
    /// already running on that CPU (`bpf_prog_info.recursion_misses`): a softirq
    /// that changes a TCP state while the same CPU is inside flowd_tcp_state loses
    /// that event, with no ring-buffer drop to show for it. `None` when the
    /// kernel does not count them (before Linux 5.12) or the tracker is off.
    pub fn recursion_misses(&self) -> Option<Vec<(&'static str, u64)>> {
        let a = self.active.as_ref()?;
        let mut out = Vec::with_capacity(a.progs.len());
        for p in &a.progs {
            let misses = p.info(&a.skel)?.recursion_misses?;
            out.push((p.name(), misses));
        }
        Some(out)
    }

    /// Makes the sockops STATE_CB report every TCP state change of the sockets it
    /// has seen (kind `TcpStateCb`), as it does when the tracepoint is missing;
    /// otherwise it reports only what the tracepoint program would skip. For tests
    /// of that path, which nesting alone triggers too rarely to check.
    #[doc(hidden)]
    pub fn report_every_state_change(&mut self) {
        if let Some(bss) = self
            .active
            .as_mut()
            .and_then(|a| a.skel.maps.bss_data.as_deref_mut())
        {
            bss.flowd_state_cb_all = 1;
        }
    }

    /// Records received but not understood (size, kind, family, protocol, state).
    pub fn decode_errors(&self) -> u64 {
        self.decode_errors.load(Ordering::Relaxed)
    }
}

fn log_features(f: &Features, cfg: &TrackerConfig) {
    info!(
        tcp_state = f.tcp_state,
        sockops = f.sockops,
        udp_connect = f.udp_connect,
        accept = f.accept,
        udp_cookie = f.udp_cookie,
        udp_release = f.udp_release,
        owner_context = f.owner_context,
        cgroup2 = ?f.cgroup2,
        ring_bytes = cfg.ring_bytes,
        "tracker started"
    );
    if cfg.mode == TrackerMode::Full && !f.sockops {
        warn!("tracker: no cgroup sockops; the first SYN of outgoing connections is not seen in time to be marked");
    }
    if cfg.mode == TrackerMode::Full && cfg.udp && !(f.udp_connect && f.udp_release) {
        warn!(
            udp_connect = f.udp_connect,
            udp_release = f.udp_release,
            "tracker: UDP partly or not tracked; rely on the sock_diag poller for UDP"
        );
    }
}

/// The cgroup2 directory to attach to, opened; `None` (with a warning) if absent.
fn open_cgroup2(configured: Option<&Path>) -> Result<Option<(PathBuf, File)>> {
    let path = match configured {
        Some(p) => p.to_path_buf(),
        None => {
            let found = std::fs::read_to_string("/proc/self/mountinfo")
                .ok()
                .and_then(|mi| find_cgroup2_mount(&mi));
            match found {
                Some(p) => p,
                None => {
                    warn!("tracker: no cgroup2 mount in /proc/self/mountinfo; tracepoint only (no sockops, no UDP release)");
                    return Ok(None);
                }
            }
        }
    };
    let file = File::open(&path).map_err(|source| TrackerError::Cgroup {
        path: path.clone(),
        source,
    })?;
    Ok(Some((path, file)))
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(v).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_can_move_to_a_polling_thread() {
        fn is_send<T: Send>() {}
        is_send::<Tracker>();
    }

    #[test]
    fn default_config_is_full_with_udp_and_a_page_multiple_ring() {
        let c = TrackerConfig::default();
        assert_eq!(c.mode, TrackerMode::Full);
        assert!(c.udp && c.cgroup2_path.is_none());
        assert!(c.ring_bytes.is_power_of_two() && c.ring_bytes >= page_size());
    }

    #[test]
    fn bad_ring_size_is_rejected_before_touching_bpf() {
        for ring_bytes in [0, 1000, 4096 + 4096 * 2] {
            let cfg = TrackerConfig {
                ring_bytes,
                ..TrackerConfig::default()
            };
            assert!(
                matches!(Tracker::start(&cfg), Err(TrackerError::RingSize(r)) if r == ring_bytes)
            );
        }
    }

    #[test]
    fn disabled_tracker_needs_no_privilege_and_yields_nothing() {
        let mut t = Tracker::start(&TrackerConfig {
            mode: TrackerMode::Disabled,
            ..TrackerConfig::default()
        })
        .unwrap();
        assert!(!t.is_active() && t.epoll_fd().is_none());
        assert_eq!(t.poll(Duration::ZERO, &mut |_| {}).unwrap(), 0);
        assert_eq!(t.drops().unwrap(), 0);
    }
}
