//! The crate's layers, checked: a module may use modules of its own layer or of layers below it,
//! never above. `LAYERS` gives every module of `src/` a layer (by path prefix, the longest
//! wins), from the bottom up:
//!
//! 0 clock, error, config, certificate loading (tls), the OpenAI API's shapes (openai), prompt keys (prompt) · 1 metric names and recording (telemetry),
//! the etcd client (etcd), the listeners' SNI resolver (tls::server) · 2 the pool model the hot path reads (pool) · 3 the
//! HTTP/1.1 codec (http1) and a client connection's state (downstream) · 4 upstream connections
//! (upstream) · 5 the data path and its snapshot (proxy, gateway) · 6 what changes the snapshot
//! (control, reload, health, scale, scrape, cluster) · 7 admin, server, tls::gen · 8 the crate root · 9 the dev
//! tools (load, mock), which nothing else may use.
//!
//! A second check finds modules that use each other in a circle (directly or through others),
//! counting a child's `super::` uses of its parent like any other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const LAYERS: [(&str, u8); 30] = [
    ("clock", 0),
    ("openai", 0),
    ("prompt", 0),
    ("error", 0),
    ("config", 0),
    ("tls", 0),
    ("telemetry", 1),
    ("engine", 1),
    ("etcd", 1),
    ("pool", 2),
    ("http1", 3),
    ("downstream", 3),
    ("upstream", 4),
    ("proxy", 5),
    ("gateway", 5),
    ("control", 6),
    ("health", 6),
    ("reload", 6),
    ("scale", 6),
    ("scrape", 6),
    ("cluster", 6),
    ("admin", 7),
    ("server", 7),
    ("tls::server", 1),
    ("tls::gen", 7),
    ("", 8),
    ("main", 8),
    ("allocator", 8),
    ("load", 9),
    ("mock", 9),
];

fn layer(module: &str) -> u8 {
    LAYERS
        .iter()
        .filter(|(prefix, _)| prefix.is_empty() || module == *prefix || module.starts_with(&format!("{prefix}::")))
        .max_by_key(|(prefix, _)| prefix.len())
        .map_or(8, |(_, l)| *l)
}

/// Every module of `src/` by path (`proxy::h1::server`), with its text without test code.
fn modules() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![Path::new("src").to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix("src").unwrap().with_extension("");
            let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
                parts.pop();
            }
            // Test-only files: what they use is not the crate's structure.
            if parts.last().is_some_and(|l| ["tests", "fuzz", "differential"].contains(&l.as_str())) {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let text = match text.find("#[cfg(test)]\nmod tests {") {
                Some(i) => text[..i].to_string(),
                None => text,
            };
            out.insert(parts.join("::"), text);
        }
    }
    out
}

/// The module paths `text` (of module `from`) refers to through `crate::` and `super::`.
fn uses(from: &str, text: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let parent: Vec<&str> = from.split("::").filter(|s| !s.is_empty()).collect();
    let mut resolve = |path: Vec<String>| {
        // The longest prefix that is a module: an item of a module is a use of the module.
        for n in (0..=path.len()).rev() {
            let candidate = path[..n].join("::");
            if known.contains(&candidate) {
                found.insert(candidate);
                return;
            }
        }
    };
    for (root, base) in [("crate::", Vec::new()), ("super::", parent[..parent.len().saturating_sub(1)].to_vec())] {
        let mut rest = text;
        while let Some(i) = rest.find(root) {
            // Not the tail of a longer word (`my_crate::`).
            let word_before = rest[..i].chars().last().is_some_and(|c| c.is_alphanumeric() || c == '_');
            rest = &rest[i + root.len()..];
            if word_before {
                continue;
            }
            for path in expand(rest) {
                let mut full: Vec<String> = base.iter().map(|s| s.to_string()).collect();
                full.extend(path);
                resolve(full);
            }
        }
    }
    found
}

