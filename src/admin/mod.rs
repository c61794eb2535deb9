//! The admin listener: Prometheus metrics, a liveness probe and the JSON API.
//!
//! Off the data path: it reads the same snapshot and atomics the proxy uses; the only write is a
//! backend's state (drain).
//!
//! - `GET /metrics`: Prometheus text.
//! - `GET /`: the status page.
//! - `GET /healthz`: `ok` while the process serves.
//! - `GET /api/pools`: pools, their queue depth and backends.
//! - `POST /api/pools/{pool}/backends/{addr}/drain`: stop sending new requests to a backend.
//! - `POST /api/pools/{pool}/backends/{addr}/undrain`: put a drained backend back in service.
//! - `POST /api/pools/{pool}/backends`, `DELETE /api/pools/{pool}/backends/{addr}`: register and
//!   deregister backends at run time.
//! - `GET /api/pools/{pool}/events`: the pool's last scale events.
//! - `GET /api/pools/{pool}/history`: the pool's last 15 minutes, sampled.
//! - `GET /api/config`, `POST /api/reload`: the running config, and reloading it.
//! - `GET /api/config/events`: the last loads of the config file and how each ended.
//! - `GET /api/cluster`: the group of replicas this one acts with (`[cluster]`).

mod guard;
mod metrics;
mod pools;
mod status;

pub use pools::pools_json;

use crate::control::Control;
use crate::telemetry;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

type Body = Full<Bytes>;

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut body: Bytes = body.into();
    // JSON ends its line, so `curl` output in a terminal does too.
    if content_type == "application/json" && !body.ends_with(b"\n") {
        let mut line = Vec::with_capacity(body.len() + 1);
        line.extend_from_slice(&body);
        line.push(b'\n');
        body = line.into();
    }
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r
}

async fn handle(req: Request<Incoming>, control: Arc<Control>, prom: Option<PrometheusHandle>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    if let Err(refusal) = guard::check(&parts, &control.snapshot().config.admin) {
        telemetry::admin_refused(refusal.reason);
        tracing::warn!(method = %parts.method, path = parts.uri.path(), reason = refusal.reason, "admin request refused");
        let mut resp = json_error(refusal.status, refusal.message);
        if refusal.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        return resp;
    }
    let req = Request::from_parts(parts, body);
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => match prom {
            Some(h) => {
                metrics::sample_gauges(&control);
                let mut text = h.render();
                metrics::backend_gauges(&control, &mut text);
                respond(StatusCode::OK, "text/plain; version=0.0.4", text)
            }
            None => respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "metrics recorder not installed\n"),
        },
        (&Method::GET, "/healthz") => respond(StatusCode::OK, "text/plain", healthz(&control)),
        (&Method::GET, "/api/cluster") => respond(
            StatusCode::OK,
            "application/json",
            control.group().map_or_else(|| json!({ "enabled": false }), |g| g.document()).to_string(),
        ),
        (&Method::GET, "/") => respond(StatusCode::OK, "text/html; charset=utf-8", status::page(&control)),
        (&Method::GET, "/api/pools") => respond(StatusCode::OK, "application/json", pools_json(&control).to_string()),
        (&Method::POST, path) if path.starts_with("/api/pools/") && path.ends_with("/undrain") => {
            undrain(&control, path).await
        }
        (&Method::POST, path) if path.starts_with("/api/pools/") && path.ends_with("/drain") => {
            drain(&control, path).await
        }
        (&Method::GET, path) if path.starts_with("/api/pools/") && path.ends_with("/history") => pool_document(
            &control,
            path,
            "/history",
            |pool| json!({ "pool": pool, "capacity": control.history.capacity(), "samples": control.history.of(pool) }),
        ),
        (&Method::GET, path) if path.starts_with("/api/pools/") && path.ends_with("/events") => pool_document(
            &control,
            path,
            "/events",
            |pool| json!({ "pool": pool, "events": control.scale_events.of(pool) }),
        ),
        (&Method::POST, path) if path.starts_with("/api/pools/") && path.ends_with("/backends") => {
            let pool = path.trim_start_matches("/api/pools/").trim_end_matches("/backends").to_string();
            register(&control, &pool, req).await
        }
        (&Method::DELETE, path) if path.starts_with("/api/pools/") && path.contains("/backends/") => {
            deregister(&control, path).await
        }
        (&Method::GET, "/api/config") => {
            respond(StatusCode::OK, "application/json", json!(control.config_status()).to_string())
        }
        (&Method::GET, "/api/config/events") => {
            respond(StatusCode::OK, "application/json", json!({ "events": control.config_status().events }).to_string())
        }
        (&Method::POST, "/api/reload") => match control.reload(crate::control::status::Trigger::Api).await {
            Ok(status) => {
                respond(StatusCode::OK, "application/json", json!({ "reloaded": true, "config": status }).to_string())
            }
            Err(e) => respond(
                StatusCode::UNPROCESSABLE_ENTITY,
                "application/json",
                json!({ "reloaded": false, "error": e }).to_string(),
            ),
        },
        (
            _,
            "/metrics" | "/healthz" | "/api/pools" | "/api/cluster" | "/api/config" | "/api/config/events"
            | "/api/reload",
        ) => respond(StatusCode::METHOD_NOT_ALLOWED, "application/json", r#"{"error":"method not allowed"}"#),
        _ => respond(StatusCode::NOT_FOUND, "application/json", r#"{"error":"not found"}"#),
    }
}

