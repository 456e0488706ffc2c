"""Frame batches (Frames), batch delivery into backlogs, and Switch.forward_frames.

``forward_frames`` must give exactly what ``forward`` gives frame by frame: the same frames
to the same ports (each port's in order) and the same counters; a model test drives both
with the same random traffic.
"""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_vhost.devices.net_frames import RX_PREFIX, Frames, mac_key
from trio_vhost.devices.net_switch import MultiQueuePort, PortQueue, Switch

BROADCAST = b"\xff" * 6


def mac(n: int) -> bytes:
    return bytes((0x02, 0, 0, 0, 0, n))


def frame(dst: bytes, src: bytes, payload: bytes = b"payload") -> bytes:
    return dst + src + b"\x88\xb5" + payload


def batch(frames: list[bytes], *, prefixed: bool = False) -> Frames:
    lengths = np.array([len(f) for f in frames], dtype=np.intp)
    if prefixed:
        return Frames.prefixed_by_header(b"".join(RX_PREFIX + f for f in frames), lengths)
    return Frames.concatenated(b"".join(frames), lengths)


def frames_of(frames: Frames) -> list[bytes]:
    return [frames.frame(i) for i in range(frames.count)]


def drain(queue: PortQueue) -> list[bytes]:
    out: list[bytes] = []
    for frames, lo, hi in queue.take(len(queue)):
        out += [frames.frame(i) for i in range(lo, hi)]
    return out


# -- Frames ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefixed", [False, True])
def test_layouts_give_back_the_frames(prefixed: bool) -> None:
    sent = [frame(mac(2), mac(1), bytes([n]) * n) for n in range(5)] + [b"", b"x"]
    frames = batch(sent, prefixed=prefixed)
    assert frames_of(frames) == sent
    assert (frames.count, frames.total, frames.shortest) == (7, sum(map(len, sent)), 0)
    assert frames.dense
    assert frames.prefixed == prefixed
    if prefixed:
        for i in range(frames.count):
            begin = int(frames.start[i])
            assert frames.data[begin - len(RX_PREFIX) : begin] == RX_PREFIX


def test_subset_and_head() -> None:
    sent = [frame(mac(2), mac(1), bytes([n])) for n in range(6)]
    frames = batch(sent, prefixed=True)
    odd = frames.subset(np.array([False, True] * 3))
    assert frames_of(odd) == sent[1::2]
    assert odd.prefixed
    assert not odd.dense
    assert frames_of(frames.head(4)) == sent[:4]
    assert frames.head(4).dense
    assert frames.head(10) is frames


def test_addresses() -> None:
    one_flow = batch([frame(mac(2), mac(1), bytes([n])) for n in range(4)])
    assert one_flow.common_addresses() == (mac_key(mac(2)), mac_key(mac(1)))
    mixed = batch([frame(mac(2), mac(1)), frame(mac(3), mac(1))])
    assert mixed.common_addresses() is None
    dst, src = mixed.macs()
    assert dst.tolist() == [mac_key(mac(2)), mac_key(mac(3))]
    assert src.tolist() == [mac_key(mac(1))] * 2
    assert mixed.subset(np.array([1])).common_addresses() == (mac_key(mac(3)), mac_key(mac(1)))
    assert mac_key(BROADCAST) & 1  # the group bit is bit 0 of a key
    assert not mac_key(mac(1)) & 1
    assert Frames.empty().common_addresses() is None
    assert Frames.empty().macs()[0].size == 0


def test_of_bytes() -> None:
    one = Frames.of_bytes(b"abc")
    assert frames_of(one) == [b"abc"]
    assert (one.total, one.shortest, len(one)) == (3, 3, 1)
    assert "count=1" in repr(one)


# -- backlogs ----------------------------------------------------------------------------------


def test_port_queue_takes_a_prefix_of_a_batch_when_nearly_full() -> None:
    queue = PortQueue("q", capacity=5)
    sent = [frame(mac(2), mac(1), bytes([n])) for n in range(4)]
    assert queue.deliver_frames(batch(sent)) == (4, sum(map(len, sent)))
    assert queue.deliver_frames(batch(sent)) == (1, len(sent[0]))
    assert queue.deliver_frames(batch(sent)) == (0, 0)
    stats = queue.statistics()
    assert (stats.accepted, stats.dropped_full, stats.queued) == (5, 7, 5)
    assert drain(queue) == [*sent, sent[0]]


