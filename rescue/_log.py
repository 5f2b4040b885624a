"""JSON-lines logging with an ``event`` field, and redaction at the source.

Use :func:`log_event` for everything an operator may grep for::

    log_event(logger, "transport.fallback.activated", session=session_tag(sid), cohort="dev")

Secrets never reach the output: values of fields whose name says secret (``token``, ``passphrase``,
``psk``, ``key``, ``secret``, ``authorization``, ``d``, ``signing_key``) are replaced with
``"[redacted]"`` (so are names ending in ``_token``, ``_key``, ``_secret``, ``_passphrase``,
``_password``, ``_psk``, at any depth of nested dicts, lists and tuples), ``bytes`` values are logged as
their length only, and session ids should go through :func:`session_tag` (a short, stable, one-way hash).
As a last line of defence the formatted line is scrubbed of anything shaped like a token or a key (a
run of 32+ base64url characters mixing upper case, lower case and digits), which catches secrets that
reach a message or an exception text; UUIDs, hex digests and snake_case names do not match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from typing import IO, Any, Final

__all__ = ["JsonFormatter", "configure_logging", "get_logger", "log_event", "redact", "scrub", "session_tag"]

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


def session_tag(session_id: str) -> str:
    """A short one-way hash of a session id, safe to log and stable across processes."""
    return hashlib.blake2b(session_id.encode(), digest_size=6).hexdigest()


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
