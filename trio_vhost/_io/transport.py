"""The vhost-user byte stream: an AF_UNIX socket that carries frames and their fds.

A vhost-user message is a 12-byte header, ``size`` body bytes, and up to
:data:`~trio_vhost.proto.constants.MAX_FDS` file descriptors sent with SCM_RIGHTS. The
frontend attaches the fds to the ``sendmsg`` that carries the header, and a Linux stream
``recvmsg`` stops after the segment that carried fds, so messages never merge and the fds
of a message always arrive with the first read of its header. This module turns that into
three awaitable steps (header with fds, exact body, whole-frame send), plus the unix
listener and connector. Socket errors are mapped to :mod:`trio_vhost.errors` here and
nowhere else (see :mod:`trio_vhost._io._socket`).

Framing (what the header means, how big the body may be) is not known here: that is the
sans-IO :mod:`trio_vhost.proto`.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket as _stdlib_socket
from collections.abc import Sequence
from typing import Final, TypeAlias, final

import trio

from trio_vhost._fd import OwnedFd, close_all
from trio_vhost._io._guard import ConflictGuard
from trio_vhost._io._socket import (
    INT_SIZE,
    clear_stale_socket,
    close_trio_socket,
    map_socket_errors,
    new_unix_socket,
    take_fds,
)
from trio_vhost.errors import ClientExit, Disconnect, LocalProtocolError, RemoteProtocolError
from trio_vhost.proto.constants import HEADER_SIZE, MAX_FDS
from trio_vhost.proto.wire import Header

__all__ = [
    "Buffer",
    "UnixListener",
    "UnixTransport",
    "open_unix_connection",
    "open_unix_listener",
]

LOGGER = logging.getLogger(__name__)

#: What :meth:`UnixTransport.send` accepts.
Buffer: TypeAlias = bytes | bytearray | memoryview

#: Room for more fds than any valid message carries, so that a frontend sending 9..16 fds
#: is refused by the protocol layer with a precise message rather than by MSG_CTRUNC.
_FD_SLACK: Final = 8
_ANCBUFSIZE: Final = _stdlib_socket.CMSG_SPACE((MAX_FDS + _FD_SLACK) * INT_SIZE)
_RECV_FLAGS: Final = _stdlib_socket.MSG_CMSG_CLOEXEC
#: No SIGPIPE: a dead peer is an ``EPIPE`` error, even in a process that did not ignore it.
_SEND_FLAGS: Final = _stdlib_socket.MSG_NOSIGNAL


@final
class UnixTransport(trio.abc.AsyncResource):
    """A connected AF_UNIX SOCK_STREAM socket speaking vhost-user frames.

    One task receives (``receive_header`` then ``receive_exactly``); any number of tasks may
    ``send``, serialised by the library's only lock.

    Resource handling:
        The transport owns the socket from construction on and closes it in
        :meth:`close`/:meth:`aclose` (idempotent; also usable as ``async with``). Received
        fds are wrapped in :class:`~trio_vhost._fd.OwnedFd` the moment they arrive: the
        caller owns the ones returned, and every error path closes the others. Fds passed
        to :meth:`send` stay owned by the caller (the kernel duplicates them).

    Error handling:
        EOF between messages is :class:`ClientExit`, EOF or reset inside one is
        :class:`Disconnect`, and a framing violation of the fd rules (truncated control
        data, fds outside the first read of a header) is :class:`RemoteProtocolError`.
        Once a receive fails or is cancelled after consuming part of a message, the stream
        is out of step: every later receive raises :class:`trio.BrokenResourceError`, and
        the connection must be closed. The same holds for the send side if a send fails
        half-way (only possible when the socket itself fails).
    """

    __slots__ = ("_receive_broken", "_receive_guard", "_send_broken", "_send_lock", "_sock")

    def __init__(self, sock: trio.socket.SocketType) -> None:
        """Take ownership of a connected AF_UNIX stream socket."""
        if sock.family != _stdlib_socket.AF_UNIX or sock.type != _stdlib_socket.SOCK_STREAM:
            raise ValueError(f"need a connected AF_UNIX SOCK_STREAM socket, got {sock!r}")
        self._sock = sock
        self._send_lock = trio.Lock()
        self._receive_guard = ConflictGuard("another task is already receiving")
        self._receive_broken: str | None = None
        self._send_broken: str | None = None

    @classmethod
    def from_socket(cls, sock: _stdlib_socket.socket) -> UnixTransport:
        """Wrap an already-connected stdlib socket (e.g. one end of ``socketpair()``).

        The transport takes ownership of ``sock`` and makes it non-blocking.
        """
        return cls(trio.socket.from_stdlib_socket(sock))

    @classmethod
    def socketpair(cls) -> tuple[UnixTransport, UnixTransport]:
        """Return two transports connected to each other (for tests and in-process use)."""
        left, right = _stdlib_socket.socketpair(_stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_STREAM)
        return cls.from_socket(left), cls.from_socket(right)

    @property
    def socket(self) -> trio.socket.SocketType:
        """The underlying trio socket (still owned by the transport)."""
        return self._sock

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` or :meth:`aclose` has run."""
        return self._sock.fileno() == -1

    def fileno(self) -> int:
        """Return the socket's descriptor number (-1 once closed)."""
        return self._sock.fileno()

    async def receive_header(self) -> tuple[bytes, list[OwnedFd]]:
        """Receive the next 12-byte message header together with the fds sent with it.

        Always a checkpoint. Short reads are looped; fds are accepted only from the first
        read, whose control buffer has room for ``MAX_FDS`` plus some slack.

        Returns:
            The header bytes and the fds (possibly none); the caller owns the fds.

        Raises:
            ClientExit: The peer closed the connection before sending a byte (normal).
            Disconnect: The peer closed the connection inside the header, or reset it
                (``ECONNRESET`` is never a clean exit, even between messages).
            RemoteProtocolError: The control data was truncated (``MSG_CTRUNC``: too many
                fds), was not SCM_RIGHTS, or fds came with a later part of the header.
                Every fd that arrived is closed.
            trio.BrokenResourceError: An earlier receive left the stream mid-message.
            trio.ClosedResourceError: The transport is closed, or was closed meanwhile.
            trio.BusyResourceError: Another task is receiving.

        Cancellation: a call cancelled before any byte arrived consumes nothing and may be
        retried. A call cancelled after a partial header (the peer sent it in pieces) loses
        what it read and closes its fds: the stream is then mid-message, later receives
        raise ``BrokenResourceError``, and the connection must be closed.
        """
        with self._receive_guard:
            self._check_receivable()
            buf = bytearray(HEADER_SIZE)
            view = memoryview(buf)
            fds: list[OwnedFd] = []
            got = 0
            try:
                while got < HEADER_SIZE:
                    nbytes, new_fds, problem = await self._receive_into(view[got:])
                    continuation = got > 0
                    got += nbytes
                    fds += new_fds
                    if problem is not None:
                        raise RemoteProtocolError(f"message header: {problem}")
                    if new_fds and continuation:
                        raise RemoteProtocolError(
                            f"{len(new_fds)} fd(s) arrived after the first {got - nbytes} "
                            "header bytes; fds must come with the first byte of a message"
                        )
                    if nbytes == 0:
                        if got == 0:
                            raise ClientExit("the peer closed the connection between messages")
                        raise Disconnect(
                            f"the peer closed the connection after {got} of "
                            f"{HEADER_SIZE} header bytes"
                        )
            except BaseException as exc:
                close_all(fds)
                if got:
                    self._receive_broken = f"a receive failed inside a header: {exc!r}"
                raise
            return bytes(buf), fds

    async def receive_message(self) -> tuple[Header, bytes, list[OwnedFd]]:
        """Receive a whole message: its header, its body and the fds that came with it.

        For the side that trusts the header's size (a frontend reading a backend's reply or
        back-end request); the backend validates each header before reading a body. The
        caller owns the fds; if anything fails they are closed. Raises as
        :meth:`receive_header` and :meth:`receive_exactly`, and
        :class:`RemoteProtocolError` for a header that does not decode.
        """
        raw, fds = await self.receive_header()
        try:
            header = Header.decode(raw)
            body = await self.receive_exactly(header.size) if header.size else b""
        except BaseException:
            close_all(fds)
            raise
        return header, body, fds

    async def receive_exactly(self, n: int) -> bytes:
        """Receive exactly ``n`` bytes: the body of the message whose header came last.

        Always a checkpoint (also for ``n == 0``). ``n`` must have been validated by the
        caller (the protocol layer caps body sizes): a buffer of ``n`` bytes is allocated.

        Raises:
            Disconnect: The peer closed or reset the connection before ``n`` bytes came.
            RemoteProtocolError: Fds or other control data arrived with the body (fds
                belong with the header); they are closed.
            trio.BrokenResourceError: An earlier receive left the stream mid-message.
            trio.ClosedResourceError: The transport is closed, or was closed meanwhile.
            trio.BusyResourceError: Another task is receiving.

        Cancellation: a cancelled body read (``n > 0``), even one that consumed nothing,
        leaves the stream inside a message whose header is gone: later receives raise
        ``BrokenResourceError`` and the connection must be closed. Don't cancel between
        :meth:`receive_header` and the end of this call except to tear the connection down.
        """
        if n < 0:
            raise ValueError(f"negative body size {n}")
        with self._receive_guard:
            self._check_receivable()
            if n == 0:
                await trio.lowlevel.checkpoint()
                return b""
            buf = bytearray(n)
            view = memoryview(buf)
            got = 0
            try:
                while got < n:
                    nbytes, fds, problem = await self._receive_into(view[got:])
                    got += nbytes
                    if fds:
                        close_all(fds)
                        problem = f"{len(fds)} fd(s) came with the body, not the header"
                    if problem is not None:
                        raise RemoteProtocolError(f"message body: {problem}")
                    if nbytes == 0:
                        raise Disconnect(
                            f"the peer closed the connection after {got} of {n} body bytes"
                        )
            except BaseException as exc:
                self._receive_broken = f"a receive failed inside a body: {exc!r}"
                raise
            return bytes(buf)

    async def send(self, data: Buffer, fds: Sequence[int] = ()) -> None:
        """Send one whole message, with ``fds`` attached to its first byte.

        Always a checkpoint. Concurrent senders are serialised by a :class:`trio.Lock`, so
        frames never interleave. Partial writes are looped; the fds go with the first
        ``sendmsg`` only. Once the first byte is written the rest is written inside a
        shielded cancel scope, so a frame is never half-written.

        Args:
            data: The encoded message (header and body).
            fds: Descriptors to pass; the caller keeps ownership (the kernel duplicates
                them into the message).

        Raises:
            LocalProtocolError: More than ``MAX_FDS`` fds, or fds with no data to carry them.
            Disconnect: The peer is gone (``EPIPE``/``ECONNRESET``).
            trio.BrokenResourceError: An earlier send failed half-way.
            trio.ClosedResourceError: The transport is closed, or was closed meanwhile.

        Cancellation: a send cancelled while waiting for the lock or for room in the socket
        buffer has written nothing. Once anything is written, cancellation is deferred
        until the frame is complete. A peer that stops reading can therefore hold a send
        forever: close the transport (from another task) to abort it.
        """
        if len(fds) > MAX_FDS:
            raise LocalProtocolError(f"{len(fds)} fds in one message; at most {MAX_FDS}")
        view = memoryview(data).cast("B")
        total = view.nbytes
        if fds and total == 0:
            raise LocalProtocolError("fds need at least one data byte to travel with")
        ancdata = (
            [(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SCM_RIGHTS, array.array("i", fds))]
            if fds
            else []
        )
        async with self._send_lock:
            if self._send_broken is not None:
                raise trio.BrokenResourceError(self._send_broken)
            sent = 0
            try:
                with map_socket_errors("send"):
                    # Cancellable: trio raises Cancelled only if nothing was written.
                    sent = await self._sock.sendmsg([view], ancdata, _SEND_FLAGS)
                    if sent < total:
                        with trio.CancelScope(shield=True):
                            while sent < total:
                                sent += await self._sock.send(view[sent:], _SEND_FLAGS)
            except BaseException as exc:
                if 0 < sent < total:
                    self._send_broken = f"a send failed after {sent} of {total} bytes: {exc!r}"
                raise

    def close(self) -> None:
        """Close the socket; idempotent. Tasks blocked on it get ClosedResourceError."""
        close_trio_socket(self._sock)

    async def aclose(self) -> None:
        """Close the socket; idempotent. Always a checkpoint; closes even if cancelled."""
        self.close()
        await trio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        return f"<UnixTransport fd={self._sock.fileno()}>"

    def _check_receivable(self) -> None:
        if self._receive_broken is not None:
            raise trio.BrokenResourceError(self._receive_broken)

    async def _receive_into(self, view: memoryview) -> tuple[int, list[OwnedFd], str | None]:
        """Do one recvmsg; return bytes read, the fds (owned), and a problem or None."""
        with map_socket_errors("receive"):
            nbytes, ancdata, msg_flags, _ = await self._sock.recvmsg_into(
                [view], _ANCBUFSIZE, _RECV_FLAGS
            )
        fds, unexpected = take_fds(ancdata)
        problem = None
        if msg_flags & _stdlib_socket.MSG_CTRUNC:
            problem = f"control data truncated (MSG_CTRUNC): more than {MAX_FDS + _FD_SLACK} fds"
        elif unexpected:
            problem = "control data other than SCM_RIGHTS"
        if fds:
            LOGGER.debug("received %d byte(s) with %d fd(s)", nbytes, len(fds))
        return nbytes, fds, problem