/// `ok` while the process serves (a liveness probe's answer), with a second line when the group's
/// shared store is out of reach: still serving, on the backends it last had.
fn healthz(control: &Control) -> String {
    match control.group() {
        Some(g) if !g.connected() => {
            "ok\ncluster: etcd unreachable; serving with the last known backends, not scaling\n".into()
        }
        _ => "ok\n".into(),
    }
}

fn json_error(status: StatusCode, message: impl std::fmt::Display) -> Response<Body> {
    respond(status, "application/json", json!({ "error": message.to_string() }).to_string())
}

fn change_error(e: crate::control::status::ChangeError) -> Response<Body> {
    match e {
        crate::control::status::ChangeError::NotFound(m) => json_error(StatusCode::NOT_FOUND, m),
        crate::control::status::ChangeError::Conflict(m) => json_error(StatusCode::CONFLICT, m),
        crate::control::status::ChangeError::Invalid(m) => json_error(StatusCode::BAD_REQUEST, m),
        crate::control::status::ChangeError::Internal(m) => json_error(StatusCode::INTERNAL_SERVER_ERROR, m),
        crate::control::status::ChangeError::Unavailable(m) => json_error(StatusCode::SERVICE_UNAVAILABLE, m),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Registration {
    addr: String,
    weight: Option<u32>,
    max_inflight: Option<u32>,
    backup: Option<bool>,
}

/// `GET /api/pools/{pool}{suffix}`: `document(pool)` for a pool that exists, else 404.
fn pool_document(
    control: &Control,
    path: &str,
    suffix: &str,
    document: impl FnOnce(&str) -> serde_json::Value,
) -> Response<Body> {
    let pool = path.trim_start_matches("/api/pools/").trim_end_matches(suffix);
    match control.snapshot().pool(pool) {
        Some(_) => respond(StatusCode::OK, "application/json", document(pool).to_string()),
        None => json_error(StatusCode::NOT_FOUND, format!("no pool {pool:?}")),
    }
}

/// `POST /api/pools/{pool}/backends` `{"addr", "weight"?, "max_inflight"?, "backup"?}`: adds a
/// backend at runtime (gated and slow-started as the pool says); 201 when added.
async fn register(control: &Control, pool: &str, req: Request<Incoming>) -> Response<Body> {
    use http_body_util::BodyExt;
    if !req.headers().get(header::CONTENT_TYPE).is_some_and(guard::is_json) {
        return json_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the registration as Content-Type: application/json",
        );
    }
    let body = match http_body_util::Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return json_error(StatusCode::BAD_REQUEST, format!("cannot read the body: {e}")),
    };
    let reg: Registration = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
    };
    let Ok(addr) = reg.addr.parse::<std::net::SocketAddr>() else {
        return json_error(StatusCode::BAD_REQUEST, format!("addr {:?}: expected ip:port", reg.addr));
    };
    if let Err(rule) = control.addr_policy().check(addr) {
        telemetry::backend_addr_refused(pool, "api", rule.as_str());
        return json_error(StatusCode::BAD_REQUEST, format!("addr {addr}: {rule}"));
    }
    let weight = reg.weight.unwrap_or(1);
    if !(1..=crate::config::MAX_WEIGHT).contains(&weight) {
        return json_error(
            StatusCode::BAD_REQUEST,
            format!("weight {weight}: allowed 1..={}", crate::config::MAX_WEIGHT),
        );
    }
    let snap = control.snapshot();
    let Some(p) = snap.pool(pool) else { return json_error(StatusCode::NOT_FOUND, format!("no pool {pool:?}")) };
    let max_inflight = reg.max_inflight.unwrap_or(p.config.max_inflight_per_backend);
    if !(1..=1_000_000).contains(&max_inflight) {
        return json_error(StatusCode::BAD_REQUEST, format!("max_inflight {max_inflight}: allowed 1..=1000000"));
    }
    let cfg = crate::config::BackendConfig { addr, weight, max_inflight, backup: reg.backup.unwrap_or(false) };
    let add = crate::control::status::BackendChange::Add { backend: cfg, persist: true };
    match control.change_backend_shared(pool, add).await {
        Ok(()) => {
            let state = state_of(control, pool, addr).unwrap_or("healthy");
            let body = json!({ "pool": pool, "addr": addr.to_string(), "weight": weight, "state": state });
            respond(StatusCode::CREATED, "application/json", body.to_string())
        }
        Err(e) => change_error(e),
    }
}

