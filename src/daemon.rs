//! `flowd-rs run`: starts the marker and the control socket, then waits for a signal
//! and takes everything down again, leaving the interfaces as they were found.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use std::time::Duration;

use tokio::sync::mpsc;

use crate::announce::{self, pipe::Pipe};
use crate::api::request::DaemonInfo;
use crate::config::{Config, TrackerSetting};
use crate::control::Server;
use crate::discovery::feeds::{self, Feed, TrackerStatus};
use crate::discovery::tracker::{TrackerConfig, TrackerMode};
use crate::engine::{load_policy, Command, Engine};
use crate::features::{Feature, KernelFeatures};
use crate::firefly::{self, Fireflies, FireflyCounters};
use crate::marker::Marker;
use crate::metrics::{BuildInfo, Metrics, MetricsSource, Published};
use crate::policy::Registry;

/// Holds `<state_dir>/lock` for the daemon's life: one daemon per state directory,
/// and `clean` can tell whether one is running. Also holds an abstract socket
/// named [`NETNS_LOCK`] in the daemon's network namespace: abstract names live
/// with the process, not the file system, so a state directory deleted under a
/// running daemon does not let a second one attach to the same interfaces.
pub struct InstanceLock {
    _lock: Flock<File>,
    _netns: std::os::unix::net::UnixListener,
}

/// One flowd-rs per network namespace: two would discover the same sockets and
/// mark the same interfaces.
pub const NETNS_LOCK: &[u8] = b"flowd-rs/instance";

fn netns_lock() -> Result<std::os::unix::net::UnixListener> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(NETNS_LOCK)?;
    std::os::unix::net::UnixListener::bind_addr(&addr).map_err(|e| {
        anyhow::anyhow!(
            "another flowd-rs daemon runs in this network namespace (it holds the abstract socket \
             @{}: {e}), even if its state directory is gone: stop it first",
            String::from_utf8_lossy(NETNS_LOCK)
        )
    })
}

impl InstanceLock {
    pub fn acquire(state_dir: &Path) -> Result<InstanceLock> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating state directory {}", state_dir.display()))?;
        let path = state_dir.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            anyhow::anyhow!(
                "another flowd-rs daemon holds {} ({e}): stop it first, or give this one another state_dir",
                path.display()
            )
        })?;
        Ok(InstanceLock {
            _lock: lock,
            _netns: netns_lock()?,
        })
    }
}

pub async fn run(cfg: Config) -> Result<()> {
    let _lock = InstanceLock::acquire(&cfg.state_dir)?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;

    // Everything that can be refused is checked before anything is attached.
    let registry = match &cfg.policy.registry {
        Some(p) => Registry::from_file(p).with_context(|| format!("registry {}", p.display()))?,
        None => Registry::bundled(),
    };
    let policy = load_policy(&cfg.policy.dir, &registry).map_err(|e| anyhow::anyhow!("{e}"))?;
    info!(dir = %cfg.policy.dir.display(), rules = policy.rules().len(), version = policy.version(), "policy loaded");
    let policy_version = policy.version().to_string();

    let marker = Marker::start(&cfg).await?;
    if marker.pinned() && !marker.keeps_marking_on_exit() {
        info!("marker.detach_on_exit: every exit removes the marker and its pins");
    }
    match start_engine(&cfg, &marker, policy, registry).await {
        Ok(mut running) => {
            let first_dump = running.first_dump.take();
            let commands = running.commands.clone();
            let version = policy_version;
            tokio::select! {
                _ = sigterm.recv() => info!("SIGTERM: shutting down"),
                _ = sigint.recv() => info!("SIGINT: shutting down"),
                _ = async {
                    // Ready once the marker is attached and the first dump has
                    // marked what already existed: `systemctl start` then returns.
                    if let Some(rx) = first_dump {
                        if rx.await.is_ok() {
                            info!("first sock_diag dump reconciled: marking is live");
                            crate::notify::ready(&format!("marking, policy {version}"));
                        }
                    }
                    loop { sighup.recv().await; let _ = commands.send(Command::Reload).await; }
                } => {}
            }
            crate::notify::stopping();
            running.stop().await;
        }
        Err(e) => {
            marker.stop().await;
            return Err(e);
        }
    }
    let _ = std::fs::remove_file(cfg.control_socket());
    let kept = marker.keeps_marking_on_exit();
    marker.stop().await;
    if kept {
        info!("flowd-rs stopped; the pinned marker marks on until the next start");
    } else {
        info!("flowd-rs stopped; interfaces left as found");
    }
    Ok(())
}

