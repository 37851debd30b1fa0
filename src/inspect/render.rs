//! Drawing the live view from a [`ViewState`]: a function of the state alone (it only
//! records the scroll offset and page size back), tested on ratatui's `TestBackend`.
//!
//! ```text
//! status line: daemon, strategy, interfaces, policy, drops (or the connection error)
//! totals line: per experiment among the flows shown
//! view line:   sort, filter, rows shown
//! table        (with the detail pane below it when open)
//! key help, or the filter input line
//! ```

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table, Wrap};
use ratatui::Frame;

use super::columns::{experiment_totals, human_age, human_bytes, Column};
use super::state::{Connection, ViewState};
use crate::api::view::FlowView;
use crate::model::tag;

const HELP: &str = "q quit  / filter  s sort column  r reverse  1-9 0 - = sort by column  Enter detail  ↑↓ PgUp PgDn Home End move";

pub fn render(f: &mut Frame, s: &mut ViewState) {
    let detail_height = if s.detail_cookie.is_some() { 14 } else { 0 };
    let [status, totals, view, table, detail, bottom] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(detail_height),
        Constraint::Length(1),
    ])
    .areas(f.area());
    f.render_widget(status_line(s), status);
    f.render_widget(totals_line(s), totals);
    f.render_widget(view_line(s), view);
    render_table(f, s, table);
    if s.detail_cookie.is_some() {
        render_detail(f, s, detail);
    }
    f.render_widget(bottom_line(s), bottom);
}

fn status_line(s: &ViewState) -> Paragraph<'static> {
    let mut spans = Vec::new();
    match &s.connection {
        Connection::Connecting => spans.push(Span::raw("connecting to the daemon…")),
        Connection::Down {
            error,
            unreachable,
            since,
        } => spans.push(Span::styled(
            format!(
                "{} for {}: {error} — retrying every {} ms",
                if *unreachable {
                    "DAEMON UNREACHABLE"
                } else {
                    "DAEMON ERROR"
                },
                human_age(since.elapsed().as_secs_f64()),
                s.interval.as_millis()
            ),
            Style::new()
                .fg(Color::White)
                .bg(Color::Red)
                .add_modifier(Modifier::BOLD),
        )),
        Connection::Up => {}
    }
    if let Some(st) = &s.status {
        if !spans.is_empty() {
            spans.push(Span::raw(" │ last known: "));
        }
        let ifaces: Vec<String> = st
            .attached
            .iter()
            .map(|(i, m)| format!("{i}({m})"))
            .collect();
        let drops = if st.ringbuf_drops > 0 {
            Span::styled(
                format!("drops {}", st.ringbuf_drops),
                Style::new().fg(Color::Yellow),
            )
        } else {
            Span::raw("drops 0")
        };
        spans.extend([
            Span::styled(
                format!("flowd-rs {}", st.version),
                Style::new().add_modifier(Modifier::BOLD),
            ),
            Span::raw(format!(
                " pid {} up {} │ {} on {} │ policy {} ({} files, {} rules{}) │ map {}/{} │ ",
                st.pid,
                human_age(st.uptime_secs),
                st.strategy,
                if ifaces.is_empty() {
                    "no interface".into()
                } else {
                    ifaces.join(" ")
                },
                st.policy_version,
                st.policy_files,
                st.policy_rules,
                st.policy_match_all
                    .as_deref()
                    .map(|m| format!(", match-all {m}"))
                    .unwrap_or_default(),
                st.map_entries,
                st.map_capacity,
            )),
            drops,
        ]);
    }
    Paragraph::new(Line::from(spans))
}

fn totals_line(s: &ViewState) -> Paragraph<'static> {
    let totals = experiment_totals(s.visible.iter().map(|&i| &s.flows[i]));
    let parts: Vec<String> = totals.iter().map(|t| t.summary()).collect();
    let text = if parts.is_empty() {
        "no flows".into()
    } else {
        parts.join(" │ ")
    };
    Paragraph::new(text).style(Style::new().fg(Color::Cyan))
}

