//! Userspace side of the flow index (bpf/flowd.h, "Flow index"): the copy of
//! `flowd_marks` that the TC program reads without a hash-map call.
//!
//! Only this module writes the index, through a shared mapping of its two maps
//! (both BPF_F_MMAPABLE), never through syscalls: each slot carries a sequence count
//! that is odd while we rewrite it, and the program looks a packet up in
//! `flowd_marks` instead when it sees the count odd or changed. That is a seqlock
//! whose reader relies on the CPU keeping loads in order (x86 does; BPF has no load
//! barrier before Linux 6.15), so the index is only used on x86_64 (see
//! [`supported`]).
//!
//! The invariant that makes a miss in the index final: every mark in `flowd_marks`
//! that the index may lack is counted in `flowd_index_head.unindexed` from before it
//! can be found until it is indexed or gone. The BPF side counts its in-kernel
//! inserts; [`crate::marker::maps::MarkMaps`] counts its own writes around each map
//! change. A lost race can only leave the count high (lookups then double-check in
//! `flowd_marks`), never low.

use std::ptr::addr_of_mut;
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::sync::Mutex;

use anyhow::{Context, Result};
use libbpf_rs::MapHandle;

use crate::bpf::marker::types::{
    flowd_flow_key, flowd_flow_mark, flowd_index_bucket, flowd_index_head, flowd_index_limits,
    flowd_index_slot,
};
use crate::marker::maps::as_bytes;
use crate::marker::mmap::Mapping;

/// Slots per bucket (FLOWD_INDEX_WAYS in bpf/flowd.h).
pub const WAYS: u32 = flowd_index_limits::FLOWD_INDEX_WAYS.0;
const SEEDS: usize = flowd_index_limits::FLOWD_INDEX_SEEDS.0 as usize;

/// The hash's multipliers, as in bpf/flow_index.bpf.h (IDX_K0..IDX_K5).
const K: [u64; 6] = [
    0x6a09_e667_f3bc_c909,
    0xbb67_ae85_84ca_a73b,
    0x3c6e_f372_fe94_f82b,
    0xa54f_f53a_5f1d_36f1,
    0x510e_527f_ade6_82d1,
    0x243f_6a88_85a3_08d3,
];

/// Whether this build can use the index: the BPF reader's sequence check needs a CPU
/// that keeps loads in order.
pub fn supported() -> bool {
    cfg!(target_arch = "x86_64")
}

/// Buckets for a marker map of `capacity` flows: two slots per flow, rounded up to a
/// power of two (the program takes the hash's top bits). With one slot per flow a
/// full map would leave about a third of the buckets overflowing (four ways, four
/// flows per bucket on average), and every lookup that lands in one asks
/// `flowd_marks` too; with two, about one in twenty at a full map, one in three
/// hundred at half.
pub fn buckets_for(capacity: u32) -> u32 {
    (capacity.max(1).next_power_of_two() * 2 / WAYS).max(1)
}

/// The shift that leaves the hash's top log2(buckets) bits (flowd_index_shift).
pub fn shift_for(mask: u32) -> u32 {
    64 - mask.count_ones().max(1)
}

/// The bucket of `key` (bpf/flow_index.bpf.h, flowd_index_bucket_of): the key read
/// as five native-endian 8-byte words, as the program loads them.
pub fn bucket_of(seeds: &[u64; SEEDS], key: &flowd_flow_key, mask: u32) -> u32 {
    let b = as_bytes(key);
    let mut h = 0u64;
    for (i, w) in b.chunks_exact(8).enumerate() {
        let w = u64::from_ne_bytes(w.try_into().unwrap());
        let m = (w ^ seeds[i]).wrapping_mul(K[i]);
        h = h.wrapping_add(m ^ (m >> 32));
    }
    h ^= h >> 29;
    h = h.wrapping_mul(K[5]);
    (h >> shift_for(mask)) as u32 & mask
}

pub struct FlowIndex {
    buckets: Mapping,
    head: Mapping,
    mask: u32,
    seeds: [u64; SEEDS],
    /// One writer at a time: the sequence counts assume it.
    writer: Mutex<()>,
}

