"""Hostile drivers on a packed ring: every broken ring is a VirtqueueError, nothing is written.

Guest RAM is laid out with canaries that the backend's table does not map::

    file:  [canary 64K][region A 512K][canary 64K][region B 512K][canary 64K]

The ring and the driver's buffers live in region A. Each scenario breaks the ring, then both
``pop_batch`` and ``pop_arrays`` must raise VirtqueueError without writing a byte of guest
memory and without moving the queue's position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from trio_vhost.errors import GuestMemoryError, VirtqueueError
from trio_vhost.mem import GuestRam, MemoryTable
from trio_vhost.vring.packed import PackedQueue
from trio_vhost.vring.packed_driver import PackedDriverQueue
from trio_vhost.vring.packed_layout import (
    VIRTQ_DESC_F_AVAIL as AVAIL,
)
from trio_vhost.vring.packed_layout import (
    VIRTQ_DESC_F_INDIRECT as IND,
)
from trio_vhost.vring.packed_layout import (
    VIRTQ_DESC_F_NEXT as NEXT,
)
from trio_vhost.vring.packed_layout import (
    VIRTQ_DESC_F_USED as USED,
)
from trio_vhost.vring.packed_layout import (
    VIRTQ_DESC_F_WRITE as WRITE,
)

KiB = 1024
RAM_GPA = 0x4000_0000
CANARY = 0xA5
REGION_A = RAM_GPA + 64 * KiB
REGION_B = RAM_GPA + 640 * KiB
CANARIES = [(RAM_GPA, 64 * KiB), (RAM_GPA + 576 * KiB, 64 * KiB), (RAM_GPA + 1152 * KiB, 64 * KiB)]
U64 = 1 << 64


@dataclass
class Ring:
    ram: GuestRam
    table: MemoryTable
    driver: PackedDriverQueue
    queue: PackedQueue

    def buf(self, n=16):
        return self.driver.alloc(n)


@pytest.fixture
def guarded():
    made = []

    def make(size=8, *, indirect=False):
        ram = GuestRam.create(1216 * KiB, gpa=RAM_GPA)
        for gpa, length in CANARIES:
            ram.fill(gpa, length, CANARY)
        ram.alloc(64 * KiB)  # the allocator starts past the first canary
        table = MemoryTable.from_regions(
            [ram.backend_region(64 * KiB, 512 * KiB), ram.backend_region(640 * KiB, 512 * KiB)]
        )
        driver = PackedDriverQueue.create(ram, size, indirect=indirect, pool_size=64 * KiB)
        ring = Ring(ram, table, driver, PackedQueue(table, driver.queue_state()))
        made.append(ring)
        return ring

    yield make
    for ring in made:
        for gpa, length in CANARIES:
            off = ring.ram.offset(gpa, length)
            assert (ring.ram.view[off : off + length] == CANARY).all(), f"canary at {gpa:#x}"
        del ring.queue
        ring.table.close()
        ring.ram.close()


def post(ring, descriptors, *, start=0):
    """Write ``(addr, len, id, flags)`` descriptors from slot ``start`` as available (lap 1),
    the first one's flags last."""
    for i, (addr, length, bid, flags) in reversed(list(enumerate(descriptors))):
        ring.driver.write_desc(start + i, addr, length, bid, flags | AVAIL)


def table_at(ring, entries):
    gpa = ring.driver.alloc(16 * max(len(entries), 1))
    ring.driver.write_indirect_table(gpa, entries)
    return gpa


# -- scenarios: each leaves the ring broken --------------------------------------------------


def buffer_in_a_canary(ring):
    post(ring, [(RAM_GPA, 16, 0, 0)])


def buffer_across_the_end_of_region_a(ring):
    post(ring, [(REGION_B - 64 * KiB - 8, 16, 0, WRITE)])


def buffer_wrapping_2_64(ring):
    post(ring, [(U64 - 8, 16, 0, 0)])


def second_buffer_outside_memory(ring):
    post(ring, [(ring.buf(), 4, 0, NEXT), (RAM_GPA + 1200 * KiB, 4, 1, 0)])


def indirect_without_the_feature(ring):
    post(ring, [(table_at(ring, [(ring.buf(), 4, 0)]), 16, 0, IND)])


def indirect_table_outside_memory(ring):
    post(ring, [(RAM_GPA, 32, 0, IND)])


def indirect_len(length):
    def scenario(ring):
        post(ring, [(table_at(ring, [(ring.buf(), 4, 0)] * 2), length, 0, IND)])

    scenario.__name__ = f"indirect_table_of_{length}_bytes"
    return scenario


def indirect_with_next(ring):
    post(ring, [(table_at(ring, [(ring.buf(), 4, 0)]), 16, 0, IND | NEXT), (ring.buf(), 4, 1, 0)])


def indirect_after_next(ring):
    post(ring, [(ring.buf(), 4, 0, NEXT), (table_at(ring, [(ring.buf(), 4, 0)]), 16, 1, IND)])


def readable_after_writable(ring):
    post(ring, [(ring.buf(), 4, 0, WRITE | NEXT), (ring.buf(), 4, 1, 0)])


def readable_after_writable_in_a_table(ring):
    entries = [(ring.buf(), 4, WRITE), (ring.buf(), 4, 0)]
    post(ring, [(table_at(ring, entries), 32, 0, IND)])


def table_entry_outside_memory(ring):
    entries = [(ring.buf(), 4, 0), (REGION_B + 512 * KiB, 4, WRITE)]
    post(ring, [(table_at(ring, entries), 32, 0, IND)])


def more_than_4_gib(ring):
    post(ring, [(ring.buf(), 0xFFFF_FFFF, 0, NEXT), (ring.buf(), 2, 1, 0)])


