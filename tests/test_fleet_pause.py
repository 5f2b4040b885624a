"""The kill switch end to end: token service + relay as `rescue dev` runs them, real HTTP and sockets.

An operator's pause must stop minting at once and make the relay refuse new handshakes with
GUARDRAIL_TRIPPED within 2 s (SPEC §5) — here, a token fetched before the pause is refused once the
relay's status poll (every ``status_poll_s`` ≤ 1 s) has seen it — while the session already paired
keeps working; resume lets new sessions in again.
"""

from __future__ import annotations

import functools

import httpx
import trio

from rescue.commands.dev import run_dev
from rescue.errors import ConnectionClosedError
from rescue.protocol import CloseCode, Kind, b64url_decode, encode_frame
from rescue.relay import RelayConfig
from rescue.testing import TestPeer

ADMIN_KEY = "test-admin-key"
TOKEN_BODY = {"cohort_id": "dev", "client_version": "test", "telemetry_opt_in": False}


async def _token(http: httpx.AsyncClient, api: str, session: str, role: str) -> bytes:
    answer = await http.post(
        f"{api}/v1/fallback/token", json={"session_id": session, "role": role, **TOKEN_BODY}
    )
    assert answer.status_code == 200, answer.text
    return b64url_decode(answer.json()["token"])


async def test_pause_refuses_new_handshakes_quickly_and_spares_live_sessions() -> None:
    # The guarantee rests on the relay polling at least once a second (SPEC §6: cached ≤ 1 s).
    assert RelayConfig(keys="x").status_poll_s <= 1.0
    async with trio.open_nursery() as nursery:
        dev = await nursery.start(
            functools.partial(
                run_dev, api_port=0, relay_port=0, admin_port=None, admin_key=ADMIN_KEY, handle_signals=False
            )
        )
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        with trio.fail_after(30):
            async with httpx.AsyncClient() as http:
                live_host = await TestPeer.connect(
                    dev.relay_url, token=await _token(http, dev.api_url, "live", "host"), session="live"
                )
                live_guest = await TestPeer.connect(
                    dev.relay_url,
                    token=await _token(http, dev.api_url, "live", "guest"),
                    session="live",
                    role="guest",
                )
                # fetched before the pause; one per attempt below (a relay admits each token once)
                early = [await _token(http, dev.api_url, "late", "host") for _ in range(30)]

                paused = await http.post(
                    f"{dev.api_url}/v1/admin/pause", headers=admin, json={"reason": "test"}
                )
                assert paused.status_code == 200
                refused = await http.post(
                    f"{dev.api_url}/v1/fallback/token", json={"session_id": "x", "role": "host", **TOKEN_BODY}
                )
                assert refused.status_code == 403
                assert refused.json()["error"] == "fallback_paused"

                started = trio.current_time()
                with trio.fail_after(5):
                    while True:
                        peer = await TestPeer.connect(
                            dev.relay_url, token=early.pop(), session="late", expect_welcome=False
                        )
                        first = await peer.receive()
                        if first[1] == Kind.WELCOME:  # the relay has not seen the pause yet
                            peer.abort()
                            await trio.sleep(0.1)
                            continue
                        closed = await peer.wait_closed(first_message=first)
                        peer.abort()
                        break
                assert closed.wire_code == CloseCode.GUARDRAIL_TRIPPED
                assert closed.close is not None
                assert closed.close.code == CloseCode.GUARDRAIL_TRIPPED
                assert trio.current_time() - started < 2.0

                frame = encode_frame(Kind.DATA, b"still flowing", seq=1)
                await live_host.send(frame)
                assert await live_guest.receive() == frame

                resumed = await http.post(f"{dev.api_url}/v1/admin/resume", headers=admin)
                assert resumed.status_code == 200
                with trio.fail_after(5):
                    while True:
                        try:
                            back = await TestPeer.connect(
                                dev.relay_url,
                                token=await _token(http, dev.api_url, "again", "host"),
                                session="again",
                            )
                            break
                        except ConnectionClosedError:
                            await trio.sleep(0.1)
                for peer in (live_host, live_guest, back):
                    peer.abort()
        nursery.cancel_scope.cancel()
