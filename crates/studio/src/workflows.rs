//! The studio workflows (`full_production`, `pilot_only`, `audio_only`) and the one-stage
//! agent runs behind `POST /agents/{name}/run`.
//!
//! Every agent call inside a stage is a memoised step keyed by what it produces (a pilot's
//! script, one scene's video, the voiceover…), so a crash during the seventh scene resumes at the
//! seventh scene, and every step checks its estimated cost against the run's remaining budget.

use std::{collections::BTreeMap, sync::Arc};

use async_trait::async_trait;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::{
    Studio,
    agents::{self, *},
    model::*,
};
use stagecraft_core::{
    engine::{RetryPolicy, Stage, StageContext, StageError, StageOutput},
    ids::RunId,
    money::Usd,
    schema::InputSchema,
    store::{RunKind, StageStatus},
    workflows::{InputError, Workflow, parse_inputs, queues},
};

/// Inputs of `full_production` and `pilot_only`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProductionInputs {
    /// What the video is about.
    #[schema(min_length = 1, max_length = 2000)]
    pub user_request: String,
    /// Dollars for the whole production (a number from 0 to 1000000); also the run's budget unless
    /// `budget_usd` is given.
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
    /// Score the critic requires to approve a pilot (default 0.6).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1)]
    pub approval_threshold: Option<f64>,
}

impl ProductionInputs {
    fn producer_input(&self) -> ProducerInput {
        ProducerInput {
            user_request: self.user_request.clone(),
            total_budget: self.total_budget,
            num_pilots: self.num_pilots,
            target_duration_secs: self.target_duration_secs,
            num_scenes: self.num_scenes,
        }
    }
}

/// Checks a studio workflow's inputs against their published schema, then reads them.
fn checked<T: DeserializeOwned + ToSchema>(inputs: &Value) -> Result<T, InputError> {
    let mut inputs = inputs.clone();
    InputSchema::of::<T>().check(&mut inputs)?;
    parse_inputs(&inputs)
}

fn production_inputs(inputs: &Value) -> Result<ProductionInputs, InputError> {
    checked(inputs)
}

/// Inputs of `audio_only`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AudioInputs {
    /// The run whose scenes get a voiceover and music.
    #[schema(
        pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    )]
    pub source_run_id: String,
}

fn audio_inputs(inputs: &Value) -> Result<(AudioInputs, RunId), InputError> {
    let parsed: AudioInputs = checked(inputs)?;
    let written = stagecraft_core::schema::without_final_line_break(&parsed.source_run_id);
    let id = RunId::parse(written).ok_or_else(|| InputError {
        field: "inputs.source_run_id".to_owned(),
        message: "must be a run id".to_owned(),
    })?;
    Ok((parsed, id))
}

/// The output of an earlier stage of the run (`what` names it in the error), read as `T`.
fn stage_output<T: DeserializeOwned>(value: Option<&Value>, what: &str) -> Result<T, StageError> {
    let value = value.ok_or_else(|| {
        StageError::fatal(
            "missing_checkpoint",
            format!("the {what} checkpoint is missing"),
        )
    })?;
    serde_json::from_value(value.clone()).map_err(|e| {
        StageError::fatal(
            "invalid_checkpoint",
            format!("the {what} checkpoint does not parse: {e}"),
        )
    })
}

fn output<T: Serialize>(value: &T) -> Result<StageOutput, StageError> {
    Ok(StageOutput {
        output: serde_json::to_value(value)
            .map_err(|e| StageError::fatal("invalid_output", e.to_string()))?,
        cost_usd: Usd::ZERO,
    })
}

/// Writes a JSON artifact of the run and answers its relative path.
async fn write_json<T: Serialize>(
    ctx: &mut StageContext,
    relative: &str,
    value: &T,
) -> Result<String, StageError> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| StageError::fatal("invalid_output", e.to_string()))?;
    let path = format!("{}/{relative}", ctx.run_dir());
    ctx.write_artifact(&path, bytes).await
}

/// The reuse key of a studio stage: the versions of the agents it calls, the inputs that matter
/// to it and everything before it (see `StageContext::fingerprint`).
fn reuse_key(ctx: &StageContext, versions: &[u32], ignores_threshold: bool) -> Option<String> {
    let version = versions.iter().sum();
    let mut inputs = ctx.inputs.clone();
    if ignores_threshold {
        if let Some(map) = inputs.as_object_mut() {
            map.remove("approval_threshold");
        }
    }
    Some(ctx.fingerprint(version, &inputs))
}

