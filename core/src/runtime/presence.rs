//! Presence: who is looking at a context, and what they are doing.
//!
//! Compatible with automerge-repo 2.5's `Presence`: every message is an
//! ephemeral message on the document whose CBOR payload is
//! `{"__presence": {type, ...}}`, the peer being the ephemeral sender:
//!
//! - `snapshot` `{state}`: the sender's whole state (sent on start and to
//!   every newly seen peer);
//! - `update` `{channel, value}`: one named part of it changed;
//! - `heartbeat`: still here (sent when nothing else was sent for a
//!   heartbeat interval, 15 s by default);
//! - `goodbye`: leaving now.
//!
//! A peer not heard from for the time-to-live (45 s by default) is gone.
//! Presence is never written to storage.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Map, Value as Json};
use tokio::sync::broadcast;

use super::{DocHandle, RepoError};
use crate::engine::{Event, Timestamp};
use crate::wire::{cbor_to_json, json_to_cbor, PeerId};

const MARKER: &str = "__presence";

/// Timing of heartbeats and expiry.
#[derive(Clone, Copy, Debug)]
pub struct PresenceConfig {
    /// Send a heartbeat after this long without sending anything.
    pub heartbeat: Duration,
    /// Forget a peer not heard from for this long.
    pub ttl: Duration,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(15),
            ttl: Duration::from_secs(45),
        }
    }
}

/// Something happened to another peer's presence.
#[derive(Clone, Debug, PartialEq)]
pub enum PresenceEvent {
    /// A peer appeared, with its state.
    Joined {
        /// Who.
        peer: PeerId,
        /// Its state.
        state: Map<String, Json>,
    },
    /// A peer's state changed.
    Updated {
        /// Who.
        peer: PeerId,
        /// Its whole state now.
        state: Map<String, Json>,
    },
    /// A peer left (said goodbye, or went silent past the time-to-live).
    Left {
        /// Who.
        peer: PeerId,
        /// True if it said goodbye; false if it timed out.
        goodbye: bool,
    },
}

#[derive(Debug)]
struct PeerPresence {
    state: Map<String, Json>,
    last_seen: Timestamp,
}

#[derive(Debug)]
struct Shared {
    local: Map<String, Json>,
    peers: BTreeMap<PeerId, PeerPresence>,
    last_sent: Timestamp,
}

/// This peer's presence on one context, and everyone else's as seen here.
/// Dropping it stops heartbeats silently (others time it out);
/// [`Presence::stop`] says goodbye.
#[derive(Debug)]
pub struct Presence {
    handle: DocHandle,
    shared: Arc<Mutex<Shared>>,
    events: broadcast::Sender<PresenceEvent>,
    task: tokio::task::JoinHandle<()>,
}

/// The time now on the repo's clock (presence keeps the repo's time, so
/// a test on a manual clock steers heartbeats and expiry too).
fn now(handle: &DocHandle) -> Timestamp {
    handle.repo.clock().now()
}

