"""``rescue relay --nodes N``: N node processes on one host, supervised (SPEC §7: one node per core).

The supervisor runs no relay itself. It starts N ``rescue relay`` children, node ``i`` (1-based) on
``port + i - 1`` and ``admin_port + i - 1`` with node id ``<node-id>-<i>``, each registering itself
like any node. A child that exits without being asked to is restarted after a backoff
(:class:`RestartBackoff`); SIGTERM or SIGINT is passed on to every child, which drains as a single
node does, and the supervisor exits 0 once all of them exited 0. Containers keep one node each
(the manifests run ``rescue relay`` without ``--nodes``): the orchestrator is their supervisor.

A SIGKILLed supervisor leaves its children running (they are ordinary ``rescue relay`` processes
and drain on their own SIGTERM). ``PR_SET_PDEATHSIG`` cannot help: trio starts processes from a
worker thread, and the signal fires when *that thread* exits, not the supervisor. In a container
the supervisor is PID 1, and its death takes the children with it.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import trio

from rescue._log import get_logger, log_event

__all__ = ["NodeSpec", "RestartBackoff", "Supervisor", "node_specs"]

_LOG = get_logger("rescue.relay")

# First restart delay, doubled per crash in a row up to the cap: a node that crashes at start-up
# (bad config, port taken) is retried a few times a minute, not in a busy loop.
RESTART_BASE_S: Final = 0.5
RESTART_CAP_S: Final = 30.0
# A child that ran this long before exiting counts as having been healthy: its next crash
# starts the backoff from the beginning again.
STABLE_AFTER_S: Final = 60.0
# After SIGTERM, a child gets its own drain period plus this to exit before it is SIGKILLed.
STOP_MARGIN_S: Final = 10.0


@dataclass
class RestartBackoff:
    """When to restart a crashed child: exponential, reset after a stable run (pure, no I/O).

    Attributes:
        base: the first delay.
        cap: the largest delay.
        stable_after: a run at least this long resets the backoff.
        crashes: crashes in a row so far.
    """

    base: float = RESTART_BASE_S
    cap: float = RESTART_CAP_S
    stable_after: float = STABLE_AFTER_S
    crashes: int = 0

    def delay(self, ran_for: float) -> float:
        """The child exited after running ``ran_for`` seconds: seconds to wait before restarting."""
        if ran_for >= self.stable_after:
            self.crashes = 0
        delay = min(self.cap, self.base * 2.0 ** min(self.crashes, 64))
        self.crashes += 1
        return delay


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One child node: its index (1-based), id, ports and command line."""

    index: int
    node_id: str
    port: int
    admin_port: int | None
    argv: tuple[str, ...]


def node_specs(
    base_argv: Sequence[str],
    *,
    nodes: int,
    node_id: str,
    port: int,
    admin_port: int | None,
    public_url: str | None,
) -> list[NodeSpec]:
    """The children's command lines: ``base_argv`` plus each node's own id, ports and URL.

    ``public_url``, when given, must contain ``{port}`` or ``{index}``, filled in per node.

    Raises:
        ValueError: fewer than 2 nodes, a port of 0 (consecutive ports need a fixed start), an
            admin port of 0, ports past 65535, or a public URL without a placeholder.
    """
    if nodes < 2:
        raise ValueError("--nodes must be at least 2 to supervise (1 runs the node itself)")
    if port == 0 or admin_port == 0:
        raise ValueError("--nodes needs fixed --port and --admin-port: nodes use consecutive ports")
    if port + nodes - 1 > 65535 or (admin_port is not None and admin_port + nodes - 1 > 65535):
        raise ValueError("--nodes runs past port 65535")
    ports = set(range(port, port + nodes))
    if admin_port is not None and ports & set(range(admin_port, admin_port + nodes)):
        raise ValueError("the data and admin port ranges of --nodes overlap")
    if public_url is not None and "{port}" not in public_url and "{index}" not in public_url:
        raise ValueError("with --nodes, --public-url must contain {port} or {index} (one URL per node)")
    specs = []
    for i in range(1, nodes + 1):
        own_port = port + i - 1
        own_admin = None if admin_port is None else admin_port + i - 1
        own_id = f"{node_id}-{i}"
        argv = [*base_argv, "--nodes=1", f"--node-id={own_id}", f"--port={own_port}"]
        argv.append(f"--admin-port={-1 if own_admin is None else own_admin}")
        if public_url is not None:
            url = public_url.replace("{port}", str(own_port)).replace("{index}", str(i))
            argv.append(f"--public-url={url}")
        specs.append(NodeSpec(i, own_id, own_port, own_admin, tuple(argv)))
    return specs


