"""OwnedFd: a file descriptor with exactly one owner.

Every fd that arrives over SCM_RIGHTS or is created by the library is wrapped at once,
so that every error path can close what it holds without double-closing.
"""

from __future__ import annotations

import os
import warnings
from typing import Final, final

import trio

__all__ = ["OwnedFd", "close_all"]

_CLOSED: Final = -1


@final
class OwnedFd:
    """Own one file descriptor; ``close()`` is idempotent.

    ``close()`` calls :func:`trio.lowlevel.notify_closing` first when trio is running, so
    a task parked in ``wait_readable`` on the fd wakes with ``ClosedResourceError``
    instead of waiting on a number the kernel may hand out again.
    """

    __slots__ = ("__weakref__", "_fd")

    def __init__(self, fd: int) -> None:
        if fd < 0:
            raise ValueError(f"not a file descriptor: {fd}")
        self._fd = fd

    @property
    def fd(self) -> int:
        """Return the descriptor number; raise ``ValueError`` once closed."""
        if self._fd == _CLOSED:
            raise ValueError("OwnedFd is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        """Whether the descriptor has been closed or detached."""
        return self._fd == _CLOSED

    def fileno(self) -> int:
        """Return the descriptor number (for APIs that take file-like objects)."""
        return self.fd

    def detach(self) -> int:
        """Give up ownership and return the raw descriptor; the caller must close it."""
        fd = self.fd
        self._fd = _CLOSED
        return fd

    def dup(self) -> OwnedFd:
        """Return a new owner of a duplicate of this descriptor (close-on-exec)."""
        return OwnedFd(os.dup(self.fd))

    def close(self) -> None:
        """Close the descriptor once; later calls do nothing."""
        fd = self._fd
        if fd == _CLOSED:
            return
        self._fd = _CLOSED
        _notify_closing(fd)
        os.close(fd)

    def __enter__(self) -> OwnedFd:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OwnedFd({self._fd})" if self._fd != _CLOSED else "OwnedFd(closed)"

    def __del__(self) -> None:
        fd = self._fd
        if fd != _CLOSED:
            self._fd = _CLOSED
            warnings.warn(f"OwnedFd({fd}) was never closed", ResourceWarning, stacklevel=1)
            try:
                os.close(fd)
            except OSError:
                pass


def _notify_closing(fd: int) -> None:
    try:
        trio.lowlevel.notify_closing(fd)
    except RuntimeError:
        pass  # not inside trio.run: nobody can be waiting on it


def close_all(fds: list[OwnedFd] | tuple[OwnedFd, ...]) -> None:
    """Close every fd in ``fds`` (used on error paths)."""
    for owned in fds:
        owned.close()
