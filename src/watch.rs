//! `stagecraft watch ID` and `stagecraft submit … --follow`: one run followed live from its
//! event stream (`GET /runs/{id}/events`), through the public API only.
//!
//! On a terminal the view is redrawn in place: a header with the run's progress and cost
//! against its budget, and one line per stage. Piped, it prints plain append-only lines, one
//! per event; with `--json`, the events themselves as JSON lines. A dropped stream is resumed
//! with `Last-Event-ID`, so no event is shown twice or lost. Ctrl-C detaches: the run goes on.

use std::{
    io::{IsTerminal, Write},
    time::Duration,
};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::Value;

use crate::client::Client;

/// How the run is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Redrawn in place (standard output is a terminal).
    Terminal,
    /// One plain line per event (standard output is a pipe or a file).
    Lines,
    /// Each event as a JSON line, for scripts.
    Json,
}

impl Mode {
    pub fn pick(json: bool) -> Self {
        if json {
            Self::Json
        } else if std::io::stdout().is_terminal() {
            Self::Terminal
        } else {
            Self::Lines
        }
    }
}

/// How watching ended, and the exit status it gives the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Completed,
    Failed,
    Cancelled,
    /// Ctrl-C: the watcher left, the run goes on.
    Detached,
}

impl End {
    pub fn exit_code(self) -> i32 {
        match self {
            Self::Completed => 0,
            Self::Failed => 1,
            Self::Cancelled => 2,
            Self::Detached => 130,
        }
    }

    fn of(status: &str) -> Option<Self> {
        match status {
            "completed" => Some(Self::Completed),
            "failed" => Some(Self::Failed),
            "cancelled" => Some(Self::Cancelled),
            _ => None,
        }
    }
}

/// The exit status of a watch that could not be carried out (no API, no such run, a stream
/// that stayed down).
pub const ERROR_EXIT: i32 = 3;

/// How long the stream may stay down before the watch gives up.
const GIVE_UP_AFTER: Duration = Duration::from_secs(120);
/// How often the terminal view is redrawn at most (and at least, for the elapsed times).
const REDRAW_EVERY: Duration = Duration::from_millis(250);

/// Follows the run until it finishes or the user detaches.
pub async fn watch(client: &Client, run_id: &str, mode: Mode) -> anyhow::Result<End> {
    // Registered now, before anything is printed: a Ctrl-C that follows the first line always
    // detaches (the handler of `ctrl_c()` is installed only when its future is first polled).
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the Ctrl-C handler")?;
    let follow = follow(client, run_id, mode);
    tokio::select! {
        ended = follow => ended,
        _ = interrupt.recv() => {
            eprintln!(
                "\ndetached; the run goes on. Watch it again, cancel it or resume it with:\n  \
                 stagecraft watch {run_id}\n  stagecraft cancel {run_id}\n  stagecraft resume {run_id}"
            );
            Ok(End::Detached)
        }
    }
}

