//! A deterministic network simulator for [`Engine`]s.
//!
//! Every engine — clients and relays alike — runs in this one thread. A
//! seeded ChaCha generator decides every latency, loss, duplicate and
//! storage delay; a virtual clock jumps straight to the next scheduled
//! event. Given the same seed and the same actions, a run produces the same
//! trace, so a failure is replayed by rerunning its seed.
//!
//! What the simulated world can do:
//! - **Network.** Each link carries messages with a random latency, in
//!   order (like TCP) or, with `reorder`, out of order; it can lose them
//!   (which, as on any stream transport, breaks the connection) and
//!   duplicate them. Partitions cut links; the cut is noticed by each side
//!   only after a detection delay (as a ping timeout would), and links come
//!   back (re-dialled, as the runtime's reconnect loop would) when healed.
//! - **Storage.** Each node has a durable map. A storage task completes
//!   after a random delay, in order per node; only then is it durable.
//!   A crash loses every task not yet completed — unflushed writes.
//! - **Crashes.** A crashed node loses its engine and its pending writes;
//!   a restart builds a new engine over the durable map.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{Automerge, ObjType, ReadDoc, ScalarValue, ROOT};
use converge_core::engine::{
    CloseReason, Command, CommandId, CommandResult, ConnectionId, Direction, DocStatus, Engine,
    EngineConfig, Event, Grant, Input, Output, RelayPolicy, ReplicaKind, Timestamp,
};
use converge_core::storage::{
    BatchOp, DocKey, Storage, StorageError, StorageKey, StorageOp, StorageResult, TaskId,
};
use converge_core::wire::{self, DocumentId, PeerId, StorageId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Index of a node in the simulation.
pub type NodeId = usize;

/// What a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A relay: announces nothing, serves everything, keeps everything.
    Relay,
    /// A client: offers every document to every peer.
    Client,
}

/// Knobs of the simulated network and disks.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Message latency range, ms.
    pub latency: (u64, u64),
    /// Chance a message is lost. On a stream transport loss breaks the
    /// connection, so a lost message takes its connection down with it.
    pub drop: f64,
    /// Chance a message is delivered twice.
    pub duplicate: f64,
    /// Deliver messages on one link out of order (no stream transport
    /// does this; it tests that the engine stays safe if one did).
    pub reorder: bool,
    /// Storage task latency range, ms.
    pub storage_latency: (u64, u64),
    /// How long after a cut a side notices the connection is dead, ms.
    pub detect_after: (u64, u64),
    /// How long before a dropped link is re-dialled, ms.
    pub redial_after: (u64, u64),
    /// Chance that a message finds its node busy: it waits, with whatever
    /// else arrives within `batch_window` ms, and all are handed over as
    /// one batch (as the runtime does under load).
    pub batch: f64,
    /// How long a busy node lets messages gather, ms.
    pub batch_window: (u64, u64),
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            latency: (1, 40),
            drop: 0.0,
            duplicate: 0.0,
            reorder: false,
            storage_latency: (1, 20),
            detect_after: (200, 2000),
            redial_after: (100, 1000),
            batch: 0.0,
            batch_window: (1, 10),
        }
    }
}

/// One simulated peer.
#[derive(Debug)]
pub struct Node {
    /// Human-readable name used in failure reports.
    pub name: String,
    /// Client or relay.
    pub role: Role,
    /// The live engine; `None` while crashed.
    pub engine: Option<Engine>,
    config: EngineConfig,
    /// What has reached the disk.
    pub durable: SimStorage,
    /// Bumped by every crash; events from an older life are ignored.
    generation: u64,
    /// When the last scheduled storage task completes (tasks are FIFO).
    storage_busy_until: Timestamp,
    /// Results of commands, by id.
    pub results: BTreeMap<CommandId, CommandResult>,
    /// Every event the engine reported, in order.
    pub events: Vec<Event>,
    /// Connections this node's engine closed itself, with reasons.
    pub closed: Vec<(ConnectionId, CloseReason)>,
    /// Bytes of every message this node sent.
    pub bytes_sent: u64,
    /// Messages sent on connections opened with [`Sim::open_raw`].
    pub raw_out: Vec<(ConnectionId, wire::Message)>,
    wake_at: Option<Timestamp>,
    /// Messages that arrived while the node was held (see [`Sim::hold`]).
    held: Option<Vec<Input>>,
}

#[derive(Debug)]
struct Link {
    dialer: NodeId,
    listener: NodeId,
    /// Should be connected (the topology wants it).
    wanted: bool,
    /// The current incarnation, if connected or connecting.
    current: Option<(ConnectionId, ConnectionId)>,
    /// A redial is scheduled.
    redialing: bool,
    last_delivery: [Timestamp; 2],
}

