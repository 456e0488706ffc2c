"""ChainBatch: a popped batch of chains as numpy arrays, for devices that work on whole batches.

:meth:`SplitQueue.pop_arrays <trio_vhost.vring.split.SplitQueue.pop_arrays>` returns one.
Two views of the same chains, both built with no Python work per descriptor:

* **per chain**, for the common single-buffer chain: a chain that is one direct descriptor
  (no NEXT, no INDIRECT) is *simple*; its buffer is one row of :attr:`ChainBatch.addr`,
  :attr:`ChainBatch.length` and :attr:`ChainBatch.writable`, already checked to lie inside
  ONE region of the memory table (:attr:`ChainBatch.region`, :attr:`ChainBatch.offset`).
  The rows of every other chain are zero (region -1);
* **per buffer** (:attr:`ChainBatch.segments`, a :class:`Segments`): every chain the queue
  followed with numpy, simple or chained, as flat arrays of its buffers in chain order
  (compressed sparse rows: chain ``i`` owns rows ``start[i]:start[i + 1]``), each buffer
  checked like a simple one. A multi-buffer device (virtio-blk: header, data, status)
  works on these.

Chains the queue did not follow with numpy (any chain with something unusual: a zero-length
descriptor, a buffer spanning two adjacent regions, a chain longer than
:data:`~trio_vhost.vring.follow.MAX_FOLLOW`, a broken one; and the chained ones of a batch
too small to pay for numpy) were walked one by one with
:func:`~trio_vhost.vring.chain.walk_chain` when the batch was popped: they are in
:attr:`ChainBatch.walked` by position and own no segments. :meth:`ChainBatch.chain`,
:attr:`ChainBatch.chains` and :attr:`ChainBatch.complex_chains` give any chain as a
:class:`DescriptorChain`, built on demand.

Completing: pass :attr:`ChainBatch.heads` and the bytes written (one int for all chains, or
an array with one entry per chain, in batch order) to
:meth:`SplitQueue.add_used_arrays <trio_vhost.vring.split.SplitQueue.add_used_arrays>`.

The arrays are private copies of what the guest had written, taken once and then checked: a
device may use them freely, the guest cannot change them afterwards. A batch holds guest
addresses, never views of guest memory. Like a :class:`DescriptorChain`, it is only
meaningful with the memory table it was popped under.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import repeat
from types import MappingProxyType
from typing import Final, final

import numpy as np
from numpy.typing import NDArray

from ..mem.table import MemoryTable
from .chain import DescriptorChain
from .layout import VIRTQ_DESC_F_WRITE

__all__ = ["ChainBatch", "RegionIndex", "Segments", "build_chains"]

_NO_CHAINS: Final[Mapping[int, DescriptorChain]] = MappingProxyType({})


@final
class RegionIndex:
    """The regions of one memory table as arrays, to check many buffers at once.

    A table is immutable, so a queue builds this once for the table it runs on.
    """

    __slots__ = ("_single", "_size0", "_sizes", "_start0", "_starts", "largest")

    def __init__(self, table: MemoryTable) -> None:
        regions = table.regions
        self._starts: Final = np.array([r.gpa for r in regions], dtype=np.uint64)
        self._sizes: Final = np.array([r.size for r in regions], dtype=np.uint64)
        #: The size of the largest region: no checked buffer is longer.
        self.largest: Final = max((r.size for r in regions), default=0)
        self._single: Final = len(regions) == 1
        # 0-d arrays: numpy combines them with arrays faster than scalars
        self._start0: Final = self._starts[:1].reshape(())
        self._size0: Final = self._sizes[:1].reshape(())

    def locate(
        self, addr: NDArray[np.uint64], length: NDArray[np.uint32] | NDArray[np.uint64]
    ) -> tuple[NDArray[np.bool_], NDArray[np.intp] | None, NDArray[np.uint64]]:
        """Find the region of each buffer ``[addr, addr + length)``.

        Returns:
            ``(ok, region, offset)``: ``ok`` is True where the buffer is non-empty and lies
            inside ONE region; ``region`` is the index of that region in ``table.regions``
            (None when the table has exactly one region: all zero); ``offset`` is where the
            buffer starts inside it. ``region`` and ``offset`` mean nothing where ``ok`` is
            False.
        """
        # All arithmetic wraps modulo 2^64 (numpy does not trap on arrays). With
        # offset = addr - start and end = offset + length, "offset < end <= size" holds
        # exactly when length > 0, start <= addr and addr + length <= start + size: an addr
        # below start gives offset >= 2^64 - start >= size, and a wrapped end is < offset.
        if self._single:
            offset: NDArray[np.uint64] = addr - self._start0
            end = offset + length
            ok: NDArray[np.bool_] = (offset < end) & (end <= self._size0)
            return ok, None, offset
        if not len(self._starts):
            return np.zeros(addr.shape, dtype=np.bool_), None, np.zeros_like(addr)
        # -1 (below the first region) indexes the last region, whose start is above addr:
        # the check above then fails, so no clipping is needed.
        region = np.searchsorted(self._starts, addr, side="right") - 1
        offset = addr - self._starts[region]
        end = offset + length
        ok = (offset < end) & (end <= self._sizes[region])
        return ok, region, offset


def build_chains(
    heads: list[int],
    addr: list[int],
    length: list[int],
    writes: NDArray[np.integer],
) -> list[DescriptorChain]:
    """Build the :class:`DescriptorChain` of each one-buffer chain (in batch order).

    ``writes`` is ``flags & VIRTQ_DESC_F_WRITE`` per chain. The ranges must already be
    checked. The common uniform batches (all device-readable or all device-writable) are
    built without a Python loop.
    """
    n = len(heads)
    n_write = int(np.count_nonzero(writes))
    chain = DescriptorChain
    if n_write in (0, n):
        # zip of one iterable yields 1-tuples: ((addr, len),), the ranges of a chain
        ranges = zip(zip(addr, length, strict=True), strict=True)
        if n_write == 0:
            return list(map(chain, heads, ranges, repeat(()), length, repeat(0)))
        return list(map(chain, heads, repeat(()), ranges, repeat(0), length))
    out: list[DescriptorChain] = []
    append = out.append
    for h, a, ln, w in zip(heads, addr, length, writes.tolist(), strict=True):
        if w:
            append(chain(h, (), ((a, ln),), 0, ln))
        else:
            append(chain(h, ((a, ln),), (), ln, 0))
    return out


def _chain_of_rows(
    head: int, addrs: list[int], lens: list[int], writes: list[bool], a: int, b: int
) -> DescriptorChain:
    """Build the :class:`DescriptorChain` of segment rows ``a:b`` (checked, non-empty)."""
    if b - a == 1:
        if writes[a]:
            return DescriptorChain(head, (), ((addrs[a], lens[a]),), 0, lens[a])
        return DescriptorChain(head, ((addrs[a], lens[a]),), (), lens[a], 0)
    readable: list[tuple[int, int]] = []
    writable: list[tuple[int, int]] = []
    for j in range(a, b):
        (writable if writes[j] else readable).append((addrs[j], lens[j]))
    return DescriptorChain.of(head, tuple(readable), tuple(writable))


@final
class Segments:
    """The buffers of a batch's followed chains, flattened in chain order (CSR layout).

    Chain ``i`` of the batch owns rows ``start[i]:start[i + 1]`` of the other arrays, in the
    order of its descriptors; a chain walked one by one (:attr:`ChainBatch.walked`) owns no
    rows. Every row passed the checks of :func:`~trio_vhost.vring.chain.walk_chain`: it is
    non-empty and inside ONE region, and within a chain no readable row follows a writable
    one. Read-only arrays: a device may keep them for the batch, not change them.

    Attributes:
        start: ``intp[count + 1]``, non-decreasing, ``start[0] == 0``.
        addr: ``uint64[total]``, the guest address of each buffer.
        length: ``uint32[total]``, its length in bytes (> 0).
        writable: ``bool[total]``, True where the buffer is device-writable.
        offset: ``uint64[total]``, where the buffer starts inside its region.
        uniform: ``k`` > 0 when every chain of the batch has exactly ``k`` buffers (none
            walked): chain ``i`` is then rows ``k*i`` to ``k*i + k - 1``, and
            ``array.reshape(count, k)`` views any of the arrays by chain; 0 otherwise.
    """

    __slots__ = ("_region", "addr", "length", "offset", "start", "uniform", "writable")

    def __init__(
        self,
        start: NDArray[np.intp],
        addr: NDArray[np.uint64],
        length: NDArray[np.uint32],
        writable: NDArray[np.bool_],
        region: NDArray[np.intp] | None,
        offset: NDArray[np.uint64],
        *,
        uniform: int = 0,
    ) -> None:
        """Wrap checked arrays (internal: the queue builds them); ``region`` None means
        every buffer is in region 0."""
        self.start: Final = start
        self.addr: Final = addr
        self.length: Final = length
        self.writable: Final = writable
        self.offset: Final = offset
        self.uniform: Final = uniform
        self._region = region

    @classmethod
    def none(cls, count: int) -> Segments:
        """Return the (read-only, shareable) segments of ``count`` chains that are all walked."""
        start = np.zeros(count + 1, dtype=np.intp)
        u32, u64 = np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.uint64)
        writable = np.zeros(0, dtype=np.bool_)
        for array in (start, u32, u64, writable):
            array.flags.writeable = False
        return cls(start, u64, u32, writable, None, u64)

    @classmethod
    def of_simple(
        cls,
        simple: NDArray[np.bool_],
        addr: NDArray[np.uint64],
        length: NDArray[np.uint32],
        flags: NDArray[np.uint16],
        offset: NDArray[np.uint64],
        region: NDArray[np.intp] | None,
    ) -> Segments:
        """Return the segments of the ``simple`` chains of per-chain rows (the rest walked)."""
        start = np.zeros(len(simple) + 1, dtype=np.intp)
        np.cumsum(simple, out=start[1:])
        return cls(
            start,
            addr[simple],
            length[simple],
            (flags[simple] & VIRTQ_DESC_F_WRITE).astype(np.bool_),
            None if region is None else region[simple],
            offset[simple],
        )

    @property
    def region(self) -> NDArray[np.intp]:
        """``intp[total]``: index in ``table.regions`` of each buffer."""
        if self._region is None:
            self._region = np.zeros(len(self.addr), dtype=np.intp)
        return self._region

    @property
    def single_region(self) -> bool:
        """True when every buffer is known to lie in region 0 (a one-region table)."""
        return self._region is None

    @property
    def total(self) -> int:
        """The number of buffers."""
        return len(self.addr)

    def counts(self) -> NDArray[np.intp]:
        """``intp[count]``: how many buffers each chain has (0 for a walked chain)."""
        counts: NDArray[np.intp] = self.start[1:] - self.start[:-1]
        return counts

    def chain_index(self) -> NDArray[np.intp]:
        """``intp[total]``: the batch position of the chain each buffer belongs to."""
        return np.repeat(np.arange(len(self.start) - 1, dtype=np.intp), self.counts())

    def per_chain_sum(self, values: NDArray[np.integer]) -> NDArray[np.uint64]:
        """Sum ``values`` (one per buffer, non-negative) over each chain's buffers."""
        sums = np.zeros(len(values) + 1, dtype=np.uint64)
        np.cumsum(values, out=sums[1:])
        out: NDArray[np.uint64] = sums[self.start[1:]] - sums[self.start[:-1]]
        return out


