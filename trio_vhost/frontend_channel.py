"""FrontendChannelEnd: the frontend's end of the back-end channel (SET_BACKEND_REQ_FD).

:meth:`Frontend.open_backend_channel <trio_vhost.frontend.Frontend.open_backend_channel>`
creates the socket pair and sends one end to the backend; this object keeps the other
end and answers what the backend asks, as QEMU does: each request is validated by the
codec (feature gating, sizes, fds), handed to a handler, and acknowledged (REPLY_ACK) or
answered with its own reply.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, final

import trio

from ._io.transport import UnixTransport
from .errors import ClientExit
from .proto.frontend_codec import BackendRequest

if TYPE_CHECKING:
    from .proto.frontend_codec import FrontendCodec
    from .proto.messages import Body

__all__ = ["BackendRequestHandler", "FrontendChannelEnd"]

LOGGER = logging.getLogger(__name__)

#: Answers one back-end request: True/False for success (the REPLY_ACK value), or the
#: request's own reply body (SHARED_OBJECT_LOOKUP).
BackendRequestHandler = Callable[[BackendRequest], Awaitable["bool | Body"]]


@final
class FrontendChannelEnd:
    """The frontend's side of the back-end channel of one connection.

    Resource handling: owns the transport; :meth:`aclose` closes it. The fds of a request
    are closed after its handler returns (a handler keeps one with ``dup()``).
    """

    def __init__(self, transport: UnixTransport, codec: FrontendCodec) -> None:
        self.transport = transport
        self._codec = codec
        #: Every request received, in order (for tests and tools).
        self.received: list[BackendRequest] = []

    async def serve(self, handler: BackendRequestHandler) -> None:
        """Answer the backend's requests until it closes the channel; a checkpoint.

        Raises:
            RemoteProtocolError: the backend sent a malformed or ungated request.
        """
        while True:
            try:
                header, body, fds = await self.transport.receive_message()
            except (ClientExit, trio.ClosedResourceError):
                return
            try:
                request = self._codec.receive_backend_request(header, body, fds)
                self.received.append(request)
                answer = await handler(request)
            finally:
                for owned in fds:
                    owned.close()
            if isinstance(answer, bool):
                reply = self._codec.backend_ack(request, answer)
            else:
                reply = self._codec.backend_reply(request, answer)
            if reply is not None:
                await self.transport.send(reply)

    async def aclose(self) -> None:
        """Close the channel; a checkpoint."""
        await self.transport.aclose()
