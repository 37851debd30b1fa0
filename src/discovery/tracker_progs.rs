//! The tracker's BPF programs: which exist, how each is loaded and attached, and
//! the degrading load (keep what this kernel accepts). Only this module touches the
//! generated skeleton.
//!
//! Lifetimes: the libbpf-rs 0.27 skeleton borrows a `MaybeUninit<OpenObject>` for
//! its whole life. [`super::tracker::Tracker`] must be a plain owned value (moved
//! into a thread), so each load leaks one such slot (`Box::leak`, 8 bytes: a
//! pointer; the libbpf object it points to is still freed when the skeleton drops).
//! A self-referential wrapper would avoid those bytes at the price of unsafe
//! lifetime transmutes.

use crate::discovery::tracker::TrackerConfig;
use std::{
    fs::File,
    mem::MaybeUninit,
    os::fd::{AsFd, AsRawFd},
};

use libbpf_rs::{
    skel::{OpenSkel, SkelBuilder},
    Link, OpenObject,
};
use tracing::warn;

use super::tracker::{Result, TrackerError};

/// The generated skeleton (build.rs, included in crate::bpf); only this module touches it.
pub(crate) use crate::bpf::tracker as skel;
pub(crate) use skel::TrackerSkel;
use skel::{OpenTrackerProgs, TrackerSkelBuilder};

/// One attached program, for logs and inspection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedProgram {
    /// Function and section name, e.g. "flowd_sockops (sockops)".
    pub name: &'static str,
    /// Kernel program id (0 if it could not be read).
    pub id: u32,
    /// Attached to the cgroup2 root (else a tracepoint).
    pub cgroup: bool,
}

/// The programs of tracker.bpf.c.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prog {
    TcpState,
    Sockops,
    Connect4,
    Connect6,
    SysExit,
    SockRelease,
    SoftirqEntry,
    SoftirqExit,
}

impl Prog {
    const ALL: [Prog; 8] = [
        Prog::TcpState,
        Prog::SoftirqEntry,
        Prog::SoftirqExit,
        Prog::Sockops,
        Prog::Connect4,
        Prog::Connect6,
        Prog::SysExit,
        Prog::SockRelease,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Prog::TcpState => "flowd_tcp_state (tp_btf/inet_sock_set_state)",
            Prog::Sockops => "flowd_sockops (sockops)",
            Prog::Connect4 => "flowd_connect4 (cgroup/connect4)",
            Prog::Connect6 => "flowd_connect6 (cgroup/connect6)",
            Prog::SysExit => "flowd_sys_exit (tp_btf/sys_exit)",
            Prog::SockRelease => "flowd_sock_release (cgroup/sock_release)",
            Prog::SoftirqEntry => "flowd_softirq_entry (tp_btf/softirq_entry)",
            Prog::SoftirqExit => "flowd_softirq_exit (tp_btf/softirq_exit)",
        }
    }

    pub(crate) fn is_cgroup(self) -> bool {
        matches!(
            self,
            Prog::Sockops | Prog::Connect4 | Prog::Connect6 | Prog::SockRelease
        )
    }

    fn set_autoload(self, progs: &mut OpenTrackerProgs<'_>, on: bool) {
        match self {
            Prog::TcpState => progs.flowd_tcp_state.set_autoload(on),
            Prog::Sockops => progs.flowd_sockops.set_autoload(on),
            Prog::Connect4 => progs.flowd_connect4.set_autoload(on),
            Prog::Connect6 => progs.flowd_connect6.set_autoload(on),
            Prog::SysExit => progs.flowd_sys_exit.set_autoload(on),
            Prog::SockRelease => progs.flowd_sock_release.set_autoload(on),
            Prog::SoftirqEntry => progs.flowd_softirq_entry.set_autoload(on),
            Prog::SoftirqExit => progs.flowd_softirq_exit.set_autoload(on),
        }
    }

    pub(crate) fn attach(
        self,
        skel: &TrackerSkel<'_>,
        cgroup: Option<&File>,
    ) -> libbpf_rs::Result<Link> {
        let p = &skel.progs;
        let prog = match self {
            Prog::TcpState => &p.flowd_tcp_state,
            Prog::Sockops => &p.flowd_sockops,
            Prog::Connect4 => &p.flowd_connect4,
            Prog::Connect6 => &p.flowd_connect6,
            Prog::SysExit => &p.flowd_sys_exit,
            Prog::SockRelease => &p.flowd_sock_release,
            Prog::SoftirqEntry => &p.flowd_softirq_entry,
            Prog::SoftirqExit => &p.flowd_softirq_exit,
        };
        match cgroup {
            Some(cg) => prog.attach_cgroup(cg.as_raw_fd()),
            None => prog.attach(),
        }
    }
}

