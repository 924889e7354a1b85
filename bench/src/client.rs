//! A lean automerge-repo client for load generation.
//!
//! A real repo materializes every document it syncs; a load generator that
//! did so would measure itself, not the server (Automerge's receive costs
//! hundreds of µs on a busy document, and one hot document means every
//! keystroke is received by every client). This client keeps only the
//! change graph's frontier: it parses incoming changes for their hash and
//! dependencies (about a microsecond each) and answers with its heads.
//! Its `have` names its whole frontier as the last point of sync, with an
//! empty Bloom filter: valid, because the server holds every change the
//! client knows (received from it, or sent to it earlier on the same
//! ordered stream), and exact, where a Bloom filter of recent changes
//! would make the server skip about 1% of changes as false positives and
//! cost a `need` round trip each. Typists make real changes with their own
//! Automerge document, which holds only their own edits.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use automerge::sync::{BloomFilter, Have, Message as SyncMessage, MessageFlags, MessageVersion};
use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, Change, ChangeHash, ObjType, ReadDoc, ROOT};
use converge_core::wire::{self, DocMessage, DocumentId, Message, PeerId, PeerMetadata};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// What every client of a run shares: when each change was sent, and the
/// delays observed.
#[derive(Debug, Default)]
pub struct Shared {
    sent: Mutex<HashMap<ChangeHash, Instant>>,
    delays: Mutex<Vec<Duration>>,
    /// Only deliveries of changes sent after this count.
    measure_from: std::sync::OnceLock<Instant>,
    deliveries_expected: std::sync::atomic::AtomicU64,
    /// Print every send and every slow delivery (`CONVERGE_BENCH_TRACE`).
    trace: bool,
}

impl Shared {
    /// Shared state for one run; tracing follows `CONVERGE_BENCH_TRACE`.
    pub fn new() -> Shared {
        Shared {
            trace: std::env::var_os("CONVERGE_BENCH_TRACE").is_some(),
            ..Shared::default()
        }
    }

    /// Starts measuring (after warm-up).
    pub fn start_measuring(&self) {
        let _ = self.measure_from.set(Instant::now());
    }

    fn measured(&self, sent_at: Instant) -> bool {
        self.measure_from.get().is_some_and(|m| sent_at >= *m)
    }

