//! The artifact store: files stages produce, under one root directory.
//!
//! Invariant: a path handed to the store is relative, has no `..` or root component, and stays
//! under the root; anything else is refused before touching the disk.
//! Invariant: a file appears under its final name only once it is complete (written to a
//! temporary name in the same directory, flushed, then renamed), so a checkpoint that names an
//! artifact always names a complete file. The rename is made durable too: the directory is
//! fsynced after it (and every directory created on the way), so after a power loss a
//! committed checkpoint never names a file the disk forgot.

use std::{
    io::Write,
    path::{Component, Path, PathBuf},
};

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
}

#[derive(Debug, Clone)]
pub struct ArtifactStore {
    root: PathBuf,
}

impl ArtifactStore {
    /// Creates the root directory if needed.
    /// The store rooted at `root`, created if missing. A relative root is made absolute
    /// first: paths handed to tools that run elsewhere (an ffmpeg concat list in a temporary
    /// directory) must not depend on the process's working directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ArtifactError> {
        let root = root.into();
        let io = |source| ArtifactError::Io {
            path: root.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&root).map_err(io)?;
        let root = std::path::absolute(&root).map_err(io)?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The absolute path of a safe relative path.
    pub fn resolve(&self, relative: &str) -> Result<PathBuf, ArtifactError> {
        let path = Path::new(relative);
        let safe = !relative.is_empty()
            && !relative.contains(['\0', '\\'])
            && relative
                .split('/')
                .all(|segment| !matches!(segment, "" | "." | ".."))
            && path.components().all(|c| matches!(c, Component::Normal(_)));
        if !safe {
            return Err(ArtifactError::UnsafePath(relative.to_owned()));
        }
        Ok(self.root.join(path))
    }

    /// Writes a complete file atomically and answers its relative path.
    pub async fn write(&self, relative: &str, bytes: Vec<u8>) -> Result<String, ArtifactError> {
        let target = self.resolve(relative)?;
        let relative = relative.to_owned();
        tokio::task::spawn_blocking(move || {
            write_atomically(&target, &bytes)
                .map(|()| relative.clone())
                .map_err(|source| ArtifactError::Io {
                    path: relative,
                    source,
                })
        })
        .await
        .map_err(|e| ArtifactError::Io {
            path: String::new(),
            source: std::io::Error::other(e),
        })?
    }

