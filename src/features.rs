//! What the running kernel offers flowd-rs's BPF programs, probed once at start.
//!
//! Each feature is asked of the kernel itself (libbpf's probes: load a two-instruction
//! program of a type, or one calling a helper; create a map), never guessed from the
//! version number: distributions backport. The first kernel having each feature is
//! only quoted in messages. A missing feature either has a fallback, taken by the
//! marker or the tracker and listed by `flowd-rs status` and `flowd-rs check`, or is
//! required, and the daemon refuses to start with one line naming it.

use std::sync::OnceLock;

use serde::Serialize;

/// One kernel feature flowd-rs uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    /// Kernel BTF (/sys/kernel/btf/vmlinux): CO-RE and tp_btf need it.
    Btf,
    /// BPF ring buffer: the tracker's event channel.
    RingBuffer,
    /// tp_btf programs (BPF_PROG_TYPE_TRACING): the tracker's TCP state hook.
    TpBtf,
    /// bpf_get_socket_cookie in tp_btf programs.
    TracingCookie,
    /// TCX egress links.
    Tcx,
    /// The bpf_check_mtu helper in TC programs.
    CheckMtu,
    /// Socket local storage from TC programs (bpf_sk_storage_get).
    SkStorageTc,
    /// Iterator programs over a socket-storage map.
    SkStorageIter,
    /// BPF_F_MMAPABLE arrays.
    MmapableArray,
    /// cgroup sockops programs reaching the tcp_sock (bpf_skc_to_tcp_sock).
    Sockops,
    /// cgroup connect4/connect6 hooks.
    ConnectHooks,
    /// cgroup sock_release hooks.
    SockRelease,
    /// The task helpers in cgroup sock_release programs.
    ReleaseOwner,
}

impl Feature {
    pub const ALL: [Feature; 13] = [
        Feature::Btf,
        Feature::RingBuffer,
        Feature::TpBtf,
        Feature::TracingCookie,
        Feature::Tcx,
        Feature::CheckMtu,
        Feature::SkStorageTc,
        Feature::SkStorageIter,
        Feature::MmapableArray,
        Feature::Sockops,
        Feature::ConnectHooks,
        Feature::SockRelease,
        Feature::ReleaseOwner,
    ];

    /// Short name, as in `status` and `check`.
    pub fn name(self) -> &'static str {
        match self {
            Feature::Btf => "kernel BTF",
            Feature::RingBuffer => "BPF ring buffer",
            Feature::TpBtf => "tp_btf programs",
            Feature::TracingCookie => "bpf_get_socket_cookie in tp_btf",
            Feature::Tcx => "TCX links",
            Feature::CheckMtu => "bpf_check_mtu",
            Feature::SkStorageTc => "socket storage in TC",
            Feature::SkStorageIter => "bpf_sk_storage_map iterator",
            Feature::MmapableArray => "mmapable arrays",
            Feature::Sockops => "cgroup sockops with bpf_skc_to_tcp_sock",
            Feature::ConnectHooks => "cgroup connect4/connect6",
            Feature::SockRelease => "cgroup sock_release",
            Feature::ReleaseOwner => "task helpers in sock_release",
        }
    }

    /// The first mainline kernel that has it.
    pub fn since(self) -> &'static str {
        match self {
            Feature::Btf => "5.4 (CONFIG_DEBUG_INFO_BTF=y)",
            Feature::RingBuffer => "5.8",
            Feature::TpBtf => "5.5",
            Feature::TracingCookie => "5.12",
            Feature::Tcx => "6.6",
            Feature::CheckMtu => "5.12",
            Feature::SkStorageTc => "5.2",
            Feature::SkStorageIter => "5.9",
            Feature::MmapableArray => "5.5",
            Feature::Sockops => "5.10",
            Feature::ConnectHooks => "4.17",
            Feature::SockRelease => "5.9",
            Feature::ReleaseOwner => "5.11 (bpf_get_current_task_btf)",
        }
    }

    /// What flowd-rs does without it; `None`: it cannot run without it.
    pub fn fallback(self) -> Option<&'static str> {
        Some(match self {
            Feature::Btf => return None,
            Feature::SkStorageTc => "in-kernel decisions and socket cache off: first packets leave unmarked until userspace decides",
            Feature::RingBuffer => "no tracker: sockets found by sock_diag polling, within one reconcile interval",
            Feature::TpBtf => "tracker without TCP state events: closes found by sock_diag polling",
            Feature::TracingCookie => "the tracker reads the cookie from the socket: a TCP state change of a socket never given one (by the cgroup connect hooks, sockops or sock_diag) is not reported; full dumps come from sock_diag, not the socket iterator",
            Feature::Tcx => "marker attached through a clsact qdisc",
            Feature::CheckMtu => "option headers checked against the smallest interface MTU read at start",
            Feature::SkStorageIter => "socket cache off: every packet looks its flow up in flowd_marks",
            Feature::MmapableArray => "socket cache and flow index off: every packet looks its flow up in the flowd_marks hash map",
            Feature::Sockops => "TCP decided from the SYN / SYN-ACK in TC; the tracker learns outbound connects at their state change",
            Feature::ConnectHooks => "UDP sockets never asked for a cookie before connect() may be reported without one",
            Feature::SockRelease => "closes of connected UDP sockets found by sock_diag polling",
            Feature::ReleaseOwner => "the release of a UDP socket names the task that connected it",
        })
    }
}

