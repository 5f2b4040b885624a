"""Reference relay on ``picows``: the fastest Python WebSocket server we know of, the peer to beat.

Same contract as ``ws_websockets_relay.py``: a peer's first binary message is the 64-byte pairing
preamble (``b"BRP1"``, role byte ``h``/``g``, session id NUL-padded); after that every frame is
forwarded unchanged (same opcode, same FIN bit) to the partner. picows is Cython with a callback API
(no task per connection, no message reassembly, zero-copy frames), so this is the cheapest relay a
Python developer can write with a WebSocket library on asyncio: defaults everywhere except no
library pings (peers send their own heartbeats, as the real protocol does).

Flow control: when a partner's transport asks to pause writing, this side stops reading until it
resumes (so a slow reader cannot make the relay buffer without bound), as the real relay does.

Usage: ``python bench/references/ws_picows_relay.py --port 0`` prints ``READY port=<n>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
import sys

from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    ws_create_server,
)

PREAMBLE_SIZE = 64
MAGIC = b"BRP1"
# Largest frame accepted: the real relay's max_frame is 64 KiB; keep headroom.
MAX_FRAME = 1 << 20
# Frames a peer may send before its partner arrived (the generator sends none; bounds a bad client).
MAX_EARLY_FRAMES = 64

_waiting: dict[bytes, _Peer] = {}


class _Peer(WSListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.transport: WSTransport | None = None
        self.partner: _Peer | None = None
        self.sid: bytes | None = None
        self.early: list[tuple[WSMsgType, bytes, bool]] = []

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if kind not in (WSMsgType.BINARY, WSMsgType.CONTINUATION):
            return  # pings are answered by picows itself; pongs and text are not relayed
        partner = self.partner
        if partner is not None and partner.transport is not None:
            partner.transport.send(kind, frame.get_payload_as_memoryview(), frame.fin)
            return
        if self.sid is None:
            self._pair(transport, frame.get_payload_as_bytes())
        elif len(self.early) < MAX_EARLY_FRAMES:
            self.early.append((kind, frame.get_payload_as_bytes(), frame.fin))
        else:
            transport.send_close(WSCloseCode.PROTOCOL_ERROR)
            transport.disconnect()

    def _pair(self, transport: WSTransport, first: bytes) -> None:
        if len(first) != PREAMBLE_SIZE or first[:4] != MAGIC:
            transport.send_close(WSCloseCode.PROTOCOL_ERROR)
            transport.disconnect()
            return
        self.sid = first[5:].rstrip(b"\0")
        other = _waiting.pop(self.sid, None)
        if other is None or other.transport is None or other.transport.is_disconnected:
            _waiting[self.sid] = self
            return
        self.partner, other.partner = other, self
        for peer in (self, other):
            target = peer.partner
            assert target is not None
            assert target.transport is not None
            for kind, payload, fin in peer.early:
                target.transport.send(kind, payload, fin)
            peer.early.clear()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.sid is not None and _waiting.get(self.sid) is self:
            del _waiting[self.sid]
        partner, self.partner = self.partner, None
        if partner is not None and partner.transport is not None:
            partner.partner = None
            partner.transport.disconnect()

    # flow control: the partner's writes back up, so stop reading what would be written to it
    def pause_writing(self) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.underlying_transport.pause_reading()

    def resume_writing(self) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.underlying_transport.resume_reading()


def _listener(_request: WSUpgradeRequest) -> _Peer:
    return _Peer()


def _tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The server context for ``--tls-cert/--tls-key`` (``bench.run --tls``), or None for plain."""
    if not cert or not key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def main(port: int, tls: ssl.SSLContext | None = None) -> None:
    server = await ws_create_server(_listener, "127.0.0.1", port, max_frame_size=MAX_FRAME, ssl=tls)
    bound = server.sockets[0].getsockname()[1]
    print(f"READY port={bound}", flush=True)
    async with server:
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
