"""A byte stream whose every byte is predictable, and a checker that verifies one by content.

Byte ``i`` of a stream is ``P[i % L] ^ ((i // L) & 0xFF)``, where ``P`` is ``L`` bytes drawn from a
seeded RNG (one pattern per stream: session, direction) and ``L`` is a prime (65,521), so no chunk
size the generator uses lines up with it. Any byte lost, duplicated or reordered shifts everything
after it, which no longer matches; the XOR with the block counter makes whole-period shifts visible
too (the replay buffer, 4 MiB, is far below the 16 MiB after which the counter byte repeats).

The checker is exact and cheap: expected bytes are made with ``bytes.translate`` over slices of
``P`` (C speed), never a Python loop per byte.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

__all__ = ["PATTERN_LEN", "Pattern", "StreamCheck"]

# The pattern period: a prime, so no chunk size or frame size is a multiple of it.
PATTERN_LEN: Final = 65_521
# XOR tables for bytes.translate: _XOR[c][x] == x ^ c.
_XOR: Final = tuple(bytes(x ^ c for x in range(256)) for c in range(256))


class Pattern:
    """The expected content of one stream.

    Args:
        seed: anything ``random.Random`` accepts; equal seeds give equal streams.
    """

    __slots__ = ("_doubled",)

    def __init__(self, seed: int | str) -> None:
        rng = random.Random(f"chaos-pattern:{seed}")
        base = rng.randbytes(PATTERN_LEN)
        self._doubled = base + base  # any window up to PATTERN_LEN is one contiguous slice

    def slice(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)`` of the stream."""
        if offset < 0 or size < 0:
            raise ValueError("offset and size must be >= 0")
        parts: list[bytes] = []
        pos = offset
        end = offset + size
        while pos < end:
            block, start = divmod(pos, PATTERN_LEN)
            take = min(end - pos, PATTERN_LEN - start)
            parts.append(self._doubled[start : start + take].translate(_XOR[block & 0xFF]))
            pos += take
        return b"".join(parts)


@dataclass
class StreamCheck:
    """Counts and verifies one direction of one session.

    ``sent`` is advanced by the writer after each ``Peer.send`` returns; :meth:`receive` verifies
    delivered bytes against the pattern at the current offset. After the first mismatch the
    offset still advances (so the totals stay meaningful) but ``first_mismatch`` keeps the first
    place it went wrong.

    Attributes:
        pattern: the expected content.
        sent: bytes handed to the sending peer.
        delivered: bytes the receiving peer delivered.
        mismatched_chunks: delivered chunks whose content was not what the pattern says.
        first_mismatch: stream offset of the first bad chunk, or ``None``.
        last_delivery: clock time of the last delivery.
        mark_offset: :meth:`mark` sets it to ``sent``; ``recovered_at`` is the first time
            ``delivered`` passed it.
        recovered_at: see ``mark_offset``.
    """

    pattern: Pattern
    sent: int = 0
    delivered: int = 0
    mismatched_chunks: int = 0
    first_mismatch: int | None = None
    last_delivery: float = 0.0
    mark_offset: int | None = None
    recovered_at: float | None = None
    chunks: int = 0

    def receive(self, data: bytes, now: float) -> bool:
        """Verify ``data`` as the next delivered bytes; True when it matched."""
        ok = data == self.pattern.slice(self.delivered, len(data))
        if not ok:
            self.mismatched_chunks += 1
            if self.first_mismatch is None:
                self.first_mismatch = self.delivered
        self.delivered += len(data)
        self.chunks += 1
        self.last_delivery = now
        if self.mark_offset is not None and self.recovered_at is None and self.delivered > self.mark_offset:
            self.recovered_at = now
        return ok

    def mark(self) -> None:
        """Start a recovery watch: done once a byte written after this moment is delivered."""
        self.mark_offset = self.sent
        self.recovered_at = None

    @property
    def recovered(self) -> bool:
        """Whether the stream moved past the last :meth:`mark`."""
        return self.mark_offset is None or self.recovered_at is not None

    @property
    def intact(self) -> bool:
        """Nothing delivered so far differed from the pattern."""
        return self.mismatched_chunks == 0
