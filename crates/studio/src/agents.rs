//! The seven studio agents: typed inputs and outputs, and what each does with its providers.
//!
//! An agent is a function from its input to a [`StepDone`] (output, cost, files written). The
//! workflows call agents inside memoised steps; `POST /agents/{name}/run` runs one as a run of
//! its own. Mock providers (the default) are deterministic: the same input gives the same text
//! and media, and the cost is what the live provider would have charged, marked simulated.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use super::{
    media::{Media, MediaInfo},
    model::*,
};
use stagecraft_core::{
    artifacts::{ArtifactError, ArtifactStore, Workspace},
    engine::{StageError, StepDone},
    ids::RunId,
    money::Usd,
    schema::InputSchema,
    store::ProviderMode,
    workflows::{InputError, parse_inputs},
};

/// Simulated prices: what the live providers charge (per token, second or character).
pub mod pricing {
    use stagecraft_core::money::Usd;

    /// Anthropic Messages API, Claude Sonnet: dollars per input and output token.
    pub const TEXT_INPUT_PER_TOKEN: f64 = 3.0 / 1_000_000.0;
    pub const TEXT_OUTPUT_PER_TOKEN: f64 = 15.0 / 1_000_000.0;
    /// Runway gen4_turbo: dollars per second of video.
    pub const VIDEO_PER_SECOND: f64 = 0.05;
    /// ElevenLabs text to speech: dollars per character.
    pub const SPEECH_PER_CHARACTER: f64 = 0.30 / 1000.0;
    /// ElevenLabs music: dollars per second.
    pub const MUSIC_PER_SECOND: f64 = 0.01;

    pub const TEXT_MODEL: &str = "anthropic/claude-sonnet-4-5";
    pub const VIDEO_MODEL: &str = "runway/gen4_turbo";
    pub const SPEECH_MODEL: &str = "elevenlabs/eleven_multilingual_v2";
    pub const MUSIC_MODEL: &str = "elevenlabs/music_v1";

    /// The cost of a text call, from its prompt and answer sizes (about four characters a token).
    pub fn text(prompt_chars: usize, answer_chars: usize) -> Usd {
        let tokens = |chars: usize| chars.div_ceil(4) as f64;
        usd(tokens(prompt_chars) * TEXT_INPUT_PER_TOKEN
            + tokens(answer_chars) * TEXT_OUTPUT_PER_TOKEN)
    }

    /// A price list's amount (rate times quantity), charged to a hundredth of a cent as the
    /// providers bill it; an amount no price can reach (NaN, beyond an `i64` of micro-dollars)
    /// is charged as nothing rather than wrap.
    pub fn usd(dollars: f64) -> Usd {
        Usd::from_dollars((dollars * 10_000.0).round() / 10_000.0).unwrap_or_default()
    }
}

/// What an agent may use: the run's artifact directory, its provider mode, the media tools and
/// the run's cancel token. Cheap to clone; owns everything, so an agent's future borrows nothing.
#[derive(Debug, Clone)]
pub struct AgentEnv {
    pub artifacts: ArtifactStore,
    pub run_id: RunId,
    pub mode: ProviderMode,
    pub cancel: CancellationToken,
    pub media: Media,
    /// Added to every mock provider call.
    pub latency: Duration,
    /// The live providers (used when `mode` is live).
    pub live: super::live::Providers,
}

impl AgentEnv {
    /// A path inside the run's artifact directory, relative to the artifact root.
    pub fn run_path(&self, relative: &str) -> String {
        format!("runs/{}/{relative}", self.run_id)
    }

    /// Probes the media file a tool wrote for `relative` in `files`, then makes it that
    /// artifact (uploaded, when the store is remote, before the stage can commit) and lists it
    /// in `category`.
    async fn publish(
        &self,
        files: &Workspace,
        relative: &str,
        category: &str,
    ) -> Result<MediaInfo, StageError> {
        let info = self
            .media
            .probe(&files.output(relative)?, &self.cancel)
            .await?;
        files.publish(relative).await?;
        self.artifacts.index(category, relative).await?;
        Ok(info)
    }

    /// Records one provider call in the run's ledger (`runs/{id}/provider_calls.jsonl`), after
    /// the mock provider's latency.
    async fn provider_call(
        &self,
        agent: &str,
        provider: &str,
        what: &str,
        cost_usd: Usd,
    ) -> Result<(), StageError> {
        if self.mode == ProviderMode::Live {
            // Only local tools run in live mode without a live provider of their own.
            return Ok(());
        }
        if !self.latency.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(self.latency) => {}
                () = self.cancel.cancelled() => return Err(StageError::Cancelled),
            }
        }
        self.ledger(agent, provider, what, cost_usd, true).await
    }

    /// Appends one provider call to the run's ledger.
    async fn ledger(
        &self,
        agent: &str,
        provider: &str,
        what: &str,
        cost_usd: Usd,
        simulated: bool,
    ) -> Result<(), StageError> {
        let line = json!({
            "at": chrono::Utc::now(),
            "agent": agent,
            "provider": provider,
            "call": what,
            "cost_usd": cost_usd,
            "simulated": simulated,
        });
        self.artifacts
            .append_line(&self.run_path("provider_calls.jsonl"), &line.to_string())
            .await?;
        Ok(())
    }

    /// In live mode: the text model's answer for `agent` (checked against its output schema,
    /// repaired once), recorded in the ledger with its real cost.
    async fn live_text<T: serde::de::DeserializeOwned>(
        &self,
        agent: &str,
        what: &str,
        input: &impl Serialize,
        check: impl Fn(&T) -> Result<(), String>,
    ) -> Result<StepDone<T>, StageError> {
        let output = self::agent(agent)
            .map(|a| a.output_schema())
            .unwrap_or_default();
        let input = serde_json::to_value(input).unwrap_or(Value::Null);
        let (value, usage, calls) = self
            .live
            .json::<T>(agent, &output, &input, check, &self.cancel)
            .await?;
        let cost = self.live.text_cost(usage);
        let model = format!("anthropic/{}", self.live.settings().anthropic_model);
        let what = if calls > 1 {
            format!("{what} (repaired)")
        } else {
            what.to_owned()
        };
        self.ledger(agent, &model, &what, cost, false).await?;
        Ok(StepDone {
            output: value,
            cost_usd: cost,
            artifacts: Vec::new(),
        })
    }
}

