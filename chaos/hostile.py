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
message, and many idle connections from one address. The HTTP attacks (:data:`HTTP_ATTACKS`,
:data:`SLOW_HTTP_ATTACKS`) go at the token service's own HTTP server and the relay's upgrade head:
request smuggling (CL+TE, odd TE, doubled CL), obs-fold, bare LF, NUL/CR in values, HTTP/0.9, a TLS
ClientHello, ``..`` under ``/join/``, huge URLs and chunk sizes, Expect abuse, a hostile CORS
preflight, a pipelined burst, pipelining without reading and slow-loris heads and bodies, beside a
legitimate client minting a token every 50 ms.

Targets: the session lost nothing and never reconnected; every attack ended with its expected
answer (close code or HTTP status; an HTTP error must be the JSON shape); every legitimate token
request succeeded; the token service never exited, logged no error or traceback while attacked and
its RSS grew at most ``--rss-bound-mb``; the relay never exited, logged no internal error, and its RSS
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

__all__ = ["ATTACKS", "HTTP_ATTACKS", "SLOW_HTTP_ATTACKS", "HostileConfig", "main", "run_hostile"]

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
    api_port: int = 0  # the token service (the HTTP attacks)
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


# ------------------------------------------------------------------ HTTP attacks (decision 0017)

_UPGRADE: Final = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)
_TLS_CLIENT_HELLO: Final = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)
# (name, on the relay's WebSocket port rather than the token service's, bytes, expected, what)
HTTP_CASES: Final = (
    (
        "cl_and_te",
        False,
        b"POST /v1/fallback/token HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "http 400",
        "Content-Length and chunked (smuggling)",
    ),
    (
        "te_chunked_twice",
        False,
        b"POST /healthz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        "http 501",
        "Transfer-Encoding: chunked, chunked",
    ),
    (
        "te_space_before_colon",
        False,
        b"POST /healthz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
        "http 400",
        "'Transfer-Encoding :' (a space before the colon)",
    ),
    (
        "te_repeated",
        False,
        b"POST /healthz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: identity\r\n\r\n",
        "http 400",
        "two Transfer-Encoding fields",
    ),
    (
        "cl_conflicting",
        False,
        b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n",
        "http 400",
        "two different Content-Lengths",
    ),
    (
        "cl_list",
        False,
        b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 0, 0\r\n\r\n",
        "http 400",
        "Content-Length: 0, 0",
    ),
    (
        "obs_fold",
        False,
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nX: a\r\n folded\r\n\r\n",
        "http 400",
        "an obs-fold continuation line",
    ),
    ("bare_lf", False, b"GET /healthz HTTP/1.1\nHost: a\n\n", "http 400", "LF line ends"),
    (
        "nul_in_value",
        False,
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
        "http 400",
        "NUL in a value",
    ),
    (
        "cr_in_value",
        False,
        b"GET /healthz HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
        "http 400",
        "a lone CR in Host",
    ),
    (
        "host_crlf",
        False,
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nevil\r\n\r\n",
        "http 400",
        "Host split by CRLF",
    ),
    (
        "non_ascii_line",
        False,
        b"GET /h\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n",
        "http 400",
        "UTF-8 in the target",
    ),
    ("http09", False, b"GET /healthz\r\n", "http 400", "an HTTP/0.9 request line"),
    ("tls_on_plain_port", False, _TLS_CLIENT_HELLO, "http 400", "a TLS ClientHello"),
    ("http2_preface", False, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "http 505", "the HTTP/2 preface"),
    (
        "absolute_form",
        False,
        b"GET http://evil.example/healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "http 200",
        "absolute-form target (served)",
    ),
    (
        "asterisk_form",
        False,
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "http 404",
        "OPTIONS *",
    ),
    (
        "join_traversal",
        False,
        b"GET /join/..%2f..%2f__init__.py HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "http 404",
        "%2f-encoded .. under /join/",
    ),
    (
        "join_traversal_raw",
        False,
        b"GET /join/../../../etc/passwd HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "http 404",
        "raw .. under /join/",
    ),
    (
        "long_url",
        False,
        b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
        "http 431",
        "a 20 KB target",
    ),
    (
        "many_headers",
        False,
        b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 101 + b"\r\n",
        "http 431",
        "101 header fields",
    ),
    (
        "chunk_size_overflow",
        False,
        b"POST /healthz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 40 + b"\r\n",
        "http 400",
        "a 40-digit chunk size",
    ),
    (
        "chunk_over_max_body",
        False,
        b"POST /healthz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffff\r\n",
        "http 413",
        "a 2^60-byte chunk",
    ),
    (
        "chunk_ext_trailers",
        False,
        b"POST /healthz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b'Connection: close\r\n\r\n1;a="b"\r\nx\r\n0\r\nContent-Length: 9\r\n\r\n',
        "http 405",
        "extensions and a Content-Length trailer (read, ignored)",
    ),
    (
        "expect_oversize",
        False,
        b"POST /v1/fallback/token HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
        b"Content-Length: 70000\r\n\r\n",
        "http 413",
        "Expect: 100-continue for 70 KB (no 100 sent)",
    ),
    (
        "expect_unknown",
        False,
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\n\r\n",
        "http 417",
        "Expect: 200-ok",
    ),
    (
        "unknown_method",
        False,
        b"BREW /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "http 405",
        "BREW",
    ),
    (
        "cors_hostile_origin",
        False,
        b"OPTIONS /v1/fallback/token HTTP/1.1\r\nHost: a\r\nOrigin: https://evil\xe9.x\r\n"
        b"Access-Control-Request-Method: POST\r\nConnection: close\r\n\r\n",
        "http 403",
        "a preflight from a foreign origin",
    ),
    (
        "get_with_body",
        False,
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        "http 200",
        "a GET with a body (read, ignored)",
    ),
    ("ws_tls", True, _TLS_CLIENT_HELLO, "http 400", "a TLS ClientHello on ws://"),
    ("ws_bare_lf", True, b"GET /v1/connect HTTP/1.1\nHost: a\n\n", "http 400", "upgrade with LF line ends"),
    (
        "ws_obs_fold",
        True,
        b"GET /v1/connect HTTP/1.1\r\nHost: a\r\n" + _UPGRADE + b" folded\r\n\r\n",
        "http 400",
        "upgrade with an obs-fold line",
    ),
    (
        "ws_nul",
        True,
        b"GET /v1/connect HTTP/1.1\r\nHost: a\x00\r\n" + _UPGRADE + b"\r\n",
        "http 400",
        "upgrade with NUL in Host",
    ),
    (
        "ws_huge_head",
        True,
        b"GET /v1/connect HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 20_000 + b"\r\n" + _UPGRADE + b"\r\n",
        "http 431",
        "a 20 KB upgrade head",
    ),
)


