"""The shared in-flight region of INFLIGHT_SHMFD, for split rings (spec "Inflight I/O tracking").

The backend records in a buffer the frontend keeps (a memfd created for GET_INFLIGHT_FD,
handed back with SET_INFLIGHT_FD after a reconnect) which chains it has popped and not yet
completed, so that a new backend process can complete them after a crash.

Layout, one region per queue, queue ``i`` at ``i * queue_stride(queue_size)``::

    u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
    { u8 inflight; u8 padding[5]; u16 next; u64 counter; } desc[desc_num];

The stride is rounded up to 64 bytes (what libvhost-user and QEMU allocate).

Protocol (:class:`InflightQueue`), for every batch:

* popped: ``desc[h].counter`` gets the next values of the queue's counter, then
  ``desc[h].inflight = 1`` (:meth:`~InflightQueue.popped`), before the device sees a chain;
* published: the heads are linked into the "last batch" list (``desc[h].next`` and
  ``last_batch_head``) before the used ring is written; after ``used.idx`` moved,
  ``inflight`` is cleared and ``used_idx`` set to ``used.idx``
  (:meth:`~InflightQueue.publishing` / :meth:`~InflightQueue.published`);
* on start (:meth:`~InflightQueue.recover`): if ``used_idx`` differs from ``used.idx`` the
  backend died between the two steps of a publish: the ``used.idx - used_idx`` entries of
  the last batch list are cleared. The entries still in flight are resubmitted in counter
  order, and the ring resumes at ``used.idx + in-flight count``: every chain popped before
  is either used or in flight.

Resource handling: an :class:`InflightRegion` owns its fd and mapping; :meth:`close`
releases both (the mapping when no view of it survives).
"""

from __future__ import annotations

import logging
import mmap
import os
from typing import Final, final

import numpy as np
from numpy.typing import NDArray

from ._fd import OwnedFd
from .errors import DeviceError

__all__ = ["HEADER_SIZE", "InflightQueue", "InflightRegion", "queue_stride"]

LOGGER = logging.getLogger(__name__)

#: The version of the split-ring region layout; 0 marks an uninitialized buffer.
VERSION: Final = 1
HEADER_SIZE: Final = 16
_ALIGN: Final = 64
_U16: Final = 0xFFFF

_HEADER: Final = np.dtype(
    [
        ("features", "<u8"),
        ("version", "<u2"),
        ("desc_num", "<u2"),
        ("last_batch_head", "<u2"),
        ("used_idx", "<u2"),
    ]
)
_DESC: Final = np.dtype(
    [("inflight", "u1"), ("padding", "u1", (5,)), ("next", "<u2"), ("counter", "<u8")]
)
assert _HEADER.itemsize == HEADER_SIZE
assert _DESC.itemsize == 16


def queue_stride(queue_size: int) -> int:
    """Return the bytes one queue's region takes (header and descriptors, 64-aligned)."""
    raw = HEADER_SIZE + _DESC.itemsize * queue_size
    return (raw + _ALIGN - 1) // _ALIGN * _ALIGN


def region_size(num_queues: int, queue_size: int) -> int:
    """Return the bytes of a whole region for ``num_queues`` queues of ``queue_size``."""
    return num_queues * queue_stride(queue_size)


