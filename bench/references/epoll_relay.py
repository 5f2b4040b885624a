"""Raw-TCP relay on a bare ``select.epoll`` loop: no framework, no framing (context, not a SPEC reference).

Same pairing as ``tcp_relay.py`` (a 64-byte preamble, then bytes copied both ways), but one
blocking ``epoll.poll`` loop with persistent level-triggered registrations instead of trio. It
shows what a wake-up and a message cost Python on this machine with nothing else in the way:
the floor under every relay here (decision 0007 uses it to tell framework cost from machine cost).
Writes go out at once; a full socket makes the whole loop wait for it (``select``), which a
benchmark reference can afford: the load generator always reads.

Usage: ``python bench/references/epoll_relay.py --port 0`` prints ``READY port=<n>`` when listening.
"""

from __future__ import annotations

import argparse
import select
import signal
import socket
import sys

PREAMBLE_SIZE = 64  # magic (4) + role (1) + session id (59, NUL-padded)
CHUNK = 65536


def send_all(sock: socket.socket, data: bytes) -> None:
    """Write all of ``data`` to a non-blocking socket, waiting (the whole loop) while it is full."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            select.select([], [sock], [])


def serve(port: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    print(f"READY port={listener.getsockname()[1]}", flush=True)
    epoll = select.epoll()
    epoll.register(listener.fileno(), select.EPOLLIN)
    socks: dict[int, socket.socket] = {}
    preamble: dict[int, bytes] = {}  # fd -> bytes of an incomplete preamble
    partner: dict[int, int] = {}
    waiting: dict[tuple[bytes, bytes], int] = {}  # (session, role) -> fd of a lone peer
    early: dict[int, list[bytes]] = {}  # fd of a lone peer -> what it sent before its partner came

    def drop(fd: int) -> None:
        for one in (fd, partner.pop(fd, None)):
            if one is not None and one in socks:
                partner.pop(one, None)
                preamble.pop(one, None)
                early.pop(one, None)
                epoll.unregister(one)
                socks.pop(one).close()

    while True:
        for fd, _ in epoll.poll(-1, 1024):
            if fd == listener.fileno():
                while True:
                    try:
                        sock, _addr = listener.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    socks[sock.fileno()] = sock
                    preamble[sock.fileno()] = b""
                    epoll.register(sock.fileno(), select.EPOLLIN)
                continue
            sock = socks.get(fd)
            if sock is None:
                continue
            try:
                data = sock.recv(CHUNK)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                drop(fd)
                continue
            if fd in preamble:
                head = preamble[fd] + data
                if len(head) < PREAMBLE_SIZE:
                    preamble[fd] = head
                    continue
                del preamble[fd]
                role, sid, rest = head[4:5], head[5:PREAMBLE_SIZE], head[PREAMBLE_SIZE:]
                other = waiting.pop((sid, b"g" if role == b"h" else b"h"), None)
                if other is None:
                    waiting[(sid, role)] = fd
                    early[fd] = [rest] if rest else []
                    continue
                partner[fd] = other
                partner[other] = fd
                held = b"".join(early.pop(other, []))  # the lone peer's bytes, in order, first
                if held:
                    try:
                        send_all(sock, held)
                    except OSError:
                        drop(fd)
                        continue
                data = rest
                if not data:
                    continue
            other = partner.get(fd)
            if other is None and fd in early:
                early[fd].append(data)  # the partner is not here yet: keep it (a relay loses nothing)
            elif other is not None:
                try:
                    send_all(socks[other], data)
                except OSError:
                    drop(fd)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(args.port)
    except KeyboardInterrupt:
        sys.exit(0)
