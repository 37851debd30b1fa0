//! Writes a compiled policy ([`KernelPolicy`]) into the marker's decision maps, and
//! reads the kernel's own decisions back.
//!
//! Two slots: the new policy goes into the slot the programs do not read, then one
//! write of `flowd_kstate` switches them over, so a program never sees half a
//! policy (bpf/flowd.h, "In-kernel policy decisions").

use libbpf_rs::{MapCore, MapFlags, MapHandle};

use plain::Plain;

use super::maps::{as_bytes, from_bytes, MapError};
use crate::bpf::marker::types::{
    flowd_flow_mark, flowd_kaddr_key, flowd_kbits, flowd_kpolicy, flowd_kport_key, flowd_kseen,
    flowd_ksock, flowd_kstate, flowd_ktest, flowd_kuid_key,
};
use crate::model::tag::Tag;
use crate::policy::kernel::{KernelPolicy, RuleBits, MAX_RULES};

// SAFETY: padding-free repr(C) structs of integers (see marker::maps).
unsafe impl Plain for flowd_kaddr_key {}
unsafe impl Plain for flowd_kport_key {}
unsafe impl Plain for flowd_kuid_key {}
unsafe impl Plain for flowd_kbits {}
unsafe impl Plain for flowd_kpolicy {}
unsafe impl Plain for flowd_kstate {}
unsafe impl Plain for flowd_ksock {}
unsafe impl Plain for flowd_ktest {}
unsafe impl Plain for flowd_kseen {}

/// FLOWD_MARK_F_KERNEL in bpf/flowd.h.
pub const MARK_F_KERNEL: u8 =
    crate::bpf::marker::types::flowd_mark_flag::FLOWD_MARK_F_KERNEL.0 as u8;

pub fn kbits(b: RuleBits) -> flowd_kbits {
    flowd_kbits {
        w: [b as u64, (b >> 64) as u64],
    }
}

/// Handles on the decision maps.
pub struct KernelMaps {
    pub(crate) state: MapHandle,
    pub(crate) policy: MapHandle,
    pub(crate) rules: MapHandle,
    pub(crate) addrs: MapHandle,
    pub(crate) ports: MapHandle,
    pub(crate) uids: MapHandle,
    pub(crate) inserts: MapHandle,
}

fn bpf(map: &'static str) -> impl Fn(libbpf_rs::Error) -> MapError {
    move |source| MapError::Bpf { map, source }
}

impl KernelMaps {
    /// Marks the kernel has written since load (summed over CPUs).
    pub fn inserts(&self) -> Result<u64, MapError> {
        let per_cpu = self
            .inserts
            .lookup_percpu(&0u32.to_ne_bytes(), MapFlags::ANY)
            .map_err(bpf("flowd_kinserts"))?
            .unwrap_or_default();
        Ok(per_cpu
            .iter()
            .map(|b| u64::from_ne_bytes(b[..8].try_into().unwrap_or_default()))
            .sum())
    }

    fn read_state(&self) -> Result<flowd_kstate, MapError> {
        Ok(self
            .state
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
            .map_err(bpf("flowd_kstate_map"))?
            .map(|b| from_bytes::<flowd_kstate>(&b))
            .unwrap_or_default())
    }

    /// The generation the programs read (0 before any policy).
    pub fn generation(&self) -> Result<u32, MapError> {
        Ok(self.read_state()?.generation)
    }

