"""The sans-I/O protocol core: frames, messages, crypto, ordered streams and tokens.

Nothing in this package does I/O or imports trio (a test enforces it); the relay, the token service
and the client drive these pure state machines from their own I/O shells.
"""

from rescue._codes import Backoff as Backoff
from rescue._codes import ClientPolicy as ClientPolicy
from rescue._codes import CloseCode as CloseCode
from rescue._codes import policy_for as policy_for
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
