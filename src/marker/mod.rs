//! The marker: the TC egress program that writes SciTags marks into packets, the
//! maps that tell it which flows to mark, and its attachment to interfaces.
//!
//! Only this module touches the marker's BPF objects; the rest of the daemon hands it
//! flows and tags.

pub mod attach;
pub mod compiled;
pub mod flow_index;
pub mod maps;
pub mod mmap;
pub mod netif;
pub mod pin;
pub mod sk_cache;

use std::mem::MaybeUninit;
use std::sync::Arc;

use anyhow::{Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapHandle, OpenObject};
use tracing::info;

use crate::bpf::marker::{MarkerSkel, MarkerSkelBuilder};
use crate::config::{Config, Strategy};
use crate::features::{Feature, KernelFeatures};
use attach::{Attachment, StateFile};
use maps::MarkMaps;
use netif::Interface;
use pin::Pins;

/// How to load the marker program.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub strategy: Strategy,
    pub map_capacity: u32,
    /// Also load `flowd_empty`, the do-nothing program benchmarks use as a floor.
    pub with_empty_program: bool,
    /// Decide the policy in the kernel for first packets (config
    /// `marker.in_kernel_decisions`): the TC miss path and the sockops program.
    pub in_kernel: bool,
    /// Inode of the network namespace whose connects the sockops program decides.
    pub netns_ino: u32,
    /// Also load `flowd_kdecide_test` (the agreement tests run it).
    pub with_test_program: bool,
    /// Config `marker.socket_cache`: cache each socket's lookup in the socket.
    pub socket_cache: bool,
    /// Config `marker.flow_index`: look flows up in the flow index first.
    pub flow_index: bool,
    /// The kernel has bpf_check_mtu (5.12); without it option headers are checked
    /// against `fallback_mtu`.
    pub check_mtu: bool,
    /// The smallest MTU of the marked interfaces, read at start.
    pub fallback_mtu: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            strategy: Strategy::LABEL,
            map_capacity: crate::config::DEFAULT_MAP_CAPACITY,
            with_empty_program: false,
            in_kernel: false,
            netns_ino: 0,
            with_test_program: false,
            socket_cache: true,
            flow_index: true,
            check_mtu: true,
            fallback_mtu: 1500,
        }
    }
}

impl LoadOptions {
    /// Turns off what this kernel cannot run; returns one line per fallback taken,
    /// naming the feature missing and the first kernel that has it.
    pub fn adapt_to(&mut self, k: &KernelFeatures) -> Vec<String> {
        let mut taken = Vec::new();
        let mut off = |what: &str, f: Feature| {
            taken.push(format!(
                "{what}: this kernel lacks {} (Linux >= {})",
                f.name(),
                f.since()
            ))
        };
        if !k.has(Feature::SkStorageTc) {
            if self.in_kernel {
                self.in_kernel = false;
                off("in-kernel decisions off", Feature::SkStorageTc);
            }
            if self.socket_cache {
                self.socket_cache = false;
                off("socket cache off", Feature::SkStorageTc);
            }
        }
        for f in [Feature::SkStorageIter, Feature::MmapableArray] {
            if self.socket_cache && !k.has(f) {
                self.socket_cache = false;
                off("socket cache off", f);
            }
        }
        if self.flow_index && !k.has(Feature::MmapableArray) {
            self.flow_index = false;
            off("flow index off", Feature::MmapableArray);
        }
        if self.check_mtu && !k.has(Feature::CheckMtu) {
            self.check_mtu = false;
            off(
                "option headers checked against the interface MTU read at start",
                Feature::CheckMtu,
            );
        }
        if self.flow_index && !flow_index::supported() {
            self.flow_index = false;
            taken.push(
                "flow index off: its lock-free reads need a CPU that keeps loads in order (x86_64)"
                    .into(),
            );
        }
        taken
    }
}

