//! `flowd-rs inspect`: what the daemon sees and does, live (a full-screen table) or
//! once (a plain table or JSON lines for scripts), read over the control socket.
//!
//! ```text
//! columns -- the table's columns: cells, sorting, per-experiment totals
//! plain   -- --once / --json / stdout not a terminal
//! top     -- --top N: the first N flows chosen as the pages stream in
//! tui     -- the live view (ratatui + crossterm)
//! ```

pub mod columns;
pub mod plain;
pub mod render;
pub mod state;
pub mod top;
pub mod tui;

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use self::columns::Column;
use crate::api::client::Client;
use crate::api::filter::FlowFilter;

/// Arguments of `flowd-rs inspect`.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// Print the flow table once and exit (the default when stdout is not a terminal).
    #[arg(long)]
    pub once: bool,
    /// Print one JSON object per flow and line (the `FlowView` of the control
    /// protocol, stable for scripts), then exit. Without --sort the lines stream
    /// in the daemon's order (socket cookie) as its pages arrive, in constant
    /// memory at any table size; with it they are sorted first.
    #[arg(long)]
    pub json: bool,
    /// Refresh period of the live view, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub interval_ms: u64,
    /// Only flows of this experiment (name, case-insensitive, or id).
    #[arg(long, value_name = "NAME|ID")]
    pub experiment: Option<String>,
    /// Only flows of this user (name or uid).
    #[arg(long, value_name = "NAME|UID")]
    pub user: Option<String>,
    /// Only flows of processes whose command name contains this.
    #[arg(long, value_name = "TEXT")]
    pub process: Option<String>,
    /// Only flows with an end in this address or CIDR prefix (e.g. 2001:db8::/32).
    #[arg(long, value_name = "IP|CIDR")]
    pub address: Option<String>,
    /// Only flows that carry a tag.
    #[arg(long)]
    pub tagged: bool,
    /// Sort by this column (the live view starts with it too) [default: bytes].
    #[arg(long, value_enum, value_name = "COLUMN")]
    pub sort: Option<Column>,
    /// Reverse the column's usual order (biggest first for packets and bytes,
    /// smallest or A-Z first for the others).
    #[arg(long)]
    pub reverse: bool,
    /// Only the first N flows in sort order: chosen while the listing streams in,
    /// so this process holds N flows, not every flow of the daemon (a sorted view
    /// of a million flows otherwise takes ~750 MB here). In the live view, the N
    /// follow the column it is sorted by.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub top: Option<u64>,
}

impl Default for InspectArgs {
    fn default() -> Self {
        InspectArgs {
            once: false,
            json: false,
            interval_ms: 1000,
            experiment: None,
            user: None,
            process: None,
            address: None,
            tagged: false,
            sort: None,
            reverse: false,
            top: None,
        }
    }
}

impl InspectArgs {
    /// The filter the command-line flags ask for.
    pub fn filter(&self) -> FlowFilter {
        FlowFilter {
            experiment: self.experiment.clone(),
            user: self.user.clone(),
            process: self.process.clone(),
            address: self.address.clone(),
            text: None,
            tagged_only: self.tagged,
        }
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    /// The column rows are sorted by.
    pub fn sort(&self) -> Column {
        self.sort.unwrap_or(Column::Bytes)
    }

    /// `--top N`, as a count.
    pub fn top_n(&self) -> Option<usize> {
        self.top.map(|n| usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Whether rows go biggest/last first.
    pub fn descending(&self) -> bool {
        self.sort().descending_by_default() != self.reverse
    }
}

/// Runs `inspect` against the daemon listening on `socket` (`Config::control_socket`).
///
/// Errors read as one line after `flowd-rs: ` (main's convention), e.g. the daemon
/// not running; the caller exits 1 on any.
pub fn run(args: InspectArgs, socket: &Path) -> Result<()> {
    let filter = args.filter();
    filter.validate()?;
    let client = Client::new(socket);
    if args.json || args.once || !std::io::stdout().is_terminal() {
        let mut out = std::io::stdout().lock();
        plain::run(&client, &args, &filter, &mut out)
    } else {
        tui::run(&client, &args, filter)
    }
}
