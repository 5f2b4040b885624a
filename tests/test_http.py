"""rescue._http: routing, JSON errors, body limits and the server (serve_http), over real sockets."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from rescue._http import (
    JsonError,
    Request,
    Response,
    Router,
    is_json_media_type,
    json_response,
    serve_http,
    text_response,
)

TIMEOUT = 10  # generous bound for every network test on a loaded 2-core CI box
JSON = {"content-type": "application/json"}


def make_router(max_body: int = 1024) -> Router:
    router = Router(max_body=max_body)
    slow_started = trio.Event()

    @router.get("/v1/cohorts/{cohort_id}")
    async def get_cohort(request: Request) -> Response:
        return json_response({"cohort": request.path_params["cohort_id"], "q": dict(request.query)})

    @router.put("/v1/cohorts/{cohort_id}")
    async def put_cohort(request: Request) -> Response:
        body = request.json_object()
        return json_response({"cohort": request.path_params["cohort_id"], "body": body}, 201)

    @router.post("/echo")
    async def echo(request: Request) -> Response:
        return json_response({"got": request.json()})

    @router.post("/maybe-empty")
    async def maybe_empty(request: Request) -> Response:
        return json_response(request.json_object(allow_empty=True))

    @router.get("/teapot")
    async def teapot(request: Request) -> Response:
        raise JsonError(418, "teapot", "short and stout", headers={"x-why": "because"})

    @router.get("/boom")
    async def boom(request: Request) -> Response:
        raise RuntimeError("secret internal detail")

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        return text_response("x_total 1\n", content_type="text/plain; version=0.0.4; charset=utf-8")

    @router.get("/slow")
    async def slow(request: Request) -> Response:
        slow_started.set()
        await trio.sleep(0.3)
        return json_response({"slow": True})

    router.slow_started = slow_started  # type: ignore[attr-defined]
    return router


@asynccontextmanager
async def running(router: Router) -> AsyncIterator[tuple[httpx.AsyncClient, trio.Nursery]]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, router, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            yield client, nursery
        nursery.cancel_scope.cancel()


async def test_routes_path_params_and_query() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(make_router()) as (client, _):
            r = await client.get("/v1/cohorts/beta-1", params={"a": "1"})
            assert r.status_code == 200
            assert r.headers["content-type"] == "application/json"
            assert r.json() == {"cohort": "beta-1", "q": {"a": "1"}}
            r = await client.put("/v1/cohorts/x", json={"fallback_ws_enabled": True})
            assert r.status_code == 201
            assert r.json() == {"cohort": "x", "body": {"fallback_ws_enabled": True}}
            r = await client.post("/echo", json=[1, "two"])
            assert r.json() == {"got": [1, "two"]}
            r = await client.post("/maybe-empty")
            assert r.json() == {}


async def test_404_and_405_are_json() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(make_router()) as (client, _):
            r = await client.get("/nope")
            assert r.status_code == 404
            assert r.json() == {"error": "not_found", "detail": "no such endpoint"}
            r = await client.delete("/v1/cohorts/x")
            assert r.status_code == 405
            assert r.json()["error"] == "method_not_allowed"
            assert r.headers["allow"] == "GET, PUT"
            # a path parameter never spans segments
            r = await client.get("/v1/cohorts/a/b")
            assert r.status_code == 404


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"", "application/json"),
        (b"\xff\xfe", "application/json"),
        (b"NaN", "application/json"),
        (b"[1, 2]", "application/json"),  # valid JSON but not an object: /v1/cohorts wants an object
    ],
)
async def test_malformed_json_is_400_invalid_request(body: bytes, content_type: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with running(make_router()) as (client, _):
            r = await client.put("/v1/cohorts/x", content=body, headers={"content-type": content_type})
            assert r.status_code == 400
            assert r.json()["error"] == "invalid_request"


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=b", "text/json"],
)
async def test_body_not_declared_json_is_415(content_type: str | None) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    with trio.fail_after(TIMEOUT):
        async with running(make_router()) as (client, _):
            for path in ("/echo", "/maybe-empty"):
                r = await client.post(path, content=b'{"a": 1}', headers=headers)
                assert r.status_code == 415
                assert r.json()["error"] == "unsupported_media_type"
            # whitespace is a body too; only a truly empty one needs no declaration
            r = await client.post("/maybe-empty", content=b" ", headers=headers)
            assert r.status_code == 415
            r = await client.post("/maybe-empty", content=b"")
            assert (r.status_code, r.json()) == (200, {})


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("application/json", True),
        ("APPLICATION/JSON", True),
        (" application/json ; charset=utf-8", True),
        ('application/json; charset="UTF-8"', True),
        ("application/json;", True),
        ("application/json; charset=latin-1", False),
        ("application/json; boundary=x", False),
        ("application/jsonx", False),
        ("application/problem+json", False),
        ("text/plain", False),
        ("", False),
    ],
)
def test_is_json_media_type(value: str, ok: bool) -> None:
    assert is_json_media_type(value) is ok


@given(st.text(max_size=40))
def test_is_json_media_type_needs_the_json_type(value: str) -> None:
    # whatever the text, it is accepted only if its media type is application/json
    if is_json_media_type(value):
        assert value.split(";")[0].strip().lower() == "application/json"


async def test_body_over_limit_is_413_declared_and_streamed() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(make_router(max_body=100)) as (client, _):
            r = await client.post("/echo", content=b"[" + b"1," * 100 + b"1]", headers=JSON)
            assert r.status_code == 413
            assert r.json()["error"] == "payload_too_large"

            async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked encoding
                for _ in range(10):
                    yield b" " * 20

            r = await client.post("/echo", content=chunks(), headers=JSON)
            assert r.status_code == 413
            # exactly at the limit is fine
            r = await client.post("/echo", content=b" " * 97 + b"[1]", headers=JSON)
            assert r.status_code == 200


async def test_json_error_and_500_never_leaks_traceback() -> None:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect()
    logger = logging.getLogger("rescue.http")
    logger.addHandler(handler)
    try:
        with trio.fail_after(TIMEOUT):
            async with running(make_router()) as (client, _):
                r = await client.get("/teapot")
                assert r.status_code == 418
                assert r.json() == {"error": "teapot", "detail": "short and stout"}
                assert r.headers["x-why"] == "because"
                r = await client.get("/boom")
                assert r.status_code == 500
                assert r.json() == {"error": "internal_error", "detail": "internal server error"}
                assert "secret" not in r.text
                assert "Traceback" not in r.text
                # the server survives and keeps serving
                assert (await client.get("/v1/cohorts/a")).status_code == 200
    finally:
        logger.removeHandler(handler)
    errors = [rec for rec in records if getattr(rec, "event", None) == "http.unhandled_error"]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], RuntimeError)


async def test_plain_text_and_head() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(make_router()) as (client, _):
            r = await client.get("/metrics")
            assert r.text == "x_total 1\n"
            assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
            r = await client.head("/metrics")
            assert r.status_code == 200
            assert r.content == b""


async def test_port_zero_reports_bound_port_and_cancel_closes_listener() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, make_router(), "127.0.0.1", 0)
            assert isinstance(port, int)
            assert port > 0
            async with httpx.AsyncClient() as client:
                # an idle keep-alive connection must not hold the shutdown up
                assert (await client.get(f"http://127.0.0.1:{port}/v1/cohorts/a")).status_code == 200
                start = trio.current_time()
                nursery.cancel_scope.cancel()
        assert trio.current_time() - start < 2.0
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)


async def test_cancel_lets_in_flight_request_finish() -> None:
    router = make_router()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as outer:
            server_scope = trio.CancelScope()
            port_box: list[int] = []
            ready = trio.Event()

            async def run_server() -> None:
                with server_scope:
                    async with trio.open_nursery() as n:
                        port_box.append(await n.start(serve_http, router, "127.0.0.1", 0))
                        ready.set()

            outer.start_soon(run_server)
            await ready.wait()
            async with httpx.AsyncClient() as client:

                async def stop_when_started() -> None:
                    await router.slow_started.wait()  # type: ignore[attr-defined]
                    server_scope.cancel()

                outer.start_soon(stop_when_started)
                r = await client.get(f"http://127.0.0.1:{port_box[0]}/slow")
                assert r.status_code == 200
                assert r.json() == {"slow": True}


async def test_bind_failure_raises() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, make_router(), "127.0.0.1", 0)
            with pytest.raises(OSError):
                await nursery.start(serve_http, make_router(), "127.0.0.1", port)
            nursery.cancel_scope.cancel()


def _request(headers: dict[str, str] | None = None, body: bytes = b"") -> Request:
    return Request("GET", "/", {}, {}, headers or {}, body)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer a b", None),
        ("", None),
    ],
)
def test_bearer_token_parsing(value: str | None, expected: str | None) -> None:
    assert _request({"authorization": value} if value is not None else {}).bearer_token() == expected


@given(st.binary(max_size=200), st.sampled_from([None, "application/json", "text/plain"]))
def test_json_of_arbitrary_bytes_raises_only_json_error(body: bytes, content_type: str | None) -> None:
    error: JsonError | None = None
    headers = {} if content_type is None else {"content-type": content_type}
    try:
        _request(headers, body=body).json()
    except JsonError as exc:
        error = exc
    if error is None:
        assert content_type == "application/json"
    elif body and content_type != "application/json":
        assert (error.status, error.error) == (415, "unsupported_media_type")
    else:
        assert (error.status, error.error) == (400, "invalid_request")


@given(st.text(alphabet=st.characters(blacklist_characters="/", blacklist_categories=("Cs",)), min_size=1))
def test_path_param_round_trip(value: str) -> None:
    router = make_router()
    matched = router.match("GET", f"/v1/cohorts/{value}")
    assert not isinstance(matched, Response)
    assert matched[1] == {"cohort_id": value}


def test_route_templates_listed() -> None:
    assert ("GET", "/v1/cohorts/{cohort_id}") in make_router().routes
    with pytest.raises(ValueError):
        Router().add("GET", "no-slash", make_router().handle)