/// FNV-1a: a stable 64-bit hash, so mock outputs do not change between builds.
pub fn seed_of(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0xff)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

fn pick<'a>(list: &[&'a str], seed: u64, offset: u64) -> &'a str {
    list[((seed.wrapping_add(offset.wrapping_mul(0x9e37_79b9_7f4a_7c15))) >> 7) as usize
        % list.len()]
}

const TONES: [&str; 4] = ["energetic", "documentary", "cinematic", "playful"];
const STYLES: [&str; 4] = [
    "bold colours and fast cuts",
    "natural light and a handheld camera",
    "wide shots and slow dolly moves",
    "a hand-drawn animation look",
];
const BEATS: [&str; 6] = [
    "Opening",
    "Setting the scene",
    "The challenge",
    "A turning point",
    "The payoff",
    "Closing",
];
const COLOURS: [&str; 6] = [
    "0x1f3b57", "0x3a1f57", "0x1f5740", "0x57401f", "0x571f2e", "0x2e3a3a",
];

/// A live provider an agent calls; its key must be set before a live run is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// The text model (Anthropic).
    Text,
    /// Video generation (Runway).
    Video,
    /// Text to speech (ElevenLabs or OpenAI, as `SPEECH_PROVIDER` says).
    Speech,
    /// Music (ElevenLabs).
    Music,
}

/// A studio agent: typed input and output (whose JSON Schemas, with their limits, are published
/// and enforced), its cost before it runs, and the live providers it needs. Every item is
/// required, so an agent cannot be registered without an estimate or its live requirements;
/// [`AGENTS`] registers it in one line.
pub trait Agent: Send + Sync + 'static {
    const NAME: &'static str;
    const DESCRIPTION: &'static str;
    /// Bumped when the agent's behaviour changes: part of what makes a checkpoint reusable.
    const VERSION: u32;
    /// The providers it calls in live mode.
    const LIVE: &'static [Provider];
    type Input: DeserializeOwned + Serialize + ToSchema + Send;
    type Output: DeserializeOwned + Serialize + ToSchema + Send;

    /// What running the agent on this input costs (simulated in mock mode, the price list's
    /// estimate live): checked against the run's remaining budget before the agent runs.
    fn estimate(input: &Self::Input) -> Usd;

    fn run(
        env: AgentEnv,
        input: Self::Input,
    ) -> impl std::future::Future<Output = Result<StepDone<Self::Output>, StageError>> + Send;
}

/// Runs agent `A` as a memoised step of a stage, its estimate checked against the budget first.
pub async fn step<A: Agent>(
    ctx: &mut stagecraft_core::engine::StageContext,
    key: &str,
    env: AgentEnv,
    input: A::Input,
) -> Result<A::Output, StageError> {
    ctx.step(key, A::estimate(&input), A::run(env, input)).await
}

/// Checks inputs against the input type's published schema, then reads them.
fn parse<I: DeserializeOwned + ToSchema>(inputs: &Value) -> Result<I, InputError> {
    let mut inputs = inputs.clone();
    InputSchema::of::<I>().check(&mut inputs)?;
    parse_inputs(&inputs)
}

// ----------------------------------------------------------------------------------------------
// producer

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProducerInput {
    /// What the video is about.
    #[schema(min_length = 1, max_length = 2000)]
    pub user_request: String,
    /// Dollars for the whole production (a number from 0 to 1000000).
    #[schema(value_type = f64, minimum = 0, maximum = 1000000)]
    pub total_budget: Usd,
    /// Pilots to try (default 2).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 4)]
    pub num_pilots: Option<u32>,
    /// Length of the finished video in seconds (default 60).
    #[serde(default)]
    #[schema(minimum = 2, maximum = 600)]
    pub target_duration_secs: Option<u32>,
    /// Scenes in the finished video (default one per 10 s).
    #[serde(default)]
    #[schema(minimum = 2, maximum = 20)]
    pub num_scenes: Option<u32>,
}

/// The `producer` agent.
pub struct Producer;

impl Agent for Producer {
    const NAME: &'static str = "producer";
    const DESCRIPTION: &'static str = "Plans pilot strategies for a request within a total budget.";
    const VERSION: u32 = 1;
    const LIVE: &'static [Provider] = &[Provider::Text];
    type Input = ProducerInput;
    type Output = ProducerOutput;

    fn estimate(input: &ProducerInput) -> Usd {
        producer_cost(input)
    }

