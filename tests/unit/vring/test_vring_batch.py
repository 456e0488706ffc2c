"""The array-level batch API: SplitQueue.pop_arrays / ChainBatch / add_used_arrays.

* equivalence: on random rings (single, chained, indirect, zero-length, region-spanning and
  hostile descriptors; 16-bit and slot wrap; one-region and three-region tables)
  ``pop_arrays`` agrees with the scalar ``pop`` and with ``pop_batch``, or all three raise
  VirtqueueError without moving ``next_avail`` or writing guest memory;
* every hostile scenario of ``test_vring_hostile`` through ``pop_arrays``;
* ``add_used_arrays``: slot and 16-bit wrap, scalar or array lengths, device bugs refused
  with nothing written.
"""

from __future__ import annotations

import numpy as np
import pytest
import test_vring_hostile as hostile
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from trio_vhost.errors import VirtqueueError
from trio_vhost.mem import GuestRam, MemoryTable
from trio_vhost.vring import ChainBatch, ChainReader, ChainWriter, QueueState, SplitQueue
from trio_vhost.vring.layout import DESC_DTYPE
from trio_vhost.vring.layout import VIRTQ_DESC_F_INDIRECT as IND
from trio_vhost.vring.layout import VIRTQ_DESC_F_NEXT as NEXT
from trio_vhost.vring.layout import VIRTQ_DESC_F_WRITE as WRITE

K = 1024
GPA = 0x20_0000
# [canary 4K][A 16K: rings, data, indirect tables][canary 4K][B1 6K][B2 6K][canary 4K]
A, B1, B2, END = GPA + 4 * K, GPA + 24 * K, GPA + 30 * K, GPA + 36 * K
DESC, AVAIL, USED = A, A + 0x1000, A + 0x1400  # room for 64 entries each
DATA = A + 0x2000
IND1 = A + 0x3800
U64 = 1 << 64


@pytest.fixture(scope="module")
def env():
    ram = GuestRam.create(40 * K, gpa=GPA)
    three = MemoryTable.from_regions(
        [
            ram.backend_region(4 * K, 16 * K),
            ram.backend_region(24 * K, 6 * K),
            ram.backend_region(30 * K, 6 * K),
        ]
    )
    one = MemoryTable.from_regions([ram.backend_region(4 * K, 16 * K)])
    yield ram, {"one": one, "three": three}
    one.close()
    three.close()
    ram.close()


u16 = st.integers(0, 0xFFFF)
anywhere = st.one_of(
    st.sampled_from([0, GPA, A - 1, A, A + 16 * K - 1, B1, B2 - 1, END - 1, END, U64 - 1]),
    st.integers(GPA - 64, END + 64),
    st.integers(0, U64 - 1),
)
lengths = st.one_of(st.sampled_from([0, 1, 16, 4096, 0xFFFF_FFFF]), st.integers(0, 0xFFFF_FFFF))
rw = st.sampled_from([0, WRITE])


def descriptors(size, *, tidy, far=True):
    index = st.integers(0, size - 1)
    single_a = st.tuples(st.integers(DATA, DATA + 0x1000), st.integers(1, 256), rw, u16)
    single_b = st.tuples(st.integers(B1, END - 64), st.integers(1, 64), rw, u16)
    spanning = st.tuples(st.integers(B2 - 32, B2 - 1), st.integers(33, 64), rw, u16)
    empty = st.tuples(anywhere, st.just(0), rw, u16)
    chained = st.tuples(st.integers(DATA, DATA + 0x1000), st.integers(1, 64), st.just(NEXT), index)
    indirect = st.tuples(st.just(IND1), st.sampled_from([16, 32, 48]), st.just(IND), u16)
    hostile_row = st.tuples(anywhere, lengths, u16, u16)
    # B1 and B2 are adjacent: a buffer may span them, but only the three-region table maps them
    far_rows = [single_b, spanning] if far else []
    row = st.one_of(single_a, single_a, single_a, *far_rows, empty, chained, indirect)
    # a tidy driver writes well-formed rows (they may still point outside a small table);
    # a hostile one writes anything
    any_row = row if tidy else st.one_of(row, row, row, hostile_row)
    return st.lists(any_row, min_size=size, max_size=size)


