//! The Context API: typed paths, transactions, errors, history, time travel
//! and subscriptions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use automerge::Automerge;
use converge_core::context::{self, ContextError, Op, PatchKind, Path, Value};
use converge_core::engine::Event;
use converge_core::engine::Origin;
use converge_core::runtime::{
    Clock, ContextChange, ContextEvent, ManualClock, Repo, RepoConfig, RepoError, Subscription,
};
use converge_core::storage::MemoryStorage;
use converge_core::transport::memory;
use converge_core::wire::{cbor_to_json, AutomergeUrl, PeerId};
use serde_json::json;
use tokio::sync::broadcast;

use super::wait;

fn p(s: &str) -> Path {
    s.parse().expect("valid pointer")
}

fn set(doc: &mut Automerge, path: &str, value: Value) {
    context::apply(
        doc,
        &[Op::Set {
            path: p(path),
            value,
        }],
        None,
        None,
    )
    .expect("set");
}

/// Every kind of value goes in at a path and comes back out the same, and
/// the subtree reads as JSON; keys with `/` and `~` are escaped.
#[test]
fn values_round_trip_by_path() {
    let mut doc = Automerge::new();
    let values = [
        ("/null", Value::Null),
        ("/bool", Value::Bool(true)),
        ("/int", Value::Int(-7)),
        ("/float", Value::Float(1.5)),
        ("/str", Value::Str("fixed".into())),
        ("/bytes", Value::Bytes(vec![1, 2, 255])),
        ("/when", Value::Timestamp(1_767_225_600_000)),
        ("/count", Value::Counter(3)),
        ("/text", Value::Text("hello".into())),
        (
            "/list",
            Value::List(vec![Value::Int(1), Value::Text("two".into())]),
        ),
        (
            "/a~1b~0c",
            Value::Map(BTreeMap::from([("x".to_owned(), Value::Int(1))])),
        ),
    ];
    for (path, value) in &values {
        set(&mut doc, path, value.clone());
    }
    for (path, value) in &values {
        assert_eq!(
            &context::get(&doc, &p(path), None).expect(path),
            value,
            "{path}"
        );
    }
    let json = context::to_json(&doc, &p(""), None).expect("json");
    assert_eq!(json["a/b~c"], json!({"x": 1}));
    assert_eq!(json["bytes"], json!({"$bytes": "0102ff"}));
    assert_eq!(json["list"], json!([1, "two"]));
    assert_eq!(
        context::get(&doc, &p("/list/1"), None).expect("elem"),
        Value::Text("two".into())
    );
}

/// Several ops are one change with one message; a failing op leaves the
/// document exactly as it was.
#[test]
fn transactions_are_one_change_or_nothing() {
    let mut doc = Automerge::new();
    set(&mut doc, "/profile", Value::Map(BTreeMap::new()));
    let before = doc.get_heads();
    let hash = context::apply(
        &mut doc,
        &[
            Op::Set {
                path: p("/profile/name"),
                value: Value::Text("Ada".into()),
            },
            Op::Set {
                path: p("/profile/visits"),
                value: Value::Counter(0),
            },
            Op::Increment {
                path: p("/profile/visits"),
                by: 2,
            },
            Op::Set {
                path: p("/tags"),
                value: Value::List(vec![]),
            },
            Op::Insert {
                path: p("/tags"),
                index: 0,
                value: Value::Str("new".into()),
            },
            Op::Splice {
                path: p("/profile/name"),
                index: 3,
                delete: 0,
                insert: " L.".into(),
            },
        ],
        Some("set up profile".into()),
        Some(42),
    )
    .expect("applies")
    .expect("a change");
    assert_eq!(doc.get_heads(), vec![hash]);
    let history = context::history(&doc, 0, 10);
    assert_eq!(history[0].message.as_deref(), Some("set up profile"));
    assert_eq!(history[0].time, 42);
    assert_eq!(history[0].hash, hash.to_string());
    assert_eq!(
        context::to_json(&doc, &p("/profile"), None).expect("json"),
        json!({"name": "Ada L.", "visits": 2})
    );

    let heads = doc.get_heads();
    let err = context::apply(
        &mut doc,
        &[
            Op::Set {
                path: p("/profile/name"),
                value: Value::Text("changed".into()),
            },
            Op::Increment {
                path: p("/profile/name"),
                by: 1,
            },
        ],
        None,
        None,
    )
    .expect_err("incrementing text fails");
    assert!(matches!(err, ContextError::TypeMismatch { .. }), "{err}");
    assert_eq!(doc.get_heads(), heads, "nothing was committed");
    assert_eq!(
        context::get(&doc, &p("/profile/name"), None).expect("name"),
        Value::Text("Ada L.".into())
    );
    assert_ne!(before, heads);
}

