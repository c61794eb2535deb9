//! The status page (`GET /` on the admin listener): server-rendered HTML of every pool and its
//! backends, plus a small inline script that polls the JSON API to keep it live and draws the
//! last 15 minutes as SVG charts. No external assets: it works offline.

use crate::control::Control;
use std::fmt::Write;

const TEMPLATE: &str = include_str!("status.html");

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

const ENGINE_HEAD: &str =
    "<th title=\"requests running / waiting in the engine's own scheduler\">engine run / wait</th>\
                           <th class=\"hide-sm\">KV cache</th><th class=\"hide-sm\">prefix hits</th>";

/// A backend's engine figures (with `[pools.X.engine]`), dashes without a fresh reading.
fn engine_cells(b: &crate::pool::Backend, cfg: Option<&crate::config::EngineConfig>) -> String {
    let Some(cfg) = cfg else { return String::new() };
    let r = b.engine.get(crate::clock::now_ms(), cfg.stale_after_ms());
    let count = |v: Option<u32>| v.map_or("–".to_string(), |v| v.to_string());
    let pct = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{:.0}%", v * 100.0));
    format!(
        "<td class=\"engine-queue\">{} / {}</td><td class=\"hide-sm kv\">{}</td><td class=\"hide-sm hits\">{}</td>",
        count(r.and_then(|r| r.running)),
        count(r.and_then(|r| r.waiting)),
        pct(r.and_then(|r| r.kv_usage)),
        pct(r.and_then(|r| r.hit_rate)),
    )
}

/// The page with the pools as they are now.
pub fn page(control: &Control) -> String {
    let snap = control.snapshot();
    let mut pools = String::new();
    for p in &snap.pools {
        let name = esc(&p.config.name);
        let _ = write!(
            pools,
            "<section class=\"pool\" id=\"pool-{name}\" data-pool=\"{name}\"><h2>{name}</h2>\
             <div class=\"stats\"><span>queue <b class=\"queue\">{}</b>/{}</span><span>in flight <b>{}</b></span>\
             <span>backends <b>{}</b></span></div><div class=\"scroll\"><table><thead><tr><th>backend</th><th>state</th>\
             <th>in flight / capacity</th>{}<th class=\"hide-sm\">weight</th><th class=\"hide-sm\">requests</th>\
             <th class=\"hide-sm\">errors</th><th class=\"hide-sm\">aborted</th></tr></thead><tbody>",
            p.queue.depth(),
            p.queue.max_depth(),
            p.in_flight(),
            p.backends.len(),
            if p.config.engine.is_some() { ENGINE_HEAD } else { "" },
        );
        for b in &p.backends {
            let (addr, state) = (esc(&b.label), b.state().as_str());
            let cap = b.effective_max_inflight().max(1);
            let pct = (100 * b.in_flight() / cap).min(100);
            let _ = write!(
                pools,
                "<tr data-backend=\"{addr}\" data-state=\"{state}\"><td>{addr}</td>\
                 <td><span class=\"badge {state}\">{state}</span></td>\
                 <td><span class=\"bar\"><i style=\"width:{pct}%\"></i></span> {}/{cap}</td>{}\
                 <td class=\"hide-sm\">{}</td><td class=\"hide-sm\">{}</td><td class=\"hide-sm\">{}</td>\
                 <td class=\"hide-sm\">{}</td></tr>",
                b.in_flight(),
                engine_cells(b, p.config.engine.as_ref()),
                b.weight(),
                b.requests(),
                b.errors(),
                b.aborted()
            );
        }
        pools.push_str(
            "</tbody></table></div><div class=\"charts\"></div><h3>scale events</h3><div class=\"events\"></div></section>\n",
        );
    }
    TEMPLATE.replacen("{{POOLS}}", &pools, 1).replacen("{{UPDATED}}", "", 1).replacen(
        "{{CLUSTER}}",
        &cluster_line(control),
        1,
    )
}

/// The group this replica acts with, as the page's header says it (as `clusterLine` does live).
fn cluster_line(control: &Control) -> String {
    let Some(g) = control.group() else { return String::new() };
    let d = g.document();
    let name = esc(d["name"].as_str().unwrap_or(""));
    if !g.connected() {
        return format!("cluster {name}: etcd unreachable; serving with the last known backends, not scaling");
    }
    let members = d["members"].as_array().map_or(0, Vec::len);
    format!("cluster {name}: {members} replicas, leader {}", esc(d["leader"].as_str().unwrap_or("none")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_markup() {
        assert_eq!(super::esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
    }
}
