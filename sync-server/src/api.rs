//! The HTTP API for backend services (described in `openapi.json`).
//!
//! | method and path | does |
//! |---|---|
//! | `POST /v1/contexts` | create a context, empty or from a JSON object |
//! | `GET /v1/contexts?prefix=&after=&limit=` | list contexts by id |
//! | `GET /v1/contexts/{id}?path=&heads=` | read a context (or a subtree) as JSON, now or at heads |
//! | `POST /v1/contexts/{id}/ops` | apply operations ([`JsonOp`]s) as one change, synced at once |
//! | `GET /v1/contexts/{id}/history?offset=&limit=` | changes, newest first |
//! | `GET /v1/contexts/{id}/metadata` | created, updated, size, change count, last writer |
//! | `GET /v1/contexts/{id}/events?path=` | server-sent events: each change as patches |
//! | `GET /v1/sessions` | connected peers: peer id, storage id, address, connected since |
//!
//! The event stream sends `event: change` with `{origin, heads, patches}`
//! for each change under the path. A client too slow to keep up is never
//! skipped silently: it gets `event: lagged` with `{missed, heads}` (the
//! context's heads at that point), should re-read the context (at those
//! heads) and then apply the changes that follow, none of which are
//! already part of those heads.
//!
//! Errors are `{"error": {"code": "...", "message": "..."}}` with a 4xx
//! status; a request that fails changes nothing.

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use converge_core::context::{ContextError, JsonOp, JsonOpError, Op, Path};
use converge_core::engine::Origin;
use converge_core::runtime::{ContextEvent, DocHandle, Repo, RepoError};
use converge_core::storage::{DocKey, DocMeta, StorageKey};
use converge_core::wire::{decode_head, DocumentId};
use futures::Stream;
use serde::Deserialize;
use serde_json::{json, Value as JsonValue};

use crate::server::AppState;

/// The API routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/contexts", post(create).get(list))
        .route("/v1/contexts/{id}", get(read))
        .route("/v1/contexts/{id}/ops", post(apply_ops))
        .route("/v1/contexts/{id}/history", get(history))
        .route("/v1/contexts/{id}/metadata", get(metadata))
        .route("/v1/contexts/{id}/events", get(events))
        .route("/v1/sessions", get(sessions))
}

/// An API error: a status and a machine-readable code with a message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_json", e.body_text())
    }
}

impl From<ContextError> for ApiError {
    fn from(e: ContextError) -> ApiError {
        let (status, code) = match &e {
            ContextError::BadPath(_) => (StatusCode::BAD_REQUEST, "bad_path"),
            ContextError::NotFound(_) => (StatusCode::NOT_FOUND, "path_not_found"),
            ContextError::UnknownHeads(_) => (StatusCode::BAD_REQUEST, "unknown_heads"),
            ContextError::TypeMismatch { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "type_mismatch")
            }
            ContextError::IndexOutOfRange { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "index_out_of_range")
            }
            ContextError::Root(_) => (StatusCode::UNPROCESSABLE_ENTITY, "root"),
            _ => (StatusCode::UNPROCESSABLE_ENTITY, "rejected"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<RepoError> for ApiError {
    fn from(e: RepoError) -> ApiError {
        match e {
            RepoError::Unavailable(id) => ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no context {id}"),
            ),
            RepoError::Context(c) => c.into(),
            other => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                other.to_string(),
            ),
        }
    }
}

fn parse_id(id: &str) -> Result<DocumentId, ApiError> {
    id.parse().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_id",
            format!("`{id}` is not a context id: {e}"),
        )
    })
}

fn parse_path(path: Option<&str>) -> Result<Path, ApiError> {
    path.unwrap_or("")
        .parse()
        .map_err(|e: converge_core::context::BadPath| {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_path", e.to_string())
        })
}

