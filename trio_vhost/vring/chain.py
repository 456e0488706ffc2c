"""Descriptor chains: walking them safely, and reading/writing their buffers.

A chain is built from a descriptor table the guest can change at any moment, so every
descriptor is copied once (``struct.unpack_from`` of its 16 bytes) and only the copy is checked
and used; an indirect table is copied whole before it is walked. (:func:`walk_chain` peeks at
the head to take a fast path for a lone direct descriptor; a chained head is read again by the
walk, which then uses only its own copy.) The rules, each a :class:`VirtqueueError`:

* ``next`` must index the table it came from ("The Virtqueue Descriptor Table": the number of
  descriptors in the table is the queue size);
* a chain visits at most as many descriptors as its table holds: a longer walk is a loop or a
  chain longer than the Queue Size, which the driver MUST NOT create ("Indirect Descriptors");
* INDIRECT only when VIRTIO_F_INDIRECT_DESC was negotiated, never inside an indirect table,
  never together with NEXT ("Indirect Descriptors", driver MUST NOTs); the table length must
  be a non-zero multiple of 16 (the layout ``desc[len / 16]``) and at most 32768 entries; the
  WRITE flag of the descriptor that points at the table is ignored (device MUST);
* device-writable descriptors come after all device-readable ones ("Message Framing": the
  driver MUST place device-writable elements after device-readable ones);
* the chain totals at most 2^32 bytes ("The Virtqueue Descriptor Table", driver MUST NOT);
* every buffer (and indirect table) lies in guest memory; the table's
  :class:`GuestMemoryError` becomes the ``__cause__`` of the VirtqueueError.

Zero-length descriptors carry no data: they are accepted, count towards the loop guard and
the readable/writable order, and are left out of ``readable`` / ``writable`` (their address is
never used, so it is not checked).
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Iterator
from operator import attrgetter
from typing import Final, final

import numpy as np
from numpy.typing import NDArray

from ..errors import GuestMemoryError, VirtqueueError
from ..mem.table import MemoryTable
from .layout import (
    DESC_SIZE,
    MAX_QUEUE_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)

__all__ = ["MAX_CHAIN_BYTES", "ChainReader", "ChainWriter", "DescriptorChain", "walk_chain"]

#: The most bytes a chain may describe in total ("Drivers MUST NOT add a descriptor chain
#: longer than 2^32 bytes in total").
MAX_CHAIN_BYTES: Final = 1 << 32

_DESC: Final = struct.Struct("<QIHH")
_CHAINED: Final = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT
_unpack_desc: Final = _DESC.unpack_from
_region_gpa: Final = attrgetter("gpa")

Range = tuple[int, int]


@final
class DescriptorChain:
    """One popped descriptor chain: its head index and its buffers as ``(gpa, len)`` ranges.

    A value: treat it as immutable. It holds guest addresses, never views, and is only
    meaningful with the memory table it was popped under.

    Attributes:
        head: the index of the first descriptor, to be returned with ``add_used``.
        readable: device-readable buffers, in chain order.
        writable: device-writable buffers, in chain order.
        readable_len: total bytes of ``readable``.
        writable_len: total bytes of ``writable``.
    """

    __slots__ = ("head", "readable", "readable_len", "writable", "writable_len")

    def __init__(
        self,
        head: int,
        readable: tuple[Range, ...],
        writable: tuple[Range, ...],
        readable_len: int,
        writable_len: int,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len

    @classmethod
    def of(
        cls, head: int, readable: tuple[Range, ...] = (), writable: tuple[Range, ...] = ()
    ) -> DescriptorChain:
        """Return a chain, computing the lengths from the ranges."""
        return cls(
            head, readable, writable, sum(n for _, n in readable), sum(n for _, n in writable)
        )

    def _key(self) -> tuple[int, tuple[Range, ...], tuple[Range, ...]]:
        return (self.head, self.readable, self.writable)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DescriptorChain):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, readable={self.readable!r},"
            f" writable={self.writable!r})"
        )


class _Builder:
    """Accumulates the buffers of one chain while it is walked."""

    __slots__ = ("head", "readable", "readable_len", "table", "writable", "writable_len", "writing")

    def __init__(self, table: MemoryTable, head: int) -> None:
        self.table = table
        self.head = head
        self.readable: list[Range] = []
        self.writable: list[Range] = []
        self.readable_len = 0
        self.writable_len = 0
        self.writing = False

    def error(self, message: str) -> VirtqueueError:
        return VirtqueueError(f"descriptor chain at head {self.head}: {message}")

    def add(self, addr: int, length: int, flags: int) -> None:
        if flags & VIRTQ_DESC_F_WRITE:
            self.writing = True
        elif self.writing:
            raise self.error("a device-readable descriptor follows a device-writable one")
        if not length:
            return
        if self.readable_len + self.writable_len + length > MAX_CHAIN_BYTES:
            raise self.error("buffers total more than 2^32 bytes")
        try:
            self.table.check(addr, length)
        except GuestMemoryError as exc:
            raise self.error(f"buffer [{addr:#x}, +{length:#x}) is not guest memory") from exc
        if self.writing:
            self.writable.append((addr, length))
            self.writable_len += length
        else:
            self.readable.append((addr, length))
            self.readable_len += length

    def build(self) -> DescriptorChain:
        return DescriptorChain(
            self.head,
            tuple(self.readable),
            tuple(self.writable),
            self.readable_len,
            self.writable_len,
        )


def _walk_table(
    builder: _Builder,
    table: bytes | memoryview,
    entries: int,
    index: int,
    *,
    nested: bool,
    indirect: bool,
) -> Range | None:
    """Walk one descriptor table from ``index``; return the indirect table it ends in, if any."""
    for _ in range(entries):
        addr, length, flags, nxt = _unpack_desc(table, index * DESC_SIZE)
        if flags & VIRTQ_DESC_F_INDIRECT:
            if nested:
                raise builder.error("an indirect table contains an INDIRECT descriptor")
            if not indirect:
                raise builder.error("INDIRECT descriptor but VIRTIO_F_INDIRECT_DESC not negotiated")
            if flags & VIRTQ_DESC_F_NEXT:
                raise builder.error("a descriptor has both INDIRECT and NEXT")
            return addr, length
        builder.add(addr, length, flags)
        if not flags & VIRTQ_DESC_F_NEXT:
            return None
        if nxt >= entries:
            raise builder.error(f"next index {nxt} is outside a table of {entries}")
        index = nxt
    raise builder.error(f"loops or is longer than its table of {entries} descriptors")


def walk_chain(
    table: MemoryTable, descriptors: memoryview, size: int, head: int, *, indirect: bool
) -> DescriptorChain:
    """Walk the chain starting at ``head`` of a descriptor table and return it.

    Args:
        table: the memory table to check every buffer against.
        descriptors: the raw bytes of the descriptor table (``16 * size`` bytes, shared).
        size: the Queue Size (entries in ``descriptors``).
        head: the head index taken from the available ring (already checked ``< size``).
        indirect: VIRTIO_F_INDIRECT_DESC was negotiated.

    Raises:
        VirtqueueError: the chain breaks a rule listed in the module docstring.
    """
    addr, length, flags, _ = _unpack_desc(descriptors, head * DESC_SIZE)
    if not flags & _CHAINED:  # fast path: one direct descriptor (the same rules, inlined)
        if not length:
            return DescriptorChain(head, (), (), 0, 0)
        try:
            table.check(addr, length)
        except GuestMemoryError as exc:
            raise VirtqueueError(
                f"descriptor chain at head {head}: buffer [{addr:#x}, +{length:#x})"
                " is not guest memory"
            ) from exc
        if flags & VIRTQ_DESC_F_WRITE:
            return DescriptorChain(head, (), ((addr, length),), 0, length)
        return DescriptorChain(head, ((addr, length),), (), length, 0)
    builder = _Builder(table, head)
    found = _walk_table(builder, descriptors, size, head, nested=False, indirect=indirect)
    if found is not None:
        addr, length = found
        if length == 0 or length % DESC_SIZE:
            raise builder.error(f"indirect table length {length} is not a non-zero multiple of 16")
        if length > MAX_QUEUE_SIZE * DESC_SIZE:
            raise builder.error(f"indirect table of {length // DESC_SIZE} entries is too long")
        try:
            snapshot = table.read(addr, length)  # the copy we walk: read once
        except GuestMemoryError as exc:
            raise builder.error(f"indirect table at {addr:#x} is not guest memory") from exc
        _walk_table(builder, snapshot, length // DESC_SIZE, 0, nested=True, indirect=indirect)
    return builder.build()


def _span(table: MemoryTable, gpa: int, n: int) -> memoryview | None:
    """Return a memoryview of ``[gpa, gpa + n)`` if it lies inside one open region, else None.

    The fast path of the reader and writer: a slice of the region's own memoryview, without
    the numpy view that :meth:`MemoryTable.translate` makes. Like every view of guest memory
    it must not outlive the call that made it (:mod:`trio_vhost.mem.region`): it is used for
    one copy and dropped, never stored.
    """
    regions = table.regions
    if len(regions) == 1:
        region = regions[0]
    elif regions:
        i = bisect_right(regions, gpa, key=_region_gpa) - 1
        if i < 0:
            return None
        region = regions[i]
    else:
        return None
    offset = gpa - region.gpa
    if offset < 0 or offset + n > region.size:
        return None
    try:
        return region.view.data[offset : offset + n]
    except GuestMemoryError:  # the region was closed
        return None


def _views(table: MemoryTable, gpa: int, length: int) -> list[NDArray[np.uint8]]:
    try:
        return [table.translate(gpa, length)]
    except GuestMemoryError:
        pass
    try:
        return table.segments(gpa, length)
    except GuestMemoryError as exc:
        raise VirtqueueError(f"buffer [{gpa:#x}, +{length:#x}) is no longer mapped") from exc


class _Cursor:
    """A position in a sequence of guest ranges (the state of a reader or writer)."""

    __slots__ = ("_done", "_index", "_offset", "_ranges", "_table", "_total")

    _done: int
    _index: int
    _offset: int
    _ranges: tuple[Range, ...]
    _table: MemoryTable
    _total: int

    def _single(self, n: int) -> memoryview | None:
        """Fast path: return a view of the next ``n`` bytes if they lie in one buffer and one
        region, advancing; else None (and nothing moves: use :meth:`_take`)."""
        if n <= 0:
            return None
        gpa, length = self._ranges[self._index]
        offset = self._offset
        end = offset + n
        if end > length:
            return None
        view = _span(self._table, gpa + offset, n)
        if view is None:
            return None
        self._done += n
        if end == length:
            self._index += 1
            self._offset = 0
        else:
            self._offset = end
        return view

    def _take(self, n: int) -> Iterator[memoryview]:
        """Yield views of the next ``n`` bytes (``n`` <= what is left), advancing as it goes."""
        while n > 0:
            gpa, length = self._ranges[self._index]
            k = min(n, length - self._offset)
            for view in _views(self._table, gpa + self._offset, k):
                yield view.data
            n -= k
            self._done += k
            self._offset += k
            if self._offset == length:
                self._index += 1
                self._offset = 0


@final
class ChainReader(_Cursor):
    """Reads the device-readable buffers of a chain, in order, as one byte stream.

    Buffers are translated at each call and the views it makes live only inside that call, so
    a reader holds no view of guest memory; still, it must not be used after its table is
    closed (its regions may be unmapped). A range that is no longer mapped raises
    :class:`VirtqueueError`.
    """

    __slots__ = ()

    def __init__(self, table: MemoryTable, chain: DescriptorChain) -> None:
        self._table = table
        self._ranges = chain.readable
        self._total = chain.readable_len
        self._index = 0
        self._offset = 0
        self._done = 0

    @property
    def remaining(self) -> int:
        """Bytes not read yet."""
        return self._total - self._done

    def read(self, n: int = -1) -> bytes:
        """Return up to ``n`` bytes (all that remain if ``n`` < 0); ``b""`` at the end."""
        left = self._total - self._done
        if n < 0 or n > left:
            n = left
        view = self._single(n)
        if view is not None:
            return view.tobytes()
        parts = [view.tobytes() for view in self._take(n)]
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def readinto(self, buf: bytearray | memoryview) -> int:
        """Fill ``buf`` with up to ``len(buf)`` bytes; return how many were copied."""
        dst = memoryview(buf).cast("B")
        n = min(len(dst), self._total - self._done)
        view = self._single(n)
        if view is not None:
            dst[:n] = view
            return n
        pos = 0
        for view in self._take(n):
            k = len(view)
            dst[pos : pos + k] = view
            pos += k
        return n


@final
class ChainWriter(_Cursor):
    """Writes into the device-writable buffers of a chain, in order.

    The writer never writes past the writable buffers: :meth:`write` writes what fits and
    returns a short count, :meth:`write_all` refuses (and writes nothing) when the data does
    not fit. Report :attr:`written` as the used element's ``len``. Like the reader, it keeps
    no view of guest memory between calls and must not be used after its table is closed.
    """

    __slots__ = ()

    def __init__(self, table: MemoryTable, chain: DescriptorChain) -> None:
        self._table = table
        self._ranges = chain.writable
        self._total = chain.writable_len
        self._index = 0
        self._offset = 0
        self._done = 0

    @property
    def written(self) -> int:
        """Bytes written so far."""
        return self._done

    @property
    def remaining(self) -> int:
        """Room left in the writable buffers."""
        return self._total - self._done

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write as much of ``data`` as fits; return the number of bytes written."""
        src = data if type(data) is bytes else memoryview(data).cast("B")
        size = len(src)
        n = min(size, self._total - self._done)
        view = self._single(n)
        if view is not None:
            view[:] = src[:n] if n < size else src
            return n
        pos = 0
        for view in self._take(n):
            k = len(view)
            view[:] = src[pos : pos + k]
            pos += k
        return n

    def write_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data``.

        Raises:
            VirtqueueError: the guest's writable buffers are too small (nothing is written).
        """
        size = memoryview(data).nbytes
        if size > self._total - self._done:
            raise VirtqueueError(
                f"{size} bytes do not fit in {self._total - self._done} bytes of"
                " device-writable buffers"
            )
        self.write(data)
