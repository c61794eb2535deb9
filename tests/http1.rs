//! HTTP/1.1 on the wire: header hygiene in both directions, smuggling shapes refused, Expect:
//! 100-continue, malformed backend answers, pipelining and keep-alive framing, request bodies
//! streamed from the socket.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::sync::atomic::Ordering;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_stripped_and_forwarding_headers_added() {
    let backend = TestBackend::echo().await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;
    let req = "GET /echo?x=1 HTTP/1.1\r\nHost: api.example:8080\r\nConnection: close, x-custom\r\nX-Custom: secret\r\n\
               Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: x-t\r\nProxy-Authorization: Basic abc\r\n\
               Proxy-Connection: keep-alive\r\nX-Forwarded-For: 10.0.0.1\r\nX-Request-Id: my-id-1\r\nAccept: */*\r\n\r\n";
    let resp = raw(hr.addr, req.as_bytes(), T).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.to_ascii_lowercase().contains("x-request-id: my-id-1"), "{resp}");
    let seen = json_of(&resp);
    let h = &seen["headers"];
    for gone in ["connection", "x-custom", "keep-alive", "te", "trailer", "proxy-authorization", "proxy-connection"] {
        assert!(h.get(gone).is_none(), "{gone} reached the backend: {h}");
    }
    assert_eq!(seen["uri"], "/echo?x=1");
    assert_eq!(h["host"], "api.example:8080");
    assert_eq!(h["accept"], "*/*");
    assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "api.example:8080");
    assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http;host=\"api.example:8080\"");
    assert!(h["via"].as_str().unwrap().starts_with("1.1 headroom-"), "{}", h["via"]);
    assert_eq!(h["x-request-id"], "my-id-1");

    // Without an id, one is made up and passed both ways.
    let resp = client().request(Request::get(hr.url("/echo")).body(full(Bytes::new())).unwrap()).await.unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    let seen: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(seen["headers"]["x-request-id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_headers_are_stripped() {
    let backend = TestBackend::start(|_req: Request<Incoming>| async {
        Response::builder()
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic")
            .header("trailer", "x-t")
            .header("upgrade", "h2c")
            .header("x-kept", "yes")
            .body(full("ok"))
            .unwrap()
    })
    .await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;
    let resp = client().request(Request::get(hr.url("/")).body(full(Bytes::new())).unwrap()).await.unwrap();
    let h = resp.headers();
    for gone in ["keep-alive", "proxy-authenticate", "trailer", "upgrade"] {
        assert!(!h.contains_key(gone), "{gone} reached the client");
    }
    assert_eq!(h["x-kept"], "yes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_shapes_are_refused_and_not_forwarded() {
    let backend = TestBackend::echo().await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;
    let shapes: [&[u8]; 4] = [
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    ];
    for shape in shapes {
        let resp = raw(hr.addr, shape, T).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{:?} got {resp}", String::from_utf8_lossy(shape));
    }
    // Framing and Host shapes that backends read differently, and what a gateway does not do.
    let refused: [(&[u8], &str); 6] = [
        (b"GET / HTTP/1.1\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "400"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", "400"),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "400"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "501"),
        (b"CONNECT b.example:443 HTTP/1.1\r\nHost: b.example:443\r\n\r\n", "501"),
    ];
    for (shape, status) in refused {
        let resp = raw(hr.addr, shape, T).await;
        assert!(resp.starts_with(&format!("HTTP/1.1 {status}")), "{:?} got {resp}", String::from_utf8_lossy(shape));
        assert!(resp.to_ascii_lowercase().contains("connection: close"), "{resp}");
    }
    let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(70_000));
    let resp = raw(hr.addr, long.as_bytes(), T).await;
    assert!(resp.starts_with("HTTP/1.1 414"), "{resp}");
    assert_eq!(backend.hits.load(Ordering::SeqCst), 0, "a refused request reached the backend");

    // The same connection shapes without the ambiguity are fine.
    let ok =
        raw(hr.addr, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello", T).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert_eq!(json_of(&ok)["body_len"], 5);
    // A target in absolute form names the host, whatever Host says; it goes upstream as Host.
    for text in [
        &b"GET http://b.example:81/x HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
        b"GET http://b.example:81/x HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    ] {
        let resp = raw(hr.addr, text, T).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert_eq!(json_of(&resp)["headers"]["host"], "b.example:81", "{resp}");
    }
    let chunked = raw(
        hr.addr,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        T,
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 200"), "{chunked}");
    assert_eq!(json_of(&chunked)["body_len"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_once_and_not_forwarded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = TestBackend::echo().await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;
    let mut s = tokio::net::TcpStream::connect(hr.addr).await.unwrap();
    s.write_all(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(T, s.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100 Continue"));
    s.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut rest)).await.unwrap().unwrap();
    let rest = String::from_utf8_lossy(&rest).into_owned();
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
    let seen = json_of(&rest);
    assert_eq!(seen["body_len"], 5);
    assert!(seen["headers"].get("expect").is_none(), "Expect reached the backend");
}

/// A backend that answers every request on a connection with the same raw bytes.
async fn raw_backend(answer: &'static [u8]) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                loop {
                    let Ok(n) = s.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    // Requests here have no body: one answer per blank line.
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn malformed_or_ambiguous_backend_responses_are_refused_or_reframed() {
    // Two different lengths: which one the client would believe is exactly what smuggling needs.
    let conflicting = raw_backend(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!").await;
    let hr = Headroom::start(&config(&[(conflicting, 1)], "", "")).await;
    let (status, body) = get(&hr.url("/")).await;
    assert_eq!(status, 502);
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("invalid response from backend"), "{text}");

    // Transfer-Encoding and Content-Length together: read by its chunks, the length is dropped.
    let both = raw_backend(
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let hr = Headroom::start(&config(&[(both, 1)], "", "")).await;
    for _ in 0..3 {
        let resp = client().request(Request::get(hr.url("/")).body(full(Bytes::new())).unwrap()).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().get("content-length").is_none_or(|v| v == "5"), "{:?}", resp.headers());
        assert_eq!(&resp.into_body().collect().await.unwrap().to_bytes()[..], b"hello");
    }
    // ... and such a connection is not reused: each request opened its own.
    let (_, page) = get(&format!("http://{}/metrics", hr.admin)).await;
    let metrics = String::from_utf8_lossy(&page).to_string();
    let connects =
        metric_value(&metrics, &format!("headroom_upstream_connects_total{{pool=\"default\",backend=\"{both}\"}}"));
    assert_eq!(connects, 3.0, "{metrics}");

    // A head that never ends within 64 KiB.
    let endless: &'static [u8] =
        Box::leak(format!("HTTP/1.1 200 OK\r\nx-pad: {}\r\n\r\n", "a".repeat(70_000)).into_bytes().into_boxed_slice());
    let hr = Headroom::start(&config(&[(raw_backend(endless).await, 1)], "", "")).await;
    assert_eq!(get(&hr.url("/")).await.0, 502);
}

/// One response as a client reads it off the wire: status, head text, body (de-chunked).
struct WireResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// Splits the bytes of consecutive responses. `head_only[i]` marks answers to HEAD requests.
fn split_responses(mut wire: &[u8], head_only: &[bool]) -> Vec<WireResponse> {
    let mut out = Vec::new();
    while !wire.is_empty() {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut fields);
        let len = match resp.parse(wire).expect("unparsable response") {
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial => panic!("truncated head: {:?}", String::from_utf8_lossy(wire)),
        };
        let field = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        let head = String::from_utf8_lossy(&wire[..len]).to_ascii_lowercase();
        let status = resp.code.unwrap();
        let (length, chunked) = (field("content-length"), field("transfer-encoding").is_some_and(|t| t == "chunked"));
        let rest = &wire[len..];
        let (body, used) = if head_only.get(out.len()).copied().unwrap_or(false) {
            (Vec::new(), 0)
        } else if chunked {
            let (mut body, mut at) = (Vec::new(), 0);
            loop {
                let nl = rest[at..].windows(2).position(|w| w == b"\r\n").unwrap() + at;
                let size = usize::from_str_radix(std::str::from_utf8(&rest[at..nl]).unwrap(), 16).unwrap();
                at = nl + 2;
                if size == 0 {
                    assert_eq!(&rest[at..at + 2], b"\r\n", "trailers where none were expected");
                    break (body, at + 2);
                }
                body.extend_from_slice(&rest[at..at + size]);
                assert_eq!(&rest[at + size..at + size + 2], b"\r\n");
                at += size + 2;
            }
        } else if let Some(n) = length {
            let n: usize = n.parse().unwrap();
            (rest[..n].to_vec(), n)
        } else {
            (rest.to_vec(), rest.len())
        };
        out.push(WireResponse { status, head, body });
        wire = &rest[used..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_clients_pipeline_keep_alive_and_get_framing_their_version_understands() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = TestBackend::echo().await;
    let hr = Headroom::start(&config(&[(echo.addr, 1)], "", "")).await;

    // Three pipelined requests in one write (a GET, a POST with its body, a HEAD) and a last one
    // that closes: four answers, in order, each framed so the next one parses.
    let wire = raw(
        hr.addr,
        b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nPOST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc\
          HEAD /c HTTP/1.1\r\nHost: a\r\n\r\nGET /d HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        T,
    )
    .await;
    let answers = split_responses(wire.as_bytes(), &[false, false, true, false]);
    assert_eq!(answers.len(), 4, "{wire}");
    let seen: Vec<serde_json::Value> =
        [&answers[0], &answers[1], &answers[3]].iter().map(|a| serde_json::from_slice(&a.body).unwrap()).collect();
    assert_eq!(
        (seen[0]["uri"].as_str(), seen[1]["uri"].as_str(), seen[2]["uri"].as_str()),
        (Some("/a"), Some("/b"), Some("/d"))
    );
    assert_eq!(seen[1]["body_len"], 3);
    assert!(answers.iter().all(|a| a.status == 200 && a.head.contains("\r\ndate: ")), "{wire}");
    // HEAD: the backend's length, no body.
    assert!(answers[2].head.contains("content-length: "), "{}", answers[2].head);
    assert!(answers[3].head.contains("connection: close"), "{}", answers[3].head);

    // HTTP/1.0 without keep-alive: answered with a length, then closed.
    let wire = raw(hr.addr, b"GET /e HTTP/1.0\r\nHost: a\r\n\r\n", T).await;
    let answers = split_responses(wire.as_bytes(), &[]);
    assert_eq!(answers.len(), 1);
    assert!(answers[0].head.contains("content-length: ") && answers[0].head.contains("connection: close"));

    // HTTP/1.0 with keep-alive: told so, and the connection carries a second request.
    let mut s = tokio::net::TcpStream::connect(hr.addr).await.unwrap();
    s.write_all(b"GET /f HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 8192];
    let n = tokio::time::timeout(T, s.read(&mut buf)).await.unwrap().unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(first.contains("connection: keep-alive"), "{first}");
    s.write_all(b"GET /g HTTP/1.0\r\nHost: a\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut rest)).await.unwrap().unwrap();
    let second = split_responses(&rest, &[]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&second[0].body).unwrap()["uri"], "/g");

    // A body of unknown length: chunked for HTTP/1.1, until close for HTTP/1.0.
    let (streaming, mut streams) = streaming_backend().await;
    let hr2 = Headroom::start(&config(&[(streaming.addr, 1)], "", "")).await;
    tokio::spawn(async move {
        while let Some(events) = streams.recv().await {
            for part in ["data: one\n\n", "data: two\n\n"] {
                events.send(Bytes::from_static(part.as_bytes())).await.unwrap();
            }
        }
    });
    let wire = raw(hr2.addr, b"GET /s HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", T).await;
    let answers = split_responses(wire.as_bytes(), &[]);
    assert!(answers[0].head.contains("transfer-encoding: chunked"), "{wire}");
    assert_eq!(answers[0].body, b"data: one\n\ndata: two\n\n");
    let wire = raw(hr2.addr, b"GET /s HTTP/1.0\r\nHost: a\r\n\r\n", T).await;
    let answers = split_responses(wire.as_bytes(), &[]);
    assert!(!answers[0].head.contains("transfer-encoding") && !answers[0].head.contains("content-length"), "{wire}");
    assert_eq!(answers[0].body, b"data: one\n\ndata: two\n\n");
    hr.stop().await;
    hr2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_that_stream_from_the_socket_give_the_connection_back() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = TestBackend::echo().await;
    let hr = Headroom::start(&config(&[(echo.addr, 1)], "", "")).await;
    let mut s = tokio::net::TcpStream::connect(hr.addr).await.unwrap();
    // A chunked body in slow pieces, then (in its last write) the next request, pipelined.
    s.write_all(b"POST /one HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n").await.unwrap();
    for piece in [&b"4\r\nab"[..], b"cd\r\n", b"3;x=1\r\nefg\r\n", b"0\r\n\r\nGET /two HTTP/1.1\r\nHost: a\r\n\r\n"] {
        tokio::time::sleep(Duration::from_millis(30)).await;
        s.write_all(piece).await.unwrap();
    }
    // Then a 200 KiB body by length, larger than any one read, and a last request that closes.
    let big = vec![b'z'; 200 * 1024];
    s.write_all(format!("PUT /three HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n", big.len()).as_bytes())
        .await
        .unwrap();
    s.write_all(&big).await.unwrap();
    s.write_all(b"GET /four HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut wire = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut wire)).await.unwrap().unwrap();
    let answers = split_responses(&wire, &[]);
    let seen: Vec<serde_json::Value> = answers.iter().map(|a| serde_json::from_slice(&a.body).unwrap()).collect();
    let got: Vec<(&str, i64)> =
        seen.iter().map(|v| (v["uri"].as_str().unwrap(), v["body_len"].as_i64().unwrap())).collect();
    assert_eq!(got, [("/one", 7), ("/two", 0), ("/three", 200 * 1024), ("/four", 0)]);
    // All four came over one client connection, and the backend connection was reused.
    assert!(echo.connections.load(Ordering::SeqCst) <= 2, "{}", echo.connections.load(Ordering::SeqCst));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_sees_exactly_the_request_id_headroom_logs_and_answers_with() {
    let backend = TestBackend::echo().await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;
    // Two ids: the first is the request's; the backend must not see a second one to pick instead.
    let req =
        "GET /echo HTTP/1.1\r\nHost: a\r\nX-Request-Id: first\r\nX-Request-Id: second\r\nConnection: close\r\n\r\n";
    let resp = raw(hr.addr, req.as_bytes(), T).await;
    assert!(resp.to_ascii_lowercase().contains("x-request-id: first\r\n"), "{resp}");
    assert_eq!(json_of(&resp)["headers"]["x-request-id"], "first", "{resp}");
    // An empty id is no id: one is made up, and the backend gets that one.
    let req = "GET /echo HTTP/1.1\r\nHost: a\r\nX-Request-Id: \r\nConnection: close\r\n\r\n";
    let resp = raw(hr.addr, req.as_bytes(), T).await;
    let answered = resp
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-request-id: ").map(str::to_string))
        .unwrap_or_default();
    assert_eq!(answered.len(), 32, "{resp}");
    assert_eq!(json_of(&resp)["headers"]["x-request-id"], answered.as_str(), "{resp}");
}