fn parse_heads(heads: Option<&str>) -> Result<Option<Vec<automerge::ChangeHash>>, ApiError> {
    let Some(text) = heads.filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    text.split(['|', ','])
        .map(|h| {
            decode_head(h)
                .or_else(|_| h.parse::<automerge::ChangeHash>())
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "bad_heads",
                        format!("`{h}` is not a change hash"),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

async fn find(repo: &Repo, id: &DocumentId) -> Result<DocHandle, ApiError> {
    Ok(repo.find(id).await?)
}

fn hex_heads(heads: &[automerge::ChangeHash]) -> Vec<String> {
    heads.iter().map(|h| h.to_string()).collect()
}

// ------------------------------------------------------------------ create

async fn create(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let parsed = if body.iter().all(u8::is_ascii_whitespace) {
        JsonValue::Null
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_json",
                format!("the body is not JSON: {e}"),
            )
        })?
    };
    let initial = match parsed {
        JsonValue::Object(m) => Some(JsonValue::Object(m)),
        JsonValue::Null => None,
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_json",
                "the initial content must be a JSON object",
            ))
        }
    };
    let handle = state.repo.create(None).await?;
    if let Some(json) = initial {
        handle
            .context()
            .apply(
                vec![Op::MergeJson {
                    path: Path::root(),
                    json,
                }],
                Some("created over HTTP".into()),
            )
            .await?;
    }
    let heads = hex_heads(&handle.heads().await?);
    let body = json!({"id": handle.id().to_string(), "url": handle.url(), "heads": heads});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

// ------------------------------------------------------------------ read

#[derive(Deserialize)]
struct ReadQuery {
    path: Option<String>,
    heads: Option<String>,
}

async fn read(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<ReadQuery>,
) -> Result<Json<JsonValue>, ApiError> {
    let id = parse_id(&id)?;
    let path = parse_path(q.path.as_deref())?;
    let heads = parse_heads(q.heads.as_deref())?;
    let handle = find(&state.repo, &id).await?;
    let json = handle
        .with_doc(move |doc| converge_core::context::to_json(doc, &path, heads.as_deref()))
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no context {id}"),
            )
        })??;
    Ok(Json(json))
}

// ------------------------------------------------------------------ ops

#[derive(Deserialize)]
struct OpsBody {
    ops: Vec<JsonValue>,
    message: Option<String>,
}

/// Op `i` of a request, read as a [`JsonOp`].
fn parse_op(op: JsonValue, i: usize) -> Result<Op, ApiError> {
    let bad = |code, e: &dyn std::fmt::Display| {
        ApiError::new(StatusCode::BAD_REQUEST, code, format!("op {i}: {e}"))
    };
    let op: JsonOp = serde_json::from_value(op).map_err(|e| bad("bad_op", &e))?;
    op.into_op().map_err(|e| match e {
        JsonOpError::BadPath(e) => bad("bad_path", &e),
        other => bad("bad_op", &other),
    })
}

async fn apply_ops(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    body: Result<Json<OpsBody>, JsonRejection>,
) -> Result<Json<JsonValue>, ApiError> {
    let id = parse_id(&id)?;
    let Json(body) = body?;
    let ops = body
        .ops
        .into_iter()
        .enumerate()
        .map(|(i, op)| parse_op(op, i))
        .collect::<Result<Vec<_>, _>>()?;
    let handle = find(&state.repo, &id).await?;
    let change = handle.context().apply(ops, body.message).await?;
    let heads = hex_heads(&handle.heads().await?);
    Ok(Json(
        json!({"change": change.map(|h| h.to_string()), "heads": heads}),
    ))
}

// ------------------------------------------------------------------ history

#[derive(Deserialize)]
struct Page {
    offset: Option<usize>,
    limit: Option<usize>,
}

async fn history(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(page): Query<Page>,
) -> Result<Json<JsonValue>, ApiError> {
    let id = parse_id(&id)?;
    let handle = find(&state.repo, &id).await?;
    let (offset, limit) = (
        page.offset.unwrap_or(0),
        page.limit.unwrap_or(100).min(1000),
    );
    let changes = handle.context().history(offset, limit).await?;
    Ok(Json(
        json!({"offset": offset, "limit": limit, "changes": changes}),
    ))
}