#[derive(Debug)]
enum Ev {
    Open {
        link: usize,
        conns: (ConnectionId, ConnectionId),
    },
    Deliver {
        node: NodeId,
        generation: u64,
        conn: ConnectionId,
        bytes: Vec<u8>,
    },
    Closed {
        node: NodeId,
        generation: u64,
        conn: ConnectionId,
    },
    Storage {
        node: NodeId,
        generation: u64,
        task: TaskId,
        op: StorageOp,
    },
    Wake {
        node: NodeId,
        generation: u64,
    },
    Redial {
        link: usize,
    },
    Release {
        node: NodeId,
        generation: u64,
    },
}

/// The simulated world.
#[derive(Debug)]
pub struct Sim {
    /// The seed everything derives from.
    pub seed: u64,
    /// Network and disk behaviour; may be changed mid-run.
    pub net: NetConfig,
    /// The virtual clock.
    pub now: Timestamp,
    rng: ChaCha8Rng,
    /// The nodes, by id.
    pub nodes: Vec<Node>,
    links: Vec<Link>,
    queue: BTreeMap<(Timestamp, u64), Ev>,
    seq: u64,
    next_conn: u64,
    next_cmd: u64,
    /// Node pairs that cannot reach each other (smaller id first).
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Every document chunk that ever became durable anywhere, with the
    /// document it belongs to.
    archive: Vec<(String, Vec<u8>)>,
    /// Events processed so far.
    pub steps: u64,
    /// A running digest of everything that happened, for replay checks.
    pub trace: u64,
}

/// The start of simulated time: 2026-01-01, so change timestamps look real.
const EPOCH: Timestamp = Timestamp(1_767_225_600_000);

impl Sim {
    /// An empty world.
    pub fn new(seed: u64, net: NetConfig) -> Self {
        Self {
            seed,
            net,
            now: EPOCH,
            rng: ChaCha8Rng::seed_from_u64(seed),
            nodes: Vec::new(),
            links: Vec::new(),
            queue: BTreeMap::new(),
            seq: 0,
            next_conn: 0,
            next_cmd: 0,
            cut: BTreeSet::new(),
            archive: Vec::new(),
            steps: 0,
            trace: 0xcbf2_9ce4_8422_2325,
        }
    }

    /// Adds a node and returns its id.
    pub fn add_node(&mut self, name: &str, role: Role) -> NodeId {
        self.add_node_with(name, role, |_| {})
    }

    /// Adds a node whose engine configuration `tweak` may adjust.
    pub fn add_node_with(
        &mut self,
        name: &str,
        role: Role,
        tweak: impl FnOnce(&mut EngineConfig),
    ) -> NodeId {
        let id = self.nodes.len();
        let peer = PeerId::new(name).expect("simulation names are valid peer ids");
        let storage = StorageId::new(&format!("{name}-storage")).expect("valid storage id");
        let mut config = EngineConfig::new(peer, Some(storage), self.seed ^ (id as u64) << 32);
        config.resync_interval = Duration::from_secs(3);
        config.request_timeout = Duration::from_secs(10);
        config.handshake_timeout = Duration::from_secs(5);
        // Compact as soon as the chunks outweigh the snapshot, so small
        // simulated documents exercise compaction.
        config.compact_after_bytes = 0;
        if role == Role::Relay {
            config.policy = Arc::new(RelayPolicy);
        }
        tweak(&mut config);
        let engine = Engine::new(config.clone());
        self.nodes.push(Node {
            name: name.to_owned(),
            role,
            engine: Some(engine),
            config,
            durable: SimStorage::default(),
            generation: 0,
            storage_busy_until: self.now,
            results: BTreeMap::new(),
            events: Vec::new(),
            closed: Vec::new(),
            bytes_sent: 0,
            raw_out: Vec::new(),
            wake_at: None,
            held: None,
        });
        id
    }

    /// Wants a link where `dialer` connects to `listener`, and dials it.
    /// Two nodes share at most one link: if the other node already dials
    /// this one, that link is wanted again instead (two sockets between
    /// the same pair just replace each other).
    pub fn link(&mut self, dialer: NodeId, listener: NodeId) -> usize {
        if let Some(i) = self.links.iter().position(|l| {
            (l.dialer, l.listener) == (dialer, listener)
                || (l.dialer, l.listener) == (listener, dialer)
        }) {
            self.links[i].wanted = true;
            self.dial(i);
            return i;
        }
        self.links.push(Link {
            dialer,
            listener,
            wanted: true,
            current: None,
            redialing: false,
            last_delivery: [self.now; 2],
        });
        let i = self.links.len() - 1;
        self.dial(i);
        i
    }

