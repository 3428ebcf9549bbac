//! What the studio agents exchange: strategies, scenes, clips, tracks, evaluations, cuts.
//! Every type is part of an agent's input or output schema (`GET /agents/{name}/schema`).

use serde::{Deserialize, Serialize};
use stagecraft_core::money::Usd;
use utoipa::ToSchema;

/// One pilot the producer plans: a take on the request, tried on a few test scenes first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PilotStrategy {
    /// `pilot_a`, `pilot_b`, …
    #[schema(min_length = 1, max_length = 64)]
    pub pilot_id: String,
    /// 1 for pilot_a, 2 for pilot_b, …: the version number of its scene videos.
    #[schema(minimum = 1, maximum = 99)]
    pub version: u32,
    #[schema(max_length = 4000)]
    pub concept: String,
    #[schema(max_length = 200)]
    pub tone: String,
    #[schema(max_length = 200)]
    pub visual_style: String,
    #[schema(minimum = 1, maximum = 3600)]
    pub target_duration_secs: u32,
    #[schema(minimum = 1, maximum = 50)]
    pub num_scenes: u32,
    /// Scenes produced during the pilot phase, before the critic decides.
    #[schema(minimum = 0, maximum = 50)]
    pub test_scenes: u32,
    /// What the producer allocates to this pilot, test scenes and completion together.
    #[schema(value_type = f64, minimum = 0, maximum = 1000000)]
    pub budget_usd: Usd,
    #[schema(max_length = 4000)]
    pub rationale: String,
}

/// One scene of a script.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Scene {
    /// 1-based position in the video.
    #[schema(minimum = 1, maximum = 999)]
    pub scene_number: u32,
    #[schema(max_length = 200)]
    pub title: String,
    #[schema(min_length = 1, max_length = 4000)]
    pub description: String,
    /// What the voiceover says during the scene.
    #[schema(max_length = 4000)]
    pub narration: String,
    #[schema(minimum = 0.5, maximum = 60)]
    pub duration_secs: f64,
    /// The prompt a video provider receives.
    #[schema(max_length = 4000)]
    pub visual_prompt: String,
}

/// A generated video of one scene.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VideoClip {
    #[schema(minimum = 1, maximum = 999)]
    pub scene_number: u32,
    #[schema(minimum = 1, maximum = 99)]
    pub version: u32,
    /// Relative to the artifact root.
    #[schema(min_length = 1, max_length = 500)]
    pub path: String,
    #[schema(minimum = 0, maximum = 86400)]
    pub duration_secs: f64,
    #[schema(max_length = 200)]
    pub provider: String,
    #[schema(value_type = f64, minimum = 0, maximum = 1000000)]
    pub cost_usd: Usd,
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
    #[schema(min_length = 1, max_length = 500)]
    pub path: String,
    #[schema(minimum = 0, maximum = 86400)]
    pub duration_secs: f64,
    #[schema(max_length = 200)]
    pub provider: String,
    #[schema(value_type = f64, minimum = 0, maximum = 1000000)]
    pub cost_usd: Usd,
    pub simulated: bool,
}

/// What QA found in one video.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QaReport {
    #[schema(min_length = 1, max_length = 500)]
    pub path: String,
    pub passed: bool,
    #[schema(minimum = 0, maximum = 86400)]
    pub duration_secs: f64,
    #[schema(minimum = 0, maximum = 100000)]
    pub width: u32,
    #[schema(minimum = 0, maximum = 100000)]
    pub height: u32,
    pub has_video: bool,
    pub has_audio: bool,
    #[schema(inline)]
    pub issues: Notes,
}

/// A list whose items are all different, where a repeat would mean nothing (the same pilot
/// twice, the same scene twice): its schema says `uniqueItems`, with its bounds, and inputs with
/// a repeat are refused.
macro_rules! distinct {
    ($(#[$doc:meta])* $name:ident, $item:ty, $min:expr, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Vec<$item>);

        impl From<Vec<$item>> for $name {
            fn from(items: Vec<$item>) -> Self {
                Self(items)
            }
        }

        impl FromIterator<$item> for $name {
            fn from_iter<I: IntoIterator<Item = $item>>(items: I) -> Self {
                Self(items.into_iter().collect())
            }
        }

        impl std::ops::Deref for $name {
            type Target = Vec<$item>;
            fn deref(&self) -> &Vec<$item> {
                &self.0
            }
        }

        impl std::ops::DerefMut for $name {
            fn deref_mut(&mut self) -> &mut Vec<$item> {
                &mut self.0
            }
        }

        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                let min: usize = $min;
                utoipa::openapi::schema::ArrayBuilder::new()
                    .items(utoipa::openapi::Ref::from_schema_name(<$item as ToSchema>::name()))
                    .min_items((min > 0).then_some(min))
                    .max_items(Some($max))
                    .unique_items(true)
                    .into()
            }
        }

        impl ToSchema for $name {
            fn schemas(
                schemas: &mut Vec<(
                    String,
                    utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
                )>,
            ) {
                schemas.push((
                    <$item as ToSchema>::name().into_owned(),
                    <$item as utoipa::PartialSchema>::schema(),
                ));
                <$item as ToSchema>::schemas(schemas);
            }
        }
    };
}

distinct!(
    /// One to four pilots' results.
    Pilots, PilotResult, 1, 4
);
distinct!(
    /// Up to 50 scenes.
    Scenes, Scene, 0, 50
);
distinct!(
    /// Up to 50 video clips.
    Clips, VideoClip, 0, 50
);
distinct!(
    /// Up to 50 QA reports.
    QaReports, QaReport, 0, 50
);
distinct!(
    /// Up to 20 short remarks.
    Notes, Note, 0, 20
);

/// A short remark (an issue QA found, a strength or weakness of a pilot): at most 500
/// characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Note(pub String);

impl utoipa::PartialSchema for Note {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .max_length(Some(500))
            .into()
    }
}

impl ToSchema for Note {}

impl From<String> for Note {
    fn from(text: String) -> Self {
        Self(text)
    }
}

/// A pilot's results, as the critic reviews them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PilotResult {
    pub strategy: PilotStrategy,
    #[schema(inline)]
    pub scenes: Scenes,
    #[schema(inline)]
    pub videos: Clips,
    #[serde(default)]
    #[schema(inline)]
    pub qa: QaReports,
}

/// The critic's verdict on one pilot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PilotEvaluation {
    #[schema(min_length = 1, max_length = 64)]
    pub pilot_id: String,
    /// 0 to 1.
    #[schema(minimum = 0, maximum = 1)]
    pub score: f64,
    pub approved: bool,
    #[schema(inline)]
    pub strengths: Notes,
    #[schema(inline)]
    pub weaknesses: Notes,
    #[schema(max_length = 4000)]
    pub notes: String,
}

/// One way to cut the scenes together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditCandidate {
    #[schema(max_length = 64)]
    pub name: String,
    #[schema(max_length = 4000)]
    pub description: String,
    /// Clips in playing order, by scene number.
    #[schema(max_items = 50)]
    pub scene_order: Vec<u32>,
    #[schema(minimum = 0, maximum = 86400)]
    pub duration_secs: f64,
    #[schema(minimum = 0, maximum = 1)]
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
