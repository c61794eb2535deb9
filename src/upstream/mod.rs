//! Connections to backends: a lock-free pool of idle HTTP/1.1 connections per backend (driven by
//! [`crate::http1::client`] on the requesting task), one shared multiplexed hyper connection per backend for
//! HTTP/2, and the connect (TCP, then TLS for pools with `tls = true`) that fills them. With
//! `protocol = "auto"` over TLS, the first connection's ALPN answer decides the backend's protocol.
//!
//! Checking out an idle connection is a pop from a lock-free `ArrayQueue`; a connection goes back
//! only once its response body has been read to the end, so it is clean for the next request.

pub mod body;
mod control;

pub use control::{get, get_status};

pub use body::{ClientBody, Kept, RequestBody, RequestBodyError, UpstreamBody, KEEP_LIMIT};

use crate::config::{PoolConfig, Protocol};
use crate::error::ProxyError;
use crate::http1::client as h1;
use crate::http1::ExtraFields;
use crate::pool::{Attached, Backend};
use arc_swap::ArcSwapOption;
use crossbeam_queue::ArrayQueue;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::cell::Cell;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::net::TcpStream;

type H2Sender = http2::SendRequest<RequestBody>;

/// Upper bound on idle HTTP/1.1 connections kept per backend and worker.
const MAX_IDLE_PER_WORKER: usize = 1024;

static WORKER_SLOTS: AtomicUsize = AtomicUsize::new(1);
thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Declares how many worker runtimes there are (before backends are built).
pub fn set_worker_count(n: usize) {
    WORKER_SLOTS.store(n.max(1), Ordering::Relaxed);
}

/// Marks the calling thread as worker `id`. Connections opened on a worker's runtime are
/// driven by that runtime's reactor, so each worker reuses its own.
pub fn set_current_worker(id: usize) {
    WORKER.with(|w| w.set(id));
}

/// A backend's upstream connections.
pub struct Conns {
    /// Idle HTTP/1.1 connections, one lock-free queue per worker, made when that worker first
    /// gives a connection back: a backend that never carried traffic costs no queue (a queue
    /// allocates all its slots at once).
    idle: Box<[std::sync::OnceLock<ArrayQueue<h1::Conn>>]>,
    /// Slots of each worker's queue.
    per_worker: usize,
    h2: ArcSwapOption<H2Sender>,
    /// What ALPN chose (`protocol = "auto"`): 0 not known yet, 1 HTTP/1.1, 2 h2.
    alpn: AtomicU8,
}

const ALPN_UNKNOWN: u8 = 0;
const ALPN_H1: u8 = 1;
const ALPN_H2: u8 = 2;

impl Conns {
    pub fn new(max_inflight: u32) -> Self {
        let per_worker = (max_inflight as usize).clamp(4, MAX_IDLE_PER_WORKER);
        let slots = WORKER_SLOTS.load(Ordering::Relaxed).max(1);
        Conns {
            idle: (0..slots).map(|_| std::sync::OnceLock::new()).collect(),
            per_worker,
            h2: ArcSwapOption::empty(),
            alpn: AtomicU8::new(ALPN_UNKNOWN),
        }
    }

    fn local(&self) -> &std::sync::OnceLock<ArrayQueue<h1::Conn>> {
        &self.idle[WORKER.with(Cell::get) % self.idle.len()]
    }

    /// Returns a connection whose response was read to the end. Dropped (closed) when the
    /// pool is full.
    fn put_back(&self, conn: h1::Conn) {
        let _ = self.local().get_or_init(|| ArrayQueue::new(self.per_worker)).push(conn);
    }

    /// Pops idle connections until one is usable (not closed by the backend meanwhile).
    fn checkout(&self, cx: &mut Context<'_>) -> Option<h1::Conn> {
        let queue = self.local().get()?;
        while let Some(mut c) = queue.pop() {
            if c.poll_usable(cx) {
                return Some(c);
            }
        }
        None
    }
}

impl Attached for Conns {
    /// Idle HTTP/1.1 connections over all workers.
    fn idle(&self) -> usize {
        self.idle.iter().filter_map(std::sync::OnceLock::get).map(ArrayQueue::len).sum()
    }
}

