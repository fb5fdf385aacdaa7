//! The HTTP API of `trainyard serve` (JSON; described at `/api/openapi.json`).
//!
//! Every endpoint but `/healthz`, `/readyz` and the dashboard's page needs the server's
//! token, as `Authorization: Bearer TOKEN` or, where a browser cannot set headers
//! (EventSource, a download link), `?token=TOKEN`. Job bodies are small and limited in
//! size; a malformed one is answered 422 with a JSON error naming the field. Artifact
//! paths resolve inside the store or not at all (404).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::stream::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::queue::{Job, JobSpec, JobState, Queue, QueueError};
use super::worker::pipeline_in_workspace;

/// Request bodies larger than this are refused (413).
pub const BODY_LIMIT: usize = 64 * 1024;

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The workspace root.
    pub root: PathBuf,
    /// The bearer token.
    pub token: String,
}

/// The router of every endpoint over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/api/jobs", post(submit).get(list_jobs))
        .route("/api/jobs/{id}", get(job_detail))
        .route("/api/jobs/{id}/cancel", post(cancel_job))
        .route("/api/jobs/{id}/retry", post(retry_job))
        .route("/api/jobs/{id}/events", get(job_events))
        .route("/api/runs/{run}/artifacts", get(artifacts))
        .route("/api/runs/{run}/files/{stage}/{*path}", get(download))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/api/openapi.json", get(openapi))
        .route("/", get(dashboard))
        .merge(api)
        .layer(tower_http::limit::RequestBodyLimitLayer::new(BODY_LIMIT))
        .with_state(state)
}

/// An error answered as JSON: `{"error": …, "field": …}` with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            field: None,
        }
    }

    /// A malformed request (422) naming the field at fault.
    fn invalid(field: Option<String>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: message.into(),
            field,
        }
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(field) = self.field {
            body["field"] = json!(field);
        }
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<QueueError> for ApiError {
    fn from(error: QueueError) -> ApiError {
        let status = match error {
            QueueError::NoSuchJob(_) => StatusCode::NOT_FOUND,
            QueueError::WrongState { .. } => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, error.to_string())
    }
}

/// Runs `work` on the queue of the workspace, off the async threads.
async fn with_queue<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce(&mut Queue) -> Result<T, QueueError> + Send + 'static,
) -> Result<T, ApiError> {
    let root = state.root.clone();
    tokio::task::spawn_blocking(move || {
        let mut queue = Queue::open(&root)?;
        work(&mut queue)
    })
    .await
    .map_err(|join| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, join.to_string()))?
    .map_err(ApiError::from)
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

async fn require_token(
    State(state): State<Arc<AppState>>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let given = bearer.or(query.token.as_deref());
    if given.is_some_and(|token| constant_time_eq(token.as_bytes(), state.token.as_bytes())) {
        return next.run(request).await;
    }
    let mut response = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "missing or wrong token: send `Authorization: Bearer TOKEN` (the token is in \
         .trainyard/serve/token, or the file given to --token-file)",
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

/// Compares without stopping at the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn ready(State(state): State<Arc<AppState>>) -> Result<&'static str, ApiError> {
    with_queue(&state, |queue| queue.list(Some(JobState::Running))).await?;
    Ok("ready\n")
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

/// `POST /api/jobs`: a [`JobSpec`] as JSON → 201 `{id, state}`.
async fn submit(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let deserializer = &mut serde_json::Deserializer::from_slice(&body);
    let spec: JobSpec = serde_path_to_error::deserialize(deserializer).map_err(|failure| {
        let field = failure.path().to_string();
        let message = failure.inner().to_string();
        match field.as_str() {
            "." => ApiError::invalid(None, format!("invalid job: {message}")),
            _ => ApiError::invalid(
                Some(field.clone()),
                format!("invalid job: `{field}`: {message}"),
            ),
        }
    })?;
    pipeline_in_workspace(&state.root, &spec.pipeline)
        .map_err(|message| ApiError::invalid(Some("pipeline".to_string()), message))?;
    let id = with_queue(&state, move |queue| queue.submit(&spec)).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "id": id, "state": "queued" })),
    )
        .into_response())
}

