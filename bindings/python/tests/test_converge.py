"""Converge from Python, through the generated uniffi module and a real relay."""
import asyncio
import json
import os
import tempfile
import threading
import time

import pytest


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - keep polling until the deadline
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def find(repo, url, timeout=10.0):
    """`Repo.find` is async; retry it until the relay has the context."""
    deadline = time.time() + timeout
    while True:
        try:
            return asyncio.run(repo.find(url))
        except Exception:  # noqa: BLE001 - not there yet
            if time.time() > deadline:
                raise
            time.sleep(0.1)


def test_two_repos_sync_a_context_through_the_relay(converge, relay):
    alice, bob = converge.Repo.in_memory(), converge.Repo.in_memory()
    alice.connect(relay)
    bob.connect(relay)
    ctx = alice.create(json.dumps({"room": {"topic": "hello"}, "members": []}))
    theirs = find(bob, ctx.url())
    wait_for(lambda: json.loads(theirs.get_json("/room/topic")) == "hello", what="bob sees the topic")
    theirs.insert_json("/members", 0, json.dumps("bob"))
    wait_for(lambda: json.loads(ctx.get_json("/members")) == ["bob"], what="alice sees bob")


def test_offline_edits_merge_on_reconnect(converge, relay):
    alice, bob = converge.Repo.in_memory(), converge.Repo.in_memory()
    alice.connect(relay)
    bob.connect(relay)
    mine = alice.create(json.dumps({"a": 0, "b": 0}))
    mine.set_counter("/visits", 0)
    theirs = find(bob, mine.url())
    wait_for(lambda: "visits" in json.loads(theirs.get_json("")), what="bob has the counter")
    alice.disconnect()
    bob.disconnect()
    mine.set_json("/a", "1")
    mine.increment("/visits", 2)
    theirs.set_json("/b", "2")
    theirs.increment("/visits", 3)
    alice.connect(relay)
    bob.connect(relay)
    expected = {"a": 1, "b": 2, "visits": 5}
    wait_for(lambda: json.loads(mine.get_json("")) == expected, what="alice merges")
    wait_for(lambda: json.loads(theirs.get_json("")) == expected, what="bob merges")


def test_subscription_fires_for_a_remote_change(converge, relay):
    alice, bob = converge.Repo.in_memory(), converge.Repo.in_memory()
    alice.connect(relay)
    bob.connect(relay)
    mine = alice.create(json.dumps({"settings": {"theme": "light"}}))
    theirs = find(bob, mine.url())
    wait_for(lambda: "settings" in json.loads(theirs.get_json("")), what="bob has the settings")

    seen = []
    done = threading.Event()

    class Listener(converge.ContextListener):
        def on_change(self, origin, patches_json):
            for patch in json.loads(patches_json):
                seen.append((origin, patch))
                if patch.get("value") == "dark":
                    done.set()

        def on_lagged(self, missed, heads):
            seen.append(("lagged", {"missed": missed, "heads": heads}))

    sub = theirs.subscribe("/settings", Listener())
    mine.set_json("/settings/theme", json.dumps("dark"))
    assert done.wait(10), f"no patch arrived: {seen}"
    origin, patch = [s for s in seen if s[1].get("value") == "dark"][0]
    assert patch["path"] == "/settings/theme"
    assert origin != "local"
    sub.cancel()


def test_presence_is_seen(converge, relay):
    alice, bob = converge.Repo.in_memory(), converge.Repo.in_memory()
    alice.connect(relay)
    bob.connect(relay)
    mine = alice.create(json.dumps({}))
    theirs = find(bob, mine.url())
    updates = {}
    left = threading.Event()

    class Watcher(converge.PresenceListener):
        def on_update(self, peer_id, state_json):
            updates[peer_id] = json.loads(state_json)

        def on_leave(self, peer_id, goodbye):
            left.set()

    class Quiet(converge.PresenceListener):
        def on_update(self, peer_id, state_json):
            pass

        def on_leave(self, peer_id, goodbye):
            pass

    watching = theirs.start_presence(json.dumps({"name": "bob"}), 200, 1000, Watcher())
    me = mine.start_presence(json.dumps({"name": "alice"}), 200, 1000, Quiet())
    me.set("cursor", json.dumps({"line": 4}))
    wait_for(lambda: updates.get(alice.peer_id(), {}).get("cursor") == {"line": 4}, what="alice's cursor")
    assert json.loads(watching.peers_json())[alice.peer_id()]["name"] == "alice"
    me.stop()
    assert left.wait(5), "alice's goodbye was not seen"


