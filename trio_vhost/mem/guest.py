"""GuestRam: guest memory seen from the DRIVER side, for the Python frontend and tests.

The Python frontend plays the guest: it owns a memfd, maps all of it, lays out rings and
buffers with a bump allocator, and sends the fd to the backend with SET_MEM_TABLE. The backend
maps the same fd with :meth:`MemoryRegion.map`, so both sides really share pages.

Addresses: byte ``k`` of the memfd is at guest-physical address ``gpa + k`` and at the
(fake but consistent) frontend virtual address ``userspace_addr + k``.
"""

from __future__ import annotations

import logging
import mmap
import os
from typing import Final, final

import numpy as np
from numpy.typing import NDArray

from .._fd import OwnedFd
from ..errors import GuestMemoryError
from .region import MemoryRegion

__all__ = ["DEFAULT_UVA_BASE", "GuestRam"]

LOGGER = logging.getLogger(__name__)

#: Where the fake frontend address space of :class:`GuestRam` starts by default (plus ``gpa``).
DEFAULT_UVA_BASE: Final = 0x7F00_0000_0000


@final
class GuestRam:
    """A memfd of guest memory, mapped whole, with a bump allocator.

    Attributes:
        fd: the memfd (owned; closed by :meth:`close`).
        gpa: guest-physical address of byte 0.
        size: length in bytes.
        userspace_addr: frontend virtual address of byte 0.
    """

    __slots__ = ("_mmap", "_next", "_view", "fd", "gpa", "size", "userspace_addr")

    def __init__(
        self, fd: OwnedFd, mapping: mmap.mmap, *, gpa: int, size: int, userspace_addr: int
    ) -> None:
        """Wrap an fd and its whole-file mapping; prefer :meth:`create`."""
        self.fd: Final = fd
        self.gpa: Final = gpa
        self.size: Final = size
        self.userspace_addr: Final = userspace_addr
        self._mmap: mmap.mmap | None = mapping
        self._view: NDArray[np.uint8] | None = np.frombuffer(mapping, dtype=np.uint8)
        self._next = gpa

    @classmethod
    def create(cls, size: int, *, gpa: int = 0, uva_base: int | None = None) -> GuestRam:
        """Create ``size`` bytes of zeroed shared guest memory at guest address ``gpa``.

        ``uva_base`` is the frontend virtual address of byte 0; by default
        ``DEFAULT_UVA_BASE + gpa``, so two GuestRams at distinct guest addresses never overlap
        in either space.

        Raises:
            GuestMemoryError: a non-positive size or an out-of-range address.
        """
        if size <= 0 or gpa < 0 or gpa + size > 1 << 64:
            raise GuestMemoryError(f"bad guest RAM gpa={gpa:#x} size={size:#x}")
        uva = DEFAULT_UVA_BASE + gpa if uva_base is None else uva_base
        if uva < 0 or uva + size > 1 << 64:
            raise GuestMemoryError(f"bad guest RAM userspace_addr {uva:#x}")
        fd = OwnedFd(os.memfd_create("trio-vhost-guest", os.MFD_CLOEXEC))
        try:
            os.ftruncate(fd.fd, size)
            mapping = mmap.mmap(fd.fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            fd.close()
            raise
        return cls(fd, mapping, gpa=gpa, size=size, userspace_addr=uva)

    @property
    def view(self) -> NDArray[np.uint8]:
        """All of the memory as a ``uint8`` array (index = gpa - self.gpa)."""
        view = self._view
        if view is None:
            raise GuestMemoryError("GuestRam is closed")
        return view

    @property
    def allocated(self) -> int:
        """Bytes handed out by :meth:`alloc` so far (including alignment padding)."""
        return self._next - self.gpa

    def alloc(self, nbytes: int, align: int = 16) -> int:
        """Return the gpa of ``nbytes`` fresh bytes aligned to ``align`` (a power of two).

        Memory is never freed; callers that recycle buffers keep their own pools.

        Raises:
            GuestMemoryError: out of memory.
            ValueError: a bad size or alignment.
        """
        if nbytes < 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"bad allocation of {nbytes} bytes aligned to {align}")
        start = (self._next + align - 1) & -align
        if start + nbytes > self.gpa + self.size:
            raise GuestMemoryError(f"guest RAM exhausted: {nbytes} bytes wanted")
        self._next = start + nbytes
        return start

    def offset(self, gpa: int, length: int = 0) -> int:
        """Return the file offset of guest range ``[gpa, gpa + length)``.

        Raises:
            GuestMemoryError: the range is not inside this RAM.
        """
        off = gpa - self.gpa
        if off < 0 or length < 0 or off + length > self.size:
            raise GuestMemoryError(f"guest range [{gpa:#x}, +{length:#x}) not in this RAM")
        return off

    def uva(self, gpa: int) -> int:
        """Return the frontend virtual address of guest address ``gpa``."""
        return self.userspace_addr + self.offset(gpa)

    def read(self, gpa: int, length: int) -> bytes:
        """Return a copy of ``[gpa, gpa + length)``."""
        off = self.offset(gpa, length)
        return self.view[off : off + length].tobytes()

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` to guest address ``gpa``."""
        src = memoryview(data).cast("B")
        off = self.offset(gpa, len(src))
        self.view.data[off : off + len(src)] = src

    def fill(self, gpa: int, length: int, value: int) -> None:
        """Set every byte of ``[gpa, gpa + length)`` to ``value``."""
        off = self.offset(gpa, length)
        self.view[off : off + length] = value

    def backend_region(self, offset: int = 0, size: int | None = None) -> MemoryRegion:
        """Map file bytes ``[offset, offset + size)`` the way a backend would (shared pages).

        The region's gpa and uva are this RAM's addresses of that byte range.
        """
        length = self.size - offset if size is None else size
        self.offset(self.gpa + offset, length)
        return MemoryRegion.map(
            self.fd.fd,
            guest_phys_addr=self.gpa + offset,
            size=length,
            userspace_addr=self.userspace_addr + offset,
            mmap_offset=offset,
        )

    def close(self) -> None:
        """Unmap the memory and close the fd; idempotent.

        Live views defer the unmap to garbage collection (same rule as MemoryRegion).
        """
        mapping = self._mmap
        if mapping is not None:
            self._view = None
            self._mmap = None
            try:
                mapping.close()
            except BufferError:
                LOGGER.debug("GuestRam has live views: unmapping when they are collected")
        self.fd.close()

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<GuestRam gpa={self.gpa:#x} size={self.size:#x}"
            f" userspace_addr={self.userspace_addr:#x}>"
        )
