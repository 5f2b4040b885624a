"""RESP2, sans-I/O: encode commands, parse a byte stream of replies (decision 0020).

No sockets here, so the parser is tested on its own (any split of a valid stream parses the same,
garbage raises :class:`RespProtocolError`). Bulk strings are decoded as UTF-8 (like redis-py's
``decode_responses=True``); error replies are values (:class:`RespError`), not exceptions, because
one bad reply in a pipeline must not hide the others' answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, TypeAlias

__all__ = ["NEED_DATA", "Reply", "RespError", "RespParser", "RespProtocolError", "encode_command"]

# Redis's own limits: a bulk string is at most 512 MB; nesting bounds the recursion.
MAX_BULK: Final = 512 * 1024 * 1024
MAX_DEPTH: Final = 32
# A status, error or length line longer than this without its CRLF is garbage, not a slow reply.
MAX_LINE: Final = 64 * 1024

# an error reply is a RespError, which is a str
Reply: TypeAlias = "str | int | list[Reply] | None"


class RespProtocolError(Exception):
    """The stream is not RESP2: the connection can only be closed."""


class RespError(str):
    """An error reply (``-ERR …``), as its text."""

    __slots__ = ()


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


def encode_command(args: Sequence[str | bytes | int | float]) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bool):
            raise TypeError("a bool is not a Redis argument")
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            data = repr(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Incomplete(Exception):
    pass


class RespParser:
    """Feed bytes in any pieces; take whole replies out in order."""

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_reply(self) -> Reply | _NeedData:
        """The next whole reply, or :data:`NEED_DATA`.

        Raises:
            RespProtocolError: the bytes are not RESP2.
        """
        try:
            value, pos = self._parse(self._pos, 0)
        except _Incomplete:
            return NEED_DATA
        self._pos = pos
        return value

    def _line(self, pos: int) -> tuple[bytes, int]:
        end = self._buf.find(b"\r\n", pos, pos + MAX_LINE + 2)
        if end < 0:
            if len(self._buf) - pos > MAX_LINE:
                raise RespProtocolError("line too long")
            raise _Incomplete
        return bytes(self._buf[pos:end]), end + 2

    def _int(self, text: bytes) -> int:
        if not text or not (text.isdigit() or (text[:1] == b"-" and text[1:].isdigit())):
            raise RespProtocolError(f"bad integer {text[:32]!r}")
        return int(text)

    def _parse(self, pos: int, depth: int) -> tuple[Reply, int]:
        if pos >= len(self._buf):
            raise _Incomplete
        kind = self._buf[pos]
        line, pos = self._line(pos + 1)
        if kind == 0x2B:  # + status
            return line.decode("utf-8", "surrogateescape"), pos
        if kind == 0x2D:  # - error
            return RespError(line.decode("utf-8", "surrogateescape")), pos
        if kind == 0x3A:  # : integer
            return self._int(line), pos
        if kind == 0x24:  # $ bulk string
            size = self._int(line)
            if size == -1:
                return None, pos
            if not 0 <= size <= MAX_BULK:
                raise RespProtocolError(f"bad bulk length {size}")
            end = pos + size
            if len(self._buf) < end + 2:
                raise _Incomplete
            if self._buf[end : end + 2] != b"\r\n":
                raise RespProtocolError("bulk string without its CRLF")
            return self._buf[pos:end].decode("utf-8", "surrogateescape"), end + 2
        if kind == 0x2A:  # * array
            count = self._int(line)
            if count == -1:
                return None, pos
            if count < 0 or depth >= MAX_DEPTH:
                raise RespProtocolError(f"bad array length {count} at depth {depth}")
            items: list[Reply] = []
            for _ in range(count):
                item, pos = self._parse(pos, depth + 1)
                items.append(item)
            return items, pos
        raise RespProtocolError(f"unknown reply type {bytes([kind])!r}")
