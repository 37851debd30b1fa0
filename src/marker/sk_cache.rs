//! Userspace side of the per-socket lookup cache (bpf/flowd.h, "Per-socket lookup
//! cache"): the generation that invalidates it, and the packet counts it holds.
//!
//! The TC program keeps each local socket's last flow-map lookup in the socket's
//! local storage. Userspace cannot reach that storage by key (it is indexed by
//! socket fds we do not own), so it touches the cache only two ways: it bumps
//! `flowd_cache_gen` after every change to `flowd_marks`, and before reading counts
//! it runs the `flowd_cache_counts` iterator, which moves the counts taken through
//! each socket's cache into its flow's entry in `flowd_marks`.

use std::io::Read;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use anyhow::{Context, Result};
use libbpf_rs::{Link, MapHandle};

use crate::bpf::marker::types::flowd_sk_cache;
use crate::marker::mmap::Mapping;

// SAFETY: generated from bpf/flowd.h, where every field is explicit (no padding);
// the layout test below pins it.
// SAFETY: a padding-free repr(C) struct of integers (see marker::maps).
unsafe impl plain::Plain for flowd_sk_cache {}

pub struct SocketCache {
    generation: MappedGeneration,
    /// The iterator program attached to the cache map; each read walks every
    /// socket's entry once. A Mutex: a link is not Sync.
    counts: Mutex<Link>,
}

impl SocketCache {
    pub fn new(
        generation: &MapHandle,
        iter_prog: &libbpf_rs::ProgramMut<'_>,
        cache_map: &libbpf_rs::MapMut<'_>,
    ) -> Result<SocketCache> {
        let link = iter_prog
            .attach_iter(cache_map.as_fd())
            .context("attaching the socket-cache count iterator")?;
        Ok(SocketCache {
            generation: MappedGeneration::map(generation)?,
            counts: Mutex::new(link),
        })
    }

    /// Makes every cached lookup stale: called after each change to `flowd_marks`,
    /// so the next packet of every socket looks its flow up again.
    pub fn invalidate(&self) {
        self.generation.bump();
    }

    /// Moves the packets and bytes counted through every socket's cache into the
    /// flow entries of `flowd_marks` (counts of sockets closed since the last call
    /// are gone with their socket).
    pub fn fold_counts(&self) -> Result<()> {
        let link = self.counts.lock().unwrap();
        // The program writes no output: one read runs it over every socket.
        libbpf_rs::Iter::new(&link)
            .and_then(|mut it| {
                it.read_to_end(&mut Vec::new())
                    .map_err(libbpf_rs::Error::from)
            })
            .context("running the socket-cache count iterator")?;
        Ok(())
    }
}

/// `flowd_cache_gen[0]`, mapped into our memory (the map is BPF_F_MMAPABLE): a bump
/// is one atomic add, not a syscall, so it can follow every map change.
struct MappedGeneration(Mapping);

impl MappedGeneration {
    fn map(h: &MapHandle) -> Result<MappedGeneration> {
        Ok(MappedGeneration(
            Mapping::map(h, std::mem::size_of::<u32>()).context("mapping flowd_cache_gen")?,
        ))
    }

    fn bump(&self) {
        // SAFETY: a 4-byte aligned u32 at the start of the mapping, which lives as
        // long as self; the program only reads it.
        unsafe { AtomicU32::from_ptr(self.0.ptr.cast::<u32>().as_ptr()) }
            .fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn cache_entry_layout_matches_flowd_h() {
        assert_eq!(size_of::<flowd_sk_cache>(), 80);
        assert_eq!(offset_of!(flowd_sk_cache, marked), 4);
        assert_eq!(offset_of!(flowd_sk_cache, key), 8);
        assert_eq!(offset_of!(flowd_sk_cache, mark), 48);
    }
}
