//! Shards: several one-thread runtimes in one site process, each carrying its own share of the
//! connections (`site run --shards`).
//!
//! A router runs its links' control, its admin and everything else on the runtime it was made
//! on, shard 0. Each further shard is a one-thread runtime of its own ([`Config::shards`]) that
//! accepts clients on every listener's port (the kernel spreads new connections over the
//! shards' sockets, `SO_REUSEPORT`) and has a lane of its own on every TLS link: a pair of
//! connections whose streams it opens and serves (`proto::preface`). A carried connection so
//! stays on one thread from accept to backend, with no hand-off between threads: on a machine
//! whose cores a router shares with the applications it carries, one thread per shard carries
//! more than a pool of threads that wake each other (docs/performance.md).
//!
//! [`Config::shards`]: crate::Config::shards

use std::cell::Cell;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Marks the calling thread as the one that runs shard `index` (1, 2, …): call it on each
/// shard's thread before its runtime runs.
pub fn enter(index: usize) {
    INDEX.with(|i| i.set(index));
}

/// The shard the calling thread runs: 0 on any thread that did not [`enter`] one.
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_is_shard_zero_until_it_enters_one() {
        assert_eq!(current(), 0);
        std::thread::spawn(|| {
            enter(3);
            assert_eq!(current(), 3);
        })
        .join()
        .unwrap();
        assert_eq!(current(), 0);
    }
}
