use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::*;

fn at(secs: u64, micros: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros)
}

fn key(proto: Protocol, local: &str, remote: &str) -> FlowKey {
    FlowKey::new(
        proto,
        local.parse::<SocketAddr>().unwrap(),
        remote.parse::<SocketAddr>().unwrap(),
    )
}

fn start_v4() -> Firefly {
    Firefly {
        state: State::Start,
        key: key(Protocol::Tcp, "10.201.0.1:40000", "10.201.0.2:1094"),
        tag: Tag::new(2, 4).unwrap(),
        // 2026-11-25T17:00:00.000001 UTC
        start: at(1_795_626_000, 1),
        now: at(1_795_626_000, 250_000),
        end: None,
        usage: None,
        application: Some("xrootd".into()),
    }
}

fn end_v6() -> Firefly {
    Firefly {
        state: State::End,
        key: key(Protocol::Udp, "[fd00:f1::1]:5000", "[fd00:f1::2]:6000"),
        tag: Tag::new(511, 63).unwrap(),
        start: at(1_795_626_000, 0),
        now: at(1_795_626_010, 999_999),
        end: Some(at(1_795_626_010, 500_000)),
        usage: Some(Usage {
            received: 7,
            sent: 123_456_789_012,
        }),
        application: None,
    }
}

#[test]
fn times_are_rfc3339_utc_with_microseconds() {
    assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000000+00:00");
    assert_eq!(
        rfc3339(at(1_795_626_000, 1)),
        "2026-11-25T17:00:00.000001+00:00"
    );
    // Sub-microsecond digits are dropped, not rounded into the next second.
    assert_eq!(
        rfc3339(at(59, 999_999) + Duration::from_nanos(999)),
        "1970-01-01T00:00:59.999999+00:00"
    );
}

#[test]
fn a_start_firefly_is_exactly_the_schema_object_with_the_local_end_as_source() {
    assert_eq!(
        String::from_utf8(start_v4().json()).unwrap(),
        concat!(
            r#"{"version":1,"flow-lifecycle":{"state":"start","#,
            r#""start-time":"2026-11-25T17:00:00.000001+00:00","#,
            r#""current-time":"2026-11-25T17:00:00.250000+00:00"},"#,
            r#""flow-id":{"afi":"ipv4","src-ip":"10.201.0.1","dst-ip":"10.201.0.2","#,
            r#""protocol":"tcp","src-port":40000,"dst-port":1094},"#,
            r#""context":{"experiment-id":2,"activity-id":4,"application":"xrootd"}}"#
        )
    );
}

#[test]
fn an_end_firefly_carries_its_end_time_and_usage() {
    let v: Value = serde_json::from_slice(&end_v6().json()).unwrap();
    assert_eq!(v["flow-lifecycle"]["state"], "end");
    assert_eq!(
        v["flow-lifecycle"]["end-time"],
        "2026-11-25T17:00:10.500000+00:00"
    );
    assert_eq!(v["flow-id"]["afi"], "ipv6");
    assert_eq!(v["flow-id"]["src-ip"], "fd00:f1::1");
    assert_eq!(v["flow-id"]["protocol"], "udp");
    assert_eq!(v["context"]["experiment-id"], 511);
    assert_eq!(v["context"]["activity-id"], 63);
    assert!(v["context"].get("application").is_none());
    assert_eq!(v["usage"]["sent"], 123_456_789_012u64);
    assert_eq!(v["usage"]["received"], 7);
}

#[test]
fn a_v4_mapped_socket_is_reported_as_the_ipv4_flow_it_sends() {
    let mut f = start_v4();
    f.key = key(Protocol::Tcp, "[::ffff:10.0.0.1]:1", "[::ffff:10.0.0.2]:2");
    let v: Value = serde_json::from_slice(&f.json()).unwrap();
    assert_eq!(v["flow-id"]["afi"], "ipv4");
    assert_eq!(v["flow-id"]["dst-ip"], "10.0.0.2");
}

#[test]
fn the_syslog_header_is_rfc5424_local0_info_with_msgid_firefly_json() {
    let d = start_v4().datagram(Some("se01.example.org"));
    let text = String::from_utf8(d).unwrap();
    let (header, json) = text.split_at(text.find('{').unwrap());
    assert_eq!(
        header,
        "<134>1 2026-11-25T17:00:00.250000+00:00 se01.example.org flowd-rs - firefly-json - "
    );
    assert_eq!(json.as_bytes(), start_v4().json());
    // An unusable hostname becomes the nil value, never a broken header.
    let text = String::from_utf8(start_v4().datagram(Some(" \t"))).unwrap();
    assert!(text.starts_with("<134>1 2026-11-25T17:00:00.250000+00:00 - flowd-rs -"));
    assert_eq!(start_v4().datagram(None), start_v4().json());
}

#[test]
fn the_largest_firefly_fits_an_ordinary_mtu() {
    let mut f = end_v6();
    f.key = key(
        Protocol::Tcp,
        "[fd00:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        "[fd00:eeee:eeee:eeee:eeee:eeee:eeee:eeee]:65535",
    );
    f.usage = Some(Usage {
        received: u64::MAX,
        sent: u64::MAX,
    });
    f.application = Some("é".repeat(400));
    let d = f.datagram(Some(&"h".repeat(300)));
    assert!(d.len() < 1400, "{} bytes", d.len());
    let v: Value =
        serde_json::from_slice(&d[d.iter().position(|&b| b == b'{').unwrap()..]).unwrap();
    // Cut at a character boundary: 64 two-byte characters.
    assert_eq!(v["context"]["application"], "é".repeat(64));
}