def _tidy(rows):
    """NEXT links point forward (no loops), as a driver would make them."""
    out = []
    for i, (addr, length, flags, nxt) in enumerate(rows):
        if flags & NEXT:
            if i + 1 < len(rows):
                nxt = i + 1
            else:
                flags &= ~NEXT
        out.append((addr, length, flags, nxt))
    return out


@st.composite
def rings(draw):
    size = draw(st.sampled_from([1, 2, 4, 16, 64]))
    tidy = draw(st.booleans())
    table = draw(st.sampled_from(["one", "three"]))
    fix = _tidy if tidy else list
    heads = st.integers(0, size - 1)
    return {
        "size": size,
        "table": table,
        "indirect": tidy or draw(st.booleans()),
        "next_avail": draw(st.one_of(u16, st.integers(0xFFC0, 0xFFFF))),
        "ahead": draw(st.integers(1, size) if tidy else st.one_of(st.integers(0, size), u16)),
        "heads": draw(
            st.lists(heads if tidy else st.one_of(heads, heads, u16), min_size=size, max_size=size)
        ),
        "desc": fix(draw(descriptors(size, tidy=tidy, far=table == "three"))),
        "ind1": fix(draw(descriptors(3, tidy=tidy).map(lambda r: [(DATA, 5, 0, 0), *r[1:]]))),
        "batch": draw(st.sampled_from([64, 64, 64, 64, 70, 8, 3, 1, 0, -1])),
    }


def _load(ram, spec):
    ram.view[:] = 0
    ram.fill(GPA, 4 * K, 0xA5)
    ram.fill(GPA + 20 * K, 4 * K, 0xA5)
    ram.fill(END, 4 * K, 0xA5)
    size = spec["size"]
    ram.write(DESC, np.array(spec["desc"], dtype=DESC_DTYPE).tobytes())
    ram.write(IND1, np.array(spec["ind1"], dtype=DESC_DTYPE).tobytes())
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


def _pop(make):
    try:
        return make()
    except VirtqueueError:
        return None


def _check_simple_rows(batch: ChainBatch, table: MemoryTable) -> None:
    """The array rows of simple chains are exactly their chain; complex rows are zero."""
    simple = batch.simple
    assert simple.dtype == np.bool_
    assert sorted(np.flatnonzero(~simple).tolist()) == sorted(batch.complex_chains)
    assert batch.all_simple == bool(simple.all())
    regions = batch.region
    for pos, chain in enumerate(batch.chains):
        assert batch.chain(pos) == chain
        assert chain.head == batch.heads[pos]
        addr, length = int(batch.addr[pos]), int(batch.length[pos])
        if not simple[pos]:
            assert (addr, length, int(batch.offset[pos]), int(regions[pos])) == (0, 0, 0, -1)
            assert not batch.writable[pos]
            continue
        assert length > 0
        if batch.writable[pos]:
            assert chain.writable == ((addr, length),)
            assert chain.readable == ()
        else:
            assert chain.readable == ((addr, length),)
            assert chain.writable == ()
        region = table.regions[int(regions[pos])]
        assert region.gpa + int(batch.offset[pos]) == addr
        assert addr + length <= region.gpa + region.size
    assert batch.readable_len.tolist() == [c.readable_len for c in batch.chains]
    assert batch.writable_len.tolist() == [c.writable_len for c in batch.chains]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=rings())
def test_pop_arrays_agrees_with_pop_and_pop_batch(env, spec):
    ram, tables = env
    table = tables[spec["table"]]
    state = _load(ram, spec)
    before = ram.view.copy()
    n = spec["batch"]

    queue = SplitQueue(table, state)
    batch = _pop(lambda: queue.pop_arrays(n))
    assert (ram.view == before).all(), "popping wrote guest memory"
    listed = SplitQueue(table, state)
    chains = _pop(lambda: listed.pop_batch(n))
    scalar = SplitQueue(table, state)
    singles = _pop(lambda: [c for c in (scalar.pop() for _ in range(max(n, 0))) if c is not None])
    if batch is None:
        event("VirtqueueError")
        assert chains is None
        assert singles is None
        assert queue.next_avail == listed.next_avail == state.next_avail
        return
    event(f"{min(batch.count, 3)}+ chains")
    event(f"{min(len(batch.complex_chains), 2)}+ complex, table {spec['table']}")
    assert batch.chains == chains == singles
    assert isinstance(batch.heads, np.ndarray)
    assert batch.heads.dtype == np.uint16
    assert len(batch) == batch.count == len(chains)
    assert queue.next_avail == (state.next_avail + batch.count) & 0xFFFF
    _check_simple_rows(batch, table)

    # every simple buffer is really usable: read / write through the reader and writer
    for chain in batch.chains:
        assert len(ChainReader(table, chain).read(4096)) == min(4096, chain.readable_len)
        room = min(chain.writable_len, 4096)
        assert ChainWriter(table, chain).write(b"\xee" * room) == room
    queue.add_used_arrays(batch.heads, batch.writable_len.astype(np.uint32))
    assert queue.next_used == queue.next_avail