@dataclass
class _Child:
    spec: NodeSpec
    backoff: RestartBackoff = field(default_factory=RestartBackoff)
    process: trio.Process | None = None
    starts: int = 0
    exit_status: int | None = None


class Supervisor:
    """Runs and restarts the child nodes; :meth:`stop` drains them all.

    Args:
        specs: the children (:func:`node_specs`).
        drain_s: the children's drain period (bounds how long :meth:`stop` waits).
        backoff: makes each child's restart policy (tests shorten it).

    Resource handling:
        Every child lives inside :meth:`run`; none outlives it (SIGKILL after the drain bound).
    """

    def __init__(
        self,
        specs: Sequence[NodeSpec],
        *,
        drain_s: float,
        backoff: Callable[[], RestartBackoff] = RestartBackoff,
    ) -> None:
        self.children = [_Child(spec, backoff()) for spec in specs]
        self.drain_s = drain_s
        self._stop = trio.Event()

    @property
    def restarts(self) -> dict[str, int]:
        """Restarts per node id so far."""
        return {c.spec.node_id: max(0, c.starts - 1) for c in self.children}

    def stop(self) -> None:
        """Pass SIGTERM to every child and let :meth:`run` return once they exited."""
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
        """Supervise until :meth:`stop`; 0 if every child then exited 0, else 1.

        Cancellation:
            Every child is SIGKILLed (the nursery's structure; nothing is left running).
        """
        async with trio.open_nursery() as nursery:
            for child in self.children:
                nursery.start_soon(self._keep, child)
            task_status.started()
            await self._stop.wait()
            for child in self.children:
                if child.process is not None and child.process.returncode is None:
                    child.process.send_signal(signal.SIGTERM)
            nursery.cancel_scope.deadline = trio.current_time() + self.drain_s + STOP_MARGIN_S
        failed = [c.spec.node_id for c in self.children if c.exit_status not in (0, None)]
        log_event(_LOG, "relay.supervisor_stopped", failed=failed, restarts=self.restarts)
        return 1 if failed else 0

    async def _keep(self, child: _Child) -> None:
        spec = child.spec
        while not self._stop.is_set():
            started = trio.current_time()
            child.exit_status = None
            try:
                process = await trio.lowlevel.open_process(list(spec.argv), stdin=subprocess.DEVNULL)
            except OSError as exc:
                log_event(_LOG, "relay.node_start_failed", node_id=spec.node_id, error=str(exc))
                await trio.sleep(child.backoff.delay(0.0))
                continue
            child.process = process
            child.starts += 1
            log_event(_LOG, "relay.node_started", node_id=spec.node_id, pid=process.pid, port=spec.port)
            try:
                status = await process.wait()
            finally:
                if process.poll() is None:  # cancelled: the drain bound passed
                    process.kill()
                    child.exit_status = -int(signal.SIGKILL)
            child.exit_status = status
            if self._stop.is_set():
                return
            delay = child.backoff.delay(trio.current_time() - started)
            log_event(_LOG, "relay.node_exited", node_id=spec.node_id, status=status, restart_in_s=delay)
            with trio.move_on_after(delay):
                await self._stop.wait()
