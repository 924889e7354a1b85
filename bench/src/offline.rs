//! In-process scenarios: the editing trace (P7) and reconnect cost (P3).
//!
//! Both read the editing trace as JSON `[[position, deleted, inserted], …]`
//! (bench/run.py converts the published `automerge-paper.json.gz` into it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use automerge::sync::{self, SyncDoc as _};
use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ObjId, ObjType, ReadDoc, ROOT};
use converge_core::engine::{PeerSync, Replica, ReplicaKind};
use converge_core::runtime::{Repo, RepoConfig};
use converge_core::storage::MemoryStorage;
use serde_json::json;

/// One keystroke: at `pos`, delete `del` characters and insert `ins`.
#[derive(Clone)]
pub struct Edit {
    pos: usize,
    del: isize,
    ins: String,
}

/// Reads the first `limit` edits of a trace file.
pub fn read_trace(path: &str, limit: usize) -> anyhow::Result<Vec<Edit>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let raw: Vec<(usize, usize, String)> =
        serde_json::from_str(&text).context("the trace is not [[pos, del, text], ...]")?;
    Ok(raw
        .into_iter()
        .take(limit)
        .map(|(pos, del, ins)| Edit {
            pos,
            del: del as isize,
            ins,
        })
        .collect())
}

fn splice(tx: &mut impl Transactable, text: &ObjId, e: &Edit) {
    tx.splice_text(text, e.pos, e.del, &e.ins)
        .expect("the trace stays inside the text");
}

/// The trace applied to a new document with bare automerge, one
/// transaction (one change) per keystroke; returns it and its text object.
fn raw_document(edits: &[Edit]) -> anyhow::Result<(Automerge, ObjId)> {
    let mut doc = Automerge::new();
    let text = {
        let mut tx = doc.transaction();
        let t = tx.put_object(ROOT, "text", ObjType::Text)?;
        tx.commit();
        t
    };
    for e in edits {
        let mut tx = doc.transaction();
        splice(&mut tx, &text, e);
        tx.commit();
    }
    Ok((doc, text))
}

/// P7: the trace applied one keystroke per change, through raw automerge
/// and through a Converge repo (`DocHandle::change`, which also persists
/// every change to the repo's storage).
pub async fn trace(edits: &[Edit]) -> anyhow::Result<serde_json::Value> {
    // Raw automerge: one transaction per keystroke.
    let started = Instant::now();
    let (raw, text) = raw_document(edits)?;
    let raw_time = started.elapsed();
    let raw_text = raw.text(&text)?;

    // Converge: the same keystrokes through the repo's actor. Queued, as an
    // editor hands them over: each queued as it happens, results collected
    // behind (at most WINDOW outstanding); once from this thread, outside
    // the repo's runtime (as a UI thread or a foreign-language caller would),
    // once from a task on that runtime (as async Rust embedding it would).
    // Then awaited: each result before the next keystroke, the round trip
    // through the actor.
    let edits: Arc<Vec<Edit>> = Arc::new(edits.to_vec());
    let mut texts = Vec::new();
    let mut times = Vec::new();
    for (queued, on_runtime) in [(true, false), (true, true), (false, false)] {
        let run = apply_through_repo(edits.clone(), queued);
        let (time, text) = if on_runtime {
            tokio::spawn(run).await??
        } else {
            run.await?
        };
        times.push(time);
        texts.push(text);
    }
    anyhow::ensure!(
        texts.iter().all(|t| *t == raw_text),
        "the runs ended with different text"
    );
    let (ours_time, on_runtime_time, awaited_time) = (times[0], times[1], times[2]);
    let per = |d: Duration| d.as_secs_f64() * 1e6 / edits.len().max(1) as f64;
    Ok(json!({
        "scenario": "p7",
        "edits": edits.len(),
        "chars": raw_text.chars().count(),
        "raw_us_per_edit": per(raw_time),
        "ours_us_per_edit": per(ours_time),
        "on_runtime_us_per_edit": per(on_runtime_time),
        "awaited_us_per_edit": per(awaited_time),
        "ratio": ours_time.as_secs_f64() / raw_time.as_secs_f64(),
        "on_runtime_ratio": on_runtime_time.as_secs_f64() / raw_time.as_secs_f64(),
    }))
}