@pytest.mark.parametrize("scenario", hostile.SCENARIOS, ids=[s.__name__ for s in hostile.SCENARIOS])
def test_hostile_ring_through_pop_arrays(guarded, layout, scenario):
    ring = guarded(8, indirect=scenario.__name__ not in hostile.NEEDS_INDIRECT)
    scenario(ring, layout)
    d = ring.driver
    if d.avail_idx == 0 and scenario.__name__ != "avail_idx_backwards":
        d.push_avail(0)
    if scenario.__name__ != "avail_idx_backwards":
        d.publish()
    before = ring.snapshot()
    for _ in range(2):  # a broken ring stays broken: nothing moved
        with pytest.raises(VirtqueueError):
            ring.queue.pop_arrays(8)
        assert ring.queue.next_avail == 0
    assert (ring.snapshot() == before).all(), "a hostile ring made the device write"
    ring.assert_canaries()


def test_broken_chain_after_good_ones_returns_nothing(guarded):
    ring = guarded(8)
    d = ring.driver
    d.add([b"good"])
    d.add([b"good"])
    d.write_desc(5, d.alloc(4), 4, NEXT, 5)
    d.push_avail(5)
    d.publish()
    with pytest.raises(VirtqueueError):
        ring.queue.pop_arrays(8)
    assert ring.queue.next_avail == 0
    assert ring.queue.pop_arrays(2).count == 2


def test_arrays_are_private_copies(make_ring):
    """Changing the descriptor table after the pop changes nothing the device sees."""
    ring = make_ring(8)
    d = ring.driver
    heads = d.add_batch(4, 64, write=True)
    d.publish()
    batch = ring.queue.pop_arrays(8)
    addr, length = batch.addr.copy(), batch.length.copy()
    for head in heads.tolist():
        d.write_desc(head, 0, 0xFFFF_FFFF, NEXT | IND, head)
    assert (batch.addr == addr).all()
    assert (batch.length == length).all()
    assert batch.heads.tolist() == heads.tolist()
    assert batch.writable.all()
    assert batch.all_simple
    assert batch.region.tolist() == [0] * 4


def test_mixed_batch_and_lazy_views(make_ring):
    ring = make_ring(16, indirect=True)
    d = ring.driver
    expected = [
        d.add([b"one"]),
        d.add([], [7]),
        d.add([b"two", b"!"], [3], indirect=False),
        d.add([b"ind"], [4], indirect=True),
        d.add([b"last"]),
    ]
    d.publish()
    batch = ring.queue.pop_arrays(16)
    assert batch.heads.tolist() == expected
    assert sorted(batch.complex_chains) == [2, 3]
    assert batch.simple.tolist() == [True, True, False, False, True]
    assert batch.writable.tolist() == [False, True, False, False, False]
    assert batch.length.tolist() == [3, 7, 0, 0, 4]
    assert batch.readable_len.tolist() == [3, 0, 4, 3, 4]
    assert batch.writable_len.tolist() == [0, 7, 3, 4, 0]
    assert ChainReader(ring.table, batch.chain(2)).read() == b"two!"
    with pytest.raises(IndexError):
        batch.chain(5)
    assert batch.chains is batch.chains
    assert "complex=2" in repr(batch)
    ring.queue.add_used_arrays(batch.heads, np.array([0, 7, 3, 4, 0], dtype=np.int64))
    assert d.get_used() == list(zip(expected, [0, 7, 3, 4, 0], strict=True))