/// The script writer's plan for a pilot's strategy.
fn plan_of(strategy: &PilotStrategy) -> ScriptWriterInput {
    ScriptWriterInput {
        video_concept: strategy.concept.clone(),
        target_duration: strategy.target_duration_secs,
        num_scenes: strategy.num_scenes,
        tone: Some(strategy.tone.clone()),
        visual_style: Some(strategy.visual_style.clone()),
    }
}

/// Media stages retry a failed ffmpeg or provider call a few times, quickly.
fn media_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        base_delay: std::time::Duration::from_millis(500),
        max_delay: std::time::Duration::from_secs(10),
        timeout: std::time::Duration::from_secs(3600),
    }
}

// ----------------------------------------------------------------------------------------------
// Stages

struct Planning(Arc<Studio>);
struct Pilots(Arc<Studio>);
struct Evaluation(Arc<Studio>);
struct Completion(Arc<Studio>);
struct Editing(Arc<Studio>);
struct AudioForRun(Arc<Studio>);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PilotsOutput {
    pilots: Vec<PilotResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct EvaluationOutput {
    evaluations: Vec<PilotEvaluation>,
    approved_pilot: Option<String>,
    threshold: f64,
    qa: BTreeMap<String, Vec<QaReport>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CompletionOutput {
    pilot_id: String,
    scenes: Vec<Scene>,
    videos: Vec<VideoClip>,
    voiceover: AudioTrack,
    music: AudioTrack,
}

#[async_trait]
impl Stage for Planning {
    fn name(&self) -> &'static str {
        "planning"
    }

    fn reuse_key(&self, ctx: &StageContext) -> Option<String> {
        reuse_key(ctx, &[Producer::VERSION], true)
    }

    async fn run(&self, ctx: &mut StageContext) -> Result<StageOutput, StageError> {
        let inputs = production_inputs(&ctx.inputs)
            .map_err(|e| StageError::fatal("invalid_input", e.to_string()))?;
        let env = self.0.env(ctx);
        let input = inputs.producer_input();
        ctx.set_step_total(1);
        let planned: ProducerOutput = agents::step::<Producer>(ctx, "producer", env, input).await?;
        for pilot in &planned.pilots {
            write_json(
                ctx,
                &format!("pilots/{}/strategy.json", pilot.pilot_id),
                pilot,
            )
            .await?;
        }
        output(&planned)
    }
}

#[async_trait]
impl Stage for Pilots {
    fn name(&self) -> &'static str {
        "pilots"
    }

    fn reuse_key(&self, ctx: &StageContext) -> Option<String> {
        reuse_key(ctx, &[ScriptWriter::VERSION, VideoGenerator::VERSION], true)
    }

    fn retry_policy(&self) -> Option<RetryPolicy> {
        Some(media_retry())
    }

    async fn run(&self, ctx: &mut StageContext) -> Result<StageOutput, StageError> {
        let planned: ProducerOutput = stage_output(ctx.previous.get("planning"), "planning")?;
        let env = self.0.env(ctx);
        let total: u32 = planned.pilots.iter().map(|p| 1 + p.test_scenes).sum();
        ctx.set_step_total(total);
        let mut results = Vec::new();
        for strategy in &planned.pilots {
            let pid = &strategy.pilot_id;
            let request = ScriptRequest::scenes(plan_of(strategy), 1..=strategy.test_scenes);
            let script: ScriptWriterOutput = ctx
                .step(
                    &format!("{pid}/script"),
                    agents::script_writer_cost(&request),
                    agents::script_writer(env.clone(), request),
                )
                .await?;
            write_scenes(ctx, pid, &script.scenes).await?;
            let mut videos = Vec::new();
            for scene in &script.scenes {
                let input = VideoGeneratorInput {
                    scene: scene.clone(),
                    version: Some(strategy.version),
                };
                let clip: VideoClip = agents::step::<VideoGenerator>(
                    ctx,
                    &format!("{pid}/scene_{}/video", scene.scene_number),
                    env.clone(),
                    input,
                )
                .await?;
                videos.push(clip);
            }
            results.push(PilotResult {
                strategy: strategy.clone(),
                scenes: script.scenes.into(),
                videos: videos.into(),
                qa: QaReports::default(),
            });
        }
        output(&PilotsOutput { pilots: results })
    }
}

/// Most characters of narration a voiceover reads (the audio agent's own input limit).
const MAX_VOICEOVER_CHARS: usize = 20_000;

