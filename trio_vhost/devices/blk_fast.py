"""The virtio-blk array path: a whole batch of reads and writes with numpy, one syscall each.

:meth:`BlkDevice.process_arrays <trio_vhost.devices.blk.BlkDevice.process_arrays>` hands a
:class:`~trio_vhost.vring.batch.ChainBatch` here. The requests that can only succeed (an IN or
OUT of whole sectors inside the image, laid out the way every driver lays them out) are
picked with numpy, without a Python object per chain or per descriptor:

* the chain is ``[16-byte readable header][data buffers, all one direction][1-byte writable
  status]``, direct or in an indirect table (the queue followed it and checked every buffer
  to lie in guest memory, one region each: :attr:`ChainBatch.segments`);
* the headers of all candidates are copied out of guest memory with one fancy index per
  region (read once: only the copy is used), and their types and sectors checked at once;
* then one ``preadv`` / ``pwritev`` per request straight between the image and a memoryview
  of the guest's buffer, its byte count checked, and the status bytes stored with one
  fancy assignment per region, after all the data.

Every other chain (another request type, an odd layout, a chain the queue walked, a request
that will fail: out of range, partial sector, a write to a read-only image) goes through the
per-chain code of :class:`BlkDevice`, so its status and used length are exactly those of the
chain path. Those requests run in ring order among the fast ones, so the image sees the
requests of a batch in the order of the ring, as on the chain path. A request whose system
call fails gets IOERR alone; the others of the batch are unaffected. With the write cache
off, the batch's writes are made durable by one ``fdatasync`` before any status is stored
(the chain path syncs after each write; either way no write is reported before it is
durable).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import numpy as np

from .blk_spec import REQUEST_HEADER, SECTOR_SIZE, RequestType, Status

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from ..mem.table import MemoryTable
    from ..vring.batch import ChainBatch, Segments
    from .blk import BlkDevice

__all__ = ["FAST_MIN", "IOV_MAX", "process_batch_arrays"]

LOGGER = logging.getLogger(__name__)

#: Linux caps one preadv/pwritev at IOV_MAX buffers; a request with more takes the chain path.
IOV_MAX: Final = 1024
#: Fewer fast requests than this go through the per-chain code: the numpy path costs a fixed
#: ~15 us per batch, the chain path ~6 us more per request than the numpy one.
FAST_MIN: Final = 3

# 0-d constants in the dtype of the arrays they meet: numpy combines those ~4x faster
_HEADER_BYTES: Final = np.arange(REQUEST_HEADER.size, dtype=np.intp)
_HEADER_LEN: Final = np.array(REQUEST_HEADER.size, dtype=np.uint32)
_ONE: Final = np.array(1, dtype=np.uint32)
_IN: Final = np.array(RequestType.IN, dtype=np.uint32)
_OUT: Final = np.array(RequestType.OUT, dtype=np.uint32)
_SECTOR_MASK: Final = np.array(SECTOR_SIZE - 1, dtype=np.uint64)
_SECTOR_SHIFT: Final = np.array(SECTOR_SIZE.bit_length() - 1, dtype=np.uint64)
# The status bytes are stored straight from the "failed" booleans.
assert (Status.OK, Status.IOERR) == (0, 1)


def process_batch_arrays(
    device: BlkDevice, memory: MemoryTable, batch: ChainBatch, one: Callable[[int], int]
) -> NDArray[np.uint32]:
    """Carry out every request of ``batch``; return the used length of each.

    ``one(position)`` carries out the request at a batch position through the per-chain
    code and returns its used length; it is called for every request the fast path does
    not take, in ring order among the fast ones (so requests reach the image in the order
    of the ring, as on the chain path). Like the chain path, the used length is the whole
    device-writable size of the chain.
    """
    count = batch.count
    seg = batch.segments
    fast = _pick(device, memory, seg, count) if seg.total >= 3 * FAST_MIN else None
    if fast is None:
        return np.array([one(pos) for pos in range(count)], dtype=np.uint32)
    if fast.positions is None:
        return _run(device, memory, seg, fast, None)
    written = np.zeros(count, dtype=np.uint32)
    slow = np.ones(count, dtype=np.bool_)
    slow[fast.positions] = False
    pending = _Pending(np.flatnonzero(slow).tolist(), fast.positions.tolist(), one, written)
    written[fast.positions] = _run(device, memory, seg, fast, pending)
    return written


class _Pending:
    """The requests left to the per-chain code, run in ring order among the fast ones."""

    __slots__ = ("_at", "_fast", "_one", "_positions", "_written")

    def __init__(
        self,
        positions: list[int],
        fast: list[int],
        one: Callable[[int], int],
        written: NDArray[np.uint32],
    ) -> None:
        self._positions = positions  # of the pending requests
        self._fast = fast  # of the fast requests
        self._one = one
        self._written = written
        self._at = 0

    def before(self, i: int) -> None:
        """Run every pending request that comes before the ``i``-th fast request."""
        self._until(self._fast[i])

    def rest(self) -> None:
        """Run the pending requests after the last fast one."""
        self._until(len(self._written))

    def _until(self, position: int) -> None:
        positions = self._positions
        while self._at < len(positions) and positions[self._at] < position:
            pos = positions[self._at]
            self._at += 1
            self._written[pos] = self._one(pos)


class _Fast:
    """The requests picked for the fast path, as arrays over them (in batch order)."""

    __slots__ = (
        "data_offset",
        "data_region",
        "file_offset",
        "length",
        "positions",
        "reads",
        "rows",
        "status_offset",
        "status_region",
    )

    def __init__(self) -> None:
        self.positions: NDArray[np.intp] | None = None  # batch positions; None: all
        self.length: NDArray[np.uint64] = _NO_U64  # data bytes
        self.file_offset: NDArray[np.uint64] = _NO_U64  # where in the image
        self.reads: NDArray[np.bool_] = _NO_BOOL  # IN (else OUT)
        self.data_offset: NDArray[np.uint64] = _NO_U64  # the one data buffer (single)
        self.data_region: NDArray[np.intp] | None = None  # None: region 0
        self.status_offset: NDArray[np.uint64] = _NO_U64  # the status byte
        self.status_region: NDArray[np.intp] | None = None
        # segment rows (first data buffer, status byte) when some request has several data
        # buffers; None when every request has exactly one
        self.rows: tuple[NDArray[np.intp], NDArray[np.intp]] | None = None

    def compress(self, picked: NDArray[np.intp]) -> None:
        """Keep only the requests at ``picked``."""
        self.positions = picked if self.positions is None else self.positions[picked]
        self.length = self.length[picked]
        self.file_offset = self.file_offset[picked]
        self.reads = self.reads[picked]
        self.data_offset = self.data_offset[picked]
        self.status_offset = self.status_offset[picked]
        if self.data_region is not None:
            self.data_region = self.data_region[picked]
        if self.status_region is not None:
            self.status_region = self.status_region[picked]
        if self.rows is not None:
            self.rows = (self.rows[0][picked], self.rows[1][picked])


_NO_U64: Final = np.zeros(0, dtype=np.uint64)
_NO_BOOL: Final = np.zeros(0, dtype=np.bool_)


def _pick(device: BlkDevice, memory: MemoryTable, seg: Segments, count: int) -> _Fast | None:
    """Pick the requests that can only succeed; None if too few."""
    fast = _Fast()
    if seg.uniform == 3:
        # The common batch: every chain is header, data, status (reshaped views, no copies).
        lens = seg.length.reshape(count, 3)
        flags = seg.writable.reshape(count, 3)
        offsets = seg.offset.reshape(count, 3)
        head_len, data_len, status_len = lens[:, 0], lens[:, 1], lens[:, 2]
        head_w, first_w, last_w, status_w = flags[:, 0], flags[:, 1], flags[:, 1], flags[:, 2]
        head_off, fast.data_offset, fast.status_offset = offsets[:, 0], offsets[:, 1], offsets[:, 2]
        if not seg.single_region:
            regions = seg.region.reshape(count, 3)
            fast.data_region, fast.status_region = regions[:, 1], regions[:, 2]
        head_region = None if seg.single_region else seg.region.reshape(count, 3)[:, 0]
        length = data_len.astype(np.uint64)
    else:
        start = seg.start
        counts = start[1:] - start[:-1]
        candidates = np.flatnonzero((counts >= 3) & (counts <= IOV_MAX + 2))
        if len(candidates) < FAST_MIN:
            return None
        fast.positions = candidates
        head = start[candidates]
        status = start[candidates + 1] - 1
        length_all, writable = seg.length, seg.writable
        head_len, status_len = length_all[head], length_all[status]
        head_w, status_w = writable[head], writable[status]
        # No readable buffer follows a writable one (checked when popped), so the data
        # buffers are all device-writable iff the first is, all readable iff the last is.
        first_w, last_w = writable[head + 1], writable[status - 1]
        head_off = seg.offset[head]
        fast.data_offset, fast.status_offset = seg.offset[head + 1], seg.offset[status]
        head_region = None if seg.single_region else seg.region[head]
        if not seg.single_region:
            fast.data_region, fast.status_region = seg.region[head + 1], seg.region[status]
        if np.count_nonzero(status - head == 2) == len(head):
            length = length_all[head + 1].astype(np.uint64)
        else:
            sums = np.zeros(len(length_all) + 1, dtype=np.uint64)
            np.cumsum(length_all, out=sums[1:])
            length = sums[status] - sums[head + 1]
            fast.rows = (head + 1, status)
    ok = head_len == _HEADER_LEN
    ok &= status_len == _ONE
    ok &= status_w
    ok &= ~head_w
    kind, sector = _headers(memory, head_off, head_region)
    reads = kind == _IN
    reads &= first_w
    if device.read_only:
        ok &= reads
    else:
        writes = kind == _OUT
        writes &= ~last_w
        ok &= reads | writes
    # in range, without overflow: sector <= capacity and len <= (capacity - sector) * 512
    capacity = np.array(device.capacity, dtype=np.uint64)
    ok &= (length & _SECTOR_MASK) == 0
    ok &= sector <= capacity
    ok &= length <= ((capacity - sector) << _SECTOR_SHIFT)
    fast.length, fast.file_offset, fast.reads = length, sector << _SECTOR_SHIFT, reads
    picked = np.count_nonzero(ok)
    if picked < FAST_MIN:
        return None
    if picked < len(ok):
        fast.compress(np.flatnonzero(ok))
    return fast


def _headers(
    memory: MemoryTable, offset: NDArray[np.uint64], region: NDArray[np.intp] | None
) -> tuple[NDArray[np.uint32], NDArray[np.uint64]]:
    """Copy the 16-byte request headers at ``offset``; return (type, sector) of each."""
    index = offset.astype(np.intp)[:, None] + _HEADER_BYTES
    regions = memory.regions
    if region is None:
        raw = regions[0].view[index]
    else:
        raw = np.empty((len(offset), REQUEST_HEADER.size), dtype=np.uint8)
        for r in np.unique(region).tolist():
            mine = region == r
            raw[mine] = regions[r].view[index[mine]]
    # struct virtio_blk_req: le32 type, le32 reserved, le64 sector
    return raw.view("<u4")[:, 0], raw.view("<u8")[:, 1]


def _run(
    device: BlkDevice, memory: MemoryTable, seg: Segments, fast: _Fast, pending: _Pending | None
) -> NDArray[np.uint32]:
    """Do the picked requests' I/O (and the ``pending`` ones in between), store their
    status bytes; return their used lengths."""
    failed = np.zeros(len(fast.reads), dtype=np.bool_)
    if fast.rows is None:
        _io_single(device, memory, fast, failed, pending)
    else:
        _io_vectored(device, memory, seg, fast, failed, pending)
    if pending is not None:
        pending.rest()
    if not device.writeback:
        writes = ~fast.reads
        if np.count_nonzero(writes & ~failed):
            try:
                os.fdatasync(device.fd)
            except OSError as exc:
                LOGGER.error("blk fdatasync after a batch of writes failed: %s", exc)
                failed |= writes
    _store_status(memory, fast, failed.view(np.uint8))
    used = fast.reads.astype(np.uint32)
    used *= fast.length.astype(np.uint32)
    used += _ONE
    return used


def _io_single(
    device: BlkDevice,
    memory: MemoryTable,
    fast: _Fast,
    failed: NDArray[np.bool_],
    pending: _Pending | None,
) -> None:
    """One data buffer per request: one ``preadv``/``pwritev`` of one memoryview slice."""
    fd = device.fd
    # Views of guest memory live only for this call (mem.region's rule).
    views = [r.view.data for r in memory.regions]
    regions = fast.data_region.tolist() if fast.data_region is not None else None
    jobs = zip(
        fast.data_offset.tolist(),
        fast.length.tolist(),
        fast.file_offset.tolist(),
        fast.reads.tolist(),
        strict=True,
    )
    preadv, pwritev = os.preadv, os.pwritev
    view = views[0]
    for i, (start, n, where, read) in enumerate(jobs):
        if pending is not None:
            pending.before(i)
        if regions is not None:
            view = views[regions[i]]
        buffer = view[start : start + n]
        try:
            done = preadv(fd, (buffer,), where) if read else pwritev(fd, (buffer,), where)
        except OSError as exc:
            _log_failure(read, where, exc)
            failed[i] = True
            continue
        if done != n:
            failed[i] = True


def _io_vectored(
    device: BlkDevice,
    memory: MemoryTable,
    seg: Segments,
    fast: _Fast,
    failed: NDArray[np.bool_],
    pending: _Pending | None,
) -> None:
    """Some requests have several data buffers: one ``preadv``/``pwritev`` of a list each."""
    assert fast.rows is not None
    fd = device.fd
    views = [r.view.data for r in memory.regions]
    region = [0] * seg.total if seg.single_region else seg.region.tolist()
    offset, length = seg.offset.tolist(), seg.length.tolist()
    first, end = fast.rows
    jobs = zip(
        first.tolist(),
        end.tolist(),
        fast.length.tolist(),
        fast.file_offset.tolist(),
        fast.reads.tolist(),
        strict=True,
    )
    for i, (a, b, n, where, read) in enumerate(jobs):
        if pending is not None:
            pending.before(i)
        buffers = [views[region[j]][offset[j] : offset[j] + length[j]] for j in range(a, b)]
        try:
            done = os.preadv(fd, buffers, where) if read else os.pwritev(fd, buffers, where)
        except OSError as exc:
            _log_failure(read, where, exc)
            failed[i] = True
            continue
        if done != n:
            failed[i] = True


def _log_failure(read: bool, where: int, exc: OSError) -> None:
    name = "IN" if read else "OUT"
    LOGGER.error("blk %s at sector %d failed: %s", name, where // SECTOR_SIZE, exc)


def _store_status(memory: MemoryTable, fast: _Fast, status: NDArray[np.uint8]) -> None:
    """Store each request's status byte with one assignment per region, after all the data."""
    offsets = fast.status_offset.astype(np.intp)
    regions = memory.regions
    where = fast.status_region
    if where is None:
        regions[0].view[offsets] = status
        return
    for r in np.unique(where).tolist():
        mine = where == r
        regions[r].view[offsets[mine]] = status[mine]
