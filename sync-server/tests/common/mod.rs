//! What the binary's tests share: starting the real `converge-server`,
//! client repos, waiting for documents and values.
#![allow(dead_code)] // each test binary uses a part

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use automerge::ReadDoc;
use converge_core::runtime::{DocHandle, Repo, RepoConfig};
use converge_core::storage::MemoryStorage;
use converge_core::wire::DocumentId;

/// Starts `converge-server` with `args` (plus a random port); returns the
/// child and its WebSocket URL once it listens.
pub fn start_relay(args: &[String]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_converge-server"))
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("CONVERGE_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        // (Only a failure to start is written here: shown with the test.)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("server starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("server prints its address")
            .expect("read");
        if let Some(at) = line.find("ws://") {
            let rest = &line[at..];
            let end = rest
                .find(|c: char| c.is_whitespace() || c == ')')
                .unwrap_or(rest.len());
            break rest[..end].to_owned();
        }
    };
    // Keep draining the log so the server never blocks on a full pipe;
    // with CONVERGE_TEST_LOGS=<dir>, into a file per server there.
    let keep = std::env::var_os("CONVERGE_TEST_LOGS").map(|dir| {
        let path = std::path::Path::new(&dir).join(format!("relay-{}.log", child.id()));
        std::fs::File::create(path).expect("log file")
    });
    std::thread::spawn(move || {
        let mut keep = keep;
        for line in lines.map_while(Result::ok) {
            if let Some(file) = keep.as_mut() {
                let _ = std::io::Write::write_all(file, format!("{line}\n").as_bytes());
            }
        }
    });
    (child, url)
}

/// A client repo in memory.
pub fn client() -> Repo {
    Repo::start(RepoConfig::new(None), Arc::new(MemoryStorage::new()))
}

/// Waits until `repo` finds `id` (its relay may not have it yet).
pub async fn find_when_there(repo: &Repo, id: &DocumentId) -> DocHandle {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(h) = repo.find(id).await {
            return h;
        }
        assert!(tokio::time::Instant::now() < deadline, "{id} never found");
        tokio::task::yield_now().await;
    }
}

/// The string at root key `key`, if any.
pub async fn text_at(handle: &DocHandle, key: &str) -> Option<String> {
    let key = key.to_owned();
    handle
        .with_doc(move |d| {
            d.get(automerge::ROOT, key.as_str())
                .ok()
                .flatten()
                .and_then(|(v, _)| v.into_string().ok())
        })
        .await
        .expect("repo running")
        .flatten()
}

/// Waits (on the repo's events) until root key `key` of `handle` holds
/// `value`.
pub async fn wait_for(handle: &DocHandle, key: &str, value: &str) {
    let mut events = handle.repo().events();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while text_at(handle, key).await.as_deref() != Some(value) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} never became {value} (it is {:?})",
            text_at(handle, key).await
        );
        let _ = tokio::time::timeout(Duration::from_millis(50), events.recv()).await;
    }
}

/// Sets root key `key` to `value` in one change.
pub async fn put(handle: &DocHandle, key: &'static str, value: &'static str) {
    handle
        .change(move |d| {
            let mut tx = d.transaction();
            automerge::transaction::Transactable::put(&mut tx, automerge::ROOT, key, value)
                .expect("put");
            tx.commit();
        })
        .await
        .expect("change");
}
