use super::*;
use crate::api::filter::{FilterError, FlowFilter};

/// A tagged xrootd flow, the base of most tests.
pub fn flow(cookie: u64) -> FlowView {
    FlowView {
        cookie,
        proto: "tcp".into(),
        local: "[2001:db8:1::10]:40000".parse().unwrap(),
        remote: "[2001:db8:2::20]:1094".parse().unwrap(),
        state: "established".into(),
        direction: "outbound".into(),
        netns: 4026531840,
        pid: Some(1234),
        comm: Some("xrootd".into()),
        uid: Some(998),
        user: Some("xrootd".into()),
        experiment: Some(2),
        experiment_name: Some("atlas".into()),
        activity: Some(3),
        activity_name: Some("datachallenge".into()),
        label: Some(0x1000C),
        header: None,
        rule: Some("atlas.toml:xrootd-data".into()),
        first_packet_exact: Some(true),
        packets: 100,
        bytes: 150_000,
        age_secs: 12.5,
        tcp: None,
        events: vec![],
    }
}

fn untagged() -> FlowView {
    FlowView {
        comm: Some("sshd".into()),
        user: Some("root".into()),
        uid: Some(0),
        experiment: None,
        experiment_name: None,
        activity: None,
        activity_name: None,
        label: None,
        rule: None,
        local: "10.0.0.1:22".parse().unwrap(),
        remote: "10.9.8.7:51000".parse().unwrap(),
        ..flow(2)
    }
}

fn f(s: &str) -> FlowFilter {
    FlowFilter::parse(s).unwrap()
}

#[test]
fn empty_filter_matches_everything() {
    assert!(FlowFilter::default().matches(&flow(1)));
    assert!(FlowFilter::default().matches(&untagged()));
}

#[test]
fn experiment_matches_by_name_case_insensitively_or_by_id() {
    assert!(f("exp:ATLAS").matches(&flow(1)));
    assert!(f("exp:2").matches(&flow(1)));
    assert!(!f("exp:3").matches(&flow(1)));
    assert!(!f("exp:cms").matches(&flow(1)));
    assert!(!f("exp:atlas").matches(&untagged()));
}

#[test]
fn user_matches_by_name_or_uid() {
    assert!(f("user:xrootd").matches(&flow(1)));
    assert!(f("user:998").matches(&flow(1)));
    assert!(!f("user:0").matches(&flow(1)));
    assert!(f("user:0").matches(&untagged()));
}

#[test]
fn process_matches_a_substring_of_comm() {
    assert!(f("proc:root").matches(&flow(1)));
    assert!(f("proc:XRD").matches(&FlowView {
        comm: Some("xrdcp".into()),
        ..flow(1)
    }));
    assert!(!f("proc:fts").matches(&flow(1)));
    assert!(!f("proc:x").matches(&FlowView {
        comm: None,
        ..flow(1)
    }));
}

#[test]
fn address_matches_either_end_by_ip_or_cidr() {
    assert!(f("addr:2001:db8::/32").matches(&flow(1)));
    assert!(f("addr:2001:db8:2::20").matches(&flow(1)));
    assert!(f("addr:2001:db8:1::/48").matches(&flow(1)));
    assert!(!f("addr:2001:db8:3::/48").matches(&flow(1)));
    assert!(f("addr:10.0.0.0/8").matches(&untagged()));
    assert!(!f("addr:10.0.0.0/8").matches(&flow(1)));
}

#[test]
fn invalid_address_is_refused_and_matches_nothing() {
    assert_eq!(
        FlowFilter::parse("addr:nowhere"),
        Err(FilterError::Address("nowhere".into()))
    );
    let bad = FlowFilter {
        address: Some("nowhere".into()),
        ..Default::default()
    };
    assert!(!bad.matches(&flow(1)));
}

#[test]
fn tagged_only_hides_untagged_flows() {
    assert!(f("tagged").matches(&flow(1)));
    assert!(!f("tagged").matches(&untagged()));
}

#[test]
fn conditions_combine_with_and() {
    assert!(f("exp:atlas user:xrootd proc:xrootd addr:2001:db8::/32").matches(&flow(1)));
    assert!(!f("exp:atlas user:root").matches(&flow(1)));
}

