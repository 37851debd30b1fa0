//! The daemon's single owner of state: it applies discovery to the flow table, turns
//! flow events into marks through the policy, and answers the control socket.
//!
//! Everything that changes the flow table or the marks happens on this one task, so
//! no lock guards them and no update is half applied.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::control::{DaemonInfo, Request};
use crate::discovery::feeds::{Discovery, TrackerStatus};
use crate::discovery::procfs::ProcResolver;
use crate::flows::{Flow, FlowEvent, FlowTable, FlowTableConfig};
use crate::marker::label::Tag;
use crate::marker::maps::{MarkMaps, OUTCOMES};
use crate::marking::{MarkSink, Marking};
use crate::policy::{Policy, Registry};

/// A control request and where its answer goes.
pub struct ControlCall {
    pub request: Request,
    pub reply: oneshot::Sender<Result<Value, String>>,
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
    maps: Arc<MarkMaps>,
    procs: ProcResolver,
    info: Arc<DaemonInfo>,
    tracker: Arc<TrackerStatus>,
    started: Instant,
    reloads_ok: u64,
    reloads_failed: u64,
    last_poll: Duration,
    users: HashMap<u32, Option<String>>,
}

/// Loads the policy directory; a missing directory is an empty policy (with a
/// warning), a broken one an error listing every problem.
pub fn load_policy(dir: &Path, registry: &Registry) -> Result<Policy, String> {
    if !dir.exists() {
        warn!(dir = %dir.display(), "policy directory does not exist: no flow will be marked");
        return Policy::from_sources(&[], registry).map_err(|e| e.to_string());
    }
    Policy::load_dir(dir, registry).map_err(|e| e.to_string())
}

