//! Who may use the daemon's local endpoints (the control socket, the announcement
//! pipe): one rule for both, so they cannot drift apart.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};

/// Gives `path` (one of the daemon's local entry points: the control socket, the
/// announcement pipe) to the daemon's user and `group` (config `control.group`) with
/// `mode`, so only root and that group may use it; a file found in place (a stale
/// pipe) is taken over whoever made it.
pub fn restrict_to_group(path: &Path, mode: u32, group: Option<&str>) -> Result<()> {
    let gid = match group {
        Some(g) => Some(
            nix::unistd::Group::from_name(g)
                .with_context(|| format!("looking up group {g}"))?
                .with_context(|| format!("control.group: no group named `{g}`"))?
                .gid,
        ),
        None => None,
    };
    nix::unistd::chown(path, Some(nix::unistd::geteuid()), gid)
        .with_context(|| format!("chown {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode of {}", path.display()))
}

/// The control socket's connection counts, kept by the server and shown by the
/// engine in `status` and `/metrics`.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    pub open: std::sync::atomic::AtomicUsize,
    pub refused: std::sync::atomic::AtomicU64,
    pub closed_idle: std::sync::atomic::AtomicU64,
}

impl ConnectionStats {
    pub fn view(&self) -> crate::api::view::ControlConnections {
        use std::sync::atomic::Ordering::Relaxed;
        crate::api::view::ControlConnections {
            open: self.open.load(Relaxed),
            refused: self.refused.load(Relaxed),
            closed_idle: self.closed_idle.load(Relaxed),
        }
    }
}
