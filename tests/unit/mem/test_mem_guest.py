"""GuestRam: the driver-side memfd, its addresses and its bump allocator."""

from __future__ import annotations

import os

import pytest

from trio_vhost.errors import GuestMemoryError
from trio_vhost.mem import DEFAULT_UVA_BASE, GuestRam, MemoryTable


def test_create_defaults():
    with GuestRam.create(65536, gpa=0x4000) as ram:
        assert ram.gpa == 0x4000
        assert ram.size == 65536
        assert ram.userspace_addr == DEFAULT_UVA_BASE + 0x4000
        assert ram.uva(0x4010) == ram.userspace_addr + 0x10
        assert os.fstat(ram.fd.fd).st_size == 65536
        assert not ram.view.any()
        assert "gpa=0x4000" in repr(ram)
    assert ram.fd.closed
    with pytest.raises(GuestMemoryError):
        _ = ram.view


def test_explicit_uva_base():
    with GuestRam.create(4096, uva_base=0x1234_0000) as ram:
        assert ram.userspace_addr == 0x1234_0000


@pytest.mark.parametrize(
    ("size", "gpa", "uva"), [(0, 0, None), (4096, -1, None), (4096, 0, -1), (4096, 1 << 64, None)]
)
def test_bad_create(size, gpa, uva):
    with pytest.raises(GuestMemoryError):
        GuestRam.create(size, gpa=gpa, uva_base=uva)


def test_alloc_aligns_and_runs_out():
    with GuestRam.create(4096, gpa=0x1000) as ram:
        a = ram.alloc(3, align=1)
        b = ram.alloc(16)
        c = ram.alloc(100, align=4096 // 8)
        assert a == 0x1000
        assert b == 0x1010
        assert c % 512 == 0
        assert ram.allocated == c + 100 - 0x1000
        with pytest.raises(GuestMemoryError):
            ram.alloc(4096)
        with pytest.raises(ValueError):
            ram.alloc(1, align=3)
        with pytest.raises(ValueError):
            ram.alloc(-1)


def test_read_write_fill_and_bounds():
    with GuestRam.create(4096, gpa=0x1000) as ram:
        ram.write(0x1FFE, b"ab")
        assert ram.read(0x1FFE, 2) == b"ab"
        ram.fill(0x1000, 4, 0xEE)
        assert ram.read(0x1000, 4) == b"\xee" * 4
        for gpa, n in [(0x0FFF, 1), (0x1FFF, 2), (0x2000, 1)]:
            with pytest.raises(GuestMemoryError):
                ram.read(gpa, n)
        with pytest.raises(GuestMemoryError):
            ram.write(0x1FFF, b"ab")


def test_backend_region_shares_pages_and_addresses():
    with GuestRam.create(8192, gpa=0x10000) as ram:
        region = ram.backend_region(4096)
        table = MemoryTable.from_regions([region])
        assert region.gpa == 0x11000
        assert region.uva == ram.userspace_addr + 4096
        table.write(0x11000, b"backend")
        assert ram.read(0x11000, 7) == b"backend"
        assert table.uva_to_gpa(ram.uva(0x11010), 4) == 0x11010
        table.close()
        assert region.closed
        with pytest.raises(GuestMemoryError):
            ram.backend_region(4096, 8192)


def test_close_with_live_view_and_twice():
    ram = GuestRam.create(4096)
    view = ram.view[:10]
    ram.close()
    ram.close()
    view[:] = 1  # still mapped until the view goes away
    assert ram.fd.closed
