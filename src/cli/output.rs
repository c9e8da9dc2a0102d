//! Output formats and aligned tables.

use clap::ValueEnum;
use serde::Serialize;

/// How a command prints its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
    /// YAML for scripts and GitOps.
    Yaml,
}

/// Prints `value` as JSON or YAML; returns false for [`Format::Table`] (the caller prints it).
pub fn print_structured<T: Serialize>(format: Format, value: &T) -> anyhow::Result<bool> {
    match format {
        Format::Table => Ok(false),
        Format::Json => {
            println!("{}", serde_json::to_string_pretty(value)?);
            Ok(true)
        }
        Format::Yaml => {
            print!("{}", serde_yaml_ng::to_string(value)?);
            Ok(true)
        }
    }
}

/// Renders rows as columns separated by two spaces, the first row being the header.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The link table used by `link status`, `status` and the demo.
pub fn link_table(links: &[skiff_control::admin::LinkView]) -> String {
    let mut rows = vec![[
        "NAME",
        "DIRECTION",
        "PEER",
        "STATE",
        "TRANSPORT",
        "LANES",
        "RTT",
        "COST",
        "SINCE",
        "NOTE",
    ]
    .map(String::from)
    .to_vec()];
    for link in links {
        rows.push(vec![
            link.name.clone(),
            link.direction.clone(),
            link.peer_site.clone(),
            link.state.clone(),
            link.transport.clone().unwrap_or_else(|| "-".into()),
            link.lanes
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into()),
            link.rtt_ms
                .map(|ms| format!("{ms:.2}ms"))
                .unwrap_or_else(|| "-".into()),
            link.cost.to_string(),
            link.since.clone(),
            link.last_error.clone().unwrap_or_default(),
        ]);
    }
    if links.is_empty() {
        return "no links\n".into();
    }
    table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align() {
        let rows = vec![
            vec!["A".to_string(), "BB".to_string(), "C".to_string()],
            vec!["aaaa".to_string(), "b".to_string(), "c".to_string()],
        ];
        assert_eq!(table(&rows), "A     BB  C\naaaa  b   c\n");
    }
}
