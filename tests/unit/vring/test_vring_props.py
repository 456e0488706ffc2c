"""Property tests: random rings only ever raise VirtqueueError, and writes stay in bounds.

The guest memory is one memfd laid out with canaries the backend does not map::

    [canary 4K][A 16K: rings, data, indirect tables][canary 4K][B1 6K][B2 6K][canary 4K]

B1 and B2 are adjacent in guest-physical space, so buffers may legally span them.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from trio_vhost.errors import VirtqueueError
from trio_vhost.mem import GuestRam, MemoryTable
from trio_vhost.vring import ChainReader, ChainWriter, DriverQueue, QueueState, SplitQueue
from trio_vhost.vring.layout import DESC_DTYPE, used_ring_size

K = 1024
GPA = 0x10_0000
A, B1, B2 = GPA + 4 * K, GPA + 24 * K, GPA + 30 * K
END = GPA + 36 * K
CANARIES = [(GPA, 4 * K), (GPA + 20 * K, 4 * K), (END, 4 * K)]
DESC, AVAIL, USED = A, A + 0x400, A + 0x600  # room for 16 entries each
DATA = A + 0x800
IND1, IND2 = A + 0x3000, A + 0x3400  # indirect tables
U64 = 1 << 64


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


interesting_addr = st.one_of(
    st.sampled_from(
        [
            DATA,
            DATA + 100,
            A - 1,
            A,
            A + 16 * K - 8,
            B1,
            B2 - 5,
            B2,
            END - 1,
            END,
            GPA,
            0,
            IND1,
            IND2,
            DESC,
            USED,
            U64 - 1,
            U64 - 16,
        ]
    ),
    st.integers(GPA - 64, END + 64),
    st.integers(0, U64 - 1),
)
interesting_len = st.one_of(
    st.sampled_from([0, 1, 15, 16, 17, 32, 48, 4096, 6 * K, 0xFFFF_FFFF, 1 << 31]),
    st.integers(0, 0xFFFF_FFFF),
)
u16 = st.integers(0, 0xFFFF)
plain_flags = st.sampled_from([0, 0, 2, 2, 1, 1, 3, 3, 4, 5, 6])


def rows(n_max, size):
    """Descriptor rows, mostly well-formed (so chains get built), some hostile."""
    index = st.integers(0, size - 1)
    good = st.tuples(st.integers(DATA, DATA + 0x1F00), st.integers(1, 200), plain_flags, index)
    spanning = st.tuples(st.integers(B2 - 64, B2 - 1), st.integers(1, 128), plain_flags, index)
    indirect = st.one_of(
        st.tuples(st.just(IND1), st.sampled_from([16, 32, 64, 128, 0, 8, 256]), st.just(4), u16),
        st.tuples(st.just(IND2), st.sampled_from([16, 32, 48]), st.sampled_from([4, 6, 5]), u16),
    )
    hostile = st.tuples(interesting_addr, interesting_len, u16, st.one_of(index, u16))
    row = st.one_of(good, good, good, spanning, indirect, hostile)
    return st.lists(row, min_size=1, max_size=n_max)


def _tidy(rows):
    """Make NEXT links point forward (no loops, nothing out of range), as a driver would."""
    out = []
    for i, (addr, length, flags, nxt) in enumerate(rows):
        if flags & 1:
            if i + 1 < len(rows):
                nxt = i + 1
            else:
                flags &= ~1
        out.append((addr, length, flags, nxt))
    return out


@st.composite
def rings(draw):
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    index = st.integers(0, size - 1)
    tidy = draw(st.booleans())  # half the examples look like a real (maybe buggy) driver
    fix = _tidy if tidy else list
    return {
        "size": size,
        "indirect": tidy or draw(st.booleans()),
        "next_avail": draw(st.one_of(u16, st.integers(0xFFF0, 0xFFFF))),
        "ahead": draw(st.integers(1, size) if tidy else st.one_of(st.integers(1, size), u16)),
        "heads": draw(
            st.lists(
                index if tidy else st.one_of(index, index, index, u16), min_size=size, max_size=size
            )
        ),
        "desc": fix(draw(rows(size, size).map(lambda r: (r * size)[:size]))),
        "ind1": fix(draw(rows(8, 8))),
        "ind2": fix(draw(rows(3, 3))),
        "batch": draw(st.integers(1, 20)),
    }


def _load(ram, spec):
    """Reset the memory and write the random ring into it; return the queue state."""
    ram.view[:] = 0
    for gpa, length in CANARIES:
        ram.fill(gpa, length, 0xA5)
    size = spec["size"]
    ram.write(DESC, np.array(spec["desc"], dtype=DESC_DTYPE).tobytes())
    ram.write(IND1, np.array(spec["ind1"], dtype=DESC_DTYPE).tobytes())
    ram.write(IND2, np.array(spec["ind2"], dtype=DESC_DTYPE).tobytes())
    ram.view[DATA - GPA : DATA - GPA + 0x2000] = 0x11
    avail = np.zeros(3 + size, dtype="<u2")
    avail[1] = (spec["next_avail"] + spec["ahead"]) & 0xFFFF
    avail[2 : 2 + size] = spec["heads"]
    ram.write(AVAIL, avail.tobytes())
    return QueueState(
        size=size,
        desc_gpa=DESC,
        avail_gpa=AVAIL,
        used_gpa=USED,
        next_avail=spec["next_avail"],
        next_used=spec["next_avail"],
        indirect=spec["indirect"],
    )


def _mask(ranges):
    allowed = np.zeros(40 * K, dtype=bool)
    for gpa, length in ranges:
        allowed[gpa - GPA : gpa - GPA + length] = True
    return allowed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=rings())
def test_random_rings_only_raise_virtqueue_error(env, spec):
    ram, table = env
    state = _load(ram, spec)
    before = ram.view.copy()
    queue = SplitQueue(table, state)
    try:
        chains = queue.pop_batch(spec["batch"])
    except VirtqueueError:
        chains = None
    assert (ram.view == before).all(), "popping wrote guest memory"

    # the scalar path agrees with the batch path
    scalar = SplitQueue(table, state)
    try:
        singles = [scalar.pop() for _ in range(spec["batch"])]
        singles = [c for c in singles if c is not None]
    except VirtqueueError:
        singles = None
    if chains is None:
        event("VirtqueueError")
        assert singles is None
        return
    event(f"{min(len(chains), 3)}+ chains" if chains else "empty")
    assert singles == chains
    assert queue.next_avail == (state.next_avail + len(chains)) & 0xFFFF

    writable = []
    for chain in chains:
        assert 0 <= chain.head < spec["size"]
        assert chain.readable_len + chain.writable_len <= 1 << 32
        for gpa, length in chain.readable + chain.writable:
            assert length > 0
            table.check(gpa, length)
        assert len(ChainReader(table, chain).read(4096)) == min(4096, chain.readable_len)
        writer = ChainWriter(table, chain)
        room = min(chain.writable_len, 8192)
        assert writer.write(b"\xee" * room) == room
        writable.extend(chain.writable)
    queue.add_used_batch([(c.head, 0) for c in chains])
    allowed = _mask([*writable, (USED, used_ring_size(spec["size"]))])
    changed = ram.view != before
    assert not (changed & ~allowed).any(), "the device wrote outside the guest's buffers"
    for gpa, length in CANARIES:
        assert (ram.view[gpa - GPA : gpa - GPA + length] == 0xA5).all()


payloads = st.lists(st.binary(min_size=0, max_size=64), min_size=0, max_size=4)
out_lens = st.lists(st.integers(0, 64), min_size=0, max_size=3)


@settings(max_examples=150, deadline=None)
@given(
    requests=st.lists(st.tuples(payloads, out_lens, st.booleans()), min_size=1, max_size=40),
    start=st.integers(0, 0xFFFF),
    batch=st.integers(1, 16),
)
def test_well_formed_chains_round_trip(requests, start, batch):
    ram = GuestRam.create(1 << 20, gpa=0x1000_0000)
    table = MemoryTable.from_regions([ram.backend_region()])
    try:
        driver = DriverQueue.create(ram, 16, indirect=True, pool_size=256 * K)
        driver.skip_to(start)
        queue = SplitQueue(table, driver.queue_state(next_avail=start, next_used=start))
        pending = list(requests)
        while pending:
            added = {}
            while pending and driver.num_free >= 1 + len(pending[0][0]) + len(pending[0][1]):
                readable, writable, indirect = pending.pop(0)
                if not readable and not writable:
                    continue
                head = driver.add(readable, writable, indirect=indirect)
                added[head] = (b"".join(readable), sum(writable))
            driver.publish()
            done = []
            while chains := queue.pop_batch(batch):
                for chain in chains:
                    data, room = added[chain.head]
                    assert ChainReader(table, chain).read() == data
                    assert chain.writable_len == room
                    writer = ChainWriter(table, chain)
                    writer.write(data[::-1])
                    done.append((chain.head, writer.written))
                queue.add_used_batch(done[-len(chains) :])
            assert sorted(driver.get_used()) == sorted(done)
            for head, written in done:
                data, room = added[head]
                assert driver.read_written(head) == data[::-1][:room]
                assert written == min(len(data), room)
        del queue
    finally:
        table.close()
        ram.close()
