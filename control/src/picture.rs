//! Pictures of the network: SVG (served at `/network.svg`) and Graphviz DOT
//! (`skiff network status --dot`), both drawn from a [`NetworkView`] by skiff itself.
//!
//! The SVG places the sites on a circle, draws each link as a line labelled with its cost and
//! (for this site's links) RTT — solid green when up, dashed red when down — and lists under
//! each site the routing keys it serves. No external graphviz is needed.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::admin::NetworkView;

const WIDTH: f64 = 960.0;
const NODE_W: f64 = 170.0;

/// The network as a standalone SVG document.
pub fn svg(view: &NetworkView) -> String {
    let keys = keys_by_site(view);
    let n = view.sites.len().max(1);
    let radius = if n == 1 { 0.0 } else { 150.0 + 25.0 * n as f64 };
    let height = 2.0 * radius + 260.0;
    let (cx, cy) = (WIDTH / 2.0, radius + 110.0);
    let mut pos = BTreeMap::new();
    for (i, site) in view.sites.iter().enumerate() {
        let angle = -std::f64::consts::FRAC_PI_2 + 2.0 * std::f64::consts::PI * i as f64 / n as f64;
        pos.insert(
            site.name.clone(),
            (cx + radius * angle.cos(), cy + radius * angle.sin()),
        );
    }

    let mut out = String::new();
    let _ = write!(
        out,
        r##"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="Helvetica, Arial, sans-serif">
<title>skiff network seen from {title}</title>
<rect width="100%" height="100%" fill="#ffffff"/>
<text x="20" y="32" font-size="20" font-weight="bold">skiff network — seen from site {title}</text>
<text x="20" y="54" font-size="13" fill="#555">{sites} sites, {links} links, {keys} routing keys</text>
"##,
        title = esc(&view.site),
        sites = view.sites.len(),
        links = view.links.len(),
        keys = view.services.len(),
    );
    for link in &view.links {
        let (Some(&(x1, y1)), Some(&(x2, y2))) = (pos.get(&link.from), pos.get(&link.to)) else {
            continue;
        };
        let up = link.state == "up";
        let (color, dash) = if up {
            ("#2e9d4f", "")
        } else {
            ("#c0392b", r#" stroke-dasharray="8 6""#)
        };
        let _ = writeln!(
            out,
            r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="{color}" stroke-width="3"{dash}/>"#
        );
        let mut label = format!("cost {}", link.cost);
        if let Some(rtt) = link.rtt_ms {
            let _ = write!(label, " · {rtt:.2} ms");
        }
        if !up {
            label.push_str(" · down");
        }
        let (mx, my) = ((x1 + x2) / 2.0, (y1 + y2) / 2.0);
        let _ = writeln!(
            out,
            r##"<text x="{mx:.1}" y="{:.1}" font-size="12" text-anchor="middle" fill="{color}" stroke="#ffffff" stroke-width="4" paint-order="stroke">{}</text>"##,
            my - 6.0,
            esc(&label)
        );
    }
    for site in &view.sites {
        let Some(&(x, y)) = pos.get(&site.name) else {
            continue;
        };
        let served = keys.get(&site.name).cloned().unwrap_or_default();
        let h = 46.0 + 16.0 * served.len() as f64;
        let (stroke, fill, dash) = match (site.local, site.reachable) {
            (true, _) => ("#1f5fbf", "#e8f0fc", ""),
            (false, true) => ("#333333", "#f7f7f7", ""),
            (false, false) => ("#999999", "#eeeeee", r#" stroke-dasharray="5 4""#),
        };
        let _ = writeln!(
            out,
            r#"<rect x="{:.1}" y="{:.1}" width="{NODE_W}" height="{h:.1}" rx="10" fill="{fill}" stroke="{stroke}" stroke-width="2"{dash}/>"#,
            x - NODE_W / 2.0,
            y - 23.0
        );
        let mut title = site.name.clone();
        if site.local {
            title.push_str(" (this site)");
        } else if !site.reachable {
            title.push_str(" (unreachable)");
        }
        let _ = writeln!(
            out,
            r#"<text x="{x:.1}" y="{:.1}" font-size="15" font-weight="bold" text-anchor="middle">{}</text>"#,
            y - 2.0,
            esc(&title)
        );
        let cost = match site.cost {
            Some(0) => "here".to_string(),
            Some(c) => format!("cost {c} via {}", site.next_hop.clone().unwrap_or_default()),
            None => "no route".to_string(),
        };
        let _ = writeln!(
            out,
            r##"<text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle" fill="#555">{}</text>"##,
            y + 14.0,
            esc(&cost)
        );
        for (i, key) in served.iter().enumerate() {
            let _ = writeln!(
                out,
                r##"<text x="{x:.1}" y="{:.1}" font-size="12" text-anchor="middle" fill="#7a3e9d">serves {}</text>"##,
                y + 30.0 + 16.0 * i as f64,
                esc(key)
            );
        }
    }
    let ly = height - 30.0;
    let _ = write!(
        out,
        r##"<line x1="20" y1="{ly}" x2="60" y2="{ly}" stroke="#2e9d4f" stroke-width="3"/><text x="66" y="{:.1}" font-size="12">link up</text>
<line x1="140" y1="{ly}" x2="180" y2="{ly}" stroke="#c0392b" stroke-width="3" stroke-dasharray="8 6"/><text x="186" y="{:.1}" font-size="12">link down</text>
<text x="280" y="{:.1}" font-size="12" fill="#7a3e9d">serves KEY: a connector for routing key KEY</text>
</svg>
"##,
        ly + 4.0,
        ly + 4.0,
        ly + 4.0
    );
    out
}

/// The network as a Graphviz DOT graph.
pub fn dot(view: &NetworkView) -> String {
    let keys = keys_by_site(view);
    let mut out = String::from("graph skiff {\n  node [shape=box, style=rounded];\n");
    for site in &view.sites {
        let mut label = site.name.clone();
        if site.local {
            label.push_str("\\n(this site)");
        }
        for key in keys.get(&site.name).into_iter().flatten() {
            let _ = write!(label, "\\nserves {key}");
        }
        let style = if site.reachable {
            "rounded"
        } else {
            "rounded,dashed"
        };
        let _ = writeln!(
            out,
            "  \"{}\" [label=\"{}\", style=\"{style}\"];",
            dot_esc(&site.name),
            dot_esc_label(&label)
        );
    }
    for link in &view.links {
        let mut label = format!("cost {}", link.cost);
        if let Some(rtt) = link.rtt_ms {
            let _ = write!(label, ", {rtt:.2} ms");
        }
        let (color, style) = if link.state == "up" {
            ("darkgreen", "solid")
        } else {
            ("red", "dashed")
        };
        let _ = writeln!(
            out,
            "  \"{}\" -- \"{}\" [label=\"{}\", color={color}, style={style}];",
            dot_esc(&link.from),
            dot_esc(&link.to),
            dot_esc(&label)
        );
    }
    out.push_str("}\n");
    out
}

fn keys_by_site(view: &NetworkView) -> BTreeMap<String, Vec<String>> {
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for service in &view.services {
        for site in &service.sites {
            keys.entry(site.name.clone())
                .or_default()
                .push(service.routing_key.clone());
        }
    }
    keys
}

fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

fn dot_esc(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Like [`dot_esc`] but keeps the `\n` line breaks the label builder put in.
fn dot_esc_label(text: &str) -> String {
    text.replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{NetworkLink, NetworkService, NetworkSite, ServingSite};
    use uuid::Uuid;

    fn view() -> NetworkView {
        let site = |name: &str, local, reachable, cost| NetworkSite {
            name: name.into(),
            id: Uuid::new_v4(),
            local,
            reachable,
            cost,
            next_hop: None,
        };
        NetworkView {
            site: "dev".into(),
            sites: vec![
                site("dev", true, true, Some(0)),
                site("stg", false, true, Some(1)),
                site("p<r>o&d", false, false, None),
            ],
            links: vec![
                NetworkLink {
                    from: "dev".into(),
                    to: "stg".into(),
                    cost: 1,
                    state: "up".into(),
                    rtt_ms: Some(0.5),
                },
                NetworkLink {
                    from: "stg".into(),
                    to: "p<r>o&d".into(),
                    cost: 2,
                    state: "down".into(),
                    rtt_ms: None,
                },
            ],
            services: vec![NetworkService {
                routing_key: "backend".into(),
                sites: vec![ServingSite {
                    name: "stg".into(),
                    cost: 1,
                    weight: 1,
                }],
            }],
        }
    }

    #[test]
    fn svg_names_every_site_and_key_and_escapes_text() {
        let svg = svg(&view());
        assert!(svg.starts_with("<?xml"));
        assert!(svg.contains(">dev (this site)<"));
        assert!(svg.contains("serves backend"));
        assert!(svg.contains("p&lt;r&gt;o&amp;d"));
        assert!(!svg.contains("p<r>o&d"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn dot_lists_sites_and_links() {
        let dot = dot(&view());
        assert!(dot.starts_with("graph skiff {"));
        assert!(dot.contains("\"dev\" -- \"stg\""));
        assert!(dot.contains("serves backend"));
        assert!(dot.contains("style=dashed"));
    }
}