    /// Stops wanting the link between two nodes and drops it.
    pub fn unlink(&mut self, a: NodeId, b: NodeId) {
        for i in 0..self.links.len() {
            let l = &self.links[i];
            if (l.dialer, l.listener) == (a, b) || (l.dialer, l.listener) == (b, a) {
                self.links[i].wanted = false;
                self.drop_link(i);
            }
        }
    }

    /// Cuts every link between the two groups until [`Sim::heal`].
    pub fn partition(&mut self, group: &[NodeId]) {
        let n = self.nodes.len();
        for &a in group {
            for b in 0..n {
                if !group.contains(&b) {
                    self.cut.insert((a.min(b), a.max(b)));
                }
            }
        }
        for i in 0..self.links.len() {
            if self.is_cut(self.links[i].dialer, self.links[i].listener) {
                self.drop_link(i);
            }
        }
    }

    /// Removes every partition and re-dials every wanted link.
    pub fn heal(&mut self) {
        self.cut.clear();
        for i in 0..self.links.len() {
            if self.links[i].wanted && self.links[i].current.is_none() {
                self.dial(i);
            }
        }
    }

    fn is_cut(&self, a: NodeId, b: NodeId) -> bool {
        self.cut.contains(&(a.min(b), a.max(b)))
    }

    fn alive(&self, n: NodeId) -> bool {
        self.nodes[n].engine.is_some()
    }

    fn dial(&mut self, link: usize) {
        let l = &self.links[link];
        if l.current.is_some() || !l.wanted || self.is_cut(l.dialer, l.listener) {
            return;
        }
        if !self.alive(l.dialer) || !self.alive(l.listener) {
            return;
        }
        let conns = (
            ConnectionId(self.next_conn),
            ConnectionId(self.next_conn + 1),
        );
        self.next_conn += 2;
        self.links[link].current = Some(conns);
        let at = self.later(self.net.latency);
        self.schedule(at, Ev::Open { link, conns });
    }

    /// Takes a link down; each live side notices after a detection delay.
    fn drop_link(&mut self, link: usize) {
        let Some((ca, cb)) = self.links[link].current.take() else {
            return;
        };
        let (a, b) = (self.links[link].dialer, self.links[link].listener);
        for (node, conn) in [(a, ca), (b, cb)] {
            let at = self.later(self.net.detect_after);
            let generation = self.nodes[node].generation;
            self.schedule(
                at,
                Ev::Closed {
                    node,
                    generation,
                    conn,
                },
            );
        }
        self.schedule_redial(link);
    }

    fn schedule_redial(&mut self, link: usize) {
        if self.links[link].wanted && !self.links[link].redialing {
            self.links[link].redialing = true;
            let at = self.later(self.net.redial_after);
            self.schedule(at, Ev::Redial { link });
        }
    }

    fn later(&mut self, range: (u64, u64)) -> Timestamp {
        Timestamp(self.now.0 + self.rng.random_range(range.0..=range.1))
    }

