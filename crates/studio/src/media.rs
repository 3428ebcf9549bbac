//! Real media with ffmpeg: the mock providers' scene videos and audio, the editor's final cut,
//! and ffprobe for QA.
//!
//! Invariant: every file appears under its final name only once ffmpeg has finished writing it
//! (rendered to a temporary name in the same directory, then renamed), so a checkpoint or step
//! that names a media file always names a complete one.
//! Invariant: ffmpeg runs through `process.rs` (timeout, cancel, process group) with arguments,
//! never a shell string; text reaches filters through files, never through filter syntax.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use crate::settings::StudioSettings;
use stagecraft_core::{
    engine::StageError,
    process::{self, BaseEnv, CommandSpec, ProcessError},
};

/// Width, height and frame rate of mock scene videos: small, so offline runs stay fast.
const WIDTH: u32 = 320;
const HEIGHT: u32 = 180;
const FPS: u32 = 10;
/// Characters per line of the text drawn on a scene.
const LINE: usize = 36;

/// The media tools of a deployment.
#[derive(Debug, Clone)]
pub struct Media {
    /// ffmpeg's whole environment: the deployment's base variables, nothing secret.
    base_env: BaseEnv,
    ffmpeg: PathBuf,
    ffprobe: PathBuf,
    timeout: Duration,
    /// Whether this ffmpeg has the flite speech synthesiser, asked once.
    flite: std::sync::Arc<OnceCell<bool>>,
}

/// What ffprobe says about a file.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaInfo {
    pub duration_secs: f64,
    pub video: Option<(u32, u32)>,
    pub has_audio: bool,
}

#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    streams: Vec<ProbeStream>,
    format: Option<ProbeFormat>,
}

#[derive(Deserialize)]
struct ProbeStream {
    codec_type: String,
    width: Option<u32>,
    height: Option<u32>,
}

#[derive(Deserialize)]
struct ProbeFormat {
    duration: Option<String>,
}

impl Media {
    pub fn new(settings: &StudioSettings) -> Self {
        Self {
            base_env: settings.base_env.clone(),
            ffmpeg: settings.ffmpeg.clone(),
            ffprobe: settings.ffprobe.clone(),
            timeout: settings.media_timeout,
            flite: Default::default(),
        }
    }

    /// A command for one of the media tools, with the base environment only.
    fn command(&self, program: &Path, timeout: Duration) -> CommandSpec {
        CommandSpec::new(program, timeout).base_env(&self.base_env)
    }

    /// The first line of `ffmpeg -version`, or why ffmpeg cannot be used.
    pub async fn check(&self) -> Result<String, String> {
        let spec = self
            .command(&self.ffmpeg, Duration::from_secs(10))
            .arg("-version");
        match process::run(&spec, &CancellationToken::new()).await {
            Ok(output) => Ok(output.stdout.lines().next().unwrap_or("ffmpeg").to_owned()),
            Err(error) => Err(self.describe(error).to_string()),
        }
    }

    /// A video of `duration_secs` on a background `color` (`0xRRGGBB`) showing `text`.
    pub async fn scene_video(
        &self,
        target: &Path,
        text: &str,
        duration_secs: f64,
        color: &str,
        cancel: &CancellationToken,
    ) -> Result<(), StageError> {
        let text_file = TempText::new(&wrap(text, LINE))?;
        let draw = format!(
            "drawtext=textfile={}:fontcolor=white:fontsize=14:line_spacing=4:x=12:y=(h-text_h)/2",
            escape_filter_value(&text_file.path.to_string_lossy())
        );
        let source = format!("color=c={color}:s={WIDTH}x{HEIGHT}:d={duration_secs:.3}:r={FPS}");
        self.render(target, "mp4", cancel, |spec| {
            spec.arg("-f")
                .arg("lavfi")
                .arg("-i")
                .arg(source)
                .arg("-vf")
                .arg(draw)
                .arg("-c:v")
                .arg("libx264")
                .arg("-preset")
                .arg("ultrafast")
                .arg("-pix_fmt")
                .arg("yuv420p")
        })
        .await
    }

    /// Spoken `text` (flite's synthetic voice when this ffmpeg has it; a tone pattern with the
    /// rhythm of the words otherwise), as MP3.
    pub async fn speech(
        &self,
        target: &Path,
        text: &str,
        cancel: &CancellationToken,
    ) -> Result<(), StageError> {
        if self.has_flite().await {
            let text_file = TempText::new(text)?;
            let source = format!(
                "flite=textfile={}:voice=slt",
                escape_filter_value(&text_file.path.to_string_lossy())
            );
            return self
                .render(target, "mp3", cancel, |spec| {
                    spec.arg("-f")
                        .arg("lavfi")
                        .arg("-i")
                        .arg(source)
                        .arg("-c:a")
                        .arg("libmp3lame")
                        .arg("-q:a")
                        .arg("6")
                })
                .await;
        }
        let words = text.split_whitespace().count().max(1);
        let duration = words as f64 * 0.35;
        let expression = "0.2*sin(2*PI*(180+40*sin(2*PI*3*t))*t)*(0.5+0.5*sin(2*PI*2.8*t))";
        self.tone(target, expression, duration, cancel).await
    }

