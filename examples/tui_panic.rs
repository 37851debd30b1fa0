//! Panics while the live view's terminal is set up, to check (tests/inspect_tmux.rs)
//! that the terminal is given back before the panic message is printed.

fn main() {
    let _ = flowd::inspect::tui::with_terminal(|terminal, _stop| {
        terminal.draw(|f| {
            f.render_widget(ratatui::widgets::Paragraph::new("ABOUT TO PANIC"), f.area())
        })?;
        std::thread::sleep(std::time::Duration::from_millis(500));
        panic!("deliberate panic inside the live view");
        #[allow(unreachable_code)]
        Ok(())
    });
}
