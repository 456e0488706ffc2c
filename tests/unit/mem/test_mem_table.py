"""MemoryTable: translation, spanning ranges, uva -> gpa, slots, overlap and ownership."""

from __future__ import annotations

import numpy as np
import pytest

from trio_vhost.errors import GuestMemoryError
from trio_vhost.mem import MAX_MEM_SLOTS, GuestRam, MemoryRegion, MemoryTable

MiB = 1 << 20


@pytest.fixture
def ram():
    ram = GuestRam.create(4 * MiB, gpa=0x1000_0000)
    yield ram
    ram.close()


@pytest.fixture
def split_table(ram):
    """Two regions of one memfd, adjacent in guest-physical space, then a hole, then a third."""
    a = ram.backend_region(0, MiB)
    b = ram.backend_region(MiB, MiB)
    c = ram.backend_region(3 * MiB, MiB)  # [2 MiB, 3 MiB) is a hole
    table = MemoryTable.from_regions([c, a, b])
    yield table
    table.close()


def test_empty_table():
    table = MemoryTable.empty()
    assert table.generation == 0
    assert table.regions == ()
    assert len(table) == 0
    with pytest.raises(GuestMemoryError):
        table.translate(0, 1)
    assert not table.ranges_ok(np.array([0], np.uint64), np.array([1], np.uint32)).any()


def test_regions_are_sorted_by_gpa(split_table, ram):
    assert [r.gpa for r in split_table.regions] == [ram.gpa, ram.gpa + MiB, ram.gpa + 3 * MiB]


def test_translate_is_a_shared_view(split_table, ram):
    view = split_table.translate(ram.gpa + MiB + 10, 5)
    view[:] = np.frombuffer(b"hello", np.uint8)
    assert ram.read(ram.gpa + MiB + 10, 5) == b"hello"


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (MiB - 1, 2),  # straddles two regions: translate wants ONE region
        (2 * MiB - 1, 2),  # runs into the hole
        (2 * MiB, 1),  # in the hole
        (4 * MiB, 1),  # past the end
        (4 * MiB - 1, 2),
        (-1, 1),
        (0, -1),
    ],
)
def test_translate_rejects(split_table, ram, offset, length):
    with pytest.raises(GuestMemoryError):
        split_table.translate(ram.gpa + offset, length)


def test_translate_edges(split_table, ram):
    assert len(split_table.translate(ram.gpa + MiB - 1, 1)) == 1
    assert len(split_table.translate(ram.gpa + 4 * MiB - 1, 1)) == 1
    assert len(split_table.translate(ram.gpa, MiB)) == MiB
    # length 0: an empty view, but only at a mapped address
    assert len(split_table.translate(ram.gpa + 5, 0)) == 0
    with pytest.raises(GuestMemoryError):
        split_table.translate(ram.gpa + 2 * MiB, 0)
    with pytest.raises(GuestMemoryError):
        split_table.translate(ram.gpa - 1, 0)


def test_translate_overflow():
    region = MemoryRegion.anonymous(4096, guest_phys_addr=(1 << 64) - 4096)
    table = MemoryTable.from_regions([region])
    try:
        assert len(table.translate((1 << 64) - 1, 1)) == 1
        with pytest.raises(GuestMemoryError):
            table.translate((1 << 64) - 1, 2)
        with pytest.raises(GuestMemoryError):
            table.translate((1 << 64) - 4096, 1 << 64)
        with pytest.raises(GuestMemoryError):
            table.check((1 << 64) - 1, 2)
    finally:
        table.close()


def test_segments_span_adjacent_regions(split_table, ram):
    parts = split_table.segments(ram.gpa + MiB - 3, 10)
    assert [len(p) for p in parts] == [3, 7]
    assert split_table.segments(ram.gpa, 0) == []
    split_table.check(ram.gpa + MiB - 3, 10)
    split_table.check(ram.gpa, 2 * MiB)


