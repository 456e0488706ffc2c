"""MemoryRegion: one shared mapping of guest memory, seen as a numpy ``uint8`` view.

A region is what one entry of SET_MEM_TABLE / ADD_MEM_REG describes: ``size`` bytes of guest
memory at guest-physical address ``gpa``, which the frontend itself sees at virtual address
``uva``, backed by the fd it sent, starting ``mmap_offset`` bytes into that file.

mmap offsets must be page aligned while ``mmap_offset`` need not be, so the file is mapped
from offset 0 and the view is sliced at ``mmap_offset`` (libvhost-user does the same).

View lifetime and unmapping (the rule):
    ``close()`` drops the region's own view and tries ``mmap.close()``. CPython refuses to
    unmap while any buffer export is alive (numpy array, slice, ``np.void`` record, memoryview)
    and raises ``BufferError``; ``close()`` then drops its last reference to the mmap object and
    logs at DEBUG, and the pages are unmapped when the last view is garbage-collected. So a
    stray view never crashes ``close()`` and never points at unmapped memory, but it does keep
    the mapping (and the fd CPython dup()ed for it) alive. Library code therefore keeps views
    short-lived: :class:`~trio_vhost.mem.table.MemoryTable` hands out views per call and stores
    none, descriptor chains hold addresses rather than views, and a ``SplitQueue`` (which holds
    views of its ring parts) is dropped before the table it was built on is closed.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
from typing import Final, final

import numpy as np
from numpy.typing import NDArray

from ..errors import GuestMemoryError

__all__ = ["MemoryRegion"]

LOGGER = logging.getLogger(__name__)

_U64_LIMIT: Final = 1 << 64


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _map_length(fd: int, needed: int) -> int:
    """Return how many bytes of ``fd`` to map so that ``needed`` bytes are covered.

    hugetlbfs only maps whole huge pages: a length that is not a multiple of the huge page
    size fails with EINVAL. Its files report the huge page size as ``st_blksize`` (and as
    ``f_bsize`` from statfs), so round the length up to the larger of the two when it is a
    power of two above the base page size. A regular file or memfd reports 4096 and is left
    alone. The rounded length is capped at the file size, because CPython refuses to map
    past the end of a regular file (a hugetlbfs file is always a whole number of pages, so
    the cap never undoes the rounding there).
    """
    st = os.fstat(fd)
    try:
        fs_block = os.fstatvfs(fd).f_bsize
    except OSError:
        fs_block = 0
    align = max(st.st_blksize, fs_block)
    if align <= mmap.PAGESIZE or align & (align - 1):
        return needed
    if stat.S_ISREG(st.st_mode):
        return max(needed, min(_round_up(needed, align), st.st_size))
    return _round_up(needed, align)


@final
class MemoryRegion:
    """One mapped region of guest memory.

    Attributes:
        gpa: guest-physical address of the first byte.
        size: length in bytes (> 0).
        uva: the frontend's virtual address of the first byte (``userspace_addr``).
        mmap_offset: where the region starts in the backing file.
    """

    __slots__ = ("_mmap", "_refs", "_view", "gpa", "mmap_offset", "size", "uva")

    def __init__(
        self,
        mapping: mmap.mmap,
        *,
        guest_phys_addr: int,
        size: int,
        userspace_addr: int,
        mmap_offset: int,
    ) -> None:
        """Wrap an existing mapping; prefer :meth:`map` or :meth:`anonymous`.

        Raises:
            GuestMemoryError: the numbers are out of range or do not fit the mapping.
        """
        _check_numbers(guest_phys_addr, size, userspace_addr, mmap_offset)
        if mmap_offset + size > len(mapping):
            raise GuestMemoryError(
                f"region [{mmap_offset:#x}, +{size:#x}) lies beyond a {len(mapping):#x}-byte map"
            )
        self.gpa: Final = guest_phys_addr
        self.size: Final = size
        self.uva: Final = userspace_addr
        self.mmap_offset: Final = mmap_offset
        self._mmap: mmap.mmap | None = mapping
        self._view: NDArray[np.uint8] | None = np.frombuffer(
            mapping, dtype=np.uint8, count=size, offset=mmap_offset
        )
        self._refs = 0

    @classmethod
    def map(
        cls,
        fd: int,
        *,
        guest_phys_addr: int,
        size: int,
        userspace_addr: int,
        mmap_offset: int,
    ) -> MemoryRegion:
        """Map ``fd`` shared and read-write from file offset 0 and view ``[mmap_offset, +size)``.

        The fd is not taken over: the caller may close it as soon as this returns (CPython's
        mmap keeps a private dup() of it until the mapping is unmapped).

        Raises:
            GuestMemoryError: bad numbers, a file too small, or mmap() failed.
        """
        _check_numbers(guest_phys_addr, size, userspace_addr, mmap_offset)
        needed = mmap_offset + size
        try:
            length = _map_length(fd, needed)
            mapping = mmap.mmap(
                fd,
                length,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=0,
            )
        except (OSError, ValueError, OverflowError) as exc:
            raise GuestMemoryError(f"cannot map fd {fd} for {needed:#x} bytes: {exc}") from exc
        return cls(
            mapping,
            guest_phys_addr=guest_phys_addr,
            size=size,
            userspace_addr=userspace_addr,
            mmap_offset=mmap_offset,
        )

    @classmethod
    def anonymous(
        cls, size: int, *, guest_phys_addr: int = 0, userspace_addr: int | None = None
    ) -> MemoryRegion:
        """Return a region over fresh private anonymous memory (for tests and tools).

        ``userspace_addr`` defaults to ``guest_phys_addr`` (the DPDK convention gpa == uva).
        """
        uva = guest_phys_addr if userspace_addr is None else userspace_addr
        _check_numbers(guest_phys_addr, size, uva, 0)
        return cls(
            mmap.mmap(-1, size),
            guest_phys_addr=guest_phys_addr,
            size=size,
            userspace_addr=uva,
            mmap_offset=0,
        )

    @property
    def gpa_end(self) -> int:
        """One past the last guest-physical address of the region."""
        return self.gpa + self.size

    @property
    def uva_end(self) -> int:
        """One past the last frontend virtual address of the region."""
        return self.uva + self.size

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._view is None

    @property
    def view(self) -> NDArray[np.uint8]:
        """The whole region as a writable ``uint8`` array; do not keep it (module docstring).

        Raises:
            GuestMemoryError: the region is closed.
        """
        view = self._view
        if view is None:
            raise GuestMemoryError(f"region at gpa {self.gpa:#x} is closed")
        return view

    def close(self) -> None:
        """Unmap the region; idempotent, never raises because of live views (see module)."""
        mapping = self._mmap
        if mapping is None:
            return
        self._view = None
        self._mmap = None
        try:
            mapping.close()
        except BufferError:
            LOGGER.debug(
                "region at gpa %#x still has live views: unmapping when they are collected",
                self.gpa,
            )

    # Reference counting by the tables that contain the region (see MemoryTable).

    def _acquire(self) -> None:
        self._refs += 1

    def _release(self) -> None:
        self._refs -= 1
        if self._refs <= 0:
            self.close()

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return (
            f"<MemoryRegion gpa={self.gpa:#x} size={self.size:#x} uva={self.uva:#x}"
            f" mmap_offset={self.mmap_offset:#x}{state}>"
        )


def _check_numbers(gpa: int, size: int, uva: int, mmap_offset: int) -> None:
    if size <= 0:
        raise GuestMemoryError(f"region size must be positive, got {size}")
    if gpa < 0 or gpa + size > _U64_LIMIT:
        raise GuestMemoryError(f"guest range [{gpa:#x}, +{size:#x}) overflows 64 bits")
    if uva < 0 or uva + size > _U64_LIMIT:
        raise GuestMemoryError(f"frontend range [{uva:#x}, +{size:#x}) overflows 64 bits")
    if mmap_offset < 0 or mmap_offset + size > _U64_LIMIT:
        raise GuestMemoryError(f"mmap_offset {mmap_offset:#x} out of range")
