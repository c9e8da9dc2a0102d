//! Link-state routing: advertisements, the link-state database, and path computation.
//!
//! Every router originates an [`Advertisement`]: its live links with their costs and the routing
//! keys its connectors serve, under a sequence number that only grows. Advertisements are
//! flooded over links; a router keeps the newest one per origin in its [`Lsdb`] and computes a
//! [`Table`] from it: least-cost paths (Dijkstra) to every reachable site, the next hop on each,
//! and for every routing key the sites that serve it with their path cost.
//!
//! A link counts only if both ends advertise it, so a dead site's stale advertisement cannot
//! attract traffic even before it ages out. Advertisements that are not refreshed within the
//! maximum age are dropped ([`Lsdb::expire`]); origins re-advertise well within that age.
//!
//! Nothing here reads a clock: the caller passes `now`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

/// Most links or services one advertisement may list.
pub const MAX_ADVERTISED: usize = 4096;

/// Most sites a link-state database holds. Advertisements are flooded by every site, so without
/// a bound a hostile (compromised) site could make every other site keep any number of made-up
/// origins; beyond it, advertisements from new origins are ignored.
pub const MAX_SITES: usize = 1024;

/// One router's view of itself, flooded to every other router.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advertisement {
    /// The site that originated it.
    pub origin: Uuid,
    /// That site's name.
    pub name: String,
    /// Grows with every new advertisement from `origin`; the largest wins.
    pub seq: u64,
    /// The origin's live links.
    pub links: Vec<AdvertisedLink>,
    /// The routing keys the origin's connectors serve.
    pub services: Vec<AdvertisedService>,
}

impl Advertisement {
    /// True if its site name and routing keys are ones skiff allows ([`crate::valid_site_name`],
    /// [`crate::valid_routing_key`]): anything else did not come from an honest skiff router.
    pub fn is_well_formed(&self) -> bool {
        crate::valid_site_name(&self.name)
            && self
                .services
                .iter()
                .all(|s| crate::valid_routing_key(&s.key))
    }
}

/// A link in an [`Advertisement`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdvertisedLink {
    /// The site at the other end.
    pub peer: Uuid,
    /// The link's cost.
    pub cost: u32,
}

/// A served routing key in an [`Advertisement`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdvertisedService {
    /// The routing key.
    pub key: String,
    /// Sum of the weights of the origin's connectors for it.
    pub weight: u32,
}

/// The path to a site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The neighbour to send through.
    pub next_hop: Uuid,
    /// Total cost of the path.
    pub cost: u64,
}

/// A site serving a routing key, as seen from this router.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// The serving site (this site itself for local connectors).
    pub site: Uuid,
    /// Path cost to it (0 for this site).
    pub cost: u64,
    /// Its advertised weight for the key.
    pub weight: u32,
}

/// The result of path computation: what the forwarding code reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    /// This site.
    pub own: Uuid,
    /// Paths to every other reachable site.
    pub routes: HashMap<Uuid, Route>,
    /// Every routing key with the reachable sites that serve it, cheapest first.
    pub services: BTreeMap<String, Vec<Target>>,
    /// Names of every site in the database (reachable or not).
    pub names: HashMap<Uuid, String>,
}

impl Table {
    /// The sites serving `key` that can be reached now.
    pub fn targets(&self, key: &str) -> &[Target] {
        self.services.get(key).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The name of `site`, or its id if unknown.
    pub fn name(&self, site: Uuid) -> String {
        self.names
            .get(&site)
            .cloned()
            .unwrap_or_else(|| site.to_string())
    }
}

struct Entry {
    adv: Arc<Advertisement>,
    refreshed: Instant,
}

/// The link-state database of one router.
pub struct Lsdb {
    own: Uuid,
    entries: HashMap<Uuid, Entry>,
}

impl Lsdb {
    /// An empty database for router `own`.
    pub fn new(own: Uuid) -> Self {
        Lsdb {
            own,
            entries: HashMap::new(),
        }
    }

    /// Installs this router's own advertisement (always accepted).
    pub fn originate(&mut self, adv: Advertisement, now: Instant) {
        debug_assert_eq!(adv.origin, self.own);
        self.entries.insert(
            self.own,
            Entry {
                adv: Arc::new(adv),
                refreshed: now,
            },
        );
    }

