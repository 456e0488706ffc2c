"""Sans-IO vhost-user protocol: bytes and fds in, typed requests out.

Nothing in this package performs I/O or imports trio. The transport (``trio_vhost._io``)
frames bytes off a socket; :class:`BackendProtocol` validates and decodes them, and
:class:`FrontendCodec` is its mirror image for a frontend.

Modules: :mod:`.constants` (codes and bits), :mod:`.wire` (header and struct layouts),
:mod:`.messages` (one class per body), :mod:`.rules` (the per-request table),
:mod:`.codec` (applying it), :mod:`.connection` (the back-end's state),
:mod:`.frontend_codec` (the frontend's), :mod:`.framer` (stream to frames).
"""

from .connection import BackendProtocol as BackendProtocol
from .connection import Request as Request
from .connection import has_own_reply as has_own_reply
from .framer import Frame as Frame
from .framer import Framer as Framer
from .frontend_codec import BackendRequest as BackendRequest
from .frontend_codec import FrontendCodec as FrontendCodec
from .frontend_codec import decode_reply as decode_reply
from .frontend_codec import encode_request as encode_request
from .messages import Body as Body
from .wire import Header as Header

__all__ = [
    "BackendProtocol",
    "BackendRequest",
    "Body",
    "Frame",
    "Framer",
    "FrontendCodec",
    "Header",
    "Request",
    "decode_reply",
    "encode_request",
    "has_own_reply",
]
