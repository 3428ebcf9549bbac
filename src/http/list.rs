//! Finding runs: the filtered, paged run list (`GET /runs`), bulk actions on what a filter
//! matches (`POST /runs/bulk`), and failed runs grouped by error code (`GET /failures`).

use axum::{
    Extension, Json,
    extract::{Query, State},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{ApiError, AppState, ErrorBody, JsonBody};
use crate::{
    ids::RunId,
    money::Usd,
    status::RunDoc,
    store::{
        Actor, FromStage, MIN_SEARCH_CHARS, ResumeChanges, RunFilter, RunKind, RunPage, RunStatus,
        StoreError,
    },
};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(super::runs::submit_run, list_runs))
        .routes(routes!(bulk))
        .routes(routes!(failures))
}

const MAX_TEXT: usize = 200;
const MAX_COST: f64 = 1_000_000.0;

/// The filters of the run list, as query parameters of `GET /runs` or the `filter` of
/// `POST /runs/bulk`. Every filter narrows; a time range is of creation times.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Filters {
    /// Only runs of this kind.
    #[schema(value_type = Option<RunKind>)]
    pub kind: Option<String>,
    /// Only runs with this status.
    #[schema(value_type = Option<RunStatus>)]
    pub status: Option<String>,
    /// Only runs of this workflow or agent.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    pub name: Option<String>,
    /// Only runs of this queue.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    pub queue: Option<String>,
    /// Only runs that failed with this error code (e.g. `budget_exceeded`).
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    pub error_code: Option<String>,
    /// Only runs created at or after this time (RFC 3339).
    #[schema(value_type = Option<DateTime<Utc>>)]
    pub created_after: Option<String>,
    /// Only runs created before this time (RFC 3339).
    #[schema(value_type = Option<DateTime<Utc>>)]
    pub created_before: Option<String>,
    /// Only runs that cost at least this many dollars.
    #[schema(minimum = 0, maximum = 1000000)]
    pub min_cost_usd: Option<f64>,
    /// Only runs that cost at most this many dollars.
    #[schema(minimum = 0, maximum = 1000000)]
    pub max_cost_usd: Option<f64>,
    /// Only runs with this text (3 to 200 characters, any case) inside a string or number of
    /// their inputs. SQLite answers from an index; Redis examines at most 10,000 runs per page
    /// and says so in `scan`.
    #[schema(
        min_length = 3,
        max_length = 200,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    pub q: Option<String>,
}

fn invalid(field: &str, message: String) -> ApiError {
    ApiError::Invalid {
        code: "invalid_query",
        message,
        details: Some(serde_json::json!({"field": field})),
    }
}

/// A text filter: `min` to 200 characters without control characters (as documented: a final
/// line break is let through and dropped, as the document's `$` allows it).
fn text(field: &str, value: Option<String>, min: usize) -> Result<Option<String>, ApiError> {
    let Some(value) = value else { return Ok(None) };
    let chars = value.chars().count();
    let kept = value.strip_suffix('\n').unwrap_or(&value);
    if chars < min.max(1) || chars > MAX_TEXT || kept.chars().any(char::is_control) {
        return Err(invalid(
            field,
            format!(
                "{field} must be {} to {MAX_TEXT} characters without control characters",
                min.max(1)
            ),
        ));
    }
    Ok(Some(kept.to_owned()))
}

fn time(field: &str, value: Option<String>) -> Result<Option<RunId>, ApiError> {
    let Some(value) = value else { return Ok(None) };
    let at = DateTime::parse_from_rfc3339(crate::schema::without_final_line_break(&value))
        .map_err(|e| invalid(field, format!("{field} is not an RFC 3339 time: {e}")))?;
    Ok(Some(RunId::first_at(at.with_timezone(&Utc))))
}

fn cost(field: &str, value: Option<f64>) -> Result<Option<Usd>, ApiError> {
    let Some(value) = value else { return Ok(None) };
    if !(0.0..=MAX_COST).contains(&value) {
        return Err(invalid(
            field,
            format!("{field} must be between 0 and {MAX_COST}"),
        ));
    }
    Ok(Usd::from_dollars(value))
}

