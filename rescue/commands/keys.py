"""``rescue keygen``, ``rescue mint`` and ``rescue verify`` (SPEC §11): operator key and token tools.

- ``keygen --out KEY_FILE [--force]`` writes a new private Ed25519 JWK (mode 0600 from the moment
  the file exists) and prints its public JWK set on stdout.
- ``mint --key KEY_FILE --session ID --role host|guest [--ttl S] [--aud NODE] [--cohort C] [--fb N]``
  prints one token as base64url.
- ``verify --keys JWKS_FILE [--aud NODE] TOKEN`` prints the claims as JSON, or exits 1 with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from rescue._keyfiles import load_keyring, load_signing_key
from rescue.cli import add_option
from rescue.errors import ConfigError, TokenError
from rescue.protocol import (
    MAX_TTL,
    ROLES,
    KeyRing,
    SigningKey,
    b64url_decode,
    b64url_encode,
    mint_token,
    verify_token,
)

__all__ = ["register", "write_private_key"]

_PRIVATE_MODE = 0o600


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``keygen``, ``mint`` and ``verify`` sub-commands."""
    keygen = subparsers.add_parser(
        "keygen",
        help="write a new Ed25519 signing key and print its public JWK set",
        description="Write a new Ed25519 private key (JWK JSON with 'd', mode 0600) to KEY_FILE and "
        "print its public JWK set on stdout.",
    )
    add_option(keygen, "--out", required=True, metavar="KEY_FILE", help="where to write the private key")
    add_option(keygen, "--force", action="store_true", help="replace KEY_FILE if it exists")
    keygen.set_defaults(func=_keygen)

    mint = subparsers.add_parser(
        "mint",
        help="mint one fallback token (base64url)",
        description="Sign one fallback token with KEY_FILE and print it as base64url.",
    )
    add_option(mint, "--key", required=True, metavar="KEY_FILE", help="private key (from rescue keygen)")
    add_option(mint, "--session", required=True, metavar="ID", help="session id")
    add_option(mint, "--role", required=True, choices=ROLES, help="peer role")
    add_option(
        mint, "--ttl", type=int, default=MAX_TTL, metavar="S", help=f"lifetime in seconds, ≤ {MAX_TTL}"
    )
    add_option(mint, "--aud", default="*", metavar="NODE", help="relay node id, or * for any node")
    add_option(mint, "--cohort", default="default", metavar="C", help="guardrail cohort")
    add_option(mint, "--fb", type=int, default=0, metavar="N", help="feature bits (bit 0: analytics allowed)")
    add_option(mint, "--issuer", default="beach-rescue", metavar="ISS", help="iss claim")
    mint.set_defaults(func=_mint)

    verify = subparsers.add_parser(
        "verify",
        help="verify a token and print its claims as JSON",
        description="Verify TOKEN (base64url; - reads it from stdin) against JWKS_FILE and print its "
        "claims as JSON. Exits 1 with the reason when it does not verify.",
    )
    add_option(
        verify, "--keys", required=True, metavar="JWKS_FILE", help="JWK set (or a key file) to verify with"
    )
    add_option(verify, "--aud", default=None, metavar="NODE", help="also require the token to be for NODE")
    verify.add_argument("token", metavar="TOKEN", help="the token, base64url; - to read stdin")
    verify.set_defaults(func=_verify)


def write_private_key(path: str | os.PathLike[str], key: SigningKey, *, force: bool = False) -> None:
    """Write ``key`` as a private JWK, mode 0600, atomically.

    The data goes to a temporary file created with mode 0600 (``O_EXCL``) in the target's directory,
    is fsynced, then linked (no ``force``: fails if the target exists) or renamed (``force``) into
    place. At no point is any file holding the key readable by others, and a crash never leaves a
    half-written key at ``path``.

    Raises:
        ConfigError: ``path`` exists and ``force`` is false, or it cannot be written.
    """
    target = Path(path)
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; pass --force to replace it")
    data = (json.dumps(key.to_jwk(private=True), indent=2) + "\n").encode("ascii")
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), _PRIVATE_MODE)
    except OSError as exc:
        raise ConfigError(f"cannot write {target}: {exc.strerror or exc}") from None
    try:
        try:
            os.fchmod(fd, _PRIVATE_MODE)  # exactly 0600 whatever the umask
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # atomic, and refuses to clobber
            except FileExistsError:
                raise ConfigError(f"{target} exists; pass --force to replace it") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the key file itself is synced
    finally:
        os.close(fd)


def _keygen(args: argparse.Namespace) -> int:
    key = SigningKey.generate()
    write_private_key(args.out, key, force=args.force)
    print(json.dumps(KeyRing([key]).to_jwks(), indent=2))
    print(f"rescue keygen: wrote private key {args.out} (kid {key.kid_text}, mode 0600)", file=sys.stderr)
    return 0


def _mint(args: argparse.Namespace) -> int:
    if not 0 < args.ttl <= MAX_TTL:
        raise ConfigError(f"--ttl must be between 1 and {MAX_TTL} seconds, not {args.ttl}")
    key = load_signing_key(args.key)
    token = mint_token(
        key,
        session_id=args.session,
        role=args.role,
        audience=args.aud,
        cohort=args.cohort,
        ttl=args.ttl,
        fb=args.fb,
        issuer=args.issuer,
        now=time.time(),  # wall clock: token claims are wall-clock NumericDates
    )
    print(b64url_encode(token))
    return 0


def _verify(args: argparse.Namespace) -> int:
    keys = load_keyring(args.keys)
    text: str = sys.stdin.read() if args.token == "-" else args.token
    try:
        try:
            raw = b64url_decode(text.strip())
        except ValueError:
            raise TokenError("malformed", "token is not base64url without padding") from None
        claims = verify_token(raw, keys, now=time.time(), audience=args.aud)
    except TokenError as exc:
        print(f"rescue verify: {exc.reason}: {exc}", file=sys.stderr)
        return 1
    out: dict[str, Any] = claims.to_json()
    print(json.dumps(out, indent=2))
    return 0
