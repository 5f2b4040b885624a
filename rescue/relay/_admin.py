"""The relay's admin HTTP port: ``/livez``, ``/healthz``, ``/readyz``, ``/metrics``, ``/debug/stats``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rescue._http import Request, Response, Router, json_response

if TYPE_CHECKING:
    from rescue.relay._relay import Relay

__all__ = ["admin_app"]


def admin_app(relay: Relay) -> Router:
    """The admin API of ``relay`` as a router (serve it with :func:`rescue._http.serve_http`).

    - ``GET /livez`` and ``GET /healthz``: 200 ``{"status": "ok", "node_id": …}`` while the process
      runs (liveness: nothing it depends on, Redis or the token service, is asked; ``/livez`` is
      the token service's liveness path too, so both services are probed alike: decision 0021).
    - ``GET /readyz``: 200 when the node takes new sessions; 503 while draining, paused, when
      the kill-switch state is stale beyond ``status_stale_s``, at ``max_sessions``, or while the
      WebSocket listener is full (``max_connections`` open, none pending: a newcomer would be
      refused); the JSON says why.
    - ``GET /metrics``: Prometheus text (this node's registry only); OpenMetrics, with exemplars,
      when ``Accept`` asks for ``application/openmetrics-text``.
    - ``GET /debug/stats``: sessions (as tags), connections and queue depths; no secrets.
    - ``POST /debug/gc``: one full garbage collection now, timed (pauses the node that long: a
      measuring tool for benchmarks and the hostile-input battery, never for monitoring).
    """
    router = Router()

    async def alive(request: Request) -> Response:
        return json_response({"status": "ok", "node_id": relay.config.node_id})

    for path in ("/livez", "/healthz"):
        router.add("GET", path, alive)

    @router.get("/readyz")
    async def readyz(request: Request) -> Response:
        detail = relay.readiness()
        return json_response(detail, 200 if detail["ready"] else 503)

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        body, content_type = relay.metrics.render(request.headers.get("accept", ""))
        return Response(200, body, content_type)

    @router.get("/debug/stats")
    async def debug_stats(request: Request) -> Response:
        return json_response(relay.statistics(detail=True))

    @router.post("/debug/gc")
    async def debug_gc(request: Request) -> Response:
        return json_response(relay.gc_pauses.full_collection())

    return router