impl Filters {
    /// The store's filter for these, pages of `limit` runs older than `before`.
    pub fn into_filter(self, before: Option<RunId>, limit: u32) -> Result<RunFilter, ApiError> {
        let kind = match self.kind.as_deref() {
            None => None,
            Some(k) => Some(RunKind::parse(k).ok_or_else(|| {
                invalid(
                    "kind",
                    format!("unknown kind {k:?}; expected agent, workflow or work_order"),
                )
            })?),
        };
        let status = match self.status.as_deref() {
            None => None,
            Some(s) => Some(
                RunStatus::parse(s)
                    .ok_or_else(|| invalid("status", format!("unknown status {s:?}")))?,
            ),
        };
        Ok(RunFilter {
            kind,
            status,
            name: text("name", self.name, 1)?,
            queue: text("queue", self.queue, 1)?,
            error_code: text("error_code", self.error_code, 1)?,
            input_text: text("q", self.q, MIN_SEARCH_CHARS)?,
            since: time("created_after", self.created_after)?,
            until: time("created_before", self.created_before)?,
            min_cost: cost("min_cost_usd", self.min_cost_usd)?,
            max_cost: cost("max_cost_usd", self.max_cost_usd)?,
            before,
            limit,
            uncounted: false,
        })
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    #[param(value_type = Option<RunKind>)]
    kind: Option<String>,
    #[param(value_type = Option<RunStatus>)]
    status: Option<String>,
    #[param(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    name: Option<String>,
    #[param(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    queue: Option<String>,
    #[param(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    error_code: Option<String>,
    #[param(value_type = Option<DateTime<Utc>>)]
    created_after: Option<String>,
    #[param(value_type = Option<DateTime<Utc>>)]
    created_before: Option<String>,
    #[param(minimum = 0, maximum = 1000000)]
    min_cost_usd: Option<f64>,
    #[param(minimum = 0, maximum = 1000000)]
    max_cost_usd: Option<f64>,
    /// Text inside a string or number of the inputs (see [`Filters`]).
    #[param(
        min_length = 3,
        max_length = 200,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    q: Option<String>,
    /// Page size (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[param(
        pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    )]
    cursor: Option<String>,
}

impl ListQuery {
    fn into_filter(self) -> Result<RunFilter, ApiError> {
        let before = match self.cursor.as_deref() {
            None => None,
            Some(c) => Some(
                RunId::parse(crate::schema::without_final_line_break(c))
                    .ok_or_else(|| invalid("cursor", "cursor is not a run id".to_owned()))?,
            ),
        };
        let limit = self.limit.unwrap_or(50);
        if !(1..=500).contains(&limit) {
            return Err(invalid(
                "limit",
                "limit must be between 1 and 500".to_owned(),
            ));
        }
        Filters {
            kind: self.kind,
            status: self.status,
            name: self.name,
            queue: self.queue,
            error_code: self.error_code,
            created_after: self.created_after,
            created_before: self.created_before,
            min_cost_usd: self.min_cost_usd,
            max_cost_usd: self.max_cost_usd,
            q: self.q,
        }
        .into_filter(before, limit)
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RunList {
    runs: Vec<RunDoc>,
    /// How many runs match the filters in all (with `scan`: among the runs examined).
    total: u64,
    /// Pass as `cursor` for the next page; absent on the last page.
    next_cursor: Option<String>,
    /// Present when the store checked runs one by one for these filters (Redis, for filters
    /// other than status and time): how far this page looked.
    #[serde(skip_serializing_if = "Option::is_none")]
    scan: Option<Scan>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Scan {
    /// Runs examined for this page.
    examined: u64,
    /// Whether every run up to the end of the list was examined; if not, `next_cursor`
    /// continues the search where this page stopped.
    complete: bool,
}

fn parse_query<T>(
    query: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    query.map(|Query(q)| q).map_err(|e| ApiError::Invalid {
        code: "invalid_query",
        message: e.body_text(),
        details: None,
    })
}

/// Lists runs, newest first, filtered and paged by cursor.
#[utoipa::path(get, path = "/runs", tag = "runs", params(ListQuery),
    responses((status = 200, body = RunList), (status = 422, body = ErrorBody)))]
async fn list_runs(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<RunList>, ApiError> {
    let filter = parse_query(query)?.into_filter()?;
    let page = state.store.list_runs(&filter).await?;
    Ok(Json(run_list(page, filter.limit)))
}

fn run_list(page: RunPage, limit: u32) -> RunList {
    let next_cursor = run_list_cursor(&page, limit).map(|id| id.to_string());
    RunList {
        runs: page.runs.into_iter().map(RunDoc::summary).collect(),
        total: page.total,
        next_cursor,
        scan: page.scan.map(|scan| Scan {
            examined: scan.examined,
            complete: scan.complete,
        }),
    }
}

/// What a bulk action does to each run its filter matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BulkAction {
    /// Cancel queued, retrying and running runs.
    Cancel,
    /// Resume failed and cancelled runs from their first stage without a checkpoint.
    Retry,
}

impl BulkAction {
    fn applies_to(self, status: RunStatus) -> bool {
        match self {
            Self::Cancel => !status.is_finished(),
            Self::Retry => matches!(status, RunStatus::Failed | RunStatus::Cancelled),
        }
    }
}

/// `POST /runs/bulk`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkRequest {
    pub action: BulkAction,
    /// The runs to act on, as the run list's filters.
    #[serde(default)]
    pub filter: Filters,
    /// Count what would change without changing anything (default true: a bulk change must
    /// be asked for explicitly with `false`).
    #[serde(default = "yes")]
    pub dry_run: bool,
    /// Most runs to change in this request (default 1000); call again for the rest.
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    #[serde(default, deserialize_with = "whole_number")]
    pub max_runs: Option<u64>,
}

