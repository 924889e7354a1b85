//! TLS and the origin allowlist, over real sockets: a `wss://` client and
//! an `https://` request against a certificate made here; plain TCP to the
//! TLS port fails cleanly and the relay serves on; a browser origin off
//! the allowlist gets no WebSocket.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::Connector;

use super::relay::Relay;

/// A self-signed certificate for localhost and 127.0.0.1, written to
/// `dir`: the acceptor to serve with and the client configuration that
/// trusts it.
fn certificate(dir: &std::path::Path) -> (tokio_rustls::TlsAcceptor, Arc<rustls::ClientConfig>) {
    let key = rcgen::KeyPair::generate().expect("key");
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("params");
    let cert = params.self_signed(&key).expect("self-signed");
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).expect("cert");
    std::fs::write(&key_file, key.serialize_pem()).expect("key");
    let acceptor = converge_server::tls::acceptor(&cert_file, &key_file).expect("acceptor");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(cert.der().to_vec()))
        .expect("root");
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (acceptor, Arc::new(client))
}

/// A `wss://` WebSocket that completes the automerge-repo handshake.
async fn wss_handshake(relay: &Relay, client: &Arc<rustls::ClientConfig>, name: &str) {
    let (mut socket, _) = tokio_tungstenite::connect_async_tls_with_config(
        relay.url.as_str(),
        None,
        false,
        Some(Connector::Rustls(client.clone())),
    )
    .await
    .expect("wss connect");
    super::sockets::handshake(&mut socket, name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_and_https_work_and_plain_tcp_fails_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (acceptor, client) = certificate(dir.path());
    let relay = Relay::start_tls(&dir.path().join("db"), Some(acceptor), Vec::new()).await;
    assert!(relay.url.starts_with("wss://"), "{}", relay.url);
    let addr = relay.url.trim_start_matches("wss://").to_owned();

    wss_handshake(&relay, &client, "first").await;

    // https://…/healthz
    let tcp = tokio::net::TcpStream::connect(&addr).await.expect("tcp");
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(client.clone())
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");

    // Plain HTTP to the TLS port: no HTTP answer, the connection just ends.
    let mut plain = tokio::net::TcpStream::connect(&addr).await.expect("tcp");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), plain.read_to_end(&mut got))
        .await
        .expect("the relay ends a plain connection");
    assert!(
        read.is_err() || !got.starts_with(b"HTTP/"),
        "plain TCP got an HTTP answer: {:?}",
        String::from_utf8_lossy(&got)
    );
    // A plain WebSocket client fails too, and the relay serves on.
    let plain_ws = relay.url.replace("wss://", "ws://");
    assert!(tokio_tungstenite::connect_async(plain_ws.as_str())
        .await
        .is_err());
    wss_handshake(&relay, &client, "second").await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_off_the_allowlist_get_no_websocket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = Relay::start_tls(dir.path(), None, vec!["https://app.example".into()]).await;
    let dial = |origin: Option<&'static str>| {
        let url = relay.url.clone();
        async move {
            let mut request = url.into_client_request().expect("request");
            if let Some(origin) = origin {
                request
                    .headers_mut()
                    .insert("origin", origin.parse().expect("header"));
            }
            match tokio_tungstenite::connect_async(request).await {
                Ok(_) => 101,
                Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
                Err(e) => panic!("dial: {e}"),
            }
        }
    };
    assert_eq!(dial(Some("https://evil.example")).await, 403);
    assert_eq!(dial(Some("https://app.example")).await, 101);
    assert_eq!(dial(None).await, 101, "native clients send no origin");
    relay.stop().await;
}
