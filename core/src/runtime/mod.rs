//! The tokio runtime: [`Repo`] and [`DocHandle`] drive an [`Engine`].
//!
//! One actor task owns the engine. Everything else talks to it through a
//! channel: handles send commands and edits, connection tasks send the
//! frames they read, the storage thread sends finished tasks. The actor
//! feeds each into the engine and acts on the output: frames go to each
//! connection's outbound queue, storage tasks to the storage thread (which
//! performs them one by one, in order), events to subscribers. When nothing
//! arrives it sleeps until the engine's next wake-up.
//!
//! - `repo.rs`: [`Repo`], [`RepoConfig`] and [`RepoError`];
//! - `handle.rs`: [`DocHandle`];
//! - `actor.rs`: the actor and what it is told;
//! - `outbound.rs`: each connection's [`OutboundQueue`];
//! - `storage_thread.rs`: the thread that performs storage tasks;
//! - `clock.rs`: where the engine's time comes from;
//! - `context.rs` and `presence.rs`: the Context and Presence APIs.
//!
//! [`Engine`]: crate::engine::Engine

mod actor;
mod clock;
mod context;
mod handle;
mod outbound;
mod presence;
mod repo;
mod storage_thread;

pub use clock::{Clock, ManualClock, SystemClock};
pub use context::{Context, ContextChange, ContextEvent, Subscription, View};
pub use handle::DocHandle;
pub use outbound::{CutSignal, Next, Outbound, OutboundQueue};
pub use presence::{Presence, PresenceConfig, PresenceEvent};
pub use repo::{
    load_or_create_storage_id, random_seed, Repo, RepoConfig, RepoError, Session,
    DEFAULT_EVENT_CAPACITY, DEFAULT_MAX_OUTBOUND_BYTES, DEFAULT_OUTBOUND_GRACE,
};

#[cfg(test)]
mod tests;
