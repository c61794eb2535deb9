//! `[[routes]]` validated: which pool a request goes to, by host, path prefix and, for
//! OpenAI-style inference requests, the `model` named in the JSON body. First match wins; with a
//! single pool and no routes, everything goes to it. Same rules and messages as `validate`.

use super::file::{FileConfig, FileRoute};
use super::{ConfigError, PoolConfig};
use toml::Spanned;

#[derive(Debug, Clone)]
pub struct Route {
    /// Default `/`.
    pub path_prefix: String,
    /// Lower-case host without port; `None` matches any host.
    pub host: Option<String>,
    /// The model the request body must name (`model` or `model_prefix`); `None` matches any
    /// request, with a body or without.
    pub model: Option<ModelMatch>,
    /// Index into `Config::pools`.
    pub pool: usize,
}

/// A route's condition on the `model` field of a request's JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelMatch {
    /// `model = "..."`: exactly this name.
    Exact(String),
    /// `model_prefix = "..."`: any name that starts with this.
    Prefix(String),
}

impl ModelMatch {
    pub fn matches(&self, model: &str) -> bool {
        match self {
            ModelMatch::Exact(m) => model == m,
            ModelMatch::Prefix(p) => model.starts_with(p.as_str()),
        }
    }
}

impl Route {
    /// Whether the request's host and path match (the model aside).
    #[inline]
    pub fn matches_target(&self, host: Option<&str>, path: &str) -> bool {
        self.host.as_deref().is_none_or(|h| host == Some(h)) && path.starts_with(self.path_prefix.as_str())
    }
}

/// `[[routes]]`, by pool index.
pub(super) fn routes(raw: &FileConfig, pools: &[PoolConfig], text: &str) -> Result<Vec<Route>, ConfigError> {
    let mut routes = Vec::new();
    for r in &raw.routes {
        routes.push(route(r, pools, text)?);
    }
    if routes.is_empty() {
        if pools.len() == 1 {
            routes.push(Route { path_prefix: "/".into(), host: None, model: None, pool: 0 });
        } else {
            // Point at the second pool: from there on, which pool a request goes to is unsaid.
            let span = raw.pools.values().nth(1).map(|p| p.span()).unwrap_or_default();
            return Err(ConfigError::at(
                text,
                span,
                "routes: with more than one pool, [[routes]] must say which requests go to which pool",
            ));
        }
    }
    Ok(routes)
}

fn route(r: &FileRoute, pools: &[PoolConfig], text: &str) -> Result<Route, ConfigError> {
    let err = |span: std::ops::Range<usize>, msg: String| ConfigError::at(text, span, msg);
    let pool_name = r.pool.get_ref();
    let Some(pool) = pools.iter().position(|p| &p.name == pool_name) else {
        let known: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
        return Err(err(
            r.pool.span(),
            format!("routes.pool: unknown pool {pool_name:?}; defined pools: {}", known.join(", ")),
        ));
    };
    let path_prefix = match &r.path_prefix {
        None => "/".to_string(),
        Some(p) if !p.get_ref().starts_with('/') => {
            return Err(err(p.span(), "routes.path_prefix: must start with '/'".into()))
        }
        Some(p) => p.get_ref().clone(),
    };
    let host = match &r.host {
        None => None,
        Some(h) if h.get_ref().trim().is_empty() => {
            return Err(err(h.span(), "routes.host: must not be empty (omit it to match any host)".into()))
        }
        Some(h) => Some(h.get_ref().trim().to_ascii_lowercase()),
    };
    let name = |v: &Spanned<String>, key: &str| {
        if v.get_ref().is_empty() {
            Err(err(v.span(), format!("routes.{key}: must not be empty (omit it to match any model)")))
        } else {
            Ok(v.get_ref().clone())
        }
    };
    let model = match (&r.model, &r.model_prefix) {
        (Some(_), Some(p)) => {
            return Err(err(p.span(), "routes.model_prefix: a route takes model or model_prefix, not both".into()))
        }
        (Some(m), None) => Some(ModelMatch::Exact(name(m, "model")?)),
        (None, Some(p)) => Some(ModelMatch::Prefix(name(p, "model_prefix")?)),
        (None, None) => None,
    };
    Ok(Route { path_prefix, host, model, pool })
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ModelMatch};
    use std::path::Path;

    const TWO: &str = "[pools.a]\n[[pools.a.backends]]\naddr = \"127.0.0.1:9001\"\n\
                       [pools.b]\n[[pools.b.backends]]\naddr = \"127.0.0.1:9002\"\n";

    fn parse(routes: &str) -> Result<Config, crate::config::ConfigError> {
        Config::parse(&format!("{TWO}{routes}"), Path::new("."))
    }

    #[test]
    fn a_route_names_an_exact_model_or_a_model_prefix() {
        let c = parse(
            "[[routes]]\nmodel = \"llama-3-8b\"\npool = \"a\"\n\
             [[routes]]\nmodel_prefix = \"qwen-\"\npath_prefix = \"/v1/\"\npool = \"b\"\n",
        )
        .unwrap();
        assert_eq!(c.routes[0].model, Some(ModelMatch::Exact("llama-3-8b".into())));
        assert_eq!(c.routes[1].model, Some(ModelMatch::Prefix("qwen-".into())));
        assert_eq!(c.routes[1].path_prefix, "/v1/");
        assert!(c.routes[1].model.as_ref().unwrap().matches("qwen-2-7b"));
        assert!(!c.routes[0].model.as_ref().unwrap().matches("llama-3-8b-instruct"));
    }

    #[test]
    fn a_route_with_both_model_keys_or_an_empty_name_is_refused_where_it_is_written() {
        let e = parse("[[routes]]\nmodel = \"m\"\nmodel_prefix = \"m\"\npool = \"a\"\n").unwrap_err();
        assert!(e.message.starts_with("routes.model_prefix: a route takes model or model_prefix"), "{e}");
        assert!(e.line.is_some_and(|l| l > 0), "{e}");
        let e = parse("[[routes]]\nmodel = \"\"\npool = \"a\"\n").unwrap_err();
        assert!(e.message.starts_with("routes.model: must not be empty"), "{e}");
    }

    #[test]
    fn several_pools_need_routes_and_a_route_needs_a_known_pool() {
        let e = parse("").unwrap_err();
        assert!(e.message.contains("must say which requests go to which pool"), "{e}");
        let e = parse("[[routes]]\npool = \"nope\"\n").unwrap_err();
        assert!(e.message.contains("unknown pool \"nope\"; defined pools: a, b"), "{e}");
    }
}
