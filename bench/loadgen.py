"""Load generator: N paired sessions against one relay, throughput / rate / idle modes (trio).

One worker process opens ``sessions`` sessions (a host and a guest connection each), then, on command:

* ``throughput`` -- every flow keeps up to ``window`` messages in flight and refills as soon as half
  of them have arrived (as fast as the relay forwards);
* ``rate`` -- every flow sends one message every ``size / rate`` seconds, on a schedule with a random
  phase per flow (a relay that falls behind shows up as latency, not as a slower sender);
* ``idle`` -- no data, only heartbeats; with ``probe_rate`` > 0, once the window begins, that many
  sessions a second (each at most once, in random order) send one DATA message from one peer (host
  or guest at random): its latency is the delay of the *first message after a quiet spell* (a
  relay that parks heartbeat-only connections pays it here, not in the heartbeat echo).

Every connection also sends a heartbeat every ``heartbeat_s`` seconds, in every mode (the real relay
closes silent connections after 3 heartbeats). A *flow* is one direction of one session; ``direction``
``both`` gives two flows per session, ``host`` only host -> guest (terminal output).

Latency is measured inside the payload: the sender writes ``time.monotonic_ns()`` (CLOCK_MONOTONIC,
the same clock in every process) and the receiver subtracts it from the time it read the bytes. The
receiver checks every message: its seq must be the flow's next one (no loss, duplication or
reordering) and its body must be the expected filler (byte-for-byte forwarding).

The hot path avoids task switches: a connection has one reader task; refills in throughput mode are
written from that reader with a non-blocking ``send`` on the partner's socket, and one ticker task
drives all scheduled sends. Bytes the kernel does not take right away wait in a bounded per-connection
buffer drained by a short-lived writer task.

Control (``--worker``): the parent writes ``start``, ``mark`` (begin the measured window) and ``stop``
(end it) on stdin; the worker prints one JSON object per line on stdout (``connected``, ``result``).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import resource
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import trio

from bench import _native
from bench import _wire as w

# Bytes per recv: many loopback frames at once; bounds what one read adds to the receive buffer.
RECV_CHUNK: Final = 262144
# Unsent bytes a connection may hold before rate-mode sends are skipped (and counted): a relay that
# stops reading must not make the generator buffer without bound.
PENDING_LIMIT: Final = 1 << 20
# Non-data messages kept per connection (WELCOME, PEER events); older ones are dropped.
INBOX_LIMIT: Final = 16
# Shortest sleep of the scheduling tickers: coalesces sends due within the same millisecond.
MIN_TICK_S: Final = 0.001
# A scheduled send more than this late is re-based on "now" (and counted): the generator is behind.
MAX_LAG_NS: Final = 1_000_000_000
# Longest a session may take to connect (both peers, upgrade, HELLO/WELCOME, pairing).
CONNECT_TIMEOUT_S: Final = 60.0
# Longest wait, after ``stop``, for the messages still in flight.
DRAIN_TIMEOUT_S: Final = 15.0
# One receive buffer per worker process, shared by every connection (parsed before the next
# checkpoint): a loopback burst of many frames, without a large allocation per read.
_RBUF: Final = bytearray(RECV_CHUNK)
_RVIEW: Final = memoryview(_RBUF)
# (a TLS connection's BIO slots before its handshake)
_NO_BIO: Final = ssl.MemoryBIO()
# Histogram resolution: buckets of 1 % (log scale) over 1 us .. ~100 s.
HIST_SCALE: Final = 100
HIST_SIZE: Final = 1900


class Hist:
    """Log-scale latency histogram in microseconds; mergeable across processes."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts = [0] * HIST_SIZE

    def add(self, us: float) -> None:
        i = int(math.log1p(us if us > 0 else 0.0) * HIST_SCALE)
        self.counts[i if i < HIST_SIZE else HIST_SIZE - 1] += 1

    def to_json(self) -> dict[str, int]:
        return {str(i): c for i, c in enumerate(self.counts) if c}

    @staticmethod
    def merge(parts: list[dict[str, int]]) -> Hist:
        h = Hist()
        for part in parts:
            for k, c in part.items():
                h.counts[int(k)] += c
        return h

    @property
    def total(self) -> int:
        return sum(self.counts)

    def percentile(self, q: float) -> float | None:
        """The ``q``-th percentile in milliseconds (bucket midpoint), or None when empty."""
        total = self.total
        if not total:
            return None
        rank = q / 100.0 * total
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if c and seen >= rank:
                return math.expm1((i + 0.5) / HIST_SCALE) / 1000.0
        return None


@dataclass
class Target:
    """Where and how to connect. ``transport``: ``tcp``, ``ws`` (reference preamble) or ``rescue``."""

    name: str
    transport: str
    port: int
    host: str = "127.0.0.1"
    path: str = "/"
    key_file: str | None = None  # rescue: private JWK used to mint one token per connection
    audience: str = "*"
    # TLS (bench.run --tls): the certificate to trust; every connection then runs TLS over
    # MemoryBIO in this process (encrypt before the non-blocking send, decrypt after recv_into)
    tls_ca: str | None = None


