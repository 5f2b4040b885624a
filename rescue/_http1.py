"""Sans-I/O HTTP/1.1: the head parser shared by the WebSocket handshake and the request parser of
:func:`rescue._http.serve_http`.

Bytes in, requests out, no I/O and no trio (the shape of h11 without its per-event machinery):
:class:`RequestParser` takes whatever the socket gave (:meth:`~RequestParser.feed`) and hands back
complete requests, head and body, in arrival order (:meth:`~RequestParser.next_request`), so
pipelined requests come out one after the other. Everything it refuses is an :class:`HttpError`
carrying the status to answer; the server answers it and closes the connection.

What it enforces (RFC 9112 unless said otherwise):

- a request line ``METHOD SP target SP HTTP/1.x`` (origin-form, absolute-form, or ``*``); any other
  version is 505, anything else 400. Empty lines before a request line are skipped (§2.2). A
  request line that cannot become one (a control or non-ASCII byte, a bare LF, no version: a TLS
  ClientHello on the plain port, HTTP/0.9) is refused as its bytes arrive, not at the request timeout;
- header lines ``name ":" OWS value OWS`` with a token name and no control characters in the value
  (obs-fold is refused); a head over ``max_head`` bytes or with more than ``max_headers`` fields is
  431; an HTTP/1.1 request needs exactly one ``Host`` (400);
- a body framed by ``Content-Length`` (digits only; repeated values must agree) or by
  ``Transfer-Encoding: chunked`` (the only coding accepted, 501 otherwise); both at once is 400
  (request smuggling); a body over ``max_body`` is 413, judged on the declared length before a byte
  of it is read, or on the running total of a chunked one (held in one buffer: tiny chunks cost no
  more memory than their bytes);
- keep-alive: HTTP/1.1 unless ``Connection: close``, HTTP/1.0 only with ``Connection: keep-alive``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "HEAD_END",
    "MAX_HEAD",
    "MAX_HEADERS",
    "REASONS",
    "HttpError",
    "ParsedRequest",
    "RequestParser",
    "check_request_line",
    "parse_head",
]

HEAD_END: Final = b"\r\n\r\n"
# A request head of these APIs is a few hundred bytes (a bearer token is the largest part); 16 KiB
# is h11's limit for an incomplete head and leaves room for a browser's cookies.
MAX_HEAD: Final = 16 * 1024
# Browsers send ~15 fields; 100 is what h11 and hypercorn users live with and caps the dict we build.
MAX_HEADERS: Final = 100
# A chunk-size line is a few hex digits; its extensions (which nothing uses) may not grow a buffer.
MAX_CHUNK_LINE: Final = 1024

REASONS: Final = {
    100: "Continue",
    101: "Switching Protocols",
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No Content",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    417: "Expectation Failed",
    418: "I'm a teapot",
    422: "Unprocessable Content",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

# RFC 9110 "tchar" for names and methods; a value may hold HTAB and visible/obs-text bytes only.
_TCHARS: Final = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_HEADER_LINE: Final = re.compile(rb"([" + _TCHARS + rb"]+):[ \t]*(.*?)[ \t]*", re.DOTALL)
_CONTROL: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_METHOD: Final = re.compile(rb"[" + _TCHARS + rb"]+")
# the request target: visible ASCII only (RFC 9112 §3.2; no spaces, no control bytes, no obs-text)
_TARGET: Final = re.compile(rb"[\x21-\x7e]+")
_ABSOLUTE: Final = re.compile(rb"https?://[^/?#]*", re.IGNORECASE)
_DIGITS: Final = re.compile(rb"[0-9]{1,18}")
_HEX: Final = re.compile(rb"[0-9A-Fa-f]{1,15}")
# What a request line may hold while it arrives (a CR may end what arrived so far): anything else
# (a TLS ClientHello, NUL bytes, a bare LF) can never become a request and is refused at once.
_LINE_SO_FAR: Final = re.compile(rb"[\x20-\x7e]*\r?")


class HttpError(Exception):
    """The peer's bytes are not a request this server takes; answer ``status`` and close.

    Not a :class:`rescue.errors.RescueError`: it never leaves the server (like ``JsonError``, it is
    how the server decides which error response to send).

    Attributes:
        status: the HTTP status to answer (400, 408, 413, 431, 501, 505).
        error: a short stable machine-readable code (``bad_request``, ``headers_too_large``…).
        detail: human-readable text.
    """

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


def parse_head(head: bytes, *, max_size: int = MAX_HEAD) -> tuple[str, list[tuple[str, str]]]:
    """The start line and the headers of an HTTP head.

    Args:
        head: the head, up to and including the blank line that ends it (CRLF CRLF).
        max_size: the largest head accepted.

    Returns:
        The start line (ASCII) and every header as ``(lower-case name, value)`` in arrival order,
        values stripped of surrounding spaces and tabs, decoded as Latin-1.

    Raises:
        HttpError: 431 ``headers_too_large`` over ``max_size``; 400 ``bad_request`` for an
            incomplete head, a malformed header line, a control character in a value or a
            non-ASCII start line.
    """
    if len(head) > max_size:
        raise HttpError(431, "headers_too_large", f"head exceeds {max_size} bytes")
    if not head.endswith(HEAD_END):
        raise HttpError(400, "bad_request", "incomplete HTTP head")
    lines = head[:-4].split(b"\r\n")
    try:
        start = lines[0].decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "bad_request", "non-ASCII start line") from None
    return start, _parse_fields(lines, 1)


def _parse_fields(lines: list[bytes], first: int) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    fullmatch = _HEADER_LINE.fullmatch
    control = _CONTROL.search
    for i in range(first, len(lines)):
        found = fullmatch(lines[i])
        if found is None:
            raise HttpError(400, "bad_request", "malformed header line")
        name, value = found.groups()
        if control(value) is not None:
            raise HttpError(400, "bad_request", "control character in header value")
        headers.append((name.decode("ascii").lower(), value.decode("latin-1")))
    return headers


def check_request_line(buf: bytes | bytearray, checked: int = 0, limit: int = MAX_HEAD) -> int:
    """Refuse an incomplete head at once when its request line cannot become one, rather than wait
    out a timeout for a head that will never end (a TLS ClientHello on a plain port, NUL bytes, a
    bare LF, HTTP/0.9's versionless line).

    Args:
        buf: the head so far (leading empty lines already dropped).
        checked: what the previous call returned (0 at first): only the bytes after it are looked
            at, so a head trickled byte by byte costs linear time.
        limit: the largest head; the request line is looked for within it.

    Returns:
        What to pass as ``checked`` next time; -1 once the whole request line arrived and is
        plausible (nothing more to check).

    Raises:
        HttpError: 400 ``bad_request`` for a line that can never be a request line.
    """
    line_end = buf.find(b"\r\n", max(0, checked - 1), limit)
    stop = min(len(buf), limit) if line_end < 0 else line_end  # past the limit: 431, not 400
    if _LINE_SO_FAR.fullmatch(buf, checked, stop) is None:
        raise HttpError(400, "bad_request", "malformed request line")
    if line_end < 0:
        return stop - 1 if buf[stop - 1 : stop] == b"\r" else stop
    parts = bytes(buf[:line_end]).split(b" ")
    if len(parts) != 3 or parts[2][:5] != b"HTTP/":
        raise HttpError(400, "bad_request", "malformed request line")
    return -1


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """One complete request.

    Attributes:
        method: the method as sent (methods are case-sensitive, RFC 9110 §9.1).
        target: the path part of the request target, still percent-encoded (``*`` for
            ``OPTIONS *``; the scheme and authority of an absolute-form target are dropped).
        query: the query string without ``?`` (bytes as sent, ASCII).
        headers: header names lower-cased, the last value of each name.
        body: the body, de-chunked.
        keep_alive: whether the connection may carry another request after this one.
        http10: an HTTP/1.0 request (its answer must say ``Connection: keep-alive`` to keep it).
    """

    method: str
    target: str
    query: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool
    http10: bool


@dataclass(slots=True)
class _Head:
    """A parsed head whose body is still being read."""

    method: str
    target: str
    query: str
    headers: dict[str, str]
    keep_alive: bool
    http10: bool
    expect_continue: bool
    length: int  # Content-Length, or -1 for a chunked body


class RequestParser:
    """Requests out of a byte stream, one at a time, in order.

    Args:
        max_body: the largest body accepted (413 over it).
        max_head: the largest head accepted (431 over it).
        max_headers: the most header fields accepted (431 over it).

    A parser refuses everything after its first :class:`HttpError` (the server closes the
    connection: after a framing error nothing that follows can be trusted to be a request).
    """

    def __init__(self, *, max_body: int, max_head: int = MAX_HEAD, max_headers: int = MAX_HEADERS) -> None:
        self.max_body = max_body
        self.max_head = max_head
        self.max_headers = max_headers
        self._buf = b""
        self._scanned = 0  # how much of _buf is known not to hold the end of the head
        self._head: _Head | None = None
        self._line_checked = 0  # bytes of the next request line known plausible; -1: all of it
        # A chunked body so far, one buffer: a list of chunks cost ~40 bytes of objects per 1-byte
        # chunk (64 KiB of body in 1-byte chunks held ~2.7 MB per connection).
        self._chunked = bytearray()
        self._failed: HttpError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as part of a request."""
        return len(self._buf)

    @property
    def idle(self) -> bool:
        """No byte of a next request has arrived (blank lines between requests do not count)."""
        return self._head is None and not self._buf.lstrip(b"\r\n")

    @property
    def expects_continue(self) -> bool:
        """The request being read asked for ``100 Continue`` before sending its body."""
        return self._head is not None and self._head.expect_continue

    def continue_sent(self) -> None:
        """The server answered ``100 Continue``; :attr:`expects_continue` is False from now on."""
        if self._head is not None:
            self._head.expect_continue = False

    def feed(self, data: bytes) -> None:
        """Add bytes received from the peer."""
        self._buf = self._buf + data if self._buf else data

    def next_request(self) -> ParsedRequest | None:
        """The next complete request, or None until more bytes arrive.

        Raises:
            HttpError: the bytes are not an acceptable request (see the module docs).
        """
        if self._failed is not None:
            raise self._failed
        try:
            return self._next()
        except HttpError as exc:
            self._failed = exc
            self._buf = b""
            raise

    def _next(self) -> ParsedRequest | None:
        head = self._head
        if head is None:
            head = self._read_head()
            if head is None:
                return None
        if head.length >= 0:
            if len(self._buf) < head.length:
                return None
            body = self._buf[: head.length]
            self._buf = self._buf[head.length :]
        else:
            chunked = self._read_chunked()
            if chunked is None:
                return None
            body = chunked
        self._head = None
        return ParsedRequest(
            head.method, head.target, head.query, head.headers, body, head.keep_alive, head.http10
        )

    def _read_head(self) -> _Head | None:
        buf = self._buf
        if buf[:2] == b"\r\n":  # empty lines before a request line are ignored (RFC 9112 §2.2)
            buf = self._buf = buf.lstrip(b"\r\n")
            self._scanned = 0
            self._line_checked = 0
        end = buf.find(HEAD_END, self._scanned)
        if end < 0:
            if self._line_checked >= 0:
                self._check_request_line(buf)
            if len(buf) > self.max_head:
                raise HttpError(431, "headers_too_large", f"request head exceeds {self.max_head} bytes")
            self._scanned = max(0, len(buf) - 3)
            return None
        if end + 4 > self.max_head:
            raise HttpError(431, "headers_too_large", f"request head exceeds {self.max_head} bytes")
        lines = buf[:end].split(b"\r\n")
        self._buf = buf[end + 4 :]
        self._scanned = 0
        self._line_checked = 0
        if len(lines) - 1 > self.max_headers:
            raise HttpError(431, "headers_too_large", f"more than {self.max_headers} header fields")
        head = self._parse_head(lines)
        if head.length > self.max_body:
            raise HttpError(413, "payload_too_large", f"request body over {self.max_body} bytes")
        self._head = head
        return head

    def _parse_head(self, lines: list[bytes]) -> _Head:
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            raise HttpError(400, "bad_request", "malformed request line")
        method, target, version = parts
        if version == b"HTTP/1.1":
            http10 = False
        elif version == b"HTTP/1.0":
            http10 = True
        elif version[:5] == b"HTTP/" and len(version) == 8 and version[5:6].isdigit():
            raise HttpError(505, "http_version_not_supported", "HTTP/1.1 or HTTP/1.0 only")
        else:
            raise HttpError(400, "bad_request", "malformed request line")
        if _METHOD.fullmatch(method) is None or _TARGET.fullmatch(target) is None:
            raise HttpError(400, "bad_request", "malformed request line")
        if target[:1] != b"/":
            absolute = _ABSOLUTE.match(target)
            if absolute is not None:
                target = target[absolute.end() :] or b"/"
                if target[:1] != b"/":  # "http://host?x" has no path: it is "/"
                    target = b"/" + target
            elif target != b"*":
                raise HttpError(400, "bad_request", "malformed request target")
        path, _, query = target.partition(b"?")
        path = path.partition(b"#")[0]
        fields = _parse_fields(lines, 1)
        headers = dict(fields)
        if len(headers) != len(fields):
            self._check_repeats(fields)
        if not http10 and "host" not in headers:
            raise HttpError(400, "bad_request", "missing Host header")
        length = 0
        te = headers.get("transfer-encoding")
        if te is not None:
            if "content-length" in headers:
                raise HttpError(400, "bad_request", "both Content-Length and Transfer-Encoding")
            if http10:
                raise HttpError(400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request")
            if te.strip().lower() != "chunked":
                raise HttpError(501, "not_implemented", "only chunked transfer coding is supported")
            length = -1
        else:
            declared = headers.get("content-length")
            if declared is not None:
                if _DIGITS.fullmatch(declared.encode("latin-1")) is None:
                    raise HttpError(400, "bad_request", "bad Content-Length")
                length = int(declared)
        connection = headers.get("connection")
        tokens = {t.strip().lower() for t in connection.split(",")} if connection else set()
        keep_alive = "keep-alive" in tokens if http10 else "close" not in tokens
        expect = headers.get("expect")
        if expect is not None and expect.strip().lower() != "100-continue":
            raise HttpError(417, "expectation_failed", "only Expect: 100-continue is supported")
        return _Head(
            method=method.decode("ascii"),
            target=path.decode("ascii"),
            query=query.decode("ascii"),
            headers=headers,
            keep_alive=keep_alive,
            http10=http10,
            expect_continue=expect is not None and not http10 and length != 0,
            length=length,
        )

    def _check_request_line(self, buf: bytes) -> None:
        self._line_checked = check_request_line(buf, self._line_checked, self.max_head)

    @staticmethod
    def _check_repeats(fields: list[tuple[str, str]]) -> None:
        seen: dict[str, str] = {}
        for name, value in fields:
            repeated = name in ("host", "content-length", "transfer-encoding") and name in seen
            if repeated and (name != "content-length" or seen[name] != value):
                raise HttpError(400, "bad_request", f"conflicting {name} headers")
            seen[name] = value

    def _read_chunked(self) -> bytes | None:
        buf = self._buf
        pos = 0  # complete chunks leave the buffer (a partial one waits for the rest)
        while True:
            line_end = buf.find(b"\r\n", pos, pos + MAX_CHUNK_LINE)
            if line_end < 0:
                if len(buf) - pos >= MAX_CHUNK_LINE:
                    raise HttpError(400, "bad_request", "chunk-size line too long")
                break
            size_text = buf[pos:line_end].partition(b";")[0].strip(b" \t")
            if _HEX.fullmatch(size_text) is None:
                raise HttpError(400, "bad_request", "malformed chunk size")
            size = int(size_text, 16)
            if size == 0:
                end = self._trailers_end(buf, line_end + 2)
                if end < 0:
                    break
                self._buf = buf[end:]
                body = bytes(self._chunked)
                self._chunked = bytearray()
                return body
            if len(self._chunked) + size > self.max_body:
                raise HttpError(413, "payload_too_large", f"request body over {self.max_body} bytes")
            data_end = line_end + 2 + size
            if len(buf) < data_end + 2:
                break
            if buf[data_end : data_end + 2] != b"\r\n":
                raise HttpError(400, "bad_request", "chunk data not followed by CRLF")
            self._chunked += buf[line_end + 2 : data_end]
            pos = data_end + 2
        if pos:
            self._buf = buf[pos:]
        return None

    def _trailers_end(self, buf: bytes, start: int) -> int:
        """Where the trailer section after the last chunk ends (-1: not yet): CRLF alone, or
        trailer fields (checked, then dropped) and CRLF."""
        if buf[start : start + 2] == b"\r\n":
            return start + 2
        found = buf.find(HEAD_END, start, start + self.max_head)
        if found < 0:
            if len(buf) - start >= self.max_head:
                raise HttpError(431, "headers_too_large", "trailer section too large")
            return -1
        _parse_fields(buf[start:found].split(b"\r\n"), 0)
        return found + 4
