"""Dirty-page logging for live migration (VHOST_USER_PROTOCOL_F_LOG_SHMFD).

The frontend hands over a shared bitmap with SET_LOG_BASE: bit ``gpa // 4096`` (bit
``page % 8`` of byte ``page // 8``) says that guest page was modified by the backend. While
VHOST_F_LOG_ALL is acked the backend marks every guest write it makes; the frontend reads
the bitmap while migrating and sends the marked pages again.

Concurrency with the frontend (why no bit is ever lost): the frontend collects the bitmap
by atomically exchanging whole words with zero, concurrently with our marking. This side
only ever *sets* bits: a byte is updated as ``byte = byte | mask`` (a load and a byte
store), full bytes are stored as ``0xFF``. Take one byte update racing with the frontend's
exchange of the word holding it:

* the exchange lands before our load: we load the cleared byte and store ``mask``: our
  new bits are set, the frontend owns the old ones;
* it lands after our store: the frontend takes our new bits with the word;
* it lands between our load and our store: our store writes back ``old | mask``. The
  ``old`` bits it re-sets were already taken by the frontend, so those pages are sent
  once more (harmless, a page is only ever sent too often, never too rarely); our new
  ``mask`` bits stay set until the next exchange takes them.

In every order, a bit we set is either taken by the frontend or still set afterwards.

Threading rule: all marking happens in one thread, the trio thread of the vring workers.
The worker marks once a batch is published (see ``trio_vhost.worker``), also for devices
that do their I/O elsewhere: :class:`~trio_vhost.devices.blk_threaded.ThreadedBlkDevice`'s
thread writes guest memory but never marks; the worker marks the batch's writable buffers
after the thread returns and before anything else runs. A second backend *process* writing
the same byte of a shared log could in theory lose a bit of its own to our non-atomic
read-modify-write (QEMU shares one log among its vhost devices); Python offers no atomic
byte OR, and this library keeps to that documented limit.

Bounds: a range beyond what the log covers (``8 * size`` pages) raises
:class:`DirtyLogError`, a :class:`~trio_vhost.errors.GuestMemoryError`: the ring that wrote
it stops, as for any address outside guest memory; nothing is written out of bounds.
"""

from __future__ import annotations

import logging
import mmap
import os
from typing import Final, final

import numpy as np
from numpy.typing import NDArray

from ..errors import GuestMemoryError

__all__ = ["LOG_PAGE", "MAX_LOG_SIZE", "DirtyLog", "DirtyLogError"]

LOGGER = logging.getLogger(__name__)

#: The page size of the log (VHOST_LOG_PAGE).
LOG_PAGE: Final = 0x1000
_PAGE_SHIFT: Final = 12
#: The largest log accepted: 1 GiB of bitmap covers 32 TiB of guest addresses.
MAX_LOG_SIZE: Final = 1 << 30


class DirtyLogError(GuestMemoryError):
    """A write to log lies beyond the range the dirty log covers."""