def test_port_queue_take_cuts_across_batches() -> None:
    queue = PortQueue("q", capacity=100)
    first = [frame(mac(2), mac(1), bytes([n])) for n in range(3)]
    second = [frame(mac(2), mac(1), bytes([10 + n])) for n in range(4)]
    queue.deliver_frames(batch(first))
    queue.deliver(second[0])
    queue.deliver_frames(batch(second[1:]))
    assert queue.peek_nowait() == first[0]
    pieces = queue.take(2)
    assert [(lo, hi) for _, lo, hi in pieces] == [(0, 2)]
    pieces = queue.take(3)
    assert [(lo, hi) for _, lo, hi in pieces] == [(2, 3), (0, 1), (0, 1)]
    assert len(queue) == 2
    assert queue.get_nowait() == second[2]
    assert queue.take(10)[0][0].frame(2) == second[3]
    assert queue.take(10) == []


async def test_batch_delivery_wakes_once_and_is_no_checkpoint() -> None:
    ready: list[int] = []
    queue = PortQueue("q", on_ready=lambda: ready.append(1))
    with trio.testing.assert_no_checkpoints():
        queue.deliver_frames(batch([frame(mac(2), mac(1))] * 3))
        queue.deliver_frames(batch([frame(mac(2), mac(1))] * 3))
    assert ready == [1]
    with trio.testing.assert_checkpoints():
        await queue.wait_frames()


def test_a_backlog_does_not_keep_a_big_batch_alive_for_a_few_frames() -> None:
    queue = PortQueue("q")
    sent = [frame(mac(2), mac(1), bytes([n]) * 1400) for n in range(40)]
    big = batch(sent, prefixed=True)
    one = big.subset(np.array([7]))
    assert queue.deliver_frames(one) == (1, len(sent[7]))
    ((kept, lo, _hi),) = queue.take(1)
    assert len(kept.data) == len(RX_PREFIX) + len(sent[7])
    assert kept.prefixed
    assert kept.frame(lo) == sent[7]
    queue.deliver_frames(big)  # a whole batch is queued as it is
    assert queue.take(40)[0][0] is big


def test_disabled_queue_refuses_batches() -> None:
    queue = PortQueue("q", enabled=False)
    assert queue.deliver_frames(batch([frame(mac(2), mac(1))] * 3)) == (0, 0)
    assert queue.statistics().dropped_disabled == 3


def test_multiqueue_port_steers_a_batch_of_several_flows() -> None:
    port = MultiQueuePort("vm", 2)
    port.set_enabled(0, True)
    port.set_enabled(1, True)
    port.note_tx_frames(1, batch([frame(mac(7), mac(1)), frame(BROADCAST, mac(1))]))
    port.note_tx_frames(0, batch([frame(mac(8), mac(1))]))
    incoming = [frame(mac(1), mac(7), b"a"), frame(mac(1), mac(8), b"b")]
    incoming.append(frame(mac(1), mac(7), b"c"))
    assert port.deliver_frames(batch(incoming)) == (3, sum(map(len, incoming)))
    assert drain(port.queues[0]) == [incoming[1]]
    assert drain(port.queues[1]) == [incoming[0], incoming[2]]
    assert port.deliver_frames(batch([frame(mac(1), mac(7))] * 2)) == (2, 2 * 21)
    assert drain(port.queues[1]) == [frame(mac(1), mac(7))] * 2
    port.note_tx_frames(0, batch([b"runt"]))
    port.set_enabled(0, False)
    port.set_enabled(1, False)
    assert port.deliver_frames(batch(incoming)) == (0, 0)
    assert port.dropped_no_queue == 3


# -- forward_frames against forward ------------------------------------------------------------


