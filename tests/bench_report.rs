//! The e2e bench's report (`benches/e2e/report.rs`): its table, ratios, targets and JSON, from
//! figures made up for the purpose. The bench itself runs only under `cargo bench`; these tests
//! keep what it prints and writes to `bench-results.json` honest without running a route.

#[path = "../benches/e2e/report.rs"]
mod report;

use report::*;
use serde_json::Value;

/// A route with one figure of each kind; the rest as a route whose runs all succeeded.
fn route(label: &str, gbit_1: f64, gbit_8: f64, rate: f64, p50: f64) -> Measured {
    let throughput = |streams, gbit_per_s: f64| Throughput {
        streams,
        gbit_per_s,
        bytes: (gbit_per_s * 1e9 / 8.0 * 5.0) as u64,
        retransmits: Some(0),
        tunnel_cpu_ms_per_gb: Some(500.0),
        tunnel_cores: Some(0.8),
    };
    let rate_of = |per_second: f64| Rate {
        per_second,
        completed: (per_second * 10.0) as u64,
        failed: 0,
        first_error: None,
        tunnel_cpu_us_per_connection: Some(100.0),
        machine_idle: 0.05,
    };
    Measured {
        label: label.to_string(),
        note: format!("{label} as set up for the test"),
        throughput_1: Some(throughput(1, gbit_1)),
        throughput_8: Some(throughput(8, gbit_8)),
        rate_8: Some(rate_of(rate)),
        rate_64: Some(rate_of(rate * 1.1)),
        latency: Some(Latency {
            samples: 20_000,
            mean_us: p50 * 1.1,
            p50_us: p50,
            p99_us: p50 * 2.0,
            p999_us: p50 * 4.0,
            max_us: p50 * 10.0,
        }),
        ..Default::default()
    }
}

/// The idle-connection figures of a route: `per_connection` KiB on each side for 10,000.
fn with_memory(mut m: Measured, listener: f64, connector: f64) -> Measured {
    let held = 10_000;
    let before = 8_192;
    let after = |per: f64| before + (per * held as f64) as u64;
    m.memory = Some(Memory {
        connections: held,
        failed: 0,
        first_error: None,
        client_side_before_kib: before,
        client_side_after_kib: after(listener),
        client_side_after_close_kib: before + 100,
        server_side_before_kib: before,
        server_side_after_kib: after(connector),
        server_side_after_close_kib: before + 100,
        client_side_kib_per_connection: listener,
        server_side_kib_per_connection: connector,
    });
    m
}

/// A full run with the figures the issue quotes for the peers, and skiff's made up.
fn full_run() -> Vec<Measured> {
    vec![
        route(DIRECT, 36.0, 60.0, 25_000.0, 40.0),
        route(STUNNEL, 6.2, 7.0, 1_300.0, 100.0),
        route(HAPROXY_TLS, 7.0, 8.0, 1_550.0, 95.0),
        route(HAPROXY_PLAIN, 12.8, 14.0, 10_400.0, 91.0),
        with_memory(route(SKIFF_TLS, 10.0, 12.0, 11_440.0, 88.0), 4.1, 9.2),
        with_memory(route(SKIFF_QUIC, 3.5, 4.0, 9_000.0, 130.0), 4.2, 17.5),
        route(SKIFF_TLS_2HOP, 6.0, 9.0, 9_000.0, 150.0),
        route(SKIFF_QUIC_2HOP, 2.8, 3.0, 7_000.0, 200.0),
        route(HAPROXY_TLS_2HOP, 4.2, 5.6, 1_200.0, 180.0),
    ]
}

fn row<'a>(rows: &'a [Row], label: &str) -> &'a Row {
    rows.iter()
        .find(|r| r.label == label)
        .unwrap_or_else(|| panic!("no row {label:?} in {:?}", labels(rows)))
}

fn labels(rows: &[Row]) -> Vec<&str> {
    rows.iter().map(|r| r.label.as_str()).collect()
}

fn close(a: Option<f64>, b: f64) -> bool {
    a.is_some_and(|a| (a - b).abs() < 1e-9)
}

