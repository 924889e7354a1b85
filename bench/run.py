#!/usr/bin/env python3
"""`make bench`: start each server, drive it with converge-bench, write BENCHMARKS.md.

Servers: Converge (release build, RocksDB) with each relay replica
(change-log, the default, and full-document), samod (bench/samod-relay),
the automerge-repo reference server (Node, NodeFS storage:
tests/js/reference-server.mjs) and the floor
(converge-bench floor: a broadcast relay with no CRDT and no storage).
Then the in-process scenarios: P3 reconnect bytes, P4 durable appends
(converge-server bench-storage), P5 cold start, P7 the editing trace.
The server runs on CPU 1 and the load generator on CPU 0 (taskset).
Every figure is the median of RUNS runs.

Environment: CONVERGE_BENCH_RUNS (default 5), CONVERGE_BENCH_QUICK=1 for a
short smoke run, CARGO_TARGET_DIR.
"""
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BENCH = os.path.join(TARGET, "release", "converge-bench")
SERVER = os.path.join(TARGET, "release", "converge-server")
SAMOD = os.path.join(TARGET, "release", "samod-relay")
FFI_LIB = os.path.join(TARGET, "release", "libconverge_ffi.so")
FFI_EXAMPLE = os.path.join(TARGET, "release", "examples", "ffi_overhead")
BINDGEN = os.path.join(TARGET, "release", "uniffi-bindgen")
JS_DIR = os.path.join(ROOT, "tests", "js")
RUNS = int(os.environ.get("CONVERGE_BENCH_RUNS", "5"))
QUICK = os.environ.get("CONVERGE_BENCH_QUICK") == "1"
P99_GOAL_MS = 100.0
# Past this p99 a server is saturated: the sweep stops there.
SATURATED_MS = 1000.0
# Receivers wait this long after the typists stop. A delivery missing then
# counts as infinitely late; anything faster than SATURATED_MS still lands
# in time, so no verdict changes, and saturated runs end sooner.
DRAIN_S = SATURATED_MS / 1000 + 0.2
RATE = 6.0
LOADGEN_CPU, SERVER_CPU = "0", "1"
# P6: how long samod and the Node server get per run to load documents.
PEER_TOUCH_SECS = 5
# P6: documents touched before the RSS figure taken as the start.
P6_WARMUP = 200
# P1: seconds measured per coarse run (settling runs take `secs`).
COARSE_SECS = 1


STARTED = time.time()


def section(title):
    """Prints a section heading with the time since the bench started."""
    print(f"[{title}] (+{time.time() - STARTED:.0f} s)", flush=True)


def pinned(cpu, argv):
    return (["taskset", "-c", cpu] if shutil.which("taskset") and os.cpu_count() > 1 else []) + argv