    fn schedule(&mut self, at: Timestamp, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    fn mix(&mut self, x: u64) {
        self.trace = (self.trace ^ x).wrapping_mul(0x0100_0000_01b3);
    }

    /// Crashes a node: its engine and its unflushed writes are gone, and
    /// its peers notice after a while.
    pub fn crash(&mut self, n: NodeId) {
        if self.nodes[n].engine.take().is_none() {
            return;
        }
        self.nodes[n].generation += 1;
        self.nodes[n].wake_at = None;
        self.nodes[n].held = None;
        self.nodes[n].storage_busy_until = self.now;
        for i in 0..self.links.len() {
            if self.links[i].dialer == n || self.links[i].listener == n {
                self.drop_link(i);
            }
        }
    }

    /// Restarts a crashed node over its durable storage.
    pub fn restart(&mut self, n: NodeId) {
        if self.alive(n) {
            return;
        }
        let mut config = self.nodes[n].config.clone();
        config.seed = config
            .seed
            .wrapping_add(self.nodes[n].generation.wrapping_mul(0x9e37));
        self.nodes[n].engine = Some(Engine::new(config));
        for i in 0..self.links.len() {
            if self.links[i].dialer == n || self.links[i].listener == n {
                self.dial(i);
            }
        }
    }

    /// Issues a command on a node; returns its id (results land in
    /// `nodes[n].results`). Does nothing on a crashed node.
    pub fn command(&mut self, n: NodeId, command: Command) -> Option<CommandId> {
        self.next_cmd += 1;
        let id = CommandId(self.next_cmd);
        let now = self.now;
        let out = self.nodes[n]
            .engine
            .as_mut()?
            .handle(now, Input::Command(id, command));
        self.apply(n, out);
        Some(id)
    }

    /// Creates a document on node `n` from `initial` and runs until the
    /// command completes; returns its id.
    pub fn create(&mut self, n: NodeId, initial: &Automerge) -> DocumentId {
        let cmd = self
            .command(
                n,
                Command::Create {
                    owner: None,
                    initial: Some(initial.save()),
                },
            )
            .expect("node is alive");
        match self.nodes[n].results.get(&cmd) {
            Some(CommandResult::Create(Ok(id))) => id.clone(),
            other => panic!("create failed: {other:?}"),
        }
    }

    /// Edits a document on node `n` if it is ready there; returns whether
    /// the edit happened.
    pub fn edit(&mut self, n: NodeId, doc: &DocumentId, f: impl FnOnce(&mut Automerge)) -> bool {
        let now = self.now;
        let Some(engine) = self.nodes[n].engine.as_mut() else {
            return false;
        };
        match engine.change(now, doc, f) {
            Ok(((), out)) => {
                self.apply(n, out);
                true
            }
            Err(_) => false,
        }
    }

    /// Feeds raw bytes to node `n` as if they arrived on `conn` (for
    /// hostile-input tests).
    pub fn inject(&mut self, n: NodeId, conn: ConnectionId, bytes: Vec<u8>) {
        let now = self.now;
        if let Some(engine) = self.nodes[n].engine.as_mut() {
            let out = engine.handle(now, Input::Received { conn, bytes });
            self.apply(n, out);
        }
    }

    /// Opens a connection to node `n` that no simulated node owns: the test
    /// plays the other end with [`Sim::inject`]. What `n` sends on it is
    /// collected in `nodes[n].raw_out`.
    pub fn open_raw(&mut self, n: NodeId, conn: ConnectionId) {
        self.feed(
            n,
            Input::Connected {
                conn,
                direction: Direction::Incoming,
                grant: Grant::everything().into(),
            },
        );
    }

    /// The connection node `a` uses to talk to node `b`, if connected.
    pub fn conn_between(&self, a: NodeId, b: NodeId) -> Option<ConnectionId> {
        self.links.iter().find_map(|l| match l.current {
            Some((ca, _)) if l.dialer == a && l.listener == b => Some(ca),
            Some((_, cb)) if l.dialer == b && l.listener == a => Some(cb),
            _ => None,
        })
    }

    /// Acts on an engine's output: sends, closes, storage, results, wake.
    fn apply(&mut self, n: NodeId, out: Output) {
        let generation = self.nodes[n].generation;
        for send in out.sends {
            let bytes = wire::encode(&send.message);
            self.mix(bytes.len() as u64 ^ send.conn.0 << 40);
            self.nodes[n].bytes_sent += bytes.len() as u64;
            if self.link_of(n, send.conn).is_none() {
                self.nodes[n].raw_out.push((send.conn, send.message));
                continue;
            }
            self.transmit(n, send.conn, bytes);
        }
        for close in out.closes {
            self.nodes[n].closed.push((close.conn, close.reason));
            if let Some(i) = self.link_of(n, close.conn) {
                // The engine already forgot its end; only the far end needs
                // telling, which it learns after the usual latency.
                let (a, b) = (self.links[i].dialer, self.links[i].listener);
                let other = if a == n { b } else { a };
                if let Some((ca, cb)) = self.links[i].current.take() {
                    let far = if a == n { cb } else { ca };
                    let at = self.later(self.net.latency);
                    let g = self.nodes[other].generation;
                    self.schedule(
                        at,
                        Ev::Closed {
                            node: other,
                            generation: g,
                            conn: far,
                        },
                    );
                }
                self.schedule_redial(i);
            }
        }
        for task in out.storage {
            let delay = self.later(self.net.storage_latency);
            let at = delay.max(self.nodes[n].storage_busy_until);
            self.nodes[n].storage_busy_until = at;
            self.schedule(
                at,
                Ev::Storage {
                    node: n,
                    generation,
                    task: task.id,
                    op: task.op,
                },
            );
        }
        for (cmd, result) in out.completed {
            self.nodes[n].results.insert(cmd, result);
        }
        self.nodes[n].events.extend(out.events);
        if let Some(at) = out.next_wakeup {
            if self.nodes[n].wake_at.is_none_or(|w| at < w || w < self.now) {
                self.nodes[n].wake_at = Some(at);
                self.schedule(
                    at,
                    Ev::Wake {
                        node: n,
                        generation,
                    },
                );
            }
        }
    }

    fn link_of(&self, n: NodeId, conn: ConnectionId) -> Option<usize> {
        self.links.iter().position(|l| match l.current {
            Some((ca, cb)) => (l.dialer == n && ca == conn) || (l.listener == n && cb == conn),
            None => false,
        })
    }

    fn transmit(&mut self, from: NodeId, conn: ConnectionId, bytes: Vec<u8>) {
        let Some(i) = self.link_of(from, conn) else {
            return;
        };
        let (ca, cb) = self.links[i].current.expect("link_of found a current link");
        let (to, to_conn, dir) = if self.links[i].dialer == from {
            (self.links[i].listener, cb, 0)
        } else {
            (self.links[i].dialer, ca, 1)
        };
        if self.is_cut(from, to) {
            return;
        }
        // A stream transport (TCP, WebSocket) never loses one message and
        // delivers the next: loss shows up as a broken connection, which
        // both sides notice and the dialler re-dials.
        if self.rng.random_bool(self.net.drop) {
            self.drop_link(i);
            return;
        }
        let copies = if self.rng.random_bool(self.net.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut at = self.later(self.net.latency);
            if !self.net.reorder {
                at = at.max(self.links[i].last_delivery[dir]);
                self.links[i].last_delivery[dir] = at;
            }
            let generation = self.nodes[to].generation;
            self.schedule(
                at,
                Ev::Deliver {
                    node: to,
                    generation,
                    conn: to_conn,
                    bytes: bytes.clone(),
                },
            );
        }
    }

    /// Processes one event; returns false when there is none.
    pub fn step(&mut self) -> bool {
        let Some(((at, _), ev)) = self.queue.pop_first() else {
            return false;
        };
        self.now = self.now.max(at);
        self.steps += 1;
        self.mix(at.0);
        match ev {
            Ev::Open { link, conns } => {
                if self.links[link].current != Some(conns) {
                    return true;
                }
                let (a, b) = (self.links[link].dialer, self.links[link].listener);
                if !self.alive(a) || !self.alive(b) || self.is_cut(a, b) {
                    self.links[link].current = None;
                    self.schedule_redial(link);
                    return true;
                }
                self.feed(
                    b,
                    Input::Connected {
                        conn: conns.1,
                        direction: Direction::Incoming,
                        grant: Grant::everything().into(),
                    },
                );
                self.feed(
                    a,
                    Input::Connected {
                        conn: conns.0,
                        direction: Direction::Outgoing,
                        grant: Grant::everything().into(),
                    },
                );
            }
            Ev::Deliver {
                node,
                generation,
                conn,
                bytes,
            } => {
                if self.nodes[node].generation == generation {
                    if std::env::var_os("CONVERGE_SIM_TRACE").is_some() {
                        let m = wire::decode(&bytes);
                        let detail = match &m {
                            Ok(wire::Message::Sync(d)) | Ok(wire::Message::Request(d)) => {
                                match automerge::sync::Message::decode(&d.data) {
                                    Ok(sm) => format!(
                                        "doc={} heads={:?} need={:?} have={:?} changes={:?}",
                                        &d.document_id.to_string()[..6],
                                        sm.heads
                                            .iter()
                                            .map(|h| hex::encode(&h.0[..3]))
                                            .collect::<Vec<_>>(),
                                        sm.need
                                            .iter()
                                            .map(|h| hex::encode(&h.0[..3]))
                                            .collect::<Vec<_>>(),
                                        sm.have
                                            .iter()
                                            .map(|h| h.last_sync.len())
                                            .collect::<Vec<_>>(),
                                        sm.changes
                                            .iter()
                                            .map(|c| {
                                                match automerge::Change::from_bytes(c.to_vec()) {
                                                    Ok(c) => hex::encode(&c.hash().0[..3]),
                                                    Err(_) => match automerge::Automerge::load(c) {
                                                        Ok(d) => format!(
                                                            "doc{:?}",
                                                            d.get_changes(&[])
                                                                .iter()
                                                                .map(|c| hex::encode(
                                                                    &c.hash().0[..3]
                                                                ))
                                                                .collect::<Vec<_>>()
                                                        ),
                                                        Err(_) => format!("?{}", c.len()),
                                                    },
                                                }
                                            })
                                            .collect::<Vec<_>>()
                                    ),
                                    Err(e) => e.to_string(),
                                }
                            }
                            _ => String::new(),
                        };
                        eprintln!(
                            "t={} -> {} {conn}: {:?} {detail}",
                            self.now.0 - EPOCH.0,
                            self.nodes[node].name,
                            m.as_ref()
                                .map(|m| (m.type_name(), m.sender_id().map(|s| s.to_string())))
                        );
                    }
                    self.mix(bytes.len() as u64);
                    let input = Input::Received { conn, bytes };
                    if self.nodes[node].held.is_none()
                        && self.net.batch > 0.0
                        && self.rng.random_bool(self.net.batch)
                    {
                        // Busy: gather for a while, then hand over at once.
                        self.hold(node);
                        let at = self.later(self.net.batch_window);
                        self.schedule(at, Ev::Release { node, generation });
                    }
                    match &mut self.nodes[node].held {
                        Some(held) => held.push(input),
                        None => self.feed(node, input),
                    }
                }
            }
            Ev::Closed {
                node,
                generation,
                conn,
            } => {
                if self.nodes[node].generation == generation {
                    self.feed(node, Input::Disconnected { conn });
                }
            }
            Ev::Storage {
                node,
                generation,
                task,
                op,
            } => {
                if self.nodes[node].generation == generation {
                    let result = self.perform(node, op);
                    self.feed(node, Input::Storage { task, result });
                }
            }
            Ev::Wake { node, generation } => {
                if self.nodes[node].generation == generation {
                    if self.nodes[node].wake_at.is_some_and(|w| w <= self.now) {
                        self.nodes[node].wake_at = None;
                    }
                    self.feed(node, Input::Tick);
                }
            }
            Ev::Release { node, generation } => {
                if self.nodes[node].generation == generation {
                    self.release(node);
                }
            }
            Ev::Redial { link } => {
                self.links[link].redialing = false;
                self.dial(link);
            }
        }
        true
    }

    fn feed(&mut self, n: NodeId, input: Input) {
        let now = self.now;
        if let Some(engine) = self.nodes[n].engine.as_mut() {
            let trace = std::env::var_os("CONVERGE_SIM_TRACE").is_some();
            let what = if trace {
                format!("{input:?}").chars().take(160).collect::<String>()
            } else {
                String::new()
            };
            let out = engine.handle(now, input);
            if trace {
                eprintln!(
                    "  {} <- {what}\n     => sends {} closes {:?} storage {:?} events {:?}",
                    self.nodes[n].name,
                    out.sends.len(),
                    out.closes,
                    out.storage
                        .iter()
                        .map(|t| match &t.op {
                            StorageOp::Put(k, v) if k.to_string().contains("incremental") => {
                                format!("Put(incremental len {})", v.len())
                            }
                            op => format!("{op:?}").chars().take(90).collect::<String>(),
                        })
                        .collect::<Vec<_>>(),
                    out.events
                        .iter()
                        .map(|e| format!("{e:?}").chars().take(80).collect::<String>())
                        .collect::<Vec<_>>()
                );
            }
            self.apply(n, out);
        }
    }

    /// Performs a storage op on the node's durable store (it is durable
    /// from this moment) with the runtime's own code, and archives every
    /// document chunk written.
    fn perform(&mut self, n: NodeId, op: StorageOp) -> StorageResult {
        let result = converge_core::engine::perform(&self.nodes[n].durable, op);
        self.archive
            .extend(self.nodes[n].durable.take_written_chunks());
        result
    }

    /// From now on, messages arriving at node `n` wait until
    /// [`Sim::release`] hands them over in one batch, as the runtime does
    /// with whatever queued up while the engine was busy.
    pub fn hold(&mut self, n: NodeId) {
        self.nodes[n].held.get_or_insert_with(Vec::new);
    }

    /// Hands node `n` every message held since [`Sim::hold`], as one batch
    /// (`Engine::handle_batch`), and stops holding.
    pub fn release(&mut self, n: NodeId) {
        let inputs = self.nodes[n].held.take().unwrap_or_default();
        let now = self.now;
        if let Some(engine) = self.nodes[n].engine.as_mut() {
            let out = engine.handle_batch(now, inputs);
            self.apply(n, out);
        }
    }

    /// Runs events until none is left; panics (with the seed) if that takes
    /// more than `max_steps` — a livelock.
    pub fn run_until_quiescent(&mut self, max_steps: u64) {
        let start = self.steps;
        while self.step() {
            if self.steps - start > max_steps {
                panic!(
                    "seed {}: no quiescence after {max_steps} steps (livelock?); replay with CONVERGE_SIM_SEED={}",
                    self.seed, self.seed
                );
            }
        }
    }

    /// Runs events scheduled up to `now + ms`, then sets the clock there.
    pub fn advance(&mut self, ms: u64) {
        let until = Timestamp(self.now.0 + ms);
        while let Some(((at, _), _)) = self.queue.first_key_value() {
            if *at > until {
                break;
            }
            self.step();
        }
        self.now = self.now.max(until);
    }

    /// Brings everything back: restarts crashed nodes, heals partitions,
    /// stops losing and duplicating messages, and re-wants every link.
    pub fn heal_all(&mut self) {
        self.net.drop = 0.0;
        self.net.duplicate = 0.0;
        for n in 0..self.nodes.len() {
            self.restart(n);
        }
        for l in &mut self.links {
            l.wanted = true;
        }
        self.heal();
    }

    /// A reference document holding every change that ever reached a disk
    /// anywhere plus every change any live replica holds.
    pub fn reference(&self, doc: &DocumentId) -> Automerge {
        let mut reference = Automerge::new();
        let name = doc.to_string();
        for (owner, chunk) in &self.archive {
            if *owner == name {
                reference
                    .load_incremental(chunk)
                    .expect("archived chunks load");
            }
        }
        for node in &self.nodes {
            if let Some(am) = node.engine.as_ref().and_then(|e| e.document(doc)) {
                reference
                    .load_incremental(&am.save())
                    .expect("live replicas save and load");
            }
        }
        reference
    }
}

/// Edits a simulation document in a few different ways, chosen by `pick`:
/// set a key in a map, type into the text, push to the list, bump the
/// counter.
pub fn random_edit(doc: &mut Automerge, pick: u64, time: i64) {
    let opts = CommitOptions::default()
        .with_time(time)
        .with_message(format!("edit {pick}"));
    let _ = doc.transact_with::<_, _, automerge::AutomergeError, _>(
        |_| opts,
        |tx| {
            match pick % 4 {
                0 => {
                    tx.put(ROOT, format!("k{}", pick % 7), pick as i64)?;
                }
                1 => {
                    if let Some((_, text)) = tx.get(ROOT, "text")? {
                        let len = tx.length(&text);
                        let at = (pick as usize / 4) % (len + 1);
                        tx.splice_text(&text, at, 0, &format!("{}", pick % 10))?;
                    }
                }
                2 => {
                    if let Some((_, list)) = tx.get(ROOT, "list")? {
                        let len = tx.length(&list);
                        tx.insert(&list, len, pick as i64)?;
                    }
                }
                _ => {
                    if tx.get(ROOT, "counter")?.is_some() {
                        tx.increment(ROOT, "counter", 1)?;
                    }
                }
            }
            Ok(())
        },
    );
}

/// The initial shape of a simulation document: text, list, counter.
pub fn seed_document() -> Automerge {
    let mut doc = Automerge::new().with_actor(automerge::ActorId::from(vec![0u8; 16]));
    let _ = doc.transact_with::<_, _, automerge::AutomergeError, _>(
        |_| CommitOptions::default().with_time(0),
        |tx| {
            tx.put_object(ROOT, "text", ObjType::Text)?;
            tx.put_object(ROOT, "list", ObjType::List)?;
            tx.put(ROOT, "counter", ScalarValue::counter(0))?;
            Ok(())
        },
    );
    doc
}

/// The document as JSON, for comparing replicas.
pub fn to_json(doc: &Automerge) -> serde_json::Value {
    serde_json::to_value(automerge::AutoSerde::from(doc)).expect("documents serialize")
}

/// Checks that every live node holding `doc` has the reference's heads and
/// contents, and that every listed node holds it. Returns a description of
/// the first difference.
pub fn check_converged(sim: &Sim, doc: &DocumentId, must_hold: &[NodeId]) -> Result<(), String> {
    let reference = sim.reference(doc);
    let want_heads = reference.get_heads();
    let want_json = to_json(&reference);
    for (i, node) in sim.nodes.iter().enumerate() {
        let Some(engine) = &node.engine else {
            return Err(format!("{} is still crashed", node.name));
        };
        let status = engine.status(doc);
        if must_hold.contains(&i) && status != Some(DocStatus::Ready) {
            return Err(format!(
                "{} does not hold the document (status {status:?})",
                node.name
            ));
        }
        if status != Some(DocStatus::Ready) {
            continue;
        }
        let heads = engine.heads(doc).unwrap_or_default();
        if heads != want_heads {
            return Err(format!(
                "{} has heads {heads:?}, reference has {want_heads:?}",
                node.name
            ));
        }
        if let Some(am) = engine.document(doc) {
            let json = to_json(am);
            if json != want_json {
                return Err(format!(
                    "{} has {json}, reference has {want_json}",
                    node.name
                ));
            }
        }
    }
    Ok(())
}

/// A simulated node's disk: a map behind the [`Storage`] trait, so the
/// simulator runs storage ops through the same code as the runtime, and a
/// record of the document chunks written since last asked (for the
/// archive every change must be found in).
#[derive(Debug, Default)]
pub struct SimStorage {
    inner: Mutex<SimDisk>,
}

#[derive(Debug, Default)]
struct SimDisk {
    map: BTreeMap<StorageKey, Vec<u8>>,
    written_chunks: Vec<(String, Vec<u8>)>,
}

impl SimStorage {
    fn lock(&self) -> MutexGuard<'_, SimDisk> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every entry, in key order.
    pub fn entries(&self) -> BTreeMap<StorageKey, Vec<u8>> {
        self.lock().map.clone()
    }

