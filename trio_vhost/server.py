"""serve() and serve_client(): serve one frontend after another on a unix socket.

A vhost-user socket has one frontend at a time. :func:`serve` accepts a frontend, runs its
session in a fresh nursery (the control task plus one worker per started vring), and when
the frontend goes away, for whatever reason, cleans up and accepts the next one: QEMU's
``reconnect=`` relies on the backend coming back this way.

:func:`serve_client` is the other role: the frontend listens (QEMU ``server=on``, DPDK
virtio_user ``server=1``) and the backend connects, and connects again after every
disconnect, so a frontend that restarts finds its backend back without being told.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Final, NoReturn

import trio

from ._io.transport import UnixTransport, open_unix_connection, open_unix_listener
from .device import Device
from .errors import ConnectionClosed, RemoteProtocolError, VhostUserError
from .session import Session

__all__ = ["serve", "serve_client", "serve_connection", "serve_socket"]

LOGGER = logging.getLogger(__name__)

#: First wait of serve_client() before connecting again; doubled up to the maximum.
CLIENT_RETRY_MIN: Final = 0.05
CLIENT_RETRY_MAX: Final = 1.0
#: connect(2) errors that mean "no frontend listening yet": wait and try again.
_NOT_LISTENING: Final = frozenset({errno.ENOENT, errno.ECONNREFUSED})


async def serve(
    device: Device,
    path: str,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``device`` on the unix socket ``path`` until cancelled; a checkpoint.

    ``task_status.started(path)`` is called once the socket accepts connections.

    Resource handling: the socket file is created here and removed when serve() exits; a
    stale socket file nobody listens on is replaced, a live one is an ``OSError``
    (EADDRINUSE). Every session's fds and mappings are released before the next frontend
    is accepted.

    Error handling: a frontend that breaks the protocol or vanishes mid-message is logged
    and disconnected; the listener keeps serving. The device is reset between frontends.
    """
    listener = await open_unix_listener(path)
    try:
        task_status.started(path)
        while True:
            transport = await listener.accept()
            LOGGER.info("frontend connected on %s", path)
            await serve_connection(device, transport)
    finally:
        # The listener removes the socket file, and only if it is still ours.
        listener.close()


async def serve_client(
    device: Device,
    path: str,
    *,
    retry_max: float = CLIENT_RETRY_MAX,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Connect to the frontend listening on ``path`` and serve it, again and again; a
    checkpoint. Runs until cancelled.

    ``task_status.started(path)`` is called once the first connection is made. While
    nobody listens on ``path`` (no file, or a file nobody accepts on) the connect is
    retried, waiting 50 ms at first and doubling up to ``retry_max`` seconds; after a
    session ends, the next connect comes 50 ms later (a frontend that accepts and hangs
    up at once cannot make this loop spin), so a frontend that restarts gets its backend
    back within ``retry_max``. Any other connect error (permissions, not a socket)
    is raised: waiting would not mend it.

    Sessions end exactly as in :func:`serve`: the device is reset between frontends.
    """
    started = False
    delay = CLIENT_RETRY_MIN
    while True:
        try:
            transport = await open_unix_connection(path)
        except OSError as exc:
            if exc.errno not in _NOT_LISTENING:
                raise
            if delay == CLIENT_RETRY_MIN:
                LOGGER.info("waiting for a frontend to listen on %s (%s)", path, exc.strerror)
            await trio.sleep(delay)
            delay = min(delay * 2, retry_max)
            continue
        delay = CLIENT_RETRY_MIN
        LOGGER.info("connected to the frontend on %s", path)
        if not started:
            started = True
            task_status.started(path)
        await serve_connection(device, transport)
        await trio.sleep(CLIENT_RETRY_MIN)


async def serve_socket(device: Device, sock: socket.socket) -> None:
    """Serve one frontend on an already-connected unix socket; a checkpoint.

    Takes ownership of ``sock``; returns when the frontend disconnects.
    """
    await serve_connection(device, UnixTransport.from_socket(sock))


async def serve_connection(device: Device, transport: UnixTransport) -> None:
    """Run one session over ``transport`` until the frontend goes away; a checkpoint.

    Never raises for anything the frontend or the guest did: protocol errors and
    disconnects are logged. Cancellation stops every worker and closes every resource.
    """
    session = Session(device, transport)
    try:
        async with trio.open_nursery() as nursery:
            try:
                await session.run(nursery)
            except VhostUserError as exc:
                _log_end(exc)
            finally:
                # Stop the workers through their own cancel scopes while the control task
                # is still inside the nursery. Letting the nursery cancel them instead
                # leaves their frames, and the views of guest memory in them, in trio's
                # exception-group reference cycles: the mappings (and the fds mmap keeps)
                # would outlive the session until the next cyclic garbage collection.
                with trio.CancelScope(shield=True):
                    await session.stop_all_rings(hard=True)
    except* RemoteProtocolError as group:
        LOGGER.warning("frontend protocol error, disconnecting: %s", _first(group))
    except* ConnectionClosed as group:
        LOGGER.warning("frontend disconnected: %s", _first(group))
    except* VhostUserError as group:
        LOGGER.error("session failed, disconnecting: %s", _first(group))
    except* Exception as group:
        # A bug on our side or in a device: log it whole, drop this frontend, keep serving.
        LOGGER.error("session crashed, disconnecting", exc_info=_first(group))
    finally:
        with trio.CancelScope(shield=True):
            await session.aclose()
            await transport.aclose()
        device.reset()


def _log_end(exc: VhostUserError) -> None:
    if isinstance(exc, RemoteProtocolError):
        LOGGER.warning("frontend protocol error, disconnecting: %s", exc)
    elif isinstance(exc, ConnectionClosed):
        LOGGER.warning("frontend disconnected: %s", exc)
    else:
        LOGGER.error("session failed, disconnecting: %s", exc)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
