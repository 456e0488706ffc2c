"""trio I/O: the vhost-user unix socket (frames + SCM_RIGHTS fds) and eventfds.

The only layer that touches sockets and eventfds, and the only place where OS and trio
errors are mapped to :mod:`trio_vhost.errors`.
"""

from __future__ import annotations

from trio_vhost._io.eventfd import EventFd as EventFd
from trio_vhost._io.transport import Buffer as Buffer
from trio_vhost._io.transport import UnixListener as UnixListener
from trio_vhost._io.transport import UnixTransport as UnixTransport
from trio_vhost._io.transport import open_unix_connection as open_unix_connection
from trio_vhost._io.transport import open_unix_listener as open_unix_listener

__all__ = [
    "Buffer",
    "EventFd",
    "UnixListener",
    "UnixTransport",
    "open_unix_connection",
    "open_unix_listener",
]