fn yes() -> bool {
    true
}

/// A whole number as JSON Schema's `integer` has it: `3` and `3.0` alike (a fraction, a
/// negative or a huge number is refused).
fn whole_number<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    let Some(number) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    if let Some(whole) = number.as_u64() {
        return Ok(Some(whole));
    }
    match number.as_f64() {
        Some(value) if value.fract() == 0.0 && (0.0..=1e15).contains(&value) => {
            Ok(Some(value as u64))
        }
        _ => Err(serde::de::Error::custom("expected a whole number")),
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BulkResult {
    pub action: BulkAction,
    pub dry_run: bool,
    /// Runs the filter matches (with `scan_complete` false: among the runs examined).
    pub matched: u64,
    /// Runs changed, or that would be changed in a dry run.
    pub changed: u64,
    /// Matched runs the action does not apply to (e.g. a completed run for `cancel`).
    pub skipped: u64,
    /// Runs whose change failed (e.g. a run that finished meanwhile), at most 20 listed.
    pub failed: Vec<BulkFailure>,
    /// Whether runs remain beyond `max_runs`: call again to continue.
    pub more: bool,
    pub scan_complete: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BulkFailure {
    pub run_id: String,
    pub message: String,
}

const MAX_BULK: u32 = 1000;
const BULK_PAGE: u32 = 200;
/// Most pages one bulk call reads (5,000 runs).
const BULK_PAGES: usize = 25;
const LISTED_FAILURES: usize = 20;

/// Cancels or retries every run the filter matches (at most `max_runs` per call), or with
/// `dry_run` (the default) counts what would change. Each change is the same as the single
/// run's route and names the caller in the run's event log. One call reads at most 5,000
/// runs; `more` says when to call again.
#[utoipa::path(post, path = "/runs/bulk", tag = "runs", request_body = BulkRequest,
    responses((status = 200, body = BulkResult), (status = 422, body = ErrorBody),
              (status = 503, body = ErrorBody, description = "the store is unavailable or busy; nothing more was changed")))]
async fn bulk(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    JsonBody(mut request): JsonBody<BulkRequest>,
) -> Result<Json<BulkResult>, ApiError> {
    let max = request.max_runs.unwrap_or(u64::from(MAX_BULK));
    if !(1..=u64::from(MAX_BULK)).contains(&max) {
        return Err(ApiError::invalid(
            format!("max_runs must be between 1 and {MAX_BULK}"),
            Some("max_runs"),
        ));
    }
    let filter = std::mem::take(&mut request.filter).into_filter(None, BULK_PAGE)?;
    let mut result = BulkResult {
        action: request.action,
        dry_run: request.dry_run,
        matched: 0,
        changed: 0,
        skipped: 0,
        failed: Vec::new(),
        more: false,
        scan_complete: true,
    };
    // Each status the action applies to is walked on its own index, so no page is spent on
    // runs it would skip; the runs of other statuses are only counted.
    let mut pages_left = BULK_PAGES;
    for status in RunStatus::ALL {
        if filter.status.is_some_and(|asked| asked != status) {
            continue;
        }
        let mut walk = RunFilter {
            status: Some(status),
            ..filter.clone()
        };
        if !request.action.applies_to(status) {
            walk.limit = 1;
            let page = state.store.list_runs(&walk).await?;
            result.matched += page.total;
            result.skipped += page.total;
            continue;
        }
        let bound = (&mut result, &mut pages_left);
        let done = act_on(&state, (&request, max, actor), walk, bound).await?;
        if !done {
            result.more = true;
            break;
        }
    }
    Ok(Json(result))
}

