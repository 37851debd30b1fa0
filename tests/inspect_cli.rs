//! `flowd-rs inspect --once` / `--json` against a fake control socket, and the
//! message when there is no daemon. No root needed.

mod support;

use std::process::{Command, Output};

use flowd::api::view::FlowView;
use support::fake_daemon::{self, FakeDaemon};

fn inspect(socket: &std::path::Path, args: &[&str]) -> Output {
    let prefix = support::flowd_rs(socket);
    let mut words = prefix.split_whitespace();
    Command::new(words.next().unwrap())
        .args(words)
        .arg("inspect")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn no_daemon_prints_one_line_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    for args in [&["--once"][..], &["--json"], &[]] {
        let out = inspect(&sock, args);
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!(
                "flowd-rs: the daemon is not running (no control socket at {}). Start it with: systemctl start flowd-rs (or flowd-rs run)\n",
                sock.display()
            )
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn once_prints_the_table_sorted_by_bytes_with_totals() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let _d = FakeDaemon::start(&sock, fake_daemon::flows(6));
    let out = inspect(&sock, &["--once"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("PROTO  LOCAL"), "{text}");
    assert_eq!(lines.len(), 1 + 6 + 3, "{text}");
    // Biggest first: flow 5 (sshd, 900 kB) down to flow 0.
    assert!(
        lines[1].contains("1236/sshd") && lines[1].contains("878.9 KiB"),
        "{}",
        lines[1]
    );
    assert!(
        lines[6].contains("1234/xrootd") && lines[6].contains("0x1000c"),
        "{}",
        lines[6]
    );
    assert!(
        lines[6].contains("atlas/datachallenge") && lines[6].contains("atlas.toml:xrootd-data")
    );
    assert_eq!(lines[7], "TOTAL cms 2 flows, 700 pkts, 1.0 MiB");
    assert_eq!(lines[8], "TOTAL atlas 2 flows, 500 pkts, 732.4 KiB");
    assert_eq!(lines[9], "TOTAL untagged 2 flows, 900 pkts, 1.3 MiB");
}

#[test]
fn json_prints_one_flow_view_per_line_and_sends_the_filter() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let d = FakeDaemon::start(&sock, fake_daemon::flows(9));
    let out = inspect(
        &sock,
        &[
            "--json",
            "--experiment",
            "CMS",
            "--address",
            "2001:db8::/32",
            "--sort",
            "age",
            "--reverse",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flows: Vec<FlowView> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let cookies: Vec<u64> = flows.iter().map(|f| f.cookie).collect();
    // cms flows are 1, 4, 7; age sorts youngest first, so --reverse gives the oldest first.
    assert_eq!(cookies, [1007, 1004, 1001]);
    assert!(flows
        .iter()
        .all(|f| f.experiment_name.as_deref() == Some("cms")));
    let reqs = d.requests.lock().unwrap();
    // A page first; this fake daemon predates paging and refuses it, so the client
    // asks again for one listing.
    assert_eq!(
        reqs[0],
        serde_json::json!({"v":1,"op":"flows","limit":5000,"filter":{"experiment":"CMS","address":"2001:db8::/32"}})
    );
    assert_eq!(
        reqs[1],
        serde_json::json!({"v":1,"op":"flows","filter":{"experiment":"CMS","address":"2001:db8::/32"}})
    );
}

#[test]
fn a_bad_address_filter_is_refused_before_asking_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let out = inspect(&dir.path().join("s"), &["--once", "--address", "nowhere"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "flowd-rs: address filter `nowhere` is neither an IP address nor a CIDR prefix (e.g. 2001:db8::/32)\n"
    );
}

/// Without --sort, --json writes each page as it arrives, in the daemon's order, and
/// asks for the next one after the last cookie it got: nothing waits for the whole
/// listing (a million flows need not fit in the client).
#[test]
fn json_without_sort_streams_every_page_in_the_daemons_order() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let d = FakeDaemon::start_paged(&sock, fake_daemon::flows(9), 4);
    let out = inspect(&sock, &["--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cookies: Vec<u64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<FlowView>(l).unwrap().cookie)
        .collect();
    let mut all: Vec<u64> = fake_daemon::flows(9).iter().map(|f| f.cookie).collect();
    all.sort();
    assert_eq!(cookies, all);
    let reqs = d.requests.lock().unwrap();
    let afters: Vec<Option<u64>> = reqs
        .iter()
        .map(|r| r.get("after").and_then(serde_json::Value::as_u64))
        .collect();
    assert_eq!(afters, [None, Some(all[3]), Some(all[7])], "{reqs:?}");
}

/// --top N: the first N flows by the sort column, chosen as the pages arrive
/// (every page is asked for), the same rows a full sort would show first.
#[test]
fn top_shows_the_first_flows_of_the_sort_from_every_page() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let flows = fake_daemon::flows(9);
    let d = FakeDaemon::start_paged(&sock, flows.clone(), 4);
    let out = inspect(&sock, &["--json", "--top", "3", "--sort", "bytes"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<(u64, u64)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<FlowView>(l).unwrap())
        .map(|f| (f.bytes, f.cookie))
        .collect();
    let mut want: Vec<(u64, u64)> = flows.iter().map(|f| (f.bytes, f.cookie)).collect();
    // Biggest first, ties by cookie.
    want.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    want.truncate(3);
    assert_eq!(got, want);
    assert_eq!(
        d.requests.lock().unwrap().len(),
        3,
        "three pages of 4, 4 and 1"
    );

    // The table, least bytes first.
    let out = inspect(
        &sock,
        &["--once", "--top", "2", "--sort", "bytes", "--reverse"],
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut least: Vec<&FlowView> = flows.iter().collect();
    least.sort_by(|a, b| a.bytes.cmp(&b.bytes).then(a.cookie.cmp(&b.cookie)));
    let rows: Vec<&str> = text.lines().skip(1).take(2).collect();
    for (row, f) in rows.iter().zip(&least) {
        assert!(
            row.contains(&f.local.to_string()),
            "{row} for {f:?}\n{text}"
        );
    }
    assert_eq!(
        inspect(&sock, &["--once", "--top", "0"]).status.code(),
        Some(2)
    );
}
