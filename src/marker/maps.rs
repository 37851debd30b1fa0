//! Userspace side of the marker's maps: flow marks in, counters out.
//!
//! Only this module writes `flowd_marks`. It works on `MapHandle`s (duplicated map
//! fds), so it can live in any task while the skeleton stays with the attachments.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use libbpf_rs::{MapCore, MapFlags, MapHandle};
use plain::Plain;

use crate::bpf::marker::types::{
    flowd_family, flowd_flow_key, flowd_flow_mark, flowd_outcome, flowd_tag_counter,
    flowd_tag_limits,
};
use crate::marker::compiled::{KernelMaps, MARK_F_KERNEL};
use crate::marker::flow_index::FlowIndex;
use crate::marker::sk_cache::SocketCache;
use crate::model::socket::FlowKey;
use crate::model::tag::{decode, flow_entropy, Tag};
use crate::policy::kernel::KernelPolicy;

/// Tag counter slots in the BPF map (FLOWD_TAG_SLOTS in bpf/flowd.h).
pub const TAG_SLOTS: u32 = flowd_tag_limits::FLOWD_TAG_SLOTS.0;

/// `flowd_flow_key.family` of an IPv6 flow (FLOWD_AF_INET6 in bpf/flowd.h).
const AF_INET6: u8 = flowd_family::FLOWD_AF_INET6.0 as u8;

/// Number of outcome counters (FLOWD_OUT_MAX in bpf/flowd.h).
pub const OUTCOME_COUNT: usize = flowd_outcome::FLOWD_OUT_MAX.0 as usize;

/// Outcome counter names, indexed as `enum flowd_outcome` in bpf/flowd.h.
pub const OUTCOMES: [&str; OUTCOME_COUNT] = [
    "marked",
    "unmarked",
    "skipped_mtu",
    "not_ipv6",
    "not_tcp_udp",
    "malformed",
    "skipped_header",
];

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("marker map is full ({capacity} flows): flow {flow} left unmarked")]
    Full { capacity: u32, flow: String },
    #[error("flow {0} is IPv4: IPv4 has no flow label, it is tagged by fireflies only")]
    NotIpv6(String),
    #[error("all {TAG_SLOTS} tag counter slots are in use: cannot count tag {0}")]
    SlotsExhausted(Tag),
    #[error("BPF map {map}: {source}")]
    Bpf {
        map: &'static str,
        source: libbpf_rs::Error,
    },
}

/// What the TC program counted, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Packets per outcome, in the order of [`OUTCOMES`].
    pub outcomes: [u64; OUTCOME_COUNT],
    pub per_tag: Vec<TagCount>,
}

impl Counters {
    /// Packets per outcome, by name: the one report that `status`, the `counters`
    /// request and the metrics all show.
    pub fn outcome_counts(&self) -> Vec<(String, u64)> {
        OUTCOMES
            .iter()
            .map(|n| n.to_string())
            .zip(self.outcomes)
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TagCount {
    pub experiment: u16,
    pub activity: u8,
    pub packets: u64,
    pub bytes: u64,
}

/// A mark already in the map when userspace came to write one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExistingMark {
    pub tag: Option<Tag>,
    /// The 5 entropy bits of its label: kept, so the label never changes.
    pub entropy: u8,
    /// Written by the in-kernel decision (FLOWD_MARK_F_KERNEL).
    pub kernel: bool,
}

impl ExistingMark {
    fn of(m: &flowd_flow_mark) -> ExistingMark {
        ExistingMark {
            tag: Tag::new(m.experiment, m.activity).ok(),
            entropy: decode(m.label).entropy,
            kernel: m.flags & MARK_F_KERNEL != 0,
        }
    }
}

pub struct MarkMaps {
    marks: MapHandle,
    outcomes: MapHandle,
    tag_counters: MapHandle,
    capacity: u32,
    /// Key of the flows' entropy hash (the marker's rodata flowd_entropy_seed).
    entropy_seed: u32,
    slots: Mutex<HashMap<Tag, u32>>,
    kernel: Option<KernelMaps>,
    cache: Option<SocketCache>,
    index: Option<FlowIndex>,
}

impl MarkMaps {
    pub fn new(
        marks: MapHandle,
        outcomes: MapHandle,
        tag_counters: MapHandle,
        capacity: u32,
        entropy_seed: u32,
    ) -> Self {
        MarkMaps {
            marks,
            outcomes,
            tag_counters,
            capacity,
            entropy_seed,
            slots: Mutex::new(HashMap::new()),
            kernel: None,
            cache: None,
            index: None,
        }
    }

