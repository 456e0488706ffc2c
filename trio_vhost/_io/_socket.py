"""Socket helpers for the transport: error mapping, fd extraction, socket files.

This is the one place where socket ``OSError``\\ s become library errors (the httpcore
``map_exceptions`` pattern):

* ``ECONNRESET``/``EPIPE``/``ENOTCONN``/``ECONNABORTED`` -> :class:`Disconnect`;
* ``EBADF`` (we closed the socket) -> :class:`trio.ClosedResourceError`;
* any other ``OSError`` propagates unchanged.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket as _stdlib_socket
import stat
from collections.abc import Iterator
from typing import Final

import trio

from trio_vhost._fd import OwnedFd
from trio_vhost.errors import Disconnect

__all__ = [
    "INT_SIZE",
    "clear_stale_socket",
    "close_trio_socket",
    "map_socket_errors",
    "new_unix_socket",
    "take_fds",
]

LOGGER = logging.getLogger(__name__)

#: Bytes per fd in SCM_RIGHTS control data.
INT_SIZE: Final = array.array("i").itemsize
_DISCONNECT_ERRNOS: Final = frozenset(
    {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ECONNABORTED}
)


@contextlib.contextmanager
def map_socket_errors(operation: str) -> Iterator[None]:
    """Translate the socket errors raised by ``operation`` (see the module doc)."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise trio.ClosedResourceError(f"{operation}: the socket is closed") from exc
        if exc.errno in _DISCONNECT_ERRNOS:
            raise Disconnect(f"{operation}: {exc.strerror}") from exc
        raise


def close_trio_socket(sock: trio.socket.SocketType) -> None:
    """Close a trio socket once; also works outside ``trio.run``.

    Inside trio, ``notify_closing`` runs first, so tasks blocked on the socket wake with
    :class:`trio.ClosedResourceError`. Outside trio nobody can be blocked on it.
    """
    if sock.fileno() == -1:
        return
    try:
        sock.close()
    except RuntimeError:  # notify_closing outside trio.run
        os.close(sock.detach())


def take_fds(ancdata: list[tuple[int, int, bytes]]) -> tuple[list[OwnedFd], bool]:
    """Wrap every fd of ``ancdata`` in an OwnedFd at once.

    Returns:
        The fds (the caller owns them), and whether a control message other than
        SCM_RIGHTS came too. A truncated trailing int (MSG_CTRUNC) is ignored: the kernel
        installs only whole fds.
    """
    fds: list[OwnedFd] = []
    unexpected = False
    for level, kind, data in ancdata:
        if level == _stdlib_socket.SOL_SOCKET and kind == _stdlib_socket.SCM_RIGHTS:
            raw = array.array("i")
            raw.frombytes(data[: len(data) - len(data) % INT_SIZE])
            fds.extend(OwnedFd(fd) for fd in raw)
        else:
            unexpected = True
    return fds, unexpected


def new_unix_socket() -> _stdlib_socket.socket:
    """Return a new non-blocking, close-on-exec AF_UNIX stream socket."""
    sock = _stdlib_socket.socket(_stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


def clear_stale_socket(path: str) -> None:
    """Unlink ``path`` if it is a socket nobody listens on; refuse if somebody does."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EADDRINUSE, f"{path} exists and is not a socket", path)
    with new_unix_socket() as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            LOGGER.info("removing stale socket file %s", path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        except FileNotFoundError:
            return
        except BlockingIOError:
            pass  # a live server with a full backlog
    raise OSError(errno.EADDRINUSE, f"a server is already listening on {path}", path)
