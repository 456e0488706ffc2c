"""PackedQueue <-> PackedDriverQueue: round trips, used descriptors, batches, positions.

Both sides share one memfd: the driver writes through GuestRam's mapping, the device reads
and writes through a MemoryTable built from a separate MAP_SHARED mapping of the same fd.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest

from trio_vhost.errors import VirtqueueError
from trio_vhost.mem import GuestRam, MemoryTable
from trio_vhost.vring import ChainBatch, ChainReader, ChainWriter, DescriptorChain, QueueFull
from trio_vhost.vring.packed import PackedQueue
from trio_vhost.vring.packed_driver import PackedDriverQueue
from trio_vhost.vring.packed_layout import (
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
)
from trio_vhost.vring.packed_state import decode_vring_base

GPA = 0x4000_0000
AU = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED


@dataclass
class Ring:
    ram: GuestRam
    table: MemoryTable
    driver: PackedDriverQueue
    queue: PackedQueue

    def rebuild(self, state=None):
        self.queue = PackedQueue(self.table, state or self.queue.state())
        return self.queue


@pytest.fixture
def make_ring():
    made = []

    def make(size=8, *, event_idx=False, indirect=False, pool_size=None):
        ram = GuestRam.create(max(1 << 21, 8192 * size), gpa=GPA)
        table = MemoryTable.from_regions([ram.backend_region()])
        driver = PackedDriverQueue.create(
            ram, size, event_idx=event_idx, indirect=indirect, pool_size=pool_size
        )
        ring = Ring(ram, table, driver, PackedQueue(table, driver.queue_state()))
        made.append(ring)
        return ring

    yield make
    for ring in made:
        del ring.queue
        ring.table.close()
        ring.ram.close()


def serve(ring, chain, data=b""):
    """Check the chain's readable bytes come back; write ``data`` into it."""
    writer = ChainWriter(ring.table, chain)
    writer.write(data)
    return chain.head, writer.written


def test_one_direct_buffer(make_ring):
    ring = make_ring()
    bid = ring.driver.add([b"hello"])
    assert not ring.queue.has_available()  # nothing is exposed before publish
    assert ring.queue.pop_batch(4) == []
    assert ring.driver.publish() == 1
    assert ring.queue.has_available()
    (chain,) = ring.queue.pop_batch(4)
    assert chain.head == bid
    assert chain.writable == ()
    assert chain.readable_len == 5
    assert ChainReader(ring.table, chain).read() == b"hello"
    assert not ring.queue.has_available()
    assert ring.queue.in_flight == 1
    ring.queue.add_used(bid, 0)
    assert ring.driver.get_used() == [(bid, 0)]
    assert ring.queue.in_flight == 0
    assert ring.driver.num_free == 8


@pytest.mark.parametrize("indirect", [False, True])
def test_chained_buffer_readable_then_writable(make_ring, indirect):
    ring = make_ring(indirect=True)
    bid = ring.driver.add([b"abc", b"", b"defg"], [3, 5], indirect=indirect)
    ring.driver.publish()
    chain = ring.queue.pop()
    assert chain is not None
    assert chain.head == bid
    assert ChainReader(ring.table, chain).read() == b"abcdefg"
    assert [n for _, n in chain.readable] == [3, 4]  # the empty element is left out
    assert [n for _, n in chain.writable] == [3, 5]
    assert ring.queue.in_flight == (1 if indirect else 5)
    ring.queue.add_used_batch([serve(ring, chain, b"12345678")])
    assert ring.driver.get_used() == [(bid, 8)]
    assert ring.driver.read_written(bid) == b"12345678"
    assert ring.queue.next_used == ring.queue.next_avail == ring.driver.next_avail


