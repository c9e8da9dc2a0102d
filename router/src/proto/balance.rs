//! Load-balancing choice: in which order a listener tries the sites that serve its key.
//!
//! [`order`] is a pure function of the candidates (path cost, connector weight, connections the
//! origin has open to each), the strategy, the client's address and a round-robin counter. It
//! returns every candidate, best first: the origin tries them in that order until one accepts.

use std::net::IpAddr;

use uuid::Uuid;

/// How a listener chooses among the sites that serve its key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Least cost plus open connections (per unit of weight), like Skupper's default.
    #[default]
    Balanced,
    /// Always the cheapest path; balanced among equally cheap sites.
    Closest,
    /// Each site in turn, as often as its weight says.
    RoundRobin,
    /// The same client address goes to the same site (weighted rendezvous hashing): when a site
    /// leaves, only its clients move; when one joins, only the clients it now wins move.
    SourceAffinity,
}

impl Strategy {
    /// The name used in the CLI and in stored config.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Balanced => "balanced",
            Strategy::Closest => "closest",
            Strategy::RoundRobin => "round-robin",
            Strategy::SourceAffinity => "source-affinity",
        }
    }

    /// Parses a strategy name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "balanced" => Some(Strategy::Balanced),
            "closest" => Some(Strategy::Closest),
            "round-robin" => Some(Strategy::RoundRobin),
            "source-affinity" => Some(Strategy::SourceAffinity),
            _ => None,
        }
    }
}

/// A site that could take a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The site.
    pub site: Uuid,
    /// Path cost (0 for this site's own connectors).
    pub cost: u64,
    /// Connector weight (at least 1).
    pub weight: u32,
    /// Connections this origin has open to the site for this key.
    pub open: u64,
}

/// Candidate indices, best first.
pub fn order(
    strategy: Strategy,
    candidates: &[Candidate],
    client: Option<IpAddr>,
    turn: u64,
) -> Vec<usize> {
    let n = candidates.len();
    let mut idx: Vec<usize> = (0..n).collect();
    if n <= 1 {
        return idx;
    }
    match strategy {
        Strategy::Balanced => sort_balanced(&mut idx, candidates, turn),
        Strategy::Closest => {
            sort_balanced(&mut idx, candidates, turn);
            // Stable: among equal costs the balanced order stays.
            idx.sort_by_key(|&i| candidates[i].cost);
        }
        Strategy::RoundRobin => {
            let total: u64 = candidates.iter().map(|c| u64::from(c.weight.max(1))).sum();
            let mut slot = turn % total;
            let mut first = 0;
            for (i, c) in candidates.iter().enumerate() {
                let w = u64::from(c.weight.max(1));
                if slot < w {
                    first = i;
                    break;
                }
                slot -= w;
            }
            idx.rotate_left(first);
        }
        Strategy::SourceAffinity => {
            let key = client.map(ip_bytes).unwrap_or_default();
            let score = |c: &Candidate| affinity_score(&key, c.site, c.weight);
            idx.sort_by(|&a, &b| {
                score(&candidates[b])
                    .total_cmp(&score(&candidates[a]))
                    .then(candidates[a].site.cmp(&candidates[b].site))
            });
        }
    }
    idx
}