// ------------------------------------------------------------------ metadata

async fn metadata(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<JsonValue>, ApiError> {
    let id = parse_id(&id)?;
    let handle = find(&state.repo, &id).await?;
    let meta = state.repo.meta(&id).await?;
    let size: usize = state
        .storage
        .range(&StorageKey::doc_prefix(&id))
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage", e.to_string()))?
        .iter()
        .filter(|(k, _)| matches!(k.classify(), Some(DocKey::Chunk(..))))
        .map(|(_, v)| v.len())
        .sum();
    let count = handle
        .with_doc(converge_core::context::change_count)
        .await?
        .unwrap_or(0);
    let heads = hex_heads(&handle.heads().await?);
    Ok(Json(json!({
        "id": id.to_string(),
        "url": handle.url(),
        "created_ms": meta.as_ref().map(|m| m.created_ms),
        "updated_ms": meta.as_ref().map(|m| m.updated_ms),
        "last_writer": meta.and_then(|m| m.last_writer),
        "size_bytes": size,
        "change_count": count,
        "heads": heads,
    })))
}

// ------------------------------------------------------------------ list

#[derive(Deserialize)]
struct ListQuery {
    prefix: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

async fn list(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<JsonValue>, ApiError> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    // The same source as the bindings' `list_documents`.
    let mut ids: BTreeMap<String, Option<DocMeta>> = BTreeMap::new();
    for (id, meta) in state.repo.documents_with_meta().await? {
        let id = id.to_string();
        if q.prefix.as_deref().is_some_and(|p| !id.starts_with(p)) {
            continue;
        }
        if q.after.as_deref().is_some_and(|a| id.as_str() <= a) {
            continue;
        }
        ids.insert(id, meta);
    }
    let page: Vec<JsonValue> = ids
        .iter()
        .take(limit)
        .map(|(id, meta)| json!({"id": id, "url": format!("automerge:{id}"), "updated_ms": meta.as_ref().map(|m| m.updated_ms)}))
        .collect();
    let next = (ids.len() > limit)
        .then(|| {
            page.last()
                .and_then(|p| p["id"].as_str().map(str::to_owned))
        })
        .flatten();
    Ok(Json(json!({"contexts": page, "next_after": next})))
}

// ------------------------------------------------------------------ events

#[derive(Deserialize)]
struct EventsQuery {
    path: Option<String>,
}

async fn events(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let id = parse_id(&id)?;
    let path = parse_path(q.path.as_deref())?;
    let handle = find(&state.repo, &id).await?;
    let stream = futures::stream::unfold(
        handle.context().subscribe(&path.to_string())?,
        |mut sub| async move {
            let (name, data) = match sub.next().await? {
                ContextEvent::Changed(change) => {
                    let origin = match &change.origin {
                        Origin::Local => json!("local"),
                        Origin::Remote(p) => json!({"peer": p.as_str()}),
                        Origin::Storage => json!("storage"),
                    };
                    let data = json!({
                        "origin": origin,
                        "heads": hex_heads(&change.heads),
                        "patches": change.patches,
                    });
                    ("change", data)
                }
                ContextEvent::Lagged { missed, heads } => (
                    "lagged",
                    json!({"missed": missed, "heads": hex_heads(&heads)}),
                ),
            };
            Some((
                Ok(SseEvent::default().event(name).data(data.to_string())),
                sub,
            ))
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

// ------------------------------------------------------------------ sessions

/// Every connected peer: peer id, storage id, address, connected since.
async fn sessions(State(state): State<AppState>) -> Result<Json<JsonValue>, ApiError> {
    let list = state.repo.sessions().await?;
    Ok(Json(json!({ "sessions": list })))
}