def random_buffer(rnd, max_elems, data_max=40):
    n_read = rnd.randrange(0, max_elems + 1)
    n_write = rnd.randrange(0 if n_read else 1, max_elems - n_read + 1) if n_read < max_elems else 0
    readable = [rnd.randbytes(rnd.randrange(0, data_max)) for _ in range(n_read)]
    writable = [rnd.randrange(0, data_max) for _ in range(n_write)]
    return readable, writable


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 33])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_round_trips_over_many_wraps(make_ring, size, seed):
    """Random lists (direct, chained, indirect), batches, completion in any order."""
    rnd = random.Random(seed * 1000 + size)
    ring = make_ring(size, indirect=True)
    driver, queue = ring.driver, ring.queue
    posted = {}  # id -> (readable, writable)
    popped: list[DescriptorChain] = []
    descriptors_done = 0
    expected_written = {}
    for step in range(400):
        # the driver adds a few lists, then exposes them all at once
        for _ in range(rnd.randrange(0, 4)):
            readable, writable = random_buffer(rnd, min(size, 4))
            use_indirect = rnd.random() < 0.3
            needed = 1 if use_indirect else len(readable) + len(writable)
            if needed > driver.num_free:
                break
            bid = driver.add(readable, writable, indirect=use_indirect)
            assert bid not in posted
            posted[bid] = (readable, writable)
        driver.publish()
        # the device pops some, with either interface
        limit = rnd.randrange(1, 5)
        if step % 2:
            chains = queue.pop_batch(limit)
        else:
            batch = queue.pop_arrays(limit)
            chains = batch.chains if batch else []
        assert len(chains) <= limit
        for chain in chains:
            readable, writable = posted[chain.head]
            assert ChainReader(ring.table, chain).read() == b"".join(readable)
            assert chain.writable_len == sum(writable)
        popped += chains
        # and completes a random subset in a random order
        rnd.shuffle(popped)
        k = rnd.randrange(0, len(popped) + 1)
        done, popped = popped[:k], popped[k:]
        completions = []
        for chain in done:
            data = rnd.randbytes(rnd.randrange(0, chain.writable_len + 1))
            completions.append(serve(ring, chain, data))
            expected_written[chain.head] = data
        if completions:
            if rnd.random() < 0.5:
                queue.add_used_batch(completions)
            else:
                heads = np.array([h for h, _ in completions], dtype=np.uint16)
                queue.add_used_arrays(heads, np.array([w for _, w in completions]))
        for bid, written in driver.get_used():
            assert written == len(expected_written[bid])
            assert driver.read_written(bid) == expected_written.pop(bid)
            readable, writable = posted.pop(bid)
            descriptors_done += 1
        assert queue.in_flight + driver.num_free <= size
    assert descriptors_done > 4 * size  # several laps of the ring
    # drain: complete what is left; both sides agree on every position
    driver.publish()
    popped += queue.pop_batch(size)
    queue.add_used_batch([(c.head, 0) for c in popped])
    assert {b for b, _ in driver.get_used()} == set(posted)
    assert queue.in_flight == 0
    assert driver.num_free == size
    assert (queue.next_avail, queue.avail_wrap) == (driver.next_avail, driver.avail_wrap)
    assert (queue.next_used, queue.used_wrap) == (driver.next_used, driver.used_wrap)


def slot_flags(ring, slot):
    return ring.driver.desc(slot)[3]


def test_used_descriptors_skip_the_slots_of_their_lists(make_ring):
    """One used descriptor per list, at the used position, which skips the list's length."""
    ring = make_ring(8)
    a = ring.driver.add([b"a", b"b"], [4])  # slots 0-2
    b = ring.driver.add([], [4])  # slot 3
    c = ring.driver.add([b"c"], [4])  # slots 4-5
    ring.driver.publish()
    chains = {ch.head: ch for ch in ring.queue.pop_batch(8)}
    assert set(chains) == {a, b, c}
    before = [ring.driver.desc(i) for i in range(8)]
    ring.queue.add_used_batch([(b, 4), (c, 0), (a, 2)])  # not in order
    # b at slot 0 (skips 1), c at slot 1 (skips 2), a at slot 3 (skips 3): next used is 6
    assert ring.driver.desc(0)[2:] == (b, AU | VIRTQ_DESC_F_WRITE)
    assert ring.driver.desc(0)[1] == 4
    assert ring.driver.desc(1)[2:] == (c, AU)  # nothing written: no WRITE
    assert ring.driver.desc(3)[2:] == (a, AU | VIRTQ_DESC_F_WRITE)
    assert ring.driver.desc(3)[1] == 2
    for slot in (2, 4, 5, 6, 7):  # untouched
        assert ring.driver.desc(slot) == before[slot]
    assert (ring.queue.next_used, ring.queue.used_wrap) == (6, True)
    assert ring.queue.last_used_ranges() == [(ring.driver.desc_gpa, 4 * 16)]
    assert ring.driver.get_used() == [(b, 4), (c, 0), (a, 2)]
    assert ring.driver.num_free == 8