def test_empty_and_non_positive_batches(make_ring):
    ring = make_ring(8)
    for n in (8, 0, -1):
        batch = ring.queue.pop_arrays(n)
        assert not batch
        assert batch.count == 0
        assert batch.chains == []
        assert batch.all_simple
    ring.driver.add([b"x"])
    ring.driver.publish()
    assert ring.queue.pop_arrays(0).count == 0
    assert ring.queue.next_avail == 0
    assert ring.queue.pop_arrays(8).count == 1
    ring.queue.add_used_arrays(np.zeros(0, dtype=np.uint16), 0)
    ring.queue.add_used_arrays(np.zeros(0, dtype=np.uint16), np.zeros(0, dtype=np.uint32))
    assert ring.driver.used_idx() == 0


def test_buffers_of_other_regions(guarded, layout):
    ring = guarded(8)
    d = ring.driver
    far = layout["B"] + 100
    d.ram.write(far, b"far away")
    d.write_desc(0, far, 8)
    d.write_desc(1, layout["B"] + layout["size"] - 16, 16, WRITE)
    d.write_desc(2, d.alloc(4), 4)
    for head in (0, 1, 2):
        d.push_avail(head)
    d.publish()
    batch = ring.queue.pop_arrays(8)
    assert batch.all_simple
    assert batch.region.tolist() == [1, 1, 0]
    assert batch.offset.tolist()[:2] == [100, layout["size"] - 16]
    region = ring.table.regions[1]
    start = int(batch.offset[0])
    assert region.view[start : start + 8].tobytes() == b"far away"


# -- add_used_arrays --------------------------------------------------------------------------


@pytest.mark.parametrize("start", [0, 3, 7, 65533, 65535])
@pytest.mark.parametrize("scalar", [True, False])
def test_add_used_arrays_wraps(make_ring, start, scalar):
    ring = make_ring(8, start=start)
    d, q = ring.driver, ring.queue
    for round_ in range(3):
        heads = d.add_batch(8 if round_ != 1 else 5, 16, write=True)
        d.publish()
        batch = q.pop_arrays(8)
        assert batch.heads.tolist() == heads.tolist()
        written = 9 if scalar else np.arange(batch.count, dtype=np.uint32) + 1
        q.add_used_arrays(batch.heads, written)
        expected = [9] * batch.count if scalar else list(range(1, batch.count + 1))
        assert d.get_used() == list(zip(heads.tolist(), expected, strict=True))
    assert q.next_used == q.next_avail == (start + 21) & 0xFFFF
    assert d.used_idx() == q.next_used


@pytest.mark.parametrize(
    ("heads", "written"),
    [
        (np.array([8], dtype=np.uint16), 0),  # head >= size
        (np.array([-1], dtype=np.int64), 0),
        (np.array([0, 1], dtype=np.uint16), np.array([1], dtype=np.uint32)),  # lengths differ
        (np.array([0], dtype=np.uint16), 1 << 32),
        (np.array([0], dtype=np.uint16), -1),
        (np.array([0], dtype=np.uint16), np.array([1 << 32], dtype=np.uint64)),
        (np.array([0], dtype=np.uint16), np.array([-1], dtype=np.int32)),
        (np.array([0], dtype=np.uint16), np.array([1.0])),
        (np.array([0.0]), 0),
        (np.zeros((1, 2), dtype=np.uint16), 0),
        ([0], 0),
        (np.array([0], dtype=np.uint16), [0]),
        (np.zeros(9, dtype=np.uint16), 0),  # more than the ring holds
        (np.zeros(0, dtype=np.uint16), np.zeros(1, dtype=np.uint32)),
    ],
)
def test_add_used_arrays_rejects_device_bugs(make_ring, heads, written):
    ring = make_ring(8, start=6)
    used = ring.ram.view.copy()
    with pytest.raises(ValueError):
        ring.queue.add_used_arrays(heads, written)
    assert ring.queue.next_used == 6
    assert (ring.ram.view == used).all(), "a refused completion was written"


def test_add_used_arrays_takes_any_integer_dtype(make_ring):
    ring = make_ring(8)
    d, q = ring.driver, ring.queue
    heads = d.add_batch(3, 16)
    d.publish()
    batch = q.pop_arrays(8)
    q.add_used_arrays(batch.heads.astype(np.int64), np.array([0, 5, 0xFFFF_FFFF], np.uint64))
    assert d.get_used() == list(zip(heads.tolist(), [0, 5, 0xFFFF_FFFF], strict=True))