@final
class InflightQueue:
    """The in-flight records of one queue, as numpy views of the shared region.

    Not thread-safe: used by the ring's worker, and by the control task while it is
    stopped.
    """

    __slots__ = ("_counter", "_desc", "_hdr", "_resubmit", "_size")

    def __init__(self, buf: memoryview, desc_num: int) -> None:
        self._hdr: NDArray[np.void] = np.frombuffer(buf, _HEADER, 1, 0)
        self._desc: NDArray[np.void] = np.frombuffer(buf, _DESC, desc_num, HEADER_SIZE)
        self._size = desc_num
        self._counter = 0
        self._resubmit: NDArray[np.uint16] = np.zeros(0, dtype=np.uint16)

    @property
    def header(self) -> dict[str, int]:
        """The header fields, as plain ints (for tests and logs)."""
        row = self._hdr[0]
        return {name: int(row[name]) for name in _HEADER.names or ()}

    def in_flight(self) -> NDArray[np.uint16]:
        """The heads marked in flight, in counter order."""
        desc = self._desc
        heads = np.flatnonzero(desc["inflight"]).astype(np.uint16)
        order = np.argsort(desc["counter"][heads], kind="stable")
        result: NDArray[np.uint16] = heads[order]
        return result

    def recover(self, used_idx: int, ring_size: int) -> NDArray[np.uint16] | None:
        """Prepare the region for a ring starting with ``used.idx == used_idx``.

        An uninitialized region (version 0) is initialized and None returned: nothing is
        known about earlier runs. Otherwise the last batch is reconciled with ``used_idx``
        and the chains still in flight are returned, in the order they were popped; they
        are also kept for :meth:`take_resubmit`.

        Raises:
            DeviceError: the region does not fit the ring (other size, unknown version, a
                head beyond the ring).
        """
        hdr = self._hdr
        version = int(hdr["version"][0])
        if ring_size > self._size:
            raise DeviceError(
                f"ring of {ring_size} does not fit an in-flight region of {self._size}"
            )
        if version == 0:
            self._desc["inflight"] = 0
            self._desc["counter"] = 0
            hdr["features"] = 0
            hdr["desc_num"] = self._size
            hdr["last_batch_head"] = 0
            hdr["used_idx"] = used_idx
            hdr["version"] = VERSION
            self._counter = 1
            self._resubmit = np.zeros(0, dtype=np.uint16)
            return None
        if version != VERSION or int(hdr["desc_num"][0]) != self._size:
            raise DeviceError(
                f"in-flight region version {version}, {int(hdr['desc_num'][0])} entries:"
                f" expected version {VERSION}, {self._size}"
            )
        lost = (used_idx - int(hdr["used_idx"][0])) & _U16
        if lost:
            # The backend died after used.idx moved and before the batch was cleared.
            if lost > self._size:
                raise DeviceError(f"used.idx is {lost} ahead of the in-flight region")
            head = int(hdr["last_batch_head"][0])
            desc = self._desc
            for _ in range(lost):
                if head >= self._size:
                    raise DeviceError(f"in-flight batch list reaches head {head}")
                desc["inflight"][head] = 0
                head = int(desc["next"][head])
            hdr["used_idx"] = used_idx
        heads = self.in_flight()
        if len(heads) and int(heads.max()) >= ring_size:
            raise DeviceError(f"in-flight head {int(heads.max())} beyond a ring of {ring_size}")
        counters = self._desc["counter"]
        self._counter = int(counters.max()) + 1 if self._size else 1
        self._resubmit = heads
        return heads

    def take_resubmit(self) -> NDArray[np.uint16]:
        """Return (once) the heads :meth:`recover` found in flight."""
        heads, self._resubmit = self._resubmit, np.zeros(0, dtype=np.uint16)
        return heads

    def popped(self, heads: NDArray[np.integer] | list[int]) -> None:
        """Record chains taken from the available ring, in the order they were popped."""
        k = len(heads)
        if not k:
            return
        desc = self._desc
        start = self._counter
        desc["counter"][heads] = np.arange(start, start + k, dtype=np.uint64)
        self._counter = start + k
        desc["inflight"][heads] = 1

    def publishing(self, heads: NDArray[np.integer] | list[int]) -> None:
        """Link the batch about to be published into the last-batch list (before used ring)."""
        k = len(heads)
        if not k:
            return
        arr = np.asarray(heads, dtype=np.uint16)
        nxt = self._desc["next"]
        nxt[arr[1:]] = arr[:-1]
        nxt[arr[0]] = self._hdr["last_batch_head"][0]
        self._hdr["last_batch_head"] = arr[-1]

    def published(self, heads: NDArray[np.integer] | list[int], used_idx: int) -> None:
        """Clear the batch once ``used.idx`` is ``used_idx`` (after :meth:`publishing`)."""
        if len(heads):
            self._desc["inflight"][heads] = 0
        self._hdr["used_idx"] = used_idx


@final
class InflightRegion:
    """The mapped region of all queues: created for GET_INFLIGHT_FD or received by SET.

    Attributes:
        num_queues, queue_size: what the region was made for.
        mmap_size, mmap_offset: where it lies in :attr:`fd`.
    """

    def __init__(
        self, fd: OwnedFd, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int
    ) -> None:
        """Map ``mmap_size`` bytes of ``fd`` at ``mmap_offset``; the region owns ``fd``.

        Raises:
            DeviceError: the sizes do not fit, or the fd cannot be mapped.
        """
        need = region_size(num_queues, queue_size)
        if not num_queues or not queue_size or mmap_size < need:
            raise DeviceError(
                f"in-flight region of {mmap_size} bytes, {num_queues} queues of {queue_size}"
                f" need {need}"
            )
        base = mmap_offset - mmap_offset % mmap.ALLOCATIONGRANULARITY
        skip = mmap_offset - base
        try:
            if os.fstat(fd.fd).st_size < mmap_offset + mmap_size:
                raise DeviceError("the in-flight fd is smaller than the region")
            self._map = mmap.mmap(fd.fd, skip + mmap_size, mmap.MAP_SHARED, offset=base)
        except (OSError, ValueError, OverflowError) as exc:
            raise DeviceError(f"cannot map the in-flight region: {exc}") from exc
        self.fd = fd
        self.mmap_size = mmap_size
        self.mmap_offset = mmap_offset
        self.num_queues = num_queues
        self.queue_size = queue_size
        view = memoryview(self._map)[skip:]
        stride = queue_stride(queue_size)
        self._queues = [
            InflightQueue(view[i * stride : (i + 1) * stride], queue_size)
            for i in range(num_queues)
        ]
        view.release()

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> InflightRegion:
        """Create a zeroed region in a new memfd (GET_INFLIGHT_FD).

        Raises:
            DeviceError: the memfd cannot be created or mapped.
        """
        size = region_size(num_queues, queue_size)
        try:
            fd = OwnedFd(os.memfd_create("trio-vhost-inflight", os.MFD_CLOEXEC))
        except OSError as exc:
            raise DeviceError(f"cannot create the in-flight memfd: {exc}") from exc
        try:
            try:
                os.ftruncate(fd.fd, size)
            except OSError as exc:
                raise DeviceError(f"cannot size the in-flight memfd: {exc}") from exc
            return cls(fd, size, 0, num_queues, queue_size)
        except BaseException:
            fd.close()
            raise

    def queue(self, index: int) -> InflightQueue | None:
        """The records of queue ``index``, or None if the region has no such queue."""
        if 0 <= index < len(self._queues):
            return self._queues[index]
        return None

    def close(self) -> None:
        """Drop the views, unmap (if no view survives) and close the fd."""
        self._queues = []
        try:
            self._map.close()
        except BufferError:
            LOGGER.debug("in-flight region still viewed; unmapped when the views go")
        self.fd.close()
