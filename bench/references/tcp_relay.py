"""Raw-TCP trio relay: the ceiling every WebSocket relay is compared with.

Each client sends a fixed 64-byte preamble (``b"BRP1"``, role byte ``h``/``g``, session id NUL-padded);
the relay pairs the two roles of a session and then copies bytes both ways. No framing, no parsing:
whatever a WebSocket relay does on top of this is overhead.

Usage: ``python bench/references/tcp_relay.py --port 0`` prints ``READY port=<n>`` when listening.
"""

from __future__ import annotations

import argparse
import ssl
import sys
from dataclasses import dataclass, field
from functools import partial

import trio

PREAMBLE_SIZE = 64  # magic (4) + role (1) + session id (59, NUL-padded)
MAGIC = b"BRP1"
# Bytes read per receive: one loopback burst; bounds the per-connection buffer.
CHUNK = 65536
# A peer waiting alone longer than this is dropped (same order as the real relay's pair timeout).
PAIR_TIMEOUT_S = 120.0


@dataclass
class _Session:
    streams: dict[bytes, trio.SocketStream] = field(default_factory=dict)
    paired: trio.Event = field(default_factory=trio.Event)


_sessions: dict[bytes, _Session] = {}


async def _read_preamble(stream: trio.SocketStream) -> tuple[bytes, bytes, bytes] | None:
    buf = bytearray()
    while len(buf) < PREAMBLE_SIZE:
        data = await stream.receive_some(CHUNK)
        if not data:
            return None
        buf += data
    if bytes(buf[:4]) != MAGIC or bytes(buf[4:5]) not in (b"h", b"g"):
        return None
    return bytes(buf[4:5]), bytes(buf[5:PREAMBLE_SIZE]).rstrip(b"\0"), bytes(buf[PREAMBLE_SIZE:])


async def _pump(src: trio.SocketStream, dst: trio.SocketStream, first: bytes) -> None:
    try:
        if first:
            await dst.send_all(first)
        while True:
            data = await src.receive_some(CHUNK)
            if not data:
                return
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


async def handle(stream: trio.SocketStream) -> None:
    """Pair one connection with its partner and forward its bytes until either side closes."""
    try:
        with trio.move_on_after(PAIR_TIMEOUT_S):
            got = await _read_preamble(stream)
            if got is None:
                return
            role, sid, rest = got
            session = _sessions.setdefault(sid, _Session())
            old = session.streams.get(role)
            if old is not None:
                await old.aclose()
            session.streams[role] = stream
            if len(session.streams) == 2:
                session.paired.set()
            await session.paired.wait()
        if not session.paired.is_set():
            if session.streams.get(role) is stream:
                del session.streams[role]
            return
        partner = session.streams[b"g" if role == b"h" else b"h"]
        await _pump(stream, partner, rest)
        await partner.aclose()
        if _sessions.get(sid) is session:
            del _sessions[sid]
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def main(port: int, cert: str | None = None, key: str | None = None) -> None:
    async with trio.open_nursery() as nursery:
        if cert and key:  # bench.run --tls: the same copy loop over trio's SSLStream
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert, key)
            serve = partial(trio.serve_ssl_over_tcp, handle, port, context, host="127.0.0.1")
            listeners = await nursery.start(serve)
            sock = listeners[0].transport_listener.socket
        else:
            listeners = await nursery.start(partial(trio.serve_tcp, handle, port, host="127.0.0.1"))
            sock = listeners[0].socket
        print(f"READY port={sock.getsockname()[1]}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls-cert", help="serve TLS with this certificate (bench.run --tls)")
    parser.add_argument("--tls-key", help="the certificate's private key")
    args = parser.parse_args()
    try:
        trio.run(main, args.port, args.tls_cert, args.tls_key)
    except KeyboardInterrupt:
        sys.exit(0)