/// The paths after `crate::`: `a::b::C`, or each of `{a::b, c::{d, e}}`.
fn expand(text: &str) -> Vec<Vec<String>> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut prefix = Vec::new();
    let mut rest = text;
    loop {
        let id = ident(rest);
        if id.is_empty() {
            break;
        }
        prefix.push(id.clone());
        rest = &rest[id.len()..];
        if let Some(r) = rest.strip_prefix("::") {
            rest = r;
        } else {
            return vec![prefix];
        }
    }
    let Some(group) = rest.strip_prefix('{') else { return vec![prefix] };
    // Split the braces' content at depth-0 commas.
    let (mut depth, mut start, mut out) = (0usize, 0usize, Vec::new());
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                out.push(&group[start..i]);
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.into_iter()
        .flat_map(|item| expand(item.trim()))
        .map(|tail| prefix.iter().cloned().chain(tail).collect())
        .collect()
}

/// Every module's uses of other modules.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    modules
        .iter()
        .map(|(from, text)| {
            let mut to = uses(from, text, &known);
            to.remove(from);
            (from.clone(), to)
        })
        .collect()
}

#[test]
fn no_module_uses_a_module_of_a_higher_layer() {
    let upward: Vec<String> = graph()
        .iter()
        .flat_map(|(from, to)| to.iter().filter(|t| layer(t) > layer(from)).map(move |t| format!("{from} -> {t}")))
        .collect();
    assert!(upward.is_empty(), "uses that point up a layer (see LAYERS): {upward:#?}");
}

/// The modules on a cycle of uses, as strongly connected components of more than one module
/// (Tarjan's algorithm, iteratively).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let names: Vec<&String> = graph.keys().collect();
    let index_of: BTreeMap<&String, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let edges: Vec<Vec<usize>> =
        names.iter().map(|n| graph[*n].iter().filter_map(|t| index_of.get(t).copied()).collect()).collect();
    let n = names.len();
    let (mut index, mut low, mut on_stack) = (vec![usize::MAX; n], vec![0; n], vec![false; n]);
    let (mut stack, mut next, mut out) = (Vec::new(), 0, Vec::new());
    for root in 0..n {
        if index[root] != usize::MAX {
            continue;
        }
        let mut work = vec![(root, 0usize)];
        while let Some(&mut (v, ref mut at)) = work.last_mut() {
            if *at == 0 {
                index[v] = next;
                low[v] = next;
                next += 1;
                stack.push(v);
                on_stack[v] = true;
            }
            if let Some(&w) = edges[v].get(*at) {
                *at += 1;
                if index[w] == usize::MAX {
                    work.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                let mut component = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    component.push(names[w].clone());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    out.push(component);
                }
            }
        }
    }
    out
}

#[test]
fn no_modules_use_each_other_in_a_circle() {
    let found = cycles(&graph());
    assert!(found.is_empty(), "modules that use each other in a circle: {found:#?}");
}

#[test]
fn the_cycle_finder_finds_circles_and_only_circles() {
    let g = |pairs: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in pairs {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    assert!(cycles(&g(&[("a", "b"), ("b", "c"), ("a", "c")])).is_empty());
    assert_eq!(cycles(&g(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")])), [vec!["a", "b", "c"]]);
}

#[test]
fn the_use_parser_reads_grouped_and_nested_paths() {
    let paths = expand("{a::b, c::{d, e::F}};");
    assert_eq!(paths, [vec!["a", "b"], vec!["c", "d"], vec!["c", "e", "F"]]);
    assert_eq!(expand("x::y::Z;"), [vec!["x", "y", "Z"]]);
    let known: BTreeSet<String> = ["", "a", "a::b", "c"].iter().map(|s| s.to_string()).collect();
    let found = uses("a::b", "use crate::c::Thing; use super::Other; let x = my_crate::nope;", &known);
    assert_eq!(found, ["a", "c"].iter().map(|s| s.to_string()).collect());
}
