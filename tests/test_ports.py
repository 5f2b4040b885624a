"""rescue.testing.free_tcp_ports: ports a server is told in advance, safe under parallel workers."""

from __future__ import annotations

import socket

import pytest

from rescue.testing import _ports, free_tcp_ports
from rescue.testing._ports import LOWEST_PORT, _ephemeral_range, candidate_ports


def test_ports_are_free_distinct_and_outside_the_ephemeral_range() -> None:
    low, high = _ephemeral_range()
    ports = free_tcp_ports(20)
    assert len(set(ports)) == 20
    for port in ports:
        assert port >= LOWEST_PORT
        assert not low <= port <= high  # no bind(0) or outgoing connection is given one
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    assert not set(ports) & set(free_tcp_ports(20))  # never handed out twice by one process


def test_consecutive_ports_are_a_run() -> None:
    start = free_tcp_ports(4, consecutive=True)[0]
    held = []
    try:
        for port in range(start, start + 4):
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", port))
    finally:
        for s in held:
            s.close()


def test_a_port_in_use_is_not_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    free = free_tcp_ports(2)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", free[0]))
        monkeypatch.setattr(_ports, "candidate_ports", lambda: free)
        monkeypatch.setattr(_ports, "_handed_out", set())
        assert free_tcp_ports(1) == [free[1]]
        with pytest.raises(RuntimeError, match="no 1 free TCP ports"):
            free_tcp_ports(1)  # the other is held, this one handed out already


def test_each_xdist_worker_picks_from_its_own_share(monkeypatch: pytest.MonkeyPatch) -> None:
    shares = []
    for worker in range(3):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{worker}")
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
        shares.append(set(candidate_ports()))
        assert set(free_tcp_ports(5)) <= shares[-1]
    assert all(len(share) > 1000 for share in shares)
    for a, b in ((0, 1), (1, 2), (0, 2)):
        assert not shares[a] & shares[b]
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT")
    assert shares[0] | shares[1] | shares[2] <= set(candidate_ports())  # one process alone: all of them
