//! The artifact routes (`/artifacts`): categories, listings, and files streamed with their
//! content type and range support, from the local directory or from object storage.
//!
//! Invariant: a path taken from a request is checked before the store is touched (single safe
//! segments; a run file's path has only safe segments) and is served only when it is a complete
//! file (locally a regular file reached without following a symlink); anything else is a 4xx.

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

mod object;

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

fn store_failure(error: crate::artifacts::ArtifactError) -> ApiError {
    internal(format!("reading the artifact store: {error}"))
}

/// The categories at the artifact root (`runs`, `videos`, `audio`, `scripts`) with their counts.
#[utoipa::path(get, path = "/artifacts", tag = "artifacts", responses((status = 200, body = CategoryList)))]
async fn list_categories(State(state): State<AppState>) -> Result<Json<CategoryList>, ApiError> {
    let root = state.artifacts.list("").await.map_err(store_failure)?;
    let mut categories = Vec::new();
    for entry in root.unwrap_or_default() {
        if entry.size.is_none() {
            let inside = state
                .artifacts
                .list(&entry.name)
                .await
                .map_err(store_failure)?;
            categories.push(Category {
                url: format!("/artifacts/{}", entry.name),
                count: inside.map_or(0, |entries| entries.len()),
                name: entry.name,
            });
        }
    }
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
    let Some(entries) = state
        .artifacts
        .list(&category)
        .await
        .map_err(store_failure)?
    else {
        return Err(not_found(format!("no artifact category {category:?}")));
    };
    let artifacts = entries
        .into_iter()
        .map(|entry| ArtifactEntry {
            url: format!("/artifacts/{category}/{}", entry.name),
            kind: if entry.size.is_none() {
                "directory"
            } else {
                "file"
            },
            size: entry.size,
            name: entry.name,
        })
        .collect();
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
    let Some(files) = state
        .artifacts
        .list_files(&format!("runs/{run_id}"))
        .await
        .map_err(store_failure)?
    else {
        return Err(not_found(format!("run {run_id} has no artifacts")));
    };
    let artifacts = files
        .into_iter()
        .map(|(path, size)| RunFile {
            url: format!("/artifacts/runs/{run_id}/{path}"),
            size,
            path,
        })
        .collect();
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

/// Streams a file from wherever the store keeps it: a local file through `ServeFile`, an
/// object through [`object::serve`]; both answer ranges and conditional requests alike.
async fn serve(state: &AppState, relative: &str, request: Request) -> Result<Response, ApiError> {
    let invalid = || ApiError::Invalid {
        code: "invalid_path",
        message: format!("{relative:?} is not a valid artifact path"),
        details: None,
    };
    let response = match state.artifacts.object(relative).map_err(|_| invalid())? {
        Some((client, key)) => object::serve(client, key, relative, request).await?,
        None => {
            if !state
                .artifacts
                .is_file(relative)
                .await
                .map_err(|_| invalid())?
            {
                return Err(not_found(format!("no artifact {relative}")));
            }
            let path = state
                .artifacts
                .local_path(relative)
                .map_err(|_| invalid())?
                .ok_or_else(|| not_found(format!("no artifact {relative}")))?;
            ServeFile::new(path)
                .oneshot(request)
                .await
                .map_err(|e| internal(format!("serving {relative}: {e}")))?
                .map(Body::new)
                .into_response()
        }
    };
    Ok(contained(response))
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
