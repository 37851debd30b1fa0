//! Putting the marker on interfaces and taking it off again, leaving each interface
//! exactly as it was found.
//!
//! TCX links (kernel >= 6.6) belong to a file descriptor, or to a pin (see
//! `pin`): pinned, they outlive the process, and the next start swaps its program
//! into them (BPF_LINK_UPDATE) without a moment unmarked. The clsact fallback
//! outlives the process anyway; a start replaces the program of our filter in
//! place (fixed handle and priority, BPF_TC_F_REPLACE), never touching the qdisc.
//! Every clsact attachment is recorded in `<state_dir>/attachments.json` before it
//! is made; `flowd-rs clean` uses that record to remove what an instance left, and
//! only removes a clsact qdisc that flowd-rs created.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use anyhow::{bail, Context, Result};
use libbpf_rs::{
    AsRawLibbpf, ErrorKind, Link, Program, TcHook, TcHookBuilder, TC_EGRESS, TC_INGRESS,
};
use rtnetlink::Handle;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::AttachMode;
use crate::marker::netif::{self, Interface};
use crate::marker::pin::{self, Pins};

/// Our clsact filter's handle and priority: fixed, so a restart replaces a leftover
/// filter instead of stacking a second one, and `clean` finds it.
pub const TC_HANDLE: u32 = 0xf10d;
pub const TC_PRIORITY: u32 = 0xf10d;
/// The marker program's name as the kernel reports it (first 15 bytes).
pub const PROG_NAME: &str = "flowd_mark";

#[derive(Debug)]
pub enum Attachment {
    Tcx {
        iface: Interface,
        /// Pinned when pinning is on: then dropping it leaves it attached.
        link: Link,
    },
    Clsact {
        iface: Interface,
        created_qdisc: bool,
    },
}

impl Attachment {
    pub fn iface(&self) -> &Interface {
        match self {
            Attachment::Tcx { iface, .. } | Attachment::Clsact { iface, .. } => iface,
        }
    }
    pub fn mode(&self) -> &'static str {
        match self {
            Attachment::Tcx { .. } => "tcx",
            Attachment::Clsact { .. } => "clsact",
        }
    }
}

/// One clsact attachment as remembered on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClsactRecord {
    pub ifname: String,
    pub ifindex: u32,
    /// Whether flowd-rs created the clsact qdisc (then it may remove it).
    pub created_qdisc: bool,
}

/// `<state_dir>/attachments.json`.
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(state_dir: &Path) -> Self {
        StateFile {
            path: state_dir.join("attachments.json"),
        }
    }

    pub fn load(&self) -> Result<Vec<ClsactRecord>> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| {
                format!("{}: not a flowd-rs attachment record", self.path.display())
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.path.display())),
        }
    }

    /// Writes atomically (temp file + rename) so a crash never leaves half a record.
    pub fn save(&self, records: &[ClsactRecord]) -> Result<()> {
        if records.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("removing {}", self.path.display()))
                }
                _ => Ok(()),
            };
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(records)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    fn update(&self, f: impl FnOnce(&mut Vec<ClsactRecord>)) -> Result<()> {
        let mut r = self.load()?;
        f(&mut r);
        self.save(&r)
    }
}

/// Attaches `prog` to every interface, or to none: on any failure what was already
/// attached is removed again before the error is returned.
pub async fn attach_all(
    prog: &Program<'_>,
    ifaces: &[Interface],
    mode: AttachMode,
    h: &Handle,
    state: &StateFile,
    pins: Option<&Pins>,
) -> Result<Vec<Attachment>> {
    let mut done = Vec::new();
    for iface in ifaces {
        match attach_one(prog, iface, mode, h, state, pins).await {
            Ok(a) => {
                info!(interface = %iface.name, mode = a.mode(), "marker attached");
                done.push(a);
            }
            Err(e) => {
                detach_all(done, h, state).await;
                return Err(e);
            }
        }
    }
    Ok(done)
}