/// `/api/pools/{pool}/backends/{addr}[/{action}]` → (pool, addr); 404 for another shape, 400
/// for an address that is not `ip:port`.
fn backend_path<'a>(
    path: &'a str,
    action: Option<&str>,
) -> Result<(&'a str, std::net::SocketAddr), (StatusCode, String)> {
    let parts: Vec<&str> = path.trim_start_matches("/api/pools/").split('/').collect();
    let (pool, addr) = match (parts.as_slice(), action) {
        ([pool, "backends", addr], None) => (*pool, *addr),
        ([pool, "backends", addr, a], Some(want)) if *a == want => (*pool, *addr),
        _ => return Err((StatusCode::NOT_FOUND, "not found".into())),
    };
    let addr = addr.parse().map_err(|_| (StatusCode::BAD_REQUEST, format!("{addr:?}: expected ip:port")))?;
    Ok((pool, addr))
}

/// The state of backend `addr` of `pool` in the running snapshot, if it is there.
fn state_of(control: &Control, pool: &str, addr: std::net::SocketAddr) -> Option<&'static str> {
    control.snapshot().pool(pool)?.backends.iter().find(|b| b.addr == addr).map(|b| b.state().as_str())
}

/// `DELETE /api/pools/{pool}/backends/{addr}`: a backend added at runtime drains, then leaves.
async fn deregister(control: &Control, path: &str) -> Response<Body> {
    let (pool, addr) = match backend_path(path, None) {
        Ok(p) => p,
        Err((status, message)) => return json_error(status, message),
    };
    match control.change_backend_shared(pool, crate::control::status::BackendChange::Remove(addr)).await {
        Ok(()) => respond(
            StatusCode::OK,
            "application/json",
            json!({ "pool": pool, "addr": addr.to_string(), "state": "draining" }).to_string(),
        ),
        Err(e) => change_error(e),
    }
}

/// `POST /api/pools/{pool}/backends/{addr}/undrain`: a drained backend takes requests again
/// (`starting` until its next passing check when the pool has health checks, else `healthy`).
async fn undrain(control: &Control, path: &str) -> Response<Body> {
    let (pool, addr) = match backend_path(path, Some("undrain")) {
        Ok(p) => p,
        Err((status, message)) => return json_error(status, message),
    };
    if let Some(g) = control.group() {
        if let Err(e) = g.set_drained(pool, addr, false).await {
            return change_error(e);
        }
    }
    match control.change_backend(pool, crate::control::status::BackendChange::Undrain(addr)).await {
        Ok(()) => {
            let state = state_of(control, pool, addr).unwrap_or("removed");
            let body = json!({ "pool": pool, "addr": addr.to_string(), "state": state });
            respond(StatusCode::OK, "application/json", body.to_string())
        }
        Err(e) => change_error(e),
    }
}

/// `POST /api/pools/{pool}/backends/{addr}/drain`: the backend takes no new requests; in-flight
/// ones finish. Answers with its state and how many requests are left.
async fn drain(control: &Control, path: &str) -> Response<Body> {
    let parts: Vec<&str> = path.trim_start_matches("/api/pools/").split('/').collect();
    let [pool_name, "backends", addr, "drain"] = parts.as_slice() else {
        return respond(StatusCode::NOT_FOUND, "application/json", r#"{"error":"not found"}"#);
    };
    let snap = control.snapshot();
    let Some(pool) = snap.pool(pool_name) else {
        let body = json!({ "error": format!("no pool {pool_name:?}") });
        return respond(StatusCode::NOT_FOUND, "application/json", body.to_string());
    };
    let Some(backend) = pool.backends.iter().find(|b| b.label.as_ref() == *addr) else {
        let body = json!({ "error": format!("pool {pool_name:?} has no backend {addr:?}") });
        return respond(StatusCode::NOT_FOUND, "application/json", body.to_string());
    };
    if let Some(g) = control.group() {
        // For every replica of the group: written to etcd first, or not at all.
        if let Err(e) = g.set_drained(pool_name, backend.addr, true).await {
            return change_error(e);
        }
    }
    backend.set_state(crate::pool::BackendState::Draining);
    tracing::info!(pool = %pool_name, backend = %addr, in_flight = backend.in_flight(), "draining backend");
    let body = json!({
        "pool": pool_name,
        "addr": addr,
        "state": backend.state().as_str(),
        "in_flight": backend.in_flight(),
    });
    respond(StatusCode::OK, "application/json", body.to_string())
}

/// Serves the admin API until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    control: Arc<Control>,
    prom: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = crate::server::accept(&listener) => accepted,
        };
        let control = control.clone();
        let prom = prom.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let control = control.clone();
                let prom = prom.clone();
                async move { Ok::<_, Infallible>(handle(req, control, prom).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