/// Opens, configures (rodata, map sizes) and loads the marker object.
///
/// The skeleton borrows its `OpenObject` for as long as it lives; the daemon loads
/// once and keeps it until exit, so the few bytes of that object are leaked on
/// purpose rather than tying every owner to a stack frame.
pub fn load(opts: &LoadOptions) -> Result<MarkerSkel<'static>> {
    load_pinned(opts, None).map(|(skel, _)| skel)
}

/// [`load`], sharing the maps pinned in `pins` when their layout matches this
/// program's (pinning the new ones otherwise).
pub fn load_pinned(
    opts: &LoadOptions,
    pins: Option<&Pins>,
) -> Result<(MarkerSkel<'static>, Option<pin::SharedMaps>)> {
    crate::bpf::route_libbpf_logs();
    let storage: &'static mut MaybeUninit<OpenObject> = Box::leak(Box::new(MaybeUninit::uninit()));
    let mut open = MarkerSkelBuilder::default()
        .open(storage)
        .context("opening the marker BPF object")?;
    if let Some(ro) = open.maps.rodata_data.as_deref_mut() {
        ro.flowd_strategy = opts.strategy.bits();
        ro.flowd_in_kernel = u32::from(opts.in_kernel);
        ro.flowd_netns_ino = opts.netns_ino;
        ro.flowd_sk_cache_on = u32::from(opts.socket_cache);
        ro.flowd_entropy_seed = entropy_seed();
        ro.flowd_have_check_mtu = u32::from(opts.check_mtu);
        ro.flowd_fallback_mtu = opts.fallback_mtu;
        ro.flowd_index_on = u32::from(opts.flow_index);
        ro.flowd_index_mask = flow_index::buckets_for(opts.map_capacity) - 1;
        ro.flowd_index_shift = flow_index::shift_for(ro.flowd_index_mask);
    }
    if opts.flow_index {
        open.maps
            .flowd_index
            .set_max_entries(flow_index::buckets_for(opts.map_capacity))
            .context("sizing the flow index")?;
    }
    open.maps
        .flowd_marks
        .set_max_entries(opts.map_capacity)
        .context("sizing the marker map")?;
    open.progs.flowd_empty.set_autoload(opts.with_empty_program);
    open.progs.flowd_ksockops.set_autoload(opts.in_kernel);
    open.progs
        .flowd_cache_counts
        .set_autoload(opts.socket_cache);
    open.progs
        .flowd_kdecide_test
        .set_autoload(opts.with_test_program);
    // TCX links want the attach type at load time; cls_bpf (the clsact fallback)
    // ignores it, so one program serves both.
    open.progs
        .flowd_mark
        .set_attach_type(libbpf_rs::ProgramAttachType::TcxEgress);
    if std::env::var_os("FLOWD_TEST_MARKER_VARIANT").is_some_and(|v| v == "1") {
        pin::test_variant(&mut open.progs.flowd_mark)?;
    }
    let layout = match pins {
        Some(p) => Some(pin::share_pinned_maps(open.open_object_mut(), p)?),
        None => None,
    };
    crate::bpf::clear_refusals();
    let skel = open.load().map_err(|e| {
        if let Some(r) = crate::bpf::refusal() {
            return anyhow::anyhow!("loading the marker (bpf/marker.bpf.c): {r}");
        }
        let hint = match e.kind() {
            libbpf_rs::ErrorKind::PermissionDenied => {
                ": permission denied, run as root (CAP_BPF and CAP_NET_ADMIN are needed)"
            }
            _ => "",
        };
        anyhow::anyhow!("loading the marker BPF program: {e}{hint}")
    })?;
    Ok((skel, layout))
}