async fn attach_one(
    prog: &Program<'_>,
    iface: &Interface,
    mode: AttachMode,
    h: &Handle,
    state: &StateFile,
    pins: Option<&Pins>,
) -> Result<Attachment> {
    if mode != AttachMode::Clsact {
        if let Some(link) = pins.and_then(|p| pin::adopt_tcx(prog, iface, p)) {
            return Ok(Attachment::Tcx {
                iface: iface.clone(),
                link,
            });
        }
        match attach_tcx(prog, iface.index) {
            Ok(mut link) => {
                if let Some(p) = pins {
                    link.pin(p.tcx_link(iface.index)).with_context(|| {
                        format!(
                            "pinning the TCX link of {} in {}",
                            iface.name,
                            p.dir().display()
                        )
                    })?;
                }
                return Ok(Attachment::Tcx {
                    iface: iface.clone(),
                    link,
                });
            }
            // Kernels before 6.6 do not know the TCX attach type.
            Err(e) if mode == AttachMode::Auto && e.raw_os_error() == Some(libc::EINVAL) => {
                warn!(interface = %iface.name, "TCX not supported by this kernel, using a clsact qdisc");
            }
            // Asked for TCX by name: refuse with the feature and the first kernel
            // that has it, not a bare EINVAL.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                anyhow::bail!(
                    "{}: marker.attach = \"tcx\", but this kernel lacks TCX links (Linux >= 6.6); use attach = \"auto\" (TCX where the kernel has it, else clsact) or \"clsact\"",
                    iface.name
                )
            }
            Err(e) => return Err(os_error(e, "attaching TCX egress program", &iface.name)),
        }
    }
    // A qdisc an earlier instance created stays ours when we take its filter over.
    let inherited = state
        .load()?
        .iter()
        .any(|r| r.ifindex == iface.index && r.created_qdisc);
    let has_clsact = netif::has_clsact(h, iface.index).await?;
    let created_qdisc = !has_clsact || inherited;
    if has_clsact {
        pin::log_replacement(iface, tc_query_egress(iface.index).ok(), prog);
    }
    // Record first: if we die between creating the qdisc and saving, the next start
    // must still know the qdisc is ours.
    let record = ClsactRecord {
        ifname: iface.name.clone(),
        ifindex: iface.index,
        created_qdisc,
    };
    state.update(|r| {
        r.retain(|x| x.ifindex != iface.index);
        r.push(record);
    })?;
    if !has_clsact {
        tc_create_clsact(iface.index)
            .map_err(|e| tc_error(e, "creating clsact qdisc", &iface.name))?;
    }
    if let Err(e) = tc_attach_egress(iface.index, prog.as_fd()) {
        if !has_clsact {
            let _ = tc_destroy_clsact(iface.index);
        }
        state.update(|r| r.retain(|x| x.ifindex != iface.index))?;
        return Err(tc_error(e, "attaching clsact egress filter", &iface.name));
    }
    Ok(Attachment::Clsact {
        iface: iface.clone(),
        created_qdisc,
    })
}

/// Removes every attachment; errors are logged, and the rest still removed.
pub async fn detach_all(atts: Vec<Attachment>, h: &Handle, state: &StateFile) {
    for a in atts {
        let name = a.iface().name.clone();
        match detach(a, h, state).await {
            Ok(()) => info!(interface = %name, "marker detached"),
            Err(e) => {
                warn!(interface = %name, error = %format!("{e:#}"), "detaching marker failed")
            }
        }
    }
}

pub async fn detach(a: Attachment, h: &Handle, state: &StateFile) -> Result<()> {
    match a {
        Attachment::Tcx { mut link, .. } => {
            // Unpinned, the link goes with its last descriptor: this one.
            if link.pin_path().is_some() {
                link.unpin().context("unpinning the TCX link")?;
            }
            drop(link);
            Ok(())
        }
        Attachment::Clsact {
            iface,
            created_qdisc,
        } => {
            remove_clsact_filter(&iface, created_qdisc, h).await?;
            state.update(|r| r.retain(|x| x.ifindex != iface.index))
        }
    }
}

/// Removes our egress filter from `iface` and, when we created the clsact qdisc and
/// nothing else uses it now, the qdisc as well.
async fn remove_clsact_filter(iface: &Interface, created_qdisc: bool, h: &Handle) -> Result<()> {
    match tc_detach_egress(iface.index) {
        Ok(()) => {}
        Err(e) if e.errno == Some(libc::ENOENT) || e.errno == Some(libc::EINVAL) => {}
        Err(e) => return Err(tc_error(e, "removing clsact egress filter", &iface.name)),
    }
    if created_qdisc && netif::has_clsact(h, iface.index).await? {
        if netif::clsact_filter_count(h, iface.index).await? == 0 {
            tc_destroy_clsact(iface.index)
                .map_err(|e| tc_error(e, "removing clsact qdisc", &iface.name))?;
        } else {
            warn!(interface = %iface.name, "leaving the clsact qdisc flowd-rs created: other filters use it now");
        }
    }
    Ok(())
}

