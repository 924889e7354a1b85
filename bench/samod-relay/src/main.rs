//! A samod relay for the benchmarks: WebSocket on 127.0.0.1:<port> and
//! samod's NodeFS-compatible filesystem storage in <dataDir>, like the Node
//! reference server, and like it, it serves every document a peer asks for
//! or sends but never announces documents to peers on its own (samod's
//! default read-write policy without announcing).
//!
//!   samod-relay <port> <dataDir>
//!
//! Prints `samod listening on <addr>` once it accepts connections.

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use samod::storage::TokioFilesystemStorage;
use samod::{AcceptorHandle, Repo, ShareConfig};

async fn upgrade(ws: WebSocketUpgrade, State(acceptor): State<AcceptorHandle>) -> Response {
    ws.on_upgrade(move |socket| async move {
        if let Err(e) = acceptor.accept_axum(socket, None) {
            eprintln!("samod-relay: repo stopped: {e:?}");
        }
    })
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let (Some(port), Some(dir)) = (args.get(1).and_then(|p| p.parse::<u16>().ok()), args.get(2))
    else {
        eprintln!("usage: samod-relay <port> <dataDir>");
        std::process::exit(2);
    };
    std::fs::create_dir_all(dir).expect("create the data directory");
    let repo = Repo::build_tokio()
        .with_storage(TokioFilesystemStorage::new(dir))
        .with_share_policy(ShareConfig::read_write().with_announce(false))
        .load()
        .await;
    let url = samod::Url::parse(&format!("ws://127.0.0.1:{port}")).expect("a valid url");
    let acceptor = repo.make_acceptor(url).expect("the repo is running");
    let app = axum::Router::new()
        .route("/", get(upgrade))
        .with_state(acceptor);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the port");
    println!(
        "samod listening on {}",
        listener.local_addr().expect("bound")
    );
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .expect("serve");
    repo.stop().await;
}
