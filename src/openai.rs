//! The OpenAI API's shapes, as far as headroom reads and writes them: the `model` a request body
//! names (for `[[routes]] model`), the error body for a model no route serves, and the model list
//! of `GET /v1/models` (what vLLM, SGLang, TGI and llama.cpp's server answer there, and what the
//! OpenAI SDKs parse). Pure functions over bytes: no I/O, no config.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use std::borrow::Cow;

/// The top-level `model` of a JSON request body, if the body is a JSON object that names exactly
/// one as a string. Anything else (not JSON, not an object, no `model`, a `model` that is not a
/// string, or two of them) is `None`: such a request is routed by its other conditions.
pub fn model_of(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Head<'a> {
        #[serde(borrow, default)]
        model: Option<Cow<'a, str>>,
    }
    let head: Head = serde_json::from_slice(body).ok()?;
    head.model.map(Cow::into_owned)
}

/// The 404 body for a request whose model no route serves, as OpenAI's API answers it (the SDKs
/// raise `NotFoundError` with this message and code), with headroom's request id beside it.
pub fn model_not_found(model: &str, request_id: &str) -> Bytes {
    let v = json!({
        "error": {
            "message": format!("The model `{model}` does not exist."),
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        },
        "request_id": request_id,
    });
    Bytes::from(v.to_string())
}

/// A model as `GET /v1/models` lists it; `owned_by` is the pool that serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelEntry {
    pub id: String,
    pub owned_by: String,
}

fn object(m: &ModelEntry) -> serde_json::Value {
    json!({ "id": m.id, "object": "model", "created": 0, "owned_by": m.owned_by })
}

/// `GET /v1/models`: every model once, in the order given (a model two pools serve is listed
/// for the first).
pub fn model_list(models: &[ModelEntry]) -> Bytes {
    let mut seen = std::collections::HashSet::new();
    let data: Vec<_> = models.iter().filter(|m| seen.insert(m.id.as_str())).map(object).collect();
    Bytes::from(json!({ "object": "list", "data": data }).to_string())
}

/// `GET /v1/models/{id}`: the model, if listed.
pub fn model_object(models: &[ModelEntry], id: &str) -> Option<Bytes> {
    models.iter().find(|m| m.id == id).map(|m| Bytes::from(object(m).to_string()))
}

/// The model ids of a backend's own `GET /v1/models` answer (`{"data": [{"id": ...}, ...]}`),
/// at most `limit` of them, each at most 256 bytes; `None` when the body is not that shape.
pub fn model_ids(body: &[u8], limit: usize) -> Option<Vec<String>> {
    #[derive(Deserialize)]
    struct List {
        data: Vec<Item>,
    }
    #[derive(Deserialize)]
    struct Item {
        id: String,
    }
    let list: List = serde_json::from_slice(body).ok()?;
    Some(list.data.into_iter().map(|i| i.id).filter(|id| !id.is_empty() && id.len() <= 256).take(limit).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_model_is_the_top_level_string_field_of_a_json_object() {
        let body =
            br#"{"messages":[{"role":"user","content":"hi","model":"inner"}],"model":"llama-3-8b","stream":true}"#;
        assert_eq!(model_of(body).as_deref(), Some("llama-3-8b"));
        assert_eq!(model_of(br#"{"model":"caf\u00e9"}"#).as_deref(), Some("café"), "escapes are decoded");
        assert_eq!(model_of(br#"{"prompt":"x"}"#), None, "no model");
        assert_eq!(model_of(br#"{"model":7}"#), None, "not a string");
        assert_eq!(model_of(br#"["model","x"]"#), None, "not an object");
        assert_eq!(model_of(b"model=x"), None, "not JSON");
        assert_eq!(model_of(br#"{"model":"a","model":"b"}"#), None, "two models are ambiguous");
        assert_eq!(model_of(br#"{"model":"a""#), None, "cut short");
    }

    #[test]
    fn an_unknown_model_is_answered_in_openais_error_shape() {
        let v: serde_json::Value = serde_json::from_slice(&model_not_found("gpt-9", "id-1")).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["message"], "The model `gpt-9` does not exist.");
        assert_eq!(v["request_id"], "id-1");
    }

    #[test]
    fn the_model_list_names_each_model_once_with_its_pool() {
        let e = |id: &str, owned_by: &str| ModelEntry { id: id.into(), owned_by: owned_by.into() };
        let models = [e("a", "p1"), e("b", "p2"), e("a", "p2")];
        let v: serde_json::Value = serde_json::from_slice(&model_list(&models)).unwrap();
        assert_eq!(v["object"], "list");
        let ids: Vec<_> = v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(v["data"][0]["owned_by"], "p1");
        assert_eq!(v["data"][0]["object"], "model");
        assert!(model_object(&models, "b").is_some());
        assert!(model_object(&models, "c").is_none());
    }

    #[test]
    fn a_backends_model_list_is_read_within_bounds() {
        let body = br#"{"object":"list","data":[{"id":"m1","object":"model"},{"id":"m2"},{"id":"m3"}]}"#;
        assert_eq!(model_ids(body, 2), Some(vec!["m1".to_string(), "m2".to_string()]));
        assert_eq!(model_ids(br#"{"data":"x"}"#, 8), None);
        let long = format!(r#"{{"data":[{{"id":"{}"}},{{"id":"ok"}}]}}"#, "x".repeat(300));
        assert_eq!(model_ids(long.as_bytes(), 8), Some(vec!["ok".to_string()]));
    }

    proptest! {
        #[test]
        fn any_body_is_read_without_panicking(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = model_of(&body);
            let _ = model_ids(&body, 4);
        }

        #[test]
        fn a_model_written_by_a_json_encoder_is_read_back(model in "\\PC{1,40}", other in "\\PC{0,40}") {
            let body = serde_json::json!({"messages": [{"role": "user", "content": other}], "model": model});
            prop_assert_eq!(model_of(body.to_string().as_bytes()), Some(model));
        }
    }
}