impl FlowIndex {
    /// Maps the index of `buckets` buckets and its head. Maps new to this boot get
    /// their seeds drawn now (before any mark is written, so no slot is placed under
    /// other seeds); adopted maps keep theirs with their contents.
    pub fn new(index: &MapHandle, head: &MapHandle, buckets: u32) -> Result<FlowIndex> {
        let size = std::mem::size_of::<flowd_index_bucket>() * buckets as usize;
        let buckets_map = Mapping::map(index, size).context("mapping flowd_index")?;
        let head_map = Mapping::map(head, std::mem::size_of::<flowd_index_head>())
            .context("mapping flowd_index_head")?;
        let mut ix = FlowIndex {
            buckets: buckets_map,
            head: head_map,
            mask: buckets - 1,
            seeds: [0; SEEDS],
            writer: Mutex::new(()),
        };
        let head = ix.head.ptr.cast::<flowd_index_head>().as_ptr();
        // SAFETY: the mapping holds one flowd_index_head; seeds are written only
        // here, by the one daemon that holds the pin lock.
        unsafe {
            let mut seeds = std::ptr::read_volatile(&(*head).seed);
            if seeds == [0; SEEDS] {
                seeds = std::array::from_fn(|_| rand::random::<u64>() | 1);
                std::ptr::write_volatile(&mut (*head).seed, seeds);
            }
            ix.seeds = seeds;
        }
        // A daemon that died in the middle of a write left its slot odd: readers
        // would skip it forever. Whatever it held is counted as unindexed (every
        // write is), so freeing it loses nothing.
        for b in 0..=ix.mask {
            for w in 0..WAYS {
                let slot = ix.slot(b, w);
                if ix.seq(slot).load(Ordering::Relaxed) & 1 == 1 {
                    ix.seq(slot).fetch_add(1, Ordering::Relaxed);
                    ix.free(slot);
                }
            }
        }
        Ok(ix)
    }

    pub fn buckets(&self) -> u32 {
        self.mask + 1
    }

    /// The bucket `key` goes to under this index's seeds.
    pub fn bucket(&self, key: &flowd_flow_key) -> u32 {
        bucket_of(&self.seeds, key, self.mask)
    }

    fn slot(&self, bucket: u32, way: u32) -> *mut flowd_index_slot {
        debug_assert!(bucket <= self.mask && way < WAYS);
        let b = self.buckets.ptr.cast::<flowd_index_bucket>().as_ptr();
        // SAFETY: bucket <= mask < the mapped bucket count.
        unsafe { std::ptr::addr_of_mut!((*b.add(bucket as usize)).way[way as usize]) }
    }