    async fn run(
        env: AgentEnv,
        input: ProducerInput,
    ) -> Result<StepDone<ProducerOutput>, StageError> {
        producer(env, input).await
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProducerOutput {
    pub pilots: Vec<PilotStrategy>,
    #[schema(value_type = f64)]
    pub total_budget: Usd,
}

fn producer_cost(input: &ProducerInput) -> Usd {
    let pilots = input.num_pilots.unwrap_or(2) as usize;
    pricing::text(900 + input.user_request.len(), 650 * pilots)
}

pub async fn producer(
    env: AgentEnv,
    input: ProducerInput,
) -> Result<StepDone<ProducerOutput>, StageError> {
    if env.mode == ProviderMode::Live {
        let wanted = input.num_pilots.unwrap_or(2) as usize;
        return env
            .live_text::<ProducerOutput>("producer", "plan pilots", &input, |out| {
                if out.pilots.len() == wanted {
                    Ok(())
                } else {
                    Err(format!(
                        "expected {wanted} pilots, got {}",
                        out.pilots.len()
                    ))
                }
            })
            .await;
    }
    let seed = seed_of(&[
        "producer",
        &serde_json::to_string(&input).unwrap_or_default(),
    ]);
    let pilots = input.num_pilots.unwrap_or(2);
    let duration = input.target_duration_secs.unwrap_or(60);
    let scenes = input.num_scenes.unwrap_or((duration / 10).clamp(2, 12));
    let cost = producer_cost(&input);
    env.provider_call("producer", pricing::TEXT_MODEL, "plan pilots", cost)
        .await?;
    let per_pilot = pricing::usd(input.total_budget.dollars() / f64::from(pilots));
    let request = input.user_request.trim();
    let strategies = (0..pilots)
        .map(|i| {
            let tone = pick(&TONES, seed, u64::from(i) * 2);
            let style = pick(&STYLES, seed, u64::from(i) * 2 + 1);
            let letter = char::from(b'a' + i as u8);
            PilotStrategy {
                pilot_id: format!("pilot_{letter}"),
                version: i + 1,
                concept: format!("A {tone} take on \"{request}\""),
                tone: tone.to_owned(),
                visual_style: style.to_owned(),
                target_duration_secs: duration,
                num_scenes: scenes,
                test_scenes: scenes.min(2),
                budget_usd: per_pilot,
                rationale: format!(
                    "Tests whether a {tone} treatment with {style} carries the idea within ${per_pilot}."
                ),
            }
        })
        .collect();
    Ok(StepDone {
        output: ProducerOutput {
            pilots: strategies,
            total_budget: input.total_budget,
        },
        cost_usd: cost,
        artifacts: Vec::new(),
    })
}

// ----------------------------------------------------------------------------------------------
// script_writer

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScriptWriterInput {
    #[schema(min_length = 1, max_length = 2000)]
    pub video_concept: String,
    /// Length of the whole video in seconds.
    #[schema(minimum = 1, maximum = 3600)]
    pub target_duration: u32,
    /// Scenes in the whole video (the agent writes all of them).
    #[schema(minimum = 1, maximum = 50)]
    pub num_scenes: u32,
    #[serde(default)]
    #[schema(max_length = 200)]
    pub tone: Option<String>,
    #[serde(default)]
    #[schema(max_length = 200)]
    pub visual_style: Option<String>,
}

/// The `script_writer` agent.
pub struct ScriptWriter;

impl Agent for ScriptWriter {
    const NAME: &'static str = "script_writer";
    const DESCRIPTION: &'static str = "Writes the scenes of a video concept.";
    const VERSION: u32 = 1;
    const LIVE: &'static [Provider] = &[Provider::Text];
    type Input = ScriptWriterInput;
    type Output = ScriptWriterOutput;

    fn estimate(input: &ScriptWriterInput) -> Usd {
        script_writer_cost(&ScriptRequest::all(input.clone()))
    }

    async fn run(
        env: AgentEnv,
        input: ScriptWriterInput,
    ) -> Result<StepDone<ScriptWriterOutput>, StageError> {
        script_writer(env, ScriptRequest::all(input)).await
    }
}

/// What the script writer is asked for inside a workflow: the plan, and which of its scenes
/// to write now (1-based, increasing, within the plan).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScriptRequest {
    #[serde(flatten)]
    pub plan: ScriptWriterInput,
    pub scene_numbers: Vec<u32>,
}

impl ScriptRequest {
    /// Every scene of the plan.
    pub fn all(plan: ScriptWriterInput) -> Self {
        let scene_numbers = (1..=plan.num_scenes.min(50)).collect();
        Self {
            plan,
            scene_numbers,
        }
    }

