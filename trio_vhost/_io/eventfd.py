"""Eventfds for vring kicks, calls and errors, awaited with trio.

An eventfd is a 64-bit counter: ``write(v)`` adds ``v``, a read returns the sum and
resets it to 0, and it is readable while non-zero. Kick fds are written by the frontend
and read by us; call and err fds are written by us and read by the frontend. Both sides
hold the same *open file description*, so its ``O_NONBLOCK`` flag is shared: fds from
QEMU may be blocking, and we must not change that flag under the frontend. Every read and
write here is therefore preceded by a zero-timeout ``poll`` when it might block.

Residual race (documented, not fixable without owning the flags): on a *blocking* fd,
if another reader empties the counter between our ``poll`` and our ``read`` (or another
writer fills it to the brim between ``poll`` and ``write``), the syscall blocks the
thread. The protocol gives each counter a single reader and writer per side, so only a
misbehaving frontend can do this, and only to its own connection's thread.

Model: trio's ``FdStream``/``_FdHolder`` (one owner per fd, ``notify_closing`` before
``close``, a conflict guard for concurrent waiters).
"""

from __future__ import annotations

import errno
import os
import select
from typing import Final, final

import trio

from trio_vhost._fd import OwnedFd
from trio_vhost._io._guard import ConflictGuard

__all__ = ["EventFd"]

#: The largest value an eventfd counter holds; a write that would exceed it blocks.
MAX_COUNTER: Final = 0xFFFF_FFFF_FFFF_FFFE


@final
class EventFd:
    """One end of an eventfd: wait for it, read it, signal it.

    Works for the backend (fds received over SCM_RIGHTS, blocking or not) and for the
    frontend or tests (:meth:`create`, then pass :attr:`fd` to ``UnixTransport.send``: the
    peer gets a duplicate of the same counter).

    Resource handling:
        Owns its :class:`~trio_vhost._fd.OwnedFd`; :meth:`close` (idempotent, also via
        ``with``) closes it after ``notify_closing``, so a task in :meth:`wait` wakes with
        :class:`trio.ClosedResourceError`. The file description's flags are never changed.

    Error handling:
        A closed fd raises :class:`trio.ClosedResourceError` everywhere; a second task in
        :meth:`wait` raises :class:`trio.BusyResourceError`; other ``OSError``\\ s propagate.
    """

    __slots__ = ("_guard", "_owned", "_poll_in", "_poll_out")

    def __init__(self, owned: OwnedFd) -> None:
        """Take ownership of ``owned``, which must be an eventfd (not checked)."""
        self._owned = owned
        self._guard = ConflictGuard("another task is already waiting on this eventfd")
        self._poll_in = select.poll()
        self._poll_in.register(owned.fd, select.POLLIN)
        self._poll_out = select.poll()
        self._poll_out.register(owned.fd, select.POLLOUT)

    @classmethod
    def create(cls, initval: int = 0) -> EventFd:
        """Create a new non-blocking, close-on-exec eventfd holding ``initval``."""
        fd = os.eventfd(initval, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        return cls(OwnedFd(fd))

    @property
    def fd(self) -> int:
        """The descriptor number; raises :class:`trio.ClosedResourceError` once closed."""
        if self._owned.closed:
            raise trio.ClosedResourceError("eventfd is closed")
        return self._owned.fd

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._owned.closed

    def fileno(self) -> int:
        """Return :attr:`fd` (for APIs that take file-like objects)."""
        return self.fd

    async def wait(self) -> int:
        """Wait until the counter is non-zero, then read and reset it.

        Always a checkpoint (a full one even when a value is already pending).

        Returns:
            The counter (>= 1): how many signals, summed, arrived since the last read.

        Raises:
            trio.ClosedResourceError: The eventfd is closed, or was closed while waiting.
            trio.BusyResourceError: Another task is already waiting on it.

        Cancellation: consumes nothing. The counter is read only after the wait is over,
        and once read the value is returned, so a signal is never lost to a cancel.
        """
        with self._guard:
            await trio.lowlevel.checkpoint_if_cancelled()
            value = self._read_if_ready()
            if value:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return value
            while True:
                await trio.lowlevel.wait_readable(self.fd)
                value = self._read_if_ready()
                if value:
                    return value
                # Readable but empty: a spurious wakeup, or another reader got there first.

    def read_nowait(self) -> int:
        """Read and reset the counter without blocking; return 0 if nothing is pending.

        Not a checkpoint. Safe on blocking fds (see the module doc for the residual race).

        Raises:
            trio.ClosedResourceError: The eventfd is closed.
        """
        return self._read_if_ready()

    def write(self, value: int = 1) -> None:
        """Add ``value`` to the counter, waking the reader; never blocks.

        Not a checkpoint. If the counter is too full to add ``value`` (only possible when
        the peer never reads and someone wrote a huge value), the reader is already
        signalled and the write is dropped: eventfd signals are level-triggered sums.

        Raises:
            ValueError: ``value`` is outside ``0..MAX_COUNTER``.
            trio.ClosedResourceError: The eventfd is closed.
        """
        if not 0 <= value <= MAX_COUNTER:
            raise ValueError(f"eventfd value out of range: {value}")
        fd = self.fd
        if not self._ready(self._poll_out):
            return
        try:
            os.eventfd_write(fd, value)
        except BlockingIOError:
            pass  # non-blocking fd and a counter near the top: already signalled
        except OSError as exc:
            _raise_closed_on_ebadf(exc)
            raise

    def close(self) -> None:
        """Close the eventfd once; a task in :meth:`wait` gets ClosedResourceError."""
        if not self._owned.closed:
            fd = self._owned.fd
            self._poll_in.unregister(fd)
            self._poll_out.unregister(fd)
        self._owned.close()

    def __enter__(self) -> EventFd:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<EventFd {self._owned!r}>"

    @staticmethod
    def _ready(poller: select.poll) -> bool:
        """Poll with a zero timeout; map a dead fd number to ClosedResourceError."""
        events = poller.poll(0)
        if events and events[0][1] & select.POLLNVAL:
            raise trio.ClosedResourceError("eventfd is not open")
        return bool(events)

    def _read_if_ready(self) -> int:
        fd = self.fd
        if not self._ready(self._poll_in):
            return 0
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return 0  # non-blocking fd emptied by another reader since the poll
        except OSError as exc:
            _raise_closed_on_ebadf(exc)
            raise


def _raise_closed_on_ebadf(exc: OSError) -> None:
    if exc.errno == errno.EBADF:
        raise trio.ClosedResourceError("eventfd is not open") from exc