    /// Adds the flow index (config `marker.flow_index`).
    pub fn with_index(mut self, index: Option<FlowIndex>) -> Self {
        self.index = index;
        self
    }

    pub fn index(&self) -> Option<&FlowIndex> {
        self.index.as_ref()
    }

    /// Before a write to `flowd_marks` that may leave a mark the index lacks.
    fn index_write_begins(&self, key: &flowd_flow_key) {
        if let Some(ix) = &self.index {
            ix.unindexed_inc(key);
        }
    }

    /// After it: indexes `key`'s mark, which ends the count taken for it unless its
    /// bucket is full (then it stays counted: lookups ask `flowd_marks`).
    fn index_write_ends(&self, key: &flowd_flow_key, mark: &flowd_flow_mark) {
        if let Some(ix) = &self.index {
            if ix.place(key, mark) {
                ix.unindexed_dec(key);
            }
        }
    }

    /// A write that did not happen: its count goes.
    fn index_write_undone(&self, key: &flowd_flow_key) {
        if let Some(ix) = &self.index {
            ix.unindexed_dec(key);
        }
    }

    /// Adds the per-socket lookup cache (config `marker.socket_cache`).
    pub fn with_cache(mut self, cache: Option<SocketCache>) -> Self {
        self.cache = cache;
        self
    }

    /// After any change to `flowd_marks` (or to the policy the kernel decides
    /// with): sockets must look their flow up again.
    fn changed(&self) {
        if let Some(c) = &self.cache {
            c.invalidate();
        }
    }

    /// Adds the in-kernel decision maps.
    pub fn with_kernel(mut self, kernel: KernelMaps) -> Self {
        self.kernel = Some(kernel);
        self
    }

    pub fn kernel(&self) -> Option<&KernelMaps> {
        self.kernel.as_ref()
    }

    /// Writes `k` into the decision maps and switches the programs to it; tags get
    /// their counter slots now, so kernel-written marks are counted too.
    pub fn install_policy(&self, k: &KernelPolicy) -> Result<(), MapError> {
        match &self.kernel {
            Some(km) => {
                let r = km.install(k, |t| self.slot(t));
                // Flows cached as unmarked were decided under the old policy.
                self.changed();
                r
            }
            None => Ok(()),
        }
    }

    /// Marks `flow` unless it already has a mark: then returns that one untouched
    /// (the kernel decides first packets and writes with BPF_NOEXIST too, so
    /// whichever side writes first sets the entropy).
    pub fn insert_new(
        &self,
        flow: &FlowKey,
        tag: Tag,
        entropy: u8,
    ) -> Result<Option<ExistingMark>, MapError> {
        let key = bpf_key(flow).ok_or_else(|| MapError::NotIpv6(flow_text(flow)))?;
        let value = self.mark_value(tag, entropy)?;
        self.index_write_begins(&key);
        let e = match self
            .marks
            .update(as_bytes(&key), as_bytes(&value), MapFlags::NO_EXIST)
        {
            Ok(()) => {
                self.index_write_ends(&key, &value);
                self.changed();
                return Ok(None);
            }
            Err(e) => e,
        };
        self.index_write_undone(&key);
        if e.kind() != libbpf_rs::ErrorKind::AlreadyExists {
            return Err(self.write_error(flow, e));
        }
        match self.get(flow)? {
            Some(m) => {
                self.index_existing(&key, &m);
                Ok(Some(ExistingMark::of(&m)))
            }
            // Deleted meanwhile: write ours.
            None => self.insert(flow, tag, entropy).map(|()| None),
        }
    }

    /// A refused write of `flow`'s mark: a hash map at max_entries refuses new keys
    /// with E2BIG.
    fn write_error(&self, flow: &FlowKey, e: libbpf_rs::Error) -> MapError {
        if e.kind() == libbpf_rs::ErrorKind::TooBig {
            MapError::Full {
                capacity: self.capacity,
                flow: flow_text(flow),
            }
        } else {
            MapError::Bpf {
                map: "flowd_marks",
                source: e,
            }
        }
    }

    /// Indexes a mark found in `flowd_marks` (written by the in-kernel decision, or
    /// left over): counted as unindexed until now.
    fn index_existing(&self, key: &flowd_flow_key, mark: &flowd_flow_mark) {
        if let Some(ix) = &self.index {
            if !ix.contains(key) && ix.place(key, mark) {
                ix.unindexed_dec(key);
            }
        }
    }

    /// The mark of `flow` as [`ExistingMark`], if any.
    pub fn existing(&self, flow: &FlowKey) -> Result<Option<ExistingMark>, MapError> {
        Ok(self.get(flow)?.as_ref().map(ExistingMark::of))
    }

