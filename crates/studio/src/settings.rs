//! What the studio needs from the deployment: its section of the variables, read here.

use std::{path::PathBuf, time::Duration};

use secrecy::SecretString;
use stagecraft_core::{
    process::BaseEnv,
    settings::{ConfigError, Vars, unset},
};

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

/// Who speaks voiceovers live (`SPEECH_PROVIDER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpeechProvider {
    ElevenLabs,
    OpenAi,
}

impl SpeechProvider {
    /// The setting's value: frozen, deployments set it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ElevenLabs => "elevenlabs",
            Self::OpenAi => "openai",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "elevenlabs" => Some(Self::ElevenLabs),
            "openai" => Some(Self::OpenAi),
            _ => None,
        }
    }

    /// The variable holding the key it needs.
    pub fn key_variable(self) -> &'static str {
        match self {
            Self::ElevenLabs => "ELEVENLABS_API_KEY",
            Self::OpenAi => "OPENAI_API_KEY",
        }
    }
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
    pub speech_provider: SpeechProvider,
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

impl LiveSettings {
    /// The variable holding the key `provider` needs live, and whether it is set.
    pub fn key_for(&self, provider: crate::agents::Provider) -> (&'static str, bool) {
        use crate::agents::Provider;
        match provider {
            Provider::Text => ("ANTHROPIC_API_KEY", self.anthropic_key.is_some()),
            Provider::Video => ("RUNWAY_API_KEY", self.runway_key.is_some()),
            Provider::Music => ("ELEVENLABS_API_KEY", self.elevenlabs_key.is_some()),
            Provider::Speech => {
                let key = match self.speech_provider {
                    SpeechProvider::ElevenLabs => &self.elevenlabs_key,
                    SpeechProvider::OpenAi => &self.openai_key,
                };
                (self.speech_provider.key_variable(), key.is_some())
            }
        }
    }
}

impl StudioSettings {
    /// The studio's section of the deployment's variables, each default written here only.
    pub fn from_vars(vars: &Vars<'_>, base_env: &BaseEnv) -> Result<Self, ConfigError> {
        Ok(Self {
            base_env: base_env.clone(),
            ffmpeg: vars.path_or("FFMPEG_PATH", "ffmpeg"),
            ffprobe: vars.path_or("FFPROBE_PATH", "ffprobe"),
            media_timeout: vars.secs("MEDIA_TIMEOUT_SECS", 300, 1, 86_400)?,
            mock_latency: vars.millis("MOCK_PROVIDER_LATENCY_MS", 0, 0, 3_600_000)?,
            live: LiveSettings::from_vars(vars)?,
        })
    }
}

/// Every setting at its default (tests, tools).
impl Default for StudioSettings {
    fn default() -> Self {
        Self::from_vars(&Vars::new(&unset), &BaseEnv::default())
            .unwrap_or_else(|error| unreachable!("the defaults are valid: {error}"))
    }
}

impl LiveSettings {
    fn from_vars(vars: &Vars<'_>) -> Result<Self, ConfigError> {
        let speech_provider =
            vars.parse_with("SPEECH_PROVIDER", SpeechProvider::ElevenLabs, |v| {
                SpeechProvider::parse(v).ok_or_else(|| "expected elevenlabs or openai".to_owned())
            })?;
        Ok(Self {
            anthropic_key: vars.secret("ANTHROPIC_API_KEY"),
            anthropic_base_url: vars.base_url("ANTHROPIC_BASE_URL", "https://api.anthropic.com"),
            anthropic_model: vars.text("ANTHROPIC_MODEL", "claude-sonnet-4-5"),
            timeout: vars.secs("PROVIDER_TIMEOUT_SECS", 120, 1, 86_400)?,
            max_retries: vars.parse_in("PROVIDER_MAX_RETRIES", 4, 0, 20)? as u32,
            text_input_price: vars.price("PRICE_TEXT_INPUT_PER_MTOK", 3.0)?,
            text_output_price: vars.price("PRICE_TEXT_OUTPUT_PER_MTOK", 15.0)?,
            runway_key: vars.secret("RUNWAY_API_KEY"),
            runway_base_url: vars.base_url("RUNWAY_BASE_URL", "https://api.dev.runwayml.com"),
            runway_model: vars.text("RUNWAY_MODEL", "gen4_turbo"),
            video_price: vars.price("PRICE_VIDEO_PER_SECOND", 0.05)?,
            video_poll_interval: vars.millis("VIDEO_POLL_INTERVAL_MS", 5000, 1, 3_600_000)?,
            speech_provider,
            elevenlabs_key: vars.secret("ELEVENLABS_API_KEY"),
            elevenlabs_base_url: vars.base_url("ELEVENLABS_BASE_URL", "https://api.elevenlabs.io"),
            elevenlabs_voice: vars.text("ELEVENLABS_VOICE_ID", "21m00Tcm4TlvDq8ikWAM"),
            elevenlabs_model: vars.text("ELEVENLABS_MODEL", "eleven_multilingual_v2"),
            openai_key: vars.secret("OPENAI_API_KEY"),
            openai_base_url: vars.base_url("OPENAI_BASE_URL", "https://api.openai.com"),
            openai_tts_model: vars.text("OPENAI_TTS_MODEL", "gpt-4o-mini-tts"),
            openai_tts_voice: vars.text("OPENAI_TTS_VOICE", "alloy"),
            speech_price: vars.price("PRICE_SPEECH_PER_1K_CHARS", 0.30)?,
            music_price: vars.price("PRICE_MUSIC_PER_SECOND", 0.01)?,
        })
    }
}

/// Every setting at its default (tests, tools).
impl Default for LiveSettings {
    fn default() -> Self {
        Self::from_vars(&Vars::new(&unset))
            .unwrap_or_else(|error| unreachable!("the defaults are valid: {error}"))
    }
}