    /// These scenes of the plan, kept within it.
    pub fn scenes(plan: ScriptWriterInput, numbers: impl IntoIterator<Item = u32>) -> Self {
        let last = plan.num_scenes.min(50);
        let scene_numbers = numbers
            .into_iter()
            .filter(|n| (1..=last).contains(n))
            .collect();
        Self {
            plan,
            scene_numbers,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScriptWriterOutput {
    pub scenes: Vec<Scene>,
}

/// What writing these scenes costs.
pub fn script_writer_cost(request: &ScriptRequest) -> Usd {
    pricing::text(
        700 + request.plan.video_concept.len(),
        420 * request.scene_numbers.len(),
    )
}

pub async fn script_writer(
    env: AgentEnv,
    request: ScriptRequest,
) -> Result<StepDone<ScriptWriterOutput>, StageError> {
    let ScriptRequest {
        plan: input,
        scene_numbers,
    } = &request;
    if env.mode == ProviderMode::Live {
        let wanted = scene_numbers.clone();
        return env
            .live_text::<ScriptWriterOutput>("script_writer", "write scenes", &request, |out| {
                let numbers: Vec<u32> = out.scenes.iter().map(|s| s.scene_number).collect();
                if numbers == wanted {
                    Ok(())
                } else {
                    Err(format!("expected scenes {wanted:?}, got {numbers:?}"))
                }
            })
            .await;
    }
    let seed = seed_of(&[
        "script_writer",
        &input.video_concept,
        input.tone.as_deref().unwrap_or(""),
    ]);
    let cost = script_writer_cost(&request);
    let numbers = scene_numbers.clone();
    let what = match (numbers.first(), numbers.last()) {
        (Some(first), Some(last)) if first != last => format!("write scenes {first}-{last}"),
        (Some(only), _) => format!("write scene {only}"),
        _ => "write scenes".to_owned(),
    };
    env.provider_call("script_writer", pricing::TEXT_MODEL, &what, cost)
        .await?;
    let each = f64::from(input.target_duration) / f64::from(input.num_scenes);
    let style = input
        .visual_style
        .as_deref()
        .unwrap_or("clean, well-lit shots");
    let scenes = numbers
        .into_iter()
        .map(|n| {
            let beat = if n == 1 {
                BEATS[0]
            } else if n == input.num_scenes {
                BEATS[5]
            } else {
                pick(&BEATS[1..5], seed, u64::from(n))
            };
            Scene {
                scene_number: n,
                title: beat.to_owned(),
                description: format!("Scene {n}: {beat} of {}", input.video_concept),
                narration: format!(
                    "{beat}. {} — part {n} of {}.",
                    input.video_concept, input.num_scenes
                ),
                duration_secs: (each * 1000.0).round() / 1000.0,
                visual_prompt: format!("{beat}, {style}, about {}", input.video_concept),
            }
        })
        .collect();
    Ok(StepDone {
        output: ScriptWriterOutput { scenes },
        cost_usd: cost,
        artifacts: Vec::new(),
    })
}

// ----------------------------------------------------------------------------------------------
// video_generator

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VideoGeneratorInput {
    pub scene: Scene,
    /// The take: `videos/scene_{n}_v{version}.mp4` (default 1).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 99)]
    pub version: Option<u32>,
}

/// The `video_generator` agent.
pub struct VideoGenerator;

impl Agent for VideoGenerator {
    const NAME: &'static str = "video_generator";
    const DESCRIPTION: &'static str = "Generates the video of one scene.";
    const VERSION: u32 = 1;
    const LIVE: &'static [Provider] = &[Provider::Video];
    type Input = VideoGeneratorInput;
    type Output = VideoClip;

    fn estimate(input: &VideoGeneratorInput) -> Usd {
        video_cost(input)
    }

    async fn run(
        env: AgentEnv,
        input: VideoGeneratorInput,
    ) -> Result<StepDone<VideoClip>, StageError> {
        video_generator(env, input).await
    }
}

fn video_cost(input: &VideoGeneratorInput) -> Usd {
    pricing::usd(input.scene.duration_secs * pricing::VIDEO_PER_SECOND)
}

pub async fn video_generator(
    env: AgentEnv,
    input: VideoGeneratorInput,
) -> Result<StepDone<VideoClip>, StageError> {
    let scene = &input.scene;
    let version = input.version.unwrap_or(1);
    let cost = video_cost(&input);
    let relative = env.run_path(&format!(
        "videos/scene_{}_v{version}.mp4",
        scene.scene_number
    ));
    if env.mode == ProviderMode::Live {
        return live_video(&env, &input, &relative).await;
    }
    env.provider_call(
        "video_generator",
        pricing::VIDEO_MODEL,
        &format!("scene {} v{version}", scene.scene_number),
        cost,
    )
    .await?;
    let seed = seed_of(&[&scene.visual_prompt, &version.to_string()]);
    let text = format!("{}\n{}", scene.title, scene.description);
    let files = env.artifacts.workspace()?;
    env.media
        .scene_video(
            &files.output(&relative)?,
            &text,
            scene.duration_secs,
            pick(&COLOURS, seed, 0),
            &env.cancel,
        )
        .await?;
    let info = env.publish(&files, &relative, "videos").await?;
    Ok(StepDone {
        output: VideoClip {
            scene_number: scene.scene_number,
            version,
            path: relative.clone(),
            duration_secs: info.duration_secs,
            provider: pricing::VIDEO_MODEL.to_owned(),
            cost_usd: cost,
            simulated: true,
        },
        cost_usd: cost,
        artifacts: vec![relative],
    })
}

/// A scene video from the live provider. The upstream task's id is written to
/// `runs/{id}/provider_tasks/` before polling starts, so a retry or a crash while polling polls
/// the same task again instead of paying for a new one.
async fn live_video(
    env: &AgentEnv,
    input: &VideoGeneratorInput,
    relative: &str,
) -> Result<StepDone<VideoClip>, StageError> {
    let scene = &input.scene;
    let version = input.version.unwrap_or(1);
    let cost = pricing::usd(scene.duration_secs * env.live.settings().video_price);
    let model = format!("runway/{}", env.live.settings().runway_model);
    let task_file = env.run_path(&format!(
        "provider_tasks/video_scene_{}_v{version}.json",
        scene.scene_number
    ));
    let task_id = match env.artifacts.read_to_string(&task_file).await? {
        Some(text) => serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["task_id"].as_str().map(str::to_owned))
            .ok_or_else(|| {
                StageError::fatal("corrupt_task_record", format!("{task_file} does not parse"))
            })?,
        None => {
            let idempotency = format!("{}-scene-{}-v{version}", env.run_id, scene.scene_number);
            let id = env
                .live
                .create_video_task(
                    &scene.visual_prompt,
                    scene.duration_secs,
                    &idempotency,
                    &env.cancel,
                )
                .await?;
            let record =
                json!({"task_id": id, "provider": model, "created_at": chrono::Utc::now()});
            env.artifacts
                .write(&task_file, record.to_string().into_bytes())
                .await?;
            env.ledger(
                "video_generator",
                &model,
                &format!("scene {} v{version}", scene.scene_number),
                cost,
                false,
            )
            .await?;
            id
        }
    };
    let url = env.live.wait_video_task(&task_id, &env.cancel).await?;
    let files = env.artifacts.workspace()?;
    env.live
        .download(&url, &files.output(relative)?, &env.cancel)
        .await?;
    let info = env.publish(&files, relative, "videos").await?;
    if info.video.is_none() {
        return Err(StageError::fatal(
            "invalid_media",
            format!("runway task {task_id} produced a file without a video stream"),
        ));
    }
    Ok(StepDone {
        output: VideoClip {
            scene_number: scene.scene_number,
            version,
            path: relative.to_owned(),
            duration_secs: info.duration_secs,
            provider: model,
            cost_usd: cost,
            simulated: false,
        },
        cost_usd: cost,
        artifacts: vec![relative.to_owned()],
    })
}

// ----------------------------------------------------------------------------------------------
// audio_generator

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AudioGeneratorInput {
    /// The words of a voiceover, or the brief of the music.
    #[schema(min_length = 1, max_length = 20000)]
    pub script: String,
    /// `voiceover` (default) or `music`.
    #[serde(default)]
    pub kind: Option<AudioKind>,
    /// Length of the music in seconds (default 30); a voiceover lasts as long as its words.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 600)]
    pub duration_secs: Option<f64>,
}

/// The `audio_generator` agent.
pub struct AudioGenerator;

impl Agent for AudioGenerator {
    const NAME: &'static str = "audio_generator";
    const DESCRIPTION: &'static str = "Generates a voiceover from a script, or music from a brief.";
    const VERSION: u32 = 1;
    const LIVE: &'static [Provider] = &[Provider::Speech];
    type Input = AudioGeneratorInput;
    type Output = AudioTrack;

    fn estimate(input: &AudioGeneratorInput) -> Usd {
        audio_cost(input)
    }

    async fn run(
        env: AgentEnv,
        input: AudioGeneratorInput,
    ) -> Result<StepDone<AudioTrack>, StageError> {
        audio_generator(env, input).await
    }
}

fn audio_cost(input: &AudioGeneratorInput) -> Usd {
    match input.kind.unwrap_or(AudioKind::Voiceover) {
        AudioKind::Voiceover => {
            pricing::usd(input.script.chars().count() as f64 * pricing::SPEECH_PER_CHARACTER)
        }
        AudioKind::Music => {
            pricing::usd(input.duration_secs.unwrap_or(30.0) * pricing::MUSIC_PER_SECOND)
        }
    }
}

pub async fn audio_generator(
    env: AgentEnv,
    input: AudioGeneratorInput,
) -> Result<StepDone<AudioTrack>, StageError> {
    let kind = input.kind.unwrap_or(AudioKind::Voiceover);
    if env.mode == ProviderMode::Live {
        return live_audio(&env, &input, kind).await;
    }
    let cost = audio_cost(&input);
    let relative = env.run_path(&format!("audio/{}.mp3", kind.as_str()));
    let files = env.artifacts.workspace()?;
    let target = files.output(&relative)?;
    let provider = match kind {
        AudioKind::Voiceover => pricing::SPEECH_MODEL,
        AudioKind::Music => pricing::MUSIC_MODEL,
    };
    env.provider_call("audio_generator", provider, kind.as_str(), cost)
        .await?;
    match kind {
        AudioKind::Voiceover => {
            env.media
                .speech(&target, &input.script, &env.cancel)
                .await?
        }
        AudioKind::Music => {
            let seed = seed_of(&[&input.script]);
            env.media
                .music(
                    &target,
                    input.duration_secs.unwrap_or(30.0),
                    seed,
                    &env.cancel,
                )
                .await?
        }
    }
    let info = env.publish(&files, &relative, "audio").await?;
    Ok(StepDone {
        output: AudioTrack {
            kind,
            path: relative.clone(),
            duration_secs: info.duration_secs,
            provider: provider.to_owned(),
            cost_usd: cost,
            simulated: true,
        },
        cost_usd: cost,
        artifacts: vec![relative],
    })
}

/// A voiceover or music track from the live providers, billed from its length.
async fn live_audio(
    env: &AgentEnv,
    input: &AudioGeneratorInput,
    kind: AudioKind,
) -> Result<StepDone<AudioTrack>, StageError> {
    let relative = env.run_path(&format!("audio/{}.mp3", kind.as_str()));
    let files = env.artifacts.workspace()?;
    let target = files.output(&relative)?;
    let settings = env.live.settings();
    let (provider, cost) = match kind {
        AudioKind::Voiceover => {
            let made = env.live.speech(&input.script, &target, &env.cancel).await?;
            let cost = input.script.chars().count() as f64 * settings.speech_price / 1000.0;
            (made, pricing::usd(cost))
        }
        AudioKind::Music => {
            let seconds = input.duration_secs.unwrap_or(30.0);
            let made = env
                .live
                .music(&input.script, seconds, &target, &env.cancel)
                .await?;
            (made, pricing::usd(seconds * settings.music_price))
        }
    };
    env.ledger("audio_generator", &provider, kind.as_str(), cost, false)
        .await?;
    let info = env.publish(&files, &relative, "audio").await?;
    if !info.has_audio {
        return Err(StageError::fatal(
            "invalid_media",
            format!("{provider} answered a file without audio"),
        ));
    }
    Ok(StepDone {
        output: AudioTrack {
            kind,
            path: relative.clone(),
            duration_secs: info.duration_secs,
            provider,
            cost_usd: cost,
            simulated: false,
        },
        cost_usd: cost,
        artifacts: vec![relative],
    })
}

// ----------------------------------------------------------------------------------------------
// qa_verifier

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QaVerifierInput {
    /// The video's path, relative to the artifact root.
    #[schema(min_length = 1, max_length = 500)]
    pub video: String,
    /// What the plan says the video should last.
    #[serde(default)]
    #[schema(minimum = 0.1, maximum = 3600)]
    pub expected_duration_secs: Option<f64>,
}

/// The `qa_verifier` agent.
pub struct QaVerifier;

impl Agent for QaVerifier {
    const NAME: &'static str = "qa_verifier";
    const DESCRIPTION: &'static str = "Checks a video's streams, resolution and duration.";
    const VERSION: u32 = 1;
    const LIVE: &'static [Provider] = &[];
    type Input = QaVerifierInput;
    type Output = QaReport;

    fn estimate(input: &QaVerifierInput) -> Usd {
        qa_cost(input)
    }

    async fn run(env: AgentEnv, input: QaVerifierInput) -> Result<StepDone<QaReport>, StageError> {
        qa_verifier(env, input).await
    }
}

fn qa_cost(_input: &QaVerifierInput) -> Usd {
    pricing::text(1200, 300)
}

pub async fn qa_verifier(
    env: AgentEnv,
    input: QaVerifierInput,
) -> Result<StepDone<QaReport>, StageError> {
    let files = env.artifacts.workspace()?;
    let path = existing_file(&files, "video", &input.video).await?;
    // Live, QA is local work (ffprobe) and costs nothing; mock mode bills a simulated review.
    let cost = if env.mode == ProviderMode::Live {
        Usd::ZERO
    } else {
        qa_cost(&input)
    };
    env.provider_call(
        "qa_verifier",
        pricing::TEXT_MODEL,
        &format!("review {}", input.video),
        cost,
    )
    .await?;
    let info = env.media.probe(&path, &env.cancel).await?;
    let mut issues = Vec::new();
    let (width, height) = info.video.unwrap_or((0, 0));
    if info.video.is_none() {
        issues.push("no video stream".to_owned());
    } else if width < 160 || height < 90 {
        issues.push(format!("resolution {width}x{height} is below 160x90"));
    }
    if let Some(expected) = input.expected_duration_secs {
        if (info.duration_secs - expected).abs() > (expected * 0.1).max(0.25) {
            issues.push(format!(
                "lasts {:.2} s instead of the planned {expected:.2} s",
                info.duration_secs
            ));
        }
    }
    Ok(StepDone {
        output: QaReport {
            path: input.video.clone(),
            passed: issues.is_empty(),
            duration_secs: info.duration_secs,
            width,
            height,
            has_video: info.video.is_some(),
            has_audio: info.has_audio,
            issues: issues.into_iter().map(Note::from).collect(),
        },
        cost_usd: cost,
        artifacts: Vec::new(),
    })
}

/// A file named in an agent's input, on this host's disk in `files`: a safe path of the
/// artifact store that names a complete file (locally a regular file, not a symlink).
async fn existing_file(
    files: &Workspace,
    field: &str,
    relative: &str,
) -> Result<PathBuf, StageError> {
    match files.input(relative).await {
        Ok(Some(path)) => Ok(path),
        Ok(None) => Err(StageError::fatal(
            "invalid_input",
            format!("inputs.{field}: no file {relative:?} in the artifact store"),
        )),
        Err(ArtifactError::UnsafePath(_)) => Err(StageError::fatal(
            "invalid_input",
            format!("inputs.{field}: {relative:?} is not a safe path under the artifact root"),
        )),
        Err(error) => Err(error.into()),
    }
}

// ----------------------------------------------------------------------------------------------
// critic

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CriticInput {
    #[schema(inline)]
    pub pilots: Pilots,
    /// Score a pilot needs to be approved (default 0.6).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1)]
    pub approval_threshold: Option<f64>,
    #[serde(default)]
    #[schema(max_length = 2000)]
    pub user_request: Option<String>,
}

/// The `critic` agent.
pub struct Critic;

impl Agent for Critic {
    const NAME: &'static str = "critic";
    const DESCRIPTION: &'static str =
        "Scores pilot results and approves the best one above a threshold.";
    const VERSION: u32 = 1;
    const LIVE: &'static [Provider] = &[Provider::Text];
    type Input = CriticInput;
    type Output = CriticOutput;

    fn estimate(input: &CriticInput) -> Usd {
        critic_cost(input)
    }

    async fn run(env: AgentEnv, input: CriticInput) -> Result<StepDone<CriticOutput>, StageError> {
        critic(env, input).await
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CriticOutput {
    pub evaluations: Vec<PilotEvaluation>,
    /// The best approved pilot; none when no pilot reached the threshold.
    pub approved_pilot: Option<String>,
    pub threshold: f64,
}

fn critic_cost(input: &CriticInput) -> Usd {
    pricing::text(1500 + 900 * input.pilots.len(), 500 * input.pilots.len())
}

pub async fn critic(
    env: AgentEnv,
    input: CriticInput,
) -> Result<StepDone<CriticOutput>, StageError> {
    let threshold = input.approval_threshold.unwrap_or(0.6);
    if env.mode == ProviderMode::Live {
        let pilots: Vec<String> = input
            .pilots
            .iter()
            .map(|p| p.strategy.pilot_id.clone())
            .collect();
        return env
            .live_text::<CriticOutput>("critic", "evaluate pilots", &input, |out| {
                let judged: Vec<&str> = out
                    .evaluations
                    .iter()
                    .map(|e| e.pilot_id.as_str())
                    .collect();
                if judged.len() == pilots.len()
                    && pilots.iter().all(|p| judged.contains(&p.as_str()))
                {
                    Ok(())
                } else {
                    Err(format!("expected an evaluation of each of {pilots:?}"))
                }
            })
            .await;
    }
    let cost = critic_cost(&input);
    env.provider_call("critic", pricing::TEXT_MODEL, "evaluate pilots", cost)
        .await?;
    let evaluations: Vec<PilotEvaluation> = input
        .pilots
        .iter()
        .map(|pilot| mock_evaluation(pilot, threshold))
        .collect();
    let approved_pilot = evaluations
        .iter()
        .filter(|e| e.approved)
        .max_by(|a, b| a.score.total_cmp(&b.score))
        .map(|e| e.pilot_id.clone());
    Ok(StepDone {
        output: CriticOutput {
            evaluations,
            approved_pilot,
            threshold,
        },
        cost_usd: cost,
        artifacts: Vec::new(),
    })
}

/// The mock critic's judgement of one pilot: a score seeded by its strategy, lowered when a
/// test scene failed QA.
fn mock_evaluation(pilot: &PilotResult, threshold: f64) -> PilotEvaluation {
    let strategy = &pilot.strategy;
    let seed = seed_of(&[
        &strategy.pilot_id,
        &strategy.concept,
        &strategy.visual_style,
    ]);
    let qa_failures = pilot.qa.iter().filter(|q| !q.passed).count();
    let mut score = 0.55 + (seed % 40) as f64 / 100.0;
    if qa_failures > 0 {
        score -= 0.3;
    }
    let score = (score.clamp(0.0, 1.0) * 100.0).round() / 100.0;
    let approved = score >= threshold && qa_failures == 0 && !pilot.videos.is_empty();
    PilotEvaluation {
        pilot_id: strategy.pilot_id.clone(),
        score,
        approved,
        strengths: vec![format!("the {} tone suits the request", strategy.tone).into()].into(),
        weaknesses: if qa_failures > 0 {
            vec![format!("{qa_failures} test scene(s) failed QA").into()].into()
        } else {
            vec![format!("{} may need tighter pacing", strategy.visual_style).into()].into()
        },
        notes: format!(
            "{} scored {score:.2} against a threshold of {threshold:.2}.",
            strategy.pilot_id
        ),
    }
}

// ----------------------------------------------------------------------------------------------
// editor

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditorInput {
    /// The clips to cut together, in script order: each scene with its video.
    #[schema(min_items = 1, max_items = 50)]
    pub clips: Vec<EditorClip>,
    /// The voiceover's path, relative to the artifact root.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 500)]
    pub voiceover: Option<String>,
    /// The music's path, relative to the artifact root.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 500)]
    pub music: Option<String>,
}

/// One scene and its video.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditorClip {
    pub scene: Scene,
    /// The scene's video, relative to the artifact root.
    #[schema(min_length = 1, max_length = 500)]
    pub video: String,
}

/// The `editor` agent.
pub struct Editor;

impl Agent for Editor {
    const NAME: &'static str = "editor";
    const DESCRIPTION: &'static str = "Builds edit candidates and renders the final cut.";
    const VERSION: u32 = 1;
    const LIVE: &'static [Provider] = &[];
    type Input = EditorInput;
    type Output = EditorOutput;

    fn estimate(input: &EditorInput) -> Usd {
        editor_cost(input)
    }

    async fn run(env: AgentEnv, input: EditorInput) -> Result<StepDone<EditorOutput>, StageError> {
        editor(env, input).await
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditorOutput {
    pub candidates: Vec<EditCandidate>,
    pub chosen: String,
    pub final_cut: FinalCut,
}

fn editor_cost(input: &EditorInput) -> Usd {
    pricing::text(1200 + 300 * input.clips.len(), 900)
}

/// The ways to cut the clips together (chronological, and opening on a hook scene chosen from
/// a seed of the clips), the best of them, and its order as positions in `clips`.
fn edit_candidates(clips: &[EditorClip]) -> (Vec<EditCandidate>, EditCandidate, Vec<usize>) {
    let numbers: Vec<u32> = clips.iter().map(|c| c.scene.scene_number).collect();
    let total: f64 = clips.iter().map(|c| c.scene.duration_secs).sum();
    let description = clips
        .first()
        .map(|c| c.scene.description.as_str())
        .unwrap_or("");
    let seed = seed_of(&[
        &serde_json::to_string(&numbers).unwrap_or_default(),
        description,
    ]);
    let hook = (seed as usize) % clips.len().max(1);
    let chronological: Vec<usize> = (0..clips.len()).collect();
    let mut hook_first = vec![hook];
    hook_first.extend((0..clips.len()).filter(|i| *i != hook));
    let candidate = |name: &str, description: String, order: &[usize], score: f64| EditCandidate {
        name: name.to_owned(),
        description,
        scene_order: order
            .iter()
            .filter_map(|i| numbers.get(*i).copied())
            .collect(),
        duration_secs: total,
        score: (score * 100.0).round() / 100.0,
    };
    let hook_number = numbers.get(hook).copied().unwrap_or(1);
    let scored = [
        (
            candidate(
                "chronological",
                "The scenes in script order: the story as written.".to_owned(),
                &chronological,
                0.7 + (seed % 20) as f64 / 100.0,
            ),
            chronological.clone(),
        ),
        (
            candidate(
                "hook_first",
                format!(
                    "Opens on scene {hook_number} to catch attention, then plays the rest in order."
                ),
                &hook_first,
                0.7 + ((seed >> 8) % 20) as f64 / 100.0,
            ),
            hook_first,
        ),
    ];
    let (chosen, order) = scored
        .iter()
        .max_by(|a, b| a.0.score.total_cmp(&b.0.score))
        .cloned()
        .unwrap_or_else(|| (scored[0].0.clone(), chronological));
    let candidates = scored.into_iter().map(|(c, _)| c).collect();
    (candidates, chosen, order)
}

pub async fn editor(
    env: AgentEnv,
    input: EditorInput,
) -> Result<StepDone<EditorOutput>, StageError> {
    let clips = &input.clips;
    if clips.is_empty() {
        return Err(StageError::fatal(
            "invalid_input",
            "inputs.clips: must name at least one clip",
        ));
    }
    let files = env.artifacts.workspace()?;
    let mut videos = Vec::with_capacity(clips.len());
    for clip in clips {
        videos.push(existing_file(&files, "clips.video", &clip.video).await?);
    }
    let voiceover = match &input.voiceover {
        Some(path) => Some(existing_file(&files, "voiceover", path).await?),
        None => None,
    };
    let music = match &input.music {
        Some(path) => Some(existing_file(&files, "music", path).await?),
        None => None,
    };
    // Live, the edit is local work (ffmpeg) and costs nothing; mock mode bills a simulated plan.
    let cost = if env.mode == ProviderMode::Live {
        Usd::ZERO
    } else {
        editor_cost(&input)
    };
    env.provider_call("editor", pricing::TEXT_MODEL, "plan edit candidates", cost)
        .await?;
    let (candidates, chosen, order) = edit_candidates(clips);
    let candidates_path = env.run_path("final/edit_candidates.json");
    let document = json!({"candidates": candidates, "chosen": chosen.name});
    env.artifacts
        .write(
            &candidates_path,
            serde_json::to_vec_pretty(&document).unwrap_or_default(),
        )
        .await?;
    let ordered: Vec<PathBuf> = order
        .iter()
        .filter_map(|i| videos.get(*i).cloned())
        .collect();
    let final_path = env.run_path("final/final.mp4");
    env.media
        .final_cut(
            &files.output(&final_path)?,
            &ordered,
            voiceover.as_deref(),
            music.as_deref(),
            &env.cancel,
        )
        .await?;
    let info = env.publish(&files, &final_path, "videos").await?;
    Ok(StepDone {
        output: EditorOutput {
            final_cut: FinalCut {
                path: final_path.clone(),
                duration_secs: info.duration_secs,
                scenes: ordered.len() as u32,
                has_audio: info.has_audio,
                candidate: chosen.name.clone(),
            },
            chosen: chosen.name,
            candidates,
        },
        cost_usd: cost,
        artifacts: vec![candidates_path, final_path],
    })
}

// ----------------------------------------------------------------------------------------------
// The registry: what the API lists, documents and runs by name.

/// Every agent, one line each.
pub const AGENTS: &[&dyn AnyAgent] = &[
    &Registered::<Producer>::NEW,
    &Registered::<ScriptWriter>::NEW,
    &Registered::<VideoGenerator>::NEW,
    &Registered::<AudioGenerator>::NEW,
    &Registered::<Critic>::NEW,
    &Registered::<QaVerifier>::NEW,
    &Registered::<Editor>::NEW,
];

/// The agent of that name.
pub fn agent(name: &str) -> Option<&'static dyn AnyAgent> {
    AGENTS.iter().copied().find(|a| a.name() == name)
}

/// An [`Agent`] as the registry holds it: by name, on JSON inputs.
pub trait AnyAgent: Send + Sync {
    fn name(&self) -> &'static str;
    fn description(&self) -> &'static str;
    fn version(&self) -> u32;
    fn live(&self) -> &'static [Provider];
    /// The schema its inputs are checked against (the one [`AnyAgent::document`] publishes).
    fn input_schema(&self) -> InputSchema;
    /// The schema of its output (what a live model must answer).
    fn output_schema(&self) -> InputSchema;
    /// Its input and output schema (references point into `components.schemas`).
    fn document(&self) -> Value;
    /// Checks inputs (strict: unknown fields are refused), naming the offending field.
    fn validate(&self, inputs: &Value) -> Result<(), InputError>;
    /// What running it on these inputs will cost; refused inputs are an error, never a free
    /// estimate.
    fn estimate(&self, inputs: &Value) -> Result<Usd, InputError>;
    fn run<'a>(
        &'a self,
        env: AgentEnv,
        inputs: &'a Value,
    ) -> futures::future::BoxFuture<'a, Result<StepDone<Value>, StageError>>;
}

/// The registry's handle on agent `A`.
pub struct Registered<A>(std::marker::PhantomData<A>);

impl<A> Registered<A> {
    pub const NEW: Self = Self(std::marker::PhantomData);
}

impl<A: Agent> AnyAgent for Registered<A> {
    fn name(&self) -> &'static str {
        A::NAME
    }

    fn description(&self) -> &'static str {
        A::DESCRIPTION
    }

    fn version(&self) -> u32 {
        A::VERSION
    }

    fn live(&self) -> &'static [Provider] {
        A::LIVE
    }

