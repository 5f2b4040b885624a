"""The native rate pump (bench/native/pump.c): build it, load it, run it on connected sockets.

The pump is compiled on first use with the machine's C compiler (``$CC``, else ``cc``) into
``bench/out/native/`` under a name that carries the source's hash, so an edited pump is rebuilt
and an unchanged one is not. It is loaded with ctypes and called in a worker thread: ctypes
releases the GIL for the call, so the pump owns a core of its own while the worker's trio loop
waits on its control pipe.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Final

SOURCE: Final = Path(__file__).resolve().parent / "native" / "pump.c"
BUILD_DIR: Final = Path(__file__).resolve().parent / "out" / "native"
HIST_SIZE: Final = 1900
# The pump's counters, in the order of its enum (checked against pump_counter_count()).
COUNTERS: Final = (
    "msgs",
    "bytes",
    "sent_total",
    "recv_total",
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
    "loops",
    "drain_ns",
)
# The counters that count the whole run (not only the measured window, as msgs and bytes do): the
# worker adds them to what it counted itself before the hand-over (heartbeats, mostly).
RUN_TOTALS: Final = COUNTERS[COUNTERS.index("sent_total") : COUNTERS.index("wire_errors") + 1]
# ctl[0] values (see pump.c)
HEARTBEATS_ONLY: Final = 0
SENDING: Final = 1
RECORDING: Final = 2
STOP: Final = 3
ABORT: Final = 4


class NativeUnavailable(RuntimeError):
    """No C compiler, or the pump did not build: use the Python generator (``--generator python``)."""


class PumpStats(ctypes.Structure):
    _fields_ = [
        ("counters", ctypes.c_int64 * len(COUNTERS)),
        ("lat", ctypes.c_int64 * HIST_SIZE),
        ("gen_lag", ctypes.c_int64 * HIST_SIZE),
        ("hb_lat", ctypes.c_int64 * HIST_SIZE),
    ]

    def counter(self, name: str) -> int:
        return int(self.counters[COUNTERS.index(name)])


_lib: ctypes.CDLL | None = None


def build() -> Path:
    """Compile the pump if this source has not been compiled yet; returns the shared library."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    lib = BUILD_DIR / f"pump-{digest}.so"
    if lib.exists():
        return lib
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise NativeUnavailable("the native load generator needs a C compiler (cc); none on PATH")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cc, "-O2", "-shared", "-fPIC", "-Wall", "-o", str(tmp), str(SOURCE), "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise NativeUnavailable(f"building the native pump failed: {' '.join(cmd)}\n{done.stderr}")
    tmp.replace(lib)  # atomic: concurrent workers each build, the last rename wins, all identical
    return lib


def load() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(str(build()), use_errno=True)
        lib.pump_run.restype = ctypes.c_int
        lib.pump_stats_size.restype = ctypes.c_size_t
        if lib.pump_stats_size() != ctypes.sizeof(PumpStats) or lib.pump_counter_count() != len(COUNTERS):
            raise NativeUnavailable("pump.c and bench/_native.py disagree on the stats layout")
        _lib = lib
    return _lib


def _i64(values: Sequence[int]) -> ctypes.Array[ctypes.c_int64]:
    return (ctypes.c_int64 * max(1, len(values)))(*values)


def _i32(values: Sequence[int]) -> ctypes.Array[ctypes.c_int32]:
    return (ctypes.c_int32 * max(1, len(values)))(*values)


def _concat(parts: Sequence[bytes]) -> tuple[bytes, ctypes.Array[ctypes.c_int64]]:
    offsets = [0]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    return b"".join(parts) or b"\0", _i64(offsets)


class Pump:
    """One run of the pump over ``fds`` (non-blocking, connected; the pump owns them until it returns).

    Args:
        fds: the connections' file descriptors (-1: a connection already closed).
        hb_due: each connection's next heartbeat (``time.monotonic_ns()`` clock).
        carry: bytes already read from each connection past its handshake (a partial frame or more).
        pending: bytes not yet sent on each connection (sent before anything else).
        flows: ``(source connection, destination connection)`` index pairs.
        ws: masked WebSocket frames (else u32 length prefixes).
        size: message size (rescue header and timestamp included); ``filler``: its ``size - 20``
            trailing bytes.
        interval_ns: time between one flow's sends; ``hb_interval_ns``: between heartbeats.
        verify_mask: compare the filler of messages whose ``seq & verify_mask == 0``.
    """

    def __init__(
        self,
        *,
        fds: Sequence[int],
        hb_due: Sequence[int],
        carry: Sequence[bytes],
        pending: Sequence[bytes],
        flows: Sequence[tuple[int, int]],
        ws: bool,
        size: int,
        filler: bytes,
        interval_ns: int,
        hb_interval_ns: int,
        verify_mask: int,
    ) -> None:
        if len(filler) != size - 20:
            raise ValueError("the filler is the message minus its 20-byte head")
        self._lib = load()
        self.nconns = len(fds)
        self.nflows = len(flows)
        self._args = (
            self.nconns,
            _i32(fds),
            _i64(hb_due),
            *_concat(carry),
            *_concat(pending),
            self.nflows,
            _i32([s for s, _ in flows]),
            _i32([d for _, d in flows]),
            1 if ws else 0,
            size,
            ctypes.c_int64(max(1, interval_ns)),
            ctypes.c_int64(max(1, hb_interval_ns)),
            ctypes.c_int64(verify_mask),
            filler or b"\0",
            ctypes.c_uint64(int.from_bytes(os.urandom(8), "little")),
        )
        self.ctl = (ctypes.c_int32 * 1)(HEARTBEATS_ONLY)
        self.stats = PumpStats()
        self.flow_seqs = (ctypes.c_uint64 * max(1, 2 * self.nflows))()
        self.conn_states = (ctypes.c_int32 * max(1, self.nconns))()

    def set(self, state: int) -> None:
        """Move the pump on (HEARTBEATS_ONLY < SENDING < RECORDING < STOP < ABORT); never back."""
        if state > self.ctl[0]:
            self.ctl[0] = state

    def run(self) -> None:
        """Blocks until the pump returns (call it in a thread)."""
        rc = self._lib.pump_run(
            *self._args, self.ctl, ctypes.byref(self.stats), self.flow_seqs, self.conn_states
        )
        if rc:
            raise OSError(ctypes.get_errno() or 0, "the native pump failed to start or to wait")

    def flow(self, i: int) -> tuple[int, int]:
        """Flow ``i``'s (last seq sent, last seq received)."""
        return int(self.flow_seqs[2 * i]), int(self.flow_seqs[2 * i + 1])