/// `text` cut to at most `max` characters, at a word boundary when there is one.
fn within(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let cut: String = text.chars().take(max).collect();
    match cut.rfind(char::is_whitespace) {
        Some(space) if space > 0 => cut[..space].to_owned(),
        _ => cut,
    }
}

/// The voiceover of the scenes' narration and music as long as the scenes, as the steps
/// `voiceover` and `music`.
async fn soundtrack(
    ctx: &mut StageContext,
    env: AgentEnv,
    scenes: &[Scene],
    brief: String,
) -> Result<(AudioTrack, AudioTrack), StageError> {
    let narration: Vec<&str> = scenes.iter().map(|s| s.narration.as_str()).collect();
    let input = AudioGeneratorInput {
        script: within(&narration.join(" "), MAX_VOICEOVER_CHARS),
        kind: Some(AudioKind::Voiceover),
        duration_secs: None,
    };
    let voiceover: AudioTrack =
        agents::step::<AudioGenerator>(ctx, "voiceover", env.clone(), input).await?;
    let total: f64 = scenes.iter().map(|s| s.duration_secs).sum();
    let input = AudioGeneratorInput {
        script: brief,
        kind: Some(AudioKind::Music),
        duration_secs: Some(total.clamp(1.0, 600.0)),
    };
    let music: AudioTrack = agents::step::<AudioGenerator>(ctx, "music", env, input).await?;
    Ok((voiceover, music))
}

/// Writes each scene's script under the pilot and lists it in the `scripts` category.
async fn write_scenes(
    ctx: &mut StageContext,
    pilot: &str,
    scenes: &[Scene],
) -> Result<(), StageError> {
    for scene in scenes {
        let path = write_json(
            ctx,
            &format!("pilots/{pilot}/scenes/scene_{}.json", scene.scene_number),
            scene,
        )
        .await?;
        ctx.artifact_store().index("scripts", &path).await?;
    }
    Ok(())
}

#[async_trait]
impl Stage for Evaluation {
    fn name(&self) -> &'static str {
        "evaluation"
    }

    fn reuse_key(&self, ctx: &StageContext) -> Option<String> {
        reuse_key(ctx, &[QaVerifier::VERSION, Critic::VERSION], false)
    }

    async fn run(&self, ctx: &mut StageContext) -> Result<StageOutput, StageError> {
        let inputs = production_inputs(&ctx.inputs)
            .map_err(|e| StageError::fatal("invalid_input", e.to_string()))?;
        let mut pilots: PilotsOutput = stage_output(ctx.previous.get("pilots"), "pilots")?;
        let env = self.0.env(ctx);
        let videos: u32 = pilots.pilots.iter().map(|p| p.videos.len() as u32).sum();
        ctx.set_step_total(videos + 1);
        let mut qa = BTreeMap::new();
        for pilot in &mut pilots.pilots {
            let pid = pilot.strategy.pilot_id.clone();
            let mut reports = Vec::new();
            for (clip, scene) in pilot.videos.iter().zip(pilot.scenes.iter()) {
                let input = QaVerifierInput {
                    video: clip.path.clone(),
                    expected_duration_secs: Some(scene.duration_secs),
                };
                let report: QaReport = agents::step::<QaVerifier>(
                    ctx,
                    &format!("{pid}/scene_{}/qa", clip.scene_number),
                    env.clone(),
                    input,
                )
                .await?;
                reports.push(report);
            }
            pilot.qa = reports.clone().into();
            qa.insert(pid, reports);
        }
        let threshold = inputs.approval_threshold.unwrap_or(0.6);
        let input = CriticInput {
            pilots: pilots.pilots.clone().into(),
            approval_threshold: Some(threshold),
            user_request: Some(inputs.user_request.clone()),
        };
        // The threshold is part of the key: changing it and resuming asks the critic again.
        let verdict: CriticOutput =
            agents::step::<Critic>(ctx, &format!("critic@{threshold}"), env, input).await?;
        for evaluation in &verdict.evaluations {
            let document = json!({"evaluation": evaluation, "qa": qa.get(&evaluation.pilot_id)});
            write_json(
                ctx,
                &format!("pilots/{}/evaluation.json", evaluation.pilot_id),
                &document,
            )
            .await?;
        }
        if verdict.approved_pilot.is_none() {
            let best = verdict
                .evaluations
                .iter()
                .map(|e| e.score)
                .fold(0.0, f64::max);
            return Err(StageError::fatal(
                "no_pilot_approved",
                format!(
                    "no pilot reached the approval threshold {threshold:.2} (best score {best:.2}); lower approval_threshold and resume"
                ),
            ));
        }
        output(&EvaluationOutput {
            evaluations: verdict.evaluations,
            approved_pilot: verdict.approved_pilot,
            threshold,
            qa,
        })
    }
}

