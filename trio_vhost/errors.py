"""The exception hierarchy of trio_vhost.

Every error the library raises on purpose derives from :class:`VhostUserError`.
The split follows the error policy in the README:

* :class:`RemoteProtocolError` -- the frontend sent something the protocol forbids
  (bad frame, size, fds, ungated request). The connection is closed.
* :class:`LocalProtocolError` -- our own code tried to send something invalid.
* :class:`UnsupportedRequest` -- a well-formed request the device does not implement;
  NACKed when REPLY_ACK is negotiated.
* :class:`GuestMemoryError` -- a guest address or range that no region maps.
* :class:`VirtqueueError` -- a broken ring or descriptor chain; that ring stops and its
  err eventfd is signalled.
* :class:`ConnectionClosed` -- the peer went away: :class:`ClientExit` between messages
  (normal), :class:`Disconnect` in the middle of one.
"""

from __future__ import annotations

__all__ = [
    "ClientExit",
    "ConnectionClosed",
    "DeviceError",
    "Disconnect",
    "GuestMemoryError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "UnsupportedRequest",
    "VhostUserError",
    "VirtqueueError",
]


class VhostUserError(Exception):
    """Base class of every error trio_vhost raises on purpose."""


class ProtocolError(VhostUserError):
    """A vhost-user protocol violation; abstract, raise a subclass."""

    def __new__(cls, *args: object) -> ProtocolError:
        if cls is ProtocolError:
            raise TypeError("ProtocolError is abstract: raise Local- or RemoteProtocolError")
        return super().__new__(cls, *args)


class RemoteProtocolError(ProtocolError):
    """The frontend sent a message the protocol does not allow."""


class LocalProtocolError(ProtocolError):
    """This side tried to encode or send something invalid."""


class UnsupportedRequest(VhostUserError):
    """A valid request that this backend or device does not implement."""


class DeviceError(VhostUserError):
    """A device failed to carry out a request it does implement."""


class GuestMemoryError(VhostUserError):
    """A guest-physical or frontend-virtual range that no memory region maps."""


class VirtqueueError(VhostUserError):
    """A virtqueue the guest corrupted: bad descriptor chain, index or address."""


class ConnectionClosed(VhostUserError):
    """The peer closed the connection."""


class ClientExit(ConnectionClosed):
    """The peer closed the connection between two messages: a normal end."""


class Disconnect(ConnectionClosed):
    """The peer closed the connection in the middle of a message."""
