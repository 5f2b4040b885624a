"""The trio-native Redis transport (decision 0020): the sans-I/O RESP2 parser, then the client
against real redis-servers (and a fake one that speaks garbage)."""

from __future__ import annotations

import functools
import signal
from typing import Any

import httpx
import pytest
import redis
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from rescue.errors import StoreUnavailable
from rescue.guardrails import (
    CounterField,
    GuardrailConfig,
    Guardrails,
    RedisStore,
    hour_bucket,
    store_deadline,
)
from rescue.guardrails._native import NativeRedis, native_target
from rescue.guardrails._redis import _COUNT_LUA
from rescue.guardrails._resp import (
    MAX_LINE,
    NEED_DATA,
    RespError,
    RespParser,
    RespProtocolError,
    encode_command,
)
from rescue.guardrails._store import counter_key
from rescue.protocol import SigningKey
from rescue.testing import free_tcp_ports
from rescue.tokenservice import PublishedKeys, TokenService, TokenServiceConfig, serve_token_service

from .conftest import RedisServer

TIMEOUT = 10
NOW = 1_700_000_000.0

# --- the parser, sans I/O --------------------------------------------------------------------------

line_text = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=20)
replies = st.recursive(
    st.one_of(
        st.none(),
        st.integers(-(2**63), 2**63 - 1),
        st.text(max_size=30),  # bulk
        line_text.map(lambda t: ("+", t)),  # status
        line_text.map(lambda t: ("-", t)),  # error
    ),
    lambda children: st.lists(children, max_size=5),
    max_leaves=20,
)


def encode_reply(reply: Any) -> bytes:
    if reply is None:
        return b"$-1\r\n"
    if isinstance(reply, int):
        return b":%d\r\n" % reply
    if isinstance(reply, str):
        data = reply.encode()
        return b"$%d\r\n%s\r\n" % (len(data), data)
    if isinstance(reply, tuple):
        return reply[0].encode() + reply[1].encode() + b"\r\n"
    return b"*%d\r\n" % len(reply) + b"".join(encode_reply(r) for r in reply)


def expected(reply: Any) -> Any:
    if isinstance(reply, tuple):
        return RespError(reply[1]) if reply[0] == "-" else reply[1]
    if isinstance(reply, list):
        return [expected(r) for r in reply]
    return reply


def drain(parser: RespParser) -> list[Any]:
    out = []
    while (reply := parser.next_reply()) is not NEED_DATA:
        out.append(reply)
    return out