def list_longer_than_the_ring(ring):
    post(ring, [(ring.buf(), 4, i, NEXT) for i in range(8)])


def first_available_before_the_rest(ring):
    post(ring, [(ring.buf(), 4, 0, NEXT)])
    ring.driver.write_desc(1, ring.buf(), 4, 1, 0)  # never made available


def continuation_from_the_last_lap(ring):
    """The list continues into a slot whose flags are of the previous lap (USED set)."""
    post(ring, [(ring.buf(), 4, 0, NEXT)])
    ring.driver.write_desc(1, ring.buf(), 4, 1, USED)


def flags_flipped_after_publish(ring):
    ring.driver.add([b"a", b"b", b"c"])
    ring.driver.publish()
    ring.driver.set_flags(1, 0)  # the driver takes back the middle of an exposed list


def same_id_twice_in_a_batch(ring):
    post(ring, [(ring.buf(), 4, 5, 0), (ring.buf(), 4, 5, 0)])


def id_already_in_flight(ring):
    post(ring, [(ring.buf(), 4, 3, 0)])
    ring.queue.pop()
    post(ring, [(ring.buf(), 4, 3, 0)], start=1)


def slot_still_in_flight(ring):
    for _i in range(8):
        ring.driver.add([b"x"])
    ring.driver.publish()
    assert len(ring.queue.pop_batch(8)) == 8
    # slot 0 of lap two made available before the device used anything
    ring.driver.write_desc(0, ring.buf(), 4, 0, USED)


SCENARIOS = [
    buffer_in_a_canary,
    buffer_across_the_end_of_region_a,
    buffer_wrapping_2_64,
    second_buffer_outside_memory,
    indirect_without_the_feature,
    indirect_with_next,
    indirect_after_next,
    readable_after_writable,
    more_than_4_gib,
    list_longer_than_the_ring,
    first_available_before_the_rest,
    continuation_from_the_last_lap,
    flags_flipped_after_publish,
    same_id_twice_in_a_batch,
    id_already_in_flight,
    slot_still_in_flight,
]
INDIRECT_SCENARIOS = [
    indirect_table_outside_memory,
    indirect_len(0),
    indirect_len(8),
    indirect_len(17),
    indirect_len(16 * 32769),
    readable_after_writable_in_a_table,
    table_entry_outside_memory,
    indirect_with_next,
    indirect_after_next,
]
MEMORY_SCENARIOS = {
    buffer_in_a_canary,
    buffer_across_the_end_of_region_a,
    buffer_wrapping_2_64,
    second_buffer_outside_memory,
    indirect_table_outside_memory,
    table_entry_outside_memory,
}


def check_broken(ring, scenario, *, first=True):
    """Every pop raises, writes nothing, moves nothing (``pop()`` too if ``first``: the
    broken list is the first one)."""
    before = ring.ram.view.copy()
    position = ring.queue.state()
    pops = [ring.queue.pop_batch, ring.queue.pop_arrays]
    if first:
        pops.append(lambda _n: ring.queue.pop())
    for pop in pops:
        with pytest.raises(VirtqueueError) as info:
            pop(8)
        assert np.array_equal(ring.ram.view, before), "the queue wrote guest memory"
        assert ring.queue.state() == position
    if scenario in MEMORY_SCENARIOS:
        assert isinstance(info.value.__cause__, GuestMemoryError)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_broken_ring(guarded, scenario):
    ring = guarded(8)
    scenario(ring)
    check_broken(ring, scenario, first=scenario is not same_id_twice_in_a_batch)


@pytest.mark.parametrize("scenario", INDIRECT_SCENARIOS, ids=lambda s: s.__name__)
def test_broken_indirect(guarded, scenario):
    ring = guarded(8, indirect=True)
    scenario(ring)
    check_broken(ring, scenario)


@pytest.mark.parametrize("scenario", SCENARIOS[:4], ids=lambda s: s.__name__)
def test_a_broken_list_behind_good_ones(guarded, scenario):
    """Good lists before a broken one: the batch fails whole, nothing is returned."""
    ring = guarded(8)
    scenario(ring)
    slots = [ring.driver.desc(i) for i in range(2)]
    # move the broken list two slots on, and put two good lists in front of it
    for i, row in reversed(list(enumerate(slots))):
        ring.driver.write_desc(i + 2, *row)
    post(ring, [(ring.buf(), 4, 6, 0), (ring.buf(), 4, 7, 0)])
    check_broken(ring, scenario, first=False)


def test_a_list_cut_later_in_the_batch_waits(guarded):
    """A driver that takes back part of a later list: the complete lists before it pop."""
    ring = guarded(8)
    a = ring.driver.add([b"a"])
    ring.driver.add([b"b", b"c"])
    ring.driver.publish()
    ring.driver.set_flags(2, 0)
    assert [c.head for c in ring.queue.pop_batch(8)] == [a]
    before = ring.ram.view.copy()
    with pytest.raises(VirtqueueError):
        ring.queue.pop_batch(8)
    assert np.array_equal(ring.ram.view, before)


def test_legal_oddities_are_accepted(guarded):
    """A zero-length element, reserved flags inside an indirect table (NEXT, INDIRECT,
    AVAIL: "ignored by the device") and WRITE on the INDIRECT descriptor are accepted."""
    ring = guarded(8, indirect=True)
    entries = [(ring.buf(), 4, NEXT | IND | AVAIL), (0, 0, WRITE), (ring.buf(), 8, WRITE)]
    post(ring, [(table_at(ring, entries), 48, 9, IND | WRITE)])
    (chain,) = ring.queue.pop_batch(8)
    assert chain.head == 9
    assert [n for _, n in chain.readable] == [4]
    assert [n for _, n in chain.writable] == [8]
