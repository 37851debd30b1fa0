//! The daemon's single owner of state: it applies discovery to the flow table, turns
//! flow events into marks through the policy, and answers the control socket.
//!
//! Everything that changes the flow table or the marks happens on this one task, so
//! no lock guards them and no update is half applied.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;
use serde_json::value::{to_raw_value, RawValue};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

pub use self::views::{add_tag_counts, MarkerShape, SeqOf};
use crate::announce::Announcements;
use crate::api::request::{DaemonInfo, Request};
use crate::api::view::{FlowView, StatusView, TagTotals};
use crate::discovery::feeds::{Discovery, TrackerStatus};
use crate::discovery::procfs::{Fact, ProcResolver};
use crate::discovery::sockdiag::lookup::SocketLookup;
use crate::endpoint::ConnectionStats;
use crate::firefly::{Fireflies, State};
use crate::flows::{Flow, FlowEvent, FlowTable, FlowTableConfig};
use crate::marking::{MarkSink, MarkStore, Marking};
use crate::metrics::{FlowSeries, Metrics, PerFlow, Published, Snapshot};
use crate::model::announcement::Announcement;
use crate::model::tag::Tag;
use crate::policy::kernel::{Exactness, KernelPolicy};
use crate::policy::{Policy, Registry};

/// A control request and where its answer goes.
pub struct ControlCall {
    pub request: Request,
    /// The client's uid (SO_PEERCRED), when the kernel gave it.
    pub peer_uid: Option<u32>,
    /// The serialized `result`, or the error text.
    pub reply: oneshot::Sender<Result<Box<RawValue>, String>>,
}

/// Inputs of the engine besides discovery.
pub enum Command {
    Control(ControlCall),
    /// SIGHUP: reload the policy directory.
    Reload,
}

pub struct Engine {
    table: FlowTable,
    marking: Marking,
    policy: Arc<Policy>,
    policy_dir: std::path::PathBuf,
    registry: Registry,
    maps: Arc<dyn MarkStore>,
    procs: ProcResolver,
    info: Arc<DaemonInfo>,
    shape: MarkerShape,
    tracker: Arc<TrackerStatus>,
    started: Instant,
    reloads_ok: u64,
    reloads_failed: u64,
    last_poll: Duration,
    /// Source of the last full dump, and iterator walks redone with sock_diag.
    last_dump_source: Option<(crate::discovery::full_dump::DumpSource, u64)>,
    users: HashMap<u32, Option<String>>,
    metrics: Option<(Arc<Metrics>, Arc<Published>)>,
    /// Config marker.in_kernel_decisions: compile each policy into the kernel.
    in_kernel: bool,
    /// Per rule (precedence order) of the current policy: decided in the kernel?
    exactness: Vec<Exactness>,
    fireflies: Option<Fireflies>,
    /// Present when an announcement input is configured.
    announcements: Option<Announcements>,
    /// Told once, when the first complete sock_diag dump has been applied.
    first_dump: Option<oneshot::Sender<()>>,
    /// The maps were adopted from an earlier instance (pinned): the first complete
    /// dump sweeps the marks of flows that ended while no daemon ran.
    adopted_marks: Option<std::collections::HashSet<crate::model::socket::FlowKey>>,
    /// Leave the marks in the maps at exit: the pinned marker goes on marking
    /// until the next instance takes over.
    keep_marks_on_exit: bool,
    /// Refused /proc reads already warned about: (rule, fact), once each per policy.
    denied_warned: std::collections::HashSet<(String, Fact)>,
    /// The resolver's refusal counts at the last check.
    denied_seen: [u64; 3],
    /// The control server's connection counts, when one serves this engine.
    connections: Option<Arc<ConnectionStats>>,
    /// Config metrics.per_flow: the series cap, the flows left out so far (each
    /// counted once), and the last series published.
    per_flow: Option<PerFlowState>,
    reloads: ReloadState,
    /// Targeted sock_diag lookups (announced flows), opened at first use; the
    /// error, when it could not be opened, is not retried.
    sockets: Option<Result<SocketLookup, String>>,
    /// The paged `flows` listing in progress.
    listing: Option<listing::Listing>,
    /// Flow events or a listing allocated since the last trim (release_free_memory).
    trim_due: bool,
    /// The reconcile schedule: told when a full dump is needed (a verify walk
    /// that found a difference, flows a dump would complete).
    dumps: Option<Arc<crate::discovery::feeds::DumpSchedule>>,
    /// The last verify walk's outcome and duration.
    last_verify: Option<(crate::flows::VerifyOutcome, Duration)>,
    /// Complete full dumps reconciled.
    full_dumps: u64,
}

