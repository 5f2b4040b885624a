"""rescue._http1: the sans-I/O request parser, bytes in and requests out (no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rescue._http1 import HttpError, ParsedRequest, RequestParser, parse_head

TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
PATH_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-._~%/"


def feed_all(parser: RequestParser, pieces: list[bytes]) -> list[ParsedRequest]:
    out: list[ParsedRequest] = []
    for piece in pieces:
        parser.feed(piece)
        while (request := parser.next_request()) is not None:
            out.append(request)
    return out


def parse_one(data: bytes, *, max_body: int = 1024) -> ParsedRequest:
    requests = feed_all(RequestParser(max_body=max_body), [data])
    assert len(requests) == 1
    return requests[0]


def refused(data: bytes, *, max_body: int = 1024, **limits: int) -> HttpError:
    parser = RequestParser(max_body=max_body, **limits)
    parser.feed(data)
    with pytest.raises(HttpError) as caught:
        parser.next_request()
    # a failed parser stays failed: nothing after a framing error is trusted
    with pytest.raises(HttpError):
        parser.next_request()
    return caught.value


# ---------------------------------------------------------------------------------- generated


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, tuple[str, str, str, dict[str, str], bytes, bool]]:
    """A valid request on the wire and what the parser must make of it."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]))
    path = "/" + draw(st.text(PATH_CHARS, max_size=20))
    query = draw(st.text("abc=&", max_size=10))
    names = draw(st.lists(st.text(TCHARS, min_size=1, max_size=10), max_size=5, unique_by=str.lower))
    names = [
        n
        for n in names
        if n.lower() not in ("host", "content-length", "transfer-encoding", "connection", "expect")
    ]
    value_chars = st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f")
    values = [draw(st.text(value_chars, max_size=20)) for _ in names]
    body = draw(st.binary(max_size=200))
    chunked = draw(st.booleans())
    close = draw(st.booleans())
    head = [f"{method} {path}{'?' + query if query else ''} HTTP/1.1", "Host: example"]
    head += [f"{n}: {v}" for n, v in zip(names, values, strict=True)]
    if close:
        head.append("Connection: close")
    if chunked:
        head.append("Transfer-Encoding: chunked")
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        encoded = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"
    else:
        head.append(f"Content-Length: {len(body)}")
        encoded = body
    wire = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + encoded
    headers = {n.lower(): v for n, v in zip(names, values, strict=True)}
    return wire, (method, path, query, headers, body, not close)


@given(st.lists(requests(), min_size=1, max_size=4), st.data())
def test_any_split_gives_the_same_requests_in_order(
    batch: list[tuple[bytes, tuple[str, str, str, dict[str, str], bytes, bool]]], data: st.DataObject
) -> None:
    wire = b"".join(w for w, _ in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    got = feed_all(RequestParser(max_body=1024), pieces)
    assert len(got) == len(batch)
    for request, (_, (method, path, query, headers, body, keep_alive)) in zip(got, batch, strict=True):
        assert (request.method, request.target, request.query, request.body) == (method, path, query, body)
        assert request.keep_alive is keep_alive
        for name, value in headers.items():
            assert request.headers[name] == value.strip(" \t")


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=4))
def test_arbitrary_bytes_raise_only_http_error(data: bytes, cuts: list[int]) -> None:
    parser = RequestParser(max_body=64, max_head=128, max_headers=4)
    edges = sorted(c for c in cuts if c <= len(data))
    status = 0
    try:
        for a, b in zip([0, *edges], [*edges, len(data)], strict=True):
            parser.feed(data[a:b])
            while parser.next_request() is not None:
                pass
    except HttpError as exc:
        status = exc.status
    assert status in (0, 400, 413, 417, 431, 501, 505)


@given(st.binary(max_size=200))
def test_a_request_line_prefix_of_garbage_is_refused_or_waits(junk: bytes) -> None:
    # whatever follows a complete head, the head itself parses the same way
    parser = RequestParser(max_body=0)
    parser.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + junk)
    first = parser.next_request()
    assert first is not None
    assert (first.method, first.target, first.body) == ("GET", "/", b"")


# ---------------------------------------------------------------------------------- by example