def test_used_flags_follow_the_device_wrap_counter(make_ring):
    ring = make_ring(4)
    for _ in range(3):  # move both sides to slot 3
        ring.driver.add([b"x"])
    ring.driver.publish()
    ring.queue.add_used_batch([(c.head, 0) for c in ring.queue.pop_batch(4)])
    ring.driver.get_used()
    ids = [ring.driver.add([], [8]) for _ in range(3)]  # slots 3, 0 (wrapped), 1
    ring.driver.publish()
    assert [c.head for c in ring.queue.pop_batch(4)] == ids
    ring.queue.add_used_batch([(i, 1) for i in ids])
    assert slot_flags(ring, 3) == AU | VIRTQ_DESC_F_WRITE  # device wrap counter 1
    assert slot_flags(ring, 0) == VIRTQ_DESC_F_WRITE  # after the end: wrap counter 0
    assert slot_flags(ring, 1) == VIRTQ_DESC_F_WRITE
    assert (ring.queue.next_used, ring.queue.used_wrap) == (2, False)
    gpa = ring.driver.desc_gpa
    assert ring.queue.last_used_ranges() == [(gpa + 3 * 16, 16), (gpa, 2 * 16)]
    assert ring.driver.get_used() == [(i, 1) for i in ids]


class Recorder:
    """Stands in for a ring's flags column and records the slots of each store."""

    def __init__(self, column):
        self.column = column
        self.stores = []

    def __getitem__(self, key):
        return self.column[key]

    def __setitem__(self, key, value):
        self.stores.append(np.atleast_1d(np.asarray(key)).tolist())
        self.column[key] = value


def test_first_used_flags_are_stored_last(make_ring):
    ring = make_ring(8)
    ids = [ring.driver.add([b"x"], [2]) for _ in range(3)] + [ring.driver.add([b"y"])]
    ring.driver.publish()
    ring.queue.pop_batch(8)
    recorder = Recorder(ring.queue._flags)
    ring.queue._flags = recorder
    ring.queue.add_used_batch([(i, 0) for i in reversed(ids)])
    first_slot = 0
    assert recorder.stores[-1] == [first_slot]
    assert all(first_slot not in slots for slots in recorder.stores[:-1])
    # y (one slot) at 0, then x3, x2, x1 (two slots each) at 1, 3 and 5
    assert sorted(slot for slots in recorder.stores for slot in slots) == [0, 1, 3, 5]
    ring.queue._flags = recorder.column
    assert [b for b, _ in ring.driver.get_used()] == list(reversed(ids))


def test_driver_exposes_the_oldest_list_last(make_ring):
    ring = make_ring(8)
    recorder = Recorder(ring.driver._flags)
    ring.driver._flags = recorder
    ring.driver.add([b"a", b"b"])  # slots 0, 1: slot 1 is written whole at once, 0 held
    ring.driver.add([b"c"])  # slot 2, held
    assert [ring.driver.desc(i)[3] for i in range(3)] == [0, VIRTQ_DESC_F_AVAIL, 0]
    assert not ring.queue.has_available()
    ring.driver.publish()
    assert recorder.stores == [[2], [0]]
    ring.driver._flags = recorder.column
    assert len(ring.queue.pop_batch(8)) == 2