struct PerFlowState {
    max: usize,
    left_out: rustc_hash::FxHashSet<u64>,
    left_out_total: u64,
    published: Arc<PerFlow>,
}

impl Engine {
    pub fn new(
        local_netns: u64,
        policy: Policy,
        policy_dir: &Path,
        registry: Registry,
        maps: Arc<dyn MarkStore>,
        info: Arc<DaemonInfo>,
        tracker: Arc<TrackerStatus>,
    ) -> Self {
        Engine {
            table: FlowTable::new(FlowTableConfig {
                netns: local_netns,
                ..Default::default()
            }),
            marking: Marking::new(local_netns),
            policy: Arc::new(policy),
            policy_dir: policy_dir.to_path_buf(),
            registry,
            maps,
            procs: ProcResolver::new(65_536),
            shape: MarkerShape {
                header: info.header,
            },
            info,
            tracker,
            started: Instant::now(),
            reloads_ok: 0,
            reloads_failed: 0,
            last_poll: Duration::ZERO,
            last_dump_source: None,
            users: HashMap::new(),
            metrics: None,
            in_kernel: false,
            exactness: Vec::new(),
            fireflies: None,
            announcements: None,
            first_dump: None,
            adopted_marks: None,
            keep_marks_on_exit: false,
            denied_warned: Default::default(),
            denied_seen: [0; 3],
            connections: None,
            per_flow: None,
            reloads: ReloadState {
                load: Arc::new(load_policy),
                in_flight: None,
                queued: None,
            },
            listing: None,
            sockets: None,
            trim_due: false,
            dumps: None,
            last_verify: None,
            full_dumps: 0,
        }
    }

    /// The schedule of the poller feeding this engine, so that a failed verify
    /// walk can ask for a full dump.
    pub fn with_dump_schedule(mut self, dumps: Arc<crate::discovery::feeds::DumpSchedule>) -> Self {
        self.dumps = Some(dumps);
        self
    }

    /// A restart hand-over: `adopted` says the maps hold an earlier instance's
    /// marks, `keep_on_exit` that this one's marks stay for the next.
    pub fn with_handover(mut self, adopted: bool, keep_on_exit: bool) -> Self {
        // The marks there now: those the kernel writes from here on are of new
        // sockets the dump may have missed, and not to be swept.
        self.adopted_marks = adopted.then(|| {
            self.maps
                .flow_counts()
                .unwrap_or_default()
                .into_keys()
                .collect()
        });
        self.keep_marks_on_exit = keep_on_exit;
        self
    }

    /// `tx` is told when the first complete sock_diag dump has been reconciled: from
    /// then on every pre-existing socket carries its mark (readiness for systemd).
    pub fn with_first_dump_signal(mut self, tx: oneshot::Sender<()>) -> Self {
        self.first_dump = Some(tx);
        self
    }

    /// Takes explicit announcements (config `[announcements]`), held in
    /// `announcements` until their flow ends or their grace passes.
    pub fn with_announcements(mut self, announcements: Announcements) -> Self {
        self.announcements = Some(announcements);
        self
    }

    /// Config metrics.per_flow: `flow_tcp_*` series for at most `max` tagged flows.
    pub fn with_per_flow_metrics(mut self, max: usize) -> Self {
        self.per_flow = Some(PerFlowState {
            max,
            left_out: Default::default(),
            left_out_total: 0,
            published: Arc::default(),
        });
        self
    }

