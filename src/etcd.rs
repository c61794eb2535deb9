//! A client of etcd's v3 API through etcd's own gRPC gateway (JSON over HTTP/1.1, served on the
//! client port of every etcd since 3.3): keys, leases, watches and elections, which is all a
//! group of replicas needs to agree. Every unary call has a timeout and tries the endpoints in
//! turn from the last one that answered; replies are bounded in size. Knows nothing of what the
//! keys mean (that is `cluster`'s).
//!
//! Why not a gRPC client crate: the maintained one (`etcd-client`) compiles etcd's protobuf files
//! at build time and so needs `protoc` on the building machine, which would end "`cargo build` on
//! a fresh machine" as the whole set-up. The gateway is part of etcd, documented for clients
//! without gRPC, and speaks the same API.

use crate::config::{ClusterConfig, EtcdEndpoint};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// The most one unary reply may carry (a registry of ~100,000 backends).
const MAX_REPLY: usize = 64 << 20;
/// The most one watch message may carry.
const MAX_WATCH_LINE: usize = 16 << 20;
/// Connect + request + reply, per endpoint tried.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("no etcd endpoint answered ({0})")]
    Unreachable(String),
    /// etcd answered with an error (gRPC code and message).
    #[error("etcd: {message} (code {code})")]
    Status { code: i64, message: String },
    #[error("etcd sent a reply headroom cannot read: {0}")]
    BadReply(String),
}

impl EtcdError {
    /// etcd's "lease not found" (the lease expired or was revoked).
    pub fn lease_gone(&self) -> bool {
        matches!(self, EtcdError::Status { code: 5, message } if message.contains("lease not found"))
    }
}

/// One key-value pair as read.
#[derive(Debug, Clone, PartialEq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub lease: i64,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Put(Kv),
    Delete { key: String, mod_revision: i64 },
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A client for a list of endpoints; cheap to share.
pub struct Etcd {
    endpoints: Vec<EtcdEndpoint>,
    tls: Option<tokio_rustls::TlsConnector>,
    auth: Option<(String, String)>,
    token: arc_swap::ArcSwapOption<String>,
    /// The endpoint tried first (the last one that answered).
    next: AtomicUsize,
}

impl Etcd {
    pub fn new(cfg: &ClusterConfig) -> Result<Arc<Etcd>, EtcdError> {
        let tls = match cfg.etcd.iter().any(|e| e.tls) {
            false => None,
            true => {
                let roots = match &cfg.ca_file {
                    Some(f) => crate::tls::load_roots(f).map_err(|e| EtcdError::BadReply(e.to_string()))?,
                    None => crate::tls::default_roots(),
                };
                let c =
                    crate::tls::client_config(roots, &[b"http/1.1"]).map_err(|e| EtcdError::BadReply(e.to_string()))?;
                Some(tokio_rustls::TlsConnector::from(c))
            }
        };
        Ok(Arc::new(Etcd {
            endpoints: cfg.etcd.clone(),
            tls,
            auth: cfg.auth.clone(),
            token: arc_swap::ArcSwapOption::empty(),
            next: AtomicUsize::new(0),
        }))
    }

    async fn connect(&self, ep: &EtcdEndpoint) -> std::io::Result<Box<dyn Io>> {
        let tcp = tokio::net::TcpStream::connect((ep.host.as_str(), ep.port)).await?;
        let _ = tcp.set_nodelay(true);
        match (&self.tls, ep.tls) {
            (Some(tls), true) => {
                let name = rustls::pki_types::ServerName::try_from(ep.host.clone())
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                Ok(Box::new(tls.connect(name, tcp).await?))
            }
            _ => Ok(Box::new(tcp)),
        }
    }

