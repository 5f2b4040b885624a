"""Reference relay on trio-websocket (wsproto underneath): the same pairing as the websockets one.

A peer's first binary message is the 64-byte pairing preamble (``b"BRP1"``, role byte ``h``/``g``,
session id NUL-padded); after that every message is forwarded unchanged to the partner. Library
defaults (message queue of 1, no automatic pings); compression is never negotiated.

Usage: ``python bench/references/ws_trio_websocket_relay.py --port 0`` prints ``READY port=<n>``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from functools import partial

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

PREAMBLE_SIZE = 64
MAGIC = b"BRP1"
MAX_MESSAGE = 1 << 20  # the real relay's max_frame is 64 KiB; keep headroom
PAIR_TIMEOUT_S = 120.0


@dataclass
class _Session:
    peers: dict[bytes, WebSocketConnection] = field(default_factory=dict)
    paired: trio.Event = field(default_factory=trio.Event)


_sessions: dict[bytes, _Session] = {}


async def handler(request: WebSocketRequest) -> None:
    ws = await request.accept()
    try:
        with trio.move_on_after(PAIR_TIMEOUT_S):
            first = await ws.get_message()
            if not isinstance(first, bytes) or len(first) != PREAMBLE_SIZE or first[:4] != MAGIC:
                await ws.aclose(1002, "bad preamble")
                return
            role, sid = first[4:5], first[5:].rstrip(b"\0")
            session = _sessions.setdefault(sid, _Session())
            session.peers[role] = ws
            if len(session.peers) == 2:
                session.paired.set()
            await session.paired.wait()
        if not session.paired.is_set():
            session.peers.pop(role, None)
            return
        partner = session.peers[b"g" if role == b"h" else b"h"]
        try:
            while True:
                await partner.send_message(await ws.get_message())
        finally:
            await partner.aclose()
            _sessions.pop(sid, None)
    except ConnectionClosed:
        pass


async def main(port: int) -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(serve_websocket, handler, "127.0.0.1", port, None, max_message_size=MAX_MESSAGE)
        )
        print(f"READY port={server.port}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        trio.run(main, args.port)
    except KeyboardInterrupt:
        sys.exit(0)