    /// Rebuilds the per-flow series from the table (after a dump: its tcp_info is
    /// fresh). Flows beyond the cap are counted once each while they live.
    fn refresh_per_flow(&mut self) {
        let Some(p) = &mut self.per_flow else {
            return;
        };
        let mut series = Vec::with_capacity(p.max.min(self.table.len()));
        let mut over = rustc_hash::FxHashSet::default();
        for f in self.table.iter() {
            let (Some(tcp), Some(d)) = (f.tcp, self.marking.decision(f.cookie)) else {
                continue;
            };
            if series.len() >= p.max {
                if !p.left_out.contains(&f.cookie) {
                    p.left_out_total += 1;
                }
                over.insert(f.cookie);
                continue;
            }
            let (src, dst) = (f.key.local(), f.key.remote());
            series.push(FlowSeries {
                experiment: d.tag.experiment,
                activity: d.tag.activity,
                src: src.ip(),
                dst: dst.ip(),
                sport: src.port(),
                dport: dst.port(),
                tcp,
            });
        }
        p.left_out = over;
        p.published = Arc::new(PerFlow {
            series,
            left_out_total: p.left_out_total,
        });
    }

    /// Shows the control server's connection counts in status and metrics.
    pub fn with_connection_stats(mut self, stats: Arc<ConnectionStats>) -> Self {
        self.connections = Some(stats);
        self
    }

    /// Announces tagged flows with fireflies (config `fireflies.enabled`).
    pub fn with_fireflies(mut self, fireflies: Fireflies) -> Self {
        self.fireflies = Some(fireflies);
        self
    }

    /// Config marker.in_kernel_decisions: when on, the policy (now and after every
    /// reload) is compiled into the kernel's decision maps.
    pub fn with_in_kernel_decisions(mut self, on: bool) -> Self {
        self.in_kernel = on;
        self.install_kernel_policy();
        self
    }

    /// Compiles the current policy into the kernel's decision maps (when in-kernel
    /// decisions are on). On failure the kernel stops deciding and userspace
    /// decides every flow, as with the switch off.
    fn install_kernel_policy(&mut self) {
        if !self.in_kernel {
            self.exactness.clear();
            return;
        }
        let k = KernelPolicy::compile(self.policy.rules());
        match self.maps.install_policy(&k) {
            Ok(()) => {
                let exact = k.exactness.iter().filter(|e| e.is_exact()).count();
                info!(
                    rules = k.exactness.len(),
                    first_packet_exact = exact,
                    "policy compiled into the kernel"
                );
                self.exactness = k.exactness;
            }
            Err(e) => {
                warn!(error = %e, "compiling the policy into the kernel failed: userspace decides every flow");
                self.maps.disable_kernel_decisions();
                self.exactness.clear();
            }
        }
    }

