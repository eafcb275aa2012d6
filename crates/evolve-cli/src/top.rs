//! `evolve top`: a live view of a process's functions, versions and call counts.
//!
//! Every interval the view asks the agent for `status` and redraws. Call counts come from a
//! counting capability (probes); a process without one shows "n/a" and says so in the footer.
//! `q` or Esc quits; `--once` renders one frame to stdout (for scripts and tests).

use anyhow::{Context as _, Result};
use evolve_agent::client::Connection;
use evolve_agent::protocol::{Request, Status};
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};
use ratatui::{Frame, Terminal};
use std::time::{Duration, Instant};

fn fetch(connection: &mut Connection) -> Result<Status> {
    let value = connection.call(&Request::Status, Duration::from_secs(10))?;
    serde_json::from_value(value).context("the agent's status has an unexpected shape")
}

/// Runs the view (or prints one frame).
pub fn run(
    connection: &mut Connection,
    pid: u32,
    once: bool,
    interval: Duration,
    json: bool,
) -> Result<()> {
    if once {
        let status = fetch(connection)?;
        if json {
            println!("{}", serde_json::to_string(&status)?);
            return Ok(());
        }
        let height = 12
            + status.functions.hot.len()
            + status.functions.multiverse.len()
            + status.switches.len();
        let mut terminal = Terminal::new(TestBackend::new(100, height as u16))?;
        terminal.draw(|f| draw(f, pid, &status, None))?;
        let buffer = terminal.backend().buffer();
        let area = buffer.area;
        for y in 0..area.height {
            let line: String = (0..area.width)
                .map(|x| buffer[(x, y)].symbol().to_string())
                .collect();
            println!("{}", line.trim_end());
        }
        return Ok(());
    }
    let mut terminal = ratatui::init();
    let result = live(&mut terminal, connection, pid, interval);
    ratatui::restore();
    result
}

fn live(
    terminal: &mut ratatui::DefaultTerminal,
    connection: &mut Connection,
    pid: u32,
    interval: Duration,
) -> Result<()> {
    let mut status = fetch(connection)?;
    let mut error = None;
    let mut last = Instant::now();
    loop {
        terminal.draw(|f| draw(f, pid, &status, error.as_deref()))?;
        let wait = interval.saturating_sub(last.elapsed());
        if event::poll(wait)? {
            if let Event::Key(key) = event::read()? {
                if key.kind == KeyEventKind::Press
                    && matches!(key.code, KeyCode::Char('q') | KeyCode::Esc)
                {
                    return Ok(());
                }
            }
        }
        if last.elapsed() >= interval {
            last = Instant::now();
            match fetch(connection) {
                Ok(s) => {
                    status = s;
                    error = None;
                }
                Err(e) => error = Some(format!("{e:#}")),
            }
        }
    }
}

fn draw(frame: &mut Frame, pid: u32, status: &Status, error: Option<&str>) {
    let hot = status.functions.hot.len() as u16;
    let multi = status.functions.multiverse.len() as u16;
    let [head, hot_area, multi_area, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(hot + 3),
        Constraint::Length(multi + status.switches.len() as u16 + 3),
        Constraint::Min(2),
    ])
    .areas(frame.area());
    frame.render_widget(
        Paragraph::new(format!(
            "evolve top — pid {pid} ({}), up {} s, {} patches, {} journal entries",
            status.hello.program,
            status.hello.uptime_s,
            status.patches.len(),
            status.journal_entries
        ))
        .style(Style::default().add_modifier(Modifier::BOLD)),
        head,
    );
    let counts = status.functions.call_counts.as_ref();
    let rows = status.functions.hot.iter().map(|h| {
        let calls = counts
            .and_then(|c| c.iter().find(|(n, _)| *n == h.name))
            .map_or_else(|| "n/a".to_string(), |(_, n)| n.to_string());
        Row::new(vec![
            h.name.clone(),
            format!("v{} {}", h.current, h.versions[h.current]),
            h.versions.len().to_string(),
            calls,
        ])
    });
    frame.render_widget(
        Table::new(
            rows,
            [
                Constraint::Percentage(45),
                Constraint::Percentage(30),
                Constraint::Length(9),
                Constraint::Length(10),
            ],
        )
        .header(
            Row::new(vec!["HOT FUNCTION", "RUNNING", "VERSIONS", "CALLS"])
                .style(Style::default().add_modifier(Modifier::BOLD)),
        )
        .block(Block::default().borders(Borders::TOP).title("hot update")),
        hot_area,
    );
    let rows = status
        .functions
        .multiverse
        .iter()
        .map(|m| {
            Row::new(vec![
                m.name.clone(),
                if m.committed { "committed" } else { "generic" }.to_string(),
            ])
        })
        .chain(status.switches.iter().map(|s| {
            Row::new(vec![
                format!("switch {}", s.name),
                format!("= {} (domain {:?})", s.value, s.domain),
            ])
        }));
    frame.render_widget(
        Table::new(
            rows,
            [Constraint::Percentage(45), Constraint::Percentage(55)],
        )
        .header(
            Row::new(vec!["MULTIVERSE", "STATE"])
                .style(Style::default().add_modifier(Modifier::BOLD)),
        )
        .block(Block::default().borders(Borders::TOP).title("multiverse")),
        multi_area,
    );
    let mut lines = Vec::new();
    if counts.is_none() {
        lines.push(Line::from(
            "call counts: not available (no counting probes in this process)",
        ));
    }
    if let Some(e) = error {
        lines.push(Line::from(format!("refresh failed: {e}")));
    }
    lines.push(Line::from("q: quit"));
    frame.render_widget(Paragraph::new(lines), foot);
}