#[derive(Deserialize)]
struct StateQuery {
    state: Option<String>,
}

/// `GET /api/jobs?state=…`.
async fn list_jobs(
    State(state): State<Arc<AppState>>,
    Query(query): Query<StateQuery>,
) -> Result<Response, ApiError> {
    let filter = match query.state.as_deref() {
        None | Some("") => None,
        Some(name) => Some(JobState::parse(name).ok_or_else(|| {
            ApiError::invalid(
                Some("state".to_string()),
                format!("unknown state `{name}` (queued, running, succeeded, failed, cancelled)"),
            )
        })?),
    };
    let jobs = with_queue(&state, move |queue| queue.list(filter)).await?;
    Ok(axum::Json(json!({ "jobs": jobs })).into_response())
}

fn parse_id(id: &str) -> Result<i64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::not_found(format!("no job {id}")))
}

/// `GET /api/jobs/{id}`: the job, and its latest run's stages (status, fingerprint,
/// timings, metrics, upstream stages).
async fn job_detail(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let job = with_queue(&state, move |queue| queue.get(id)).await?;
    let root = state.root.clone();
    let stages = tokio::task::spawn_blocking(move || {
        run_stages(&root, job.runs.last().map(String::as_str), &job.spec)
    })
    .await
    .unwrap_or_default();
    // Read again: the stages may be newer than the job read before them, never older.
    let job = with_queue(&state, move |queue| queue.get(id)).await?;
    Ok(axum::Json(json!({ "job": job, "stages": stages })).into_response())
}

/// The stages of run `run_id` (none yet: all pending) of a job running `spec`, upstream
/// first: the run's
/// record once it lists them (at the run's end), else the pipeline as the job resolves
/// it; with the live states and fingerprints the run's events give, and the metrics of
/// finished outputs.
pub fn run_stages(root: &Path, run_id: Option<&str>, spec: &JobSpec) -> Vec<Value> {
    // A job not started yet: its pipeline's stages, all pending.
    let run_id = run_id.filter(|run| is_plain_name(run)).unwrap_or(".none");
    let dir = root.join("runs").join(run_id);
    // name → (status, fingerprint, duration)
    let mut live: BTreeMap<String, (String, Option<String>, Option<f64>)> = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(dir.join("logs.jsonl")) {
        for line in text.lines() {
            let Ok(event) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let (Some(name), Some(stage)) = (
                event.get("event").and_then(Value::as_str),
                event.get("stage").and_then(Value::as_str),
            ) else {
                continue;
            };
            let status = match name {
                "stage_started" => "running",
                "stage_finished" => "executed",
                "stage_cached" => "cached",
                "stage_failed" => "failed",
                "stage_interrupted" => "interrupted",
                _ => continue,
            };
            let entry = live.entry(stage.to_string()).or_default();
            entry.0 = status.to_string();
            if let Some(fingerprint) = event.get("fingerprint").and_then(Value::as_str) {
                entry.1 = Some(fingerprint.to_string());
            }
            if let Some(duration) = event.get("duration_s").and_then(Value::as_f64) {
                entry.2 = Some(duration);
            }
        }
    }
    let metrics = |name: &str| {
        std::fs::read_to_string(dir.join("outputs").join(name).join(crate::store::MANIFEST))
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .and_then(|manifest| manifest.get("metrics").cloned())
    };
    let stage = |name: &str,
                 kind: &str,
                 recorded: Option<(Value, Option<String>, Option<f64>)>,
                 upstream: Vec<String>| {
        let (status, fingerprint, duration) = match (live.get(name), recorded) {
            (Some((status, fingerprint, duration)), recorded) => {
                let recorded_fingerprint = recorded.as_ref().and_then(|r| r.1.clone());
                let recorded_duration = recorded.as_ref().and_then(|r| r.2);
                (
                    json!(status),
                    fingerprint.clone().or(recorded_fingerprint),
                    duration.or(recorded_duration),
                )
            }
            (None, Some(recorded)) => recorded,
            (None, None) => (json!("pending"), None, None),
        };
        json!({
            "name": name,
            "kind": kind,
            "status": status,
            "fingerprint": fingerprint,
            "duration_s": duration,
            "upstream": upstream,
            "metrics": metrics(name),
        })
    };
    if let Ok(run) = crate::audit::Run::open(&dir)
        && !run.record.stages.is_empty()
    {
        let upstream = run.upstream_stages();
        return run
            .stage_order()
            .into_iter()
            .filter_map(|name| {
                let record = run.record.stages.get(&name)?;
                let recorded = (
                    serde_json::to_value(record.status).unwrap_or(Value::Null),
                    record.fingerprint.clone(),
                    record.duration_s,
                );
                let up = upstream
                    .get(name.as_str())
                    .map(|set| set.iter().map(|s| s.to_string()).collect())
                    .unwrap_or_default();
                Some(stage(&name, &record.kind, Some(recorded), up))
            })
            .collect();
    }
    planned_stages(root, spec)
        .into_iter()
        .map(|(name, kind, upstream)| stage(&name, &kind, None, upstream))
        .collect()
}

