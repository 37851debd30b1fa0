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
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use libbpf_rs::{Link, OpenObject, Program};
use nix::fcntl::{Flock, FlockArg};
use tracing::{info, warn};

use crate::marker::netif::Interface;

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

    /// Nothing pinned yet: no earlier instance to take over from.
    pub fn is_empty(&self) -> bool {
        std::fs::read_dir(&self.dir).map_or(true, |mut d| d.next().is_none())
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
pub fn remove_tree(path: &Path) {
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

/// Takes over the TCX link an earlier instance pinned on `iface`, swapping this
/// program in atomically. `None` (and the stale pin removed) when there is none,
/// or it is no longer usable (its interface was deleted and made again).
pub fn adopt_tcx(prog: &Program<'_>, iface: &Interface, pins: &Pins) -> Option<Link> {
    let path = pins.tcx_link(iface.index);
    if !path.exists() {
        return None;
    }
    let adopted = Link::open(&path).and_then(|mut link| {
        let info = link.info()?;
        match info.info {
            libbpf_rs::query::LinkTypeInfo::Tcx(t) if t.ifindex == iface.index => {}
            _ => {
                return Err(libbpf_rs::Error::from_raw_os_error(libc::ENOLINK));
            }
        }
        log_replacement(iface, Some(info.prog_id), prog);
        link.update_prog(prog)?;
        Ok(link)
    });
    match adopted {
        Ok(link) => Some(link),
        Err(e) => {
            warn!(interface = %iface.name, error = %e, "the pinned TCX link is unusable: attaching afresh");
            let _ = std::fs::remove_file(&path);
            None
        }
    }
}

/// Says whether the program taking over `iface` differs from the one running
/// there (program tags compared). Either way it replaces it atomically: equal
/// code may still run with another configuration (rodata).
pub fn log_replacement(iface: &Interface, old_id: Option<u32>, new: &Program<'_>) {
    let Some(old) = old_id.filter(|id| *id != 0).and_then(prog_tag) else {
        return;
    };
    let new = Program::id_from_fd(new.as_fd())
        .ok()
        .and_then(prog_tag)
        .unwrap_or_default();
    if old == new {
        info!(interface = %iface.name, tag = %new, "marker adopted: same program, swapped in atomically");
    } else {
        info!(interface = %iface.name, old_tag = %old, new_tag = %new, "marker adopted: program differs, replaced atomically");
    }
}

/// Points every shared map at its pin: libbpf then reuses the pinned map, or
/// creates and pins it. Says in the log which: adopted, new, or new because the
/// layout changed (then the old maps go once the new program runs, and marks
/// return with the first reconcile, the in-kernel decisions meanwhile).
pub fn share_pinned_maps(obj: &mut OpenObject, pins: &Pins) -> Result<SharedMaps> {
    let layout = layout(obj);
    let dir = pins.maps_dir(&layout);
    let others: Vec<String> = pins
        .map_layouts()
        .into_iter()
        .filter(|l| *l != layout)
        .collect();
    if dir.exists() {
        info!(maps = %dir.display(), "adopting the pinned marker maps: marks survive the restart");
    } else if !others.is_empty() {
        tracing::warn!(old = ?others, new = %layout, "marker map layout changed: new maps, the program is swapped atomically and marks are written again from the first reconcile");
    }
    let adopted = dir.exists();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for mut m in obj.maps_mut() {
        let name = m.name().to_string_lossy().into_owned();
        if shared(&name) {
            m.set_pin_path(dir.join(&name))
                .with_context(|| format!("pinning map {name}"))?;
        }
    }
    Ok(SharedMaps { layout, adopted })
}

/// Tests only (`FLOWD_TEST_MARKER_VARIANT=1`): stands in for an upgrade to a
/// binary whose marker program differs, with the same maps. The final `exit`
/// becomes `goto +0; exit`: the code, and so the program tag, differ; what it does
/// does not. Jumps to the old `exit` now land on the `goto`, and every relocation
/// points before it.
pub fn test_variant(prog: &mut libbpf_rs::OpenProgramMut<'_>) -> Result<()> {
    use libbpf_rs::AsRawLibbpf;
    const EXIT: u8 = (libbpf_sys::BPF_JMP | libbpf_sys::BPF_EXIT) as u8;
    const JA: u8 = (libbpf_sys::BPF_JMP | libbpf_sys::BPF_JA) as u8;
    let mut insns = prog.insns().to_vec();
    let Some(last) = insns.last().copied().filter(|i| i.code == EXIT) else {
        anyhow::bail!("FLOWD_TEST_MARKER_VARIANT: flowd_mark does not end in exit");
    };
    let n = insns.len();
    insns[n - 1] = libbpf_sys::bpf_insn {
        code: JA,
        ..Default::default()
    };
    insns.push(last);
    // SAFETY: the object is open, not loaded; libbpf copies the instructions.
    let rc = unsafe {
        libbpf_sys::bpf_program__set_insns(
            prog.as_libbpf_object().as_ptr(),
            insns.as_mut_ptr(),
            insns.len() as _,
        )
    };
    anyhow::ensure!(rc == 0, "FLOWD_TEST_MARKER_VARIANT: set_insns: {rc}");
    tracing::warn!("FLOWD_TEST_MARKER_VARIANT=1: loading the test variant of the marker program");
    Ok(())
}

/// The maps a load shares through pins.
#[derive(Debug, Clone)]
pub struct SharedMaps {
    /// Their layout (see [`layout`]).
    pub layout: String,
    /// They were pinned already: an earlier instance's, marks included.
    pub adopted: bool,
}
