//! The convergence property, over action sequences chosen and shrunk by
//! proptest: whatever happens, once the network heals and goes quiet,
//! every replica equals the reference merge of every surviving change.

use converge_core::engine::ReplicaKind;
use converge_tests::scenario::{run_with, Action, Scenario};
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
