"""Which Redis a ``--redis-url`` names: one server, a Redis Cluster or a Sentinel-managed primary.

Pure parsing (no redis-py, no I/O), so the URL rules are tested on their own. redis-py's own
``from_url`` knows only ``redis://``, ``rediss://`` and ``unix://`` (one server); for the other two
we take the ``+cluster`` / ``+sentinel`` scheme suffix used by several Redis clients (a scheme is
the one thing every process already passes through, so no process needs a second flag):

    redis://[user:pass@]host[:port][/db]                      one server (redis-py's from_url)
    rediss://…, unix:///path/redis.sock?db=0                  one server, TLS / unix socket
    redis+cluster://[user:pass@]host:port[,host:port…]         Redis Cluster: seed nodes
    redis+sentinel://[user:pass@]host:port[,host:port…]/name[/db][?sentinel_username=U&sentinel_password=P]
                                                               Sentinel: sentinels + master name

``rediss+cluster`` / ``rediss+sentinel`` use TLS (to the data nodes and the sentinels). The user
and password authenticate to the data nodes; ``sentinel_username`` / ``sentinel_password`` (the
only query options) to the sentinels, as in the ``redis+sentinel://`` grammar of the
Redis-Sentinel-Url package, Prefect's docket and RedisVL. Valkey speaks the same protocol and
takes the same URLs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Final
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["RedisKind", "RedisTarget", "parse_redis_url"]

DEFAULT_PORT: Final = 6379
DEFAULT_SENTINEL_PORT: Final = 26379
# A URL names a handful of seeds; a bound keeps a typo'd or hostile setting from building a huge list.
MAX_HOSTS: Final = 32


class RedisKind(Enum):
    SINGLE = "single"
    CLUSTER = "cluster"
    SENTINEL = "sentinel"


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed ``--redis-url``.

    Attributes:
        kind: one server, a cluster or a sentinel-managed primary.
        url: for :attr:`RedisKind.SINGLE` the URL as given (redis-py parses it); else "".
        hosts: cluster seed nodes or sentinels, ``(host, port)``.
        service: the sentinel master name (``SENTINEL`` only).
        db: the database number (always 0 on a cluster).
        username, password: for the data nodes, percent-decoded; None when absent.
        tls: ``rediss+…``.
        sentinel_username, sentinel_password: for the sentinels (``SENTINEL`` only).
    """

    kind: RedisKind
    url: str = ""
    hosts: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    sentinel_username: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)


def _hosts(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    hostinfo = netloc.rpartition("@")[2]
    parts = hostinfo.split(",")
    if not hostinfo or len(parts) > MAX_HOSTS:
        raise ValueError(f"give 1-{MAX_HOSTS} host:port pairs, comma-separated")
    out = []
    for part in parts:
        if part.startswith("["):  # [ipv6]:port
            host, sep, rest = part[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"bad host {part!r}")
            port_text = rest[1:]
        else:
            host, _, port_text = part.partition(":")
        if not host:
            raise ValueError(f"bad host {part!r}")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise ValueError(f"bad port in {part!r}") from None
        if not 0 < port < 65536:
            raise ValueError(f"bad port in {part!r}")
        out.append((host, port))
    return tuple(out)


def _credentials(netloc: str) -> tuple[str | None, str | None]:
    userinfo, at, _ = netloc.rpartition("@")
    if not at:
        return None, None
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def parse_redis_url(url: str) -> RedisTarget:
    """Parse a ``--redis-url`` (see the module docstring for the forms).

    Raises:
        ValueError: the URL is none of the forms, with what is wrong (never the password).
    """
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError("expected scheme://…")
    if scheme in ("redis", "rediss", "unix"):
        return RedisTarget(RedisKind.SINGLE, url=url)
    base, plus, variant = scheme.partition("+")
    if not plus or base not in ("redis", "rediss") or variant not in ("cluster", "sentinel"):
        raise ValueError(
            f"unknown scheme {scheme!r}: use redis://, rediss://, unix://, "
            "redis+cluster:// or redis+sentinel:// (rediss+… for TLS)"
        )
    parts = urlsplit("x://" + url.partition("://")[2])
    if parts.fragment:
        raise ValueError("a fragment is not supported in redis+cluster/redis+sentinel URLs")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - {"sentinel_username", "sentinel_password"})
    if unknown or (query and variant != "sentinel"):
        raise ValueError(
            "the only query options are sentinel_username and sentinel_password (redis+sentinel)"
        )
    username, password = _credentials(parts.netloc)
    path = [p for p in parts.path.split("/") if p]
    tls = base == "rediss"
    if variant == "cluster":
        if path not in ([], ["0"]):
            raise ValueError("a Redis Cluster has only database 0: no path after the hosts")
        hosts = _hosts(parts.netloc, DEFAULT_PORT)
        return RedisTarget(RedisKind.CLUSTER, hosts=hosts, username=username, password=password, tls=tls)
    if len(path) not in (1, 2):
        raise ValueError("expected redis+sentinel://host:port[,host:port…]/master-name[/db]")
    try:
        db = int(path[1]) if len(path) == 2 else 0
    except ValueError:
        raise ValueError(f"bad database number {path[1]!r}") from None
    if db < 0:
        raise ValueError(f"bad database number {path[1]!r}")
    return RedisTarget(
        RedisKind.SENTINEL,
        hosts=_hosts(parts.netloc, DEFAULT_SENTINEL_PORT),
        service=unquote(path[0]),
        db=db,
        username=username,
        password=password,
        tls=tls,
        sentinel_username=query.get("sentinel_username") or None,
        sentinel_password=query.get("sentinel_password") or None,
    )
