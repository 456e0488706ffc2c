"""Packed ring layout, positions, the vhost-user vring base encoding and PackedQueueState."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_vhost.errors import GuestMemoryError, VirtqueueError
from trio_vhost.mem import GuestRam, MemoryTable
from trio_vhost.vring.packed import PackedQueue
from trio_vhost.vring.packed_driver import PackedDriverQueue
from trio_vhost.vring.packed_layout import (
    PACKED_DESC_DTYPE,
    PACKED_DESC_SIZE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_USED,
    avail_flags,
    event_word,
    from_position,
    off_wrap,
    packed_need_event,
    split_event_word,
    to_position,
    used_flags,
)
from trio_vhost.vring.packed_state import (
    FRESH_VRING_BASE,
    PackedQueueState,
    PackedRingBase,
    decode_vring_base,
    encode_vring_base,
)

GPA = 0x4000_0000


def test_descriptor_dtype_matches_the_spec():
    assert PACKED_DESC_DTYPE.itemsize == PACKED_DESC_SIZE == 16
    offsets = {name: PACKED_DESC_DTYPE.fields[name][1] for name in PACKED_DESC_DTYPE.names}
    assert offsets == {"addr": 0, "len": 8, "id": 12, "flags": 14}
    assert all(PACKED_DESC_DTYPE.fields[n][0].byteorder in "<=|" for n in offsets)


def test_flag_patterns():
    assert avail_flags(True) == VIRTQ_DESC_F_AVAIL
    assert avail_flags(False) == VIRTQ_DESC_F_USED
    assert used_flags(True) == VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
    assert used_flags(False) == 0


@given(st.integers(1, 32768).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, 2 * n - 1))))
def test_positions_round_trip(case):
    size, position = case
    index, wrap = from_position(position, size)
    assert 0 <= index < size
    assert to_position(index, wrap, size) == position


def test_positions_walk_like_the_spec():
    """The wrap counter starts at 1 and flips after the last slot of each lap."""
    size = 3
    walk = [from_position(p % (2 * size), size) for p in range(8)]
    assert walk == [
        (0, True),
        (1, True),
        (2, True),
        (0, False),
        (1, False),
        (2, False),
        (0, True),
        (1, True),
    ]


@given(st.integers(0, 3), st.integers(0, 0x7FFF), st.booleans())
def test_event_word_round_trip(flags, index, wrap):
    word = event_word(flags, index, wrap)
    assert 0 <= word < 1 << 32
    assert split_event_word(word) == (flags, index, wrap)
    assert word & 0xFFFF == off_wrap(index, wrap)


def _reference_need_event(desc, old, new, size):
    """Walk the positions one by one: did we write the event descriptor?"""
    event = to_position(desc & 0x7FFF, bool(desc & 0x8000), size)
    p = old
    while p != new:
        if p == event:
            return True
        p = (p + 1) % (2 * size)
    return False


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_need_event_matches_a_step_by_step_walk(size):
    for index in range(size):
        for wrap in (False, True):
            desc = off_wrap(index, wrap)
            for old in range(2 * size):
                for moved in range(2 * size):
                    new = (old + moved) % (2 * size)
                    expected = _reference_need_event(desc, old, new, size)
                    assert packed_need_event(desc, old, new, size) == expected


def test_need_event_with_an_offset_outside_the_ring_fires():
    assert packed_need_event(off_wrap(9, True), 0, 1, 4)


@given(st.integers(0, 0x7FFF), st.booleans(), st.integers(0, 0x7FFF), st.booleans())
def test_vring_base_round_trip(avail, avail_wrap, used, used_wrap):
    value = encode_vring_base(avail, avail_wrap, used, used_wrap)
    assert 0 <= value <= 0xFFFF_FFFF
    assert decode_vring_base(value) == PackedRingBase(avail, avail_wrap, used, used_wrap)


@given(st.integers(0, 0xFFFF_FFFF))
def test_every_32bit_value_decodes_and_re_encodes(value):
    assert encode_vring_base(*decode_vring_base(value)) == value


def test_vring_base_bit_layout():
    """Bits 0-14 avail index, 15 avail wrap, 16-30 used index, 31 used wrap."""
    assert encode_vring_base(5, False, 0, False) == 5
    assert encode_vring_base(0, True, 0, False) == 1 << 15
    assert encode_vring_base(0, False, 7, False) == 7 << 16
    assert encode_vring_base(0, False, 0, True) == 1 << 31
    assert FRESH_VRING_BASE == 0x8000_8000
    assert decode_vring_base(FRESH_VRING_BASE) == (0, True, 0, True)


@pytest.mark.parametrize("value", [-1, 1 << 32])
def test_decode_refuses_non_32bit_values(value):
    with pytest.raises(ValueError):
        decode_vring_base(value)


@pytest.mark.parametrize(("avail", "used"), [(0x8000, 0), (0, 0x8000), (-1, 0)])
def test_encode_refuses_wide_indices(avail, used):
    with pytest.raises(ValueError):
        encode_vring_base(avail, True, used, True)


def _state(**changes):
    base = PackedQueueState(size=8, desc_gpa=GPA, driver_gpa=GPA + 0x100, device_gpa=GPA + 0x104)
    return dataclasses.replace(base, **changes)


def test_fresh_state_defaults():
    state = _state()
    state.validate()
    assert (state.next_avail, state.avail_wrap, state.next_used, state.used_wrap) == (
        0,
        True,
        0,
        True,
    )
    assert state.vring_base == FRESH_VRING_BASE
    assert state.in_flight == 0


def test_state_vring_base_round_trip():
    state = _state(size=5).with_vring_base(encode_vring_base(3, False, 1, False))
    assert (state.next_avail, state.avail_wrap, state.next_used, state.used_wrap) == (
        3,
        False,
        1,
        False,
    )
    assert state.in_flight == 2
    assert state.with_vring_base(state.vring_base) == state


@pytest.mark.parametrize("size", [1, 3, 5, 100, 32768])
def test_any_size_up_to_32768_is_valid(size):
    _state(size=size).validate()


@pytest.mark.parametrize(
    "changes",
    [
        {"size": 0},
        {"size": 32769},
        {"size": -4},
        {"size": 8.0},
        {"desc_gpa": GPA + 8},  # descriptor ring: 16-byte aligned
        {"driver_gpa": GPA + 2},  # event structures: 4-byte aligned
        {"device_gpa": GPA + 1},
        {"desc_gpa": -16},
        {"desc_gpa": (1 << 64) - 16},  # the ring runs past 2^64
        {"device_gpa": None},
        {"next_avail": 8},  # an index is a slot: < size
        {"next_used": 8},
        {"next_avail": -1},
        {"avail_wrap": 2},
        {"used_wrap": None},
        # used ahead of avail: more than a ring apart going forward
        {"next_avail": 0, "next_used": 1},
        {"next_avail": 0, "avail_wrap": False, "next_used": 7, "used_wrap": False},
    ],
)
def test_validate_refuses_bad_values(changes):
    with pytest.raises(VirtqueueError):
        _state(**changes).validate()


def test_a_full_ring_in_flight_is_valid():
    state = _state(next_avail=0, avail_wrap=False, next_used=0, used_wrap=True)
    state.validate()
    assert state.in_flight == 8


@pytest.fixture
def ram_table():
    ram = GuestRam.create(1 << 20, gpa=GPA)
    table = MemoryTable.from_regions([ram.backend_region()])
    yield ram, table
    table.close()
    ram.close()


def test_from_frontend_translates_addresses(ram_table):
    ram, table = ram_table
    driver = PackedDriverQueue.create(ram, 6, event_idx=True, indirect=True)
    state = PackedQueueState.from_frontend(
        table,
        size=6,
        desc_uva=driver.desc_uva,
        driver_uva=driver.driver_uva,
        device_uva=driver.device_uva,
        vring_base=encode_vring_base(2, False, 2, False),
        event_idx=True,
        indirect=True,
    )
    assert state == dataclasses.replace(
        driver.queue_state(), next_avail=2, avail_wrap=False, next_used=2, used_wrap=False
    )


def test_from_frontend_refuses_unmapped_parts(ram_table):
    _ram, table = ram_table
    with pytest.raises(GuestMemoryError):
        PackedQueueState.from_frontend(
            table, size=4, desc_uva=1 << 40, driver_uva=1 << 40, device_uva=1 << 40
        )
    with pytest.raises(VirtqueueError):
        PackedQueueState.from_frontend(table, size=0, desc_uva=0, driver_uva=0, device_uva=0)


@pytest.mark.parametrize(
    "changes",
    [
        {"desc_gpa": GPA + (1 << 20) - 64},  # ring runs off the end of memory
        {"driver_gpa": GPA - 4},
        {"device_gpa": GPA + (1 << 20)},
    ],
)
def test_queue_refuses_parts_outside_memory(ram_table, changes):
    ram, table = ram_table
    driver = PackedDriverQueue.create(ram, 8)
    with pytest.raises(GuestMemoryError):
        PackedQueue(table, dataclasses.replace(driver.queue_state(), **changes))


def test_queue_construction_writes_nothing(ram_table):
    ram, table = ram_table
    driver = PackedDriverQueue.create(ram, 8, event_idx=True)
    ram.fill(driver.desc_gpa, 128, 0x5A)
    ram.fill(driver.device_gpa, 4, 0x5A)
    before = ram.view.copy()
    queue = PackedQueue(table, driver.queue_state())
    assert np.array_equal(ram.view, before)
    with pytest.raises(VirtqueueError):
        PackedQueue(table, dataclasses.replace(driver.queue_state(), next_avail=9))
    assert np.array_equal(ram.view, before)
    del queue