    fn input_schema(&self) -> InputSchema {
        InputSchema::of::<A::Input>()
    }

    fn output_schema(&self) -> InputSchema {
        InputSchema::of::<A::Output>()
    }

    fn document(&self) -> Value {
        let (inputs, mut components) = schema_of::<A::Input>();
        let (outputs, more) = schema_of::<A::Output>();
        components.extend(more);
        json!({
            "agent": A::NAME,
            "description": A::DESCRIPTION,
            "version": A::VERSION,
            "inputs": inputs,
            "outputs": outputs,
            "components": {"schemas": components},
        })
    }

    fn validate(&self, inputs: &Value) -> Result<(), InputError> {
        parse::<A::Input>(inputs).map(drop)
    }

    fn estimate(&self, inputs: &Value) -> Result<Usd, InputError> {
        parse::<A::Input>(inputs).map(|input| A::estimate(&input))
    }

    fn run<'a>(
        &'a self,
        env: AgentEnv,
        inputs: &'a Value,
    ) -> futures::future::BoxFuture<'a, Result<StepDone<Value>, StageError>> {
        Box::pin(async move {
            let input = parse::<A::Input>(inputs)
                .map_err(|e| StageError::fatal("invalid_input", e.to_string()))?;
            let done = A::run(env, input).await?;
            Ok(StepDone {
                output: serde_json::to_value(&done.output)
                    .map_err(|e| StageError::fatal("invalid_output", e.to_string()))?,
                cost_usd: done.cost_usd,
                artifacts: done.artifacts,
            })
        })
    }
}

