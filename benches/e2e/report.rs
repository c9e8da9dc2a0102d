//! The e2e bench's report: the routes' labels, what each measurement yields, the Markdown table
//! with its ratios, and the targets of docs/performance.md judged from the figures.
//!
//! Nothing here runs a route; `tests/bench_report.rs` checks the table and the targets with
//! figures made up for the purpose, as the bench itself only runs under `cargo bench`.

use std::collections::BTreeMap;

use serde::Serialize;

/// The route without a tunnel: the client talks to the backend itself.
pub const DIRECT: &str = "direct";
/// A stunnel client/server pair with mutual TLS 1.3.
pub const STUNNEL: &str = "stunnel mTLS";
/// A haproxy pair with mutual TLS 1.3 between them.
pub const HAPROXY_TLS: &str = "haproxy mTLS";
/// A haproxy pair without TLS: two user-space hops, no crypto.
pub const HAPROXY_PLAIN: &str = "haproxy plain";
/// Two skiff sites linked over TLS (HTTP/2).
pub const SKIFF_TLS: &str = "skiff TLS";
/// Two skiff sites linked over QUIC.
pub const SKIFF_QUIC: &str = "skiff QUIC";
/// Three skiff sites, dev → stg → prod, linked over TLS.
pub const SKIFF_TLS_2HOP: &str = "skiff TLS 2-hop";
/// Three skiff sites, dev → stg → prod, linked over QUIC.
pub const SKIFF_QUIC_2HOP: &str = "skiff QUIC 2-hop";
/// The haproxy mTLS pair with a relay between them: what a second TLS hop costs a peer.
pub const HAPROXY_TLS_2HOP: &str = "haproxy mTLS 2-hop";
/// The TLS route with both sites busy-polling on one thread.
pub const SKIFF_TLS_BUSY: &str = "skiff TLS busy-poll";
/// The QUIC route with both sites busy-polling on one thread.
pub const SKIFF_QUIC_BUSY: &str = "skiff QUIC busy-poll";
/// The TLS route with both sites on one thread, without further shards.
pub const SKIFF_TLS_ONE: &str = "skiff TLS one thread";
/// The peers skiff is compared with, in table order.
pub const PEERS: [&str; 3] = [STUNNEL, HAPROXY_TLS, HAPROXY_PLAIN];
/// The one-hop routes in table order: `direct` first, then the peers, then skiff.
pub const COLUMNS: [&str; 6] = [
    DIRECT,
    STUNNEL,
    HAPROXY_TLS,
    HAPROXY_PLAIN,
    SKIFF_TLS,
    SKIFF_QUIC,
];

/// A connection-rate run: connect, 64-byte request and response, close, for a fixed time.
#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    /// Completed exchanges per second.
    pub per_second: f64,
    /// Exchanges completed.
    pub completed: u64,
    /// Exchanges that failed or timed out.
    pub failed: u64,
    pub first_error: Option<String>,
    /// CPU time of the tunnel processes per completed connection.
    pub tunnel_cpu_us_per_connection: Option<f64>,
    /// Share of the machine's CPU time that was idle during the run (0 to 1): what a route
    /// whose processes wait on each other leaves unused.
    pub machine_idle: f64,
}

/// Round trips of 64-byte messages on one connection, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Round trips timed (after the warm-up).
    pub samples: usize,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Slowest.
    pub max_us: f64,
}

/// A bulk transfer (iperf3) with some parallel streams.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Parallel streams.
    pub streams: usize,
    /// What the receiver got, in Gbit/s.
    pub gbit_per_s: f64,
    /// Bytes the receiver got.
    pub bytes: u64,
    /// TCP retransmissions at the sender, when iperf3 reports them.
    pub retransmits: Option<u64>,
    /// CPU time of the tunnel processes per GB (10^9 bytes) moved.
    pub tunnel_cpu_ms_per_gb: Option<f64>,
    /// Cores the tunnel processes kept busy on average.
    pub tunnel_cores: Option<f64>,
}