/// Clear errors for the common mistakes.
#[test]
fn errors_say_what_is_wrong_and_where() {
    let mut doc = Automerge::new();
    set(&mut doc, "/list", Value::List(vec![Value::Int(1)]));
    set(&mut doc, "/n", Value::Int(1));
    let cases: Vec<(Op, &str)> = vec![
        (
            Op::Set {
                path: p("/missing/child"),
                value: Value::Null,
            },
            "nothing at /missing",
        ),
        (
            Op::Delete {
                path: p("/missing"),
            },
            "nothing at /missing",
        ),
        (
            Op::Set {
                path: p("/n/child"),
                value: Value::Null,
            },
            "/n is a integer, not a map, list or text",
        ),
        (
            Op::Insert {
                path: p("/list"),
                index: 5,
                value: Value::Null,
            },
            "index 5 is out of range at /list (length 1)",
        ),
        (
            Op::Remove {
                path: p("/list"),
                index: 0,
                count: 2,
            },
            "out of range",
        ),
        (
            Op::Splice {
                path: p("/list"),
                index: 0,
                delete: 0,
                insert: "x".into(),
            },
            "/list is a list, not a text",
        ),
        (
            Op::Increment {
                path: p("/n"),
                by: 1,
            },
            "/n is a integer, not a counter",
        ),
        (Op::Delete { path: p("") }, "root cannot be deleted"),
        (
            Op::MergeJson {
                path: p("/n"),
                json: json!({"a": 1}),
            },
            "/n is a integer",
        ),
    ];
    for (op, expected) in cases {
        let err =
            context::apply(&mut doc, std::slice::from_ref(&op), None, None).expect_err("fails");
        assert!(
            err.to_string().contains(expected),
            "{op:?}: `{err}` lacks `{expected}`"
        );
    }
    assert!(matches!(
        context::get(&doc, &p("/list/3"), None),
        Err(ContextError::IndexOutOfRange { .. })
    ));
    assert!("no-slash".parse::<Path>().is_err());
}

/// Merging JSON sets keys, merges nested objects and deletes on null.
#[test]
fn merging_json_is_a_deep_update() {
    let mut doc = Automerge::new();
    context::apply(
        &mut doc,
        &[Op::MergeJson {
            path: p(""),
            json: json!({"settings": {"theme": "light", "font": 12}, "old": true}),
        }],
        None,
        None,
    )
    .expect("merge");
    context::apply(
        &mut doc,
        &[Op::MergeJson {
            path: p(""),
            json: json!({"settings": {"theme": "dark"}, "old": null}),
        }],
        None,
        None,
    )
    .expect("merge");
    assert_eq!(
        context::to_json(&doc, &p(""), None).expect("json"),
        json!({"settings": {"theme": "dark", "font": 12}})
    );
}