/// Balanced: lowest `cost + (open + 1) / weight` first. Ties (the common case for short
/// connections, where nothing is open) rotate with `turn` so they share the load evenly.
fn sort_balanced(idx: &mut [usize], candidates: &[Candidate], turn: u64) {
    let n = candidates.len() as u64;
    let score = |c: &Candidate| c.cost as f64 + (c.open as f64 + 1.0) / f64::from(c.weight.max(1));
    idx.sort_by(|&a, &b| {
        score(&candidates[a])
            .total_cmp(&score(&candidates[b]))
            .then_with(|| {
                let ra = (a as u64 + n - turn % n) % n;
                let rb = (b as u64 + n - turn % n) % n;
                ra.cmp(&rb)
            })
    });
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Weighted rendezvous score: `-weight / ln(u)` with `u` a uniform hash of (client, site) in
/// (0, 1). The highest score wins; removing a site changes no other site's score.
fn affinity_score(client: &[u8], site: Uuid, weight: u32) -> f64 {
    let mut h = fnv1a(client);
    h = fnv1a_continue(h, site.as_bytes());
    let u = ((mix(h) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(weight.max(1)) / u.ln()
}

fn fnv1a(data: &[u8]) -> u64 {
    fnv1a_continue(0xcbf2_9ce4_8422_2325, data)
}

fn fnv1a_continue(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64's finaliser: spreads FNV's weak low bits over the whole word.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{any, prop, prop_assert_eq, proptest};
    use std::net::Ipv4Addr;

    fn cand(n: u128, cost: u64, weight: u32, open: u64) -> Candidate {
        Candidate {
            site: Uuid::from_u128(n),
            cost,
            weight,
            open,
        }
    }

    #[test]
    fn balanced_spreads_sequential_connections_evenly() {
        let cs = [cand(1, 1, 1, 0), cand(2, 1, 1, 0)];
        let mut hits = [0; 2];
        for turn in 0..1000 {
            hits[order(Strategy::Balanced, &cs, None, turn)[0]] += 1;
        }
        assert_eq!(hits, [500, 500]);
    }

    #[test]
    fn balanced_prefers_fewer_open_connections_and_honours_weight() {
        let cs = [cand(1, 1, 1, 5), cand(2, 1, 1, 0)];
        assert_eq!(order(Strategy::Balanced, &cs, None, 0)[0], 1);
        // Weight 4 with 3 open scores (3+1)/4 = 1 against (0+1)/1 = 1: a tie, not a loss.
        let cs = [cand(1, 1, 4, 2), cand(2, 1, 1, 0)];
        assert_eq!(order(Strategy::Balanced, &cs, None, 0)[0], 0);
    }

    #[test]
    fn closest_always_takes_the_cheapest() {
        let cs = [cand(1, 5, 1, 0), cand(2, 1, 1, 100), cand(3, 9, 1, 0)];
        for turn in 0..10 {
            assert_eq!(order(Strategy::Closest, &cs, None, turn), vec![1, 0, 2]);
        }
    }

    #[test]
    fn round_robin_follows_weights() {
        let cs = [cand(1, 1, 1, 0), cand(2, 9, 3, 0)];
        let firsts: Vec<usize> = (0..8)
            .map(|t| order(Strategy::RoundRobin, &cs, None, t)[0])
            .collect();
        assert_eq!(firsts, vec![0, 1, 1, 1, 0, 1, 1, 1]);
    }

    #[test]
    fn every_strategy_returns_every_candidate_once() {
        let cs = [cand(1, 1, 1, 0), cand(2, 2, 2, 1), cand(3, 3, 3, 2)];
        for s in [
            Strategy::Balanced,
            Strategy::Closest,
            Strategy::RoundRobin,
            Strategy::SourceAffinity,
        ] {
            let mut o = order(s, &cs, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)), 7);
            o.sort();
            assert_eq!(o, vec![0, 1, 2], "{s:?}");
        }
    }

    proptest! {
        #[test]
        fn affinity_moves_only_the_departed_sites_clients(
            sites in 2u128..8,
            gone in any::<u128>(),
            clients in prop::collection::vec(any::<u32>(), 1..200),
        ) {
            let all: Vec<Candidate> = (1..=sites).map(|s| cand(s, 1, 1, 0)).collect();
            let gone = 1 + gone % sites;
            let rest: Vec<Candidate> = all.iter().copied().filter(|c| c.site.as_u128() != gone).collect();
            for raw in clients {
                let ip = Some(IpAddr::V4(Ipv4Addr::from(raw)));
                let before = all[order(Strategy::SourceAffinity, &all, ip, 0)[0]].site;
                let after = rest[order(Strategy::SourceAffinity, &rest, ip, 1)[0]].site;
                if before.as_u128() != gone {
                    prop_assert_eq!(before, after, "a client of a remaining site moved");
                }
                // The same client always lands on the same site.
                let again = all[order(Strategy::SourceAffinity, &all, ip, 99)[0]].site;
                prop_assert_eq!(before, again);
            }
        }
    }

    #[test]
    fn affinity_spreads_clients_by_weight() {
        let cs = [cand(1, 1, 1, 0), cand(2, 1, 3, 0)];
        let mut hits = [0u32; 2];
        for raw in 0..4000u32 {
            let ip = Some(IpAddr::V4(Ipv4Addr::from(raw.wrapping_mul(2_654_435_761))));
            hits[order(Strategy::SourceAffinity, &cs, ip, 0)[0]] += 1;
        }
        // Expect about 1:3.
        assert!((800..1200).contains(&hits[0]), "{hits:?}");
    }
}
