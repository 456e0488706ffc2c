"""The L2 learning switch, frame by frame, with test-double ports.

Rules: no sockets, no sleeps; time is a fake clock the tests move by hand; async tests
synchronise with ``wait_all_tasks_blocked`` under a trio-clock ``fail_after``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_vhost.devices.net_switch import (
    MultiQueuePort,
    PortQueue,
    Switch,
    SwitchPort,
    SwitchStatistics,
)

BROADCAST = b"\xff" * 6


def mac(n: int) -> bytes:
    """A locally administered unicast MAC address numbered ``n``."""
    return bytes((0x02, 0, 0, 0, 0, n))


def frame(dst: bytes, src: bytes, payload: bytes = b"payload") -> bytes:
    return dst + src + b"\x88\xb5" + payload


class Port:
    """A SwitchPort double that records what it is given and can refuse it."""

    def __init__(self, name: str, *, accept: bool = True) -> None:
        self.name = name
        self.accept = accept
        self.frames: list[bytes] = []
        self.on_deliver: Callable[[bytes], None] | None = None

    def deliver(self, frame: bytes) -> bool:
        if self.on_deliver is not None:
            self.on_deliver(frame)
        if self.accept:
            self.frames.append(frame)
        return self.accept


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(names: str = "abc", **kwargs: float) -> tuple[Switch, FakeClock, dict[str, Port]]:
    clock = FakeClock()
    switch = Switch(clock=clock, **kwargs)  # type: ignore[arg-type]
    ports = {name: Port(name) for name in names}
    for port in ports.values():
        switch.add_port(port)
    return switch, clock, ports


def received(ports: dict[str, Port]) -> dict[str, int]:
    return {name: len(port.frames) for name, port in ports.items()}


# -- forwarding ------------------------------------------------------------------------------


def test_ports_satisfy_the_protocol() -> None:
    ports: list[SwitchPort] = [Port("x"), PortQueue("q"), MultiQueuePort("m", 2)]
    assert [port.name for port in ports] == ["x", "q", "m"]


def test_unknown_unicast_floods_to_every_other_port() -> None:
    switch, _, ports = make()
    sent = frame(mac(2), mac(1))
    switch.forward(ports["a"], sent)
    assert received(ports) == {"a": 0, "b": 1, "c": 1}
    assert ports["b"].frames[0] is sent  # the same object: no copy per port
    assert switch.statistics().flooded == 1


def test_learned_destination_gets_unicast_only() -> None:
    switch, _, ports = make()
    switch.forward(ports["b"], frame(mac(1), mac(2)))  # learns mac(2) on b
    for port in ports.values():
        port.frames.clear()
    switch.forward(ports["a"], frame(mac(2), mac(1)))
    assert received(ports) == {"a": 0, "b": 1, "c": 0}
    assert switch.lookup(mac(2)) is ports["b"]
    assert switch.lookup(mac(1)) is ports["a"]
    stats = switch.statistics()
    assert stats.flooded == 1
    assert stats.learned == 2
    assert stats.mac_table_size == 2


@pytest.mark.parametrize(
    "dst",
    [BROADCAST, bytes.fromhex("01005e000001"), bytes.fromhex("333300000001"), mac(9)],
    ids=["broadcast", "ipv4-multicast", "ipv6-multicast", "unknown"],
)
def test_group_and_unknown_destinations_flood(dst: bytes) -> None:
    switch, _, ports = make()
    switch.forward(ports["b"], frame(mac(1), mac(2)))
    switch.forward(ports["c"], frame(mac(1), mac(3)))
    for port in ports.values():
        port.frames.clear()
    switch.forward(ports["a"], frame(dst, mac(1)))
    assert received(ports) == {"a": 0, "b": 1, "c": 1}


def test_never_echoes_to_the_source_port() -> None:
    switch, _, ports = make()
    switch.forward(ports["a"], frame(mac(9), mac(1)))
    switch.forward(ports["a"], frame(mac(9), mac(2)))  # mac(2) also behind port a
    for port in ports.values():
        port.frames.clear()
    switch.forward(ports["a"], frame(mac(2), mac(1)))
    assert received(ports) == {"a": 0, "b": 0, "c": 0}
    stats = switch.statistics().port("a")
    assert stats.rx_filtered == 1
    assert stats.rx_frames == 3


def test_address_moves_to_the_port_it_was_last_seen_on() -> None:
    switch, _, ports = make()
    switch.forward(ports["a"], frame(BROADCAST, mac(1)))
    switch.forward(ports["b"], frame(BROADCAST, mac(1)))
    assert switch.lookup(mac(1)) is ports["b"]
    for port in ports.values():
        port.frames.clear()
    switch.forward(ports["c"], frame(mac(1), mac(3)))
    assert received(ports) == {"a": 0, "b": 1, "c": 0}
    stats = switch.statistics()
    assert (stats.learned, stats.moved) == (2, 1)


def test_aging() -> None:
    switch, clock, ports = make(max_age=300.0)
    switch.forward(ports["b"], frame(BROADCAST, mac(2)))
    clock.now += 300.0  # exactly max_age: still known
    assert switch.lookup(mac(2)) is ports["b"]
    for port in ports.values():
        port.frames.clear()
    switch.forward(ports["a"], frame(mac(2), mac(1)))
    assert received(ports) == {"a": 0, "b": 1, "c": 0}

    clock.now += 300.5  # mac(2) last seen 600.5 s ago; mac(1) 300.5 s ago
    assert switch.lookup(mac(2)) is None
    assert switch.statistics().mac_table_size == 0
    for port in ports.values():
        port.frames.clear()
    switch.forward(ports["a"], frame(mac(2), mac(1)))
    assert received(ports) == {"a": 0, "b": 1, "c": 1}  # flooded again
    stats = switch.statistics()
    assert stats.aged_out == 1
    assert stats.mac_table_size == 1  # mac(1), refreshed just now


def test_traffic_from_an_address_keeps_it_alive() -> None:
    switch, clock, ports = make(max_age=10.0)
    for _ in range(5):
        switch.forward(ports["b"], frame(BROADCAST, mac(2)))
        clock.now += 8.0
    assert switch.lookup(mac(2)) is ports["b"]


def test_expire_sweeps_aged_addresses() -> None:
    switch, clock, ports = make(max_age=10.0)
    switch.forward(ports["a"], frame(BROADCAST, mac(1)))
    clock.now += 5
    switch.forward(ports["b"], frame(BROADCAST, mac(2)))
    clock.now += 6
    assert switch.expire() == 1
    assert switch.lookup(mac(1)) is None
    assert switch.lookup(mac(2)) is ports["b"]
    assert switch.statistics().aged_out == 1


def test_refused_delivery_is_counted_and_never_blocks_the_others() -> None:
    switch, _, ports = make()
    ports["b"].accept = False
    switch.forward(ports["a"], frame(BROADCAST, mac(1), b"x" * 50))
    assert received(ports) == {"a": 0, "b": 0, "c": 1}
    switch.forward(ports["b"], frame(BROADCAST, mac(2)))  # learn mac(2) on b
    switch.forward(ports["a"], frame(mac(2), mac(1)))  # unicast refused
    stats = switch.statistics()
    assert stats.port("b").tx_dropped == 2
    assert stats.port("b").tx_frames == 0
    assert stats.port("c").tx_frames == 2
    assert stats.port("c").tx_bytes == 64 + len(frame(BROADCAST, mac(2)))


@pytest.mark.parametrize("size", [0, 1, 12, 13])
def test_runts_are_dropped_and_counted(size: int) -> None:
    switch, _, ports = make()
    switch.forward(ports["a"], frame(BROADCAST, mac(1))[:size])
    assert received(ports) == {"a": 0, "b": 0, "c": 0}
    stats = switch.statistics()
    assert stats.port("a").rx_runts == 1
    assert stats.port("a").rx_frames == 1
    assert stats.port("a").rx_bytes == size
    assert stats.mac_table_size == 0


def test_a_bare_ethernet_header_is_forwarded() -> None:
    switch, _, ports = make()
    switch.forward(ports["a"], frame(BROADCAST, mac(1), b""))
    assert received(ports) == {"a": 0, "b": 1, "c": 1}


@pytest.mark.parametrize("src", [bytes(6), BROADCAST, bytes.fromhex("01005e000001")])
def test_invalid_source_addresses_are_dropped(src: bytes) -> None:
    switch, _, ports = make()
    switch.forward(ports["a"], frame(BROADCAST, src))
    assert received(ports) == {"a": 0, "b": 0, "c": 0}
    assert switch.statistics().port("a").rx_invalid_source == 1
    assert switch.lookup(src) is None


def test_port_counters() -> None:
    switch, _, ports = make("ab")
    one = frame(BROADCAST, mac(1), b"1" * 10)
    two = frame(mac(1), mac(2), b"2" * 20)
    switch.forward(ports["a"], one)
    switch.forward(ports["b"], two)
    a, b = switch.statistics().ports
    assert (a.name, a.rx_frames, a.rx_bytes, a.tx_frames, a.tx_bytes) == (
        "a",
        1,
        len(one),
        1,
        len(two),
    )
    assert (b.name, b.rx_frames, b.rx_bytes, b.tx_frames, b.tx_bytes) == (
        "b",
        1,
        len(two),
        1,
        len(one),
    )


# -- attaching and detaching ------------------------------------------------------------------


def test_add_twice_fails_and_remove_is_idempotent() -> None:
    switch, _, ports = make()
    with pytest.raises(ValueError, match="already attached"):
        switch.add_port(ports["a"])
    switch.remove_port(ports["a"])
    switch.remove_port(ports["a"])
    switch.remove_port(Port("never attached"))
    assert switch.ports == (ports["b"], ports["c"])


def test_ports_are_told_apart_by_identity_not_equality() -> None:
    @dataclasses.dataclass
    class EqualPort:
        name: str

        def deliver(self, frame: bytes) -> bool:
            return True

    switch = Switch()
    first, second = EqualPort("same"), EqualPort("same")
    switch.add_port(first)
    switch.add_port(second)  # equal, but another port
    assert switch.ports == (first, second)


def test_removed_port_forgets_its_addresses() -> None:
    switch, _, ports = make()
    switch.forward(ports["b"], frame(BROADCAST, mac(2)))
    switch.remove_port(ports["b"])
    assert switch.lookup(mac(2)) is None
    for port in ports.values():
        port.frames.clear()
    switch.forward(ports["a"], frame(mac(2), mac(1)))
    assert received(ports) == {"a": 0, "b": 0, "c": 1}


def test_frame_from_a_removed_port_is_dropped_and_counted() -> None:
    switch, _, ports = make()
    switch.remove_port(ports["a"])
    switch.forward(ports["a"], frame(BROADCAST, mac(1)))
    assert received(ports) == {"a": 0, "b": 0, "c": 0}
    stats = switch.statistics()
    assert stats.unknown_source == 1
    assert [p.name for p in stats.ports] == ["b", "c"]
    assert switch.lookup(mac(1)) is None


def test_port_removed_in_the_middle_of_a_flood_gets_nothing_more() -> None:
    switch, _, ports = make("abcd")
    ports["b"].on_deliver = lambda _frame: switch.remove_port(ports["c"])
    switch.forward(ports["a"], frame(BROADCAST, mac(1)))
    assert received(ports) == {"a": 0, "b": 1, "c": 0, "d": 1}
    # and the next flood goes to the remaining ports only
    switch.forward(ports["a"], frame(BROADCAST, mac(1)))
    assert received(ports) == {"a": 0, "b": 2, "c": 0, "d": 2}


def test_port_added_in_the_middle_of_a_flood_joins_from_the_next_frame() -> None:
    switch, _, ports = make("ab")
    late = Port("late")
    ports["b"].on_deliver = lambda _frame: None if late in switch.ports else switch.add_port(late)
    switch.forward(ports["a"], frame(BROADCAST, mac(1)))
    assert late.frames == []
    switch.forward(ports["a"], frame(BROADCAST, mac(1)))
    assert len(late.frames) == 1


def test_source_removed_while_its_frame_floods() -> None:
    switch, _, ports = make("abc")
    ports["b"].on_deliver = lambda _frame: switch.remove_port(ports["a"])
    switch.forward(ports["a"], frame(BROADCAST, mac(1)))
    assert received(ports) == {"a": 0, "b": 1, "c": 1}
    assert switch.lookup(mac(1)) is None  # learned, then forgotten with its port


# -- table limits -----------------------------------------------------------------------------


def test_full_table_stops_learning_and_counts() -> None:
    switch, clock, ports = make(max_macs=2, max_age=10.0)
    for n in (1, 2, 3):
        switch.forward(ports["a"], frame(BROADCAST, mac(n)))
    stats = switch.statistics()
    assert (stats.learned, stats.table_full, stats.mac_table_size) == (2, 1, 2)
    assert switch.lookup(mac(3)) is None
    clock.now += 11  # everything aged: the next new source sweeps and is learned
    switch.forward(ports["b"], frame(BROADCAST, mac(4)))
    assert switch.lookup(mac(4)) is ports["b"]
    assert switch.statistics().aged_out == 2


def test_full_table_sweeps_at_most_once_a_second() -> None:
    switch, clock, ports = make(max_macs=1, max_age=0.5)
    switch.forward(ports["a"], frame(BROADCAST, mac(1)))
    switch.forward(ports["a"], frame(BROADCAST, mac(2)))  # full: sweeps, nothing aged
    clock.now += 0.6  # mac(1) aged, but the last sweep was 0.6 s ago
    switch.forward(ports["a"], frame(BROADCAST, mac(3)))
    assert switch.statistics().table_full == 2
    clock.now += 0.5
    switch.forward(ports["a"], frame(BROADCAST, mac(3)))
    assert switch.lookup(mac(3)) is ports["a"]


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="max_age"):
        Switch(max_age=0)
    with pytest.raises(ValueError, match="max_macs"):
        Switch(max_macs=0)


def test_default_clock_works_outside_trio() -> None:
    switch = Switch()
    a, b = Port("a"), Port("b")
    switch.add_port(a)
    switch.add_port(b)
    switch.forward(a, frame(BROADCAST, mac(1)))
    switch.forward(b, frame(mac(1), mac(2)))
    assert len(a.frames) == 1


async def test_trio_clock_can_drive_aging(autojump_clock: trio.testing.MockClock) -> None:
    switch = Switch(clock=trio.current_time, max_age=60)
    a, b = Port("a"), Port("b")
    switch.add_port(a)
    switch.add_port(b)
    switch.forward(b, frame(BROADCAST, mac(2)))
    assert switch.lookup(mac(2)) is b
    autojump_clock.jump(61)
    assert switch.lookup(mac(2)) is None


# -- statistics -------------------------------------------------------------------------------


def test_statistics_are_frozen_snapshots() -> None:
    switch, _, ports = make()
    before = switch.statistics()
    switch.forward(ports["a"], frame(BROADCAST, mac(1)))
    assert before.port("a").rx_frames == 0
    assert switch.statistics().port("a").rx_frames == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.flooded = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.ports[0].rx_frames = 3  # type: ignore[misc]
    with pytest.raises(KeyError):
        before.port("nope")
    assert isinstance(before, SwitchStatistics)


# -- a model of the switch, checked against random traffic ------------------------------------

events = st.lists(
    st.tuples(
        st.integers(0, 3),  # source port
        st.integers(0, 5),  # source MAC (0 = invalid all-zero)
        st.integers(0, 6),  # destination MAC (6 = broadcast)
        st.booleans(),  # whether the destination port refuses frames right now
        st.integers(0, 3),  # seconds that pass before the frame
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(events)
def test_switch_matches_a_simple_model(
    trace: list[tuple[int, int, int, bool, int]],
) -> None:
    clock = FakeClock()
    switch = Switch(clock=clock, max_age=5)
    ports = [Port(str(n)) for n in range(4)]
    for port in ports:
        switch.add_port(port)
    table: dict[bytes, tuple[int, float]] = {}  # the model: MAC -> (port, last seen)
    refused = 0
    for src, smac, dmac, refuse, wait in trace:
        clock.now += wait
        source = bytes(6) if smac == 0 else mac(smac)
        dest = BROADCAST if dmac == 6 else mac(dmac)
        for port in ports:
            port.frames.clear()
            port.accept = True
        expected: set[int] = set()
        if smac:
            table[source] = (src, clock.now)
            known = table.get(dest)
            if known is not None and clock.now - known[1] <= 5:
                expected = set() if known[0] == src else {known[0]}
            else:
                expected = set(range(4)) - {src}
        target = (src + 1) % 4
        ports[target].accept = not refuse
        if refuse and target in expected:
            expected.discard(target)
            refused += 1
        switch.forward(ports[src], frame(dest, source))
        assert {n for n, port in enumerate(ports) if port.frames} == expected
    stats = switch.statistics()
    assert sum(p.tx_dropped for p in stats.ports) == refused
    assert sum(p.rx_frames for p in stats.ports) == len(trace)