@dataclass
class Scenario:
    """What load to offer (see the module docstring)."""

    mode: str  # throughput | rate | idle
    sessions: int
    size: int = 1024
    window: int = 8
    rate: float = 65536.0  # bytes per second per flow (rate mode)
    direction: str = "both"  # both | host
    heartbeat_s: float = 15.0
    connect_concurrency: int = 64
    # idle mode: first-message probes per second during the window (0: heartbeats only)
    probe_rate: float = 0.0
    # Compare the whole body of every n-th message (a power of two) with what was sent; every
    # message's length and seq are always checked. 1 in tests; the matrix uses 16 to keep the
    # generator cheap (a systematic corruption still shows within a few messages).
    verify_every: int = 1
    # rate mode: ``python`` (this module's trio tickers and readers) or ``native`` (the steady
    # state runs in bench/native/pump.c once every session is connected: a fraction of the CPU,
    # so the generator is not what limits a 2-core machine; plain sockets only, not TLS)
    generator: str = "python"


@dataclass
class Stats:
    recording: bool = False
    msgs: int = 0
    bytes: int = 0
    lat: Hist = field(default_factory=Hist)
    gen_lag: Hist = field(default_factory=Hist)
    hb_lat: Hist = field(default_factory=Hist)
    sent_total: int = 0
    recv_total: int = 0
    seq_errors: int = 0
    corrupt: int = 0
    gen_dropped: int = 0
    gen_rebased: int = 0
    heartbeats_tx: int = 0
    heartbeats_rx: int = 0
    relay_heartbeats: int = 0
    relay_closed: int = 0
    conn_errors: int = 0
    wire_errors: int = 0


class Flow:
    """One direction of one session."""

    __slots__ = ("active", "dst", "rx_seq", "src", "tx_seq")

    def __init__(self, src: Conn, dst: Conn) -> None:
        self.src = src
        self.dst = dst
        self.tx_seq = 0
        self.rx_seq = 0
        self.active = False


