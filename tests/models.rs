//! Routing by the model a request names (`[[routes]] model` / `model_prefix`): requests reach the
//! pool that serves their model, over HTTP/1.1 and h2, streaming or not; an unknown model gets
//! OpenAI's 404; headroom answers `/v1/models` from the pools' lists and what their backends
//! report; the body read for routing reaches the backend byte for byte, whatever its framing, and
//! is sent again on a retry; a body too long to read is routed by the other conditions.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;

const T: Duration = Duration::from_secs(10);

/// A mock engine serving exactly these models (any other gets 404 from the engine itself).
async fn engine(models: &[&str]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let opts = headroom::mock::MockOptions {
        ttft: Duration::from_millis(1),
        token_interval: Duration::from_millis(1),
        tokens: 4,
        models: models.iter().map(|m| m.to_string()).collect(),
        ..Default::default()
    };
    tokio::spawn(headroom::mock::serve(l, opts, std::future::pending()));
    addr
}

/// Two pools serving different models: `llama` lists its model, `qwen` discovers its models
/// from its engine.
fn two_pools(llama: SocketAddr, qwen: SocketAddr) -> String {
    format!(
        "[pools.llama]\nmodels = [\"llama-3-8b\"]\n[[pools.llama.backends]]\naddr = \"{llama}\"\n\
         [pools.qwen]\ndiscover_models = true\n[pools.qwen.health]\npath = \"/health\"\ninterval = \"100ms\"\n\
         [[pools.qwen.backends]]\naddr = \"{qwen}\"\n\
         [[routes]]\nmodel = \"llama-3-8b\"\npool = \"llama\"\n\
         [[routes]]\nmodel_prefix = \"qwen-\"\npool = \"qwen\"\n"
    )
}

async fn post(url: &str, body: String) -> (u16, http::HeaderMap, Bytes) {
    let req = Request::post(url).header("content-type", "application/json").body(full(body)).unwrap();
    let resp = client().request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    (parts.status.as_u16(), parts.headers, body.collect().await.unwrap().to_bytes())
}

fn chat(model: &str, stream: bool) -> String {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hello"}], "stream": stream})
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_reaches_the_pool_that_serves_the_model_its_body_names() {
    let (llama, qwen) = (engine(&["llama-3-8b"]).await, engine(&["qwen-2-7b"]).await);
    let hr = Headroom::start(&two_pools(llama, qwen)).await;
    let url = hr.url("/v1/chat/completions");

    for model in ["llama-3-8b", "qwen-2-7b"] {
        let (status, _, body) = post(&url, chat(model, false)).await;
        assert_eq!(status, 200, "{model}: {}", String::from_utf8_lossy(&body));
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["model"], model);
        let (status, headers, body) = post(&url, chat(model, true)).await;
        assert_eq!((status, &headers["content-type"]), (200, &http::HeaderValue::from_static("text/event-stream")));
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains(&format!("\"model\":\"{model}\"")) && text.ends_with("data: [DONE]\n\n"), "{text}");
    }

    // Over h2 as well (prior knowledge), where the body arrives as DATA frames.
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Body>();
    let req = Request::post(&url).body(full(chat("qwen-2-7b", false))).unwrap();
    let resp = h2.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);

    let (status, headers, body) = post(&url, chat("gpt-9", false)).await;
    assert_eq!(status, 404);
    assert_eq!(headers["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "model_not_found", "{v}");
    assert_eq!(v["error"]["message"], "The model `gpt-9` does not exist.");
    // A body that names no model matches no model route: the plain 404 of an unrouted request.
    let (status, _, _) = post(&url, "{\"prompt\":\"x\"}".into()).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_list_merges_the_pools_listed_and_discovered_models() {
    let (llama, qwen) = (engine(&["llama-3-8b"]).await, engine(&["qwen-2-7b", "qwen-2-72b"]).await);
    let hr = Headroom::start(&two_pools(llama, qwen)).await;
    let ids = || async {
        let (status, body) = get(&hr.url("/v1/models")).await;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect::<Vec<_>>()
    };
    poll_until(T, "the qwen engine's models in the list", || async { ids().await.len() == 3 }).await;
    assert_eq!(ids().await, ["llama-3-8b", "qwen-2-7b", "qwen-2-72b"]);
    let (status, body) = get(&hr.url("/v1/models/qwen-2-72b")).await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["owned_by"], "qwen");
    let (status, body) = get(&hr.url("/v1/models/nope")).await;
    assert_eq!(status, 404);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["error"]["code"], "model_not_found");
}