async fn follow(client: &Client, run_id: &str, mode: Mode) -> anyhow::Result<End> {
    let path = format!("/runs/{run_id}");
    let mut view = View::new(mode, client.get(&path).await?);
    view.draw();
    let mut last_id: Option<String> = None;
    let mut down_since: Option<tokio::time::Instant> = None;
    let mut backoff = Duration::from_millis(200);
    loop {
        match stream_once(client, run_id, &mut last_id, &mut view).await {
            Ok(()) => {
                down_since = None;
                backoff = Duration::from_millis(200);
            }
            Err(error) => {
                let since = *down_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() > GIVE_UP_AFTER {
                    return Err(error.context("the run's event stream stayed down"));
                }
                view.note(&format!("stream interrupted ({error:#}); reconnecting"));
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        // The stream ends when the run has finished; read the run to be sure, and wait a little
        // before opening it again otherwise (a server that keeps closing it is not hammered).
        if let Ok(doc) = client.get(&path).await {
            view.update(doc);
            view.draw();
            if let Some(end) = view.ended() {
                view.finish();
                return Ok(end);
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

/// Reads the event stream once, from after `last_id`, until it ends or fails.
async fn stream_once(
    client: &Client,
    run_id: &str,
    last_id: &mut Option<String>,
    view: &mut View,
) -> anyhow::Result<()> {
    let response = client
        .stream(&format!("/runs/{run_id}/events"), last_id.as_deref())
        .await?;
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut redraw = tokio::time::interval(REDRAW_EVERY);
    redraw.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut dirty = false;
    loop {
        tokio::select! {
            chunk = body.next() => {
                let Some(chunk) = chunk else { return Ok(()) };
                let chunk = chunk.context("reading the event stream")?;
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(message) = next_message(&mut buffer) {
                    if let Some(id) = &message.id {
                        *last_id = Some(id.clone());
                    }
                    if !message.data.is_empty() {
                        dirty |= view.event(&message);
                    }
                }
            }
            _ = redraw.tick(), if view.mode == Mode::Terminal => {
                if dirty {
                    if let Ok(doc) = client.get(&format!("/runs/{run_id}")).await {
                        view.update(doc);
                    }
                    dirty = false;
                }
                view.draw();
            }
        }
    }
}

/// One message of an event stream.
#[derive(Debug, Default, PartialEq)]
pub struct Message {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

/// Takes the first complete message off `buffer` (messages end with a blank line; comments,
/// such as keep-alives, are skipped).
pub fn next_message(buffer: &mut String) -> Option<Message> {
    if buffer.contains('\r') {
        *buffer = buffer.replace("\r\n", "\n");
    }
    loop {
        let end = buffer.find("\n\n")?;
        let block: String = buffer.drain(..end + 2).collect();
        let mut message = Message::default();
        let mut data = Vec::new();
        for line in block.lines() {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => message.id = Some(value.to_owned()),
                "event" => message.event = value.to_owned(),
                "data" => data.push(value),
                _ => {}
            }
        }
        message.data = data.join("\n");
        if message.id.is_some() || !message.data.is_empty() {
            return Some(message);
        }
    }
}

/// What is on screen, and how it is drawn.
struct View {
    mode: Mode,
    doc: Value,
    /// Lines drawn last time on a terminal (redrawn in place).
    drawn: usize,
}

impl View {
    fn new(mode: Mode, doc: Value) -> Self {
        let view = Self {
            mode,
            doc,
            drawn: 0,
        };
        if mode == Mode::Lines {
            emit(&format!(
                "run {} ({} {}), {}",
                text(&view.doc["run_id"]),
                text(&view.doc["kind"]),
                text(&view.doc["name"]),
                text(&view.doc["status"])
            ));
        }
        view
    }

    fn update(&mut self, doc: Value) {
        self.doc = doc;
    }

    fn ended(&self) -> Option<End> {
        End::of(self.doc["status"].as_str().unwrap_or_default())
    }

    /// Shows one event; answers whether the terminal view should be refreshed.
    fn event(&mut self, message: &Message) -> bool {
        match self.mode {
            Mode::Json => {
                emit(&message.data);
                false
            }
            Mode::Lines => {
                emit(&event_line(message));
                false
            }
            Mode::Terminal => true,
        }
    }

    /// A remark that is not an event (a reconnect), to standard error.
    fn note(&mut self, text: &str) {
        if self.mode == Mode::Terminal {
            self.drawn = 0;
        }
        eprintln!("{text}");
    }

    fn draw(&mut self) {
        if self.mode != Mode::Terminal {
            return;
        }
        let lines = render(&self.doc, Utc::now());
        let mut out = std::io::stdout().lock();
        if self.drawn > 0 {
            let _ = write!(out, "\x1b[{}A", self.drawn);
        }
        for line in &lines {
            let _ = writeln!(out, "\x1b[2K{line}");
        }
        let _ = write!(out, "\x1b[J");
        let _ = out.flush();
        self.drawn = lines.len();
    }

    /// The last words once the run has finished.
    fn finish(&mut self) {
        let status = text(&self.doc["status"]);
        let error = &self.doc["error"];
        match self.mode {
            Mode::Json => {}
            Mode::Lines | Mode::Terminal => {
                let mut line = format!(
                    "run {} {status}, cost {}",
                    text(&self.doc["run_id"]),
                    dollars(&self.doc["cost_usd"])
                );
                if error.is_object() {
                    line.push_str(&format!(
                        ": {}: {}",
                        text(&error["code"]),
                        text(&error["message"])
                    ));
                }
                emit(&line);
            }
        }
    }
}

/// Prints a line; a reader that went away (`watch … | head`) ends the watch quietly.
fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(ERROR_EXIT);
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Dollars rounded to cents, as the terminal shows them.
fn dollars(value: &Value) -> String {
    format!("${:.2}", value.as_f64().unwrap_or(0.0))
}

/// A plain line for one event: its time, kind, stage and what it carries.
pub fn event_line(message: &Message) -> String {
    let event: Value = serde_json::from_str(&message.data).unwrap_or(Value::Null);
    let at = event["at"]
        .as_str()
        .and_then(|at| at.parse::<DateTime<Utc>>().ok())
        .map(|at| at.format("%H:%M:%S").to_string())
        .unwrap_or_default();
    let kind = event["kind"].as_str().unwrap_or(&message.event);
    let mut line = format!("{at} {kind}");
    if let Some(stage) = event["stage"].as_str() {
        line.push_str(&format!(" {stage}"));
    }
    let data = &event["data"];
    if data.as_object().is_some_and(|d| !d.is_empty()) {
        line.push_str(&format!(" {data}"));
    }
    line
}

/// The terminal view of a status document at `now`: a header, then one line per stage.
pub fn render(doc: &Value, now: DateTime<Utc>) -> Vec<String> {
    let stages = doc["stages"].as_array().cloned().unwrap_or_default();
    let done = stages.iter().filter(|s| s["status"] == "completed").count();
    let budget = match doc["budget_usd"].as_f64() {
        Some(_) => format!(" of {}", dollars(&doc["budget_usd"])),
        None => String::new(),
    };
    let mut lines = vec![format!(
        "run {}  {}  {}  {done}/{} stages  cost {}{budget}",
        text(&doc["run_id"]),
        text(&doc["name"]),
        text(&doc["status"]),
        stages.len(),
        dollars(&doc["cost_usd"]),
    )];
    let width = stages
        .iter()
        .map(|s| text(&s["name"]).chars().count())
        .max()
        .unwrap_or(0);
    for stage in &stages {
        lines.push(stage_line(stage, width, now));
    }
    lines
}

fn stage_line(stage: &Value, width: usize, now: DateTime<Utc>) -> String {
    let status = text(&stage["status"]);
    let mark = match status.as_str() {
        "completed" => "✓",
        "running" => "▶",
        "failed" => "✗",
        "cancelled" => "■",
        _ => "·",
    };
    let name = text(&stage["name"]);
    let mut line = format!("  {mark} {name:<width$}  {status:<9}");
    let attempts = stage["attempts"].as_u64().unwrap_or(0);
    if attempts > 0 {
        line.push_str(&format!("  attempt {attempts}"));
        if let Some(max) = stage["max_attempts"].as_u64() {
            line.push_str(&format!(" of {max}"));
        }
        let time = |field: &str| {
            stage[field]
                .as_str()
                .and_then(|t| t.parse::<DateTime<Utc>>().ok())
        };
        if let Some(started) = time("started_at") {
            let until = time("finished_at").unwrap_or(now);
            let seconds = (until - started).num_milliseconds().max(0) as f64 / 1000.0;
            line.push_str(&format!("  {seconds:.1}s"));
        }
        line.push_str(&format!("  {}", dollars(&stage["cost_usd"])));
    }
    if let (Some(done), Some(total)) = (
        stage["progress"]["done"].as_u64(),
        stage["progress"]["total"].as_u64(),
    ) {
        line.push_str(&format!("  steps {done}/{total}"));
    }
    if let Some(next) = stage["next_attempt_at"].as_str() {
        line.push_str(&format!("  retry at {next}"));
    }
    line.trim_end().to_owned()
}

/// Refuses a run id the API would refuse anyway, before any request.
pub fn check_run_id(run_id: &str) -> anyhow::Result<()> {
    if crate::ids::RunId::parse(run_id).is_none() {
        bail!("{run_id:?} is not a run id");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn messages_are_split_on_blank_lines_and_comments_skipped() {
        let mut buffer =
            ": keep-alive\n\nid: 3\nevent: stage_started\ndata: {\"a\":1}\n\nid: 4\r\ndata: x\r\n"
                .to_owned();
        let first = next_message(&mut buffer).expect("a message");
        assert_eq!(first.id.as_deref(), Some("3"));
        assert_eq!(first.event, "stage_started");
        assert_eq!(first.data, "{\"a\":1}");
        assert!(
            next_message(&mut buffer).is_none(),
            "the last one is incomplete"
        );
        buffer.push_str("\r\n");
        assert_eq!(next_message(&mut buffer).expect("complete").data, "x");
    }

    #[test]
    fn the_view_shows_each_stage_with_its_attempts_time_cost_and_steps() {
        let doc = json!({
            "run_id": "r1", "name": "demo", "status": "running", "cost_usd": 1.5, "budget_usd": 10,
            "stages": [
                {"name": "one", "status": "completed", "attempts": 1, "max_attempts": 3,
                 "started_at": "2026-11-30T10:00:00Z", "finished_at": "2026-11-30T10:00:02Z",
                 "cost_usd": 0.5, "progress": {"done": 4, "total": 4}},
                {"name": "two", "status": "running", "attempts": 2, "max_attempts": 3,
                 "started_at": "2026-11-30T10:00:02Z", "cost_usd": 1.0},
                {"name": "three", "status": "pending", "attempts": 0, "cost_usd": 0}
            ]
        });
        let now = "2026-11-30T10:00:05Z".parse().expect("time");
        let lines = render(&doc, now);
        assert_eq!(
            lines[0],
            "run r1  demo  running  1/3 stages  cost $1.50 of $10.00"
        );
        assert_eq!(
            lines[1],
            "  ✓ one    completed  attempt 1 of 3  2.0s  $0.50  steps 4/4"
        );
        assert_eq!(
            lines[2],
            "  ▶ two    running    attempt 2 of 3  3.0s  $1.00"
        );
        assert_eq!(lines[3], "  · three  pending");
    }

    #[test]
    fn a_plain_line_names_the_event_its_stage_and_data() {
        let message = Message {
            id: Some("5".into()),
            event: "stage_started".into(),
            data: json!({"seq": 5, "run_id": "r", "at": "2026-11-30T10:00:02Z",
                         "kind": "stage_started", "stage": "two", "data": {"attempt": 2}})
            .to_string(),
        };
        assert_eq!(
            event_line(&message),
            "10:00:02 stage_started two {\"attempt\":2}"
        );
    }
}