/// A backend's connections, made on first use.
fn conns(backend: &Backend) -> &Conns {
    let attached = backend.attached.get_or_init(|| Box::new(Conns::new(backend.max_inflight())));
    let any: &dyn std::any::Any = &**attached;
    match any.downcast_ref::<Conns>() {
        Some(conns) => conns,
        // Only this module attaches anything to a backend.
        None => unreachable!("a backend's attachment is always its upstream connections"),
    }
}

/// Gives back a connection whose response was read to the end (closed when the pool is full).
pub fn put_back(backend: &Backend, conn: h1::Conn) {
    conns(backend).put_back(conn);
}

/// A failed send. `unsent` holds the request when it certainly never reached the backend (no
/// connection could be made, or hyper handed it back unwritten): only then is trying another
/// backend safe for any method and body.
pub struct SendError {
    pub error: ProxyError,
    pub unsent: Option<Request<RequestBody>>,
    /// The backend refused the h2 stream (REFUSED_STREAM): it did not process the request,
    /// though its body may have been consumed.
    pub refused: bool,
}

impl SendError {
    fn unsent(error: ProxyError, req: Request<RequestBody>) -> Self {
        SendError { error, unsent: Some(req), refused: false }
    }

    fn sent(error: ProxyError) -> Self {
        SendError { error, unsent: None, refused: false }
    }
}

/// Whether an error (or one of its causes) is an h2 REFUSED_STREAM.
fn is_refused_stream(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h2e) = err.downcast_ref::<h2::Error>() {
            return h2e.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        cur = err.source();
    }
    false
}

/// Sends `req` with the header fields of `extra` added to it to `backend` and returns the
/// response; an HTTP/1.1 connection travels inside the body and goes back to the pool from
/// there. A request that comes back unsent comes back without `extra`'s fields.
pub async fn send(
    backend: &Arc<Backend>,
    pool: &PoolConfig,
    req: Request<RequestBody>,
    extra: &ExtraFields,
) -> Result<Response<UpstreamBody>, SendError> {
    let h2 = match pool.protocol {
        Protocol::Http1 => false,
        Protocol::H2c => true,
        Protocol::Auto if pool.tls.is_none() => false,
        Protocol::Auto => match conns(backend).alpn.load(Ordering::Relaxed) {
            ALPN_H1 => false,
            ALPN_H2 => true,
            _ => match Box::pin(learn_protocol(backend, pool)).await {
                Ok(h2) => h2,
                Err(e) => return Err(SendError::unsent(e, req)),
            },
        },
    };
    // Cold paths are boxed so that the common one (a pooled HTTP/1.1 connection) stays a small
    // future: every byte of it is moved on each request.
    if h2 {
        Box::pin(send_h2(backend, pool, req, extra)).await.map(|r| r.map(UpstreamBody::H2))
    } else {
        send_h1(backend, pool, req, extra.as_bytes()).await.map(|r| r.map(UpstreamBody::H1))
    }
}

/// First contact with a `protocol = "auto"` TLS backend: connects, keeps the connection for the
/// protocol ALPN chose, and remembers the choice.
async fn learn_protocol(backend: &Backend, pool: &PoolConfig) -> Result<bool, ProxyError> {
    let (io, negotiated_h2) = connect_io(backend, pool, false).await?;
    if negotiated_h2 {
        let sender = h2_handshake(backend, io).await?;
        conns(backend).h2.store(Some(Arc::new(sender)));
    } else {
        conns(backend).put_back(h1::Conn::new(io));
    }
    conns(backend).alpn.store(if negotiated_h2 { ALPN_H2 } else { ALPN_H1 }, Ordering::Relaxed);
    Ok(negotiated_h2)
}

async fn send_h1(
    backend: &Arc<Backend>,
    pool: &PoolConfig,
    mut req: Request<RequestBody>,
    extra: &[u8],
) -> Result<Response<h1::Body>, SendError> {
    // A pooled connection can turn out to be closed by the backend at the very moment we use it;
    // the request comes back when that is certain to be safe, and then a fresh connection is used.
    let mut fresh_tries = 0;
    loop {
        let conn = match std::future::poll_fn(|cx| Poll::Ready(conns(backend).checkout(cx))).await {
            Some(c) => c,
            None => {
                fresh_tries += 1;
                match Box::pin(connect_io(backend, pool, false)).await {
                    Ok((io, _)) => h1::Conn::new(io),
                    Err(e) => return Err(SendError::unsent(e, req)),
                }
            }
        };
        match h1::exchange(conn, req, extra).await {
            Ok(resp) => return Ok(resp),
            Err(failed) => {
                let error = ProxyError::Upstream(error_chain(&failed.error));
                match failed.request {
                    Some(back) if fresh_tries < 2 => req = back,
                    Some(back) if !failed.stale => return Err(SendError::unsent(error, back)),
                    _ => return Err(SendError::sent(error)),
                }
            }
        }
    }
}

