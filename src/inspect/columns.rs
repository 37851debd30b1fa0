//! The flow table's columns, shared by the plain table and the TUI: what each shows,
//! how it sorts, and the per-experiment totals.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use crate::api::view::FlowView;

/// A column of the flow table, in display order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Column {
    Proto,
    Local,
    Remote,
    State,
    Process,
    User,
    Tag,
    Label,
    Rule,
    Packets,
    Bytes,
    Age,
}

impl Column {
    pub const ALL: [Column; 12] = [
        Column::Proto,
        Column::Local,
        Column::Remote,
        Column::State,
        Column::Process,
        Column::User,
        Column::Tag,
        Column::Label,
        Column::Rule,
        Column::Packets,
        Column::Bytes,
        Column::Age,
    ];

    /// The keys that pick each column in the TUI, in [`Column::ALL`] order.
    pub const KEYS: [char; 12] = ['1', '2', '3', '4', '5', '6', '7', '8', '9', '0', '-', '='];

    pub fn title(self) -> &'static str {
        match self {
            Column::Proto => "PROTO",
            Column::Local => "LOCAL",
            Column::Remote => "REMOTE",
            Column::State => "STATE",
            Column::Process => "PID/COMM",
            Column::User => "USER",
            Column::Tag => "EXPERIMENT/ACTIVITY",
            Column::Label => "LABEL",
            Column::Rule => "RULE",
            Column::Packets => "PKTS",
            Column::Bytes => "BYTES",
            Column::Age => "AGE",
        }
    }

    /// Numbers read better right-aligned.
    pub fn right_aligned(self) -> bool {
        matches!(self, Column::Packets | Column::Bytes | Column::Age)
    }

    /// The order a fresh sort on this column starts with: biggest first for numbers.
    pub fn descending_by_default(self) -> bool {
        matches!(self, Column::Packets | Column::Bytes)
    }

    pub fn next(self) -> Column {
        let i = Column::ALL.iter().position(|c| *c == self).unwrap_or(0);
        Column::ALL[(i + 1) % Column::ALL.len()]
    }

    pub fn from_key(k: char) -> Option<Column> {
        Column::KEYS
            .iter()
            .position(|c| *c == k)
            .map(|i| Column::ALL[i])
    }

    /// The cell text for `flow`.
    pub fn cell(self, f: &FlowView) -> String {
        match self {
            Column::Proto => f.proto.clone(),
            Column::Local => f.local.to_string(),
            Column::Remote => f.remote.to_string(),
            Column::State => f.state.clone(),
            Column::Process => match (f.pid, &f.comm) {
                (Some(p), Some(c)) => format!("{p}/{c}"),
                (Some(p), None) => p.to_string(),
                (None, Some(c)) => c.clone(),
                (None, None) => "-".into(),
            },
            Column::User => match (&f.user, f.uid) {
                (Some(u), _) => u.clone(),
                (None, Some(uid)) => uid.to_string(),
                (None, None) => "-".into(),
            },
            Column::Tag => f.tag_text(),
            Column::Label => f.label.map_or("-".into(), |l| format!("0x{l:05x}")),
            Column::Rule => f.rule.clone().unwrap_or_else(|| "-".into()),
            Column::Packets => human_count(f.packets),
            Column::Bytes => human_bytes(f.bytes),
            Column::Age => human_age(f.age_secs),
        }
    }

    /// Ascending order of two flows on this column; unknown values sort last.
    pub fn compare(self, a: &FlowView, b: &FlowView) -> Ordering {
        fn opt<T: Ord>(a: Option<T>, b: Option<T>) -> Ordering {
            match (a, b) {
                (Some(a), Some(b)) => a.cmp(&b),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => Ordering::Equal,
            }
        }
        match self {
            Column::Proto => a.proto.cmp(&b.proto),
            Column::Local => a.local.cmp(&b.local),
            Column::Remote => a.remote.cmp(&b.remote),
            Column::State => a.state.cmp(&b.state),
            Column::Process => opt(a.comm.as_deref(), b.comm.as_deref()).then(opt(a.pid, b.pid)),
            Column::User => opt(a.user.as_deref(), b.user.as_deref()).then(opt(a.uid, b.uid)),
            Column::Tag => opt(a.experiment_name.as_deref(), b.experiment_name.as_deref())
                .then(opt(a.experiment, b.experiment))
                .then(opt(a.activity, b.activity)),
            Column::Label => opt(a.label, b.label),
            Column::Rule => opt(a.rule.as_deref(), b.rule.as_deref()),
            Column::Packets => a.packets.cmp(&b.packets),
            Column::Bytes => a.bytes.cmp(&b.bytes),
            Column::Age => a.age_secs.total_cmp(&b.age_secs),
        }
    }
}