@final
class UnixListener(trio.abc.Listener[UnixTransport]):
    """A listening AF_UNIX socket whose :meth:`accept` returns :class:`UnixTransport`.

    Made by :func:`open_unix_listener`; usable with :func:`trio.serve_listeners`.

    Resource handling:
        Owns the listening socket. :meth:`close`/:meth:`aclose` (idempotent) close it and
        remove the socket file, but only if the path still names the socket we bound (a
        newer server may have replaced it). Accepted transports belong to the caller.

    Error handling:
        Transient per-connection accept errors (``ECONNABORTED``, ``EPROTO``, ``EPERM``)
        are skipped. Others, including fd exhaustion (``EMFILE``/``ENFILE``), propagate:
        the server decides whether to back off.
    """

    __slots__ = ("_bound", "_path", "_sock")

    def __init__(self, sock: trio.socket.SocketType, path: str) -> None:
        """Take ownership of a bound, listening AF_UNIX socket at ``path``."""
        self._sock = sock
        self._path = path
        self._bound: tuple[int, int] | None = None
        if path and not path.startswith("\0"):
            st = os.stat(path)
            self._bound = (st.st_dev, st.st_ino)

    @property
    def path(self) -> str:
        """The filesystem path (or abstract name starting with NUL) listened on."""
        return self._path

    @property
    def socket(self) -> trio.socket.SocketType:
        """The listening trio socket (still owned by the listener)."""
        return self._sock

    async def accept(self) -> UnixTransport:
        """Wait for the next frontend and return its transport.

        Always a checkpoint. Cancellation accepts nothing (no connection is lost).

        Raises:
            trio.ClosedResourceError: The listener is closed, or was closed meanwhile.
            OSError: An accept error other than the transient ones listed on the class.
        """
        while True:
            try:
                with map_socket_errors("accept"):
                    sock, _ = await self._sock.accept()
            except OSError as exc:
                if exc.errno not in _TRANSIENT_ACCEPT_ERRNOS:
                    raise
                LOGGER.debug("skipping a failed accept on %s: %s", self._path, exc)
            else:
                return UnixTransport(sock)

    def close(self) -> None:
        """Stop listening and remove our socket file; idempotent."""
        if self._sock.fileno() == -1:
            return
        close_trio_socket(self._sock)
        if self._bound is not None:
            with contextlib.suppress(OSError):
                st = os.stat(self._path)
                if (st.st_dev, st.st_ino) == self._bound:
                    os.unlink(self._path)

    async def aclose(self) -> None:
        """Like :meth:`close`. Always a checkpoint; closes even if cancelled."""
        self.close()
        await trio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        return f"<UnixListener path={self._path!r} fd={self._sock.fileno()}>"