/// How long ago `then` was, on the repo's clock.
fn since(handle: &DocHandle, then: Timestamp) -> Duration {
    Duration::from_millis(now(handle).0.saturating_sub(then.0))
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

async fn send(handle: &DocHandle, shared: &Mutex<Shared>, message: Json) -> Result<(), RepoError> {
    lock(shared).last_sent = now(handle);
    handle
        .broadcast(json_to_cbor(&json!({ MARKER: message })))
        .await
        .map(drop)
}

impl Presence {
    /// Starts presence on a context with an initial state (a JSON object;
    /// anything else counts as empty) and announces it.
    pub async fn start(
        handle: DocHandle,
        initial: Json,
        config: PresenceConfig,
    ) -> Result<Presence, RepoError> {
        let local = match initial {
            Json::Object(m) => m,
            _ => Map::new(),
        };
        let shared = Arc::new(Mutex::new(Shared {
            local: local.clone(),
            peers: BTreeMap::new(),
            last_sent: now(&handle),
        }));
        let (events, _) = broadcast::channel(256);
        let mut repo_events = handle.repo.events();
        send(
            &handle,
            &shared,
            json!({"type": "snapshot", "state": local}),
        )
        .await?;
        let task = {
            let (handle, shared, events) = (handle.clone(), shared.clone(), events.clone());
            tokio::spawn(async move {
                let tick = config
                    .heartbeat
                    .min(config.ttl / 4)
                    .max(Duration::from_millis(50));
                // Ticks every `tick` from now, catching up at once on
                // ticks missed (as a tokio interval does by default).
                let clock = handle.repo.clock().clone();
                let mut next_tick = clock.now();
                loop {
                    tokio::select! {
                        event = repo_events.recv() => match event {
                            Ok(Event::Ephemeral { document_id, sender_id, data, .. }) if &document_id == handle.id() => {
                                receive(&handle, &shared, &events, sender_id, &data).await;
                            }
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Lagged(missed)) => {
                                // Presence messages are ephemeral: lost ones
                                // are made good by the next update, snapshot
                                // or heartbeat (or the time-to-live).
                                tracing::warn!(missed, "presence fell behind the repo's events");
                            }
                            Err(broadcast::error::RecvError::Closed) => return,
                        },
                        _ = clock.sleep_until(next_tick) => {
                            next_tick = next_tick.plus(tick);
                            let last_sent = lock(&shared).last_sent;
                            let due = since(&handle, last_sent) >= config.heartbeat;
                            if due {
                                let _ = send(&handle, &shared, json!({"type": "heartbeat"})).await;
                            }
                            let expired: Vec<PeerId> = {
                                let mut s = lock(&shared);
                                let gone: Vec<PeerId> = s
                                    .peers
                                    .iter()
                                    .filter(|(_, p)| since(&handle, p.last_seen) > config.ttl)
                                    .map(|(id, _)| id.clone())
                                    .collect();
                                for id in &gone {
                                    s.peers.remove(id);
                                }
                                gone
                            };
                            for peer in expired {
                                let _ = events.send(PresenceEvent::Left { peer, goodbye: false });
                            }
                        }
                    }
                }
            })
        };
        Ok(Presence {
            handle,
            shared,
            events,
            task,
        })
    }

    /// Sets one channel of our state (e.g. `cursor`) and tells everyone.
    pub async fn set(&self, channel: &str, value: Json) -> Result<(), RepoError> {
        lock(&self.shared)
            .local
            .insert(channel.to_owned(), value.clone());
        send(
            &self.handle,
            &self.shared,
            json!({"type": "update", "channel": channel, "value": value}),
        )
        .await
    }

    /// Our own state.
    pub fn local(&self) -> Map<String, Json> {
        lock(&self.shared).local.clone()
    }

    /// Every other peer present, with its state.
    pub fn peers(&self) -> BTreeMap<PeerId, Map<String, Json>> {
        lock(&self.shared)
            .peers
            .iter()
            .map(|(id, p)| (id.clone(), p.state.clone()))
            .collect()
    }

    /// Joins, updates and departures as they happen. A receiver more than
    /// 256 events behind gets `RecvError::Lagged`; [`Presence::peers`]
    /// then says who is present now.
    pub fn events(&self) -> broadcast::Receiver<PresenceEvent> {
        self.events.subscribe()
    }

    /// Says goodbye and stops.
    pub async fn stop(self) -> Result<(), RepoError> {
        self.task.abort();
        send(&self.handle, &self.shared, json!({"type": "goodbye"})).await
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    handle: &DocHandle,
    shared: &Mutex<Shared>,
    events: &broadcast::Sender<PresenceEvent>,
    peer: PeerId,
    data: &[u8],
) {
    let Ok(Json::Object(mut envelope)) = cbor_to_json(data) else {
        return;
    };
    let Some(Json::Object(message)) = envelope.remove(MARKER) else {
        return;
    };
    let kind = message
        .get("type")
        .and_then(Json::as_str)
        .unwrap_or_default()
        .to_owned();
    let seen_at = now(handle);
    let (new_peer, event) = {
        let mut s = lock(shared);
        let new_peer = !s.peers.contains_key(&peer);
        let event = match kind.as_str() {
            "heartbeat" => {
                // Unknown peers' heartbeats are ignored: our snapshot below
                // makes them send theirs.
                if let Some(p) = s.peers.get_mut(&peer) {
                    p.last_seen = seen_at;
                }
                None
            }
            "goodbye" => s.peers.remove(&peer).map(|_| PresenceEvent::Left {
                peer: peer.clone(),
                goodbye: true,
            }),
            "update" | "snapshot" => {
                let entry = s.peers.entry(peer.clone()).or_insert_with(|| PeerPresence {
                    state: Map::new(),
                    last_seen: seen_at,
                });
                entry.last_seen = seen_at;
                if kind == "update" {
                    if let Some(channel) = message.get("channel").and_then(Json::as_str) {
                        let value = message.get("value").cloned().unwrap_or(Json::Null);
                        entry.state.insert(channel.to_owned(), value);
                    }
                } else if let Some(Json::Object(state)) = message.get("state") {
                    for (k, v) in state {
                        entry.state.insert(k.clone(), v.clone());
                    }
                }
                let state = entry.state.clone();
                Some(if new_peer {
                    PresenceEvent::Joined {
                        peer: peer.clone(),
                        state,
                    }
                } else {
                    PresenceEvent::Updated {
                        peer: peer.clone(),
                        state,
                    }
                })
            }
            _ => None,
        };
        (new_peer, event)
    };
    if new_peer && kind != "goodbye" {
        // A newcomer learns our state at once (as automerge-repo does).
        let local = lock(shared).local.clone();
        let _ = send(handle, shared, json!({"type": "snapshot", "state": local})).await;
    }
    if let Some(event) = event {
        let _ = events.send(event);
    }
}