/// The stages `spec` runs, upstream first: name, kind and the stages each reads, as
/// its pipeline resolves now.
fn planned_stages(root: &Path, spec: &JobSpec) -> Vec<(String, String, Vec<String>)> {
    let options = crate::config::LoadOptions {
        profiles: spec.profiles.clone(),
        overrides: spec.set.clone(),
        env: std::env::vars().collect(),
        profile_dirs: vec![root.join("profiles")],
    };
    let Ok(pipeline) = crate::config::load(&root.join(&spec.pipeline), &options) else {
        return Vec::new();
    };
    let Ok(dag) = crate::dag::build(&pipeline) else {
        return Vec::new();
    };
    let count = pipeline.stages.len();
    let upstream: Vec<Vec<usize>> = (0..count).map(|index| dag.upstream(index)).collect();
    // Kahn's order, ties by position in the file.
    let mut placed = vec![false; count];
    let mut order = Vec::with_capacity(count);
    while order.len() < count {
        let before = order.len();
        for index in 0..count {
            if !placed[index] && upstream[index].iter().all(|&up| placed[up]) {
                placed[index] = true;
                order.push(index);
            }
        }
        if order.len() == before {
            break;
        }
    }
    order
        .into_iter()
        .map(|index| {
            let stage = &pipeline.stages[index];
            (
                stage.name.clone(),
                stage.kind.name.to_string(),
                upstream[index]
                    .iter()
                    .map(|&up| pipeline.stages[up].name.clone())
                    .collect(),
            )
        })
        .collect()
}

async fn cancel_job(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    job_action(&state, &id, Queue::cancel).await
}

async fn retry_job(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    job_action(&state, &id, Queue::retry).await
}

/// `action` on job `id` (as the URL gives it) → `{id, state}`, the state it left.
async fn job_action(
    state: &AppState,
    id: &str,
    action: fn(&Queue, i64) -> Result<JobState, QueueError>,
) -> Result<Response, ApiError> {
    let id = parse_id(id)?;
    let job_state = with_queue(state, move |queue| action(queue, id)).await?;
    Ok(axum::Json(json!({ "id": id, "state": job_state })).into_response())
}

/// Where an event stream is: run `run` of the job (its index in the job's runs), line
/// `line` of its `logs.jsonl` (the next to send), which starts at byte `offset` when
/// known (0: not known, count lines from the start). An event's id is `run:line`.
#[derive(Debug, Clone, Copy, Default)]
struct Cursor {
    run: usize,
    line: usize,
    offset: u64,
}

impl Cursor {
    /// The cursor after the event `id` (`Last-Event-ID`).
    fn after(id: &str) -> Option<Cursor> {
        let (run, line) = id.split_once(':')?;
        Some(Cursor {
            run: run.parse().ok()?,
            line: line.parse::<usize>().ok()? + 1,
            offset: 0,
        })
    }
}