/// Applies the keystrokes to a fresh in-memory repo, queued (at most
/// WINDOW results outstanding) or each awaited; returns the time taken and
/// the resulting text.
async fn apply_through_repo(
    edits: Arc<Vec<Edit>>,
    queued: bool,
) -> anyhow::Result<(Duration, String)> {
    const WINDOW: usize = 256;
    let repo = Repo::start(RepoConfig::new(None), Arc::new(MemoryStorage::new()));
    let handle = repo.create(None).await?;
    let text = handle
        .change(|d| {
            let mut tx = d.transaction();
            let t = tx.put_object(ROOT, "text", ObjType::Text).expect("text");
            tx.commit();
            t
        })
        .await?;
    let started = Instant::now();
    let mut outstanding = std::collections::VecDeque::new();
    for e in edits.iter() {
        let (pos, del, ins) = (e.pos, e.del, e.ins.clone());
        let text = text.clone();
        let done = handle.change(move |d| {
            let mut tx = d.transaction();
            splice(&mut tx, &text, &Edit { pos, del, ins });
            tx.commit();
        });
        if queued {
            outstanding.push_back(done);
            if outstanding.len() > WINDOW {
                if let Some(front) = outstanding.pop_front() {
                    front.await?;
                }
            }
        } else {
            done.await?;
        }
    }
    for done in outstanding {
        done.await?;
    }
    let time = started.elapsed();
    let result = handle
        .with_doc(move |d| d.text(&text).unwrap_or_default())
        .await?
        .unwrap_or_default();
    repo.shutdown().await;
    Ok((time, result))
}

/// Bytes and round trips of one sync exchange until both sides are quiet.
struct Exchange {
    bytes: usize,
    round_trips: usize,
}

fn exchange(
    a: &mut dyn Replica,
    sa: &mut PeerSync,
    b: &mut dyn Replica,
    sb: &mut PeerSync,
) -> anyhow::Result<Exchange> {
    let (mut bytes, mut round_trips) = (0, 0);
    for _ in 0..1000 {
        let ab = a.generate_sync_message(sa);
        let ba = b.generate_sync_message(sb);
        if ab.is_none() && ba.is_none() {
            return Ok(Exchange { bytes, round_trips });
        }
        round_trips += 1;
        if let Some(m) = ab {
            let wire = m.encode();
            bytes += wire.len();
            b.receive_sync_message(sb, sync::Message::decode(&wire)?)?;
        }
        if let Some(m) = ba {
            let wire = m.encode();
            bytes += wire.len();
            a.receive_sync_message(sa, sync::Message::decode(&wire)?)?;
        }
    }
    anyhow::bail!("sync did not settle")
}

fn replica(kind: ReplicaKind, actor: u8, bytes: &[u8]) -> anyhow::Result<Box<dyn Replica>> {
    let mut r = kind.factory()(ActorId::from(vec![actor; 16]), 0);
    r.load_chunk(bytes)?;
    Ok(r)
}

/// Makes `n` keystroke changes on a full document (continuing the trace
/// where `next` points) and returns their raw bytes.
fn type_on(doc: &mut Automerge, text: &ObjId, edits: &[Edit], next: &mut usize, n: usize) -> usize {
    let before = doc.get_heads();
    for _ in 0..n {
        let e = &edits[*next % edits.len()];
        *next += 1;
        let len = doc.length(text);
        let mut tx = doc.transaction();
        // Replayed past its own context the trace may point beyond the
        // end; clamp it.
        let pos = e.pos.min(len);
        let del = e.del.min((len - pos) as isize);
        splice(
            &mut tx,
            text,
            &Edit {
                pos,
                del,
                ins: e.ins.clone(),
            },
        );
        tx.commit();
    }
    doc.get_changes(&before)
        .iter()
        .map(|c| c.raw_bytes().len())
        .sum()
}

/// P3: a client and a relay share a document of `base` keystroke changes
/// and are in sync; then each side gets `n` new changes (the relay from
/// another client) and they reconnect. Reports the bytes and round trips
/// of that sync with a fresh sync state and with the stored one, for each
/// relay replica kind, against the floor (the new changes' raw bytes plus
/// 32 bytes per head, one round trip). The full-document relay is
/// automerge's own sync loop (`FullDocument` calls it directly).
pub fn reconnect(edits: &[Edit], base: usize, ns: &[usize]) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(
        edits.len() > base,
        "the trace is shorter than the base document"
    );
    let mut origin = Automerge::new().with_actor(ActorId::from(vec![1u8; 16]));
    let text = {
        let mut tx = origin.transaction();
        let t = tx.put_object(ROOT, "text", ObjType::Text)?;
        tx.commit();
        t
    };
    for e in &edits[..base] {
        let mut tx = origin.transaction();
        splice(&mut tx, &text, e);
        tx.commit();
    }
    let saved = origin.save();
    let mut rows = Vec::new();
    for &n in ns {
        for kind in [ReplicaKind::ChangeLog, ReplicaKind::FullDocument] {
            for stored in [true, false] {
                let mut client = replica(ReplicaKind::FullDocument, 2, &saved)?;
                let mut relay = replica(kind, 3, &saved)?;
                let (mut sc, mut sr) = (PeerSync::default(), PeerSync::default());
                exchange(client.as_mut(), &mut sc, relay.as_mut(), &mut sr)?;
                // Diverge: the client types n keystrokes offline; another
                // client's n keystrokes reach the relay.
                let mut next = base;
                let mut mine = Automerge::load(&saved)?.with_actor(ActorId::from(vec![4u8; 16]));
                let mut theirs = Automerge::load(&saved)?.with_actor(ActorId::from(vec![5u8; 16]));
                let mine_bytes = type_on(&mut mine, &text, edits, &mut next, n);
                let theirs_bytes = type_on(&mut theirs, &text, edits, &mut next, n);
                client.load_chunk(&mine.save_after(&origin.get_heads()))?;
                relay.load_chunk(&theirs.save_after(&origin.get_heads()))?;
                let (mut sc, mut sr) = if stored {
                    // As the engine persists it: encoded, then decoded.
                    (
                        PeerSync::new(sync::State::decode(&sc.state.encode())?),
                        PeerSync::new(sync::State::decode(&sr.state.encode())?),
                    )
                } else {
                    (PeerSync::default(), PeerSync::default())
                };
                let started = Instant::now();
                let ex = exchange(client.as_mut(), &mut sc, relay.as_mut(), &mut sr)?;
                let elapsed = started.elapsed();
                anyhow::ensure!(
                    client.heads() == relay.heads(),
                    "reconnect did not converge"
                );
                let heads = client.heads().len();
                let floor = mine_bytes + theirs_bytes + 32 * heads * 2;
                rows.push(json!({
                    "n": n,
                    "relay": kind.name(),
                    "state": if stored { "stored" } else { "fresh" },
                    "bytes": ex.bytes,
                    "round_trips": ex.round_trips,
                    "floor_bytes": floor,
                    "ratio": ex.bytes as f64 / floor as f64,
                    "ms": elapsed.as_secs_f64() * 1e3,
                }));
            }
        }
    }
    Ok(json!({"scenario": "p3", "base_changes": base + 1, "rows": rows}))
}