/// The load options of configuration `cfg` on this kernel, and the fallbacks taken.
pub fn options_for(
    cfg: &Config,
    ifaces: &[Interface],
    k: &KernelFeatures,
) -> Result<(LoadOptions, Vec<String>)> {
    let mut opts = LoadOptions {
        strategy: cfg.marker.strategy,
        map_capacity: cfg.marker.map_capacity,
        in_kernel: cfg.marker.in_kernel_decisions,
        netns_ino: own_netns_ino()?,
        socket_cache: cfg.marker.socket_cache,
        flow_index: cfg.marker.flow_index,
        ..Default::default()
    };
    let taken = opts.adapt_to(k);
    if !opts.check_mtu {
        opts.fallback_mtu = ifaces
            .iter()
            .filter_map(|i| netif::mtu(&i.name).ok())
            .min()
            .unwrap_or(1280);
    }
    Ok((opts, taken))
}

/// Key of the flows' entropy hash: drawn from the kernel's boot id, so that it is
/// random for each boot but the same across restarts of the daemon, and a flow that
/// outlives a restart (an upgrade) keeps its label, and its ECMP path.
fn entropy_seed() -> u32 {
    match std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        Ok(id) => {
            // FNV-1a: any fixed mix of the 122 random bits will do.
            id.trim().bytes().fold(0x811c_9dc5u32, |h, b| {
                (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
            })
        }
        Err(_) => rand::random(),
    }
}

/// Inode of the calling thread's network namespace (what the tracker and sock_diag
/// report as a socket's netns).
pub fn own_netns_ino() -> Result<u32> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata("/proc/thread-self/ns/net")
        .context("reading /proc/thread-self/ns/net")?
        .ino();
    Ok(ino as u32)
}

/// Handles on the loaded object's maps for userspace use.
pub fn maps_of(skel: &MarkerSkel<'_>, capacity: u32) -> Result<MarkMaps> {
    let h =
        |m: &libbpf_rs::MapMut<'_>| MapHandle::try_from(m).context("duplicating a marker map fd");
    let m = &skel.maps;
    let cache = if skel.progs.flowd_cache_counts.autoload() {
        Some(sk_cache::SocketCache::new(
            &h(&m.flowd_cache_gen)?,
            &skel.progs.flowd_cache_counts,
            &m.flowd_sk_cache_map,
        )?)
    } else {
        None
    };
    let index = match m.rodata_data.as_ref() {
        Some(ro) if ro.flowd_index_on != 0 => Some(flow_index::FlowIndex::new(
            &h(&m.flowd_index)?,
            &h(&m.flowd_index_head)?,
            ro.flowd_index_mask + 1,
        )?),
        _ => None,
    };
    Ok(MarkMaps::new(
        h(&m.flowd_marks)?,
        h(&m.flowd_outcomes)?,
        h(&m.flowd_tag_counters)?,
        capacity,
        m.rodata_data.as_ref().map_or(0, |ro| ro.flowd_entropy_seed),
    )
    .with_kernel(compiled::KernelMaps {
        state: h(&m.flowd_kstate_map)?,
        policy: h(&m.flowd_kpolicy_map)?,
        rules: h(&m.flowd_krules)?,
        addrs: h(&m.flowd_kaddrs)?,
        ports: h(&m.flowd_kports)?,
        uids: h(&m.flowd_kuids)?,
        inserts: h(&m.flowd_kinserts)?,
    })
    .with_cache(cache)
    .with_index(index))
}

/// The running marker: loaded program, its maps, and where it is attached.
pub struct Marker {
    /// The sockops program deciding TCP connections at connect() and at the end of
    /// an accepted handshake, on the cgroup2 root; detached when dropped.
    ksockops: Option<libbpf_rs::Link>,
    skel: MarkerSkel<'static>,
    attachments: Vec<Attachment>,
    maps: Arc<MarkMaps>,
    rtnl: rtnetlink::Handle,
    state: StateFile,
    strategy: Strategy,
    fallbacks: Vec<String>,
    /// Pinned state, when pinning is on: then a plain exit leaves the marker
    /// running for the next start.
    pins: Option<Pins>,
    detach_on_exit: bool,
    /// The maps are an earlier instance's, marks included.
    adopted_maps: bool,
}

