"""The relays a run can measure, how to start each one, and token minting for the real relay.

Every target is a separate process (so its CPU and memory can be read from ``/proc/<pid>``) that
listens on 127.0.0.1 and prints ``READY port=<n>`` on stdout when it accepts connections. With
``bench.run --tls`` every target that can serves TLS (``--tls-cert/--tls-key``, a self-signed
certificate made for the run: :func:`create_tls`); the others are left out of that run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

if TYPE_CHECKING:
    from rescue.testing import SelfSignedTLS as TLSMaterial

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
REFS: Final = HERE / "references"
# Longest a target may take from exec to READY (imports, binding).
START_TIMEOUT_S: Final = 30.0
# Longest a target may take to exit after SIGTERM before it is killed.
STOP_TIMEOUT_S: Final = 10.0
READY_RE: Final = re.compile(rb"READY port=(\d+)")


@dataclass(frozen=True)
class TargetDef:
    """A relay kind: ``role`` is ``ceiling`` (raw TCP), ``reference`` or ``target`` (the real relay)."""

    name: str
    transport: str  # tcp | ws | rescue
    role: str
    argv: tuple[str, ...]
    path: str = "/"
    needs_keys: bool = False
    # how to start it serving TLS (``--tls-cert/--tls-key`` are appended); None: it cannot
    tls_argv: tuple[str, ...] | None = None


def _script(name: str) -> tuple[str, ...]:
    return (sys.executable, str(REFS / name))


def _rescue(name: str, role: str, *flags: str) -> TargetDef:
    """The real relay (``rescue_target.py``) run with ``flags``."""
    argv = (sys.executable, str(HERE / "rescue_target.py"), *flags)
    return TargetDef(name, "rescue", role, argv, path="/v1/connect", needs_keys=True, tls_argv=argv)


TARGETS: Final[dict[str, TargetDef]] = {
    "tcp": TargetDef("tcp", "tcp", "ceiling", _script("tcp_relay.py"), tls_argv=_script("tcp_relay.py")),
    "websockets": TargetDef(
        "websockets",
        "ws",
        "reference",
        _script("ws_websockets_relay.py"),
        tls_argv=_script("ws_websockets_relay.py"),
    ),
    "trio-websocket": TargetDef("trio-websocket", "ws", "reference", _script("ws_trio_websocket_relay.py")),
    # the fastest Python WebSocket server (Cython, callbacks, zero-copy): the peer to beat
    "picows": TargetDef(
        "picows", "ws", "reference", _script("ws_picows_relay.py"), tls_argv=_script("ws_picows_relay.py")
    ),
    "rescue": _rescue("rescue", "target"),
    # the real relay without the shared read poller (decision 0007's A/B): trio's own waits
    "rescue-trio-waits": _rescue("rescue-trio-waits", "context", "--read-coalesce", "off"),
    # the shared read poller without the quiet set: every connection looked at at once
    "rescue-no-quiet": _rescue("rescue-no-quiet", "context", "--quiet-after", "0"),
    # bare select.epoll, no framework, no framing: the floor of Python on this machine
    "epoll": TargetDef("epoll", "tcp", "context", _script("epoll_relay.py")),
}


# Before/after comparisons (docs/perf): RESCUE_BENCH_BASELINE=<a checkout of the old commit, e.g.
# a `git worktree`> adds `rescue-base`, that tree's relay run by its own bench/rescue_target.py
# with the same interpreter, so both commits are measured in one run on the same machine state.
# RESCUE_BENCH_COMPILED=<a tree with the hot path compiled, made by `scripts/compiled-tree DIR`> adds
# `rescue-compiled`, the relay as the wheel and the image ship it (decision 0022); `rescue` itself runs
# this checkout's source, which `./run`'s editable install keeps pure Python.
def _tree_target(name: str, tree: str) -> TargetDef:
    root = Path(tree).resolve()
    return TargetDef(
        name,
        "rescue",
        "context",
        ("env", f"PYTHONPATH={root}", sys.executable, str(root / "bench" / "rescue_target.py")),
        path="/v1/connect",
        needs_keys=True,
        # over TLS: this tree's target script (it has --tls-cert) importing that tree's relay
        tls_argv=(
            "env",
            f"PYTHONPATH={root}",
            f"RESCUE_TARGET_TREE={root}",
            sys.executable,
            str(HERE / "rescue_target.py"),
        ),
    )


for _name, _variable in (
    ("rescue-base", "RESCUE_BENCH_BASELINE"),
    ("rescue-compiled", "RESCUE_BENCH_COMPILED"),
):
    if os.environ.get(_variable):
        TARGETS[_name] = _tree_target(_name, os.environ[_variable])
# The reference every ratio is relative to (SPEC §10), and the ceiling.
BASELINE: Final = "websockets"
CEILING: Final = "tcp"
# The fastest Python peer (issue 15): every throughput cell also says how rescue compares to it.
BEST_PEER: Final = "picows"


@dataclass
class KeyMaterial:
    """A throwaway signing key for one run: the private JWK (loadgen) and the JWK set (relay)."""

    key_file: Path
    jwks_file: Path

    @classmethod
    def create(cls, directory: Path) -> KeyMaterial:
        from rescue.protocol._tokens import KeyRing, SigningKey

        directory.mkdir(parents=True, exist_ok=True)
        key = SigningKey.generate()
        key_file = directory / "bench-signing-key.json"
        jwks_file = directory / "bench-jwks.json"
        key_file.touch(mode=0o600)
        key_file.write_text(json.dumps(key.to_jwk(private=True)))
        jwks_file.write_text(json.dumps(KeyRing([key]).to_jwks()))
        return cls(key_file, jwks_file)


def make_minter(key_file: str, *, audience: str = "*") -> Callable[[str, str], bytes]:
    """``mint(session, role)``: a fresh token per connection, as the token service would issue."""
    from rescue._keyfiles import load_signing_key
    from rescue.protocol._tokens import mint_token

    key = load_signing_key(key_file)

    def mint(session: str, role: str) -> bytes:
        return mint_token(
            key, session_id=session, role=role, audience=audience, cohort="bench", ttl=300, now=time.time()
        )

    return mint


def create_tls(directory: Path) -> TLSMaterial:
    """The run's throwaway certificate for 127.0.0.1 (the targets serve it, the workers trust it)."""
    from rescue.testing import SelfSignedTLS  # imported on demand: the references run without rescue

    return SelfSignedTLS.create(directory)