def test_id_comes_from_the_last_descriptor(make_ring):
    ring = make_ring(8)
    bid = ring.driver.add([b"a", b"b", b"c"])
    assert [ring.driver.desc(i)[2] for i in range(3)] == [0, 0, bid]
    ring.driver.write_desc(0, *ring.driver.desc(0)[:2], 0x7777, ring.driver._held[0][1])
    ring.driver.publish()
    assert ring.queue.pop().head == bid


def test_pop_arrays_batch(make_ring):
    ring = make_ring(16, indirect=True)
    simple_r = ring.driver.add([b"read"])
    simple_w = ring.driver.add([], [64])
    chained = ring.driver.add([b"a"], [8], indirect=False)
    indirect = ring.driver.add([b"b"], [8], indirect=True)
    empty = ring.driver.add([b""])  # zero length: not simple
    ring.driver.publish()
    batch = ring.queue.pop_arrays(16)
    assert isinstance(batch, ChainBatch)
    assert batch.count == 5
    assert batch.heads.tolist() == [simple_r, simple_w, chained, indirect, empty]
    assert not batch.heads.flags.writeable
    assert batch.simple.tolist() == [True, True, False, False, False]
    assert batch.writable.tolist()[:2] == [False, True]
    assert batch.length.tolist() == [4, 64, 0, 0, 0]
    assert sorted(batch.complex_chains) == [2, 3, 4]
    # the chained list is followed with numpy; the indirect and the empty one are walked
    assert sorted(batch.walked) == [3, 4]
    assert batch.segments.counts().tolist() == [1, 1, 2, 0, 0]
    assert batch.segments.writable.tolist() == [False, True, False, True]
    assert batch.readable_len.tolist() == [4, 0, 1, 1, 0]
    assert batch.writable_len.tolist() == [0, 64, 8, 8, 0]
    chains = batch.chains
    assert [c.head for c in chains] == batch.heads.tolist()
    assert chains[0] == DescriptorChain.of(simple_r, ((int(batch.addr[0]), 4),))
    ring.queue.add_used_arrays(batch.heads, np.array([0, 64, 8, 8, 0], dtype=np.uint32))
    assert ring.driver.get_used() == [
        (simple_r, 0),
        (simple_w, 64),
        (chained, 8),
        (indirect, 8),
        (empty, 0),
    ]


def test_pop_arrays_with_one_length_for_all(make_ring):
    ring = make_ring(8)
    ids = [ring.driver.add([], [16]) for _ in range(5)]
    ring.driver.publish()
    batch = ring.queue.pop_arrays(8)
    assert batch.all_simple
    ring.queue.add_used_arrays(batch.heads, 16)
    assert ring.driver.get_used() == [(i, 16) for i in ids]


def test_pop_limits(make_ring):
    ring = make_ring(8)
    ids = [ring.driver.add([b"z"]) for _ in range(5)]
    ring.driver.publish()
    assert ring.queue.pop_batch(0) == []
    assert ring.queue.pop_arrays(-1).count == 0
    assert [c.head for c in ring.queue.pop_batch(2)] == ids[:2]
    assert [c.head for c in ring.queue.pop_batch(2)] == ids[2:4]
    assert [c.head for c in ring.queue.pop_batch(9)] == ids[4:]
    assert ring.queue.pop_batch(9) == []
    assert ring.queue.pop() is None


def test_long_lists_beyond_the_first_look(make_ring):
    """A list longer than the first window is found on the second, full look."""
    ring = make_ring(256, pool_size=256 * 4096)
    bid = ring.driver.add([b"q"] * 200)
    ring.driver.publish()
    (chain,) = ring.queue.pop_batch(1)
    assert chain.head == bid
    assert chain.readable_len == 200
    assert ring.queue.in_flight == 200


