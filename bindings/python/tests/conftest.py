"""Fixtures: the generated module and a real relay process."""
import os
import re
import subprocess
import sys
import tempfile
import threading

import pytest

sys.path.insert(0, os.environ.get("CONVERGE_PY_DIR", os.path.join(os.path.dirname(__file__), "..", "generated")))


@pytest.fixture(scope="session")
def converge():
    import converge_ffi

    return converge_ffi


def start_relay(*extra):
    """Starts converge-server on a free port with a fresh data dir; returns (process, ws:// URL)."""
    binary = os.environ["CONVERGE_SERVER_BIN"]
    data = tempfile.mkdtemp(prefix="converge-py-")
    proc = subprocess.Popen(
        [binary, "--listen", "127.0.0.1:0", "--data-dir", data, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    url = None
    for line in proc.stdout:
        match = re.search(r"ws://[0-9.]+:[0-9]+", line)
        if match:
            url = match.group(0)
            break
    assert url, "the relay did not report its address"
    # Keep draining its log so it never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, url


@pytest.fixture()
def relay():
    """An open relay (no key); yields its ws:// URL."""
    proc, url = start_relay()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture()
def secure_relay():
    """A relay that checks HS256 tokens; yields (ws:// URL, mint) where
    mint(sub, *flags) runs `converge-server token` with that secret."""
    secret = os.path.join(tempfile.mkdtemp(prefix="converge-secret-"), "secret")
    with open(secret, "wb") as f:
        f.write(os.urandom(32).hex().encode())
    proc, url = start_relay("--jwt-secret-file", secret)

    def mint(sub, *flags):
        out = subprocess.run(
            [os.environ["CONVERGE_SERVER_BIN"], "token", "--secret-file", secret, "--sub", sub, *flags],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()

    yield url, mint
    proc.terminate()
    proc.wait(timeout=10)
