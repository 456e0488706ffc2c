"""Property tests of the packed ring.

1. Whatever lists a correct driver posts (shapes, batches, completion order, laps), the device
   pops exactly the chains it posted, in order, and both sides end at the same positions.
2. Whatever a hostile driver writes into the ring, popping raises nothing but VirtqueueError,
   writes nothing, and completing what was popped writes only the ring and the buffers.

Guest memory for (2) is one memfd with canaries the backend does not map::

    [canary 4K][A 16K: ring, data, indirect tables][canary 4K][B1 6K][B2 6K][canary 4K]

B1 and B2 are adjacent in guest-physical space, so buffers may legally span them.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from trio_vhost.errors import VirtqueueError
from trio_vhost.mem import GuestRam, MemoryTable
from trio_vhost.vring import ChainWriter
from trio_vhost.vring.packed import PackedQueue
from trio_vhost.vring.packed_driver import PackedDriverQueue
from trio_vhost.vring.packed_layout import (
    PACKED_DESC_DTYPE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
)
from trio_vhost.vring.packed_state import PackedQueueState

# -- 1. a correct driver ---------------------------------------------------------------------

shape = st.tuples(
    st.lists(st.integers(0, 48), max_size=3),  # readable element lengths
    st.lists(st.integers(0, 48), max_size=3),  # writable element lengths
    st.booleans(),  # in an indirect table
).filter(lambda s: s[0] or s[1])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(1, 9),
    batches=st.lists(st.lists(shape, min_size=1, max_size=6), min_size=1, max_size=25),
    rnd=st.randoms(use_true_random=False),
)
def test_device_pops_what_the_driver_posted(size, batches, rnd):
    with GuestRam.create(1 << 20, gpa=0x1000_0000) as ram:
        table = MemoryTable.from_regions([ram.backend_region()])
        try:
            driver = PackedDriverQueue.create(ram, size, indirect=True, pool_size=1024 * size)
            queue = PackedQueue(table, driver.queue_state())
            _run(ram, table, driver, queue, batches, rnd)
            del queue
        finally:
            table.close()


def _run(ram, table, driver, queue, batches, rnd):
    in_flight = {}
    for batch in batches:
        order = []
        for readable, writable, indirect in batch:
            slots = 1 if indirect else len(readable) + len(writable)
            if slots > driver.num_free or driver.in_flight == driver.size:
                continue
            data = [rnd.randbytes(n) for n in readable]
            bid = driver.add(data, writable, indirect=indirect)
            order.append(bid)
        driver.publish()
        popped = []
        while True:
            limit = rnd.randrange(1, 5)
            if rnd.random() < 0.5:
                chains = queue.pop_batch(limit)
            else:
                arrays = queue.pop_arrays(limit)
                chains = arrays.chains if arrays else []
            if not chains:
                break
            popped += chains
        assert [c.head for c in popped] == order
        for chain in popped:
            assert chain == driver.chain_of(chain.head)
            in_flight[chain.head] = chain
        # complete a random part, in a random order
        heads = list(in_flight)
        rnd.shuffle(heads)
        done = heads[: rnd.randrange(0, len(heads) + 1)]
        completions = []
        for bid in done:
            chain = in_flight.pop(bid)
            writer = ChainWriter(table, chain)
            writer.write(bytes([bid & 0xFF]) * rnd.randrange(0, chain.writable_len + 1))
            completions.append((bid, writer.written))
        queue.add_used_batch(completions)
        assert driver.get_used() == completions
        for bid, written in completions:
            assert driver.read_written(bid) == bytes([bid & 0xFF]) * written
    queue.add_used_batch([(bid, 0) for bid in in_flight])
    assert {b for b, _ in driver.get_used()} == set(in_flight)
    assert (queue.next_avail, queue.avail_wrap) == (driver.next_avail, driver.avail_wrap)
    assert (queue.next_used, queue.used_wrap) == (driver.next_used, driver.used_wrap)
    assert queue.in_flight == 0
    assert driver.num_free == driver.size


# -- 2. a hostile driver ---------------------------------------------------------------------

K = 1024
GPA = 0x10_0000
A, B1, B2 = GPA + 4 * K, GPA + 24 * K, GPA + 30 * K
END = GPA + 36 * K
CANARIES = [(GPA, 4 * K), (GPA + 20 * K, 4 * K), (END, 4 * K)]
RING, DRIVER_AREA, DEVICE_AREA = A, A + 0x200, A + 0x204  # up to 32 slots
DATA = A + 0x800
IND1, IND2 = A + 0x3000, A + 0x3400  # indirect tables
U64 = 1 << 64
AU = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED


@pytest.fixture(scope="module")
def env():
    ram = GuestRam.create(40 * K, gpa=GPA)
    regions = [
        ram.backend_region(4 * K, 16 * K),
        ram.backend_region(24 * K, 6 * K),
        ram.backend_region(30 * K, 6 * K),
    ]
    table = MemoryTable.from_regions(regions)
    yield ram, table
    table.close()
    ram.close()


# Mostly plausible values, so that many rings pop something, with hostile ones mixed in.
good_addresses = st.sampled_from([DATA, DATA + 100, DATA + 0x400, B1 + 8, B2 - 5, IND1, IND2])
bad_addresses = st.sampled_from([A - 1, A + 16 * K - 8, END - 1, END, GPA, 0, U64 - 1, U64 - 8])
addresses = st.one_of(good_addresses, good_addresses, bad_addresses, st.integers(0, U64 - 1))
lengths = st.one_of(
    st.sampled_from([1, 5, 16, 32, 48]),
    st.sampled_from([0, 4096, 6 * K, 0xFFFF_FFFF]),
    st.integers(0, 0xFFFF_FFFF),
)
flag_bits = st.one_of(
    st.sampled_from([0, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT]),
    st.sets(
        st.sampled_from([VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT, 0x10])
    ).map(sum),
)
#: None: the AVAIL/USED bits that make the slot available; else those bits, raw
availability = st.one_of(st.none(), st.none(), st.sampled_from([0, VIRTQ_DESC_F_AVAIL, AU]))
#: None: the slot number, so ids are mostly distinct; else any id (duplicates are hostile)
ids = st.one_of(st.none(), st.none(), st.integers(0, 7))
descriptor = st.tuples(addresses, lengths, ids, flag_bits, availability)


def _available_bits(slot, index, wrap, size):
    """The AVAIL/USED bits of an available descriptor at ``slot`` for a device at index."""
    lap_wrap = wrap if slot >= index else not wrap
    return VIRTQ_DESC_F_AVAIL if lap_wrap else VIRTQ_DESC_F_USED


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(1, 8),
    start=st.tuples(st.integers(0, 7), st.booleans()),
    ring=st.lists(descriptor, min_size=8, max_size=8),
    tables=st.lists(st.lists(descriptor, max_size=4), min_size=2, max_size=2),
    indirect=st.booleans(),
    limit=st.integers(1, 9),
)
def test_hostile_rings_only_raise_virtqueue_errors(env, size, start, ring, tables, indirect, limit):
    ram, table = env
    ram.fill(A, 16 * K, 0)
    ram.fill(B1, 12 * K, 0)
    for gpa, length in CANARIES:
        ram.fill(gpa, length, 0xA5)
    index = start[0] % size
    rows = np.zeros(size, dtype=PACKED_DESC_DTYPE)
    for i in range(size):
        addr, length, bid, flags, avail = ring[i]
        if avail is None:
            avail = _available_bits(i, index, start[1], size)
        rows[i] = (addr, length, i if bid is None else bid, flags | avail)
    ram.write(RING, rows.tobytes())
    for gpa, entries in zip((IND1, IND2), tables, strict=True):
        block = np.zeros(len(entries), dtype=PACKED_DESC_DTYPE)
        for i, (addr, length, bid, flags, avail) in enumerate(entries):
            block[i] = (addr, length, bid or 0, flags | (avail or 0))
        ram.write(gpa, block.tobytes())
    state = PackedQueueState(
        size=size,
        desc_gpa=RING,
        driver_gpa=DRIVER_AREA,
        device_gpa=DEVICE_AREA,
        next_avail=index,
        avail_wrap=start[1],
        next_used=index,
        used_wrap=start[1],
        indirect=indirect,
    )
    queue = PackedQueue(table, state)
    before = ram.view.copy()
    try:
        chains = queue.pop_batch(limit)
    except VirtqueueError:
        event("VirtqueueError")
        assert np.array_equal(ram.view, before)
        assert queue.state() == state
        return
    event(f"popped {min(len(chains), 3)}+ chains")
    assert np.array_equal(ram.view, before)
    # complete what was popped: only the ring slots and the buffers may change
    allowed = np.zeros(len(ram.view), dtype=bool)
    allowed[ram.offset(RING) : ram.offset(RING) + 16 * size] = True
    for chain in chains:
        for gpa, length in chain.writable:
            allowed[ram.offset(gpa) : ram.offset(gpa) + length] = True
        ChainWriter(table, chain).write(b"\x5a" * min(chain.writable_len, 64 * K))
    queue.add_used_batch([(c.head, min(c.writable_len, 0xFFFF_FFFF)) for c in chains])
    changed = ram.view != before
    assert not (changed & ~allowed).any()
    assert queue.in_flight == 0