impl Marker {
    /// Cleans up after any crashed instance, loads the program and attaches it to the
    /// configured interfaces (all or nothing).
    pub async fn start(cfg: &Config) -> Result<Marker> {
        attach::check_kernel()?;
        let rtnl = netif::connect()?;
        let state = StateFile::new(&cfg.state_dir);
        let pins = Pins::open(&cfg.marker.pin_dir, own_netns_ino()?)?;
        // A first start that fails takes its pins away again; a restart that fails
        // leaves the earlier marker marking.
        let fresh = pins
            .as_ref()
            .filter(|p| p.is_empty())
            .map(|p| p.dir().to_path_buf());
        let started = Self::start_with(cfg, rtnl, state, pins).await;
        if let (Err(_), Some(dir)) = (&started, fresh) {
            pin::remove_tree(&dir);
        }
        started
    }

    async fn start_with(
        cfg: &Config,
        rtnl: rtnetlink::Handle,
        state: StateFile,
        pins: Option<Pins>,
    ) -> Result<Marker> {
        if pins.is_none() {
            // Nothing to adopt from: start from clean interfaces.
            let leftovers = attach::clean(&rtnl, &state).await?;
            if !leftovers.filters_removed.is_empty() {
                info!(interfaces = ?leftovers.filters_removed, "removed filters left by an earlier instance");
            }
        }
        let ifaces: Vec<Interface> = netif::resolve(&rtnl, &cfg.marker.interfaces).await?;
        let kernel = KernelFeatures::detect();
        if let Some(missing) = kernel.missing_required() {
            anyhow::bail!("{missing}");
        }
        let (opts, fallbacks) = options_for(cfg, &ifaces, kernel)?;
        for f in &fallbacks {
            tracing::warn!("marker: {f}");
        }
        let (mut skel, shared) = load_pinned(&opts, pins.as_ref())?;
        let adopted_maps = shared.as_ref().is_some_and(|s| s.adopted);
        let layout = shared.map(|s| s.layout);
        let maps = Arc::new(maps_of(&skel, opts.map_capacity)?);
        if adopted_maps {
            maps.adopt_slots();
        }
        let attachments = attach::attach_all(
            &skel.progs.flowd_mark,
            &ifaces,
            cfg.marker.attach,
            &rtnl,
            &state,
            pins.as_ref(),
        )
        .await?;
        if let Some(p) = &pins {
            retire_leftovers(p, &attachments, layout.as_deref(), &rtnl, &state).await?;
        }
        let ksockops = if opts.in_kernel {
            attach_ksockops(&skel, cfg.discovery.cgroup2.as_deref())
        } else {
            None
        };
        if ksockops.is_some() {
            if let Some(bss) = skel.maps.bss_data.as_deref_mut() {
                bss.flowd_passive_at_established = 1;
            }
        }
        Ok(Marker {
            ksockops,
            skel,
            attachments,
            maps,
            rtnl,
            state,
            strategy: cfg.marker.strategy,
            fallbacks,
            pins,
            detach_on_exit: cfg.marker.detach_on_exit,
            adopted_maps,
        })
    }

    /// Whether the maps (and the marks in them) were an earlier instance's.
    pub fn adopted_maps(&self) -> bool {
        self.adopted_maps
    }

    /// Whether the marker's state is pinned (restarts hand marking over).
    pub fn pinned(&self) -> bool {
        self.pins.is_some()
    }

    pub fn maps(&self) -> Arc<MarkMaps> {
        self.maps.clone()
    }