@pytest.mark.parametrize(("offset", "length"), [(2 * MiB - 1, 2), (2 * MiB, 1), (0, 2 * MiB + 1)])
def test_segments_reject_holes(split_table, ram, offset, length):
    with pytest.raises(GuestMemoryError):
        split_table.segments(ram.gpa + offset, length)
    with pytest.raises(GuestMemoryError):
        split_table.check(ram.gpa + offset, length)
    with pytest.raises(GuestMemoryError):
        split_table.read(ram.gpa + offset, length)


def test_read_and_write_span_regions(split_table, ram):
    split_table.write(ram.gpa + MiB - 2, b"abcd")
    assert ram.read(ram.gpa + MiB - 2, 4) == b"abcd"
    assert split_table.read(ram.gpa + MiB - 2, 4) == b"abcd"
    split_table.write(ram.gpa, memoryview(b"xy"))
    assert split_table.read(ram.gpa, 2) == b"xy"


def test_write_into_a_hole_writes_nothing(split_table, ram):
    before = ram.read(ram.gpa, 4 * MiB)
    with pytest.raises(GuestMemoryError):
        split_table.write(ram.gpa + 2 * MiB - 2, b"abcd")
    assert ram.read(ram.gpa, 4 * MiB) == before


def test_ranges_ok_single_and_multi_region(split_table, ram):
    g = ram.gpa
    addrs = np.array(
        [g, g + MiB - 1, g + MiB - 1, g + 2 * MiB, g + 3 * MiB, g - 1, (1 << 64) - 1],
        dtype=np.uint64,
    )
    lens = np.array([MiB, 1, 2, 1, MiB, 1, 0xFFFF_FFFF], dtype=np.uint32)
    assert split_table.ranges_ok(addrs, lens).tolist() == [
        True,
        True,
        False,
        False,
        True,
        False,
        False,
    ]
    single = MemoryTable.from_regions([MemoryRegion.anonymous(4096, guest_phys_addr=4096)])
    try:
        addrs = np.array([4096, 8191, 8191, 0, (1 << 64) - 1, 4096], dtype=np.uint64)
        lens = np.array([4096, 1, 2, 1, 0xFFFF_FFFF, 4097], dtype=np.uint32)
        assert single.ranges_ok(addrs, lens).tolist() == [True, True, False, False, False, False]
    finally:
        single.close()


def test_uva_to_gpa(split_table, ram):
    assert split_table.uva_to_gpa(ram.userspace_addr + 5, 10) == ram.gpa + 5
    assert split_table.uva_to_gpa(ram.userspace_addr + 3 * MiB, MiB) == ram.gpa + 3 * MiB
    for uva, length in [
        (ram.userspace_addr - 1, 1),
        (ram.userspace_addr + 2 * MiB, 1),
        (ram.userspace_addr + MiB - 1, 2),  # one region only
        (ram.userspace_addr + 4 * MiB, 1),
        (-5, 1),
    ]:
        with pytest.raises(GuestMemoryError):
            split_table.uva_to_gpa(uva, length)


def test_uva_to_gpa_with_unrelated_address_spaces():
    a = MemoryRegion.anonymous(4096, guest_phys_addr=0, userspace_addr=0x7000_0000)
    b = MemoryRegion.anonymous(4096, guest_phys_addr=0x10_0000, userspace_addr=0x5000_0000)
    table = MemoryTable.from_regions([a, b])
    try:
        assert table.uva_to_gpa(0x5000_0010, 16) == 0x10_0010
        assert table.uva_to_gpa(0x7000_0FF0, 16) == 0xFF0
    finally:
        table.close()


def test_overlaps_are_rejected_and_regions_stay_with_the_caller():
    a = MemoryRegion.anonymous(8192, guest_phys_addr=0, userspace_addr=0x10_0000)
    b = MemoryRegion.anonymous(4096, guest_phys_addr=4096, userspace_addr=0x20_0000)
    c = MemoryRegion.anonymous(4096, guest_phys_addr=0x10_0000, userspace_addr=0x10_1000)
    with pytest.raises(GuestMemoryError, match="guest-physical"):
        MemoryTable.from_regions([a, b])
    with pytest.raises(GuestMemoryError, match="frontend virtual"):
        MemoryTable.from_regions([a, c])
    assert not any(r.closed for r in (a, b, c))
    table = MemoryTable.from_regions([a])
    with pytest.raises(GuestMemoryError):
        table.with_region(b)
    table.close()
    for region in (a, b, c):
        region.close()


