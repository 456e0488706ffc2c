"""A guard against two tasks using one resource at the same time.

Our own twin of trio's internal ``ConflictDetector``: the second concurrent user gets
:class:`trio.BusyResourceError` at once instead of silently racing the first.
"""

from __future__ import annotations

from typing import final

import trio

__all__ = ["ConflictGuard"]


@final
class ConflictGuard:
    """Raise :class:`trio.BusyResourceError` when entered while already held."""

    __slots__ = ("_held", "_message")

    def __init__(self, message: str) -> None:
        self._held = False
        self._message = message

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._message)
        self._held = True

    def __exit__(self, *exc_info: object) -> None:
        self._held = False
