"""Hostile guests: every broken ring is a VirtqueueError, and nothing at all gets written.

Each scenario corrupts a guarded ring (canaries around and between the two mapped regions),
then both the batch and the scalar pop must raise VirtqueueError without writing a byte of
guest memory and without moving ``next_avail``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from trio_vhost.errors import GuestMemoryError, VirtqueueError
from trio_vhost.mem import GuestRam, MemoryTable
from trio_vhost.vring import DriverQueue, SplitQueue
from trio_vhost.vring.layout import VIRTQ_DESC_F_INDIRECT as IND
from trio_vhost.vring.layout import VIRTQ_DESC_F_NEXT as NEXT
from trio_vhost.vring.layout import VIRTQ_DESC_F_WRITE as WRITE

U64 = 1 << 64


def buf(ring, n=16):
    return ring.driver.alloc(n)


def loop_of_two(ring, lay):
    ring.driver.write_desc(0, buf(ring), 4, NEXT, 1)
    ring.driver.write_desc(1, buf(ring), 4, NEXT, 0)


def self_loop(ring, lay):
    ring.driver.write_desc(0, buf(ring), 4, NEXT, 0)


def loop_over_whole_table(ring, lay):
    for i in range(8):
        ring.driver.write_desc(i, buf(ring), 1, NEXT, (i + 1) % 8)


def next_out_of_range(ring, lay):
    ring.driver.write_desc(0, buf(ring), 4, NEXT, 8)


def next_0xffff(ring, lay):
    ring.driver.write_desc(0, buf(ring), 4, NEXT, 0xFFFF)


def indirect_without_feature(ring, lay):
    ring.driver.write_desc(0, _table(ring, [(buf(ring), 4, 0)]), 16, IND)


def _table(ring, entries):
    gpa = ring.driver.alloc(16 * max(len(entries), 1))
    ring.driver.write_indirect_table(gpa, entries)
    return gpa


def nested_indirect(ring, lay):
    inner = _table(ring, [(buf(ring), 4, 0)])
    outer = _table(ring, [(buf(ring), 4, 0), (inner, 16, IND)])
    ring.driver.write_desc(0, outer, 32, IND)


def indirect_with_next(ring, lay):
    ring.driver.write_desc(0, _table(ring, [(buf(ring), 4, 0)]), 16, IND | NEXT, 1)
    ring.driver.write_desc(1, buf(ring), 4)


def indirect_len(length):
    def scenario(ring, lay):
        ring.driver.write_desc(0, _table(ring, [(buf(ring), 4, 0)] * 2), length, IND)

    scenario.__name__ = f"indirect_len_{length}"
    return scenario


def indirect_table_too_long(ring, lay):
    ring.driver.write_desc(0, lay["A"], 16 * 32769, IND)


def indirect_table_in_the_gap(ring, lay):
    ring.driver.write_desc(0, lay["A"] + lay["size"] + 16, 16, IND)


def indirect_table_straddles_region_end(ring, lay):
    ring.driver.write_desc(0, lay["A"] + lay["size"] - 16, 32, IND)


def indirect_next_out_of_range(ring, lay):
    gpa = ring.driver.alloc(32)
    ring.driver.ram.write(gpa, _raw([(buf(ring), 4, NEXT, 2), (buf(ring), 4, 0, 0)]))
    ring.driver.write_desc(0, gpa, 32, IND)


def indirect_loop(ring, lay):
    gpa = ring.driver.alloc(32)
    ring.driver.ram.write(gpa, _raw([(buf(ring), 4, NEXT, 1), (buf(ring), 4, NEXT, 0)]))
    ring.driver.write_desc(0, gpa, 32, IND)


def _raw(rows):
    from trio_vhost.vring.layout import DESC_DTYPE

    return np.array(rows, dtype=DESC_DTYPE).tobytes()


def readable_after_writable(ring, lay):
    ring.driver.write_desc(0, buf(ring), 4, WRITE | NEXT, 1)
    ring.driver.write_desc(1, buf(ring), 4, 0)


def readable_after_writable_in_indirect(ring, lay):
    ring.driver.write_desc(0, _table(ring, [(buf(ring), 4, WRITE), (buf(ring), 4, 0)]), 32, IND)


def writable_direct_then_readable_indirect(ring, lay):
    ring.driver.write_desc(0, buf(ring), 4, WRITE | NEXT, 1)
    ring.driver.write_desc(1, _table(ring, [(buf(ring), 4, 0)]), 16, IND)


def addr(name, gpa_of, length=16, flags=0):
    def scenario(ring, lay):
        ring.driver.write_desc(0, gpa_of(lay), length, flags)

    scenario.__name__ = name
    return scenario


def chained_bad_buffer(ring, lay):
    ring.driver.write_desc(0, buf(ring), 4, NEXT, 1)
    ring.driver.write_desc(1, lay["B"] + lay["size"] - 8, 16, WRITE)


def head_out_of_range(head):
    def scenario(ring, lay):
        ring.driver.write_desc(0, buf(ring), 4)
        ring.driver.push_avail(0)
        ring.driver.push_avail(head)

    scenario.__name__ = f"head_{head}"
    return scenario


def avail_idx_jump(ring, lay):
    ring.driver.write_desc(0, buf(ring), 4)
    for _ in range(9):
        ring.driver.push_avail(0)  # nine entries on a ring of eight


def avail_idx_backwards(ring, lay):
    ring.driver.set_avail_idx(0xFFFF)


SCENARIOS = [
    loop_of_two,
    self_loop,
    loop_over_whole_table,
    next_out_of_range,
    next_0xffff,
    indirect_without_feature,
    nested_indirect,
    indirect_with_next,
    indirect_len(0),
    indirect_len(15),
    indirect_len(17),
    indirect_table_too_long,
    indirect_table_in_the_gap,
    indirect_table_straddles_region_end,
    indirect_next_out_of_range,
    indirect_loop,
    readable_after_writable,
    readable_after_writable_in_indirect,
    writable_direct_then_readable_indirect,
    addr("below_memory", lambda lay: lay["ram"]),  # the canary below region A
    addr("straddles_start", lambda lay: lay["A"] - 8),
    addr("straddles_end_into_gap", lambda lay: lay["A"] + lay["size"] - 8),
    addr("writable_straddles_end", lambda lay: lay["A"] + lay["size"] - 8, flags=WRITE),
    addr("into_tail_canary", lambda lay: lay["B"] + lay["size"] - 1, 2, WRITE),
    addr("just_past_the_end", lambda lay: lay["B"] + lay["size"]),
    addr("wraps_past_2_64", lambda lay: U64 - 4, 16),
    addr("max_len_at_top", lambda lay: U64 - 1, 0xFFFF_FFFF, WRITE),
    addr("longer_than_region", lambda lay: lay["A"], 0xFFFF_FFFF, WRITE),
    chained_bad_buffer,
    head_out_of_range(8),
    head_out_of_range(0xFFFF),
    avail_idx_jump,
    avail_idx_backwards,
]

NEEDS_INDIRECT = {"indirect_without_feature"}


def _pop_all(queue):
    while queue.pop() is not None:
        pass


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.__name__ for s in SCENARIOS])
def test_hostile_ring(guarded, layout, scenario):
    ring = guarded(8, indirect=scenario.__name__ not in NEEDS_INDIRECT)
    scenario(ring, layout)
    d = ring.driver
    if d.avail_idx == 0 and scenario.__name__ != "avail_idx_backwards":
        d.push_avail(0)
    if scenario.__name__ != "avail_idx_backwards":
        d.publish()
    before = ring.snapshot()
    with pytest.raises(VirtqueueError):
        ring.queue.pop_batch(8)
    assert ring.queue.next_avail == 0
    with pytest.raises(VirtqueueError):
        _pop_all(ring.queue)
    assert (ring.snapshot() == before).all(), "a hostile ring made the device write"
    ring.assert_canaries()


def test_guest_memory_error_is_the_cause(guarded, layout):
    ring = guarded(8)
    addr("x", lambda lay: lay["A"] + lay["size"] - 8)(ring, layout)
    ring.driver.push_avail(0)
    ring.driver.publish()
    with pytest.raises(VirtqueueError) as info:
        ring.queue.pop_batch(8)
    assert isinstance(info.value.__cause__, GuestMemoryError)


def test_chain_over_2_to_the_32_bytes():
    """Two in-memory buffers of 2^31 + 1 bytes: in range, but the chain is too long."""
    size = (1 << 32) + (1 << 20)  # sparse memfd: nothing is touched
    ram = GuestRam.create(size)
    table = MemoryTable.from_regions([ram.backend_region()])
    try:
        d = DriverQueue.create(ram, 4, pool_size=4096)
        q = SplitQueue(table, d.queue_state())
        base = 1 << 20
        half = (1 << 31) + 1
        d.write_desc(0, base, half, NEXT, 1)
        d.write_desc(1, base + half, half, WRITE)
        d.push_avail(0)
        d.write_desc(2, base, 0xFFFF_FFFF)  # one 4 GiB - 1 buffer is fine
        d.push_avail(2)
        d.publish()
        with pytest.raises(VirtqueueError, match="2\\^32"):
            q.pop_batch(4)
        q2 = SplitQueue(table, dataclasses.replace(d.queue_state(), next_avail=1))
        (chain,) = q2.pop_batch(4)
        assert chain.readable_len == 0xFFFF_FFFF
        del q, q2
    finally:
        table.close()
        ram.close()


def test_rings_outside_memory_are_refused(guarded, layout):
    ring = guarded(8)
    state = ring.queue.state()
    gap = layout["A"] + layout["size"]
    for changes in (
        {"desc_gpa": gap},
        {"avail_gpa": gap - 8},  # straddles the end of region A
        {"used_gpa": layout["B"] + layout["size"] - 32},
        {"desc_gpa": U64 - 128},
    ):
        with pytest.raises((GuestMemoryError, VirtqueueError)):
            SplitQueue(ring.table, dataclasses.replace(state, **changes))


def test_broken_chain_after_good_ones_returns_nothing(guarded, layout):
    ring = guarded(8)
    d = ring.driver
    d.add([b"good"])
    d.add([b"good"])
    d.write_desc(5, d.alloc(4), 4, NEXT, 5)
    d.push_avail(5)
    d.publish()
    with pytest.raises(VirtqueueError):
        ring.queue.pop_batch(8)
    assert ring.queue.next_avail == 0
    assert len(ring.queue.pop_batch(2)) == 2  # the good ones, if asked for alone
