"""The sans-I/O peer core: handshake, resume, ordering, integrity, and a Hypothesis property that two
cores wired through a simulated relay deliver exactly the sent streams whatever disconnects happen."""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rescue.client._core import (
    INTEGRITY_FAILURE_LIMIT,
    RESUME_RETRY_S,
    Acked,
    CloseReceived,
    ControlReceived,
    DataReceived,
    HeartbeatEcho,
    PeerCore,
    PeerJoined,
    PeerLeft,
    Resumed,
    Welcomed,
)
from rescue.errors import ProtocolError
from rescue.protocol import (
    BufferFull,
    Close,
    CloseCode,
    Flags,
    FrameCipher,
    Hello,
    Kind,
    PeerEvent,
    PeerInfo,
    Role,
    Welcome,
    decode_control,
    decode_frame,
    decode_header,
    derive_frame_key,
    encode_frame,
)

SESSION = "core-test"
PSK = bytes(range(32))
OTHER = {Role.HOST: Role.GUEST, Role.GUEST: Role.HOST}


def _core(role: Role, *, psk: bytes = PSK, seed: int = 0, **kwargs: object) -> PeerCore:
    rng = random.Random(f"{role}-{seed}")
    return PeerCore(psk=psk, session_id=SESSION, role=role, random_bytes=rng.randbytes, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- a simulated relay


@dataclass
class SimConn:
    """One peer connection: a FIFO each way. ``alive`` is the peer's view; the relay's is the slot."""

    role: Role
    to_relay: collections.deque[bytes] = field(default_factory=collections.deque)
    to_peer: collections.deque[bytes] = field(default_factory=collections.deque)
    info: PeerInfo | None = None
    alive: bool = True


class SimRelay:
    """Just enough of SPEC §2's relay: HELLO/WELCOME, PEER events, replace, forwarding, discard."""

    def __init__(self) -> None:
        self.slots: dict[Role, SimConn | None] = {Role.HOST: None, Role.GUEST: None}
        self.seen: set[Role] = set()
        self.discarded = 0

    def handle(self, conn: SimConn, message: bytes) -> None:
        frame = decode_frame(message)
        kind = frame.header.kind
        if conn.info is None:
            assert kind is Kind.HELLO, kind
            hello = Hello.decode(frame.body)
            conn.info = PeerInfo(role=hello.role, nonce=hello.nonce, caps=hello.caps)
            old = self.slots[conn.role]
            if old is not None:
                old.to_peer.clear()  # REPLACED: the old socket is gone
            other = self.slots[OTHER[conn.role]]
            self.slots[conn.role] = conn
            event = "rejoined" if conn.role in self.seen else "joined"
            self.seen.add(conn.role)
            conn.to_peer.append(
                Welcome(
                    ack_nonce=hello.nonce,
                    server_nonce=bytes(16),
                    peer=other.info if other is not None else None,
                ).to_message()
            )
            if other is not None:
                pe = PeerEvent(event=event, role=conn.role, nonce=hello.nonce, caps=hello.caps)  # type: ignore[arg-type]
                other.to_peer.append(pe.to_message())
            return
        if self.slots[conn.role] is not conn:
            return  # from a replaced connection: the relay closed it
        if kind is Kind.HEARTBEAT:
            conn.to_peer.append(message)
            return
        assert kind in (Kind.DATA, Kind.CONTROL), kind
        other = self.slots[OTHER[conn.role]]
        if other is None:
            self.discarded += 1
        else:
            other.to_peer.append(message)

    def lost(self, conn: SimConn) -> None:
        """The relay notices a connection ended: the partner gets PEER left."""
        if self.slots[conn.role] is not conn:
            return
        self.slots[conn.role] = None
        other = self.slots[OTHER[conn.role]]
        if other is not None and conn.info is not None:
            left = PeerEvent(event="left", role=conn.role, nonce=conn.info.nonce, caps=conn.info.caps)
            other.to_peer.append(left.to_message())


class World:
    """Two cores, a relay, and the application streams on each side."""

    def __init__(self, *, buffer: int = 1 << 20, seed: int = 0) -> None:
        self.relay = SimRelay()
        self.cores = {r: _core(r, seed=seed, max_buffer_bytes=buffer) for r in (Role.HOST, Role.GUEST)}
        self.conns: dict[Role, SimConn | None] = {Role.HOST: None, Role.GUEST: None}
        self.sent: dict[Role, list[tuple[int, bytes]]] = {Role.HOST: [], Role.GUEST: []}
        self.received: dict[Role, list[tuple[int, bytes]]] = {Role.HOST: [], Role.GUEST: []}
        self.now = 0.0
        self.token = b"t"

    def flush(self, role: Role) -> None:
        conn = self.conns[role]
        out = self.cores[role].data_to_send()
        if conn is not None and conn.alive:
            conn.to_relay.extend(out)

    def connect(self, role: Role) -> None:
        if self.conns[role] is not None:
            return
        conn = SimConn(role)
        conn.to_relay.append(self.cores[role].connect(self.token))
        self.conns[role] = conn

    def drop(self, role: Role, *, noticed: bool) -> None:
        conn = self.conns[role]
        if conn is None:
            return
        conn.alive = False
        conn.to_relay.clear()
        self.conns[role] = None
        self.cores[role].connection_lost()
        if noticed:
            self.relay.lost(conn)

    def send(self, role: Role, channel: int, data: bytes) -> None:
        try:
            self.cores[role].send_data(channel, data)
        except BufferFull:
            return
        self.sent[role].append((channel, data))
        self.flush(role)

    def up(self, role: Role) -> bool:
        conn = self.conns[role]
        if conn is None or not conn.to_relay:
            return False
        self.relay.handle(conn, conn.to_relay.popleft())
        return True

    def down(self, role: Role) -> bool:
        conn = self.conns[role]
        if conn is None or not conn.to_peer:
            return False
        for event in self.cores[role].receive(conn.to_peer.popleft(), self.now):
            if isinstance(event, DataReceived):
                self.received[role].append((event.channel, event.data))
        self.flush(role)
        return True

    def tick(self, dt: float) -> None:
        self.now += dt
        for role in (Role.HOST, Role.GUEST):
            self.cores[role].poll(self.now)
            self.flush(role)

    def settle(self) -> None:
        for role in (Role.HOST, Role.GUEST):
            self.connect(role)
        for _ in range(200):
            moved = True
            while moved:
                moved = False
                for role in (Role.HOST, Role.GUEST):
                    moved |= self.up(role) | self.down(role)
            done = all(self.received[OTHER[r]] == self.sent[r] for r in self.sent)
            if done and all(c.all_acked for c in self.cores.values()):
                return
            self.tick(1.5)
        raise AssertionError("the world did not settle")


ROLES = st.sampled_from([Role.HOST, Role.GUEST])
OPS = st.one_of(
    st.tuples(st.just("send"), ROLES, st.integers(0, 3), st.binary(min_size=0, max_size=300)),
    st.tuples(st.just("up"), ROLES, st.integers(1, 8)),
    st.tuples(st.just("down"), ROLES, st.integers(1, 8)),
    st.tuples(st.just("drop"), ROLES, st.booleans()),
    st.tuples(st.just("connect"), ROLES),
    st.tuples(st.just("tick"), st.floats(0.01, 3.0)),
)


@settings(max_examples=150)
@given(ops=st.lists(OPS, max_size=120), buffer=st.sampled_from([2048, 1 << 20]))
def test_streams_survive_any_disconnects(ops: list[tuple[object, ...]], buffer: int) -> None:
    world = World(buffer=buffer)
    world.connect(Role.HOST)
    world.connect(Role.GUEST)
    for op in ops:
        name = op[0]
        if name == "send":
            world.send(op[1], op[2], op[3])  # type: ignore[arg-type]
        elif name in ("up", "down"):
            step = world.up if name == "up" else world.down
            for _ in range(op[2]):  # type: ignore[call-overload]
                step(op[1])  # type: ignore[arg-type]
        elif name == "drop":
            world.drop(op[1], noticed=op[2])  # type: ignore[arg-type]
        elif name == "connect":
            world.connect(op[1])  # type: ignore[arg-type]
        else:
            world.tick(op[1])  # type: ignore[arg-type]
    world.settle()
    for role in (Role.HOST, Role.GUEST):
        assert world.received[OTHER[role]] == world.sent[role]
        assert world.cores[role].statistics().integrity_failures == 0


# ------------------------------------------------------------------------------------ unit tests


def _paired(**kwargs: object) -> World:
    world = World(**kwargs)  # type: ignore[arg-type]
    world.connect(Role.HOST)
    world.connect(Role.GUEST)
    world.settle()
    return world


def test_hello_carries_fresh_nonce_and_session() -> None:
    core = _core(Role.HOST)
    first = Hello.decode(decode_frame(core.connect(b"tok")).body)
    second = Hello.decode(decode_frame(core.connect(b"tok")).body)
    assert first.session == SESSION
    assert first.role is Role.HOST
    assert first.token == b"tok"
    assert first.nonce != second.nonce
    assert first.caps.compression == ("zlib",)
    assert core.statistics().connections == 2


def test_welcome_with_partner_sends_resume_first_and_holds_data() -> None:
    host = _core(Role.HOST)
    hello = Hello.decode(decode_frame(host.connect(b"t")).body)
    host.send_data(0, b"early")  # before WELCOME: buffered only
    assert host.data_to_send() == []
    partner = PeerInfo(role=Role.GUEST, nonce=b"\x07" * 16)
    events = host.receive(
        Welcome(ack_nonce=hello.nonce, server_nonce=bytes(16), peer=partner).to_message(), 0
    )
    assert isinstance(events[0], Welcomed)
    assert host.partner_present
    out = host.data_to_send()
    assert len(out) == 1  # only the resume: data waits for the partner's resume
    header = decode_header(out[0])
    assert header.kind is Kind.CONTROL
    assert header.unsequenced
    assert header.seq == 1
    key = derive_frame_key(PSK, SESSION, "host", hello.nonce)
    plain = FrameCipher(key).open(out[0][:12], out[0][12:])
    assert decode_control(plain, flags=header.flags).seq == 0  # type: ignore[union-attr]

    # The guest's resume(0) releases "early", sealed under the host's current key.
    guest_cipher = FrameCipher(derive_frame_key(PSK, SESSION, "guest", partner.nonce))
    resume = guest_cipher.seal_frame(
        Kind.CONTROL, decode_control_plain_resume(0), seq=1, flags=Flags.UNSEQUENCED
    )
    events = host.receive(resume, 0)
    assert events == [Resumed(0, 1)]
    (frame,) = host.data_to_send()
    header = decode_header(frame)
    assert header.kind is Kind.DATA
    assert header.seq == 1
    assert FrameCipher(key).open(frame[:12], frame[12:]) == b"early"


def decode_control_plain_resume(seq: int) -> bytes:
    from rescue.protocol import encode_resume

    return encode_resume(seq)


def test_welcome_must_echo_our_nonce() -> None:
    core = _core(Role.GUEST)
    core.connect(b"t")
    with pytest.raises(ProtocolError):
        core.receive(Welcome(ack_nonce=b"\x01" * 16, server_nonce=bytes(16)).to_message(), 0)


def test_only_welcome_or_close_before_welcome() -> None:
    core = _core(Role.GUEST)
    core.connect(b"t")
    with pytest.raises(ProtocolError):
        core.receive(encode_frame(Kind.HEARTBEAT, seq=1), 0)
    core.connect(b"t")
    (event,) = core.receive(Close(code=CloseCode.AUTH_FAILED, reason="bad").to_message(), 0)
    assert event == CloseReceived(CloseCode.AUTH_FAILED, "bad", None)


def test_data_flows_in_order_and_acks_free_the_buffer() -> None:
    world = _paired()
    for i in range(200):
        world.send(Role.HOST, i % 3, bytes([i]) * i)
    world.settle()
    assert world.received[Role.GUEST] == world.sent[Role.HOST]
    assert world.cores[Role.HOST].sender.buffered_bytes == 0  # every frame acknowledged


def test_peer_left_stops_transmission_until_resume() -> None:
    world = _paired()
    world.drop(Role.GUEST, noticed=True)
    world.down(Role.HOST)  # PEER left
    assert not world.cores[Role.HOST].partner_present
    world.send(Role.HOST, 0, b"while away")
    assert not world.conns[Role.HOST].to_relay  # type: ignore[union-attr]
    assert world.cores[Role.HOST].sender.buffered_frames == 1
    world.settle()
    assert world.received[Role.GUEST] == [(0, b"while away")]
    assert world.relay.discarded == 0


def test_peer_events_reported() -> None:
    world = _paired()
    host = world.cores[Role.HOST]
    world.drop(Role.GUEST, noticed=True)
    conn = world.conns[Role.HOST]
    assert conn is not None
    events = host.receive(conn.to_peer.popleft(), 0)
    assert isinstance(events[0], PeerLeft)
    world.connect(Role.GUEST)
    world.up(Role.GUEST)
    events = host.receive(conn.to_peer.popleft(), 0)
    assert isinstance(events[0], PeerJoined)
    assert events[0].rejoined


def test_heartbeat_echo_and_app_control() -> None:
    world = _paired()
    host = world.cores[Role.HOST]
    guest = world.cores[Role.GUEST]
    hb = host.heartbeat()
    assert decode_header(hb).kind is Kind.HEARTBEAT
    assert host.receive(hb, 0) == [HeartbeatEcho(1)]
    host.send_control({"exit": 3})
    host.send_data(0, b"x")
    world.flush(Role.HOST)
    world.up(Role.HOST)
    world.up(Role.HOST)
    conn = world.conns[Role.GUEST]
    assert conn is not None
    events = guest.receive(conn.to_peer.popleft(), 0) + guest.receive(conn.to_peer.popleft(), 0)
    assert events[0] == ControlReceived({"exit": 3})
    assert events[1] == DataReceived(0, b"x")
    with pytest.raises(ValueError, match="reserved"):
        host.send_control({"ack": 1})


def test_acked_event_when_ack_frees_bytes() -> None:
    world = _paired()
    world.send(Role.HOST, 0, b"abc")
    world.up(Role.HOST)
    world.down(Role.GUEST)
    world.tick(2.0)  # the guest's ack is due after 1 s
    world.up(Role.GUEST)
    conn = world.conns[Role.HOST]
    assert conn is not None
    events = world.cores[Role.HOST].receive(conn.to_peer.popleft(), world.now)
    assert events == [Acked(3 + 64)]
    assert world.cores[Role.HOST].all_acked


def test_buffer_full_is_backpressure() -> None:
    core = _core(Role.HOST, max_buffer_bytes=1000)
    core.connect(b"t")
    core.send_data(0, b"a" * 800)
    with pytest.raises(BufferFull):
        core.send_data(0, b"b" * 200)
    with pytest.raises(ValueError):
        core.send_data(0, b"c" * 70000)


def test_three_bad_frames_in_a_row_are_an_integrity_error() -> None:
    world = _paired()
    guest = world.cores[Role.GUEST]
    wrong = FrameCipher(bytes(32))
    good_host = world.cores[Role.HOST]
    good_host.send_data(0, b"ok")
    (good,) = good_host.data_to_send()
    assert guest.receive(wrong.seal_frame(Kind.DATA, b"x", seq=5), 0) == []
    assert guest.receive(wrong.seal_frame(Kind.DATA, b"x", seq=6), 0) == []
    assert guest.receive(good, 0) == [DataReceived(0, b"ok")]  # a good frame resets the run
    for i in range(INTEGRITY_FAILURE_LIMIT - 1):
        guest.receive(wrong.seal_frame(Kind.DATA, b"x", seq=10 + i), 0)
    with pytest.raises(ProtocolError) as info:
        guest.receive(wrong.seal_frame(Kind.DATA, b"x", seq=20), 0)
    assert info.value.code is CloseCode.INTEGRITY_ERROR
    assert guest.statistics().integrity_failures == 2 + INTEGRITY_FAILURE_LIMIT


def test_wrong_passphrase_ends_in_integrity_error() -> None:
    world = World()
    world.cores[Role.GUEST] = _core(Role.GUEST, psk=bytes(32))
    world.connect(Role.HOST)
    world.connect(Role.GUEST)
    for _ in range(3):
        world.send(Role.HOST, 0, b"secret")
    with pytest.raises(ProtocolError) as info:
        world.settle()
    assert info.value.code is CloseCode.INTEGRITY_ERROR


@pytest.mark.parametrize("retry", [RESUME_RETRY_S, 0.25])
def test_resume_is_resent_every_resume_retry_until_the_partners_arrives(retry: float) -> None:
    host = _core(Role.HOST, resume_retry=retry)
    hello = Hello.decode(decode_frame(host.connect(b"t")).body)
    partner = PeerInfo(role=Role.GUEST, nonce=b"\x07" * 16)
    host.receive(Welcome(ack_nonce=hello.nonce, server_nonce=bytes(16), peer=partner).to_message(), 0)
    assert len(host.data_to_send()) == 1  # the first resume
    host.poll(10.0)  # a resend (or the timer's start): from here on, one every `retry`
    host.data_to_send()
    assert host.next_deadline() == 10.0 + retry
    host.poll(10.0 + retry * 0.99)
    assert host.data_to_send() == []
    host.poll(10.0 + retry)
    (again,) = host.data_to_send()
    assert decode_header(again).kind is Kind.CONTROL
    assert host.next_deadline() == 10.0 + 2 * retry


def test_resume_retry_must_be_positive() -> None:
    with pytest.raises(ValueError, match="resume_retry"):
        _core(Role.HOST, resume_retry=0.0)


def test_partner_verified_only_by_a_frame_that_authenticates() -> None:
    world = World()
    world.cores[Role.GUEST] = _core(Role.GUEST, psk=bytes(32))
    world.connect(Role.HOST)
    world.connect(Role.GUEST)
    assert not world.cores[Role.HOST].partner_verified
    world.send(Role.HOST, 0, b"secret")
    with pytest.raises(ProtocolError):
        world.settle()  # resumes and their retries fail authentication on both sides
    assert not world.cores[Role.HOST].partner_verified
    assert not world.cores[Role.GUEST].partner_verified

    paired = World()  # the right passphrase: the partner's resume authenticates
    paired.send(Role.HOST, 0, b"secret")
    paired.settle()
    assert paired.cores[Role.HOST].partner_verified
    assert paired.cores[Role.GUEST].partner_verified


def test_frames_under_the_partners_previous_key_are_not_failures() -> None:
    world = _paired()
    host, guest = world.cores[Role.HOST], world.cores[Role.GUEST]
    host.send_data(0, b"old-key")
    (stale,) = host.data_to_send()  # sealed under the host's first connection key
    world.drop(Role.HOST, noticed=False)
    world.connect(Role.HOST)
    world.up(Role.HOST)  # HELLO → the relay replaces the old connection, guest gets PEER rejoined
    conn = world.conns[Role.GUEST]
    assert conn is not None
    events = guest.receive(conn.to_peer.popleft(), world.now)
    assert isinstance(events[0], PeerJoined)
    assert events[0].rejoined
    # The stale frame arrives after the rekey: decrypted with the previous key, delivered in order.
    assert guest.receive(stale, world.now) == [DataReceived(0, b"old-key")]
    assert guest.statistics().stale_key_frames == 1
    assert guest.statistics().integrity_failures == 0
    world.settle()  # the host's retransmit of seq 1 under its new key is a duplicate: dropped
    assert guest.statistics().receiver.delivered_frames == 1
    assert guest.statistics().receiver.duplicates_dropped == 1


def test_compressed_frames_are_inflated_with_a_bound() -> None:
    import zlib

    world = _paired()
    guest = world.cores[Role.GUEST]
    host_nonce = world.cores[Role.HOST].nonce
    assert host_nonce is not None
    cipher = FrameCipher(derive_frame_key(PSK, SESSION, "host", host_nonce))
    seq = world.cores[Role.HOST].sender.next_seq
    body = zlib.compress(b"z" * 5000)
    frame = cipher.seal_frame(Kind.DATA, body, seq=seq, flags=Flags.COMPRESSED)
    assert guest.receive(frame, 0) == [DataReceived(0, b"z" * 5000)]
    bomb = cipher.seal_frame(Kind.DATA, zlib.compress(bytes(10**6)), seq=seq + 1, flags=Flags.COMPRESSED)
    with pytest.raises(ProtocolError):
        guest.receive(bomb, 0)


def test_peer_event_for_own_role_is_a_protocol_error() -> None:
    world = _paired()
    bad = PeerEvent(event="joined", role=Role.HOST, nonce=bytes(16)).to_message()
    with pytest.raises(ProtocolError):
        world.cores[Role.HOST].receive(bad, 0)


@given(message=st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_protocol_error(message: bytes) -> None:
    world = _paired()
    try:
        world.cores[Role.GUEST].receive(message, 0)
    except ProtocolError:
        pass


@given(message=st.binary(max_size=200))
def test_arbitrary_bytes_before_welcome_raise_only_protocol_error(message: bytes) -> None:
    core = _core(Role.GUEST)
    core.connect(b"t")
    try:
        core.receive(message, 0)
    except ProtocolError:
        pass


def test_receive_without_connection_is_an_error() -> None:
    with pytest.raises(ProtocolError):
        _core(Role.HOST).receive(encode_frame(Kind.HEARTBEAT, seq=1), 0)