    /// Writes a document that has versions (as [`write`](Self::write) does) unless the file
    /// already holds the same or a later version: writers of the same file, in any process of
    /// the host, take turns under a lock, and an older version never replaces a newer one.
    /// Answers whether it wrote.
    pub async fn write_newer(
        &self,
        relative: &str,
        bytes: Vec<u8>,
        version: i64,
        version_of: impl Fn(&[u8]) -> Option<i64> + Send + 'static,
    ) -> Result<bool, ArtifactError> {
        let target = self.resolve(relative)?;
        let path = relative.to_owned();
        let io = |path: &str, source: std::io::Error| ArtifactError::Io {
            path: path.to_owned(),
            source,
        };
        tokio::task::spawn_blocking(move || {
            let dir = target.parent().unwrap_or(Path::new("."));
            create_dir_durably(dir).map_err(|e| io(&path, e))?;
            let lock_name = format!(
                ".{}.lock",
                target
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("file")
            );
            let lock_file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(lock_name))
                .map_err(|e| io(&path, e))?;
            let _turn = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, errno)| io(&path, std::io::Error::from(errno)))?;
            let current = std::fs::read(&target).ok().and_then(|b| version_of(&b));
            if current.is_some_and(|current| current >= version) {
                return Ok(false);
            }
            write_atomically(&target, &bytes).map_err(|e| io(&path, e))?;
            Ok(true)
        })
        .await
        .map_err(|e| ArtifactError::Io {
            path: relative.to_owned(),
            source: std::io::Error::other(e),
        })?
    }

    /// Whether `relative` is a regular file reached without following any symlink (a symlink
    /// anywhere on the way answers false, so links can never lead out of the root).
    pub fn regular_file(&self, relative: &str) -> Result<bool, ArtifactError> {
        let target = self.resolve(relative)?;
        let mut path = self.root.clone();
        let components: Vec<_> = Path::new(relative).components().collect();
        for (i, component) in components.iter().enumerate() {
            path.push(component);
            match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.file_type().is_symlink() => return Ok(false),
                Ok(meta) if i + 1 == components.len() => return Ok(meta.is_file()),
                Ok(meta) if !meta.is_dir() => return Ok(false),
                Ok(_) => {}
                Err(_) => return Ok(false),
            }
        }
        Ok(target.is_file())
    }

    /// Lists a run's file in a category at the root (`videos/`, `audio/`, `scripts/`) under the
    /// name `{run_id}_{rest of its path}`, as a hard link: no bytes are copied, and the entry
    /// stays valid as long as either name exists. Answers the category entry's relative path.
    pub fn index(&self, category: &str, relative: &str) -> Result<String, ArtifactError> {
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
        self.link(relative, &entry)?;
        Ok(entry)
    }

    /// Makes `to` another name of the file `from` (a hard link: no bytes copied), replacing
    /// whatever `to` was, atomically.
    pub fn link(&self, from: &str, to: &str) -> Result<(), ArtifactError> {
        let source = self.resolve(from)?;
        let target = self.resolve(to)?;
        let io_error = |source| ArtifactError::Io {
            path: to.to_owned(),
            source,
        };
        let dir = target.parent().unwrap_or(&self.root);
        create_dir_durably(dir).map_err(io_error)?;
        // Linked under a temporary name, then renamed over any older entry: atomic.
        let temporary = dir.join(format!(".link-{}", uuid::Uuid::new_v4().simple()));
        std::fs::hard_link(&source, &temporary).map_err(io_error)?;
        std::fs::rename(&temporary, &target).map_err(|error| {
            let _ = std::fs::remove_file(&temporary);
            io_error(error)
        })?;
        sync_dir(dir).map_err(io_error)
    }

    /// Reads a whole text file; `None` when it does not exist.
    pub async fn read_to_string(&self, relative: &str) -> Result<Option<String>, ArtifactError> {
        let target = self.resolve(relative)?;
        match tokio::fs::read_to_string(&target).await {
            Ok(text) => Ok(Some(text)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ArtifactError::Io {
                path: relative.to_owned(),
                source,
            }),
        }
    }

    /// Appends one line to a log file (not atomic: for ledgers that record what happened).
    pub async fn append_line(&self, relative: &str, line: &str) -> Result<(), ArtifactError> {
        let target = self.resolve(relative)?;
        let line = format!("{line}\n");
        let io_error = |source| ArtifactError::Io {
            path: relative.to_owned(),
            source,
        };
        if let Some(dir) = target.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(io_error)?;
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&target)
            .await
            .map_err(io_error)?;
        tokio::io::AsyncWriteExt::write_all(&mut file, line.as_bytes())
            .await
            .map_err(io_error)?;
        Ok(())
    }
}

