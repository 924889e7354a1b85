//! Scenarios: a world (one relay, several clients, some direct links
//! between clients, a few documents) and a list of [`Action`]s played on
//! it, followed by the convergence check.
//!
//! The same runner serves the seeded scenarios (actions drawn from a seed)
//! and the proptest property (actions drawn and shrunk by proptest).

use converge_core::engine::{Command, ReplicaKind};
use converge_core::wire::DocumentId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::sim::{
    check_converged, check_storage_loads, find_everywhere, random_edit, seed_document, NetConfig,
    NodeId, Role, Sim,
};

/// One thing that happens to the world. Node and document numbers are
/// taken modulo the world's size, so any value is valid (which lets
/// proptest shrink freely).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A client edits a document it holds.
    Edit {
        /// Which node (modulo the number of nodes).
        node: usize,
        /// Which document (modulo the number of documents).
        doc: usize,
        /// Which edit (see [`random_edit`]).
        pick: u64,
    },
    /// A node asks for a document.
    Find {
        /// Which node.
        node: usize,
        /// Which document.
        doc: usize,
    },
    /// Two nodes stop wanting their link.
    Disconnect {
        /// One end.
        a: usize,
        /// The other.
        b: usize,
    },
    /// Node `a` dials node `b`.
    Connect {
        /// Dialler.
        a: usize,
        /// Listener.
        b: usize,
    },
    /// The nodes whose bit is set are cut off from the others.
    Partition {
        /// One bit per node.
        mask: u16,
    },
    /// Partitions end.
    Heal,
    /// A node crashes, losing unflushed writes.
    Crash {
        /// Which node.
        node: usize,
    },
    /// A crashed node comes back.
    Restart {
        /// Which node.
        node: usize,
    },
    /// Time passes.
    Advance {
        /// How much, ms.
        ms: u64,
    },
    /// The network starts (or stops) misbehaving.
    Faults {
        /// Percent of messages lost.
        drop_pct: u8,
        /// Percent of messages duplicated.
        dup_pct: u8,
        /// Deliver out of order.
        reorder: bool,
    },
}

/// A world and what happens in it.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Seeds the simulator (latencies, losses, engine ids).
    pub seed: u64,
    /// How many clients besides the relay.
    pub clients: usize,
    /// How many documents.
    pub docs: usize,
    /// What happens.
    pub actions: Vec<Action>,
}

/// Most events a scenario may take to settle before it counts as livelock.
pub const MAX_SETTLE_STEPS: u64 = 200_000;

/// Builds the world: node 0 is the relay, nodes 1..=clients dial it, and
/// clients 1–2, 3–4, … are also linked directly. Each document starts on
/// one client and is allowed to reach the relay before actions begin.
pub fn build_world(
    seed: u64,
    clients: usize,
    docs: usize,
    relay_replica: ReplicaKind,
) -> (Sim, Vec<DocumentId>) {
    // Half the worlds have busy nodes that take messages in batches.
    let net = NetConfig {
        batch: if seed % 4 < 2 { 0.3 } else { 0.0 },
        ..NetConfig::default()
    };
    let mut sim = Sim::new(seed, net);
    // One world in three gives the relay a hot set of one document, so
    // eviction and reloading are exercised under every kind of fault.
    let relay = sim.add_node_with("relay", Role::Relay, |cfg| {
        if seed.is_multiple_of(3) {
            cfg.max_docs_in_memory = 1;
        }
        cfg.replica = relay_replica.factory();
    });
    for c in 1..=clients {
        let client = sim.add_node(&format!("client{c}"), Role::Client);
        sim.link(client, relay);
    }
    for c in (1..clients).step_by(2) {
        sim.link(c, c + 1);
    }
    sim.run_until_quiescent(MAX_SETTLE_STEPS);
    let seed_doc = seed_document();
    let ids = (0..docs)
        .map(|d| sim.create(1 + d % clients, &seed_doc))
        .collect();
    sim.run_until_quiescent(MAX_SETTLE_STEPS);
    (sim, ids)
}

/// Plays a scenario with a full-document relay and checks convergence.
/// On failure the error names the seed.
pub fn run(scenario: &Scenario) -> Result<Sim, String> {
    run_with(scenario, ReplicaKind::FullDocument)
}