/// The answer for each [`Feature`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelFeatures {
    have: Vec<(Feature, bool)>,
    /// The probes could not run (no CAP_BPF): every answer is "no".
    pub unprivileged: bool,
}

/// One line of the table `status` and `check` print.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FeatureLine {
    pub feature: &'static str,
    pub since: &'static str,
    pub available: bool,
    /// What is done instead, when not available.
    pub fallback: Option<&'static str>,
}

impl KernelFeatures {
    /// Probes the running kernel once per process; later calls return the same.
    pub fn detect() -> &'static KernelFeatures {
        static ONCE: OnceLock<KernelFeatures> = OnceLock::new();
        ONCE.get_or_init(|| {
            // Parsed once: the kernel's BTF is megabytes.
            let btf = VmlinuxBtf::load();
            KernelFeatures {
                have: Feature::ALL
                    .iter()
                    .map(|&f| (f, probe(f, btf.as_ref())))
                    .collect(),
                unprivileged: !nix::unistd::geteuid().is_root(),
            }
        })
    }

    /// Every feature present (tests, and hosts where nothing was probed).
    pub fn all() -> KernelFeatures {
        KernelFeatures {
            have: Feature::ALL.iter().map(|&f| (f, true)).collect(),
            unprivileged: false,
        }
    }

    pub fn has(&self, f: Feature) -> bool {
        self.have.iter().any(|&(g, ok)| g == f && ok)
    }

    /// The table, in [`Feature::ALL`] order.
    pub fn lines(&self) -> Vec<FeatureLine> {
        self.have
            .iter()
            .map(|&(f, ok)| FeatureLine {
                feature: f.name(),
                since: f.since(),
                available: ok,
                fallback: if ok { None } else { f.fallback() },
            })
            .collect()
    }

    /// The first required feature missing, as the one line the daemon refuses with.
    pub fn missing_required(&self) -> Option<String> {
        Feature::ALL
            .iter()
            .find(|&&f| f.fallback().is_none() && !self.has(f))
            .map(|f| {
                format!(
                    "this kernel lacks {}, which flowd-rs needs (Linux >= {})",
                    f.name(),
                    f.since()
                )
            })
    }

    /// The table as text: one feature a line, what replaces it when missing.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for l in self.lines() {
            let state = if l.available { "yes" } else { "NO " };
            out.push_str(&format!("{state}  {:<40} Linux >= {}", l.feature, l.since));
            match (l.available, l.fallback) {
                (true, _) => {}
                (false, Some(f)) => out.push_str(&format!("\n       fallback: {f}")),
                (false, None) => out.push_str("\n       required: flowd-rs cannot run"),
            }
            out.push('\n');
        }
        out
    }
}