/// What `clean` did.
#[derive(Debug, Default)]
pub struct CleanReport {
    pub filters_removed: Vec<String>,
    pub qdiscs_removed: Vec<String>,
}

/// Removes what a crashed instance left: our clsact egress filter on any interface
/// (recognised by handle, priority and program name) and the clsact qdiscs the
/// record says we created. TCX links need nothing: they died with their process.
pub async fn clean(h: &Handle, state: &StateFile) -> Result<CleanReport> {
    clean_except(h, state, &[]).await
}

/// [`clean`], but leaving the clsact attachments in `keep` (those of the running
/// instance): after a start, removes what the previous one had where this one is
/// not attached through clsact.
pub async fn clean_except(
    h: &Handle,
    state: &StateFile,
    keep: &[Attachment],
) -> Result<CleanReport> {
    let records = state.load()?;
    let mut report = CleanReport::default();
    let kept = |index: u32| {
        keep.iter()
            .any(|a| a.mode() == "clsact" && a.iface().index == index)
    };
    for (index, name) in netif::links(h).await? {
        if kept(index) || !netif::has_clsact(h, index).await? {
            continue;
        }
        let iface = Interface { name, index };
        let ours = match tc_query_egress(index) {
            Ok(id) => prog_name(id).is_some_and(|n| n == PROG_NAME),
            Err(_) => false,
        };
        let created = records
            .iter()
            .any(|r| r.ifindex == index && r.created_qdisc);
        if ours {
            report.filters_removed.push(iface.name.clone());
        }
        if ours || created {
            remove_clsact_filter(&iface, created, h).await?;
            if created && !netif::has_clsact(h, index).await? {
                report.qdiscs_removed.push(iface.name.clone());
            }
        }
    }
    state.save(
        &records
            .into_iter()
            .filter(|r| kept(r.ifindex))
            .collect::<Vec<_>>(),
    )?;
    Ok(report)
}

fn prog_name(id: u32) -> Option<String> {
    libbpf_rs::query::ProgInfoIter::default()
        .find(|p| p.id == id)
        .map(|p| p.name.to_string_lossy().into_owned())
}

fn os_error(e: io::Error, what: &str, ifname: &str) -> anyhow::Error {
    let h = hint(e.raw_os_error());
    anyhow::anyhow!("{what} on interface {ifname}: {e}{h}")
}

fn tc_error(e: TcError, what: &str, ifname: &str) -> anyhow::Error {
    let h = hint(e.errno);
    anyhow::anyhow!("{what} on interface {ifname}: {}{h}", e.error)
}

fn hint(errno: Option<i32>) -> &'static str {
    match errno {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            ": run as root (CAP_BPF and CAP_NET_ADMIN needed)"
        }
        Some(libc::ENODEV) => ": the interface is gone",
        _ => "",
    }
}

fn attach_tcx(prog: &Program<'_>, ifindex: u32) -> io::Result<Link> {
    let opts = libbpf_sys::bpf_tcx_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_tcx_opts>() as _,
        ..Default::default()
    };
    // SAFETY: the program is loaded and outlives this call; libbpf copies opts.
    let ptr = unsafe {
        libbpf_sys::bpf_program__attach_tcx(prog.as_libbpf_object().as_ptr(), ifindex as i32, &opts)
    };
    match NonNull::new(ptr) {
        // SAFETY: a non-null link returned by libbpf is owned by us from here on.
        Some(p) => Ok(unsafe { Link::from_ptr(p) }),
        None => Err(io::Error::last_os_error()),
    }
}

