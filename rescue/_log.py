"""JSON-lines logging with an ``event`` field, and redaction at the source.

Use :func:`log_event` for everything an operator may grep for::

    log_event(logger, "transport.fallback.activated", session=session_tag(sid), cohort="dev")

Secrets never reach the output: values of fields whose name says secret (``token``, ``passphrase``,
``psk``, ``key``, ``secret``, ``authorization``, ``d``, ``signing_key``) are replaced with
``"[redacted]"`` (so are names ending in ``_token``, ``_key``, ``_secret``, ``_passphrase``,
``_password``, ``_psk``, at any depth of nested dicts, lists and tuples), ``bytes`` values are logged as
their length only, and session ids should go through :func:`session_tag` (a short keyed hash, see below).
As a last line of defence the formatted line is scrubbed of anything shaped like a token or a key (a
run of 32+ base64url characters mixing upper case, lower case and digits), which catches secrets that
reach a message or an exception text; UUIDs, hex digests and snake_case names do not match.

Session tags are keyed. An unkeyed hash of a session id is only as secret as the id is hard to
guess: anyone with the logs hashes candidate ids (sequential numbers, user names, short random
strings) until a tag matches. :func:`session_tag` is BLAKE2b keyed with the deployment's secret
``$RESCUE_LOG_TAG_KEY`` (at least :data:`MIN_TAG_KEY_CHARS` characters; every relay and token
service of one deployment gets the same value, so their logs and spans name a session by the
same tag). Without it each process draws a random key: its own tags are consistent, but they do
not match any other process's, and the servers warn about it at startup
(:func:`configure_session_tags`). ``docs/operations/runbook.md`` says how to rotate the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import sys
import threading
from collections.abc import Mapping
from typing import IO, Any, Final

from rescue.errors import ConfigError

__all__ = [
    "LOG_TAG_KEY_ENV",
    "MIN_TAG_KEY_CHARS",
    "JsonFormatter",
    "configure_logging",
    "configure_session_tags",
    "get_logger",
    "log_event",
    "redact",
    "scrub",
    "session_tag",
    "set_session_tag_key",
]

# The deployment secret keying session tags (a secret: environment only, never a flag).
LOG_TAG_KEY_ENV: Final = "RESCUE_LOG_TAG_KEY"
# 16 characters of a random string (e.g. `openssl rand -base64 32`) is already out of reach of
# guessing; a shorter value is a typo or a placeholder and is refused.
MIN_TAG_KEY_CHARS: Final = 16
# Domain separation: the configured string is hashed into the BLAKE2b key under this label, so the
# same secret reused elsewhere (it should not be) never yields the same bytes.
_TAG_KEY_PERSON: Final = b"rescue-log-tag"

_SECRET_FIELDS: Final = frozenset(
    {
        "token",
        "passphrase",
        "psk",
        "key",
        "secret",
        "authorization",
        "d",
        "signing_key",
        "admin_key",
        "service_key",
        "password",
        "entitlement_proof",
    }
)
_SECRET_SUFFIXES: Final = ("_token", "_key", "_secret", "_passphrase", "_password", "_psk")
# Tokens (CWT, base64url) are 150+ characters, Ed25519 keys and service keys 43: 32 keeps margin while
# staying above UUIDs' hex groups and typical identifiers. The class mix is checked in _scrub_match.
_SECRET_SHAPE: Final = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{32,}(?![A-Za-z0-9_-])")
_REDACTED: Final = "[redacted]"
_RESERVED: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


_tag_lock = threading.Lock()
_tag_key: bytes | None = None  # None: not decided yet (the first session_tag reads the environment)


def _derive_tag_key(secret: str) -> bytes:
    return hashlib.blake2b(secret.encode(), digest_size=32, person=_TAG_KEY_PERSON).digest()


def set_session_tag_key(secret: str | None) -> None:
    """Key session tags with ``secret`` (None: a fresh random key for this process).

    Raises:
        ConfigError: ``secret`` is shorter than :data:`MIN_TAG_KEY_CHARS` characters.
    """
    global _tag_key  # one process-wide key, like logging's own configuration
    if secret is not None and len(secret.strip()) < MIN_TAG_KEY_CHARS:
        raise ConfigError(f"{LOG_TAG_KEY_ENV} must be at least {MIN_TAG_KEY_CHARS} characters")
    with _tag_lock:
        _tag_key = secrets.token_bytes(32) if secret is None else _derive_tag_key(secret.strip())


def configure_session_tags(environ: Mapping[str, str] | None = None, *, component: str = "") -> bool:
    """Key session tags from ``$RESCUE_LOG_TAG_KEY``; warn (as an event) when it is unset.

    Servers (relay, token service) call this at startup, after :func:`configure_logging`.

    Returns:
        True when the deployment key is set, False when this process uses a random key (its tags
        then do not correlate with other processes').

    Raises:
        ConfigError: the variable is set but too short (a configuration error, not a warning).
    """
    value = (os.environ if environ is None else environ).get(LOG_TAG_KEY_ENV, "").strip()
    set_session_tag_key(value or None)
    if not value:
        log_event(
            get_logger("rescue.log"),
            "log.session_tag_key_missing",
            level=logging.WARNING,
            component=component or None,
            detail=f"{LOG_TAG_KEY_ENV} is not set: session tags use a random key of this process "
            "and will not match the tags of other relays or the token service",
        )
    return bool(value)


def _current_tag_key() -> bytes:
    global _tag_key
    key = _tag_key
    if key is None:  # first use in a process nobody configured (a client, a test): read the env
        with _tag_lock:
            if _tag_key is None:
                value = os.environ.get(LOG_TAG_KEY_ENV, "").strip()
                usable = len(value) >= MIN_TAG_KEY_CHARS
                _tag_key = _derive_tag_key(value) if usable else secrets.token_bytes(32)
            key = _tag_key
    return key


def session_tag(session_id: str) -> str:
    """A short keyed hash of a session id: safe to log, and the same in every process of a
    deployment that shares ``$RESCUE_LOG_TAG_KEY`` (see the module docstring)."""
    return hashlib.blake2b(session_id.encode(), digest_size=6, key=_current_tag_key()).hexdigest()


def _is_secret_name(name: object) -> bool:
    lowered = str(name).lower()
    return lowered in _SECRET_FIELDS or lowered.endswith(_SECRET_SUFFIXES)


def _redact_value(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return [_redact_value(item) for item in value]
    return value


def redact(fields: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``fields`` with secrets replaced and bytes reduced to their length, at any depth."""
    return {
        name: _REDACTED if _is_secret_name(name) else _redact_value(value) for name, value in fields.items()
    }


def _scrub_match(match: re.Match[str]) -> str:
    run = match.group()
    mixed = any(c.isupper() for c in run) and any(c.islower() for c in run) and any(c.isdigit() for c in run)
    return _REDACTED if mixed else run


def scrub(text: str) -> str:
    """``text`` with every token- or key-shaped run (see the module docstring) replaced."""
    return _SECRET_SHAPE.sub(_scrub_match, text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``event`` and the event's fields.

    ``ts`` is the line's one timestamp: the record's creation time, wall-clock seconds since the
    epoch with millisecond precision. An event field cannot replace ``ts``, ``level``, ``logger`` or
    ``event``.
    """

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in record.__dict__.items() if k not in _RESERVED}
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": fields.pop("event", None) or record.getMessage(),
        }
        for name, value in redact(fields).items():
            doc.setdefault(name, value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return scrub(json.dumps(doc, default=str, separators=(",", ":")))


def configure_logging(level: str | int = "INFO", stream: IO[str] | None = None) -> None:
    """Send every ``rescue`` logger's records to ``stream`` (stderr) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("rescue")
    root.handlers[:] = [handler]
    root.setLevel(level if isinstance(level, int) else level.upper())
    root.propagate = False


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("rescue") else f"rescue.{name}")


def log_event(logger: logging.Logger, event: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event; ``fields`` are redacted by the formatter."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"event": event, **fields})