/// What the kernel says about one loaded program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ProgInfo {
    pub id: u32,
    /// Runs the kernel skipped because the program was already running on that CPU
    /// (a softirq nesting into the same tracepoint program): events lost without a
    /// ring-buffer drop. `None` where the kernel does not report it (before 5.12).
    pub recursion_misses: Option<u64>,
}

impl Prog {
    pub(crate) fn info(self, skel: &TrackerSkel<'_>) -> Option<ProgInfo> {
        let p = &skel.progs;
        let fd = match self {
            Prog::TcpState => p.flowd_tcp_state.as_fd(),
            Prog::Sockops => p.flowd_sockops.as_fd(),
            Prog::Connect4 => p.flowd_connect4.as_fd(),
            Prog::Connect6 => p.flowd_connect6.as_fd(),
            Prog::SysExit => p.flowd_sys_exit.as_fd(),
            Prog::SockRelease => p.flowd_sock_release.as_fd(),
            Prog::SoftirqEntry => p.flowd_softirq_entry.as_fd(),
            Prog::SoftirqExit => p.flowd_softirq_exit.as_fd(),
        };
        let mut info = libbpf_sys::bpf_prog_info::default();
        let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
        // SAFETY: valid program fd; `info` is writable for `len` bytes.
        let r = unsafe { libbpf_sys::bpf_prog_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
        if r != 0 {
            return None;
        }
        // The kernel writes only the part of the struct it knows and says how much:
        // a kernel without the field leaves it out of `len`.
        let end = std::mem::offset_of!(libbpf_sys::bpf_prog_info, recursion_misses) + 8;
        Some(ProgInfo {
            id: info.id,
            recursion_misses: (len as usize >= end).then_some(info.recursion_misses),
        })
    }

    pub(crate) fn id(self, skel: &TrackerSkel<'_>) -> Option<u32> {
        self.info(skel).map(|i| i.id)
    }
}

fn names(progs: &[Prog]) -> String {
    progs
        .iter()
        .map(|p| p.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Opens the skeleton with only `progs` autoloaded and loads it.
fn load(progs: &[Prog], cfg: &TrackerConfig) -> Result<TrackerSkel<'static>> {
    // See the module doc: one leaked pointer-sized slot per load.
    let slot: &'static mut MaybeUninit<OpenObject> = Box::leak(Box::new(MaybeUninit::uninit()));
    let mut open = TrackerSkelBuilder::default()
        .open(slot)
        .map_err(TrackerError::Open)?;
    for p in Prog::ALL {
        p.set_autoload(&mut open.progs, progs.contains(&p));
    }
    open.maps
        .flowd_events
        .set_max_entries(cfg.ring_bytes)
        .map_err(TrackerError::Open)?;
    if let Some(ro) = open.maps.rodata_data.as_deref_mut() {
        use crate::features::{Feature, KernelFeatures};
        let k = KernelFeatures::detect();
        ro.flowd_release_owner = u32::from(k.has(Feature::ReleaseOwner));
        ro.flowd_tracing_cookie = u32::from(k.has(Feature::TracingCookie));
        ro.flowd_only_netns = cfg.only_netns.unwrap_or(0);
        ro.flowd_report_udp_connect = u32::from(cfg.udp);
        ro.flowd_report_accept = u32::from(progs.contains(&Prog::Sockops));
    }
    crate::bpf::clear_refusals();
    open.load().map_err(|source| TrackerError::Load {
        programs: names(progs),
        refusal: crate::bpf::refusal()
            .map(|r| format!(": {r}"))
            .unwrap_or_default(),
        source,
    })
}

/// Loads `wanted`; if the kernel refuses the set, keeps those that load alone.
pub(crate) fn load_degrading(
    wanted: &[Prog],
    cfg: &TrackerConfig,
) -> Result<(TrackerSkel<'static>, Vec<Prog>)> {
    let err = match load(wanted, cfg) {
        Ok(skel) => return Ok((skel, wanted.to_vec())),
        Err(e) => e,
    };
    warn!(error = %err, "tracker: loading all programs failed, probing them one by one");
    let mut ok = Vec::new();
    for &p in wanted {
        match load(&[p], cfg) {
            Ok(_) => ok.push(p),
            Err(e) => {
                warn!(program = p.name(), error = %e, "tracker: program refused by this kernel, disabled")
            }
        }
    }
    if ok.is_empty() {
        return Err(err);
    }
    Ok((load(&ok, cfg)?, ok))
}
