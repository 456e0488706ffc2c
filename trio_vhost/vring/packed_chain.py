"""Building chains from the descriptors of a packed ring: one by one, or a whole batch.

In a packed ring a descriptor list is consecutive ring slots linked by VIRTQ_DESC_F_NEXT
("Next Flag: Descriptor Chaining"): there is no ``next`` index, so a list cannot loop; how
long it may be is bounded by the caller, who only hands over descriptors it has seen
available. The caller copies the list's descriptors out of the ring first; this module only
ever looks at that copy (and at its own copy of an indirect table), so the guest cannot
change what is being checked. The rules, each a :class:`VirtqueueError`:

* the chain's Buffer ID is the ``id`` of its LAST descriptor ("Buffer ID is included in the
  last descriptor in the list"); the ids of the others are ignored;
* INDIRECT only when VIRTIO_F_INDIRECT_DESC was negotiated, and only on a descriptor that is
  a list by itself (the driver MUST NOT write INDIRECT descriptors "in a scatter-gather list
  linked by VIRTQ_DESC_F_NEXT"); its WRITE flag is ignored (reserved there);
* an indirect table is ``len / 16`` descriptors: a non-zero multiple of 16 bytes, at most
  32768 entries, all used in order. In it "The VIRTQ_DESC_F_WRITE flags bit is the only
  valid flag ... Others are reserved and are ignored by the device": NEXT, INDIRECT, AVAIL,
  USED and the ids inside a table change nothing;
* device-writable elements come after all device-readable ones ("The driver MUST place any
  device-writable descriptor elements after any device-readable descriptor elements");
* the chain totals at most 2^32 bytes (the same cap as split rings, chain.py);
* every buffer and indirect table lies in guest memory; the table's
  :class:`GuestMemoryError` becomes the ``__cause__`` of the VirtqueueError.

Zero-length elements carry no data: they count for the readable/writable order and are left
out of ``readable`` / ``writable`` (their address is never used, so it is not checked).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import numpy as np
from numpy.typing import NDArray

from ..errors import GuestMemoryError, VirtqueueError
from ..mem.table import MemoryTable
from .batch import ChainBatch, RegionIndex, Segments
from .chain import MAX_CHAIN_BYTES, DescriptorChain
from .packed_layout import (
    MAX_INDIRECT_ENTRIES,
    PACKED_DESC_DTYPE,
    PACKED_DESC_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_WRITE,
)

__all__ = ["build_packed_batch", "build_packed_chain"]

_Range = tuple[int, int]
_FIELDS: Final = ("addr", "len", "flags")
_INDIRECT: Final = np.uint16(VIRTQ_DESC_F_INDIRECT)
_WRITE: Final = np.uint16(VIRTQ_DESC_F_WRITE)


def _error(buffer_id: int, position: int, message: str) -> VirtqueueError:
    return VirtqueueError(f"packed chain at slot {position} (buffer id {buffer_id}): {message}")


def _collect(
    table: MemoryTable,
    elements: Iterable[tuple[int, int, int]],
    buffer_id: int,
    position: int,
) -> DescriptorChain:
    """Sort ``(addr, len, flags)`` elements into readable and writable ranges, checking them."""
    readable: list[_Range] = []
    writable: list[_Range] = []
    total = readable_len = writable_len = 0
    writing = False
    for addr, length, flags in elements:
        if flags & VIRTQ_DESC_F_WRITE:
            writing = True
        elif writing:
            raise _error(buffer_id, position, "a device-readable element follows a writable one")
        if not length:
            continue
        total += length
        if total > MAX_CHAIN_BYTES:
            raise _error(buffer_id, position, "buffers total more than 2^32 bytes")
        try:
            table.check(addr, length)
        except GuestMemoryError as exc:
            raise _error(
                buffer_id, position, f"buffer [{addr:#x}, +{length:#x}) is not guest memory"
            ) from exc
        if writing:
            writable.append((addr, length))
            writable_len += length
        else:
            readable.append((addr, length))
            readable_len += length
    return DescriptorChain(buffer_id, tuple(readable), tuple(writable), readable_len, writable_len)


def _rows(descriptors: NDArray[np.void]) -> list[tuple[int, int, int]]:
    """The ``(addr, len, flags)`` of each descriptor, as Python ints."""
    columns = [descriptors[name].tolist() for name in _FIELDS]
    return list(zip(*columns, strict=True))


def build_packed_chain(
    table: MemoryTable, descriptors: NDArray[np.void], position: int, *, indirect: bool
) -> DescriptorChain:
    """Return the chain of one descriptor list, copied out of the ring.

    Args:
        table: the memory table to check every buffer against.
        descriptors: the list's descriptors (``PACKED_DESC_DTYPE``), in ring order, a private
            copy; the caller has checked that all were available, that the last one ends the
            list and the others have NEXT.
        position: the ring index of the first descriptor (for error messages).
        indirect: VIRTIO_F_INDIRECT_DESC was negotiated.

    Raises:
        VirtqueueError: the list breaks a rule listed in the module docstring.
    """
    buffer_id = int(descriptors["id"][-1])
    flags: NDArray[np.uint16] = descriptors["flags"]
    if not np.count_nonzero(flags & VIRTQ_DESC_F_INDIRECT):
        return _collect(table, _rows(descriptors), buffer_id, position)
    if len(descriptors) > 1:
        raise _error(buffer_id, position, "an INDIRECT descriptor in a list linked by NEXT")
    if not indirect:
        raise _error(buffer_id, position, "INDIRECT but VIRTIO_F_INDIRECT_DESC not negotiated")
    addr, length = int(descriptors["addr"][0]), int(descriptors["len"][0])
    if length == 0 or length % PACKED_DESC_SIZE:
        raise _error(buffer_id, position, f"indirect table length {length} is not n * 16 > 0")
    if length > MAX_INDIRECT_ENTRIES * PACKED_DESC_SIZE:
        raise _error(buffer_id, position, f"indirect table of {length // 16} entries is too long")
    try:
        raw = table.read(addr, length)  # the copy we walk: read once
    except GuestMemoryError as exc:
        message = f"indirect table at {addr:#x} is not guest memory"
        raise _error(buffer_id, position, message) from exc
    entries = np.frombuffer(raw, dtype=PACKED_DESC_DTYPE)
    return _collect(table, _rows(entries), buffer_id, position)


def build_packed_batch(
    table: MemoryTable,
    regions: RegionIndex,
    rows: NDArray[np.void],
    starts: NDArray[np.intp],
    ends: NDArray[np.intp],
    ids: NDArray[np.uint16],
    *,
    first_slot: int,
    size: int,
    indirect: bool,
) -> ChainBatch:
    """Build the :class:`ChainBatch` of consecutive lists: direct ones as arrays, others walked.

    Args:
        table: the memory table to check every buffer against.
        regions: the same table's :class:`RegionIndex`.
        rows: the batch's descriptors (a private copy), in ring order.
        starts: the offset in ``rows`` of each list's first descriptor.
        ends: the offset of each list's last descriptor (no NEXT; every other has NEXT).
        ids: each list's Buffer ID (the ``id`` of its last descriptor).
        first_slot: the ring index of ``rows[0]`` (for error messages).
        size: the Queue Size.
        indirect: VIRTIO_F_INDIRECT_DESC was negotiated.

    A list is followed with numpy only if :func:`build_packed_chain` would accept it and
    return exactly these buffers: no INDIRECT, every buffer non-empty and inside ONE region,
    no readable buffer after a writable one, at most 2^32 bytes in all. Every other list is
    walked, and the walk raises the error (or builds the legal oddity, e.g. a zero-length
    element) with its own message, in batch order, so the two paths cannot drift apart.

    Raises:
        VirtqueueError: a walked list breaks a rule (module docstring).
    """
    count = len(ids)
    lengths = ends - starts + 1
    addr: NDArray[np.uint64] = np.ascontiguousarray(rows["addr"])
    length: NDArray[np.uint32] = np.ascontiguousarray(rows["len"])
    flags: NDArray[np.uint16] = rows["flags"]
    ok, region, offset = regions.locate(addr, length)
    if (
        len(rows) == count
        and np.count_nonzero(ok) == count
        and not np.count_nonzero(flags & _INDIRECT)
    ):  # the common batch: every list is one direct in-region buffer
        return ChainBatch.of_simple(table, ids, addr, length, flags & _WRITE, offset, region)
    writable = (flags & _WRITE) != 0
    bad = ~ok | ((flags & _INDIRECT) != 0)
    if len(rows) > count:  # no device-readable element after a device-writable one
        first = np.zeros(len(rows), dtype=np.bool_)
        first[starts] = True
        bad[1:] |= writable[:-1] & ~writable[1:] & ~first[1:]
    walk = np.logical_or.reduceat(bad, starts)
    if len(rows) > count and int(length.max()) * int(lengths.max()) > MAX_CHAIN_BYTES:
        walk |= np.add.reduceat(length.astype(np.uint64), starts) > MAX_CHAIN_BYTES
    keep = ~walk.repeat(lengths)
    start = np.zeros(count + 1, dtype=np.intp)
    np.cumsum(np.where(walk, 0, lengths), out=start[1:])
    segments = Segments(
        start,
        addr[keep],
        length[keep],
        writable[keep],
        None if region is None else region[keep],
        offset[keep],
    )
    walked = {
        pos: build_packed_chain(
            table,
            rows[int(starts[pos]) : int(ends[pos]) + 1],
            (first_slot + int(starts[pos])) % size,
            indirect=indirect,
        )
        for pos in np.flatnonzero(walk).tolist()
    }
    return ChainBatch(table, ids, segments, walked)
