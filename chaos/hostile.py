"""Hostile-input battery (issue 11): attacks on a real ``rescue relay`` beside a real session.

Usage (from the repository root)::

    .venv/bin/python chaos/hostile.py --quick              # ~15 s: each attack once, short timeouts
    .venv/bin/python chaos/hostile.py --rounds 5           # the full battery five times over

What runs (everything on 127.0.0.1): the chaos fleet (:mod:`chaos._fleet`: a private redis-server,
``rescue token-service``, one ``rescue relay`` started through its CLI) and one session (host and
guest through the SDK in this process, tokens from the token service) streaming predictable bytes
both ways, checked by content. Meanwhile raw clients (:class:`rescue.testing.RawClient`) fire every
attack in :data:`ATTACKS`: garbage before and after the upgrade, a slow-loris upgrade, a 2^63
length header, fragment and tiny-frame floods (pings, empty messages, HEARTBEATs in a session), CBOR
bombs in HELLO, forged / expired / other-audience / replayed tokens, a text message, an oversize
message, and many idle connections from one address.

Targets: the session lost nothing and never reconnected; every attack ended with its expected
answer (close code or HTTP status); the relay never exited, logged no internal error, and its RSS
grew by at most ``--rss-bound-mb`` over the streaming baseline; its worst garbage-collector pause
while attacked (``/debug/stats`` ``gc``) and one full collection forced right after the attacks
(``POST /debug/gc``: what a later collection would pay for what the input left) stayed under
``--gc-bound-ms``, and the attacks left at most ``--objects-bound`` more GC-tracked objects than a
full collection forced before them found. Exit 0 when all are met, 1 when one is
missed, 2 when the fleet could not start. Progress lines while it runs, a report table at the end;
``report.json``/``report.md`` and every process's log under ``--out`` (default ``chaos/out``).
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):  # run as a script: make `chaos` (and `rescue`) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import trio

from chaos._fleet import Fleet, open_fleet
from chaos._harness import run_and_report
from chaos._procstat import sample
from chaos._report import machine_info, render_table, render_targets
from chaos._traffic import Episode, SessionRun, Throughput, TrafficConfig, wait_flowing
from rescue._codes import CloseCode
from rescue._keyfiles import load_signing_key
from rescue.protocol import (
    HEADER_SIZE,
    NONCE_SIZE,
    Caps,
    Hello,
    Kind,
    Role,
    SigningKey,
    encode_frame,
    mint_token,
)
from rescue.testing import RawClient
from rescue.websocket import Opcode, build_frame, build_request

__all__ = ["ATTACKS", "HostileConfig", "main", "run_hostile"]

ROOT: Final = Path(__file__).resolve().parents[1]
# The session must be flowing both ways before the first attack.
WARMUP_TIMEOUT_S: Final = 60.0
# Streaming seconds before the attacks whose RSS peak is the baseline.
BASELINE_S: Final = 2.0
# One attack's bound (a flood sends at most FLOOD_LIMIT bytes; the slow-loris waits for the
# relay's upgrade timeout): past it the attack counts as "no answer".
ATTACK_TIMEOUT_S: Final = 60.0
FLOOD_LIMIT: Final = 32 << 20
# How often the relay's RSS is sampled while the attacks run.
RSS_POLL_S: Final = 0.1
# Relay flags of a --quick run: the slow-loris and the idle connections end in 2 s, not 10 s.
QUICK_RELAY_ARGS: Final = ("--upgrade-timeout-s", "2", "--hello-timeout-s", "2")


@dataclass(frozen=True)
class HostileConfig:
    """One run's settings (see ``--help``)."""

    rounds: int
    connections: int
    rate: float
    rss_bound_mb: float
    gc_bound_ms: float
    objects_bound: int
    seed: int
    out: Path
    quick: bool


