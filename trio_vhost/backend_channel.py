"""BackendChannel: requests from the back-end to the front-end (SET_BACKEND_REQ_FD).

Once BACKEND_REQ is acked the frontend hands over one end of a socket pair; the backend
sends its own requests on it (CONFIG_CHANGE_MSG when the device's config space changed,
VRING_CALL / VRING_ERR with in-band notifications, ...) and reads the frontend's answers.
The sans-IO rules (which request needs which feature, body sizes, fds) are those of
``BackendProtocol.backend_request`` (:mod:`trio_vhost.proto.connection`); this module only
moves the bytes.

One request at a time: a lock keeps requests and their replies paired. A request that is
cancelled or fails between sending and its reply breaks the channel for good (a late
reply would otherwise be taken for the answer to the next request): every later request
raises :class:`BackendChannelClosed`, and the frontend learns of it by SET_BACKEND_REQ_FD
or a new connection.

Deadlock rule: the frontend may need the main connection to answer (QEMU reads the new
config with GET_CONFIG before it acknowledges CONFIG_CHANGE_MSG), so a request must never
be awaited by the session's control task; devices send from their own tasks.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, final

import trio

from ._io.transport import UnixTransport
from .errors import ConnectionClosed, RemoteProtocolError, VhostUserError
from .proto.constants import BackendReq, ProtocolFeature
from .proto.messages import U64
from .proto.rules import BACKEND_RULES

if TYPE_CHECKING:
    from ._fd import OwnedFd
    from .proto.connection import BackendProtocol
    from .proto.messages import Body

__all__ = ["BackendChannel", "BackendChannelClosed", "BackendRequestFailed", "FrontendLink"]

LOGGER = logging.getLogger(__name__)

#: What a send or receive raises when the frontend's end is gone.
_CHANNEL_GONE = (OSError, ConnectionClosed, trio.ClosedResourceError, trio.BrokenResourceError)


class BackendChannelClosed(VhostUserError):
    """There is no usable back-end channel (never set up, replaced, or broken)."""


class BackendRequestFailed(VhostUserError):
    """The frontend answered a back-end request with a non-zero REPLY_ACK."""

    def __init__(self, code: BackendReq, value: int) -> None:
        super().__init__(f"the frontend failed {code.name} ({value})")
        self.code = code
        self.value = value


@final
class BackendChannel:
    """The back-end channel of one session.

    Resource handling: owns the transport; :meth:`close` closes it (a request in progress
    then fails with :class:`BackendChannelClosed`).
    """

    def __init__(self, transport: UnixTransport, protocol: BackendProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._lock = trio.Lock()
        self._broken: str | None = None

    @classmethod
    def from_fd(cls, fd: OwnedFd, protocol: BackendProtocol) -> BackendChannel:
        """Wrap the fd of SET_BACKEND_REQ_FD (taken over, closed on failure).

        Raises:
            RemoteProtocolError: the fd is not a unix stream socket.
        """
        try:
            sock = socket.socket(fileno=fd.fd)
        except OSError as exc:
            fd.close()
            raise RemoteProtocolError(f"SET_BACKEND_REQ_FD fd is not a socket: {exc}") from exc
        fd.detach()  # the socket owns it now
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise RemoteProtocolError("SET_BACKEND_REQ_FD fd is not a unix stream socket")
        return cls(UnixTransport.from_socket(sock), protocol)

    @property
    def usable(self) -> bool:
        """Whether requests can still be sent."""
        return self._broken is None

    def close(self) -> None:
        """Close the channel; later requests raise :class:`BackendChannelClosed`."""
        if self._broken is None:
            self._broken = "the channel was closed"
        self._transport.close()

    async def request(
        self,
        code: BackendReq,
        body: Body | None = None,
        *,
        fds: Sequence[int] = (),
        need_reply: bool | None = None,
    ) -> Body | None:
        """Send one back-end request and wait for its answer if one is owed; a checkpoint.

        ``need_reply`` defaults to asking for an ack whenever REPLY_ACK is negotiated, so
        that a failure on the frontend's side is seen. Returns the request's own reply
        (SHARED_OBJECT_LOOKUP's u64), or None.

        Raises:
            BackendChannelClosed: no usable channel; nothing was sent.
            LocalProtocolError: the request is not allowed on this connection (its
                feature was not negotiated, a wrong body or fd count); nothing was sent.
            BackendRequestFailed: the frontend acked with a non-zero value.
            RemoteProtocolError: the frontend's reply is malformed (the channel breaks).
        """
        if need_reply is None:
            need_reply = self._protocol.reply_ack_enabled
        data = self._protocol.backend_request(code, body, need_reply=need_reply, nfds=len(fds))
        LOGGER.debug("back-end request %s", code.name)
        async with self._lock:
            if self._broken is not None:
                raise BackendChannelClosed(self._broken)
            try:
                await self._transport.send(data, fds)
                if not self._protocol.backend_expects_reply(code, need_reply=need_reply):
                    return None
                reply = await self._receive_reply(code)
            except BaseException as exc:
                # Whatever ended it (cancellation included), the reply's place is lost.
                self._broken = f"{code.name} did not complete: {exc!r}"
                if isinstance(exc, _CHANNEL_GONE):
                    raise BackendChannelClosed(self._broken) from exc
                raise
        own_reply = BACKEND_RULES[code].reply is not None
        if not own_reply and isinstance(reply, U64) and reply.value != 0:
            raise BackendRequestFailed(code, reply.value)
        return reply

    async def _receive_reply(self, code: BackendReq) -> Body | None:
        header, payload, got = await self._transport.receive_message()
        try:
            return self._protocol.backend_reply(code, header, payload, nfds=len(got))
        finally:
            for owned in got:
                owned.close()

    # -- the requests devices send ---------------------------------------------------------

    async def config_changed(self) -> None:
        """CONFIG_CHANGE_MSG: tell the frontend to read the config space again.

        Raises:
            LocalProtocolError: the CONFIG protocol feature was not negotiated.
            BackendChannelClosed, BackendRequestFailed: as :meth:`request`.
        """
        await self.request(BackendReq.CONFIG_CHANGE_MSG)


@final
class FrontendLink:
    """What a device may send the connected frontend on its own initiative.

    The session makes one per connection and hands it to the device
    (:meth:`Device.frontend_attached <trio_vhost.device.Device.frontend_attached>`); the
    back-end channel behind it comes and goes with SET_BACKEND_REQ_FD. While the session
    sleeps (SLEEP or RESTORE until WAKE) nothing is sent: an announcement made then is
    kept and sent once the session wakes.
    """

    def __init__(self, protocol: BackendProtocol) -> None:
        self._protocol = protocol
        self._channel: BackendChannel | None = None
        self._paused = False
        self._config_pending = False

    @property
    def channel(self) -> BackendChannel | None:
        """The back-end channel, once the frontend has sent one."""
        return self._channel

    def set_channel(self, channel: BackendChannel | None) -> None:
        """Use ``channel`` from now on (SET_BACKEND_REQ_FD); the previous one is closed."""
        old, self._channel = self._channel, channel
        if old is not None:
            old.close()

    def pause(self) -> None:
        """Send nothing until :meth:`resume` (the session sleeps)."""
        self._paused = True

    def resume(self) -> bool:
        """Allow sending again; return whether a config change waits to be announced."""
        self._paused = False
        pending, self._config_pending = self._config_pending, False
        return pending

    def close(self) -> None:
        """Close the channel (the connection ends)."""
        self.set_channel(None)

    def can_announce_config(self) -> bool:
        """Whether CONFIG_CHANGE_MSG can reach this frontend (channel and CONFIG acked)."""
        acked = self._protocol.acked_protocol_features
        return (
            self._channel is not None
            and self._channel.usable
            and bool(acked & ProtocolFeature.BACKEND_REQ)
            and bool(acked & ProtocolFeature.CONFIG)
        )

    async def config_changed(self) -> bool:
        """Tell the frontend to read the config space again (CONFIG_CHANGE_MSG); a
        checkpoint. Never call it from a request handler (see the module docstring).

        Returns True once the frontend has taken it (acked, with REPLY_ACK); False when
        this frontend cannot be told (no back-end channel, or BACKEND_REQ or CONFIG not
        negotiated: QEMU learns of it at its next GET_CONFIG) or the session sleeps (it is
        then sent on WAKE).

        Raises:
            BackendRequestFailed: the frontend answered with a failure.
            BackendChannelClosed: the channel broke on the way.
        """
        if self._paused:
            self._config_pending = True
            return False
        channel = self._channel
        if channel is None or not self.can_announce_config():
            LOGGER.info("config changed; this frontend has no channel to be told on")
            return False
        await channel.config_changed()
        return True