def test_http10_keep_alive_only_when_asked() -> None:
    assert parse_one(b"GET / HTTP/1.0\r\n\r\n").keep_alive is False
    asked = parse_one(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
    assert (asked.keep_alive, asked.http10) == (True, True)
    assert parse_one(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").keep_alive is False


def test_targets() -> None:
    assert parse_one(b"GET http://example.com/a/b?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").target == "/a/b"
    assert parse_one(b"GET http://example.com HTTP/1.1\r\nHost: a\r\n\r\n").target == "/"
    assert parse_one(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n").target == "*"
    assert parse_one(b"\r\n\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n").target == "/x"  # leading CRLFs


def test_chunked_with_extensions_and_trailers() -> None:
    wire = (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    assert parse_one(wire).body == b"abcde"


@pytest.mark.parametrize(
    ("wire", "status"),
    [
        (b"GET /\r\nHost: a\r\n\r\n", 400),  # HTTP/0.9-style line
        (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),  # two spaces
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET / HTTX/1.1\r\nHost: a\r\n\r\n", 400),
        (b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET nopath HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nbad header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),  # obs-fold
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\nb\r\n\r\n", 400),  # bare LF
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nExpect: magic\r\n\r\n", 417),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n401\r\n", 413),
    ],
)
def test_refusals(wire: bytes, status: int) -> None:
    assert refused(wire).status == status


def test_chunked_running_total_over_limit_is_413() -> None:
    chunk = b"100\r\n" + b"x" * 256 + b"\r\n"
    wire = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 5
    assert refused(wire).status == 413


def test_head_limits_are_431() -> None:
    many = b"".join(b"X-%d: v\r\n" % i for i in range(11))
    assert refused(b"GET / HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n", max_headers=10).status == 431
    # an unfinished head over the limit is refused before its end arrives
    assert refused(b"GET / HTTP/1.1\r\nX: " + b"v" * 300, max_head=256).status == 431
    assert refused(b"GET / HTTP/1.1\r\nX: " + b"v" * 300 + b"\r\n\r\n", max_head=256).status == 431
    # a request line longer than the whole head may be is 431 too, however its bytes arrive
    assert refused(b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: a\r\n", max_head=256).status == 431


def test_expect_continue_is_reported_until_answered() -> None:
    parser = RequestParser(max_body=100)
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert parser.next_request() is None
    assert parser.expects_continue
    assert not parser.idle
    parser.continue_sent()
    assert not parser.expects_continue
    parser.feed(b"{}")
    request = parser.next_request()
    assert request is not None
    assert request.body == b"{}"
    assert parser.idle


def test_parse_head_keeps_arrival_order_and_strips_values() -> None:
    start, headers = parse_head(b"HTTP/1.1 101 Switching\r\nA:  1 \r\nb:\t2\r\nA: 3\r\n\r\n")
    assert start == "HTTP/1.1 101 Switching"
    assert headers == [("a", "1"), ("b", "2"), ("a", "3")]


@pytest.mark.parametrize(
    "opening",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on the plain port
        b"\x00" * 16,
        b"GET /x HTTP/1.1\nHost: a\n",  # bare LF line ends: the head would never end
        b"GET /x\r\n",  # HTTP/0.9: no version, no head end to wait for
        b"GET /x HTTP/1.1 extra\r\nHost: a\r\n",
    ],
)
def test_a_head_that_cannot_become_a_request_is_refused_before_it_ends(opening: bytes) -> None:
    # whole, or byte by byte (a trickle must not get the request timeout's worth of waiting)
    assert refused(opening).status == 400
    parser = RequestParser(max_body=0)
    status = 0
    try:
        for i in range(len(opening)):
            parser.feed(opening[i : i + 1])
            assert parser.next_request() is None
    except HttpError as exc:
        status = exc.status
    assert status == 400


def test_a_plausible_head_trickled_byte_by_byte_waits() -> None:
    parser = RequestParser(max_body=0)
    wire = b"\r\nGET /x?a=b HTTP/1.1\r\nHost: a\r\nX: \x80\x81\r\n\r\n"
    for i in range(len(wire) - 1):
        parser.feed(wire[i : i + 1])
        assert parser.next_request() is None
    parser.feed(wire[-1:])
    request = parser.next_request()
    assert request is not None
    assert (request.target, request.query) == ("/x", "a=b")


def test_a_chunked_body_of_one_byte_chunks_holds_about_its_size() -> None:
    # 64 KiB of body sent as 1-byte chunks (6 wire bytes each) must not hold 40 bytes per chunk
    import tracemalloc

    parser = RequestParser(max_body=64 * 1024)
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert parser.next_request() is None
    piece = b"1\r\nx\r\n" * 1024
    tracemalloc.start()
    try:
        for _ in range(64):
            parser.feed(piece)
            assert parser.next_request() is None
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 4 * 64 * 1024, held
    parser.feed(b"0\r\n\r\n")
    request = parser.next_request()
    assert request is not None
    assert request.body == b"x" * 64 * 1024
