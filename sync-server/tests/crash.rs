//! The real `converge-server` binary, killed with SIGKILL: a change that
//! reached another client is on disk a second later, and the restarted
//! relay serves it. Also: bad configuration is refused with a clear error.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{ReadDoc, ROOT};
use converge_core::runtime::{Repo, RepoConfig};
use converge_core::storage::MemoryStorage;
use converge_core::transport::ws;

/// Starts the relay on a random port; returns the child and its URL.
fn start(dir: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_converge-server"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("CONVERGE_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
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
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, url)
}

fn client() -> Repo {
    Repo::start(RepoConfig::new(None), Arc::new(MemoryStorage::new()))
}

async fn find(
    repo: &Repo,
    id: &converge_core::wire::DocumentId,
) -> converge_core::runtime::DocHandle {
    for _ in 0..100 {
        if let Ok(h) = repo.find(id).await {
            return h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("document never found");
}

async fn value(handle: &converge_core::runtime::DocHandle, key: &'static str) -> Option<String> {
    handle
        .with_doc(move |d| {
            d.get(ROOT, key)
                .ok()
                .flatten()
                .and_then(|(v, _)| v.into_string().ok())
        })
        .await
        .ok()
        .flatten()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_seen_by_others_survives_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut server, url) = start(dir.path());

    let alice = client();
    let _a = ws::connect(alice.clone(), url.clone());
    let bob = client();
    let _b = ws::connect(bob.clone(), url.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let doc = alice.create(None).await.expect("create");
    doc.change(|d| {
        let mut tx = d.transaction();
        tx.put(ROOT, "kept", "yes").expect("put");
        tx.commit();
    })
    .await
    .expect("change");
    let seen = find(&bob, doc.id()).await;
    for _ in 0..100 {
        if value(&seen, "kept").await.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(value(&seen, "kept").await.as_deref(), Some("yes"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.kill().expect("SIGKILL");
    let _ = server.wait();
    drop((_a, _b));

    let (mut server, url) = start(dir.path());
    let carol = client();
    let _c = ws::connect(carol.clone(), url);
    let found = find(&carol, doc.id()).await;
    for _ in 0..100 {
        if value(&found, "kept").await.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(value(&found, "kept").await.as_deref(), Some("yes"));
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn bad_configuration_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_converge-server"))
            .args(args)
            .output()
            .expect("runs")
    };
    let out = run(&["--listen", "not-an-address"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));

    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:1\"\nunknown_key = 3\n").expect("write");
    let out = run(&["--config", file.to_str().expect("utf8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad config file") && err.contains("unknown_key"),
        "{err}"
    );

    let out = run(&["--max-message-bytes", "10"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_message_bytes"));
}
