//! Live providers: real HTTP APIs behind the same agents, steps and budgets as the mock ones.
//!
//! Invariant: every live request goes through [`Providers::send`]: a timeout per request, 429 and 5xx
//! retried after `retry-after` (or a growing backoff) up to `PROVIDER_MAX_RETRIES`, other 4xx
//! answers permanent (`StageError::Fatal`), and a key never appears in an error, log or ledger.

use std::{path::Path, time::Duration};

use secrecy::ExposeSecret;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::settings::{LiveSettings, SpeechProvider};
use stagecraft_core::engine::StageError;

/// The largest JSON answer read from a provider.
const MAX_JSON_BYTES: usize = 8 * 1024 * 1024;
/// The most of a refusal's body read (for its message).
const MAX_ERROR_BYTES: usize = 64 * 1024;
/// The largest media file accepted from a provider (written to disk as it arrives).
pub const MAX_MEDIA_BYTES: u64 = 1024 * 1024 * 1024;

/// What a text call used, for its cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// The HTTP side shared by live providers.
#[derive(Debug, Clone)]
pub struct Providers {
    client: reqwest::Client,
    settings: LiveSettings,
}

/// How long to wait before retrying an answer: its `retry-after` (seconds or an HTTP date),
/// else a doubling backoff; never more than a minute.
fn retry_delay(response: &reqwest::Response, attempt: u32) -> Duration {
    let header = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok());
    // A negative, NaN or huge number of seconds is no instruction: the backoff applies.
    let from_header = header.and_then(|v| {
        v.trim()
            .parse::<f64>()
            .ok()
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .or_else(|| {
                chrono::DateTime::parse_from_rfc2822(v.trim())
                    .ok()
                    .map(|at| {
                        (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
                            .to_std()
                            .unwrap_or_default()
                    })
            })
    });
    from_header
        .unwrap_or_else(|| Duration::from_millis(250 * 2u64.pow(attempt.min(8))))
        .min(Duration::from_secs(60))
}

impl Providers {
    pub fn new(settings: &LiveSettings) -> Self {
        Self {
            client: reqwest::Client::builder()
                .timeout(settings.timeout)
                .build()
                .unwrap_or_default(),
            settings: settings.clone(),
        }
    }

    pub fn settings(&self) -> &LiveSettings {
        &self.settings
    }

    /// Sends a request built by `build` (again for each retry) and answers a 2xx response.
    pub async fn send(
        &self,
        provider: &str,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
        cancel: &CancellationToken,
    ) -> Result<reqwest::Response, StageError> {
        let mut last = String::new();
        for attempt in 0..=self.settings.max_retries {
            let sent = tokio::select! {
                sent = build(&self.client).send() => sent,
                () = cancel.cancelled() => return Err(StageError::Cancelled),
            };
            let delay = match sent {
                Ok(response) if response.status().is_success() => return Ok(response),
                Ok(response)
                    if response.status() == reqwest::StatusCode::TOO_MANY_REQUESTS
                        || response.status().is_server_error() =>
                {
                    let delay = retry_delay(&response, attempt);
                    last = format!("{} answered {}", provider, response.status());
                    delay
                }
                Ok(response) => {
                    let status = response.status();
                    let body = read_limited(response, MAX_ERROR_BYTES, true)
                        .await
                        .unwrap_or_default();
                    let body: String = String::from_utf8_lossy(&body).chars().take(500).collect();
                    return Err(StageError::fatal(
                        "provider_rejected",
                        format!(
                            "{provider} refused the request ({status}): {}",
                            self.scrub(&body)
                        ),
                    ));
                }
                Err(error) if error.is_timeout() || error.is_connect() || error.is_request() => {
                    last = format!("{provider}: {}", self.scrub(&error.to_string()));
                    Duration::from_millis(250 * 2u64.pow(attempt.min(8)))
                }
                Err(error) => {
                    return Err(StageError::retryable(format!(
                        "{provider}: {}",
                        self.scrub(&error.to_string())
                    )));
                }
            };
            if attempt == self.settings.max_retries {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cancel.cancelled() => return Err(StageError::Cancelled),
            }
        }
        Err(StageError::retryable(format!(
            "{last} after {} attempts",
            self.settings.max_retries.saturating_add(1)
        )))
    }

    fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for key in [
            &self.settings.anthropic_key,
            &self.settings.runway_key,
            &self.settings.elevenlabs_key,
            &self.settings.openai_key,
        ]
        .into_iter()
        .flatten()
        {
            if !key.expose_secret().is_empty() {
                out = out.replace(key.expose_secret(), "***");
            }
        }
        out
    }

    /// Creates a Runway text-to-video task and answers its id. The request carries an
    /// idempotency key, so a repeated request after a lost answer does not pay twice.
    pub async fn create_video_task(
        &self,
        prompt: &str,
        duration_secs: f64,
        idempotency_key: &str,
        cancel: &CancellationToken,
    ) -> Result<String, StageError> {
        let key = required_key(
            &self.settings.runway_key,
            "RUNWAY_API_KEY is not set; the live video provider needs it",
        )?;
        let url = format!("{}/v1/text_to_video", self.settings.runway_base_url);
        let body = json!({
            "model": self.settings.runway_model,
            "promptText": prompt.chars().take(1000).collect::<String>(),
            "duration": duration_secs.ceil().clamp(1.0, 60.0) as u64,
            "ratio": "1280:720",
        });
        let response = self
            .send(
                "runway",
                |client| {
                    client
                        .post(&url)
                        .bearer_auth(key.expose_secret())
                        .header("X-Runway-Version", "2024-11-06")
                        .header("Idempotency-Key", idempotency_key)
                        .json(&body)
                },
                cancel,
            )
            .await?;
        let task: Value = read_json("runway", response).await?;
        task["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| StageError::retryable(format!("runway answered no task id: {task}")))
    }

    /// Polls a Runway task, from every `VIDEO_POLL_INTERVAL_MS` on, until it succeeds (answers its output
    /// URL) or fails (a permanent error naming Runway's reason).
    pub async fn wait_video_task(
        &self,
        id: &str,
        cancel: &CancellationToken,
    ) -> Result<String, StageError> {
        let key = required_key(
            &self.settings.runway_key,
            "RUNWAY_API_KEY is not set; the live video provider needs it",
        )?;
        let url = format!("{}/v1/tasks/{id}", self.settings.runway_base_url);
        let mut interval = self.settings.video_poll_interval;
        loop {
            let response = self
                .send(
                    "runway",
                    |client| {
                        client
                            .get(&url)
                            .bearer_auth(key.expose_secret())
                            .header("X-Runway-Version", "2024-11-06")
                    },
                    cancel,
                )
                .await?;
            let task: Value = read_json("runway", response).await?;
            match task["status"].as_str().unwrap_or_default() {
                "SUCCEEDED" => {
                    return task["output"][0]
                        .as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| {
                            StageError::fatal(
                                "provider_task_failed",
                                format!("runway task {id} succeeded without an output"),
                            )
                        });
                }
                "FAILED" | "CANCELLED" => {
                    return Err(StageError::fatal(
                        "provider_task_failed",
                        format!(
                            "runway task {id} {}: {} {}",
                            task["status"].as_str().unwrap_or_default().to_lowercase(),
                            task["failureCode"].as_str().unwrap_or_default(),
                            task["failure"].as_str().unwrap_or_default()
                        ),
                    ));
                }
                _ => {}
            }
            // Polls slow down while the task runs: the interval grows by half each time, up to
            // six times `VIDEO_POLL_INTERVAL_MS`.
            let pause = interval;
            interval = (interval * 3 / 2).min(self.settings.video_poll_interval * 6);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = cancel.cancelled() => return Err(StageError::Cancelled),
            }
        }
    }

    /// Speaks `text` with the configured speech provider into the MP3 file `target`; answers the
    /// provider's name.
    pub async fn speech(
        &self,
        text: &str,
        target: &Path,
        cancel: &CancellationToken,
    ) -> Result<String, StageError> {
        let settings = &self.settings;
        let (provider, response) = if settings.speech_provider == SpeechProvider::OpenAi {
            let key = required_key(
                &settings.openai_key,
                "OPENAI_API_KEY is not set; SPEECH_PROVIDER=openai needs it",
            )?;
            let url = format!("{}/v1/audio/speech", settings.openai_base_url);
            let body = json!({"model": settings.openai_tts_model, "voice": settings.openai_tts_voice,
                              "input": text, "response_format": "mp3"});
            let response = self
                .send(
                    "openai",
                    |c| c.post(&url).bearer_auth(key.expose_secret()).json(&body),
                    cancel,
                )
                .await?;
            (format!("openai/{}", settings.openai_tts_model), response)
        } else {
            let key = required_key(
                &self.settings.elevenlabs_key,
                "ELEVENLABS_API_KEY is not set; live speech and music need it",
            )?;
            let url = format!(
                "{}/v1/text-to-speech/{}?output_format=mp3_44100_128",
                settings.elevenlabs_base_url, settings.elevenlabs_voice
            );
            let body = json!({"text": text, "model_id": settings.elevenlabs_model});
            let response = self
                .send(
                    "elevenlabs",
                    |c| {
                        c.post(&url)
                            .header("xi-api-key", key.expose_secret())
                            .json(&body)
                    },
                    cancel,
                )
                .await?;
            (
                format!("elevenlabs/{}", settings.elevenlabs_model),
                response,
            )
        };
        save_body(response, target, cancel).await?;
        Ok(provider)
    }

    /// Music from a brief, `duration_secs` long, from ElevenLabs, into the MP3 file `target`;
    /// answers the provider's name.
    pub async fn music(
        &self,
        prompt: &str,
        duration_secs: f64,
        target: &Path,
        cancel: &CancellationToken,
    ) -> Result<String, StageError> {
        let key = required_key(
            &self.settings.elevenlabs_key,
            "ELEVENLABS_API_KEY is not set; live speech and music need it",
        )?;
        let url = format!("{}/v1/music", self.settings.elevenlabs_base_url);
        let body =
            json!({"prompt": prompt, "music_length_ms": (duration_secs * 1000.0).round() as u64});
        let response = self
            .send(
                "elevenlabs",
                |c| {
                    c.post(&url)
                        .header("xi-api-key", key.expose_secret())
                        .json(&body)
                },
                cancel,
            )
            .await?;
        save_body(response, target, cancel).await?;
        Ok("elevenlabs/music".to_owned())
    }

    /// Downloads a provider's output into `target`, as it arrives (never whole in memory).
    pub async fn download(
        &self,
        url: &str,
        target: &Path,
        cancel: &CancellationToken,
    ) -> Result<(), StageError> {
        let response = self
            .send("download", |client| client.get(url), cancel)
            .await?;
        save_body(response, target, cancel).await
    }

    /// One Anthropic Messages API call: the answer's text and its usage.
    async fn message(
        &self,
        system: &str,
        messages: &[Value],
        cancel: &CancellationToken,
    ) -> Result<(String, Usage), StageError> {
        let key = required_key(
            &self.settings.anthropic_key,
            "ANTHROPIC_API_KEY is not set; the live text provider needs it",
        )?;
        let url = format!("{}/v1/messages", self.settings.anthropic_base_url);
        let body = json!({
            "model": self.settings.anthropic_model,
            "max_tokens": 4096,
            "system": system,
            "messages": messages,
        });
        let response = self
            .send(
                "anthropic",
                |client| {
                    client
                        .post(&url)
                        .header("x-api-key", key.expose_secret())
                        .header("anthropic-version", "2023-06-01")
                        .json(&body)
                },
                cancel,
            )
            .await?;
        let answer: Value = read_json("anthropic", response).await?;
        let text = answer["content"]
            .as_array()
            .map(|parts| {
                parts
                    .iter()
                    .filter(|p| p["type"] == "text")
                    .filter_map(|p| p["text"].as_str())
                    .collect::<Vec<_>>()
                    .join("")
            })
            .unwrap_or_default();
        let usage = Usage {
            input_tokens: answer["usage"]["input_tokens"].as_u64().unwrap_or(0),
            output_tokens: answer["usage"]["output_tokens"].as_u64().unwrap_or(0),
        };
        Ok((text, usage))
    }

    /// The dollars a text call cost, from its usage and the configured prices.
    pub fn text_cost(&self, usage: Usage) -> stagecraft_core::money::Usd {
        let cost = usage.input_tokens as f64 * self.settings.text_input_price / 1e6
            + usage.output_tokens as f64 * self.settings.text_output_price / 1e6;
        stagecraft_core::money::Usd::from_dollars(cost).unwrap_or_default()
    }

    /// Asks the text model for a JSON object of type `T` (described by `schema`), checks it, and
    /// asks once more with the error when it does not fit. Answers the value, the usage of every
    /// call made, and how many calls that was.
    pub async fn json<T: DeserializeOwned>(
        &self,
        agent: &str,
        output: &stagecraft_core::schema::InputSchema,
        input: &Value,
        check: impl Fn(&T) -> Result<(), String>,
        cancel: &CancellationToken,
    ) -> Result<(T, Usage, u32), StageError> {
        let schema = json!({"schema": output.schema, "components": {"schemas": output.components}});
        let system = format!(
            "You are the {agent} agent of a video production studio. Answer with exactly one JSON object that matches this JSON Schema, and nothing else:\n{schema}"
        );
        let mut messages = vec![json!({"role": "user", "content": format!("Input:\n{input}")})];
        let mut total = Usage {
            input_tokens: 0,
            output_tokens: 0,
        };
        for call in 1..=2u32 {
            let (text, usage) = self.message(&system, &messages, cancel).await?;
            total.input_tokens = total.input_tokens.saturating_add(usage.input_tokens);
            total.output_tokens = total.output_tokens.saturating_add(usage.output_tokens);
            // The answer is held to the output schema, limits included, before it is read.
            let parsed = extract_json(&text)
                .ok_or_else(|| "the answer holds no JSON object".to_owned())
                .and_then(|json| serde_json::from_str::<Value>(json).map_err(|e| e.to_string()))
                .and_then(|mut value| {
                    output
                        .check(&mut value)
                        .map_err(|e| e.to_string().replacen("inputs", "answer", 1))?;
                    serde_json::from_value::<T>(value).map_err(|e| e.to_string())
                })
                .and_then(|value| check(&value).map(|()| value));
            match parsed {
                Ok(value) => return Ok((value, total, call)),
                Err(problem) if call == 1 => {
                    messages.push(json!({"role": "assistant", "content": text}));
                    messages.push(json!({"role": "user", "content": format!(
                        "That answer does not fit the schema: {problem}. Answer again with only the corrected JSON object."
                    )}));
                }
                Err(problem) => {
                    return Err(StageError::fatal(
                        "invalid_model_output",
                        format!(
                            "the {agent} model's answer did not fit its schema after one repair: {problem}"
                        ),
                    ));
                }
            }
        }
        Err(StageError::fatal(
            "invalid_model_output",
            format!("{agent}: no answer"),
        ))
    }
}

