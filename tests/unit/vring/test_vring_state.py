"""QueueState: untrusted plain data, validated when a queue is built from it."""

from __future__ import annotations

import dataclasses

import pytest

from trio_vhost.errors import GuestMemoryError, VirtqueueError
from trio_vhost.vring import QueueState, SplitQueue

GOOD = QueueState(size=8, desc_gpa=0x1000, avail_gpa=0x2000, used_gpa=0x3000)


def test_plain_and_frozen():
    assert GOOD.next_avail == GOOD.next_used == 0
    assert not GOOD.event_idx
    assert not GOOD.indirect
    assert GOOD.log_guest_addr is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        GOOD.size = 16  # type: ignore[misc]
    moved = GOOD.with_indices(5, 3)
    assert (moved.next_avail, moved.next_used) == (5, 3)
    GOOD.validate()


@pytest.mark.parametrize(
    "changes",
    [
        {"size": 0},
        {"size": 3},
        {"size": 65536},
        {"size": 8.0},
        {"desc_gpa": 0x1008},  # descriptor table: 16-byte alignment
        {"avail_gpa": 0x2001},  # available ring: 2-byte alignment
        {"used_gpa": 0x3002},  # used ring: 4-byte alignment
        {"desc_gpa": -16},
        {"used_gpa": (1 << 64) - 8},  # runs past 2^64
        {"next_avail": 65536},
        {"next_used": -1},
    ],
)
def test_validate_rejects(changes):
    state = dataclasses.replace(GOOD, **changes)
    with pytest.raises(VirtqueueError):
        state.validate()


def test_split_queue_validates(make_ring):
    ring = make_ring(8)
    state = ring.queue.state()
    with pytest.raises(VirtqueueError):
        SplitQueue(ring.table, dataclasses.replace(state, size=12))
    with pytest.raises(VirtqueueError):
        SplitQueue(ring.table, dataclasses.replace(state, avail_gpa=state.avail_gpa + 1))
    # ring parts that no region maps
    for name in ("desc_gpa", "avail_gpa", "used_gpa"):
        with pytest.raises(GuestMemoryError):
            SplitQueue(ring.table, dataclasses.replace(state, **{name: 0x1000}))
    # a used ring that runs off the end of the region
    end = ring.ram.gpa + ring.ram.size
    with pytest.raises(GuestMemoryError):
        SplitQueue(ring.table, dataclasses.replace(state, used_gpa=end - 64))


def test_from_frontend_translates_uvas(make_ring):
    ring = make_ring(16, event_idx=True)
    d = ring.driver
    state = QueueState.from_frontend(
        ring.table,
        size=16,
        desc_uva=d.desc_uva,
        avail_uva=d.avail_uva,
        used_uva=d.used_uva,
        next_avail=3,
        event_idx=True,
    )
    assert (state.desc_gpa, state.avail_gpa, state.used_gpa) == (
        d.desc_gpa,
        d.avail_gpa,
        d.used_gpa,
    )
    assert state.next_avail == 3
    assert state.event_idx
    with pytest.raises(VirtqueueError):
        QueueState.from_frontend(ring.table, size=5, desc_uva=0, avail_uva=0, used_uva=0)
    with pytest.raises(GuestMemoryError):
        QueueState.from_frontend(
            ring.table, size=16, desc_uva=d.desc_gpa, avail_uva=d.avail_uva, used_uva=d.used_uva
        )