    fn sent(&self, hash: ChangeHash, at: Instant, receivers: u64, sender: u64) {
        self.sent.lock().expect("lock").insert(hash, at);
        if self.trace {
            eprintln!("client {sender} sent {hash}");
        }
        if self.measured(at) {
            self.deliveries_expected
                .fetch_add(receivers, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn delivered(&self, hash: &ChangeHash, now: Instant, receiver: u64) {
        let Some(at) = self.sent.lock().expect("lock").get(hash).copied() else {
            return;
        };
        if self.trace && now - at > Duration::from_millis(50) {
            eprintln!(
                "slow delivery to client {receiver}: {hash} took {:?}",
                now - at
            );
        }
        if self.measured(at) {
            self.delays.lock().expect("lock").push(now - at);
        }
    }

    /// Every expected delivery arrived.
    pub fn complete(&self) -> bool {
        let expected = self
            .deliveries_expected
            .load(std::sync::atomic::Ordering::Relaxed);
        self.delays.lock().expect("lock").len() as u64 >= expected
    }

    /// Delays observed, and how many deliveries were expected.
    pub fn results(&self) -> (Vec<Duration>, u64) {
        let delays = self.delays.lock().expect("lock").clone();
        let expected = self
            .deliveries_expected
            .load(std::sync::atomic::Ordering::Relaxed);
        (delays, expected)
    }
}

/// One document's state as a lean client sees it.
#[derive(Debug)]
struct DocView {
    known: HashSet<ChangeHash>,
    frontier: HashSet<ChangeHash>,
    /// Dependencies of received changes that never arrived: the server
    /// skipped them (a Bloom filter false positive says we have them), so
    /// ask for them by hash, as a real client does.
    missing: HashSet<ChangeHash>,
}

impl DocView {
    fn new(initial: &[ChangeHash]) -> Self {
        DocView {
            known: initial.iter().copied().collect(),
            frontier: initial.iter().copied().collect(),
            missing: HashSet::new(),
        }
    }

    fn learn(&mut self, hash: ChangeHash, deps: &[ChangeHash]) -> bool {
        if !self.known.insert(hash) {
            return false;
        }
        self.missing.remove(&hash);
        for d in deps {
            self.frontier.remove(d);
            if !self.known.contains(d) {
                self.missing.insert(*d);
            }
        }
        self.frontier.insert(hash);
        true
    }

    fn message(&self, changes: Vec<Vec<u8>>) -> Vec<u8> {
        self.message_with(changes, None)
    }

    /// A sync message carrying `flags`: with flags a peer announces that it
    /// takes version 2 messages (all changes in one chunk, or the whole
    /// document saved), as automerge does since the flags were added.
    fn message_with(&self, changes: Vec<Vec<u8>>, flags: Option<MessageFlags>) -> Vec<u8> {
        let mut heads: Vec<_> = self.frontier.iter().copied().collect();
        heads.sort();
        let mut need: Vec<_> = self.missing.iter().copied().collect();
        need.sort();
        SyncMessage {
            heads: heads.clone(),
            need,
            have: vec![Have {
                last_sync: heads,
                bloom: BloomFilter::default(),
            }],
            changes: changes.into(),
            flags,
            version: MessageVersion::V1,
        }
        .encode()
    }
}

/// What a client does in a run.
#[derive(Debug, Clone)]
pub struct Role {
    /// Keystrokes per second, or `None` for an observer.
    pub typing_rate: Option<f64>,
    /// How many other clients see each of its keystrokes.
    pub receivers: u64,
    /// Answer sync messages (a real client does; the broadcast floor
    /// relays everything and needs no answers).
    pub reply: bool,
}

/// The document every client of a run starts from.
#[derive(Debug, Clone)]
pub struct Seed {
    /// Its id.
    pub id: DocumentId,
    /// Its one change.
    pub change: Vec<u8>,
    /// Its heads.
    pub heads: Vec<ChangeHash>,
    /// `Automerge::save` of it.
    pub saved: Vec<u8>,
}

impl Seed {
    /// A fresh document with an empty map, its id unique to this process.
    pub fn new(n: u64) -> anyhow::Result<Seed> {
        Self::tagged(n, u64::from(std::process::id()))
    }

    /// Document `n` of a set named `tag`: another process asking for
    /// `(n, tag)` gets the same id.
    pub fn tagged(n: u64, tag: u64) -> anyhow::Result<Seed> {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        tx.put(ROOT, "seed", n as i64)?;
        tx.commit();
        let change = doc
            .get_last_local_change()
            .context("no change")?
            .raw_bytes()
            .to_vec();
        Ok(Seed {
            id: DocumentId::numbered(n, tag),
            change,
            heads: doc.get_heads(),
            saved: doc.save(),
        })
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The document message of a frame that carries sync data: `sync`, or a
/// `request` (a sync message from a peer that is itself still looking for
/// the document; samod answers an upload with one).
fn sync_payload(bytes: &[u8]) -> Option<DocMessage> {
    match wire::decode(bytes) {
        Ok(Message::Sync(m) | Message::Request(m)) => Some(m),
        _ => None,
    }
}

/// A connected, joined client.
pub struct Client {
    ws: Ws,
    me: PeerId,
    server: PeerId,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({})", self.me)
    }
}

fn peer_id(n: u64) -> PeerId {
    PeerId::new(&format!("bench-{}-{n}", std::process::id())).expect("valid peer id")
}

impl Client {
    /// Connects and completes the handshake.
    pub async fn connect(url: &str, n: u64) -> anyhow::Result<Client> {
        // A whole large document arrives as one sync message (the editing
        // trace's changes are ~29 MB uncompressed).
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(512 << 20))
            .max_frame_size(Some(512 << 20));
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let me = peer_id(n);
        let join = Message::Join {
            sender_id: me.clone(),
            metadata: Some(PeerMetadata {
                storage_id: None,
                is_ephemeral: Some(true),
            }),
            supported_protocol_versions: Some(vec!["1".to_owned()]),
        };
        ws.send(WsMessage::Binary(wire::encode(&join).into()))
            .await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let frame = tokio::time::timeout_at(deadline.into(), ws.next())
                .await
                .context("no `peer` reply within 10 s")?;
            let Some(frame) = frame else {
                bail!("the server closed the connection during the handshake")
            };
            if let WsMessage::Binary(bytes) = frame? {
                if let Ok(Message::Peer { sender_id, .. }) = wire::decode(&bytes) {
                    return Ok(Client {
                        ws,
                        me,
                        server: sender_id,
                    });
                }
            }
        }
    }

    async fn send_sync(&mut self, doc: &DocumentId, data: Vec<u8>) -> anyhow::Result<()> {
        let msg = Message::Sync(DocMessage {
            sender_id: self.me.clone(),
            target_id: self.server.clone(),
            document_id: doc.clone(),
            data,
        });
        self.ws
            .send(WsMessage::Binary(wire::encode(&msg).into()))
            .await?;
        Ok(())
    }

    /// Tells the server we follow the seed document: a sync message, or for
    /// the floor a `request` (which it does not forward to the document's
    /// other clients).
    pub async fn subscribe(&mut self, seed: &Seed, floor: bool) -> anyhow::Result<()> {
        let view = DocView::new(&seed.heads);
        if !floor {
            return self.send_sync(&seed.id, view.message(Vec::new())).await;
        }
        let msg = Message::Request(DocMessage {
            sender_id: self.me.clone(),
            target_id: self.server.clone(),
            document_id: seed.id.clone(),
            data: view.message(Vec::new()),
        });
        self.ws
            .send(WsMessage::Binary(wire::encode(&msg).into()))
            .await?;
        Ok(())
    }

    /// Keeps the connection open, reading (and so answering the server's
    /// pings) until the server closes it; counts that in `closed`.
    pub async fn stay_idle(mut self, closed: Arc<std::sync::atomic::AtomicU64>) {
        while let Some(Ok(_)) = self.ws.next().await {}
        closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Uploads many seeds, `window` at a time (a server that throttles its
    /// replies is not waited on one document at a time), and waits until
    /// the server acknowledged each.
    pub async fn upload_many(&mut self, seeds: &[Seed], window: usize) -> anyhow::Result<()> {
        for batch in seeds.chunks(window.max(1)) {
            let mut waiting: HashMap<DocumentId, Vec<ChangeHash>> = HashMap::new();
            for seed in batch {
                // Our heads go with the change: a server still looking for
                // the document (samod) takes empty heads to mean we lack it.
                let view = DocView::new(&seed.heads);
                self.send_sync(&seed.id, view.message(vec![seed.change.clone()]))
                    .await?;
                waiting.insert(seed.id.clone(), seed.heads.clone());
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while !waiting.is_empty() {
                let frame = tokio::time::timeout_at(deadline.into(), self.ws.next())
                    .await
                    .context("the server did not acknowledge the uploads within 60 s")?;
                let Some(frame) = frame else {
                    bail!("the server closed the connection")
                };
                if let WsMessage::Binary(bytes) = frame? {
                    if let Some(m) = sync_payload(&bytes) {
                        if let Ok(sync) = SyncMessage::decode(&m.data) {
                            if waiting.get(&m.document_id) == Some(&sync.heads) {
                                waiting.remove(&m.document_id);
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Asks for a document we do not have and waits for its contents.
    pub async fn fetch(&mut self, id: &DocumentId, timeout: Duration) -> anyhow::Result<()> {
        let view = DocView::new(&[]);
        // Asks as a current automerge client does: version 2 replies are
        // welcome (the sender may then answer with the saved document). The
        // reply is not parsed here, only recognised.
        let mut flags = MessageFlags::new();
        flags.set(MessageFlags::SUPPORTS_SYNC_RESET);
        let msg = Message::Request(DocMessage {
            sender_id: self.me.clone(),
            target_id: self.server.clone(),
            document_id: id.clone(),
            data: view.message_with(Vec::new(), Some(flags)),
        });
        self.ws
            .send(WsMessage::Binary(wire::encode(&msg).into()))
            .await?;
        let deadline = Instant::now() + timeout;
        loop {
            let frame = tokio::time::timeout_at(deadline.into(), self.ws.next())
                .await
                .context("no reply with the document in time")?;
            let Some(frame) = frame else {
                bail!("the server closed the connection")
            };
            if let WsMessage::Binary(bytes) = frame? {
                match wire::decode(&bytes) {
                    Ok(Message::Sync(m) | Message::Request(m))
                        if &m.document_id == id
                            && SyncMessage::decode(&m.data).is_ok_and(|s| !s.heads.is_empty()) =>
                    {
                        return Ok(());
                    }
                    Ok(Message::DocUnavailable { .. }) => bail!("the server does not have {id}"),
                    _ => {}
                }
            }
        }
    }

    /// Uploads the seed and waits until the server has it.
    pub async fn upload(&mut self, seed: &Seed) -> anyhow::Result<()> {
        let view = DocView::new(&seed.heads);
        self.send_sync(&seed.id, view.message(vec![seed.change.clone()]))
            .await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let frame = tokio::time::timeout_at(deadline.into(), self.ws.next())
                .await
                .context("the server did not acknowledge the seed within 10 s")?;
            let Some(frame) = frame else {
                bail!("the server closed the connection")
            };
            if let WsMessage::Binary(bytes) = frame? {
                if let Some(m) = sync_payload(&bytes) {
                    if let Ok(sync) = SyncMessage::decode(&m.data) {
                        if sync.heads == seed.heads {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    /// Runs the client until `until`: types until `stop_typing` if it is a
    /// typist, and receives and answers whatever arrives.
    pub async fn run(
        mut self,
        seed: Seed,
        role: Role,
        n: u64,
        shared: Arc<Shared>,
        stop_typing: Instant,
        until: Instant,
    ) -> anyhow::Result<()> {
        let mut view = DocView::new(&seed.heads);
        // Say we are here: the server starts syncing the document with us.
        self.send_sync(&seed.id, view.message(Vec::new())).await?;

        let mut typist = match role.typing_rate {
            Some(rate) => {
                let mut doc = Automerge::load(&seed.saved)?;
                doc.set_actor(ActorId::from(peer_id(n).to_string().as_bytes()));
                let mut tx = doc.transaction();
                let text = tx.put_object(ROOT, format!("t{n}"), ObjType::Text)?;
                tx.commit();
                let first = doc.get_last_local_change().context("no change")?.clone();
                Some((doc, text, Duration::from_secs_f64(1.0 / rate), Some(first)))
            }
            None => None,
        };
        // Spread typists' keystrokes over the interval.
        let offset = typist
            .as_ref()
            .map(|t| t.2.mul_f64((n % 97) as f64 / 97.0))
            .unwrap_or_default();
        let mut next_key = Instant::now() + offset;
        loop {
            let now = Instant::now();
            if now >= until {
                break;
            }
            let typing = typist.is_some() && next_key < stop_typing;
            if now >= stop_typing && shared.complete() {
                break;
            }
            // After typing ends, look every 20 ms whether everything arrived.
            let wake = if typing {
                next_key
            } else {
                until.min(now.max(stop_typing) + Duration::from_millis(20))
            };
            tokio::select! {
                frame = self.ws.next() => {
                    let Some(frame) = frame else { bail!("the server closed the connection") };
                    let WsMessage::Binary(bytes) = frame? else { continue };
                    // Servers that announce documents (samod) also send
                    // other documents' sync messages: not ours to count.
                    let Some(m) = sync_payload(&bytes).filter(|m| m.document_id == seed.id) else { continue };
                    let Ok(sync) = SyncMessage::decode(&m.data) else { continue };
                    let now = Instant::now();
                    let mut fresh = false;
                    for chunk in sync.changes.iter() {
                        let change = Change::from_bytes(chunk.to_vec())
                            .context("the server sent a malformed change")?;
                        if view.learn(change.hash(), change.deps()) {
                            fresh = true;
                            shared.delivered(&change.hash(), now, n);
                        }
                    }
                    if (fresh || !view.missing.is_empty()) && role.reply {
                        let reply = view.message(Vec::new());
                        self.send_sync(&seed.id, reply).await?;
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    if let Some((doc, text, interval, first)) = typist.as_mut() {
                        if typing && Instant::now() >= next_key {
                            next_key += *interval;
                            let mut changes = Vec::new();
                            if let Some(first) = first.take() {
                                view.learn(first.hash(), first.deps());
                                changes.push(first.raw_bytes().to_vec());
                            }
                            let len = doc.length(&*text);
                            let mut tx = doc.transaction();
                            tx.splice_text(&*text, len, 0, "x")?;
                            tx.commit();
                            let change = doc.get_last_local_change().context("no change")?;
                            let (hash, deps) = (change.hash(), change.deps().to_vec());
                            changes.push(change.raw_bytes().to_vec());
                            view.learn(hash, &deps);
                            shared.sent(hash, Instant::now(), role.receivers, n);
                            let msg = view.message(changes);
                            self.send_sync(&seed.id, msg).await?;
                        }
                    }
                }
            }
        }
        let _ = self.ws.close(None).await;
        Ok(())
    }
}
