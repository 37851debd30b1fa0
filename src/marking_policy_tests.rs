//! Marking against a policy: flows tagged and untagged, reloads keeping the entropy,
//! IPv4 and foreign flows kept out of the map, a full map.

use super::*;
use crate::flows::{Owner, SeenBy};
use crate::model::socket::{Direction, Protocol, SockState};
use crate::policy::{Registry, StaticAccounts};
use std::cell::RefCell;
use std::time::Instant;

/// Records map writes; refuses inserts beyond `capacity`.
#[derive(Default)]
struct Recorder {
    map: RefCell<std::collections::HashMap<FlowKey, (Tag, u8)>>,
    capacity: usize,
}

impl MarkSink for Recorder {
    fn insert(&self, key: &FlowKey, tag: Tag, entropy: u8) -> Result<(), MapError> {
        let mut m = self.map.borrow_mut();
        if !m.contains_key(key) && m.len() >= self.capacity {
            return Err(MapError::Full {
                capacity: self.capacity as u32,
                flow: "x".into(),
            });
        }
        m.insert(*key, (tag, entropy));
        Ok(())
    }
    fn remove(&self, key: &FlowKey) -> Result<bool, MapError> {
        Ok(self.map.borrow_mut().remove(key).is_some())
    }
}

fn policy(activity: &str) -> Policy {
    let text = format!(
        "experiment = \"atlas\"\n[[rule]]\nname = \"r\"\nactivity = \"{activity}\"\nremote_ports = [1094]\n"
    );
    Policy::from_sources_with(
        &[("atlas.toml".into(), text)],
        &Registry::bundled(),
        &StaticAccounts::default(),
    )
    .unwrap()
}

fn flow(cookie: u64, local: &str, remote: &str) -> Flow {
    Flow {
        key: FlowKey::new(
            Protocol::Tcp,
            local.parse().unwrap(),
            remote.parse().unwrap(),
        ),
        cookie,
        netns: 1,
        state: SockState::Established,
        lifecycle: Lifecycle::Established,
        direction: Direction::Outbound,
        inode: 0,
        owner: Owner::default(),
        first_seen: Instant::now(),
        last_seen: Instant::now(),
        tcp: None,
        seen_by: SeenBy::default(),
    }
}

fn none(_: &Flow) -> Option<Arc<ProcessInfo>> {
    None
}

#[test]
fn tags_matching_ipv6_flows_and_removes_the_mark_when_they_end() {
    let sink = Recorder {
        capacity: 10,
        ..Default::default()
    };
    let mut m = Marking::new(1);
    let p = policy("Data Consolidation");
    let f = flow(7, "[fd00::1]:40000", "[fd00::2]:1094");
    m.on_flow(&f, &p, &sink, &mut none);
    let d = m.decision(7).unwrap().clone();
    assert_eq!(d.tag, Tag::new(2, 4).unwrap());
    assert!(d.in_map);
    assert_eq!(sink.map.borrow()[&f.key], (d.tag, d.entropy));
    assert_eq!(d.rule.to_string(), "atlas.toml:r");
    m.on_end(&f, &sink);
    assert!(sink.map.borrow().is_empty());
    assert_eq!(m.counters().tagged, 0);
    assert_eq!(m.counters().tagged_total, 1);
}

#[test]
fn a_reload_changes_the_tag_but_never_the_entropy() {
    let sink = Recorder {
        capacity: 10,
        ..Default::default()
    };
    let mut m = Marking::new(1);
    let f = flow(7, "[fd00::1]:40000", "[fd00::2]:1094");
    m.on_flow(&f, &policy("Data Consolidation"), &sink, &mut none);
    let before = m.decision(7).unwrap().entropy;
    m.on_flow(&f, &policy("Debug"), &sink, &mut none);
    let after = m.decision(7).unwrap();
    assert_eq!(after.tag, Tag::new(2, 9).unwrap());
    assert_eq!(after.entropy, before);
    assert_eq!(sink.map.borrow()[&f.key], (after.tag, before));
    // A policy that no longer matches removes the mark.
    m.on_flow(
        &flow(7, "[fd00::1]:40000", "[fd00::2]:2811"),
        &policy("Debug"),
        &sink,
        &mut none,
    );
    assert!(m.decision(7).is_none());
}

#[test]
fn ipv4_and_foreign_namespace_flows_never_reach_the_map() {
    let sink = Recorder {
        capacity: 10,
        ..Default::default()
    };
    let mut m = Marking::new(1);
    let p = policy("Debug");
    m.on_flow(
        &flow(1, "10.0.0.1:40000", "10.0.0.2:1094"),
        &p,
        &sink,
        &mut none,
    );
    assert!(
        !m.decision(1).unwrap().in_map,
        "IPv4 is tagged, not labelled"
    );
    let mut other = flow(2, "[fd00::1]:40001", "[fd00::2]:1094");
    other.netns = 99;
    m.on_flow(&other, &p, &sink, &mut none);
    assert!(m.decision(2).is_none());
    assert!(sink.map.borrow().is_empty());
}

#[test]
fn a_full_map_is_counted_and_the_flow_stays_known() {
    let sink = Recorder {
        capacity: 1,
        ..Default::default()
    };
    let mut m = Marking::new(1);
    let p = policy("Debug");
    m.on_flow(
        &flow(1, "[fd00::1]:1", "[fd00::2]:1094"),
        &p,
        &sink,
        &mut none,
    );
    m.on_flow(
        &flow(2, "[fd00::1]:2", "[fd00::2]:1094"),
        &p,
        &sink,
        &mut none,
    );
    assert_eq!(m.counters().map_full, 1);
    assert!(!m.decision(2).unwrap().in_map);
    // Once room is made, the retry after the next reconcile gets it in.
    m.on_end(&flow(1, "[fd00::1]:1", "[fd00::2]:1094"), &sink);
    m.retry_unmapped(&sink);
    assert!(m.decision(2).unwrap().in_map);
}
