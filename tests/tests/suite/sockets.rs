//! Raw WebSocket helpers for tests that speak to the relay frame by frame:
//! waiting for its close code, and the automerge-repo handshake.

use std::time::Duration;

use converge_core::wire::{self, Message, PeerId};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// A client WebSocket, plain or TLS.
pub(crate) type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Reads until the relay closes: the close code, or `None` if the
/// connection ended without one. Panics if it is still open after 30 s.
pub(crate) async fn closed_with(socket: &mut Socket) -> Option<u16> {
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(m) = socket.next().await {
            match m {
                Ok(WsMessage::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .expect("the relay closes the connection")
}

/// The close code the relay ends `socket` with.
pub(crate) async fn close_code(socket: &mut Socket) -> u16 {
    closed_with(socket)
        .await
        .expect("a close frame with a code")
}

/// A `join` frame from peer `name`.
pub(crate) fn join(name: &str) -> WsMessage {
    WsMessage::Binary(
        wire::encode(&Message::Join {
            sender_id: PeerId::new(name).expect("valid"),
            metadata: None,
            supported_protocol_versions: Some(vec!["1".into()]),
        })
        .into(),
    )
}

/// Joins as `name` and waits for the relay's `peer` answer: the
/// connection is served.
pub(crate) async fn handshake(socket: &mut Socket, name: &str) {
    socket.send(join(name)).await.expect("send join");
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(m)) = socket.next().await {
            if let WsMessage::Binary(b) = m {
                if matches!(wire::decode(&b), Ok(Message::Peer { .. })) {
                    return;
                }
            }
        }
        panic!("{name}: the connection ended before the relay answered join");
    })
    .await
    .expect("the relay answers join");
}
