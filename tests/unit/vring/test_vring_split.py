"""SplitQueue data path: batches, ordering, 16-bit wrap, slot wrap, resume, multi-region."""

from __future__ import annotations

import numpy as np
import pytest

from trio_vhost.vring import ChainReader, ChainWriter, SplitQueue
from trio_vhost.vring.layout import VIRTQ_DESC_F_WRITE


def test_empty_ring(make_ring):
    ring = make_ring()
    assert not ring.queue.has_available()
    assert ring.queue.pop_batch(8) == []
    assert ring.queue.pop() is None
    ring.driver.add([b"x"])
    assert not ring.queue.has_available()  # not published yet
    ring.driver.publish()
    assert ring.queue.has_available()
    assert ring.queue.pop_batch(0) == []
    assert ring.queue.pop_batch(-1) == []


def test_batch_limit_and_order(make_ring):
    ring = make_ring(8)
    heads = [ring.driver.add([bytes([i]) * (i + 1)]) for i in range(6)]
    ring.driver.publish()
    first = ring.queue.pop_batch(4)
    assert [c.head for c in first] == heads[:4]
    assert ring.queue.next_avail == 4
    rest = ring.queue.pop_batch(100)
    assert [c.head for c in rest] == heads[4:]
    assert [ChainReader(ring.table, c).read() for c in first + rest] == [
        bytes([i]) * (i + 1) for i in range(6)
    ]
    assert ring.queue.pop_batch(100) == []


def test_pop_matches_pop_batch(make_ring):
    ring = make_ring(8, indirect=True)
    d = ring.driver
    d.add([b"a"])
    d.add([b"bb"], [3], indirect=False)
    d.add([b"ccc"], [1, 2])
    d.add([], [7])
    d.publish()
    batch = ring.queue.pop_batch(8)
    again = ring.rebuild(next_avail=0)
    singles = [again.pop() for _ in range(4)]
    assert singles == batch
    assert again.pop() is None
    assert again.next_avail == 4


def test_mixed_fast_and_slow_chains_keep_ring_order(make_ring):
    ring = make_ring(32, indirect=True)
    d = ring.driver
    expected = []
    for i in range(12):
        kind = i % 3
        if kind == 0:
            expected.append(d.add([b"s%d" % i]))
        elif kind == 1:
            expected.append(d.add([b"c%d" % i, b"!"], [2], indirect=False))
        else:
            expected.append(d.add([b"i%d" % i], [4], indirect=True))
    d.publish()
    chains = ring.queue.pop_batch(32)
    assert [c.head for c in chains] == expected
    reads = [ChainReader(ring.table, c).read() for c in chains]
    assert reads[:3] == [b"s0", b"c1!", b"i2"]


def test_add_used_and_batch(make_ring):
    ring = make_ring(8)
    d, q = ring.driver, ring.queue
    heads = [d.add([], [8]) for _ in range(5)]
    d.publish()
    chains = q.pop_batch(8)
    q.add_used(chains[0].head, 1)
    q.add_used_batch([(c.head, 2) for c in chains[1:3]])
    q.add_used_batch(np.array([[c.head, 3] for c in chains[3:]], dtype=np.uint32))
    q.add_used_batch([])
    assert q.next_used == 5
    assert d.used_idx() == 5
    assert d.get_used() == [
        (heads[0], 1),
        (heads[1], 2),
        (heads[2], 2),
        (heads[3], 3),
        (heads[4], 3),
    ]


@pytest.mark.parametrize(
    "bad",
    [
        [(8, 0)],  # head >= size
        [(-1, 0)],
        [(0, 1 << 32)],
        [(0, 1, 2)],
        [(0, 0)] * 9,  # more than the ring holds
    ],
)
def test_add_used_batch_rejects_device_bugs(make_ring, bad):
    ring = make_ring(8)
    with pytest.raises(ValueError):
        ring.queue.add_used_batch(bad)
    assert ring.driver.used_idx() == 0


@pytest.mark.parametrize("bad", [(8, 0), (-1, 0), (0, -1), (0, 1 << 32)])
def test_add_used_rejects_device_bugs(make_ring, bad):
    ring = make_ring(8)
    with pytest.raises(ValueError):
        ring.queue.add_used(*bad)


