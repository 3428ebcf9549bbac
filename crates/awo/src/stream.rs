//! The coding agent's `--output-format stream-json` output, parsed line by line.
//!
//! Invariant: parsing never fails. A line that is not JSON, or JSON of an unknown shape, is kept
//! as a raw entry and the lines after it are still read.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use stagecraft_core::money::Usd;

/// One line of the stream, as the API shows it (`GET /agent-work-orders/{id}/logs`).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Entry {
    /// `system`, `assistant`, `tool_use`, `tool_result`, `result`, `user`, or `raw` for a line
    /// that could not be parsed.
    pub kind: String,
    /// A readable summary: the text, the tool and its input, the result…
    pub text: String,
}

/// What one agent execution amounted to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Outcome {
    pub session_id: Option<String>,
    pub model: Option<String>,
    pub turns: Option<u32>,
    #[schema(value_type = f64)]
    pub cost_usd: Usd,
    pub duration_ms: Option<u64>,
    /// The final result text.
    pub result: Option<String>,
    /// `success`, `error_max_turns`, `error_during_execution`, …
    pub subtype: Option<String>,
    pub is_error: bool,
    /// Lines that could not be parsed.
    pub malformed_lines: u32,
}

/// Parses a whole stream: its entries, and the outcome of the run.
pub fn parse(stream: &str) -> (Vec<Entry>, Outcome) {
    let mut entries = Vec::new();
    let mut outcome = Outcome::default();
    for line in stream.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let Ok(value) = serde_json::from_str::<Value>(line) else {
            outcome.malformed_lines += 1;
            entries.push(raw(line));
            continue;
        };
        if let Some(session) = value.get("session_id").and_then(Value::as_str) {
            outcome.session_id.get_or_insert_with(|| session.to_owned());
        }
        match value.get("type").and_then(Value::as_str) {
            Some("system") => entries.push(system(&value, &mut outcome)),
            Some(kind @ ("assistant" | "user")) => entries.extend(message(kind, &value)),
            Some("result") => entries.push(result(&value, &mut outcome)),
            _ => entries.push(raw(line)),
        }
    }
    (entries, outcome)
}

/// A line kept as it came (cut to 2,000 characters): not JSON, or of an unknown type.
fn raw(line: &str) -> Entry {
    Entry {
        kind: "raw".to_owned(),
        text: line.chars().take(2000).collect(),
    }
}

fn text_of<'a>(value: &'a Value, field: &str) -> Option<&'a str> {
    value.get(field).and_then(Value::as_str)
}

/// The session's start: which model runs.
fn system(value: &Value, outcome: &mut Outcome) -> Entry {
    if let Some(model) = text_of(value, "model") {
        outcome.model = Some(model.to_owned());
    }
    Entry {
        kind: "system".to_owned(),
        text: format!(
            "{} (model {})",
            text_of(value, "subtype").unwrap_or("system"),
            outcome.model.as_deref().unwrap_or("?")
        ),
    }
}

/// An assistant or user message: one entry per text, tool call or tool result in it.
fn message(kind: &str, value: &Value) -> Vec<Entry> {
    let Some(content) = value.pointer("/message/content").and_then(Value::as_array) else {
        return Vec::new();
    };
    let entry = |kind: &str, text: String| Entry {
        kind: kind.to_owned(),
        text,
    };
    content
        .iter()
        .filter_map(|part| match text_of(part, "type") {
            Some("text") => Some(entry(
                kind,
                text_of(part, "text").unwrap_or_default().to_owned(),
            )),
            Some("tool_use") => Some(entry(
                "tool_use",
                format!(
                    "{} {}",
                    text_of(part, "name").unwrap_or("tool"),
                    part.get("input").map(Value::to_string).unwrap_or_default()
                ),
            )),
            Some("tool_result") => Some(entry(
                "tool_result",
                match part.get("content") {
                    Some(Value::String(text)) => text.clone(),
                    Some(other) => other.to_string(),
                    None => String::new(),
                },
            )),
            _ => None,
        })
        .collect()
}

/// The run's end: its subtype, turns, cost and final text.
fn result(value: &Value, outcome: &mut Outcome) -> Entry {
    outcome.subtype = text_of(value, "subtype").map(str::to_owned);
    let errored = outcome
        .subtype
        .as_deref()
        .is_some_and(|s| s.starts_with("error"));
    outcome.is_error = value
        .get("is_error")
        .and_then(Value::as_bool)
        .unwrap_or(false)
        || errored;
    outcome.turns = value
        .get("num_turns")
        .and_then(Value::as_u64)
        .map(|n| n as u32);
    // Read exactly; a cost no amount can hold counts as none (a negative one is refused by the
    // engine with the stage's output).
    outcome.cost_usd = value
        .get("total_cost_usd")
        .or_else(|| value.get("cost_usd"))
        .and_then(|cost| Usd::deserialize(cost).ok())
        .unwrap_or_default();
    outcome.duration_ms = value.get("duration_ms").and_then(Value::as_u64);
    outcome.result = text_of(value, "result").map(str::to_owned);
    Entry {
        kind: "result".to_owned(),
        text: format!(
            "{}: {}",
            outcome.subtype.as_deref().unwrap_or("result"),
            outcome.result.as_deref().unwrap_or_default()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = r#"{"type":"system","subtype":"init","session_id":"sess-1","model":"claude-sonnet","tools":["Read","Write"]}
{"type":"assistant","message":{"content":[{"type":"text","text":"Reading the code."},{"type":"tool_use","id":"t1","name":"Read","input":{"file_path":"README.md"}}]},"session_id":"sess-1"}
this is not json {
{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"t1","content":"hello"}]},"session_id":"sess-1"}
{"type":"result","subtype":"success","is_error":false,"num_turns":3,"total_cost_usd":0.0421,"duration_ms":5300,"result":"Plan written to PLAN.md","session_id":"sess-1"}
"#;

    #[test]
    fn a_realistic_stream_gives_session_turns_cost_and_result() {
        let (entries, outcome) = parse(STREAM);
        assert_eq!(outcome.session_id.as_deref(), Some("sess-1"));
        assert_eq!(outcome.model.as_deref(), Some("claude-sonnet"));
        assert_eq!(outcome.turns, Some(3));
        assert_eq!(outcome.cost_usd, Usd::from_micros(42_100));
        assert_eq!(outcome.result.as_deref(), Some("Plan written to PLAN.md"));
        assert!(!outcome.is_error);
        assert_eq!(outcome.malformed_lines, 1);
        let kinds: Vec<&str> = entries.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "system",
                "assistant",
                "tool_use",
                "raw",
                "tool_result",
                "result"
            ]
        );
    }

    #[test]
    fn error_subtypes_mark_the_outcome_as_failed() {
        let (_, outcome) = parse(
            r#"{"type":"result","subtype":"error_max_turns","num_turns":30,"total_cost_usd":1.5}"#,
        );
        assert!(outcome.is_error);
        assert_eq!(outcome.subtype.as_deref(), Some("error_max_turns"));
        let (entries, outcome) = parse("garbage only\n\n");
        assert_eq!(
            outcome,
            Outcome {
                malformed_lines: 1,
                ..Outcome::default()
            }
        );
        assert_eq!(entries.len(), 1);
    }
}