    /// Background music: a soft chord of `duration_secs` whose root depends on `seed`.
    pub async fn music(
        &self,
        target: &Path,
        duration_secs: f64,
        seed: u64,
        cancel: &CancellationToken,
    ) -> Result<(), StageError> {
        let root = [196.0, 220.0, 247.0, 262.0, 294.0][(seed % 5) as usize];
        let expression = format!(
            "0.08*sin(2*PI*{root}*t)+0.06*sin(2*PI*{third}*t)+0.05*sin(2*PI*{fifth}*t)",
            third = root * 1.26,
            fifth = root * 1.5
        );
        self.tone(target, &expression, duration_secs, cancel).await
    }

    async fn tone(
        &self,
        target: &Path,
        expression: &str,
        duration_secs: f64,
        cancel: &CancellationToken,
    ) -> Result<(), StageError> {
        let source = format!("aevalsrc={expression}:s=22050:d={duration_secs:.3}");
        self.render(target, "mp3", cancel, |spec| {
            spec.arg("-f")
                .arg("lavfi")
                .arg("-i")
                .arg(source)
                .arg("-c:a")
                .arg("libmp3lame")
                .arg("-q:a")
                .arg("6")
        })
        .await
    }

    /// The final cut: `videos` one after the other, with the voiceover over music (each
    /// optional) for exactly the length of the pictures.
    pub async fn final_cut(
        &self,
        target: &Path,
        videos: &[PathBuf],
        voiceover: Option<&Path>,
        music: Option<&Path>,
        cancel: &CancellationToken,
    ) -> Result<(), StageError> {
        if videos.is_empty() {
            return Err(StageError::fatal(
                "no_scenes",
                "the final cut needs at least one scene video",
            ));
        }
        let mut list = String::new();
        let mut total = 0.0;
        for video in videos {
            list.push_str(&format!(
                "file '{}'\n",
                video.to_string_lossy().replace('\'', "'\\''")
            ));
            total += self.probe(video, cancel).await?.duration_secs;
        }
        let list_file = TempText::new(&list)?;
        let audio: Vec<&Path> = [voiceover, music].into_iter().flatten().collect();
        self.render(target, "mp4", cancel, |mut spec| {
            spec = spec
                .arg("-f")
                .arg("concat")
                .arg("-safe")
                .arg("0")
                .arg("-i")
                .arg(&list_file.path);
            for track in &audio {
                spec = spec.arg("-i").arg(track);
            }
            let filter = match audio.len() {
                0 => None,
                1 => Some("[1:a]apad,volume=1.0[a]".to_owned()),
                _ => Some(
                    "[1:a]apad[vo];[2:a]apad,volume=0.35[mu];[vo][mu]amix=inputs=2:duration=longest:normalize=0[a]"
                        .to_owned(),
                ),
            };
            spec = spec.arg("-map").arg("0:v").arg("-c:v").arg("copy");
            if let Some(filter) = filter {
                spec = spec
                    .arg("-filter_complex")
                    .arg(filter)
                    .arg("-map")
                    .arg("[a]")
                    .arg("-c:a")
                    .arg("aac")
                    .arg("-b:a")
                    .arg("96k");
            }
            spec.arg("-t").arg(format!("{total:.3}"))
        })
        .await
    }

    /// Duration and streams of a media file.
    pub async fn probe(
        &self,
        path: &Path,
        cancel: &CancellationToken,
    ) -> Result<MediaInfo, StageError> {
        let spec = self
            .command(&self.ffprobe, self.timeout)
            .arg("-v")
            .arg("error")
            .arg("-show_entries")
            .arg("format=duration:stream=codec_type,width,height")
            .arg("-of")
            .arg("json")
            .arg(path);
        let output = process::run(&spec, cancel)
            .await
            .map_err(|e| self.describe(e))?;
        let probe: Probe = serde_json::from_str(&output.stdout).map_err(|e| {
            StageError::fatal("invalid_media", format!("ffprobe answered no JSON: {e}"))
        })?;
        let video = probe
            .streams
            .iter()
            .find(|s| s.codec_type == "video")
            .map(|s| (s.width.unwrap_or(0), s.height.unwrap_or(0)));
        Ok(MediaInfo {
            duration_secs: probe
                .format
                .and_then(|f| f.duration)
                .and_then(|d| d.parse().ok())
                .unwrap_or(0.0),
            video,
            has_audio: probe.streams.iter().any(|s| s.codec_type == "audio"),
        })
    }

