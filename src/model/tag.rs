//! The SciTags IPv6 flow label layout, as the SciTags technical specification defines
//! the 20 bits:
//!
//! ```text
//! bit 19 18 | 17 ........ 9 | 8 | 7 ...... 2 | 1 0
//!   entropy | exp, reversed | e | activity   | entropy
//! ```
//! The experiment id is bit-reversed over its 9 bits (bit 0 of the id goes to
//! label bit 17); the activity is not. The five entropy bits are drawn once per
//! flow so the label, and with it the flow's ECMP path, never changes mid-flow.

use std::fmt;

/// Largest experiment id (9 bits).
pub const MAX_EXPERIMENT: u16 = 511;
/// Largest activity id (6 bits).
pub const MAX_ACTIVITY: u8 = 63;
/// Largest value of the 5 entropy bits.
pub const MAX_ENTROPY: u8 = 0x1f;

const LABEL_MASK: u32 = 0xF_FFFF;
const EXP_SHIFT: u32 = 9;
const ACT_SHIFT: u32 = 2;

/// A SciTags tag: experiment and activity ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag {
    pub experiment: u16,
    pub activity: u8,
}

/// Why a tag cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    #[error("experiment id {0} is out of range (1..=511)")]
    Experiment(u16),
    #[error("activity id {0} is out of range (0..=63)")]
    Activity(u8),
    #[error("scitag {0} is out of range (experiment 1..=511, activity 0..=63: 64..=32767)")]
    Scitag(u32),
}

impl Tag {
    pub fn new(experiment: u16, activity: u8) -> Result<Tag, TagError> {
        if experiment == 0 || experiment > MAX_EXPERIMENT {
            return Err(TagError::Experiment(experiment));
        }
        if activity > MAX_ACTIVITY {
            return Err(TagError::Activity(activity));
        }
        Ok(Tag {
            experiment,
            activity,
        })
    }

    /// The single integer the collaboration's tools pass around
    /// (`scitag = experiment << 6 | activity`; FTS `--scitag`, xrootd `scitag.flow`).
    pub fn scitag(self) -> u16 {
        (self.experiment << 6) | u16::from(self.activity)
    }

    pub fn from_scitag(scitag: u32) -> Result<Tag, TagError> {
        if scitag > 0x7fff {
            return Err(TagError::Scitag(scitag));
        }
        Tag::new((scitag >> 6) as u16, (scitag & 0x3f) as u8).map_err(|_| TagError::Scitag(scitag))
    }

    /// The 20-bit flow label for this tag with the given entropy (low 5 bits used).
    pub fn label(self, entropy: u8) -> u32 {
        let e = u32::from(entropy & MAX_ENTROPY);
        let exp = reverse9(self.experiment);
        // Entropy bits 4..3 -> label 19..18, bit 2 -> label 8, bits 1..0 -> label 1..0.
        ((e >> 3) << 18)
            | (u32::from(exp) << EXP_SHIFT)
            | (((e >> 2) & 1) << 8)
            | (u32::from(self.activity) << ACT_SHIFT)
            | (e & 0b11)
    }

    /// The 24-bit value the option headers carry: `experiment << 8 | activity`.
    pub fn option_value(self) -> u32 {
        (u32::from(self.experiment) << 8) | u32::from(self.activity)
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.experiment, self.activity)
    }
}

/// What a label carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodedLabel {
    /// `None` when the experiment field is 0, which no SciTags marker writes.
    pub tag: Option<Tag>,
    pub entropy: u8,
}

/// The entropy bits (5, as [`Tag::label`] takes them) of the flow whose marker-map
/// key is `key` (40 bytes): a hash under `seed`, computed exactly as the in-kernel
/// decision does (bpf/marker.bpf.c, flow_entropy), so a flow gets the same label
/// whichever side writes its mark first.
pub fn flow_entropy(seed: u32, key: &[u8]) -> u8 {
    let mut h = seed;
    for w in key.chunks_exact(4) {
        h = (h ^ u32::from_ne_bytes([w[0], w[1], w[2], w[3]])).wrapping_mul(0x9E37_79B1);
        h ^= h >> 15;
    }
    decode(h & ENTROPY_BITS).entropy
}

/// Where the entropy bits sit in a label (19..18, 8, 1..0).
const ENTROPY_BITS: u32 = 0xC0103;