/// Indices of `flows` in display order: by `column`, `reverse`d if asked, ties broken
/// by cookie so rows do not jump between refreshes.
pub fn sorted_indices(
    flows: &[FlowView],
    keep: impl Fn(&FlowView) -> bool,
    column: Column,
    descending: bool,
) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..flows.len()).filter(|&i| keep(&flows[i])).collect();
    idx.sort_by(|&i, &j| display_order(column, descending, &flows[i], &flows[j]));
    idx
}

/// The order rows are shown in: by `column`, reversed when `descending`, ties
/// broken by cookie so rows do not jump between refreshes.
pub fn display_order(column: Column, descending: bool, a: &FlowView, b: &FlowView) -> Ordering {
    let o = column.compare(a, b);
    let o = if descending { o.reverse() } else { o };
    o.then(a.cookie.cmp(&b.cookie))
}

/// Flows, packets and bytes of one experiment among the flows shown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExperimentTotals {
    pub name: String,
    pub flows: u64,
    pub packets: u64,
    pub bytes: u64,
}

/// Totals per experiment, biggest byte count first, `untagged` always last.
pub fn experiment_totals<'a>(
    flows: impl IntoIterator<Item = &'a FlowView>,
) -> Vec<ExperimentTotals> {
    let mut by: BTreeMap<String, ExperimentTotals> = BTreeMap::new();
    for f in flows {
        let name = f.experiment_text();
        let t = by.entry(name.clone()).or_insert_with(|| ExperimentTotals {
            name,
            ..Default::default()
        });
        t.flows += 1;
        t.packets += f.packets;
        t.bytes += f.bytes;
    }
    let untagged = by.remove("untagged");
    let mut v: Vec<ExperimentTotals> = by.into_values().collect();
    v.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.name.cmp(&b.name)));
    v.extend(untagged);
    v
}

impl ExperimentTotals {
    pub fn summary(&self) -> String {
        format!(
            "{} {} flow{}, {} pkts, {}",
            self.name,
            self.flows,
            if self.flows == 1 { "" } else { "s" },
            human_count(self.packets),
            human_bytes(self.bytes)
        )
    }
}

/// 1023 B, 1.5 KiB, 12.0 MiB, ...
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// 999, 1.2k, 3.4M, 5.6G
pub fn human_count(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1}k", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.1}G", n as f64 / 1e9),
    }
}

/// 42s, 3m05s, 2h03m, 4d07h
pub fn human_age(secs: f64) -> String {
    let s = if secs.is_finite() && secs > 0.0 {
        secs as u64
    } else {
        0
    };
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::view::tests::flow;

    #[test]
    fn human_units_round_as_documented() {
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(12 << 20), "12.0 MiB");
        assert_eq!(human_count(9_999), "9999");
        assert_eq!(human_count(12_345), "12.3k");
        assert_eq!(human_age(42.9), "42s");
        assert_eq!(human_age(185.0), "3m05s");
        assert_eq!(human_age(7380.0), "2h03m");
        assert_eq!(human_age(f64::NAN), "0s");
    }

    #[test]
    fn sort_breaks_ties_by_cookie_and_puts_unknowns_last() {
        let mut a = flow(3);
        a.rule = None;
        let b = flow(1);
        let c = flow(2);
        let flows = vec![a, b, c];
        assert_eq!(
            sorted_indices(&flows, |_| true, Column::Rule, false),
            vec![1, 2, 0]
        );
        assert_eq!(
            sorted_indices(&flows, |_| true, Column::Bytes, true),
            vec![1, 2, 0]
        );
    }

    #[test]
    fn totals_group_by_experiment_with_untagged_last() {
        let mut u = flow(9);
        u.experiment = None;
        u.experiment_name = None;
        u.bytes = 1 << 40;
        let mut cms = flow(2);
        cms.experiment_name = Some("cms".into());
        cms.bytes = 1;
        let t = experiment_totals(&[flow(1), u, flow(3), cms]);
        let names: Vec<&str> = t.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["atlas", "cms", "untagged"]);
        assert_eq!(t[0].flows, 2);
        assert_eq!(t[0].bytes, 300_000);
    }

    #[test]
    fn number_keys_pick_columns_in_order() {
        assert_eq!(Column::from_key('1'), Some(Column::Proto));
        assert_eq!(Column::from_key('0'), Some(Column::Packets));
        assert_eq!(Column::from_key('-'), Some(Column::Bytes));
        assert_eq!(Column::from_key('='), Some(Column::Age));
        assert_eq!(Column::Age.next(), Column::Proto);
    }
}
