"""JSON-lines logging with an ``event`` field, and redaction at the source.

Use :func:`log_event` for everything an operator may grep for::

    log_event(logger, "transport.fallback.activated", session=session_tag(sid), cohort="dev")

Secrets never reach the output: values of fields whose name says secret (``token``, ``passphrase``,
``psk``, ``key``, ``secret``, ``authorization``, ``d``, ``signing_key``) are replaced with
``"[redacted]"``, ``bytes`` values are logged as their length only, and session ids should go through
:func:`session_tag` (a short, stable, one-way hash).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from typing import IO, Any, Final

__all__ = ["JsonFormatter", "configure_logging", "get_logger", "log_event", "redact", "session_tag"]

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
_RESERVED: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


def session_tag(session_id: str) -> str:
    """A short one-way hash of a session id, safe to log and stable across processes."""
    return hashlib.blake2b(session_id.encode(), digest_size=6).hexdigest()


def redact(fields: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``fields`` with secrets replaced and bytes reduced to their length."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if name.lower() in _SECRET_FIELDS:
            out[name] = "[redacted]"
        elif isinstance(value, (bytes, bytearray, memoryview)):
            out[name] = f"<{len(value)} bytes>"
        elif isinstance(value, dict):
            out[name] = redact(value)
        else:
            out[name] = value
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``event`` and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in record.__dict__.items() if k not in _RESERVED}
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": fields.pop("event", None) or record.getMessage(),
        }
        doc.update(redact(fields))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


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
        fields.setdefault("wall", time.time())
        logger.log(level, event, extra={"event": event, **fields})
