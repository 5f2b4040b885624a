"""Activation reports (SPEC §6): the relay reports each paired session to a real token service, with
the report key when the service requires one; a wrong key is refused and counted, never retried
forever. Cohort only: no session identifier leaves the relay."""

from __future__ import annotations

from collections.abc import Callable

import trio

from rescue.guardrails import GuardrailConfig, Guardrails, MemoryStore
from rescue.relay import Relay
from rescue.testing import TestKeys, TestPeer, relay_test_config
from rescue.tokenservice import PublishedKeys, TokenService, TokenServiceConfig, serve_token_service


async def _wait_for(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await trio.sleep(0.02)


async def _pair_and_count(api: str, keys: TestKeys, report_key: str | None, session: str) -> dict[str, int]:
    relay = Relay(relay_test_config(token_service=api), keys=keys.ring, report_key=report_key)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(relay.run)
        host = await TestPeer.connect(addresses.url, keys, session=session, role="host")
        guest = await TestPeer.connect(addresses.url, keys, session=session, role="guest")
        await _wait_for(lambda: sum(relay.control.activations.values()) >= 1)
        host.abort()
        guest.abort()
        nursery.cancel_scope.cancel()
    return dict(relay.control.activations)


async def test_reports_carry_the_report_key_and_a_wrong_key_is_refused() -> None:
    keys = TestKeys()
    store = MemoryStore()
    service = TokenService(
        TokenServiceConfig(
            keys=PublishedKeys(keys.signing), disable_oidc=True, report_keys=frozenset({"rk"})
        ),
        Guardrails(store, GuardrailConfig()),
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_token_service, service, "127.0.0.1", 0)
        api = f"http://127.0.0.1:{port}"
        with trio.fail_after(20):
            good = await _pair_and_count(api, keys, "rk", "act-1")
            bad = await _pair_and_count(api, keys, "not-the-key", "act-2")
            missing = await _pair_and_count(api, keys, None, "act-3")
        metrics = service.registry.get_sample_value("beach_fallback_activations_total", {"cohort": "test"})
        nursery.cancel_scope.cancel()
    assert good == {"ok": 1, "error": 0, "dropped": 0}
    assert bad == {"ok": 0, "error": 1, "dropped": 0}
    assert missing == {"ok": 0, "error": 1, "dropped": 0}
    assert metrics == 1.0  # only the report with the right key was counted