def test_closed_region_is_rejected():
    region = MemoryRegion.anonymous(4096)
    region.close()
    with pytest.raises(GuestMemoryError):
        MemoryTable.from_regions([region])


def test_slot_limit():
    regions = [MemoryRegion.anonymous(4096, guest_phys_addr=i * 8192) for i in range(33)]
    table = MemoryTable.empty()
    for region in regions[:MAX_MEM_SLOTS]:
        old, table = table, table.with_region(region)
        old.close()
    assert len(table) == MAX_MEM_SLOTS == 32
    assert table.generation == 32
    for i in range(MAX_MEM_SLOTS):
        assert table.translate(i * 8192, 4096) is not None
    with pytest.raises(GuestMemoryError, match="slots"):
        table.with_region(regions[32])
    with pytest.raises(GuestMemoryError):
        MemoryTable.from_regions(regions)
    table.close()
    assert all(r.closed for r in regions[:32])
    regions[32].close()


def test_add_and_remove_share_regions_until_the_old_table_closes():
    a = MemoryRegion.anonymous(4096, guest_phys_addr=0)
    b = MemoryRegion.anonymous(4096, guest_phys_addr=0x1_0000)
    t0 = MemoryTable.from_regions([a], generation=7)
    t1 = t0.with_region(b)
    assert t1.generation == 8
    t0.close()  # the server swaps, then closes the old table
    assert not a.closed
    t2, removed = t1.without_region(0, 4096, 0)
    assert removed is a
    assert t2.generation == 9
    assert t2.regions == (b,)
    assert not a.closed  # still in t1
    t1.close()
    assert a.closed  # no table holds it any more
    assert not b.closed
    t1.close()  # idempotent
    assert t1.closed
    with pytest.raises(GuestMemoryError):
        t2.without_region(0, 4096, 0)
    with pytest.raises(GuestMemoryError):
        t2.without_region(0x1_0000, 4096, 1)  # uva must match too
    t2.close()
    assert b.closed


def test_translate_after_the_region_closed():
    region = MemoryRegion.anonymous(4096)
    table = MemoryTable.from_regions([region])
    region.close()
    with pytest.raises(GuestMemoryError):
        table.translate(0, 1)
    table.close()
    assert "generation=0" in repr(table)


def test_old_tables_may_be_dropped_without_closing():
    """The ADD/REM flow of a server that never closes the superseded table."""
    a = MemoryRegion.anonymous(4096, guest_phys_addr=0)
    b = MemoryRegion.anonymous(4096, guest_phys_addr=0x1_0000)
    c = MemoryRegion.anonymous(4096, guest_phys_addr=0x2_0000)
    t0 = MemoryTable.from_regions([a])
    t1 = t0.with_region(b)  # t0 dropped, never closed
    t2 = t1.with_region(c)
    t3, removed = t2.without_region(0x1_0000, 4096, 0x1_0000)
    removed.close()  # the server unmaps the removed region itself
    assert b.closed
    assert not a.closed
    assert not c.closed
    t3.close()  # teardown: the last table unmaps everything it kept
    assert a.closed
    assert c.closed
    with pytest.raises(GuestMemoryError):
        t3.with_region(b)  # a closed table has no successor


def test_two_successors_of_one_table():
    a = MemoryRegion.anonymous(4096, guest_phys_addr=0)
    b = MemoryRegion.anonymous(4096, guest_phys_addr=0x1_0000)
    c = MemoryRegion.anonymous(4096, guest_phys_addr=0x2_0000)
    t0 = MemoryTable.from_regions([a])
    first = t0.with_region(b)  # takes over t0's reference on a
    second = t0.with_region(c)  # t0 no longer owns a: this one takes its own
    t0.close()
    first.close()
    assert b.closed
    assert not a.closed
    second.close()
    assert a.closed
    assert c.closed