async fn tcp_connect(backend: &Backend, pool: &PoolConfig) -> Result<TcpStream, ProxyError> {
    let stream = tokio::time::timeout(pool.connect_timeout, TcpStream::connect(backend.addr))
        .await
        .map_err(|_| ProxyError::Connect(format!("{}: timed out after {:?}", backend.addr, pool.connect_timeout)))?
        .map_err(|e| ProxyError::Connect(format!("{}: {e}", backend.addr)))?;
    let _ = stream.set_nodelay(true);
    backend.metrics.connected();
    Ok(stream)
}

/// A connection to a backend: TCP, then TLS when the pool says so (within `connect_timeout`
/// for each). Returns whether ALPN chose h2. `h1_only` offers only `http/1.1` (health checks).
pub(crate) async fn connect_io(
    backend: &Backend,
    pool: &PoolConfig,
    h1_only: bool,
) -> Result<(UpstreamIo, bool), ProxyError> {
    let stream = tcp_connect(backend, pool).await?;
    let Some(tls) = &pool.tls else { return Ok((UpstreamIo::Left(stream), false)) };
    let name = tls.server_name.clone().unwrap_or_else(|| rustls::pki_types::ServerName::from(backend.addr.ip()));
    let config = if h1_only { tls.client_h1.clone() } else { tls.client.clone() };
    let connector = tokio_rustls::TlsConnector::from(config);
    let stream = tokio::time::timeout(pool.connect_timeout, connector.connect(name, stream))
        .await
        .map_err(|_| ProxyError::Connect(format!("{}: TLS handshake timed out", backend.addr)))?
        .map_err(|e| ProxyError::Connect(format!("{}: TLS: {e}", backend.addr)))?;
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    Ok((UpstreamIo::Right(Box::new(stream)), h2))
}

async fn send_h2(
    backend: &Arc<Backend>,
    pool: &PoolConfig,
    mut req: Request<RequestBody>,
    extra: &ExtraFields,
) -> Result<Response<Incoming>, SendError> {
    // h2 wants the absolute form, naming this backend.
    let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let scheme = if pool.tls.is_some() { "https" } else { "http" };
    match format!("{scheme}://{}{}", backend.addr, path).parse() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => return Err(SendError::sent(ProxyError::BadRequest("invalid request target"))),
    }
    *req.version_mut() = http::Version::HTTP_2;
    extra.add_to(req.headers_mut());
    let existing = conns(backend).h2.load_full().filter(|s| !s.is_closed());
    let mut sender = match existing {
        Some(s) => (*s).clone(),
        None => match connect_h2(backend, pool).await {
            Ok(s) => {
                conns(backend).h2.store(Some(Arc::new(s.clone())));
                s
            }
            Err(e) => {
                extra.remove_from(req.headers_mut());
                return Err(SendError::unsent(e, req));
            }
        },
    };
    sender.try_send_request(req).await.map_err(|mut e| {
        let error = ProxyError::Upstream(error_chain(e.error()));
        let refused = is_refused_stream(e.error());
        match e.take_message() {
            Some(mut back) => {
                extra.remove_from(back.headers_mut());
                SendError::unsent(error, back)
            }
            None => SendError { refused, ..SendError::sent(error) },
        }
    })
}

async fn connect_h2(backend: &Backend, pool: &PoolConfig) -> Result<H2Sender, ProxyError> {
    let (io, _) = connect_io(backend, pool, false).await?;
    h2_handshake(backend, io).await
}

async fn h2_handshake(backend: &Backend, io: UpstreamIo) -> Result<H2Sender, ProxyError> {
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| ProxyError::Connect(format!("{}: h2 handshake: {e}", backend.addr)))?;
    let addr = backend.addr;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(backend = %addr, error = %e, "upstream h2 connection ended with an error");
        }
    });
    Ok(sender)
}

/// An upstream socket: plain TCP or TLS over it (an enum, so the plain case pays no dispatch).
pub(crate) type UpstreamIo = h1::Io;

/// An error and its causes on one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
