//! The artifact store: files stages produce, named by relative paths (`runs/{id}/…`), kept in
//! a local directory (`local.rs`, the default) or in S3-compatible object storage (`object.rs`,
//! `ARTIFACT_STORE_URL=s3://bucket/prefix`), so that any stage can run on any host and the API
//! on a third can serve what they wrote.
//!
//! Invariant: a path handed to the store is relative, has no `..`, `.` or empty segment, no
//! root component, backslash or NUL; anything else is refused before the store is touched.
//! Invariant: a file appears under its final name only once it is complete (locally a flushed
//! temporary file renamed durably; in object storage an upload that completed), so a
//! checkpoint that names an artifact always names a complete file: every write here returns
//! only after that, and the engine commits a checkpoint only after its stage returned.
//! Invariant: tools that need files on disk (ffmpeg) use a [`Workspace`]: locally it is the
//! store's own directory; with object storage it is a scratch directory under `ARTIFACT_DIR`,
//! deleted when the workspace is dropped, into which inputs are downloaded and from which
//! outputs are uploaded ([`Workspace::publish`]) before the stage returns.

mod local;
mod object;

use std::{
    path::{Component, Path, PathBuf},
    sync::Arc,
};

pub use local::{create_dir_durably, rename_durably, write_atomically};
pub use object::{ObjectSettings, Objects};
/// The object storage client, for the API's streaming of artifacts.
pub use object_store;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact path {0:?} is not a safe relative path")]
    UnsafePath(String),
    #[error("artifact {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("artifact {path}: the object store answered: {message}")]
    Object { path: String, message: String },
    #[error("artifact {path} is larger than {limit} bytes")]
    TooLarge { path: String, limit: u64 },
}

impl ArtifactError {
    pub(crate) fn io(path: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// The largest file [`ArtifactStore::read_to_string`] reads into memory.
pub const MAX_TEXT_BYTES: u64 = 64 * 1024 * 1024;

/// An object's store and key.
pub type ObjectAt = (Arc<dyn object_store::ObjectStore>, object_store::path::Path);

/// One entry of a listed directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    /// `None` for a directory.
    pub size: Option<u64>,
}

/// Where the artifacts live. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Local(local::Local),
    Object(Arc<Objects>),
}

/// Checks a relative path (see the module's invariants).
pub fn check_path(relative: &str) -> Result<(), ArtifactError> {
    let safe = !relative.is_empty()
        && !relative.contains(['\0', '\\'])
        && relative
            .split('/')
            .all(|segment| !matches!(segment, "" | "." | ".."))
        && Path::new(relative)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if safe {
        Ok(())
    } else {
        Err(ArtifactError::UnsafePath(relative.to_owned()))
    }
}

/// A directory path as the listing operations take it: empty for the root, or safe segments.
fn check_dir(dir: &str) -> Result<(), ArtifactError> {
    if dir.is_empty() {
        Ok(())
    } else {
        check_path(dir)
    }
}