/// A context with 1,000+ changes: history pages newest first, any version
/// can be opened (also through an `automerge:` URL with heads) while new
/// changes keep arriving, and two versions diff as patches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_time_travel_over_a_thousand_changes() {
    let repo = Repo::start(RepoConfig::new(None), Arc::new(MemoryStorage::new()));
    let ctx = repo.create(None).await.expect("create").context();
    ctx.set("/n", Value::Int(0)).await.expect("set");
    let mut marks = Vec::new();
    for i in 1..=1000i64 {
        ctx.apply(
            vec![Op::Set {
                path: p("/n"),
                value: Value::Int(i),
            }],
            Some(format!("n={i}")),
        )
        .await
        .expect("apply");
        if i % 250 == 0 {
            marks.push((i, ctx.heads().await.expect("heads")));
        }
    }
    let page = ctx.history(0, 20).await.expect("history");
    assert_eq!(page.len(), 20);
    assert_eq!(page[0].message.as_deref(), Some("n=1000"));
    assert_eq!(page[19].message.as_deref(), Some("n=981"));
    let next = ctx.history(20, 20).await.expect("history");
    assert_eq!(next[0].message.as_deref(), Some("n=980"));
    let all = ctx.history(0, 10_000).await.expect("history");
    assert!(all.len() >= 1001);

    // Open the version at n=250 and keep writing: the view does not move.
    let (n, heads) = marks[0].clone();
    let view = ctx.view_at(heads.clone()).await.expect("view");
    for i in 0..20 {
        ctx.set("/n", Value::Int(5000 + i)).await.expect("set");
    }
    assert_eq!(view.get("/n").expect("old value"), Value::Int(n));
    assert_eq!(ctx.get("/n").await.expect("now"), Value::Int(5019));

    let url = AutomergeUrl {
        document_id: ctx.handle().id().clone(),
        heads: Some(marks[1].1.clone()),
    };
    let parsed: AutomergeUrl = url.to_string().parse().expect("url parses");
    let at_500 = ctx.open_url(&parsed).await.expect("url view");
    assert_eq!(at_500.get("/n").expect("value"), Value::Int(500));

    let patches = ctx
        .diff(marks[0].1.clone(), marks[3].1.clone(), "")
        .await
        .expect("diff");
    assert_eq!(patches.len(), 1);
    assert_eq!(patches[0].path, "/n");
    assert_eq!(patches[0].kind, PatchKind::Put { value: json!(1000) });

    let bogus = vec![automerge::ChangeHash([7; 32])];
    assert!(matches!(
        ctx.view_at(bogus).await,
        Err(RepoError::Context(ContextError::UnknownHeads(_)))
    ));
}

/// Bob subscribes to `/settings`; Alice changes a setting on her device;
/// Bob gets the change as a patch, marked as coming from Alice — and does
/// not hear about paths he did not subscribe to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_changes_arrive_as_patches_with_their_origin() {
    let alice = Repo::start(RepoConfig::new(None), Arc::new(MemoryStorage::new()));
    let bob = Repo::start(RepoConfig::new(None), Arc::new(MemoryStorage::new()));
    let _link = memory::connect(&alice, &bob);
    let mine = alice.create(None).await.expect("create").context();
    mine.merge_json("", json!({"settings": {"theme": "light"}, "cursor": 0}))
        .await
        .expect("merge");
    let theirs = wait::until("bob has the document with its settings", || async {
        let h = bob.find(mine.handle().id()).await.ok()?;
        h.context().get("/settings/theme").await.ok()?;
        Some(h.context())
    })
    .await;
    let mut sub = theirs.subscribe("/settings").expect("subscribe");
    mine.set("/cursor", Value::Int(5))
        .await
        .expect("unrelated change");
    mine.set("/settings/theme", Value::Text("dark".into()))
        .await
        .expect("set");
    let event = next_change(&mut sub).await;
    assert_eq!(event.origin, Origin::Remote(alice.peer_id().clone()));
    assert_eq!(event.patches.len(), 1, "{:?}", event.patches);
    assert_eq!(event.patches[0].path, "/settings/theme");
    assert_eq!(
        event.patches[0].kind,
        PatchKind::Put {
            value: json!("dark")
        }
    );

    // Local changes are delivered too, marked local.
    theirs
        .set("/settings/font", Value::Int(14))
        .await
        .expect("local set");
    let local = next_change(&mut sub).await;
    assert_eq!(local.origin, Origin::Local);
    assert_eq!(local.patches[0].path, "/settings/font");
}

/// The next event of a subscription, which must be a change.
async fn next_change(sub: &mut Subscription) -> ContextChange {
    let event = tokio::time::timeout(wait::DEADLINE, sub.next())
        .await
        .expect("an event arrives")
        .expect("subscription open");
    match event {
        ContextEvent::Changed(change) => change,
        lagged => panic!("expected a change, got {lagged:?}"),
    }
}