fn view_line(s: &ViewState) -> Paragraph<'static> {
    let (tagged, total) = s
        .status
        .as_ref()
        .map_or((0, s.flows.len()), |st| (st.flows_tagged, st.flows_total));
    let filter = if s.filter_text.is_empty() {
        "none"
    } else {
        &s.filter_text
    };
    Paragraph::new(format!(
        "sort: {} {} │ filter: {filter} │ {} shown of {} received ({tagged} tagged of {total} tracked) │ refresh {} ms, took {} ms",
        s.sort.title(),
        arrow(s.descending),
        s.visible.len(),
        s.flows.len(),
        s.interval.as_millis(),
        s.fetch_time.as_millis(),
    ))
}

fn arrow(descending: bool) -> &'static str {
    if descending {
        "▼"
    } else {
        "▲"
    }
}

/// Column widths that fit the rows on screen, shrinking the least telling columns
/// first when the terminal is too narrow (addresses and numbers last).
fn widths(s: &ViewState, rows: &[usize], avail: u16) -> [Constraint; 12] {
    let mut w: [usize; 12] = Column::ALL.map(|c| c.title().chars().count() + 1);
    for &i in rows {
        for (k, c) in Column::ALL.iter().enumerate() {
            w[k] = w[k].max(c.cell(&s.flows[i]).chars().count());
        }
    }
    let spacing = Column::ALL.len() - 1;
    let mut over = (w.iter().sum::<usize>() + spacing).saturating_sub(avail as usize);
    for (col, min) in [
        (Column::Rule, 12),
        (Column::Process, 10),
        (Column::Tag, 12),
        (Column::User, 6),
        (Column::State, 5),
        (Column::Remote, 16),
        (Column::Local, 16),
    ] {
        let k = Column::ALL.iter().position(|c| *c == col).unwrap_or(0);
        let cut = over.min(w[k].saturating_sub(min));
        w[k] -= cut;
        over -= cut;
    }
    w.map(|n| Constraint::Length(n as u16))
}

fn render_table(f: &mut Frame, s: &mut ViewState, area: Rect) {
    // One line for the header row.
    s.page_rows = area.height.saturating_sub(1).max(1) as usize;
    if let Some(sel) = s.selected_index() {
        if sel < s.offset {
            s.offset = sel;
        } else if sel >= s.offset + s.page_rows {
            s.offset = sel + 1 - s.page_rows;
        }
    }
    s.offset = s.offset.min(s.visible.len().saturating_sub(s.page_rows));
    let header = Row::new(Column::ALL.map(|c| {
        let mut t = c.title().to_string();
        if c == s.sort {
            t.push_str(arrow(s.descending));
        }
        Cell::from(t)
    }))
    .style(Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED));
    let selected = s.selected;
    let page: Vec<usize> = s
        .visible
        .iter()
        .skip(s.offset)
        .take(s.page_rows)
        .copied()
        .collect();
    let widths = widths(s, &page, area.width);
    let rows = page.iter().map(|&i| {
        let fl = &s.flows[i];
        let row = Row::new(Column::ALL.map(|c| cell(c, fl)));
        if Some(fl.cookie) == selected {
            row.style(Style::new().add_modifier(Modifier::REVERSED))
        } else if fl.experiment.is_none() {
            row.style(Style::new().fg(Color::DarkGray))
        } else {
            row
        }
    });
    f.render_widget(
        Table::new(rows, widths).header(header).column_spacing(1),
        area,
    );
}

fn cell(c: Column, f: &FlowView) -> Cell<'static> {
    let text = c.cell(f);
    if c.right_aligned() {
        Cell::from(Line::from(text).right_aligned())
    } else {
        Cell::from(text)
    }
}

