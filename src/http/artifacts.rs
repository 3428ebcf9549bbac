//! The artifact routes (`/artifacts`): categories, listings, and files streamed with their
//! content type and range support.
//!
//! Invariant: a path taken from a request is checked before the disk is touched (single safe
//! segments; a run file's path has only safe segments) and is served only when it is a regular
//! file reached without following a symlink; anything else is a 4xx.

use axum::{
    Json,
    body::Body,
    extract::{Path, Request, State},
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use tower::ServiceExt;
use tower_http::services::ServeFile;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{ApiError, AppState, ErrorBody};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_categories))
        .routes(routes!(list_category))
        .routes(routes!(get_artifact))
        .routes(routes!(run_artifacts))
        // A path of several segments: axum's wildcard, which the OpenAPI document cannot express;
        // `GET /artifacts/runs/{run_id}` lists these URLs.
        .route(
            "/artifacts/runs/{run_id}/{*path}",
            axum::routing::get(run_file),
        )
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Category {
    name: String,
    count: usize,
    url: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CategoryList {
    categories: Vec<Category>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ArtifactEntry {
    name: String,
    /// `file` or `directory`.
    #[serde(rename = "type")]
    kind: &'static str,
    size: Option<u64>,
    url: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EntryList {
    category: String,
    artifacts: Vec<ArtifactEntry>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RunFile {
    /// Relative to the run's directory.
    path: String,
    size: u64,
    url: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RunFiles {
    run_id: String,
    artifacts: Vec<RunFile>,
}

/// A single path segment a request may name: no separators, no dot segments, nothing hidden.
fn segment<'a>(value: &'a str, what: &str) -> Result<&'a str, ApiError> {
    // As the documented pattern reads it; such a name then names no file (404).
    let checked = crate::schema::without_final_line_break(value);
    let safe = !checked.is_empty()
        && checked.chars().count() <= 255
        && !checked.starts_with('.')
        && !checked.contains(['/', '\\', '\0'])
        && !checked.chars().any(char::is_control);
    if safe {
        Ok(value)
    } else {
        Err(ApiError::Invalid {
            code: "invalid_path",
            message: format!("{what} {value:?} is not a valid name"),
            details: Some(serde_json::json!({"field": what})),
        })
    }
}

fn internal(error: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(anyhow::anyhow!("{error}"))
}

fn not_found(what: String) -> ApiError {
    ApiError::not_found(what)
}

/// Entries of a directory under the root, without following symlinks; hidden entries (the
/// temporary files of writes in progress) are left out.
fn entries(dir: &std::path::Path) -> std::io::Result<Vec<(String, std::fs::Metadata)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let meta = std::fs::symlink_metadata(entry.path())?;
        if meta.file_type().is_symlink() {
            continue;
        }
        out.push((name, meta));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn io_failure(error: std::io::Error) -> ApiError {
    internal(format!("reading the artifact directory: {error}"))
}

/// The categories at the artifact root (`runs`, `videos`, `audio`, `scripts`) with their counts.
#[utoipa::path(get, path = "/artifacts", tag = "artifacts", responses((status = 200, body = CategoryList)))]
async fn list_categories(State(state): State<AppState>) -> Result<Json<CategoryList>, ApiError> {
    let root = state.artifacts.root().to_path_buf();
    let categories = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<Category>> {
        let mut out = Vec::new();
        for (name, meta) in entries(&root)? {
            if meta.is_dir() {
                let count = entries(&root.join(&name))?.len();
                out.push(Category {
                    url: format!("/artifacts/{name}"),
                    name,
                    count,
                });
            }
        }
        Ok(out)
    })
    .await
    .map_err(internal)?
    .map_err(io_failure)?;
    Ok(Json(CategoryList { categories }))
}

/// The files (or, for `runs`, the run directories) of a category.
#[utoipa::path(get, path = "/artifacts/{category}", tag = "artifacts", params(("category" = String, Path)),
    responses((status = 200, body = EntryList), (status = 422, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn list_category(
    State(state): State<AppState>,
    Path(category): Path<String>,
) -> Result<Json<EntryList>, ApiError> {
    let category = segment(&category, "category")?.to_owned();
    let dir = state.artifacts.root().join(&category);
    let listed = category.clone();
    let artifacts = tokio::task::spawn_blocking(move || -> Result<Vec<ArtifactEntry>, ApiError> {
        match std::fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            _ => return Err(not_found(format!("no artifact category {listed:?}"))),
        }
        Ok(entries(&dir)
            .map_err(io_failure)?
            .into_iter()
            .map(|(name, meta)| ArtifactEntry {
                url: format!("/artifacts/{listed}/{name}"),
                kind: if meta.is_dir() { "directory" } else { "file" },
                size: meta.is_file().then_some(meta.len()),
                name,
            })
            .collect())
    })
    .await
    .map_err(internal)??;
    Ok(Json(EntryList {
        category,
        artifacts,
    }))
}

/// One file of a category, streamed with its content type; `Range` requests are answered with
/// 206 and the requested bytes.
#[utoipa::path(get, path = "/artifacts/{category}/{id}", tag = "artifacts",
    params(("category" = String, Path), ("id" = String, Path)),
    responses((status = 200, description = "the file"), (status = 206, description = "part of the file"),
              (status = 304, description = "not modified since the copy the client holds (If-None-Match, If-Modified-Since)"),
              (status = 412, description = "a precondition (If-Match, If-Unmodified-Since) does not hold"),
              (status = 416, description = "the requested range is outside the file"),
              (status = 422, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_artifact(
    State(state): State<AppState>,
    Path((category, id)): Path<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    let relative = format!(
        "{}/{}",
        segment(&category, "category")?,
        segment(&id, "id")?
    );
    serve(&state, &relative, request).await
}

/// Every file a run wrote, with its size and download URL.
#[utoipa::path(get, path = "/artifacts/runs/{run_id}", tag = "artifacts", params(("run_id" = String, Path)),
    responses((status = 200, body = RunFiles), (status = 422, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn run_artifacts(
    State(state): State<AppState>,
    Path(run_id): Path<String>,
) -> Result<Json<RunFiles>, ApiError> {
    let run_id = segment(&run_id, "run_id")?.to_owned();
    let dir = state.artifacts.root().join("runs").join(&run_id);
    let id = run_id.clone();
    let artifacts = tokio::task::spawn_blocking(move || -> Result<Vec<RunFile>, ApiError> {
        match std::fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            _ => return Err(not_found(format!("run {id} has no artifacts"))),
        }
        let mut files = Vec::new();
        let mut pending = vec![String::new()];
        while let Some(prefix) = pending.pop() {
            for (name, meta) in entries(&dir.join(&prefix)).map_err(io_failure)? {
                let path = if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                };
                if meta.is_dir() {
                    pending.push(path);
                } else if meta.is_file() {
                    files.push(RunFile {
                        url: format!("/artifacts/runs/{id}/{path}"),
                        size: meta.len(),
                        path,
                    });
                }
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    })
    .await
    .map_err(internal)??;
    Ok(Json(RunFiles { run_id, artifacts }))
}

/// One file of a run, by its path inside the run's directory (`/artifacts/runs/{id}/final/final.mp4`).
async fn run_file(
    State(state): State<AppState>,
    Path((run_id, path)): Path<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    let run_id = segment(&run_id, "run_id")?;
    for part in path.split('/') {
        segment(part, "path")?;
    }
    serve(&state, &format!("runs/{run_id}/{path}"), request).await
}

async fn serve(state: &AppState, relative: &str, request: Request) -> Result<Response, ApiError> {
    let artifacts = state.artifacts.clone();
    let checked = relative.to_owned();
    let regular = tokio::task::spawn_blocking(move || artifacts.regular_file(&checked))
        .await
        .map_err(internal)?;
    let path = match regular {
        Ok(true) => state
            .artifacts
            .resolve(relative)
            .map_err(|_| not_found(format!("no artifact {relative}")))?,
        Ok(false) => return Err(not_found(format!("no artifact {relative}"))),
        Err(_) => {
            return Err(ApiError::Invalid {
                code: "invalid_path",
                message: format!("{relative:?} is not a valid artifact path"),
                details: None,
            });
        }
    };
    let response = ServeFile::new(path)
        .oneshot(request)
        .await
        .map_err(|e| internal(format!("serving {relative}: {e}")))?;
    Ok(contained(response.map(Body::new).into_response()))
}

/// Content types a browser may show in place: media, raster images, plain text and JSON.
/// Anything else (HTML, SVG, XML…) is served as a download.
fn shown_in_place(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence.starts_with("video/")
        || essence.starts_with("audio/")
        || matches!(
            essence,
            "image/png"
                | "image/jpeg"
                | "image/gif"
                | "image/webp"
                | "text/plain"
                | "application/json"
        )
}

/// A file a run wrote is data, never a page: it runs no script and cannot act with the
/// caller's session (the console shares this origin), whatever it holds.
fn contained(mut response: Response) -> Response {
    let in_place = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(shown_in_place);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'; media-src 'self'; img-src 'self'"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if !in_place {
        headers.insert(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_static("attachment"),
        );
    }
    response
}