async def _http_answer(port: int, payload: bytes, *, drip: bytes = b"", pause: float = 0.25) -> str:
    """Send ``payload`` (then ``drip`` a byte per ``pause``) and read one answer: ``http 400``
    (``http 400 not-json`` when an error body is not the JSON shape, ``+traceback`` when the
    answer holds one), ``eof`` or ``reset``."""
    received = bytearray()
    reset = False
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream, trio.open_nursery() as nursery:

        async def trickle() -> None:
            for i in range(len(drip)):
                await trio.sleep(pause)
                await stream.send_all(drip[i : i + 1])

        try:
            await stream.send_all(payload)
            if drip:
                nursery.start_soon(trickle)
            while not _complete(received):
                data = await stream.receive_some(65536)
                if not data:
                    break
                received += data
        except trio.BrokenResourceError:
            reset = True
        nursery.cancel_scope.cancel()
    if not received:
        return "reset" if reset else "eof"
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1].decode(errors="replace") if b" " in head else "?"
    answer = f"http {status}"
    if status >= "400" and b'"error":' not in body:
        answer += " not-json"
    if b"Traceback" in received:
        answer += " +traceback"
    return answer


def _complete(data: bytearray) -> bool:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return False
    for line in bytes(data[:end]).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(data) >= end + 4 + int(value)
    return True


def _http_case(name: str, on_ws: bool, payload: bytes) -> Callable[[Target], Awaitable[str]]:
    async def run(t: Target) -> str:
        return await _http_answer(t.port if on_ws else t.api_port, payload)

    run.__name__ = name
    return run


async def slowloris_head(t: Target) -> str:
    return await _http_answer(t.api_port, b"GET /healthz HTTP/1.1\r\n", drip=b"X-Slow: " + b"z" * 200)


async def slowloris_body(t: Target) -> str:
    head = (
        b"POST /v1/fallback/token HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        b"Content-Length: 200\r\n\r\n"
    )
    return await _http_answer(t.api_port, head, drip=b"{" * 200)


async def pipeline_no_read(t: Target) -> str:
    """Pipelined requests, never reading an answer: the server must stop reading (its answers wait
    in the socket) and drop the connection after its send timeout, holding no growing buffer."""
    burst = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n" * 2000
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", t.api_port))
    stream = trio.SocketStream(sock)
    sent = 0
    try:
        while sent < FLOOD_LIMIT:
            await stream.send_all(burst)
            sent += len(burst)
    except trio.BrokenResourceError:
        return "dropped"
    finally:
        await trio.aclose_forcefully(stream)
    return f"took {sent >> 20} MiB"


async def unread_large_answers(t: Target) -> str:
    """100 connections ask for the 944 KB join.js and never read it: the server must not hold a
    copy per connection (the token service's RSS target judges; it held +274 MB for 300 before)."""
    streams: list[trio.SocketStream] = []
    answers: set[str] = set()
    try:
        for _ in range(100):
            sock = trio.socket.socket()
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", t.api_port))
            stream = trio.SocketStream(sock)
            streams.append(stream)
            await stream.send_all(b"GET /join/join.js HTTP/1.1\r\nHost: a\r\n\r\n")
        for stream in streams:
            first = await stream.receive_some(12)
            answers.add(first.decode(errors="replace")[9:12] if first[:9] == b"HTTP/1.1 " else "?")
        await trio.sleep(1.0)  # held unread while the RSS sampler looks
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)
    return " ".join(f"http {a}" for a in sorted(answers))


