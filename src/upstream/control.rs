//! The control plane's own requests to a backend (health checks, engine metrics, model lists),
//! apart from the data path's connection pools.
//!
//! [`get`] asks on a fresh connection and hands back hyper's response (its body streamed by the
//! caller). [`get_status`] asks for a status only, on a connection the caller keeps from one
//! check to the next (the own HTTP/1.1 client), so a health check of a keep-alive backend costs a
//! write and a read instead of a TCP handshake and teardown; between checks the kept connection
//! holds no buffer.

use super::{connect_io, h1};
use crate::config::PoolConfig;
use crate::pool::Backend;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// The most of a response body read through to keep its connection; past it, the connection is
/// closed instead.
const DRAIN_LIMIT: usize = 64 << 10;

/// `GET path` on a fresh connection to `backend` (over TLS when the pool's backends speak it,
/// HTTP/1.1 offered by ALPN); `agent` names the caller. No timeout: the caller bounds it.
pub async fn get(backend: &Backend, pool: &PoolConfig, path: &str, agent: &'static str) -> Option<Response<Incoming>> {
    let (stream, _) = connect_io(backend, pool, true).await.ok()?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, http_body_util::Empty<Bytes>>(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(conn);
    sender.send_request(request(backend, path, agent)?).await.ok()
}

fn request(backend: &Backend, path: &str, agent: &'static str) -> Option<Request<http_body_util::Empty<Bytes>>> {
    Request::get(path)
        .header(http::header::HOST, backend.label.as_ref())
        .header(http::header::USER_AGENT, agent)
        .body(http_body_util::Empty::new())
        .ok()
}

/// The status of `GET path`, asked on `kept` when the backend has kept it open, else on a fresh
/// connection (also when the kept one turns out closed as the request goes out). The body is read
/// through, up to 64 KiB, and the connection goes back into `kept` when it may carry another
/// request. `None`: no answer. No timeout: the caller bounds it.
pub async fn get_status(
    kept: &mut Option<h1::Conn>,
    backend: &Backend,
    pool: &PoolConfig,
    path: &str,
    agent: &'static str,
) -> Option<u16> {
    let usable = match kept.take() {
        Some(mut c) => std::future::poll_fn(|cx| std::task::Poll::Ready(c.poll_usable(cx))).await.then_some(c),
        None => None,
    };
    let mut req = request(backend, path, agent)?;
    let mut conn = match usable {
        Some(c) => c,
        None => h1::Conn::new(connect_io(backend, pool, true).await.ok()?.0),
    };
    let resp = loop {
        match h1::exchange(conn, req, b"").await {
            Ok(resp) => break resp,
            // A kept connection the backend closed meanwhile: once more, on a fresh one.
            Err(h1::Failed { request: Some(again), stale: true, .. }) => {
                req = again;
                conn = h1::Conn::new(connect_io(backend, pool, true).await.ok()?.0);
            }
            Err(_) => return None,
        }
    };
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut read = 0usize;
    while let Some(frame) = body.frame().await {
        read += frame.ok()?.data_ref().map_or(0, Bytes::len);
        if read > DRAIN_LIMIT {
            return Some(status);
        }
    }
    if let Some(mut c) = body.take_reusable() {
        c.release_buffers();
        *kept = Some(c);
    }
    Some(status)
}