/// A subscriber that falls behind is told so instead of being skipped:
/// with room for four repo events, fifty edits queued at once overflow
/// the channel before the subscription can read them. It gets a `Lagged`
/// event whose heads read back as the state after all fifty, none of the
/// changes already part of those heads is reported again, and the next
/// edit arrives as an ordinary change.
#[tokio::test]
async fn a_subscriber_that_falls_behind_is_told_and_can_catch_up() {
    let mut config = RepoConfig::new(None);
    config.event_capacity = 4;
    let repo = Repo::start(config, Arc::new(MemoryStorage::new()));
    let ctx = repo.create(None).await.expect("create").context();
    ctx.set("/n", Value::Int(0)).await.expect("set");
    let mut sub = ctx.subscribe("").expect("subscribe");

    // Every edit is queued before any is awaited: the subscription's
    // first read of the document waits behind all of them, and by then
    // fifty events have been sent to a channel holding four.
    let edits: Vec<_> = (1..=50)
        .map(|i| {
            let ops = [Op::Set {
                path: p("/n"),
                value: Value::Int(i),
            }];
            ctx.handle()
                .change(move |doc| context::apply(doc, &ops, None, None))
        })
        .collect();
    for edit in edits {
        edit.await.expect("repo alive").expect("edit applies");
    }
    let after_burst = ctx.heads().await.expect("heads");
    // The writes' `Saved` events trail the changes; wait until they have
    // all been sent, or they could overflow the channel a second time
    // after the first lag is read (a second, correct, `Lagged`).
    ctx.handle().saved().await.expect("saved");

    let (missed, heads) = tokio::time::timeout(wait::DEADLINE, async {
        loop {
            match sub.next().await.expect("subscription open") {
                ContextEvent::Lagged { missed, heads } => return (missed, heads),
                // (The first edit may be reported before the overflow.)
                ContextEvent::Changed(_) => {}
            }
        }
    })
    .await
    .expect("the subscription reports that it fell behind");
    assert!(missed > 0, "missed {missed}");
    assert_eq!(
        heads, after_burst,
        "the lag reports the heads after the burst"
    );
    let view = ctx.view_at(heads.clone()).await.expect("view at the heads");
    assert_eq!(view.get("/n").expect("read"), Value::Int(50));

    ctx.set("/n", Value::Int(51))
        .await
        .expect("set after the burst");
    let change = next_change(&mut sub).await;
    assert_eq!(
        change.patches,
        vec![context::ContextPatch {
            path: "/n".into(),
            kind: PatchKind::Put { value: json!(51) },
        }],
        "only the new edit follows the lag"
    );
    assert_eq!(change.heads, ctx.heads().await.expect("heads"));
    assert_eq!(change.origin, Origin::Local);
}

