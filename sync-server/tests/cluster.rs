//! Cluster mode on real processes: three `nats-server`s as a JetStream
//! cluster (every stream with three replicas) on loopback, `converge-server`
//! nodes joined to it, and Rust clients each on its own node.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use converge_core::transport::ws;

mod common;
use common::{client, find_when_there, put, start_relay, wait_for};

/// One cluster test at a time: each runs three NATS servers and up to
/// three relays, and two cores carrying several such clusters at once
/// make their Raft elections flap (a test then measures the machine).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A JetStream cluster of NATS servers on loopback; killed when dropped.
struct Nats {
    servers: Vec<Child>,
    /// Client URLs, one per server.
    urls: Vec<String>,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Nats {
    /// Starts `n` servers routed to each other and waits until each one's
    /// health check (JetStream included) passes.
    fn start(n: usize) -> Nats {
        let dir = tempfile::tempdir().expect("tempdir");
        // (client, cluster, monitoring) ports per server.
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let mut servers = Vec::new();
        for (i, (client, route, http)) in ports.iter().enumerate() {
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| format!("nats-route://127.0.0.1:{}", p.1))
                .collect();
            let store = dir.path().join(format!("js{i}"));
            let config = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{http}\n\
                 jetstream {{ store_dir: \"{}\", max_memory_store: 64MB, max_file_store: 1GB }}\n\
                 cluster {{ name: converge-test, listen: 127.0.0.1:{route}, routes: [{}] }}\n",
                store.display(),
                routes.join(", ")
            );
            let file = dir.path().join(format!("n{i}.conf"));
            std::fs::write(&file, config).expect("write config");
            let server = Command::new("nats-server")
                .arg("-c")
                .arg(&file)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nats-server starts (make deps-cluster installs it)");
            servers.push(server);
        }
        let nats = Nats {
            servers,
            urls: ports
                .iter()
                .map(|p| format!("nats://127.0.0.1:{}", p.0))
                .collect(),
            _dir: dir,
        };
        for (_, _, http) in &ports {
            wait_healthy(*http);
        }
        nats
    }

    /// The flag value naming every server.
    fn flag(&self) -> String {
        self.urls.join(",")
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

/// Waits until a NATS server's `/healthz` answers 200 (JetStream ready).
fn wait_healthy(http_port: u16) {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ok = std::net::TcpStream::connect(("127.0.0.1", http_port))
            .and_then(|mut s| {
                s.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
                let mut answer = String::new();
                s.read_to_string(&mut answer)?;
                Ok(answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"))
            })
            .unwrap_or(false);
        if ok {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "NATS on monitoring port {http_port} never became healthy"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Converge node of the cluster, on its own data directory; killed
/// when dropped.
struct Node {
    child: Child,
    url: String,
}

impl Node {
    fn start(nats: &Nats, dir: &std::path::Path) -> Node {
        let args = [
            "--data-dir".to_owned(),
            dir.display().to_string(),
            "--nats-url".to_owned(),
            nats.flag(),
            "--cluster-replicas".to_owned(),
            "3".to_owned(),
            "--cluster-shards".to_owned(),
            "2".to_owned(),
        ];
        let (child, url) = start_relay(&args);
        Node { child, url }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Clients on different nodes edit one document and converge (the first
/// node publishes to the log, the second reads it when its client opens the
/// document and follows it live); a brand-new node with an empty data
/// directory serves the document with both edits, read from the log alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_different_nodes_converge_and_a_new_node_serves_everything() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let nats = Nats::start(3);
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let a = Node::start(&nats, dirs[0].path());
    let b = Node::start(&nats, dirs[1].path());

    let alice = client();
    let _alice_link = ws::connect(alice.clone(), a.url.clone());
    let bob = client();
    let _bob_link = ws::connect(bob.clone(), b.url.clone());

    let doc = alice.create(None).await.expect("create");
    put(&doc, "alice", "was here").await;
    let at_bob = find_when_there(&bob, doc.id()).await;
    wait_for(&at_bob, "alice", "was here").await;

    // Bob's edit goes through node B and the log to node A, live.
    put(&at_bob, "bob", "too").await;
    wait_for(&doc, "bob", "too").await;
    put(&doc, "alice", "again").await;
    wait_for(&at_bob, "alice", "again").await;

    // A node that has never seen the document.
    let c = Node::start(&nats, dirs[2].path());
    let carol = client();
    let _carol_link = ws::connect(carol.clone(), c.url.clone());
    let at_carol = find_when_there(&carol, doc.id()).await;
    wait_for(&at_carol, "alice", "again").await;
    wait_for(&at_carol, "bob", "too").await;
    drop((a, b, c));
}

/// HAProxy in front of two nodes (the configuration README documents,
/// with `balance first` so every client starts on node A): a client
/// editing through it keeps going when node A is killed with SIGKILL —
/// its link reconnects through HAProxy to node B — and nothing it wrote
/// before or after is lost: a client on node B sees every edit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_behind_haproxy_survives_kill_9_of_its_node() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let nats = Nats::start(3);
    let dirs: Vec<tempfile::TempDir> = (0..2)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let mut a = Node::start(&nats, dirs[0].path());
    let b = Node::start(&nats, dirs[1].path());
    let proxy = Haproxy::start(&[&a.url, &b.url]);

    let alice = client();
    let _alice_link = ws::connect(alice.clone(), proxy.url.clone());
    let doc = alice.create(None).await.expect("create");
    put(&doc, "before", "the kill").await;
    let bob = client();
    let _bob_link = ws::connect(bob.clone(), b.url.clone());
    let at_bob = find_when_there(&bob, doc.id()).await;
    wait_for(&at_bob, "before", "the kill").await;

    let alice_id = alice.peer_id().to_string();
    assert!(
        sessions(&a.url).contains(&alice_id),
        "alice starts on node A"
    );
    a.child.kill().expect("SIGKILL node A");
    let _ = a.child.wait();
    put(&doc, "after", "the kill").await;
    wait_for(&at_bob, "after", "the kill").await;
    wait_for(&at_bob, "before", "the kill").await;
    assert!(
        sessions(&b.url).contains(&alice_id),
        "alice reconnected through HAProxy to node B"
    );
    drop((b, proxy));
}

/// The body of a node's `/v1/sessions` (the relay is open in these tests).
fn sessions(ws_url: &str) -> String {
    use std::io::{Read, Write};
    let address = ws_url.trim_start_matches("ws://");
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    let request =
        format!("GET /v1/sessions HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    answer
}

/// HAProxy balancing WebSockets over relay nodes; killed when dropped.
struct Haproxy {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    fn start(nodes: &[&str]) -> Haproxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let servers: String = nodes
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let address = url.trim_start_matches("ws://");
                format!("  server node{i} {address} check inter 200ms fall 1 rise 1\n")
            })
            .collect();
        let config = format!(
            "defaults\n  mode http\n  retries 3\n  option redispatch 1\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n  timeout tunnel 1h\n\
             frontend relays\n  bind 127.0.0.1:{port}\n  default_backend nodes\n\
             backend nodes\n  balance first\n  option httpchk GET /healthz\n{servers}"
        );
        let file = dir.path().join("haproxy.cfg");
        std::fs::write(&file, config).expect("write config");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy starts (make deps-cluster installs it)");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "haproxy never listened"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Haproxy {
            child,
            url: format!("ws://127.0.0.1:{port}"),
            _dir: dir,
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
