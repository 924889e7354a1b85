//! Seeded random scenarios: at least 100 worlds of 5–7 peers (one relay),
//! each with edits, partitions, crashes that lose unflushed writes, and a
//! lossy, duplicating, reordering network; every one must converge.
//!
//! A failure prints its seed; `CONVERGE_SIM_SEED=<seed> cargo test -p
//! converge-tests seeded` replays just that one.

use converge_tests::scenario::{random_scenario, run};

#[test]
fn seeded_scenarios_converge() {
    let seeds: Vec<u64> = match std::env::var("CONVERGE_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("CONVERGE_SIM_SEED is a number")],
        Err(_) => {
            let count = std::env::var("CONVERGE_SIM_COUNT")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(200u64);
            (0..count).collect()
        }
    };
    let mut failures = Vec::new();
    let (mut crashes, mut partitions, mut max_peers) = (0, 0, 0);
    for seed in seeds {
        let scenario = random_scenario(seed);
        crashes += scenario
            .actions
            .iter()
            .filter(|a| matches!(a, converge_tests::scenario::Action::Crash { .. }))
            .count();
        partitions += scenario
            .actions
            .iter()
            .filter(|a| matches!(a, converge_tests::scenario::Action::Partition { .. }))
            .count();
        max_peers = max_peers.max(scenario.clients + 1);
        if let Err(e) = run(&scenario) {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} scenario(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(crashes > 0 && partitions > 0 && max_peers >= 5);
}
