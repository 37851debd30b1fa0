//! Policy reloads (SIGHUP, `flowd-rs reload`): the directory is read and validated
//! off the engine's task, and the engine alone swaps the result in.

use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::{raw, Engine};
use crate::flows::{Flow, FlowEvent};
use crate::policy::{Policy, Registry};

type PolicyLoader = Arc<dyn Fn(&Path, &Registry) -> Result<Policy, String> + Send + Sync>;

/// Where a reload's outcome goes: a control client, or nobody (SIGHUP).
type ReloadReply = Option<oneshot::Sender<Result<Box<RawValue>, String>>>;

/// Reloads read the policy directory on a blocking thread, so that a slow or stuck
/// filesystem never stops the engine from marking and answering; the parsed policy
/// comes back to the engine, which alone swaps it in.
pub(super) struct ReloadState {
    /// Reads and validates the policy directory ([`load_policy`]; tests stall it).
    pub(super) load: PolicyLoader,
    /// Answers owed when the load under way completes.
    pub(super) in_flight: Option<Vec<ReloadReply>>,
    /// Asked for while a load was under way: one more load follows it, since the
    /// files may have changed after it read them.
    pub(super) queued: Option<Vec<ReloadReply>>,
}

/// Loads the policy directory; a missing directory is an empty policy (with a
/// warning), a broken one an error listing every problem.
pub fn load_policy(dir: &Path, registry: &Registry) -> Result<Policy, String> {
    if !dir.exists() {
        warn!(dir = %dir.display(), "no policies: nothing is tagged (the policy directory does not exist)");
        return Policy::from_sources(&[], registry).map_err(|e| e.to_string());
    }
    let p = Policy::load_dir(dir, registry).map_err(|e| e.to_string())?;
    if p.rules().len() == 0 {
        // A fresh install: the examples ship disabled (*.toml.example).
        warn!(dir = %dir.display(), "no policies: nothing is tagged (no rule in any *.toml file)");
    }
    Ok(p)
}

impl Engine {
    /// Parses and validates the whole directory, then swaps atomically and
    /// re-decides every live flow; on error the old policy stays. Synchronous: the
    /// running engine reloads through [`Engine::begin_reload`].
    pub fn reload(&mut self) -> Result<String, String> {
        crate::notify::reloading();
        let r = self.swap_policy((self.reloads.load)(&self.policy_dir, &self.registry));
        crate::notify::ready(&format!("marking, policy {}", self.policy.version()));
        r
    }

    /// Starts reading the policy directory on a blocking thread, or, when a read is
    /// already under way, queues one more after it.
    pub(super) fn begin_reload(
        &mut self,
        reply: ReloadReply,
        loaded: &mpsc::Sender<Result<Policy, String>>,
    ) {
        if self.reloads.in_flight.is_some() {
            self.reloads.queued.get_or_insert_with(Vec::new).push(reply);
            return;
        }
        crate::notify::reloading();
        self.reloads.in_flight = Some(vec![reply]);
        let (dir, registry, loaded, load) = (
            self.policy_dir.clone(),
            self.registry.clone(),
            loaded.clone(),
            self.reloads.load.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let _ = loaded.blocking_send(load(&dir, &registry));
        });
    }

    /// Swaps in what a background read produced and answers everyone who waited.
    pub(super) fn finish_reload(
        &mut self,
        loaded: Result<Policy, String>,
        again: &mpsc::Sender<Result<Policy, String>>,
    ) {
        let r = self.swap_policy(loaded);
        crate::notify::ready(&format!("marking, policy {}", self.policy.version()));
        for reply in self
            .reloads
            .in_flight
            .take()
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = reply.send(r.clone().and_then(|v| raw(&json!({ "policy_version": v }))));
        }
        if let Some(queued) = self.reloads.queued.take() {
            let mut queued = queued.into_iter();
            if let Some(first) = queued.next() {
                self.begin_reload(first, again);
                self.reloads
                    .in_flight
                    .as_mut()
                    .expect("begin_reload set it")
                    .extend(queued);
            }
        }
    }

    fn swap_policy(&mut self, loaded: Result<Policy, String>) -> Result<String, String> {
        match loaded {
            Ok(p) => {
                self.policy = Arc::new(p);
                self.denied_warned.clear();
                self.install_kernel_policy();
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
}
