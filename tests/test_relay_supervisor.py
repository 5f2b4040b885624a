"""``rescue relay --nodes N``: N supervised node processes on consecutive ports.

The restart backoff and the children's command lines are pure and tested directly; the rest with
the real command: two nodes come up with their own ids, ports and Redis registrations, a
SIGKILLed node is restarted, and SIGTERM drains both and exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from rescue.protocol import CloseCode
from rescue.relay._supervisor import RestartBackoff, node_specs
from rescue.testing import TestKeys, TestPeer, free_tcp_ports, seq_frame

from .conftest import clean_env

RESCUE = [sys.executable, "-P", "-m", "rescue.cli"]
DRAIN_S = 2.0


@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=40))
def test_backoff_doubles_while_crashing_caps_and_resets_after_a_stable_run(runs: list[float]) -> None:
    backoff = RestartBackoff(base=0.5, cap=30.0, stable_after=60.0)
    previous: float | None = None
    for ran_for in runs:
        delay = backoff.delay(ran_for)
        assert 0.5 <= delay <= 30.0
        if ran_for >= 60.0:
            assert delay == 0.5  # a healthy run forgives earlier crashes
        elif previous is not None:
            assert delay == min(30.0, previous * 2)
        previous = delay


def test_node_specs_consecutive_ports_ids_and_urls() -> None:
    specs = node_specs(
        ["rescue", "relay", "--keys=k"],
        nodes=3,
        node_id="edge",
        port=9000,
        admin_port=9100,
        public_url="wss://relay.example:{port}/v1/connect?n={index}",
    )
    assert [(s.node_id, s.port, s.admin_port) for s in specs] == [
        ("edge-1", 9000, 9100),
        ("edge-2", 9001, 9101),
        ("edge-3", 9002, 9102),
    ]
    assert specs[1].argv == (
        "rescue", "relay", "--keys=k", "--nodes=1", "--node-id=edge-2", "--port=9001",
        "--admin-port=9101", "--public-url=wss://relay.example:9001/v1/connect?n=2",
    )  # fmt: skip
    no_admin = node_specs(["r"], nodes=2, node_id="n", port=9000, admin_port=None, public_url=None)
    assert no_admin[1].argv[-1] == "--admin-port=-1"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"nodes": 1}, "at least 2"),
        ({"port": 0}, "fixed --port"),
        ({"admin_port": 0}, "fixed --port"),
        ({"port": 65535}, "65535"),
        ({"admin_port": 9001}, "overlap"),
        ({"public_url": "wss://one.example/v1/connect"}, "{port} or {index}"),
    ],
)
def test_node_specs_refuse_what_cannot_work(changes: dict[str, object], message: str) -> None:
    kwargs: dict[str, object] = {
        "nodes": 2, "node_id": "n", "port": 9000, "admin_port": 9100, "public_url": None, **changes,
    }  # fmt: skip
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        node_specs(["r"], **kwargs)  # type: ignore[arg-type]


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (trio starts them from worker threads: read every task's)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return out


async def ready(http: httpx.AsyncClient, admin_port: int) -> dict[str, object] | None:
    try:
        answer = await http.get(f"http://127.0.0.1:{admin_port}/debug/stats")
    except httpx.HTTPError:
        return None
    return answer.json() if answer.status_code == 200 else None  # type: ignore[no-any-return]


@pytest.mark.redis
async def test_two_supervised_nodes_restart_after_a_crash_and_drain_on_sigterm(
    tmp_path: Path, redis_url: str, redis_session_server: Any
) -> None:
    keys = TestKeys()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(keys.jwks()))
    log = tmp_path / "supervisor.log"
    start = free_tcp_ports(4, consecutive=True)[0]  # nodes on start, start+1; admin start+2, +3
    port, admin = start, start + 2
    log_file = log.open("wb")
    proc = await trio.lowlevel.open_process(
        [*RESCUE, "relay", "--nodes", "2", "--keys", str(jwks), "--port", str(port),
         "--admin-port", str(admin), "--node-id", "edge", "--redis-url", redis_url,
         "--drain-s", str(DRAIN_S), "--log-level", "INFO"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log_file,
        env=clean_env(),
    )  # fmt: skip
    peers: list[TestPeer] = []
    try:
        with trio.fail_after(90):
            async with httpx.AsyncClient(timeout=5) as http:
                for i in (0, 1):
                    while (stats := await ready(http, admin + i)) is None:
                        await trio.sleep(0.1)
                    assert stats["node_id"] == f"edge-{i + 1}"
                with redis_session_server.client() as r:  # each registers itself once listening
                    with trio.move_on_after(30):
                        while r.smembers("fallback:{nodes}") != {"edge-1", "edge-2"}:
                            await trio.sleep(0.1)
                    assert r.smembers("fallback:{nodes}") == {"edge-1", "edge-2"}, log.read_text()
                url2 = f"ws://127.0.0.1:{port + 1}/v1/connect"
                host = await TestPeer.connect(url2, keys, session="s", role="host", audience="edge-2")
                guest = await TestPeer.connect(url2, keys, session="s", role="guest", audience="edge-2")
                peers += [host, guest]
                first = sorted(children(proc.pid))
                assert len(first) == 2
                # SIGKILL one node: the supervisor starts it again on the same ports
                victim = next(p for p in first if b"=edge-1\0" in Path(f"/proc/{p}/cmdline").read_bytes())
                os.kill(victim, signal.SIGKILL)
                while True:
                    now = children(proc.pid)
                    if len(now) == 2 and victim not in now and await ready(http, admin) is not None:
                        break
                    await trio.sleep(0.1)
                # the other node and its session were untouched
                await host.send(seq_frame(1, 16))
                assert await guest.receive() == seq_frame(1, 16)
                survivors = children(proc.pid)
                proc.send_signal(signal.SIGTERM)
                closed = await host.wait_closed()
                assert closed.close is not None
                assert closed.close.code == CloseCode.SERVER_SHUTDOWN
                assert await proc.wait() == 0, log.read_text()
        for child in survivors:
            assert (
                not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text()
            )
        with redis_session_server.client() as r:
            # both removed their registrations
            assert r.smembers("fallback:{nodes}") == set(), log.read_text()
    finally:
        for peer in peers:
            peer.abort()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log_file.close()
