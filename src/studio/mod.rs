//! The studio: video-production agents and workflows on the engine.
//!
//! - `model.rs`: what agents exchange (strategies, scenes, clips, tracks, evaluations, cuts);
//! - `agents.rs`: the seven agents, their schemas, simulated prices and the mock providers;
//! - `media.rs`: ffmpeg and ffprobe (scene videos, speech, music, the final cut, QA);
//! - `workflows.rs`: `full_production`, `pilot_only`, `audio_only` and one-agent runs.
//!
//! Invariant: agents never run in the API process; the API submits runs and workers execute them.
//! Invariant: every agent call in a workflow is a memoised step whose estimated cost is checked
//! against the run's remaining budget before it starts.

pub mod agents;
pub mod live;
pub mod media;
pub mod model;
pub mod workflows;

use std::sync::Arc;

use crate::{config::StudioSettings, engine::StageContext, workflows::Catalog};

/// What every studio stage shares: the media tools and the mock providers' settings.
#[derive(Debug, Clone)]
pub struct Studio {
    pub settings: StudioSettings,
    pub media: media::Media,
    pub live: live::Http,
}

impl Studio {
    pub fn new(settings: &StudioSettings) -> Self {
        Self {
            settings: settings.clone(),
            media: media::Media::new(settings),
            live: live::Http::new(&settings.live),
        }
    }

    /// The environment agents get inside a stage.
    pub fn env(&self, ctx: &StageContext) -> agents::AgentEnv {
        agents::AgentEnv {
            artifacts: ctx.artifact_store().clone(),
            run_id: ctx.run_id,
            mode: ctx.provider_mode,
            cancel: ctx.cancel.clone(),
            media: self.media.clone(),
            latency: self.settings.mock_latency,
            live: self.live.clone(),
        }
    }
}

/// Adds the studio workflows and one-agent runs to a catalogue.
pub fn register(catalog: &mut Catalog, settings: &StudioSettings) {
    let studio = Arc::new(Studio::new(settings));
    catalog.add(Arc::new(workflows::StudioWorkflow::full_production(
        &studio,
    )));
    catalog.add(Arc::new(workflows::StudioWorkflow::pilot_only(&studio)));
    catalog.add(Arc::new(workflows::StudioWorkflow::audio_only(&studio)));
    for agent in agents::AGENTS {
        catalog.add(Arc::new(workflows::StudioWorkflow::agent(&studio, agent)));
    }
}
