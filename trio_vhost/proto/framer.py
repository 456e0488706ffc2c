"""Framer: cut a byte stream (and the fds that came with it) into vhost-user frames.

A frame is a 12-byte header and exactly ``header.size`` body bytes. The spec says where
fds travel: "back-end can therefore expect that file descriptors will only be received in
the first ``recvmsg`` operation for a message header", so fds are accepted only with data
that starts a new frame, and belong to that frame.

The transport can read headers and bodies directly; the framer serves code that receives
arbitrary chunks (tests feed each frame whole, byte by byte and with trailing data, as
h11's ``tr()`` does) and the frontend reading replies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, final

from .._fd import OwnedFd, close_all
from ..errors import RemoteProtocolError
from .constants import HEADER_SIZE
from .messages_ext import MAX_SNAPSHOT_SIZE
from .wire import Header

__all__ = ["DEFAULT_MAX_BODY", "Frame", "Framer"]

#: Body limit of a framer without a header check: the largest body any message has.
DEFAULT_MAX_BODY: Final = 1 + MAX_SNAPSHOT_SIZE


@final
@dataclass(frozen=True, slots=True)
class Frame:
    """One complete message.

    Attributes:
        header: The decoded (and, if the framer has a check, validated) header.
        body: Exactly ``header.size`` bytes.
        fds: The fds that arrived with the header's first byte; the receiver owns them.
    """

    header: Header
    body: bytes
    fds: tuple[OwnedFd, ...]


def _plain_header(data: bytes, nfds: int) -> Header:
    header = Header.decode(data)
    if header.size > DEFAULT_MAX_BODY:
        raise RemoteProtocolError(f"frame body of {header.size} bytes is too large")
    return header


@final
class Framer:
    """Buffer incoming bytes and return complete frames.

    ``check_header`` validates each header as soon as its 12 bytes are in, before any of
    its body is waited for; pass :meth:`BackendProtocol.receive_header
    <trio_vhost.proto.connection.BackendProtocol.receive_header>` to apply the full
    header rules. The default only bounds the body size.

    Resource handling: fds given to :meth:`feed` belong to the framer until they are
    returned in a :class:`Frame`; :meth:`close` closes any it still holds. If ``feed``
    raises, it has not taken the fds.

    Error handling: errors are sticky; after one, every call raises again.
    """

    __slots__ = ("_buffer", "_check", "_error", "_fds", "_header")

    def __init__(self, check_header: Callable[[bytes, int], Header] | None = None) -> None:
        """Create an empty framer.

        Args:
            check_header: Called with the 12 header bytes and the fd count; returns the
                header or raises :class:`~trio_vhost.errors.RemoteProtocolError`.
        """
        self._check = check_header or _plain_header
        self._buffer = bytearray()
        self._fds: tuple[OwnedFd, ...] = ()
        self._header: Header | None = None
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """How many bytes wait for the rest of their frame."""
        return len(self._buffer)

    def _check_alive(self) -> None:
        if self._error is not None:
            raise RemoteProtocolError(f"framer already failed: {self._error}")

    def feed(self, data: bytes, fds: Sequence[OwnedFd] = ()) -> None:
        """Append received bytes, with the fds received alongside them.

        Raises:
            RemoteProtocolError: fds arrived with data that does not start a frame.
        """
        self._check_alive()
        if fds and (self._buffer or self._fds or not data):
            self._error = RemoteProtocolError("fds arrived after the first byte of a header")
            raise self._error
        self._buffer += data
        self._fds = tuple(fds) or self._fds

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or ``None`` until more data arrives.

        Raises:
            RemoteProtocolError: The header check refused the header.
        """
        self._check_alive()
        if self._header is None:
            if len(self._buffer) < HEADER_SIZE:
                return None
            try:
                self._header = self._check(bytes(self._buffer[:HEADER_SIZE]), len(self._fds))
            except RemoteProtocolError as exc:
                self._error = exc
                raise
        end = HEADER_SIZE + self._header.size
        if len(self._buffer) < end:
            return None
        frame = Frame(self._header, bytes(self._buffer[HEADER_SIZE:end]), self._fds)
        del self._buffer[:end]
        self._header = None
        self._fds = ()
        return frame

    def close(self) -> None:
        """Close the fds of a frame not yet returned and drop the buffered bytes."""
        fds, self._fds = self._fds, ()
        self._buffer.clear()
        self._header = None
        close_all(fds)