#[async_trait]
impl Stage for Completion {
    fn name(&self) -> &'static str {
        "completion"
    }

    fn reuse_key(&self, ctx: &StageContext) -> Option<String> {
        reuse_key(
            ctx,
            &[
                ScriptWriter::VERSION,
                VideoGenerator::VERSION,
                AudioGenerator::VERSION,
            ],
            false,
        )
    }

    fn retry_policy(&self) -> Option<RetryPolicy> {
        Some(media_retry())
    }

    async fn run(&self, ctx: &mut StageContext) -> Result<StageOutput, StageError> {
        let pilots: PilotsOutput = stage_output(ctx.previous.get("pilots"), "pilots")?;
        let verdict: EvaluationOutput = stage_output(ctx.previous.get("evaluation"), "evaluation")?;
        let approved = verdict.approved_pilot.clone().unwrap_or_default();
        let pilot = pilots
            .pilots
            .iter()
            .find(|p| p.strategy.pilot_id == approved)
            .cloned()
            .ok_or_else(|| {
                StageError::fatal(
                    "missing_checkpoint",
                    format!("approved pilot {approved:?} has no results"),
                )
            })?;
        let strategy = &pilot.strategy;
        let env = self.0.env(ctx);
        let remaining: Vec<u32> = (strategy.test_scenes + 1..=strategy.num_scenes).collect();
        ctx.set_step_total(remaining.len() as u32 + 3);
        let mut scenes = pilot.scenes.to_vec();
        let mut videos = pilot.videos.to_vec();
        if !remaining.is_empty() {
            let request = ScriptRequest::scenes(plan_of(strategy), remaining.clone());
            let script: ScriptWriterOutput = ctx
                .step(
                    "script",
                    agents::script_writer_cost(&request),
                    agents::script_writer(env.clone(), request),
                )
                .await?;
            write_scenes(ctx, &approved, &script.scenes).await?;
            for scene in &script.scenes {
                let input = VideoGeneratorInput {
                    scene: scene.clone(),
                    version: Some(strategy.version),
                };
                let clip: VideoClip = agents::step::<VideoGenerator>(
                    ctx,
                    &format!("scene_{}/video", scene.scene_number),
                    env.clone(),
                    input,
                )
                .await?;
                videos.push(clip);
            }
            scenes.extend(script.scenes);
        }
        let (voiceover, music) = soundtrack(
            ctx,
            env,
            &scenes,
            format!("{} music for {}", strategy.tone, strategy.concept),
        )
        .await?;
        output(&CompletionOutput {
            pilot_id: approved,
            scenes,
            videos,
            voiceover,
            music,
        })
    }
}

#[async_trait]
impl Stage for Editing {
    fn name(&self) -> &'static str {
        "editing"
    }

    fn reuse_key(&self, ctx: &StageContext) -> Option<String> {
        reuse_key(ctx, &[Editor::VERSION], false)
    }

    fn retry_policy(&self) -> Option<RetryPolicy> {
        Some(media_retry())
    }

    async fn run(&self, ctx: &mut StageContext) -> Result<StageOutput, StageError> {
        let done: CompletionOutput = stage_output(ctx.previous.get("completion"), "completion")?;
        let env = self.0.env(ctx);
        ctx.set_step_total(1);
        let input = EditorInput {
            clips: done
                .scenes
                .iter()
                .zip(&done.videos)
                .map(|(scene, video)| EditorClip {
                    scene: scene.clone(),
                    video: video.path.clone(),
                })
                .collect(),
            voiceover: Some(done.voiceover.path.clone()),
            music: Some(done.music.path.clone()),
        };
        let cut: EditorOutput = agents::step::<Editor>(ctx, "editor", env, input).await?;
        output(&cut)
    }
}