    /// Offers an advertisement received from a neighbour. Returns true if it was newer than
    /// what the database held (and so must be flooded on); false if it was old, this router's
    /// own (a router is the only authority on itself), not [well formed](Advertisement::is_well_formed)
    /// (its names would reach logs, metrics and terminals), or from a new origin while the
    /// database holds [`MAX_SITES`] already.
    pub fn receive(&mut self, adv: Advertisement, now: Instant) -> bool {
        if adv.origin == self.own || !adv.is_well_formed() {
            return false;
        }
        match self.entries.get(&adv.origin) {
            Some(entry) if entry.adv.seq >= adv.seq => false,
            None if self.entries.len() >= MAX_SITES => false,
            _ => {
                self.entries.insert(
                    adv.origin,
                    Entry {
                        adv: Arc::new(adv),
                        refreshed: now,
                    },
                );
                true
            }
        }
    }

    /// Drops other routers' advertisements not refreshed within `max_age`, except those of
    /// `alive` (neighbours whose links are up: on a saturated link their refreshes may be
    /// queued behind data, but the link itself proves them alive). True if any went.
    pub fn expire(
        &mut self,
        now: Instant,
        max_age: Duration,
        alive: &std::collections::HashSet<Uuid>,
    ) -> bool {
        let own = self.own;
        let before = self.entries.len();
        self.entries.retain(|origin, entry| {
            *origin == own
                || alive.contains(origin)
                || now.saturating_duration_since(entry.refreshed) <= max_age
        });
        self.entries.len() != before
    }

    /// Every advertisement held, for flooding.
    pub fn advertisements(&self) -> Vec<Arc<Advertisement>> {
        self.entries.values().map(|e| e.adv.clone()).collect()
    }

    /// The advertisement of `origin`, if held.
    pub fn get(&self, origin: Uuid) -> Option<&Arc<Advertisement>> {
        self.entries.get(&origin).map(|e| &e.adv)
    }

    /// Computes least-cost paths and service targets.
    pub fn compute(&self) -> Table {
        let adv = |site: &Uuid| self.entries.get(site).map(|e| &e.adv);
        // Link cost as both ends agree on it: a link counts only if both advertise it.
        let edge = |from: &Uuid, to: &Uuid| -> Option<u64> {
            let there = adv(from)?.links.iter().find(|l| l.peer == *to)?;
            let back = adv(to)?.links.iter().find(|l| l.peer == *from)?;
            Some(u64::from(there.cost.max(back.cost).max(1)))
        };

        // Dijkstra. Ties are broken by the smaller site id so every run (and every router
        // computing the same database) picks the same paths.
        let mut best: HashMap<Uuid, (u64, Uuid)> = HashMap::new();
        let mut heap = BinaryHeap::new();
        best.insert(self.own, (0, self.own));
        heap.push(Reverse((0u64, self.own, self.own)));
        while let Some(Reverse((cost, site, first_hop))) = heap.pop() {
            if best
                .get(&site)
                .is_some_and(|&(c, h)| (c, h) < (cost, first_hop))
            {
                continue;
            }
            let Some(site_adv) = adv(&site) else { continue };
            for link in &site_adv.links {
                let Some(w) = edge(&site, &link.peer) else {
                    continue;
                };
                let next_cost = cost + w;
                let hop = if site == self.own {
                    link.peer
                } else {
                    first_hop
                };
                let better = match best.get(&link.peer) {
                    None => true,
                    Some(&(c, h)) => (next_cost, hop) < (c, h),
                };
                if better {
                    best.insert(link.peer, (next_cost, hop));
                    heap.push(Reverse((next_cost, link.peer, hop)));
                }
            }
        }

        let mut table = Table {
            own: self.own,
            ..Table::default()
        };
        for (site, entry) in &self.entries {
            table.names.insert(*site, entry.adv.name.clone());
        }
        for (site, &(cost, next_hop)) in &best {
            if *site != self.own {
                table.routes.insert(*site, Route { next_hop, cost });
            }
            let Some(site_adv) = adv(site) else { continue };
            for service in &site_adv.services {
                table
                    .services
                    .entry(service.key.clone())
                    .or_default()
                    .push(Target {
                        site: *site,
                        cost,
                        weight: service.weight.max(1),
                    });
            }
        }
        for targets in table.services.values_mut() {
            targets.sort_by_key(|t| (t.cost, t.site));
        }
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: usize) -> Uuid {
        Uuid::from_u128(n as u128 + 1)
    }

