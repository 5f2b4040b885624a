"""Reference relay on the asyncio ``websockets`` library: the baseline the SPEC's targets are ratios to.

A peer's first binary message is the 64-byte pairing preamble (``b"BRP1"``, role byte ``h``/``g``,
session id NUL-padded); after that every message is forwarded unchanged to the partner. This is the
relay a Python developer would write in twenty lines with the most popular WebSocket library:
defaults everywhere except no compression (relayed bodies are ciphertext, and the SPEC forbids
extensions) and no library pings (peers send their own heartbeats, as the real protocol does).

Usage: ``python bench/references/ws_websockets_relay.py --port 0`` prints ``READY port=<n>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
import sys

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

PREAMBLE_SIZE = 64
MAGIC = b"BRP1"
# Largest message accepted: the real relay's max_frame is 64 KiB; keep headroom.
MAX_MESSAGE = 1 << 20
PAIR_TIMEOUT_S = 120.0


class _Session:
    def __init__(self) -> None:
        self.peers: dict[bytes, ServerConnection] = {}
        self.paired = asyncio.Event()


_sessions: dict[bytes, _Session] = {}


async def handler(ws: ServerConnection) -> None:
    try:
        first = await asyncio.wait_for(ws.recv(), PAIR_TIMEOUT_S)
    except (ConnectionClosed, TimeoutError):
        return
    if not isinstance(first, bytes) or len(first) != PREAMBLE_SIZE or first[:4] != MAGIC:
        await ws.close(1002, "bad preamble")
        return
    role, sid = first[4:5], first[5:].rstrip(b"\0")
    session = _sessions.setdefault(sid, _Session())
    session.peers[role] = ws
    if len(session.peers) == 2:
        session.paired.set()
    try:
        await asyncio.wait_for(session.paired.wait(), PAIR_TIMEOUT_S)
    except TimeoutError:
        session.peers.pop(role, None)
        return
    partner = session.peers[b"g" if role == b"h" else b"h"]
    try:
        async for message in ws:
            await partner.send(message)
    except ConnectionClosed:
        pass
    finally:
        with contextlib.suppress(ConnectionClosed):
            await partner.close()
        _sessions.pop(sid, None)


def _tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The server context for ``--tls-cert/--tls-key`` (``bench.run --tls``), or None for plain."""
    if not cert or not key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def main(port: int, tls: ssl.SSLContext | None = None) -> None:
    async with serve(
        handler, "127.0.0.1", port, compression=None, ping_interval=None, max_size=MAX_MESSAGE, ssl=tls
    ) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(f"READY port={bound}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls-cert", help="serve TLS with this certificate (bench.run --tls)")
    parser.add_argument("--tls-key", help="the certificate's private key")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.port, _tls_context(args.tls_cert, args.tls_key)))
    sys.exit(0)
