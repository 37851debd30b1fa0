//! What operators see of a running daemon: `inspect`, `/metrics` and the control
//! socket, checked against packets captured on the wire. Privileged.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{scrape_metrics, Capture, Daemon, Pair, ADDR_A, ADDR_B, IF_B};
use flowd::api::view::FlowView;
use flowd::model::tag::{decode, Tag};

const ATLAS: &str = "experiment = \"atlas\"\n[[rule]]\nname = \"to-5201\"\nactivity = \"Data Consolidation\"\nremote_ports = [5201]\n";

fn daemon(pair: &Pair, dir: &std::path::Path) -> Daemon {
    let policies = dir.join("policies.d");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("atlas.toml"), ATLAS).unwrap();
    Daemon::start_with(
        &pair.a,
        dir,
        &format!("[policy]\ndir = \"{}\"\n", policies.display()),
    )
}

fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[test]
fn inspect_and_metrics_count_exactly_the_packets_seen_on_the_wire() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let d = daemon(&pair, dir.path());
    let cap = Capture::start(&pair.b, IF_B, "ip6 and tcp", dir.path());
    let server = common::serve_once(&pair.b, 5201);
    // Open, send, then hold the connection open and quiet while we look.
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let (sent, port_rx) = std::sync::mpsc::channel();
    let client = pair.a.run(move || {
        let mut s = TcpStream::connect(SocketAddr::new(ADDR_B.into(), 5201)).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        for _ in 0..50 {
            s.write_all(&[7u8; 4000]).unwrap();
        }
        sent.send(s.local_addr().unwrap().port()).unwrap();
        wait.recv().unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let port = port_rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let json = d.cli_ok(&["inspect", "--json", "--tagged"]);
    let table = d.cli_ok(&["inspect", "--once"]);
    let metrics = scrape_metrics(&pair.a);
    let pkts = cap.finish();
    go.send(()).unwrap();
    client.join().unwrap();
    assert_eq!(server.join().unwrap(), 200_000);
    d.stop();

    let views: Vec<FlowView> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ours: Vec<&FlowView> = views.iter().filter(|v| v.local.port() == port).collect();
    assert_eq!(ours.len(), 1, "{json}");
    let v = ours[0];
    assert_eq!(
        (v.experiment_name.as_deref(), v.activity_name.as_deref()),
        (Some("atlas"), Some("Data Consolidation"))
    );
    assert_eq!(v.rule.as_deref(), Some("atlas.toml:to-5201"));
    assert_eq!(v.direction, "outbound");
    let labelled: Vec<_> = pkts
        .iter()
        .filter(|p| {
            p.src == SocketAddr::new(ADDR_A.into(), port)
                && decode(p.flow_label).tag == Some(Tag::new(2, 4).unwrap())
        })
        .collect();
    assert_eq!(v.label, Some(labelled[0].flow_label));
    // Every packet the marker counted reached the receiver's capture: veth hands the
    // same (GSO) packets to both, so the counts agree exactly.
    assert_eq!(v.packets, labelled.len() as u64, "inspect vs capture");
    assert!(table.contains("atlas.toml:to-5201"), "{table}");
    assert!(table.contains("TOTAL"), "{table}");

    let body = metrics.split("\r\n\r\n").nth(1).expect("http body");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("exposition parses");
    let tag = [("experiment", "atlas"), ("activity", "Data Consolidation")];
    assert_eq!(
        sample(&scrape, "flowd_flows_tagged", &tag),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(&scrape, "flowd_marked_packets_total", &tag),
        Some(labelled.len() as f64),
        "{body}"
    );
    assert!(sample(&scrape, "flowd_marker_map_capacity", &[]) == Some(65536.0));
    assert!(sample(&scrape, "flowd_build_info", &[]) == Some(1.0));
}

#[test]
fn the_control_socket_answers_garbage_with_errors_and_keeps_serving() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let d = daemon(&pair, dir.path());
    let sock = d.state_dir.join("control.sock");
    let mut c = UnixStream::connect(&sock).unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut ask = |line: &[u8]| {
        c.write_all(line).unwrap();
        c.write_all(b"\n").unwrap();
        let mut reply = String::new();
        r.read_line(&mut reply).unwrap();
        serde_json::from_str::<serde_json::Value>(&reply).unwrap()
    };
    for (req, err) in [
        (&b"this is not json"[..], "not a JSON request"),
        (br#"{"op":"status"}"#, "missing protocol version"),
        (
            br#"{"v":9,"op":"status"}"#,
            "unsupported protocol version 9",
        ),
        (
            br#"{"v":1,"op":"format-disk"}"#,
            "bad request: unknown variant `format-disk`",
        ),
        (
            br#"{"v":1,"op":"flow","cookie":1}"#,
            "no flow with cookie 1",
        ),
    ] {
        let v = ask(req);
        assert_eq!(v["ok"], false);
        assert!(v["error"].as_str().unwrap().starts_with(err), "{v}");
    }
    assert_eq!(ask(br#"{"v":1,"op":"status"}"#)["ok"], true);
    // An oversized line: an error, then the connection closes; the daemon serves on.
    let mut big = vec![b'x'; 70 * 1024];
    big.push(b'\n');
    let mut c2 = UnixStream::connect(&sock).unwrap();
    c2.write_all(&big).unwrap();
    let mut reply = String::new();
    BufReader::new(&c2).read_line(&mut reply).unwrap();
    assert!(reply.contains("request longer than 65536 bytes"), "{reply}");
    assert_eq!(ask(br#"{"v":1,"op":"status"}"#)["ok"], true);
    d.stop();
}

#[test]
fn another_user_cannot_connect_to_the_control_socket() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Let other users reach the socket file itself, so its own mode is what is tested.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let pair = Pair::new();
    let d = daemon(&pair, dir.path());
    std::fs::set_permissions(
        &d.state_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let sock = d.state_dir.join("control.sock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o660);
    let err = std::thread::spawn(move || {
        common::become_outsider(65534);
        UnixStream::connect(&sock).unwrap_err()
    })
    .join()
    .unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
    d.stop();
}