/// Answers with the request body it received, and how it was framed.
async fn mirror() -> TestBackend {
    TestBackend::start(|req: Request<hyper::body::Incoming>| async move {
        let framing = match (req.headers().get("content-length"), req.headers().get("transfer-encoding")) {
            (Some(n), _) => format!("length {}", n.to_str().unwrap()),
            (None, Some(_)) => "chunked".to_string(),
            (None, None) => "none".to_string(),
        };
        let body = req.into_body().collect().await.unwrap().to_bytes();
        http::Response::builder().header("x-framing", framing).body(full(body)).unwrap()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_read_for_routing_reaches_the_backend_byte_for_byte() {
    let (routed, fallback) = (mirror().await, mirror().await);
    let text = format!(
        "[server]\nroute_body_limit = 1024\n\
         [pools.routed]\n[[pools.routed.backends]]\naddr = \"{}\"\n\
         [pools.fallback]\n[[pools.fallback.backends]]\naddr = \"{}\"\n\
         [[routes]]\nmodel = \"m\"\npool = \"routed\"\n[[routes]]\npool = \"fallback\"\n",
        routed.addr, fallback.addr
    );
    let hr = Headroom::start(&text).await;
    let url = hr.url("/v1/completions");

    let small = r#"{"model":"m","prompt":"caf\u00e9 \"quoted\""}"#.to_string();
    let (status, headers, body) = post(&url, small.clone()).await;
    assert_eq!(
        (status, body, &headers["x-framing"]),
        (200, Bytes::from(small.clone()), &format!("length {}", small.len()).parse().unwrap())
    );
    assert_eq!(routed.hits.load(std::sync::atomic::Ordering::SeqCst), 1);

    // Chunked, in three pieces that arrive apart: read whole, routed, forwarded the same.
    let mut s = tokio::net::TcpStream::connect(hr.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    for piece in [r#"{"prompt":"a","#, r#""model""#, r#":"m"}"#] {
        s.write_all(format!("{:x}\r\n{piece}\r\n", piece.len()).as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(T, s.read_to_string(&mut out)).await.unwrap().unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with(r#"{"prompt":"a","model":"m"}"#), "{out}");
    assert_eq!(routed.hits.load(std::sync::atomic::Ordering::SeqCst), 2);

    // Longer than route_body_limit: routed by the other conditions, every byte still forwarded.
    let long = format!(r#"{{"model":"m","prompt":"{}"}}"#, "x".repeat(4000));
    let (status, headers, body) = post(&url, long.clone()).await;
    assert_eq!((status, body), (200, Bytes::from(long.clone())));
    assert_eq!(headers["x-framing"], format!("length {}", long.len()));
    assert_eq!(fallback.hits.load(std::sync::atomic::Ordering::SeqCst), 1);

    // Not JSON: the other conditions too.
    let (status, _, body) = post(&url, "model=m".into()).await;
    assert_eq!((status, body), (200, Bytes::from("model=m")));
    assert_eq!(fallback.hits.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(routed.hits.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_read_for_routing_is_sent_again_on_a_retry_even_when_large() {
    let refusing = TestBackend::start(|req: Request<hyper::body::Incoming>| async move {
        let _ = req.into_body().collect().await;
        http::Response::builder().status(503).body(full("busy")).unwrap()
    })
    .await;
    let good = mirror().await;
    let text = format!(
        "[server]\nroute_body_limit = \"1MiB\"\n\
         [pools.p]\nbalance = \"round_robin\"\n[pools.p.retry]\nattempts = 1\non = [\"503\"]\nbudget_percent = 100\nidempotent_only = false\n\
         [[pools.p.backends]]\naddr = \"{}\"\n[[pools.p.backends]]\naddr = \"{}\"\n\
         [[routes]]\nmodel = \"m\"\npool = \"p\"\n",
        refusing.addr, good.addr
    );
    let hr = Headroom::start(&text).await;
    // 200 KiB: larger than what a streamed body keeps for a retry (64 KiB).
    let big = format!(r#"{{"model":"m","prompt":"{}"}}"#, "y".repeat(200 << 10));
    for _ in 0..4 {
        let (status, _, body) = post(&hr.url("/v1/completions"), big.clone()).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body[..body.len().min(200)]));
        assert_eq!(body.len(), big.len());
        assert!(body == big.as_bytes());
    }
    assert!(refusing.hits.load(std::sync::atomic::Ordering::SeqCst) >= 1, "some first tries went to the 503 backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_read_for_routing_is_held_to_the_request_limits() {
    let b = mirror().await;
    let text = format!(
        "[server]\nmax_request_body = 2048\nidle_timeout = \"300ms\"\n\
         [pools.p]\n[[pools.p.backends]]\naddr = \"{}\"\n[[routes]]\nmodel = \"m\"\npool = \"p\"\n",
        b.addr
    );
    let hr = Headroom::start(&text).await;
    // Chunked, so no declared length gives it away before the body is read.
    let chunk = "z".repeat(1500);
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n{n:x}\r\n{chunk}\r\n{n:x}\r\n{chunk}\r\n0\r\n\r\n",
        n = chunk.len()
    );
    let out = raw(hr.addr, req.as_bytes(), T).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    // A client that stops in the middle of the body.
    let out =
        raw(hr.addr, b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"model\"", T).await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert_eq!(b.hits.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing reached the backend");
}

/// What the OpenAI Python SDK sees through headroom: the model list, a completion of each model,
/// whole and streamed, and the error of an unknown one. Prints one JSON line.
const SDK_SCRIPT: &str = r#"
import json, sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=20)
out = {"models": [m.id for m in client.models.list()]}
for model in ["llama-3-8b", "qwen-2-7b"]:
    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model=model, messages=messages)
    streamed = list(client.chat.completions.create(model=model, messages=messages, stream=True))
    out[model] = {
        "whole": whole.model,
        "text": whole.choices[0].message.content,
        "streamed": sorted({c.model for c in streamed}),
        "chunks": len(streamed),
    }
try:
    client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    out["unknown"] = "answered"
except openai.NotFoundError as e:
    out["unknown"] = {"status": e.status_code, "code": e.code}
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_gets_the_model_it_asks_for_through_headroom() {
    let has_sdk = || {
        std::process::Command::new("python3")
            .args(["-c", "import openai"])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    ensure_test_tool("the OpenAI Python SDK (pip install openai)", has_sdk);
    let (llama, qwen) = (engine(&["llama-3-8b"]).await, engine(&["qwen-2-7b"]).await);
    let hr = Headroom::start(&two_pools(llama, qwen)).await;
    poll_until(T, "the qwen engine's model in the list", || async {
        String::from_utf8_lossy(&get(&hr.url("/v1/models")).await.1).contains("qwen-2-7b")
    })
    .await;
    let base = hr.url("/v1");
    let run = tokio::process::Command::new("python3").args(["-c", SDK_SCRIPT, &base]).output();
    let out = tokio::time::timeout(Duration::from_secs(60), run).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["models"], serde_json::json!(["llama-3-8b", "qwen-2-7b"]), "{v}");
    for model in ["llama-3-8b", "qwen-2-7b"] {
        assert_eq!(v[model]["whole"], model, "{v}");
        assert_eq!(v[model]["streamed"], serde_json::json!([model]), "{v}");
        assert_eq!(v[model]["chunks"], 4, "one chunk per token: {v}");
        assert!(v[model]["text"].as_str().unwrap().starts_with("The gateway"), "{v}");
    }
    assert_eq!(v["unknown"], serde_json::json!({"status": 404, "code": "model_not_found"}), "{v}");
}
