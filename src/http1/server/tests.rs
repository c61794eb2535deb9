use super::body::{Inner, Stream};
use super::parse::{parse_head, BodyKind, Head, HeadError, MAX_TARGET};
use super::respond::date;
use super::*;
use crate::http1::framing::{parse_length, BodyState as Framing};
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

fn parse(text: &[u8]) -> Result<Option<Head>, HeadError> {
    let mut buf = BytesMut::from(text);
    parse_head(&mut buf)
}

fn head(text: &[u8]) -> Head {
    match parse(text) {
        Ok(Some(h)) => h,
        Ok(None) => panic!("incomplete: {:?}", String::from_utf8_lossy(text)),
        Err(e) => panic!("refused ({e:?}): {:?}", String::from_utf8_lossy(text)),
    }
}

#[test]
fn heads_are_parsed_with_their_framing_and_connection_intent() {
    let h = head(b"GET /v1/models?x=1 HTTP/1.1\r\nHost: a\r\nX-Two: 1\r\nX-Two: 2\r\n\r\n");
    assert_eq!(h.request.method, Method::GET);
    assert_eq!(h.request.uri, "/v1/models?x=1");
    assert_eq!(h.request.version, Version::HTTP_11);
    assert_eq!(h.request.headers.get_all("x-two").iter().count(), 2);
    assert_eq!((h.body, h.close, h.keep_alive_10, h.suspicious), (BodyKind::None, false, false, false));

    let h = head(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n");
    assert_eq!(h.body, BodyKind::Length(12));
    assert_eq!(h.request.headers["content-length"], "12");
    let h = head(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(h.body, BodyKind::None);

    // Transfer-Encoding is decoded here and not passed on.
    let h = head(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:  Chunked \r\n\r\n");
    assert_eq!(h.body, BodyKind::Chunked);
    assert!(h.request.headers.get("transfer-encoding").is_none());

    // HTTP/1.0 closes unless it asks otherwise; 1.1 stays open unless it asks otherwise.
    assert!(head(b"GET / HTTP/1.0\r\n\r\n").close);
    let h = head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
    assert!(!h.close && h.keep_alive_10);
    assert!(head(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").close);

    // A Connection field naming other headers stays, for the proxy's hop-by-hop strip.
    let h = head(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\n\r\n");
    assert!(h.close);
    assert!(h.request.headers.contains_key("connection"));
    let h = head(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n");
    assert!(!h.request.headers.contains_key("connection") && !h.request.headers.contains_key("keep-alive"));

    assert!(head(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n").expect_continue);

    // Long heads (their field offsets no longer fit on the stack) keep every field and value.
    for n in [31, 32, 33, 200] {
        let fields: String = (0..n).map(|i| format!("x-f{i}: value-{i}\r\n")).collect();
        let h = head(format!("GET / HTTP/1.1\r\nHost: a\r\n{fields}\r\n").as_bytes());
        assert_eq!(h.request.headers.len(), n + 1);
        assert_eq!(h.request.headers[format!("x-f{}", n - 1).as_str()], format!("value-{}", n - 1).as_str());
    }
    // A target in absolute form names the host, so it may come without Host (the proxy routes by
    // it and sends it upstream as Host).
    assert_eq!(head(b"GET http://b.example:81/x HTTP/1.1\r\n\r\n").request.uri.host(), Some("b.example"));
    // HTTP/1.0 may leave Host out.
    assert!(head(b"GET / HTTP/1.0\r\n\r\n").request.headers.get("host").is_none());
}

#[test]
fn smuggling_shapes_and_broken_heads_are_flagged_or_refused() {
    for shape in [
        &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
    ] {
        let h = head(shape);
        assert!(h.suspicious, "{:?}", String::from_utf8_lossy(shape));
        assert_eq!(h.body, BodyKind::None, "a refused request's body is never read as one");
    }
    assert_eq!(
        parse(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n").err(),
        Some(HeadError::Bad("Transfer-Encoding without chunked as the last coding"))
    );
    // RFC 9112 §3.2: HTTP/1.1 needs exactly one Host; no version may have two.
    for text in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
    ] {
        let refused = Some(HeadError::Bad("an HTTP/1.1 request needs exactly one Host"));
        assert_eq!(parse(text).err(), refused, "{:?}", String::from_utf8_lossy(text));
    }
    // Transfer-Encoding: chunked once, last, alone, in HTTP/1.1, in one field.
    for (text, refused) in [
        (
            &b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"[..],
            HeadError::Bad("chunked applied more than once"),
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            HeadError::Unsupported("transfer codings other than chunked are not supported"),
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            HeadError::Bad("Transfer-Encoding twice"),
        ),
        (
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            HeadError::Bad("Transfer-Encoding in an HTTP/1.0 request"),
        ),
    ] {
        assert_eq!(parse(text).err(), Some(refused), "{:?}", String::from_utf8_lossy(text));
    }
    let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(70_000));
    assert_eq!(parse(long.as_bytes()).err(), Some(HeadError::TargetTooLong));
    let longest = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(MAX_TARGET as usize - 1));
    assert_eq!(head(longest.as_bytes()).request.uri.path().len(), MAX_TARGET as usize);
    for bad in ["+5", "5 5", "0x10", "", "99999999999999999999"] {
        let text = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {bad}\r\n\r\n");
        assert_eq!(parse(text.as_bytes()).err(), Some(HeadError::Bad("invalid Content-Length")), "{bad:?}");
    }
    assert!(matches!(parse(b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"), Err(HeadError::Bad(_))));
    assert!(matches!(parse(b"G\x01T / HTTP/1.1\r\n\r\n"), Err(HeadError::Bad(_))));
    let many: String = (0..300).map(|i| format!("x-{i}: v\r\n")).collect();
    assert_eq!(parse(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()).err(), Some(HeadError::TooLarge));
}

#[test]
fn a_head_split_anywhere_is_incomplete_until_its_end_and_leaves_what_follows() {
    let text = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\n";
    let end = text.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    for cut in 1..end {
        assert!(matches!(parse(&text[..cut]), Ok(None)), "complete at {cut}");
    }
    let mut buf = BytesMut::from(&text[..]);
    let h = parse_head(&mut buf).unwrap().unwrap();
    assert_eq!(h.body, BodyKind::Length(3));
    assert_eq!(&buf[..], b"abcGET /b HTTP/1.1\r\n\r\n");
}

#[test]
fn empty_values_and_unusual_targets_parse_without_going_out_of_the_head() {
    let h = head(b"OPTIONS * HTTP/1.1\r\nX-Empty:\r\nX-Spaces:   \r\nHost: a\r\n\r\n");
    assert_eq!(h.request.uri, "*");
    assert_eq!(h.request.headers["x-empty"], "");
    assert_eq!(h.request.headers["x-spaces"], "");
    assert_eq!(h.request.headers["host"], "a");
    let h = head(b"CONNECT b.example:443 HTTP/1.1\r\nHost: b.example:443\r\n\r\n");
    assert_eq!(h.request.uri.authority().map(|a| a.as_str()), Some("b.example:443"));
    // Leading blank lines before the request line are tolerated or refused, never a crash.
    let _ = parse(b"\r\nGET / HTTP/1.1\r\n\r\n");
    let _ = parse(b"GET  /  HTTP/1.1\r\n\r\n");
    let _ = parse(b"GET / HTTP/1.1\r\nX-A: \x80\xff\r\n\r\n");
}

/// Every prefix and every single-byte corruption of some requests: parsing never panics.
#[test]
fn garbled_heads_never_panic() {
    let samples: [&[u8]; 3] = [
        b"POST /v1/chat HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nX-E:\r\n\r\nabc",
        b"GET http://a/b?c HTTP/1.0\r\nConnection: keep-alive, x\r\n\r\n",
        b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
    ];
    for sample in samples {
        for cut in 0..=sample.len() {
            let _ = parse(&sample[..cut]);
        }
        for at in 0..sample.len() {
            for b in [0u8, b' ', b':', b'\r', b'\n', 0x7f, 0xff, b'a'] {
                let mut v = sample.to_vec();
                v[at] = b;
                let _ = parse(&v);
            }
        }
    }
}

#[test]
fn content_length_digits_only() {
    assert_eq!(parse_length(b"0"), Some(0));
    assert_eq!(parse_length(b" 42 "), Some(42));
    assert_eq!(parse_length(b"18446744073709551615"), None); // 20 digits
    assert_eq!(parse_length(b"9223372036854775807"), Some(i64::MAX as u64));
    assert_eq!(parse_length(b"-1"), None);
}

#[test]
fn date_is_an_imf_fixdate() {
    let mut out = Vec::new();
    date::append(&mut out);
    date::append(&mut out);
    assert_eq!(out.len(), 58);
    let text = std::str::from_utf8(&out[..29]).unwrap();
    assert!(text.ends_with(" GMT"), "{text}");
    assert!(httpdate::parse_http_date(text).is_ok(), "{text}");
}

/// A connected pair: our read side (as the server holds it) and the client's socket.
async fn pair() -> (Reader, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (server, _) = listener.accept().await.unwrap();
    let (rd, wr) = server.into_split();
    // The write half must outlive the test body: dropping it would shut the socket down.
    std::mem::forget(wr);
    (Reader { rd: ReadIo::Tcp(rd), buf: BytesMut::new() }, client)
}

fn streaming(reader: Reader, framing: Framing) -> (Body, oneshot::Receiver<Reader>) {
    let (back, rx) = oneshot::channel();
    let body = Body(Inner::Stream(Stream {
        reader: Some(reader),
        framing,
        back: Some(back),
        expect_continue: false,
        shared: ConnShared::new(),
    }));
    (body, rx)
}

/// Writes `bytes` in pieces of `piece`, each flushed on its own.
async fn trickle(mut client: TcpStream, bytes: Vec<u8>, piece: usize) -> TcpStream {
    for p in bytes.chunks(piece) {
        client.write_all(p).await.unwrap();
        client.flush().await.unwrap();
        tokio::task::yield_now().await;
    }
    client
}

#[tokio::test]
async fn chunked_and_sized_bodies_stream_however_split_and_hand_the_reader_back() {
    let cases: [(&[u8], Framing, &[u8]); 2] = [
        (b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n", Framing::Chunked(Chunk::Size), b"hello world"),
        (b"hello world", Framing::Length(11), b"hello world"),
    ];
    for (wire, framing, want) in cases {
        for piece in [1, 3, 1000] {
            let (reader, client) = pair().await;
            let mut bytes = wire.to_vec();
            bytes.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n");
            let writer = tokio::spawn(trickle(client, bytes, piece));
            let (body, back) = streaming(reader, framing);
            let got = body.collect().await.expect("body failed").to_bytes();
            assert_eq!(&got[..], want, "pieces of {piece}");
            let mut reader = back.await.expect("the reader did not come back");
            let _client = writer.await.unwrap();
            // What follows the body is the next request, untouched.
            let next = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n";
            while reader.buf.len() < next.len() {
                poll_fn(|cx| reader.poll_fill(cx)).await.unwrap();
            }
            assert_eq!(&reader.buf[..], next, "pieces of {piece}");
        }
    }
}

#[tokio::test]
async fn a_body_cut_short_or_garbled_fails_and_keeps_the_reader() {
    let cases: [(&[u8], Framing); 3] = [
        (b"hel", Framing::Length(11)),
        (b"5\r\nhel", Framing::Chunked(Chunk::Size)),
        (b"zz\r\nhello\r\n", Framing::Chunked(Chunk::Size)),
    ];
    for (wire, framing) in cases {
        let (reader, mut client) = pair().await;
        client.write_all(wire).await.unwrap();
        client.shutdown().await.unwrap();
        let (body, back) = streaming(reader, framing);
        assert!(body.collect().await.is_err(), "{:?}", String::from_utf8_lossy(wire));
        assert!(back.await.is_err(), "a failed body must not hand the connection back");
    }
}
