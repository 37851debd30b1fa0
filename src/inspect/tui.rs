//! The live view: a fetcher thread asks the daemon every interval, the main thread
//! reads keys and draws. The terminal is restored however the view ends: `q`, an
//! error (a guard's `Drop`), a panic (ratatui's `try_init` installs a restoring hook)
//! or SIGTERM/SIGHUP/SIGINT (caught as a flag the event loop checks, so the normal
//! way out runs).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ratatui::crossterm::event::{self, Event};

use super::render::render;
use super::state::{Action, Update, ViewState};
use super::InspectArgs;
use crate::api::client::{Client, ClientError};
use crate::api::filter::FlowFilter;

/// How long the event loop waits for a key before looking for fetched data.
const TICK: Duration = Duration::from_millis(50);

enum Command {
    /// Show the detail of this flow (or none) from now on; refresh at once.
    Detail(Option<u64>),
    /// The view is sorted by this column now (`--top`: the N to fetch follow it).
    Sort(super::columns::Column, bool),
}

/// What the fetcher asks for each refresh.
struct Fetch {
    filter: FlowFilter,
    interval: Duration,
    /// `--top N`, and the order the N are chosen by.
    top: Option<(usize, super::columns::Column, bool)>,
}

/// Restores the terminal and the signal dispositions when dropped, on every way out.
struct TerminalGuard(Vec<signal_hook::SigId>);

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        ratatui::restore();
        for id in self.0.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// Runs `f` on the full-screen terminal and gives the terminal back afterwards,
/// whether `f` returns, fails or panics. `f` must return soon after the flag it is
/// given turns true: a termination signal arrived.
pub fn with_terminal<R>(
    f: impl FnOnce(&mut ratatui::DefaultTerminal, &AtomicBool) -> Result<R>,
) -> Result<R> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut ids = Vec::new();
    for sig in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGINT,
    ] {
        ids.push(
            signal_hook::flag::register(sig, stop.clone())
                .with_context(|| format!("catching signal {sig}"))?,
        );
    }
    let guard = TerminalGuard(ids);
    let mut terminal = ratatui::try_init().context("setting up the terminal")?;
    let r = f(&mut terminal, &stop);
    drop(guard);
    r
}

pub fn run(client: &Client, args: &InspectArgs, filter: FlowFilter) -> Result<()> {
    // Fail before taking over the screen when there is no daemon at all: the error
    // then reads as one plain line, as for every other subcommand.
    client.status()?;

    let (up_tx, up_rx) = mpsc::channel();
    let (cmd_tx, cmd_rx) = mpsc::channel();
    let fetcher = {
        let client = client.clone();
        let fetch = Fetch {
            filter,
            interval: args.interval(),
            top: args.top_n().map(|n| (n, args.sort(), args.descending())),
        };
        thread::Builder::new()
            .name("inspect-fetch".into())
            .spawn(move || fetch_loop(&client, fetch, &up_tx, &cmd_rx))
            .context("starting the fetcher thread")?
    };

    let mut state = ViewState::new(args.sort(), args.descending(), args.interval());
    let r = with_terminal(|terminal, stop| event_loop(terminal, &mut state, &up_rx, &cmd_tx, stop));
    // Dropping the command sender ends the fetcher at its next wake-up; not joined,
    // so a daemon that hangs (up to the reply timeout) cannot delay quitting.
    drop(cmd_tx);
    drop(fetcher);
    r
}

fn event_loop(
    terminal: &mut ratatui::DefaultTerminal,
    state: &mut ViewState,
    updates: &Receiver<Update>,
    commands: &Sender<Command>,
    stop: &AtomicBool,
) -> Result<()> {
    let mut dirty = true;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if dirty {
            terminal.draw(|f| render(f, state)).context("drawing")?;
            dirty = false;
        }
        if event::poll(TICK).context("reading the terminal")? {
            let order = (state.sort, state.descending);
            match event::read().context("reading the terminal")? {
                Event::Key(k) => match state.handle_key(k) {
                    Action::Quit => return Ok(()),
                    Action::None => {}
                    Action::Redraw => dirty = true,
                    Action::Detail(c) => {
                        dirty = true;
                        // The fetcher is gone only if it panicked; the view still works.
                        let _ = commands.send(Command::Detail(c));
                    }
                },
                Event::Resize(..) => dirty = true,
                _ => {}
            }
            if order != (state.sort, state.descending) {
                let _ = commands.send(Command::Sort(state.sort, state.descending));
            }
        }
        // Only the newest data matters; older updates are applied and overwritten.
        while let Ok(u) = updates.try_recv() {
            state.apply(u);
            dirty = true;
        }
    }
}

fn fetch_loop(
    client: &Client,
    fetch: Fetch,
    updates: &Sender<Update>,
    commands: &Receiver<Command>,
) {
    let Fetch {
        filter,
        interval,
        mut top,
    } = fetch;
    let filter = &filter;
    let mut detail: Option<u64> = None;
    let mut next = Instant::now();
    loop {
        // Fixed rate: a slow reply shortens the wait instead of stretching the period.
        next += interval;
        let started = Instant::now();
        let data = client.status().and_then(|status| {
            let flows = match top {
                Some((n, column, descending)) => {
                    super::top::top_flows(client, filter, column, descending, n)?
                }
                None => client.flows(filter)?,
            };
            Ok((status, flows))
        });
        let update = match data {
            Ok((status, flows)) => Update::Data {
                status: Box::new(status),
                flows,
                took: started.elapsed(),
            },
            Err(e) => Update::Lost {
                unreachable: matches!(
                    e,
                    ClientError::NotRunning(_)
                        | ClientError::PermissionDenied(_)
                        | ClientError::Io { .. }
                ),
                error: e.to_string(),
            },
        };
        if updates.send(update).is_err() {
            return;
        }
        if let Some(c) = detail {
            let d = client.flow(c).map(Box::new).map_err(|e| e.to_string());
            if updates.send(Update::Detail(d)).is_err() {
                return;
            }
        }
        let now = Instant::now();
        if next < now {
            // Fell behind (a daemon slower than the interval): do not try to catch up.
            next = now;
        }
        match commands.recv_timeout(next - now) {
            Ok(Command::Detail(c)) => {
                detail = c;
                // Ask at once for the new detail, then keep the usual rhythm.
                next = Instant::now();
            }
            Ok(Command::Sort(column, descending)) => {
                if let Some((n, ..)) = top {
                    top = Some((n, column, descending));
                    // Another column's first N are other flows: fetch them now.
                    next = Instant::now();
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}