/// Creates `dir` and its missing parents durably: each directory created is fsynced into its
/// parent.
pub fn create_dir_durably(dir: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut cursor = Some(dir);
    while let Some(path) = cursor.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        missing.push(path.to_path_buf());
        cursor = path.parent();
    }
    std::fs::create_dir_all(dir)?;
    for created in missing.iter().rev() {
        if let Some(parent) = created.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Deletes the `runs/{id}/` directories of runs that no longer exist (deleted after
/// `RUN_RETENTION_DAYS`), on the blocking pool. Runs are inserted before any of their files is
/// written, so a directory without a run is always one whose run is gone. Answers the ids whose
/// directory was deleted, for the tenants' own files.
pub async fn clean_gone_runs(
    store: &crate::store::SharedStore,
    artifacts: &ArtifactStore,
) -> Vec<String> {
    let runs = artifacts.root().join("runs");
    let listed = {
        let runs = runs.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::read_dir(runs)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .await
        .unwrap_or_default()
    };
    let mut gone = Vec::new();
    for name in listed {
        let Some(id) = crate::ids::RunId::parse(&name) else {
            continue;
        };
        if matches!(store.get_run(id).await, Ok(None)) {
            gone.push(name);
        }
    }
    if gone.is_empty() {
        return gone;
    }
    tokio::task::spawn_blocking(move || {
        gone.into_iter()
            .filter(|name| std::fs::remove_dir_all(runs.join(name)).is_ok())
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// Makes the entries of a directory (renames, links, new files) durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Moves a complete file (written by another program) to its final name durably: its bytes,
/// then the rename.
pub fn rename_durably(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::File::open(from)?.sync_all()?;
    std::fs::rename(from, to)?;
    sync_dir(to.parent().unwrap_or(Path::new(".")))
}

/// Writes `bytes` to `target` through a flushed temporary file in the same directory, then a
/// rename (creating the directory): readers see the old file or the whole new one, and once it
/// returns both the bytes and the name are on disk.
pub fn write_atomically(target: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = target.parent().unwrap_or(Path::new("."));
    create_dir_durably(dir)?;
    let file_name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("artifact");
    let temp = dir.join(format!(
        ".{file_name}.tmp-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, target)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_paths_are_refused() {
        let store = ArtifactStore {
            root: PathBuf::from("/srv/artifacts"),
        };
        for bad in [
            "",
            "/etc/passwd",
            "../secret",
            "runs/../../x",
            "runs/./x",
            "a\0b",
        ] {
            assert!(store.resolve(bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(
            store.resolve("runs/x/a.json").expect("safe"),
            PathBuf::from("/srv/artifacts/runs/x/a.json")
        );
    }

    #[test]
    fn a_relative_root_is_made_absolute() {
        // Tools given these paths (ffmpeg's concat lists) run from other directories.
        let name = format!("target/artifact-root-test-{}", std::process::id());
        let store = ArtifactStore::open(&name).expect("open");
        assert!(store.root().is_absolute(), "{}", store.root().display());
        assert!(store.root().ends_with(&name));
        let _ = std::fs::remove_dir_all(&name);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_versioned_document_never_goes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ArtifactStore::open(dir.path()).expect("open");
        let version_of = |bytes: &[u8]| std::str::from_utf8(bytes).ok()?.trim().parse().ok();
        // Writers race with versions in every order: the newest one stays.
        let writes = (1..=40).rev().chain(1..=40).map(|version: i64| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .write_newer(
                        "runs/r/metadata.json",
                        version.to_string().into_bytes(),
                        version,
                        version_of,
                    )
                    .await
                    .expect("write")
            })
        });
        let wrote: Vec<bool> = futures::future::join_all(writes)
            .await
            .into_iter()
            .map(|joined| joined.expect("joined"))
            .collect();
        assert!(wrote.iter().filter(|w| **w).count() >= 1);
        let kept = std::fs::read_to_string(dir.path().join("runs/r/metadata.json")).expect("read");
        assert_eq!(kept, "40");
        assert!(
            !store
                .write_newer("runs/r/metadata.json", b"39".to_vec(), 39, version_of)
                .await
                .expect("write")
        );
    }

    #[tokio::test]
    async fn writes_are_complete_files_with_no_temporaries_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ArtifactStore::open(dir.path()).expect("open");
        let path = store
            .write("runs/r1/out.json", b"{}".to_vec())
            .await
            .expect("write");
        assert_eq!(path, "runs/r1/out.json");
        let entries: Vec<_> = std::fs::read_dir(dir.path().join("runs/r1"))
            .expect("dir")
            .collect();
        assert_eq!(entries.len(), 1);
        assert_eq!(std::fs::read(dir.path().join(&path)).expect("read"), b"{}");
    }
}