/// `GET /api/jobs/{id}/events`: Server-Sent Events. Every event of each of the job's
/// runs (`logs.jsonl`: stage events, `train_step`, `eval`), named by its `event` field,
/// with the id `run:line`; a `job` event whenever the job's state changes; and `end`
/// once the job is over and every event is sent. `Last-Event-ID` resumes after that
/// event.
async fn job_events(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    with_queue(&state, move |queue| queue.get(id)).await?;
    let cursor = headers
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .and_then(Cursor::after)
        .unwrap_or_default();
    Ok(Sse::new(event_stream(state, id, cursor))
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn event_stream(
    state: Arc<AppState>,
    id: i64,
    start: Cursor,
) -> impl Stream<Item = Result<Event, Infallible>> {
    struct Follow {
        state: Arc<AppState>,
        cursor: Cursor,
        last_state: Option<JobState>,
        pending: std::collections::VecDeque<Event>,
        ended: bool,
    }
    let follow = Follow {
        state,
        cursor: start,
        last_state: None,
        pending: Default::default(),
        ended: false,
    };
    futures_util::stream::unfold(follow, move |mut follow| async move {
        loop {
            if let Some(event) = follow.pending.pop_front() {
                return Some((Ok(event), follow));
            }
            if follow.ended {
                return None;
            }
            let job = with_queue(&follow.state, move |queue| queue.get(id))
                .await
                .ok()?;
            if follow.last_state != Some(job.state) {
                follow.last_state = Some(job.state);
                follow.pending.push_back(Event::default().event("job").data(
                    json!({ "id": job.id, "state": job.state, "runs": job.runs }).to_string(),
                ));
            }
            let (events, cursor) = read_events(&follow.state.root, &job, follow.cursor).await;
            follow.cursor = cursor;
            let caught_up = events.is_empty() && follow.cursor.run + 1 >= job.runs.len();
            follow.pending.extend(events);
            if job.state.is_final() && caught_up {
                follow.pending.push_back(
                    Event::default()
                        .event("end")
                        .data(json!({ "id": job.id, "state": job.state }).to_string()),
                );
                follow.ended = true;
                continue;
            }
            if follow.pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    })
}

/// The events of `job`'s runs from `cursor` on (the whole lines written so far), and
/// the cursor after them. Only the bytes past the cursor are read. A run is left for the
/// next one once that exists and nothing new was read (a run killed outright never
/// writes `run_finished`).
async fn read_events(root: &Path, job: &Job, mut cursor: Cursor) -> (Vec<Event>, Cursor) {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut events = Vec::new();
    while let Some(run) = job.runs.get(cursor.run) {
        let path = root.join("runs").join(run).join("logs.jsonl");
        let mut bytes = Vec::new();
        if let Ok(mut file) = tokio::fs::File::open(&path).await
            && file
                .seek(std::io::SeekFrom::Start(cursor.offset))
                .await
                .is_ok()
        {
            let _ = file.read_to_end(&mut bytes).await;
        }
        // Only whole lines: the last one may be half written.
        let complete = bytes
            .iter()
            .rposition(|&byte| byte == b'\n')
            .map_or(0, |end| end + 1);
        let mut lines: Vec<&[u8]> = bytes[..complete].split(|&byte| byte == b'\n').collect();
        lines.pop(); // after the last newline
        // Resuming by line number alone: skip the lines already sent.
        let skip = if cursor.offset == 0 { cursor.line } else { 0 };
        let first = if cursor.offset == 0 { 0 } else { cursor.line };
        let mut sent = 0;
        for (index, line) in lines.iter().enumerate().skip(skip) {
            let line = String::from_utf8_lossy(line);
            let name = serde_json::from_str::<Value>(&line)
                .ok()
                .and_then(|event| {
                    event
                        .get("event")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "message".to_string());
            events.push(
                Event::default()
                    .id(format!("{}:{}", cursor.run, first + index))
                    .event(name)
                    .data(line),
            );
            sent += 1;
        }
        if cursor.offset == 0 && lines.len() < skip {
            // Not that many lines yet (an id from elsewhere): count again next time.
        } else {
            cursor.line = first + lines.len();
            cursor.offset += complete as u64;
        }
        if sent == 0 && cursor.run + 1 < job.runs.len() {
            cursor = Cursor {
                run: cursor.run + 1,
                line: 0,
                offset: 0,
            };
        } else {
            break;
        }
    }
    (events, cursor)
}

/// Whether `name` is one plain path component (a run id, a stage name).
fn is_plain_name(name: &str) -> bool {
    let mut components = Path::new(name).components();
    matches!(
        (components.next(), components.next()),
        (Some(Component::Normal(_)), None)
    ) && !name.starts_with('.')
}

/// The store directory of stage `stage`'s output in run `run` (through
/// `runs/<run>/outputs/<stage>`), resolved, if it lies in the store.
fn output_dir(root: &Path, run: &str, stage: &str) -> Option<PathBuf> {
    if !is_plain_name(run) || !is_plain_name(stage) {
        return None;
    }
    let store = root.join(".trainyard").join("store").canonicalize().ok()?;
    let dir = root
        .join("runs")
        .join(run)
        .join("outputs")
        .join(stage)
        .canonicalize()
        .ok()?;
    dir.starts_with(&store).then_some(dir)
}

/// `GET /api/runs/{run}/artifacts`: every stage output file of the run with its size,
/// hash (from the output's manifest) and download path.
async fn artifacts(State(state): State<Arc<AppState>>, UrlPath(run): UrlPath<String>) -> Response {
    let root = state.root.clone();
    let result = tokio::task::spawn_blocking(move || -> Option<Vec<Value>> {
        if !is_plain_name(&run) {
            return None;
        }
        let outputs = root.join("runs").join(&run).join("outputs");
        let mut stages: Vec<String> = std::fs::read_dir(&outputs)
            .ok()?
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| is_plain_name(name))
            .collect();
        stages.sort();
        let mut files = Vec::new();
        for stage in stages {
            let Some(dir) = output_dir(&root, &run, &stage) else {
                continue;
            };
            let Some(manifest) = std::fs::read_to_string(dir.join(crate::store::MANIFEST))
                .ok()
                .and_then(|text| serde_json::from_str::<crate::store::Manifest>(&text).ok())
            else {
                continue;
            };
            for (path, digest) in &manifest.files {
                files.push(json!({
                    "stage": stage,
                    "path": path,
                    "size": digest.size,
                    "hash": digest.hash,
                    "url": format!("/api/runs/{run}/files/{stage}/{path}"),
                }));
            }
        }
        Some(files)
    })
    .await
    .ok()
    .flatten();
    match result {
        Some(files) => axum::Json(json!({ "artifacts": files })).into_response(),
        None => ApiError::not_found("no such run").into_response(),
    }
}

/// `GET /api/runs/{run}/files/{stage}/{path}`: one output file, with HTTP Range. 404
/// for anything that does not resolve to a file inside the store (`..`, absolute
/// paths, symlinks leading out).
async fn download(
    State(state): State<Arc<AppState>>,
    UrlPath((run, stage, path)): UrlPath<(String, String, String)>,
    request: Request,
) -> Response {
    let not_found = || ApiError::not_found("no such file").into_response();
    let relative = Path::new(&path);
    if path.is_empty()
        || !relative
            .components()
            .all(|component| matches!(component, Component::Normal(_)))
    {
        return not_found();
    }
    let Some(dir) = output_dir(&state.root, &run, &stage) else {
        return not_found();
    };
    let Ok(file) = dir.join(relative).canonicalize() else {
        return not_found();
    };
    if !file.starts_with(&dir) || !file.is_file() {
        return not_found();
    }
    let (parts, _) = request.into_parts();
    let request = Request::from_parts(parts, Body::empty());
    match tower_http::services::ServeFile::new(file)
        .oneshot(request)
        .await
    {
        Ok(response) => response.map(Body::new),
        Err(error) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response()
        }
    }
}
