//! TLS end to end: certificates made at run time with rcgen (a test CA and leaves signed by it),
//! a real headroom with `[server.tls]`, real rustls clients, and an HTTPS backend.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const T: Duration = Duration::from_secs(20);

/// A test CA in a temporary directory, issuing leaves with chosen serial numbers.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "headroom test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca }
    }

    fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues a leaf for `names` with `serial`; writes `{file}.crt` and `{file}.key`.
    fn leaf(&self, file: &str, names: &[&str], serial: u64) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.serial_number = Some(serial.into());
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (crt, keyp) = (self.dir.path().join(format!("{file}.crt")), self.dir.path().join(format!("{file}.key")));
        write_atomically(&crt, cert.pem().as_bytes());
        write_atomically(&keyp, key.serialize_pem().as_bytes());
        (crt, keyp)
    }
}

/// Writes elsewhere and renames over, as certificate tools do.
fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn tls_connect(addr: SocketAddr, ca: &Path, sni: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(ca, alpn));
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector.connect(ServerName::try_from(sni.to_string()).unwrap(), tcp).await.unwrap()
}

/// The serial number of the certificate the server presented.
fn peer_serial(s: &TlsStream<TcpStream>) -> u64 {
    let der = &s.get_ref().1.peer_certificates().unwrap()[0];
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    cert.tbs_certificate.serial.try_into().unwrap()
}

/// An in-process mock inference server (SSE when asked).
async fn mock() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let opts = headroom::mock::MockOptions {
        ttft: Duration::from_millis(20),
        token_interval: Duration::from_millis(40),
        tokens: 10,
        ..Default::default()
    };
    tokio::spawn(headroom::mock::serve(l, opts, std::future::pending()));
    addr
}

fn tls_config(backend: SocketAddr, tls: &str) -> String {
    format!("[server]\n[server.tls]\n{tls}\n[pools.default]\n[[pools.default.backends]]\naddr = \"{backend}\"\n")
}

const CHAT: &str = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

/// Streams a chat completion over an h2 connection: (chunk arrival times since the request, body).
async fn h2_stream(stream: TlsStream<TcpStream>) -> (Vec<Duration>, String) {
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("https://localhost/v1/chat/completions")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(CHAT)))
        .unwrap();
    let started = Instant::now();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    timed_text(resp.into_body(), started).await
}

/// A response body's text and when each piece of it arrived (since `started`).
async fn timed_text(mut body: hyper::body::Incoming, started: Instant) -> (Vec<Duration>, String) {
    let (mut times, mut text) = (Vec::new(), String::new());
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            times.push(started.elapsed());
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    (times, text)
}