/// The tunnel processes' resident memory before, while and after holding idle carried
/// connections, in KiB.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    /// Idle connections held open.
    pub connections: usize,
    /// Connections that could not be opened.
    pub failed: usize,
    /// Why the first of those failed.
    pub first_error: Option<String>,
    /// The client (listener) side's process before the connections were opened.
    pub client_side_before_kib: u64,
    /// The client side while it held them.
    pub client_side_after_kib: u64,
    /// The client side once they were closed.
    pub client_side_after_close_kib: u64,
    /// The server (connector) side's process before the connections were opened.
    pub server_side_before_kib: u64,
    /// The server side while it held them.
    pub server_side_after_kib: u64,
    /// The server side once they were closed.
    pub server_side_after_close_kib: u64,
    /// What each held connection added to the client side.
    pub client_side_kib_per_connection: f64,
    /// What each held connection added to the server side.
    pub server_side_kib_per_connection: f64,
}

/// Everything measured of one route; a measurement that failed is `None`, and its error is in
/// `errors`.
#[derive(Debug, Default, Serialize)]
pub struct Measured {
    /// The route's label (`skiff TLS`, ...).
    pub label: String,
    /// How the route was set up.
    pub note: String,
    /// Bulk throughput with one stream.
    pub throughput_1: Option<Throughput>,
    /// Bulk throughput with eight streams.
    pub throughput_8: Option<Throughput>,
    /// Connection rate with 8 concurrent clients.
    pub rate_8: Option<Rate>,
    /// Connection rate with 64 concurrent clients.
    pub rate_64: Option<Rate>,
    /// Round trips on one connection.
    pub latency: Option<Latency>,
    /// Idle carried connections held (the one-hop routes only).
    pub memory: Option<Memory>,
    /// UDP datagrams the kernel dropped for full receive buffers while the route was measured
    /// (system-wide counter; only QUIC links use UDP here).
    pub udp_receive_buffer_drops: u64,
    /// CPU that processes other than this bench and its children used during each timed
    /// measurement (the attempt kept), in cores on average: how disturbed the figures are.
    pub other_processes_cores: BTreeMap<String, f64>,
    /// What failed, one line per measurement.
    pub errors: Vec<String>,
}

/// One row of the table: a value per column, and for rows skiff has but the peers do not (two
/// hops), the reference values for the ratios.
pub struct Row {
    /// The metric, with ↑ or ↓ for which way is better.
    pub label: String,
    /// One value per route of [`COLUMNS`].
    pub values: [Option<f64>; 6],
    /// Direct and the three peers, for the ratios; `values[0..4]` unless set.
    pub reference: Option<[Option<f64>; 4]>,
    /// Whether the best peer is the one with the highest value.
    pub higher_is_better: bool,
    /// Decimals the table shows.
    pub decimals: usize,
}

impl Row {
    /// The row of one metric, read from each column's route.
    pub fn from(
        results: &[Measured],
        label: &str,
        higher_is_better: bool,
        decimals: usize,
        get: impl Fn(&Measured) -> Option<f64>,
    ) -> Row {
        let values = COLUMNS.map(|c| results.iter().find(|m| m.label == c).and_then(&get));
        Row {
            label: label.to_string(),
            values,
            reference: None,
            higher_is_better,
            decimals,
        }
    }

    /// The values the ratios divide by: direct's and the three peers'.
    pub fn reference(&self) -> [Option<f64>; 4] {
        self.reference.unwrap_or([
            self.values[0],
            self.values[1],
            self.values[2],
            self.values[3],
        ])
    }

    /// The best of the peers' values and whose it is.
    pub fn best_peer(&self) -> Option<(f64, &'static str)> {
        let reference = self.reference();
        let peers = PEERS
            .iter()
            .zip(&reference[1..])
            .filter_map(|(name, v)| v.map(|v| (v, *name)));
        if self.higher_is_better {
            peers.max_by(|a, b| a.0.total_cmp(&b.0))
        } else {
            peers.min_by(|a, b| a.0.total_cmp(&b.0))
        }
    }

    /// Skiff's value (column 4 or 5) divided by direct's and by the best peer's.
    pub fn ratios(&self, column: usize) -> (Option<f64>, Option<f64>) {
        let ratio = |value: Option<f64>, base: Option<f64>| match (value, base) {
            (Some(v), Some(b)) if b > 0.0 => Some(v / b),
            _ => None,
        };
        (
            ratio(self.values[column], self.reference()[0]),
            ratio(self.values[column], self.best_peer().map(|b| b.0)),
        )
    }
}

/// A value as the table shows it, `–` when not measured.
pub fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "–".to_string(), |v| format!("{v:.decimals$}"))
}

