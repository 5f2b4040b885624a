"""The browser client (web/src, JavaScript) against the Python reference, byte for byte.

A long-lived node process (web/tools/crosscheck.mjs) answers one JSON request per line; Hypothesis
generates frames, relay messages, CONTROL plaintexts and arbitrary CBOR on the Python side and
checks that the JavaScript implementation accepts exactly what Python accepts, decodes it to the
same thing and encodes it to the same canonical bytes, and that each side opens what the other
sealed. Mutated messages (bytes flipped, truncated, extended) check the rejecting side too.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rescue.errors import ProtocolError
from rescue.protocol import (
    Caps,
    Close,
    Flags,
    FrameCipher,
    Hello,
    Kind,
    PeerEvent,
    PeerInfo,
    Welcome,
    decode_control,
    decode_frame,
    decode_relay_message,
)

NODE_TIMEOUT_S = 30


class Node:
    """The crosscheck bridge: ``ask(op, **fields)`` returns the decoded JSON answer."""

    def __init__(self, web: Path) -> None:
        self.process = subprocess.Popen(
            ["node", str(web / "tools" / "crosscheck.mjs")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=web,
        )

    def ask(self, op: str, **fields: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, "the node bridge exited"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(NODE_TIMEOUT_S)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture(scope="module")
def node(node_web: Path) -> Iterator[Node]:
    bridge = Node(node_web)
    yield bridge
    bridge.close()


# ------------------------------------------------------------------------------------ strategies

nonces = st.binary(min_size=16, max_size=16)
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=32)
caps = st.lists(names, max_size=8, unique=True).map(lambda c: Caps(compression=tuple(c)))
roles = st.sampled_from(["host", "guest"])
sessions = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-", min_size=1, max_size=128
)
u64 = st.integers(0, 2**64 - 1)
peer_infos = st.builds(PeerInfo, role=roles, nonce=nonces, caps=caps)
relay_messages = st.one_of(
    st.builds(
        Hello,
        token=st.binary(min_size=1, max_size=2048),
        session=sessions,
        role=roles,
        nonce=nonces,
        caps=caps,
        client=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=128),
    ),
    st.builds(
        Welcome,
        ack_nonce=nonces,
        server_nonce=nonces,
        features=u64,
        heartbeat_s=st.integers(1, 3600),
        max_frame=st.integers(1024, 16 * 1024 * 1024),
        resume_grace_s=st.integers(0, 86400),
        peer=st.none() | peer_infos,
    ),
    st.builds(
        PeerEvent, event=st.sampled_from(["joined", "left", "rejoined"]), role=roles, nonce=nonces, caps=caps
    ),
    st.one_of(
        st.builds(
            Close, code=st.integers(1000, 4999).filter(lambda c: c != 1012), reason=st.text(max_size=30)
        ),
        st.builds(
            Close,
            code=st.integers(1000, 4999),
            reason=st.text(max_size=30),
            reconnect_in_ms=st.integers(0, 3_600_000),
        ),
    ),
)
# CBOR values of the protocol's subset (no floats: both sides accept them, but "shortest float"
# is not a rule this protocol relies on, so their re-encoding is not compared).
keys = st.one_of(st.integers(-(2**64), 2**64 - 1), st.text(max_size=8), st.binary(max_size=8))
values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**64), 2**64 - 1),
        st.text(max_size=20),
        st.binary(max_size=20),
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)


def mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """``data`` itself, or with one byte changed, cut short or extended."""
    if not data:
        return st.binary(max_size=4)
    i = st.integers(0, len(data) - 1)
    return st.one_of(
        st.just(data),
        st.tuples(i, st.integers(0, 255)).map(lambda p: data[: p[0]] + bytes([p[1]]) + data[p[0] + 1 :]),
        i.map(lambda n: data[:n]),
        st.binary(min_size=1, max_size=3).map(lambda extra: data + extra),
    )


REJECTED = object()  # what python_verdict returns when the Python side raised ProtocolError


def python_verdict(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except ProtocolError:
        return REJECTED


# ------------------------------------------------------------------------------------------ tests


@given(
    st.tuples(
        st.integers(0, 255),
        st.integers(0, 255),
        st.integers(0, 255),
        st.integers(0, 255),
        u64,
        st.binary(max_size=40),
    ).map(lambda t: bytes(t[:4]) + t[4].to_bytes(8, "big") + t[5])
    | st.binary(max_size=30),
)
def test_frame_headers_agree(node: Node, message: bytes) -> None:
    """Any bytes: both accept or both reject a frame, and agree on every header field."""
    frame = python_verdict(decode_frame, message, max_frame=65536)
    answer = node.ask("frame", message=message.hex(), max_frame=65536)
    if frame is REJECTED:
        assert answer == {"ok": False, "error": "ProtocolError", "detail": answer["detail"]}
        return
    assert answer["ok"], answer
    h = frame.header
    assert (answer["kind"], answer["flags"], answer["channel"], int(answer["seq"])) == (
        h.kind,
        h.flags,
        h.channel,
        h.seq,
    )
    assert bytes.fromhex(answer["body"]) == frame.body


@given(relay_messages)
def test_relay_messages_encode_alike(node: Node, msg: Hello | Welcome | PeerEvent | Close) -> None:
    """JS encodes a message to Python's canonical bytes, and re-encodes Python's bytes identically."""
    wire = msg.to_message()
    described = _describe(msg)
    assert node.ask("encode_relay", message=described) == {"ok": True, "message": wire.hex()}
    assert node.ask("relay", message=wire.hex()) == {"ok": True, "reencoded": wire.hex()}


@given(relay_messages.flatmap(lambda m: mutations(m.to_message())))
def test_mutated_relay_messages_agree(node: Node, message: bytes) -> None:
    """A damaged relay message: JS rejects exactly what Python rejects, and decodes the rest alike."""
    answer = node.ask("relay", message=message.hex())
    try:
        frame = decode_frame(message, max_frame=1 << 24)
        decoded = decode_relay_message(frame.header.kind, frame.body)
    except ProtocolError:
        assert answer.get("error") == "ProtocolError", answer
        return
    assert answer == {"ok": True, "reencoded": decoded.to_message().hex()}


@given(
    st.one_of(
        st.builds(lambda n: cbor2.dumps({"ack": n}), u64),
        st.builds(lambda n: cbor2.dumps({"resume": n}), u64),
        st.dictionaries(keys, values, max_size=5).map(lambda d: cbor2.dumps(d, canonical=True)),
    ).flatmap(mutations)
)
def test_control_plaintexts_agree(node: Node, body: bytes) -> None:
    """CONTROL plaintexts (transport and application, damaged or not) decode alike."""
    decoded = python_verdict(decode_control, body)
    answer = node.ask("control", body=body.hex())
    if decoded is REJECTED:
        assert answer.get("error") == "ProtocolError", answer
        return
    assert answer["ok"], answer
    if hasattr(decoded, "data"):
        assert answer["type"] == "app"
        assert bytes.fromhex(answer["reencoded"]) == cbor2.dumps(dict(decoded.data), canonical=True)
    else:
        assert answer["type"] == type(decoded).__name__.lower()
        assert int(answer["seq"]) == decoded.seq


@given(values.map(lambda v: cbor2.dumps(v, canonical=True)).flatmap(mutations))
def test_cbor_subset_agrees(node: Node, body: bytes) -> None:
    """Arbitrary CBOR: the same strict subset is accepted, and canonical input re-encodes unchanged."""
    from rescue.protocol._messages import _loads  # the strict reader every body goes through

    decoded = python_verdict(_loads, body, 1 << 24, "CBOR")
    answer = node.ask("cbor", body=body.hex())
    if decoded is REJECTED:
        assert answer.get("error") == "ProtocolError", answer
        return
    assert answer["ok"], answer
    assert bytes.fromhex(answer["reencoded"]) == cbor2.dumps(decoded, canonical=True)


@given(
    key=st.binary(min_size=32, max_size=32),
    kind=st.sampled_from([Kind.DATA, Kind.CONTROL]),
    unsequenced=st.booleans(),
    channel=st.integers(0, 255),
    seq=st.integers(1, 2**64 - 1),
    payload=st.binary(max_size=200),
)
def test_sealed_frames_cross_open(
    node: Node, key: bytes, kind: Kind, unsequenced: bool, channel: int, seq: int, payload: bytes
) -> None:
    """What one side seals the other opens, byte for byte, and both reject a flipped bit."""
    flags = Flags.UNSEQUENCED if kind is Kind.CONTROL and unsequenced else Flags.NONE
    channel = channel if kind is Kind.DATA else 0
    cipher = FrameCipher(key)
    sealed = cipher.seal_frame(kind, payload, seq=seq, channel=channel, flags=flags, max_frame=1 << 24)
    answer = node.ask(
        "seal",
        key=key.hex(),
        kind=int(kind),
        payload=payload.hex(),
        seq=str(seq),
        channel=channel,
        flags=int(flags),
    )
    assert answer == {"ok": True, "message": sealed.hex()}
    assert node.ask("open", key=key.hex(), message=sealed.hex()) == {"ok": True, "plaintext": payload.hex()}
    damaged = bytearray(sealed)
    damaged[-1] ^= 0x01
    assert node.ask("open", key=key.hex(), message=bytes(damaged).hex())["error"] == "DecryptError"


def _describe(msg: Hello | Welcome | PeerEvent | Close) -> dict[str, Any]:
    if isinstance(msg, Hello):
        return {
            "kind": "hello",
            "token": msg.token.hex(),
            "session": msg.session,
            "role": msg.role.value,
            "nonce": msg.nonce.hex(),
            "caps": list(msg.caps.compression),
            "client": msg.client,
        }
    if isinstance(msg, Welcome):
        peer = msg.peer
        return {
            "kind": "welcome",
            "ack_nonce": msg.ack_nonce.hex(),
            "server_nonce": msg.server_nonce.hex(),
            "features": str(msg.features),
            "heartbeat_s": msg.heartbeat_s,
            "max_frame": msg.max_frame,
            "resume_grace_s": msg.resume_grace_s,
            "peer": None
            if peer is None
            else {"role": peer.role.value, "nonce": peer.nonce.hex(), "caps": list(peer.caps.compression)},
        }
    if isinstance(msg, PeerEvent):
        return {
            "kind": "peer",
            "event": msg.event,
            "role": msg.role.value,
            "nonce": msg.nonce.hex(),
            "caps": list(msg.caps.compression),
        }
    return {
        "kind": "close",
        "code": int(msg.code),
        "reason": msg.reason,
        "reconnect_in_ms": msg.reconnect_in_ms,
    }