    /// Builds every router's advertisement for an undirected graph given as (a, b, cost).
    fn advertisements(n: usize, edges: &[(usize, usize, u32)], seq: u64) -> Vec<Advertisement> {
        (0..n)
            .map(|i| Advertisement {
                origin: id(i),
                name: format!("s{i}"),
                seq,
                links: edges
                    .iter()
                    .filter_map(|&(a, b, c)| match (a == i, b == i) {
                        (true, _) => Some(AdvertisedLink {
                            peer: id(b),
                            cost: c,
                        }),
                        (_, true) => Some(AdvertisedLink {
                            peer: id(a),
                            cost: c,
                        }),
                        _ => None,
                    })
                    .collect(),
                services: vec![AdvertisedService {
                    key: format!("k{}", i % 3),
                    weight: 1,
                }],
            })
            .collect()
    }

    fn lsdb_of(me: usize, advs: &[Advertisement], now: Instant) -> Lsdb {
        let mut db = Lsdb::new(id(me));
        for adv in advs {
            if adv.origin == id(me) {
                db.originate(adv.clone(), now);
            } else {
                db.receive(adv.clone(), now);
            }
        }
        db
    }

    /// Reference all-pairs shortest paths (Floyd–Warshall).
    fn reference(n: usize, edges: &[(usize, usize, u32)]) -> Vec<Vec<Option<u64>>> {
        let mut d = vec![vec![None; n]; n];
        for (i, row) in d.iter_mut().enumerate() {
            row[i] = Some(0);
        }
        for &(a, b, c) in edges {
            let c = u64::from(c.max(1));
            for (x, y) in [(a, b), (b, a)] {
                if d[x][y].is_none_or(|old| c < old) {
                    d[x][y] = Some(c);
                }
            }
        }
        for k in 0..n {
            for i in 0..n {
                for j in 0..n {
                    if let (Some(a), Some(b)) = (d[i][k], d[k][j]) {
                        if d[i][j].is_none_or(|old| a + b < old) {
                            d[i][j] = Some(a + b);
                        }
                    }
                }
            }
        }
        d
    }

    fn graph() -> impl Strategy<Value = (usize, Vec<(usize, usize, u32)>)> {
        (2usize..12).prop_flat_map(|n| {
            let edge = (0..n, 0..n, 1u32..20).prop_filter("no self loops", |(a, b, _)| a != b);
            (Just(n), prop::collection::vec(edge, 0..30))
        })
    }

