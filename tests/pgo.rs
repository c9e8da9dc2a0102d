//! The training workload of the profile-guided build (`pgo/`, run by `pgo/build.sh`) against
//! this build's `skiff`: three real sites, a TLS and a QUIC link, every phase carrying checked
//! traffic, and sites that stop cleanly on SIGTERM (an instrumented binary writes its counts
//! only then).

mod common;

use std::path::Path;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_carries_every_phase_and_stops_the_sites() {
    let report = skiff_pgo::train(Path::new(common::skiff()), Duration::from_millis(300))
        .await
        .expect("the training workload runs");
    let names: Vec<&str> = report.phases.iter().map(|p| p.name.as_str()).collect();
    for key in ["near", "far"] {
        for what in ["connections", "round trips", "bulk"] {
            assert!(
                names
                    .iter()
                    .any(|n| n.starts_with(&format!("{key}: {what}"))),
                "no {key} {what} phase in {names:?}"
            );
        }
    }
    for phase in &report.phases {
        assert!(phase.count > 0, "phase carried nothing: {phase:?}");
    }
}

#[tokio::test]
async fn training_fails_when_the_binary_is_not_skiff() {
    let err = skiff_pgo::train(Path::new("/bin/false"), Duration::from_millis(100))
        .await
        .expect_err("a binary that is not skiff cannot be trained");
    assert!(format!("{err:#}").contains("site init"), "{err:#}");
}
