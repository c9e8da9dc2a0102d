//! Micro-benchmarks of the sans-IO protocol core: an advertisement through the control codec,
//! path computation over a 100-site network, and one load-balancing choice per strategy.
//!
//! `cargo bench -p skiff-router --bench proto`

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use skiff_router::proto::balance::{order, Candidate, Strategy};
use skiff_router::proto::routing::{AdvertisedLink, AdvertisedService, Advertisement, Lsdb};
use skiff_router::proto::{ControlCodec, Message};
use uuid::Uuid;

fn site(i: usize) -> Uuid {
    Uuid::from_u128(0x5000 + i as u128)
}

/// Site `i` of a ring of `n` with chords: every site links to its two ring neighbours and to
/// the sites 7 and 31 steps away, so paths are several hops long and have alternatives.
fn advertisement(i: usize, n: usize, services: usize) -> Advertisement {
    let mut peers: Vec<usize> = [1, n - 1, 7, n - 7, 31, n - 31]
        .iter()
        .map(|step| (i + step) % n)
        .collect();
    peers.sort_unstable();
    peers.dedup();
    Advertisement {
        origin: site(i),
        name: format!("site-{i}"),
        seq: 1,
        links: peers
            .into_iter()
            .map(|p| AdvertisedLink {
                peer: site(p),
                cost: 1 + (i * 7 + p) as u32 % 5,
            })
            .collect(),
        services: (0..services)
            .map(|s| AdvertisedService {
                key: format!("service-{}", (i + s) % 40),
                weight: 1,
            })
            .collect(),
    }
}

fn codec(c: &mut Criterion) {
    let message = Message::Advertise(advertisement(0, 100, 50));
    let mut out = BytesMut::with_capacity(64 * 1024);
    message.encode(&mut out);
    let frame = out.split().freeze();
    c.bench_function("advertisement encode (6 links, 50 keys)", |b| {
        b.iter(|| {
            message.encode(&mut out);
            black_box(out.split());
        })
    });
    c.bench_function("advertisement decode (6 links, 50 keys)", |b| {
        let mut codec = ControlCodec::default();
        b.iter(|| {
            codec.extend(&frame);
            black_box(codec.decode().unwrap().unwrap());
        })
    });
}

fn paths(c: &mut Criterion) {
    let now = Instant::now();
    let n = 100;
    let mut lsdb = Lsdb::new(site(0));
    lsdb.originate(advertisement(0, n, 5), now);
    for i in 1..n {
        assert!(lsdb.receive(advertisement(i, n, 5), now));
    }
    let table = lsdb.compute();
    assert_eq!(table.routes.len(), n - 1, "every site is reachable");
    c.bench_function("path computation, 100 sites, 5 keys each", |b| {
        b.iter(|| black_box(lsdb.compute()))
    });
    c.bench_function("advertisement received + recomputed, 100 sites", |b| {
        let mut seq = 1;
        b.iter_batched(
            || {
                seq += 1;
                let mut adv = advertisement(42, n, 5);
                adv.seq = seq;
                adv
            },
            |adv| {
                lsdb.receive(adv, now);
                black_box(lsdb.compute())
            },
            BatchSize::SmallInput,
        )
    });
}

fn balance(c: &mut Criterion) {
    let candidates: Vec<Candidate> = (0..5)
        .map(|i| Candidate {
            site: site(i),
            cost: i as u64 % 3,
            weight: 1 + i as u32 % 2,
            open: 10 * i as u64,
        })
        .collect();
    let client = Some(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)));
    for strategy in [
        Strategy::Balanced,
        Strategy::Closest,
        Strategy::RoundRobin,
        Strategy::SourceAffinity,
    ] {
        let mut turn = 0u64;
        c.bench_function(
            &format!("choice among 5 sites, {}", strategy.as_str()),
            |b| {
                b.iter(|| {
                    turn += 1;
                    black_box(order(strategy, &candidates, client, turn))
                })
            },
        );
    }
}

criterion_group!(benches, codec, paths, balance);
criterion_main!(benches);
