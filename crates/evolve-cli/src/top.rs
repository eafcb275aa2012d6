//! `evolve top`: a live view of a process's functions, versions, call counts and probes.
//!
//! Every interval the view asks the agent for `status` and `probe_read` and redraws. Call counts
//! of hot functions come from count probes on them; a process without any shows "n/a" and says
//! so in the footer. The probes panel shows every probe: its function, kind, calls, call rate
//! (over the last interval; since the probe was added in a single frame), latency and what else
//! it recorded. `q` or Esc quits; `--once` renders one frame to stdout (for scripts and tests),
//! with `--json` the status object with a `probes` field (the `probe_read` result).

use crate::outln;
use crate::probe::{format_ns, rate};
use anyhow::{Context as _, Result};
use evolve_agent::client::{ClientError, Connection};
use evolve_agent::protocol::{ErrorKind, ProbeReadings, ProbeReport, Request, Status};
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};
use ratatui::{Frame, Terminal};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What one frame shows.
struct Snapshot {
    status: Status,
    /// None: the agent has no probes capability (an older agent).
    probes: Option<ProbeReadings>,
}

/// Calls per second of each probe over the last refresh: id -> (calls, at_ms) of the previous
/// snapshot.
type Previous = HashMap<u64, (u64, u64)>;

fn fetch(connection: &mut Connection) -> Result<Snapshot> {
    let value = connection.call(&Request::Status, Duration::from_secs(10))?;
    let status =
        serde_json::from_value(value).context("the agent's status has an unexpected shape")?;
    let probes = match connection.call(&Request::ProbeRead { probe: None }, Duration::from_secs(10))
    {
        Ok(v) => Some(
            serde_json::from_value(v)
                .context("the agent's probe readings have an unexpected shape")?,
        ),
        Err(ClientError::Refused {
            kind: ErrorKind::UnknownRequest,
            ..
        }) => None,
        Err(e) => return Err(e.into()),
    };
    Ok(Snapshot { status, probes })
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
        let snapshot = fetch(connection)?;
        if json {
            let mut value = serde_json::to_value(&snapshot.status)?;
            value["probes"] = serde_json::to_value(&snapshot.probes)?;
            outln!("{value}");
            return Ok(());
        }
        let status = &snapshot.status;
        let height = 16
            + status.functions.hot.len()
            + status.functions.multiverse.len()
            + status.switches.len()
            + snapshot.probes.as_ref().map_or(0, |p| p.readings.len());
        let mut terminal = Terminal::new(TestBackend::new(120, height as u16))?;
        terminal.draw(|f| draw(f, pid, &snapshot, &Previous::new(), None))?;
        let buffer = terminal.backend().buffer();
        let area = buffer.area;
        let lines: Vec<String> = (0..area.height)
            .map(|y| {
                let line: String = (0..area.width)
                    .map(|x| buffer[(x, y)].symbol().to_string())
                    .collect();
                line.trim_end().to_string()
            })
            .collect();
        let used = lines
            .iter()
            .rposition(|l| !l.is_empty())
            .map_or(0, |i| i + 1);
        for line in &lines[..used] {
            outln!("{line}");
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
    let mut snapshot = fetch(connection)?;
    let mut previous = Previous::new();
    let mut error = None;
    let mut last = Instant::now();
    loop {
        terminal.draw(|f| draw(f, pid, &snapshot, &previous, error.as_deref()))?;
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
                    previous = snapshot
                        .probes
                        .iter()
                        .flat_map(|p| p.readings.iter().map(|r| (r.probe.id, (r.calls, p.at_ms))))
                        .collect();
                    snapshot = s;
                    error = None;
                }
                Err(e) => error = Some(format!("{e:#}")),
            }
        }
    }
}

fn draw(
    frame: &mut Frame,
    pid: u32,
    snapshot: &Snapshot,
    previous: &Previous,
    error: Option<&str>,
) {
    let status = &snapshot.status;
    let hot = status.functions.hot.len() as u16;
    let multi = status.functions.multiverse.len() as u16;
    let probes = snapshot
        .probes
        .as_ref()
        .map_or(0, |p| p.readings.len().max(1)) as u16;
    let [head, hot_area, multi_area, probe_area, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(hot + 3),
        Constraint::Length(multi + status.switches.len() as u16 + 3),
        Constraint::Length(probes + 3),
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
    draw_probes(frame, snapshot, previous, probe_area);
    let mut lines = Vec::new();
    if snapshot.probes.is_none() {
        lines.push(Line::from(
            "probes: not available (the agent does not serve probes)",
        ));
    }
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

/// What a probe recorded besides calls and latency, in a few words.
fn detail(r: &ProbeReport) -> String {
    let kind = r.probe.kind.as_str();
    if kind.starts_with("hist") {
        // The fullest bucket.
        match r.histogram.iter().max_by_key(|b| b.1) {
            Some(&(low, _)) if low < 2 => format!("mostly {low}"),
            Some(&(low, _)) => format!("mostly [{low}, {})", low.saturating_mul(2)),
            None => "no values yet".into(),
        }
    } else if kind.starts_with("when") {
        format!("{} hits", r.hits)
    } else if kind == "coverage" {
        if r.covered { "hit" } else { "not hit" }.into()
    } else {
        String::new()
    }
}

fn draw_probes(
    frame: &mut Frame,
    snapshot: &Snapshot,
    previous: &Previous,
    area: ratatui::layout::Rect,
) {
    let Some(probes) = &snapshot.probes else {
        return;
    };
    let mut rows: Vec<Row> = probes
        .readings
        .iter()
        .map(|r| {
            let per_second = match previous.get(&r.probe.id) {
                Some(&(calls, at)) if probes.at_ms > at => {
                    Some(r.calls.saturating_sub(calls) as f64 * 1000.0 / (probes.at_ms - at) as f64)
                }
                _ => rate(r, probes.at_ms),
            };
            Row::new(vec![
                r.probe.id.to_string(),
                r.probe.function.clone(),
                r.probe.kind.clone(),
                r.calls.to_string(),
                per_second.map_or_else(|| "-".into(), |s| format!("{s:.1}")),
                r.latency.as_ref().map_or_else(String::new, |l| {
                    format!("{} / {}", format_ns(l.mean_ns), format_ns(l.p99_ns))
                }),
                format!(
                    "{}{}",
                    detail(r),
                    if r.probe.attached { "" } else { " (detached)" }
                ),
            ])
        })
        .collect();
    if rows.is_empty() {
        rows.push(Row::new(vec![
            String::new(),
            "(no probes: evolve probe PID add PATTERN --count)".to_string(),
        ]));
    }
    frame.render_widget(
        Table::new(
            rows,
            [
                Constraint::Length(4),
                Constraint::Percentage(25),
                Constraint::Length(20),
                Constraint::Length(10),
                Constraint::Length(9),
                Constraint::Length(21),
                Constraint::Min(10),
            ],
        )
        .header(
            Row::new(vec![
                "ID",
                "PROBED FUNCTION",
                "KIND",
                "CALLS",
                "CALLS/S",
                "MEAN / P99",
                "RECORDED",
            ])
            .style(Style::default().add_modifier(Modifier::BOLD)),
        )
        .block(Block::default().borders(Borders::TOP).title("probes")),
        area,
    );
}
