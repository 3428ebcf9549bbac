//! The studio: video-production agents and workflows on the engine.
//!
//! - `model.rs`: what agents exchange (strategies, scenes, clips, tracks, evaluations, cuts);
//! - `agents.rs`: the seven agents, their schemas, simulated prices and the mock providers;
//! - `media.rs`: ffmpeg and ffprobe (scene videos, speech, music, the final cut, QA);
//! - `workflows.rs`: `full_production`, `pilot_only`, `audio_only` and one-agent runs;
//! - `metadata.rs`: each workflow run's `metadata.json`, kept current by observing its changes.
//!
//! Invariant: agents never run in the API process; the API submits runs and workers execute them.
//! Invariant: every agent call in a workflow is a memoised step whose estimated cost is checked
//! against the run's remaining budget before it starts.

pub mod agents;
pub mod live;
pub mod media;
pub mod metadata;
pub mod model;
pub mod settings;
pub mod workflows;

use std::sync::Arc;

pub use settings::{LiveSettings, StudioSettings};
use stagecraft_core::{
    artifacts::ArtifactStore,
    engine::StageContext,
    health::ToolCheck,
    module::{Housekeeping, Module, RunObserver},
    workflows::Catalog,
};

/// What every studio stage shares: the media tools and the mock providers' settings.
#[derive(Debug, Clone)]
pub struct Studio {
    pub settings: StudioSettings,
    pub media: media::Media,
    pub live: live::Providers,
}

impl Studio {
    pub fn new(settings: &StudioSettings) -> Self {
        Self {
            settings: settings.clone(),
            media: media::Media::new(settings),
            live: live::Providers::new(&settings.live),
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
fn register(catalog: &mut Catalog, studio: &Arc<Studio>) {
    let studio = studio.clone();
    catalog.add(Arc::new(workflows::StudioWorkflow::full_production(
        &studio,
    )));
    catalog.add(Arc::new(workflows::StudioWorkflow::pilot_only(&studio)));
    catalog.add(Arc::new(workflows::StudioWorkflow::audio_only(&studio)));
    for agent in agents::AGENTS {
        catalog.add(Arc::new(workflows::StudioWorkflow::agent(&studio, *agent)));
    }
}

/// Deletes the entries of runs that are gone (their `runs/{id}/` directory was just deleted by
/// the core) from the `videos/`, `audio/` and `scripts/` categories. Category entries are named
/// `{run_id}_…`: one listing of each category.
pub async fn clean_categories(artifacts: &ArtifactStore, gone: &[String]) -> usize {
    if gone.is_empty() {
        return 0;
    }
    let gone: Arc<[String]> = gone.into();
    let mut deleted = 0;
    for category in ["videos", "audio", "scripts"] {
        let gone = gone.clone();
        let owned = move |name: &str| {
            let owner = name.split('_').next().unwrap_or_default();
            gone.iter().any(|run| run == owner)
        };
        deleted += artifacts.remove_files(category, owned).await.unwrap_or(0);
    }
    deleted
}

/// The studio as a tenant of the core.
pub struct StudioModule {
    studio: Arc<Studio>,
}

impl StudioModule {
    pub fn new(settings: &StudioSettings) -> Self {
        Self {
            studio: Arc::new(Studio::new(settings)),
        }
    }
}

#[async_trait::async_trait]
impl Module for StudioModule {
    fn name(&self) -> &'static str {
        "studio"
    }

    fn register(&self, catalog: &mut Catalog) {
        register(catalog, &self.studio);
    }

    async fn housekeeping(&self, work: &Housekeeping<'_>) -> usize {
        match work.artifacts {
            Some(artifacts) => clean_categories(artifacts, work.gone_runs).await,
            None => 0,
        }
    }

    async fn tool_checks(&self) -> Vec<(&'static str, ToolCheck)> {
        let media = self.studio.media.clone();
        let ffmpeg = ToolCheck::start(move || {
            let media = media.clone();
            async move { media.check().await }
        })
        .await;
        vec![("ffmpeg", ffmpeg)]
    }

    fn observer(&self) -> Option<Arc<dyn RunObserver>> {
        Some(Arc::new(metadata::MetadataObserver {
            workflows: workflows::WORKFLOWS,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use stagecraft_core::{
        artifacts::clean_gone_runs,
        clock::SystemClock,
        ids::RunId,
        store::{NewRun, SharedStore},
        testing::workflow_run,
    };
    use stagecraft_store_sqlite::{SqliteStore, sqlite_url_for};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn artifacts_of_deleted_runs_are_removed_with_their_category_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = sqlite_url_for(&dir.path().join("s.db"));
        let store: SharedStore = Arc::new(
            SqliteStore::open(&url, Arc::new(SystemClock))
                .await
                .expect("store"),
        );
        let artifacts = ArtifactStore::open(dir.path().join("artifacts")).expect("artifacts");
        let kept = RunId::generate();
        store
            .insert_run(NewRun {
                id: kept,
                ..workflow_run("noop", "workflows", &["noop"])
            })
            .await
            .expect("insert");
        let gone = RunId::generate();
        for id in [kept, gone] {
            let path = format!("runs/{id}/videos/scene_1_v1.mp4");
            artifacts
                .write(&path, b"video".to_vec())
                .await
                .expect("write");
            artifacts.index("videos", &path).await.expect("index");
        }
        let gone_runs = clean_gone_runs(&store, &artifacts).await;
        assert_eq!(gone_runs, [gone.to_string()]);
        assert_eq!(clean_categories(&artifacts, &gone_runs).await, 1);
        let root = artifacts.local_root().expect("local");
        assert!(root.join(format!("runs/{kept}")).exists());
        assert!(root.join(format!("videos/{kept}_scene_1_v1.mp4")).exists());
        assert!(!root.join(format!("runs/{gone}")).exists());
        assert!(!root.join(format!("videos/{gone}_scene_1_v1.mp4")).exists());
    }
}
