"""The suite collects the same tests every time. CI runs it on two pytest-xdist workers, each
collecting on its own, and aborts ("Different tests were collected between gw0 and gw1") if a test
id differs: an id made from bytes holding a timestamp (a gzip header), random data, a temporary
path, an object's address or the order of a set under another hash seed. This collects twice, in
separate processes more than a second apart and with different hash seeds, and compares."""

import os
import subprocess
import sys
import time

from conftest import ROOT

THIS = os.path.relpath(os.path.abspath(__file__), ROOT)


def collect(hash_seed: str) -> list[str]:
    """The node ids `pytest --collect-only` finds in the repository's tests, this file left out
    (collecting it would not run it, but a run of the inner pytest must never start this test)."""
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_ADDOPTS", None)
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             f"--ignore={THIS}"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)  # a hang guard: collecting takes ~5 s here
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_two_collections_find_the_same_test_ids():
    began = time.monotonic()
    first = collect("1")
    time.sleep(max(0.0, began + 1.1 - time.monotonic()))  # another second on the clock for the second
    second = collect("2")
    assert first, "nothing collected"
    assert first == second, sorted(set(first) ^ set(second))