/// The mock's token stream arrived whole and event by event, not buffered into one piece.
fn assert_streamed(times: &[Duration], text: &str) {
    assert!(text.contains("data: [DONE]"), "{text}");
    assert!(times.len() >= 5, "events arrived in {} pieces", times.len());
    let spread = *times.last().unwrap() - times[0];
    assert!(spread >= Duration::from_millis(200), "events were buffered: first and last {spread:?} apart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_by_alpn_streams_sse_and_an_http1_only_client_works() {
    let pki = Pki::new();
    let (crt, key) = pki.leaf("srv", &["localhost"], 11);
    let backend = mock().await;
    let hr = Headroom::start(&tls_config(backend, &format!("cert = {crt:?}\nkey = {key:?}"))).await;

    let s = tls_connect(hr.addr, &pki.ca_path(), "localhost", &[b"h2", b"http/1.1"]).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (times, text) = h2_stream(s).await;
    assert_streamed(&times, &text);

    let s = tls_connect(hr.addr, &pki.ca_path(), "localhost", &[b"http/1.1"]).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/v1/models").header("host", "localhost").body(full("")).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_11);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("mock-model"));
    // A client without ALPN gets HTTP/1.1 too.
    let s = tls_connect(hr.addr, &pki.ca_path(), "localhost", &[]).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), None);
    hr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_unknown_names_get_the_default() {
    let pki = Pki::new();
    let (dc, dk) = pki.leaf("default", &["default.test"], 100);
    let (ac, ak) = pki.leaf("a", &["a.test"], 101);
    let (bc, bk) = pki.leaf("b", &["b.test", "*.b.test"], 102);
    let backend = mock().await;
    let tls = format!(
        "cert = {dc:?}\nkey = {dk:?}\n[[server.tls.certs]]\nserver_names = [\"a.test\"]\ncert = {ac:?}\nkey = {ak:?}\n\
         [[server.tls.certs]]\nserver_names = [\"b.test\", \"*.b.test\"]\ncert = {bc:?}\nkey = {bk:?}\n"
    );
    let hr = Headroom::start(&tls_config(backend, &tls)).await;
    let ca = pki.ca_path();
    assert_eq!(peer_serial(&tls_connect(hr.addr, &ca, "a.test", &[]).await), 101);
    assert_eq!(peer_serial(&tls_connect(hr.addr, &ca, "b.test", &[]).await), 102);
    assert_eq!(peer_serial(&tls_connect(hr.addr, &ca, "x.b.test", &[]).await), 102, "wildcard");
    // A name no entry lists: the default certificate (whose name then doesn't match: the client
    // must refuse it).
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(&ca, &[]));
    let tcp = TcpStream::connect(hr.addr).await.unwrap();
    let err = connector.connect(ServerName::try_from("c.test").unwrap(), tcp).await.unwrap_err();
    assert!(err.to_string().contains("certificate not valid for name"), "{err}");
    assert_eq!(peer_serial(&tls_connect(hr.addr, &ca, "default.test", &[]).await), 100);
    hr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_certificate_files_reach_new_connections_while_open_streams_continue() {
    let pki = Pki::new();
    let (crt, key) = pki.leaf("srv", &["localhost"], 1);
    let backend = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("headroom.toml");
    std::fs::write(&cfg_path, tls_config(backend, &format!("cert = {crt:?}\nkey = {key:?}"))).unwrap();
    let hr = Headroom::start_file(&cfg_path).await;
    let ca = pki.ca_path();
    assert_eq!(peer_serial(&tls_connect(hr.addr, &ca, "localhost", &[]).await), 1);

    // A stream opened on the old certificate...
    let open = tls_connect(hr.addr, &ca, "localhost", &[b"h2"]).await;
    let stream = tokio::spawn(h2_stream(open));
    // ... while the files are replaced (renamed over).
    tokio::time::sleep(Duration::from_millis(100)).await;
    pki.leaf("srv", &["localhost"], 2);
    poll_until(T, "new connections to get serial 2", || async {
        peer_serial(&tls_connect(hr.addr, &ca, "localhost", &[]).await) == 2
    })
    .await;
    let (_, text) = stream.await.unwrap();
    assert!(text.contains("data: [DONE]"), "the open stream was cut: {text}");

    // A key that doesn't belong to the certificate: refused, serial 2 stays.
    let (_, other_key) = pki.leaf("other", &["localhost"], 3);
    std::fs::copy(&other_key, dir.path().join("k.tmp")).unwrap();
    std::fs::rename(dir.path().join("k.tmp"), &key).unwrap();
    poll_until(T, "the bad pair reported", || async { hr.config_status().await["tls_error"].is_string() }).await;
    let err = hr.config_status().await["tls_error"].as_str().unwrap().to_string();
    assert!(err.contains("do not belong together"), "{err}");
    assert_eq!(peer_serial(&tls_connect(hr.addr, &ca, "localhost", &[]).await), 2);
    let metrics = String::from_utf8(get(&format!("http://{}/metrics", hr.admin)).await.1.to_vec()).unwrap();
    assert!(
        metric_value(&metrics, "headroom_tls_cert_reloads_total{outcome=\"error\"}") >= 1.0,
        "no reload error counted"
    );
    assert!(metrics.contains("headroom_tls_cert_expiry_timestamp_seconds{name=\"default\"}"));
    hr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_stalled_and_old_protocol_clients_are_refused_without_disturbing_others() {
    let pki = Pki::new();
    let (crt, key) = pki.leaf("srv", &["localhost"], 7);
    let backend = mock().await;
    let tls = format!("cert = {crt:?}\nkey = {key:?}\nhandshake_timeout = \"300ms\"");
    let hr = Headroom::start(&tls_config(backend, &tls)).await;
    // An established h2 connection that must keep working throughout.
    let good = tls_connect(hr.addr, &pki.ca_path(), "localhost", &[b"h2"]).await;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(good)).await.unwrap();
    tokio::spawn(conn);
    let ask = |sender: &mut hyper::client::conn::http2::SendRequest<Body>| {
        let req = http::Request::get("https://localhost/v1/models").body(full("")).unwrap();
        let fut = sender.send_request(req);
        async move { fut.await.unwrap().status() }
    };
    assert_eq!(ask(&mut sender).await, 200);

    // Plain HTTP on the TLS port: no HTTP answer, the connection is closed.
    let plain = raw(hr.addr, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", Duration::from_secs(5)).await;
    assert!(!plain.starts_with("HTTP/"), "plaintext got an HTTP answer: {plain:?}");

    // A client that connects and says nothing is closed after the handshake timeout.
    let started = Instant::now();
    let mut idle = TcpStream::connect(hr.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf)).await.expect("not closed").unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() >= Duration::from_millis(250), "closed too early: {:?}", started.elapsed());

    // A TLS 1.1-only ClientHello: answered with an alert (or a close), never a ServerHello.
    let mut hello = vec![0x16, 0x03, 0x01, 0x00, 0x2f, 0x01, 0x00, 0x00, 0x2b, 0x03, 0x02];
    hello.extend_from_slice(&[7u8; 32]);
    hello.extend_from_slice(&[0x00, 0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f, 0x01, 0x00]);
    let mut old = TcpStream::connect(hr.addr).await.unwrap();
    old.write_all(&hello).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), old.read_to_end(&mut answer)).await;
    assert!(answer.first().is_none_or(|b| *b == 0x15), "TLS 1.1 client got {answer:?}");

    assert_eq!(ask(&mut sender).await, 200, "the established connection was disturbed");
    let metrics = String::from_utf8(get(&format!("http://{}/metrics", hr.admin)).await.1.to_vec()).unwrap();
    for result in ["ok", "error", "timeout"] {
        let n = metric_value(&metrics, &format!("headroom_tls_handshakes_total{{result=\"{result}\"}}"));
        assert!(n >= 1.0, "no {result} handshake counted");
    }
    hr.stop().await;
}

