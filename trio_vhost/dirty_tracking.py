"""DirtyTracking: a session's dirty-page logging state, shared with its vring workers.

The bitmap itself and the argument why concurrent marking never loses a bit are in
:mod:`trio_vhost.mem.dirty`. This module decides *what* is marked: after a batch is
published, each completed chain's writable buffers up to its used length, and the whole
used ring (entries, idx, flags and avail_event), at ``log_guest_addr`` when the ring's
VringAddr has the LOG flag; the used ring again whenever the worker re-arms or suppresses
notifications (flags, avail_event). All marking happens in the trio thread of the workers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, final

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from ._io.eventfd import EventFd
    from .mem.dirty import DirtyLog
    from .vring.batch import ChainBatch, Segments
    from .vring.chain import DescriptorChain

__all__ = ["NO_TRACKING", "DirtyTracking"]

LOGGER = logging.getLogger(__name__)


@final
class DirtyTracking:
    """A session's logging state, shared with its workers.

    ``active`` is the one attribute a worker checks per batch: true while a log is set
    and VHOST_F_LOG_ALL is acked.
    """

    __slots__ = ("active", "call", "log", "log_all")

    def __init__(self) -> None:
        self.log: DirtyLog | None = None
        self.log_all = False
        self.call: EventFd | None = None
        self.active = False

    def _update(self) -> None:
        self.active = self.log is not None and self.log_all

    def set_log(self, log: DirtyLog | None) -> None:
        """Use ``log`` from now on (SET_LOG_BASE); the previous one is unmapped."""
        old, self.log = self.log, log
        self._update()
        if old is not None:
            old.close()

    def set_log_all(self, on: bool) -> None:
        """Record whether VHOST_F_LOG_ALL is acked (SET_FEATURES)."""
        self.log_all = on
        self._update()

    def set_call(self, call: EventFd | None) -> None:
        """Signal ``call`` after each batch that was logged (SET_LOG_FD)."""
        old, self.call = self.call, call
        if old is not None:
            old.close()

    def close(self) -> None:
        """Unmap the log and close the eventfd."""
        self.set_log(None)
        self.set_call(None)

    def _done(self) -> None:
        if self.call is not None:
            try:
                self.call.write(1)
            except OSError as exc:
                LOGGER.warning("cannot signal the log eventfd: %s", exc)

    def log_used(self, used_gpa: int, used_len: int) -> None:
        """Mark the used ring alone (its flags or avail_event changed)."""
        if self.log is not None:
            self.log.mark(used_gpa, used_len)
            self._done()

    def log_chains(
        self,
        chains: Sequence[DescriptorChain],
        completions: Sequence[tuple[int, int]],
        used_gpa: int,
        used_len: int,
    ) -> None:
        """Mark a published batch: each chain's writable buffers up to its used length,
        and the used ring (entries, idx, flags and avail_event: ``used_len`` bytes)."""
        log = self.log
        if log is None:
            return
        written = dict(completions)
        addrs: list[int] = [used_gpa]
        lens: list[int] = [used_len]
        for chain in chains:
            left = written.get(chain.head, 0)
            for gpa, n in chain.writable:
                if left <= 0:
                    break
                addrs.append(gpa)
                lens.append(min(n, left))
                left -= n
        log.mark_ranges(np.array(addrs, dtype=np.uint64), np.array(lens, dtype=np.uint64))
        self._done()

    def log_arrays(
        self,
        batch: ChainBatch,
        written: int | NDArray[np.uint32],
        used_gpa: int,
        used_len: int,
    ) -> None:
        """The array twin of :meth:`log_chains` for a published :class:`ChainBatch`.

        The same ranges as :meth:`log_chains` of ``batch.chains``: the followed chains'
        from :attr:`ChainBatch.segments` with no Python per buffer, the walked ones'
        one by one.
        """
        log = self.log
        if log is None:
            return
        lengths = np.broadcast_to(np.asarray(written, dtype=np.int64), (batch.count,))
        seg = batch.segments
        addrs = [np.array([used_gpa], dtype=np.uint64), seg.addr]
        lens = [np.array([used_len], dtype=np.uint64), _written_bytes(seg, lengths)]
        if batch.walked:
            c_addrs: list[int] = []
            c_lens: list[int] = []
            for position, chain in batch.walked.items():
                left = int(lengths[position])
                for gpa, n in chain.writable:
                    if left <= 0:
                        break
                    c_addrs.append(gpa)
                    c_lens.append(min(n, left))
                    left -= n
            addrs.append(np.array(c_addrs, dtype=np.uint64))
            lens.append(np.array(c_lens, dtype=np.uint64))
        log.mark_ranges(np.concatenate(addrs), np.concatenate(lens))
        self._done()


def _written_bytes(seg: Segments, used: NDArray[np.int64]) -> NDArray[np.uint64]:
    """How much of each buffer lies within its chain's used length (``used`` per chain).

    The used length counts the device-writable buffers in chain order: a writable buffer is
    covered up to what is left of the length after the writable buffers before it in its
    chain; a readable buffer never is.
    """
    if not seg.total:
        return np.zeros(0, dtype=np.uint64)
    room = np.where(seg.writable, seg.length, 0).astype(np.int64)
    before = np.zeros(seg.total + 1, dtype=np.int64)
    np.cumsum(room, out=before[1:])
    chain = seg.chain_index()
    # writable bytes of the same chain before each buffer
    prior = before[:-1] - before[seg.start[:-1]][chain]
    covered: NDArray[np.int64] = np.clip(used[chain] - prior, 0, room)
    return covered.astype(np.uint64)


#: The state of a worker started without a session (tests): never active.
NO_TRACKING: Final = DirtyTracking()
