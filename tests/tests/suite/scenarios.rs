//! Seeded random scenarios: at least 100 worlds of 5–7 peers (one relay),
//! each with edits, partitions, crashes that lose unflushed writes, and a
//! lossy, duplicating, reordering network; every one must converge.
//!
//! Every world is played twice, with a full-document relay and with a
//! change-log relay (the differential test of the change log): both must
//! converge, and to the same heads on every node — the simulator is
//! deterministic, so if the two relays behaved differently on the wire the
//! runs would drift apart.
//!
//! A failure prints its seed; `CONVERGE_SIM_SEED=<seed> cargo test -p
//! converge-tests seeded` replays just that one.

use converge_core::engine::ReplicaKind;
use converge_tests::scenario::{random_scenario, run_with};
use converge_tests::sim::Sim;

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
    let (mut crashes, mut partitions, mut max_peers, mut compared) = (0, 0, 0, 0);
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
        let full = run_with(&scenario, ReplicaKind::FullDocument);
        let log = run_with(&scenario, ReplicaKind::ChangeLog);
        match (full, log) {
            (Ok(full), Ok(log)) => {
                if let Some(diff) = first_difference(&full, &log) {
                    failures.push(format!("seed {seed}: relays disagree: {diff}"));
                }
                compared += 1;
            }
            (a, b) => failures.extend(a.err().into_iter().chain(b.err())),
        }
    }
    assert!(
        failures.is_empty(),
        "{} scenario(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(crashes > 0 && partitions > 0 && max_peers >= 5 && compared > 0);
}

/// The first node and document whose heads differ between two runs.
fn first_difference(a: &Sim, b: &Sim) -> Option<String> {
    for (na, nb) in a.nodes.iter().zip(&b.nodes) {
        let (Some(ea), Some(eb)) = (&na.engine, &nb.engine) else {
            continue;
        };
        for (id, _) in ea.documents() {
            if ea.heads(id) != eb.heads(id) {
                return Some(format!(
                    "{} holds {id} at {:?} vs {:?}",
                    na.name,
                    ea.heads(id),
                    eb.heads(id)
                ));
            }
        }
    }
    None
}
