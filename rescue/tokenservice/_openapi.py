"""The OpenAPI 3.1 document served at ``/openapi.json``.

Written by hand to say exactly what the server does; tests/test_tokenservice_api.py checks the
real answers of every endpoint against these schemas, and tests/test_tokenservice_schemathesis.py
fuzzes every operation from this document against a running service on Redis, so the two cannot
drift apart silently.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from rescue import __version__
from rescue.guardrails import PAUSE_CAUSES

__all__ = ["openapi_document"]

_COHORT = {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"}
_ERROR = {"$ref": "#/components/schemas/Error"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _error(description: str, *codes: str) -> dict[str, Any]:
    schema = {"allOf": [_ERROR, {"properties": {"error": {"enum": list(codes)}}}]} if codes else _ERROR
    return {"description": description, **_json(schema)}


_BAD = _error("Malformed request (`invalid_request`)", "invalid_request")
_MEDIA = _error("The body is not declared `application/json`", "unsupported_media_type")
_TOO_LARGE = _error("Request body over 64 KiB", "payload_too_large")
_STORE = _error("The guardrail store is unavailable (fail closed)", "guardrail_store_unavailable")
_ADMIN_401 = _error("No or garbled `Authorization: Bearer` header", "unauthenticated")
_ADMIN_403 = _error("Not the admin key", "forbidden")


def _admin(op: dict[str, Any]) -> dict[str, Any]:
    op["security"] = [{"adminKey": []}]
    op["tags"] = ["admin"]
    op["responses"].update({"401": _ADMIN_401, "403": _ADMIN_403, "503": _STORE})
    return op


_ACTIVATION = {"type": "object", "required": ["cohort"], "properties": {"cohort": _COHORT}}
_COHORT_QUERY = {"name": "cohort", "in": "query", "required": True, "schema": _COHORT}
_TEXT = {"text/plain": {"schema": {"type": "string"}}}
_REASON_BODY = {
    "required": False,
    **_json(
        {
            "type": "object",
            "properties": {
                "reason": {"type": ["string", "null"], "maxLength": 256, "description": "null: none"}
            },
        }
    ),
}
_PAUSE_BODY = {
    "required": False,
    **_json(
        {
            "type": "object",
            "properties": {
                "reason": {"type": ["string", "null"], "maxLength": 256, "description": "null: none"},
                "drain": {"type": "boolean", "default": False},
            },
        }
    ),
}


@cache
def openapi_document() -> dict[str, Any]:
    """The document (built once; treat it as read-only)."""
    fleet = _ref("FleetState")
    cohort_view = _ref("CohortView")
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "beach-rescue token service",
            "version": __version__,
            "description": "Fallback tokens, guardrails, kill switch and node assignment for Beach's "
            'WebSocket fallback relay. Every error is JSON `{"error": code, "detail": text}`; '
            "unknown paths answer 404 `not_found`, wrong methods 405 `method_not_allowed`. "
            "A request body must be sent as `Content-Type: application/json` (a `charset=utf-8` "
            "parameter is allowed); any other body answers 415 `unsupported_media_type`.",
        },
        "components": {
            "securitySchemes": {
                "serviceKey": {"type": "http", "scheme": "bearer", "description": "A service key."},
                "adminKey": {"type": "http", "scheme": "bearer", "description": "The admin key."},
                "relayKey": {"type": "http", "scheme": "bearer", "description": "A relay report key."},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "detail"],
                    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
                },
                "TokenRequest": {
                    "type": "object",
                    "required": ["session_id", "role", "cohort_id", "client_version", "telemetry_opt_in"],
                    "properties": {
                        "session_id": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
                        "role": {"enum": ["host", "guest"]},
                        "cohort_id": _COHORT,
                        "client_version": {"type": "string", "minLength": 1, "maxLength": 64},
                        "entitlement_proof": {
                            "type": ["string", "null"],
                            "maxLength": 8192,
                            "description": "OIDC ID token (JWT, RS256 or EdDSA). Used when no "
                            "Authorization header is sent.",
                        },
                        "telemetry_opt_in": {
                            "type": "boolean",
                            "description": "false: feature bit 0 off and nothing per-session logged.",
                        },
                    },
                },
                "TokenResponse": {
                    "type": "object",
                    "required": ["token", "expires_at", "cohort", "guardrail_hint", "relay_url"],
                    "additionalProperties": False,
                    "properties": {
                        "token": {
                            "type": "string",
                            "pattern": "^[A-Za-z0-9_-]+$",
                            "description": "CWT, base64url",
                        },
                        "expires_at": {"type": "integer", "description": "the token's exp, epoch seconds"},
                        "cohort": _COHORT,
                        "guardrail_hint": {"enum": ["ok", "soft_breach"]},
                        "relay_url": {"type": "string", "description": "wss://…/v1/connect of the node"},
                    },
                },
                "Jwks": {
                    "type": "object",
                    "required": ["keys"],
                    "properties": {
                        "keys": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["kty", "crv", "x", "kid"],
                                "additionalProperties": False,
                                "properties": {
                                    "kty": {"const": "OKP"},
                                    "crv": {"const": "Ed25519"},
                                    "x": {"type": "string"},
                                    "kid": {"type": "string"},
                                },
                            },
                        }
                    },
                },
                "FleetState": {
                    "type": "object",
                    "required": ["paused", "reason", "since", "drain"],
                    "additionalProperties": False,
                    "properties": {
                        "paused": {"type": "boolean"},
                        "reason": {"type": ["string", "null"]},
                        "since": {"type": ["number", "null"], "description": "epoch seconds"},
                        "drain": {"type": "boolean"},
                        "cause": {
                            "type": ["string", "null"],
                            "enum": [*PAUSE_CAUSES, None],
                            "description": "who paused (null when not paused)",
                        },
                    },
                },
                "CohortReport": {
                    "type": "object",
                    "required": ["cohort"],
                    "properties": {
                        "cohort": _COHORT,
                        "count": {"type": "integer", "minimum": 1, "maximum": 100000, "default": 1},
                    },
                },
                "Recorded": {
                    "type": "object",
                    "required": ["cohort", "recorded"],
                    "additionalProperties": False,
                    "properties": {"cohort": _COHORT, "recorded": {"type": "integer", "minimum": 1}},
                },
                "CohortView": {
                    "type": "object",
                    "required": ["cohort", "fallback_ws_enabled", "effective", "dev_override"],
                    "additionalProperties": False,
                    "properties": {
                        "cohort": _COHORT,
                        "fallback_ws_enabled": {"type": "boolean", "description": "the stored flag"},
                        "effective": {"type": "boolean", "description": "stored flag or dev override"},
                        "dev_override": {"type": "boolean"},
                    },
                },
                "GuardrailWindow": {
                    "type": "object",
                    "required": [
                        "cohort",
                        "sessions",
                        "tokens",
                        "activations",
                        "ratio",
                        "state",
                        "previous_hour_weight",
                    ],
                    "additionalProperties": False,
                    "properties": {
                        "cohort": _COHORT,
                        "sessions": {"type": "number"},
                        "tokens": {"type": "number"},
                        "activations": {"type": "number"},
                        "ratio": {"type": ["number", "null"]},
                        "state": {"enum": ["ok", "insufficient_sample", "soft_breach", "hard_breach"]},
                        "previous_hour_weight": {"type": "number", "minimum": 0, "maximum": 1},
                        "telemetry": {
                            "type": "object",
                            "description": "fleet-wide tokens minted since the last activation / "
                            "sessions-started report (docs/decisions/0012-missing-telemetry.md)",
                            "properties": {
                                "tokens_since_activation": {"type": "integer", "minimum": 0},
                                "since_activation": {"type": ["number", "null"]},
                                "tokens_since_sessions": {"type": "integer", "minimum": 0},
                                "since_sessions": {"type": ["number", "null"]},
                            },
                        },
                    },
                },
                "Nodes": {
                    "type": "object",
                    "required": ["nodes"],
                    "properties": {
                        "nodes": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["id", "url", "draining", "full"],
                                "additionalProperties": False,
                                "properties": {
                                    "id": {"type": "string"},
                                    "url": {"type": "string"},
                                    "draining": {"type": "boolean"},
                                    "full": {
                                        "type": "boolean",
                                        "description": "at max_sessions or its connection cap: "
                                        "no new sessions, its own sessions' peers still sent there",
                                    },
                                },
                            },
                        }
                    },
                },
            },
        },
        "paths": {
            "/v1/fallback/token": {
                "post": {
                    "summary": "Mint a fallback token",
                    "description": "Authenticate with a service key (Authorization: Bearer) or a valid "
                    "entitlement_proof; neither is needed with BEACH_RESCUE_DISABLE_OIDC=1 outside "
                    "production.",
                    "security": [{"serviceKey": []}, {}],
                    "requestBody": {"required": True, **_json(_ref("TokenRequest"))},
                    "responses": {
                        "200": {
                            "description": "Issued",
                            **_json(_ref("TokenResponse")),
                        },
                        "400": _BAD,
                        "401": _error("No valid service key or entitlement proof", "unauthenticated"),
                        "403": _error(
                            "Refused by the guardrails or the entitlement",
                            "fallback_paused",
                            "cohort_disabled",
                            "not_entitled",
                        ),
                        "413": _TOO_LARGE,
                        "503": _error(
                            "Fail closed",
                            "no_relay_available",
                            "guardrail_store_unavailable",
                            "entitlement_unavailable",
                        ),
                    },
                }
            },
            "/v1/fallback/keys": {
                "get": {
                    "summary": "Token verification keys (current and retired, JWK set)",
                    "responses": {"200": {"description": "JWK set", **_json(_ref("Jwks"))}},
                }
            },
            "/v1/fallback/status": {
                "get": {
                    "summary": "The kill switch, for relays",
                    "responses": {"200": {"description": "Fleet state", **_json(fleet)}, "503": _STORE},
                }
            },
            "/v1/fallback/activations": {
                "post": {
                    "summary": "A relay reports a paired session (cohort only)",
                    "description": "Requires a relay report key when the service is configured with some.",
                    "security": [{"relayKey": []}, {}],
                    "requestBody": {
                        "required": True,
                        **_json(
                            {"type": "object", "required": ["cohort"], "properties": {"cohort": _COHORT}}
                        ),
                    },
                    "responses": {
                        "200": {"description": "Counted", **_json(_ref("Recorded"))},
                        "400": _BAD,
                        "401": _error("Report keys are configured and none was given", "unauthenticated"),
                        "413": _TOO_LARGE,
                        "503": _STORE,
                    },
                }
            },
            "/v1/sessions/started": {
                "post": {
                    "summary": "Beach's control plane reports sessions created (the guardrail denominator)",
                    "security": [{"serviceKey": []}, {}],
                    "requestBody": {"required": True, **_json(_ref("CohortReport"))},
                    "responses": {
                        "200": {"description": "Counted", **_json(_ref("Recorded"))},
                        "400": _BAD,
                        "401": _error("No valid service key", "unauthenticated"),
                        "413": _TOO_LARGE,
                        "503": _STORE,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Health and kill-switch state (follows the store; liveness is /livez)",
                    "responses": {
                        code: {
                            "description": text,
                            **_json(
                                {
                                    "type": "object",
                                    "required": ["status", "fallback_paused"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "status": {"enum": [status]},
                                        "fallback_paused": {"type": "boolean"},
                                    },
                                }
                            ),
                        }
                        for code, text, status in (
                            ("200", "Healthy", "ok"),
                            (
                                "503",
                                "The guardrail store is unavailable (reported paused)",
                                "store_unavailable",
                            ),
                        )
                    },
                }
            },
            "/livez": {
                "get": {
                    "summary": "Liveness: the process serves HTTP (never reads the store)",
                    "responses": {
                        "200": {
                            "description": "Alive",
                            **_json(
                                {
                                    "type": "object",
                                    "required": ["status"],
                                    "additionalProperties": False,
                                    "properties": {"status": {"enum": ["ok"]}},
                                }
                            ),
                        }
                    },
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: the guardrail store answers and no SIGTERM began the drain",
                    "responses": {
                        code: {
                            "description": text,
                            **_json(
                                {
                                    "type": "object",
                                    "required": ["ready", "reasons", "fallback_paused"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "ready": {"enum": [ready]},
                                        "reasons": {
                                            "type": "array",
                                            "items": {"enum": ["draining", "store_unavailable"]},
                                            "maxItems": 0 if ready else 2,
                                            "minItems": 0 if ready else 1,
                                            "uniqueItems": True,
                                        },
                                        "fallback_paused": {"type": "boolean"},
                                    },
                                }
                            ),
                        }
                        for code, text, ready in (
                            ("200", "Ready", True),
                            (
                                "503",
                                "Not ready: draining (SIGTERM: every other request is still served "
                                "until the drain ends), and/or the guardrail store is unavailable "
                                "(then reported paused)",
                                False,
                            ),
                        )
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": {"description": "OpenAPI 3.1", **_json({"type": "object"})}},
                }
            },
            "/join": {
                "get": {
                    "summary": "Redirect to the join page",
                    "responses": {
                        "308": {
                            "description": "Location: /join/",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/join/": {
                "get": {
                    "summary": "The browser join page (SPEC §12)",
                    "description": "Open /join/#{session_id} (or #{session_id}:{passphrase}); the "
                    "fragment never reaches this server.",
                    "responses": {
                        "200": {
                            "description": "HTML",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/join/{asset}": {
                "get": {
                    "summary": "A static asset of the join page",
                    "parameters": [
                        {
                            "name": "asset",
                            "in": "path",
                            "required": True,
                            "schema": {"enum": ["index.html", "join.js", "join.css", "xterm.css"]},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "The file",
                            "content": {
                                "text/javascript": {"schema": {"type": "string"}},
                                "text/css": {"schema": {"type": "string"}},
                                "text/html": {"schema": {"type": "string"}},
                            },
                        },
                        "404": _error("No such asset", "not_found"),
                    },
                }
            },
            "/v1/admin/pause": {
                "post": _admin(
                    {
                        "summary": "Pause fallback fleet-wide (kill switch)",
                        "requestBody": _PAUSE_BODY,
                        "responses": {"200": {"description": "New state", **_json(fleet)}, "400": _BAD},
                    }
                )
            },
            "/v1/admin/resume": {
                "post": _admin(
                    {
                        "summary": "Resume fallback fleet-wide",
                        "description": "The answer still says paused if FALLBACK_WS_PAUSED=1 is set on "
                        "this process.",
                        "requestBody": _PAUSE_BODY,
                        "responses": {"200": {"description": "New state", **_json(fleet)}, "400": _BAD},
                    }
                )
            },
            "/v1/admin/store/init": {
                "post": _admin(
                    {
                        "summary": "Mark the guardrail store initialised (`rescue admin init-store`)",
                        "description": "A store that is new or lost its data (Redis restarted empty) "
                        "reads as paused, with a reason saying so, until this is called. It leaves "
                        "the kill switch as stored; the answer is the effective state after.",
                        "requestBody": _REASON_BODY,
                        "responses": {"200": {"description": "New state", **_json(fleet)}, "400": _BAD},
                    }
                )
            },
            "/v1/admin/cohorts/{cohort_id}": {
                "parameters": [{"name": "cohort_id", "in": "path", "required": True, "schema": _COHORT}],
                "get": _admin(
                    {
                        "summary": "A cohort's flag",
                        "responses": {"200": {"description": "Cohort", **_json(cohort_view)}, "400": _BAD},
                    }
                ),
                "put": _admin(
                    {
                        "summary": "Set a cohort's fallback_ws_enabled flag",
                        "requestBody": {
                            "required": True,
                            **_json(
                                {
                                    "type": "object",
                                    "required": ["fallback_ws_enabled"],
                                    "properties": {"fallback_ws_enabled": {"type": "boolean"}},
                                }
                            ),
                        },
                        "responses": {"200": {"description": "Cohort", **_json(cohort_view)}, "400": _BAD},
                    }
                ),
            },
            "/v1/admin/guardrails": {
                "get": _admin(
                    {
                        "summary": "A cohort's rolling-hour window (see docs/guardrails.md)",
                        "parameters": [
                            {"name": "cohort", "in": "query", "required": True, "schema": _COHORT}
                        ],
                        "responses": {
                            "200": {
                                "description": "Window",
                                **_json(_ref("GuardrailWindow")),
                            },
                            "400": _BAD,
                        },
                    }
                )
            },
            "/v1/admin/nodes": {
                "get": _admin(
                    {
                        "summary": "Live relay nodes",
                        "responses": {"200": {"description": "Nodes", **_json(_ref("Nodes"))}},
                    }
                )
            },
        },
    }
    # Every body is JSON, and a body declared as anything else (text/plain, a form: what a
    # browser sends cross-site without a preflight) is refused before it is read.
    for operations in document["paths"].values():
        for operation in operations.values():
            if isinstance(operation, dict) and "requestBody" in operation:
                operation["responses"]["415"] = _MEDIA
    return document