    /// POSTs `body` to `path` on `ep`; the response, its body not read yet.
    async fn post(
        &self,
        ep: &EtcdEndpoint,
        path: &str,
        body: &Value,
    ) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        let io = self.connect(ep).await.map_err(|e| format!("{ep}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(io))
            .await
            .map_err(|e| format!("{ep}: {e}"))?;
        tokio::spawn(conn);
        let mut req = hyper::Request::post(path)
            .header(http::header::HOST, ep.authority.as_str())
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(token) = self.token.load_full() {
            req = req.header(http::header::AUTHORIZATION, token.as_str());
        }
        let req = req.body(Full::new(Bytes::from(body.to_string()))).map_err(|e| e.to_string())?;
        sender.send_request(req).await.map_err(|e| format!("{ep}: {e}"))
    }

    /// One unary call; with a user configured, authenticates first, and again once if etcd says
    /// the token expired.
    async fn call(&self, path: &str, body: Value) -> Result<Value, EtcdError> {
        self.call_within(path, body, Some(CALL_TIMEOUT)).await
    }

    /// [`Etcd::call`] with a time limit per endpoint tried (`None`: a call that waits for
    /// something to happen, such as an election).
    async fn call_within(&self, path: &str, body: Value, limit: Option<Duration>) -> Result<Value, EtcdError> {
        if self.auth.is_some() && self.token.load().is_none() {
            self.authenticate().await?;
        }
        let mut again = self.auth.is_some();
        loop {
            let v = self.call_once(path, &body, limit).await?;
            match status_of(&v) {
                Some(e) if again && is_auth_error(&e) => {
                    again = false;
                    self.authenticate().await?;
                }
                Some(e) => return Err(e),
                None => return Ok(v),
            }
        }
    }

    /// Each endpoint in turn (from the last that answered) until one answers within `limit`;
    /// its reply.
    async fn call_once(&self, path: &str, body: &Value, limit: Option<Duration>) -> Result<Value, EtcdError> {
        let mut last = String::from("no endpoint");
        let start = self.next.load(Ordering::Relaxed);
        for i in 0..self.endpoints.len() {
            let at = (start + i) % self.endpoints.len();
            let ep = &self.endpoints[at];
            let reply = async {
                let resp = self.post(ep, path, body).await?;
                let bytes = http_body_util::Limited::new(resp.into_body(), MAX_REPLY)
                    .collect()
                    .await
                    .map_err(|e| format!("{ep}: {e}"))?
                    .to_bytes();
                serde_json::from_slice::<Value>(&bytes).map_err(|e| format!("{ep}: {e}"))
            };
            let reply = match limit {
                Some(limit) => tokio::time::timeout(limit, reply)
                    .await
                    .unwrap_or_else(|_| Err(format!("{ep}: no answer in {limit:?}"))),
                None => reply.await,
            };
            match reply {
                Ok(v) => {
                    self.next.store(at, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) => last = e,
            }
        }
        Err(EtcdError::Unreachable(last))
    }

    /// Gets a token for the configured user (sent with every later call).
    pub async fn authenticate(&self) -> Result<(), EtcdError> {
        let Some((user, password)) = &self.auth else { return Ok(()) };
        self.token.store(None);
        let v = self
            .call_once("/v3/auth/authenticate", &json!({"name": user, "password": password}), Some(CALL_TIMEOUT))
            .await?;
        if let Some(e) = status_of(&v) {
            return Err(e);
        }
        let token = v.get("token").and_then(Value::as_str).ok_or_else(|| EtcdError::BadReply("no token".into()))?;
        self.token.store(Some(Arc::new(token.to_string())));
        Ok(())
    }

    /// Sets `key` to `value` (bound to `lease` when not 0); the store's revision after it.
    pub async fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let mut body = json!({"key": b64(key.as_bytes()), "value": b64(value)});
        if lease != 0 {
            body["lease"] = json!(lease.to_string());
        }
        let v = self.call("/v3/kv/put", body).await?;
        Ok(revision(&v))
    }

    /// Deletes `key`; the store's revision after it.
    pub async fn delete(&self, key: &str) -> Result<i64, EtcdError> {
        let v = self.call("/v3/kv/deleterange", json!({"key": b64(key.as_bytes())})).await?;
        Ok(revision(&v))
    }

    /// Every key under `prefix`, and the revision they were read at.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<Kv>, i64), EtcdError> {
        let body = json!({"key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix.as_bytes()))});
        let v = self.call("/v3/kv/range", body).await?;
        let kvs = match v.get("kvs").and_then(Value::as_array) {
            None => Vec::new(),
            Some(list) => list.iter().map(kv).collect::<Result<_, _>>()?,
        };
        Ok((kvs, revision(&v)))
    }

    /// The value of `key`, if it exists.
    pub async fn get(&self, key: &str) -> Result<Option<Kv>, EtcdError> {
        let v = self.call("/v3/kv/range", json!({"key": b64(key.as_bytes())})).await?;
        match v.get("kvs").and_then(Value::as_array).and_then(|l| l.first()) {
            None => Ok(None),
            Some(k) => kv(k).map(Some),
        }
    }

    /// A new lease of `ttl` (whole seconds); its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let v = self.call("/v3/lease/grant", json!({"TTL": ttl.as_secs().max(1)})).await?;
        let id = int(v.get("ID"));
        if id == 0 {
            return Err(EtcdError::BadReply("a lease without an ID".into()));
        }
        Ok(id)
    }

    /// Renews lease `id`; the seconds it has left (0: it is gone).
    pub async fn keep_alive(&self, id: i64) -> Result<i64, EtcdError> {
        let v = self.call("/v3/lease/keepalive", json!({"ID": id.to_string()})).await?;
        Ok(int(v.get("result").and_then(|r| r.get("TTL"))))
    }

    /// Ends lease `id` now: every key bound to it goes.
    pub async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", json!({"ID": id.to_string()})).await.map(drop)
    }