struct Running {
    commands: mpsc::Sender<Command>,
    engine: tokio::task::JoinHandle<()>,
    /// Control socket and metrics endpoint.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Tasks that finish on their own once the engine is gone (the firefly sender
    /// sends what is queued).
    drains: Vec<tokio::task::JoinHandle<()>>,
    feeds: Vec<Feed>,
    /// The announcement FIFO, removed when this is dropped.
    _pipe: Option<Pipe>,
    /// Fires once the engine has applied the first complete sock_diag dump.
    first_dump: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Running {
    /// Stops the feeds first (so the engine sees its input end), then lets the engine
    /// remove every mark it wrote.
    async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        let feeds = self.feeds;
        let _ = tokio::task::spawn_blocking(move || drop(feeds)).await;
        drop(self.commands);
        let _ = self.engine.await;
        for t in self.drains {
            let _ = t.await;
        }
    }
}

async fn start_engine(
    cfg: &Config,
    marker: &Marker,
    policy: crate::policy::Policy,
    registry: Registry,
) -> Result<Running> {
    let (disc_tx, disc_rx) = mpsc::channel(8192);
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let (announce_tx, announce_rx) = mpsc::channel(64);
    let tracker_status = Arc::new(TrackerStatus::default());
    let mut feeds = Vec::new();
    let dumps =
        feeds::DumpSchedule::new(Duration::from_millis(cfg.discovery.reconcile_interval_ms));
    let (poller, netns) =
        feeds::spawn_poller(dumps.clone(), cfg.discovery.dump_source, disc_tx.clone())?;
    feeds.push(poller);
    let mut mode = match cfg.discovery.tracker {
        TrackerSetting::Full => TrackerMode::Full,
        TrackerSetting::TracepointOnly => TrackerMode::TracepointOnly,
        TrackerSetting::Disabled => TrackerMode::Disabled,
    };
    let kernel = KernelFeatures::detect();
    let mut fallbacks = marker.fallbacks();
    if mode != TrackerMode::Disabled && !kernel.has(Feature::RingBuffer) {
        let f = Feature::RingBuffer;
        fallbacks.push(format!(
            "tracker off, sockets found by sock_diag polling: this kernel lacks {} (Linux >= {})",
            f.name(),
            f.since()
        ));
        mode = TrackerMode::Disabled;
    }
    for f in &fallbacks {
        warn!("{f}");
    }
    if mode != TrackerMode::Disabled {
        let only_netns = (!cfg.discovery.all_namespaces).then_some(netns);
        let tcfg = TrackerConfig {
            mode,
            ring_bytes: cfg.discovery.ring_buffer_bytes,
            cgroup2_path: cfg.discovery.cgroup2.clone(),
            udp: cfg.discovery.udp,
            // Namespace inodes are 32-bit in the kernel (ns_common.inum).
            only_netns: only_netns.and_then(|n| u32::try_from(n).ok()),
        };
        feeds.push(feeds::spawn_tracker(
            &tcfg,
            only_netns,
            disc_tx,
            tracker_status.clone(),
            dumps.clone(),
        )?);
        let f = tracker_status.features.lock().unwrap().clone();
        let complete =
            f.is_some_and(|f| f.tcp_state && (!tcfg.udp || f.udp_connect && f.udp_release));
        // Per-flow metrics show tcp_info, which only dumps refresh.
        let every = cfg.discovery.full_dump_interval_s;
        if complete && every > 0 && !(cfg.metrics.enabled && cfg.metrics.per_flow) {
            dumps.set_interval(Duration::from_secs(every));
            if cfg.discovery.verify_walks {
                dumps.allow_verify_walks();
            }
            info!(
                every_s = dumps.interval().as_secs(),
                "tracker sees every socket change: full sock_diag dumps at start, after a loss, and at this interval"
            );
        }
    } else {
        info!("socket tracker disabled: sock_diag polling alone finds sockets");
    }
    let info = Arc::new(DaemonInfo {
        version: env!("CARGO_PKG_VERSION"),
        pid: std::process::id(),
        strategy: marker.strategy().to_string(),
        header: cfg.marker.strategy.headers(),
        attached: marker.attachments(),
        kernel_features: kernel.lines(),
        fallbacks,
    });
    let mut engine = Engine::new(
        netns,
        policy,
        &cfg.policy.dir,
        registry.clone(),
        marker.maps(),
        info.clone(),
        tracker_status,
    )
    .with_in_kernel_decisions(cfg.marker.in_kernel_decisions)
    .with_dump_schedule(dumps.clone())
    .with_handover(marker.adopted_maps(), marker.keeps_marking_on_exit());
    let mut firefly_counters = None;
    let mut drains = Vec::new();
    let mut own_ports = Vec::new();
    if cfg.fireflies.enabled {
        let counters = Arc::new(FireflyCounters::default());
        let sender = firefly::sender::spawn(&cfg.fireflies, counters.clone())?;
        let every = (cfg.fireflies.ongoing_interval_s > 0)
            .then(|| Duration::from_secs(cfg.fireflies.ongoing_interval_s));
        info!(collectors = ?cfg.fireflies.collectors, to_remote = cfg.fireflies.to_remote, "fireflies on");
        engine = engine.with_fireflies(Fireflies::new(sender.queue, counters.clone(), every));
        own_ports = sender.local_ports;
        firefly_counters = Some(counters);
        drains.push(sender.task);
    }
    // The announcement inputs exist before the control socket does: once a client
    // can talk to the daemon, an application can announce to it.
    let mut tasks = Vec::new();
    let mut pipe = None;
    if cfg.announcements.enabled() {
        let ann = &cfg.announcements;
        let rule = announce::auth::AuthRule::new(&ann.allow_users, &ann.allow_groups)?;
        let held =
            announce::Announcements::with_limit(Duration::from_secs(ann.grace_secs), ann.max_held)
                .with_fireflies_for(&ann.fireflies_for);
        let refused = held.refusals();
        engine = engine.with_announcements(held);
        if let Some(path) = &ann.pipe {
            let p = Pipe::create(path, cfg.control.group.as_deref())?;
            tasks.push(p.spawn(registry.clone(), announce_tx.clone())?);
            pipe = Some(p);
        }
        if let Some(listen) = ann.http_listen {
            let l = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("announcements.http_listen {listen}: cannot listen"))?;
            tasks.push(tokio::spawn(announce::http::serve(
                l,
                announce_tx.clone(),
                rule.clone(),
                refused.clone(),
            )));
        }
        tasks.extend(
            announce::listener::spawn(
                &ann.firefly_listen,
                ann.firefly_allow.clone(),
                own_ports,
                rule,
                refused,
                announce_tx.clone(),
            )
            .await?,
        );
    }
    let server = Server::bind(&cfg.control_socket(), cfg.control.group.as_deref())?;
    if cfg.metrics.enabled {
        let (metrics, published) = metrics_for(cfg, marker, registry.clone(), firefly_counters);
        let listener = tokio::net::TcpListener::bind(cfg.metrics.listen)
            .await
            .with_context(|| format!("metrics.listen {}: cannot listen", cfg.metrics.listen))?;
        tasks.push(tokio::spawn({
            let metrics = metrics.clone();
            async move {
                if let Err(e) =
                    crate::metrics::serve_on(listener, metrics, std::future::pending()).await
                {
                    tracing::warn!(error = %format!("{e:#}"), "metrics endpoint stopped");
                }
            }
        }));
        engine = engine.with_metrics(metrics, published);
        if cfg.metrics.per_flow {
            engine = engine.with_per_flow_metrics(cfg.metrics.per_flow_max);
        }
    }
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let connections = Arc::new(crate::endpoint::ConnectionStats::default());
    engine = engine.with_connection_stats(connections.clone());
    let limits = crate::control::Limits {
        per_user: cfg.control.max_connections_per_user,
        idle: Duration::from_secs(cfg.control.idle_timeout_secs),
    };
    let engine = tokio::spawn(engine.with_first_dump_signal(first_tx).run(
        disc_rx,
        cmd_rx,
        announce_rx,
    ));
    tasks.push(tokio::spawn(server.serve(
        cmd_tx.clone(),
        limits,
        connections,
    )));
    info!(strategy = %info.strategy, interfaces = ?info.attached, "flowd-rs running");
    Ok(Running {
        commands: cmd_tx,
        engine,
        tasks,
        drains,
        feeds,
        _pipe: pipe,
        first_dump: Some(first_rx),
    })
}

