"""Smoke test of the benchmark harness (bench/): it runs end to end at tiny scale and counts right.

Nothing here checks timing (benchmarks measure that, tests never do): the assertions are about
delivery -- every message the generator sent arrived exactly once, in order, byte for byte -- and
about the checker itself noticing loss, reordering and corruption.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

# bench/ is a directory of scripts next to the package, not part of the installed wheel.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
loadgen: Any = importlib.import_module("bench.loadgen")
targets: Any = importlib.import_module("bench.targets")
wire: Any = importlib.import_module("bench._wire")


def _credentials(name: str, tmp_path: Path) -> tuple[Any, str | None, Any]:
    """(key material, private key file, token minter) for the real relay; Nones for a reference."""
    if name != "rescue":
        return None, None, None
    keys = targets.KeyMaterial.create(tmp_path)
    key_file = str(keys.key_file)
    return keys, key_file, targets.make_minter(key_file)


def _assert_delivered(result: dict[str, Any], connections: int) -> None:
    assert result["connections"] == connections
    assert result["connect_failures"] == 0
    assert result["sent_total"] > 0
    assert result["recv_total"] == result["sent_total"]
    assert result["lost"] == 0
    assert result["seq_errors"] == 0
    assert result["corrupt"] == 0
    assert result["relay_closed"] == 0
    assert result["conn_errors"] == 0
    assert result["wire_errors"] == 0


@pytest.mark.parametrize("name", ["tcp", "websockets", "trio-websocket", "picows", "epoll"])
async def test_throughput_and_rate_deliver_everything(name: str, tmp_path: Path) -> None:
    with trio.fail_after(30):
        relay = await targets.start_target(targets.TARGETS[name], log_dir=tmp_path)
        try:
            target = loadgen.Target(name=name, transport=relay.defn.transport, port=relay.port)
            tput = loadgen.Scenario(mode="throughput", sessions=3, size=1024, window=4)
            result = await loadgen.run_local(target, tput, warmup_s=0.1, duration_s=0.3)
            _assert_delivered(result, connections=6)
            assert result["msgs"] > 0

            # 16 KiB messages span several reads and (for ws) use the 16-bit length form.
            big = loadgen.Scenario(mode="throughput", sessions=2, size=16384, window=2)
            _assert_delivered(await loadgen.run_local(target, big, warmup_s=0.1, duration_s=0.2), 4)

            rate = loadgen.Scenario(mode="rate", sessions=2, size=4096, rate=65536.0, direction="host")
            t0 = time.monotonic()
            result = await loadgen.run_local(target, rate, warmup_s=0.1, duration_s=0.3)
            elapsed = time.monotonic() - t0
            _assert_delivered(result, connections=4)
            # The schedule never bursts: at most one message per interval per flow (+1 for the phase).
            assert result["sent_total"] <= 2 * (elapsed / (4096 / 65536.0) + 1)
        finally:
            await relay.stop()


async def test_idle_heartbeats_go_round(tmp_path: Path) -> None:
    with trio.fail_after(30):
        relay = await targets.start_target(targets.TARGETS["websockets"], log_dir=tmp_path)
        try:
            target = loadgen.Target(name="websockets", transport="ws", port=relay.port)
            idle = loadgen.Scenario(mode="idle", sessions=3, heartbeat_s=0.1)
            result = await loadgen.run_local(target, idle, warmup_s=0.1, duration_s=0.4)
        finally:
            await relay.stop()
    assert result["connections"] == 6
    assert result["sent_total"] == result["recv_total"] == 0
    assert 0 < result["heartbeats_rx"] <= result["heartbeats_tx"]
    assert loadgen.Hist.merge([result["hb_lat"]]).total > 0


@pytest.mark.parametrize("name", ["tcp", "picows", "rescue"])
async def test_idle_first_message_probes_arrive_once_each(name: str, tmp_path: Path) -> None:
    """Idle mode's first-message figure: each session sends one DATA, timed at the partner.

    The real relay runs with ``--quiet-after 0.3``: by the time the window starts its
    connections are quiet (SO_RCVLOWAT raised), so the probes take the quiet path."""
    keys, key_file, mint = _credentials(name, tmp_path)
    defn = targets.TARGETS.get(name)
    if name == "rescue":
        defn = targets._rescue("rescue", "target", "--quiet-after", "0.3")
    with trio.fail_after(30):
        relay = await targets.start_target(defn, log_dir=tmp_path, keys=keys)
        try:
            target = loadgen.Target(
                name=name,
                transport=relay.defn.transport,
                port=relay.port,
                path=relay.defn.path,
                key_file=key_file,
            )
            idle = loadgen.Scenario(mode="idle", sessions=4, size=29, heartbeat_s=0.2, probe_rate=1000.0)
            result = await loadgen.run_local(target, idle, warmup_s=1.0, duration_s=1.0, mint=mint)
        finally:
            await relay.stop()
    _assert_delivered(result, connections=8)
    assert result["sent_total"] == 4  # one probe per session, no more
    assert result["msgs"] == loadgen.Hist.merge([result["lat"]]).total == 4


async def test_a_rescue_relay_announces_the_runs_heartbeat(tmp_path: Path) -> None:
    """``bench.run --heartbeat N`` reaches the relay too: peers at 1 s against a relay announcing
    15 s would have every quiet connection's look miss its heartbeat (run Q1's invalid idle rows)."""
    keys = targets.KeyMaterial.create(tmp_path)
    rescue = targets.TARGETS["rescue"]
    with pytest.raises(RuntimeError, match="whole seconds"):
        await targets.start_target(rescue, log_dir=tmp_path, keys=keys, heartbeat_s=0.2)
    with trio.fail_after(30):
        for heartbeat_s, announced in ((15.0, None), (2.0, b"2")):
            relay = await targets.start_target(rescue, log_dir=tmp_path, keys=keys, heartbeat_s=heartbeat_s)
            try:
                argv = Path(f"/proc/{relay.pid}/cmdline").read_bytes().split(b"\0")
            finally:
                await relay.stop()
            if announced is None:
                assert b"--heartbeat" not in argv  # the relay's own default (an old tree's script too)
            else:
                assert argv[argv.index(b"--heartbeat") + 1] == announced


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_checker_counts_loss_reordering_and_corruption(transport: str) -> None:
    """Feed a receiving connection crafted messages: the counters must notice each fault."""
    target = loadgen.Target(name="t", transport=transport, port=1)
    gen = loadgen.LoadGen(target, loadgen.Scenario(mode="rate", sessions=1, size=200))
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        src = loadgen.Conn(gen, "host", a)
        dst = loadgen.Conn(gen, "guest", b)
        flow = loadgen.Flow(src, dst)
        dst.rx_flow = flow
        builder = wire.MessageBuilder("tcp", 200, gen.filler)  # unmasked, as the relay forwards it
        feed = dst._feed_tcp if transport == "tcp" else dst._feed_ws

        def message(seq: int, *, tamper: bool = False) -> bytes:
            msg = bytearray(b"".join(builder.data(seq, time.monotonic_ns())))
            if tamper:
                msg[-1] ^= 0xFF
            if transport == "ws":  # a server frame: FIN + binary, 16-bit length, no mask
                msg[:4] = b"\x82\x7e" + (200).to_bytes(2, "big")
            return bytes(msg)

        def deliver(seq: int, *, tamper: bool = False) -> None:
            msg = message(seq, tamper=tamper)
            assert feed(msg, len(msg), time.monotonic_ns()) == len(msg)

        deliver(1)
        deliver(2)
        assert (gen.stats.seq_errors, gen.stats.corrupt, gen.stats.recv_total) == (0, 0, 2)
        deliver(4)  # 3 lost
        assert gen.stats.seq_errors == 1
        deliver(4)  # duplicated
        assert gen.stats.seq_errors == 2
        deliver(5, tamper=True)
        assert gen.stats.corrupt == 1
        # A partial message is left for the next read, not counted.
        whole = message(6)
        assert feed(whole, len(whole) - 1, time.monotonic_ns()) == 0
        assert gen.stats.recv_total == 5
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("name", ["tcp", "websockets", "picows", "rescue"])
async def test_native_generator_delivers_everything(name: str, tmp_path: Path) -> None:
    """Rate mode with the native pump: connected in Python, driven in C, every message checked.

    Both directions, so every connection sends and receives; the relays unmask and validate the
    pump's frames, the pump checks what they forward. A rescue relay's sessions also hand over
    whatever Python read past WELCOME/PEER."""
    keys, key_file, mint = _credentials(name, tmp_path)
    defn = targets.TARGETS[name]
    with trio.fail_after(60):
        relay = await targets.start_target(defn, log_dir=tmp_path, keys=keys)
        try:
            target = loadgen.Target(
                name=name, transport=defn.transport, port=relay.port, path=defn.path, key_file=key_file
            )
            rate = loadgen.Scenario(
                mode="rate", sessions=3, size=4096, rate=65536.0, heartbeat_s=0.1, generator="native"
            )
            t0 = time.monotonic()
            result = await loadgen.run_local(target, rate, warmup_s=0.2, duration_s=0.5, mint=mint)
            elapsed = time.monotonic() - t0
        finally:
            await relay.stop()
    _assert_delivered(result, connections=6)
    assert result["msgs"] > 0
    assert loadgen.Hist.merge([result["lat"]]).total == result["msgs"]
    # six flows, one message per 62.5 ms each, plus one for the phase: never a burst
    assert result["sent_total"] <= 6 * (elapsed / (4096 / 65536.0) + 1)
    # heartbeats every 0.1 s went on through the pump (the relays echo them back)
    assert 0 < result["heartbeats_rx"] <= result["heartbeats_tx"]
    assert loadgen.Hist.merge([result["hb_lat"]]).total > 0


def test_native_generator_refuses_what_it_does_not_run() -> None:
    target = loadgen.Target(name="t", transport="ws", port=1)
    with pytest.raises(ValueError, match="rate mode over plain sockets"):
        loadgen.LoadGen(target, loadgen.Scenario(mode="idle", sessions=1, generator="native"))
    import certifi

    tls = loadgen.Target(name="t", transport="ws", port=1, tls_ca=certifi.where())
    with pytest.raises(ValueError, match="rate mode over plain sockets"):
        loadgen.LoadGen(tls, loadgen.Scenario(mode="rate", sessions=1, generator="native"))


@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_native_checker_counts_loss_reordering_and_corruption(transport: str) -> None:
    """The pump's receive checks, fed crafted relay messages over a socket pair.

    Also the hand-over: bytes Python had read (a partial message) are parsed with what follows,
    and bytes Python had not sent go out first."""
    native: Any = importlib.import_module("bench._native")
    size = 200
    filler = wire.make_filler(size)
    builder = wire.MessageBuilder("tcp", size, filler)  # unmasked, as a relay forwards it

    def message(seq: int, *, tamper: bool = False) -> bytes:
        msg = bytearray(b"".join(builder.data(seq, time.monotonic_ns())))
        if tamper:
            msg[-1] ^= 0xFF
        if transport == "ws":  # a server frame: FIN + binary, 16-bit length, no mask
            msg[:4] = b"\x82\x7e" + size.to_bytes(2, "big")
        return bytes(msg)

    def heartbeat(sent: int) -> bytes:
        body = wire.RESCUE_HEADER.pack(wire.VERSION, wire.KIND_HEARTBEAT, 0, 0, sent)
        return (b"\x82\x0c" if transport == "ws" else wire.LEN_PREFIX.pack(12)) + body

    host, host_relay = socket.socketpair()
    guest, guest_relay = socket.socketpair()
    for sock in (host, guest):
        sock.setblocking(False)
    first = message(1)
    pump = native.Pump(
        fds=[host.fileno(), guest.fileno()],
        hb_due=[time.monotonic_ns() + 10**12] * 2,  # no heartbeats of its own in this test
        carry=[b"", first[:50]],
        pending=[b"left by python", b""],
        flows=[(0, 1)],
        ws=transport == "ws",
        size=size,
        filler=filler,
        interval_ns=10**12,
        hb_interval_ns=10**12,
        verify_mask=0,
    )
    done: list[BaseException | None] = []

    def run() -> None:
        try:
            pump.run()
            done.append(None)
        except BaseException as exc:  # pragma: no cover - reported below
            done.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        host_relay.settimeout(10)
        assert host_relay.recv(100) == b"left by python"
        guest_relay.sendall(first[50:] + message(2))
        guest_relay.sendall(message(4) + message(4) + message(5, tamper=True))
        guest_relay.sendall(heartbeat(time.monotonic_ns()))  # the marker: everything before is parsed
        deadline = time.monotonic() + 10
        while pump.stats.counter("heartbeats_rx") < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        pump.set(native.ABORT)
        thread.join(10)
        host.close()
        host_relay.close()
        guest.close()
        guest_relay.close()
    assert done == [None]
    counts = {
        name: pump.stats.counter(name) for name in ("recv_total", "seq_errors", "corrupt", "heartbeats_rx")
    }
    # 1 and 2 in order; 4 skips 3; the second 4 is a duplicate; 5 is corrupt
    assert counts == {"recv_total": 5, "seq_errors": 2, "corrupt": 1, "heartbeats_rx": 1}
    assert pump.flow(0) == (0, 5)
    assert pump.stats.counter("wire_errors") == 0


def test_native_pump_skips_sends_to_a_relay_that_stops_reading_and_never_cuts_a_frame() -> None:
    """A relay that stops reading: the pump buffers up to its limit, then skips (and counts) sends;
    what does reach the relay is whole masked frames with seqs 1, 2, 3, ... and the right body."""
    native: Any = importlib.import_module("bench._native")
    size = 4096
    filler = wire.make_filler(size)
    host, host_relay = socket.socketpair()
    guest, guest_relay = socket.socketpair()
    for sock in (host, guest):
        sock.setblocking(False)
    pump = native.Pump(
        fds=[host.fileno(), guest.fileno()],
        hb_due=[time.monotonic_ns() + 10**12] * 2,
        carry=[b"", b""],
        pending=[b"", b""],
        flows=[(0, 1)],
        ws=True,
        size=size,
        filler=filler,
        interval_ns=20_000,  # 200 MB/s offered: far more than a socket pair nobody reads holds
        hb_interval_ns=10**12,
        verify_mask=0,
    )
    pump.set(native.SENDING)
    thread = threading.Thread(target=pump.run)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while pump.stats.counter("gen_dropped") == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert pump.stats.counter("gen_dropped") > 0
    finally:
        pump.set(native.ABORT)
        thread.join(10)
    assert not thread.is_alive()
    host.close()
    host_relay.setblocking(False)
    received = bytearray()
    while True:
        try:
            chunk = host_relay.recv(1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        received += chunk
    host_relay.close()
    guest.close()
    guest_relay.close()
    sent = pump.stats.counter("sent_total")
    frame = 4 + 4 + size  # FIN/opcode, 126 + 16-bit length, mask key, payload
    assert sent > (1 << 20) // frame  # more than the buffer limit was offered before the skipping
    whole, partial = divmod(len(received), frame)
    assert whole <= sent
    for i in range(whole):
        head = received[i * frame : i * frame + 8]
        assert head[:4] == b"\x82\xfe" + size.to_bytes(2, "big")
        payload = wire.mask(bytes(received[i * frame + 8 : (i + 1) * frame]), bytes(head[4:8]))
        assert wire.HEAD.unpack_from(payload)[:5] == (1, wire.KIND_DATA, 0, 0, i + 1)
        assert payload[wire.HEAD_SIZE :] == filler
    # a frame left half-sent at the end is reported as such (no goodbye may follow it)
    assert pump.conn_states[0] == (2 if partial or whole < sent else 0)


def test_native_pump_counts_a_masked_server_frame_as_a_wire_error() -> None:
    native: Any = importlib.import_module("bench._native")
    conn, relay = socket.socketpair()
    conn.setblocking(False)
    pump = native.Pump(
        fds=[conn.fileno()],
        hb_due=[time.monotonic_ns() + 10**12],
        carry=[b"\x82\x85abcd" + b"hello"],  # a server must never mask
        pending=[b""],
        flows=[],
        ws=True,
        size=100,
        filler=bytes(80),
        interval_ns=10**9,
        hb_interval_ns=10**12,
        verify_mask=0,
    )
    pump.set(native.ABORT)
    pump.run()  # parses the carried bytes first, then returns at its first look at ctl
    conn.close()
    relay.close()
    assert pump.stats.counter("wire_errors") == 1
    assert pump.stats.counter("conn_errors") == 1
    assert list(pump.conn_states) == [1]


def test_ws_framing_masks_and_parses() -> None:
    """Client frames unmask to the payload; the 7-bit, 16-bit and 64-bit length forms all parse."""
    filler = wire.make_filler(70000)
    for size in (100, 1024, 70000):
        b = wire.MessageBuilder("ws", size, filler[: size - wire.HEAD_SIZE])
        frame = b"".join(b.data(7, 123))
        head_len = 2 + (0 if size < 126 else 2 if size < 65536 else 8)
        assert frame[1] & 0x80  # masked
        key = frame[head_len : head_len + 4]
        payload = wire.mask(frame[head_len + 4 :], key)
        assert len(payload) == size
        assert wire.HEAD.unpack_from(payload) == (1, wire.KIND_DATA, 0, 0, 7, 123)
        assert payload[wire.HEAD_SIZE :] == filler[: size - wire.HEAD_SIZE]


def test_run_cli_writes_results(tmp_path: Path) -> None:
    """``python -m bench.run`` end to end at tiny scale: JSON, markdown and plots, delivery ok."""
    env = {**os.environ, "MPLBACKEND": "Agg"}
    argv = [sys.executable, "-m", "bench.run", "--targets", "tcp,websockets,picows", "--modes", "active,idle"]
    argv += ["--active-sessions", "3", "--idle-connections", "8", "--heartbeat", "0.2"]
    argv += ["--warmup", "0.2", "--duration", "0.4", "--idle-warmup", "0.1", "--idle-window", "0.4"]
    argv += ["--idle-settle", "0", "--probe-rate", "1000"]
    argv += ["--out", str(tmp_path)]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    report = json.loads((tmp_path / "results-latest.json").read_text())
    rows = report["rows"]
    assert {(r["kind"], r["target"]) for r in rows} == {
        (kind, name) for kind in ("active", "idle") for name in ("tcp", "websockets", "picows")
    }
    for row in rows:
        assert "error" not in row, row
        assert row["delivery_ok"], row
        # the active steps ran the native pump (bench.run's default; CI has a C compiler)
        assert row["generator"] == ("native" if row["kind"] == "active" else "python"), row
        if row["kind"] == "idle":  # the first-message figure: every one of the 4 sessions probed once
            assert row["sent_total"] == row["msgs"] == 4, row
            assert row["p99_ms"] is not None
    assert (tmp_path / "results-latest.md").read_text().startswith("# Benchmark results")
    assert (tmp_path / "active-latest.png").stat().st_size > 0
    assert "first msg P99 ms" in (tmp_path / "results-latest.md").read_text()
    assert b" 6/6]" in done.stdout  # one progress line per step


def test_memory_census_end_to_end(tmp_path: Path) -> None:
    """``python -m bench.memory_census`` at tiny scale: both passes, every connection, relay lines named."""
    argv = [sys.executable, "-m", "bench.memory_census", "--connections", "8", "--settle", "0.2"]
    argv += ["--out", str(tmp_path)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    (report_file,) = tmp_path.glob("memory-*.json")
    (variant,) = json.loads(report_file.read_text())["variants"]
    assert variant["rss"]["connections"] == variant["traced"]["connections"] == 8
    assert variant["rss"]["relay_closed"] == variant["rss"]["conn_errors"] == 0
    analysis = variant["traced"]["analysis"]
    assert analysis["traced_bytes_per_conn"] > 0
    assert any(r["relay_line"].startswith("rescue/") for r in analysis["relay_lines"])
    assert any(r["type"].endswith("WebSocketConnection") for r in variant["traced"]["types"])


def test_throughput_ratios_name_the_best_python_peer() -> None:
    """Each throughput cell compares every target with picows too (issue 15), in the report."""
    run: Any = importlib.import_module("bench.run")

    def row(target: str, msgs: float, cpu_s: float) -> dict[str, Any]:
        return {
            "kind": "throughput",
            "label": "throughput 1 KiB x100",
            "size": 1024,
            "target": target,
            "msgs_per_s": msgs,
            "msgs_per_cpu_s": cpu_s,
        }

    rows = [row("tcp", 400.0, 500.0), row("websockets", 50.0, 60.0), row("picows", 300.0, 400.0)]
    rows.append(row("rescue", 360.0, 480.0))
    by_target = {q["target"]: q for q in run.ratios(rows)}
    assert by_target["rescue"]["x_picows"] == pytest.approx(1.2)
    assert by_target["rescue"]["x_picows_cpu"] == pytest.approx(1.2)
    assert by_target["picows"]["x_picows"] == pytest.approx(1.0)
    without = {q["target"]: q for q in run.ratios([r for r in rows if r["target"] != "picows"])}
    assert without["rescue"]["x_picows"] is None  # not in the run: no ratio, not a guess


# ------------------------------------------------------------------------------------------- TLS


@pytest.mark.parametrize("name", ["tcp", "websockets", "picows", "rescue"])
async def test_tls_throughput_rate_and_idle_deliver_everything(name: str, tmp_path: Path) -> None:
    """``bench.run --tls``: each target serves TLS and the generator speaks it (MemoryBIO).

    The real relay's idle run goes quiet (``--quiet-after 0.3``) before its probes: the first
    messages after quiet take the TLS quiet path (SO_RCVLOWAT raised by the record overhead)."""
    tls = targets.create_tls(tmp_path / "tls")
    keys, key_file, mint = _credentials(name, tmp_path)
    defn = targets.TARGETS[name]
    if name == "rescue":
        defn = targets._rescue("rescue", "target", "--quiet-after", "0.3")
    with trio.fail_after(60):
        relay = await targets.start_target(defn, log_dir=tmp_path, keys=keys, tls=tls)
        try:
            target = loadgen.Target(
                name=name,
                transport=relay.defn.transport,
                port=relay.port,
                path=relay.defn.path,
                key_file=key_file,
                tls_ca=str(tls.cert_file),
            )
            for size, sessions in ((1024, 3), (16384, 2)):  # 16 KiB: more than one TLS record
                tput = loadgen.Scenario(mode="throughput", sessions=sessions, size=size, window=4)
                result = await loadgen.run_local(target, tput, warmup_s=0.1, duration_s=0.3, mint=mint)
                _assert_delivered(result, connections=2 * sessions)
                assert result["msgs"] > 0
            rate = loadgen.Scenario(mode="rate", sessions=2, size=4096, rate=65536.0, direction="host")
            result = await loadgen.run_local(target, rate, warmup_s=0.1, duration_s=0.3, mint=mint)
            _assert_delivered(result, connections=4)
            idle = loadgen.Scenario(mode="idle", sessions=4, size=29, heartbeat_s=0.2, probe_rate=1000.0)
            result = await loadgen.run_local(target, idle, warmup_s=1.0, duration_s=1.0, mint=mint)
            _assert_delivered(result, connections=8)
            assert result["sent_total"] == result["msgs"] == 4
            assert result["heartbeats_rx"] > 0
        finally:
            await relay.stop()


def test_run_cli_tls_covers_every_mode(tmp_path: Path) -> None:
    """``python -m bench.run --tls`` at tiny scale: a TLS row per mode and target, delivery ok."""
    env = {**os.environ, "MPLBACKEND": "Agg"}
    argv = [sys.executable, "-m", "bench.run", "--tls", "--targets", "picows,rescue"]
    argv += ["--modes", "throughput,active,idle", "--sessions", "2", "--window", "2"]
    argv += ["--active-sessions", "2", "--idle-connections", "8", "--heartbeat", "1"]
    argv += ["--warmup", "0.2", "--duration", "0.3", "--idle-warmup", "0.1", "--idle-window", "0.4"]
    argv += ["--idle-settle", "0", "--probe-rate", "1000", "--out", str(tmp_path)]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    report = json.loads((tmp_path / "results-latest.json").read_text())
    assert report["meta"]["tls"] is True
    rows = report["rows"]
    kinds = ("throughput", "active", "idle")
    assert sorted((r["kind"], r["target"]) for r in rows) == sorted(
        [(k, t) for k in kinds for t in ("picows", "rescue")]
        + [("throughput", t) for t in ("picows", "rescue")]
    )
    for row in rows:
        assert "error" not in row, row
        assert row["tls"] is True, row
        assert row["label"].endswith(" TLS"), row
        assert row["delivery_ok"], row
    assert "Transport: **TLS**" in (tmp_path / "results-latest.md").read_text()
    # a target that cannot serve TLS is refused up front, not measured in the clear
    refused = subprocess.run(
        [sys.executable, "-m", "bench.run", "--tls", "--targets", "epoll", "--out", str(tmp_path / "x")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode != 0
    assert b"cannot serve TLS" in refused.stderr