@given(st.lists(replies, max_size=8), st.data())
def test_any_split_of_a_reply_stream_parses_the_same(stream: list[Any], data: st.DataObject) -> None:
    wire = b"".join(encode_reply(r) for r in stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    parser = RespParser()
    got: list[Any] = []
    start = 0
    for cut in [*cuts, len(wire)]:
        parser.feed(wire[start:cut])
        got += drain(parser)
        start = cut
    assert got == [expected(r) for r in stream]
    # an error reply stays an error (a RespError), a status stays a plain str
    assert [type(g) for g in got] == [type(expected(r)) for r in stream]


@settings(max_examples=300)
@given(st.binary(max_size=200), st.binary(max_size=40))
def test_garbage_raises_a_protocol_error_or_gives_at_most_a_reply_a_byte(prefix: bytes, tail: bytes) -> None:
    parser = RespParser()
    parser.feed(prefix + tail)
    count = 0
    try:
        while parser.next_reply() is not NEED_DATA:
            count += 1
            assert count <= len(prefix + tail)
    except RespProtocolError:
        pass


@pytest.mark.parametrize(
    "wire",
    [
        b"?what\r\n",
        b":12a\r\n",
        b"$-2\r\n",
        b"*-5\r\n",
        b"$3\r\nabcXY",
        b":\r\n",
        b"+" + b"a" * MAX_LINE * 2,
    ],
)
def test_malformed_replies_raise(wire: bytes) -> None:
    parser = RespParser()
    parser.feed(wire)
    with pytest.raises(RespProtocolError):
        parser.next_reply()


@given(st.lists(st.one_of(st.text(max_size=20), st.integers(-(10**12), 10**12)), min_size=1, max_size=8))
def test_an_encoded_command_is_an_array_of_bulk_strings(args: list[str | int]) -> None:
    parser = RespParser()
    parser.feed(encode_command(args))
    assert parser.next_reply() == [str(a) for a in args]


# --- the client, on real servers --------------------------------------------------------------------


def test_only_plain_single_server_urls_go_native() -> None:
    assert native_target("redis://u:p%40ss@h:7000/3") is not None
    assert native_target("unix:///tmp/r.sock?db=2") is not None
    for url in ("rediss://h", "redis+cluster://h:1", "redis+sentinel://h:1/m", "redis://h?socket_timeout=9"):
        assert native_target(url) is None
    assert RedisStore("redis://127.0.0.1:1/0")._native is not None
    assert RedisStore("rediss://127.0.0.1:1/0")._native is None


@pytest.fixture
def tcp_redis(private_redis: RedisServer) -> tuple[RedisServer, int]:
    """The private Redis, also listening on a TCP port of 127.0.0.1."""
    (port,) = free_tcp_ports()
    with private_redis.client() as client:
        client.config_set("bind", "127.0.0.1")
        client.config_set("port", port)
    return private_redis, port


async def test_auth_and_select_come_from_the_url(tcp_redis: tuple[RedisServer, int]) -> None:
    server, port = tcp_redis
    with server.client() as client:
        client.acl_setuser("ops", enabled=True, passwords=["+s3cr@t"], commands=["+@all"], keys=["*"])
        client.config_set("requirepass", "main-pass")
    for url in (f"redis://ops:s3cr%40t@127.0.0.1:{port}/3", f"unix://:main-pass@{server.socket_path}?db=3"):
        store = RedisStore(url)
        try:
            with trio.fail_after(TIMEOUT):
                await store.set_cohort_enabled("beta", True)
                assert await store.cohort_enabled("beta") is True
        finally:
            await store.aclose()
    with redis.Redis(unix_socket_path=server.socket_path, password="main-pass", db=3) as client:
        assert client.hget("fallback:cohorts", "beta") == b"1"
        assert client.hget("fallback:cohorts", "beta") is not None
    with redis.Redis(unix_socket_path=server.socket_path, password="main-pass", db=0) as client:
        assert client.hget("fallback:cohorts", "beta") is None
    wrong = RedisStore(f"redis://ops:nope@127.0.0.1:{port}/3")
    with trio.fail_after(TIMEOUT), pytest.raises(StoreUnavailable, match=r"Authentication|WRONGPASS|invalid"):
        await wrong.ping()
    await wrong.aclose()


async def test_a_call_cancelled_mid_round_trip_never_lends_its_connection(private_redis: RedisServer) -> None:
    client = NativeRedis(native_target(private_redis.url), max_idle=1, socket_timeout=5, connect_timeout=1)  # type: ignore[arg-type]
    with trio.fail_after(TIMEOUT):
        assert await client.execute([("HSET", "h", "f", "v"), ("SET", "s", "plain")]) == [1, "OK"]
        private_redis.process.send_signal(signal.SIGSTOP)
        try:
            with trio.move_on_after(0.2) as late:
                await client.execute([("HGETALL", "h")])
            assert late.cancelled_caught
            assert client._open == set()  # closed, not pooled
        finally:
            private_redis.process.send_signal(signal.SIGCONT)
        # the HGETALL's answer went to the closed socket: the next call reads its own
        assert await client.execute([("GET", "s")]) == ["plain"]
    client.close()


async def test_a_restarted_redis_is_noticed_before_the_write(
    private_redis: RedisServer, redis_sends: list[str]
) -> None:
    store = RedisStore(private_redis.url)
    try:
        with trio.fail_after(TIMEOUT):
            await store.set_cohort_enabled("beta", True)
            await store.record_mint("beta", now=NOW, session_id="s-1", node_id="n-1", ttl=60)
            private_redis.restart_empty()  # the pooled connection is dead, the script cache empty
            redis_sends.clear()
            with store_deadline(2.0):
                assert (
                    await store.record_mint("beta", now=NOW, session_id="s-2", node_id="n-2", ttl=60) == "n-2"
                )
            # the dead connection was dropped before anything was written to it: the pipeline
            # (answered NOSCRIPT) and the EVALs of its scripts, nothing sent into the dead socket
            assert len(redis_sends) == 2
            assert not store.breaker.open
            await store.increment("beta", CounterField.TOKENS, now=NOW)
            with private_redis.client() as client:  # counted once each, NOSCRIPT or not
                key = counter_key("beta", hour_bucket(NOW))
                assert client.hget(key, "tokens") == "2"
    finally:
        await store.aclose()


async def test_connections_killed_while_idle_are_replaced_before_the_write(
    private_redis: RedisServer, redis_sends: list[str]
) -> None:
    client = NativeRedis(native_target(private_redis.url), max_idle=3, socket_timeout=5, connect_timeout=1)  # type: ignore[arg-type]
    with private_redis.client() as admin:
        before = {c["id"] for c in admin.client_list()}  # (redis-py 5.0 keeps one of its own open)
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:  # three calls at once: three pooled connections
                for _ in range(3):
                    nursery.start_soon(client.execute, [("PING",)])
            assert len(client._idle) == 3
            with private_redis.client() as admin:
                pooled = {c["id"] for c in admin.client_list()} - before - {str(admin.client_id())}
                assert len(pooled) == 3
                for client_id in pooled:  # exactly the pool's connections
                    assert admin.client_kill_filter(_id=client_id) == 1
            redis_sends.clear()
            assert await client.execute([("INCR", "once")]) == [1]
            assert len(redis_sends) == 1  # written once, to a new connection
            assert len(client._open) == 1  # the three dead ones closed on the way
            with private_redis.client() as admin:
                assert admin.get("once") == "1"
    finally:
        client.close()


class LossyProxy:
    """A TCP proxy of ours, between the client under test and the real Redis (its unix socket).

    It forwards every request and its replies, except once armed (:meth:`lose_reply_to`): the first
    request with a command naming ``marker`` is forwarded, Redis's replies to it are read in full
    (so Redis has run it), and then the client's connection is closed instead of answered -- what
    a Redis that died, or a network that broke, right after running a command looks like.
    """

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.marker: str | None = None
        self.forwarded: list[list[str]] = []  # every command Redis received through the proxy

    def lose_reply_to(self, marker: str) -> None:
        self.marker = marker

    def seen(self, marker: str) -> int:
        return sum(any(marker in word for word in command) for command in self.forwarded)

    async def handle(self, client: trio.SocketStream) -> None:
        async with client, await trio.open_unix_socket(self.socket_path) as server:
            requests, answers = RespParser(), RespParser()
            while data := await client.receive_some(65536):
                requests.feed(data)
                commands = drain(requests)  # a request split mid-command waits for its rest
                await server.send_all(data)
                self.forwarded += commands
                wanted, replies, wire = len(commands), 0, b""
                while replies < wanted:
                    chunk = await server.receive_some(65536)
                    assert chunk, "Redis closed the proxy's connection"
                    answers.feed(chunk)
                    replies += len(drain(answers))
                    wire += chunk
                marker = self.marker
                if marker is not None and any(marker in word for command in commands for word in command):
                    self.marker = None
                    return  # Redis ran it; the client never hears
                await client.send_all(wire)


@pytest.fixture
async def lossy(private_redis: RedisServer, nursery: trio.Nursery) -> tuple[LossyProxy, str]:
    """A proxy in front of the private Redis, and the ``redis://`` URL that goes through it."""
    proxy = LossyProxy(private_redis.socket_path)
    listeners = await nursery.start(functools.partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return proxy, f"redis://127.0.0.1:{port}/0"


async def test_a_write_whose_reply_was_lost_is_not_sent_again(
    private_redis: RedisServer, lossy: tuple[LossyProxy, str]
) -> None:
    proxy, url = lossy
    store = RedisStore(url)
    try:
        with trio.fail_after(TIMEOUT):
            await store.increment("beta", CounterField.TOKENS, now=NOW)  # loads the script
            proxy.lose_reply_to(_COUNT_LUA.sha)
            with pytest.raises(StoreUnavailable, match="ConnectionLost"):
                await store.increment("beta", CounterField.TOKENS, now=NOW)
            assert proxy.marker is None  # the loss happened
            assert proxy.seen(_COUNT_LUA.sha) == 2  # one EVALSHA per increment, none sent again
            with private_redis.client() as client:
                assert client.hget(counter_key("beta", hour_bucket(NOW)), "tokens") == "2"
            assert store.breaker.open  # an outage like any other
    finally:
        await store.aclose()


async def test_a_read_whose_reply_was_lost_is_sent_again(
    private_redis: RedisServer, lossy: tuple[LossyProxy, str]
) -> None:
    proxy, url = lossy
    store = RedisStore(url)
    try:
        with trio.fail_after(TIMEOUT):
            with private_redis.client() as client:
                client.hset("fallback:fleet", "paused", "1")
            await store.ping()  # a pooled connection (on which the loss happens)
            proxy.lose_reply_to("fallback:fleet")
            assert (await store.fleet_state()).paused  # the kill switch, read on the second try
            assert proxy.marker is None
            assert proxy.seen("fallback:fleet") == 2
            proxy.lose_reply_to("fallback:fleet")  # the mint's snapshot: reads and a pruning script
            snapshot = await store.mint_snapshot("beta", now=NOW)
            assert snapshot.fleet.paused
            assert proxy.seen("fallback:fleet") == 4
            assert not store.breaker.open
    finally:
        await store.aclose()


async def test_a_mint_whose_count_was_lost_answers_503_and_counts_the_store_error(
    private_redis: RedisServer, lossy: tuple[LossyProxy, str]
) -> None:
    proxy, url = lossy
    store = RedisStore(url)
    config = TokenServiceConfig(
        keys=PublishedKeys(SigningKey.generate()), disable_oidc=True, relay_url="ws://r/v1/connect"
    )
    clock = functools.partial(float, NOW)  # the counters' hour is the service's wall clock's
    service = TokenService(config, Guardrails(store, GuardrailConfig(), wall_clock=clock), wall_clock=clock)
    body = {
        "session_id": "s-1",
        "role": "host",
        "cohort_id": "beta",
        "client_version": "test",
        "telemetry_opt_in": False,
    }
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_token_service, service, "127.0.0.1", 0)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as http:
                with trio.fail_after(TIMEOUT):
                    await store.set_cohort_enabled("beta", True)
                    assert (await http.post("/v1/fallback/token", json=body)).status_code == 200
                    proxy.lose_reply_to(_COUNT_LUA.sha)  # the mint's record: count, telemetry gap
                    lost = await http.post("/v1/fallback/token", json=body)
                    assert (lost.status_code, lost.json()["error"]) == (503, "guardrail_store_unavailable")
                    assert proxy.seen(_COUNT_LUA.sha) == 2
                    # counted where every other store failure is
                    sample = service.registry.get_sample_value
                    assert sample("beach_fallback_store_errors_total", {"route": "/v1/fallback/token"}) == 1
                    labels = {"guardrail": "store_unavailable", "outcome": "unavailable"}
                    assert sample("beach_fallback_token_requests_total", labels) == 1
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()
    with private_redis.client() as client:  # counted, not issued: an over-count, never a double one
        assert client.hget(counter_key("beta", hour_bucket(NOW)), "tokens") == "2"


async def test_error_replies_keep_their_meaning(private_redis: RedisServer) -> None:
    store = RedisStore(private_redis.url)
    try:
        with trio.fail_after(TIMEOUT):
            with private_redis.client() as client:
                client.set("fallback:fleet", "not a hash")
            with pytest.raises(redis.ResponseError, match="WRONGTYPE"):  # an answer, not an outage
                await store.fleet_state()
            assert not store.breaker.open
            with private_redis.client() as client:
                client.delete("fallback:fleet")
                client.replicaof("127.0.0.1", "1")  # a demoted primary answers writes READONLY
            try:
                with pytest.raises(StoreUnavailable, match="ReadOnlyError"):
                    await store.set_cohort_enabled("beta", True)
                assert store.breaker.open
            finally:
                with private_redis.client() as client:
                    client.replicaof("NO", "ONE")
    finally:
        await store.aclose()


async def test_garbage_from_the_server_is_an_outage_not_a_hang() -> None:
    async def liar(stream: trio.SocketStream) -> None:
        await stream.receive_some(1024)
        await stream.send_all(b"%3\r\nnot resp2\r\n")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, liar, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        store = RedisStore(f"redis://127.0.0.1:{port}/0")
        with trio.fail_after(TIMEOUT), pytest.raises(StoreUnavailable, match="InvalidResponse"):
            await store.ping()
        await store.aclose()
        nursery.cancel_scope.cancel()
