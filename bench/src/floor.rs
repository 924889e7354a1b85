//! The floor: the least a relay can do. It completes the handshake and
//! forwards every document frame, as received, to the document's other
//! clients. No CRDT, no storage, no sync state: what any server costs above
//! this is the price of what it does beyond moving bytes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use converge_core::wire::{self, Message, PeerId};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;

type Subscribers = Arc<Mutex<HashMap<Vec<u8>, Vec<(u64, mpsc::UnboundedSender<WsMessage>)>>>>;

/// Serves until the process is stopped.
pub async fn serve(listen: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("floor listening on ws://{}", listener.local_addr()?);
    let docs: Subscribers = Arc::default();
    let me = PeerId::new("floor").expect("valid peer id");
    let mut next = 0u64;
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        next += 1;
        let (docs, me, conn) = (docs.clone(), me.clone(), next);
        tokio::spawn(async move {
            // A 4 KiB read buffer, as a lean relay would configure it.
            let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                .read_buffer_size(4 * 1024)
                .write_buffer_size(0);
            let Ok(ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(config)).await
            else {
                return;
            };
            let (mut sink, mut stream) = ws.split();
            let (tx, mut rx) = mpsc::unbounded_channel::<WsMessage>();
            let writer = tokio::spawn(async move {
                while let Some(m) = rx.recv().await {
                    if sink.send(m).await.is_err() {
                        break;
                    }
                }
            });
            let mut joined = Vec::new();
            while let Some(Ok(frame)) = stream.next().await {
                let WsMessage::Binary(bytes) = frame else {
                    continue;
                };
                // `sync` is forwarded; `request` only subscribes (an idle
                // client says which document it follows without every other
                // client hearing about it).
                let (document, forward) = match wire::decode(&bytes) {
                    Ok(Message::Join { sender_id, .. }) => {
                        let peer = Message::Peer {
                            sender_id: me.clone(),
                            target_id: sender_id,
                            metadata: None,
                            selected_protocol_version: "1".to_owned(),
                        };
                        let _ = tx.send(WsMessage::Binary(wire::encode(&peer).into()));
                        continue;
                    }
                    Ok(Message::Sync(m)) => (m.document_id, true),
                    Ok(Message::Request(m)) => (m.document_id, false),
                    _ => continue,
                };
                let key = document.as_bytes().to_vec();
                let mut docs = docs.lock().expect("lock");
                let subs = docs.entry(key.clone()).or_default();
                if !joined.contains(&key) {
                    subs.push((conn, tx.clone()));
                    joined.push(key);
                }
                if forward {
                    let frame = WsMessage::Binary(bytes);
                    subs.retain(|(c, s)| *c == conn || s.send(frame.clone()).is_ok());
                }
            }
            let mut docs = docs.lock().expect("lock");
            for key in joined {
                if let Some(subs) = docs.get_mut(&key) {
                    subs.retain(|(c, _)| *c != conn);
                }
            }
            drop(docs);
            writer.abort();
        });
    }
}