    async fn has_flite(&self) -> bool {
        *self
            .flite
            .get_or_init(|| async {
                let spec = self
                    .command(&self.ffmpeg, Duration::from_secs(10))
                    .arg("-hide_banner")
                    .arg("-filters");
                match process::run(&spec, &CancellationToken::new()).await {
                    Ok(output) => output
                        .stdout
                        .lines()
                        .any(|line| line.split_whitespace().nth(1) == Some("flite")),
                    Err(_) => false,
                }
            })
            .await
    }

    /// Runs ffmpeg writing `target` through a temporary file in the same directory, then
    /// renames it into place.
    async fn render(
        &self,
        target: &Path,
        format: &str,
        cancel: &CancellationToken,
        build: impl FnOnce(CommandSpec) -> CommandSpec,
    ) -> Result<(), StageError> {
        let dir = target.parent().unwrap_or(Path::new(".")).to_path_buf();
        let created = dir.clone();
        tokio::task::spawn_blocking(move || {
            stagecraft_core::artifacts::create_dir_durably(&created)
        })
        .await
        .map_err(|e| io_error(&dir, std::io::Error::other(e)))?
        .map_err(|e| io_error(&dir, e))?;
        let file_name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temporary = dir.join(format!(
            ".{file_name}.{}.tmp",
            uuid::Uuid::new_v4().simple()
        ));
        let spec = build(
            self.command(&self.ffmpeg, self.timeout)
                .arg("-hide_banner")
                .arg("-nostdin")
                .arg("-loglevel")
                .arg("error")
                .arg("-y"),
        )
        .arg("-f")
        .arg(format)
        .arg(&temporary);
        let outcome = process::run(&spec, cancel).await;
        if let Err(error) = outcome {
            let _ = tokio::fs::remove_file(&temporary).await;
            return Err(self.describe(error));
        }
        // Complete and durable before any checkpoint can name it.
        let (from, to) = (temporary.clone(), target.to_path_buf());
        let renamed = tokio::task::spawn_blocking(move || {
            stagecraft_core::artifacts::rename_durably(&from, &to)
        })
        .await
        .map_err(|e| io_error(target, std::io::Error::other(e)))?;
        if let Err(error) = renamed {
            let _ = tokio::fs::remove_file(&temporary).await;
            return Err(io_error(target, error));
        }
        Ok(())
    }

    fn describe(&self, error: ProcessError) -> StageError {
        match error {
            ProcessError::Spawn { program, source }
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                StageError::fatal(
                    "ffmpeg_missing",
                    format!(
                        "{program} was not found: install ffmpeg (Debian: apt-get install ffmpeg) or set FFMPEG_PATH and FFPROBE_PATH"
                    ),
                )
            }
            ProcessError::Cancelled { .. } => StageError::Cancelled,
            ProcessError::Failed {
                program, stderr, ..
            } => {
                let tail: String = stderr.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
                StageError::retryable(format!("{program} failed: {tail}"))
            }
            other => StageError::retryable(other.to_string()),
        }
    }
}

fn io_error(path: &Path, error: std::io::Error) -> StageError {
    StageError::retryable(format!("{}: {error}", path.display()))
}

/// A text file for an ffmpeg filter option, deleted when dropped.
struct TempText {
    path: PathBuf,
}

impl TempText {
    fn new(text: &str) -> Result<Self, StageError> {
        let path = std::env::temp_dir().join(format!(
            "stagecraft-text-{}.txt",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&path, text).map_err(|e| io_error(&path, e))?;
        Ok(Self { path })
    }
}

impl Drop for TempText {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A value inside an ffmpeg filter graph: `\`, `'` and `:` lose their meaning.
fn escape_filter_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '\\' | '\'' | ':' | ',' | ';' | '[' | ']' | '=') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Wraps text into lines of at most `width` characters, on word boundaries.
pub fn wrap(text: &str, width: usize) -> String {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapping_keeps_words_whole_and_lines_short() {
        let text = "A day in the life of a developer who ships on Fridays";
        let wrapped = wrap(text, 16);
        assert!(wrapped.lines().all(|l| l.chars().count() <= 16));
        assert_eq!(
            wrapped.split_whitespace().collect::<Vec<_>>().join(" "),
            text
        );
    }

    #[test]
    fn filter_values_cannot_break_out_of_their_option() {
        assert_eq!(escape_filter_value("/tmp/a:b'c"), "/tmp/a\\:b\\'c");
        assert_eq!(escape_filter_value("x=1,y"), "x\\=1\\,y");
    }
}
