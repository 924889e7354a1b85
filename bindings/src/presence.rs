//! Presence through the bindings: [`Context::start_presence`] and the
//! [`PresenceHandle`] it returns; [`PresenceListener`] hears about others.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use converge_core::runtime::{self, PresenceConfig, PresenceEvent};
use converge_core::wire::PeerId;

use crate::{invalid, parse_json, Context, ConvergeError, Rt};

/// Receives other peers' presence.
#[uniffi::export(with_foreign)]
pub trait PresenceListener: Send + Sync {
    /// A peer's state (JSON object) appeared or changed.
    fn on_update(&self, peer_id: String, state_json: String) -> Result<(), ConvergeError>;
    /// A peer left (`goodbye`) or timed out.
    fn on_leave(&self, peer_id: String, goodbye: bool) -> Result<(), ConvergeError>;
}

#[uniffi::export]
impl Context {
    /// Starts presence on this context with `state_json` (a JSON object);
    /// `listener` hears about other peers. `heartbeat_ms`/`ttl_ms` of 0
    /// mean automerge-repo's defaults (15 s / 45 s).
    pub fn start_presence(
        &self,
        state_json: String,
        heartbeat_ms: u64,
        ttl_ms: u64,
        listener: Arc<dyn PresenceListener>,
    ) -> Result<Arc<PresenceHandle>, ConvergeError> {
        let state = parse_json(&state_json)?;
        let mut config = PresenceConfig::default();
        if heartbeat_ms > 0 {
            config.heartbeat = std::time::Duration::from_millis(heartbeat_ms);
        }
        if ttl_ms > 0 {
            config.ttl = std::time::Duration::from_millis(ttl_ms);
        }
        let handle = self.ctx.handle().clone();
        let presence = self
            .rt
            .block_on(async move { runtime::Presence::start(handle, state, config).await })?;
        let mut events = presence.events();
        let presence = Arc::new(Mutex::new(Some(presence)));
        let shared = presence.clone();
        let task = self.rt.spawn(async move {
            // The peers the listener was told are present: after a lag, it
            // is brought up to date from what presence holds now.
            let mut told = BTreeSet::new();
            loop {
                let updates = match events.recv().await {
                    Ok(event) => vec![event],
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let now = shared
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .as_ref()
                            .map(runtime::Presence::peers)
                            .unwrap_or_default();
                        catch_up(&told, now)
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                for event in updates {
                    match &event {
                        PresenceEvent::Joined { peer, .. }
                        | PresenceEvent::Updated { peer, .. } => {
                            told.insert(peer.clone());
                        }
                        PresenceEvent::Left { peer, .. } => {
                            told.remove(peer);
                        }
                    }
                    let listener = listener.clone();
                    let _ = tokio::task::spawn_blocking(move || match event {
                        PresenceEvent::Joined { peer, state }
                        | PresenceEvent::Updated { peer, state } => listener.on_update(
                            peer.to_string(),
                            serde_json::Value::Object(state).to_string(),
                        ),
                        PresenceEvent::Left { peer, goodbye } => {
                            listener.on_leave(peer.to_string(), goodbye)
                        }
                    })
                    .await;
                }
            }
        });
        Ok(Arc::new(PresenceHandle {
            rt: self.rt.clone(),
            presence,
            task,
        }))
    }
}

/// What a presence listener that fell behind must hear to match `now`:
/// the state of every peer present, and a departure for each peer it was
/// told about that is gone (reported as not a goodbye, since which it was
/// is lost).
fn catch_up(
    told: &BTreeSet<PeerId>,
    now: BTreeMap<PeerId, serde_json::Map<String, serde_json::Value>>,
) -> Vec<PresenceEvent> {
    let mut events: Vec<PresenceEvent> = told
        .iter()
        .filter(|peer| !now.contains_key(*peer))
        .map(|peer| PresenceEvent::Left {
            peer: peer.clone(),
            goodbye: false,
        })
        .collect();
    events.extend(
        now.into_iter()
            .map(|(peer, state)| PresenceEvent::Updated { peer, state }),
    );
    events
}

/// This peer's presence on a context.
#[derive(Debug, uniffi::Object)]
pub struct PresenceHandle {
    rt: Arc<Rt>,
    presence: Arc<Mutex<Option<runtime::Presence>>>,
    task: tokio::task::JoinHandle<()>,
}

#[uniffi::export]
impl PresenceHandle {
    /// Sets one channel of our state (e.g. `cursor`) to a JSON value.
    pub fn set(&self, channel: String, value_json: String) -> Result<(), ConvergeError> {
        let value = parse_json(&value_json)?;
        let guard = self.presence.lock().unwrap_or_else(|p| p.into_inner());
        let presence = guard
            .as_ref()
            .ok_or_else(|| invalid("presence was stopped"))?;
        self.rt.block_on(presence.set(&channel, value))?;
        Ok(())
    }

    /// Other peers present now, as a JSON object keyed by peer id.
    pub fn peers_json(&self) -> String {
        let guard = self.presence.lock().unwrap_or_else(|p| p.into_inner());
        let peers = guard.as_ref().map(|p| p.peers()).unwrap_or_default();
        let map: serde_json::Map<String, serde_json::Value> = peers
            .into_iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::Object(v)))
            .collect();
        serde_json::Value::Object(map).to_string()
    }

    /// Says goodbye and stops.
    pub fn stop(&self) -> Result<(), ConvergeError> {
        self.task.abort();
        let presence = self
            .presence
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(p) = presence {
            self.rt.block_on(p.stop())?;
        }
        Ok(())
    }
}

impl Drop for PresenceHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str) -> PeerId {
        PeerId::new(name).expect("valid peer id")
    }

    /// A presence listener that fell behind hears that a peer it knew left
    /// and the current state of everyone present, known or not.
    #[test]
    fn catching_up_reports_departures_and_current_states() {
        let told: BTreeSet<PeerId> = [peer("alice"), peer("bob")].into();
        let mut state = serde_json::Map::new();
        state.insert("cursor".into(), serde_json::json!(3));
        let now = BTreeMap::from([(peer("bob"), state.clone()), (peer("carol"), state.clone())]);
        assert_eq!(
            catch_up(&told, now),
            vec![
                PresenceEvent::Left {
                    peer: peer("alice"),
                    goodbye: false
                },
                PresenceEvent::Updated {
                    peer: peer("bob"),
                    state: state.clone()
                },
                PresenceEvent::Updated {
                    peer: peer("carol"),
                    state
                },
            ]
        );
    }
}
