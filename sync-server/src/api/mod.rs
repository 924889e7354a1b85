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
//! | `GET /v1/sessions` | connected peers: peer id, storage id, address, subject, connected since |
//! | `GET /v1/admin/contexts/{id}/access` | a context's access list |
//! | `PUT /v1/admin/contexts/{id}/access` | give a user read or write (or `none`) |
//! | `POST /v1/admin/revoke` | close a user's (or a token's) connections, refuse its tokens |
//!
//! Requests carry the same tokens as WebSocket clients (see [`crate::auth`]):
//! reads need read on the context, ops need write, creating needs `create`;
//! listing, sessions, the admin routes and the metadata of contexts one
//! does not own need `admin`. No or a bad token is a 401; a context the
//! caller may not read is a 404, as one that does not exist (its existence
//! does not leak); lacking a further right is a 403.
//!
//! The event stream sends `event: change` with `{origin, heads, patches}`
//! for each change under the path. A client too slow to keep up is never
//! skipped silently: it gets `event: lagged` with `{missed, heads}` (the
//! context's heads at that point), should re-read the context (at those
//! heads) and then apply the changes that follow, none of which are
//! already part of those heads.
//!
//! Errors are `{"error": {"code": "...", "message": "..."}}` with a 4xx
//! status (503 when storage fails); a request that fails changes nothing.
//! Every rejection is in that shape, those of the query string, the URL
//! and the body included, and for unknown routes and methods too.
//!
//! What is refused as malformed (400) is exactly what `openapi.json`
//! declares invalid: an id outside the base58 alphabet, a path that is not
//! a JSON Pointer, heads that are neither hex nor base58, a `limit` outside
//! 1..=1000, `null` where an object or a string is required. A request that
//! is well formed but names what is not there is a 404 (an unknown context,
//! including an id whose checksum fails; a missing path), and one that is
//! well formed but impossible on this context is a 422 (heads it does not
//! have, a value that does not fit its `type`, a wrong kind of object).

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, Path as UrlPath, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use converge_core::context::{ContextError, JsonOp, JsonOpError, Op, Path};
use converge_core::engine::{Access, Acl, Grant, Origin};
use converge_core::runtime::{ContextEvent, DocHandle, Repo, RepoError};
use converge_core::storage::{DocKey, DocMeta, StorageKey};
use converge_core::wire::{decode_head, DocumentId};
use futures::Stream;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value as JsonValue};

use crate::server::AppState;

mod admin;

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
        .route(
            "/v1/admin/contexts/{id}/access",
            get(admin::get_access).put(admin::put_access),
        )
        .route("/v1/admin/revoke", post(admin::revoke))
}

/// Answers 429 (with `Retry-After`) to an HTTP API request over its
/// address's rate (see `Limits::http_requests_per_ip_per_sec`); the address
/// is found as for WebSockets (trusted proxies' `X-Forwarded-For`).
pub async fn rate_limited(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let remote = request
        .extensions()
        .get::<axum::extract::ConnectInfo<crate::server::ClientAddr>>()
        .map(|c| c.0 .0);
    if let Some(remote) = remote {
        let ip = state.gate.client_ip(remote, request.headers());
        if !state.gate.http_request(ip) {
            tracing::info!(%ip, "an HTTP API request over its address's rate");
            let mut response = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "limit",
                "too many requests from this address; slow down",
            )
            .into_response();
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
            return response;
        }
    }
    next.run(request).await
}

/// A 401 for a request without a usable token.
pub fn unauthorized(e: crate::auth::AuthError) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
}

/// A connection the limits keep out: 503 when the relay is full, 429 for
/// one address's limits.
pub fn refused(why: crate::limits::Refused) -> ApiError {
    let status = match why {
        crate::limits::Refused::Full(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::TOO_MANY_REQUESTS,
    };
    ApiError::new(status, "limit", why.to_string())
}

/// A WebSocket from a browser origin not on the allowlist.
pub fn origin_refused(origin: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "origin",
        format!("origin `{origin}` is not allowed"),
    )
}

fn forbidden(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!("this token may not {what}"),
    )
}

/// Who is asking: the grant of the request's token (or the anonymous one).
pub(crate) struct Caller(pub(crate) std::sync::Arc<Grant>);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        state
            .auth
            .authenticate(&parts.headers, parts.uri.query())
            .map(Caller)
            .map_err(unauthorized)
    }
}

impl Caller {
    pub(crate) fn admin(&self, what: &str) -> Result<(), ApiError> {
        if self.0.admin {
            Ok(())
        } else {
            Err(forbidden(what))
        }
    }

