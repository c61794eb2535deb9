//! `GET /v1/models` and `GET /v1/models/{id}`, answered by headroom itself when some pool lists
//! its models (`models = [...]`) or discovers them (`discover_models`): the pools' models merged,
//! in pool order, so a client sees every model the gateway serves in one list. Discovered models
//! count only for backends that take new requests.

use crate::error::ProxyError;
use crate::gateway::Snapshot;
use crate::openai::{self, ModelEntry};
use crate::pool::BackendState;
use bytes::Bytes;

/// The answer to a `GET` of the model list or of one model of it, when headroom answers it: the
/// body, or the model-not-found error. `None`: a request for a backend.
pub(super) fn answer(snap: &Snapshot, req: &http::request::Parts) -> Option<Result<Bytes, ProxyError>> {
    let rest = req.uri.path().strip_prefix("/v1/models")?;
    if req.method != http::Method::GET || !snap.config.lists_models() {
        return None;
    }
    let models = merged(snap);
    match rest {
        "" | "/" => Some(Ok(openai::model_list(&models))),
        _ => {
            let id = rest.strip_prefix('/')?;
            let id = percent_decode(id);
            Some(openai::model_object(&models, &id).ok_or(ProxyError::ModelNotFound(id)))
        }
    }
}

/// Every pool's listed models, then the ones its serving backends reported.
fn merged(snap: &Snapshot) -> Vec<ModelEntry> {
    let mut out = Vec::new();
    for pool in &snap.pools {
        let owner = &pool.config.name;
        let entry = |id: &String| ModelEntry { id: id.clone(), owned_by: owner.clone() };
        out.extend(pool.config.models.iter().map(entry));
        if pool.config.discover_models {
            for b in pool.backends.iter().filter(|b| matches!(b.state(), BackendState::Healthy)) {
                if let Some(models) = b.engine.models() {
                    out.extend(models.iter().map(entry));
                }
            }
        }
    }
    out
}

/// `%XX` escapes decoded (model ids such as `org/name` arrive as `org%2Fname`); anything
/// malformed is kept as written.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn snapshot() -> Snapshot {
        let text = "[pools.a]\nmodels = [\"m1\", \"org/m2\"]\n[[pools.a.backends]]\naddr = \"127.0.0.1:9001\"\n\
                    [pools.b]\ndiscover_models = true\n[[pools.b.backends]]\naddr = \"127.0.0.1:9002\"\n\
                    [[pools.b.backends]]\naddr = \"127.0.0.1:9003\"\n[[routes]]\npool = \"a\"\n";
        Snapshot::build(Config::parse(text, Path::new(".")).unwrap(), &[], None)
    }

    fn get(snap: &Snapshot, path: &str) -> Option<Result<Bytes, ProxyError>> {
        answer(snap, &http::Request::get(path).body(()).unwrap().into_parts().0)
    }

    fn ids(body: &Bytes) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect()
    }

    #[test]
    fn the_list_merges_listed_models_and_those_serving_backends_reported() {
        let snap = snapshot();
        snap.pools[1].backends[0].engine.set_models(Some(vec!["m3".into(), "m1".into()]));
        snap.pools[1].backends[1].engine.set_models(Some(vec!["m4".into()]));
        snap.pools[1].backends[1].set_state(BackendState::Unhealthy);
        let list = get(&snap, "/v1/models").unwrap().unwrap();
        assert_eq!(ids(&list), ["m1", "org/m2", "m3"], "m1 once; the unhealthy backend's m4 left out");
        assert!(get(&snap, "/v1/models/org%2Fm2").unwrap().is_ok());
        assert!(get(&snap, "/v1/models/m3").unwrap().is_ok());
        assert!(matches!(get(&snap, "/v1/models/m4"), Some(Err(ProxyError::ModelNotFound(m))) if m == "m4"));
        assert!(get(&snap, "/v1/modelsx").is_none(), "not the list");
        assert!(get(&snap, "/v1/chat/completions").is_none());
        let post = http::Request::post("/v1/models").body(()).unwrap().into_parts().0;
        assert!(answer(&snap, &post).is_none(), "only GET is answered");
        let unlisted = Snapshot::build(
            Config::parse("[pools.a]\n[[pools.a.backends]]\naddr = \"127.0.0.1:9001\"\n", Path::new(".")).unwrap(),
            &[],
            None,
        );
        assert!(get(&unlisted, "/v1/models").is_none(), "no pool lists models: the backends answer");
    }

    #[test]
    fn escapes_are_decoded_and_broken_ones_kept() {
        assert_eq!(percent_decode("org%2Fname"), "org/name");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%2"), "%zz%2");
        assert_eq!(percent_decode("%ff"), "%ff", "not UTF-8: kept as written");
    }
}