/// The metrics registry: flow-table facts come from the snapshot the engine
/// publishes; the BPF counters are read at scrape time (on a blocking thread).
fn metrics_for(
    cfg: &Config,
    marker: &Marker,
    registry: Registry,
    fireflies: Option<Arc<FireflyCounters>>,
) -> (Arc<Metrics>, Arc<Published>) {
    let published = Arc::new(Published::default());
    let maps = marker.maps();
    let source = {
        let published = published.clone();
        move || {
            let mut s = published.snapshot();
            if let Ok(c) = maps.counters() {
                s.outcomes = c.outcome_counts();
                crate::engine::add_tag_counts(&mut s.tags, &c.per_tag, &registry);
            }
            s.map_unindexed = maps.index().map(|ix| ix.unindexed());
            // The sender counts as it sends: read now, not at the last publish.
            if let (Some(status), Some(c)) = (&mut s.fireflies, &fireflies) {
                c.fill(status);
            }
            s
        }
    };
    let build = BuildInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        strategy: cfg.marker.strategy.to_string(),
    };
    (Arc::new(Metrics::new(build, source)), published)
}

/// `flowd-rs clean`: removes what a crashed instance left on the interfaces.
pub async fn clean(cfg: Config) -> Result<()> {
    let _lock = InstanceLock::acquire(&cfg.state_dir)?;
    let rtnl = crate::marker::netif::connect()?;
    let state = crate::marker::attach::StateFile::new(&cfg.state_dir);
    let report = crate::marker::attach::clean(&rtnl, &state).await?;
    // Unpinned, TCX links detach and the maps go.
    let ino = crate::marker::own_netns_ino()?;
    let existed = !cfg.marker.pin_dir.as_os_str().is_empty()
        && cfg.marker.pin_dir.join(format!("net{ino}")).exists();
    let pinned = match crate::marker::pin::Pins::open(&cfg.marker.pin_dir, ino) {
        Ok(Some(p)) if existed => {
            let dir = p.dir().display().to_string();
            p.remove_all();
            Some(dir)
        }
        Ok(Some(p)) => {
            p.remove_all();
            None
        }
        Ok(None) => None,
        Err(e) => return Err(e),
    };
    let _ = std::fs::remove_file(cfg.control_socket());
    if let Some(dir) = &pinned {
        println!("removed the pinned marker state in {dir}");
    }
    if report.filters_removed.is_empty() && report.qdiscs_removed.is_empty() {
        if pinned.is_none() {
            println!("nothing to clean");
        }
    } else {
        println!(
            "removed flowd-rs filters from: {}; removed clsact qdiscs from: {}",
            list(&report.filters_removed),
            list(&report.qdiscs_removed)
        );
    }
    Ok(())
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}
