"""MemoryTable: an immutable, generation-numbered set of guest memory regions.

Every guest address the backend touches goes through a table: :meth:`MemoryTable.translate`
checks the whole range against the regions before it makes a view, so a hostile address can
only ever produce :class:`~trio_vhost.errors.GuestMemoryError`, never an access outside the
mapped regions.

Ownership: a table owns a reference on each of its regions and :meth:`MemoryTable.close`
releases the references it still owns; a region is unmapped when its last reference goes.
:meth:`~MemoryTable.with_region` / :meth:`~MemoryTable.without_region` HAND OVER the
predecessor's references on the regions they keep to the new table. So after an ADD/REM swap
the old table may be closed or simply dropped, both are right: closing it unmaps only what the
new table no longer has (the region REM_MEM_REG removed, which may also be closed directly),
and the kept regions live until the new table is closed. SET_MEM_TABLE builds a fresh table
with :meth:`~MemoryTable.from_regions` and closes the old one. Views handed out by a table
follow the rule in :mod:`trio_vhost.mem.region`: keep them no longer than one request.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable
from typing import Final, final

import numpy as np
from numpy.typing import NDArray

from ..errors import GuestMemoryError
from .region import MemoryRegion

__all__ = ["MAX_MEM_SLOTS", "MemoryTable"]

#: How many regions a table holds: the vhost-user limit for ADD_MEM_REG (VHOST_USER_MAX_RAM_SLOTS
#: in QEMU, reported by GET_MAX_MEM_SLOTS).
MAX_MEM_SLOTS: Final = 32

_U64_LIMIT: Final = 1 << 64


@final
class MemoryTable:
    """Immutable guest memory map: regions sorted by guest-physical address.

    Construction rejects overlapping regions (in guest-physical or in frontend virtual space)
    and more than :data:`MAX_MEM_SLOTS` regions. On error the regions are left untouched and
    still belong to the caller.
    """

    __slots__ = (
        "_closed",
        "_gpa_ends",
        "_gpa_starts",
        "_np_sizes",
        "_np_starts",
        "_owned",
        "_regions",
        "_uva_order",
        "generation",
    )

    def __init__(
        self,
        regions: Iterable[MemoryRegion],
        *,
        generation: int = 0,
        _adopt: frozenset[int] = frozenset(),
    ) -> None:
        """Build a table; prefer :meth:`empty` and :meth:`from_regions`.

        The table takes a reference on each region, except those whose ``id`` is in
        ``_adopt`` (internal: references handed over by a predecessor).

        Raises:
            GuestMemoryError: too many, closed or overlapping regions.
        """
        ordered = tuple(sorted(regions, key=lambda r: r.gpa))
        if len(ordered) > MAX_MEM_SLOTS:
            raise GuestMemoryError(f"{len(ordered)} regions exceed {MAX_MEM_SLOTS} memory slots")
        for region in ordered:
            if region.closed:
                raise GuestMemoryError(f"{region!r} is closed")
        for a, b in itertools.pairwise(ordered):
            if b.gpa < a.gpa_end:
                raise GuestMemoryError(f"guest-physical ranges overlap: {a!r} and {b!r}")
        by_uva = tuple(sorted(ordered, key=lambda r: r.uva))
        for a, b in itertools.pairwise(by_uva):
            if b.uva < a.uva_end:
                raise GuestMemoryError(f"frontend virtual ranges overlap: {a!r} and {b!r}")
        self.generation: Final = generation
        self._regions: Final = ordered
        self._gpa_starts: Final = [r.gpa for r in ordered]
        self._gpa_ends: Final = [r.gpa_end for r in ordered]
        self._uva_order: Final = by_uva
        self._np_starts: Final = np.array(self._gpa_starts, dtype=np.uint64)
        self._np_sizes: Final = np.array([r.size for r in ordered], dtype=np.uint64)
        self._closed = False
        self._owned: set[int] = set()
        for region in ordered:
            if id(region) not in _adopt:
                region._acquire()
            self._owned.add(id(region))

    @classmethod
    def empty(cls) -> MemoryTable:
        """Return the table of a connection before any SET_MEM_TABLE (generation 0)."""
        return cls(())

    @classmethod
    def from_regions(cls, regions: Iterable[MemoryRegion], *, generation: int = 0) -> MemoryTable:
        """Return a table of ``regions`` (SET_MEM_TABLE); pass ``old.generation + 1`` on swaps."""
        return cls(regions, generation=generation)

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        """The regions, sorted by guest-physical address."""
        return self._regions

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    def _successor(self, regions: tuple[MemoryRegion, ...]) -> MemoryTable:
        """Return the next generation, handing over our references on the regions it keeps."""
        if self._closed:
            raise GuestMemoryError("the memory table is closed")
        kept = frozenset(id(r) for r in regions) & self._owned
        table = MemoryTable(regions, generation=self.generation + 1, _adopt=kept)
        self._owned -= kept
        return table

    def with_region(self, region: MemoryRegion) -> MemoryTable:
        """Return a new table (next generation) with ``region`` added (ADD_MEM_REG).

        The new table takes over this table's references (module docstring).

        Raises:
            GuestMemoryError: the table is closed or full, or the region overlaps one of ours.
        """
        return self._successor((*self._regions, region))

    def without_region(self, gpa: int, size: int, uva: int) -> tuple[MemoryTable, MemoryRegion]:
        """Return the next-generation table without the matching region, and that region.

        The region matches on guest address, size and frontend address (REM_MEM_REG). It
        stays mapped until this (old) table is closed or the region itself is closed; the
        new table takes over the references on the others.

        Raises:
            GuestMemoryError: the table is closed or no region matches.
        """
        for region in self._regions:
            if region.gpa == gpa and region.size == size and region.uva == uva:
                return self._successor(tuple(r for r in self._regions if r is not region)), region
        raise GuestMemoryError(f"no region gpa={gpa:#x} size={size:#x} uva={uva:#x} to remove")

    def _find(self, gpa: int) -> int:
        """Return the index of the region containing ``gpa``, or -1."""
        i = bisect.bisect_right(self._gpa_starts, gpa) - 1
        if i >= 0 and gpa < self._gpa_ends[i]:
            return i
        return -1

    def translate(self, gpa: int, length: int) -> NDArray[np.uint8]:
        """Return a writable view of guest range ``[gpa, gpa + length)`` inside ONE region.

        ``length`` 0 gives an empty view, provided ``gpa`` itself lies in a region.

        Raises:
            GuestMemoryError: negative numbers, 64-bit overflow, or a range that is not
                entirely inside a single region.
        """
        if gpa < 0 or length < 0 or gpa + length > _U64_LIMIT:
            raise GuestMemoryError(f"bad guest range [{gpa:#x}, +{length:#x})")
        i = self._find(gpa)
        if i < 0 or gpa + length > self._gpa_ends[i]:
            raise GuestMemoryError(f"guest range [{gpa:#x}, +{length:#x}) is not mapped")
        region = self._regions[i]
        offset = gpa - region.gpa
        return region.view[offset : offset + length]

    def segments(self, gpa: int, length: int) -> list[NDArray[np.uint8]]:
        """Return views covering ``[gpa, gpa + length)``, which may span adjacent regions.

        Regions are adjacent when one ends exactly where the next begins in guest-physical
        space. ``length`` 0 gives ``[]`` if ``gpa`` lies in a region.

        Raises:
            GuestMemoryError: like :meth:`translate`, or a gap inside the range.
        """
        if gpa < 0 or length < 0 or gpa + length > _U64_LIMIT:
            raise GuestMemoryError(f"bad guest range [{gpa:#x}, +{length:#x})")
        i = self._find(gpa)
        if i < 0:
            raise GuestMemoryError(f"guest address {gpa:#x} is not mapped")
        if length == 0:
            return []
        out: list[NDArray[np.uint8]] = []
        cursor, remaining = gpa, length
        while True:
            region = self._regions[i]
            offset = cursor - region.gpa
            take = min(remaining, region.size - offset)
            out.append(region.view[offset : offset + take])
            cursor += take
            remaining -= take
            if not remaining:
                break
            i += 1
            if i >= len(self._regions) or self._gpa_starts[i] != cursor:
                raise GuestMemoryError(
                    f"guest range [{gpa:#x}, +{length:#x}) crosses a hole at {cursor:#x}"
                )
        return out

    def check(self, gpa: int, length: int) -> None:
        """Check that ``[gpa, gpa + length)`` is mapped (adjacent regions allowed).

        Raises:
            GuestMemoryError: it is not.
        """
        if gpa < 0 or length < 0 or gpa + length > _U64_LIMIT:
            raise GuestMemoryError(f"bad guest range [{gpa:#x}, +{length:#x})")
        i = self._find(gpa)
        if i < 0:
            raise GuestMemoryError(f"guest address {gpa:#x} is not mapped")
        end = gpa + length
        while end > self._gpa_ends[i]:
            i += 1
            if i >= len(self._regions) or self._gpa_starts[i] != self._gpa_ends[i - 1]:
                raise GuestMemoryError(f"guest range [{gpa:#x}, +{length:#x}) is not mapped")

    def ranges_ok(self, addrs: NDArray[np.uint64], lens: NDArray[np.uint32]) -> NDArray[np.bool_]:
        """Vectorised check: True where ``[addr, addr + len)`` lies inside ONE region.

        Used by the ring fast path; a False entry (including a range that legitimately spans
        two adjacent regions) is re-checked one by one with :meth:`check`.
        """
        if len(self._regions) == 1:
            region = self._regions[0]
            start = np.uint64(region.gpa)
            size = np.uint64(region.size)
            offset = addrs - start  # wraps where addr < start: masked by the first term
            ok: NDArray[np.bool_] = (addrs >= start) & (offset <= size) & (lens <= size - offset)
            return ok
        if not self._regions:
            return np.zeros(addrs.shape, dtype=np.bool_)
        starts, sizes = self._np_starts, self._np_sizes
        idx = np.searchsorted(starts, addrs, side="right").astype(np.int64) - 1
        inside = idx >= 0
        idx = np.maximum(idx, 0)
        offset = addrs - starts[idx]
        size_at = sizes[idx]
        result: NDArray[np.bool_] = inside & (offset <= size_at) & (lens <= size_at - offset)
        return result

    def read(self, gpa: int, length: int) -> bytes:
        """Return a copy of guest range ``[gpa, gpa + length)`` (may span adjacent regions).

        Raises:
            GuestMemoryError: the range is not mapped.
        """
        parts = self.segments(gpa, length)
        if len(parts) == 1:
            return parts[0].tobytes()
        return b"".join(p.tobytes() for p in parts)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` to guest memory at ``gpa`` (may span adjacent regions).

        Nothing is written unless the whole range is mapped.

        Raises:
            GuestMemoryError: the range is not mapped.
        """
        src = memoryview(data).cast("B")
        pos = 0
        for part in self.segments(gpa, len(src)):
            n = len(part)
            part.data[:] = src[pos : pos + n]
            pos += n

    def uva_to_gpa(self, uva: int, length: int) -> int:
        """Translate a frontend virtual range (ring addresses of SET_VRING_ADDR) to a gpa.

        The range must lie inside one region.

        Raises:
            GuestMemoryError: no single region maps ``[uva, uva + length)``.
        """
        if uva < 0 or length < 0 or uva + length > _U64_LIMIT:
            raise GuestMemoryError(f"bad frontend range [{uva:#x}, +{length:#x})")
        for region in self._uva_order:
            if region.uva <= uva < region.uva_end:
                if uva + length > region.uva_end:
                    break
                return region.gpa + (uva - region.uva)
        raise GuestMemoryError(f"frontend range [{uva:#x}, +{length:#x}) is not mapped")

    def close(self) -> None:
        """Release the references this table owns; unreferenced regions are unmapped.

        Idempotent. Call it when no worker runs on this table (no views survive).
        """
        if self._closed:
            return
        self._closed = True
        owned, self._owned = self._owned, set()
        for region in self._regions:
            if id(region) in owned:
                region._release()

    def __len__(self) -> int:
        return len(self._regions)

    def __repr__(self) -> str:
        return f"<MemoryTable generation={self.generation} regions={len(self._regions)}>"
