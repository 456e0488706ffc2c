"""RX backlogs (PortQueue) and multiqueue steering (MultiQueuePort), frame by frame.

The batch side of both is in test_net_frames.py. Rules: no sockets, no sleeps; async tests
synchronise with ``wait_all_tasks_blocked`` under a trio-clock ``fail_after``.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_vhost.devices.net_switch import MultiQueuePort, PortQueue, Switch

BROADCAST = b"\xff" * 6


def mac(n: int) -> bytes:
    """A locally administered unicast MAC address numbered ``n``."""
    return bytes((0x02, 0, 0, 0, 0, n))


def frame(dst: bytes, src: bytes, payload: bytes = b"payload") -> bytes:
    return dst + src + b"\x88\xb5" + payload


class Port:
    """A SwitchPort double that records what it is given."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.frames: list[bytes] = []

    def deliver(self, frame: bytes) -> bool:
        self.frames.append(frame)
        return True


# -- PortQueue --------------------------------------------------------------------------------


def test_port_queue_holds_at_most_capacity_frames() -> None:
    queue = PortQueue("q", capacity=2)
    assert queue.deliver(b"1")
    assert queue.deliver(b"2")
    assert not queue.deliver(b"3")
    assert len(queue) == 2
    assert queue.peek_nowait() == b"1"
    assert queue.get_nowait() == b"1"
    assert queue.deliver(b"4")
    assert [queue.get_nowait(), queue.get_nowait()] == [b"2", b"4"]
    with pytest.raises(trio.WouldBlock):
        queue.get_nowait()
    with pytest.raises(trio.WouldBlock):
        queue.peek_nowait()
    stats = queue.statistics()
    assert (stats.accepted, stats.dropped_full, stats.queued, stats.capacity) == (3, 1, 0, 2)


def test_disabled_queue_delivers_nothing_and_counts() -> None:
    queue = PortQueue("q", capacity=4)
    queue.deliver(b"1")
    queue.deliver(b"2")
    queue.set_enabled(False)
    assert len(queue) == 0
    assert not queue.enabled
    assert not queue.deliver(b"3")
    assert queue.statistics().dropped_disabled == 3
    queue.set_enabled(True)
    assert queue.deliver(b"4")
    assert queue.clear() == 1
    assert queue.statistics().dropped_disabled == 3
    with pytest.raises(ValueError, match="capacity"):
        PortQueue("q", capacity=0)


def test_on_ready_fires_when_the_backlog_becomes_non_empty() -> None:
    calls: list[str] = []
    queue = PortQueue("q", on_ready=lambda: calls.append("ready"))
    queue.deliver(b"1")
    queue.deliver(b"2")
    assert calls == ["ready"]
    queue.get_nowait()
    queue.get_nowait()
    queue.deliver(b"3")
    assert calls == ["ready", "ready"]


def test_full_backlog_of_one_port_does_not_stop_the_others() -> None:
    switch = Switch()
    sender, slow, fast = Port("sender"), PortQueue("slow", capacity=1), PortQueue("fast")
    for port in (sender, slow, fast):
        switch.add_port(port)
    for _ in range(10):
        switch.forward(sender, frame(BROADCAST, mac(1)))
    assert (len(slow), len(fast)) == (1, 10)
    assert switch.statistics().port("slow").tx_dropped == 9
    assert slow.statistics().dropped_full == 9


async def test_wait_frames_wakes_when_a_frame_arrives() -> None:
    queue = PortQueue("q")
    got: list[bytes] = []

    async def consumer() -> None:
        await queue.wait_frames()
        got.append(queue.get_nowait())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consumer)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            assert queue.deliver(b"frame")
    assert got == [b"frame"]


async def test_wait_frames_is_a_checkpoint_when_frames_wait() -> None:
    queue = PortQueue("q")
    queue.deliver(b"frame")
    with trio.testing.assert_checkpoints():
        await queue.wait_frames()
    assert len(queue) == 1


async def test_wait_frames_cancelled_leaves_the_queue_usable() -> None:
    queue = PortQueue("q")
    with trio.fail_after(10):
        with trio.CancelScope() as scope:
            scope.cancel()
            await queue.wait_frames()
        queue.deliver(b"frame")
        await queue.wait_frames()
    assert queue.get_nowait() == b"frame"