    /// The current leader's value in election `name`, if there is one.
    pub async fn leader(&self, name: &str) -> Result<Option<Kv>, EtcdError> {
        match self.call("/v3/election/leader", json!({"name": b64(name.as_bytes())})).await {
            Ok(v) => v.get("kv").map(kv).transpose(),
            Err(EtcdError::Status { message, .. }) if message.contains("no leader") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Campaigns in election `name` with `lease`, offering `value`: returns once this replica
    /// leads. No timeout: it waits for the current leader to go. Ends with an error if `lease`
    /// ends first; leadership ends with the lease (there is no resigning).
    pub async fn campaign(&self, name: &str, lease: i64, value: &[u8]) -> Result<(), EtcdError> {
        let body = json!({"name": b64(name.as_bytes()), "lease": lease.to_string(), "value": b64(value)});
        let v = self.call_within("/v3/election/campaign", body, None).await?;
        v.get("leader").map(drop).ok_or_else(|| EtcdError::BadReply("campaign: no leader key".into()))
    }

    /// Watches every key under `prefix` from `from_revision` on.
    pub async fn watch(&self, prefix: &str, from_revision: i64) -> Result<Watch, EtcdError> {
        let body = json!({"create_request": {
            "key": b64(prefix.as_bytes()),
            "range_end": b64(&prefix_end(prefix.as_bytes())),
            "start_revision": from_revision.to_string(),
        }});
        let mut last = String::from("no endpoint");
        for i in 0..self.endpoints.len() {
            let at = (self.next.load(Ordering::Relaxed) + i) % self.endpoints.len();
            match tokio::time::timeout(CALL_TIMEOUT, self.post(&self.endpoints[at], "/v3/watch", &body)).await {
                Ok(Ok(resp)) => return Ok(Watch { body: resp.into_body(), buf: Vec::new() }),
                Ok(Err(e)) => last = e,
                Err(_) => last = format!("{}: no answer in {CALL_TIMEOUT:?}", self.endpoints[at]),
            }
        }
        Err(EtcdError::Unreachable(last))
    }
}

/// A running watch: its messages, each a batch of events.
pub struct Watch {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
}

/// What a watch message says.
#[derive(Debug)]
pub enum WatchMessage {
    /// Changes, in order, and the revision they bring the store to.
    Events(Vec<Event>, i64),
    /// The revision asked for was compacted away: read everything again from this one.
    Compacted(i64),
    /// The watch is set up, or a progress note: nothing changed.
    Quiet,
}

impl Watch {
    /// The next message; `Ok(None)` when the stream ended (etcd went away: watch again).
    pub async fn next(&mut self) -> Result<Option<WatchMessage>, EtcdError> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let v: Value = serde_json::from_slice(&line).map_err(|e| EtcdError::BadReply(e.to_string()))?;
                return watch_message(&v).map(Some);
            }
            if self.buf.len() > MAX_WATCH_LINE {
                return Err(EtcdError::BadReply(format!("a watch message over {MAX_WATCH_LINE} bytes")));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(EtcdError::Unreachable(e.to_string())),
                Some(Ok(f)) => {
                    if let Some(d) = f.data_ref() {
                        self.buf.extend_from_slice(d);
                    }
                }
            }
        }
    }
}

