//! The live view's state and what keys do to it: no terminal, no socket, so every
//! behaviour is testable by feeding keys and updates.

use std::time::{Duration, Instant};

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::columns::{sorted_indices, Column};
use crate::api::filter::FlowFilter;
use crate::api::view::{FlowView, StatusView};

/// What the fetcher thread reports.
#[derive(Debug)]
pub enum Update {
    Data {
        status: Box<StatusView>,
        flows: Vec<FlowView>,
        /// How long fetching them took.
        took: Duration,
    },
    /// The reply to `{"op":"flow"}` for the flow the detail pane shows.
    Detail(Result<Box<FlowView>, String>),
    /// The daemon could not be reached or answered badly; the fetcher keeps retrying.
    Lost {
        error: String,
        /// No daemon to talk to (as opposed to a daemon that answers with errors).
        unreachable: bool,
    },
}

/// What the event loop must do after a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    /// Something changed: draw again.
    Redraw,
    Quit,
    /// Show (Some) or stop showing (None) the detail of a flow: ask the fetcher.
    Detail(Option<u64>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Connection {
    /// Nothing received yet.
    Connecting,
    Up,
    /// Lost since then, with the last error; the last data stays on screen.
    Down {
        error: String,
        unreachable: bool,
        since: Instant,
    },
}

/// Everything the screen shows.
#[derive(Debug)]
pub struct ViewState {
    pub status: Option<StatusView>,
    /// Flows as last received (the command-line filter already applied by the daemon).
    pub flows: Vec<FlowView>,
    /// Indices into `flows` after the `/` filter, in display order.
    pub visible: Vec<usize>,
    pub sort: Column,
    pub descending: bool,
    /// The `/` filter in force, and the text it was parsed from.
    pub filter: FlowFilter,
    pub filter_text: String,
    /// The filter line while it is being edited, and why the last try was refused.
    pub input: Option<String>,
    pub input_error: Option<String>,
    /// Cookie of the selected flow: selection follows the flow across refreshes.
    pub selected: Option<u64>,
    /// First visible row, and how many rows fit (set by the renderer).
    pub offset: usize,
    pub page_rows: usize,
    /// The flow whose detail pane is open, and its `flow` reply once it came.
    pub detail_cookie: Option<u64>,
    pub detail: Option<Result<Box<FlowView>, String>>,
    pub connection: Connection,
    pub interval: Duration,
    /// How long the last refresh took (status + flows).
    pub fetch_time: Duration,
}

impl ViewState {
    pub fn new(sort: Column, descending: bool, interval: Duration) -> Self {
        ViewState {
            status: None,
            flows: Vec::new(),
            visible: Vec::new(),
            sort,
            descending,
            filter: FlowFilter::default(),
            filter_text: String::new(),
            input: None,
            input_error: None,
            selected: None,
            offset: 0,
            page_rows: 10,
            detail_cookie: None,
            detail: None,
            connection: Connection::Connecting,
            interval,
            fetch_time: Duration::ZERO,
        }
    }

    pub fn apply(&mut self, u: Update) {
        match u {
            Update::Data {
                status,
                flows,
                took,
            } => {
                self.fetch_time = took;
                self.status = Some(*status);
                self.flows = flows;
                self.connection = Connection::Up;
                self.refilter();
            }
            Update::Detail(d) => {
                if self.detail_cookie.is_some() {
                    self.detail = Some(d);
                }
            }
            Update::Lost { error, unreachable } => {
                let since = match &self.connection {
                    Connection::Down { since, .. } => *since,
                    _ => Instant::now(),
                };
                self.connection = Connection::Down {
                    error,
                    unreachable,
                    since,
                };
            }
        }
    }

    /// Recomputes the visible rows after new data, a new filter or a new sort.
    pub fn refilter(&mut self) {
        let filter = &self.filter;
        self.visible = sorted_indices(
            &self.flows,
            |f| filter.matches(f),
            self.sort,
            self.descending,
        );
        if self.selected_index().is_none() {
            self.selected = self.visible.first().map(|&i| self.flows[i].cookie);
        }
    }

    /// Row of the selected flow among the visible ones.
    pub fn selected_index(&self) -> Option<usize> {
        let c = self.selected?;
        self.visible.iter().position(|&i| self.flows[i].cookie == c)
    }

    pub fn selected_flow(&self) -> Option<&FlowView> {
        self.selected_index().map(|r| &self.flows[self.visible[r]])
    }

    fn select_row(&mut self, row: usize) {
        if let Some(&i) = self
            .visible
            .get(row.min(self.visible.len().saturating_sub(1)))
        {
            self.selected = Some(self.flows[i].cookie);
        }
    }

    fn move_by(&mut self, delta: isize) {
        let cur = self.selected_index().unwrap_or(0) as isize;
        self.select_row((cur + delta).max(0) as usize);
    }

    fn set_sort(&mut self, c: Column) {
        if self.sort == c {
            self.descending = !self.descending;
        } else {
            self.sort = c;
            self.descending = c.descending_by_default();
        }
        self.refilter();
    }

    pub fn handle_key(&mut self, k: KeyEvent) -> Action {
        if k.kind == KeyEventKind::Release {
            return Action::None;
        }
        if k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c') {
            return Action::Quit;
        }
        if self.input.is_some() {
            return self.edit_filter(k);
        }
        let page = self.page_rows.max(1) as isize;
        match k.code {
            KeyCode::Char('q') => return Action::Quit,
            KeyCode::Esc if self.detail_cookie.is_some() => return self.close_detail(),
            KeyCode::Esc => return Action::Quit,
            KeyCode::Up | KeyCode::Char('k') => self.move_by(-1),
            KeyCode::Down | KeyCode::Char('j') => self.move_by(1),
            KeyCode::PageUp => self.move_by(-page),
            KeyCode::PageDown => self.move_by(page),
            KeyCode::Home | KeyCode::Char('g') => self.select_row(0),
            KeyCode::End | KeyCode::Char('G') => self.select_row(usize::MAX),
            KeyCode::Char('s') => self.set_sort(self.sort.next()),
            KeyCode::Char('r') => {
                self.descending = !self.descending;
                self.refilter();
            }
            KeyCode::Char('/') => {
                self.input = Some(self.filter_text.clone());
                self.input_error = None;
            }
            KeyCode::Enter if self.detail_cookie.is_some() => return self.close_detail(),
            KeyCode::Enter => {
                let Some(c) = self.selected else {
                    return Action::None;
                };
                self.detail_cookie = Some(c);
                self.detail = None;
                return Action::Detail(Some(c));
            }
            KeyCode::Char(ch) => match Column::from_key(ch) {
                Some(c) => self.set_sort(c),
                None => return Action::None,
            },
            _ => return Action::None,
        }
        // Moving the selection while the detail pane is open shows the new flow's detail.
        if let (Some(open), Some(sel)) = (self.detail_cookie, self.selected) {
            if open != sel {
                self.detail_cookie = Some(sel);
                self.detail = None;
                return Action::Detail(Some(sel));
            }
        }
        Action::Redraw
    }

    fn close_detail(&mut self) -> Action {
        self.detail_cookie = None;
        self.detail = None;
        Action::Detail(None)
    }

    fn edit_filter(&mut self, k: KeyEvent) -> Action {
        let Some(line) = self.input.as_mut() else {
            return Action::None;
        };
        match k.code {
            KeyCode::Esc => {
                self.input = None;
                self.input_error = None;
            }
            KeyCode::Enter => match FlowFilter::parse(line) {
                Ok(f) => {
                    self.filter = f;
                    self.filter_text = line.trim().to_string();
                    self.input = None;
                    self.input_error = None;
                    self.refilter();
                }
                Err(e) => self.input_error = Some(e.to_string()),
            },
            KeyCode::Backspace => {
                line.pop();
            }
            KeyCode::Char('u') if k.modifiers.contains(KeyModifiers::CONTROL) => line.clear(),
            KeyCode::Char(c) => line.push(c),
            _ => return Action::None,
        }
        Action::Redraw
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::view::tests::flow;

    pub fn key(c: KeyCode) -> KeyEvent {
        KeyEvent::new(c, KeyModifiers::NONE)
    }

    pub fn typed(s: &mut ViewState, text: &str) {
        for ch in text.chars() {
            s.handle_key(key(KeyCode::Char(ch)));
        }
    }

    /// Three atlas flows with 3, 2, 1 kB and an untagged sshd one.
    pub fn sample() -> ViewState {
        let mut s = ViewState::new(Column::Bytes, true, Duration::from_secs(1));
        let mut flows: Vec<FlowView> = (1..=3)
            .map(|i| FlowView {
                bytes: i * 1000,
                ..flow(i)
            })
            .collect();
        flows.push(FlowView {
            comm: Some("sshd".into()),
            experiment: None,
            experiment_name: None,
            activity: None,
            activity_name: None,
            label: None,
            rule: None,
            bytes: 10,
            ..flow(4)
        });
        s.apply(Update::Data {
            status: Box::default(),
            flows,
            took: Duration::from_millis(7),
        });
        s
    }

    fn cookies(s: &ViewState) -> Vec<u64> {
        s.visible.iter().map(|&i| s.flows[i].cookie).collect()
    }

    #[test]
    fn sort_keys_pick_reverse_and_cycle_columns() {
        let mut s = sample();
        assert_eq!(cookies(&s), [3, 2, 1, 4]);
        s.handle_key(key(KeyCode::Char('r')));
        assert_eq!(cookies(&s), [4, 1, 2, 3]);
        s.handle_key(key(KeyCode::Char('s')));
        assert_eq!(s.sort, Column::Age);
        s.handle_key(key(KeyCode::Char('5')));
        assert_eq!((s.sort, s.descending), (Column::Process, false));
        assert_eq!(cookies(&s), [4, 1, 2, 3]); // sshd < xrootd, then by cookie
    }

    #[test]
    fn selection_follows_the_flow_across_refreshes_and_moves_with_keys() {
        let mut s = sample();
        assert_eq!(s.selected, Some(3));
        s.handle_key(key(KeyCode::Down));
        assert_eq!(s.selected, Some(2));
        s.handle_key(key(KeyCode::End));
        assert_eq!(s.selected, Some(4));
        s.handle_key(key(KeyCode::Home));
        s.handle_key(key(KeyCode::Up));
        assert_eq!(s.selected, Some(3));
        s.handle_key(key(KeyCode::Char('r')));
        assert_eq!(s.selected_index(), Some(3));
    }

    #[test]
    fn filter_line_applies_on_enter_and_refuses_bad_input() {
        let mut s = sample();
        s.handle_key(key(KeyCode::Char('/')));
        typed(&mut s, "addr:bogus");
        s.handle_key(key(KeyCode::Enter));
        assert!(s.input.is_some());
        assert!(s.input_error.as_deref().unwrap().contains("bogus"));
        for _ in 0.."addr:bogus".len() {
            s.handle_key(key(KeyCode::Backspace));
        }
        typed(&mut s, "proc:sshd");
        s.handle_key(key(KeyCode::Enter));
        assert_eq!(s.input, None);
        assert_eq!(cookies(&s), [4]);
        assert_eq!(s.selected, Some(4));
        assert_eq!(s.filter_text, "proc:sshd");
    }

    #[test]
    fn keys_quit_unless_a_pane_or_the_input_is_open() {
        let mut s = sample();
        assert_eq!(s.handle_key(key(KeyCode::Enter)), Action::Detail(Some(3)));
        assert_eq!(s.handle_key(key(KeyCode::Down)), Action::Detail(Some(2)));
        assert_eq!(s.handle_key(key(KeyCode::Esc)), Action::Detail(None));
        s.handle_key(key(KeyCode::Char('/')));
        assert_eq!(s.handle_key(key(KeyCode::Char('q'))), Action::Redraw);
        assert_eq!(s.handle_key(key(KeyCode::Esc)), Action::Redraw);
        assert_eq!(s.handle_key(key(KeyCode::Esc)), Action::Quit);
        assert_eq!(s.handle_key(key(KeyCode::Char('q'))), Action::Quit);
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(s.handle_key(ctrl_c), Action::Quit);
    }

    #[test]
    fn losing_the_daemon_keeps_the_data_and_the_first_failure_time() {
        let mut s = sample();
        s.apply(Update::Lost {
            error: "gone".into(),
            unreachable: true,
        });
        let Connection::Down { since, .. } = s.connection.clone() else {
            panic!("not down")
        };
        s.apply(Update::Lost {
            error: "still gone".into(),
            unreachable: true,
        });
        assert_eq!(
            s.connection,
            Connection::Down {
                error: "still gone".into(),
                unreachable: true,
                since
            }
        );
        assert_eq!(s.visible.len(), 4);
    }
}
