//! Secrets out of everything Stagecraft keeps or shows.
//!
//! Invariant: every byte kept from a subprocess or a provider (its output, its errors, the step
//! outputs built from it) and every error stored with a run passes through a [`Scrubber`]
//! before it is written, logged or served. A scrubber knows the secret values of its
//! deployment (API tokens, provider keys, the git token, a password inside `REDIS_URL`) and
//! also recognises the shapes of well-known tokens, so a credential that Stagecraft was never
//! told about (one a coding agent found in a repository, say) is hidden too.

use std::{borrow::Cow, sync::Arc};

/// What a hidden secret is replaced with.
pub const REDACTED: &str = "***";

/// Prefixes of well-known token formats; the token runs on over `[A-Za-z0-9_-]`.
const TOKEN_PREFIXES: [&str; 11] = [
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "glpat-",
    "sk-ant-",
    "sk-proj-",
    "xoxb-",
    "xoxp-",
];

/// Characters a token shape needs after its prefix before it counts as a token (so prose that
/// mentions `sk-ant-` is left alone).
const MIN_TOKEN_TAIL: usize = 8;

/// Secret values shorter than this are not scrubbed by value: replacing every `a` of a text
/// because a test token is `a` would destroy the text without protecting anything.
const MIN_SECRET_LEN: usize = 4;

/// Hides a deployment's secret values and well-known token shapes in text.
#[derive(Clone, Default)]
pub struct Scrubber {
    /// Longest first, so a secret that contains another is replaced whole.
    values: Arc<Vec<String>>,
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrubber")
            .field("values", &self.values.len())
            .finish()
    }
}

impl Scrubber {
    /// A scrubber for these secret values (empty and very short values are ignored).
    pub fn new<I, S>(values: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut values: Vec<String> = values
            .into_iter()
            .map(|v| v.as_ref().trim().to_owned())
            .filter(|v| v.chars().count() >= MIN_SECRET_LEN)
            .collect();
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.dedup();
        Self {
            values: Arc::new(values),
        }
    }

    /// This scrubber with more secret values.
    pub fn with<I, S>(&self, more: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let all: Vec<String> = self
            .values
            .iter()
            .cloned()
            .chain(more.into_iter().map(|v| v.as_ref().to_owned()))
            .collect();
        Self::new(all)
    }

    /// `text` with every known secret and token shape replaced by [`REDACTED`].
    pub fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for value in self.values.iter() {
            if out.contains(value.as_str()) {
                out = Cow::Owned(out.replace(value.as_str(), REDACTED));
            }
        }
        match scrub_token_shapes(&out) {
            Some(cleaned) => Cow::Owned(cleaned),
            None => out,
        }
    }

    /// Bytes from a subprocess, scrubbed (invalid UTF-8 is replaced, as it is when shown).
    pub fn scrub_bytes(&self, bytes: &[u8]) -> String {
        self.scrub(&String::from_utf8_lossy(bytes)).into_owned()
    }

    /// Every string inside a JSON value, scrubbed in place.
    pub fn scrub_json(&self, value: &mut serde_json::Value) {
        use serde_json::Value;
        match value {
            Value::String(text) => {
                if let Cow::Owned(cleaned) = self.scrub(text) {
                    *text = cleaned;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|item| self.scrub_json(item)),
            Value::Object(map) => map.values_mut().for_each(|item| self.scrub_json(item)),
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// `text` with well-known token shapes replaced, or `None` when it has none.
fn scrub_token_shapes(text: &str) -> Option<String> {
    if !TOKEN_PREFIXES.iter().any(|p| text.contains(p)) {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut changed = false;
    while !rest.is_empty() {
        let next = TOKEN_PREFIXES
            .iter()
            .filter_map(|prefix| rest.find(prefix).map(|at| (at, *prefix)))
            .min_by_key(|(at, prefix)| (*at, std::cmp::Reverse(prefix.len())));
        let Some((at, prefix)) = next else {
            out.push_str(rest);
            break;
        };
        // A prefix in the middle of a word (`mask-proj-x`) is not the start of a token.
        let starts_word = rest[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !is_token_char(c));
        let after = &rest[at + prefix.len()..];
        let tail = after
            .find(|c: char| !is_token_char(c))
            .unwrap_or(after.len());
        out.push_str(&rest[..at]);
        if starts_word && tail >= MIN_TOKEN_TAIL {
            out.push_str(REDACTED);
            changed = true;
            rest = &after[tail..];
        } else {
            out.push_str(prefix);
            rest = after;
        }
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_and_token_shapes_are_hidden() {
        let scrubber = Scrubber::new(["hunter2-secret", "", "ab"]);
        assert_eq!(
            scrubber.scrub("password=hunter2-secret; again hunter2-secret"),
            "password=***; again ***"
        );
        assert_eq!(
            scrubber.scrub("token ghp_abcdefghijklmnop1234 and sk-ant-api03-XYZxyz_12345678."),
            "token *** and ***."
        );
        assert_eq!(
            scrubber.scrub("github_pat_11ABCDEFG0123456789_abcdef"),
            "***"
        );
        // Prose naming a prefix, a prefix inside a word and a short value stay as they are.
        for text in ["keys look like sk-ant-…", "the task-proj-list", "a b ab"] {
            assert_eq!(scrubber.scrub(text), text);
        }
    }

    #[test]
    fn a_longer_secret_containing_a_shorter_one_is_hidden_whole() {
        let scrubber = Scrubber::new(["abcd", "abcdefgh"]);
        assert_eq!(scrubber.scrub("xabcdefghx abcd"), "x***x ***");
    }

    #[test]
    fn json_strings_are_scrubbed_everywhere() {
        let scrubber = Scrubber::new(["s3cr3t-value"]);
        let mut value = serde_json::json!({
            "a": ["s3cr3t-value", {"b": "x s3cr3t-value y"}],
            "n": 1,
            "t": "ghp_0123456789abcdef"
        });
        scrubber.scrub_json(&mut value);
        assert_eq!(
            value,
            serde_json::json!({"a": ["***", {"b": "x *** y"}], "n": 1, "t": "***"})
        );
    }
}