@dataclass
class Target:
    """Where the attacks go and what they may use."""

    host: str
    port: int
    key: SigningKey
    node_id: str
    rng: random.Random
    serial: int = 0

    def session(self) -> str:
        self.serial += 1
        return f"hostile-{self.serial}"

    def token(self, session: str, *, key: SigningKey | None = None, **kwargs: Any) -> bytes:
        settings: dict[str, Any] = {"audience": "*", "ttl": 300, "now": time.time()}
        settings.update(kwargs)
        return mint_token(key or self.key, session_id=session, role="host", cohort="hostile", **settings)

    def hello(self, session: str, token: bytes) -> bytes:
        hello = Hello(token=token, session=session, role=Role.HOST, nonce=os.urandom(NONCE_SIZE), caps=Caps())
        return build_frame(Opcode.BINARY, hello.to_message(), mask=True)


def _observed(client: RawClient) -> str:
    """What the relay answered: ``4010``, ``http 400``, ``eof`` or ``none``."""
    outcome = client.outcome
    if outcome.wire_code is not None:
        return str(outcome.wire_code)
    if outcome.http:
        status = outcome.http.split(b" ", 2)
        return f"http {status[1].decode(errors='replace')}" if len(status) > 1 else "http ?"
    return "eof" if outcome.eof else "none"


async def _upgraded(t: Target, payload: bytes, *, flood: bytes = b"", hello: bytes = b"") -> str:
    client = await RawClient.connect(t.host, t.port)
    try:
        if hello:
            await client.send(hello)
            await client.expect_message()  # WELCOME: the connection is in a session now
        if flood:
            await client.flood(flood, limit=FLOOD_LIMIT, first=payload)
        else:
            await client.send(payload)
            await client.finish()
    finally:
        await client.aclose()
    return _observed(client)


async def garbage_before_upgrade(t: Target) -> str:
    client = await RawClient.open_tcp(t.host, t.port)
    try:
        junk = bytes(t.rng.choice(range(33, 127)) for _ in range(300))
        await client.send(junk + b"\r\n\r\n")
        await client.finish()
    finally:
        await client.aclose()
    return _observed(client)


async def garbage_after_upgrade(t: Target) -> str:
    return await _upgraded(t, b"\xff" + t.rng.randbytes(200))  # RSV bits set, then noise


async def slowloris_upgrade(t: Target) -> str:
    client = await RawClient.open_tcp(t.host, t.port)
    request = build_request(f"{t.host}:{t.port}", "/v1/connect", "dGhlIHNhbXBsZSBub25jZQ==")
    try:
        async with trio.open_nursery() as nursery:

            async def drip() -> None:
                for i in range(len(request) - 1):  # never the last byte
                    if not await client.send(request[i : i + 1]):
                        return
                    await trio.sleep(0.25)

            nursery.start_soon(drip)
            await client.finish()
            nursery.cancel_scope.cancel()
    finally:
        await client.aclose()
    return _observed(client)


async def length_2_63(t: Target) -> str:
    return await _upgraded(t, b"\x82\xff" + struct.pack(">Q", 1 << 63) + os.urandom(4))


async def fragment_flood(t: Target) -> str:
    first = build_frame(Opcode.BINARY, b"\x01", mask=True, fin=False)
    empty = build_frame(Opcode.CONTINUATION, b"", mask=True, fin=False)
    return await _upgraded(t, first, flood=empty * 4096)


async def ping_flood(t: Target) -> str:
    return await _upgraded(t, b"", flood=build_frame(Opcode.PING, b"", mask=True) * 4096)


async def empty_message_flood(t: Target) -> str:
    return await _upgraded(t, b"", flood=build_frame(Opcode.BINARY, b"", mask=True) * 4096)


async def heartbeat_flood_in_session(t: Target) -> str:
    session = t.session()
    heartbeat = build_frame(Opcode.BINARY, encode_frame(Kind.HEARTBEAT, seq=7), mask=True)
    return await _upgraded(t, b"", flood=heartbeat * 4096, hello=t.hello(session, t.token(session)))


_CBOR_BOMBS: Final = (
    b"\x81" * 5000 + b"\x00",  # arrays nested 5,000 deep
    b"\xba\xff\xff\xff\xff",  # a map declaring 2^32 - 1 pairs
    b"\x5b" + (1 << 63).to_bytes(8, "big"),  # a byte string declaring 2^63 bytes
    b"\x9f" * 3000,  # indefinite-length arrays, never closed
)