class Server:
    def __init__(self, name, argv, port, cwd=None, ready=None):
        self.name, self.port = name, port
        self.dir = tempfile.mkdtemp(prefix=f"bench-{name}-")
        argv = [a.replace("{dir}", self.dir) for a in argv]
        self.proc = subprocess.Popen(pinned(SERVER_CPU, argv), cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 30
        if ready is None:
            import socket
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.time() > deadline or self.proc.poll() is not None:
                        raise RuntimeError(f"{name} did not start")
                    time.sleep(0.1)
        else:
            for line in self.proc.stdout:
                if re.search(ready, line):
                    break
                if time.time() > deadline:
                    raise RuntimeError(f"{name} did not start")
        # Keep draining its output.
        import threading
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        self.url = f"ws://127.0.0.1:{port}"

    def rss_kb(self):
        # The process under taskset is the server itself (taskset execs).
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


# One load generator on one address stands for thousands of users: the
# relay's per-address and per-connection limits (which a deployment keeps)
# would measure the limiter, not the relay, so the benchmarks lift them.
UNLIMITED = ["--max-connections", "1000000", "--max-connections-per-ip", "1000000",
             "--new-connections-per-ip-per-sec", "1000000", "--messages-per-sec", "1000000000",
             "--bytes-per-sec", "1000000000000", "--max-docs-per-connection", "1000000000",
             "--http-requests-per-ip-per-sec", "1000000"]


def converge_argv(port, data_dir, replica="change-log"):
    return [SERVER, "--listen", f"127.0.0.1:{port}", "--data-dir", data_dir, "--log", "warn",
            "--replica", replica] + UNLIMITED


def samod_argv(port, data_dir):
    return [SAMOD, str(port), data_dir]


def node_argv(port, data_dir):
    # Run from JS_DIR, where the script and its node_modules are.
    return ["node", "reference-server.mjs", str(port), data_dir]


def converge_server(name, replica, port, data_dir="{dir}"):
    return Server(name, converge_argv(port, data_dir, replica), port)


def samod_server(port, data_dir="{dir}"):
    return Server("samod", samod_argv(port, data_dir), port, ready=r"samod listening")


def node_server(port, data_dir="{dir}"):
    return Server("node", node_argv(port, data_dir), port, cwd=JS_DIR, ready=r'"ready":true')


def servers():
    return [
        ("converge", lambda: converge_server("converge", "change-log", 3131)),
        ("converge-full", lambda: converge_server("converge-full", "full-document", 3134)),
        ("samod", lambda: samod_server(3137)),
        ("node", lambda: node_server(3132)),
        ("floor", lambda: Server("floor", [BENCH, "floor", "--listen", "127.0.0.1:3133"], 3133,
                                 ready=r"floor listening")),
    ]


def p1(server, name, typists, docs, secs):
    args = [BENCH, "p1", "--url", server.url, "--typists", str(typists), "--docs", str(docs),
            "--secs", str(secs), "--warmup", "0.5", "--drain", str(DRAIN_S), "--rate", str(RATE)]
    if name == "floor":
        args.append("--floor")
    try:
        out = subprocess.run(pinned(LOADGEN_CPU, args), capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return {"p99_ms": "inf", "error": "the load generator timed out"}
    if out.returncode != 0:
        return {"p99_ms": "inf", "error": out.stderr.strip()[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def p99_of(result):
    v = result.get("p99_ms")
    return float("inf") if v in ("inf", None) or result.get("errors") else float(v)


def sweep(start, name, per_doc, points, secs):
    """The p99 curve until saturation, the largest typist count whose median
    p99 stays under the goal, and the saturation point (the largest count
    under SATURATED_MS).

    A coarse pass runs each point once (COARSE_SECS long), on one server,
    until it saturates.
    Then each threshold is settled with medians of RUNS runs, each point on
    a fresh server (a saturated run leaves a backlog behind): starting from
    the coarse estimate, step down while the median fails and up while the
    next point's median passes. Only the median's side of the limit matters,
    so a point stops once a majority of its RUNS runs fall on one side: the
    remaining runs could not move the median across."""
    def docs_for(typists):
        return 1 if per_doc is None else max(1, typists // per_doc)
    coarse = {}
    server = start()
    try:
        for typists in points:
            began = time.time()
            # Half-length runs: the coarse pass only says where to settle.
            coarse[typists] = p99_of(p1(server, name, typists, docs_for(typists), COARSE_SECS))
            print(f"  {name:13} typists={typists:5} docs={docs_for(typists):4} p99={coarse[typists]:8.1f} ms (coarse,"
                  f" {time.time() - began:.1f} s)", flush=True)
            if coarse[typists] >= SATURATED_MS:
                break
    finally:
        server.stop()
    runs_at = {}
    majority = RUNS // 2 + 1
    def under(i, limit):
        typists = points[i]
        runs = runs_at.setdefault(typists, [])
        def below():
            return sum(r < limit for r in runs)
        if max(below(), len(runs) - below()) < majority:
            began = time.time()
            server = start()
            try:
                while max(below(), len(runs) - below()) < majority:
                    runs.append(p99_of(p1(server, name, typists, docs_for(typists), secs)))
            finally:
                server.stop()
            verdict = f"< {limit:.0f} ms" if below() >= majority else f">= {limit:.0f} ms"
            print(f"  {name:13} typists={typists:5} docs={docs_for(typists):4} median p99 {verdict}"
                  f"  runs={[round(r, 1) for r in runs]} ({time.time() - began:.1f} s)", flush=True)
        return below() >= majority
    def last_under(limit):
        i = max((i for i, t in enumerate(points) if t in coarse and coarse[t] < limit), default=-1)
        while i >= 0 and not under(i, limit):
            i -= 1
        while i + 1 < len(points) and under(i + 1, limit):
            i += 1
        return points[i] if i >= 0 else 0
    best, saturation = last_under(P99_GOAL_MS), last_under(SATURATED_MS)
    # The curve: the median of the settling runs where there are any (at
    # least a majority of RUNS), the single coarse run elsewhere.
    curve = [(t, statistics.median(runs_at[t]) if runs_at.get(t) else coarse.get(t), len(runs_at.get(t, [])))
             for t in points if runs_at.get(t) or t in coarse]
    return best, saturation, curve


def idle_density(server, name, conns):
    import select
    before = server.rss_kb()
    # Held 2 s past `ready`: RSS is read 1.5 s after it.
    args = [BENCH, "idle", "--url", server.url, "--conns", str(conns), "--hold", "2"]
    if name == "floor":
        args.append("--floor")
    proc = subprocess.Popen(pinned(LOADGEN_CPU, args), stdout=subprocess.PIPE, text=True)
    # Opening 15k connections takes the Node server over a minute; samod
    # 0.16 does not get there within minutes (reported as not measured).
    ready, _, _ = select.select([proc.stdout], [], [], 240)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("ready"):
        proc.kill()
        proc.wait()
        return float("nan")
    time.sleep(1.5)
    after = server.rss_kb()
    # Connections the server dropped meanwhile would flatter it.
    if proc.wait(timeout=60) != 0:
        print(f"  {name}: idle connections were closed by the server", flush=True)
        return float("nan")
    return (after - before) * 1024 / conns


def main():
    hot_points = [2, 4, 8] if QUICK else [2, 4, 8, 16, 24, 32, 48, 56, 64, 80, 96, 128, 192, 256]
    many_points = [8, 16] if QUICK else [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    secs = 1 if QUICK else 2
    # P2 at two sizes: every server at the smaller one; ours and the floor
    # also at the larger, which samod and the Node server do not reach
    # within minutes (see the issue notes).
    conns = (200, 400) if QUICK else (2000, 15000)
    results = {}
    for name, start in servers():
        section(name)
        r = {}
        # A fresh server per sweep: a sweep ends by overloading the server,
        # and its backlog must not spill into the next one.
        for key, per_doc, points in (("hot", None, hot_points), ("many", 4, many_points)):
            r[key], r[key + "_sat"], r[key + "_curve"] = sweep(start, name, per_doc, points, secs)
        if name == "converge-full":
            # Idle connections do not depend on how documents are held.
            r["idle_bytes"] = r["idle_bytes_large"] = float("nan")
            results[name] = r
            continue
        # Idle density on a fresh process each run: RSS grown by the
        # typing runs would hide what connections cost.
        for key, count in (("idle_bytes", conns[0]), ("idle_bytes_large", conns[1])):
            if key == "idle_bytes_large" and name in ("samod", "node"):
                r[key] = float("nan")
                continue
            began = time.time()
            runs = []
            for _ in range(RUNS):
                server = start()
                try:
                    v = idle_density(server, name, count)
                finally:
                    server.stop()
                # A failed run (the server dropped or refused connections)
                # is left out and shows in the printed runs.
                if v == v:
                    runs.append(v)
            r[key] = statistics.median(runs) if len(runs) * 2 > RUNS else float("nan")
            print(f"  {name:9} idle: median {r[key] / 1024:.1f} KiB per connection ({count} connections,"
                  f" runs={[round(v / 1024, 1) for v in runs]} KiB, {time.time() - began:.0f} s)", flush=True)
        results[name] = r
    extra = other_scenarios()
    write_report(results, hot_points, many_points, secs, conns, extra)
    if QUICK:
        for name, r in results.items():
            # The Node server's 100 ms sync throttle keeps its p99 above the goal.
            if r["hot"] == 0 and name != "node":
                sys.exit(f"smoke: {name} carried no typists at p99 < {P99_GOAL_MS} ms")


TRACE_CRATE = "https://static.crates.io/crates/loro-internal/loro-internal-1.17.1.crate"
TRACE_MEMBER = "loro-internal-1.17.1/benches/automerge-paper.json.gz"


def editing_trace():
    """The editing trace as [[pos, del, text], ...], fetched once from the
    crates registry (loro-internal ships it) and cached next to the build."""
    import gzip
    import tarfile
    import urllib.request
    cache = os.path.join(TARGET, "bench-data")
    out = os.path.join(cache, "automerge-paper.patches.json")
    if os.path.exists(out):
        return out
    os.makedirs(cache, exist_ok=True)
    crate = os.path.join(cache, "loro-internal.crate")
    urllib.request.urlretrieve(TRACE_CRATE, crate)
    with tarfile.open(crate, "r:gz") as tar:
        data = json.load(gzip.open(tar.extractfile(TRACE_MEMBER)))
    patches = [p for txn in data["txns"] for p in txn["patches"]]
    with open(out + ".tmp", "w") as fh:
        json.dump(patches, fh)
    os.replace(out + ".tmp", out)
    return out


def run_json(argv, timeout=600):
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip()[-400:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_of(runs, key):
    return statistics.median(r[key] for r in runs)


def other_scenarios():
    extra = {}
    n = 1 if QUICK else RUNS
    try:
        trace = editing_trace()
    except Exception as e:  # no network: say so in the report
        trace = None
        extra["trace_error"] = str(e)
    if trace:
        section("p7: editing trace through Converge vs raw automerge")
        edits = "2000" if QUICK else "20000"
        # Pinned to one core: every thread of the repo (actor, storage)
        # shares it, so the figure is all the work Converge adds.
        runs = [run_json(pinned(SERVER_CPU, [BENCH, "trace", "--file", trace, "--edits", edits]))
                for _ in range(n)]
        extra["p7"] = {"edits": runs[0]["edits"], "raw": median_of(runs, "raw_us_per_edit"),
                       "ours": median_of(runs, "ours_us_per_edit"), "ratio": median_of(runs, "ratio"),
                       "awaited": median_of(runs, "awaited_us_per_edit"),
                       "on_runtime": median_of(runs, "on_runtime_us_per_edit"),
                       "on_runtime_ratio": median_of(runs, "on_runtime_ratio")}
        print(f"  {extra['p7']}", flush=True)
        section("p3: reconnect after divergence")
        base = "2000" if QUICK else "20000"
        # Bytes and round trips are the same every run; the times are medians.
        runs = [run_json(pinned(LOADGEN_CPU, [BENCH, "reconnect", "--file", trace, "--base", base,
                                              "--n", "1,10,100,1000"])) for _ in range(n)]
        extra["p3"] = runs[0]
        for i, row in enumerate(extra["p3"]["rows"]):
            row["ms"] = statistics.median(r["rows"][i]["ms"] for r in runs)
            if any(r["rows"][i]["bytes"] != row["bytes"] for r in runs):
                print(f"  p3: bytes differ between runs for {row}", flush=True)
    section("p4: durable appends: Converge vs RocksDB alone")
    p4 = []
    for writers in (1, 64):
        for sync in (True, False):
            argv = [SERVER, "bench-storage", "--dir", tempfile.mkdtemp(prefix="bench-p4-"),
                    "--writers", str(writers), "--secs", "1"]
            if not sync:
                argv.append("--no-sync")
            runs = [run_json(pinned(SERVER_CPU, argv)) for _ in range(n)]
            row = {"writers": writers, "sync": sync, "rocksdb": median_of(runs, "rocksdb_per_sec"),
                   "ours": median_of(runs, "converge_per_sec"), "ratio": median_of(runs, "ratio")}
            print(f"  {row}", flush=True)
            p4.append(row)
    extra["p4"] = p4
    section("p6: many documents, bounded memory")
    extra["p6"] = many_documents()
    print(f"  {extra['p6']}", flush=True)
    section("p5: cold start with 10k stored documents")
    extra["p5"] = {name: cold_start(name, 1000 if QUICK else 10000, n) for name in ("converge", "samod", "node")}
    print(f"  {extra['p5']}", flush=True)
    if trace:
        section("p5: cold start with 10 documents of the whole editing trace")
        extra["p5_large"] = cold_start_large(trace, n)
        print(f"  {extra['p5_large']}", flush=True)
    section("p8: FFI overhead: Python bindings vs the same Rust calls")
    extra["p8"] = ffi_overhead(n)
    print(f"  {extra['p8']}", flush=True)
    return extra


def ffi_overhead(runs):
    """P8: the release library's Python bindings (generated here from the
    library itself, as uniffi requires) against the same calls from Rust
    (`bindings/examples/ffi_overhead.rs`), each pinned to the same core."""
    calls = "2000" if QUICK else "10000"
    py_dir = tempfile.mkdtemp(prefix="bench-p8-")
    try:
        subprocess.run([BINDGEN, "generate", "--library", FFI_LIB, "--language", "python",
                        "--no-format", "--out-dir", py_dir], check=True, capture_output=True)
        shutil.copy(FFI_LIB, py_dir)
        rows = []
        for _ in range(runs):
            rust = subprocess.run(pinned(SERVER_CPU, [FFI_EXAMPLE, calls]), check=True,
                                  capture_output=True, text=True).stdout.strip().splitlines()[-1]
            py = subprocess.run(pinned(SERVER_CPU, [sys.executable, os.path.join(ROOT, "bindings", "python",
                                                                                "bench_ffi.py"), "--json", rust]),
                                check=True, capture_output=True, text=True,
                                env=dict(os.environ, CONVERGE_PY_DIR=py_dir))
            rows.append(json.loads(py.stdout.strip().splitlines()[-1]))
        out = {"calls": int(calls)}
        for call in ("text splice", "path set", "url (no-op)"):
            out[call] = {side: statistics.median(r[call][side] for r in rows)
                         for side in ("python_us", "rust_us")}
        return out
    finally:
        shutil.rmtree(py_dir, ignore_errors=True)


def many_documents():
    """QUALITY.md P6. Converge: 1M small documents stored (written straight
    into its RocksDB by `converge-server bench-populate`), then 10k touched
    (each asked for by a client), then 20k more: with the default hot set of
    10k documents, memory must stop growing. The peers get 20k documents in
    their NodeFS layout and PEER_TOUCH_SECS to touch up to 10k (they are
    much slower to load documents); their figure is memory per touched
    document. Each figure is the median of RUNS runs, each on a fresh server
    over the same stored documents."""
    stored = 20_000 if QUICK else 1_000_000
    first, more = (2_000, 4_000) if QUICK else (10_000, 20_000)
    out = {}
    for name in ("converge", "samod", "node"):
        data = tempfile.mkdtemp(prefix=f"bench-p6-{name}-")
        began = time.time()
        try:
            if name == "converge":
                run_json([SERVER, "bench-populate", "--dir", data, "--docs", str(stored)], timeout=900)
            else:
                run_json([BENCH, "populate-files", "--dir", data, "--docs", "20000"], timeout=900)
            populated = time.time() - began
            row_count = stored if name == "converge" else 20_000
            runs = []
            for _ in range(RUNS):
                if name == "converge":
                    server = converge_server("converge", "change-log", 3139, data_dir=data)
                else:
                    server = (samod_server if name == "samod" else node_server)(3139, data_dir=data)
                try:
                    time.sleep(1)
                    # A warm-up on other documents first, so the figure is
                    # what each further document costs, not the first
                    # document's one-off allocations (and JIT) spread thin.
                    run_json(pinned(LOADGEN_CPU, [BENCH, "touch", "--url", server.url, "--from",
                                                  str(row_count - P6_WARMUP), "--count", str(P6_WARMUP)]),
                             timeout=900)
                    run = {"rss_start_kb": server.rss_kb()}
                    touch = run_json(pinned(LOADGEN_CPU, [
                        BENCH, "touch", "--url", server.url, "--count", str(first),
                        "--max-secs", "600" if name == "converge" else str(PEER_TOUCH_SECS)]), timeout=900)
                    run.update(touched=touch["touched"], rate=touch["touched"] / touch["secs"],
                               rss_touched_kb=server.rss_kb(), error=touch.get("error"))
                    run["per_doc_kb"] = ((run["rss_touched_kb"] - run["rss_start_kb"]) / run["touched"]
                                         if run["touched"] else float("nan"))
                    if name == "converge":
                        touch = run_json(pinned(LOADGEN_CPU, [BENCH, "touch", "--url", server.url, "--from",
                                                              str(stored // 2), "--count", str(more)]), timeout=900)
                        run.update(touched_more=touch["touched"], rss_more_kb=server.rss_kb())
                    runs.append(run)
                finally:
                    server.stop()
            row = {"stored": row_count,
                   "error": next((r["error"] for r in runs if r.get("error")), None)}
            for key in ("rss_start_kb", "touched", "rate", "rss_touched_kb", "per_doc_kb", "touched_more", "rss_more_kb"):
                if key in runs[0]:
                    row[key] = statistics.median(r[key] for r in runs)
            out[name] = row
            print(f"  {name}: per touched document {[round(r['per_doc_kb'], 1) for r in runs]} KiB,"
                  f" touched {[r['touched'] for r in runs]} (populated in {populated:.0f} s,"
                  f" {time.time() - began:.0f} s in all)", flush=True)
        finally:
            shutil.rmtree(data, ignore_errors=True)
    return out


def cold_start_large(trace, runs):
    """10 documents, each the whole editing trace (a change per keystroke),
    stored as snapshots; process start to the first reply, which carries
    the whole document. Floors: `Automerge::load` of the saved bytes, and
    load plus bare automerge's answer to a peer that has nothing."""
    nodefs = tempfile.mkdtemp(prefix="bench-p5l-nodefs-")
    rocks = tempfile.mkdtemp(prefix="bench-p5l-converge-")
    saved = os.path.join(rocks, "trace.am")
    try:
        floor = run_json(pinned(SERVER_CPU, [BENCH, "large-doc", "--file", trace, "--out", saved, "--nodefs", nodefs,
                                             "--docs", "10", "--tag", "7"]
                                + (["--edits", "20000"] if QUICK else [])), timeout=900)
        data = os.path.join(rocks, "db")
        run_json([SERVER, "bench-populate", "--dir", data, "--docs", "10", "--set", "7", "--doc-file", saved])
        out = {"bytes": floor["bytes"], "edits": floor["edits"], "load_ms": floor["load_ms"],
               "reply_floor_ms": floor["load_and_reply_ms"],
               "in_process_ms": floor["change_log_load_and_reply_ms"]}
        for name, port in (("converge", 3156), ("converge-full", 3156), ("samod", 3157), ("node", 3158)):
            argv = {"converge": converge_argv(port, data),
                    "converge-full": converge_argv(port, data, "full-document"),
                    "samod": samod_argv(port, nodefs),
                    "node": node_argv(port, nodefs)}[name]
            out[name] = first_reply_ms(argv, f"ws://127.0.0.1:{port}", [(i % 10, 7) for i in range(runs)])
        return out
    finally:
        shutil.rmtree(nodefs, ignore_errors=True)
        shutil.rmtree(rocks, ignore_errors=True)


def cold_start(name, docs, runs):
    """Store `docs` documents for a server, then start it `runs` times and
    time process start to the first reply carrying a stored document.
    Converge is populated through the protocol; the Node server and samod
    share the NodeFS layout, written directly (`converge-bench
    populate-files`): uploading 10k documents through the Node server's
    sync throttle takes minutes."""
    data = tempfile.mkdtemp(prefix=f"bench-p5-{name}-")
    port = {"converge": 3135, "node": 3136, "samod": 3138}[name]
    url = f"ws://127.0.0.1:{port}"
    if name == "converge":
        server = converge_server("converge", "change-log", port, data_dir=data)
        try:
            run_json(pinned(LOADGEN_CPU, [BENCH, "populate", "--url", url, "--docs", str(docs)]), timeout=900)
        finally:
            server.proc.send_signal(signal.SIGTERM)
            server.proc.wait(timeout=60)
    else:
        run_json([BENCH, "populate-files", "--dir", data, "--docs", str(docs)], timeout=900)
    argv = {"converge": converge_argv(port, data), "node": node_argv(port, data),
            "samod": samod_argv(port, data)}[name]
    try:
        return first_reply_ms(argv, url, [((i * 997) % docs, 5) for i in range(runs)])
    finally:
        shutil.rmtree(data, ignore_errors=True)


def first_reply_ms(argv, url, asks):
    """Median over `asks` ((doc, tag) pairs, one run each) of the time from
    starting the server process to the first reply carrying that document."""
    times = []
    for doc, tag in asks:
        t0 = time.time()
        proc = subprocess.Popen(pinned(SERVER_CPU, argv), cwd=JS_DIR,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            run_json(pinned(LOADGEN_CPU, [BENCH, "first-reply", "--url", url, "--doc", str(doc),
                                          "--tag", str(tag)]))
            times.append((time.time() - t0) * 1000)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    return statistics.median(times)


def ratio(a, b):
    if not b or a != a or b != b:
        return "n/a"
    r = a / b
    return f"{r:.2f}×" if r >= 0.1 else f"{r:.3g}×"


def write_report(results, hot_points, many_points, secs, conns, extra):
    c, cf, sm, n, f = (results[k] for k in ("converge", "converge-full", "samod", "node", "floor"))
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    def cap(v, points):
        if v != v:
            return "—"
        return f"≥ {v} (sweep ceiling)" if v == points[-1] else str(v)
    def kib(v):
        return "—" if v != v else f"{v / 1024:.1f} KiB"
    def row(label, key, points):
        return (f"| {label} | {cap(c[key], points)} | {cap(cf[key], points)} | {cap(sm[key], points)} | "
                f"{cap(n[key], points)} | {cap(f[key], points)} | {ratio(c[key], sm[key])} | "
                f"{ratio(c[key], n[key])} | {ratio(c[key], f[key])} |")
    def idle_row(label, key):
        return (f"| {label} | {kib(c[key])} | — | {kib(sm[key])} | {kib(n[key])} | {kib(f[key])} | "
                f"{ratio(c[key], sm[key])} | {ratio(c[key], n[key])} | {ratio(c[key], f[key])} |")
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (bench/run.py). Rerun it to reproduce; ratios are",
        f"medians of {RUNS} runs, measured in the same run. P1 sweeps each server once (one",
        f"{COARSE_SECS} s run per point, until it saturates), then settles each threshold with the median of {RUNS}",
        "runs per point on a fresh server, stepping down while the median fails and up while the next",
        f"point's passes. A point stops as soon as {RUNS // 2 + 1} of its runs fall on the same side of the limit:",
        "the rest could not move the median across it, so the verdict is that of all",
        f"{RUNS}; the table below gives the median of the runs made.",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}.",
        "Server pinned to CPU 1, load generator to CPU 0 (`taskset`).",
        "",
        "## P1 live typing and P2 idle connections",
        "",
        "\"Converge\" is the relay as it ships (change-log replica); \"full-document\" is the",
        "same relay holding every document as a full Automerge document (`--replica full-document`).",
        "Ratios compare the shipped relay. samod 0.16 (crates.io) runs as `bench/samod-relay`: axum",
        "WebSocket, its filesystem storage, default share policy except that it does not announce",
        "documents (as the Node server does not).",
        "",
        "| Scenario | Converge | Converge full-document | samod | Node reference server | floor (broadcast relay) | ours / samod | ours / node | ours / floor |",
        "|---|---|---|---|---|---|---|---|---|",
        row("P1a typists on one hot document at p99 < 100 ms", "hot", hot_points),
        row("P1a saturation: typists on one document at p99 < 1 s", "hot_sat", hot_points),
        row("P1b total typists, 4 per document, at p99 < 100 ms", "many", many_points),
        row("P1b saturation: total typists at p99 < 1 s", "many_sat", many_points),
        idle_row(f"P2 memory per idle connection ({conns[0]:,} connections, each following a document)", "idle_bytes"),
        idle_row(f"P2 memory per idle connection ({conns[1]:,} connections)", "idle_bytes_large"),
        "",
        f"P1: each typist makes one Automerge change per keystroke, {RATE:g} keystrokes/s, and every other client",
        "of the document must receive it; the delay is from the typist's send to each",
        f"receipt; a delivery missing {DRAIN_S:g} s after the typists stop ranks as later than any",
        f"other (so more than 1% missing fails). Each settling run measures {secs} s after 0.5 s of warm-up.",
        "The load generator keeps only the change",
        "graph's frontier (it parses changes, it does not apply them), so it measures",
        "the server rather than itself. A figure marked as the sweep ceiling means the",
        "server never crossed the goal within the sweep. The Node server sends sync",
        "messages through automerge-repo's 100 ms throttle, so its p99 sits near 100 ms",
        "even when idle; its saturation row is the fairer comparison.",
        "",
        "A typist's changes depend only on its own earlier ones (the load generator does not",
        "apply what it receives), so every sync message names one head per typist of the",
        "document and the work per keystroke grows with the square of the typists: the worst",
        "case for every server alike (real editors merge before they type and name 1–3 heads).",
        f"At saturation the floor, a relay that only forwards bytes, carries {ratio(f['hot_sat'], n['hot_sat'])}",
        f"the Node server's typists on one document and {ratio(f['many_sat'], n['many_sat'])} over many",
        "documents: what any relay can reach here, measured with this load generator.",
        "",
        f"P2: median of {RUNS} runs per server and size, each on a fresh server: N clients each join and sync one document, then stay idle",
        "(answering pings); the figure is the server's RSS growth divided by N, and the run fails if",
        f"the server dropped any connection. samod and the Node server are measured at {conns[0]:,}:",
        f"neither accepts {conns[1]:,} connections within the bench's 4-minute wait.",
        "",
        "### p99 delay against typists (one document)",
        "",
        "| typists | " + " | ".join(results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for t in hot_points:
        cells = []
        for r in results.values():
            point = {p[0]: p for p in r["hot_curve"]}.get(t)
            if point is None:
                cells.append("")
            else:
                v = "∞" if point[1] == float("inf") else f"{point[1]:.1f} ms"
                cells.append(v + (f" ({point[2]} runs)" if point[2] else " (1 run)"))
        if any(cells):
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += ["", "![p99 against typists](bench/p1-hot.png)", ""]
    if "p3" in extra:
        p3, n = extra["p3"], 1 if QUICK else RUNS
        lines += ["## P3 reconnect after divergence", "",
                  f"A client and a relay share a document of {p3['base_changes']} keystroke changes (the editing",
                  "trace's start) and are in sync; each side then gets n new keystroke changes and they",
                  "reconnect. Floor: the new changes' raw bytes plus 32 bytes per head. Measured in process",
                  "(`converge-bench reconnect`); the full-document relay is automerge's own sync code.",
                  f"Bytes and round trips are the same in every run; ms is the median of {n} runs.", "",
                  "| n each side | relay | sync state | bytes | round trips | floor bytes | bytes / floor | ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in p3["rows"]:
            lines.append(f"| {r['n']} | {r['relay']} | {r['state']} | {r['bytes']} | {r['round_trips']} | "
                         f"{r['floor_bytes']} | {r['ratio']:.2f}× | {r['ms']:.1f} |")
        lines.append("")
    if "p4" in extra:
        lines += ["## P4 durable appends", "",
                  "Changes per second, each acknowledged only once on disk (`converge-server bench-storage`):",
                  "Converge writers each make a change on their own document and wait for `DocHandle::saved`;",
                  "RocksDB alone: the same number of threads putting 100-byte values (`WriteOptions::set_sync`",
                  "when syncing), on the same disk.", "",
                  "| writers | fsync | Converge changes/s | RocksDB puts/s | ours / RocksDB |", "|---|---|---|---|---|"]
        for r in extra["p4"]:
            lines.append(f"| {r['writers']} | {'yes' if r['sync'] else 'no'} | {r['ours']:.0f} | {r['rocksdb']:.0f} | {r['ratio']:.2f}× |")
        lines.append("")
    if "p5" in extra:
        p5 = extra["p5"]
        lines += ["## P5 cold start", "",
                  "Process start to the first reply carrying a stored document, with 10,000 small documents",
                  "stored (Converge: uploaded through the protocol, then restarted; samod and the Node server:",
                  "written in their shared NodeFS layout by `converge-bench populate-files`).",
                  "The Node server's figure is bimodal: its WebSocket server listens before automerge-repo has",
                  "hooked its adapter up, and a connection accepted in between hangs until the adapter's 5 s",
                  "keep-alive drops it; the client then reconnects. Single runs land near 0.5 s or near 5.5 s,",
                  "and the median of 5 falls on either side from one `make bench` to the next.",
                  "",
                  "| Converge | samod | Node reference server | ours / samod | ours / node |", "|---|---|---|---|---|",
                  f"| {p5['converge']:.0f} ms | {p5['samod']:.0f} ms | {p5['node']:.0f} ms | "
                  f"{ratio(p5['converge'], p5['samod'])} | {ratio(p5['converge'], p5['node'])} |", ""]
    if "p5_large" in extra:
        pl = extra["p5_large"]
        lines += [f"Large documents: 10 documents, each the editing trace ({pl['edits']:,} keystroke changes, "
                  f"{pl['bytes']:,} bytes saved),",
                  "stored as snapshots; process start to the first reply, which carries the whole document",
                  "(the client announces version-2 messages, so servers send a saved document). Floors:",
                  "`Automerge::load` of the bytes, and load plus bare automerge's reply to a peer that has nothing;",
                  "\"in-process\" is Converge's change log loading the bytes and answering, without process start",
                  "and storage.", "",
                  "| Converge | Converge full-document | samod | Node reference server | `Automerge::load` | load + reply | Converge in-process | ours / samod | ours / node | ours / load | ours / (load + reply) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|",
                  f"| {pl['converge']:.0f} ms | {pl['converge-full']:.0f} ms | {pl['samod']:.0f} ms | {pl['node']:.0f} ms | "
                  f"{pl['load_ms']:.0f} ms | {pl['reply_floor_ms']:.0f} ms | {pl['in_process_ms']:.0f} ms | "
                  f"{ratio(pl['converge'], pl['samod'])} | {ratio(pl['converge'], pl['node'])} | "
                  f"{ratio(pl['converge'], pl['load_ms'])} | {ratio(pl['converge'], pl['reply_floor_ms'])} |", ""]
    if "p6" in extra:
        p6 = extra["p6"]
        def mib(kb):
            return f"{kb / 1024:.0f} MiB"
        def per_doc(r):
            return f"{r['per_doc_kb']:.1f} KiB" if r["per_doc_kb"] == r["per_doc_kb"] else "—"
        lines += ["## P6 many documents, bounded memory", "",
                  f"Server RSS with many documents stored: at start (after a warm-up touching {P6_WARMUP} other documents), after clients have asked for N of them",
                  "(100 per connection, 4 connections at a time), and for Converge after 20k more (its hot set",
                  "is 10k documents by default: `--max-docs-in-memory`; colder ones are dropped and re-read",
                  "when asked for). Converge's documents are written into its RocksDB directly",
                  "(`converge-server bench-populate`); samod and the Node server get 20k documents in their",
                  f"NodeFS layout and {PEER_TOUCH_SECS} s to touch up to 10k. Medians of {RUNS} runs, each on a fresh",
                  "server over the same stored documents.", "",
                  "| server | stored | touched | touch rate | RSS at start | RSS after touching | per touched doc | RSS after 20k more |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in p6.items():
            more = mib(r["rss_more_kb"]) if "rss_more_kb" in r else "—"
            note = f" (stopped: {r['error'][:60]})" if r.get("error") else ""
            lines.append(f"| {name} | {r['stored']:,} | {r['touched']:,.0f}{note} | {r['rate']:.0f}/s | {mib(r['rss_start_kb'])} | "
                         f"{mib(r['rss_touched_kb'])} | {per_doc(r)} | {more} |")
        lines.append("")
    if "p7" in extra:
        p7 = extra["p7"]
        lines += ["## P7 core overhead on the editing trace", "",
                  f"The first {p7['edits']} keystrokes of the editing trace, one change each: raw automerge",
                  "(a transaction per keystroke) against a Converge repo with in-memory storage, each",
                  "keystroke a `DocHandle::change`. \"Queued\": keystrokes handed over as they come, results",
                  "collected behind (at most 256 outstanding), as an editor would; the repo applies a run of",
                  "queued edits as one batch (one save, one sync per peer). The caller queues either from its",
                  "own thread, outside the repo's runtime (a UI thread, or a Kotlin/Swift/Python caller), or",
                  "as a task on that runtime (async Rust embedding the core): from its own thread every",
                  "keystroke wakes the actor on another thread, so the two take turns on the one core.",
                  "\"Awaited\": each change's result awaited before the next (a round trip through the",
                  "repo's actor). One core for everything (`taskset`), so storage work (incremental saves,",
                  "compaction) counts too.", "",
                  "| raw automerge µs/keystroke | Converge queued from a thread µs/keystroke | ours / raw | Converge queued from a task µs/keystroke | ours / raw | Converge awaited µs/keystroke |",
                  "|---|---|---|---|---|---|",
                  f"| {p7['raw']:.1f} | {p7['ours']:.1f} | {p7['ratio']:.2f}× | {p7['on_runtime']:.1f} | "
                  f"{p7['on_runtime_ratio']:.2f}× | {p7['awaited']:.1f} |", ""]
    if "p8" in extra:
        p8 = extra["p8"]
        lines += ["## P8 FFI overhead", "",
                  f"Per call, {p8['calls']:,} calls each on an in-memory repo, release library: the generated",
                  "Python module (uniffi) against the same calls from Rust (`bindings/examples/ffi_overhead.rs`).",
                  "\"url\" does no work, so it is the bare cost of a crossing.", "",
                  "| call | Python µs | Rust µs | overhead µs | Python / Rust |", "|---|---|---|---|---|"]
        for call in ("text splice", "path set", "url (no-op)"):
            r = p8[call]
            lines.append(f"| {call} | {r['python_us']:.2f} | {r['rust_us']:.2f} | "
                         f"{r['python_us'] - r['rust_us']:.2f} | {r['python_us'] / r['rust_us']:.2f}× |")
        lines.append("")
    if "trace_error" in extra:
        lines += [f"P3 and P7 were not measured: the editing trace could not be fetched ({extra['trace_error']}).", ""]
    lines += ["The editing trace is Martin Kleppmann's automerge-perf LaTeX-paper trace (CC-BY 4.0),",
              "fetched at bench time from the crates-registry package `loro-internal` 1.17.1",
              "(`benches/automerge-paper.json.gz`).", "",
              "See the issue notes for what limits each figure.", ""]
    out = os.path.join(ROOT, "BENCHMARKS.md" if not QUICK else os.path.join(TARGET, "BENCHMARKS.smoke.md"))
    with open(out, "w") as fh:
        fh.write("\n".join(lines))
    print(f"wrote {out}")
    try:
        plot(results, os.path.join(ROOT, "bench", "p1-hot.png") if not QUICK else None)
    except ImportError:
        print("matplotlib missing: no plot")


def plot(results, path):
    if not path:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        xs = [t for t, v, _ in r["hot_curve"] if v != float("inf")]
        ys = [v for t, v, _ in r["hot_curve"] if v != float("inf")]
        ax.plot(xs, ys, marker="o", label=name)
    ax.axhline(P99_GOAL_MS, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"typists on one document ({RATE:g} keystrokes/s each)")
    ax.set_ylabel("p99 delivery delay (ms)")
    ax.set_title("P1 live-typing fan-out")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    if sys.argv[1:] == ["p8"]:
        # `make bench-ffi`: P8 alone.
        for call, r in ffi_overhead(RUNS).items():
            print(f"{call}: {r}")
    else:
        main()
