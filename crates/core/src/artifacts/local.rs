//! The local backend: files under one root directory.
//!
//! A file is written to a temporary name in its directory, flushed, then renamed, and the
//! rename is made durable too: the directory is fsynced after it (and every directory created
//! on the way), so after a power loss a committed checkpoint never names a file the disk
//! forgot. Nothing here follows a symlink out of the root.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use super::{ArtifactError, Entry, MAX_TEXT_BYTES};

#[derive(Debug, Clone)]
pub(super) struct Local {
    root: PathBuf,
}

/// Runs blocking file work on the blocking pool.
async fn blocking<T: Send + 'static>(
    path: &str,
    work: impl FnOnce() -> Result<T, ArtifactError> + Send + 'static,
) -> Result<T, ArtifactError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ArtifactError::io(path, std::io::Error::other(e)))?
}

impl Local {
    pub(super) fn open(root: PathBuf) -> Result<Self, ArtifactError> {
        let io = |source| ArtifactError::io(root.display().to_string(), source);
        std::fs::create_dir_all(&root).map_err(io)?;
        let root = std::path::absolute(&root).map_err(io)?;
        Ok(Self { root })
    }

    pub(super) fn root(&self) -> &Path {
        &self.root
    }

    /// The absolute path of a relative path the caller checked.
    fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    pub(super) async fn write(&self, relative: &str, bytes: Vec<u8>) -> Result<(), ArtifactError> {
        let (target, path) = (self.path(relative), relative.to_owned());
        blocking(relative, move || {
            write_atomically(&target, &bytes).map_err(|e| ArtifactError::io(path, e))
        })
        .await
    }

    pub(super) async fn write_newer(
        &self,
        relative: &str,
        bytes: Vec<u8>,
        version: i64,
        version_of: impl Fn(&[u8]) -> Option<i64> + Send + 'static,
    ) -> Result<bool, ArtifactError> {
        let (target, path) = (self.path(relative), relative.to_owned());
        blocking(relative, move || {
            let io = |e| ArtifactError::io(path.clone(), e);
            let dir = target.parent().unwrap_or(Path::new("."));
            create_dir_durably(dir).map_err(io)?;
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
                .map_err(io)?;
            let _turn = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, errno)| io(std::io::Error::from(errno)))?;
            let current = std::fs::read(&target).ok().and_then(|b| version_of(&b));
            if current.is_some_and(|current| current >= version) {
                return Ok(false);
            }
            write_atomically(&target, &bytes).map_err(io)?;
            Ok(true)
        })
        .await
    }

    /// A regular file reached without following any symlink (a symlink anywhere on the way
    /// answers false).
    pub(super) async fn is_file(&self, relative: &str) -> Result<bool, ArtifactError> {
        let (root, relative) = (self.root.clone(), relative.to_owned());
        blocking(&relative.clone(), move || {
            let mut path = root;
            let components: Vec<_> = Path::new(&relative).components().collect();
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
            Ok(false)
        })
        .await
    }

    /// Makes `to` another name of the file `from` (a hard link: no bytes copied), replacing
    /// whatever `to` was, atomically.
    pub(super) async fn link(&self, from: &str, to: &str) -> Result<(), ArtifactError> {
        let (source, target, path) = (self.path(from), self.path(to), to.to_owned());
        let root = self.root.clone();
        blocking(to, move || {
            let io = |e| ArtifactError::io(path.clone(), e);
            let dir = target.parent().unwrap_or(&root);
            create_dir_durably(dir).map_err(io)?;
            // Linked under a temporary name, then renamed over any older entry: atomic.
            let temporary = dir.join(format!(".link-{}", uuid::Uuid::new_v4().simple()));
            std::fs::hard_link(&source, &temporary).map_err(io)?;
            std::fs::rename(&temporary, &target).map_err(|error| {
                let _ = std::fs::remove_file(&temporary);
                io(error)
            })?;
            sync_dir(dir).map_err(io)
        })
        .await
    }

    pub(super) async fn read(&self, relative: &str) -> Result<Option<Vec<u8>>, ArtifactError> {
        use tokio::io::AsyncReadExt;
        let file = match tokio::fs::File::open(self.path(relative)).await {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ArtifactError::io(relative, source)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_TEXT_BYTES + 1)
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| ArtifactError::io(relative, e))?;
        if bytes.len() as u64 > MAX_TEXT_BYTES {
            return Err(ArtifactError::TooLarge {
                path: relative.to_owned(),
                limit: MAX_TEXT_BYTES,
            });
        }
        Ok(Some(bytes))
    }

    pub(super) async fn append_line(
        &self,
        relative: &str,
        line: &str,
    ) -> Result<(), ArtifactError> {
        let target = self.path(relative);
        let line = format!("{line}\n");
        let io_error = |source| ArtifactError::io(relative, source);
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

    pub(super) async fn list(&self, dir: &str) -> Result<Option<Vec<Entry>>, ArtifactError> {
        let (path, name) = (self.path(dir), dir.to_owned());
        blocking(dir, move || {
            match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => {}
                _ => return Ok(None),
            }
            entries(&path)
                .map(Some)
                .map_err(|e| ArtifactError::io(name, e))
        })
        .await
    }

    pub(super) async fn list_files(
        &self,
        dir: &str,
    ) -> Result<Option<Vec<(String, u64)>>, ArtifactError> {
        let (base, name) = (self.path(dir), dir.to_owned());
        blocking(dir, move || {
            match std::fs::symlink_metadata(&base) {
                Ok(meta) if meta.is_dir() => {}
                _ => return Ok(None),
            }
            let mut files = Vec::new();
            let mut pending = vec![String::new()];
            while let Some(prefix) = pending.pop() {
                let listed =
                    entries(&base.join(&prefix)).map_err(|e| ArtifactError::io(&*name, e))?;
                for entry in listed {
                    let path = if prefix.is_empty() {
                        entry.name
                    } else {
                        format!("{prefix}/{}", entry.name)
                    };
                    match entry.size {
                        Some(size) => files.push((path, size)),
                        None => pending.push(path),
                    }
                }
            }
            files.sort();
            Ok(Some(files))
        })
        .await
    }

    pub(super) async fn remove_dir(&self, dir: &str) -> Result<(), ArtifactError> {
        let (path, name) = (self.path(dir), dir.to_owned());
        blocking(dir, move || match std::fs::remove_dir_all(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ArtifactError::io(name, e)),
        })
        .await
    }

    pub(super) async fn remove_file(&self, relative: &str) -> Result<(), ArtifactError> {
        tokio::fs::remove_file(self.path(relative))
            .await
            .map_err(|e| ArtifactError::io(relative, e))
    }
}

/// Entries of a directory, without following symlinks; hidden entries (the temporary files of
/// writes in progress, locks) are left out. Sorted by name.
fn entries(dir: &Path) -> std::io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let meta = std::fs::symlink_metadata(entry.path())?;
        if meta.is_dir() {
            out.push(Entry { name, size: None });
        } else if meta.is_file() {
            out.push(Entry {
                name,
                size: Some(meta.len()),
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
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
    use super::super::ArtifactStore;

    #[test]
    fn a_relative_root_is_made_absolute() {
        // Tools given these paths (ffmpeg's concat lists) run from other directories.
        let name = format!("target/artifact-root-test-{}", std::process::id());
        let store = ArtifactStore::open(&name).expect("open");
        let root = store.local_root().expect("local");
        assert!(root.is_absolute(), "{}", root.display());
        assert!(root.ends_with(&name));
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