    /// The sequence count of `slot`, a slot of this index's mapping.
    fn seq(&self, slot: *mut flowd_index_slot) -> &AtomicU32 {
        // SAFETY: seq is a 4-byte aligned u32 at the start of a slot of the mapping,
        // which lives as long as self.
        unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*slot).seq)) }
    }

    /// The ways of `key`'s bucket.
    fn ways(&self, key: &flowd_flow_key) -> [*mut flowd_index_slot; WAYS as usize] {
        let b = bucket_of(&self.seeds, key, self.mask);
        std::array::from_fn(|w| self.slot(b, w as u32))
    }

    /// The key `slot` holds (family 0: free).
    fn key_at(slot: *mut flowd_index_slot) -> flowd_flow_key {
        // SAFETY: a slot of the mapping; only this writer changes keys, and callers
        // hold the writer lock or accept a stale answer.
        unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*slot).key)) }
    }

    /// The way of `key`'s bucket that holds it.
    fn find(&self, key: &flowd_flow_key) -> Option<*mut flowd_index_slot> {
        self.ways(key)
            .into_iter()
            .find(|&s| as_bytes(&Self::key_at(s)) == as_bytes(key))
    }

    pub fn contains(&self, key: &flowd_flow_key) -> bool {
        self.find(key).is_some()
    }

    /// Writes `mark` for `key`: into the way that holds `key` (its counts kept) or a
    /// free one (counts from zero). False when every way holds another flow.
    pub fn place(&self, key: &flowd_flow_key, mark: &flowd_flow_mark) -> bool {
        let _w = self.writer.lock().unwrap();
        let ways = self.ways(key);
        let same = ways
            .into_iter()
            .find(|&s| as_bytes(&Self::key_at(s)) == as_bytes(key));
        let Some(slot) = same.or_else(|| ways.into_iter().find(|&s| Self::key_at(s).family == 0))
        else {
            return false;
        };
        let same = same.is_some();
        // SAFETY (the closures): field pointers into a slot of the mapping.
        self.rewrite(slot, |s| unsafe {
            if !same {
                put(addr_of_mut!((*s).key), *key);
                put(addr_of_mut!((*s).packets), 0);
                put(addr_of_mut!((*s).bytes), 0);
            }
            put(addr_of_mut!((*s).counter_slot), mark.counter_slot);
            put(addr_of_mut!((*s).label), mark.label);
            put(addr_of_mut!((*s).experiment), mark.experiment);
            put(addr_of_mut!((*s).activity), mark.activity);
            put(addr_of_mut!((*s).flags), mark.flags);
        });
        true
    }

    /// Frees the way that holds `key`; false if none did.
    pub fn clear(&self, key: &flowd_flow_key) -> bool {
        let _w = self.writer.lock().unwrap();
        let Some(slot) = self.find(key) else {
            return false;
        };
        self.free(slot);
        true
    }

    fn free(&self, slot: *mut flowd_index_slot) {
        // SAFETY: as in `place`.
        self.rewrite(slot, |s| unsafe {
            put(addr_of_mut!((*s).key), flowd_flow_key::default());
            put(addr_of_mut!((*s).packets), 0);
            put(addr_of_mut!((*s).bytes), 0);
        });
    }

    /// Changes a slot under its sequence count: odd before the first store of `f`,
    /// even (and two higher) after its last. Counts are only stored when the slot
    /// changes flows: a rewrite of the same flow leaves the program's adds alone.
    fn rewrite(&self, slot: *mut flowd_index_slot, f: impl FnOnce(*mut flowd_index_slot)) {
        let seq = self.seq(slot);
        let s = seq.load(Ordering::Relaxed);
        seq.store(s.wrapping_add(1), Ordering::Relaxed);
        // The odd count is visible before any of the stores of `f`.
        fence(Ordering::Release);
        f(slot);
        seq.store(s.wrapping_add(2), Ordering::Release);
    }

    /// A consistent copy of `slot` (retried while it is being rewritten).
    fn read(&self, slot: *mut flowd_index_slot) -> flowd_index_slot {
        let seq = self.seq(slot);
        loop {
            let before = seq.load(Ordering::Acquire);
            // SAFETY: a slot of the mapping.
            let v = unsafe { std::ptr::read_volatile(slot) };
            fence(Ordering::Acquire);
            if before & 1 == 0 && seq.load(Ordering::Relaxed) == before {
                return v;
            }
            // Only this process writes, a few stores at a time.
            std::hint::spin_loop();
        }
    }

    /// Packets and bytes counted through `key`'s slot.
    pub fn count(&self, key: &flowd_flow_key) -> Option<(u64, u64)> {
        let v = self.read(self.find(key)?);
        (as_bytes(&v.key) == as_bytes(key)).then_some((v.packets, v.bytes))
    }

    /// Every indexed flow with the packets and bytes counted through its slot.
    pub fn counts(&self) -> Vec<(flowd_flow_key, u64, u64)> {
        let mut out = Vec::new();
        for b in 0..=self.mask {
            for w in 0..WAYS {
                let v = self.read(self.slot(b, w));
                if v.key.family != 0 {
                    out.push((v.key, v.packets, v.bytes));
                }
            }
        }
        out
    }

    fn unindexed_counter(&self, bucket: u32) -> &AtomicU32 {
        let b = self.buckets.ptr.cast::<flowd_index_bucket>().as_ptr();
        // SAFETY: a 4-byte aligned u32 of the mapping (bucket <= mask), which lives
        // as long as self; the program changes it only with atomic adds.
        unsafe { AtomicU32::from_ptr(addr_of_mut!((*b.add(bucket as usize)).unindexed)) }
    }

    /// Marks of `bucket` the index lacks: lookups landing there that miss ask
    /// `flowd_marks` too.
    pub fn unindexed_in(&self, bucket: u32) -> u32 {
        self.unindexed_counter(bucket & self.mask)
            .load(Ordering::SeqCst)
    }

    fn counter_of(&self, key: &flowd_flow_key) -> &AtomicU32 {
        self.unindexed_counter(bucket_of(&self.seeds, key, self.mask))
    }

    /// Marks in `flowd_marks` the index may lack (plus writes in progress), over
    /// all buckets.
    pub fn unindexed(&self) -> u64 {
        (0..=self.mask)
            .map(|b| u64::from(self.unindexed_counter(b).load(Ordering::SeqCst)))
            .sum()
    }

    /// Counts one more mark of `key`'s bucket the index may lack: before a map
    /// change that can make one.
    pub fn unindexed_inc(&self, key: &flowd_flow_key) {
        self.counter_of(key).fetch_add(1, Ordering::SeqCst);
    }

    /// One mark fewer: after it was indexed or removed.
    pub fn unindexed_dec(&self, key: &flowd_flow_key) {
        // Never below zero: a count too low would make lookups miss marks.
        let _ = self
            .counter_of(key)
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }
}