/// An HTTPS backend presenting `cert`, speaking h2 or HTTP/1.1 by ALPN; answers with the version.
async fn https_backend(cert: &Path, key: &Path) -> SocketAddr {
    let pair = headroom::tls::load_pair(cert, key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(pair.cert.clone(), {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap()
        })
        .unwrap();
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else { continue };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    Ok::<_, std::convert::Infallible>(http::Response::new(full(format!("{:?}", req.version()))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_trusts_the_given_ca_checks_the_name_and_negotiates_h2() {
    let pki = Pki::new();
    let (crt, key) = pki.leaf("backend", &["backend.test"], 5);
    let backend = https_backend(&crt, &key).await;
    let ca = pki.ca_path();
    let pool = |name: &str, protocol: &str| {
        format!(
            "[pools.default]\ntls = true\ntls_ca = {ca:?}\ntls_server_name = \"{name}\"\nprotocol = \"{protocol}\"\n\
             [[pools.default.backends]]\naddr = \"{backend}\"\n"
        )
    };
    let hr = Headroom::start(&pool("backend.test", "auto")).await;
    let (status, body) = get(&hr.url("/")).await;
    assert_eq!((status.as_u16(), &body[..]), (200, &b"HTTP/2.0"[..]), "auto picks h2 by ALPN");
    hr.stop().await;
    let hr = Headroom::start(&pool("backend.test", "http1")).await;
    let (status, body) = get(&hr.url("/")).await;
    assert_eq!((status.as_u16(), &body[..]), (200, &b"HTTP/1.1"[..]));
    hr.stop().await;
    // The backend's certificate doesn't name this server name: refused, 502.
    let hr = Headroom::start(&pool("other.test", "auto")).await;
    let (status, _) = get(&hr.url("/")).await;
    assert_eq!(status, 502);
    hr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_over_tls_streams_unbuffered_keeps_alive_and_answers_100_continue() {
    let pki = Pki::new();
    let (crt, key) = pki.leaf("srv", &["localhost"], 13);
    let backend = mock().await;
    let hr = Headroom::start(&tls_config(backend, &format!("cert = {crt:?}\nkey = {key:?}"))).await;

    // A token stream over HTTP/1.1 + TLS arrives event by event, then the connection carries
    // another request.
    let s = tls_connect(hr.addr, &pki.ca_path(), "localhost", &[b"http/1.1"]).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("/v1/chat/completions")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(full(CHAT))
        .unwrap();
    let started = Instant::now();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let (times, text) = timed_text(resp.into_body(), started).await;
    assert_streamed(&times, &text);
    // (Once the client's connection task has seen the end of the first answer.)
    sender.ready().await.expect("the connection was not kept alive");
    let req = http::Request::get("/v1/models").header("host", "localhost").body(full("")).unwrap();
    let resp = sender.send_request(req).await.expect("the second request failed");
    assert_eq!(resp.status(), 200);

    // Expect: 100-continue is answered through the encryption before the body is sent.
    let mut s = tls_connect(hr.addr, &pki.ca_path(), "localhost", &[b"http/1.1"]).await;
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        CHAT.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("no 100 Continue").unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100 Continue"), "{:?}", &buf[..n]);
    s.write_all(CHAT.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await.expect("no answer");
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
    hr.stop().await;
}