async def cbor_bomb_hello(t: Target) -> str:
    bomb = _CBOR_BOMBS[t.serial % len(_CBOR_BOMBS)]
    t.serial += 1
    header = encode_frame(Kind.HELLO, b"")[:HEADER_SIZE]
    return await _upgraded(t, build_frame(Opcode.BINARY, header + bomb, mask=True))


async def forged_token(t: Target) -> str:
    session = t.session()
    return await _upgraded(t, t.hello(session, t.token(session, key=SigningKey.generate())))


async def expired_token(t: Target) -> str:
    session = t.session()
    return await _upgraded(t, t.hello(session, t.token(session, ttl=60, now=time.time() - 400)))


async def other_audience_token(t: Target) -> str:
    session = t.session()
    return await _upgraded(t, t.hello(session, t.token(session, audience="relay-elsewhere")))


async def replayed_token(t: Target) -> str:
    session = t.session()
    token = t.token(session)
    first = await RawClient.connect(t.host, t.port)
    try:
        await first.send(t.hello(session, token))
        await first.expect_message()  # WELCOME: the token's one use
        return await _upgraded(t, t.hello(session, token))
    finally:
        await first.aclose()


async def text_message(t: Target) -> str:
    return await _upgraded(t, build_frame(Opcode.TEXT, b"hello?", mask=True))


async def oversize_message(t: Target) -> str:
    return await _upgraded(t, b"\x82\xff" + struct.pack(">Q", 1 << 20) + os.urandom(4) + b"\0" * 1024)


@dataclass(frozen=True)
class Attack:
    """One kind of hostile input and the answers it must get."""

    name: str
    expect: frozenset[str]
    run: Callable[[Target], Awaitable[str]]
    what: str


def _codes(*codes: CloseCode) -> frozenset[str]:
    return frozenset(str(int(c)) for c in codes)


ATTACKS: Final = (
    Attack(
        "garbage_before_upgrade",
        frozenset({"http 400"}),
        garbage_before_upgrade,
        "300 bytes of noise as HTTP",
    ),
    Attack(
        "garbage_after_upgrade", _codes(CloseCode.PROTOCOL_ERROR), garbage_after_upgrade, "noise as frames"
    ),
    Attack(
        "slowloris_upgrade", frozenset({"eof"}), slowloris_upgrade, "upgrade request, a byte every 0.25 s"
    ),
    Attack("length_2_63", _codes(CloseCode.PROTOCOL_ERROR), length_2_63, "a frame header of 2^63 bytes"),
    Attack("fragment_flood", _codes(CloseCode.PROTOCOL_ERROR), fragment_flood, "empty continuation frames"),
    Attack("ping_flood", _codes(CloseCode.PROTOCOL_ERROR), ping_flood, "empty pings"),
    Attack(
        "empty_message_flood", _codes(CloseCode.PROTOCOL_ERROR), empty_message_flood, "zero-length messages"
    ),
    Attack(
        "heartbeat_flood",
        _codes(CloseCode.PROTOCOL_ERROR),
        heartbeat_flood_in_session,
        "HEARTBEATs inside a session",
    ),
    Attack("cbor_bomb_hello", _codes(CloseCode.PROTOCOL_ERROR), cbor_bomb_hello, "deep / huge CBOR in HELLO"),
    Attack("forged_token", _codes(CloseCode.AUTH_FAILED), forged_token, "signed by an unknown key"),
    Attack("expired_token", _codes(CloseCode.TOKEN_EXPIRED), expired_token, "expired 340 s ago"),
    Attack(
        "other_audience_token", _codes(CloseCode.WRONG_NODE), other_audience_token, "aud names another node"
    ),
    Attack(
        "replayed_token",
        _codes(CloseCode.TOKEN_EXPIRED),
        replayed_token,
        "a live connection's token, used again",
    ),
    Attack("text_message", _codes(CloseCode.PROTOCOL_ERROR), text_message, "a text frame"),
    Attack("oversize_message", _codes(CloseCode.PROTOCOL_ERROR), oversize_message, "a 1 MiB message header"),
)
IDLE_CONNECTIONS: Final = Attack(
    "many_connections",
    _codes(CloseCode.HEARTBEAT_TIMEOUT),
    lambda t: _upgraded(t, b""),
    "idle upgraded connections from one address (no HELLO)",
)