class Port:
    """A port double; with ``batches`` it also takes whole batches, with a room limit."""

    def __init__(self, name: str, room: int = 10**9, *, batches: bool = True) -> None:
        self.name = name
        self.room = room
        self.frames: list[bytes] = []
        if batches:
            self.deliver_frames = self._deliver_frames

    def deliver(self, frame: bytes) -> bool:
        if len(self.frames) >= self.room:
            return False
        self.frames.append(bytes(frame))
        return True

    def _deliver_frames(self, frames: Frames) -> tuple[int, int]:
        take = max(0, min(frames.count, self.room - len(self.frames)))
        got = frames_of(frames)[:take]
        self.frames += got
        return take, sum(map(len, got))


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def make(rooms: list[int], batches: list[bool]) -> tuple[Switch, Clock, list[Port]]:
    clock = Clock()
    switch = Switch(clock=clock, max_age=5, max_macs=4)
    pairs = enumerate(zip(rooms, batches, strict=True))
    ports = [Port(str(n), room, batches=b) for n, (room, b) in pairs]
    for port in ports:
        switch.add_port(port)
    return switch, clock, ports


addresses = st.sampled_from([bytes(6), BROADCAST, mac(1), mac(2), mac(3), mac(4), mac(5)])
traffic = st.lists(
    st.tuples(
        st.integers(0, 2),  # sending port
        st.lists(st.tuples(addresses, addresses, st.integers(0, 20)), min_size=1, max_size=8),
        st.integers(0, 3),  # seconds before the batch
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(
    traffic,
    st.lists(st.integers(0, 12), min_size=3, max_size=3),
    st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_forward_frames_matches_forward(
    trace: list[tuple[int, list[tuple[bytes, bytes, int]]]],
    rooms: list[int],
    batches: list[bool],
) -> None:
    one, one_clock, one_ports = make(rooms, batches)
    many, many_clock, many_ports = make(rooms, batches)
    for sender, specs, wait in trace:
        one_clock.now += wait
        many_clock.now += wait
        sent = [(dst + src + b"\x08\x00" + bytes(size))[: 10 + size] for dst, src, size in specs]
        for data in sent:
            one.forward(one_ports[sender], data)
        many.forward_frames(many_ports[sender], batch(sent, prefixed=wait % 2 == 0))
    for a, b in zip(one_ports, many_ports, strict=True):
        assert a.frames == b.frames
    assert one.statistics() == many.statistics()


def test_forward_frames_keeps_the_order_of_each_destination() -> None:
    switch, _, ports = make([100] * 3, [True, True, False])
    switch.forward(ports[1], frame(BROADCAST, mac(2)))
    switch.forward(ports[2], frame(BROADCAST, mac(3)))
    for port in ports:
        port.frames.clear()
    sent = [frame(mac(2 + n % 2), mac(1), bytes([n])) for n in range(10)]
    switch.forward_frames(ports[0], batch(sent))
    assert ports[1].frames == sent[0::2]
    assert ports[2].frames == sent[1::2]


def test_forward_frames_from_an_unknown_port_or_nothing() -> None:
    switch, _, ports = make([10] * 3, [True] * 3)
    switch.forward_frames(Port("stranger"), batch([frame(BROADCAST, mac(1))] * 2))
    switch.forward_frames(ports[0], Frames.empty())
    stats = switch.statistics()
    assert stats.unknown_source == 2
    assert stats.port("0").rx_frames == 0


def test_a_port_removed_during_a_batch_gets_nothing_more() -> None:
    switch = Switch()
    sender, leaving = Port("sender"), Port("leaving", batches=False)

    class Remover(Port):
        def deliver(self, frame: bytes) -> bool:
            switch.remove_port(leaving)
            return super().deliver(frame)

    remover = Remover("remover", batches=False)
    for port in (sender, remover, leaving):
        switch.add_port(port)
    switch.forward_frames(sender, batch([frame(BROADCAST, mac(1))] * 3))
    assert len(remover.frames) == 3
    assert leaving.frames == []


def test_a_port_removed_in_the_middle_of_its_own_batch_stops_there() -> None:
    switch = Switch()
    sender = Port("sender")

    class Leaving(Port):
        def deliver(self, frame: bytes) -> bool:
            switch.remove_port(self)
            return super().deliver(frame)

    leaving = Leaving("leaving", batches=False)
    switch.add_port(sender)
    switch.add_port(leaving)
    switch.forward_frames(sender, batch([frame(BROADCAST, mac(1))] * 3))
    assert len(leaving.frames) == 1
