"""The sans-I/O protocol core: frames, messages, crypto, ordered streams and tokens.

Nothing in this package does I/O or imports trio (a test enforces it); the relay, the token service
and the client drive these pure state machines from their own I/O shells.
"""

from rescue._codes import Backoff as Backoff
from rescue._codes import ClientPolicy as ClientPolicy
from rescue._codes import CloseCode as CloseCode
from rescue._codes import policy_for as policy_for
from rescue.protocol._crypto import DecryptError as DecryptError
from rescue.protocol._crypto import FrameCipher as FrameCipher
from rescue.protocol._crypto import derive_frame_key as derive_frame_key
from rescue.protocol._crypto import derive_psk as derive_psk
from rescue.protocol._crypto import hkdf_sha256 as hkdf_sha256
from rescue.protocol._frames import DEFAULT_MAX_FRAME as DEFAULT_MAX_FRAME
from rescue.protocol._frames import HEADER_SIZE as HEADER_SIZE
from rescue.protocol._frames import VERSION as VERSION
from rescue.protocol._frames import Flags as Flags
from rescue.protocol._frames import Frame as Frame
from rescue.protocol._frames import Header as Header
from rescue.protocol._frames import Kind as Kind
from rescue.protocol._frames import decode_frame as decode_frame
from rescue.protocol._frames import decode_header as decode_header
from rescue.protocol._frames import encode_frame as encode_frame
from rescue.protocol._frames import encode_header as encode_header
from rescue.protocol._messages import NONCE_SIZE as NONCE_SIZE
from rescue.protocol._messages import Ack as Ack
from rescue.protocol._messages import AppControl as AppControl
from rescue.protocol._messages import Caps as Caps
from rescue.protocol._messages import Close as Close
from rescue.protocol._messages import ControlMessage as ControlMessage
from rescue.protocol._messages import Hello as Hello
from rescue.protocol._messages import PeerEvent as PeerEvent
from rescue.protocol._messages import PeerInfo as PeerInfo
from rescue.protocol._messages import RelayMessage as RelayMessage
from rescue.protocol._messages import Resume as Resume
from rescue.protocol._messages import Role as Role
from rescue.protocol._messages import Welcome as Welcome
from rescue.protocol._messages import decode_control as decode_control
from rescue.protocol._messages import decode_relay_message as decode_relay_message
from rescue.protocol._messages import encode_ack as encode_ack
from rescue.protocol._messages import encode_resume as encode_resume
from rescue.protocol._messages import message_for as message_for
from rescue.protocol._stream import ACK_EVERY_FRAMES as ACK_EVERY_FRAMES
from rescue.protocol._stream import ACK_INTERVAL_S as ACK_INTERVAL_S
from rescue.protocol._stream import DEFAULT_REPLAY_BUFFER_BYTES as DEFAULT_REPLAY_BUFFER_BYTES
from rescue.protocol._stream import FRAME_OVERHEAD_BYTES as FRAME_OVERHEAD_BYTES
from rescue.protocol._stream import BufferFull as BufferFull
from rescue.protocol._stream import Outbound as Outbound
from rescue.protocol._stream import Receiver as Receiver
from rescue.protocol._stream import ReceiverStatistics as ReceiverStatistics
from rescue.protocol._stream import Sender as Sender
from rescue.protocol._stream import SenderStatistics as SenderStatistics
from rescue.protocol._stream import UnsequencedCounter as UnsequencedCounter
from rescue.protocol._stream import UnsequencedFilter as UnsequencedFilter
from rescue.protocol._tokens import CLOCK_SKEW as CLOCK_SKEW
from rescue.protocol._tokens import MAX_TOKEN_SIZE as MAX_TOKEN_SIZE
from rescue.protocol._tokens import MAX_TTL as MAX_TTL
from rescue.protocol._tokens import Claims as Claims
from rescue.protocol._tokens import KeyRing as KeyRing
from rescue.protocol._tokens import MintError as MintError
from rescue.protocol._tokens import SigningKey as SigningKey
from rescue.protocol._tokens import VerifyKey as VerifyKey
from rescue.protocol._tokens import b64url_decode as b64url_decode
from rescue.protocol._tokens import b64url_encode as b64url_encode
from rescue.protocol._tokens import mint_token as mint_token
from rescue.protocol._tokens import verify_token as verify_token