/// The scenes of an earlier run: its completed scenes, or its approved pilot's test scenes.
fn scenes_of(run: &stagecraft_core::store::RunRecord) -> Option<(Vec<Scene>, String, String)> {
    let stage = |name: &str| {
        run.stages
            .iter()
            .find(|s| s.name == name && s.status == StageStatus::Completed)
            .and_then(|s| s.output.clone())
    };
    let pilots: Option<PilotsOutput> = stage("pilots").and_then(|v| serde_json::from_value(v).ok());
    if let Some(done) =
        stage("completion").and_then(|v| serde_json::from_value::<CompletionOutput>(v).ok())
    {
        let strategy = pilots
            .as_ref()
            .and_then(|p| {
                p.pilots
                    .iter()
                    .find(|p| p.strategy.pilot_id == done.pilot_id)
            })
            .map(|p| (p.strategy.tone.clone(), p.strategy.concept.clone()))
            .unwrap_or_default();
        return Some((done.scenes, strategy.0, strategy.1));
    }
    let verdict: EvaluationOutput =
        stage("evaluation").and_then(|v| serde_json::from_value(v).ok())?;
    let approved = verdict.approved_pilot?;
    let pilot = pilots?
        .pilots
        .into_iter()
        .find(|p| p.strategy.pilot_id == approved)?;
    Some((pilot.scenes.0, pilot.strategy.tone, pilot.strategy.concept))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct AudioOutput {
    source_run_id: String,
    voiceover: AudioTrack,
    music: AudioTrack,
}

#[async_trait]
impl Stage for AudioForRun {
    fn name(&self) -> &'static str {
        "audio"
    }

    fn reuse_key(&self, ctx: &StageContext) -> Option<String> {
        reuse_key(ctx, &[AudioGenerator::VERSION], false)
    }

    fn retry_policy(&self) -> Option<RetryPolicy> {
        Some(media_retry())
    }

    async fn run(&self, ctx: &mut StageContext) -> Result<StageOutput, StageError> {
        let (_, source) = audio_inputs(&ctx.inputs)
            .map_err(|e| StageError::fatal("invalid_input", e.to_string()))?;
        let run = ctx.load_run(source).await?.ok_or_else(|| {
            StageError::fatal(
                "unknown_source_run",
                format!("run {source} does not exist (or was deleted after retention)"),
            )
        })?;
        let (scenes, tone, concept) = scenes_of(&run).ok_or_else(|| {
            StageError::fatal(
                "no_scenes",
                format!("run {source} has no approved scenes yet: it needs a completed evaluation or completion stage"),
            )
        })?;
        let env = self.0.env(ctx);
        ctx.set_step_total(2);
        let (voiceover, music) =
            soundtrack(ctx, env, &scenes, format!("{tone} music for {concept}")).await?;
        output(&AudioOutput {
            source_run_id: source.to_string(),
            voiceover,
            music,
        })
    }
}

/// One agent as a one-stage run (`POST /agents/{name}/run`).
struct AgentStage {
    studio: Arc<Studio>,
    agent: &'static dyn AnyAgent,
}

#[async_trait]
impl Stage for AgentStage {
    fn name(&self) -> &'static str {
        self.agent.name()
    }

    fn reuse_key(&self, ctx: &StageContext) -> Option<String> {
        reuse_key(ctx, &[self.agent.version()], false)
    }

    fn retry_policy(&self) -> Option<RetryPolicy> {
        Some(media_retry())
    }

    async fn run(&self, ctx: &mut StageContext) -> Result<StageOutput, StageError> {
        let env = self.studio.env(ctx);
        let inputs = ctx.inputs.clone();
        let agent = self.agent;
        ctx.set_step_total(1);
        let estimate = agent
            .estimate(&inputs)
            .map_err(|e| StageError::fatal("invalid_input", e.to_string()))?;
        let result: Value = ctx
            .step(agent.name(), estimate, agent.run(env, &inputs))
            .await?;
        Ok(StageOutput {
            output: result,
            cost_usd: Usd::ZERO,
        })
    }
}

// ----------------------------------------------------------------------------------------------
// Workflows

/// The queue of one-agent runs.
pub const AGENTS_QUEUE: &str = "agents";

/// The studio's multi-stage workflows (each keeps `metadata.json`).
pub const WORKFLOWS: &[&str] = &["full_production", "pilot_only", "audio_only"];

/// A studio workflow: named stages over shared inputs.
pub struct StudioWorkflow {
    studio: Arc<Studio>,
    kind: RunKind,
    name: &'static str,
    description: &'static str,
    queue: &'static str,
    stages: Vec<Box<dyn Stage>>,
    inputs: InputsKind,
}