#[test]
fn plain_words_search_every_shown_column() {
    assert!(f("datachallenge").matches(&flow(1)));
    assert!(f("xrootd-data").matches(&flow(1)));
    assert!(f("1094").matches(&flow(1)));
    assert!(f("sshd 10.9.8").matches(&untagged()));
    assert!(!f("sshd cms").matches(&untagged()));
}

#[test]
fn unknown_key_is_an_error_naming_the_key() {
    assert_eq!(
        FlowFilter::parse("port:22"),
        Err(FilterError::Key("port".into()))
    );
}

#[test]
fn filter_json_is_compact_and_round_trips() {
    let fl = f("exp:atlas tagged");
    let j = serde_json::to_string(&fl).unwrap();
    assert_eq!(j, r#"{"experiment":"atlas","tagged_only":true}"#);
    assert_eq!(serde_json::from_str::<FlowFilter>(&j).unwrap(), fl);
    assert_eq!(
        serde_json::from_str::<FlowFilter>("{}").unwrap(),
        FlowFilter::default()
    );
}

#[test]
fn flow_view_json_has_every_key_and_round_trips() {
    let v = serde_json::to_value(flow(7)).unwrap();
    let o = v.as_object().unwrap();
    for k in [
        "cookie",
        "proto",
        "local",
        "remote",
        "state",
        "direction",
        "netns",
        "pid",
        "comm",
        "uid",
        "user",
        "experiment",
        "experiment_name",
        "activity",
        "activity_name",
        "label",
        "header",
        "rule",
        "first_packet_exact",
        "packets",
        "bytes",
        "age_secs",
        "tcp",
        "events",
    ] {
        assert!(o.contains_key(k), "missing {k}");
    }
    assert_eq!(o["local"], "[2001:db8:1::10]:40000");
    let back: FlowView = serde_json::from_value(v).unwrap();
    assert_eq!(back, flow(7));
}

#[test]
fn tag_text_falls_back_to_ids() {
    assert_eq!(flow(1).tag_text(), "atlas/datachallenge");
    let ids = FlowView {
        experiment_name: None,
        activity_name: None,
        ..flow(1)
    };
    assert_eq!(ids.tag_text(), "2/3");
    assert_eq!(untagged().tag_text(), "-");
}

/// The replies of the main crate's engine as of commit a3a2e21 (engine.rs `status`,
/// view.rs `flow`): fewer members, `null` counters, extra members.
#[test]
fn replies_of_an_older_daemon_still_parse() {
    let status: StatusView = serde_json::from_value(serde_json::json!({
        "version": "0.1.0", "pid": 7, "uptime_secs": 1.5, "strategy": "flow-label",
        "attached": [["eth0", "tcx"]], "policy_version": "3f2a", "policy_rules": 4,
        "policy_first_packet_exact_rules": 2, "flows_total": 10, "flows_tagged": 3,
        "flows_tagged_total": 5, "map_entries": 3, "map_capacity": 65536, "map_full_total": 0,
        "outcomes": null, "per_tag": [{"experiment": 2, "activity": 3, "packets": 9, "bytes": 900}],
        "ringbuf_drops": 0, "tracker_features": "Full", "reconcile_added": 1,
        "reconcile_ended": 0, "flows_started": 12, "flows_ended": 2, "dump_errors": 0,
        "last_poll_ms": 2.5, "policy_reloads_ok": 1, "policy_reloads_failed": 0
    }))
    .unwrap();
    assert_eq!(status.attached, [("eth0".to_string(), "tcx".to_string())]);
    assert!(status.outcomes.is_empty());
    assert_eq!(status.per_tag[0].packets, 9);
    assert_eq!(status.policy_files, 0);
    let f: FlowView = serde_json::from_value(serde_json::json!({
        "cookie": 5, "proto": "tcp", "local": "[fd00::1]:1094", "remote": "[fd00::2]:40000",
        "state": "established", "direction": "inbound", "netns": 1, "pid": null, "comm": null,
        "uid": 0, "user": "root", "experiment": 2, "experiment_name": "atlas", "activity": 3,
        "activity_name": "datachallenge", "label": 65548, "rule": "atlas.toml:xrootd",
        "age_secs": 3.0, "tcp": null
    }))
    .unwrap();
    assert_eq!(
        (f.packets, f.bytes, f.header.as_deref(), f.events.len()),
        (0, 0, None, 0)
    );
    assert_eq!(f.tag_text(), "atlas/datachallenge");
}