async def pipelined_burst(t: Target) -> str:
    """2,000 tiny pipelined requests in one write, every answer read: all answered, in order."""
    count = 2000
    async with await trio.open_tcp_stream("127.0.0.1", t.api_port) as stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n" * count)
        received = bytearray()
        while received.count(b"HTTP/1.1 200 ") < count:
            data = await stream.receive_some(1 << 20)
            if not data:
                break
            received += data
    return "all answered" if received.count(b"HTTP/1.1 200 ") == count else "short"


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
HTTP_ATTACKS: Final = (
    *(
        Attack(name, frozenset({expected}), _http_case(name, on_ws, payload), what)
        for name, on_ws, payload, expected, what in HTTP_CASES
    ),
    Attack(
        "pipelined_burst", frozenset({"all answered"}), pipelined_burst, "2,000 tiny requests in one write"
    ),
    Attack(
        "unread_large_answers",
        frozenset({"http 200"}),
        unread_large_answers,
        "100 connections ask for join.js (944 KB), never read",
    ),
)
# The HTTP attacks that last the server's timeouts (10 s): fired once, beside the rest.
SLOW_HTTP_ATTACKS: Final = (
    Attack("slowloris_head", frozenset({"http 408"}), slowloris_head, "a head trickled a byte per 0.25 s"),
    Attack("slowloris_body", frozenset({"http 408"}), slowloris_body, "a body trickled a byte per 0.25 s"),
    Attack(
        "pipeline_no_read", frozenset({"dropped"}), pipeline_no_read, "pipelined requests, answers never read"
    ),
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
            api_port=fleet.api_port,
        )
        tallies = {a.name: Tally(a) for a in (*ATTACKS, *HTTP_ATTACKS, *SLOW_HTTP_ATTACKS, IDLE_CONNECTIONS)}
        api = fleet.token_service
        assert api is not None
        api_rss_kb = [sample(api.pid or 0).rss_kb]
        api_log_start = api.log_path.stat().st_size  # startup lines (store not yet initialised) aside
        tokens = {"ok": 0, "failed": 0}
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
                        if relay.check_crash() or api.check_crash():
                            progress(f"EXITED: relay {relay.unexpected_exits}, tokens {api.unexpected_exits}")
                            return
                        rss_kb.append(sample(relay.pid or 0).rss_kb)
                        api_rss_kb.append(sample(api.pid or 0).rss_kb)
                        await trio.sleep(RSS_POLL_S)

            nursery.start_soon(sample_rss)
            attacked = clock()
            token_loop = trio.CancelScope()

            async def legitimate_tokens() -> None:
                # a well-behaved client beside the HTTP attacks: every token request must succeed
                with token_loop:
                    while True:
                        ok = await fleet.control_plane_ok(f"hostile-legit-{tokens['ok'] + tokens['failed']}")
                        tokens["ok" if ok else "failed"] += 1
                        await trio.sleep(0.05)

            nursery.start_soon(legitimate_tokens)
            async with trio.open_nursery() as background:
                idle = tallies[IDLE_CONNECTIONS.name]
                for _ in range(config.connections):
                    background.start_soon(_attack_once, IDLE_CONNECTIONS, target, idle)
                for attack in SLOW_HTTP_ATTACKS:
                    background.start_soon(_attack_once, attack, target, tallies[attack.name])
                for round_no in range(1, config.rounds + 1):
                    for attack in (*ATTACKS, *HTTP_ATTACKS):
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
            token_loop.cancel()
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
    api_crashed = api.unexpected_exits
    api_growth_mb = (max(api_rss_kb) - api_rss_kb[0]) / 1024
    with api.log_path.open("rb") as log:
        log.seek(api_log_start)
        api_log = log.read().decode(errors="replace")
    api_errors = sum('"level":"error"' in line or "Traceback" in line for line in api_log.splitlines())
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
            "name": "token service exits",
            "target": "none",
            "value": str(api_crashed or "none"),
            "pass": not api_crashed,
        },
        {
            "name": "legitimate token requests beside the attacks",
            "target": "all succeed",
            "value": f"{tokens['ok']:,} ok, {tokens['failed']:,} failed",
            "pass": tokens["ok"] > 0 and tokens["failed"] == 0,
        },
        {
            "name": "token service errors / tracebacks logged while attacked",
            "target": "0",
            "value": str(api_errors),
            "pass": api_errors == 0,
        },
        {
            "name": "token service RSS growth",
            "target": f"<= {config.rss_bound_mb:g} MB",
            "value": f"{api_growth_mb:.1f} MB (peak {max(api_rss_kb) / 1024:.1f} MB)",
            "pass": api_growth_mb <= config.rss_bound_mb,
        },
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
