use super::*;
use crate::api::view::{FlowEventView, StatusView, TcpView};
use crate::inspect::state::tests::{key, sample, typed};
use crate::inspect::state::Update;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::KeyCode;
use ratatui::Terminal;

fn screen(s: &mut ViewState, w: u16, h: u16) -> Vec<String> {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| render(f, s)).unwrap();
    let buf = t.backend().buffer().clone();
    (0..h)
        .map(|y| {
            (0..w)
                .map(|x| buf[(x, y)].symbol().to_string())
                .collect::<String>()
        })
        .collect()
}

fn status() -> StatusView {
    StatusView {
        version: "0.1.0".into(),
        pid: 42,
        uptime_secs: 3725.0,
        strategy: "flow-label".into(),
        attached: vec![("eth0".into(), "tcx".into())],
        policy_version: "p-7f3a".into(),
        policy_files: 2,
        policy_rules: 9,
        flows_total: 4,
        flows_tagged: 3,
        ringbuf_drops: 5,
        ..Default::default()
    }
}

fn with_status(mut s: ViewState) -> ViewState {
    let flows = std::mem::take(&mut s.flows);
    s.apply(Update::Data {
        status: Box::new(status()),
        flows,
        took: std::time::Duration::from_millis(7),
    });
    s
}

#[test]
fn screen_shows_status_totals_sort_and_rows_in_order() {
    let mut s = with_status(sample());
    let lines = screen(&mut s, 200, 12);
    assert!(lines[0].contains("flowd-rs 0.1.0 pid 42 up 1h02m │ flow-label on eth0(tcx) │ policy p-7f3a (2 files, 9 rules)"), "{}", lines[0]);
    assert!(lines[0].contains("drops 5"));
    assert!(
        lines[1].starts_with("atlas 3 flows, 300 pkts, 5.9 KiB │ untagged 1 flow"),
        "{}",
        lines[1]
    );
    assert!(lines[2].starts_with(
        "sort: BYTES ▼ │ filter: none │ 4 shown of 4 received (3 tagged of 4 tracked)"
    ));
    assert!(
        lines[3].contains("PROTO") && lines[3].contains("BYTES▼"),
        "{}",
        lines[3]
    );
    let rows: Vec<&String> = lines[4..8].iter().collect();
    for (r, bytes) in rows.iter().zip(["2.9 KiB", "2.0 KiB", "1000 B", "10 B"]) {
        assert!(r.contains(bytes), "{r}");
    }
    assert!(rows[3].contains("1234/sshd"));
    assert!(lines[11].starts_with("q quit  / filter"));
}

#[test]
fn filter_applied_and_input_line_shown() {
    let mut s = with_status(sample());
    s.handle_key(key(KeyCode::Char('/')));
    typed(&mut s, "proc:ssh");
    let lines = screen(&mut s, 200, 12);
    assert!(lines[11].starts_with("filter> proc:ssh█"), "{}", lines[11]);
    s.handle_key(key(KeyCode::Enter));
    let lines = screen(&mut s, 200, 12);
    assert!(
        lines[2].contains("filter: proc:ssh │ 1 shown of 4"),
        "{}",
        lines[2]
    );
    assert!(lines[4].contains("sshd"));
    assert!(lines[5].trim().is_empty());
    assert!(lines[1].starts_with("untagged 1 flow, 100 pkts, 10 B"));
}

#[test]
fn sorting_by_another_column_shows_in_header_and_rows() {
    let mut s = with_status(sample());
    s.handle_key(key(KeyCode::Char('-'))); // BYTES again: flips to ascending
    let lines = screen(&mut s, 200, 12);
    assert!(lines[2].starts_with("sort: BYTES ▲"));
    assert!(lines[4].contains("10 B"));
    s.handle_key(key(KeyCode::Char('5')));
    let lines = screen(&mut s, 200, 12);
    assert!(lines[3].contains("PID/COMM▲"));
    assert!(lines[4].contains("sshd"));
}

