"""The token service (SPEC §4): token minting, guardrails, kill switch, node assignment, keys.

Public API::

    retired = load_retired_keys(["old.jwk"], default_retired_at=time.time())
    keys = PublishedKeys(load_signing_key("key.jwk"), retired)
    service = TokenService(TokenServiceConfig(keys=keys, service_keys=frozenset({...})), guardrails)
    port = await nursery.start(serve_token_service, service, "0.0.0.0", 8080)
    admin = await nursery.start(serve_token_service_admin, service, "0.0.0.0", DEFAULT_ADMIN_PORT)
"""

from rescue.tokenservice._app import ADMIN_MAX_CONNECTIONS as ADMIN_MAX_CONNECTIONS
from rescue.tokenservice._app import ADMIN_PATHS as ADMIN_PATHS
from rescue.tokenservice._app import DEFAULT_ADMIN_PORT as DEFAULT_ADMIN_PORT
from rescue.tokenservice._app import TokenService as TokenService
from rescue.tokenservice._app import TokenServiceConfig as TokenServiceConfig
from rescue.tokenservice._app import serve_token_service as serve_token_service
from rescue.tokenservice._app import serve_token_service_admin as serve_token_service_admin
from rescue.tokenservice._keys import PublishedKeys as PublishedKeys
from rescue.tokenservice._keys import RetiredKey as RetiredKey
from rescue.tokenservice._keys import load_retired_keys as load_retired_keys
from rescue.tokenservice._oidc import EntitlementError as EntitlementError
from rescue.tokenservice._oidc import JwksSource as JwksSource
from rescue.tokenservice._oidc import OidcUnavailable as OidcUnavailable
from rescue.tokenservice._oidc import OidcVerifier as OidcVerifier
from rescue.tokenservice._openapi import openapi_document as openapi_document
from rescue.tokenservice._web import join_url as join_url

__all__ = [
    "ADMIN_MAX_CONNECTIONS",
    "ADMIN_PATHS",
    "DEFAULT_ADMIN_PORT",
    "EntitlementError",
    "JwksSource",
    "OidcUnavailable",
    "OidcVerifier",
    "PublishedKeys",
    "RetiredKey",
    "TokenService",
    "TokenServiceConfig",
    "join_url",
    "load_retired_keys",
    "openapi_document",
    "serve_token_service",
    "serve_token_service_admin",
]
from rescue.tokenservice._cors import parse_origins as parse_origins