/// Acts on the runs of one walk page by page; answers whether it reached the end.
async fn act_on(
    state: &AppState,
    (request, max, actor): (&BulkRequest, u64, Actor),
    mut walk: RunFilter,
    (result, pages_left): (&mut BulkResult, &mut usize),
) -> Result<bool, ApiError> {
    loop {
        if *pages_left == 0 || result.changed >= max {
            return Ok(false);
        }
        *pages_left -= 1;
        let page = state.store.list_runs(&walk).await?;
        if !walk.uncounted {
            result.matched += page.total;
            walk.uncounted = true;
        }
        if let Some(scan) = &page.scan {
            result.scan_complete &= scan.complete;
        }
        for run in &page.runs {
            if result.changed >= max {
                return Ok(false);
            }
            if request.dry_run {
                result.changed += 1;
                continue;
            }
            match apply(state, request.action, run.id, actor).await {
                Ok(()) => result.changed += 1,
                Err(error @ (StoreError::Busy(_) | StoreError::Unavailable(_))) => {
                    return Err(error.into());
                }
                Err(error) => {
                    if result.failed.len() < LISTED_FAILURES {
                        result.failed.push(BulkFailure {
                            run_id: run.id.to_string(),
                            message: public_message(&error),
                        });
                    }
                }
            }
        }
        match run_list_cursor(&page, walk.limit) {
            Some(cursor) => walk.before = Some(cursor),
            None => return Ok(true),
        }
    }
}

/// What a client may read of a failed change: a conflict's reason, never a store's internals.
fn public_message(error: &StoreError) -> String {
    match error {
        StoreError::Conflict(message) => message.clone(),
        StoreError::NotFound(id) => format!("run {id} not found"),
        _ => "internal error".to_owned(),
    }
}

/// Where the next page of a listing starts, if there is one.
fn run_list_cursor(page: &RunPage, limit: u32) -> Option<RunId> {
    match (&page.scan, page.runs.last()) {
        (_, Some(last)) if page.runs.len() == limit as usize => Some(last.id),
        (Some(scan), _) if !scan.complete => scan.last,
        _ => None,
    }
}

async fn apply(
    state: &AppState,
    action: BulkAction,
    id: RunId,
    actor: Actor,
) -> Result<(), StoreError> {
    let run = match action {
        BulkAction::Cancel => state.store.request_cancel(id, actor).await?,
        BulkAction::Retry => {
            let changes = ResumeChanges {
                actor,
                ..ResumeChanges::default()
            };
            state.store.resume(id, FromStage::Auto, changes).await?
        }
    };
    super::runs::observe(state, &run).await;
    Ok(())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FailuresQuery {
    /// Only failures of runs created at or after this time (RFC 3339; default: the last day).
    #[param(value_type = Option<DateTime<Utc>>)]
    since: Option<String>,
}

/// Failed runs grouped by error code.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Failures {
    /// Largest group first.
    pub groups: Vec<FailureGroup>,
    /// Failed runs examined: the most recent ones, at most 2,000.
    pub examined: u64,
    /// Whether every failed run since `since` was examined.
    pub complete: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FailureGroup {
    pub code: String,
    pub count: u64,
    /// The workflows and agents whose runs failed so (at most 10).
    pub names: Vec<String>,
    /// The most recent run that failed so.
    pub latest_run_id: String,
    pub latest_message: String,
    pub latest_at: DateTime<Utc>,
}

const FAILURES_EXAMINED: u32 = 2_000;

/// Failed runs grouped by their error code, most frequent first: the most recent 2,000 failed
/// runs created since `since`.
#[utoipa::path(get, path = "/failures", tag = "ops", params(FailuresQuery),
    responses((status = 200, body = Failures), (status = 422, body = ErrorBody)))]
async fn failures(
    State(state): State<AppState>,
    query: Result<Query<FailuresQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Failures>, ApiError> {
    let query = parse_query(query)?;
    let since = match time("since", query.since)? {
        Some(since) => since,
        None => RunId::first_at(Utc::now() - chrono::Duration::days(1)),
    };
    let mut filter = RunFilter {
        status: Some(RunStatus::Failed),
        since: Some(since),
        limit: 500,
        uncounted: true,
        ..RunFilter::default()
    };
    let mut groups: Vec<FailureGroup> = Vec::new();
    let (mut examined, mut complete) = (0u64, false);
    while examined < u64::from(FAILURES_EXAMINED) {
        let page = state.store.list_runs(&filter).await?;
        for run in &page.runs {
            examined += 1;
            let Some(error) = &run.error else { continue };
            let at = run.finished_at.unwrap_or(run.updated_at);
            match groups.iter_mut().find(|g| g.code == error.code) {
                Some(group) => {
                    group.count += 1;
                    if group.names.len() < 10 && !group.names.contains(&run.name) {
                        group.names.push(run.name.clone());
                    }
                }
                None => groups.push(FailureGroup {
                    code: error.code.clone(),
                    count: 1,
                    names: vec![run.name.clone()],
                    latest_run_id: run.id.to_string(),
                    latest_message: error.message.chars().take(500).collect(),
                    latest_at: at,
                }),
            }
        }
        match run_list_cursor(&page, filter.limit) {
            Some(cursor) => filter.before = Some(cursor),
            None => {
                complete = true;
                break;
            }
        }
    }
    groups.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.code.cmp(&b.code)));
    Ok(Json(Failures {
        groups,
        examined,
        complete,
    }))
}
