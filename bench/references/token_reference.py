"""Reference token service for the storm benchmark: Starlette + uvicorn + redis.asyncio (~40 lines).

The same Redis work per mint as ``rescue token-service`` (kill switch, cohort flag, the two hourly
counters, the live-node script, the assignment script, the token counter) and the same Ed25519
CWT (``rescue.protocol.mint_token``), with none of rescue's validation, guardrail policy or
error handling. Run: ``python bench/references/token_reference.py --port P --redis-url URL --key K``.
"""

import argparse
import hashlib
import json
import time
from datetime import UTC, datetime

import redis.asyncio as aioredis
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rescue._keyfiles import load_signing_key
from rescue.guardrails._redis import _ASSIGN_LUA, _LIVE_NODES_LUA
from rescue.protocol._tokens import b64url_encode, mint_token


def build(redis_url: str, key_path: str) -> Starlette:
    r = aioredis.Redis.from_url(redis_url, decode_responses=True, max_connections=1024)
    key = load_signing_key(key_path)
    live_nodes, assign = r.register_script(_LIVE_NODES_LUA.source), r.register_script(_ASSIGN_LUA.source)

    async def token(request: Request) -> JSONResponse:
        body = await request.json()
        sid, cohort, now = body["session_id"], body["cohort_id"], time.time()
        if (await r.hgetall("fallback:fleet")).get("paused") == "1":
            return JSONResponse({"error": "fallback_paused"}, 403)
        if await r.hget("fallback:cohorts", cohort) != "1":
            return JSONResponse({"error": "cohort_disabled"}, 403)
        hours = [datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d-%H") for t in (now, now - 3600)]
        async with r.pipeline(transaction=False) as pipe:
            await (
                pipe.hgetall(f"fallback:cohort:{cohort}:{hours[0]}")
                .hgetall(f"fallback:cohort:{cohort}:{hours[1]}")
                .execute()
            )
        listed = await live_nodes(keys=["fallback:{nodes}"], args=["fallback:{nodes}:"])
        nodes = [json.loads(n) for n in listed]
        node = max(
            (n for n in nodes if not n["draining"]),
            key=lambda n: hashlib.blake2b(f"{n['id']}\0{sid}".encode(), digest_size=8).digest(),
        )
        digest = hashlib.blake2b(sid.encode(), digest_size=16, person=b"rescue-assign").hexdigest()
        await assign(keys=[f"fallback:assign:{digest}"], args=[node["id"], 300_000])
        async with r.pipeline(transaction=True) as pipe:
            await (
                pipe.hincrby(f"fallback:cohort:{cohort}:{hours[0]}", "tokens", 1)
                .expire(f"fallback:cohort:{cohort}:{hours[0]}", 5400, nx=True)
                .execute()
            )
        cwt = mint_token(key, session_id=sid, role=body["role"], audience=node["id"], cohort=cohort, now=now)
        return JSONResponse(
            {
                "token": b64url_encode(cwt),
                "expires_at": int(now) + 300,
                "cohort": cohort,
                "guardrail_hint": "ok",
                "relay_url": node["url"],
            }
        )

    return Starlette(routes=[Route("/v1/fallback/token", token, methods=["POST"])])


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--key", required=True)
    a = p.parse_args()
    uvicorn.run(
        build(a.redis_url, a.key), host="127.0.0.1", port=a.port, log_level="warning", access_log=False
    )