#[test]
fn ratios_divide_by_direct_and_by_the_best_peer_of_each_row() {
    let rows = build_rows(&full_run());
    let throughput = row(&rows, "throughput, 1 stream (Gbit/s) ↑");
    assert_eq!(
        throughput.values,
        [
            Some(36.0),
            Some(6.2),
            Some(7.0),
            Some(12.8),
            Some(10.0),
            Some(3.5)
        ]
    );
    // Higher is better: the best peer is the fastest, haproxy without TLS.
    assert_eq!(throughput.best_peer(), Some((12.8, HAPROXY_PLAIN)));
    let (tls_direct, tls_peer) = throughput.ratios(4);
    assert!(close(tls_direct, 10.0 / 36.0));
    assert!(close(tls_peer, 10.0 / 12.8));
    let (quic_direct, quic_peer) = throughput.ratios(5);
    assert!(close(quic_direct, 3.5 / 36.0));
    assert!(close(quic_peer, 3.5 / 12.8));

    // Lower is better: the best peer has the lowest p50.
    let p50 = row(&rows, "RTT p50 (µs) ↓");
    assert_eq!(p50.best_peer(), Some((91.0, HAPROXY_PLAIN)));
    assert!(close(p50.ratios(4).1, 88.0 / 91.0));
    let cpu = row(&rows, "tunnel CPU, 1 stream (ms per GB) ↓");
    assert!(!cpu.higher_is_better);
}

#[test]
fn a_missing_route_leaves_its_cells_and_ratios_empty() {
    let mut results = full_run();
    results.retain(|m| m.label != STUNNEL && m.label != SKIFF_QUIC);
    let rows = build_rows(&results);
    let throughput = row(&rows, "throughput, 1 stream (Gbit/s) ↑");
    assert_eq!(throughput.values[1], None);
    assert_eq!(throughput.ratios(5), (None, None));
    // The best peer is chosen among those measured.
    assert_eq!(throughput.best_peer(), Some((12.8, HAPROXY_PLAIN)));

    // A failed measurement is a missing figure too, not a zero.
    let mut results = full_run();
    results
        .iter_mut()
        .find(|m| m.label == DIRECT)
        .unwrap()
        .throughput_1 = None;
    let rows = build_rows(&results);
    let throughput = row(&rows, "throughput, 1 stream (Gbit/s) ↑");
    assert_eq!(throughput.ratios(4).0, None);
    assert!(throughput.ratios(4).1.is_some());
}

#[test]
fn two_hop_rows_sit_under_their_own_columns_and_divide_by_one_hop() {
    let rows = build_rows(&full_run());
    let two_hop = row(&rows, "2-hop throughput, 1 stream (Gbit/s) ↑");
    // haproxy's relay chain in haproxy mTLS's column, skiff's in the skiff columns.
    assert_eq!(
        two_hop.values,
        [None, None, Some(4.2), None, Some(6.0), Some(2.8)]
    );
    // Its ratios are to the one-hop row's direct and best peer.
    assert!(close(two_hop.ratios(4).0, 6.0 / 36.0));
    assert!(close(two_hop.ratios(4).1, 6.0 / 12.8));

    let one_stream = row(&rows, "2-hop ÷ 1-hop, 1 stream ↑");
    assert!(close(one_stream.values[2], 4.2 / 7.0));
    assert!(close(one_stream.values[4], 6.0 / 10.0));
    assert!(close(one_stream.values[5], 2.8 / 3.5));
    let eight = row(&rows, "2-hop ÷ 1-hop, 8 streams ↑");
    assert!(close(eight.values[4], 9.0 / 12.0));
    // A ratio of ratios has nothing to divide by.
    assert_eq!(one_stream.ratios(4), (None, None));

    // Routes not run leave their rows empty, not absent: the table keeps its shape.
    let busy = row(&rows, "busy-poll: RTT p50 (µs) ↓");
    assert_eq!(busy.values, [None; 6]);
    assert_eq!(rows.len(), build_rows(&[]).len());
}

#[test]
fn the_table_is_markdown_with_a_line_per_row() {
    let rows = build_rows(&full_run());
    let text = table(&rows);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), rows.len() + 2, "{text}");
    let columns = |line: &str| line.matches('|').count();
    assert!(
        lines.iter().all(|l| columns(l) == columns(lines[0])),
        "{text}"
    );
    assert!(lines[0].contains("skiff TLS") && lines[0].contains("TLS ÷ best peer"));

    let throughput = lines
        .iter()
        .find(|l| l.starts_with("| throughput, 1 stream"))
        .unwrap();
    let cells: Vec<&str> = throughput.split('|').map(str::trim).collect();
    // | metric | direct | stunnel | haproxy mTLS | haproxy plain | skiff TLS | skiff QUIC | ...
    assert_eq!(
        &cells[2..8],
        ["36.00", "6.20", "7.00", "12.80", "10.00", "3.50"]
    );
    assert_eq!(cells[8], "0.28×");
    assert_eq!(cells[9], "0.78×");
    assert_eq!(cells[12], "haproxy plain (12.80)");

    let busy = lines
        .iter()
        .find(|l| l.starts_with("| busy-poll: RTT p50"))
        .unwrap();
    assert!(busy.contains("| – |"), "{busy}");
}