    /// Checks every router's table against the reference: same reachability and cost, and
    /// following next hops from any router reaches the destination at exactly that cost.
    fn check(n: usize, edges: &[(usize, usize, u32)]) -> Result<(), TestCaseError> {
        // Duplicate edges between the same pair: advertisements carry one entry per peer.
        let mut unique: BTreeMap<(usize, usize), u32> = BTreeMap::new();
        for &(a, b, c) in edges {
            let key = (a.min(b), a.max(b));
            let e = unique.entry(key).or_insert(c);
            *e = (*e).min(c);
        }
        let edges: Vec<_> = unique.into_iter().map(|((a, b), c)| (a, b, c)).collect();
        let now = Instant::now();
        let advs = advertisements(n, &edges, 1);
        let tables: Vec<Table> = (0..n).map(|i| lsdb_of(i, &advs, now).compute()).collect();
        let d = reference(n, &edges);
        for (src, row) in d.iter().enumerate() {
            for (dst, &want) in row.iter().enumerate() {
                if src == dst {
                    continue;
                }
                let route = tables[src].routes.get(&id(dst));
                prop_assert_eq!(route.map(|r| r.cost), want, "cost {} -> {}", src, dst);
                if let Some(route) = route {
                    // Walk the next hops: every router on the way must agree.
                    let (mut at, mut walked, mut hops) = (src, 0u64, 0);
                    while at != dst {
                        let r = tables[at].routes[&id(dst)];
                        let next = (r.next_hop.as_u128() - 1) as usize;
                        let w = edges
                            .iter()
                            .find(|&&(a, b, _)| (a, b) == (at, next) || (a, b) == (next, at))
                            .map(|&(_, _, c)| u64::from(c.max(1)));
                        prop_assert!(
                            w.is_some(),
                            "next hop {} -> {} is not a neighbour",
                            at,
                            next
                        );
                        walked += w.unwrap_or(0);
                        at = next;
                        hops += 1;
                        prop_assert!(hops <= n, "routing loop from {} to {}", src, dst);
                    }
                    prop_assert_eq!(walked, route.cost);
                }
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn next_hops_agree_with_reference_shortest_paths((n, edges) in graph()) {
            check(n, &edges)?;
        }

        #[test]
        fn converges_after_a_link_is_removed((n, edges) in graph(), pick in any::<usize>()) {
            prop_assume!(!edges.is_empty());
            let mut fewer = edges.clone();
            fewer.remove(pick % edges.len());
            check(n, &fewer)?;
        }
    }

    #[test]
    fn a_link_counts_only_when_both_ends_advertise_it() {
        let now = Instant::now();
        let mut advs = advertisements(2, &[(0, 1, 1)], 1);
        advs[1].links.clear(); // site 1 lost the link (or died and its advert is stale)
        let table = lsdb_of(0, &advs, now).compute();
        assert!(table.routes.is_empty());
        assert_eq!(table.targets("k1"), &[]);
        assert_eq!(
            table.targets("k0").len(),
            1,
            "own services are always reachable"
        );
    }

    #[test]
    fn newer_advertisements_win_and_stale_ones_age_out() {
        let t0 = Instant::now();
        let mut db = lsdb_of(0, &advertisements(2, &[(0, 1, 1)], 5), t0);
        let mut old = advertisements(2, &[], 4).remove(1);
        assert!(!db.receive(old.clone(), t0), "older seq is ignored");
        old.seq = 6;
        assert!(db.receive(old, t0));
        assert!(db.compute().routes.is_empty());
        let own = advertisements(2, &[], 99).remove(0);
        assert!(!db.receive(own, t0), "nobody else speaks for this router");
        let none = std::collections::HashSet::new();
        let alive: std::collections::HashSet<Uuid> = [id(1)].into_iter().collect();
        assert!(!db.expire(t0 + Duration::from_secs(5), Duration::from_secs(10), &none));
        assert!(
            !db.expire(
                t0 + Duration::from_secs(11),
                Duration::from_secs(10),
                &alive
            ),
            "a neighbour with a live link keeps its advertisement"
        );
        assert!(db.expire(t0 + Duration::from_secs(11), Duration::from_secs(10), &none));
        assert!(db.get(id(1)).is_none());
        assert!(db.get(id(0)).is_some(), "own advertisement never ages out");
    }

    #[test]
    fn malformed_advertisements_and_origins_beyond_the_bound_are_ignored() {
        let t0 = Instant::now();
        let mut db = Lsdb::new(id(0));
        let mut adv = advertisements(2, &[(0, 1, 1)], 1).remove(1);
        for name in ["\u{1b}[2J", "UPPER", ""] {
            adv.name = name.to_string();
            assert!(!db.receive(adv.clone(), t0), "name {name:?}");
        }
        adv.name = "s1".into();
        adv.services[0].key = "k y".into();
        assert!(!db.receive(adv.clone(), t0), "a bad routing key");
        adv.services[0].key = "k1".into();
        assert!(db.receive(adv, t0));
        for n in 2..MAX_SITES + 10 {
            let mut other = advertisements(1, &[], 1).remove(0);
            other.origin = id(n);
            db.receive(other, t0);
        }
        assert_eq!(db.advertisements().len(), MAX_SITES);
        // Known origins still update.
        let mut newer = advertisements(2, &[], 2).remove(1);
        newer.name = "s1".into();
        assert!(db.receive(newer, t0));
    }

    #[test]
    fn services_are_listed_cheapest_first_with_own_at_zero() {
        // chain 0 - 1 - 2, with 0 and 2 both serving k0 (0 % 3 and 3 % 3): use 4 sites.
        let now = Instant::now();
        let advs = advertisements(4, &[(0, 1, 1), (1, 2, 1), (2, 3, 5)], 1);
        let table = lsdb_of(0, &advs, now).compute();
        let k0: Vec<_> = table
            .targets("k0")
            .iter()
            .map(|t| (t.site, t.cost))
            .collect();
        assert_eq!(k0, vec![(id(0), 0), (id(3), 7)]);
        assert_eq!(table.routes[&id(2)].next_hop, id(1));
    }
}
