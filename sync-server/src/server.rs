//! The relay's HTTP face: the automerge-repo WebSocket endpoint at `/`, a
//! health check at `/healthz`, and the HTTP API ([`crate::api`]).

use converge_core::transport::SocketSettings;
use std::future::Future;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use converge_core::engine::{Direction, Grant};
use converge_core::runtime::Repo;
use converge_core::transport::{drive, Incoming, Outgoing};
use futures::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

/// What every request handler can reach.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The relay's repo.
    pub repo: Repo,
    /// Largest message accepted.
    pub max_message_bytes: usize,
    /// Ping interval.
    pub ping_interval: Duration,
    /// The relay's storage (for metadata and listings).
    pub storage: std::sync::Arc<dyn converge_core::storage::Storage>,
    /// Checks tokens.
    pub auth: std::sync::Arc<crate::auth::Auth>,
    /// Counts connections and rates.
    pub gate: std::sync::Arc<crate::limits::Gate>,
    /// Browser origins allowed to open a WebSocket (empty: any).
    pub allowed_origins: std::sync::Arc<Vec<String>>,
}

/// The relay's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(websocket))
        .route("/healthz", get(|| async { "ok" }))
        .route("/openapi.json", get(openapi))
        .merge(
            crate::api::routes().layer(axum::middleware::from_fn_with_state(
                state.clone(),
                crate::api::rate_limited,
            )),
        )
        .fallback(crate::api::no_route)
        .method_not_allowed_fallback(crate::api::no_method)
        .with_state(state)
}

/// The TCP peer of a connection, plain or TLS.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

/// Plain TCP, Nagle off: small frames go out at once (Nagle's algorithm
/// would hold a keystroke back until the previous frame is acknowledged).
#[derive(Debug)]
pub struct PlainListener(pub TcpListener);

impl axum::serve::Listener for PlainListener {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, addr) = axum::serve::Listener::accept(&mut self.0).await;
        let _ = stream.set_nodelay(true);
        (stream, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, PlainListener>>
    for ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, PlainListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, crate::tls::TlsListener>>
    for ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, crate::tls::TlsListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}

/// The API's description, as served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

async fn openapi() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
}

/// [`serve`] over TLS: every connection's handshake done by `acceptor`.
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = crate::tls::TlsListener::new(listener, acceptor)?;
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<ClientAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// Serves until `shutdown` resolves, then stops accepting and returns once
/// open connections have wound down.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        PlainListener(listener),
        router(state).into_make_service_with_connect_info::<ClientAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

async fn websocket(
    State(state): State<AppState>,
    ConnectInfo(ClientAddr(remote)): ConnectInfo<ClientAddr>,
    headers: axum::http::HeaderMap,
    RawQuery(query): RawQuery,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Ok(upgrade) = upgrade else {
        return "Converge relay: connect with an automerge-repo WebSocket client to this URL.\n"
            .into_response();
    };
    // A browser names the page's origin; others send none. With an
    // allowlist, only listed origins (and clients without one) get in.
    if let Some(origin) = headers.get(axum::http::header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !state.allowed_origins.is_empty() && !state.allowed_origins.iter().any(|o| o == origin) {
            tracing::info!(%remote, origin, "refused a WebSocket from an origin not on the allowlist");
            return crate::api::origin_refused(origin).into_response();
        }
    }
    let ip = state.gate.client_ip(remote, &headers);
    let slot = match state.gate.admit(ip, state.max_message_bytes) {
        Ok(slot) => slot,
        Err(refused) => {
            tracing::warn!(%ip, %refused, "refused a connection");
            return crate::api::refused(refused).into_response();
        }
    };
    // Checked before the upgrade: without a valid token there is no
    // WebSocket at all, just a 401.
    let grant = match state.auth.authenticate(&headers, query.as_deref()) {
        Ok(grant) => grant,
        Err(e) => {
            tracing::info!(%remote, reason = %e, "refused a WebSocket without a valid token");
            return crate::api::unauthorized(e).into_response();
        }
    };
    // The client's settings too (`SocketSettings::tungstenite`); axum only
    // takes them one by one.
    let socket = SocketSettings::new(state.max_message_bytes);
    // Only what a connection needs is kept for its lifetime, not the
    // whole state.
    let (repo, ping) = (state.repo.clone(), state.ping_interval);
    upgrade
        .read_buffer_size(socket.read_buffer)
        .write_buffer_size(socket.write_buffer)
        .max_write_buffer_size(socket.max_write_buffer)
        .max_message_size(socket.max_message)
        .max_frame_size(socket.max_message)
        .on_upgrade(move |socket| connection(repo, ping, socket, remote, grant, slot))
}

/// A connection's task. Not an `async fn`: its arguments would stay in the
/// task for its whole life (the WebSocket alone is hundreds of bytes, and a
/// relay holds tens of thousands of connections), so the socket is split
/// and boxed first and only the halves go into the future.
fn connection(
    repo: Repo,
    ping_interval: Duration,
    socket: WebSocket,
    remote: SocketAddr,
    grant: Arc<Grant>,
    mut slot: crate::limits::Slot,
) -> impl Future<Output = ()> {
    let (sink, stream) = socket.split();
    // The slot goes with the reading half: it is given back when the
    // connection's stream is dropped, at the end of `drive`.
    let stream = stream.map(move |m| match m {
        Ok(Message::Binary(b)) if !slot.allow(b.len()) => {
            tracing::warn!(%remote, "connection over its message rate; closing");
            Incoming::RateLimited
        }
        Ok(Message::Binary(b)) => Incoming::Binary(b.to_vec()),
        Ok(Message::Text(_)) => Incoming::Text,
        Ok(Message::Ping(_) | Message::Pong(_)) => Incoming::Alive,
        Ok(Message::Close(_)) => Incoming::Close,
        Err(e) => {
            let text = e.to_string();
            if text.contains("too long") || text.contains("Space limit") {
                Incoming::TooBig
            } else {
                Incoming::Error(text)
            }
        }
    });
    let sink = sink.with(|o: Outgoing| {
        futures::future::ready(Ok::<_, axum::Error>(match o {
            Outgoing::Binary(b) => Message::Binary(b.into()),
            Outgoing::Ping => Message::Ping(Vec::new().into()),
            Outgoing::Close(code, reason) => Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })),
        }))
    });
    let (stream, sink) = (Box::pin(stream), Box::pin(sink));
    async move {
        let ended = drive(
            &repo,
            Direction::Incoming,
            Some(remote.to_string()),
            grant,
            stream,
            sink,
            Some(ping_interval),
        )
        .await;
        tracing::debug!(reason = %ended.reason, "connection ended");
    }
}
