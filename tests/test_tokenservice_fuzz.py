"""Property: whatever a client sends to any endpoint, the answer is documented and never a 500.

A lightweight stand-in for running schemathesis against /openapi.json: hypothesis builds request
bodies (well-typed, mistyped and junk) for every operation; each answer must match the OpenAPI
document (status listed for the operation, body valid against its schema) and must not be a 500.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from rescue._http import Request
from rescue.guardrails import GuardrailConfig, Guardrails, MemoryStore, NodeInfo
from rescue.protocol import SigningKey
from rescue.tokenservice import PublishedKeys, TokenService, TokenServiceConfig, openapi_document

from .test_tokenservice_api import ADMIN_KEY, SERVICE_KEY, check_against_openapi

T0 = 1_700_000_000.0

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)
fields = st.sampled_from(
    ["session_id", "role", "cohort_id", "client_version", "entitlement_proof", "telemetry_opt_in",
     "cohort", "count", "reason", "drain", "fallback_ws_enabled"]
)  # fmt: skip
plausible = st.sampled_from(["s-1", "host", "guest", "beta", "v1", True, False, 1, 200, "", "a:b", None])
bodies = st.one_of(
    st.dictionaries(fields, plausible | json_values, max_size=8),
    json_values,
    st.binary(max_size=64).map(lambda b: b),
)
operations = [
    (method.upper(), path)
    for path, ops in openapi_document()["paths"].items()
    for method in ops
    if method != "parameters"
]
path_values = st.sampled_from(["beta", "gamma", "bad id", "x" * 70, "caf\u00e9"])
auth = st.sampled_from([None, f"Bearer {SERVICE_KEY}", f"Bearer {ADMIN_KEY}", "Bearer nope", "garbage"])
# Mostly JSON, so bodies reach the handlers; the others must get the documented 415.
content_types = st.sampled_from(
    ["application/json", "application/json; charset=utf-8", "application/json", None, "text/plain"]
)


def make_service(paused_env: bool, dev: bool) -> tuple[TokenService, MemoryStore]:
    store = MemoryStore()
    config = TokenServiceConfig(
        keys=PublishedKeys(SigningKey.generate()),
        service_keys=frozenset({SERVICE_KEY}),
        admin_key=ADMIN_KEY,
        relay_url="wss://r/v1/connect",
    )
    guardrails = Guardrails(
        store, GuardrailConfig(env_paused=paused_env, dev_enable_all_cohorts=dev), wall_clock=lambda: T0
    )
    return TokenService(config, guardrails, wall_clock=lambda: T0), store


@settings(max_examples=150)
@given(
    op=st.sampled_from(operations),
    body=bodies,
    param=path_values,
    query=st.sampled_from([{}, {"cohort": "beta"}, {"cohort": "bad:x"}]),
    authorization=auth,
    content_type=content_types,
    paused_env=st.booleans(),
    dev=st.booleans(),
    store_up=st.booleans(),
    with_node=st.booleans(),
)
async def test_any_request_gets_a_documented_answer(
    op: tuple[str, str],
    body: Any,
    param: str,
    query: dict[str, str],
    authorization: str | None,
    content_type: str | None,
    paused_env: bool,
    dev: bool,
    store_up: bool,
    with_node: bool,
) -> None:
    service, store = make_service(paused_env, dev)
    await store.set_cohort_enabled("beta", True)
    if with_node:
        await store.register_node(NodeInfo("n1", "wss://n1/v1/connect"), ttl=60)
    store.available = store_up
    method, template = op
    path = template.replace("{cohort_id}", param)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"authorization": authorization} if authorization else {}
    if content_type is not None:
        headers["content-type"] = content_type
    response = await service.router.handle(Request(method, path, {}, query, headers, raw))
    assert response.status != 500, response.body
    url = httpx.URL(f"http://127.0.0.1{path}", params=query)
    check_against_openapi(
        httpx.Response(
            response.status,
            content=response.body,
            headers={"content-type": response.content_type},
            request=httpx.Request(method, url),
        )
    )