fn watch_message(v: &Value) -> Result<WatchMessage, EtcdError> {
    if let Some(e) = status_of(v) {
        return Err(e);
    }
    let r = v.get("result").ok_or_else(|| EtcdError::BadReply("a watch message without a result".into()))?;
    let compact = int(r.get("compact_revision"));
    if compact > 0 {
        return Ok(WatchMessage::Compacted(compact));
    }
    if r.get("canceled").and_then(Value::as_bool) == Some(true) {
        let why = r.get("cancel_reason").and_then(Value::as_str).unwrap_or("canceled");
        return Err(EtcdError::Status { code: 1, message: format!("watch canceled: {why}") });
    }
    let Some(list) = r.get("events").and_then(Value::as_array) else { return Ok(WatchMessage::Quiet) };
    let mut events = Vec::with_capacity(list.len());
    for e in list {
        let k = kv(e.get("kv").unwrap_or(&Value::Null))?;
        events.push(match e.get("type").and_then(Value::as_str) {
            Some("DELETE") => Event::Delete { key: k.key, mod_revision: k.mod_revision },
            _ => Event::Put(k),
        });
    }
    Ok(WatchMessage::Events(events, revision(r)))
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// The end of the range of keys starting with `prefix` (its last byte below 0xff plus one).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A protobuf int64 in JSON: a string of digits (or a number); 0 when absent.
fn int(v: Option<&Value>) -> i64 {
    match v {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn revision(v: &Value) -> i64 {
    int(v.get("header").and_then(|h| h.get("revision")))
}

fn kv(v: &Value) -> Result<Kv, EtcdError> {
    let decode = |f: &str| -> Result<Vec<u8>, EtcdError> {
        match v.get(f).and_then(Value::as_str) {
            None => Ok(Vec::new()),
            Some(s) => base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| EtcdError::BadReply(format!("{f}: {e}"))),
        }
    };
    let key = String::from_utf8(decode("key")?).map_err(|e| EtcdError::BadReply(e.to_string()))?;
    Ok(Kv { key, value: decode("value")?, mod_revision: int(v.get("mod_revision")), lease: int(v.get("lease")) })
}

/// The error a gateway reply carries, if any.
fn status_of(v: &Value) -> Option<EtcdError> {
    let e = v.get("error")?;
    let message = v.get("message").and_then(Value::as_str).or(e.as_str()).unwrap_or("error").to_string();
    Some(EtcdError::Status { code: int(v.get("code")), message })
}

fn is_auth_error(e: &EtcdError) -> bool {
    matches!(e, EtcdError::Status { code: 16, .. })
        || matches!(e, EtcdError::Status { message, .. } if message.contains("invalid auth token"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_range_ends_after_every_key_that_starts_with_it() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn watch_messages_read_as_events() {
        let v: Value = serde_json::from_str(
            r#"{"result":{"header":{"revision":"7"},"events":[
                {"kv":{"key":"L2Ev","value":"eA==","mod_revision":"6"}},
                {"type":"DELETE","kv":{"key":"L2Iv","mod_revision":"7"}}]}}"#,
        )
        .unwrap();
        let WatchMessage::Events(ev, rev) = watch_message(&v).unwrap() else { panic!() };
        assert_eq!(rev, 7);
        assert_eq!(ev[0], Event::Put(Kv { key: "/a/".into(), value: b"x".to_vec(), mod_revision: 6, lease: 0 }));
        assert_eq!(ev[1], Event::Delete { key: "/b/".into(), mod_revision: 7 });
        let c: Value = serde_json::from_str(r#"{"result":{"compact_revision":"5","canceled":true}}"#).unwrap();
        assert!(matches!(watch_message(&c), Ok(WatchMessage::Compacted(5))));
        let err: Value =
            serde_json::from_str(r#"{"error":"x","message":"etcdserver: requested lease not found","code":5}"#)
                .unwrap();
        assert!(status_of(&err).unwrap().lease_gone());
    }
}
