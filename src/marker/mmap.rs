//! Shared mappings of the marker's BPF_F_MMAPABLE arrays: what userspace writes
//! with plain stores and atomics instead of a syscall per change.

use std::os::fd::AsFd;
use std::ptr::NonNull;

use anyhow::{Context, Result};
use libbpf_rs::MapHandle;

/// A shared mapping of an mmapable BPF array, unmapped on drop.
pub struct Mapping {
    pub ptr: NonNull<u8>,
    len: usize,
}

// The mapping is reached through volatile and atomic accesses only, by one writer.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `bytes` of `h`'s data (rounded up to whole pages).
    pub fn map(h: &MapHandle, bytes: usize) -> Result<Mapping> {
        use nix::sys::mman::{mmap, MapFlags, ProtFlags};
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as usize;
        let len = bytes.div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of the map's data; nothing else in this
        // process aliases it, and it is unmapped only in Drop.
        let ptr = unsafe {
            mmap(
                None,
                std::num::NonZeroUsize::new(len).context("empty map")?,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                h.as_fd(),
                0,
            )
        }?;
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped in `map` with this length, unmapped once.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) };
    }
}