impl Engine {
    pub fn new(
        local_netns: u64,
        policy: Policy,
        policy_dir: &Path,
        registry: Registry,
        maps: Arc<MarkMaps>,
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
            info,
            tracker,
            started: Instant::now(),
            reloads_ok: 0,
            reloads_failed: 0,
            last_poll: Duration::ZERO,
            users: HashMap::new(),
        }
    }

    /// Runs until both channels close; returns so the caller can tear down.
    pub async fn run(
        mut self,
        mut discovery: mpsc::Receiver<Discovery>,
        mut commands: mpsc::Receiver<Command>,
    ) {
        loop {
            tokio::select! {
                d = discovery.recv() => match d {
                    Some(d) => self.on_discovery(d),
                    None => break,
                },
                c = commands.recv() => match c {
                    Some(Command::Control(call)) => {
                        let answer = self.answer(call.request);
                        let _ = call.reply.send(answer);
                    }
                    Some(Command::Reload) => { let _ = self.reload(); }
                    None => break,
                },
            }
        }
        self.remove_all_marks();
    }

    fn on_discovery(&mut self, d: Discovery) {
        let events = match d {
            Discovery::Observed(obs) => self.table.apply_observation(obs),
            Discovery::Dumped(dump) => {
                self.last_poll = dump.stats.last_dump_duration;
                match dump.result {
                    Ok(()) => {
                        self.table.note_dump_duration(dump.stats.last_dump_duration);
                        let events = self.table.reconcile(&dump.sockets, dump.started);
                        self.apply(events);
                        self.marking.retry_unmapped(self.maps.as_ref());
                        return;
                    }
                    Err(e) => {
                        self.table.note_dump_error();
                        warn!(error = %e, "sock_diag dump incomplete: not reconciling this round");
                        Vec::new()
                    }
                }
            }
        };
        self.apply(events);
    }

    fn apply(&mut self, events: Vec<FlowEvent>) {
        if events.is_empty() {
            return;
        }
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
        }
        for ev in events {
            match ev {
                FlowEvent::Started(f) | FlowEvent::Updated(f) => {
                    let procs = &mut self.procs;
                    let mut lookup = |f: &Flow| procs.lookup(f.inode).ok().flatten();
                    self.marking
                        .on_flow(&f, &policy, self.maps.as_ref(), &mut lookup)
                }
                FlowEvent::Ended(f, _) => {
                    self.marking.on_end(&f, self.maps.as_ref());
                    if f.inode != 0 {
                        self.procs.forget(f.inode);
                    }
                }
            }
        }
    }

    /// Parses and validates the whole directory, then swaps atomically and
    /// re-decides every live flow; on error the old policy stays.
    pub fn reload(&mut self) -> Result<String, String> {
        match load_policy(&self.policy_dir, &self.registry) {
            Ok(p) => {
                self.policy = Arc::new(p);
                self.reloads_ok += 1;
                let flows: Vec<Arc<Flow>> =
                    self.table.iter().map(|f| Arc::new(f.clone())).collect();
                self.apply(flows.into_iter().map(FlowEvent::Updated).collect());
                info!(
                    version = self.policy.version(),
                    rules = self.policy.rules().len(),
                    "policy reloaded"
                );
                Ok(self.policy.version().to_string())
            }
            Err(e) => {
                self.reloads_failed += 1;
                warn!(errors = %e, "policy reload failed: keeping the previous policy");
                Err(format!("policy reload failed, previous policy kept:\n{e}"))
            }
        }
    }

    fn remove_all_marks(&mut self) {
        let flows: Vec<Flow> = self.table.iter().cloned().collect();
        for f in flows {
            self.marking.on_end(&f, self.maps.as_ref());
        }
    }

    fn answer(&mut self, req: Request) -> Result<Value, String> {
        match req {
            Request::Status {} => Ok(self.status()),
            Request::Counters {} => {
                let c = self.maps.counters().map_err(|e| e.to_string())?;
                let outcomes: serde_json::Map<String, Value> = OUTCOMES
                    .iter()
                    .zip(c.outcomes)
                    .map(|(n, v)| (n.to_string(), json!(v)))
                    .collect();
                Ok(json!({"outcomes": outcomes, "per_tag": c.per_tag}))
            }
            Request::Flows { filter } => {
                let mut flows: Vec<Value> = Vec::with_capacity(self.table.len());
                for f in self.table.iter() {
                    let v = self.flow_view(f);
                    if filter.as_ref().is_none_or(|flt| flt.matches(&v)) {
                        flows.push(v);
                    }
                }
                Ok(json!({ "flows": flows }))
            }
            Request::Flow { cookie } => self
                .table
                .get(cookie)
                .map(|f| self.flow_view(f))
                .ok_or_else(|| format!("no flow with cookie {cookie}")),
            Request::Reload {} => self.reload().map(|v| json!({ "policy_version": v })),
            Request::MarkAdd {
                flow,
                experiment,
                activity,
                entropy,
            } => {
                let key = flow.key()?;
                let tag = Tag::new(experiment, activity).map_err(|e| e.to_string())?;
                let entropy = entropy.unwrap_or_else(|| rand::random::<u8>() & 0x1f);
                if entropy > 0x1f {
                    return Err(format!("entropy {entropy} does not fit 5 bits (0..=31)"));
                }
                MarkSink::insert(self.maps.as_ref(), &key, tag, entropy)
                    .map_err(|e| e.to_string())?;
                Ok(json!({"label": tag.label(entropy)}))
            }
            Request::MarkDel { flow } => {
                let key = flow.key()?;
                let removed =
                    MarkSink::remove(self.maps.as_ref(), &key).map_err(|e| e.to_string())?;
                Ok(json!({ "removed": removed }))
            }
        }
    }

    fn user_name(&mut self, uid: u32) -> Option<String> {
        self.users
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .clone()
    }

    fn flow_view(&self, f: &Flow) -> Value {
        crate::view::flow(f, self.marking.decision(f.cookie), &self.registry, |uid| {
            // Status output must not block on NSS for every row: names come from
            // the cache the engine fills on status requests.
            self.users.get(&uid).cloned().flatten()
        })
    }

    fn status(&mut self) -> Value {
        let uids: Vec<u32> = self.table.iter().filter_map(|f| f.owner.uid).collect();
        for uid in uids {
            self.user_name(uid);
        }
        let counters = self.maps.counters().ok();
        let fc = self.table.counters();
        let mc = self.marking.counters();
        json!({
            "version": self.info.version,
            "pid": self.info.pid,
            "uptime_secs": self.started.elapsed().as_secs_f64(),
            "strategy": self.info.strategy,
            "attached": self.info.attached,
            "policy_version": self.policy.version(),
            "policy_rules": self.policy.rules().len(),
            "policy_first_packet_exact_rules": self.policy.rules().filter(|r| r.kernel_decidable()).count(),
            "flows_total": self.table.len(),
            "flows_tagged": mc.tagged,
            "flows_tagged_total": mc.tagged_total,
            "map_entries": self.maps.len(),
            "map_capacity": self.maps.capacity(),
            "map_full_total": mc.map_full,
            "outcomes": counters.as_ref().map(|c| {
                OUTCOMES.iter().zip(c.outcomes).map(|(n, v)| (n.to_string(), json!(v))).collect::<serde_json::Map<_, _>>()
            }),
            "per_tag": counters.map(|c| c.per_tag),
            "ringbuf_drops": self.tracker.drops.load(Ordering::Relaxed),
            "tracker_features": format!("{:?}", self.tracker.features.lock().unwrap()),
            "reconcile_added": fc.reconcile_added,
            "reconcile_ended": fc.reconcile_ended,
            "flows_started": fc.flows_started,
            "flows_ended": fc.flows_ended,
            "dump_errors": fc.dump_errors,
            "last_poll_ms": self.last_poll.as_secs_f64() * 1000.0,
            "policy_reloads_ok": self.reloads_ok,
            "policy_reloads_failed": self.reloads_failed,
        })
    }
}