fn render_detail(f: &mut Frame, s: &ViewState, area: Rect) {
    let listed = s
        .detail_cookie
        .and_then(|c| s.flows.iter().find(|f| f.cookie == c));
    let (flow, note) = match (&s.detail, listed) {
        (Some(Ok(d)), _) => (Some(&**d), None),
        (Some(Err(e)), l) => (l, Some(format!("events unavailable: {e}"))),
        (None, l) => (l, Some("loading events…".to_string())),
    };
    let title = format!(
        " flow {} (Enter/Esc to close) ",
        s.detail_cookie.unwrap_or(0)
    );
    let block = Block::new().borders(Borders::TOP).title(title);
    let lines = match flow {
        Some(fl) => detail_lines(fl, note),
        None => vec![Line::from("this flow is gone")],
    };
    f.render_widget(
        Paragraph::new(lines)
            .block(block)
            .wrap(Wrap { trim: false }),
        area,
    );
}

/// The detail pane's text for one flow.
pub fn detail_lines(f: &FlowView, note: Option<String>) -> Vec<Line<'static>> {
    let mut l = vec![Line::from(format!(
        "{} {} -> {}  {} {}  netns {}  cookie {}",
        f.proto, f.local, f.remote, f.state, f.direction, f.netns, f.cookie
    ))];
    l.push(Line::from(format!(
        "tag {}  rule {}  header {}  first packet {}",
        f.tag_text(),
        f.rule.as_deref().unwrap_or("none"),
        f.header.as_deref().unwrap_or("none"),
        match f.first_packet_exact {
            Some(true) => "tagged",
            Some(false) => "missed",
            None => "unknown",
        }
    )));
    l.push(Line::from(match f.label {
        Some(lb) => label_text(lb),
        None => "label none (not tagged, or IPv4: fireflies only)".into(),
    }));
    l.push(Line::from(match &f.tcp {
        Some(t) => format!(
            "tcp rtt {:.1} ms ± {:.1}  cwnd {}  retrans {}  acked {}  received {}  segs out {} in {}",
            f64::from(t.rtt_us) / 1000.0,
            f64::from(t.rttvar_us) / 1000.0,
            t.snd_cwnd,
            t.total_retrans,
            human_bytes(t.bytes_acked),
            human_bytes(t.bytes_received),
            t.segs_out,
            t.segs_in
        ),
        None => "tcp info none".into(),
    }));
    if let Some(n) = note {
        l.push(Line::styled(n, Style::new().fg(Color::Yellow)));
    }
    if !f.events.is_empty() {
        l.push(Line::from("events:"));
    }
    for e in f.events.iter().rev() {
        l.push(Line::from(format!(
            "  {:>7} ago  {}",
            human_age(e.at_secs_ago),
            e.what
        )));
    }
    l
}

/// `label 0x1000c = 00 010000000 0 000011 00: experiment 2, activity 3, entropy 0b00000`
pub fn label_text(lb: u32) -> String {
    let d = tag::decode(lb);
    let b = format!("{:020b}", lb & 0xF_FFFF);
    let tag = match d.tag {
        Some(t) => format!(
            "experiment {} (bits 17..9, reversed), activity {} (bits 7..2)",
            t.experiment, t.activity
        ),
        None => "no valid tag".into(),
    };
    format!(
        "label 0x{lb:05x} = {} {} {} {} {}: {tag}, entropy 0b{:05b}",
        &b[0..2],
        &b[2..11],
        &b[11..12],
        &b[12..18],
        &b[18..20],
        d.entropy
    )
}

fn bottom_line(s: &ViewState) -> Paragraph<'static> {
    match &s.input {
        Some(line) => {
            let mut spans = vec![
                Span::styled("filter> ", Style::new().fg(Color::Yellow)),
                Span::raw(format!("{line}█")),
            ];
            match &s.input_error {
                Some(e) => spans.push(Span::styled(format!("  {e}"), Style::new().fg(Color::Red))),
                None => spans.push(Span::styled(
                    "  (exp:NAME user:NAME proc:TEXT addr:IP/CIDR tagged WORDS; Enter apply, Esc cancel)",
                    Style::new().fg(Color::DarkGray),
                )),
            }
            Paragraph::new(Line::from(spans))
        }
        None => Paragraph::new(HELP).style(Style::new().fg(Color::DarkGray)),
    }
}

#[cfg(test)]
#[path = "render_tests.rs"]
mod tests;