    /// The caller's access to `id` (its token and the context's list): a
    /// 404 if it may not even read it (as for a context that does not
    /// exist), a 403 if it may read but `want` more.
    async fn needs(
        &self,
        state: &AppState,
        id: &DocumentId,
        want: Access,
    ) -> Result<Option<Acl>, ApiError> {
        // An admin's right does not depend on the list: no need to read it.
        let (has, acl) = if self.0.admin {
            (Access::Write, None)
        } else {
            let acl = state.repo.acl(id).await?;
            (self.0.access(Some(&acl), id), Some(acl))
        };
        match has {
            Access::None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no context {id}"),
            )),
            has if has < want => Err(forbidden(&format!("{want} {id}"))),
            _ => Ok(acl),
        }
    }
}

/// The answer to a request no route takes, in the API's error shape.
pub async fn no_route() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such endpoint")
}

/// The answer to a method a route does not take.
pub async fn no_method() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

/// An API error: a status and a machine-readable code with a message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
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

impl From<BytesRejection> for ApiError {
    fn from(e: BytesRejection) -> ApiError {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "bad_body"
        };
        ApiError::new(status, code, e.body_text())
    }
}

/// The query string as `T`; a query that does not parse is a 400 in the
/// API's error shape (axum's own rejection is plain text).
struct ApiQuery<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(q)) => Ok(ApiQuery(q)),
            Err(e) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_query",
                e.body_text(),
            )),
        }
    }
}

/// The `{id}` of the URL, checked against the id's alphabet (a 400 if
/// outside it). Whether it is an id at all (its checksum) is asked by
/// [`ApiId::doc`] once the rest of the request is known to be well formed:
/// a malformed request is a 400 whatever the id.
pub(crate) struct ApiId(String);

impl<S: Send + Sync> FromRequestParts<S> for ApiId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let UrlPath(id) = UrlPath::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_id", e.body_text()))?;
        if !is_base58(&id) || id.len() > MAX_ID_LEN {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_id",
                format!("`{id}` is not a context id (base58, at most {MAX_ID_LEN} characters)"),
            ));
        }
        Ok(ApiId(id))
    }
}

impl ApiId {
    /// The document it names; one whose checksum fails names no context,
    /// a 404 like an id nobody created.
    pub(crate) fn doc(&self) -> Result<DocumentId, ApiError> {
        self.0.parse().map_err(|e| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no context {} ({e})", self.0),
            )
        })
    }
}

/// A `limit` of 1..=1000 (100 when absent), as `openapi.json` says.
fn page_limit(limit: Option<u64>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(100),
        Some(n @ 1..=1000) => Ok(n as usize),
        Some(n) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_query",
            format!("limit must be 1 to 1000, not {n}"),
        )),
    }
}

/// A request body read as JSON of `T`, whatever its content type (`curl
/// -d` sends a form type); `shape` tells the caller what was expected.
pub(crate) fn json_body<T: DeserializeOwned>(
    body: Result<axum::body::Bytes, BytesRejection>,
    shape: &str,
) -> Result<T, ApiError> {
    serde_json::from_slice(&body?).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("the body is not {shape}: {e}"),
        )
    })
}

/// For optional fields that may be absent but not `null`.
pub(crate) fn not_null<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

