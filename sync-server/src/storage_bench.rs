//! `converge-server bench-storage`: how fast this disk takes durable
//! appends, through Converge and through RocksDB alone (QUALITY.md P4).
//!
//! ```sh
//! converge-server bench-storage --dir /var/tmp/x --writers 64 --secs 3 [--no-sync]
//! ```
//!
//! - **RocksDB**: `writers` threads, each putting ~100-byte values with
//!   `WriteOptions::set_sync` (RocksDB commits concurrent writers as one
//!   group: one fsync for many writes).
//! - **Converge**: a repo on the same kind of store; `writers` tasks, each
//!   on its own document, make one change (one ~100-byte key) and wait until
//!   it is on disk before the next (`DocHandle::saved`).
//!
//! Prints one JSON line with both rates (changes or puts per second).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use automerge::transaction::Transactable;
use automerge::ROOT;
use converge_core::runtime::{Repo, RepoConfig};
use converge_core::storage::{rocksdb, RocksStorage};

/// What to measure: the flags of `bench-storage`.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Scratch directory (two databases are created inside).
    #[arg(long, default_value_os_t = std::env::temp_dir().join("converge-bench-storage"))]
    pub dir: PathBuf,
    /// Concurrent writers.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub writers: u32,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0, value_parser = positive_secs)]
    pub secs: f64,
    /// fsync every write; `--no-sync` turns it off.
    #[arg(long = "no-sync", action = clap::ArgAction::SetFalse)]
    pub sync: bool,
}

fn positive_secs(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs.is_finite() => Ok(secs),
        _ => Err(format!("`{text}` is not a positive number of seconds")),
    }
}

/// The flags of `bench-populate`.
#[derive(Debug, Clone, clap::Args)]
pub struct Populate {
    /// The relay's data directory (created if missing).
    #[arg(long)]
    pub dir: PathBuf,
    /// How many documents.
    #[arg(long)]
    pub docs: u64,
    /// Which numbered set the ids come from.
    #[arg(long, default_value_t = 5)]
    pub set: u64,
    /// A saved document to store as every document's snapshot.
    #[arg(long)]
    pub doc_file: Option<PathBuf>,
}

fn fresh(dir: &Path) -> anyhow::Result<PathBuf> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.to_path_buf())
}

/// RocksDB alone: puts per second with `writers` threads.
fn raw_rate(s: &Settings) -> anyhow::Result<f64> {
    let store = RocksStorage::open(&fresh(&s.dir.join("raw"))?, s.sync)?;
    let db = store.raw();
    let stop = AtomicBool::new(false);
    let count = AtomicU64::new(0);
    let value = vec![0x5au8; 100];
    let started = Instant::now();
    std::thread::scope(|scope| {
        for w in 0..s.writers {
            let (stop, count, value) = (&stop, &count, &value);
            scope.spawn(move || {
                let mut opts = rocksdb::WriteOptions::default();
                opts.set_sync(s.sync);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("w{w}/{i:012}");
                    if db.put_opt(key.as_bytes(), value, &opts).is_ok() {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
            });
        }
        std::thread::sleep(Duration::from_secs_f64(s.secs));
        stop.store(true, Ordering::Relaxed);
    });
    Ok(count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Converge: changes per second, each acknowledged once on disk.
async fn converge_rate(s: &Settings) -> anyhow::Result<f64> {
    let store = Arc::new(RocksStorage::open(
        &fresh(&s.dir.join("converge"))?,
        s.sync,
    )?);
    let repo = Repo::start(RepoConfig::new(None), store);
    let mut handles = Vec::new();
    for _ in 0..s.writers {
        let h = repo.create(None).await?;
        h.saved().await?;
        handles.push(h);
    }
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(s.secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for h in handles {
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0i64;
            while Instant::now() < deadline {
                h.change(move |d| {
                    let mut tx = d.transaction();
                    tx.put(ROOT, "n", i).expect("put");
                    tx.put(ROOT, "pad", "x".repeat(40)).expect("put");
                    tx.commit();
                })
                .await?;
                h.saved().await?;
                count.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let rate = count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    repo.shutdown().await;
    Ok(rate)
}

/// Runs both and prints the JSON line.
pub async fn run(s: Settings) -> anyhow::Result<()> {
    let raw = tokio::task::spawn_blocking({
        let s = s.clone();
        move || raw_rate(&s)
    })
    .await??;
    let ours = converge_rate(&s).await?;
    let _ = std::fs::remove_dir_all(&s.dir);
    println!(
        "{}",
        serde_json::json!({
            "scenario": "p4",
            "writers": s.writers,
            "sync": s.sync,
            "rocksdb_per_sec": raw,
            "converge_per_sec": ours,
            "ratio": ours / raw,
        })
    );
    Ok(())
}

/// `converge-server bench-populate --dir D --docs N [--set S] [--doc-file F]`:
/// writes N documents straight into a relay data directory, as the relay
/// itself stores them, for the many-documents benchmark (QUALITY.md P6) and
/// the large-document cold start (P5). Document `n` has id
/// `DocumentId::numbered(n, S)` and either one change setting `seed` to `n`
/// (an incremental chunk) or, with `--doc-file`, the saved document in that
/// file (a snapshot). Uploading a million documents through the protocol
/// would take minutes. Each document gets its metadata too, and the store
/// the marker saying so, as one written by this version has: the relay
/// does not backfill metadata for a million documents at start, which
/// would be measured instead of the workload.
pub fn populate(p: &Populate) -> anyhow::Result<()> {
    use converge_core::storage::{BatchOp, ChunkKind, DocMeta, Storage, StorageKey};
    use converge_core::wire::DocumentId;
    let (dir, docs, set) = (&p.dir, p.docs, p.set);
    std::fs::create_dir_all(dir)?;
    let store = RocksStorage::open(dir, false)
        .with_context(|| format!("cannot open RocksDB in {}", dir.display()))?;
    let started = Instant::now();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let meta = DocMeta {
        created_ms: Some(now_ms),
        updated_ms: now_ms,
        last_writer: None,
    };
    let mut batch = vec![BatchOp::Put(StorageKey::meta_backfilled(), Vec::new())];
    if let Some(file) = &p.doc_file {
        let saved = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let heads = automerge::Automerge::load(&saved)
            .with_context(|| format!("{} is not a saved document", file.display()))?
            .get_heads();
        let mut name: String = heads.iter().map(|h| h.to_string()).collect();
        name.truncate(32);
        for n in 0..docs {
            let id = DocumentId::numbered(n, set);
            let key = StorageKey::doc_chunk(&id, ChunkKind::Snapshot, &name);
            let mut ops = meta.ops(&id, true);
            ops.push(BatchOp::Put(key, saved.clone()));
            store.batch(ops)?;
        }
        store.batch(batch)?;
        store.flush()?;
        println!("{{\"populated\":{docs}}}");
        return Ok(());
    }
    for n in 0..docs {
        let mut doc = automerge::Automerge::new();
        let mut tx = doc.transaction();
        tx.put(ROOT, "seed", n as i64)?;
        tx.commit();
        let change = doc.get_last_local_change().context("no change")?;
        let id = DocumentId::numbered(n, set);
        let key = StorageKey::doc_chunk(&id, ChunkKind::Incremental, &change.hash().to_string());
        batch.push(BatchOp::Put(key, change.raw_bytes().to_vec()));
        batch.extend(meta.ops(&id, true));
        if batch.len() >= 20_000 {
            store.batch(std::mem::take(&mut batch))?;
        }
    }
    store.batch(batch)?;
    store.flush()?;
    println!(
        "{{\"populated\":{docs},\"secs\":{:.1}}}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
