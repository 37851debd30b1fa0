//! `flowd-rs run`: starts the marker and the control socket, then waits for a signal
//! and takes everything down again, leaving the interfaces as they were found.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

use crate::config::Config;
use crate::control::{DaemonInfo, Server};
use crate::marker::Marker;

/// Holds `<state_dir>/lock` for the daemon's life: one daemon per state directory,
/// and `clean` can tell whether one is running.
pub struct InstanceLock {
    _lock: Flock<File>,
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
        Ok(InstanceLock { _lock: lock })
    }
}

pub async fn run(cfg: Config) -> Result<()> {
    let _lock = InstanceLock::acquire(&cfg.state_dir)?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;

    let marker = Marker::start(&cfg).await?;
    let info = Arc::new(DaemonInfo {
        version: env!("CARGO_PKG_VERSION"),
        pid: std::process::id(),
        strategy: marker.strategy().to_string(),
        attached: marker.attachments(),
    });
    let socket = cfg.control_socket();
    let server = match Server::bind(&socket, cfg.control.group.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            marker.stop().await;
            return Err(e);
        }
    };
    let control = tokio::spawn(server.serve(marker.maps(), info.clone()));
    info!(strategy = %info.strategy, interfaces = ?info.attached, "flowd-rs running");

    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM: shutting down"),
        _ = sigint.recv() => info!("SIGINT: shutting down"),
    }
    control.abort();
    let _ = std::fs::remove_file(&socket);
    marker.stop().await;
    info!("flowd-rs stopped; interfaces left as found");
    Ok(())
}

/// `flowd-rs clean`: removes what a crashed instance left on the interfaces.
pub async fn clean(cfg: Config) -> Result<()> {
    let _lock = InstanceLock::acquire(&cfg.state_dir)?;
    let rtnl = crate::marker::netif::connect()?;
    let state = crate::marker::attach::StateFile::new(&cfg.state_dir);
    let report = crate::marker::attach::clean(&rtnl, &state).await?;
    let _ = std::fs::remove_file(cfg.control_socket());
    if report.filters_removed.is_empty() && report.qdiscs_removed.is_empty() {
        println!("nothing to clean");
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
