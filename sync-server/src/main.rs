//! `converge-server`: run a Converge relay.
//!
//! ```sh
//! converge-server --listen 127.0.0.1:3030 --data-dir ./converge-data
//! converge-server serve --listen 127.0.0.1:3030   # the same
//! # built with `--features bench`:
//! converge-server bench-storage --dir /var/tmp/x --writers 64
//! converge-server bench-populate --dir ./converge-data --docs 100000
//! ```

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use converge_core::engine::Access;
use converge_core::engine::RelayPolicy;
use converge_core::runtime::{load_or_create_storage_id, Repo, RepoConfig};
use converge_core::storage::{RocksStorage, Storage};
use converge_server::auth::{mint_hs256, read_secret, Auth, Claims, Rights};
use converge_server::cluster::{Cluster, ClusterStorage};
use converge_server::config::{ConfigError, Mode, TokenArgs};
use converge_server::server::{serve, serve_tls, AppState};
#[cfg(feature = "bench")]
use converge_server::storage_bench;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = match Mode::load(std::env::args_os()) {
        Ok(Mode::Serve(config)) => config,
        #[cfg(feature = "bench")]
        Ok(Mode::BenchStorage(settings)) => return storage_bench::run(settings).await,
        #[cfg(feature = "bench")]
        Ok(Mode::BenchPopulate(populate)) => return storage_bench::populate(&populate),
        Ok(Mode::Token(args)) => return mint(&args),
        Err(ConfigError::Args(e)) => e.exit(),
        Err(e) => {
            eprintln!("converge-server: {e}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&config.log).context("bad --log filter")?)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();

    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let storage = Arc::new(
        RocksStorage::open(&config.data_dir, config.sync_writes)
            .with_context(|| format!("cannot open RocksDB in {}", config.data_dir.display()))?,
    );
    let storage_id =
        load_or_create_storage_id(storage.as_ref()).context("cannot read the storage id")?;
    let mut repo_config = RepoConfig::new(Some(storage_id.clone()));
    repo_config.engine.policy = Arc::new(RelayPolicy);
    repo_config.engine.max_message_bytes = config.max_message_bytes;
    repo_config.max_outbound_bytes = config.max_outbound_bytes;
    repo_config.engine.max_docs_in_memory = config.max_docs_in_memory;
    repo_config.engine.replica = config.replica.factory();
    repo_config.engine.handshake_timeout = Duration::from_secs(config.handshake_timeout_secs);
    repo_config.engine.max_docs_per_connection = config.max_docs_per_connection;
    repo_config.engine.max_doc_bytes = config.max_doc_bytes;
    repo_config.engine.limits.max_change_bytes = config.max_change_bytes;
    // Cluster mode: the repo's store is the JetStream log with this RocksDB
    // as its cache; everything else (listings, metadata, revocations) reads
    // the cache directly.
    let cluster = match config.cluster() {
        Some(settings) => Some(
            Cluster::connect(&settings)
                .await
                .context("cannot join the cluster (--nats-url)")?,
        ),
        None => None,
    };
    let repo_storage: Arc<dyn Storage> = match &cluster {
        Some(cluster) => Arc::new(ClusterStorage::new(
            cluster.clone(),
            storage.clone(),
            tokio::runtime::Handle::current(),
        )),
        None => storage.clone(),
    };
    let repo = Repo::start(repo_config, repo_storage);
    if let Some(cluster) = &cluster {
        // Following starts before serving: a document a client opens here
        // gets every chunk published from then on.
        cluster
            .clone()
            .follow(repo.clone())
            .await
            .context("cannot follow the cluster's log")?;
        tracing::info!(nats = ?config.nats_url, replicas = config.cluster_replicas, shards = config.cluster_shards, "cluster mode: documents live in NATS JetStream");
    }
    let auth = Arc::new(Auth::open(&config.auth(), storage.clone())?);
    if auth.is_open() {
        tracing::warn!(
            "NO AUTHENTICATION: no --jwt-secret-file or --jwt-public-key-file, so anyone who \
             can reach this relay may read and write every document. Configure a key before \
             exposing it."
        );
    } else if let Some(anonymous) = auth.anonymous() {
        tracing::warn!(every = %anonymous.every, "requests without a token are allowed (--allow-anonymous)");
    }

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    tracing::info!(
        address = %listener.local_addr()?,
        data_dir = %config.data_dir.display(),
        peer_id = %repo.peer_id(),
        %storage_id,
        replica = config.replica.name(),
        "converge relay listening (automerge-repo clients: {}://{})",
        if config.tls_cert.is_some() { "wss" } else { "ws" },
        listener.local_addr()?
    );
    let state = AppState {
        repo: repo.clone(),
        max_message_bytes: config.max_message_bytes,
        ping_interval: Duration::from_secs(config.ping_interval_secs),
        storage: storage.clone(),
        auth,
        gate: converge_server::limits::Gate::new(config.limits()),
        allowed_origins: Arc::new(config.allowed_origin.clone()),
    };
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let acceptor = converge_server::tls::acceptor(cert, key)?;
            serve_tls(listener, acceptor, state, shutdown_signal()).await?;
        }
        _ => serve(listener, state, shutdown_signal()).await?,
    }
    tracing::info!("shutting down: finishing storage writes");
    repo.shutdown().await;
    storage.flush().context("final flush failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// `converge-server token`: prints a token signed with the HS256 secret.
fn mint(args: &TokenArgs) -> anyhow::Result<()> {
    let secret = read_secret(&args.secret_file)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let mut docs = std::collections::BTreeMap::new();
    for id in &args.read {
        docs.insert(id.clone(), Access::Read);
    }
    for id in &args.write {
        docs.insert(id.clone(), Access::Write);
    }
    let claims = Claims {
        sub: Some(args.sub.clone()),
        exp: now + args.ttl,
        iat: Some(now),
        jti: args.jti.clone(),
        aud: args.aud.clone(),
        iss: args.iss.clone(),
        converge: Rights {
            docs,
            create: args.create,
            admin: args.admin,
        },
        ..Claims::default()
    };
    // The ids must be ones the relay will take.
    claims.grant().map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{}", mint_hs256(&secret, &claims)?);
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