@dataclass
class Running:
    """A started target process."""

    defn: TargetDef
    process: trio.Process
    port: int
    log: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.process.returncode is None:
            self.process.terminate()
            with trio.move_on_after(STOP_TIMEOUT_S):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()


async def start_target(
    defn: TargetDef,
    *,
    log_dir: Path,
    keys: KeyMaterial | None = None,
    tls: TLSMaterial | None = None,
    heartbeat_s: float = 15.0,
) -> Running:
    """Start ``defn`` on an ephemeral 127.0.0.1 port and wait for its READY line (serving TLS with ``tls``).

    A rescue relay announces ``heartbeat_s`` (what the load generator's peers send at): with the
    relay's own 15 s against peers at another period, the quiet connections' looks would miss
    every heartbeat (an old tree's ``rescue_target.py`` without ``--heartbeat`` fails to start
    rather than measure that).

    Raises:
        RuntimeError: it exited, printed no READY line within ``START_TIMEOUT_S``, needs keys, or
            cannot serve TLS.
    """
    if tls is None:
        argv = [*defn.argv, "--port", "0"]
    elif defn.tls_argv is None:
        raise RuntimeError(f"{defn.name} cannot serve TLS")
    else:
        argv = [
            *defn.tls_argv,
            "--port",
            "0",
            "--tls-cert",
            str(tls.cert_file),
            "--tls-key",
            str(tls.key_file),
        ]
    if defn.needs_keys:
        if keys is None:
            raise RuntimeError(f"{defn.name} needs key material")
        argv += ["--keys", str(keys.jwks_file)]
        if heartbeat_s != 15:
            if heartbeat_s != int(heartbeat_s) or not 1 <= heartbeat_s <= 3600:
                raise RuntimeError(f"{defn.name} announces whole seconds (1-3600), not {heartbeat_s:g}")
            argv += ["--heartbeat", str(int(heartbeat_s))]
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{defn.name}.log"
    with log.open("ab") as err:
        process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=err, cwd=str(ROOT))
    assert process.stdout is not None
    seen = b""
    try:
        with trio.fail_after(START_TIMEOUT_S):
            while (m := READY_RE.search(seen)) is None:
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"{defn.name} exited before READY (see {log})")
                seen += chunk
    except BaseException:
        process.kill()
        await process.wait()
        raise
    # Nobody reads the target's stdout after READY: a target that keeps printing would block, so
    # they print nothing else (logs go to stderr, i.e. the log file).
    return Running(defn, process, int(m.group(1)), log)