def test_a_whole_ring_as_one_list(make_ring):
    ring = make_ring(5)
    bid = ring.driver.add([b"1", b"2"], [1, 1, 1])
    ring.driver.publish()
    assert ring.queue.pop().head == bid
    assert ring.queue.in_flight == 5
    assert not ring.queue.has_available()
    assert ring.queue.pop_batch(4) == []
    ring.queue.add_used(bid, 3)
    assert ring.driver.get_used() == [(bid, 3)]


def test_resume_state_hands_back_an_abandoned_batch(make_ring):
    ring = make_ring(8)
    ring.driver.add([b"first"])
    ring.driver.publish()
    first = ring.queue.pop()
    ring.queue.add_used(first.head, 0)
    ids = [ring.driver.add([b"a", b"b"]), ring.driver.add([b"c"]), ring.driver.add([b"d", b"e"])]
    ring.driver.publish()
    chains = ring.queue.pop_batch(8)
    assert [c.head for c in chains] == ids
    assert ring.queue.resume_state(0) == ring.queue.state()
    with pytest.raises(ValueError):
        ring.queue.resume_state(4)
    state = ring.queue.resume_state(2)
    assert (state.next_avail, state.next_used) == (3, 1)
    # the first chain of the batch was completed; the other two come back
    ring.queue.add_used(chains[0].head, 0)
    state = ring.queue.resume_state(2)
    assert (state.next_avail, state.next_used) == (3, 3)
    again = ring.rebuild(state).pop_batch(8)
    assert again == chains[1:]
    with pytest.raises(ValueError):
        ring.queue.add_used(chains[0].head, 0)  # not in flight on the new queue


def test_resume_state_refuses_completed_chains(make_ring):
    ring = make_ring(8)
    ring.driver.add([b"a"])
    ring.driver.publish()
    chain = ring.queue.pop()
    ring.queue.add_used(chain.head, 0)
    with pytest.raises(ValueError):
        ring.queue.resume_state(1)


@pytest.mark.parametrize("size", [3, 8])
def test_stop_and_resume_through_the_vring_base(make_ring, size):
    """GET_VRING_BASE's value, fed back to SET_VRING_BASE, resumes the ring exactly."""
    ring = make_ring(size, indirect=True)
    rnd = random.Random(size)
    for _round in range(4 * size):
        bid = ring.driver.add(*random_buffer(rnd, min(size, 3)))
        ring.driver.publish()
        (chain,) = ring.queue.pop_batch(4)
        assert chain.head == bid
        ring.queue.add_used(bid, 0)
        assert ring.driver.get_used() == [(bid, 0)]
        value = ring.queue.state().vring_base  # GET_VRING_BASE
        base = decode_vring_base(value)
        assert (base.next_avail, base.avail_wrap) == (
            ring.driver.next_avail,
            ring.driver.avail_wrap,
        )
        assert (base.next_used, base.used_wrap) == (ring.driver.next_used, ring.driver.used_wrap)
        ring.rebuild(ring.queue.state().with_vring_base(value))  # SET_VRING_BASE


def test_a_state_with_chains_in_flight_counts_them(make_ring):
    ring = make_ring(4)
    ring.driver.add([b"a", b"b", b"c"])
    ring.driver.publish()
    ring.queue.pop()
    queue = ring.rebuild()
    assert queue.in_flight == 3
    assert ring.driver.add([b"d"]) is not None
    ring.driver.publish()
    assert len(queue.pop_batch(4)) == 1
    assert queue.in_flight == 4


def test_batch_of_is_not_possible(make_ring):
    ring = make_ring()
    with pytest.raises(NotImplementedError):
        ring.queue.batch_of(np.array([0], dtype=np.uint16))


@pytest.mark.parametrize(
    "completions",
    [
        [(5, 0)],  # not in flight
        [(0, 0), (0, 0)],  # twice
        [(0, 1 << 32)],  # length too big
        [(0, -1)],
        [(1 << 16, 0)],
        [(-1, 0)],
        [(0,)],
        [(0, 1, 2)],
        [("x", 1)],
    ],
)
def test_bad_completions_write_nothing(make_ring, completions):
    ring = make_ring()
    ring.driver.add([b"a"])
    ring.driver.add([b"b"])
    ring.driver.publish()
    ring.queue.pop_batch(2)
    before = ring.ram.view.copy()
    with pytest.raises(ValueError):
        ring.queue.add_used_batch(completions)
    assert np.array_equal(ring.ram.view, before)
    assert ring.queue.in_flight == 2