class Conn:
    """One client connection: socket, receive parser, bounded send buffer."""

    __slots__ = (
        "buf",
        "builder",
        "closed",
        "draining",
        "frag",
        "gen",
        "inbox",
        "peer_ready",
        "pending",
        "raw",
        "role",
        "rx_flow",
        "sock",
        "tls",
        "tls_in",
        "tls_more",
        "tls_out",
        "transport",
        "tx_flow",
    )

    def __init__(self, gen: LoadGen, role: str, raw: socket.socket) -> None:
        self.gen = gen
        self.role = role
        self.raw = raw
        self.sock = trio.socket.from_stdlib_socket(raw)
        self.transport = gen.target.transport
        self.builder = w.MessageBuilder(self.transport, gen.scenario.size, gen.filler)
        self.buf = bytearray()
        self.frag: bytearray | None = None
        self.pending = bytearray()
        self.draining = False
        self.inbox: list[bytes] = []
        self.closed = False
        self.peer_ready = trio.Event()
        self.rx_flow: Flow | None = None
        self.tx_flow: Flow | None = None
        self.tls: ssl.SSLObject | None = None  # set once the TLS handshake is done
        self.tls_in = self.tls_out = _NO_BIO
        self.tls_more = False  # plaintext may be left in the TLS state: decrypt before waiting

    # -- TLS (cold paths and the two hooks the hot paths call) --------------------------------
    async def tls_handshake(self, context: ssl.SSLContext, host: str) -> None:
        self.tls_in, self.tls_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(self.tls_in, self.tls_out, server_hostname=host)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._send_raw(self.tls_out.read())
                data = await self.sock.recv(RECV_CHUNK)
                if not data:
                    raise w.WireError("closed during the TLS handshake") from None
                self.tls_in.write(data)
        await self._send_raw(self.tls_out.read())
        self.tls = tls

    def _seal(self, data: bytes | bytearray | memoryview) -> bytes:
        assert self.tls is not None
        self.tls.write(data)
        return self.tls_out.read()

    def _decrypt(self, n: int) -> int:
        """``_RBUF[:n]`` (n may be 0) into the TLS state, plaintext into ``_RBUF``: its size, -1 at EOF."""
        assert self.tls is not None
        if n:
            self.tls_in.write(_RVIEW[:n])
        got = 0
        self.tls_more = False
        try:
            while got < RECV_CHUNK:
                k = self.tls.read(RECV_CHUNK - got, _RVIEW[got:])
                if not k:  # close_notify (CPython returns 0 for it)
                    return got or -1
                got += k  # type: ignore[operator]
            self.tls_more = True
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return got or -1
        return got

    async def recv_plain(self) -> bytes:
        """Cold path (the upgrade response): the next plaintext bytes, ``b""`` at EOF."""
        if self.tls is None:
            return bytes(await self.sock.recv(4096))
        while True:
            try:
                data = self.tls.read(RECV_CHUNK)
            except ssl.SSLWantReadError:
                chunk = await self.sock.recv(RECV_CHUNK)
                if not chunk:
                    return b""
                self.tls_in.write(chunk)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            # records read together with this one wait in the BIO: no socket edge will say so
            self.tls_more = bool(self.tls_in.pending or self.tls.pending())
            return data

    # -- sending -------------------------------------------------------------------------------
    def send_nowait(self, data: bytes) -> None:
        """Hand ``data`` to the kernel now; what it does not take waits in ``pending``."""
        if self.closed:
            return
        if self.tls is not None:
            data = self._seal(data)  # (in order: what is pending is ciphertext too)
        if self.pending:
            self.pending += data
            return
        try:
            sent = self.raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._fail()
            return
        if sent < len(data):
            self.pending += memoryview(data)[sent:]
            if not self.draining:
                self.draining = True
                self.gen.nursery.start_soon(self._drain)

    async def _drain(self) -> None:
        try:
            while self.pending and not self.closed:
                await trio.lowlevel.wait_writable(self.raw)
                try:
                    sent = self.raw.send(self.pending)
                except BlockingIOError:
                    continue
                del self.pending[:sent]
        except OSError:
            self._fail()
        finally:
            self.draining = False

    def _fail(self) -> None:
        if not self.closed:
            self.closed = True
            self.gen.stats.conn_errors += 1

    # -- receiving -----------------------------------------------------------------------------
    async def recv_some(self) -> bool:
        """Read once and handle every complete message; False on EOF or error.

        Reads go into one buffer shared by every connection of the worker (no allocation per
        read); it is parsed before the next checkpoint, and only a trailing partial message is
        copied into this connection's own ``buf``.
        """
        raw = self.raw
        try:
            if self.tls_more:
                await trio.lowlevel.checkpoint()
                n = 0
            else:
                await trio.lowlevel.wait_readable(raw)
                n = raw.recv_into(_RBUF)
                if not n:
                    return False
            if self.tls is not None:
                n = self._decrypt(n)
                if n < 0:
                    return False
                if not n:
                    return not self.closed
        except BlockingIOError:
            return not self.closed
        except (OSError, ValueError, trio.ClosedResourceError):  # (ssl.SSLError is an OSError)
            self._fail()
            return False
        now = time.monotonic_ns()
        if self.buf:
            self.buf += _RVIEW[:n]
            view: bytearray = self.buf
            end = len(view)
        else:
            view = _RBUF
            end = n
        try:
            used = (
                self._feed_tcp(view, end, now) if self.transport == "tcp" else self._feed_ws(view, end, now)
            )
        except w.WireError:
            self.gen.stats.wire_errors += 1
            self._fail()
            return False
        if view is self.buf:
            del self.buf[:used]
        elif used < end:
            self.buf = bytearray(_RVIEW[used:end])
        return not self.closed

    async def reader(self) -> None:
        while await self.recv_some():
            pass
        self.closed = True

    def _account(self, flow: Flow | None, rx: int, count: int, errors: int, corrupt: int, now: int) -> None:
        """Fold one read's fast-path counts into the stats; refill the flow in throughput mode."""
        if flow is None or not (count or errors or corrupt):
            return
        gen = self.gen
        stats = gen.stats
        flow.rx_seq = rx
        stats.recv_total += count
        stats.seq_errors += errors
        stats.corrupt += corrupt
        if stats.recording:
            stats.msgs += count
            stats.bytes += count * gen.size
        if gen.window and flow.active and flow.tx_seq - rx <= gen.low_water:
            gen.refill(flow, now)

    def _feed_tcp(self, buf: bytes | bytearray, n: int, now: int) -> int:
        """Parse length-prefixed messages in ``buf[:n]``; returns the bytes used."""
        gen = self.gen
        flow = self.rx_flow
        rx = flow.rx_seq if flow is not None else 0
        count = errors = corrupt = 0
        size, filler, vmask = gen.size, gen.filler, gen.verify_mask
        lat = gen.stats.lat.counts if gen.stats.recording else None
        unpack_len = w.LEN_PREFIX.unpack_from
        unpack = w.SEQ_TS.unpack_from
        off = 0
        while n - off >= 4:
            (ln,) = unpack_len(buf, off)
            p = off + 4
            if n - p < ln:
                break
            off = p + ln
            if flow is not None and ln >= w.HEAD_SIZE and buf[p + 1] == w.KIND_DATA:
                seq, ts = unpack(buf, p)
                if seq != rx + 1:
                    errors += 1
                rx = seq
                count += 1
                if ln != size or (not seq & vmask and buf[p + w.HEAD_SIZE : off] != filler):
                    corrupt += 1
                if lat is not None:
                    i = int(math.log1p(max(0, now - ts) / 1000.0) * HIST_SCALE)
                    lat[i if i < HIST_SIZE else HIST_SIZE - 1] += 1
                continue
            if flow is not None:
                flow.rx_seq = rx
            self._on_message(buf, p, ln, now)
            if flow is not None:
                rx = flow.rx_seq
        self._account(flow, rx, count, errors, corrupt, now)
        return off

    def _feed_ws(self, buf: bytes | bytearray, n: int, now: int) -> int:
        """Parse server WebSocket frames in ``buf[:n]``; returns the bytes used."""
        gen = self.gen
        flow = self.rx_flow
        rx = flow.rx_seq if flow is not None else 0
        count = errors = corrupt = 0
        size, filler, vmask = gen.size, gen.filler, gen.verify_mask
        lat = gen.stats.lat.counts if gen.stats.recording else None
        unpack = w.SEQ_TS.unpack_from
        off = 0
        while n - off >= 2:
            b0 = buf[off]
            ln = buf[off + 1]
            if ln & 0x80:
                raise w.WireError("server frames must not be masked")
            p = off + 2
            if ln == 126:
                if n - p < 2:
                    break
                ln = (buf[p] << 8) | buf[p + 1]
                p += 2
            elif ln == 127:
                if n - p < 8:
                    break
                ln = int.from_bytes(buf[p : p + 8], "big")
                p += 8
            if n - p < ln:
                break
            off = p + ln
            if b0 == 0x82 and flow is not None and ln >= w.HEAD_SIZE and buf[p + 1] == w.KIND_DATA:
                seq, ts = unpack(buf, p)
                if seq != rx + 1:
                    errors += 1
                rx = seq
                count += 1
                if ln != size or (not seq & vmask and buf[p + w.HEAD_SIZE : off] != filler):
                    corrupt += 1
                if lat is not None:
                    i = int(math.log1p(max(0, now - ts) / 1000.0) * HIST_SCALE)
                    lat[i if i < HIST_SIZE else HIST_SIZE - 1] += 1
                continue
            if flow is not None:
                flow.rx_seq = rx
            opcode = b0 & 0x0F
            if opcode == w.OP_BINARY and b0 & 0x80:
                self._on_message(buf, p, ln, now)
            elif opcode in (w.OP_BINARY, w.OP_CONT):
                self._fragment(buf[p : p + ln], bool(b0 & 0x80), opcode == w.OP_BINARY, now)
            elif opcode == w.OP_PING:
                self.send_nowait(w.ws_client_message(bytes(buf[p : p + ln]), opcode=w.OP_PONG))
            elif opcode == w.OP_CLOSE:
                self.closed = True
                self.gen.stats.relay_closed += 1
                break
            elif opcode != w.OP_PONG:
                raise w.WireError(f"unexpected opcode {opcode}")
            if flow is not None:
                rx = flow.rx_seq
        self._account(flow, rx, count, errors, corrupt, now)
        return off

    def _fragment(self, part: bytes | bytearray, fin: bool, first: bool, now: int) -> None:
        if first:
            self.frag = bytearray()
        if self.frag is None:
            raise w.WireError("continuation frame without a start")
        self.frag += part
        if len(self.frag) > 2 * w.MAX_HANDSHAKE_RESPONSE + self.gen.scenario.size:
            raise w.WireError("fragmented message larger than anything the generator sent")
        if fin:
            whole = bytes(self.frag)
            self.frag = None
            self._on_message(whole, 0, len(whole), now)

    def _on_message(self, buf: bytes | bytearray, p: int, ln: int, now: int) -> None:
        gen = self.gen
        stats = gen.stats
        kind = buf[p + 1] if ln >= 2 else -1
        if kind == w.KIND_DATA and ln >= w.HEAD_SIZE:
            _, _, _, _, seq, ts = w.HEAD.unpack_from(buf, p)
            flow = self.rx_flow
            if flow is None:
                stats.seq_errors += 1
                return
            if seq != flow.rx_seq + 1:
                stats.seq_errors += 1
            flow.rx_seq = seq
            stats.recv_total += 1
            if ln != gen.size or buf[p + w.HEAD_SIZE : p + ln] != gen.filler:
                stats.corrupt += 1
            if stats.recording:
                stats.msgs += 1
                stats.bytes += ln
                stats.lat.add((now - ts) / 1000.0)
            if gen.window and flow.active and flow.tx_seq - seq <= gen.low_water:
                gen.refill(flow, now)
        elif kind == w.KIND_HEARTBEAT and ln >= w.RESCUE_HEADER.size:
            sent = w.RESCUE_HEADER.unpack_from(buf, p)[4]
            if sent == 0:  # the relay's own heartbeat (rescue, under backpressure), not an echo
                stats.relay_heartbeats += 1
                return
            stats.heartbeats_rx += 1
            if stats.recording:
                stats.hb_lat.add((now - sent) / 1000.0)
        elif kind == w.KIND_CLOSE:
            self.closed = True
            stats.relay_closed += 1
        else:
            if len(self.inbox) >= INBOX_LIMIT:
                del self.inbox[0]
            self.inbox.append(bytes(buf[p : p + ln]))
            if kind == w.KIND_PEER:
                self.peer_ready.set()

    async def next_message(self) -> bytes:
        """Cold path for handshakes: the next non-data message."""
        while not self.inbox:
            if self.closed or not await self.recv_some():
                raise w.WireError("connection closed during the handshake")
        return self.inbox.pop(0)

    async def send_all(self, data: bytes) -> None:
        """Cold path: send everything (handshakes)."""
        await self._send_raw(self._seal(data) if self.tls is not None else data)

    async def _send_raw(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

    def close(self) -> None:
        if not self.closed and not self.pending:  # never cut into a half-sent frame
            bye = w.close_message(self.transport)
            if bye and self.tls is not None:
                try:
                    bye = self._seal(bye)
                except ssl.SSLError:
                    bye = b""
            if bye:
                try:
                    self.raw.send(bye)
                except OSError:
                    pass
        self.closed = True
        self.sock.close()


class LoadGen:
    """One worker's sessions and the tasks that drive them.

    Args:
        target: where to connect.
        scenario: what load to offer.
        mint: ``mint(session, role) -> token bytes`` for the ``rescue`` transport.
        tag: makes session ids unique across workers and runs.
    """

    def __init__(
        self,
        target: Target,
        scenario: Scenario,
        *,
        mint: Callable[[str, str], bytes] | None = None,
        tag: str = "",
    ) -> None:
        self.target = target
        self.scenario = scenario
        self.tls_context = ssl.create_default_context(cafile=target.tls_ca) if target.tls_ca else None
        self.mint = mint
        self.tag = tag or os.urandom(4).hex()
        self.size = scenario.size
        self.filler = w.make_filler(scenario.size)
        if scenario.verify_every < 1 or scenario.verify_every & (scenario.verify_every - 1):
            raise ValueError("verify_every must be a power of two")
        self.verify_mask = scenario.verify_every - 1
        if scenario.generator not in ("python", "native"):
            raise ValueError(f"unknown generator {scenario.generator!r}")
        self.native = scenario.generator == "native"
        if self.native and (scenario.mode != "rate" or self.tls_context is not None):
            raise ValueError("the native generator runs rate mode over plain sockets only")
        self.window = scenario.window if scenario.mode == "throughput" else 0
        self.low_water = self.window // 2
        self.stats = Stats()
        self.conns: list[Conn] = []
        self.flows: list[Flow] = []
        self.connect_failures = 0
        self.connect_errors: dict[str, int] = {}
        self.connect_s = 0.0
        self.sending = False
        self.nursery: trio.Nursery
        self._hb_interval = max(1, int(scenario.heartbeat_s * 1e9))
        self._hb_heap: list[tuple[int, int]] = []
        self._hb_scope = trio.CancelScope()
        self._pump: _native.Pump | None = None
        self._pump_done = trio.Event()
        self._mark_t = self._window_s = self._mark_cpu = self._window_cpu = 0.0

    # -- connecting ----------------------------------------------------------------------------
    async def _open(self, session: str, role: str) -> Conn:
        t = self.target
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setblocking(False)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(self, role, raw)
        try:
            await conn.sock.connect((t.host, t.port))
            if self.tls_context is not None:
                await conn.tls_handshake(self.tls_context, t.host)
            if t.transport == "tcp":
                await conn.send_all(w.encode_preamble(session, role))
                return conn
            request, accept = w.handshake_request(t.host, t.port, t.path)
            await conn.send_all(request)
            head = bytearray()
            while b"\r\n\r\n" not in head:
                if len(head) > w.MAX_HANDSHAKE_RESPONSE:
                    raise w.WireError("upgrade response too long")
                data = await conn.recv_plain()
                if not data:
                    raise w.WireError("closed during the upgrade")
                head += data
            end = head.index(b"\r\n\r\n")
            w.check_handshake_response(bytes(head[:end]), accept)
            conn.buf = head[end + 4 :]
            if t.transport == "ws":
                await conn.send_all(w.ws_client_message(w.encode_preamble(session, role)))
                return conn
            assert self.mint is not None, "the rescue transport needs a token minter"
            hello = w.hello_message(
                token=self.mint(session, role), session=session, role=role, nonce=os.urandom(16)
            )
            await conn.send_all(hello)
            welcome = await conn.next_message()
            if len(welcome) < 12 or welcome[1] != w.KIND_WELCOME:
                raise w.WireError(f"expected WELCOME, got {welcome[:40]!r}")
            import cbor2

            if cbor2.loads(welcome[12:]).get("peer") is not None:
                conn.peer_ready.set()
            return conn
        except BaseException:
            conn.close()
            raise

    async def _open_session(self, i: int, limiter: trio.CapacityLimiter) -> None:
        session = f"b-{self.tag}-{i}"
        async with limiter:
            host: Conn | None = None
            guest: Conn | None = None
            try:
                with trio.fail_after(CONNECT_TIMEOUT_S):
                    host = await self._open(session, "host")
                    guest = await self._open(session, "guest")
                    if self.target.transport == "rescue":
                        while not host.peer_ready.is_set():
                            await host.next_message()
            except (OSError, ValueError, w.WireError, trio.TooSlowError) as exc:
                self.connect_failures += 1
                key = f"{type(exc).__name__}: {str(exc)[:80]}"
                self.connect_errors[key] = self.connect_errors.get(key, 0) + 1
                for c in (host, guest):
                    if c is not None:
                        c.close()
                return
        for conn in (host, guest):
            heapq.heappush(self._hb_heap, (self._hb_due(), len(self.conns)))
            self.conns.append(conn)
            if not self.native:  # (the pump reads them once every session is connected)
                self.nursery.start_soon(conn.reader)
        # (idle mode too: its first-message probes are DATA, checked like any other)
        flows = [(host, guest)] if self.scenario.direction == "host" else [(host, guest), (guest, host)]
        for src, dst in flows:
            flow = Flow(src, dst)
            src.tx_flow = flow
            dst.rx_flow = flow
            self.flows.append(flow)

    async def connect_all(self) -> None:
        t0 = time.monotonic()
        limiter = trio.CapacityLimiter(self.scenario.connect_concurrency)
        async with trio.open_nursery() as nursery:
            for i in range(self.scenario.sessions):
                nursery.start_soon(self._open_session, i, limiter)
        self.connect_s = time.monotonic() - t0

    # -- sending -------------------------------------------------------------------------------
    def refill(self, flow: Flow, now: int) -> None:
        k = self.window - (flow.tx_seq - flow.rx_seq)
        if k <= 0 or flow.src.closed:
            return
        build = flow.src.builder.data
        parts: list[bytes] = []
        seq = flow.tx_seq
        for _ in range(k):
            seq += 1
            parts += build(seq, now)
        flow.tx_seq = seq
        self.stats.sent_total += k
        flow.src.send_nowait(b"".join(parts))

    async def _rate_ticker(self) -> None:
        sc = self.scenario
        interval = int(sc.size / sc.rate * 1e9)
        start = time.monotonic_ns()
        heap = [(start + random.randrange(interval), i) for i in range(len(self.flows))]
        heapq.heapify(heap)
        stats = self.stats
        while self.sending and heap:
            now = time.monotonic_ns()
            while heap[0][0] <= now:
                due, i = heap[0]
                lag = now - due
                if lag > MAX_LAG_NS:
                    stats.gen_rebased += 1
                    due = now
                flow = self.flows[i]
                src = flow.src
                if len(src.pending) > PENDING_LIMIT:
                    stats.gen_dropped += 1
                elif not src.closed:
                    seq = flow.tx_seq + 1
                    flow.tx_seq = seq
                    stats.sent_total += 1
                    src.send_nowait(b"".join(src.builder.data(seq, time.monotonic_ns())))
                if stats.recording:
                    stats.gen_lag.add(lag / 1000.0)
                heapq.heapreplace(heap, (due + interval, i))
                now = time.monotonic_ns()
            await trio.sleep(max(MIN_TICK_S, (heap[0][0] - time.monotonic_ns()) / 1e9))

    async def _probe_ticker(self) -> None:
        """Idle mode: ``probe_rate`` sessions a second send one DATA message each (once per session).

        Sessions are taken in random order, one flow (direction) each at random, so every probe
        lands on a session that has sent no DATA since it connected: the first message after a
        quiet spell as long as the warm-up outlasted the relay's quiet threshold.
        """
        per_session = 1 if self.scenario.direction == "host" else 2
        sessions = list(range(len(self.flows) // per_session))
        random.shuffle(sessions)
        interval = 1.0 / self.scenario.probe_rate
        stats = self.stats
        next_at = trio.current_time()
        for s in sessions:
            if not self.sending:
                return
            flow = self.flows[s * per_session + random.randrange(per_session)]
            src = flow.src
            if not src.closed and not flow.dst.closed:
                seq = flow.tx_seq + 1
                flow.tx_seq = seq
                stats.sent_total += 1
                src.send_nowait(b"".join(src.builder.data(seq, time.monotonic_ns())))
            next_at += interval
            await trio.sleep_until(next_at)

    def _hb_due(self) -> int:
        # A random phase per connection spreads heartbeats evenly over the period.
        return time.monotonic_ns() + random.randrange(self._hb_interval)

    async def _heartbeat_ticker(self) -> None:
        """One heartbeat per connection per ``heartbeat_s``, from the moment it is connected."""
        heap = self._hb_heap
        interval = self._hb_interval
        with self._hb_scope:  # (cancelled when the native pump takes the heartbeats over)
            while True:
                now = time.monotonic_ns()
                while heap and heap[0][0] <= now:
                    due, i = heap[0]
                    conn = self.conns[i]
                    if not conn.closed:
                        conn.send_nowait(conn.builder.heartbeat(time.monotonic_ns()))
                        self.stats.heartbeats_tx += 1
                    heapq.heapreplace(heap, (max(due + interval, now), i))
                wait = (heap[0][0] - time.monotonic_ns()) / 1e9 if heap else 0.1
                await trio.sleep(max(MIN_TICK_S, wait))

    # -- the native pump (rate mode's steady state in C) -----------------------------------------
    def _hand_over(self) -> _native.Pump:
        """Stop every Python sender and give the sockets, with what is buffered, to the pump."""
        self._hb_scope.cancel()  # (synchronous: no heartbeat is written after this line)
        due = [time.monotonic_ns()] * len(self.conns)
        for at, i in self._hb_heap:
            due[i] = at
        index = {id(c): i for i, c in enumerate(self.conns)}
        pump = _native.Pump(
            fds=[-1 if c.closed else c.raw.fileno() for c in self.conns],
            hb_due=due,
            carry=[bytes(c.buf) for c in self.conns],
            pending=[bytes(c.pending) for c in self.conns],
            flows=[(index[id(f.src)], index[id(f.dst)]) for f in self.flows],
            ws=self.target.transport != "tcp",
            size=self.size,
            filler=self.filler,
            interval_ns=int(self.scenario.size / self.scenario.rate * 1e9),
            hb_interval_ns=self._hb_interval,
            verify_mask=self.verify_mask,
        )
        for c in self.conns:  # (a _drain task still waiting finds nothing left and ends)
            c.buf = bytearray()
            c.pending = bytearray()
        return pump

    async def _run_pump(self, pump: _native.Pump) -> None:
        try:
            await trio.to_thread.run_sync(pump.run)
        finally:
            self._pump_done.set()

    async def _pump_result(self, pump: _native.Pump) -> float:
        """Wait for the pump to drain and return; fold what it counted into the stats."""
        with trio.move_on_after(DRAIN_TIMEOUT_S + 5):
            await self._pump_done.wait()
        if not self._pump_done.is_set():
            pump.set(_native.ABORT)
            await self._pump_done.wait()
        s, ps = self.stats, pump.stats
        for name in _native.RUN_TOTALS:
            setattr(s, name, getattr(s, name) + ps.counter(name))
        s.msgs, s.bytes = ps.counter("msgs"), ps.counter("bytes")
        s.lat.counts, s.gen_lag.counts, s.hb_lat.counts = list(ps.lat), list(ps.gen_lag), list(ps.hb_lat)
        for i, flow in enumerate(self.flows):
            flow.tx_seq, flow.rx_seq = pump.flow(i)
        for conn, state in zip(self.conns, pump.conn_states, strict=False):
            conn.closed = conn.closed or state != 0  # (2: a half-sent frame; no goodbye after it)
        return ps.counter("drain_ns") / 1e9

    def start(self) -> None:
        """Begin offering load (and heartbeats)."""
        if self._pump is not None:
            self._pump.set(_native.SENDING)
            return
        self.sending = True
        for flow in self.flows:
            flow.active = True
        if self.scenario.mode == "throughput":
            now = time.monotonic_ns()
            for flow in self.flows:
                self.refill(flow, now)
        elif self.scenario.mode == "rate":
            self.nursery.start_soon(self._rate_ticker)

    def mark(self) -> None:
        """Begin the measured window: counters and histograms start from zero."""
        s = self.stats
        s.msgs = s.bytes = 0
        s.lat, s.gen_lag, s.hb_lat = Hist(), Hist(), Hist()
        s.recording = True
        self._mark_t = time.monotonic()
        self._mark_cpu = _self_cpu()
        if self._pump is not None:
            self._pump.set(_native.RECORDING)
        if self.scenario.mode == "idle" and self.scenario.probe_rate > 0 and self.sending:
            self.nursery.start_soon(self._probe_ticker)

    def stop(self) -> None:
        """End the measured window and stop sending data (heartbeats go on until the end)."""
        self.stats.recording = False
        self._window_s = time.monotonic() - self._mark_t
        self._window_cpu = _self_cpu() - self._mark_cpu
        self.sending = False
        for flow in self.flows:
            flow.active = False
        if self._pump is not None:
            self._pump.set(_native.STOP)

    async def drain(self) -> float:
        """Wait (bounded) for every message in flight to arrive; returns the time it took."""
        if self._pump is not None:
            return await self._pump_result(self._pump)
        t0 = time.monotonic()
        with trio.move_on_after(DRAIN_TIMEOUT_S):
            while any(f.rx_seq != f.tx_seq and not f.dst.closed for f in self.flows):
                await trio.sleep(0.01)
        return time.monotonic() - t0

    def result(self, drain_s: float) -> dict[str, Any]:
        s = self.stats
        in_flight = sum(f.tx_seq - f.rx_seq for f in self.flows)
        return {
            "event": "result",
            "sessions": self.scenario.sessions,
            "connections": len(self.conns),
            "connect_failures": self.connect_failures,
            "connect_errors": self.connect_errors,
            "connect_s": round(self.connect_s, 3),
            "window_s": round(self._window_s, 3),
            "gen_cpu_s": round(self._window_cpu, 3),
            "msgs": s.msgs,
            "bytes": s.bytes,
            "lat": s.lat.to_json(),
            "gen_lag": s.gen_lag.to_json(),
            "hb_lat": s.hb_lat.to_json(),
            "sent_total": s.sent_total,
            "recv_total": s.recv_total,
            "lost": in_flight,
            "seq_errors": s.seq_errors,
            "corrupt": s.corrupt,
            "gen_dropped": s.gen_dropped,
            "gen_rebased": s.gen_rebased,
            "heartbeats_tx": s.heartbeats_tx,
            "heartbeats_rx": s.heartbeats_rx,
            "relay_heartbeats": s.relay_heartbeats,
            "relay_closed": s.relay_closed,
            "conn_errors": s.conn_errors,
            "wire_errors": s.wire_errors,
            "drain_s": round(drain_s, 3),
        }

    def close_all(self) -> None:
        for conn in self.conns:
            conn.close()

    async def run(self, control: Callable[[LoadGen], Any]) -> dict[str, Any]:
        """Connect, hand control to ``control(self)`` (which calls start/mark/stop), drain, report."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._heartbeat_ticker)
            await self.connect_all()
            if self.native:
                self._pump = self._hand_over()
                nursery.start_soon(self._run_pump, self._pump)
            try:
                await control(self)
                drain_s = await self.drain()
            except BaseException:
                if self._pump is not None:  # (the thread cannot be cancelled: tell it to return)
                    self._pump.set(_native.ABORT)
                raise
            result = self.result(drain_s)
            nursery.cancel_scope.cancel()
        self.close_all()
        return result


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard one (idle mode needs thousands of sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def timed_control(gen: LoadGen, *, warmup_s: float, duration_s: float) -> None:
    """Self-timed run for a single in-process generator (tests, ad-hoc use)."""
    gen.start()
    await trio.sleep(warmup_s)
    gen.mark()
    await trio.sleep(duration_s)
    gen.stop()


async def run_local(
    target: Target,
    scenario: Scenario,
    *,
    warmup_s: float,
    duration_s: float,
    mint: Callable[[str, str], bytes] | None = None,
) -> dict[str, Any]:
    """Run one scenario in this process and return the worker result dict."""
    gen = LoadGen(target, scenario, mint=mint)

    async def control(g: LoadGen) -> None:
        await timed_control(g, warmup_s=warmup_s, duration_s=duration_s)

    return await gen.run(control)


# -- worker process ---------------------------------------------------------------------------------
def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _stdio_control(gen: LoadGen) -> None:
    _emit(
        {
            "event": "connected",
            "connections": len(gen.conns),
            "connect_failures": gen.connect_failures,
            "connect_s": round(gen.connect_s, 3),
        }
    )
    stdin = trio.lowlevel.FdStream(os.dup(0))
    buf = b""
    async with stdin:
        while True:
            while b"\n" not in buf:
                data = await stdin.receive_some(1024)
                if not data:
                    gen.stop()
                    return
                buf += data
            line, buf = buf.split(b"\n", 1)
            cmd = line.strip().decode()
            if cmd == "start":
                gen.start()
            elif cmd == "mark":
                gen.mark()
            elif cmd == "stop":
                gen.stop()
                return


def _worker_main(config: dict[str, Any]) -> None:
    raise_nofile()
    target = Target(**config["target"])
    scenario = Scenario(**config["scenario"])
    mint = None
    if target.transport == "rescue":
        from bench.targets import make_minter

        assert target.key_file is not None
        mint = make_minter(target.key_file, audience=target.audience)
    gen = LoadGen(target, scenario, mint=mint, tag=config.get("tag", ""))
    result = trio.run(gen.run, _stdio_control)
    _emit(result)


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge worker results into one row: rates, percentiles, delivery check."""
    window = max((r["window_s"] for r in results), default=0.0) or 1e-9
    lat = Hist.merge([r["lat"] for r in results])
    lag = Hist.merge([r["gen_lag"] for r in results])
    hb = Hist.merge([r["hb_lat"] for r in results])
    total = {
        k: sum(r[k] for r in results)
        for k in (
            "msgs",
            "bytes",
            "sent_total",
            "recv_total",
            "lost",
            "seq_errors",
            "corrupt",
            "gen_dropped",
            "gen_rebased",
            "heartbeats_tx",
            "heartbeats_rx",
            "relay_heartbeats",
            "relay_closed",
            "conn_errors",
            "wire_errors",
            "connections",
            "connect_failures",
        )
    }
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["connect_errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {
        **total,
        "connect_errors": errors,
        "window_s": round(window, 3),
        "msgs_per_s": total["msgs"] / window,
        "mb_per_s": total["bytes"] / window / 1e6,
        "p50_ms": lat.percentile(50),
        "p95_ms": lat.percentile(95),
        "p99_ms": lat.percentile(99),
        "gen_lag_p95_ms": lag.percentile(95),
        "hb_p95_ms": hb.percentile(95),
        "hb_max_ms": hb.percentile(100),
        "gen_cpu_pct": [round(100 * r["gen_cpu_s"] / window, 1) for r in results],
        "connect_s": max((r["connect_s"] for r in results), default=0.0),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Load generator (see bench/run.py for the matrix).")
    parser.add_argument("--worker", metavar="JSON", help="worker mode: config as JSON, control on stdin")
    parser.add_argument("--transport", choices=("tcp", "ws", "rescue"), default="tcp")
    parser.add_argument("--port", type=int)
    parser.add_argument("--path", default="/")
    parser.add_argument("--key-file", help="rescue: private JWK to mint tokens with")
    parser.add_argument("--mode", choices=("throughput", "rate", "idle"), default="throughput")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--rate", type=float, default=65536.0, help="bytes/s per flow (rate mode)")
    parser.add_argument("--direction", choices=("both", "host"), default="both")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--generator", choices=("python", "native"), default="python", help="rate mode")
    args = parser.parse_args(argv)
    if args.worker:
        _worker_main(json.loads(args.worker))
        return
    if args.port is None:
        parser.error("--port is required")
    raise_nofile()
    target = Target(
        name=args.transport, transport=args.transport, port=args.port, path=args.path, key_file=args.key_file
    )
    scenario = Scenario(
        mode=args.mode,
        sessions=args.sessions,
        size=args.size,
        window=args.window,
        rate=args.rate,
        direction=args.direction,
        generator=args.generator,
    )
    mint = None
    if args.transport == "rescue":
        from bench.targets import make_minter

        mint = make_minter(args.key_file)
    result = trio.run(
        lambda: run_local(target, scenario, warmup_s=args.warmup, duration_s=args.duration, mint=mint)
    )
    summary = summarize([result])
    summary.pop("connect_errors") if not summary["connect_errors"] else None
    print(json.dumps({"target": asdict(target), "scenario": asdict(scenario), **summary}, indent=1))


if __name__ == "__main__":
    main()