_TRANSIENT_ACCEPT_ERRNOS: Final = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
#: Poll interval of :func:`open_unix_connection` while the server's backlog is full.
_BACKLOG_RETRY_S: Final = 0.01


async def open_unix_listener(path: str, *, backlog: int = 8) -> UnixListener:
    """Listen for frontends on the unix socket ``path``.

    A socket file left behind by a dead server is removed (checked by connecting to it:
    a live server sees one connection that closes at once). A path starting with NUL is
    an abstract socket and has no file. Always a checkpoint; cancellation leaves no
    socket open (the file may remain, and the next call removes it as stale).

    Raises:
        OSError: ``EADDRINUSE`` if a live server owns ``path`` or it is not a socket;
            any error of ``bind``/``listen`` (permissions, path too long).
    """
    if not path.startswith("\0"):
        clear_stale_socket(path)
    sock = trio.socket.from_stdlib_socket(new_unix_socket())
    try:
        await sock.bind(path)
        sock.listen(backlog)
        return UnixListener(sock, path)
    except BaseException:
        close_trio_socket(sock)
        raise


async def open_unix_connection(path: str) -> UnixTransport:
    """Connect to the vhost-user server listening on ``path`` (the client role).

    Always a checkpoint. While the server's backlog is full the connect is retried every
    10 ms (a unix socket cannot wait for that). Cancellation closes the half-made socket.

    Raises:
        OSError: ``ENOENT``/``ECONNREFUSED`` and other connect errors.
    """
    sock = new_unix_socket()
    try:
        await trio.lowlevel.checkpoint()
        while True:
            try:
                sock.connect(path)
            except BlockingIOError:
                await trio.sleep(_BACKLOG_RETRY_S)
            else:
                return UnixTransport.from_socket(sock)
    except BaseException:
        sock.close()
        raise