    /// Publishes a snapshot for `/metrics` after every batch, and poll durations.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>, published: Arc<Published>) -> Self {
        self.metrics = Some((metrics, published));
        self
    }

    /// Runs until both channels close; returns so the caller can tear down.
    pub async fn run(
        mut self,
        mut discovery: mpsc::Receiver<Discovery>,
        mut commands: mpsc::Receiver<Command>,
        mut announced: mpsc::Receiver<Announcement>,
    ) {
        let (loaded_tx, mut loaded) = mpsc::channel::<Result<Policy, String>>(1);
        // What used to ride on every dump but must not wait for a rare one
        // (discovery.full_dump_interval_s): announcement expiry, memory trimming.
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // `ongoing` fireflies keep a timer of their own (fireflies.ongoing_interval_s).
            let ongoing = self.fireflies.as_ref().and_then(Fireflies::next_ongoing);
            tokio::select! {
                d = discovery.recv() => match d {
                    Some(d) => self.on_discovery(d),
                    None => break,
                },
                c = commands.recv() => match c {
                    Some(Command::Control(call))
                        if matches!(call.request, Request::Reload {}) =>
                    {
                        self.begin_reload(Some(call.reply), &loaded_tx);
                    }
                    Some(Command::Control(call)) => {
                        let t0 = Instant::now();
                        let op = format!("{:?}", call.request).split([' ', '{']).next().unwrap_or("").to_string();
                        let answer = if call.request.root_only() && call.peer_uid != Some(0) {
                            Err(format!(
                                "{op}: a debugging aid for root only (this client is uid {}); \
                                 announce flows or write a policy instead",
                                call.peer_uid.map_or_else(|| "unknown".into(), |u| u.to_string())
                            ))
                        } else {
                            self.answer(call.request)
                        };
                        self.trim_due = true;
                        tracing::debug!(op, elapsed_ms = t0.elapsed().as_secs_f64() * 1000.0, "control request answered");
                        let _ = call.reply.send(answer);
                    }
                    Some(Command::Reload) => self.begin_reload(None, &loaded_tx),
                    None => break,
                },
                // Inputs (named pipe, firefly listener) name flows; they hold only
                // this channel's sender, never the engine.
                Some(a) = announced.recv() => self.announce(a),
                Some(p) = loaded.recv() => self.finish_reload(p, &loaded_tx),
                _ = tokio::time::sleep_until(ongoing.unwrap_or_else(Instant::now).into()),
                    if ongoing.is_some() => {
                    if let Some(ff) = &mut self.fireflies {
                        let table = &self.table;
                        ff.ongoing(|cookie| table.get(cookie));
                    }
                }
                _ = housekeeping.tick() => {
                    if let Some(a) = &mut self.announcements {
                        a.expire();
                        // Dumps may be a minute apart (discovery.full_dump_interval_s)
                        // when the tracker sees every socket change: by UNSEEN_WAIT it
                        // has reported any socket the announcement names.
                        if self.fireflies.is_some() {
                            let now = Instant::now();
                            let unseen = a.unseen(now.checked_sub(UNSEEN_WAIT).unwrap_or(now));
                            self.unseen_fireflies(unseen);
                        }
                    }
                    // Only after work that allocated: mallinfo2 walks glibc's free
                    // lists, which is not free with 100 000 flows in the heap.
                    if std::mem::take(&mut self.trim_due) {
                        release_free_memory();
                    }
                }
                // While firefly starts wait (a burst outran the sender), offer them
                // the room the sender has made, every 10 ms.
                _ = tokio::time::sleep(Duration::from_millis(10)),
                    if self.fireflies.as_ref().is_some_and(Fireflies::has_waiting) => {
                    self.flush_fireflies();
                }
            }
        }
        if !self.keep_marks_on_exit {
            self.remove_all_marks();
        }
    }

    fn apply(&mut self, events: Vec<FlowEvent>) {
        if events.is_empty() {
            return;
        }
        self.trim_due = true;
        self.apply_events(events);
        self.unseen_fireflies(Vec::new());
        self.flush_fireflies();
        if let Some((_, published)) = &self.metrics {
            published.set(self.snapshot());
        }
    }

    /// Sends the start fireflies of announced flows found to have no socket, and the
    /// ends the announcements have due for such flows.
    fn unseen_fireflies(&mut self, starts: Vec<crate::announce::Unseen>) {
        let Some(a) = &mut self.announcements else {
            return;
        };
        let ends = a.take_ended();
        if let Some(ff) = &mut self.fireflies {
            for (state, u) in starts
                .iter()
                .map(|u| (State::Start, u))
                .chain(ends.iter().map(|u| (State::End, u)))
            {
                tracing::debug!(flow = ?u.key, ?state, "firefly for an announced flow without a local socket");
                ff.for_unseen(state, u.key, u.tag, u.start);
            }
        }
    }

    /// Queues the firefly starts that wait for room in the sender's queue.
    fn flush_fireflies(&mut self) {
        if let Some(ff) = &mut self.fireflies {
            let table = &self.table;
            ff.flush(|cookie| table.get(cookie));
        }
    }

    fn apply_events(&mut self, events: Vec<FlowEvent>) {
        let policy = self.policy.clone();
        let needs_proc = policy.needs_process_facts();
        if needs_proc {
            // One /proc walk for the whole batch rather than one per socket.
            let inodes: Vec<u64> = events
                .iter()
                .filter_map(|e| match e {
                    FlowEvent::Started(f) | FlowEvent::Updated(f) if f.inode != 0 => Some(f.inode),
                    _ => None,
                })
                .collect();
            if let Err(e) = self.procs.resolve(inodes) {
                warn!(error = %e, "resolving socket owners from /proc failed");
            }
            self.warn_denied_facts();
        }
        for ev in events {
            match ev {
                FlowEvent::Started(f) | FlowEvent::Updated(f) => {
                    let procs = &mut self.procs;
                    let mut lookup = |f: &Flow| procs.lookup(f.inode).ok().flatten();
                    let announced = self
                        .announcements
                        .as_mut()
                        .and_then(|a| a.verdict_for(&f.key, f.owner.uid));
                    self.marking.on_flow_with(
                        &f,
                        &policy,
                        self.maps.as_ref(),
                        &mut lookup,
                        announced,
                    );
                    if let Some(ff) = &mut self.fireflies {
                        let d = self.marking.decision(f.cookie);
                        // An announced flow is ours to announce when its input is
                        // in `announcements.fireflies_for`.
                        let app_speaks = d.is_some_and(|d| d.announced)
                            && !self
                                .announcements
                                .as_ref()
                                .is_some_and(|a| a.fireflies_ours(&f.key));
                        ff.on_flow_with(&f, d, app_speaks);
                    }
                }
                FlowEvent::Ended(f, _) => {
                    if let Some(ff) = &mut self.fireflies {
                        ff.on_end(&f);
                    }
                    if let Some(a) = &mut self.announcements {
                        a.forget(&f.key);
                    }
                    self.marking.on_end(&f, self.maps.as_ref());
                    if f.inode != 0 {
                        self.procs.forget(f.inode);
                    }
                }
            }
        }
    }

    /// Records an announcement and re-decides the live flows it names (either
    /// orientation); a flow not discovered yet picks it up when it is.
    fn announce(&mut self, a: Announcement) {
        tracing::debug!(flow = ?a.key, tag = ?a.tag, origin = %a.origin, "announcement");
        let Some(held) = &mut self.announcements else {
            return;
        };
        let keys = held.apply(a);
        self.unseen_fireflies(Vec::new());
        let named: Vec<FlowEvent> = self
            .table
            .iter()
            .filter(|f| keys.contains(&f.key))
            .map(|f| FlowEvent::Updated(Arc::new(f.clone())))
            .collect();
        self.apply(named);
        self.look_for_socket(&keys);
    }

    /// A flow announced for our fireflies that no flow of the table has claimed, and
    /// that the kernel says no socket of this host has (either way round), starts
    /// its fireflies now, as flowd-go sends them at the announcement; dumps and
    /// UNSEEN_WAIT catch what this misses (a lookup that failed).
    fn look_for_socket(&mut self, keys: &[crate::model::socket::FlowKey; 2]) {
        let Some(held) = &mut self.announcements else {
            return;
        };
        if self.fireflies.is_none() || !held.awaits_socket(&keys[0]) {
            return;
        }
        let lookup = self.sockets.get_or_insert_with(|| {
            SocketLookup::new(Duration::from_millis(200)).map_err(|e| e.to_string())
        });
        let Ok(lookup) = lookup else {
            return;
        };
        let mut absent = |k| lookup.exists(k).is_ok_and(|found| !found);
        if absent(&keys[0]) && absent(&keys[1]) {
            let unseen = held.unseen_now(&keys[0]).into_iter().collect();
            self.unseen_fireflies(unseen);
        }
    }

    /// A /proc read the kernel refused means the rules on that fact cannot match
    /// the process's sockets: said once per rule and fact (and counted in
    /// `flowd_fact_denied_total`), never a silent non-match.
    fn warn_denied_facts(&mut self) {
        let stats = self.procs.stats();
        for (i, fact) in Fact::ALL.into_iter().enumerate() {
            let n = stats.denied(fact);
            if n == self.denied_seen[i] {
                continue;
            }
            self.denied_seen[i] = n;
            for rule in self.policy.rules() {
                let m = &rule.matcher;
                let uses = match fact {
                    // Without the owner, no process fact is known.
                    Fact::Owner => !m.kernel_decidable(),
                    Fact::Exe => m.exe.is_some(),
                    Fact::Cgroup => m.cgroup.is_some(),
                };
                if uses && self.denied_warned.insert((rule.id.to_string(), fact)) {
                    warn!(
                        rule = %rule.id,
                        fact = fact.name(),
                        "cannot read the {} of a socket's process: /proc refused it (the daemon lacks CAP_SYS_PTRACE or CAP_DAC_READ_SEARCH, or the process is protected); this rule cannot match such sockets",
                        fact.name()
                    );
                }
            }
        }
    }

    fn remove_all_marks(&mut self) {
        self.maps.disable_kernel_decisions();
        let flows: Vec<Flow> = self.table.iter().cloned().collect();
        for f in flows {
            self.marking.on_end(&f, self.maps.as_ref());
        }
        self.marking.release_lingering(self.maps.as_ref());
        for key in self.maps.kernel_marked() {
            let _ = self.maps.remove(&key);
        }
    }

    fn answer(&mut self, req: Request) -> Result<Box<RawValue>, String> {
        match req {
            Request::Status {} => raw(&self.status()),
            Request::Counters {} => {
                let c = self.maps.counters().map_err(|e| e.to_string())?;
                let outcomes: BTreeMap<String, u64> = c.outcome_counts().into_iter().collect();
                raw(&json!({"outcomes": outcomes, "per_tag": c.per_tag}))
            }
            Request::Flows {
                filter,
                limit,
                after,
            } => {
                self.cache_user_names();
                let filter = filter.unwrap_or_default();
                // Otherwise a bad address matches nothing and looks like "no flows".
                filter.validate().map_err(|e| e.to_string())?;
                match limit {
                    None => self.all_flows(&filter),
                    Some(limit) => self.flows_page(filter, limit.max(1), after),
                }
            }
            Request::Flow { cookie } => {
                self.cache_user_names();
                let v = self
                    .table
                    .get(cookie)
                    .map(|f| {
                        let counts = self.maps.flow_count(&f.key).ok().flatten();
                        self.flow_view(f, counts, true)
                    })
                    .ok_or_else(|| format!("no flow with cookie {cookie}"))?;
                raw(&v)
            }
            Request::Reload {} => {
                let v = self.reload()?;
                raw(&json!({ "policy_version": v }))
            }
            Request::MarkAdd {
                flow,
                experiment,
                activity,
                entropy,
            } => {
                let key = flow.key()?;
                let tag = Tag::new(experiment, activity).map_err(|e| e.to_string())?;
                let entropy = entropy.unwrap_or_else(|| self.maps.entropy(&key));
                if entropy > 0x1f {
                    return Err(format!("entropy {entropy} does not fit 5 bits (0..=31)"));
                }
                MarkSink::insert(self.maps.as_ref(), &key, tag, entropy)
                    .map_err(|e| e.to_string())?;
                raw(&json!({"label": tag.label(entropy)}))
            }
            Request::MarkDel { flow } => {
                let key = flow.key()?;
                let removed =
                    MarkSink::remove(self.maps.as_ref(), &key).map_err(|e| e.to_string())?;
                raw(&json!({ "removed": removed }))
            }
        }
    }
}