def round_trip(ring, count, payload_len=4):
    """Driver adds ``count`` chains, the device echoes them upper-cased, the driver checks.

    The ring is indirect, so each two-buffer chain takes one descriptor.
    """
    d, q = ring.driver, ring.queue
    heads = [d.add([b"ab%02d" % (i % 100)], [payload_len]) for i in range(count)]
    d.publish()
    chains = q.pop_batch(count)
    assert [c.head for c in chains] == heads
    done = []
    for c in chains:
        data = ChainReader(ring.table, c).read()
        w = ChainWriter(ring.table, c)
        w.write(data.upper())
        done.append((c.head, w.written))
    q.add_used_batch(done)
    assert d.get_used() == done
    for i, h in enumerate(heads):
        assert d.read_written(h) == (b"AB%02d" % (i % 100))


@pytest.mark.parametrize("start", [65535, 65533, 65530, 65528])
def test_16_bit_index_wrap(make_ring, start):
    ring = make_ring(8, start=start, indirect=True)
    assert ring.queue.next_avail == start
    for _ in range(4):
        round_trip(ring, 5)  # 20 chains: crosses 65535 -> 0 and slot 7 -> 0
    assert ring.queue.next_avail == (start + 20) & 0xFFFF
    assert ring.queue.next_used == (start + 20) & 0xFFFF
    assert ring.driver.used_idx() == (start + 20) & 0xFFFF


@pytest.mark.parametrize("start", [0, 1, 5, 7])
def test_batch_wraps_around_ring_slots(make_ring, start):
    """A batch that starts near the end of the rings is read and written in two slices."""
    ring = make_ring(8, start=start, indirect=True)
    round_trip(ring, 8)  # a whole ring: always wraps unless start is 0
    round_trip(ring, 7)


def test_full_ring_and_index_exactly_a_ring_ahead(make_ring):
    ring = make_ring(4, start=65534)
    for _ in range(4):
        ring.driver.add([b"z"])
    ring.driver.publish()  # avail.idx - next_avail == size: allowed
    assert len(ring.queue.pop_batch(10)) == 4


def test_scalar_path_wraps_too(make_ring):
    ring = make_ring(4, start=65534)
    d, q = ring.driver, ring.queue
    for i in range(10):
        h = d.add([b"%d" % i], [1])
        d.publish()
        chain = q.pop()
        assert chain is not None
        assert chain.head == h
        q.add_used(h, 0)
        assert d.get_used() == [(h, 0)]
    assert q.next_avail == q.next_used == 8


def test_resume_from_state(make_ring):
    ring = make_ring(8)
    d = ring.driver
    for i in range(5):
        d.add([b"%d" % i])
    d.publish()
    first = ring.queue.pop_batch(2)
    ring.queue.add_used_batch([(c.head, 0) for c in first])
    state = ring.queue.state()
    assert (state.next_avail, state.next_used) == (2, 2)
    resumed = SplitQueue(ring.table, state)
    assert [ChainReader(ring.table, c).read() for c in resumed.pop_batch(8)] == [b"2", b"3", b"4"]


def test_buffers_in_a_second_region(guarded, layout):
    ring = guarded(8)
    d = ring.driver
    far_in, far_out = layout["B"] + 100, layout["B"] + layout["size"] - 16
    d.ram.write(far_in, b"far away")
    d.write_desc(0, far_in, 8)
    d.write_desc(1, far_out, 16, VIRTQ_DESC_F_WRITE)
    d.push_avail(0)
    d.push_avail(1)
    d.publish()
    a, b = ring.queue.pop_batch(8)
    assert ChainReader(ring.table, a).read() == b"far away"
    assert ChainWriter(ring.table, b).write(b"Q" * 100) == 16
    assert d.ram.read(far_out, 16) == b"Q" * 16


def test_repr(make_ring):
    assert "size=8" in repr(make_ring(8).queue)


def test_add_used_batch_array_must_be_uint32(make_ring):
    ring = make_ring(8)
    with pytest.raises(ValueError):
        ring.queue.add_used_batch(np.array([[0, -1]], dtype=np.int64))
    with pytest.raises(ValueError):
        ring.queue.add_used_batch(np.zeros((2, 3), dtype=np.uint32))