impl ArtifactStore {
    /// The store in the local directory `root`, created if missing. A relative root is made
    /// absolute first: paths handed to tools that run elsewhere (an ffmpeg concat list in a
    /// temporary directory) must not depend on the process's working directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ArtifactError> {
        Ok(Self {
            backend: Backend::Local(local::Local::open(root.into())?),
        })
    }

    /// The store in object storage, with `scratch` as the local directory of workspaces.
    pub fn open_objects(
        settings: &ObjectSettings,
        scratch: impl Into<PathBuf>,
    ) -> Result<Self, ArtifactError> {
        Ok(Self {
            backend: Backend::Object(Arc::new(Objects::open(settings, scratch.into())?)),
        })
    }

    /// Where the artifacts are, for logs and `/health` (no credentials).
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Local(local) => local.root().display().to_string(),
            Backend::Object(objects) => objects.url().to_owned(),
        }
    }

    /// The local directory holding the artifacts, when they are local.
    pub fn local_root(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Local(local) => Some(local.root()),
            Backend::Object(_) => None,
        }
    }

    /// The object store and the key of `relative`, when the artifacts are in object storage.
    pub fn object(&self, relative: &str) -> Result<Option<ObjectAt>, ArtifactError> {
        check_path(relative)?;
        match &self.backend {
            Backend::Local(_) => Ok(None),
            Backend::Object(objects) => Ok(Some((objects.client(), objects.key(relative)?))),
        }
    }

    /// The absolute path of a safe relative path in a local store (`None` in object storage).
    pub fn local_path(&self, relative: &str) -> Result<Option<PathBuf>, ArtifactError> {
        check_path(relative)?;
        Ok(self.local_root().map(|root| root.join(relative)))
    }

    /// Writes a complete file and answers its relative path.
    pub async fn write(&self, relative: &str, bytes: Vec<u8>) -> Result<String, ArtifactError> {
        check_path(relative)?;
        match &self.backend {
            Backend::Local(local) => local.write(relative, bytes).await?,
            Backend::Object(objects) => objects.write(relative, bytes).await?,
        }
        Ok(relative.to_owned())
    }

    /// Writes a document that has versions (as [`write`](Self::write) does) unless the store
    /// already holds the same or a later version: writers take turns (locally under a file
    /// lock shared by the host's processes; in object storage under a lock of this process,
    /// with a conditional write where the server supports one), and an older version never
    /// replaces a newer one. Answers whether it wrote.
    pub async fn write_newer(
        &self,
        relative: &str,
        bytes: Vec<u8>,
        version: i64,
        version_of: impl Fn(&[u8]) -> Option<i64> + Send + 'static,
    ) -> Result<bool, ArtifactError> {
        check_path(relative)?;
        match &self.backend {
            Backend::Local(local) => {
                local
                    .write_newer(relative, bytes, version, version_of)
                    .await
            }
            Backend::Object(objects) => {
                objects
                    .write_newer(relative, bytes, version, version_of)
                    .await
            }
        }
    }

    /// Whether `relative` is a complete file (locally: a regular file reached without
    /// following any symlink, so links can never lead out of the root).
    pub async fn is_file(&self, relative: &str) -> Result<bool, ArtifactError> {
        check_path(relative)?;
        match &self.backend {
            Backend::Local(local) => local.is_file(relative).await,
            Backend::Object(objects) => objects.is_file(relative).await,
        }
    }

    /// Makes `to` a copy of the file `from`, replacing whatever `to` was, atomically and
    /// without moving the bytes through this process: a hard link locally, a server-side
    /// copy in object storage.
    pub async fn copy(&self, from: &str, to: &str) -> Result<(), ArtifactError> {
        check_path(from)?;
        check_path(to)?;
        match &self.backend {
            Backend::Local(local) => local.link(from, to).await,
            Backend::Object(objects) => objects.copy(from, to).await,
        }
    }

    /// Lists a run's file in a category at the root (`videos/`, `audio/`, `scripts/`) under the
    /// name `{run_id}_{rest of its path}`, as a [`copy`](Self::copy). Answers the category
    /// entry's relative path.
    pub async fn index(&self, category: &str, relative: &str) -> Result<String, ArtifactError> {
        let rest = relative.strip_prefix("runs/").unwrap_or(relative);
        let (run, rest) = rest.split_once('/').unwrap_or(("", rest));
        let rest = rest
            .strip_prefix(&format!("{category}/"))
            .unwrap_or(rest)
            .replace('/', "_");
        let entry = if run.is_empty() {
            format!("{category}/{rest}")
        } else {
            format!("{category}/{run}_{rest}")
        };
        self.copy(relative, &entry).await?;
        Ok(entry)
    }

    /// Reads a whole text file of at most [`MAX_TEXT_BYTES`]; `None` when it does not exist.
    pub async fn read_to_string(&self, relative: &str) -> Result<Option<String>, ArtifactError> {
        check_path(relative)?;
        let bytes = match &self.backend {
            Backend::Local(local) => local.read(relative).await?,
            Backend::Object(objects) => objects.read(relative).await?,
        };
        bytes
            .map(|bytes| {
                String::from_utf8(bytes).map_err(|e| {
                    ArtifactError::io(
                        relative,
                        std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                    )
                })
            })
            .transpose()
    }

    /// Appends one line to a log file (for ledgers that record what happened). Locally an
    /// append; in object storage, which has no append, the object is read and rewritten with
    /// the line added, writers of this process taking turns (a run's ledger has one writer at
    /// a time: the worker holding its lease).
    pub async fn append_line(&self, relative: &str, line: &str) -> Result<(), ArtifactError> {
        check_path(relative)?;
        match &self.backend {
            Backend::Local(local) => local.append_line(relative, line).await,
            Backend::Object(objects) => objects.append_line(relative, line).await,
        }
    }

    /// The entries of a directory (`""` is the root), sorted by name; hidden names (writes in
    /// progress) and, locally, symlinks are left out. `None` when there is no such directory.
    pub async fn list(&self, dir: &str) -> Result<Option<Vec<Entry>>, ArtifactError> {
        check_dir(dir)?;
        match &self.backend {
            Backend::Local(local) => local.list(dir).await,
            Backend::Object(objects) => objects.list(dir).await,
        }
    }

    /// Every file under a directory, as paths relative to it with their sizes, sorted; `None`
    /// when there is no such directory.
    pub async fn list_files(&self, dir: &str) -> Result<Option<Vec<(String, u64)>>, ArtifactError> {
        check_path(dir)?;
        match &self.backend {
            Backend::Local(local) => local.list_files(dir).await,
            Backend::Object(objects) => objects.list_files(dir).await,
        }
    }

    /// Deletes a directory and everything under it (nothing when it does not exist).
    pub async fn remove_dir(&self, dir: &str) -> Result<(), ArtifactError> {
        check_path(dir)?;
        match &self.backend {
            Backend::Local(local) => local.remove_dir(dir).await,
            Backend::Object(objects) => objects.remove_dir(dir).await,
        }
    }

    /// Deletes the files of a directory whose names `doomed` picks; answers how many.
    pub async fn remove_files(
        &self,
        dir: &str,
        doomed: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Result<usize, ArtifactError> {
        let Some(entries) = self.list(dir).await? else {
            return Ok(0);
        };
        let mut removed = 0;
        for entry in entries {
            if entry.size.is_some() && doomed(&entry.name) {
                let path = format!("{dir}/{}", entry.name);
                let done = match &self.backend {
                    Backend::Local(local) => local.remove_file(&path).await,
                    Backend::Object(objects) => objects.remove_file(&path).await,
                };
                if done.is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// A place on this host's disk for tools that read and write files.
    pub fn workspace(&self) -> Result<Workspace, ArtifactError> {
        let scratch = match &self.backend {
            Backend::Local(_) => None,
            Backend::Object(objects) => Some(objects.scratch()?),
        };
        Ok(Workspace {
            store: self.clone(),
            scratch,
        })
    }

    /// Deletes workspaces left behind by processes that were killed (older than `age`);
    /// answers how many. Nothing to do for a local store, whose tools write in place.
    pub async fn clean_scratch(&self, age: std::time::Duration) -> usize {
        match &self.backend {
            Backend::Local(_) => 0,
            Backend::Object(objects) => objects.clean_scratch(age).await,
        }
    }
}

/// Local files for tools (see the module's invariants): inputs read from the store, outputs
/// written to a local path and then published to the store.
#[derive(Debug)]
pub struct Workspace {
    store: ArtifactStore,
    /// The scratch directory when the store is not local; deleted on drop.
    scratch: Option<tempfile::TempDir>,
}

impl Workspace {
    /// A local path holding the artifact `relative`, which must be a complete file of the
    /// store; `None` when there is none.
    pub async fn input(&self, relative: &str) -> Result<Option<PathBuf>, ArtifactError> {
        if !self.store.is_file(relative).await? {
            return Ok(None);
        }
        match (&self.store.backend, &self.scratch) {
            (Backend::Object(objects), Some(scratch)) => {
                let local = scratch.path().join("in").join(relative);
                if !local.is_file() {
                    objects.download(relative, &local).await?;
                }
                Ok(Some(local))
            }
            _ => self.store.local_path(relative),
        }
    }

    /// The local path a tool writes the artifact `relative` to (its directory exists). Tools
    /// write it completely (a temporary file renamed) before [`publish`](Self::publish).
    pub fn output(&self, relative: &str) -> Result<PathBuf, ArtifactError> {
        check_path(relative)?;
        let path = match &self.scratch {
            Some(scratch) => scratch.path().join("out").join(relative),
            None => self
                .store
                .local_path(relative)?
                .ok_or_else(|| ArtifactError::UnsafePath(relative.to_owned()))?,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| ArtifactError::io(relative, e))?;
        }
        Ok(path)
    }

    /// Makes the file written at [`output`](Self::output) the artifact `relative`: uploaded
    /// completely before this returns (locally it already is in place).
    pub async fn publish(&self, relative: &str) -> Result<(), ArtifactError> {
        match (&self.store.backend, &self.scratch) {
            (Backend::Object(objects), Some(scratch)) => {
                let local = scratch.path().join("out").join(relative);
                objects.upload(&local, relative).await
            }
            _ => Ok(()),
        }
    }
}

/// Deletes the `runs/{id}/` directories of runs that no longer exist (deleted after
/// `RUN_RETENTION_DAYS`). Runs are inserted before any of their files is written, so a
/// directory without a run is always one whose run is gone. Answers the ids whose directory
/// was deleted, for the tenants' own files.
pub async fn clean_gone_runs(
    store: &crate::store::SharedStore,
    artifacts: &ArtifactStore,
) -> Vec<String> {
    let listed = artifacts
        .list("runs")
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    let mut gone = Vec::new();
    for entry in listed {
        if entry.size.is_some() {
            continue;
        }
        let Some(id) = crate::ids::RunId::parse(&entry.name) else {
            continue;
        };
        if matches!(store.get_run(id).await, Ok(None))
            && artifacts
                .remove_dir(&format!("runs/{}", entry.name))
                .await
                .is_ok()
        {
            gone.push(entry.name);
        }
    }
    gone
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_paths_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "../secret",
            "runs/../../x",
            "runs/./x",
            "runs//x",
            "a\0b",
            "a\\b",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?} must be refused");
        }
        check_path("runs/x/a.json").expect("safe");
    }
}
