"""Notification suppression: NO_INTERRUPT / NO_NOTIFY flags and EVENT_IDX, both directions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trio_vhost.vring import vring_need_event
from trio_vhost.vring.layout import VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY

u16 = st.integers(0, 0xFFFF)


def test_need_event_examples():
    assert vring_need_event(0, 1, 0)  # used_event 0: notify after the first buffer
    assert not vring_need_event(1, 1, 0)
    assert vring_need_event(1, 2, 0)
    assert not vring_need_event(5, 5, 5)  # nothing moved
    assert vring_need_event(0xFFFF, 0, 0xFFFF)  # the entry at 65535 was written: wrap
    assert vring_need_event(0xFFFE, 2, 0xFFFD)
    assert not vring_need_event(2, 2, 0xFFFD)
    assert not vring_need_event(0xFFFC, 2, 0xFFFD)


@given(event=u16, old=u16, moved=st.integers(0, 32768))
def test_need_event_means_the_event_entry_was_written(event, old, moved):
    new = (old + moved) & 0xFFFF
    written = {(old + i) & 0xFFFF for i in range(moved)}
    assert vring_need_event(event, new, old) == (event in written)


def used_one(ring):
    """Driver adds and publishes one chain, the device pops and completes it."""
    ring.driver.add([b"x"])
    ring.driver.publish()
    (chain,) = ring.queue.pop_batch(1)
    ring.queue.add_used(chain.head, 0)
    ring.driver.get_used()


def test_used_notification_with_flags(make_ring):
    ring = make_ring(8)
    q = ring.queue
    assert not q.needs_notification()  # nothing used yet
    used_one(ring)
    assert q.needs_notification()
    assert not q.needs_notification()  # nothing used since the last check
    ring.driver.disable_interrupts()
    assert ring.driver.ram.read(ring.driver.avail_gpa, 2) == bytes([VIRTQ_AVAIL_F_NO_INTERRUPT, 0])
    used_one(ring)
    assert not q.needs_notification()
    assert not ring.driver.enable_interrupts()
    used_one(ring)
    assert q.needs_notification()


def test_used_notification_with_event_idx(make_ring):
    ring = make_ring(8, event_idx=True)
    q, d = ring.queue, ring.driver
    d.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)  # MUST be ignored with EVENT_IDX
    used_one(ring)
    assert q.needs_notification()  # first report: the queue cannot know what came before
    d.set_used_event(4)  # "notify when you write the entry at index 4"
    results = []
    for _ in range(6):
        used_one(ring)
        results.append((q.next_used, q.needs_notification()))
    assert results == [(2, False), (3, False), (4, False), (5, True), (6, False), (7, False)]


def test_event_idx_batch_and_wrap(make_ring):
    ring = make_ring(8, event_idx=True, start=65533)
    q, d = ring.queue, ring.driver
    used_one(ring)
    assert q.needs_notification()  # used idx 65534
    d.set_used_event(0xFFFF)
    for _ in range(3):
        d.add([b"y"])
    d.publish()
    q.add_used_batch([(c.head, 0) for c in q.pop_batch(8)])  # 65534 -> 1, crossing 65535
    assert q.next_used == 1
    assert q.needs_notification()
    used_one(ring)
    assert not q.needs_notification()


def test_device_suppresses_kicks_with_flags(make_ring):
    ring = make_ring(8)
    q, d = ring.queue, ring.driver
    assert not d.kick_needed()  # nothing published
    d.add([b"a"])
    d.publish()
    assert d.kick_needed()
    assert not d.kick_needed()  # already checked for this entry
    q.disable_notifications()
    assert d.used_flags() == VIRTQ_USED_F_NO_NOTIFY
    q.disable_notifications()
    d.add([b"b"])
    d.publish()
    assert not d.kick_needed()
    assert q.enable_notifications()  # two chains arrived meanwhile: drain again
    assert d.used_flags() == 0
    q.pop_batch(8)
    assert not q.enable_notifications()
    d.add([b"c"])
    d.publish()
    assert d.kick_needed()


def test_device_suppresses_kicks_with_event_idx(make_ring):
    ring = make_ring(8, event_idx=True)
    q, d = ring.queue, ring.driver
    assert not q.enable_notifications()
    assert d.avail_event() == 0
    q.disable_notifications()  # a no-op with EVENT_IDX: avail_event simply stays behind
    assert d.used_flags() == 0  # "The device MUST set flags to 0"
    d.add([b"a"])
    d.publish()
    assert d.kick_needed()  # wrote the entry at index avail_event (0)
    d.add([b"b"])
    d.publish()
    assert not d.kick_needed()  # avail_event is still 0
    assert len(q.pop_batch(8)) == 2
    assert not q.enable_notifications()
    assert d.avail_event() == 2
    d.add([b"c"])
    d.add([b"d"])
    d.publish()
    assert d.kick_needed()  # 2 was among the entries just published


def test_enable_reports_buffers_published_before_it(make_ring):
    for event_idx in (False, True):
        ring = make_ring(8, event_idx=event_idx)
        ring.queue.disable_notifications()
        ring.driver.add([b"raced"])
        ring.driver.publish()
        assert ring.queue.enable_notifications()
        assert len(ring.queue.pop_batch(8)) == 1
        assert not ring.queue.enable_notifications()


def test_driver_interrupt_suppression_with_event_idx(make_ring):
    ring = make_ring(8, event_idx=True)
    d = ring.driver
    d.disable_interrupts()  # nothing to do with EVENT_IDX
    assert d.ram.read(d.avail_gpa, 2) == b"\0\0"
    used_one(ring)
    ring.queue.needs_notification()
    assert not d.enable_interrupts()
    assert d.ram.read(d.avail_gpa + 4 + 2 * 8, 2) == d.last_used.to_bytes(2, "little")