    /// Installs `k`: fills the inactive slot, then switches the programs to it.
    /// `slot_of` gives the tag counter slot of a tag (rules whose tag gets none are
    /// left to userspace).
    pub fn install(
        &self,
        k: &KernelPolicy,
        mut slot_of: impl FnMut(Tag) -> Result<u32, MapError>,
    ) -> Result<(), MapError> {
        let st = self.read_state()?;
        let slot = if st.enabled != 0 {
            st.active ^ 1
        } else {
            st.active
        } & 1;
        self.clear_slot(slot as u8)?;
        let mut stop = k.stop;
        for (i, r) in k.rules.iter().enumerate() {
            let tag = Tag {
                experiment: r.experiment,
                activity: r.activity,
            };
            let mark = match slot_of(tag) {
                Ok(counter_slot) => flowd_flow_mark {
                    label: tag.label(0),
                    experiment: tag.experiment,
                    activity: tag.activity,
                    flags: 0,
                    counter_slot,
                    ..Default::default()
                },
                Err(_) => {
                    stop |= 1 << i;
                    flowd_flow_mark::default()
                }
            };
            let at = slot * MAX_RULES as u32 + i as u32;
            self.rules
                .update(&at.to_ne_bytes(), as_bytes(&mark), MapFlags::ANY)
                .map_err(bpf("flowd_krules"))?;
        }
        for (side, net, bits) in &k.addrs {
            let key = flowd_kaddr_key {
                prefixlen: 16 + u32::from(net.prefix_len()),
                slot: slot as u8,
                side: *side as u8,
                addr: net.network().octets(),
                pad: [0; 2],
            };
            self.addrs
                .update(as_bytes(&key), as_bytes(&kbits(*bits)), MapFlags::ANY)
                .map_err(bpf("flowd_kaddrs"))?;
        }
        for (side, start, len, bits) in &k.ports {
            let key = flowd_kport_key {
                prefixlen: 16 + u32::from(*len),
                slot: slot as u8,
                side: *side as u8,
                port: start.to_be(),
            };
            self.ports
                .update(as_bytes(&key), as_bytes(&kbits(*bits)), MapFlags::ANY)
                .map_err(bpf("flowd_kports"))?;
        }
        for (uid, bits) in &k.uids {
            let key = flowd_kuid_key { slot, uid: *uid };
            self.uids
                .update(as_bytes(&key), as_bytes(&kbits(*bits)), MapFlags::ANY)
                .map_err(bpf("flowd_kuids"))?;
        }
        // The fallback needs a counter slot like any tag; without one the kernel
        // labels nothing by default and userspace still marks the sockets.
        let match_all = match k.match_all {
            Some((experiment, activity)) => {
                let tag = Tag {
                    experiment,
                    activity,
                };
                match slot_of(tag) {
                    Ok(counter_slot) => flowd_flow_mark {
                        label: tag.label(0),
                        experiment,
                        activity,
                        counter_slot,
                        ..Default::default()
                    },
                    Err(_) => flowd_flow_mark::default(),
                }
            }
            None => flowd_flow_mark::default(),
        };
        let pol = flowd_kpolicy {
            match_all,
            tcp: kbits(k.tcp),
            udp: kbits(k.udp),
            outbound: kbits(k.outbound),
            inbound: kbits(k.inbound),
            any_uid: kbits(k.any_uid),
            stop: kbits(stop),
        };
        self.policy
            .update(&slot.to_ne_bytes(), as_bytes(&pol), MapFlags::ANY)
            .map_err(bpf("flowd_kpolicy_map"))?;
        let next = flowd_kstate {
            enabled: 1,
            active: slot,
            generation: st.generation.wrapping_add(1),
            match_all: u32::from(pol.match_all.experiment != 0),
        };
        self.state
            .update(&0u32.to_ne_bytes(), as_bytes(&next), MapFlags::ANY)
            .map_err(bpf("flowd_kstate_map"))
    }

    /// Stops in-kernel decisions (the programs then leave every flow to userspace).
    pub fn disable(&self) -> Result<(), MapError> {
        let mut st = self.read_state()?;
        st.enabled = 0;
        self.state
            .update(&0u32.to_ne_bytes(), as_bytes(&st), MapFlags::ANY)
            .map_err(bpf("flowd_kstate_map"))
    }

    /// Deletes every trie and uid entry of `slot`.
    fn clear_slot(&self, slot: u8) -> Result<(), MapError> {
        let addr_keys: Vec<Vec<u8>> = self
            .addrs
            .keys()
            .filter(|k| from_bytes::<flowd_kaddr_key>(k).slot == slot)
            .collect();
        for k in addr_keys {
            let _ = self.addrs.delete(&k);
        }
        let port_keys: Vec<Vec<u8>> = self
            .ports
            .keys()
            .filter(|k| from_bytes::<flowd_kport_key>(k).slot == slot)
            .collect();
        for k in port_keys {
            let _ = self.ports.delete(&k);
        }
        let uid_keys: Vec<Vec<u8>> = self
            .uids
            .keys()
            .filter(|k| from_bytes::<flowd_kuid_key>(k).slot == u32::from(slot))
            .collect();
        for k in uid_keys {
            let _ = self.uids.delete(&k);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn decision_struct_layouts_match_flowd_h() {
        assert_eq!(size_of::<flowd_kbits>(), 16);
        assert_eq!(size_of::<flowd_kaddr_key>(), 24);
        assert_eq!(offset_of!(flowd_kaddr_key, addr), 6);
        assert_eq!(size_of::<flowd_kport_key>(), 8);
        assert_eq!(offset_of!(flowd_kport_key, port), 6);
        assert_eq!(size_of::<flowd_kuid_key>(), 8);
        assert_eq!(size_of::<flowd_kpolicy>(), 128);
        assert_eq!(offset_of!(flowd_kpolicy, match_all), 96);
        assert_eq!(size_of::<flowd_kstate>(), 16);
        assert_eq!(size_of::<flowd_ksock>(), 44);
        assert_eq!(offset_of!(flowd_ksock, uid), 40);
        assert_eq!(size_of::<flowd_ktest>(), 136);
    }

    #[test]
    fn rule_bits_split_into_two_words_low_first() {
        let b = kbits((1u128 << 127) | (1 << 64) | 1);
        assert_eq!(b.w, [1, (1 << 63) | 1]);
    }
}