fn probe(f: Feature, btf: Option<&VmlinuxBtf>) -> bool {
    let type_id = |name: &str, kind: u32| btf.and_then(|b| b.type_id(name, kind));
    use libbpf_sys as s;
    let helper = |prog: u32, func: u32| {
        // SAFETY: plain probe calls; no pointers besides the (null) options.
        unsafe { s::libbpf_probe_bpf_helper(prog, func, std::ptr::null()) == 1 }
    };
    let prog_type = |prog: u32| unsafe {
        // SAFETY: as above.
        s::libbpf_probe_bpf_prog_type(prog, std::ptr::null()) == 1
    };
    match f {
        Feature::Btf => std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
        Feature::RingBuffer => unsafe {
            // SAFETY: as above.
            s::libbpf_probe_bpf_map_type(s::BPF_MAP_TYPE_RINGBUF, std::ptr::null()) == 1
        },
        // Not libbpf_probe_bpf_prog_type(TRACING): it probes with fentry, which a
        // host may forbid while allowing tp_btf.
        Feature::TpBtf => type_id("btf_trace_softirq_exit", s::BTF_KIND_TYPEDEF)
            .is_some_and(|id| trivial_load(s::BPF_PROG_TYPE_TRACING, s::BPF_TRACE_RAW_TP, id)),
        Feature::Tcx => tcx_known(),
        Feature::CheckMtu => helper(s::BPF_PROG_TYPE_SCHED_CLS, s::BPF_FUNC_check_mtu),
        Feature::SkStorageTc => helper(s::BPF_PROG_TYPE_SCHED_CLS, s::BPF_FUNC_sk_storage_get),
        Feature::TracingCookie => type_id("btf_trace_softirq_exit", s::BTF_KIND_TYPEDEF)
            .is_some_and(|id| helper_in_tracing(id, s::BPF_FUNC_get_socket_cookie)),
        Feature::SkStorageIter => {
            type_id("bpf_iter__bpf_sk_storage_map", s::BTF_KIND_STRUCT).is_some()
        }
        Feature::MmapableArray => mmapable_array(),
        Feature::Sockops => {
            prog_type(s::BPF_PROG_TYPE_SOCK_OPS)
                && helper(s::BPF_PROG_TYPE_SOCK_OPS, s::BPF_FUNC_skc_to_tcp_sock)
        }
        Feature::ConnectHooks => prog_type(s::BPF_PROG_TYPE_CGROUP_SOCK_ADDR),
        Feature::SockRelease => trivial_load(
            s::BPF_PROG_TYPE_CGROUP_SOCK,
            s::BPF_CGROUP_INET_SOCK_RELEASE,
            0,
        ),
        Feature::ReleaseOwner => [
            s::BPF_FUNC_get_current_task_btf,
            s::BPF_FUNC_get_current_pid_tgid,
            s::BPF_FUNC_get_current_comm,
            s::BPF_FUNC_get_current_cgroup_id,
        ]
        .iter()
        .all(|&h| helper(s::BPF_PROG_TYPE_CGROUP_SOCK, h)),
    }
}

/// Whether the kernel knows the TCX attach type: querying it on loopback (present in
/// every namespace) answers EINVAL before 6.6.
fn tcx_known() -> bool {
    let mut opts = libbpf_sys::bpf_prog_query_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_prog_query_opts>() as _,
        ..Default::default()
    };
    // SAFETY: no id buffer is passed; the kernel writes only counts into opts.
    let rc = unsafe { libbpf_sys::bpf_prog_query_opts(1, libbpf_sys::BPF_TCX_EGRESS, &mut opts) };
    rc == 0
}

/// The kernel's BTF (/sys/kernel/btf/vmlinux), parsed by libbpf.
struct VmlinuxBtf(std::ptr::NonNull<libbpf_sys::btf>);

impl VmlinuxBtf {
    fn load() -> Option<VmlinuxBtf> {
        // SAFETY: libbpf returns an owned object or an error pointer (checked).
        let btf = unsafe { libbpf_sys::btf__load_vmlinux_btf() };
        if btf.is_null() || unsafe { libbpf_sys::libbpf_get_error(btf as *const _) } != 0 {
            return None;
        }
        std::ptr::NonNull::new(btf).map(VmlinuxBtf)
    }

    /// The id of type `name` of `kind`.
    fn type_id(&self, name: &str, kind: u32) -> Option<u32> {
        let cname = std::ffi::CString::new(name).ok()?;
        // SAFETY: a live BTF object and a NUL-terminated name.
        let id =
            unsafe { libbpf_sys::btf__find_by_name_kind(self.0.as_ptr(), cname.as_ptr(), kind) };
        u32::try_from(id).ok().filter(|&id| id > 0)
    }
}

impl Drop for VmlinuxBtf {
    fn drop(&mut self) {
        // SAFETY: owned since load(), freed once.
        unsafe { libbpf_sys::btf__free(self.0.as_ptr()) }
    }
}

fn mmapable_array() -> bool {
    let opts = libbpf_sys::bpf_map_create_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
        map_flags: libbpf_sys::BPF_F_MMAPABLE,
        ..Default::default()
    };
    // SAFETY: a fresh map fd is closed right away.
    unsafe {
        let fd = libbpf_sys::bpf_map_create(
            libbpf_sys::BPF_MAP_TYPE_ARRAY,
            std::ptr::null(),
            4,
            4,
            1,
            &opts,
        );
        if fd < 0 {
            return false;
        }
        libc::close(fd);
    }
    true
}