#[test]
fn scrolling_keeps_the_selection_on_screen() {
    let mut s = with_status(sample());
    // 7 lines leave the table a header and 2 rows.
    screen(&mut s, 200, 7);
    s.handle_key(key(KeyCode::End));
    let lines = screen(&mut s, 200, 7);
    assert!(lines[5].contains("sshd"), "{lines:#?}");
    assert_eq!(s.offset, 2);
}

#[test]
fn detail_pane_decodes_the_label_and_lists_events() {
    let mut s = with_status(sample());
    s.handle_key(key(KeyCode::Enter));
    let lines = screen(&mut s, 200, 24);
    assert!(lines.iter().any(|l| l.contains("loading events…")));
    let mut d = s.selected_flow().unwrap().clone();
    d.tcp = Some(TcpView {
        rtt_us: 1500,
        snd_cwnd: 10,
        ..Default::default()
    });
    d.events = vec![
        FlowEventView {
            at_secs_ago: 12.0,
            what: "seen by tracker (connect)".into(),
        },
        FlowEventView {
            at_secs_ago: 11.0,
            what: "tagged atlas/datachallenge by atlas.toml:xrootd-data".into(),
        },
    ];
    s.apply(Update::Detail(Ok(Box::new(d))));
    let text = screen(&mut s, 200, 24).join("\n");
    assert!(text.contains("flow 3 (Enter/Esc to close)"));
    assert!(text.contains(
        "tag atlas/datachallenge  rule atlas.toml:xrootd-data  header none  first packet tagged"
    ));
    assert!(text.contains("label 0x1000c = 00 010000000 0 000011 00: experiment 2 (bits 17..9, reversed), activity 3 (bits 7..2), entropy 0b00000"));
    assert!(text.contains("tcp rtt 1.5 ms"));
    let newest = text.find("11s ago  tagged atlas").unwrap();
    let oldest = text.find("12s ago  seen by tracker").unwrap();
    assert!(newest < oldest);
}

#[test]
fn lost_daemon_shows_in_the_status_line_with_last_data() {
    let mut s = with_status(sample());
    s.apply(Update::Lost {
        error: "the daemon is not running".into(),
        unreachable: true,
    });
    let lines = screen(&mut s, 250, 12);
    assert!(lines[0].starts_with("DAEMON UNREACHABLE for 0s: the daemon is not running — retrying every 1000 ms │ last known: flowd-rs 0.1.0"), "{}", lines[0]);
    assert!(lines[4].contains("2.9 KiB"));
}

#[test]
fn narrow_terminals_shrink_rules_before_addresses() {
    let mut s = with_status(sample());
    let lines = screen(&mut s, 140, 12);
    assert!(
        lines[4].contains("[2001:db8:1::10]:40000 [2001:db8:2::20]:1094"),
        "{}",
        lines[4]
    );
    assert!(lines[4].contains("atlas.toml:"), "{}", lines[4]);
    assert!(!lines[4].contains("atlas.toml:xrootd-data"), "{}", lines[4]);
    assert!(
        lines[4].trim_end().ends_with("2.9 KiB  12s"),
        "{}",
        lines[4]
    );
}

#[test]
fn label_text_splits_all_fields() {
    assert_eq!(
        label_text(0xFFFFF),
        "label 0xfffff = 11 111111111 1 111111 11: experiment 511 (bits 17..9, reversed), activity 63 (bits 7..2), entropy 0b11111"
    );
}

#[test]
fn a_daemon_answering_errors_is_not_called_unreachable() {
    let mut s = with_status(sample());
    s.apply(Update::Lost {
        error: "daemon refused: bad request: unknown variant `flows`".into(),
        unreachable: false,
    });
    let lines = screen(&mut s, 250, 12);
    assert!(
        lines[0].starts_with("DAEMON ERROR for 0s: daemon refused: bad request"),
        "{}",
        lines[0]
    );
}
