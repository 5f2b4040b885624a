"""The browser client's own tests (web/test/, node's test runner) and the committed bundle.

- ``node --test``: every vector of tests/vectors/ and the examples of docs/protocol.md, recomputed
  by the JavaScript implementation, its core driven through an in-memory relay, and its WebSocket
  shell against a scripted relay (close-code policy, backoff, heartbeats, liveness).
- The bundle under rescue/tokenservice/web/ is what ``just web`` builds from web/ and its lock
  file: rebuilt into a temporary directory here, it must be byte-identical to the committed one
  (so nobody ships a stale or hand-edited bundle, and the build is reproducible).
"""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

NODE_TIMEOUT_S = 300
BUNDLE = Path(__file__).resolve().parent.parent / "rescue" / "tokenservice" / "web"


def test_node_test_runner(node_web: Path) -> None:
    result = subprocess.run(
        ["node", "--test", "test/"], cwd=node_web, capture_output=True, text=True, timeout=NODE_TIMEOUT_S
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout


def test_committed_bundle_is_the_build_of_the_lock_file(node_web: Path, tmp_path: Path) -> None:
    out = tmp_path / "web"
    subprocess.run(["node", "build.mjs", "--out", str(out)], cwd=node_web, check=True, timeout=NODE_TIMEOUT_S)
    built = sorted(p.name for p in out.iterdir())
    assert built == sorted(p.name for p in BUNDLE.iterdir()), "run `just web` and commit the bundle"
    _, mismatch, errors = filecmp.cmpfiles(out, BUNDLE, built, shallow=False)
    assert (mismatch, errors) == ([], []), f"stale bundle: {mismatch}; run `just web` and commit it"
