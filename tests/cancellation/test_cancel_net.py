"""virtio-net under stops and cancellation: the batch data path never leaves a ring half done.

Two NetPorts on one switch, each served over a socketpair to a Python frontend with real
rings and eventfds. Frames flow a -> b while b's RX ring is stopped (GET_VRING_BASE) at
every point of the stream, or b's whole session is torn down (hard cancel of its workers).
Afterwards, on b's RX ring:

* ``used.idx`` is the base GET_VRING_BASE returned: no used entry was left half written;
* every used entry is a buffer b posted, used once, and holds header + one whole frame,
  with the used length saying exactly that;
* the frames b received are the frames a sent, in order, each at most once; the others
  are counted as drops (a stopped ring's backlog is thrown away, as on a real link);

and a restart (or a new connection) carries on from there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing
from vhost_dp_harness import fail_after

from trio_vhost import (
    DriverQueue,
    DriverVring,
    Frontend,
    GuestRam,
    VirtioFeature,
    serve_connection,
)
from trio_vhost._io.transport import UnixTransport
from trio_vhost.devices.net import NetPort
from trio_vhost.devices.net_spec import rx_header
from trio_vhost.devices.net_switch import Switch

A_MAC, B_MAC = bytes((2, 0, 0, 0, 0, 0xA)), bytes((2, 0, 0, 0, 0, 0xB))
HEADER = bytes(12)


def frame(tag: int) -> bytes:
    size = 60 + tag * 7 % 300
    return (B_MAC + A_MAC + b"\x88\xb5" + tag.to_bytes(4, "little") + bytes(size))[:size]


class Guest:
    """A frontend with RX (vring 0) and TX (vring 1) started over its own RAM."""

    def __init__(self, frontend: Frontend, ram: GuestRam, event_idx: bool) -> None:
        self.frontend = frontend
        self.ram = ram
        self.rx_queue = DriverQueue.create(ram, 64, event_idx=event_idx, pool_size=256 << 10)
        self.tx_queue = DriverQueue.create(ram, 64, event_idx=event_idx, pool_size=256 << 10)
        self.rx: DriverVring | None = None
        self.tx: DriverVring | None = None
        self.posted: set[int] = set()

    async def start(self) -> None:
        await self.frontend.set_mem_table([self.ram])
        self.rx = await self.frontend.start_vring(0, self.rx_queue)
        self.tx = await self.frontend.start_vring(1, self.tx_queue)

    def close(self) -> None:
        for vring in (self.rx, self.tx):
            if vring is not None:
                vring.close()

    def post(self, count: int) -> None:
        assert self.rx is not None
        for _ in range(count):
            self.posted.add(self.rx_queue.add([], [2048]))
        self.rx.notify()

    def send(self, frames: list[bytes]) -> None:
        assert self.tx is not None
        for data in frames:
            self.tx_queue.add([HEADER + data])
        self.tx.notify()
        self.tx_queue.get_used()

    def received(self) -> list[bytes]:
        """Reap RX completions, checking each entry; return the frames in order."""
        out = []
        for head, written in self.rx_queue.get_used():
            assert head in self.posted, "a used entry for a buffer not in flight"
            self.posted.discard(head)
            data = self.rx_queue.read_written(head)
            assert len(data) == written
            assert data[:12] == rx_header(12)
            out.append(data[12:])
        return out


@asynccontextmanager
async def network() -> AsyncIterator[tuple[Switch, NetPort, NetPort, trio.Nursery]]:
    switch = Switch()
    a, b = NetPort(switch, "a", mac=A_MAC), NetPort(switch, "b", mac=B_MAC)
    async with trio.open_nursery() as nursery:
        yield switch, a, b, nursery
        nursery.cancel_scope.cancel()


async def connect(port: NetPort, ram: GuestRam, nursery: trio.Nursery) -> Guest:
    backend, front = UnixTransport.socketpair()
    nursery.start_soon(serve_connection, port, backend)
    frontend = Frontend(front)
    acked = await frontend.negotiate()
    guest = Guest(frontend, ram, bool(acked & VirtioFeature.RING_EVENT_IDX))
    await guest.start()
    return guest


def check_stream(got: list[bytes], sent: list[bytes]) -> None:
    """``got`` is ``sent`` with some frames missing: in order, none twice, none altered."""
    position = {data: i for i, data in enumerate(sent)}
    indices = [position[data] for data in got]
    assert indices == sorted(set(indices))


@fail_after(60)
async def test_rx_stopped_at_every_point_of_a_stream() -> None:
    with GuestRam.create(4 << 20) as ram_a, GuestRam.create(4 << 20) as ram_b:
        async with network() as (switch, a_port, b_port, nursery):
            a = await connect(a_port, ram_a, nursery)
            b = await connect(b_port, ram_b, nursery)
            sent: list[bytes] = []
            got: list[bytes] = []
            for stop_after in range(1, 24, 3):
                b.post(8)
                for burst in range(stop_after):
                    batch = [frame(len(sent) + i) for i in range(burst % 5 + 1)]
                    sent += batch
                    a.send(batch)
                    await trio.testing.wait_all_tasks_blocked()
                    got += b.received()
                    if burst % 3 == 0:
                        b.post(4)
                # stop b's RX ring with frames waiting in the backlog, published buffers
                # not yet used, and a's TX ring still running
                sent += [frame(len(sent) + i) for i in range(3)]
                a.send(sent[-3:])
                base = await b.frontend.get_vring_base(0)
                assert b.rx_queue.used_idx() == base
                got += b.received()
                assert b.rx is not None
                b.rx.close()
                b.rx = await b.frontend.start_vring(0, b.rx_queue, base=base)
                await trio.testing.wait_all_tasks_blocked()
                got += b.received()
            check_stream(got, sent)
            stats = switch.statistics().port("b")
            queue = b_port.port.queues[0].statistics()
            assert len(got) + queue.dropped_disabled + queue.queued + stats.tx_dropped == len(sent)
            assert len(got) >= len(sent) // 2  # most of the stream did get through
            assert queue.dropped_disabled  # some stops did find frames waiting
            for guest in (a, b):
                guest.close()
                await guest.frontend.aclose()


@fail_after(60)
async def test_a_session_torn_down_mid_stream_leaves_its_rings_whole() -> None:
    with GuestRam.create(4 << 20) as ram_a, GuestRam.create(4 << 20) as ram_b:
        async with network() as (_switch, a_port, b_port, nursery):
            a = await connect(a_port, ram_a, nursery)
            b = await connect(b_port, ram_b, nursery)
            sent = [frame(i) for i in range(40)]
            b.post(16)
            a.send(sent[:20])  # 20 frames for 16 buffers: 4 wait in the backlog
            await trio.testing.wait_all_tasks_blocked()
            got = b.received()
            assert got == sent[:16]
            a.send(sent[20:30])
            # b disconnects: its workers are cancelled wherever they are
            b.close()
            await b.frontend.aclose()
            await trio.testing.wait_all_tasks_blocked()
            used_before = b.rx_queue.used_idx()
            assert used_before == 16  # nothing more was completed (no buffers posted)
            # a new connection of b starts over on the same port; the backlog was dropped
            b2 = await connect(b_port, ram_b, nursery)
            b2.post(16)
            a.send(sent[30:])
            await trio.testing.wait_all_tasks_blocked()
            later = b2.received()
            check_stream(got + later, sent)
            assert later == sent[30:]
            for guest in (a, b2):
                guest.close()
                await guest.frontend.aclose()