/// The JSON Schema of a type, with the schemas it refers to under `components.schemas`.
fn schema_of<T: ToSchema>() -> (Value, serde_json::Map<String, Value>) {
    let mut referenced = Vec::new();
    T::schemas(&mut referenced);
    let components = referenced
        .into_iter()
        .map(|(name, schema)| (name, serde_json::to_value(schema).unwrap_or(Value::Null)))
        .collect();
    (
        serde_json::to_value(T::schema()).unwrap_or(Value::Null),
        components,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_stable_and_sensitive_to_every_part() {
        assert_eq!(seed_of(&["a", "b"]), seed_of(&["a", "b"]));
        assert_ne!(seed_of(&["a", "b"]), seed_of(&["ab"]));
        assert_ne!(seed_of(&["a", "b"]), seed_of(&["a", "c"]));
    }

    #[test]
    fn every_agent_has_a_schema_naming_its_inputs() {
        for agent in AGENTS {
            let schema = agent.document();
            assert!(
                schema["inputs"]["properties"].is_object(),
                "{}",
                agent.name()
            );
            assert!(schema["outputs"].is_object(), "{}", agent.name());
        }
        let producer = Registered::<Producer>::NEW.document();
        let required = producer["inputs"]["required"].as_array().expect("required");
        assert!(required.contains(&json!("user_request")));
        assert!(required.contains(&json!("total_budget")));
    }

    #[test]
    fn wrong_inputs_name_the_field() {
        let validate = |name: &str, inputs: &Value| agent(name).expect("agent").validate(inputs);
        let error = validate(
            "producer",
            &json!({"user_request": "x", "total_budget": "lots"}),
        )
        .expect_err("refused");
        assert_eq!(error.field, "inputs.total_budget");
        let error = validate(
            "producer",
            &json!({"user_request": "x", "total_budget": 5, "colour": 1}),
        )
        .expect_err("refused");
        assert_eq!(error.field, "inputs.colour", "{error}");
        let error = validate(
            "producer",
            &json!({"user_request": "x", "total_budget": 5, "num_pilots": 9}),
        )
        .expect_err("refused");
        assert_eq!(error.field, "inputs.num_pilots");
        let error = validate("editor", &json!({"clips": []})).expect_err("refused");
        assert_eq!(error.field, "inputs.clips");
    }

    #[test]
    fn text_costs_follow_the_token_prices() {
        // 4,000 characters in (1,000 tokens) and 4,000 out: $0.003 + $0.015.
        assert_eq!(pricing::text(4000, 4000), Usd::from_micros(18_000));
    }
}
