//! What the studio agents exchange: strategies, scenes, clips, tracks, evaluations, cuts.
//! Every type is part of an agent's input or output schema (`GET /agents/{name}/schema`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One pilot the producer plans: a take on the request, tried on a few test scenes first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PilotStrategy {
    /// `pilot_a`, `pilot_b`, …
    pub pilot_id: String,
    /// 1 for pilot_a, 2 for pilot_b, …: the version number of its scene videos.
    pub version: u32,
    pub concept: String,
    pub tone: String,
    pub visual_style: String,
    pub target_duration_secs: u32,
    pub num_scenes: u32,
    /// Scenes produced during the pilot phase, before the critic decides.
    pub test_scenes: u32,
    /// What the producer allocates to this pilot, test scenes and completion together.
    pub budget_usd: f64,
    pub rationale: String,
}

/// One scene of a script.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Scene {
    /// 1-based position in the video.
    pub scene_number: u32,
    pub title: String,
    pub description: String,
    /// What the voiceover says during the scene.
    pub narration: String,
    pub duration_secs: f64,
    /// The prompt a video provider receives.
    pub visual_prompt: String,
}

/// A generated video of one scene.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VideoClip {
    pub scene_number: u32,
    pub version: u32,
    /// Relative to the artifact root.
    pub path: String,
    pub duration_secs: f64,
    pub provider: String,
    pub cost_usd: f64,
    /// True when a mock provider made it: the cost is what the live provider would charge.
    pub simulated: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AudioKind {
    Voiceover,
    Music,
}

impl AudioKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Voiceover => "voiceover",
            Self::Music => "music",
        }
    }
}

/// A generated audio track.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AudioTrack {
    pub kind: AudioKind,
    /// Relative to the artifact root.
    pub path: String,
    pub duration_secs: f64,
    pub provider: String,
    pub cost_usd: f64,
    pub simulated: bool,
}

/// What QA found in one video.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QaReport {
    pub path: String,
    pub passed: bool,
    pub duration_secs: f64,
    pub width: u32,
    pub height: u32,
    pub has_video: bool,
    pub has_audio: bool,
    pub issues: Vec<String>,
}

/// A pilot's results, as the critic reviews them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PilotResult {
    pub strategy: PilotStrategy,
    pub scenes: Vec<Scene>,
    pub videos: Vec<VideoClip>,
    #[serde(default)]
    pub qa: Vec<QaReport>,
}

/// The critic's verdict on one pilot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PilotEvaluation {
    pub pilot_id: String,
    /// 0 to 1.
    pub score: f64,
    pub approved: bool,
    pub strengths: Vec<String>,
    pub weaknesses: Vec<String>,
    pub notes: String,
}

/// One way to cut the scenes together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditCandidate {
    pub name: String,
    pub description: String,
    /// Scene numbers in playing order.
    pub scene_order: Vec<u32>,
    pub duration_secs: f64,
    pub score: f64,
}

/// The rendered final cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FinalCut {
    pub path: String,
    pub duration_secs: f64,
    pub scenes: u32,
    pub has_audio: bool,
    pub candidate: String,
}
