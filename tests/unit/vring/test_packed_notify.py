"""Packed ring event suppression: ENABLE, DISABLE and DESC (off_wrap), on both sides."""

from __future__ import annotations

import random

import pytest

from trio_vhost.mem import GuestRam, MemoryTable
from trio_vhost.vring.packed import PackedQueue
from trio_vhost.vring.packed_driver import PackedDriverQueue
from trio_vhost.vring.packed_layout import (
    RING_EVENT_FLAGS_DESC as DESC,
)
from trio_vhost.vring.packed_layout import (
    RING_EVENT_FLAGS_DISABLE as DISABLE,
)
from trio_vhost.vring.packed_layout import (
    RING_EVENT_FLAGS_ENABLE as ENABLE,
)
from trio_vhost.vring.packed_layout import to_position

GPA = 0x4000_0000


@pytest.fixture
def pair():
    made = []

    def make(size=4, *, event_idx=False):
        ram = GuestRam.create(1 << 20, gpa=GPA)
        table = MemoryTable.from_regions([ram.backend_region()])
        driver = PackedDriverQueue.create(ram, size, event_idx=event_idx)
        queue = PackedQueue(table, driver.queue_state())
        made.append((ram, table))
        return driver, queue

    yield make
    for ram, table in made:
        table.close()
        ram.close()


def cycle(driver, queue, n=1, *, readable=(b"x",)):
    """Post ``n`` buffers, pop them and use them; return their ids."""
    ids = [driver.add(list(readable)) for _ in range(n)]
    driver.publish()
    chains = queue.pop_batch(n)
    assert [c.head for c in chains] == ids
    queue.add_used_batch([(i, 0) for i in ids])
    return ids


# -- used-buffer notifications (the device reads the Driver Area) -----------------------------


def test_nothing_used_means_no_notification(pair):
    driver, queue = pair()
    assert not queue.needs_notification()
    driver.add([b"x"])
    driver.publish()
    queue.pop()
    assert not queue.needs_notification()  # popped, not used


def test_enable_notifies_once_per_batch(pair):
    driver, queue = pair()
    assert driver.driver_event() == (ENABLE, 0, False)  # the zeroed structure
    cycle(driver, queue, 2)
    assert queue.needs_notification()
    assert not queue.needs_notification()  # nothing new since
    cycle(driver, queue)
    assert queue.needs_notification()


def test_disable_suppresses(pair):
    driver, queue = pair()
    driver.disable_interrupts()
    assert driver.driver_event()[0] == DISABLE
    cycle(driver, queue)
    assert not queue.needs_notification()
    cycle(driver, queue)
    assert not queue.needs_notification()
    assert driver.enable_interrupts()  # used descriptors are already waiting: read them
    assert not queue.needs_notification()  # nothing new was used since the last check
    driver.get_used()
    cycle(driver, queue)
    assert queue.needs_notification()


@pytest.mark.parametrize("event_idx", [False, True])
def test_reserved_flags_notify(pair, event_idx):
    driver, queue = pair(event_idx=event_idx)
    driver.set_driver_event(3, 2, True)
    cycle(driver, queue)
    assert queue.needs_notification()


def test_desc_without_event_idx_means_enable(pair):
    driver, queue = pair(event_idx=False)
    cycle(driver, queue)
    assert queue.needs_notification()
    driver.set_driver_event(DESC, 3, False)  # a slot far away: ignored without EVENT_IDX
    cycle(driver, queue)
    assert queue.needs_notification()


def test_desc_notifies_when_the_event_slot_is_used(pair):
    driver, queue = pair(4, event_idx=True)
    cycle(driver, queue)  # slot 0
    assert queue.needs_notification()  # the first report always notifies
    driver.get_used()
    assert not driver.enable_interrupts()  # DESC at the next used slot: 1, wrap 1
    assert driver.driver_event() == (DESC, 1, True)
    cycle(driver, queue)  # slot 1: that is the one
    assert queue.needs_notification()
    cycle(driver, queue)  # slot 2: the driver did not ask again
    assert not queue.needs_notification()
    driver.set_driver_event(DESC, 0, False)  # slot 0 of the next lap
    cycle(driver, queue)  # slot 3, wrap 1
    assert not queue.needs_notification()
    cycle(driver, queue)  # slot 0, wrap 0
    assert queue.needs_notification()


def test_desc_counts_skipped_slots_of_multi_descriptor_lists(pair):
    """The event slot may be covered by a list's skipped slots, not its used descriptor."""
    driver, queue = pair(8, event_idx=True)
    cycle(driver, queue)  # slot 0: the first report
    assert queue.needs_notification()
    driver.set_driver_event(DESC, 3, True)
    cycle(driver, queue, readable=(b"a", b"b", b"c"))  # slots 1-3: used at 1, 2-3 skipped
    assert queue.needs_notification()


def _walked_over(event, old, new, size):
    p = old
    while p != new:
        if p == event:
            return True
        p = (p + 1) % (2 * size)
    return False


