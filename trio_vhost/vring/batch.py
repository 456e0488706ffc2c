"""ChainBatch: a popped batch of chains as numpy arrays, for devices that work on whole batches.

:meth:`SplitQueue.pop_arrays <trio_vhost.vring.split.SplitQueue.pop_arrays>` returns one.
Most chains a driver posts are a single direct descriptor (one buffer, no NEXT, no INDIRECT).
Such a chain is *simple*: its buffer is one row of :attr:`ChainBatch.addr`,
:attr:`ChainBatch.length` and :attr:`ChainBatch.writable`, already checked to lie inside ONE
region of the memory table (:attr:`ChainBatch.region`, :attr:`ChainBatch.offset`). Every
other chain (chained, indirect, zero-length, or one buffer that spans two adjacent regions)
is walked with :func:`~trio_vhost.vring.chain.walk_chain` when the batch is popped and is
found in :attr:`ChainBatch.complex_chains` by position; its array rows are zero (region -1).

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

__all__ = ["ChainBatch", "RegionIndex", "build_chains"]

_NO_CHAINS: Final[Mapping[int, DescriptorChain]] = MappingProxyType({})


@final
class RegionIndex:
    """The regions of one memory table as arrays, to check many buffers at once.

    A table is immutable, so a queue builds this once for the table it runs on.
    """

    __slots__ = ("_single", "_size0", "_sizes", "_start0", "_starts")

    def __init__(self, table: MemoryTable) -> None:
        regions = table.regions
        self._starts: Final = np.array([r.gpa for r in regions], dtype=np.uint64)
        self._sizes: Final = np.array([r.size for r in regions], dtype=np.uint64)
        self._single: Final = len(regions) == 1
        # 0-d arrays: numpy combines them with arrays faster than scalars
        self._start0: Final = self._starts[:1].reshape(())
        self._size0: Final = self._sizes[:1].reshape(())

    def locate(
        self, addr: NDArray[np.uint64], length: NDArray[np.uint32]
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


@final
class ChainBatch:
    """Chains popped together, as arrays in ring order (see the module docstring).

    Attributes:
        heads: ``uint16[count]``, read-only, the head index of each chain (pass it to
            ``add_used_arrays``).
        count: the number of chains.
        addr: ``uint64[count]``, the guest address of each simple chain's buffer (0 for a
            complex chain).
        length: ``uint32[count]``, its length in bytes, > 0 (0 for a complex chain).
        offset: ``uint64[count]``, where the buffer starts inside its region (0 for a
            complex chain).
        complex_chains: position in the batch -> the walked chain, for every chain that is
            not simple, in position order; empty in the common case. Treat it as read-only.
        table: the memory table the batch was popped under.
    """

    __slots__ = (
        "_chains",
        "_flags",
        "_region",
        "_simple",
        "_writable",
        "addr",
        "complex_chains",
        "count",
        "heads",
        "length",
        "offset",
        "table",
    )

    def __init__(
        self,
        table: MemoryTable,
        heads: NDArray[np.uint16],
        addr: NDArray[np.uint64],
        length: NDArray[np.uint32],
        flags: NDArray[np.uint16],
        offset: NDArray[np.uint64],
        region: NDArray[np.intp] | None,
        complex_chains: Mapping[int, DescriptorChain] = _NO_CHAINS,
        simple: NDArray[np.bool_] | None = None,
    ) -> None:
        """Wrap checked arrays (internal: use ``SplitQueue.pop_arrays``).

        ``flags``, ``addr``, ``length``, ``offset`` and ``region`` must already be zeroed
        (region -1) at the positions of ``complex_chains``, and ``simple`` be False there
        (None: every chain is simple).
        """
        heads.flags.writeable = False  # what the worker completes: the device cannot change it
        self.table: Final = table
        self.heads: Final = heads
        self.count: Final = len(heads)
        self.addr: Final = addr
        self.length: Final = length
        self.offset: Final = offset
        self.complex_chains: Final = complex_chains
        self._flags = flags
        self._region = region
        self._simple = simple
        self._writable: NDArray[np.bool_] | None = None
        self._chains: list[DescriptorChain] | None = None

    @classmethod
    def empty(cls, table: MemoryTable) -> ChainBatch:
        """Return a batch of no chains (its arrays are read-only, so it may be shared)."""
        u16 = np.zeros(0, dtype=np.uint16)
        u32 = np.zeros(0, dtype=np.uint32)
        u64 = np.zeros(0, dtype=np.uint64)
        for array in (u16, u32, u64):
            array.flags.writeable = False
        return cls(table, u16, u64, u32, u16, u64, None)

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0

    @property
    def all_simple(self) -> bool:
        """Whether every chain is simple (then the arrays describe the whole batch)."""
        return not self.complex_chains

    @property
    def simple(self) -> NDArray[np.bool_]:
        """``bool[count]``: True where the chain is one buffer described by the arrays."""
        if self._simple is None:
            self._simple = np.ones(self.count, dtype=np.bool_)
        return self._simple

    @property
    def writable(self) -> NDArray[np.bool_]:
        """``bool[count]``: True where a simple chain's buffer is device-writable."""
        if self._writable is None:
            self._writable = (self._flags & VIRTQ_DESC_F_WRITE) != 0
        return self._writable

    @property
    def region(self) -> NDArray[np.intp]:
        """``intp[count]``: index in ``table.regions`` of each simple chain's buffer (-1 for
        a complex chain)."""
        if self._region is None:
            self._region = np.zeros(self.count, dtype=np.intp)
            if self._simple is not None:
                self._region[~self._simple] = -1
        return self._region

    @property
    def readable_len(self) -> NDArray[np.uint64]:
        """``uint64[count]``: device-readable bytes of every chain (complex ones included)."""
        return self._lengths(readable=True)

    @property
    def writable_len(self) -> NDArray[np.uint64]:
        """``uint64[count]``: device-writable bytes of every chain (complex ones included)."""
        return self._lengths(readable=False)

    def _lengths(self, *, readable: bool) -> NDArray[np.uint64]:
        mask = self.writable
        picked = np.where(~mask if readable else mask, self.length, 0).astype(np.uint64)
        for pos, chain in self.complex_chains.items():
            picked[pos] = chain.readable_len if readable else chain.writable_len
        return picked

    def chain(self, position: int) -> DescriptorChain:
        """Return the :class:`DescriptorChain` at ``position`` (0 <= position < count)."""
        if self._chains is not None:
            return self._chains[position]
        found = self.complex_chains.get(position)
        if found is not None:
            return found
        if not 0 <= position < self.count:
            raise IndexError(f"position {position} outside a batch of {self.count}")
        head, addr, length = (
            int(self.heads[position]),
            int(self.addr[position]),
            int(self.length[position]),
        )
        if self._flags[position] & VIRTQ_DESC_F_WRITE:
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
        found = self.complex_chains
        if not found:
            return build_chains(
                self.heads.tolist(),
                self.addr.tolist(),
                self.length.tolist(),
                self._flags & VIRTQ_DESC_F_WRITE,
            )
        if len(found) == self.count:  # all walked (e.g. a block device): in position order
            return list(found.values())
        simple = np.flatnonzero(self.simple)
        built = iter(
            build_chains(
                self.heads[simple].tolist(),
                self.addr[simple].tolist(),
                self.length[simple].tolist(),
                self._flags[simple] & VIRTQ_DESC_F_WRITE,
            )
        )
        return [found[pos] if pos in found else next(built) for pos in range(self.count)]

    def __repr__(self) -> str:
        return f"<ChainBatch count={self.count} complex={len(self.complex_chains)}>"