impl From<ContextError> for ApiError {
    fn from(e: ContextError) -> ApiError {
        let (status, code) = match &e {
            ContextError::BadPath(_) => (StatusCode::BAD_REQUEST, "bad_path"),
            ContextError::NotFound(_) => (StatusCode::NOT_FOUND, "path_not_found"),
            ContextError::UnknownHeads(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_heads"),
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

/// The base58 alphabet (no 0, O, I, l).
fn is_base58(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() && !matches!(b, b'0' | b'O' | b'I' | b'l'))
}

/// The longest id `openapi.json` allows (real ones are about 28).
const MAX_ID_LEN: usize = 64;

fn parse_path(path: Option<&str>) -> Result<Path, ApiError> {
    path.unwrap_or("")
        .parse()
        .map_err(|e: converge_core::context::BadPath| {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_path", e.to_string())
        })
}

/// Heads: change hashes, each 64 hex digits or base58 (as automerge-repo
/// writes them), separated by `|` or `,`. Malformed is a 400; well formed
/// but not a hash (a base58 checksum that fails) is a head this context
/// cannot have, a 422 like any unknown head.
fn parse_heads(heads: Option<&str>) -> Result<Option<Vec<automerge::ChangeHash>>, ApiError> {
    let Some(text) = heads.filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    text.split(['|', ','])
        .map(|h| {
            let hex = h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit());
            if hex {
                return h.parse::<automerge::ChangeHash>().map_err(|_| bad_head(h));
            }
            if !is_base58(h) || !BASE58_HEAD_LEN.contains(&h.len()) {
                return Err(bad_head(h));
            }
            decode_head(h).map_err(|_| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "unknown_heads",
                    format!("`{h}` is not a change of this context"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// How long a change hash is in base58check (36 bytes: about 49
/// characters), with room on both sides.
const BASE58_HEAD_LEN: std::ops::RangeInclusive<usize> = 40..=60;

fn bad_head(h: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "bad_heads",
        format!("`{h}` is not a change hash (64 hex digits or base58)"),
    )
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
    caller: Caller,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if !(caller.0.create || caller.0.admin) {
        return Err(forbidden("create contexts"));
    }
    let body = body?;
    // Only a body that is absent means "empty context": whitespace alone is
    // not JSON and is refused like any other malformed body.
    let initial = if body.is_empty() {
        None
    } else {
        let parsed: JsonValue = serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_json",
                format!("the body is not JSON: {e}"),
            )
        })?;
        Some(parsed)
    };
    // No body is an empty context; a body must be an object (`null` too
    // is refused).
    let initial = match initial {
        Some(JsonValue::Object(m)) => Some(JsonValue::Object(m)),
        None => None,
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_json",
                "the initial content must be a JSON object",
            ))
        }
    };
    let handle = state
        .repo
        .create_owned(None, caller.0.subject.clone())
        .await?;
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
    caller: Caller,
    id: ApiId,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> Result<Json<JsonValue>, ApiError> {
    let path = parse_path(q.path.as_deref())?;
    let heads = parse_heads(q.heads.as_deref())?;
    let id = id.doc()?;
    caller.needs(&state, &id, Access::Read).await?;
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
    #[serde(default, deserialize_with = "not_null")]
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
        // Well formed, but the value does not fit its `type` or the index
        // is beyond any list: impossible rather than malformed.
        other => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "wrong_value",
            format!("op {i}: {other}"),
        ),
    })
}

async fn apply_ops(
    State(state): State<AppState>,
    caller: Caller,
    id: ApiId,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Json<JsonValue>, ApiError> {
    let body: OpsBody = json_body(body, r#"{"ops": [...], "message"?: "..."}"#)?;
    let ops = body
        .ops
        .into_iter()
        .enumerate()
        .map(|(i, op)| parse_op(op, i))
        .collect::<Result<Vec<_>, _>>()?;
    let id = id.doc()?;
    caller.needs(&state, &id, Access::Write).await?;
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
    offset: Option<u32>,
    limit: Option<u64>,
}

async fn history(
    State(state): State<AppState>,
    caller: Caller,
    id: ApiId,
    ApiQuery(page): ApiQuery<Page>,
) -> Result<Json<JsonValue>, ApiError> {
    let limit = page_limit(page.limit)?;
    let offset = page.offset.unwrap_or(0) as usize;
    let id = id.doc()?;
    caller.needs(&state, &id, Access::Read).await?;
    let handle = find(&state.repo, &id).await?;
    let changes = handle.context().history(offset, limit).await?;
    Ok(Json(
        json!({"offset": offset, "limit": limit, "changes": changes}),
    ))
}

// ------------------------------------------------------------------ metadata

async fn metadata(
    State(state): State<AppState>,
    caller: Caller,
    id: ApiId,
) -> Result<Json<JsonValue>, ApiError> {
    let id = id.doc()?;
    // The list read for the right also says who owns it (none: an admin).
    if let Some(acl) = caller.needs(&state, &id, Access::Read).await? {
        if acl.owner.is_none() || acl.owner != caller.0.subject {
            return Err(forbidden("read the metadata of contexts it does not own"));
        }
    }
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
        "created_ms": meta.as_ref().and_then(|m| m.created_ms),
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
    limit: Option<u64>,
}

async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<JsonValue>, ApiError> {
    let limit = page_limit(q.limit)?;
    caller.admin("list contexts")?;
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
    caller: Caller,
    id: ApiId,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let path = parse_path(q.path.as_deref())?;
    let id = id.doc()?;
    caller.needs(&state, &id, Access::Read).await?;
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
                        Origin::Log => json!("log"),
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
async fn sessions(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<JsonValue>, ApiError> {
    caller.admin("list sessions")?;
    let list = state.repo.sessions().await?;
    Ok(Json(json!({ "sessions": list })))
}