mod listing;
mod reconcile;
mod reload;
pub mod views;

pub use self::reload::load_policy;
use self::reload::ReloadState;

/// Period of [`Engine::run`]'s housekeeping (the default reconcile interval).
const HOUSEKEEPING: Duration = Duration::from_secs(5);

/// An announced flow still without a socket this long after its announcement has
/// none here (see `Announcements::unseen`), whether or not a dump has run since: the
/// tracker reports a socket within milliseconds, and without it dumps run every
/// `discovery.reconcile_interval_ms` (5 s by default).
const UNSEEN_WAIT: Duration = Duration::from_secs(10);

fn raw<T: serde::Serialize>(v: &T) -> Result<Box<RawValue>, String> {
    to_raw_value(v).map_err(|e| e.to_string())
}

pub(crate) fn raw_bytes(out: Vec<u8>) -> Result<Box<RawValue>, String> {
    String::from_utf8(out)
        .map_err(|e| e.to_string())
        .and_then(|s| RawValue::from_string(s).map_err(|e| e.to_string()))
}

/// Hands the allocator's free pages back to the kernel. Bursts (thousands of
/// connections a second, a listing of every flow) leave free chunks scattered
/// between long-lived flow entries; glibc returns only the top of its heaps on its
/// own, so without this the daemon's RSS stays at its peak. Called after each
/// dump and, every 5 s, when flow events or a request allocated; trims only when
/// over a MiB is free: pages handed back are zeroed again when next touched.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallinfo2 and malloc_trim only read and reorganise glibc's own free
    // lists.
    unsafe {
        if libc::mallinfo2().fordblks > 1 << 20 {
            libc::malloc_trim(0);
        }
    }
}

#[cfg(test)]
mod tests;