/// Plays a scenario with the relay holding documents as `relay_replica`
/// and checks convergence.
pub fn run_with(scenario: &Scenario, relay_replica: ReplicaKind) -> Result<Sim, String> {
    let (mut sim, docs) = build_world(
        scenario.seed,
        scenario.clients,
        scenario.docs,
        relay_replica,
    );
    let nodes = sim.nodes.len();
    let mut edits = 0u64;
    for action in &scenario.actions {
        apply(&mut sim, &docs, nodes, action, &mut edits);
        // Let a little time pass between actions so messages interleave.
        sim.advance(5);
    }
    settle(&mut sim, &docs);
    let all: Vec<NodeId> = (0..nodes).collect();
    for doc in &docs {
        check_converged(&sim, doc, &all).map_err(|e| {
            format!(
                "seed {} ({} relay): document {doc}: {e}",
                scenario.seed,
                relay_replica.name()
            )
        })?;
    }
    check_storage_loads(&sim).map_err(|e| {
        format!(
            "seed {} ({} relay): {e}",
            scenario.seed,
            relay_replica.name()
        )
    })?;
    Ok(sim)
}

fn apply(sim: &mut Sim, docs: &[DocumentId], nodes: usize, action: &Action, edits: &mut u64) {
    match *action {
        Action::Edit { node, doc, pick } => {
            let doc = &docs[doc % docs.len()];
            let time = sim.now.as_secs();
            *edits += 1;
            sim.edit(node % nodes, doc, |am| random_edit(am, pick, time));
        }
        Action::Find { node, doc } => {
            let doc = docs[doc % docs.len()].clone();
            sim.command(node % nodes, Command::Find { document_id: doc });
        }
        Action::Disconnect { a, b } => sim.unlink(a % nodes, b % nodes),
        Action::Connect { a, b } => {
            let (a, b) = (a % nodes, b % nodes);
            if a != b {
                sim.link(a, b);
            }
        }
        Action::Partition { mask } => {
            let group: Vec<NodeId> = (0..nodes).filter(|n| mask & (1 << n) != 0).collect();
            if !group.is_empty() && group.len() < nodes {
                sim.partition(&group);
            }
        }
        Action::Heal => sim.heal(),
        Action::Crash { node } => sim.crash(node % nodes),
        Action::Restart { node } => sim.restart(node % nodes),
        Action::Advance { ms } => sim.advance(ms),
        Action::Faults {
            drop_pct,
            dup_pct,
            reorder,
        } => {
            sim.net.drop = f64::from(drop_pct.min(30)) / 100.0;
            sim.net.duplicate = f64::from(dup_pct.min(30)) / 100.0;
            sim.net.reorder = reorder;
        }
    }
}

/// Heals everything, has every node ask for every document, and runs to
/// quiescence.
pub fn settle(sim: &mut Sim, docs: &[DocumentId]) {
    sim.heal_all();
    sim.run_until_quiescent(MAX_SETTLE_STEPS);
    for doc in docs {
        find_everywhere(sim, doc);
    }
    sim.run_until_quiescent(MAX_SETTLE_STEPS);
}

/// Draws a scenario from a seed: 4–6 clients, 1–2 documents, 30–90
/// actions, with partitions, crashes and network faults all likely.
pub fn random_scenario(seed: u64) -> Scenario {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5ce7_a210);
    let clients = rng.random_range(4..=6);
    let docs = rng.random_range(1..=2);
    let count = rng.random_range(30..=90);
    let nodes = clients + 1;
    let actions = (0..count)
        .map(|_| {
            let node = rng.random_range(0..nodes);
            match rng.random_range(0..100) {
                0..=44 => Action::Edit {
                    node,
                    doc: rng.random_range(0..docs),
                    pick: rng.random(),
                },
                45..=52 => Action::Find {
                    node,
                    doc: rng.random_range(0..docs),
                },
                53..=62 => Action::Advance {
                    ms: rng.random_range(10..3000),
                },
                63..=67 => Action::Disconnect {
                    a: node,
                    b: rng.random_range(0..nodes),
                },
                68..=72 => Action::Connect {
                    a: node,
                    b: rng.random_range(0..nodes),
                },
                73..=78 => Action::Partition {
                    mask: rng.random_range(1..(1u16 << nodes) - 1),
                },
                79..=83 => Action::Heal,
                84..=88 => Action::Crash { node },
                89..=93 => Action::Restart { node },
                _ => Action::Faults {
                    drop_pct: rng.random_range(0..15),
                    dup_pct: rng.random_range(0..15),
                    reorder: rng.random_bool(0.5),
                },
            }
        })
        .collect();
    Scenario {
        seed,
        clients,
        docs,
        actions,
    }
}

/// The text of a document on a node, empty if it does not hold it.
pub fn text_on(sim: &Sim, node: NodeId, doc: &DocumentId) -> String {
    sim.nodes[node]
        .engine
        .as_ref()
        .and_then(|e| e.document(doc))
        .map(crate::sim::text_of)
        .unwrap_or_default()
}