fn schema() -> jsonschema::Validator {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/firefly/firefly-schema-v1.0.0.json"
    );
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("the published schema compiles")
}

fn errors(v: &jsonschema::Validator, doc: &Value) -> Vec<String> {
    v.iter_errors(doc).map(|e| e.to_string()).collect()
}

#[test]
fn every_kind_of_firefly_validates_against_the_published_schema() {
    let v = schema();
    for state in [State::Start, State::Ongoing, State::End] {
        for (proto, local, remote) in [
            (Protocol::Tcp, "10.201.0.1:40000", "10.201.0.2:1094"),
            (Protocol::Udp, "[fd00:f1::1]:5000", "[fd00:f1::2]:6000"),
        ] {
            for usage in [
                None,
                Some(Usage {
                    received: 1,
                    sent: 2,
                }),
            ] {
                let f = Firefly {
                    state,
                    key: key(proto, local, remote),
                    end: (state == State::End).then(|| at(1_795_626_100, 0)),
                    usage,
                    ..start_v4()
                };
                let doc: Value = serde_json::from_slice(&f.json()).unwrap();
                assert_eq!(errors(&v, &doc), Vec::<String>::new(), "{doc}");
            }
        }
    }
}

#[test]
fn the_schema_check_has_teeth() {
    let v = schema();
    // The published end sample is valid; its start sample is not (dst-port 0 is
    // below the schema's minimum of 1).
    let sample = |name: &str| -> Value {
        let path = format!("{}/tests/data/firefly/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    assert!(errors(&v, &sample("end.firefly")).is_empty());
    assert!(!errors(&v, &sample("start.firefly")).is_empty());
    // An end without its end-time, and an IPv4 flow with an IPv6 address, are refused.
    let mut doc: Value = serde_json::from_slice(&end_v6().json()).unwrap();
    doc["flow-lifecycle"]
        .as_object_mut()
        .unwrap()
        .remove("end-time");
    assert!(!errors(&v, &doc).is_empty());
    let mut doc: Value = serde_json::from_slice(&start_v4().json()).unwrap();
    doc["flow-id"]["src-ip"] = "fd00::1".into();
    assert!(!errors(&v, &doc).is_empty());
}

#[test]
fn what_we_send_parses_back_with_or_without_the_syslog_header() {
    for f in [start_v4(), end_v6()] {
        for host in [None, Some("se01")] {
            let r = parse(&f.datagram(host)).unwrap();
            assert_eq!((r.state, r.key, r.tag), (f.state, f.key, f.tag));
        }
    }
}

#[test]
fn received_fireflies_that_cannot_name_a_flow_and_tag_are_refused_with_the_reason() {
    let good = String::from_utf8(start_v4().json()).unwrap();
    let cases: [(String, &str); 7] = [
        ("<134>1 - - - - -".into(), "no JSON object"),
        (good.replace("\"version\":1", "\"version\":2"), "version 2"),
        (good.replace("\"tcp\"", "\"sctp\""), "protocol \"sctp\""),
        (good.replace("10.201.0.2", "fd00::2"), "are not ipv4"),
        (
            good.replace("\"dst-port\":1094", "\"dst-port\":0"),
            "port 0",
        ),
        (
            good.replace("\"experiment-id\":2", "\"experiment-id\":3333"),
            "experiment id 3333",
        ),
        (
            good.replace("\"context\"", "\"kontext\""),
            "missing field `context`",
        ),
    ];
    for (text, want) in cases {
        let e = parse(text.as_bytes()).unwrap_err().to_string();
        assert!(e.contains(want), "{e:?} lacks {want:?} for {text}");
    }
    // Enrichment a sender adds is no reason to refuse.
    let extra = good.replace("\"version\":1", "\"version\":1,\"netlink\":{\"x\":1}");
    assert!(parse(extra.as_bytes()).is_ok());
}

/// Enriched `ongoing`: flowd-go's `netlink` object sits at the top level beside
/// `usage`, the datagram stays schema-valid and, lean, within one MTU.
#[test]
fn an_enriched_ongoing_carries_the_netlink_object_and_stays_valid_and_small() {
    use crate::enrich::{render, Mode, TcpFacts};
    let v = schema();
    let facts = TcpFacts {
        info: vec![0xff; 232],
        cong: Some("cubic".into()),
    };
    let f = Firefly {
        state: State::Ongoing,
        key: key(
            Protocol::Tcp,
            "[fd00:f1::1234:5678:9abc:def0]:40000",
            "[fd00:f2::1234:5678:9abc:def0]:1094",
        ),
        ..start_v4()
    };
    for mode in [Mode::Lean, Mode::Full] {
        let netlink = render(&facts, mode);
        let datagram = f.datagram_with(Some("se01.example.org"), Some(&netlink));
        let doc: Value = serde_json::from_slice(&f.json_with(Some(&netlink))).unwrap();
        assert_eq!(errors(&v, &doc), Vec::<String>::new(), "{doc}");
        assert_eq!(doc["netlink"]["cong"]["algorithm"], "cubic");
        assert_eq!(doc["netlink"]["tcpInfo"]["rtt"], u64::from(u32::MAX));
        if mode == Mode::Lean {
            assert!(datagram.len() < 1400, "{} bytes", datagram.len());
        }
    }
    // Not JSON: left out rather than sent broken.
    let doc: Value = serde_json::from_slice(&f.json_with(Some("{broken"))).unwrap();
    assert!(doc.get("netlink").is_none());
}