/// Splits a 20-bit flow label into tag and entropy. Bits above 19 are ignored.
pub fn decode(label: u32) -> DecodedLabel {
    let label = label & LABEL_MASK;
    let experiment = reverse9(((label >> EXP_SHIFT) & 0x1ff) as u16);
    let activity = ((label >> ACT_SHIFT) & 0x3f) as u8;
    let entropy = (((label >> 18) & 0b11) << 3) | (((label >> 8) & 1) << 2) | (label & 0b11);
    DecodedLabel {
        tag: Tag::new(experiment, activity).ok(),
        entropy: entropy as u8,
    }
}

/// Reverses the low 9 bits (bit 0 <-> bit 8).
fn reverse9(v: u16) -> u16 {
    (v & 0x1ff).reverse_bits() >> 7
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tag(e: u16, a: u8) -> Tag {
        Tag::new(e, a).unwrap()
    }

    #[test]
    fn spec_worked_example_exp2_act3_is_0x1000c() {
        assert_eq!(tag(2, 3).label(0), 0x1000C);
    }

    #[test]
    fn vectors_for_extreme_ids_and_entropy() {
        // experiment 1 reversed is bit 17; experiment 511 fills bits 17..9.
        assert_eq!(tag(1, 0).label(0), 1 << 17);
        assert_eq!(tag(511, 0).label(0), 0x1ff << 9);
        assert_eq!(tag(1, 63).label(0), (1 << 17) | (63 << 2));
        // Entropy all ones sets exactly bits 19, 18, 8, 1, 0.
        assert_eq!(
            tag(1, 0).label(0x1f),
            (1 << 17) | 0b11 << 18 | 1 << 8 | 0b11
        );
        assert_eq!(tag(511, 63).label(0x1f), 0xFFFFF);
        // Bits above the 5 entropy bits are ignored.
        assert_eq!(tag(2, 3).label(0xe0), 0x1000C);
        // Experiment 256 = bit 8 of the id -> label bit 9.
        assert_eq!(tag(256, 0).label(0), 1 << 9);
    }

    #[test]
    fn decode_vectors() {
        assert_eq!(
            decode(0x1000C),
            DecodedLabel {
                tag: Some(tag(2, 3)),
                entropy: 0
            }
        );
        assert_eq!(decode(0xFFFFF).tag, Some(tag(511, 63)));
        assert_eq!(decode(0xFFFFF).entropy, 0x1f);
        assert_eq!(decode(0).tag, None, "experiment 0 is not a SciTags label");
        assert_eq!(decode(0xFFF0_000C | 0x10000).tag, Some(tag(2, 3)));
    }

    #[test]
    fn every_experiment_and_activity_round_trips() {
        for e in 1..=MAX_EXPERIMENT {
            for a in 0..=MAX_ACTIVITY {
                for ent in [0u8, 0x1f, 0b10101] {
                    let d = decode(tag(e, a).label(ent));
                    assert_eq!(d.tag, Some(tag(e, a)));
                    assert_eq!(d.entropy, ent);
                }
            }
        }
    }

    #[test]
    fn tag_bounds_and_scitag() {
        assert_eq!(Tag::new(0, 1), Err(TagError::Experiment(0)));
        assert_eq!(Tag::new(512, 1), Err(TagError::Experiment(512)));
        assert_eq!(Tag::new(1, 64), Err(TagError::Activity(64)));
        assert_eq!(Tag::from_scitag(132), Ok(tag(2, 4)));
        assert_eq!(tag(2, 4).scitag(), 132);
        assert_eq!(Tag::from_scitag(63), Err(TagError::Scitag(63)));
        assert_eq!(Tag::from_scitag(40000), Err(TagError::Scitag(40000)));
        assert_eq!(tag(2, 3).option_value(), 0x000203);
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(e in 1u16..=511, a in 0u8..=63, ent in 0u8..=31) {
            let l = tag(e, a).label(ent);
            prop_assert!(l <= 0xFFFFF);
            prop_assert_eq!(decode(l), DecodedLabel { tag: Some(tag(e, a)), entropy: ent });
        }

        #[test]
        fn encode_inverts_decode(l in 0u32..=0xFFFFF) {
            let d = decode(l);
            if let Some(t) = d.tag {
                prop_assert_eq!(t.label(d.entropy), l);
            }
        }
    }
}