#[test]
fn targets_are_judged_each_way_and_left_open_when_not_measured() {
    let results = full_run();
    let targets = targets(&results);
    let find = |target: &str, transport: &str| {
        targets
            .iter()
            .find(|t| t.target == target && t.transport == transport)
            .unwrap_or_else(|| panic!("no target {target:?} for {transport}"))
    };

    let single = find("single-stream throughput ÷ haproxy mTLS", "TLS");
    assert!(close(single.value, 10.0 / 7.0));
    assert_eq!(single.goal, "≥ 1.5");
    assert_eq!(single.met, Some(false));

    let rate = find("connection rate, 8 clients ÷ haproxy plain", "TLS");
    assert!(close(rate.value, 1.1));
    assert_eq!(rate.met, Some(true));
    assert_eq!(
        find("connection rate, 8 clients ÷ haproxy plain", "QUIC").met,
        Some(false)
    );

    let p50 = find("p50 RTT ÷ haproxy plain", "TLS");
    assert_eq!(p50.goal, "≤ 1.0");
    assert_eq!(p50.met, Some(true));
    assert_eq!(find("p50 RTT ÷ haproxy plain", "QUIC").met, Some(false));

    assert_eq!(
        find("KiB per idle connection, listener side", "TLS").met,
        Some(true)
    );
    let quic_memory = find("KiB per idle connection, connector side", "QUIC");
    assert!(close(quic_memory.value, 17.5));
    assert_eq!(quic_memory.met, Some(false));

    let hops = find("2-hop ÷ 1-hop, 1 stream", "TLS");
    assert!(close(hops.value, 0.6));
    assert_eq!(hops.met, Some(false));
    assert_eq!(find("2-hop ÷ 1-hop, 8 streams", "TLS").met, Some(true));

    // The busy-poll routes were not run: their targets are reported, unmeasured.
    let busy = find("busy-poll: p50 RTT ÷ haproxy plain", "TLS");
    assert_eq!((busy.value, busy.met), (None, None));

    // A goal met exactly counts as met.
    assert!(Goal::AtLeast(0.7).met(0.7) && Goal::AtMost(1.0).met(1.0));

    // What is printed agrees with the verdict: more decimals where two would round across
    // the goal, two otherwise, and a dash for what was not measured.
    assert_eq!(single.shown, "1.43");
    assert_eq!(busy.shown, "–");
    assert_eq!(Goal::AtLeast(0.7).show(0.6961), "0.696");
    assert_eq!(Goal::AtLeast(0.7).show(0.69996), "0.7000");
    assert_eq!(Goal::AtMost(1.0).show(1.004), "1.004");
    assert_eq!(Goal::AtMost(1.0).show(0.996), "1.00");
    assert_eq!(Goal::AtLeast(1.5).show(1.2799), "1.28");
}

#[test]
fn the_json_report_keeps_every_figure_by_name() {
    let results = full_run();
    let routes: Value = serde_json::to_value(&results).unwrap();
    let skiff = routes
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["label"] == SKIFF_TLS)
        .unwrap();
    assert_eq!(skiff["throughput_1"]["gbit_per_s"], 10.0);
    assert_eq!(skiff["throughput_8"]["streams"], 8);
    assert_eq!(skiff["rate_8"]["per_second"], 11_440.0);
    assert_eq!(skiff["latency"]["p50_us"], 88.0);
    assert_eq!(skiff["memory"]["client_side_kib_per_connection"], 4.1);
    assert_eq!(skiff["errors"], Value::Array(vec![]));
    // What docs/performance.md (*How to reproduce*) says each route's record holds: the
    // percentiles, retransmits, RSS before, after and after closing, the machine's idle share
    // in each rate run, the UDP receive-buffer drops and the interference per measurement.
    for (path, value) in [
        ("/latency/p99_us", 176.0),
        ("/latency/p999_us", 352.0),
        ("/throughput_1/retransmits", 0.0),
        ("/memory/client_side_before_kib", 8_192.0),
        ("/memory/server_side_after_kib", 8_192.0 + 92_000.0),
        ("/memory/client_side_after_close_kib", 8_292.0),
        ("/rate_8/machine_idle", 0.05),
        ("/rate_64/machine_idle", 0.05),
        ("/udp_receive_buffer_drops", 0.0),
    ] {
        let got = skiff.pointer(path).and_then(Value::as_f64);
        assert_eq!(got, Some(value), "{path} in {skiff}");
    }
    assert!(skiff["other_processes_cores"].is_object(), "{skiff}");
    let stunnel = &routes[1];
    assert_eq!(stunnel["memory"], Value::Null);

    let targets: Value = serde_json::to_value(targets(&results)).unwrap();
    let first = &targets[0];
    assert_eq!(first["target"], "single-stream throughput ÷ haproxy mTLS");
    assert_eq!(first["transport"], "TLS");
    assert_eq!(first["goal"], "≥ 1.5");
    assert_eq!(first["met"], false);
}