    /// The fallbacks taken because this kernel lacks a feature, one line each.
    pub fn fallbacks(&self) -> Vec<String> {
        let mut all = self.fallbacks.clone();
        if self.attachments.iter().any(|a| a.mode() == "clsact")
            && !KernelFeatures::detect().has(Feature::Tcx)
        {
            all.push(format!(
                "marker attached through clsact: this kernel lacks {} (Linux >= {})",
                Feature::Tcx.name(),
                Feature::Tcx.since()
            ));
        }
        all
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// (interface, attach mode) for each attachment.
    pub fn attachments(&self) -> Vec<(String, &'static str)> {
        self.attachments
            .iter()
            .map(|a| (a.iface().name.clone(), a.mode()))
            .collect()
    }

    /// Whether TCP connections are decided at connect() and at the end of the
    /// handshake (sockops attached).
    pub fn decides_at_connect(&self) -> bool {
        self.ksockops.is_some()
    }

    /// Whether stopping leaves the marker running for the next start: pinning on
    /// and no `detach_on_exit`.
    pub fn keeps_marking_on_exit(&self) -> bool {
        self.pins.is_some() && !self.detach_on_exit
    }

    /// Makes the next exit detach (`flowd-rs run --detach-on-exit`).
    pub fn set_detach_on_exit(&mut self) {
        self.detach_on_exit = true;
    }

    /// Leaves the pinned marker marking for the next start when
    /// [`Self::keeps_marking_on_exit`], else detaches everywhere, leaving each
    /// interface as it was found, and removes the pins.
    pub async fn stop(self) {
        drop(self.ksockops);
        if self.pins.is_some() && !self.detach_on_exit {
            info!(pins = %self.pins.as_ref().map(|p| p.dir().display().to_string()).unwrap_or_default(), "marker left running for the next start (`flowd-rs clean` removes it)");
            drop(self.attachments);
            drop(self.skel);
            return;
        }
        attach::detach_all(self.attachments, &self.rtnl, &self.state).await;
        drop(self.skel);
        if let Some(p) = self.pins {
            p.remove_all();
        }
    }
}

/// After a start with pins: removes what the previous instance had and this one
/// does not use (TCX links on interfaces no longer marked or now marked through
/// clsact, clsact filters where this one uses TCX, maps of another layout).
async fn retire_leftovers(
    pins: &Pins,
    attachments: &[Attachment],
    layout: Option<&str>,
    rtnl: &rtnetlink::Handle,
    state: &StateFile,
) -> Result<()> {
    for ifindex in pins.tcx_ifindexes() {
        let used = attachments
            .iter()
            .any(|a| a.mode() == "tcx" && a.iface().index == ifindex);
        if !used {
            info!(ifindex, "removing the TCX link an earlier instance left");
            let _ = std::fs::remove_file(pins.tcx_link(ifindex));
        }
    }
    let r = attach::clean_except(rtnl, state, attachments).await?;
    if !r.filters_removed.is_empty() {
        info!(interfaces = ?r.filters_removed, "removed clsact filters an earlier instance left");
    }
    if let Some(l) = layout {
        pins.remove_other_layouts(l);
    }
    Ok(())
}

/// Attaches `flowd_ksockops` to the cgroup2 root so that every TCP connection of the
/// host passes it (it decides only those of our network namespace). Without it the
/// TC program still decides active opens from the SYN, and accepted ones from their
/// SYN-ACK, writing the map entry there.
fn attach_ksockops(
    skel: &MarkerSkel<'_>,
    configured: Option<&std::path::Path>,
) -> Option<libbpf_rs::Link> {
    use std::os::fd::AsRawFd;
    let path = match configured {
        Some(p) => p.to_path_buf(),
        None => std::fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|mi| crate::discovery::cgroup2::find_cgroup2_mount(&mi))?,
    };
    let result = std::fs::File::open(&path)
        .map_err(|e| e.to_string())
        .and_then(|f| {
            skel.progs
                .flowd_ksockops
                .attach_cgroup(f.as_raw_fd())
                .map_err(|e| e.to_string())
        });
    match result {
        Ok(link) => {
            info!(cgroup2 = %path.display(), "in-kernel decisions at connect() and accept attached");
            Some(link)
        }
        Err(e) => {
            tracing::warn!(cgroup2 = %path.display(), error = %e, "cannot attach the connect()/accept decision: TCP connections are decided from their SYN or SYN-ACK instead");
            None
        }
    }
}