/// A ratio as the table shows it (`1.25×`), `–` when not measured.
pub fn ratio_cell(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_string(), |v| format!("{v:.2}×"))
}

/// A metric of the table: its label, whether higher is better, its decimals, how to read it.
pub type Metric = (&'static str, bool, usize, fn(&Measured) -> Option<f64>);

/// The table's rows: each metric over the one-hop routes, then the two-hop rows and their
/// ratios to one hop, the busy-polling rows and the one-thread rows.
pub fn build_rows(results: &[Measured]) -> Vec<Row> {
    let find = |label: &str| results.iter().find(|m| m.label == label);
    let metrics: [Metric; 15] = [
        ("throughput, 1 stream (Gbit/s) ↑", true, 2, |m| {
            m.throughput_1.as_ref().map(|t| t.gbit_per_s)
        }),
        ("throughput, 8 streams (Gbit/s) ↑", true, 2, |m| {
            m.throughput_8.as_ref().map(|t| t.gbit_per_s)
        }),
        ("tunnel CPU, 1 stream (ms per GB) ↓", false, 0, |m| {
            m.throughput_1.as_ref().and_then(|t| t.tunnel_cpu_ms_per_gb)
        }),
        ("tunnel CPU, 8 streams (ms per GB) ↓", false, 0, |m| {
            m.throughput_8.as_ref().and_then(|t| t.tunnel_cpu_ms_per_gb)
        }),
        ("connections per second, 8 clients ↑", true, 0, |m| {
            m.rate_8.as_ref().map(|r| r.per_second)
        }),
        (
            "tunnel CPU per connection, 8 clients (µs) ↓",
            false,
            0,
            |m| {
                m.rate_8
                    .as_ref()
                    .and_then(|r| r.tunnel_cpu_us_per_connection)
            },
        ),
        ("connections per second, 64 clients ↑", true, 0, |m| {
            m.rate_64.as_ref().map(|r| r.per_second)
        }),
        (
            "tunnel CPU per connection, 64 clients (µs) ↓",
            false,
            0,
            |m| {
                m.rate_64
                    .as_ref()
                    .and_then(|r| r.tunnel_cpu_us_per_connection)
            },
        ),
        ("RTT p50 (µs) ↓", false, 1, |m| {
            m.latency.as_ref().map(|l| l.p50_us)
        }),
        ("RTT p99 (µs) ↓", false, 1, |m| {
            m.latency.as_ref().map(|l| l.p99_us)
        }),
        ("RTT p99.9 (µs) ↓", false, 1, |m| {
            m.latency.as_ref().map(|l| l.p999_us)
        }),
        ("RSS, listener side, 10k idle (MiB) ↓", false, 1, |m| {
            m.memory
                .as_ref()
                .map(|x| x.client_side_after_kib as f64 / 1024.0)
        }),
        ("RSS, connector side, 10k idle (MiB) ↓", false, 1, |m| {
            m.memory
                .as_ref()
                .map(|x| x.server_side_after_kib as f64 / 1024.0)
        }),
        (
            "KiB per idle connection, listener side ↓",
            false,
            1,
            |m| m.memory.as_ref().map(|x| x.client_side_kib_per_connection),
        ),
        (
            "KiB per idle connection, connector side ↓",
            false,
            1,
            |m| m.memory.as_ref().map(|x| x.server_side_kib_per_connection),
        ),
    ];
    let mut rows: Vec<Row> = metrics
        .iter()
        .map(|&(label, higher, decimals, get)| Row::from(results, label, higher, decimals, get))
        .collect();
    // Variants of the skiff routes (two hops, busy-polling): metric `i` of the routes `tls` and
    // `quic` in the skiff columns, and of `haproxy` (if any) in haproxy mTLS's column; ratios
    // against the one-hop row's direct and peers.
    let variant = |[haproxy, tls, quic]: [Option<&str>; 3], prefix: &str, i: usize| {
        let (label, higher_is_better, decimals, get) = metrics[i];
        let value = |route: Option<&str>| route.and_then(find).and_then(get);
        Row {
            label: format!("{prefix}{label}"),
            values: [None, None, value(haproxy), None, value(tls), value(quic)],
            reference: Some(rows[i].reference()),
            higher_is_better,
            decimals,
        }
    };
    // Throughput with 1 and 8 streams, connections per second (8 and 64 clients), RTT p50.
    let two_hop = [0, 1, 4, 6, 8].map(|i| {
        let routes = [HAPROXY_TLS_2HOP, SKIFF_TLS_2HOP, SKIFF_QUIC_2HOP].map(Some);
        variant(routes, "2-hop ", i)
    });
    // Throughput with 1 stream, connections per second and their CPU (8 and 64 clients), RTT
    // p50 and p99.
    let busy = [0, 4, 5, 6, 7, 8, 9].map(|i| {
        let routes = [None, Some(SKIFF_TLS_BUSY), Some(SKIFF_QUIC_BUSY)];
        variant(routes, "busy-poll: ", i)
    });
    // Throughput with 1 and 8 streams and its CPU, connections per second and their CPU (8
    // and 64 clients), RTT p50 and p99.
    let one_thread = [0, 1, 2, 4, 5, 6, 7, 8, 9].map(|i| {
        let routes = [None, Some(SKIFF_TLS_ONE), None];
        variant(routes, "one thread: ", i)
    });
    // 2-hop ÷ 1-hop, in the skiff columns and haproxy mTLS's.
    let hop_ratio = |label: &str, two: &Row, one: &Row| Row {
        label: label.to_string(),
        values: [
            None,
            None,
            two.values[2].zip(one.values[2]).map(|(a, b)| a / b),
            None,
            two.values[4].zip(one.values[4]).map(|(a, b)| a / b),
            two.values[5].zip(one.values[5]).map(|(a, b)| a / b),
        ],
        reference: Some([None; 4]),
        higher_is_better: true,
        decimals: 2,
    };
    let ratio_1 = hop_ratio("2-hop ÷ 1-hop, 1 stream ↑", &two_hop[0], &rows[0]);
    let ratio_8 = hop_ratio("2-hop ÷ 1-hop, 8 streams ↑", &two_hop[1], &rows[1]);
    rows.extend(two_hop);
    rows.push(ratio_1);
    rows.push(ratio_8);
    rows.extend(busy);
    rows.extend(one_thread);
    rows
}

/// The rows as a Markdown table with the ratios to direct and to the best peer.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let header = [
        "metric",
        DIRECT,
        STUNNEL,
        HAPROXY_TLS,
        HAPROXY_PLAIN,
        SKIFF_TLS,
        SKIFF_QUIC,
        "TLS ÷ direct",
        "TLS ÷ best peer",
        "QUIC ÷ direct",
        "QUIC ÷ best peer",
        "best peer",
    ];
    out += &format!("| {} |\n", header.join(" | "));
    out += &format!("|{}\n", "---|".repeat(header.len()));
    for row in rows {
        let mut cells = vec![row.label.clone()];
        cells.extend(row.values.iter().map(|v| cell(*v, row.decimals)));
        let (tls_direct, tls_peer) = row.ratios(4);
        let (quic_direct, quic_peer) = row.ratios(5);
        cells.extend([tls_direct, tls_peer, quic_direct, quic_peer].map(ratio_cell));
        cells.push(
            row.best_peer()
                .map(|(v, name)| format!("{name} ({v:.prec$})", prec = row.decimals))
                .unwrap_or_else(|| "–".into()),
        );
        out += &format!("| {} |\n", cells.join(" | "));
    }
    out
}