    /// The document chunks written since the last call: (document, bytes).
    fn take_written_chunks(&self) -> Vec<(String, Vec<u8>)> {
        std::mem::take(&mut self.lock().written_chunks)
    }
}

impl Storage for SimStorage {
    fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.lock().map.get(key).cloned())
    }

    fn range(&self, prefix: &StorageKey) -> Result<Vec<(StorageKey, Vec<u8>)>, StorageError> {
        Ok(self
            .lock()
            .map
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn batch(&self, ops: Vec<BatchOp>) -> Result<(), StorageError> {
        let mut disk = self.lock();
        for op in ops {
            match op {
                BatchOp::Put(k, v) => {
                    if matches!(k.classify(), Some(DocKey::Chunk(..))) {
                        let owner = k.parts().get(1).cloned().unwrap_or_default();
                        disk.written_chunks.push((owner, v.clone()));
                    }
                    disk.map.insert(k, v);
                }
                BatchOp::Delete(k) => {
                    disk.map.remove(&k);
                }
            }
        }
        Ok(())
    }
}

/// Every node's durable storage loads, document by document, through the
/// engine's own strict chunk loader without a single corrupt chunk.
pub fn check_storage_loads(sim: &Sim) -> Result<(), String> {
    for node in &sim.nodes {
        let mut by_doc: BTreeMap<&str, Vec<(&StorageKey, &Vec<u8>)>> = BTreeMap::new();
        let entries = node.durable.entries();
        for (k, v) in &entries {
            if let Some(DocKey::Chunk(kind, _)) = k.classify() {
                let doc = k.parts()[1].as_str();
                let list = by_doc.entry(doc).or_default();
                // Snapshots first, as the engine loads them.
                if kind == converge_core::storage::ChunkKind::Snapshot {
                    list.insert(0, (k, v));
                } else {
                    list.push((k, v));
                }
            }
        }
        for chunks in by_doc.values() {
            // What one kind of replica wrote, both kinds must read.
            for kind in [ReplicaKind::FullDocument, ReplicaKind::ChangeLog] {
                let mut replica = kind.factory()(automerge::ActorId::from(vec![1u8; 16]), 0);
                for (k, v) in chunks {
                    replica.load_chunk(v).map_err(|e| {
                        format!(
                            "{}: chunk {k} does not load as {}: {e}",
                            node.name,
                            kind.name()
                        )
                    })?;
                }
            }
        }
    }
    Ok(())
}

/// Finds `doc` on every live node (so it is in memory for checking).
pub fn find_everywhere(sim: &mut Sim, doc: &DocumentId) {
    for n in 0..sim.nodes.len() {
        sim.command(
            n,
            Command::Find {
                document_id: doc.clone(),
            },
        );
    }
}

/// The node's result for a command, if it has finished.
pub fn result(sim: &Sim, n: NodeId, cmd: CommandId) -> Option<&CommandResult> {
    sim.nodes[n].results.get(&cmd)
}

/// Uses `rng` to pick something in `0..n`.
pub fn pick(rng: &mut ChaCha8Rng, n: usize) -> usize {
    rng.random_range(0..n)
}

/// Reads an automerge text field as a string (for stories).
pub fn text_of(doc: &Automerge) -> String {
    match doc.get(ROOT, "text") {
        Ok(Some((_, id))) => doc.text(&id).unwrap_or_default(),
        _ => String::new(),
    }
}