@dataclass
class Tally:
    """What one attack got, over every round."""

    attack: Attack
    observed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, answer: str, seconds: float) -> None:
        self.observed[answer] = self.observed.get(answer, 0) + 1
        self.seconds = max(self.seconds, seconds)

    @property
    def ok(self) -> bool:
        return bool(self.observed) and set(self.observed) <= self.attack.expect

    def to_json(self) -> dict[str, Any]:
        return {
            "attack": self.attack.name,
            "what": self.attack.what,
            "expected": sorted(self.attack.expect),
            "observed": self.observed,
            "slowest_s": round(self.seconds, 3),
            "pass": self.ok,
        }


async def _attack_once(attack: Attack, target: Target, tally: Tally) -> None:
    started = trio.current_time()
    try:
        with trio.fail_after(ATTACK_TIMEOUT_S):
            answer = await attack.run(target)
    except trio.TooSlowError:
        answer = "timeout"
    except (OSError, trio.BrokenResourceError) as exc:
        answer = f"error {type(exc).__name__}"
    tally.add(answer, trio.current_time() - started)


async def _metric(fleet: Fleet, node: str, name: str) -> float | None:
    response = await fleet._get(f"http://127.0.0.1:{fleet.relay_admin_ports[node]}/metrics")
    if response is None:
        return None
    for line in response.text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return None


async def _full_collection(fleet: Fleet, node: str) -> dict[str, Any]:
    """``POST /debug/gc``: one timed full collection in the relay (``{}`` when it did not answer)."""
    try:
        response = await fleet.http.post(
            f"http://127.0.0.1:{fleet.relay_admin_ports[node]}/debug/gc", timeout=ATTACK_TIMEOUT_S
        )
    except httpx.HTTPError:
        return {}
    return dict(response.json()) if response.status_code == 200 else {}


