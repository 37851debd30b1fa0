//! The marker's state pinned in a bpf filesystem, so that a restart or an upgrade
//! hands marking over instead of leaving a gap.
//!
//! Layout, one directory per network namespace (tests run many daemons in many
//! namespaces on one host):
//!
//! ```text
//! <marker.pin_dir>/net<netns inode>/
//!     tcx-<ifindex>          the TCX link on that interface (kernels >= 6.6)
//!     maps-<layout>/<map>    the maps the program shares with the daemon
//! ```
//!
//! A clsact filter needs no pin: the kernel keeps it, and its program, until it is
//! removed. `<layout>` names the maps' shapes (see [`layout`]): a daemon whose maps
//! have another shape cannot share them and creates its own next to the old ones,
//! which go once its program has replaced the old one.

use std::fs::File;
use std::hash::Hasher;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::Result;
use libbpf_rs::OpenObject;
use nix::fcntl::{Flock, FlockArg};
use tracing::{info, warn};

/// Bump when a struct the daemon and the program share through a map changes its
/// meaning without changing its size (the sizes are part of the layout already).
const MAP_LAYOUT_VERSION: u32 = 1;

/// `statfs` magic of a bpf filesystem.
const BPF_FS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0xcafe_4a11);

/// This network namespace's pin directory, locked for as long as this lives.
#[derive(Debug)]
pub struct Pins {
    dir: PathBuf,
    _lock: Flock<File>,
}

impl Pins {
    /// Opens (creating it) `<base>/net<netns_ino>` and locks it. `Ok(None)` when
    /// pinning is off (`base` empty) or `base` is not on a bpf filesystem: then a
    /// warning says restarts will leave a gap.
    pub fn open(base: &Path, netns_ino: u32) -> Result<Option<Pins>> {
        if base.as_os_str().is_empty() {
            return Ok(None);
        }
        let dir = base.join(format!("net{netns_ino}"));
        let probe = if base.exists() {
            base
        } else {
            base.parent().unwrap_or(base)
        };
        if !is_bpffs(probe) {
            warn!(pin_dir = %base.display(), "not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf): marker state not pinned, so a restart detaches and re-attaches, leaving a gap");
            return Ok(None);
        }
        // Unprivileged (the packaged unit), the base comes from tmpfiles.d; without
        // it the daemon still runs, unpinned.
        let f = match std::fs::create_dir_all(&dir).and_then(|()| File::open(&dir)) {
            Ok(f) => f,
            Err(e) => {
                warn!(pin_dir = %dir.display(), error = %e, "cannot use the pin directory: marker state not pinned, so a restart detaches and re-attaches, leaving a gap");
                return Ok(None);
            }
        };
        let lock = Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            anyhow::anyhow!(
                "another flowd-rs daemon holds the pinned marker in {} ({e}): one daemon marks an interface",
                dir.display()
            )
        })?;
        Ok(Some(Pins { dir, _lock: lock }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the TCX link on `ifindex` is pinned.
    pub fn tcx_link(&self, ifindex: u32) -> PathBuf {
        self.dir.join(format!("tcx-{ifindex}"))
    }

    /// Interfaces with a pinned TCX link.
    pub fn tcx_ifindexes(&self) -> Vec<u32> {
        self.entries("tcx-")
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect()
    }

    pub fn maps_dir(&self, layout: &str) -> PathBuf {
        self.dir.join(format!("maps-{layout}"))
    }

    /// Layouts whose maps are pinned.
    pub fn map_layouts(&self) -> Vec<String> {
        self.entries("maps-")
    }

    /// Removes the maps of every layout but `keep` (their program is gone).
    pub fn remove_other_layouts(&self, keep: &str) {
        for l in self.map_layouts() {
            if l != keep {
                remove_tree(&self.maps_dir(&l));
            }
        }
    }

    /// Removes every pin, and the directory. A TCX link whose last pin and
    /// descriptor go is detached by the kernel.
    pub fn remove_all(self) {
        remove_tree(&self.dir);
    }

    fn entries(&self, prefix: &str) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix(prefix)
                    .map(String::from)
            })
            .collect()
    }
}

/// Which of the open object's maps are pinned: all but the internal ones
/// (rodata, bss: each program's own configuration, set again at every load).
pub fn shared(name: &str) -> bool {
    !name.contains('.')
}

/// The shape of the shared maps (type, key and value size, entries, flags of each,
/// and [`MAP_LAYOUT_VERSION`]), as 16 hex digits: two daemons can share maps only
/// when this is equal (libbpf would refuse the pinned map otherwise).
pub fn layout(obj: &OpenObject) -> String {
    let mut h = std::hash::DefaultHasher::new();
    h.write_u32(MAP_LAYOUT_VERSION);
    let mut maps: Vec<_> = obj
        .maps()
        .filter(|m| shared(&m.name().to_string_lossy()))
        .map(|m| {
            (
                m.name().to_string_lossy().into_owned(),
                m.map_type() as u32,
                m.key_size(),
                m.value_size(),
                m.max_entries(),
                m.map_flags(),
            )
        })
        .collect();
    maps.sort();
    for (name, ty, k, v, n, f) in maps {
        h.write(name.as_bytes());
        for x in [ty, k, v, n, f] {
            h.write_u32(x);
        }
    }
    format!("{:016x}", h.finish())
}

/// Whether `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Removes `path` and everything below it; a missing path is fine.
fn remove_tree(path: &Path) {
    match std::fs::remove_dir_all(path) {
        Ok(()) => info!(path = %path.display(), "pins removed"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!(path = %path.display(), error = %e, "removing pins failed"),
    }
}

/// The tag (instruction hash) of program `id`, as hex.
pub fn prog_tag(id: u32) -> Option<String> {
    libbpf_rs::query::ProgInfoIter::default()
        .find(|p| p.id == id)
        .map(|p| p.tag.0.iter().map(|b| format!("{b:02x}")).collect())
}
