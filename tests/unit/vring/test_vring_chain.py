"""Descriptor chains that follow the rules, and reading/writing their buffers."""

from __future__ import annotations

import pytest

from trio_vhost.errors import VirtqueueError
from trio_vhost.mem import GuestRam, MemoryTable
from trio_vhost.vring import (
    ChainReader,
    ChainWriter,
    DescriptorChain,
    DriverQueue,
    SplitQueue,
)
from trio_vhost.vring.layout import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE


def pop_one(ring):
    ring.driver.publish()
    chains = ring.queue.pop_batch(16)
    assert len(chains) == 1
    return chains[0]


def test_single_readable_and_writable(make_ring):
    ring = make_ring()
    ring.driver.add([b"request"])
    chain = pop_one(ring)
    assert chain.readable_len == 7
    assert chain.writable == ()
    assert ChainReader(ring.table, chain).read() == b"request"
    ring.driver.add([], [32])
    chain = pop_one(ring)
    assert (chain.readable, chain.writable_len) == ((), 32)


def test_mixed_chain_reader_and_writer(make_ring):
    ring = make_ring()
    head = ring.driver.add([b"hdr:", b"payload"], [3, 5], indirect=False)
    chain = pop_one(ring)
    assert chain.head == head
    assert len(chain.readable) == 2
    assert len(chain.writable) == 2
    assert (chain.readable_len, chain.writable_len) == (11, 8)
    reader = ChainReader(ring.table, chain)
    assert reader.remaining == 11
    assert reader.read(2) == b"hd"
    buf = bytearray(4)
    assert reader.readinto(buf) == 4
    assert bytes(buf) == b"r:pa"
    assert reader.read() == b"yload"
    assert reader.read() == b""
    assert reader.readinto(bytearray(3)) == 0
    writer = ChainWriter(ring.table, chain)
    assert writer.write(b"ABCDEF") == 6  # crosses from the 3-byte into the 5-byte buffer
    assert writer.write(b"0123") == 2  # short count: only 2 bytes of room left
    assert (writer.written, writer.remaining) == (8, 0)
    assert writer.write(b"x") == 0
    ring.queue.add_used(chain.head, writer.written)
    assert ring.driver.get_used() == [(head, 8)]
    assert ring.driver.read_written(head) == b"ABCDEF01"


def test_write_all_refuses_what_does_not_fit(make_ring):
    ring = make_ring()
    ring.driver.add([], [4])
    chain = pop_one(ring)
    writer = ChainWriter(ring.table, chain)
    with pytest.raises(VirtqueueError):
        writer.write_all(b"12345")
    assert writer.written == 0
    writer.write_all(bytearray(b"1234"))
    assert writer.written == 4


@pytest.mark.parametrize("size", [1, 8])
def test_indirect_chain(make_ring, size):
    ring = make_ring(size, indirect=True)
    head = ring.driver.add([b"abc", b"def"], [2, 2])
    assert ring.driver.num_free == size - 1  # one descriptor for the whole chain
    chain = pop_one(ring)
    assert chain.head == head
    assert ChainReader(ring.table, chain).read() == b"abcdef"
    assert ChainWriter(ring.table, chain).write(b"wxyz") == 4
    ring.queue.add_used(head, 4)
    ring.driver.get_used()
    assert ring.driver.read_written(head) == b"wxyz"


def test_direct_descriptors_then_an_indirect_one(make_ring):
    """The device MUST handle normal chained descriptors followed by one INDIRECT."""
    ring = make_ring(8, indirect=True)
    d = ring.driver
    hdr, tail, status = d.alloc(4), d.alloc(4), d.alloc(1)
    d.ram.write(hdr, b"head")
    d.ram.write(tail, b"tail")
    table = d.alloc(32)
    d.write_indirect_table(table, [(tail, 4, 0), (status, 1, VIRTQ_DESC_F_WRITE)])
    d.write_desc(0, hdr, 4, VIRTQ_DESC_F_NEXT, 5)
    # the WRITE flag on the descriptor that points at a table MUST be ignored
    d.write_desc(5, table, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE)
    d.push_avail(0)
    chain = pop_one(ring)
    assert chain.readable == ((hdr, 4), (tail, 4))
    assert chain.writable == ((status, 1),)
    assert ChainReader(ring.table, chain).read() == b"headtail"


def test_zero_length_descriptors_are_skipped(make_ring):
    ring = make_ring()
    d = ring.driver
    buf = d.alloc(8)
    d.write_desc(0, 0xDEAD_0000_0000, 0, VIRTQ_DESC_F_NEXT, 1)  # unmapped, but empty
    d.write_desc(1, buf, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2)
    d.write_desc(2, 0, 0, VIRTQ_DESC_F_WRITE)
    d.write_desc(3, 0xDEAD_0000_0000, 0)  # a lone empty descriptor: an empty chain
    d.push_avail(0)
    d.push_avail(3)
    d.publish()
    first, second = ring.queue.pop_batch(4)
    assert (first.readable, first.writable) == ((), ((buf, 8),))
    assert (second.readable, second.writable) == ((), ())
    assert ChainReader(ring.table, second).read() == b""


def test_buffer_spanning_adjacent_regions():
    ram = GuestRam.create(1 << 20, gpa=0x100_0000)
    half = 1 << 19
    table = MemoryTable.from_regions([ram.backend_region(0, half), ram.backend_region(half)])
    try:
        driver = DriverQueue.create(ram, 4, pool_size=4096)
        queue = SplitQueue(table, driver.queue_state())
        start = ram.gpa + half - 3
        ram.write(start, b"span!")
        driver.write_desc(0, start, 5)
        out = ram.gpa + half - 2
        driver.write_desc(1, out, 4, VIRTQ_DESC_F_WRITE)
        driver.push_avail(0)
        driver.push_avail(1)
        driver.publish()
        first, second = queue.pop_batch(4)  # fast path refuses, the walk accepts
        assert first.readable == ((start, 5),)
        assert ChainReader(table, first).read() == b"span!"
        assert ChainWriter(table, second).write(b"WXYZ") == 4
        assert ram.read(out, 4) == b"WXYZ"
        del queue
    finally:
        table.close()
        ram.close()


def test_reader_after_the_memory_is_gone(make_ring):
    ring = make_ring()
    ring.driver.add([b"data"], [4])
    chain = pop_one(ring)
    empty = MemoryTable.empty()
    with pytest.raises(VirtqueueError) as info:
        ChainReader(empty, chain).read()
    assert info.value.__cause__ is not None
    with pytest.raises(VirtqueueError):
        ChainWriter(empty, chain).write(b"x")


def test_chain_value():
    a = DescriptorChain.of(3, ((0x1000, 4),), ((0x2000, 8), (0x3000, 2)))
    b = DescriptorChain(3, ((0x1000, 4),), ((0x2000, 8), (0x3000, 2)), 4, 10)
    assert a == b
    assert hash(a) == hash(b)
    assert (a.readable_len, a.writable_len) == (4, 10)
    assert a != DescriptorChain.of(4, ((0x1000, 4),))
    assert a != "chain"
    assert "head=3" in repr(a)