async def run_hostile(config: HostileConfig) -> tuple[dict[str, Any], Path]:
    """Start the fleet, stream one session, fire the battery, judge; (report, output directory)."""
    out_dir = config.out / time.strftime("hostile-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    relay_args = QUICK_RELAY_ARGS if config.quick else ()
    t0 = trio.current_time()

    def clock() -> float:
        return trio.current_time() - t0

    def progress(text: str) -> None:
        print(f"[{clock():6.1f}s] {text}", flush=True)

    episodes: list[Episode] = []
    async with open_fleet(out_dir, nodes=1, relay_args=relay_args) as fleet:
        node = "relay-1"
        relay = fleet.relay(node)
        progress(f"fleet up: relay pid {relay.pid}, token service {fleet.api_url}")
        session = SessionRun(
            "hostile-stream",
            config.seed,
            TrafficConfig.for_rate(config.rate, drain_timeout_s=30.0),
            clock,
            Throughput(),
            episodes.append,
        )
        rss_kb: list[int] = []
        target = Target(
            "127.0.0.1",
            fleet.relay_ports[node],
            load_signing_key(out_dir / "signing-key.jwk"),
            node,
            random.Random(config.seed),
        )
        tallies = {a.name: Tally(a) for a in (*ATTACKS, IDLE_CONNECTIONS)}
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run, fleet.api_url)
            if not await wait_flowing([session], WARMUP_TIMEOUT_S):
                session.error = session.error or "never flowing before the attacks"
            deadline = trio.current_time() + BASELINE_S
            while trio.current_time() < deadline:
                rss_kb.append(sample(relay.pid or 0).rss_kb)
                await trio.sleep(RSS_POLL_S)
            baseline_kb = max(rss_kb)
            full_before = await _full_collection(fleet, node)
            progress(
                f"session flowing; relay RSS baseline {baseline_kb / 1024:.1f} MB; a full collection "
                f"takes {full_before.get('pause_s', 0) * 1000:.1f} ms over "
                f"{full_before.get('tracked_after', 0):,} objects"
            )
            sampling = trio.CancelScope()

            async def sample_rss() -> None:
                with sampling:
                    while True:
                        if relay.check_crash():
                            progress(f"RELAY EXITED: {relay.unexpected_exits}")
                            return
                        rss_kb.append(sample(relay.pid or 0).rss_kb)
                        await trio.sleep(RSS_POLL_S)

            nursery.start_soon(sample_rss)
            attacked = clock()
            async with trio.open_nursery() as background:
                idle = tallies[IDLE_CONNECTIONS.name]
                for _ in range(config.connections):
                    background.start_soon(_attack_once, IDLE_CONNECTIONS, target, idle)
                for round_no in range(1, config.rounds + 1):
                    for attack in ATTACKS:
                        await _attack_once(attack, target, tallies[attack.name])
                    bad = [name for name, tally in tallies.items() if tally.observed and not tally.ok]
                    progress(
                        f"round {round_no}/{config.rounds}: relay RSS {rss_kb[-1] / 1024:.1f} MB, "
                        f"session delivered {sum(c.delivered for c in session.checks.values()):,} B, "
                        f"wrong answers: {', '.join(bad) or 'none'}"
                    )
            progress(f"{config.connections} idle connections closed: {idle.observed}")
            attack_s = clock() - attacked
            sampling.cancel()
            stats = await fleet.relay_stats(node) or {}  # serving pauses, before the forced one
            full_after = await _full_collection(fleet, node)
            progress(
                f"after the attacks a full collection takes {full_after.get('pause_s', 0) * 1000:.1f} ms "
                f"over {full_after.get('tracked_after', 0):,} objects"
            )
            internal = await _metric(fleet, node, "beach_rescue_internal_errors_total")
            session.stop.set()
        progress("session drained")
    crashed = relay.unexpected_exits
    growth_mb = (max(rss_kb) - baseline_kb) / 1024
    gc = stats.get("gc") or {}
    max_gc_ms = float(gc.get("max_pause_s", 0.0)) * 1000 if gc else None
    full_ms = float(full_after["pause_s"]) * 1000 if full_after else None
    left_behind = (
        full_after["tracked_after"] - full_before["tracked_after"] if full_after and full_before else None
    )
    checks = session.checks
    reconnects = sum(t.reconnect_events for t in session.trackers.values())
    targets = [
        {
            "name": "session bytes intact",
            "target": "every byte, once, in order",
            "value": ", ".join(f"{k}: {c.delivered:,}/{c.sent:,} B" for k, c in checks.items()),
            "pass": not session.failed
            and all(c.intact and c.delivered == c.sent > 0 for c in checks.values()),
        },
        {"name": "session reconnects", "target": "0", "value": str(reconnects), "pass": reconnects == 0},
        {
            "name": "attacks answered right",
            "target": f"{len(tallies)} kinds",
            "value": f"{sum(t.ok for t in tallies.values())} right",
            "pass": all(t.ok for t in tallies.values()),
        },
        {"name": "relay exits", "target": "none", "value": str(crashed or "none"), "pass": not crashed},
        {
            "name": "relay internal errors",
            "target": "0",
            "value": str(internal),
            "pass": internal == 0,
        },
        {
            "name": "relay RSS growth",
            "target": f"<= {config.rss_bound_mb:g} MB",
            "value": f"{growth_mb:.1f} MB (peak {max(rss_kb) / 1024:.1f} MB)",
            "pass": growth_mb <= config.rss_bound_mb,
        },
        {
            "name": "worst GC pause while attacked",
            "target": f"<= {config.gc_bound_ms:g} ms",
            "value": "n/a" if max_gc_ms is None else f"{max_gc_ms:.1f} ms",
            "pass": max_gc_ms is not None and max_gc_ms <= config.gc_bound_ms,
        },
        {
            "name": "full collection after the attacks",
            "target": f"<= {config.gc_bound_ms:g} ms",
            "value": "n/a"
            if full_ms is None
            else f"{full_ms:.1f} ms (before: {float(full_before.get('pause_s', 0)) * 1000:.1f} ms)",
            "pass": full_ms is not None and full_ms <= config.gc_bound_ms,
        },
        {
            "name": "objects left behind",
            "target": f"<= {config.objects_bound:,}",
            "value": "n/a" if left_behind is None else f"{left_behind:+,} tracked objects",
            "pass": left_behind is not None and left_behind <= config.objects_bound,
        },
    ]
    report: dict[str, Any] = {
        "kind": "hostile",
        "config": {
            "rounds": config.rounds,
            "connections": config.connections,
            "rate": config.rate,
            "quick": config.quick,
            "relay_args": list(relay_args),
            "seed": config.seed,
        },
        "machine": machine_info(),
        "attack_seconds": round(attack_s, 1),
        "attacks": [t.to_json() for t in tallies.values()],
        "session": {
            "error": session.error,
            "reconnects": reconnects,
            "bytes": {
                k: {"sent": c.sent, "delivered": c.delivered, "intact": c.intact} for k, c in checks.items()
            },
        },
        "relay": {
            "rss_baseline_mb": round(baseline_kb / 1024, 1),
            "rss_peak_mb": round(max(rss_kb) / 1024, 1),
            "protocol_errors": stats.get("protocol_errors"),
            "token_uses": stats.get("token_uses"),
            "closes": stats.get("closes"),
            "gc": gc,
            "full_collection_before": full_before,
            "full_collection_after": full_after,
            "unexpected_exits": crashed,
        },
        "targets": targets,
        "pass": all(t["pass"] for t in targets),
    }
    return report, out_dir


