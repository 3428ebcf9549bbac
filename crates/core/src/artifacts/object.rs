//! The object-storage backend: artifacts as objects of an S3-compatible bucket under a prefix
//! (`s3://bucket/prefix`), through the `object_store` crate.
//!
//! An object exists only once its upload completed (a single `PUT`, or a multipart upload
//! completed), so a complete file is all a reader can see. A copy (a reused checkpoint's files,
//! a category entry) is a server-side `CopyObject`: no bytes pass through this process.
//! Directories are prefixes: one exists while it holds an object.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStore, PutPayload, aws::AmazonS3Builder, path::Path as Key};
use secrecy::{ExposeSecret, SecretString};

use super::{ArtifactError, Entry, MAX_TEXT_BYTES};

/// How to reach the bucket: `ARTIFACT_STORE_URL` and the standard `AWS_*` variables.
#[derive(Debug, Clone, Default)]
pub struct ObjectSettings {
    pub bucket: String,
    /// Key prefix of every artifact (no leading or trailing `/`; may be empty).
    pub prefix: String,
    /// `AWS_ENDPOINT_URL`: the S3-compatible server (AWS itself when unset).
    pub endpoint: Option<String>,
    /// `AWS_REGION` (`us-east-1` when unset).
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<SecretString>,
    pub session_token: Option<SecretString>,
    /// `AWS_ALLOW_HTTP`: permit a plain-HTTP endpoint (a server on a private network).
    pub allow_http: bool,
}

impl ObjectSettings {
    /// The bucket and prefix of `s3://bucket[/prefix]`; `None` for any other form.
    pub fn parse_url(url: &str) -> Option<(String, String)> {
        let rest = url.strip_prefix("s3://")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'));
        let prefix_ok = prefix.is_empty() || super::check_path(prefix).is_ok();
        (bucket_ok && prefix_ok).then(|| (bucket.to_owned(), prefix.to_owned()))
    }
}

/// The bucket, the prefix, and this host's scratch directory for workspaces.
pub struct Objects {
    client: Arc<dyn ObjectStore>,
    /// `""` or `"prefix/"`.
    prefix: String,
    url: String,
    scratch: PathBuf,
    /// Read-modify-write operations of this process take turns.
    turns: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Objects").field("url", &self.url).finish()
    }
}

fn failed(path: &str, error: object_store::Error) -> ArtifactError {
    ArtifactError::Object {
        path: path.to_owned(),
        message: error.to_string(),
    }
}

