"""The virtio-net batch data path: NetPort over real rings, no server, no sockets.

Every test moves frames guest to guest through the switch and checks the bytes that land in
the receiving guest's buffers and the used lengths (:class:`_net_rig.Guest` checks the
header on every receive). Hostile and unusual chain layouts are compared with the per-chain
path, which the batch path must match exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from _net_rig import BROADCAST, Guest, MiB, frame, mac
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_vhost.devices.net import RX_BACKLOG, NetPort
from trio_vhost.devices.net_datapath import MAX_FRAME
from trio_vhost.devices.net_frames import RX_PREFIX
from trio_vhost.devices.net_spec import (
    HASH_REPORT_HEADER_SIZE,
    LEGACY_HEADER_SIZE,
    NetFeature,
    rx_header,
)
from trio_vhost.devices.net_switch import Switch
from trio_vhost.proto.constants import VirtioFeature

A, B, C = mac(1), mac(2), mac(3)


class Net:
    """A switch with guests attached, closed at the end of the test."""

    def __init__(self) -> None:
        self.switch = Switch()
        self.guests: list[Guest] = []

    def guest(self, name: str, **kwargs: object) -> Guest:
        pairs = int(kwargs.pop("pairs", 1))  # type: ignore[call-overload]
        port = NetPort(self.switch, name, pairs=pairs)
        guest = Guest(port, **kwargs)  # type: ignore[arg-type]
        self.guests.append(guest)
        return guest

    def close(self) -> None:
        for guest in self.guests:
            guest.close()


@pytest.fixture
def net() -> Iterator[Net]:
    made = Net()
    yield made
    made.close()


# -- delivery ----------------------------------------------------------------------------------


def test_mixed_sizes_arrive_byte_for_byte(net: Net) -> None:
    a, b = net.guest("a"), net.guest("b")
    sizes = [14, 15, 60, 64, 100, 127, 128, 129, 512, 1000, 1500, 1514, 2048]
    sent = [frame(B, A, size, tag) for tag, size in enumerate(sizes)]
    b.post([2048 + 12] * len(sent))
    a.send(sent)
    assert b.receive() == sent
    stats = net.switch.statistics()
    assert stats.port("a").rx_frames == len(sent)
    assert stats.port("a").rx_bytes == sum(sizes)
    assert stats.port("b").tx_frames == len(sent)
    assert stats.port("b").tx_bytes == sum(sizes)


def test_a_batch_spanning_several_tx_batches_and_rx_batches(net: Net) -> None:
    a, b = net.guest("a"), net.guest("b")
    sent = [frame(B, A, 60 + tag % 200, tag) for tag in range(200)]
    a.send(sent[:70], limit=32)  # several TX batches land in the backlog
    a.send(sent[70:], limit=50)
    b.post([1600] * 150)
    got = b.receive(limit=40)  # RX batches that cut across them
    b.post([1600] * 60)
    got += b.receive(limit=64)
    assert got == sent
    assert len(b.port.port.queues[0]) == 0


def test_both_directions_and_learning(net: Net) -> None:
    a, b, c = net.guest("a"), net.guest("b"), net.guest("c")
    for guest in (a, b, c):
        guest.post([1600] * 8)
    a.send([frame(B, A, 80, 1)])  # B unknown: flooded to b and c
    assert b.receive() == [frame(B, A, 80, 1)]
    assert c.receive() == [frame(B, A, 80, 1)]
    b.send([frame(A, B, 90, 2), frame(A, B, 91, 3)])  # A learned on a: a only
    assert a.receive() == [frame(A, B, 90, 2), frame(A, B, 91, 3)]
    assert c.receive() == []
    a.send([frame(B, A, 100, 4)])  # now B is known too
    assert b.receive() == [frame(B, A, 100, 4)]
    assert c.receive() == []
    stats = net.switch.statistics()
    assert (stats.learned, stats.flooded, stats.mac_table_size) == (2, 1, 2)
    assert net.switch.lookup(A) is a.port.port
    assert net.switch.lookup(B) is b.port.port


def test_broadcast_floods_to_every_other_port(net: Net) -> None:
    a, b, c = net.guest("a"), net.guest("b"), net.guest("c")
    for guest in (a, b, c):
        guest.post([1600] * 4)
    sent = [frame(BROADCAST, A, 60, n) for n in range(3)]
    a.send(sent)
    assert b.receive() == sent
    assert c.receive() == sent
    assert a.receive() == []
    assert net.switch.statistics().flooded == 3


def test_a_batch_of_several_flows_goes_to_each_destination_in_order(net: Net) -> None:
    a, b, c = net.guest("a"), net.guest("b"), net.guest("c")
    for guest in (b, c):
        guest.post([1600] * 16)
        guest.send([frame(BROADCAST, mac(2) if guest is b else C, 60)])
    b.receive()
    c.receive()
    mixed = [frame(B if n % 3 else C, A, 60 + n, n) for n in range(12)]
    mixed.append(frame(BROADCAST, A, 70, 99))
    b.post([1600] * 4)
    a.send(mixed)
    assert b.receive() == [f for f in mixed if f[:6] in (B, BROADCAST)]
    assert c.receive() == [f for f in mixed if f[:6] in (C, BROADCAST)]


def test_frames_of_a_batch_that_teach_each_other_switch_like_one_by_one(net: Net) -> None:
    # Frame 1 goes to an address that frame 2 of the same batch moves to this very port:
    # frame by frame, frame 1 is still sent to where that address was before.
    a, b, c = net.guest("a"), net.guest("b"), net.guest("c")
    for guest in (a, b, c):
        guest.post([1600] * 8)
    b.send([frame(BROADCAST, B, 60)])
    a.receive()
    c.receive()
    a.send([frame(B, A, 60, 1), frame(C, B, 60, 2)])  # B moves to a with frame 2
    assert b.receive() == [frame(B, A, 60, 1), frame(C, B, 60, 2)]  # C unknown: flooded
    assert c.receive() == [frame(C, B, 60, 2)]
    stats = net.switch.statistics()
    assert stats.moved == 1
    assert net.switch.lookup(B) is a.port.port


# -- bounds and drops --------------------------------------------------------------------------


def test_backlog_is_bounded_and_drops_are_counted(net: Net) -> None:
    a, b = net.guest("a"), net.guest("b")
    extra = 76
    sent = [frame(B, A, 60, n) for n in range(RX_BACKLOG + extra)]
    for start in range(0, len(sent), 200):
        a.send(sent[start : start + 200])
    backlog = b.port.port.queues[0]
    assert len(backlog) == RX_BACKLOG
    stats = backlog.statistics()
    assert (stats.accepted, stats.dropped_full) == (RX_BACKLOG, extra)
    assert net.switch.statistics().port("b").tx_dropped == extra
    got: list[bytes] = []
    while len(got) < RX_BACKLOG:
        b.post([128] * 200)
        got += b.receive()
    assert got == sent[:RX_BACKLOG]


def test_frames_larger_than_the_rx_buffer_are_dropped_alone(net: Net) -> None:
    a, b = net.guest("a"), net.guest("b")
    small, big = frame(B, A, 60, 1), frame(B, A, 200, 2)
    b.post([12 + 60, 12 + 199, 12 + 200, 12 + 60])
    a.send([small, big, big, small])
    assert b.receive() == [small, b"", big, small]
    assert b.port.rx_too_small == 1


def test_a_disabled_tx_ring_drops_its_frames(net: Net) -> None:
    a, b = net.guest("a"), net.guest("b")
    b.post([1600] * 4)
    a.contexts[1].enabled = False
    a.send([frame(B, A, 60)])
    assert b.receive() == []
    assert net.switch.statistics().port("a").rx_frames == 0
    assert a.drivers[1].used_idx() == 1  # consumed all the same


def test_a_stopped_rx_ring_takes_nothing_and_the_backlog_is_dropped(net: Net) -> None:
    a, b = net.guest("a"), net.guest("b")
    a.send([frame(B, A, 60)])
    assert len(b.port.port.queues[0]) == 1
    b.port.queue_stopped(0)
    assert len(b.port.port.queues[0]) == 0
    a.send([frame(B, A, 60)])
    assert net.switch.statistics().port("b").tx_dropped == 1


def test_rx_wakes_its_worker_once_per_batch(net: Net) -> None:
    a, b = net.guest("a"), net.guest("b")
    a.send([frame(B, A, 60, n) for n in range(40)])
    a.send([frame(B, A, 60, n) for n in range(40)])
    assert b.woken == [0]  # the backlog went from empty to non-empty once


def test_frames_longer_than_any_mtu_are_dropped_unread(net: Net) -> None:
    a, b = net.guest("a"), net.guest("b")
    b.post([1600] * 2)
    huge = frame(B, A, MAX_FRAME + 1, 9)
    a.send([frame(B, A, 60, 1), huge, frame(B, A, 61, 2)])
    assert b.receive() == [frame(B, A, 60, 1), frame(B, A, 61, 2)]
    assert a.port.tx_oversize == 1
    assert net.switch.statistics().port("a").rx_frames == 2
    b.post([MAX_FRAME + 12])
    a.send([frame(B, A, MAX_FRAME, 3)])  # the longest frame still goes through
    assert b.receive() == [frame(B, A, MAX_FRAME, 3)]


# -- header forms ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "features",
    [
        0,  # legacy, 10 bytes
        int(NetFeature.MRG_RXBUF),
        int(VirtioFeature.VERSION_1 | NetFeature.HASH_REPORT),
    ],
    ids=["legacy10", "mrg12", "hash20"],
)
def test_every_header_size(net: Net, features: int) -> None:
    a, b = net.guest("a", features=features), net.guest("b", features=features)
    assert b.header_len in (LEGACY_HEADER_SIZE, 12, HASH_REPORT_HEADER_SIZE)
    sent = [frame(B, A, size, size) for size in (14, 60, 333, 1514)]
    b.post([1600] * 4)
    a.send(sent)
    assert b.receive() == sent


def test_ports_with_different_header_sizes(net: Net) -> None:
    a = net.guest("a", features=int(VirtioFeature.VERSION_1))
    b = net.guest("b", features=0)
    b.post([1600] * 2)
    a.send([frame(B, A, 60, 1), frame(B, A, 61, 2)])
    assert b.receive() == [frame(B, A, 60, 1), frame(B, A, 61, 2)]
    a.post([1600])
    b.send([frame(A, B, 70, 3)])
    assert a.receive() == [frame(A, B, 70, 3)]


# -- memory layout -----------------------------------------------------------------------------


def test_two_memory_regions(net: Net) -> None:
    # b's rings and buffers straddle the boundary between the backend's two regions: some
    # buffers lie in each, and one may span both (the per-chain path takes that one).
    a = net.guest("a", ram_size=8 * MiB, split_at=4 * MiB)
    b = net.guest("b", ram_size=8 * MiB, split_at=4 * MiB, skip=4 * MiB - 200_000)
    sent = [frame(B, A, 100 + n * 37 % 1400, n) for n in range(150)]
    b.post([1600] * 150)
    a.send(sent)
    assert b.receive() == sent
    a.post([1600] * 150)
    b.send([frame(A, B, 100 + n, n) for n in range(150)])
    assert a.receive() == [frame(A, B, 100 + n, n) for n in range(150)]


# -- multiqueue --------------------------------------------------------------------------------


def test_two_queue_pairs_steer_replies_to_the_sending_pair(net: Net) -> None:
    a, b = net.guest("a", pairs=2), net.guest("b", pairs=2)
    for pair in (0, 1):
        a.post([1600] * 8, pair=pair)
        b.post([1600] * 8, pair=pair)
    a.send([frame(BROADCAST, A, 60, 1)], pair=1)  # learned; b has no flow yet
    assert b.receive(pair=0) + b.receive(pair=1) == [frame(BROADCAST, A, 60, 1)]
    b.send([frame(A, B, 60, 2)], pair=1)  # b's flow to A goes out on pair 1
    assert a.receive(pair=0) + a.receive(pair=1) == [frame(A, B, 60, 2)]
    a.send([frame(B, A, 60, 3), frame(B, A, 61, 4)], pair=0)  # a's flow to B on pair 0
    assert b.receive(pair=0) == []
    assert b.receive(pair=1) == [frame(B, A, 60, 3), frame(B, A, 61, 4)]
    b.send([frame(A, B, 62, 5)], pair=0)  # and the reply comes back on a's pair 0
    assert a.receive(pair=1) == []
    assert a.receive(pair=0) == [frame(A, B, 62, 5)]


# -- the per-chain path for unusual chains -----------------------------------------------------

HEADER = bytes(12)

#: TX chain layouts: a name -> how the driver adds the frame (readable parts, writable sizes,
#: indirect). All but "simple" make the batch leave its fast path.
TX_LAYOUTS = {
    "simple": lambda f: ([HEADER + f], [], False),
    "split_header": lambda f: ([HEADER, f], [], False),
    "three_parts": lambda f: ([HEADER, f[:7], f[7:]], [], False),
    "indirect": lambda f: ([HEADER + f], [], True),
    "indirect_split": lambda f: ([HEADER, f], [], True),
    "writable_only": lambda f: ([], [len(f) + 12], False),
    "plus_writable": lambda f: ([HEADER + f], [16], False),
    "short_of_header": lambda f: ([HEADER[:5]], [], False),
    "header_only": lambda f: ([HEADER], [], False),
    "runt": lambda f: ([HEADER + f[:13]], [], False),
    "oversize": lambda f: ([HEADER + f + bytes(MAX_FRAME)], [], False),
    "oversize_split": lambda f: ([HEADER, f + bytes(MAX_FRAME)], [], False),
}
RX_LAYOUTS = {
    "simple": ([], [1600], False),
    "split_header": ([], [12, 1588], False),
    "many_parts": ([], [5, 20, 100, 1500], False),
    "indirect": ([], [1600], True),
    "readable_only": ([1600], [], False),
    "readable_then_writable": ([8], [1600], False),
    "too_small": ([], [40], False),
    "exact": ([], [12 + 60], False),
}


def run_layouts(
    tx: list[str], rx: list[str], sizes: list[int], *, chains: bool
) -> tuple[list[tuple[int, bytes]], object, tuple[int, int]]:
    switch = Switch(clock=lambda: 0.0)
    a, b = NetPort(switch, "a"), NetPort(switch, "b")
    ga, gb = Guest(a), Guest(b)
    try:
        for layout in rx:
            readable, writable, indirect = RX_LAYOUTS[layout]
            gb.drivers[0].add(readable, writable, indirect=indirect)
        gb.drivers[0].publish()
        driver = ga.drivers[1]
        for n, (layout, size) in enumerate(zip(tx, sizes, strict=False)):
            readable, writable, indirect = TX_LAYOUTS[layout](frame(B, A, size, n))
            driver.add(readable, writable, indirect=indirect)
        driver.publish()
        ga.run(1, chains=chains)
        gb.run(0, chains=chains)
        got = [
            (written, gb.drivers[0].read_written(head) if written else b"")
            for head, written in gb.drivers[0].get_used()
        ]
        return got, switch.statistics(), (b.rx_too_small, a.tx_oversize)
    finally:
        ga.close()
        gb.close()


@pytest.mark.parametrize("layout", sorted(TX_LAYOUTS))
def test_each_tx_layout_behaves_like_the_chain_path(layout: str) -> None:
    tx = ["simple", layout, "simple", layout]
    sizes = [60, 70, 80, 90]
    rx = ["simple"] * 4
    assert run_layouts(tx, rx, sizes, chains=False) == run_layouts(tx, rx, sizes, chains=True)


@pytest.mark.parametrize("layout", sorted(RX_LAYOUTS))
def test_each_rx_layout_behaves_like_the_chain_path(layout: str) -> None:
    tx = ["simple"] * 4
    sizes = [60, 200, 60, 1400]
    rx = ["simple", layout, layout, "simple"]
    assert run_layouts(tx, rx, sizes, chains=False) == run_layouts(tx, rx, sizes, chains=True)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(sorted(TX_LAYOUTS)), st.integers(0, 1514)),
        min_size=1,
        max_size=12,
    ),
    st.lists(st.sampled_from(sorted(RX_LAYOUTS)), min_size=0, max_size=14),
)
def test_any_mix_of_layouts_behaves_like_the_chain_path(
    tx: list[tuple[str, int]], rx: list[str]
) -> None:
    layouts, sizes = [t for t, _ in tx], [s for _, s in tx]
    assert run_layouts(layouts, rx, sizes, chains=False) == run_layouts(
        layouts, rx, sizes, chains=True
    )


def test_the_staged_rx_header_is_the_plain_one() -> None:
    assert rx_header(12) == RX_PREFIX == bytes(10) + b"\x01\x00"