/// A store the program may observe (never merged with others or left out).
///
/// # Safety
/// `p` points into a live mapping, suitably aligned for `T`.
unsafe fn put<T>(p: *mut T, v: T) {
    std::ptr::write_volatile(p, v);
}

// SAFETY: see marker::maps (generated repr(C) integer structs, no padding; the
// layout test pins them).
unsafe impl plain::Plain for flowd_index_slot {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn slot_layout_matches_flowd_h() {
        assert_eq!(size_of::<flowd_index_slot>(), 72);
        assert_eq!(offset_of!(flowd_index_slot, key), 8);
        assert_eq!(offset_of!(flowd_index_slot, label), 48);
        assert_eq!(offset_of!(flowd_index_slot, packets), 56);
        assert_eq!(size_of::<flowd_index_bucket>(), 8 + 72 * WAYS as usize);
        assert_eq!(offset_of!(flowd_index_bucket, way), 8);
        assert_eq!(size_of::<flowd_index_head>(), 40);
    }

    #[test]
    fn one_slot_per_flow_in_power_of_two_buckets() {
        assert_eq!(buckets_for(65_536), 32_768);
        assert_eq!(buckets_for(65_537), 65_536);
        assert_eq!(buckets_for(2), 1);
        assert_eq!(buckets_for(1), 1);
        assert_eq!(buckets_for(0), 1);
    }

    fn key(sport: u16, last: u8) -> flowd_flow_key {
        key4(sport, 5201, 1, u16::from(last))
    }

    /// Addresses fd00::<s> and fd00::<d>.
    fn key4(sport: u16, dport: u16, s: u16, d: u16) -> flowd_flow_key {
        let addr = |x: u16| {
            let mut a = [0u8; 16];
            a[0] = 0xfd;
            a[14..].copy_from_slice(&x.to_be_bytes());
            a
        };
        flowd_flow_key {
            family: 10,
            proto: 6,
            sport: sport.to_be(),
            dport: dport.to_be(),
            saddr: addr(s),
            daddr: addr(d),
            ..Default::default()
        }
    }

    /// The exact figure pins the hash to the one in bpf/flow_index.bpf.h: a change
    /// on one side only would make every index lookup miss.
    #[test]
    fn bucket_of_is_the_programs_hash() {
        let seeds = [1, 2, 3, 4, 5];
        let k = key(40000, 2);
        let w: Vec<u64> = as_bytes(&k)
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
            .collect();
        let mut h = 0u64;
        for i in 0..5 {
            let m = (w[i] ^ seeds[i]).wrapping_mul(K[i]);
            h = h.wrapping_add(m ^ (m >> 32));
        }
        h ^= h >> 29;
        h = h.wrapping_mul(0x243f_6a88_85a3_08d3);
        assert_eq!(bucket_of(&seeds, &k, 1023), (h >> 54) as u32);
        assert_eq!(bucket_of(&seeds, &k, 0), 0);
        assert_eq!(shift_for(0), 63);
        assert_eq!(shift_for(1023), 54);
    }

    /// Flows that differ only in a port or the last bytes of an address, or in two
    /// of those at once (the common case: many transfers to one host, from one
    /// host's many ports), spread over the buckets as random keys would.
    #[test]
    fn near_identical_flows_spread() {
        type Pattern = fn(u16) -> flowd_flow_key;
        let patterns: [(&str, Pattern); 6] = [
            ("sport", |i| key4(30000 + i, 1094, 1, 2)),
            ("dport", |i| key4(1094, 30000 + i, 1, 2)),
            ("daddr", |i| key4(1094, 1094, 1, i)),
            ("saddr", |i| key4(1094, 1094, i, 2)),
            ("dport and daddr", |i| key4(1094, 30000 + i % 7, 1, i / 7)),
            ("saddr and daddr", |i| key4(1094, 1094, i % 26, i / 26)),
        ];
        for seeds in [[1, 2, 3, 4, 5], [0x1234_5678_9abc_def1, 7, 11, 13, 17]] {
            for (name, pattern) in patterns {
                let used: std::collections::HashSet<u32> = (0..700)
                    .map(|i| bucket_of(&seeds, &pattern(i), 1023))
                    .collect();
                // 700 random keys fill about 507 of 1024 buckets (this hash: 419 to
                // 530 here); the one it replaced (no per-word fold) filled about 240
                // with the two-field patterns.
                assert!(used.len() > 400, "{name}: {} buckets used", used.len());
            }
        }
    }
}