impl Objects {
    pub(super) fn open(settings: &ObjectSettings, scratch: PathBuf) -> Result<Self, ArtifactError> {
        let url = if settings.prefix.is_empty() {
            format!("s3://{}", settings.bucket)
        } else {
            format!("s3://{}/{}", settings.bucket, settings.prefix)
        };
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&settings.bucket)
            .with_region(settings.region.as_deref().unwrap_or("us-east-1"))
            .with_allow_http(settings.allow_http);
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(id) = &settings.access_key_id {
            builder = builder.with_access_key_id(id);
        }
        if let Some(secret) = &settings.secret_access_key {
            builder = builder.with_secret_access_key(secret.expose_secret());
        }
        if let Some(token) = &settings.session_token {
            builder = builder.with_token(token.expose_secret());
        }
        let client = builder.build().map_err(|e| failed(&url, e))?;
        let scratch = std::path::absolute(scratch.join("scratch"))
            .map_err(|e| ArtifactError::io(url.clone(), e))?;
        std::fs::create_dir_all(&scratch).map_err(|e| ArtifactError::io(url.clone(), e))?;
        Ok(Self {
            client: Arc::new(client),
            prefix: if settings.prefix.is_empty() {
                String::new()
            } else {
                format!("{}/", settings.prefix)
            },
            url,
            scratch,
            turns: tokio::sync::Mutex::new(()),
        })
    }

    pub(super) fn url(&self) -> &str {
        &self.url
    }

    pub(super) fn client(&self) -> Arc<dyn ObjectStore> {
        self.client.clone()
    }

    /// The key of a relative path the caller checked.
    pub(super) fn key(&self, relative: &str) -> Result<Key, ArtifactError> {
        Key::parse(format!("{}{relative}", self.prefix))
            .map_err(|_| ArtifactError::UnsafePath(relative.to_owned()))
    }

    /// The key of a directory (`""`: the prefix itself, `None` when that is the bucket).
    fn dir_key(&self, dir: &str) -> Result<Option<Key>, ArtifactError> {
        let joined = format!("{}{dir}", self.prefix);
        let joined = joined.trim_end_matches('/');
        if joined.is_empty() {
            return Ok(None);
        }
        Key::parse(joined)
            .map(Some)
            .map_err(|_| ArtifactError::UnsafePath(dir.to_owned()))
    }

    pub(super) async fn write(&self, relative: &str, bytes: Vec<u8>) -> Result<(), ArtifactError> {
        self.client
            .put(&self.key(relative)?, PutPayload::from(bytes))
            .await
            .map_err(|e| failed(relative, e))?;
        Ok(())
    }

    pub(super) async fn write_newer(
        &self,
        relative: &str,
        bytes: Vec<u8>,
        version: i64,
        version_of: impl Fn(&[u8]) -> Option<i64>,
    ) -> Result<bool, ArtifactError> {
        let _turn = self.turns.lock().await;
        let current = self.read(relative).await?.and_then(|b| version_of(&b));
        if current.is_some_and(|current| current >= version) {
            return Ok(false);
        }
        self.write(relative, bytes).await?;
        Ok(true)
    }

    pub(super) async fn is_file(&self, relative: &str) -> Result<bool, ArtifactError> {
        match self.client.head(&self.key(relative)?).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(error) => Err(failed(relative, error)),
        }
    }

    pub(super) async fn copy(&self, from: &str, to: &str) -> Result<(), ArtifactError> {
        self.client
            .copy(&self.key(from)?, &self.key(to)?)
            .await
            .map_err(|e| failed(to, e))
    }

    pub(super) async fn read(&self, relative: &str) -> Result<Option<Vec<u8>>, ArtifactError> {
        let found = match self.client.get(&self.key(relative)?).await {
            Ok(found) => found,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(error) => return Err(failed(relative, error)),
        };
        if found.meta.size > MAX_TEXT_BYTES {
            return Err(ArtifactError::TooLarge {
                path: relative.to_owned(),
                limit: MAX_TEXT_BYTES,
            });
        }
        let bytes = found.bytes().await.map_err(|e| failed(relative, e))?;
        Ok(Some(bytes.to_vec()))
    }

    pub(super) async fn append_line(
        &self,
        relative: &str,
        line: &str,
    ) -> Result<(), ArtifactError> {
        let _turn = self.turns.lock().await;
        let mut bytes = self.read(relative).await?.unwrap_or_default();
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        self.write(relative, bytes).await
    }

    pub(super) async fn list(&self, dir: &str) -> Result<Option<Vec<Entry>>, ArtifactError> {
        let key = self.dir_key(dir)?;
        let listed = self
            .client
            .list_with_delimiter(key.as_ref())
            .await
            .map_err(|e| failed(dir, e))?;
        if listed.common_prefixes.is_empty() && listed.objects.is_empty() {
            return Ok(None);
        }
        let directories = listed.common_prefixes.iter().filter_map(|p| {
            p.filename().map(|name| Entry {
                name: name.to_owned(),
                size: None,
            })
        });
        let files = listed.objects.iter().filter_map(|o| {
            o.location.filename().map(|name| Entry {
                name: name.to_owned(),
                size: Some(o.size),
            })
        });
        let mut entries: Vec<Entry> = directories
            .chain(files)
            .filter(|e| !e.name.starts_with('.'))
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Some(entries))
    }

    pub(super) async fn list_files(
        &self,
        dir: &str,
    ) -> Result<Option<Vec<(String, u64)>>, ArtifactError> {
        let key = self.dir_key(dir)?;
        let base = key.as_ref().map(|k| format!("{k}/")).unwrap_or_default();
        let objects: Vec<_> = self
            .client
            .list(key.as_ref())
            .try_collect()
            .await
            .map_err(|e| failed(dir, e))?;
        if objects.is_empty() {
            return Ok(None);
        }
        let mut files: Vec<(String, u64)> = objects
            .into_iter()
            .filter_map(|o| {
                let path = o.location.as_ref().strip_prefix(&base)?.to_owned();
                let hidden = path.split('/').any(|s| s.starts_with('.'));
                (!hidden).then_some((path, o.size))
            })
            .collect();
        files.sort();
        Ok(Some(files))
    }

    pub(super) async fn remove_dir(&self, dir: &str) -> Result<(), ArtifactError> {
        let Some(key) = self.dir_key(dir)? else {
            return Err(ArtifactError::UnsafePath(dir.to_owned()));
        };
        let locations = self
            .client
            .list(Some(&key))
            .map_ok(|meta| meta.location)
            .boxed();
        self.client
            .delete_stream(locations)
            .try_collect::<Vec<_>>()
            .await
            .map_err(|e| failed(dir, e))?;
        Ok(())
    }

    pub(super) async fn remove_file(&self, relative: &str) -> Result<(), ArtifactError> {
        self.client
            .delete(&self.key(relative)?)
            .await
            .map_err(|e| failed(relative, e))
    }

    /// A new workspace directory under this host's scratch root, named after the process.
    pub(super) fn scratch(&self) -> Result<tempfile::TempDir, ArtifactError> {
        tempfile::Builder::new()
            .prefix(&format!("ws-{}-", std::process::id()))
            .tempdir_in(&self.scratch)
            .map_err(|e| ArtifactError::io(self.scratch.display().to_string(), e))
    }

    pub(super) async fn clean_scratch(&self, age: Duration) -> usize {
        let scratch = self.scratch.clone();
        tokio::task::spawn_blocking(move || {
            let Ok(entries) = std::fs::read_dir(&scratch) else {
                return 0;
            };
            entries
                .flatten()
                .filter(|entry| {
                    entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|modified| modified.elapsed().ok())
                        .is_some_and(|elapsed| elapsed > age)
                })
                .filter(|entry| std::fs::remove_dir_all(entry.path()).is_ok())
                .count()
        })
        .await
        .unwrap_or(0)
    }

    /// Streams the object `relative` into the file `local` (through a temporary name).
    pub(super) async fn download(&self, relative: &str, local: &Path) -> Result<(), ArtifactError> {
        use tokio::io::AsyncWriteExt;
        let io = |e| ArtifactError::io(relative, e);
        if let Some(dir) = local.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(io)?;
        }
        let temporary = local.with_extension(format!("part-{}", uuid::Uuid::new_v4().simple()));
        let written = async {
            let found = self
                .client
                .get(&self.key(relative)?)
                .await
                .map_err(|e| failed(relative, e))?;
            let mut stream = found.into_stream();
            let mut file = tokio::fs::File::create(&temporary).await.map_err(io)?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| failed(relative, e))?;
                file.write_all(&chunk).await.map_err(io)?;
            }
            file.flush().await.map_err(io)?;
            tokio::fs::rename(&temporary, local).await.map_err(io)
        }
        .await;
        if written.is_err() {
            let _ = tokio::fs::remove_file(&temporary).await;
        }
        written
    }

    /// Uploads the file `local` as the object `relative` (in parts when large); the object
    /// exists once this returns, and not before.
    pub(super) async fn upload(&self, local: &Path, relative: &str) -> Result<(), ArtifactError> {
        use tokio::io::AsyncWriteExt;
        let mut file = tokio::fs::File::open(local)
            .await
            .map_err(|e| ArtifactError::io(relative, e))?;
        let mut writer = object_store::buffered::BufWriter::new(self.client(), self.key(relative)?);
        let sent = async {
            tokio::io::copy(&mut file, &mut writer).await?;
            writer.shutdown().await
        }
        .await;
        if let Err(error) = sent {
            let _ = writer.abort().await;
            return Err(ArtifactError::io(relative, error));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_name_a_bucket_and_a_safe_prefix() {
        assert_eq!(
            ObjectSettings::parse_url("s3://media-bucket/stagecraft/prod/"),
            Some(("media-bucket".into(), "stagecraft/prod".into()))
        );
        assert_eq!(
            ObjectSettings::parse_url("s3://media-bucket"),
            Some(("media-bucket".into(), String::new()))
        );
        for bad in [
            "media-bucket",
            "s3://",
            "s3://UPPER",
            "s3://b/../x",
            "s3://bucket/a//b",
            "file:///srv",
        ] {
            assert_eq!(ObjectSettings::parse_url(bad), None, "{bad}");
        }
    }
}