def test_bad_input_raises_a_python_exception(converge):
    repo = converge.Repo.in_memory()
    ctx = repo.create(None)
    with pytest.raises(converge.ConvergeError.InvalidInput):
        ctx.get_json("no-leading-slash")
    with pytest.raises(converge.ConvergeError.NotFound):
        ctx.get_json("/missing")
    with pytest.raises(converge.ConvergeError.InvalidInput):
        ctx.set_json("/x", "{not json")
    ctx.set_json("/n", "1")
    with pytest.raises(converge.ConvergeError.TypeMismatch):
        ctx.increment("/n", 1)
    with pytest.raises(converge.ConvergeError.InvalidInput):
        repo.connect("http://example.com")


def test_a_transaction_is_all_or_nothing(converge):
    repo = converge.Repo.in_memory()
    ctx = repo.create(json.dumps({"score": 1}))
    Op = converge.ContextOp
    before = ctx.heads()
    with pytest.raises(converge.ConvergeError.NotFound):
        ctx.transact([Op.SET("/name", json.dumps("x")), Op.DELETE("/nothing-here")], None)
    assert ctx.heads() == before
    assert json.loads(ctx.get_json("")) == {"score": 1}
    change = ctx.transact(
        [
            Op.SET("/name", json.dumps("ada")),
            Op.SET_COUNTER("/hits", 1),
            Op.INCREMENT("/hits", 2),
            Op.SET("/doc", json.dumps("helo")),
            Op.SPLICE("/doc", 3, 0, "l"),
            Op.MERGE_JSON("", json.dumps({"score": None, "tags": ["a"]})),
            Op.INSERT("/tags", 1, json.dumps("b")),
            Op.REMOVE("/tags", 0, 1),
        ],
        "one change",
    )
    assert json.loads(ctx.get_json("")) == {"name": "ada", "hits": 3, "doc": "hello", "tags": ["b"]}
    newest = ctx.history(0, 1)[0]
    assert newest.hash == change and newest.message == "one change"
    assert json.loads(ctx.get_json_at("", before)) == {"score": 1}


def test_sync_status_and_the_document_list(converge, relay):
    alice = converge.Repo.in_memory()
    alice.connect(relay)
    ctx = alice.create(json.dumps({"v": 1}))
    assert asyncio.run(ctx.wait_synced(10_000)), asyncio.run(ctx.sync_status())
    status = asyncio.run(ctx.sync_status())
    assert status.saved and status.peers and all(p.in_sync for p in status.peers)
    assert sorted(status.heads) == sorted(ctx.heads())
    assert [p.peer_id for p in status.peers] == asyncio.run(alice.connected_peers())
    assert ctx.url() in asyncio.run(alice.list_documents())


def test_a_rocksdb_repo_keeps_contexts_across_restarts(converge):
    path = tempfile.mkdtemp(prefix="converge-py-rocks-")
    repo = converge.Repo.open(path)
    ctx = repo.create(json.dumps({"theme": "dark"}))
    url = ctx.url()
    asyncio.run(repo.shutdown())
    del ctx, repo
    import gc

    gc.collect()
    again = converge.Repo.open(path)
    assert url in asyncio.run(again.list_documents())
    assert json.loads(asyncio.run(again.find(url)).get_json("/theme")) == "dark"
    with pytest.raises(converge.ConvergeError.Storage):
        converge.Repo.open(os.path.join(path, "CURRENT", "not-a-dir"))


def test_a_token_provider_opens_a_relay_that_checks_tokens(converge, secure_relay):
    """The relay wants tokens: a repo with a provider syncs, with exactly
    the rights its token names; the provider is asked before each dial."""
    url, mint = secure_relay

    class Tokens(converge.TokenProvider):
        def __init__(self, token):
            self.token_value = token
            self.asked = 0

        def token(self):
            self.asked += 1
            return self.token_value

    writer_tokens = Tokens(mint("alice", "--create", "--write", "*"))
    alice = converge.Repo.in_memory()
    alice.connect_with_token(url, writer_tokens)
    ctx = alice.create(json.dumps({"room": "blue"}))
    doc_id = ctx.url().removeprefix("automerge:")

    reader = converge.Repo.in_memory()
    reader.connect_with_token(url, Tokens(mint("bob", "--read", doc_id)))
    theirs = find(reader, ctx.url())
    wait_for(lambda: json.loads(theirs.get_json("/room")) == "blue", what="bob reads alice's context")
    assert writer_tokens.asked >= 1

    # Without a token the relay refuses the connection: nothing arrives.
    stranger = converge.Repo.in_memory()
    stranger.connect(url)
    with pytest.raises(Exception):
        find(stranger, ctx.url(), timeout=1.5)
