//! What the studio needs from the deployment (read by the application's configuration).

use std::{path::PathBuf, time::Duration};

use secrecy::SecretString;
use stagecraft_core::process::BaseEnv;

/// What the studio agents need from the deployment.
#[derive(Debug, Clone)]
pub struct StudioSettings {
    /// The base environment of ffmpeg and ffprobe.
    pub base_env: BaseEnv,
    pub ffmpeg: PathBuf,
    pub ffprobe: PathBuf,
    /// Longest one ffmpeg or ffprobe call may take.
    pub media_timeout: Duration,
    /// Added to every mock provider call.
    pub mock_latency: Duration,
    /// The live providers.
    pub live: LiveSettings,
}

/// Live provider endpoints, keys, limits and prices.
#[derive(Debug, Clone)]
pub struct LiveSettings {
    pub anthropic_key: Option<SecretString>,
    pub anthropic_base_url: String,
    pub anthropic_model: String,
    pub timeout: Duration,
    pub max_retries: u32,
    /// Dollars per million tokens.
    pub text_input_price: f64,
    pub text_output_price: f64,
    pub runway_key: Option<SecretString>,
    pub runway_base_url: String,
    pub runway_model: String,
    /// Dollars per second of generated video.
    pub video_price: f64,
    pub video_poll_interval: Duration,
    /// `elevenlabs` or `openai`.
    pub speech_provider: String,
    pub elevenlabs_key: Option<SecretString>,
    pub elevenlabs_base_url: String,
    pub elevenlabs_voice: String,
    pub elevenlabs_model: String,
    pub openai_key: Option<SecretString>,
    pub openai_base_url: String,
    pub openai_tts_model: String,
    pub openai_tts_voice: String,
    /// Dollars per thousand characters spoken, and per second of music.
    pub speech_price: f64,
    pub music_price: f64,
}

impl Default for LiveSettings {
    fn default() -> Self {
        Self {
            anthropic_key: None,
            anthropic_base_url: "https://api.anthropic.com".to_owned(),
            anthropic_model: "claude-sonnet-4-5".to_owned(),
            timeout: Duration::from_secs(120),
            max_retries: 4,
            text_input_price: 3.0,
            text_output_price: 15.0,
            runway_key: None,
            runway_base_url: "https://api.dev.runwayml.com".to_owned(),
            runway_model: "gen4_turbo".to_owned(),
            video_price: 0.05,
            video_poll_interval: Duration::from_secs(5),
            speech_provider: "elevenlabs".to_owned(),
            elevenlabs_key: None,
            elevenlabs_base_url: "https://api.elevenlabs.io".to_owned(),
            elevenlabs_voice: "21m00Tcm4TlvDq8ikWAM".to_owned(),
            elevenlabs_model: "eleven_multilingual_v2".to_owned(),
            openai_key: None,
            openai_base_url: "https://api.openai.com".to_owned(),
            openai_tts_model: "gpt-4o-mini-tts".to_owned(),
            openai_tts_voice: "alloy".to_owned(),
            speech_price: 0.30,
            music_price: 0.01,
        }
    }
}

impl Default for StudioSettings {
    fn default() -> Self {
        Self {
            base_env: BaseEnv::default(),
            ffmpeg: PathBuf::from("ffmpeg"),
            ffprobe: PathBuf::from("ffprobe"),
            media_timeout: Duration::from_secs(300),
            mock_latency: Duration::ZERO,
            live: LiveSettings::default(),
        }
    }
}