/// A provider's key, or the permanent `missing_key` failure saying which variable to set.
fn required_key<'a>(
    key: &'a Option<secrecy::SecretString>,
    missing: &str,
) -> Result<&'a secrecy::SecretString, StageError> {
    key.as_ref()
        .ok_or_else(|| StageError::fatal("missing_key", missing))
}

/// At most `max` bytes of a response's body: more is refused (`provider_answer_too_large`), or
/// with `truncate` cut off (for the message of a refusal).
async fn read_limited(
    mut response: reqwest::Response,
    max: usize,
    truncate: bool,
) -> Result<Vec<u8>, StageError> {
    let too_large = || {
        StageError::fatal(
            "provider_answer_too_large",
            format!("the provider answered more than {max} bytes"),
        )
    };
    if !truncate && response.content_length().is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| StageError::retryable(format!("reading the provider's answer: {e}")))?
    {
        if body.len() + chunk.len() > max {
            if truncate {
                body.extend_from_slice(&chunk[..max - body.len()]);
                return Ok(body);
            }
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A JSON answer, read within [`MAX_JSON_BYTES`].
async fn read_json(provider: &str, response: reqwest::Response) -> Result<Value, StageError> {
    let body = read_limited(response, MAX_JSON_BYTES, false).await?;
    serde_json::from_slice(&body)
        .map_err(|e| StageError::retryable(format!("{provider} answered no JSON: {e}")))
}

/// Streams a media answer into `target`: through a temporary file in its directory, then a
/// durable rename, so the file appears whole or not at all; at most [`MAX_MEDIA_BYTES`], and
/// never empty.
async fn save_body(
    mut response: reqwest::Response,
    target: &Path,
    cancel: &CancellationToken,
) -> Result<(), StageError> {
    use tokio::io::AsyncWriteExt;
    let io =
        |e: std::io::Error| StageError::retryable(format!("writing {}: {e}", target.display()));
    if response
        .content_length()
        .is_some_and(|n| n > MAX_MEDIA_BYTES)
    {
        return Err(StageError::fatal(
            "provider_answer_too_large",
            format!("the provider's file is larger than {MAX_MEDIA_BYTES} bytes"),
        ));
    }
    let dir = target.parent().unwrap_or(Path::new(".")).to_path_buf();
    let created = dir.clone();
    tokio::task::spawn_blocking(move || stagecraft_core::artifacts::create_dir_durably(&created))
        .await
        .map_err(|e| io(std::io::Error::other(e)))?
        .map_err(io)?;
    let temporary = dir.join(format!(".download-{}", uuid::Uuid::new_v4().simple()));
    let written = async {
        let mut file = tokio::fs::File::create(&temporary).await.map_err(io)?;
        let mut total: u64 = 0;
        loop {
            let chunk = tokio::select! {
                chunk = response.chunk() => chunk.map_err(|e| {
                    StageError::retryable(format!("reading the provider's file: {e}"))
                })?,
                () = cancel.cancelled() => return Err(StageError::Cancelled),
            };
            let Some(chunk) = chunk else { break };
            total += chunk.len() as u64;
            if total > MAX_MEDIA_BYTES {
                return Err(StageError::fatal(
                    "provider_answer_too_large",
                    format!("the provider's file is larger than {MAX_MEDIA_BYTES} bytes"),
                ));
            }
            file.write_all(&chunk).await.map_err(io)?;
        }
        if total == 0 {
            return Err(StageError::retryable("the provider answered an empty file"));
        }
        file.flush().await.map_err(io)?;
        Ok(())
    }
    .await;
    if let Err(error) = written {
        let _ = tokio::fs::remove_file(&temporary).await;
        return Err(error);
    }
    let (from, to) = (temporary.clone(), target.to_path_buf());
    let renamed =
        tokio::task::spawn_blocking(move || stagecraft_core::artifacts::rename_durably(&from, &to))
            .await
            .map_err(|e| io(std::io::Error::other(e)))?;
    if let Err(error) = renamed {
        let _ = tokio::fs::remove_file(&temporary).await;
        return Err(io(error));
    }
    Ok(())
}

/// One line per live provider: configured or not, reachable or not (with the key, without
/// ever printing it). Video and speech providers are listed as not in this build.
pub async fn check(settings: &LiveSettings) -> Vec<String> {
    let mut lines = Vec::new();
    match &settings.anthropic_key {
        None => lines.push(format!(
            "anthropic (text, {}): not configured (set ANTHROPIC_API_KEY)",
            settings.anthropic_base_url
        )),
        Some(key) => {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default();
            let answer = client
                .get(format!("{}/v1/models", settings.anthropic_base_url))
                .header("x-api-key", key.expose_secret())
                .header("anthropic-version", "2023-06-01")
                .send()
                .await;
            let state = match answer {
                Ok(r) if r.status().is_success() => "configured, reachable".to_owned(),
                Ok(r) if r.status().as_u16() == 401 || r.status().as_u16() == 403 => {
                    format!("configured, but the key was refused ({})", r.status())
                }
                Ok(r) => format!("configured, answered {}", r.status()),
                Err(e) => format!("configured, unreachable: {}", e.without_url()),
            };
            lines.push(format!(
                "anthropic (text, {}): {state}",
                settings.anthropic_base_url
            ));
        }
    }
    lines.push(match &settings.runway_key {
        None => format!(
            "runway (video, {}): not configured (set RUNWAY_API_KEY)",
            settings.runway_base_url
        ),
        Some(_) => format!("runway (video, {}): configured", settings.runway_base_url),
    });
    lines.push(match &settings.elevenlabs_key {
        None => format!(
            "elevenlabs (speech, music, {}): not configured (set ELEVENLABS_API_KEY)",
            settings.elevenlabs_base_url
        ),
        Some(_) => format!(
            "elevenlabs (speech, music, {}): configured",
            settings.elevenlabs_base_url
        ),
    });
    lines.push(match &settings.openai_key {
        None => format!(
            "openai (speech, {}): not configured (set OPENAI_API_KEY)",
            settings.openai_base_url
        ),
        Some(_) => format!("openai (speech, {}): configured", settings.openai_base_url),
    });
    lines.push(format!(
        "speech provider in use: {}",
        settings.speech_provider.as_str()
    ));
    lines
}

/// The JSON object in a model's answer (which may wrap it in prose or a code fence).
fn extract_json(text: &str) -> Option<&str> {
    let start = text.find('{')?;
    let end = text.rfind('}')?;
    (end > start).then(|| &text[start..=end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer_with_retry_after(value: &str) -> reqwest::Response {
        reqwest::Response::from(
            axum::http::Response::builder()
                .status(429)
                .header("retry-after", value)
                .body(Vec::<u8>::new())
                .expect("response"),
        )
    }

    #[test]
    fn a_retry_after_of_any_value_is_a_delay_of_at_most_a_minute() {
        for value in [
            "-1",
            "NaN",
            "inf",
            "1e20",
            "18446744073709551616",
            "soon",
            "",
        ] {
            let delay = retry_delay(&answer_with_retry_after(value), 0);
            assert!(delay <= Duration::from_secs(60), "{value}: {delay:?}");
        }
        assert_eq!(
            retry_delay(&answer_with_retry_after("2"), 0),
            Duration::from_secs(2)
        );
        assert_eq!(
            retry_delay(&answer_with_retry_after("9999"), 0),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn json_is_found_inside_prose_and_fences() {
        assert_eq!(
            extract_json("Sure!\n```json\n{\"a\": 1}\n```"),
            Some("{\"a\": 1}")
        );
        assert_eq!(extract_json("no json"), None);
    }
}