@final
class ChainBatch:
    """Chains popped together, as arrays in ring order (see the module docstring).

    Attributes:
        heads: ``uint16[count]``, read-only, the head index of each chain (pass it to
            ``add_used_arrays``).
        count: the number of chains.
        walked: position in the batch -> the chain walked one by one, for every chain the
            queue did not follow with numpy, in position order; empty in the common case.
            Treat it as read-only.
        table: the memory table the batch was popped under.
    """

    __slots__ = (
        "_addr",
        "_chains",
        "_complex",
        "_flags",
        "_length",
        "_offset",
        "_region",
        "_segments",
        "_simple",
        "_writable",
        "count",
        "heads",
        "table",
        "walked",
    )

    def __init__(
        self,
        table: MemoryTable,
        heads: NDArray[np.uint16],
        segments: Segments | None,
        walked: Mapping[int, DescriptorChain] = _NO_CHAINS,
        rows: tuple[
            NDArray[np.uint64],
            NDArray[np.uint32],
            NDArray[np.uint16],
            NDArray[np.uint64],
            NDArray[np.intp] | None,
        ]
        | None = None,
    ) -> None:
        """Wrap checked arrays (internal: use ``SplitQueue.pop_arrays``).

        Either ``rows`` = ``(addr, length, flags, offset, region)`` of a batch of simple
        chains only, or the ``segments`` of the followed chains plus the ``walked`` ones.
        """
        heads.flags.writeable = False  # what the worker completes: the device cannot change it
        self.table: Final = table
        self.heads: Final = heads
        self.count: Final = len(heads)
        self.walked: Final = walked
        self._segments = segments
        self._chains: list[DescriptorChain] | None = None
        self._complex: Mapping[int, DescriptorChain] | None = None
        self._writable: NDArray[np.bool_] | None = None
        self._simple: NDArray[np.bool_] | None = None
        self._addr: NDArray[np.uint64] | None = None
        self._length: NDArray[np.uint32] | None = None
        self._flags: NDArray[np.uint16] | None = None
        self._offset: NDArray[np.uint64] | None = None
        self._region: NDArray[np.intp] | None = None
        if rows is not None:
            self._addr, self._length, self._flags, self._offset, self._region = rows
            self._complex = _NO_CHAINS

    @classmethod
    def of_simple(
        cls,
        table: MemoryTable,
        heads: NDArray[np.uint16],
        addr: NDArray[np.uint64],
        length: NDArray[np.uint32],
        flags: NDArray[np.uint16],
        offset: NDArray[np.uint64],
        region: NDArray[np.intp] | None,
    ) -> ChainBatch:
        """A batch whose chains are all simple (the arrays are its per-chain rows)."""
        return cls(table, heads, None, _NO_CHAINS, (addr, length, flags, offset, region))

    @classmethod
    def empty(cls, table: MemoryTable) -> ChainBatch:
        """Return a batch of no chains (its arrays are read-only, so it may be shared)."""
        u16 = np.zeros(0, dtype=np.uint16)
        u32 = np.zeros(0, dtype=np.uint32)
        u64 = np.zeros(0, dtype=np.uint64)
        for array in (u16, u32, u64):
            array.flags.writeable = False
        return cls.of_simple(table, u16, u64, u32, u16, u64, None)

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0

    # -- the per-chain view ----------------------------------------------------------------

    def _rows(self) -> None:
        """Derive the per-chain rows of the simple chains from the segments."""
        seg = self._segments
        assert seg is not None
        n = self.count
        simple = self.simple
        first = seg.start[:-1][simple]  # the one row of each simple chain
        self._addr = np.zeros(n, dtype=np.uint64)
        self._addr[simple] = seg.addr[first]
        self._length = np.zeros(n, dtype=np.uint32)
        self._length[simple] = seg.length[first]
        self._offset = np.zeros(n, dtype=np.uint64)
        self._offset[simple] = seg.offset[first]
        self._flags = np.zeros(n, dtype=np.uint16)
        self._flags[simple] = np.where(seg.writable[first], VIRTQ_DESC_F_WRITE, 0)
        self._region = np.full(n, -1, dtype=np.intp)
        self._region[simple] = seg.region[first]

    @property
    def addr(self) -> NDArray[np.uint64]:
        """``uint64[count]``: the guest address of each simple chain's buffer (else 0)."""
        if self._addr is None:
            self._rows()
        assert self._addr is not None
        return self._addr

    @property
    def length(self) -> NDArray[np.uint32]:
        """``uint32[count]``: each simple chain's buffer length, > 0 (else 0)."""
        if self._length is None:
            self._rows()
        assert self._length is not None
        return self._length

    @property
    def offset(self) -> NDArray[np.uint64]:
        """``uint64[count]``: where each simple chain's buffer starts in its region (else 0)."""
        if self._offset is None:
            self._rows()
        assert self._offset is not None
        return self._offset

    @property
    def writable(self) -> NDArray[np.bool_]:
        """``bool[count]``: True where a simple chain's buffer is device-writable."""
        if self._writable is None:
            if self._flags is None:
                self._rows()
            assert self._flags is not None
            self._writable = (self._flags & VIRTQ_DESC_F_WRITE) != 0
        return self._writable

    @property
    def region(self) -> NDArray[np.intp]:
        """``intp[count]``: index in ``table.regions`` of each simple chain's buffer (-1 for
        any other chain)."""
        if self._region is None:
            if self._segments is not None:
                self._rows()
            else:
                self._region = np.zeros(self.count, dtype=np.intp)
        assert self._region is not None
        return self._region

    @property
    def simple(self) -> NDArray[np.bool_]:
        """``bool[count]``: True where the chain is one buffer described by the per-chain rows."""
        if self._simple is None:
            if self._segments is None:
                self._simple = np.ones(self.count, dtype=np.bool_)
            else:
                self._simple = self._segments.counts() == 1
        return self._simple

    @property
    def all_simple(self) -> bool:
        """Whether every chain is simple (then the per-chain rows describe the whole batch)."""
        return self._segments is None or bool(self.simple.all())

    # -- the per-buffer view ---------------------------------------------------------------

    @property
    def segments(self) -> Segments:
        """Every followed chain's buffers as flat arrays (see :class:`Segments`)."""
        if self._segments is None:
            self._segments = Segments(
                np.arange(self.count + 1, dtype=np.intp),
                self.addr,
                self.length,
                self.writable,
                self._region,
                self.offset,
                uniform=1,
            )
        return self._segments

    @property
    def readable_len(self) -> NDArray[np.uint64]:
        """``uint64[count]``: device-readable bytes of every chain (walked ones included)."""
        return self._lengths(readable=True)

    @property
    def writable_len(self) -> NDArray[np.uint64]:
        """``uint64[count]``: device-writable bytes of every chain (walked ones included)."""
        return self._lengths(readable=False)

    def _lengths(self, *, readable: bool) -> NDArray[np.uint64]:
        seg = self.segments
        mask = ~seg.writable if readable else seg.writable
        picked = seg.per_chain_sum(np.where(mask, seg.length, 0).astype(np.uint64))
        for pos, chain in self.walked.items():
            picked[pos] = chain.readable_len if readable else chain.writable_len
        return picked

    # -- chains as objects -----------------------------------------------------------------

    @property
    def complex_chains(self) -> Mapping[int, DescriptorChain]:
        """Position -> chain for every chain that is not simple (walked or multi-buffer), in
        position order; built on first use. Treat it as read-only."""
        if self._complex is None:
            positions = np.flatnonzero(~self.simple).tolist()
            self._complex = MappingProxyType({pos: self.chain(pos) for pos in positions})
        return self._complex

    def chain(self, position: int) -> DescriptorChain:
        """Return the :class:`DescriptorChain` at ``position`` (0 <= position < count)."""
        if self._chains is not None:
            return self._chains[position]
        found = self.walked.get(position)
        if found is not None:
            return found
        if not 0 <= position < self.count:
            raise IndexError(f"position {position} outside a batch of {self.count}")
        head = int(self.heads[position])
        seg = self._segments
        if seg is not None:
            a, b = int(seg.start[position]), int(seg.start[position + 1])
            return _chain_of_rows(
                head,
                seg.addr[a:b].tolist(),
                seg.length[a:b].tolist(),
                seg.writable[a:b].tolist(),
                0,
                b - a,
            )
        addr, length = int(self.addr[position]), int(self.length[position])
        if self.writable[position]:
            return DescriptorChain(head, (), ((addr, length),), 0, length)
        return DescriptorChain(head, ((addr, length),), (), length, 0)

    @property
    def chains(self) -> list[DescriptorChain]:
        """Every chain as a :class:`DescriptorChain`, in batch order (built on first use).

        The same list as ``pop_batch`` would have returned. Do not modify it.
        """
        if not self.count:
            return []
        if self._chains is None:
            self._chains = self._build()
        return self._chains

    def _build(self) -> list[DescriptorChain]:
        seg = self._segments
        if seg is None:
            assert self._addr is not None
            assert self._length is not None
            assert self._flags is not None
            return build_chains(
                self.heads.tolist(),
                self._addr.tolist(),
                self._length.tolist(),
                self._flags & VIRTQ_DESC_F_WRITE,
            )
        starts = seg.start.tolist()
        addrs, lens, writes = seg.addr.tolist(), seg.length.tolist(), seg.writable.tolist()
        walked = self.walked
        out: list[DescriptorChain] = []
        append = out.append
        for pos, head in enumerate(self.heads.tolist()):
            a, b = starts[pos], starts[pos + 1]
            append(walked[pos] if a == b else _chain_of_rows(head, addrs, lens, writes, a, b))
        return out

    def __repr__(self) -> str:
        simple = self.count if self._segments is None else int(np.count_nonzero(self.simple))
        return (
            f"<ChainBatch count={self.count} complex={self.count - simple}"
            f" walked={len(self.walked)}>"
        )
