"""MemoryRegion: mapping an fd at an offset, shared pages, bounds and unmapping."""

from __future__ import annotations

import gc
import logging
import mmap
import os

import numpy as np
import pytest

from trio_vhost.errors import GuestMemoryError
from trio_vhost.mem import GuestRam, MemoryRegion


@pytest.fixture
def ram():
    ram = GuestRam.create(1 << 20, gpa=0x10_0000)
    yield ram
    ram.close()


def test_map_shares_pages_with_the_driver(ram):
    region = MemoryRegion.map(
        ram.fd.fd,
        guest_phys_addr=0x10_0000 + 8192,
        size=4096,
        userspace_addr=0xAB_0000,
        mmap_offset=8192,
    )
    try:
        assert (region.gpa, region.size, region.uva, region.mmap_offset) == (
            0x10_0000 + 8192,
            4096,
            0xAB_0000,
            8192,
        )
        assert region.gpa_end == region.gpa + 4096
        assert region.uva_end == 0xAB_0000 + 4096
        assert region.view.dtype == np.uint8
        assert len(region.view) == 4096
        ram.write(ram.gpa + 8192, b"guest")
        assert region.view[:5].tobytes() == b"guest"
        region.view[100:103] = [1, 2, 3]
        assert ram.read(ram.gpa + 8192 + 100, 3) == b"\x01\x02\x03"
    finally:
        region.close()


def test_unaligned_mmap_offset_is_sliced_not_passed_to_mmap(ram):
    ram.write(ram.gpa + 4097, b"xyz")
    region = MemoryRegion.map(
        ram.fd.fd, guest_phys_addr=0, size=100, userspace_addr=0, mmap_offset=4097
    )
    try:
        assert region.view[:3].tobytes() == b"xyz"
    finally:
        region.close()


def test_map_does_not_take_the_fd(ram):
    dup = os.dup(ram.fd.fd)
    region = MemoryRegion.map(dup, guest_phys_addr=0, size=4096, userspace_addr=0, mmap_offset=0)
    os.close(dup)  # the caller closes its fd right after mapping
    ram.write(ram.gpa, b"still shared")
    assert region.view[:12].tobytes() == b"still shared"
    region.close()


@pytest.mark.parametrize(
    ("gpa", "size", "uva", "offset"),
    [
        (0, 0, 0, 0),
        (0, -1, 0, 0),
        (-1, 4096, 0, 0),
        ((1 << 64) - 4095, 4096, 0, 0),
        (0, 4096, (1 << 64) - 1, 0),
        (0, 4096, 0, -4096),
    ],
)
def test_bad_numbers_are_rejected(ram, gpa, size, uva, offset):
    with pytest.raises(GuestMemoryError):
        MemoryRegion.map(
            ram.fd.fd, guest_phys_addr=gpa, size=size, userspace_addr=uva, mmap_offset=offset
        )


def test_region_beyond_the_file_is_rejected(ram):
    with pytest.raises(GuestMemoryError):
        MemoryRegion.map(
            ram.fd.fd, guest_phys_addr=0, size=4096, userspace_addr=0, mmap_offset=ram.size
        )


def test_bad_fd_is_a_guest_memory_error():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(GuestMemoryError):
        MemoryRegion.map(r, guest_phys_addr=0, size=4096, userspace_addr=0, mmap_offset=0)


def test_region_at_the_top_of_the_address_space():
    region = MemoryRegion.anonymous(4096, guest_phys_addr=(1 << 64) - 4096)
    assert region.gpa_end == 1 << 64
    region.close()


def test_close_is_idempotent_and_view_then_raises():
    region = MemoryRegion.anonymous(4096, guest_phys_addr=0x1000)
    assert not region.closed
    region.close()
    region.close()
    assert region.closed
    with pytest.raises(GuestMemoryError):
        _ = region.view


def test_close_with_a_live_view_defers_the_unmap(caplog):
    region = MemoryRegion.anonymous(4096)
    stray = region.view[10:20]
    record = region.view.view(np.dtype([("a", "<u8"), ("b", "<u8")]))[0]  # an np.void record
    with caplog.at_level(logging.DEBUG, logger="trio_vhost.mem.region"):
        region.close()  # must not raise BufferError
    assert region.closed
    assert "live views" in caplog.text
    stray[:] = 7  # the pages are still mapped: no crash
    assert int(stray.sum()) == 70
    del stray, record
    gc.collect()


def test_closed_mapping_is_really_unmapped():
    mapping = mmap.mmap(-1, 4096)
    region = MemoryRegion(mapping, guest_phys_addr=0, size=4096, userspace_addr=0, mmap_offset=0)
    region.close()
    assert mapping.closed


def test_anonymous_defaults_uva_to_gpa():
    region = MemoryRegion.anonymous(8192, guest_phys_addr=0x20_0000)
    assert region.uva == 0x20_0000
    assert "gpa=0x200000" in repr(region)
    region.close()
    assert "closed" in repr(region)


def test_region_larger_than_its_mapping_is_rejected():
    with pytest.raises(GuestMemoryError):
        MemoryRegion(
            mmap.mmap(-1, 4096), guest_phys_addr=0, size=4096, userspace_addr=0, mmap_offset=1
        )


class _FakeStat:
    def __init__(self, blksize, size, mode=0o100600):
        self.st_blksize = blksize
        self.st_size = size
        self.st_mode = mode


class _FakeVfs:
    def __init__(self, bsize):
        self.f_bsize = bsize


@pytest.mark.parametrize(
    ("blksize", "file_size", "needed", "expected"),
    [
        (4096, 1 << 20, 5000, 5000),  # memfd / tmpfs / ext4: left to the kernel
        (2 << 20, 4 << 20, (1 << 20) + 1, 2 << 20),  # hugetlbfs: whole huge pages
        (2 << 20, 4 << 20, 4 << 20, 4 << 20),
        (1 << 20, 3 << 20, 5000, 1 << 20),  # a big block size, capped by the file size
        (1 << 20, 6000, 5000, 6000),
        (3 << 12, 1 << 20, 5000, 5000),  # not a power of two: ignored
    ],
)
def test_map_length_rounds_to_huge_pages(monkeypatch, blksize, file_size, needed, expected):
    from trio_vhost.mem import region as region_module

    monkeypatch.setattr(region_module.os, "fstat", lambda fd: _FakeStat(blksize, file_size))
    monkeypatch.setattr(region_module.os, "fstatvfs", lambda fd: _FakeVfs(4096))
    assert region_module._map_length(99, needed) == expected


def test_map_length_without_statvfs_or_regular_file(monkeypatch):
    from trio_vhost.mem import region as region_module

    def no_vfs(fd):
        raise OSError("not supported")

    monkeypatch.setattr(region_module.os, "fstatvfs", no_vfs)
    monkeypatch.setattr(region_module.os, "fstat", lambda fd: _FakeStat(2 << 20, 0, 0o020600))
    assert region_module._map_length(99, 4096) == 2 << 20  # a device node: no size to cap at
