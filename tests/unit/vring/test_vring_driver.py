"""DriverQueue: layout, bookkeeping, buffer pool, and distrust of the device."""

from __future__ import annotations

import pytest

from trio_vhost.errors import VirtqueueError
from trio_vhost.mem import GuestRam
from trio_vhost.vring import ChainWriter, DriverQueue, QueueFull


def test_layout_and_addresses():
    with GuestRam.create(1 << 20, gpa=0x8000_0000, uva_base=0x7F12_0000_0000) as ram:
        d = DriverQueue.create(ram, 256, event_idx=True, indirect=True)
        assert d.desc_gpa % 16 == 0
        assert d.avail_gpa % 2 == 0
        assert d.used_gpa % 4 == 0
        assert d.desc_uva == 0x7F12_0000_0000 + (d.desc_gpa - 0x8000_0000)
        assert (
            d.avail_uva - d.avail_gpa == d.used_uva - d.used_gpa == 0x7F12_0000_0000 - 0x8000_0000
        )
        state = d.queue_state(next_avail=3)
        assert (state.size, state.desc_gpa, state.next_avail) == (256, d.desc_gpa, 3)
        assert state.event_idx
        assert state.indirect
        assert d.num_free == 256
        with pytest.raises(ValueError):
            DriverQueue.create(ram, 3)


def test_descriptor_exhaustion_and_reuse(make_ring):
    ring = make_ring(4)
    d, q = ring.driver, ring.queue
    d.add([b"a", b"b"], [1])
    with pytest.raises(QueueFull):
        d.add([b"c"], [1])  # two needed, one free
    d.add([b"c"])
    assert d.num_free == 0
    with pytest.raises(QueueFull):
        d.add_batch(1, 8)
    with pytest.raises(ValueError):
        d.add([], [])
    d.publish()
    q.add_used_batch([(c.head, 0) for c in q.pop_batch(4)])
    assert len(d.get_used()) == 2
    assert d.num_free == 4
    assert d.get_used() == []


def test_pool_recycles_completed_buffers(make_ring):
    ring = make_ring(4, pool_size=4096)
    d, q = ring.driver, ring.queue
    for i in range(50):  # 50 x 2 KiB through a 4 KiB pool
        head = d.add([b"%d" % i], [2000])
        d.publish()
        (chain,) = q.pop_batch(1)
        q.add_used(chain.head, ChainWriter(ring.table, chain).write(b"ok"))
        assert d.get_used() == [(head, 2)]
        assert d.read_written(head) == b"ok"
    with pytest.raises(QueueFull):
        d.add([b"x" * 5000])
    assert d.num_free == 4


def test_indirect_choice(make_ring):
    ring = make_ring(8, indirect=True)
    d = ring.driver
    d.add([b"a"])  # one buffer: a direct descriptor
    d.add([b"a", b"b"])  # the queue's default: indirect
    d.add([b"a", b"b"], indirect=False)
    assert d.num_free == 8 - 1 - 1 - 2


def test_batch_heads_and_written_data(make_ring):
    ring = make_ring(8)
    d, q = ring.driver, ring.queue
    heads = d.add_batch(5, 32, write=True)
    assert d.add_batch(0, 32).size == 0
    assert d.publish() == 5
    assert d.publish() == 0
    chains = q.pop_batch(8)
    assert [c.head for c in chains] == heads.tolist()
    for c in chains:
        ChainWriter(ring.table, c).write(b"head%d" % c.head)
    q.add_used_batch([(c.head, 5) for c in chains])
    d.get_used()
    assert [d.read_written(h) for h in heads.tolist()] == [b"head%d" % h for h in heads.tolist()]
    with pytest.raises(KeyError):
        d.read_written(7 if 7 not in heads else 6)


def test_device_lies_are_caught(make_ring):
    ring = make_ring(8)
    d, q = ring.driver, ring.queue
    d.add([b"x"])
    d.publish()
    q.pop_batch(8)
    q.add_used(5, 0)  # a head that is not in flight
    with pytest.raises(VirtqueueError):
        d.get_used()

    ring = make_ring(8)
    d, q = ring.driver, ring.queue
    d.add_batch(2, 8)
    d.publish()
    (a, _b) = q.pop_batch(8)
    q.add_used_batch([(a.head, 0), (a.head, 0)])  # the same head twice
    with pytest.raises(VirtqueueError):
        d.get_used()

    ring = make_ring(8)
    ring.ram.write(ring.driver.used_gpa + 2, (9).to_bytes(2, "little"))  # used.idx runs away
    with pytest.raises(VirtqueueError):
        ring.driver.get_used()


def test_skip_to_needs_an_empty_ring(make_ring):
    ring = make_ring(8)
    ring.driver.add([b"x"])
    with pytest.raises(ValueError):
        ring.driver.skip_to(100)


def test_raw_helpers(make_ring):
    ring = make_ring(8)
    d = ring.driver
    d.write_desc(3, -1, -1, 0x1_0007, 0x1_0002)  # values wrap like the C fields
    assert ring.ram.read(d.desc_gpa + 48, 16) == b"\xff" * 12 + b"\x07\x00\x02\x00"
    d.write_avail_slot(9, 0xABCD)  # slot taken modulo the size
    assert ring.ram.read(d.avail_gpa + 4 + 2, 2) == b"\xcd\xab"
    d.set_avail_idx(0x1_0005)
    assert ring.ram.read(d.avail_gpa + 2, 2) == b"\x05\x00"
    assert d.avail_idx == 0  # the shadow index is untouched
