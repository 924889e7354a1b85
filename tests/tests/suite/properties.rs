//! The convergence property, over action sequences chosen and shrunk by
//! proptest: whatever happens, once the network heals and goes quiet,
//! every replica equals the reference merge of every surviving change.

use std::time::Duration;

use converge_core::engine::{Command, EngineConfig, ReplicaKind};
use converge_core::wire::DocumentId;
use converge_tests::scenario::{run_with, Action, Scenario, MAX_SETTLE_STEPS};
use converge_tests::sim::{check_converged, random_edit, seed_document, NetConfig, Role, Sim};
use proptest::prelude::*;

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        8 => (0usize..8, 0usize..2, any::<u64>()).prop_map(|(node, doc, pick)| Action::Edit { node, doc, pick }),
        1 => (0usize..8, 0usize..2).prop_map(|(node, doc)| Action::Find { node, doc }),
        1 => (0usize..8, 0usize..8).prop_map(|(a, b)| Action::Disconnect { a, b }),
        1 => (0usize..8, 0usize..8).prop_map(|(a, b)| Action::Connect { a, b }),
        1 => any::<u16>().prop_map(|mask| Action::Partition { mask }),
        1 => Just(Action::Heal),
        1 => (0usize..8).prop_map(|node| Action::Crash { node }),
        1 => (0usize..8).prop_map(|node| Action::Restart { node }),
        2 => (1u64..4000).prop_map(|ms| Action::Advance { ms }),
        1 => (0u8..20, 0u8..20, any::<bool>()).prop_map(|(drop_pct, dup_pct, reorder)| Action::Faults { drop_pct, dup_pct, reorder }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge_after_any_history(
        seed in any::<u64>(),
        clients in 4usize..=6,
        docs in 1usize..=2,
        actions in prop::collection::vec(action(), 1..60),
    ) {
        let scenario = Scenario { seed, clients, docs, actions };
        // Half the histories run with a change-log relay.
        let relay = if seed % 2 == 0 { ReplicaKind::FullDocument } else { ReplicaKind::ChangeLog };
        if let Err(e) = run_with(&scenario, relay) {
            return Err(TestCaseError::fail(e));
        }
    }
}

/// What happens in a fault-free world.
fn edit_or_wait() -> impl Strategy<Value = (usize, usize, u64, u64)> {
    // (node, document, edit pick, ms to wait after it)
    (0usize..5, 0usize..2, any::<u64>(), 0u64..15)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Nodes that read several messages at once (the runtime's batches)
    /// still end every exchange knowing the other side has everything:
    /// with no faults and no resync timer to rescue a stalled exchange,
    /// once the world is quiet every connected pair reports itself in
    /// sync on every document. (A batch once swallowed the answer to a
    /// change, and the sender waited for the resync.)
    #[test]
    fn batched_exchanges_end_in_sync_without_resync(
        seed in any::<u64>(),
        steps in prop::collection::vec(edit_or_wait(), 1..40),
    ) {
        let relay_kind = if seed % 2 == 0 { ReplicaKind::FullDocument } else { ReplicaKind::ChangeLog };
        let net = NetConfig { batch: 0.5, batch_window: (1, 8), latency: (1, 10), ..NetConfig::default() };
        let mut sim = Sim::new(seed, net);
        let no_resync = |c: &mut EngineConfig| c.resync_interval = Duration::from_secs(86_400 * 365);
        let relay = sim.add_node_with("relay", Role::Relay, |c| {
            no_resync(c);
            c.replica = relay_kind.factory();
        });
        let clients: Vec<usize> = (1..=4)
            .map(|i| {
                let c = sim.add_node_with(&format!("client{i}"), Role::Client, no_resync);
                sim.link(c, relay);
                c
            })
            .collect();
        // Two clients also talk directly.
        sim.link(clients[0], clients[1]);
        sim.run_until_quiescent(MAX_SETTLE_STEPS);
        let docs: Vec<DocumentId> = (0..2).map(|d| sim.create(clients[d], &seed_document())).collect();
        sim.run_until_quiescent(MAX_SETTLE_STEPS);
        for &c in &clients {
            for doc in &docs {
                sim.command(c, Command::Find { document_id: doc.clone() });
            }
        }
        sim.run_until_quiescent(MAX_SETTLE_STEPS);
        for (node, doc, pick, wait) in steps {
            let time = sim.now.as_secs();
            sim.edit(node % 5, &docs[doc], |am| random_edit(am, pick, time));
            sim.advance(wait);
        }
        sim.run_until_quiescent(MAX_SETTLE_STEPS);
        for n in 0..5 {
            let engine = sim.nodes[n].engine.as_ref().expect("nobody crashed");
            for doc in &docs {
                let Some(status) = engine.sync_status(doc) else { continue };
                for peer in &status.peers {
                    prop_assert!(
                        peer.in_sync,
                        "seed {seed}: {} is not told {} holds its changes to {doc}: {status:?}",
                        sim.nodes[n].name,
                        peer.peer
                    );
                }
            }
        }
        for doc in &docs {
            if let Err(e) = check_converged(&sim, doc, &[0, 1, 2, 3, 4]) {
                return Err(TestCaseError::fail(format!("seed {seed}: {e}")));
            }
        }
    }
}