@final
class DirtyLog:
    """The mapped dirty bitmap of SET_LOG_BASE.

    Attributes:
        size: the bitmap's size in bytes.
        limit: the first guest-physical address the log does not cover.
    """

    __slots__ = ("_mmap", "_view", "limit", "size")

    def __init__(self, mapping: mmap.mmap | None, view: NDArray[np.uint8]) -> None:
        """Wrap a bitmap view (prefer :meth:`map`; tests may pass ``mapping=None``)."""
        if len(view) == 0:
            raise DirtyLogError("empty dirty log")
        self._mmap = mapping
        self._view: NDArray[np.uint8] | None = view
        self.size: Final = len(view)
        self.limit: Final = len(view) * 8 * LOG_PAGE

    @classmethod
    def map(cls, fd: int, size: int, offset: int) -> DirtyLog:
        """Map ``size`` bytes of ``fd`` from ``offset`` shared read-write.

        The fd is not taken over (CPython's mmap keeps its own dup).

        Raises:
            DirtyLogError: bad numbers, a file too small, or mmap() failed.
        """
        if not 0 < size <= MAX_LOG_SIZE or not 0 <= offset < 1 << 63:
            raise DirtyLogError(f"bad dirty log size {size:#x} or offset {offset:#x}")
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            if os.fstat(fd).st_size < offset + size:
                raise DirtyLogError(f"dirty log fd is smaller than {offset + size:#x} bytes")
            mapping = mmap.mmap(
                fd,
                offset - start + size,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=start,
            )
        except (OSError, ValueError, OverflowError) as exc:
            raise DirtyLogError(f"cannot map dirty log: {exc}") from exc
        view = np.frombuffer(mapping, dtype=np.uint8, count=size, offset=offset - start)
        return cls(mapping, view)

    @property
    def view(self) -> NDArray[np.uint8]:
        """The bitmap as ``uint8``; do not keep it."""
        if self._view is None:
            raise DirtyLogError("dirty log is closed")
        return self._view

    def close(self) -> None:
        """Unmap the log; idempotent."""
        mapping, self._mmap, self._view = self._mmap, None, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                LOGGER.debug("dirty log still has views: unmapped when they are collected")

    def _check(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0 or gpa + length > self.limit:
            raise DirtyLogError(
                f"write [{gpa:#x}, +{length:#x}) lies beyond the dirty log ({self.limit:#x})"
            )

    def mark(self, gpa: int, length: int) -> None:
        """Mark every page of ``[gpa, gpa + length)`` dirty (nothing for length 0)."""
        self._check(gpa, length)
        if length == 0:
            return
        view = self.view
        first = gpa >> _PAGE_SHIFT
        last = (gpa + length - 1) >> _PAGE_SHIFT
        b0, b1 = first >> 3, last >> 3
        if b0 == b1:
            view[b0] |= ((0xFF << (first & 7)) & (0xFF >> (7 - (last & 7)))) & 0xFF
            return
        view[b0] |= (0xFF << (first & 7)) & 0xFF
        if b1 > b0 + 1:
            view[b0 + 1 : b1] = 0xFF  # every bit set: the same as OR-ing 0xFF
        view[b1] |= 0xFF >> (7 - (last & 7))

    def mark_ranges(self, addrs: NDArray[np.uint64], lengths: NDArray[np.integer]) -> None:
        """Mark the pages of many ranges at once; zero lengths are skipped.

        Raises:
            DirtyLogError: a range lies beyond the log; then nothing is marked.
        """
        addrs = np.asarray(addrs, dtype=np.uint64)
        lens = np.asarray(lengths, dtype=np.uint64)
        keep = lens > 0
        if not keep.all():
            addrs, lens = addrs[keep], lens[keep]
        if not len(addrs):
            return
        limit = np.uint64(self.limit)
        # No overflow: each operand is checked against the limit before the sum is formed.
        if (addrs > limit).any() or (lens > limit - np.minimum(addrs, limit)).any():
            bad = int(np.argmax((addrs > limit) | (lens > limit - np.minimum(addrs, limit))))
            self._check(int(addrs[bad]), int(lens[bad]))
        first = (addrs >> np.uint64(_PAGE_SHIFT)).astype(np.int64)
        last = ((addrs + lens - np.uint64(1)) >> np.uint64(_PAGE_SHIFT)).astype(np.int64)
        counts = last - first + 1
        if int(counts.max()) == 1:
            pages = np.unique(first)
        else:
            total = int(counts.sum())
            starts = np.repeat(first - (np.cumsum(counts) - counts), counts)
            pages = np.unique(starts + np.arange(total, dtype=np.int64))
        self._set_pages(pages)

    def _set_pages(self, pages: NDArray[np.int64]) -> None:
        """Set the bits of ``pages`` (sorted, unique)."""
        view = self.view
        byte = pages >> 3
        bits = (np.uint8(1) << (pages & 7).astype(np.uint8)).astype(np.uint8)
        cuts = np.flatnonzero(np.diff(byte, prepend=-1))
        masks = np.bitwise_or.reduceat(bits, cuts)
        where = byte[cuts]
        view[where] |= masks

    def pages(self) -> NDArray[np.int64]:
        """Return the marked page numbers (for tests and tools)."""
        return np.flatnonzero(np.unpackbits(self.view, bitorder="little")).astype(np.int64)
