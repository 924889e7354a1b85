//! `converge-bench`: the load generator behind `make bench`.
//!
//! ```text
//! converge-bench p1 --url ws://127.0.0.1:3030 --typists 16 --docs 1
//! converge-bench floor --listen 127.0.0.1:3040
//! ```
//!
//! `p1` is QUALITY.md's live-typing fan-out: typists on `--docs` documents
//! (spread evenly), each typing `--rate` keystrokes per second, every
//! client of a document seeing every keystroke. It prints one JSON line:
//! delivery delay percentiles (from the typist's send to each other
//! client's receipt) and how many deliveries never arrived. `floor` is the
//! plain broadcast relay the servers are compared with: it answers the
//! handshake and forwards every frame to the document's other clients.

mod client;
mod floor;
mod offline;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use futures::stream::{self, StreamExt as _, TryStreamExt as _};

use client::{Client, Role, Seed, Shared};
use converge_core::wire::DocumentId;

#[derive(Parser, Debug)]
#[command(about = "Load generator for automerge-repo sync servers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Live-typing fan-out (QUALITY.md P1).
    P1 {
        /// The server's WebSocket URL.
        #[arg(long)]
        url: String,
        /// How many clients type.
        #[arg(long, default_value_t = 8)]
        typists: u64,
        /// Clients that only watch, per document.
        #[arg(long, default_value_t = 0)]
        observers: u64,
        /// Documents the typists are spread over.
        #[arg(long, default_value_t = 1)]
        docs: u64,
        /// Keystrokes per second per typist.
        #[arg(long, default_value_t = 6.0)]
        rate: f64,
        /// Seconds measured, after the warm-up.
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        /// Seconds of warm-up (not measured).
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Seconds everyone keeps receiving after the typists stop. A
        /// delivery still missing then counts as later than any seen, so
        /// every delivery faster than this is measured as it is.
        #[arg(long, default_value_t = 2.0)]
        drain: f64,
        /// The server is the broadcast floor: clients do not answer.
        #[arg(long)]
        floor: bool,
    },
    /// Idle connections (QUALITY.md P2): connects, completes the handshake,
    /// subscribes each to a document, prints `ready`, and holds them.
    Idle {
        /// The server's WebSocket URL.
        #[arg(long)]
        url: String,
        /// How many connections.
        #[arg(long, default_value_t = 1000)]
        conns: u64,
        /// Seconds to hold them after `ready`.
        #[arg(long, default_value_t = 5.0)]
        hold: f64,
        /// The server is the broadcast floor (it acknowledges nothing).
        #[arg(long)]
        floor: bool,
    },
    /// Core overhead on the editing trace (QUALITY.md P7): raw automerge
    /// against a Converge repo, one change per keystroke.
    Trace {
        /// The trace as JSON `[[pos, del, text], ...]`.
        #[arg(long)]
        file: String,
        /// How many keystrokes to apply (from the start).
        #[arg(long, default_value_t = 20_000)]
        edits: usize,
    },
    /// Reconnect cost after divergence (QUALITY.md P3), in process.
    Reconnect {
        /// The trace as JSON `[[pos, del, text], ...]`.
        #[arg(long)]
        file: String,
        /// Keystroke changes in the shared document.
        #[arg(long, default_value_t = 20_000)]
        base: usize,
        /// New changes on each side, comma separated.
        #[arg(long, default_value = "1,10,100,1000")]
        n: String,
    },
    /// Stores `--docs` small documents on a server (for QUALITY.md P5).
    Populate {
        /// The server's WebSocket URL.
        #[arg(long)]
        url: String,
        /// How many documents.
        #[arg(long, default_value_t = 10_000)]
        docs: u64,
        /// Names the set, so `first-reply` can ask for one of them.
        #[arg(long, default_value_t = 5)]
        tag: u64,
    },
    /// Writes the same documents as `populate` straight into a directory in
    /// the NodeFS storage layout (automerge-repo's NodeFSStorageAdapter and
    /// samod's filesystem storage read it), each as the incremental chunk
    /// the server would have written: much faster than uploading them
    /// through the Node server's sync throttle.
    PopulateFiles {
        /// The storage directory.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// How many documents.
        #[arg(long, default_value_t = 10_000)]
        docs: u64,
        /// Names the set, as for `populate`.
        #[arg(long, default_value_t = 5)]
        tag: u64,
    },
    /// Asks a server for `--count` populated documents, `--per-conn` on each
    /// connection before closing it, `--parallel` connections at a time
    /// (QUALITY.md P6: many documents touched, memory bounded).
    Touch {
        /// The server's WebSocket URL.
        #[arg(long)]
        url: String,
        /// The first document number.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// How many documents.
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        /// Documents asked for on one connection.
        #[arg(long, default_value_t = 100)]
        per_conn: u64,
        /// Connections at a time.
        #[arg(long, default_value_t = 4)]
        parallel: u64,
        /// The populated set's tag.
        #[arg(long, default_value_t = 5)]
        tag: u64,
        /// Stop starting new connections after this many seconds.
        #[arg(long, default_value_t = 600.0)]
        max_secs: f64,
    },
    /// Builds the editing trace as one document and stores it for P5's
    /// large-document cold start (see `offline::large_doc`).
    LargeDoc {
        /// The trace (`[[pos, del, text], ...]`).
        #[arg(long)]
        file: String,
        /// Where to write `Automerge::save` of it.
        #[arg(long)]
        out: std::path::PathBuf,
        /// A NodeFS storage directory to write it into.
        #[arg(long)]
        nodefs: std::path::PathBuf,
        /// How many documents (all with this content).
        #[arg(long, default_value_t = 10)]
        docs: u64,
        /// Names the set, as for `populate`.
        #[arg(long, default_value_t = 7)]
        tag: u64,
        /// How many keystrokes of the trace.
        #[arg(long, default_value_t = usize::MAX)]
        edits: usize,
    },
    /// Connects as soon as the server accepts, asks for one populated
    /// document and exits when its contents arrive (QUALITY.md P5).
    FirstReply {
        /// The server's WebSocket URL.
        #[arg(long)]
        url: String,
        /// Which of the populated documents.
        #[arg(long, default_value_t = 4242)]
        doc: u64,
        /// The populated set's tag.
        #[arg(long, default_value_t = 5)]
        tag: u64,
    },
    /// The broadcast floor relay.
    Floor {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:3040")]
        listen: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Floor { listen } => rt.block_on(floor::serve(&listen)),
        Command::Populate { url, docs, tag } => rt.block_on(async move {
            let seeds = (0..docs)
                .map(|n| Seed::tagged(n, tag))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut client = Client::connect(&url, 4_000_000).await?;
            client.upload_many(&seeds, 500).await?;
            println!("{{\"populated\":{docs}}}");
            Ok(())
        }),
        Command::PopulateFiles { dir, docs, tag } => {
            for n in 0..docs {
                let seed = Seed::tagged(n, tag)?;
                let name = seed.heads[0].to_string();
                offline::write_nodefs(&dir, &seed.id, "incremental", &name, &seed.change)?;
            }
            println!("{{\"populated\":{docs}}}");
            Ok(())
        }
        Command::Touch {
            url,
            from,
            count,
            per_conn,
            parallel,
            tag,
            max_secs,
        } => rt.block_on(async move {
            use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
            let started = Instant::now();
            let deadline = started + Duration::from_secs_f64(max_secs);
            let (next, done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            let per_conn = per_conn.max(1);
            let batches = count.div_ceil(per_conn);
            let mut tasks = Vec::new();
            for _ in 0..parallel.max(1) {
                let (url, next, done) = (url.clone(), next.clone(), done.clone());
                tasks.push(tokio::spawn(async move {
                    loop {
                        let b = next.fetch_add(1, Relaxed);
                        if b >= batches || Instant::now() >= deadline {
                            return anyhow::Ok(());
                        }
                        let mut client = Client::connect(&url, 6_000_000 + b).await?;
                        let first = b * per_conn;
                        for n in first..(first + per_conn).min(count) {
                            let id = DocumentId::numbered(from + n, tag);
                            client.fetch(&id, Duration::from_secs(30)).await?;
                            done.fetch_add(1, Relaxed);
                        }
                    }
                }));
            }
            // A server that stops answering ends the run; what it managed
            // is still reported.
            let mut error = None;
            for task in tasks {
                if let Err(e) = task.await.map_err(anyhow::Error::from).and_then(|r| r) {
                    error.get_or_insert(format!("{e:#}"));
                }
            }
            println!(
                "{}",
                serde_json::json!({
                    "touched": done.load(Relaxed),
                    "secs": started.elapsed().as_secs_f64(),
                    "error": error,
                })
            );
            Ok(())
        }),
        Command::FirstReply { url, doc, tag } => rt.block_on(async move {
            let seed = Seed::tagged(doc, tag)?;
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut client = loop {
                match Client::connect(&url, 5_000_000).await {
                    Ok(c) => break c,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            client.fetch(&seed.id, Duration::from_secs(30)).await?;
            println!("{{\"found\":true}}");
            Ok(())
        }),
        Command::LargeDoc {
            file,
            out,
            nodefs,
            docs,
            tag,
            edits,
        } => {
            let trace = offline::read_trace(&file, edits)?;
            println!("{}", offline::large_doc(&trace, &out, &nodefs, docs, tag)?);
            Ok(())
        }
        Command::Trace { file, edits } => {
            let trace = offline::read_trace(&file, edits)?;
            println!("{}", rt.block_on(offline::trace(&trace))?);
            Ok(())
        }
        Command::Reconnect { file, base, n } => {
            let ns: Vec<usize> = n
                .split(',')
                .map(|x| x.trim().parse())
                .collect::<Result<_, _>>()
                .context("--n is a comma-separated list of counts")?;
            let largest = ns.iter().max().copied().unwrap_or(0);
            let trace = offline::read_trace(&file, base + 2 * largest + 1)?;
            println!("{}", offline::reconnect(&trace, base, &ns)?);
            Ok(())
        }
        Command::Idle {
            url,
            conns,
            hold,
            floor,
        } => rt.block_on(async move {
            let seed = Seed::new(7)?;
            let mut creator = Client::connect(&url, 2_000_000).await?;
            if !floor {
                creator.upload(&seed).await?;
            }
            // Each held connection keeps reading: servers ping idle clients
            // and drop the ones that do not answer (the Node server does
            // after a few seconds), which would shrink what is measured.
            let closed = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let (url, closed, seed) = (&url, &closed, &seed);
            stream::iter(0..conns)
                .map(|n| async move {
                    let mut c = Client::connect(url, 3_000_000 + n)
                        .await
                        .with_context(|| format!("connection {n}"))?;
                    c.subscribe(seed, floor).await?;
                    tokio::spawn(c.stay_idle(closed.clone()));
                    anyhow::Ok(())
                })
                .buffer_unordered(OPENING)
                .try_collect::<Vec<()>>()
                .await?;
            println!("ready {conns}");
            tokio::time::sleep(Duration::from_secs_f64(hold)).await;
            drop(creator);
            let closed = closed.load(std::sync::atomic::Ordering::Relaxed);
            println!(
                "{}",
                serde_json::json!({ "held": conns, "closed_by_server": closed })
            );
            anyhow::ensure!(
                closed == 0,
                "the server closed {closed} of {conns} idle connections"
            );
            Ok(())
        }),
        Command::P1 {
            url,
            typists,
            observers,
            docs,
            rate,
            secs,
            warmup,
            drain,
            floor,
        } => {
            let report = rt.block_on(p1(P1 {
                url,
                typists,
                observers,
                docs: docs.max(1),
                rate,
                secs,
                warmup,
                drain,
                floor,
            }))?;
            println!("{report}");
            Ok(())
        }
    }
}

#[derive(Debug)]
struct P1 {
    url: String,
    typists: u64,
    observers: u64,
    docs: u64,
    rate: f64,
    secs: f64,
    warmup: f64,
    drain: f64,
    floor: bool,
}

/// How many connections open at once: one at a time, thousands of them
/// take longer than the run they are for.
const OPENING: usize = 32;

async fn p1(cfg: P1) -> anyhow::Result<serde_json::Value> {
    let shared = Arc::new(Shared::new());
    let seeds = (0..cfg.docs)
        .map(Seed::new)
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !cfg.floor {
        stream::iter(seeds.iter().zip(0u64..))
            .map(|(seed, d)| {
                let url = &cfg.url;
                async move {
                    let mut creator = Client::connect(url, 1_000_000 + d).await?;
                    creator.upload(seed).await.context("uploading a seed")
                }
            })
            .buffer_unordered(OPENING)
            .try_collect::<Vec<()>>()
            .await?;
    }
    // Typists round-robin over documents; observers on every document.
    let mut per_doc = vec![0u64; cfg.docs as usize];
    for t in 0..cfg.typists {
        per_doc[(t % cfg.docs) as usize] += 1;
    }
    let mut members = Vec::new();
    for (d, seed) in seeds.iter().enumerate() {
        let count = per_doc[d] + cfg.observers;
        for i in 0..count {
            let role = Role {
                typing_rate: (i < per_doc[d]).then_some(cfg.rate),
                receivers: count.saturating_sub(1),
                reply: !cfg.floor,
            };
            members.push((seed.clone(), role));
        }
    }
    let clients: Vec<_> = stream::iter(members.into_iter().zip(0u64..))
        .map(|((seed, role), n)| {
            let url = &cfg.url;
            async move { anyhow::Ok((Client::connect(url, n).await?, seed, role, n)) }
        })
        .buffered(OPENING)
        .try_collect()
        .await?;
    let start = Instant::now();
    let measure_at = start + Duration::from_secs_f64(cfg.warmup);
    let stop_sending = measure_at + Duration::from_secs_f64(cfg.secs);
    // Typists stop at `stop_sending`; everyone keeps receiving a little
    // longer so late deliveries are counted as late, not lost.
    let drain = Duration::from_secs_f64(cfg.drain);
    let mut tasks = Vec::new();
    for (client, seed, role, n) in clients {
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            client
                .run(seed, role, n, shared, stop_sending, stop_sending + drain)
                .await
        }));
    }
    tokio::time::sleep_until(measure_at.into()).await;
    shared.start_measuring();
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let (mut delays, expected) = shared.results();
    delays.sort();
    let delivered = delays.len() as u64;
    // Deliveries that never arrived rank after every one that did: a
    // percentile falling among them is infinite.
    let lost = expected.saturating_sub(delivered);
    let ranked = expected.max(delivered);
    let pct = |p: f64| -> f64 {
        if ranked == 0 {
            return f64::NAN;
        }
        let i = ((ranked as f64 - 1.0) * p).round() as usize;
        delays
            .get(i)
            .map_or(f64::INFINITY, |d| d.as_secs_f64() * 1e3)
    };
    let p99 = pct(0.99);
    errors.truncate(3);
    Ok(serde_json::json!({
        "scenario": "p1",
        "typists": cfg.typists,
        "docs": cfg.docs,
        "observers_per_doc": cfg.observers,
        "rate": cfg.rate,
        "keystrokes_per_sec": cfg.typists as f64 * cfg.rate,
        "expected": expected,
        "delivered": delivered,
        "lost": lost,
        "p50_ms": pct(0.5),
        "p99_ms": if p99.is_finite() { serde_json::json!(p99) } else { serde_json::json!("inf") },
        "max_ms": delays.last().map(|d| d.as_secs_f64() * 1e3),
        "errors": errors,
    }))
}