/// Whether a tp_btf program (attached to BTF type `btf_id`) may call `helper`:
/// libbpf's helper probe does not cover tracing programs, so this is the same
/// test by hand: the verifier names an unknown helper before it checks arguments.
fn helper_in_tracing(btf_id: u32, helper: u32) -> bool {
    let insns = [
        // BPF_MOV64_IMM(BPF_REG_1, 0)
        insn(0xb7, 1, 0),
        // BPF_EMIT_CALL(helper)
        insn(0x85, 0, helper as i32),
        // BPF_EXIT_INSN()
        insn(0x95, 0, 0),
    ];
    let mut log = vec![0u8; 4096];
    let mut opts = libbpf_sys::bpf_prog_load_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_prog_load_opts>() as _,
        expected_attach_type: libbpf_sys::BPF_TRACE_RAW_TP,
        attach_btf_id: btf_id,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr().cast(),
        ..Default::default()
    };
    // SAFETY: insns, the license and the log buffer outlive the call; an fd (not
    // expected: r1 is no socket) is closed right away.
    let fd = unsafe {
        libbpf_sys::bpf_prog_load(
            libbpf_sys::BPF_PROG_TYPE_TRACING,
            std::ptr::null(),
            c"GPL".as_ptr(),
            insns.as_ptr(),
            insns.len() as _,
            &mut opts,
        )
    };
    if fd >= 0 {
        // SAFETY: our fd.
        unsafe { libc::close(fd) };
        return true;
    }
    let log = String::from_utf8_lossy(&log);
    let log = log.trim_end_matches('\0');
    // An empty log: the load failed before verification (no privileges, no BTF).
    !log.is_empty()
        && ![
            "invalid func ",
            "unknown func ",
            "program of this type cannot use helper ",
        ]
        .iter()
        .any(|m| log.contains(m))
}

fn insn(code: u8, dst: u8, imm: i32) -> libbpf_sys::bpf_insn {
    libbpf_sys::bpf_insn {
        code,
        _bitfield_align_1: [],
        _bitfield_1: libbpf_sys::bpf_insn::new_bitfield_1(dst, 0),
        off: 0,
        imm,
    }
}

/// Loads `r0 = 1; exit` as `prog_type` for `attach_type` (and BTF type `btf_id`, for
/// tracing programs): whether the kernel knows the attach point.
fn trivial_load(prog_type: u32, attach_type: u32, btf_id: u32) -> bool {
    // BPF_MOV64_IMM(BPF_REG_0, 1); BPF_EXIT_INSN()
    let insns = [insn(0xb7, 0, 1), insn(0x95, 0, 0)];
    let mut opts = libbpf_sys::bpf_prog_load_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_prog_load_opts>() as _,
        expected_attach_type: attach_type,
        attach_btf_id: btf_id,
        ..Default::default()
    };
    // SAFETY: insns and the license outlive the call; the fd is closed right away.
    unsafe {
        let fd = libbpf_sys::bpf_prog_load(
            prog_type,
            std::ptr::null(),
            c"GPL".as_ptr(),
            insns.as_ptr(),
            insns.len() as _,
            &mut opts,
        );
        if fd < 0 {
            return false;
        }
        libc::close(fd);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_btf_is_required() {
        let required: Vec<Feature> = Feature::ALL
            .into_iter()
            .filter(|f| f.fallback().is_none())
            .collect();
        assert_eq!(required, [Feature::Btf]);
        let mut k = KernelFeatures::all();
        k.have[6].1 = false;
        assert_eq!(k.missing_required(), None);
        k.have[0].1 = false;
        assert_eq!(
            k.missing_required().as_deref(),
            Some("this kernel lacks kernel BTF, which flowd-rs needs (Linux >= 5.4 (CONFIG_DEBUG_INFO_BTF=y))")
        );
    }

    #[test]
    fn the_table_names_the_fallback_of_what_is_missing() {
        let mut k = KernelFeatures::all();
        k.have[4].1 = false;
        let lines = k.lines();
        assert_eq!(lines[4].feature, "TCX links");
        assert!(!lines[4].available);
        assert_eq!(
            lines[4].fallback,
            Some("marker attached through a clsact qdisc")
        );
        assert!(lines
            .iter()
            .enumerate()
            .all(|(i, l)| i == 4 || (l.available && l.fallback.is_none())));
        let text = k.render();
        assert!(text.contains("NO   TCX links"), "{text}");
        assert!(text.contains("fallback: marker attached through a clsact qdisc"));
    }
}
