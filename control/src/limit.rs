//! A per-source-address rate limit: token redemption attempts on the link port.
//!
//! Each source address has a token bucket: it holds at most `burst` attempts and refills at
//! `per_minute` attempts a minute; an attempt takes one, and an address with an empty bucket
//! is refused with the time until the next one. Codes are 160 random bits, so the limit is not
//! what keeps them from being guessed; it keeps one address from making the site verify
//! codes, sign certificates and write its state file as fast as it can send.
//!
//! IPv6 addresses count by their /64 (one host usually owns a whole /64); IPv4 addresses, and
//! IPv4 addresses mapped into IPv6, one by one. Sites behind one NAT share a bucket.
//!
//! The map is bounded ([`MAX_ADDRESSES`]): when it is full, addresses whose buckets have
//! refilled (which are the same as absent) go first, then the least recently seen. An address
//! evicted while not full gets a fresh bucket next time; that takes a flood from more than
//! `MAX_ADDRESSES` addresses, and each of them is still limited to its burst.
//!
//! Sans-IO: the clock is passed in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Most source addresses tracked at once.
pub const MAX_ADDRESSES: usize = 4096;

/// Token buckets by source address.
#[derive(Debug)]
pub struct AddressLimiter {
    per_minute: u32,
    burst: u32,
    buckets: HashMap<IpAddr, Bucket>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl AddressLimiter {
    /// `per_minute` attempts a minute per address after a first `burst` (both at least 1).
    pub fn new(per_minute: u32, burst: u32) -> Self {
        AddressLimiter {
            per_minute: per_minute.max(1),
            burst: burst.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Takes one attempt from `addr`'s bucket at `now`; `Err` holds how long until the next
    /// attempt would be allowed.
    pub fn check(&mut self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = key(addr);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= MAX_ADDRESSES {
            self.evict(now);
        }
        let burst = f64::from(self.burst);
        let per_second = f64::from(self.per_minute) / 60.0;
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_second).min(burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64((1.0 - bucket.tokens) / per_second))
    }

    /// How many addresses are tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when no address is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    fn evict(&mut self, now: Instant) {
        let (burst, per_second) = (f64::from(self.burst), f64::from(self.per_minute) / 60.0);
        self.buckets.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
            b.tokens + elapsed * per_second < burst
        });
        if self.buckets.len() >= MAX_ADDRESSES {
            if let Some(oldest) = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.updated)
                .map(|(k, _)| *k)
            {
                self.buckets.remove(&oldest);
            }
        }
    }
}

/// The address a bucket belongs to: IPv4 as is, IPv6 by its /64.
fn key(addr: IpAddr) -> IpAddr {
    match addr.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn a_burst_then_the_rate() {
        let mut limiter = AddressLimiter::new(10, 5);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(limiter.check(v4(1), t0).is_ok());
        }
        // The sixth waits for the next token: 6 s at 10 a minute.
        let wait = limiter.check(v4(1), t0).unwrap_err();
        assert!(wait > Duration::from_secs(5) && wait <= Duration::from_secs(6));
        // Refused attempts take nothing: the wait does not grow.
        assert_eq!(limiter.check(v4(1), t0).unwrap_err(), wait);
        // Another address has its own bucket.
        assert!(limiter.check(v4(2), t0).is_ok());
        // After the wait, one more; then it waits again.
        let later = t0 + Duration::from_secs(6);
        assert!(limiter.check(v4(1), later).is_ok());
        assert!(limiter.check(v4(1), later).is_err());
        // A long pause refills the burst, no more.
        let much_later = later + Duration::from_secs(3600);
        for _ in 0..5 {
            assert!(limiter.check(v4(1), much_later).is_ok());
        }
        assert!(limiter.check(v4(1), much_later).is_err());
    }

    #[test]
    fn ipv6_counts_by_prefix_and_mapped_ipv4_as_ipv4() {
        let mut limiter = AddressLimiter::new(1, 1);
        let t0 = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(limiter.check(a, t0).is_ok());
        assert!(limiter.check(b, t0).is_err(), "same /64");
        assert!(limiter.check(c, t0).is_ok(), "another /64");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert!(limiter.check(v4(7), t0).is_ok());
        assert!(limiter.check(mapped, t0).is_err(), "the same IPv4 address");
    }

    #[test]
    fn the_map_is_bounded_and_evicts_refilled_buckets_first() {
        let mut limiter = AddressLimiter::new(60, 2);
        let t0 = Instant::now();
        let addr = |i: usize| IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
        // One busy address with an empty bucket, then enough others to fill the map.
        let busy = IpAddr::from([192, 0, 2, 1]);
        limiter.check(busy, t0).unwrap();
        limiter.check(busy, t0).unwrap();
        for i in 0..MAX_ADDRESSES - 1 {
            limiter.check(addr(i), t0 + Duration::from_secs(1)).unwrap();
        }
        assert_eq!(limiter.len(), MAX_ADDRESSES);
        // Full: a new address evicts the least recently seen (the busy one, seen first).
        let t1 = t0 + Duration::from_secs(1);
        limiter.check(addr(MAX_ADDRESSES), t1).unwrap();
        assert_eq!(limiter.len(), MAX_ADDRESSES);
        // Later every bucket has refilled: one eviction pass clears them all.
        let t2 = t1 + Duration::from_secs(10);
        limiter.check(addr(MAX_ADDRESSES + 1), t2).unwrap();
        assert_eq!(limiter.len(), 1);
    }
}
