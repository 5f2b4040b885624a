"""Helpers for testing code built on the SDK, against a real in-process relay (see ``rescue.testing``).

::

    keys = SigningKey.generate()
    async with run_relay(keys) as relay:                     # an in-process relay node, restartable
        tokens = LocalTokens(keys, relay, session_id="s1", role="host")
        async with open_peer(tokens, "s1", "host", psk=TEST_PSK) as host: ...
        abort_connection(host)                               # kill its socket (it reconnects)
        await relay.restart()                                # drain (SERVER_SHUTDOWN) and start again
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

import trio

from rescue.client import Peer, TokenGrant
from rescue.protocol import KeyRing, Role, SigningKey, mint_token
from rescue.relay import Relay, RelayAddresses
from rescue.testing._relay import relay_test_config

__all__ = [
    "TEST_PSK",
    "DevStack",
    "LocalTokens",
    "RelayRunner",
    "abort_connection",
    "run_dev_stack",
    "run_relay",
]

# A fixed pre-shared key for tests: skips the deliberately slow Argon2id derivation.
TEST_PSK: Final = bytes(range(32))


class LocalTokens:
    """A token provider that mints locally with ``key`` (no token service).

    Args:
        key: the signing key the relay trusts.
        relay: the relay URL, or something with a ``url`` attribute (a :class:`RelayRunner`, which
            may move to another port when restarted), or a callable returning the URL.
        session_id: the session.
        role: the role.
        ttl: token lifetime (≤ 300 s).
        audience: the ``aud`` claim (the relay's node id or ``"*"``).

    Attributes:
        grants: how many tokens were handed out.
    """

    def __init__(
        self,
        key: SigningKey,
        relay: str | RelayRunner | Callable[[], str],
        *,
        session_id: str,
        role: Role | str,
        ttl: int = 300,
        audience: str = "*",
    ) -> None:
        self._key = key
        self._relay = relay
        self.session_id = session_id
        self.role = Role(role)
        self.ttl = ttl
        self.audience = audience
        self.grants = 0

    def _url(self) -> str:
        relay = self._relay
        if isinstance(relay, str):
            return relay
        if isinstance(relay, RelayRunner):
            return relay.url
        return relay()

    async def __call__(self) -> TokenGrant:
        """Mint one token (a checkpoint, like a real request)."""
        await trio.lowlevel.checkpoint()
        now = time.time()
        token = mint_token(
            self._key,
            session_id=self.session_id,
            role=self.role.value,
            audience=self.audience,
            cohort="test",
            ttl=self.ttl,
            now=now,
        )
        self.grants += 1
        return TokenGrant(token=token, relay_url=self._url(), expires_at=now + self.ttl, cohort="test")


def abort_connection(peer: Peer) -> bool:
    """Drop the peer's current socket without a close handshake, as a network failure would.

    Returns:
        Whether there was a connection to drop.
    """
    link = peer._link
    if link is None:
        return False
    link.ws.abort()
    return True


class RelayRunner:
    """An in-process relay node that can be stopped and started again on the same port.

    Made by :func:`run_relay`. Attributes: ``url`` (``ws://127.0.0.1:PORT/v1/connect``),
    ``relay`` (the current :class:`rescue.relay.Relay`), ``restarts``.
    """

    def __init__(self, nursery: trio.Nursery, keys: SigningKey, overrides: dict[str, object]) -> None:
        self._nursery = nursery
        self._keys = keys
        self._overrides = overrides
        self._port = 0
        self.url = ""
        self.relay: Relay | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()
        self.restarts = 0

    async def start(self) -> None:
        """Start a node (on the previous port when there was one)."""
        settings: dict[str, object] = {"drain_s": 1.0, "port": self._port}
        settings.update(self._overrides)
        relay = Relay(relay_test_config(**settings), keys=KeyRing([self._keys]))
        stopped = trio.Event()

        async def run(task_status: trio.TaskStatus[RelayAddresses] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with trio.CancelScope() as scope:
                    self._scope = scope
                    await relay.run(task_status=task_status)
            finally:
                stopped.set()

        self._stopped = stopped
        self.relay = relay
        await self._nursery.start(run)
        assert relay.addresses is not None
        self._port = relay.addresses.port
        self.url = relay.addresses.url

    async def stop(self, *, drain: bool = True) -> None:
        """Stop the node: gracefully (CLOSE ``SERVER_SHUTDOWN`` to every peer) or by cancelling."""
        relay = self.relay
        assert relay is not None
        if drain:
            relay.shutdown()
        elif self._scope is not None:
            self._scope.cancel()
        await self._stopped.wait()

    async def restart(self, *, drain: bool = True) -> None:
        """:meth:`stop`, then :meth:`start` on the same port."""
        await self.stop(drain=drain)
        await self.start()
        self.restarts += 1


@asynccontextmanager
async def run_relay(keys: SigningKey, **overrides: object) -> AsyncIterator[RelayRunner]:
    """Run an in-process relay trusting ``keys`` for the duration of the block.

    Args:
        keys: the signing key whose tokens the relay accepts.
        overrides: :class:`rescue.relay.RelayConfig` fields (``heartbeat_s``, ``drain_s``, ...).

    Resource handling:
        The node runs in a nursery of this block and is cancelled when it ends.
    """
    async with trio.open_nursery() as nursery:
        runner = RelayRunner(nursery, keys, dict(overrides))
        await runner.start()
        try:
            yield runner
        finally:
            nursery.cancel_scope.cancel()


class DevStack:
    """A token service and a relay in this process (what ``rescue dev`` runs), for tests.

    Attributes:
        api_url: the token service's base URL (``--api`` of ``rescue share``/``join``).
        relay: the relay runner.
        store: the in-memory guardrail store (pause the fleet or toggle cohorts through it).
    """

    def __init__(self, api_url: str, relay: RelayRunner, store: object) -> None:
        self.api_url = api_url
        self.relay = relay
        self.store = store


@asynccontextmanager
async def run_dev_stack(*, cohort: str = "dev", **relay_overrides: object) -> AsyncIterator[DevStack]:
    """Run the token service (memory store, ``cohort`` enabled, no OIDC) in front of a relay.

    Resource handling:
        Both servers run in a nursery of this block and are cancelled when it ends.
    """
    from rescue.guardrails import GuardrailConfig, Guardrails, MemoryStore
    from rescue.tokenservice import PublishedKeys, TokenService, TokenServiceConfig, serve_token_service

    key = SigningKey.generate()
    store = MemoryStore()
    await store.set_cohort_enabled(cohort, True)
    async with run_relay(key, **relay_overrides) as relay, trio.open_nursery() as nursery:
        config = TokenServiceConfig(keys=PublishedKeys(key), relay_url=relay.url, disable_oidc=True)
        service = TokenService(config, Guardrails(store, GuardrailConfig()))
        port = await nursery.start(serve_token_service, service, "127.0.0.1", 0)
        try:
            yield DevStack(f"http://127.0.0.1:{port}", relay, store)
        finally:
            nursery.cancel_scope.cancel()