/// Our egress hook on `ifindex`, through libbpf-rs's `TcHook` (its handle and
/// priority fixed, see `TC_HANDLE`). `prog` is what `attach` installs; detach, query
/// and destroy ignore the program, but the type wants a descriptor, so they get
/// stdin's number, which they zero before the call.
fn tc_hook(ifindex: u32, prog: Option<BorrowedFd<'_>>) -> TcHook {
    // SAFETY: the descriptor is only stored as a number, never used (see above).
    let fd = prog.unwrap_or_else(|| unsafe { BorrowedFd::borrow_raw(libc::STDIN_FILENO) });
    // Replace: a filter left at our handle and priority is swapped in place.
    TcHookBuilder::new(fd)
        .ifindex(ifindex as i32)
        .replace(true)
        .handle(TC_HANDLE)
        .priority(TC_PRIORITY)
        .hook(TC_EGRESS)
}

/// What the kernel refused, in the terms callers decide on: libbpf-rs reports
/// errors by kind, not errno, so the few errnos that change behaviour or the
/// message's hint are read back from the kind. ENODEV has no kind of its own:
/// it is recognised by the interface being gone.
#[derive(Debug)]
struct TcError {
    errno: Option<i32>,
    error: libbpf_rs::Error,
}

impl TcError {
    fn new(error: libbpf_rs::Error, ifindex: u32) -> Self {
        let errno = match error.kind() {
            ErrorKind::NotFound => Some(libc::ENOENT),
            ErrorKind::InvalidInput => Some(libc::EINVAL),
            ErrorKind::PermissionDenied => Some(libc::EPERM),
            ErrorKind::AlreadyExists => Some(libc::EEXIST),
            _ if !netif::index_exists(ifindex) => Some(libc::ENODEV),
            _ => None,
        };
        TcError { errno, error }
    }
}

fn tc_create_clsact(ifindex: u32) -> Result<(), TcError> {
    // `create` itself takes an existing clsact qdisc as success.
    tc_hook(ifindex, None)
        .create()
        .map(drop)
        .map_err(|e| TcError::new(e, ifindex))
}

fn tc_destroy_clsact(ifindex: u32) -> Result<(), TcError> {
    // Ingress|egress is what makes libbpf delete the qdisc itself.
    tc_hook(ifindex, None)
        .attach_point(TC_EGRESS | TC_INGRESS)
        .destroy()
        .map_err(|e| TcError::new(e, ifindex))
}

fn tc_attach_egress(ifindex: u32, prog: BorrowedFd<'_>) -> Result<(), TcError> {
    tc_hook(ifindex, Some(prog))
        .attach()
        .map(drop)
        .map_err(|e| TcError::new(e, ifindex))
}

fn tc_detach_egress(ifindex: u32) -> Result<(), TcError> {
    tc_hook(ifindex, None)
        .detach()
        .map_err(|e| TcError::new(e, ifindex))
}

fn tc_query_egress(ifindex: u32) -> Result<u32, TcError> {
    tc_hook(ifindex, None)
        .query()
        .map_err(|e| TcError::new(e, ifindex))
}

/// Fails early, with the cause named, when the kernel cannot run flowd-rs at all.
pub fn check_kernel() -> Result<()> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!("this kernel has no BTF (/sys/kernel/btf/vmlinux is missing): flowd-rs needs a kernel built with CONFIG_DEBUG_INFO_BTF=y");
    }
    Ok(())
}

/// Names of the programs attached to `ifindex` through TCX egress (in the caller's
/// network namespace), in run order. Empty on kernels without TCX.
pub fn tcx_egress_programs(ifindex: u32) -> io::Result<Vec<String>> {
    let mut ids = [0u32; 64];
    let mut opts = libbpf_sys::bpf_prog_query_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_prog_query_opts>() as _,
        prog_ids: ids.as_mut_ptr(),
        ..Default::default()
    };
    opts.__bindgen_anon_1.count = ids.len() as u32;
    // SAFETY: prog_ids points at `count` writable u32s for the duration of the call.
    let rc = unsafe {
        libbpf_sys::bpf_prog_query_opts(ifindex as i32, libbpf_sys::BPF_TCX_EGRESS, &mut opts)
    };
    if rc != 0 {
        let e = io::Error::from_raw_os_error(-rc);
        return match e.raw_os_error() {
            Some(libc::EINVAL) => Ok(Vec::new()),
            _ => Err(e),
        };
    }
    // SAFETY: the kernel wrote `count`.
    let n = unsafe { opts.__bindgen_anon_1.count } as usize;
    Ok(ids[..n.min(ids.len())]
        .iter()
        .map(|id| prog_name(*id).unwrap_or_else(|| format!("prog#{id}")))
        .collect())
}
