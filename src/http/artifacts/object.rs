//! An artifact served from object storage, as `ServeFile` serves a local one: its content type
//! from its name, `ETag` and `Last-Modified`, the conditional requests (`If-Match`,
//! `If-Unmodified-Since`, `If-None-Match`, `If-Modified-Since`, in the order RFC 9110 gives them)
//! and one byte range (`206`, `416` outside the file). The bytes stream from the store: the
//! API holds a chunk at a time, whatever the file's size.

use std::{sync::Arc, time::SystemTime};

use axum::{
    body::Body,
    extract::Request,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use futures::TryStreamExt;

use super::{ApiError, internal, not_found};
use crate::artifacts::object_store::{
    self, GetOptions, GetRange, ObjectMeta, ObjectStore, path::Path as Key,
};

/// `"tag"` however the server wrote it (some answer it without quotes).
fn quoted(tag: &str) -> String {
    if tag.starts_with('"') || tag.starts_with("W/\"") {
        tag.to_owned()
    } else {
        format!("\"{tag}\"")
    }
}

/// Whether an `If-Match`/`If-None-Match` list names `etag` (weakly compared, `*` names any).
fn names(list: &str, etag: &str) -> bool {
    let bare = |t: &str| {
        t.trim()
            .trim_start_matches("W/")
            .trim_matches('"')
            .to_owned()
    };
    let etag = bare(etag);
    list.split(',')
        .any(|candidate| candidate.trim() == "*" || bare(candidate) == etag)
}

fn date(headers: &HeaderMap, name: header::HeaderName) -> Option<SystemTime> {
    httpdate::parse_http_date(headers.get(name)?.to_str().ok()?).ok()
}

/// What the request's preconditions answer, if not the file: `304` or `412`.
fn precondition(headers: &HeaderMap, meta: &ObjectMeta, etag: &str) -> Option<StatusCode> {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    // Whole seconds, as HTTP dates are written.
    let modified = SystemTime::UNIX_EPOCH
        + std::time::Duration::from_secs(meta.last_modified.timestamp().max(0) as u64);
    if let Some(list) = text(header::IF_MATCH) {
        if !names(list, etag) {
            return Some(StatusCode::PRECONDITION_FAILED);
        }
    } else if date(headers, header::IF_UNMODIFIED_SINCE).is_some_and(|since| modified > since) {
        return Some(StatusCode::PRECONDITION_FAILED);
    }
    if let Some(list) = text(header::IF_NONE_MATCH) {
        if names(list, etag) {
            return Some(StatusCode::NOT_MODIFIED);
        }
    } else if date(headers, header::IF_MODIFIED_SINCE).is_some_and(|since| modified <= since) {
        return Some(StatusCode::NOT_MODIFIED);
    }
    None
}

/// The one byte range asked for (inclusive), `Ok(None)` for the whole file, `Err` when it
/// cannot be served (outside the file, malformed, or several ranges).
fn range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(value) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| ())?;
    let ranges = http_range_header::parse_range_header(text)
        .and_then(|parsed| parsed.validate(size))
        .map_err(|_| ())?;
    match ranges.as_slice() {
        [one] => Ok(Some((*one.start(), *one.end()))),
        _ => Err(()),
    }
}

pub(super) async fn serve(
    client: Arc<dyn ObjectStore>,
    key: Key,
    relative: &str,
    request: Request,
) -> Result<Response, ApiError> {
    let meta = match client.head(&key).await {
        Ok(meta) => meta,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(not_found(format!("no artifact {relative}")));
        }
        Err(error) => return Err(internal(format!("reading {relative}: {error}"))),
    };
    let etag = quoted(meta.e_tag.as_deref().unwrap_or_default());
    let last_modified = httpdate::fmt_http_date(SystemTime::from(meta.last_modified));
    let headers = request.headers();
    let mut response = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::LAST_MODIFIED, &last_modified)
        .header(header::ACCEPT_RANGES, "bytes");
    if let Some(status) = precondition(headers, &meta, &etag) {
        return response
            .status(status)
            .body(Body::empty())
            .map_err(internal);
    }
    let Ok(wanted) = range(headers, meta.size) else {
        return response
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header(header::CONTENT_RANGE, format!("bytes */{}", meta.size))
            .body(Body::empty())
            .map_err(internal);
    };
    if meta.size == 0 {
        return response
            .header(header::CONTENT_LENGTH, 0)
            .body(Body::empty())
            .map_err(internal);
    }
    let options = GetOptions {
        // The version just described, not one written since.
        if_match: meta.e_tag.clone(),
        range: wanted.map(|(first, last)| GetRange::Bounded(first..last + 1)),
        ..GetOptions::default()
    };
    let found = client
        .get_opts(&key, options)
        .await
        .map_err(|error| match error {
            object_store::Error::NotFound { .. } | object_store::Error::Precondition { .. } => {
                not_found(format!(
                    "no artifact {relative} (it changed while being read)"
                ))
            }
            other => internal(format!("reading {relative}: {other}")),
        })?;
    let content_type = mime_guess::from_path(relative).first_or_octet_stream();
    response = response
        .header(header::CONTENT_TYPE, content_type.as_ref())
        .header(header::CONTENT_LENGTH, found.range.end - found.range.start);
    if let Some((first, last)) = wanted {
        response = response.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!("bytes {first}-{last}/{}", meta.size),
        );
    }
    let body = Body::from_stream(found.into_stream().map_err(std::io::Error::other));
    Ok(response.body(body).map_err(internal)?.into_response())
}
