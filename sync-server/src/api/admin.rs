//! The admin routes of the HTTP API: access lists and revocation (see
//! [`super`] for the shape of requests and errors). All need `admin`.

use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use converge_core::engine::Access;
use serde::Deserialize;
use serde_json::{json, Value as JsonValue};

use super::{json_body, not_null, ApiError, ApiId, Caller};
use crate::server::AppState;

pub(super) async fn get_access(
    State(state): State<AppState>,
    caller: Caller,
    id: ApiId,
) -> Result<Json<JsonValue>, ApiError> {
    caller.admin("read access lists")?;
    let id = id.doc()?;
    let acl = state.repo.acl(&id).await?;
    Ok(Json(
        json!({"id": id.to_string(), "owner": acl.owner, "users": acl.users}),
    ))
}

#[derive(Deserialize)]
struct AccessBody {
    subject: String,
    access: Access,
}

pub(super) async fn put_access(
    State(state): State<AppState>,
    caller: Caller,
    id: ApiId,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Json<JsonValue>, ApiError> {
    caller.admin("change access lists")?;
    let body: AccessBody = json_body(
        body,
        r#"{"subject": "...", "access": "read"|"write"|"none"}"#,
    )?;
    let id = id.doc()?;
    let acl = state
        .repo
        .set_access(&id, body.subject, body.access)
        .await?;
    Ok(Json(
        json!({"id": id.to_string(), "owner": acl.owner, "users": acl.users}),
    ))
}

#[derive(Deserialize)]
struct RevokeBody {
    #[serde(default, deserialize_with = "not_null")]
    sub: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    jti: Option<String>,
}

pub(super) async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Json<JsonValue>, ApiError> {
    caller.admin("revoke")?;
    let body: RevokeBody = json_body(body, r#"{"sub"?: "...", "jti"?: "..."}"#)?;
    if body.sub.is_none() && body.jti.is_none() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            "name a `sub` or a `jti` to revoke",
        ));
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    state
        .auth
        .revoke(body.sub.as_deref(), body.jti.as_deref(), now_ms)
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage", e.to_string()))?;
    let closed = state.repo.revoke(body.sub, body.jti).await?;
    Ok(Json(json!({ "closed": closed })))
}