def render_report(report: dict[str, Any]) -> str:
    """The Markdown report: verdict, attacks, targets."""
    verdict = "PASS" if report["pass"] else "FAIL"
    cfg = report["config"]
    lines = [
        f"# Hostile-input run: {verdict}",
        "",
        f"{cfg['rounds']} round(s) of {len(report['attacks']) - 1} attacks plus {cfg['connections']} idle "
        f"connections, in {report['attack_seconds']} s, beside one session streaming "
        f"{cfg['rate']:g} B/s each way (relay args: {' '.join(cfg['relay_args']) or 'defaults'}; "
        f"machine load {report['machine']['loadavg']}).",
        "",
        render_table(
            ["attack", "what", "expected", "observed", "slowest", "verdict"],
            [
                [
                    a["attack"],
                    a["what"],
                    " or ".join(a["expected"]),
                    ", ".join(f"{k} x{v}" for k, v in sorted(a["observed"].items())),
                    f"{a['slowest_s']:.2f}s",
                    "PASS" if a["pass"] else "FAIL",
                ]
                for a in report["attacks"]
            ],
        ),
        "",
        render_targets(report["targets"]),
        "",
        f"Relay counted: protocol_errors {report['relay']['protocol_errors']}, "
        f"token_uses {report['relay']['token_uses']}, gc {report['relay']['gc']}.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> HostileConfig:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=3, help="times the battery is fired (default 3)")
    p.add_argument("--connections", type=int, default=200, help="idle connections from one address")
    p.add_argument("--rate", type=float, default=64 * 1024, help="session bytes/s each way")
    p.add_argument("--rss-bound-mb", type=float, default=48.0, help="allowed relay RSS growth")
    p.add_argument("--gc-bound-ms", type=float, default=100.0, help="allowed worst GC pause")
    p.add_argument(
        "--objects-bound", type=int, default=20_000, help="allowed growth of the relay's GC-tracked objects"
    )
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--out", type=Path, default=ROOT / "chaos" / "out")
    p.add_argument("--quick", action="store_true", help="one round, 20 connections, 2 s relay timeouts")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.connections = 1, 20
    if args.rounds < 1 or args.connections < 0:
        p.error("--rounds must be >= 1 and --connections >= 0")
    return HostileConfig(
        rounds=args.rounds,
        connections=args.connections,
        rate=args.rate,
        rss_bound_mb=args.rss_bound_mb,
        gc_bound_ms=args.gc_bound_ms,
        objects_bound=args.objects_bound,
        seed=args.seed,
        out=args.out,
        quick=args.quick,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the battery; 0 pass, 1 a target missed, 2 the fleet did not start."""
    return run_and_report("hostile", run_hostile, parse_args(argv), render_report)


if __name__ == "__main__":
    sys.exit(main())
