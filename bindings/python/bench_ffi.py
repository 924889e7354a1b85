"""QUALITY.md P8: the cost of a call through the Python bindings.

Times a text splice and a path set through the generated module, the same
calls `examples/ffi_overhead.rs` makes from Rust, and prints both per-call
figures and the difference (the FFI overhead).

    python3 bindings/python/bench_ffi.py [--json] RUST_JSON [calls]

RUST_JSON is the line the Rust example printed; CONVERGE_PY_DIR names the
folder with the generated module and library. With --json the figures are
printed as one JSON line (for bench/run.py) instead of a table.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.environ.get("CONVERGE_PY_DIR", os.path.join(os.path.dirname(__file__), "generated")))

import converge_ffi  # noqa: E402


def per_call_us(fn, calls):
    start = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - start) * 1e6 / calls


def main():
    args = sys.argv[1:]
    as_json = "--json" in args
    args = [a for a in args if a != "--json"]
    rust = json.loads(args[0])
    calls = int(args[1]) if len(args) > 1 else rust["calls"]
    repo = converge_ffi.Repo.in_memory()
    ctx = repo.create(json.dumps({"text": "", "n": 0}))
    for i in range(1000):
        ctx.splice("/text", i, 0, "w")
    splice = per_call_us(lambda i: ctx.splice("/text", 1000 + i, 0, "a"), calls)
    set_ = per_call_us(lambda i: ctx.set_json("/n", str(i)), calls)
    url = per_call_us(lambda i: ctx.url(), calls)
    rows = [
        ("text splice", splice, rust["splice_us"]),
        ("path set", set_, rust["set_us"]),
        ("url (no-op)", url, rust["url_us"]),
    ]
    if as_json:
        print(json.dumps({name: {"python_us": py, "rust_us": rs} for name, py, rs in rows} | {"calls": calls}))
        return
    print(f"P8 FFI overhead ({calls} calls each, in-memory repo)")
    print(f"{'call':<12} {'python µs':>10} {'rust µs':>10} {'overhead µs':>12} {'ratio':>7}")
    for name, py, rs in rows:
        print(f"{name:<12} {py:>10.2f} {rs:>10.2f} {py - rs:>12.2f} {py / rs:>7.2f}")


if __name__ == "__main__":
    main()
