"""Micro-benchmark: our WebSocket codec vs wsproto's on the same bytes, in the same run.

What is measured (server side, the relay's hot path): parse + unmask client frames delivered in
64 KiB chunks (the relay's read size) until every message is out, and frame a batch of server
replies. wsproto is measured at its frame layer (``FrameProtocol``), which is the part of wsproto a
relay would pay for on every message; its ``Connection`` adds event objects on top.

Usage (from the repository root)::

    .venv/bin/python -m bench.ws_codec_bench                 # 1 KiB messages, ~10 s
    .venv/bin/python -m bench.ws_codec_bench --size 64 --messages 100000

Prints messages per CPU-second for each codec (``time.process_time``, so other processes on a
shared machine do not skew it) and the ratio (ours / wsproto). No sockets, one core.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from wsproto.frame_protocol import FrameProtocol

from rescue.websocket import FrameParser, apply_mask, frame_messages

# The relay reads at most this much per wake-up (rescue.websocket.READ_SIZE).
CHUNK = 65536


def make_input(size: int, count: int) -> tuple[list[bytes], list[bytes]]:
    """``count`` masked client frames of ``size`` bytes each, cut into relay-sized read chunks."""
    payloads = [bytes([i % 251]) * size for i in range(count)]
    wire = frame_messages(payloads, mask=True)
    return payloads, [wire[i : i + CHUNK] for i in range(0, len(wire), CHUNK)]


def parse_ours(chunks: list[bytes]) -> int:
    parser = FrameParser(client=False)
    n = 0
    for chunk in chunks:
        n += len(parser.feed(chunk))
    return n


def parse_wsproto(chunks: list[bytes]) -> int:
    proto = FrameProtocol(client=False, extensions=[])
    n = 0
    for chunk in chunks:
        proto.receive_bytes(chunk)
        for frame in proto.received_frames():
            # wsproto hands out a frame's payload as it arrives; count whole messages only.
            n += frame.message_finished
    return n


def frame_ours(payloads: list[bytes]) -> int:
    out = 0
    for i in range(0, len(payloads), 64):  # batches of one read's worth of 1 KiB messages
        out += len(frame_messages(payloads[i : i + 64], mask=False))
    return out


def frame_wsproto(payloads: list[bytes]) -> int:
    proto = FrameProtocol(client=False, extensions=[])
    out = 0
    for i in range(0, len(payloads), 64):
        out += len(b"".join(proto.send_data(p, fin=True) for p in payloads[i : i + 64]))
    return out


def best_of(fn: Callable[[], int], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=1024, help="message size in bytes (default 1024)")
    parser.add_argument("--messages", type=int, default=50_000, help="messages per run (default 50000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per codec; the best is kept")
    args = parser.parse_args()

    payloads, chunks = make_input(args.size, args.messages)
    # Both must decode every message, or the comparison is meaningless.
    assert parse_ours(chunks) == parse_wsproto(chunks) == args.messages
    print(f"unmask: {apply_mask.__module__}.{apply_mask.__qualname__}")
    print(
        f"{args.messages} messages of {args.size} B, {len(chunks)} chunks of {CHUNK} B, best of {args.repeat}"
    )
    for label, ours, theirs in (
        ("parse+unmask", lambda: parse_ours(chunks), lambda: parse_wsproto(chunks)),
        ("frame (server)", lambda: frame_ours(payloads), lambda: frame_wsproto(payloads)),
    ):
        t_ours = best_of(ours, args.repeat)
        t_theirs = best_of(theirs, args.repeat)
        print(
            f"{label:15s} rescue {args.messages / t_ours:12,.0f} msg/s   "
            f"wsproto {args.messages / t_theirs:12,.0f} msg/s   ratio {t_theirs / t_ours:5.1f}x"
        )


if __name__ == "__main__":
    main()