/// One of the speed targets, judged for one transport.
#[derive(Debug, Serialize)]
pub struct Target {
    /// What is compared (`single-stream throughput ÷ haproxy mTLS`, ...).
    pub target: String,
    /// `TLS` or `QUIC`.
    pub transport: String,
    /// The ratio (or size) measured; `None` when a figure it needs is missing.
    pub value: Option<f64>,
    /// The goal as text (`≥ 1.5`).
    pub goal: String,
    /// Whether the value meets the goal; `None` when not measured.
    pub met: Option<bool>,
    /// The value as the report prints it: two decimals, or as many more (up to four) as it
    /// takes for the printed value to meet the goal exactly when the value does (0.696 against
    /// ≥ 0.7 shows as 0.696, not as a missed 0.70); `–` when not measured.
    pub shown: String,
}

/// A target's goal: at least or at most this ratio (or size).
#[derive(Clone, Copy)]
pub enum Goal {
    /// The value must be this or more.
    AtLeast(f64),
    /// The value must be this or less.
    AtMost(f64),
}

impl Goal {
    /// The goal as the report prints it.
    pub fn text(self) -> String {
        match self {
            Goal::AtLeast(g) => format!("≥ {g:?}"),
            Goal::AtMost(g) => format!("≤ {g:?}"),
        }
    }

