"""ChainReader / ChainWriter: the one-region fast path agrees with the segmented path.

The fast path slices a memoryview of the region that holds the buffer (found by bisection
when the table has several regions); anything else (a buffer across two adjacent regions, a
closed region, a table that no longer maps the buffer) takes the segmented path, which
either works or raises VirtqueueError.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_vhost.errors import GuestMemoryError, VirtqueueError
from trio_vhost.mem import GuestRam, MemoryTable
from trio_vhost.vring import ChainReader, ChainWriter, DescriptorChain

GPA = 0x40_0000
PAGE = 4096


@pytest.fixture(scope="module")
def four():
    """Four regions: [0,4K) [4K,8K) adjacent, a hole at [8K,12K), then [12K,16K) [16K,20K)."""
    ram = GuestRam.create(5 * PAGE, gpa=GPA)
    table = MemoryTable.from_regions([ram.backend_region(i * PAGE, PAGE) for i in (0, 1, 3, 4)])
    yield ram, table
    table.close()
    ram.close()


def _mapped(table, gpa, length):
    try:
        table.check(gpa, length)
    except GuestMemoryError:
        return False
    return True


ranges = st.lists(
    st.tuples(st.integers(GPA, GPA + 5 * PAGE - 1), st.integers(1, 600)), min_size=1, max_size=3
)


@settings(max_examples=200, deadline=None)
@given(spec=ranges, pieces=st.lists(st.integers(0, 700), min_size=1, max_size=5))
def test_reader_and_writer_agree_with_guest_memory(four, spec, pieces):
    ram, table = four
    if not all(_mapped(table, gpa, n) for gpa, n in spec):
        chain = DescriptorChain.of(0, tuple(spec), tuple(spec))
        with pytest.raises(VirtqueueError):
            ChainReader(table, chain).read()
        return
    # the ranges may overlap: what is read is what guest memory holds after all the fills
    chain = DescriptorChain.of(7, tuple(spec), ())
    pattern = bytes(range(256)) * 8
    for gpa, n in spec:
        ram.write(gpa, pattern[:n])
    expected = b"".join(ram.read(gpa, n) for gpa, n in spec)
    reader = ChainReader(table, chain)
    got = b""
    for size in pieces:
        got += reader.read(size)
    got += reader.read()
    assert got == expected
    assert reader.remaining == 0
    assert reader.read() == b""

    buf = bytearray(len(expected))
    reader = ChainReader(table, chain)
    assert reader.readinto(memoryview(buf)[: pieces[0]]) == min(pieces[0], len(expected))
    assert reader.readinto(memoryview(buf)[pieces[0] :]) == max(len(expected) - pieces[0], 0)
    assert bytes(buf) == expected

    # a writer over the first range alone (ranges may overlap each other)
    gpa, n = spec[0]
    writer = ChainWriter(table, DescriptorChain.of(7, (), ((gpa, n),)))
    data = bytes([0x5A]) * (n + 10)
    pos = 0
    for size in pieces:
        pos += writer.write(data[pos : pos + size])
    pos += writer.write(data[pos:])
    assert pos == writer.written == n
    assert writer.remaining == 0
    assert ram.read(gpa, n) == data[:n]


def test_fast_path_in_every_region(four):
    ram, table = four
    for region in table.regions:
        gpa = region.gpa + 100
        chain = DescriptorChain.of(1, ((gpa, 16),), ((gpa + 16, 16),))
        assert ChainWriter(table, chain).write(memoryview(b"x" * 20)[2:18]) == 16
        ram.write(gpa, b"0123456789abcdef")
        assert ChainReader(table, chain).read() == b"0123456789abcdef"
        assert ram.read(gpa + 16, 16) == b"x" * 16


def test_buffer_across_adjacent_regions_and_a_hole(four):
    ram, table = four
    across = GPA + PAGE - 4
    chain = DescriptorChain.of(1, (), ((across, 8),))
    assert ChainWriter(table, chain).write(bytearray(b"ACROSS!!")) == 8
    assert ram.read(across, 8) == b"ACROSS!!"
    hole = DescriptorChain.of(1, (), ((GPA + 2 * PAGE - 4, 8),))
    with pytest.raises(VirtqueueError):
        ChainWriter(table, hole).write(b"12345678")
    below = DescriptorChain.of(1, ((GPA - 4, 8),), ())
    with pytest.raises(VirtqueueError):
        ChainReader(table, below).read()


def test_closed_region_is_not_used():
    ram = GuestRam.create(2 * PAGE, gpa=GPA)
    region = ram.backend_region(0, PAGE)
    table = MemoryTable.from_regions([region])
    chain = DescriptorChain.of(0, ((GPA, 4),), ((GPA, 4),))
    try:
        region.close()  # behind the table's back: the fast path must not touch it
        with pytest.raises(VirtqueueError):
            ChainReader(table, chain).read()
        with pytest.raises(VirtqueueError):
            ChainWriter(table, chain).write(b"abcd")
        buf = bytearray(4)
        with pytest.raises(VirtqueueError):
            ChainReader(table, chain).readinto(buf)
    finally:
        table.close()
        ram.close()