@pytest.mark.parametrize(
    ("heads", "written"),
    [
        (np.array([[0]]), 0),
        (np.array([0.0]), 0),
        ([0], 0),
        (np.array([0, 1]), np.array([1])),
        (np.array([0, 1]), np.array([1.0, 2.0])),
        (np.array([0, 1]), [1, 2]),
        (np.array([0, 1]), -1),
        (np.array([0, 1]), 1 << 32),
        (np.array([0, 9]), 0),
    ],
)
def test_bad_array_completions_write_nothing(make_ring, heads, written):
    ring = make_ring()
    ring.driver.add([b"a"])
    ring.driver.add([b"b"])
    ring.driver.publish()
    ring.queue.pop_batch(2)
    before = ring.ram.view.copy()
    with pytest.raises(ValueError):
        ring.queue.add_used_arrays(heads, written)
    assert np.array_equal(ring.ram.view, before)


def test_empty_completions(make_ring):
    ring = make_ring()
    ring.queue.add_used_batch([])
    ring.queue.add_used_arrays(np.zeros(0, dtype=np.uint16), 0)
    assert ring.queue.last_used_ranges() == []
    assert not ring.queue.needs_notification()


def test_driver_runs_out_of_slots_ids_and_room(make_ring):
    ring = make_ring(4, pool_size=4 * 64)
    ring.driver.add([b"a"] * 3)
    with pytest.raises(QueueFull):
        ring.driver.add([b"a"] * 2)  # one slot left
    with pytest.raises(QueueFull):
        ring.driver.add([b"x" * 65])  # an id's area is 64 bytes
    ring.driver.add([b"b"])
    with pytest.raises(QueueFull):
        ring.driver.add([b"c"])
    with pytest.raises(ValueError):
        ring.driver.add([])


def test_driver_refuses_a_device_that_uses_an_unknown_id(make_ring):
    ring = make_ring()
    bid = ring.driver.add([b"a"])
    ring.driver.publish()
    ring.queue.pop()
    ring.driver.write_desc(0, 0, 0, bid + 1, AU)
    with pytest.raises(VirtqueueError):
        ring.driver.get_used()


def test_start_at_another_position(make_ring):
    ring = make_ring(6)
    ring.driver.start_at(4, False)
    queue = ring.rebuild(ring.driver.queue_state())
    assert (queue.next_avail, queue.avail_wrap) == (4, False)
    ids = [ring.driver.add([b"a", b"b"]), ring.driver.add([b"c"])]  # slots 4-5, then 0
    ring.driver.publish()
    assert [c.head for c in queue.pop_batch(4)] == ids
    assert (queue.next_avail, queue.avail_wrap) == (1, True)
    queue.add_used_batch([(i, 0) for i in ids])
    assert ring.driver.get_used() == [(i, 0) for i in ids]
    with pytest.raises(ValueError):
        ring.driver.start_at(6, True)


def test_add_used_refuses_device_bugs(make_ring):
    ring = make_ring()
    with pytest.raises(ValueError):
        ring.queue.resume_state(1)  # nothing was popped
    bid = ring.driver.add([b"a"])
    ring.driver.publish()
    ring.queue.pop()
    before = ring.ram.view.copy()
    for buffer_id, written in [(bid + 1, 0), (-1, 0), (1 << 16, 0), (bid, -1), (bid, 1 << 32)]:
        with pytest.raises(ValueError):
            ring.queue.add_used(buffer_id, written)
    assert np.array_equal(ring.ram.view, before)
    ring.queue.add_used(bid, 0)
    with pytest.raises(ValueError):
        ring.queue.add_used(bid, 0)  # twice
