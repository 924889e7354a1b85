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


@pytest.fixture()
def relay():
    """Starts converge-server on a free port with a fresh data dir; yields its ws:// URL."""
    binary = os.environ["CONVERGE_SERVER_BIN"]
    data = tempfile.mkdtemp(prefix="converge-py-")
    proc = subprocess.Popen(
        [binary, "--listen", "127.0.0.1:0", "--data-dir", data],
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
    yield url
    proc.terminate()
    proc.wait(timeout=10)