async def test_port_queue_and_switch_calls_are_not_checkpoints() -> None:
    queue, sender = PortQueue("q"), Port("sender")
    switch = Switch()
    switch.add_port(queue)
    switch.add_port(sender)
    with trio.testing.assert_no_checkpoints():
        switch.forward(sender, frame(BROADCAST, mac(1)))
        queue.deliver(b"x")
        queue.peek_nowait()
        queue.get_nowait()


# -- MultiQueuePort ---------------------------------------------------------------------------


def test_multiqueue_port_refuses_everything_until_a_queue_is_enabled() -> None:
    port = MultiQueuePort("vm", 2)
    assert not port.deliver(frame(BROADCAST, mac(1)))
    assert port.dropped_no_queue == 1
    assert [q.name for q in port.queues] == ["vm/rx0", "vm/rx1"]
    port.set_enabled(1, True)
    assert port.deliver(frame(BROADCAST, mac(1)))
    assert [len(q) for q in port.queues] == [0, 1]
    with pytest.raises(ValueError, match="pairs"):
        MultiQueuePort("vm", 0)


def test_multiqueue_port_steers_replies_to_the_transmitting_pair() -> None:
    port = MultiQueuePort("vm", 4)
    for pair in range(4):
        port.set_enabled(pair, True)
    for pair, peer in ((2, 7), (3, 8), (0, 9)):
        port.note_tx(pair, frame(mac(peer), mac(1)))
    for _ in range(3):
        for peer in (7, 8, 9):
            assert port.deliver(frame(mac(1), mac(peer)))
    assert [len(q) for q in port.queues] == [3, 0, 3, 3]


def test_multiqueue_port_keeps_unknown_flows_on_one_queue() -> None:
    port = MultiQueuePort("vm", 4)
    for pair in range(4):
        port.set_enabled(pair, True)
    for _ in range(5):
        port.deliver(frame(mac(1), mac(42)))
    assert sorted(len(q) for q in port.queues) == [0, 0, 0, 5]


def test_multiqueue_port_avoids_disabled_queues() -> None:
    port = MultiQueuePort("vm", 2)
    port.set_enabled(0, True)
    port.set_enabled(1, True)
    port.note_tx(1, frame(mac(7), mac(1)))
    port.set_enabled(1, False)  # e.g. the guest went back to one queue pair
    assert port.deliver(frame(mac(1), mac(7)))
    assert [len(q) for q in port.queues] == [1, 0]


def test_multiqueue_port_ignores_group_and_runt_frames_for_steering() -> None:
    port = MultiQueuePort("vm", 2)
    port.note_tx(1, frame(BROADCAST, mac(1)))
    port.note_tx(1, b"short")
    port.set_enabled(0, True)
    port.deliver(frame(mac(1), BROADCAST[:6]))
    assert [len(q) for q in port.queues] == [1, 0]


def test_multiqueue_port_on_ready_names_the_pair() -> None:
    ready: list[int] = []
    port = MultiQueuePort("vm", 2, on_ready=ready.append)
    port.set_enabled(0, True)
    port.set_enabled(1, True)
    port.note_tx(1, frame(mac(7), mac(1)))
    port.deliver(frame(mac(1), mac(7)))
    assert ready == [1]


def test_multiqueue_port_behind_a_switch() -> None:
    switch = Switch()
    vm, host = MultiQueuePort("vm", 2), Port("host")
    switch.add_port(vm)
    switch.add_port(host)
    switch.forward(host, frame(BROADCAST, mac(2)))  # dropped: no RX queue enabled yet
    vm.set_enabled(0, True)
    vm.set_enabled(1, True)
    outgoing = frame(mac(2), mac(1))
    vm.note_tx(1, outgoing)
    switch.forward(vm, outgoing)
    switch.forward(host, frame(mac(1), mac(2)))
    assert [len(q) for q in vm.queues] == [0, 1]
    assert host.frames == [outgoing]
    assert switch.statistics().port("vm").tx_dropped == 1
    assert vm.dropped_no_queue == 1