/// Waits (in real time) for the next presence heartbeat from `from` to
/// reach the repo whose events these are.
async fn heartbeat_from(events: &mut broadcast::Receiver<Event>, from: &PeerId) {
    tokio::time::timeout(wait::DEADLINE, async {
        loop {
            let Ok(Event::Ephemeral {
                sender_id, data, ..
            }) = events.recv().await
            else {
                continue;
            };
            let message = cbor_to_json(&data).expect("presence payload");
            if sender_id == *from && message["__presence"]["type"] == "heartbeat" {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no heartbeat from {from}"));
}

/// Presence between two repos: each sees the other join with its state,
/// sees updates, and sees the other leave — by goodbye, or by going silent
/// past the time-to-live.
///
/// On virtual time (both repos share a manual clock): heartbeats and
/// expiry happen only as the test moves the clock, one heartbeat interval
/// at a time; after each step the test waits for the heartbeats that step
/// sends, so every step is seen through before the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_joins_updates_and_expires() {
    use converge_core::runtime::{Presence, PresenceConfig, PresenceEvent};
    let fast = PresenceConfig {
        heartbeat: Duration::from_millis(200),
        ttl: Duration::from_millis(2000),
    };
    let clock = ManualClock::new();
    let on_clock = || {
        let mut config = RepoConfig::new(None);
        config.clock = Arc::new(clock.clone());
        Repo::start(config, Arc::new(MemoryStorage::new()))
    };
    let (alice, bob) = (on_clock(), on_clock());
    let mut at_alice = alice.events();
    let mut at_bob = bob.events();
    let _link = memory::connect(&alice, &bob);
    let doc = alice.create(None).await.expect("create");
    // Connected first: with nobody to ask, a find would wait for a grace
    // period of virtual time that does not pass.
    wait::connected(&bob, 1).await;
    let bobs_doc = tokio::time::timeout(wait::DEADLINE, bob.find(doc.id()))
        .await
        .expect("bob's find answered")
        .expect("bob finds alice's document");
    let bob_presence = Presence::start(bobs_doc, json!({"name": "bob"}), fast)
        .await
        .expect("start");
    let mut seen = bob_presence.events();
    let alice_presence = Presence::start(doc.clone(), json!({"name": "alice"}), fast)
        .await
        .expect("start");
    let joined = tokio::time::timeout(wait::DEADLINE, seen.recv())
        .await
        .expect("join")
        .expect("open");
    assert_eq!(
        joined,
        PresenceEvent::Joined {
            peer: alice.peer_id().clone(),
            state: json!({"name": "alice"}).as_object().cloned().expect("map")
        }
    );
    // Alice sees Bob too (he answered her with his state).
    let bobs = wait::until("alice sees bob", || async {
        alice_presence.peers().get(bob.peer_id()).cloned()
    })
    .await;
    assert_eq!(bobs.get("name"), Some(&json!("bob")));

    alice_presence
        .set("cursor", json!({"line": 3}))
        .await
        .expect("set");
    let updated = loop {
        match tokio::time::timeout(wait::DEADLINE, seen.recv())
            .await
            .expect("update")
            .expect("open")
        {
            PresenceEvent::Updated { state, .. } if state.contains_key("cursor") => break state,
            _ => continue,
        }
    };
    assert_eq!(updated.get("cursor"), Some(&json!({"line": 3})));

    // Heartbeats keep Alice present well past the time-to-live...
    let start = clock.now();
    while clock.now().0 - start.0 < 3 * fast.ttl.as_millis() as u64 / 2 {
        clock.advance(fast.heartbeat);
        heartbeat_from(&mut at_bob, alice.peer_id()).await;
        heartbeat_from(&mut at_alice, bob.peer_id()).await;
    }
    assert!(
        bob_presence.peers().contains_key(alice.peer_id()),
        "alice expired despite heartbeats"
    );
    // (and she never left meanwhile: no stale event may stand in for the
    // expiry measured next)
    while let Ok(event) = seen.try_recv() {
        assert!(
            !matches!(event, PresenceEvent::Left { .. }),
            "alice left while sending heartbeats: {event:?}"
        );
    }
    // ...until she goes silent.
    let silent_since = clock.now();
    drop(alice_presence);
    let left = loop {
        assert!(
            clock.now().0 - silent_since.0 <= 2 * fast.ttl.as_millis() as u64,
            "alice did not expire within twice the time-to-live"
        );
        clock.advance(fast.heartbeat);
        // Bob's heartbeat of this step has gone out, so his expiry check
        // of the step before (which comes after that step's heartbeat)
        // is done.
        heartbeat_from(&mut at_alice, bob.peer_id()).await;
        if let Some(left) = std::iter::from_fn(|| seen.try_recv().ok()).find_map(|e| match e {
            PresenceEvent::Left { peer, goodbye } => Some((peer, goodbye)),
            _ => None,
        }) {
            break left;
        }
    };
    assert_eq!(left, (alice.peer_id().clone(), false));
    // The time-to-live runs from her last heartbeat, which Bob took at
    // the moment she fell silent or later. Seen now, the expiry happened
    // at this step or the one before: not before the time-to-live.
    let waited = Duration::from_millis(clock.now().0 - silent_since.0);
    assert!(
        waited >= fast.ttl + fast.heartbeat,
        "expired {:?} after she fell silent; the time-to-live is {:?}",
        waited - fast.heartbeat,
        fast.ttl
    );
}