    /// Flows whose mark the kernel wrote (walks the map: for the periodic sweep).
    /// Read in batches: one syscall per few thousand entries, not two per entry.
    pub fn kernel_marked(&self) -> Vec<FlowKey> {
        let Ok(iter) = self.marks.lookup_batch(4096, MapFlags::ANY, MapFlags::ANY) else {
            return Vec::new();
        };
        iter.filter_map(|(k, v)| {
            if from_bytes::<flowd_flow_mark>(&v).flags & MARK_F_KERNEL == 0 {
                return None;
            }
            flow_key(&from_bytes::<flowd_flow_key>(&k))
        })
        .collect()
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The entropy bits the kernel gives `flow` (see [`flow_entropy`]); IPv4 flows
    /// have no label, any value will do.
    pub fn entropy(&self, flow: &FlowKey) -> u8 {
        bpf_key(flow).map_or(0, |k| flow_entropy(self.entropy_seed, as_bytes(&k)))
    }

    /// A userspace mark for `tag` with zero counts.
    fn mark_value(&self, tag: Tag, entropy: u8) -> Result<flowd_flow_mark, MapError> {
        Ok(flowd_flow_mark {
            label: tag.label(entropy),
            experiment: tag.experiment,
            activity: tag.activity,
            counter_slot: self.slot(tag)?,
            ..Default::default()
        })
    }

    /// Marks `flow` with `tag`; `entropy` (5 bits) must be drawn once per flow and
    /// passed again on every update so the label stays the same.
    pub fn insert(&self, flow: &FlowKey, tag: Tag, entropy: u8) -> Result<(), MapError> {
        let key = bpf_key(flow).ok_or_else(|| MapError::NotIpv6(flow_text(flow)))?;
        // A rewrite (new tag after a reload) keeps the flow's counts; the packets
        // counted between this read and the update are the only ones lost.
        let old = self.get(flow)?;
        let (packets, bytes) = old.map_or((0, 0), |m| (m.packets, m.bytes));
        let value = flowd_flow_mark {
            packets,
            bytes,
            ..self.mark_value(tag, entropy)?
        };
        // A mark already there but not indexed is counted already.
        let counted = old.is_some() && self.index.as_ref().is_some_and(|ix| !ix.contains(&key));
        if !counted {
            self.index_write_begins(&key);
        }
        match self
            .marks
            .update(as_bytes(&key), as_bytes(&value), MapFlags::ANY)
        {
            Ok(()) => {
                self.index_write_ends(&key, &value);
                self.changed();
                Ok(())
            }
            Err(e) => {
                if !counted {
                    self.index_write_undone(&key);
                }
                Err(self.write_error(flow, e))
            }
        }
    }

    /// Removes the mark of `flow`; `Ok(false)` if it had none.
    pub fn remove(&self, flow: &FlowKey) -> Result<bool, MapError> {
        let Some(key) = bpf_key(flow) else {
            return Ok(false);
        };
        // Out of the index first, counted meanwhile: the mark must not be in the
        // index without being in flowd_marks, nor in flowd_marks uncounted.
        let indexed = match &self.index {
            Some(ix) if ix.contains(&key) => {
                ix.unindexed_inc(&key);
                ix.clear(&key);
                true
            }
            _ => false,
        };
        let r = self.marks.delete(as_bytes(&key));
        // Either our count above, or the one an unindexed mark carried.
        if indexed || r.is_ok() {
            self.index_write_undone(&key);
        }
        match r {
            Ok(()) => {
                self.changed();
                Ok(true)
            }
            Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(MapError::Bpf {
                map: "flowd_marks",
                source: e,
            }),
        }
    }

    /// The mark stored for `flow`, if any.
    pub fn get(&self, flow: &FlowKey) -> Result<Option<flowd_flow_mark>, MapError> {
        let Some(key) = bpf_key(flow) else {
            return Ok(None);
        };
        let raw = self
            .marks
            .lookup(as_bytes(&key), MapFlags::ANY)
            .map_err(|e| MapError::Bpf {
                map: "flowd_marks",
                source: e,
            })?;
        Ok(raw.map(|b| from_bytes::<flowd_flow_mark>(&b)))
    }

    /// Moves the counts the socket cache holds into the map (see
    /// [`SocketCache::fold_counts`]); a failure only leaves counts behind.
    fn fold_cache_counts(&self) {
        if let Some(c) = &self.cache {
            if let Err(e) = c.fold_counts() {
                tracing::warn!(error = %e, "per-flow counts may lag");
            }
        }
    }

    /// Packets and bytes marked per flow, for every flow in the map, read in batches
    /// (one syscall per few thousand flows rather than one per flow).
    pub fn flow_counts(&self) -> Result<HashMap<FlowKey, (u64, u64)>, MapError> {
        self.fold_cache_counts();
        let mut out = HashMap::new();
        let iter = self
            .marks
            .lookup_batch(4096, MapFlags::ANY, MapFlags::ANY)
            .map_err(|e| MapError::Bpf {
                map: "flowd_marks",
                source: e,
            })?;
        for (k, v) in iter {
            let key = from_bytes::<flowd_flow_key>(&k);
            let mark = from_bytes::<flowd_flow_mark>(&v);
            if let Some(flow) = flow_key(&key) {
                out.insert(flow, (mark.packets, mark.bytes));
            }
        }
        if let Some(ix) = &self.index {
            for (key, packets, bytes) in ix.counts() {
                if let Some(c) = flow_key(&key).and_then(|f| out.get_mut(&f)) {
                    c.0 += packets;
                    c.1 += bytes;
                }
            }
        }
        Ok(out)
    }

    /// Packets and bytes marked for `flow`, if it has a mark.
    pub fn flow_count(&self, flow: &FlowKey) -> Result<Option<(u64, u64)>, MapError> {
        self.fold_cache_counts();
        let indexed = match (&self.index, bpf_key(flow)) {
            (Some(ix), Some(key)) => ix.count(&key).unwrap_or_default(),
            _ => (0, 0),
        };
        Ok(self
            .get(flow)?
            .map(|m| (m.packets + indexed.0, m.bytes + indexed.1)))
    }

    /// Number of flows in the map (walks the keys: for status, not per packet).
    pub fn len(&self) -> usize {
        self.marks.keys().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn counters(&self) -> Result<Counters, MapError> {
        let mut out = Counters::default();
        for (i, total) in out.outcomes.iter_mut().enumerate() {
            *total = self
                .percpu(&self.outcomes, "flowd_outcomes", i as u32)?
                .iter()
                .map(|b| from_bytes::<u64>(b))
                .sum();
        }
        let slots: Vec<(Tag, u32)> = self
            .slots
            .lock()
            .unwrap()
            .iter()
            .map(|(t, s)| (*t, *s))
            .collect();
        for (tag, slot) in slots {
            let mut c = TagCount {
                experiment: tag.experiment,
                activity: tag.activity,
                packets: 0,
                bytes: 0,
            };
            for b in self.percpu(&self.tag_counters, "flowd_tag_counters", slot)? {
                let v = from_bytes::<flowd_tag_counter>(&b);
                c.packets += v.packets;
                c.bytes += v.bytes;
            }
            out.per_tag.push(c);
        }
        out.per_tag.sort_by_key(|c| (c.experiment, c.activity));
        Ok(out)
    }

    fn percpu(
        &self,
        map: &MapHandle,
        name: &'static str,
        index: u32,
    ) -> Result<Vec<Vec<u8>>, MapError> {
        map.lookup_percpu(&index.to_ne_bytes(), MapFlags::ANY)
            .map_err(|e| MapError::Bpf {
                map: name,
                source: e,
            })
            .map(Option::unwrap_or_default)
    }

    /// Maps adopted from an earlier instance (a restart): takes over the counter
    /// slots it gave the tags of the marks still in the map, so that their packets
    /// go on counting under their own tag, not under one this instance gives the
    /// same slot.
    pub fn adopt_slots(&self) {
        let Ok(iter) = self.marks.lookup_batch(4096, MapFlags::ANY, MapFlags::ANY) else {
            return;
        };
        let mut slots = self.slots.lock().unwrap();
        for (_, v) in iter {
            let m = from_bytes::<flowd_flow_mark>(&v);
            if let Ok(tag) = Tag::new(m.experiment, m.activity) {
                slots.entry(tag).or_insert(m.counter_slot);
            }
        }
    }

    /// Slot of `tag` in `flowd_tag_counters`, given out on first use and kept: counts
    /// stay cumulative for the daemon's life, as Prometheus counters must.
    fn slot(&self, tag: Tag) -> Result<u32, MapError> {
        let mut slots = self.slots.lock().unwrap();
        if let Some(s) = slots.get(&tag) {
            return Ok(*s);
        }
        // The smallest free slot: adopted slots (see `adopt_slots`) may leave holes.
        let used: std::collections::HashSet<u32> = slots.values().copied().collect();
        let next = (0..TAG_SLOTS)
            .find(|s| !used.contains(s))
            .unwrap_or(TAG_SLOTS);
        if next >= TAG_SLOTS {
            return Err(MapError::SlotsExhausted(tag));
        }
        slots.insert(tag, next);
        Ok(next)
    }
}

fn flow_text(f: &FlowKey) -> String {
    format!("{} {} -> {}", f.proto.as_str(), f.local(), f.remote())
}

/// The BPF map key for an IPv6 flow, in network byte order as the packet carries it.
/// `None` for IPv4: the marker never sees a reason to look those up.
pub fn bpf_key(f: &FlowKey) -> Option<flowd_flow_key> {
    let (IpAddr::V6(src), IpAddr::V6(dst)) = (f.local().ip(), f.remote().ip()) else {
        return None;
    };
    Some(flowd_flow_key {
        family: AF_INET6,
        proto: f.proto.ip_proto(),
        pad: 0,
        sport: f.local().port().to_be(),
        dport: f.remote().port().to_be(),
        saddr: src.octets(),
        daddr: dst.octets(),
    })
}

/// The flow a BPF key stands for (IPv6 TCP/UDP only).
pub fn flow_key(k: &flowd_flow_key) -> Option<FlowKey> {
    let proto = crate::model::socket::Protocol::from_ip_proto(k.proto)?;
    if k.family != AF_INET6 {
        return None;
    }
    let local = std::net::SocketAddr::new(
        std::net::Ipv6Addr::from(k.saddr).into(),
        u16::from_be(k.sport),
    );
    let remote = std::net::SocketAddr::new(
        std::net::Ipv6Addr::from(k.daddr).into(),
        u16::from_be(k.dport),
    );
    Some(FlowKey::new(proto, local, remote))
}

// SAFETY (each `Plain` impl of the marker's modules): the skeleton generates these
// map keys and values as `repr(C)` structs of integers and arrays, without padding
// (the layout tests check size and offsets), so any bit pattern is a valid value
// and every byte is initialised.
unsafe impl Plain for flowd_flow_key {}
unsafe impl Plain for flowd_flow_mark {}
unsafe impl Plain for flowd_tag_counter {}

/// The bytes of a map key or value, as the BPF syscalls take them.
pub fn as_bytes<T: Plain>(v: &T) -> &[u8] {
    // SAFETY: T is Plain and padding-free (above), so all its bytes are initialised.
    unsafe { plain::as_bytes(v) }
}

/// A map key or value from the bytes a BPF syscall returned; a shorter buffer
/// leaves the rest at its default.
pub fn from_bytes<T: Plain + Default>(b: &[u8]) -> T {
    let mut v = T::default();
    // SAFETY: T is Plain: any byte pattern written here is a valid T.
    let dst = unsafe { plain::as_mut_bytes(&mut v) };
    let n = b.len().min(dst.len());
    dst[..n].copy_from_slice(&b[..n]);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::socket::Protocol;
    use std::mem::{offset_of, size_of};

    #[test]
    fn shared_struct_layouts_match_flowd_h() {
        assert_eq!(size_of::<flowd_flow_key>(), 40);
        assert_eq!(offset_of!(flowd_flow_key, sport), 4);
        assert_eq!(offset_of!(flowd_flow_key, dport), 6);
        assert_eq!(offset_of!(flowd_flow_key, saddr), 8);
        assert_eq!(offset_of!(flowd_flow_key, daddr), 24);
        assert_eq!(size_of::<flowd_flow_mark>(), 32);
        assert_eq!(offset_of!(flowd_flow_mark, counter_slot), 8);
        assert_eq!(offset_of!(flowd_flow_mark, packets), 16);
        assert_eq!(offset_of!(flowd_flow_mark, bytes), 24);
        assert_eq!(size_of::<flowd_tag_counter>(), 16);
    }

    #[test]
    fn key_bytes_are_in_wire_order() {
        let f = FlowKey::new(
            Protocol::Tcp,
            "[fd00::1]:40000".parse().unwrap(),
            "[fd00::2]:5201".parse().unwrap(),
        );
        let k = bpf_key(&f).unwrap();
        assert_eq!(flow_key(&k), Some(f));
        let b = as_bytes(&k);
        assert_eq!(&b[..4], &[10, 6, 0, 0]);
        assert_eq!(&b[4..8], &[0x9c, 0x40, 0x14, 0x51]);
        assert_eq!(b[8], 0xfd);
        assert_eq!(b[23], 1);
        assert_eq!(b[39], 2);
    }

    #[test]
    fn ipv4_and_mapped_flows_have_no_key() {
        let f = FlowKey::new(
            Protocol::Tcp,
            "[::ffff:10.0.0.1]:1".parse().unwrap(),
            "[::ffff:10.0.0.2]:2".parse().unwrap(),
        );
        assert!(bpf_key(&f).is_none());
    }
}