    /// Whether `value` meets the goal.
    pub fn met(self, value: f64) -> bool {
        match self {
            Goal::AtLeast(g) => value >= g,
            Goal::AtMost(g) => value <= g,
        }
    }

    /// `value` with the fewest decimals, from two to four, whose printed figure is judged as
    /// the value is ([`Target::shown`]).
    pub fn show(self, value: f64) -> String {
        let judged = self.met(value);
        (2..4)
            .map(|decimals| format!("{value:.decimals$}"))
            .find(|text| {
                text.parse()
                    .is_ok_and(|printed| self.met(printed) == judged)
            })
            .unwrap_or_else(|| format!("{value:.4}"))
    }
}

/// The targets of the issue (docs/performance.md, *Against the targets*), judged from one run's
/// figures, for TLS and for QUIC.
pub fn targets(results: &[Measured]) -> Vec<Target> {
    let find = |label: &str| results.iter().find(|m| m.label == label);
    let t1 = |m: &Measured| m.throughput_1.as_ref().map(|t| t.gbit_per_s);
    let t8 = |m: &Measured| m.throughput_8.as_ref().map(|t| t.gbit_per_s);
    let rate_8 = |m: &Measured| m.rate_8.as_ref().map(|r| r.per_second);
    let rate_64 = |m: &Measured| m.rate_64.as_ref().map(|r| r.per_second);
    let p50 = |m: &Measured| m.latency.as_ref().map(|l| l.p50_us);
    let get = |label: &str, f: &dyn Fn(&Measured) -> Option<f64>| find(label).and_then(f);
    let div =
        |a: Option<f64>, b: Option<f64>| a.zip(b).filter(|(_, b)| *b > 0.0).map(|(a, b)| a / b);
    let mut out = Vec::new();
    for (transport, one, two, busy) in [
        ("TLS", SKIFF_TLS, SKIFF_TLS_2HOP, SKIFF_TLS_BUSY),
        ("QUIC", SKIFF_QUIC, SKIFF_QUIC_2HOP, SKIFF_QUIC_BUSY),
    ] {
        let mut add = |target: String, value: Option<f64>, goal: Goal| {
            out.push(Target {
                target,
                transport: transport.to_string(),
                value,
                goal: goal.text(),
                met: value.map(|v| goal.met(v)),
                shown: value.map_or_else(|| "–".to_string(), |v| goal.show(v)),
            })
        };
        add(
            "single-stream throughput ÷ haproxy mTLS".into(),
            div(get(one, &t1), get(HAPROXY_TLS, &t1)),
            Goal::AtLeast(1.5),
        );
        // The rate and latency targets, also for a site that trades CPU time for latency.
        for (prefix, route) in [("", one), ("busy-poll: ", busy)] {
            for (clients, rate) in [
                (8, &rate_8 as &dyn Fn(&Measured) -> Option<f64>),
                (64, &rate_64),
            ] {
                add(
                    format!("{prefix}connection rate, {clients} clients ÷ haproxy plain"),
                    div(get(route, rate), get(HAPROXY_PLAIN, rate)),
                    Goal::AtLeast(1.0),
                );
            }
            add(
                format!("{prefix}p50 RTT ÷ haproxy plain"),
                div(get(route, &p50), get(HAPROXY_PLAIN, &p50)),
                Goal::AtMost(1.0),
            );
        }
        let mem = find(one).and_then(|m| m.memory.as_ref());
        for (side, kib) in [
            ("listener", mem.map(|m| m.client_side_kib_per_connection)),
            ("connector", mem.map(|m| m.server_side_kib_per_connection)),
        ] {
            add(
                format!("KiB per idle connection, {side} side"),
                kib,
                Goal::AtMost(16.0),
            );
        }
        for (streams, t) in [(1, &t1 as &dyn Fn(&Measured) -> Option<f64>), (8, &t8)] {
            let noun = if streams == 1 { "stream" } else { "streams" };
            add(
                format!("2-hop ÷ 1-hop, {streams} {noun}"),
                div(get(two, t), get(one, t)),
                Goal::AtLeast(0.7),
            );
        }
    }
    out
}
