//! One-shot output: a fixed-column table for people, or JSON lines for scripts.

use std::io::Write;

use anyhow::{Context, Result};

use super::columns::{experiment_totals, sorted_indices, Column};
use super::InspectArgs;
use crate::api::client::{Client, ClientError};
use crate::api::filter::FlowFilter;
use crate::api::view::FlowView;

/// Fetches the flows once and writes them to `out`.
pub fn run(
    client: &Client,
    args: &InspectArgs,
    filter: &FlowFilter,
    out: &mut impl Write,
) -> Result<()> {
    if args.json && args.sort.is_none() && args.top.is_none() {
        // Page by page: a listing of a million flows need not fit in this process.
        let r = client.flow_pages(filter, |page| {
            write_json(page.iter().filter(|f| filter.matches(f)), out)
        });
        return match r {
            Err(ClientError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            r => Ok(r?),
        };
    }
    let (flows, order) = if let Some(n) = args.top_n() {
        // Chosen and ordered as the pages arrive.
        let flows = super::top::top_flows(client, filter, args.sort(), args.descending(), n)?;
        let order = (0..flows.len()).collect();
        (flows, order)
    } else {
        let flows = client.flows(filter)?;
        // Filtered again here so an older daemon that ignores the filter still
        // gives the right answer; matches() is cheap.
        let order = sorted_indices(
            &flows,
            |f| filter.matches(f),
            args.sort(),
            args.descending(),
        );
        (flows, order)
    };
    let shown = order.iter().map(|&i| &flows[i]);
    let r = if args.json {
        write_json(shown, out)
    } else {
        write_table(shown, out)
    };
    match r {
        // `inspect --once | head` closes the pipe early: not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to stdout"),
    }
}

/// One `FlowView` per line, in display order.
pub fn write_json<'a>(
    flows: impl IntoIterator<Item = &'a FlowView>,
    out: &mut impl Write,
) -> std::io::Result<()> {
    for f in flows {
        serde_json::to_writer(&mut *out, f)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// The table: a header line, one line per flow with columns padded to the widest
/// cell, then one `TOTAL` line per experiment.
pub fn write_table<'a>(
    flows: impl IntoIterator<Item = &'a FlowView>,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let flows: Vec<&FlowView> = flows.into_iter().collect();
    let rows: Vec<Vec<String>> = flows
        .iter()
        .map(|f| Column::ALL.iter().map(|c| c.cell(f)).collect())
        .collect();
    let mut widths: Vec<usize> = Column::ALL.iter().map(|c| c.title().len()).collect();
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let titles: Vec<String> = Column::ALL.iter().map(|c| c.title().to_string()).collect();
    write_row(out, &titles, &widths)?;
    for r in &rows {
        write_row(out, r, &widths)?;
    }
    for t in experiment_totals(flows.iter().copied()) {
        writeln!(out, "TOTAL {}", t.summary())?;
    }
    if flows.is_empty() {
        writeln!(out, "TOTAL no flows")?;
    }
    out.flush()
}

fn write_row(out: &mut impl Write, cells: &[String], widths: &[usize]) -> std::io::Result<()> {
    let mut line = String::new();
    for ((c, cell), w) in Column::ALL.iter().zip(cells).zip(widths) {
        if !line.is_empty() {
            line.push_str("  ");
        }
        if c.right_aligned() {
            line.push_str(&format!("{cell:>w$}"));
        } else {
            line.push_str(&format!("{cell:<w$}"));
        }
    }
    writeln!(out, "{}", line.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::view::tests::flow;

    #[test]
    fn table_has_header_aligned_rows_and_totals() {
        let mut b = flow(2);
        b.comm = Some("fts_url_copy".into());
        b.bytes = 2048;
        let mut out = Vec::new();
        write_table([&flow(1), &b], &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("PROTO  LOCAL"), "{}", lines[0]);
        assert!(lines[0].ends_with("PKTS      BYTES  AGE"), "{}", lines[0]);
        assert!(lines[1].contains("1234/xrootd "));
        assert!(lines[1].contains("atlas/datachallenge"));
        assert!(lines[1].contains("0x1000c"));
        assert!(lines[2].contains("1234/fts_url_copy"));
        // Columns line up: RULE starts at the same offset on every line.
        let at = lines[0].find("RULE").unwrap();
        assert_eq!(&lines[1][at..at + 21], "atlas.toml:xrootd-dat");
        assert_eq!(lines[3], "TOTAL atlas 2 flows, 200 pkts, 148.5 KiB");
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn json_lines_are_one_flow_view_each() {
        let mut out = Vec::new();
        write_json([&flow(1), &flow(2)], &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let back: Vec<FlowView> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(back, vec![flow(1), flow(2)]);
    }
}