@pytest.mark.parametrize("size", [1, 3, 5])
def test_desc_decisions_match_a_reference_over_many_laps(pair, size):
    rnd = random.Random(size)
    driver, queue = pair(size, event_idx=True)
    cycle(driver, queue)
    queue.needs_notification()
    driver.get_used()
    for _ in range(300):
        index, wrap = rnd.randrange(size), rnd.random() < 0.5
        driver.set_driver_event(DESC, index, wrap)
        old = to_position(queue.next_used, queue.used_wrap, size)
        n = rnd.randrange(1, size + 1)
        cycle(driver, queue, n)
        driver.get_used()
        new = to_position(queue.next_used, queue.used_wrap, size)
        expected = _walked_over(to_position(index, wrap, size), old, new, size)
        assert queue.needs_notification() == expected


def test_a_full_double_lap_without_a_check_notifies(pair):
    driver, queue = pair(2, event_idx=True)
    cycle(driver, queue)
    assert queue.needs_notification()
    driver.get_used()
    driver.set_driver_event(DESC, 1, True)  # position 1: passed on every lap
    for _ in range(4):  # 2N descriptors: the positions come back where they were
        cycle(driver, queue)
        driver.get_used()
    assert queue.needs_notification()


def test_an_event_offset_outside_the_ring_notifies(pair):
    driver, queue = pair(4, event_idx=True)
    cycle(driver, queue)
    queue.needs_notification()
    driver.set_driver_event(DESC, 100, True)
    cycle(driver, queue)
    assert queue.needs_notification()


# -- available-buffer notifications (the device writes the Device Area) -----------------------


def test_device_area_without_event_idx(pair):
    driver, queue = pair(event_idx=False)
    queue.disable_notifications()
    assert driver.device_event() == (DISABLE, 0, False)
    driver.add([b"x"])
    driver.publish()
    assert not driver.kick_needed()
    assert queue.enable_notifications()  # something is already there
    assert driver.device_event() == (ENABLE, 0, False)
    driver.add([b"y"])
    driver.publish()
    assert driver.kick_needed()
    assert not driver.kick_needed()  # nothing published since


def test_device_area_with_event_idx(pair):
    driver, queue = pair(4, event_idx=True)
    assert not queue.enable_notifications()
    assert driver.device_event() == (DESC, 0, True)
    a = driver.add([b"a"])
    driver.publish()
    assert driver.kick_needed()  # slot 0 was the event slot
    b = driver.add([b"b"])
    driver.publish()
    assert not driver.kick_needed()  # slot 1: the device did not ask again
    assert [c.head for c in queue.pop_batch(4)] == [a, b]
    queue.add_used_batch([(a, 0), (b, 0)])
    driver.get_used()
    assert not queue.enable_notifications()
    assert driver.device_event() == (DESC, 2, True)
    driver.add([b"c", b"d", b"e"])  # slots 2, 3 and 0 of the next lap
    driver.publish()
    assert driver.kick_needed()
    queue.disable_notifications()
    assert driver.device_event() == (DISABLE, 0, False)


def test_enable_notifications_points_at_the_next_lap(pair):
    driver, queue = pair(2, event_idx=True)
    cycle(driver, queue, 2)  # the device is now at slot 0 of lap two (wrap 0)
    driver.get_used()
    assert not queue.enable_notifications()
    assert driver.device_event() == (DESC, 0, False)
    driver.add([b"x"])
    driver.publish()
    assert driver.kick_needed()


def test_the_drain_loop_misses_nothing(pair):
    """disable, drain, enable, re-check: the device's side of the suppression loop."""
    driver, queue = pair(8, event_idx=True)
    served = 0
    rnd = random.Random(5)
    for _ in range(200):
        for _ in range(rnd.randrange(0, 4)):
            driver.add([b"p"])
        driver.publish()
        driver.kick_needed()
        queue.disable_notifications()
        while chains := queue.pop_batch(3):
            queue.add_used_batch([(c.head, 0) for c in chains])
            served += len(chains)
        assert not queue.enable_notifications()  # nothing was added while draining
        driver.get_used()
        # after the re-enable, the very next buffer must kick
        bid = driver.add([b"q"])
        driver.publish()
        assert driver.kick_needed()
        queue.disable_notifications()
        chain = queue.pop()
        assert chain is not None
        assert chain.head == bid
        queue.add_used(bid, 0)
        served += 1
        assert driver.get_used() == [(bid, 0)]
    assert served > 200


def test_driver_has_used_and_enable_interrupts(pair):
    driver, queue = pair(4, event_idx=False)
    assert not driver.has_used()
    assert not driver.enable_interrupts()
    assert driver.driver_event() == (ENABLE, 0, False)
    bid = driver.add([b"x"])
    driver.publish()
    queue.add_used(queue.pop().head, 0)
    assert driver.has_used()
    assert driver.enable_interrupts()
    assert driver.get_used() == [(bid, 0)]
    assert not driver.has_used()