/// P5 with large documents: the whole trace as one document (a change per
/// keystroke), saved to `out`, and written as a snapshot in the NodeFS
/// layout for documents `0..docs` of set `tag` under `nodefs` (samod and
/// the Node server read it). Reports the saved size and how long
/// `Automerge::load` of those bytes takes (the floor for a cold start).
pub fn large_doc(
    edits: &[Edit],
    out: &std::path::Path,
    nodefs: &std::path::Path,
    docs: u64,
    tag: u64,
) -> anyhow::Result<serde_json::Value> {
    let (doc, _) = raw_document(edits)?;
    let saved = doc.save();
    std::fs::write(out, &saved).with_context(|| format!("writing {}", out.display()))?;
    let heads: Vec<String> = doc.get_heads().iter().map(|h| h.to_string()).collect();
    for n in 0..docs {
        let id = converge_core::wire::DocumentId::numbered(n, tag);
        write_nodefs(nodefs, &id, "snapshot", &heads.join(""), &saved)?;
    }
    // The floors: loading the bytes, and loading them and answering a peer
    // that has nothing (what a server's first reply takes with bare
    // automerge: the reply carries every change).
    let median = |f: &dyn Fn() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        let mut times = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            f()?;
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[1])
    };
    let load_ms = median(&|| Automerge::load(&saved).map(|_| ()).map_err(Into::into))?;
    // The first message of a peer with nothing, and a check that the reply
    // carries the document (encoded, as it would be sent).
    let request = || {
        Automerge::new()
            .generate_sync_message(&mut sync::State::new())
            .context("an empty document has something to say")
    };
    let carries_it = |reply: Option<sync::Message>| -> anyhow::Result<()> {
        let reply = reply.context("no reply to a peer with nothing")?;
        anyhow::ensure!(!reply.changes.is_empty(), "the reply carries no changes");
        let _bytes = reply.encode();
        Ok(())
    };
    let reply_ms = median(&|| {
        let mut doc = Automerge::load(&saved)?;
        let mut state = sync::State::new();
        doc.receive_sync_message(&mut state, request()?)?;
        carries_it(doc.generate_sync_message(&mut state))
    })?;
    // Ours in-process, without the process start and storage read the
    // cold-start runs include: a change-log replica loading the bytes and
    // answering the same peer.
    let ours_ms = median(&|| {
        let mut replica = ReplicaKind::ChangeLog.factory()(ActorId::random(), 0);
        replica.load_chunk(&saved)?;
        let mut peer = PeerSync::default();
        replica.receive_sync_message(&mut peer, request()?)?;
        carries_it(replica.generate_sync_message(&mut peer))
    })?;
    Ok(json!({
        "edits": edits.len(),
        "bytes": saved.len(),
        "load_ms": load_ms,
        "load_and_reply_ms": reply_ms,
        "change_log_load_and_reply_ms": ours_ms,
    }))
}

/// Writes one chunk where automerge-repo's NodeFS storage (and samod's
/// filesystem storage) keeps key `[id, kind, name]`: the first key part is
/// split after two characters into two directories.
pub fn write_nodefs(
    root: &std::path::Path,
    id: &converge_core::wire::DocumentId,
    kind: &str,
    name: &str,
    bytes: &[u8],
) -> anyhow::Result<()> {
    let id = id.to_string();
    let (splay, rest) = id.split_at(2);
    let dir = root.join(splay).join(rest).join(kind);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join(name), bytes).with_context(|| format!("writing into {}", dir.display()))
}