#[derive(Clone, Copy)]
enum InputsKind {
    Production,
    Audio,
    Agent(&'static dyn AnyAgent),
}

impl StudioWorkflow {
    pub fn full_production(studio: &Arc<Studio>) -> Self {
        Self {
            studio: studio.clone(),
            kind: RunKind::Workflow,
            name: "full_production",
            description: "Plans pilots, produces and evaluates their test scenes, completes the approved pilot with voiceover and music, and renders the final cut.",
            queue: queues::WORKFLOWS,
            stages: vec![
                Box::new(Planning(studio.clone())),
                Box::new(Pilots(studio.clone())),
                Box::new(Evaluation(studio.clone())),
                Box::new(Completion(studio.clone())),
                Box::new(Editing(studio.clone())),
            ],
            inputs: InputsKind::Production,
        }
    }

    pub fn pilot_only(studio: &Arc<Studio>) -> Self {
        Self {
            studio: studio.clone(),
            kind: RunKind::Workflow,
            name: "pilot_only",
            description: "Plans pilots, produces their test scenes and has the critic evaluate them.",
            queue: queues::WORKFLOWS,
            stages: vec![
                Box::new(Planning(studio.clone())),
                Box::new(Pilots(studio.clone())),
                Box::new(Evaluation(studio.clone())),
            ],
            inputs: InputsKind::Production,
        }
    }

    pub fn audio_only(studio: &Arc<Studio>) -> Self {
        Self {
            studio: studio.clone(),
            kind: RunKind::Workflow,
            name: "audio_only",
            description: "Generates a voiceover and music for the scenes of an existing run (source_run_id).",
            queue: queues::WORKFLOWS,
            stages: vec![Box::new(AudioForRun(studio.clone()))],
            inputs: InputsKind::Audio,
        }
    }

    pub fn agent(studio: &Arc<Studio>, agent: &'static dyn AnyAgent) -> Self {
        Self {
            studio: studio.clone(),
            kind: RunKind::Agent,
            name: agent.name(),
            description: agent.description(),
            queue: AGENTS_QUEUE,
            stages: vec![Box::new(AgentStage {
                studio: studio.clone(),
                agent,
            })],
            inputs: InputsKind::Agent(agent),
        }
    }
}

impl Workflow for StudioWorkflow {
    fn kind(&self) -> RunKind {
        self.kind
    }

    fn name(&self) -> &'static str {
        self.name
    }

    fn description(&self) -> &'static str {
        self.description
    }

    fn queue(&self) -> &'static str {
        self.queue
    }

    fn stages(&self) -> &[Box<dyn Stage>] {
        &self.stages
    }

    fn input_schema(&self) -> InputSchema {
        match self.inputs {
            InputsKind::Production => InputSchema::of::<ProductionInputs>(),
            InputsKind::Audio => InputSchema::of::<AudioInputs>(),
            InputsKind::Agent(agent) => agent.input_schema(),
        }
    }

    fn check_live(&self) -> Result<(), (&'static str, String)> {
        use agents::Provider::{Music, Speech, Text, Video};
        let needed: &[agents::Provider] = match self.inputs {
            InputsKind::Agent(agent) => agent.live(),
            InputsKind::Production if self.name == "pilot_only" => &[Text, Video],
            InputsKind::Production => &[Text, Video, Speech, Music],
            InputsKind::Audio => &[Speech, Music],
        };
        let live = &self.studio.settings.live;
        let missing = needed
            .iter()
            .map(|provider| live.key_for(*provider))
            .find(|(_, set)| !set);
        match missing {
            Some((variable, _)) => Err((
                "missing_key",
                format!(
                    "{} in live mode needs {variable}; set it and restart the workers and API",
                    self.name
                ),
            )),
            None => Ok(()),
        }
    }

    fn default_budget(&self, inputs: &Value) -> Option<Usd> {
        match self.inputs {
            InputsKind::Production => inputs
                .get("total_budget")
                .and_then(|budget| Usd::deserialize(budget).ok()),
            _ => None,
        }
    }

    fn result(&self, outputs: &BTreeMap<String, Value>) -> Value {
        match self.name {
            "full_production" => {
                let cut = outputs.get("editing").cloned().unwrap_or(Value::Null);
                let approved = outputs
                    .get("evaluation")
                    .and_then(|e| e.get("approved_pilot").cloned())
                    .unwrap_or(Value::Null);
                json!({
                    "final_video": cut.get("final_cut").and_then(|c| c.get("path")).cloned(),
                    "final_cut": cut.get("final_cut").cloned(),
                    "approved_pilot": approved,
                    "edit_candidates": cut.get("candidates").cloned(),
                })
            }
            _ => self
                .stages
                .last()
                .and_then(|stage| outputs.get(stage.name()).cloned())
                .unwrap_or(Value::Null),
        }
    }
}
