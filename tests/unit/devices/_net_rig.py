"""A rig for the virtio-net data path without a server: guests with real rings, ports, a switch.

Each :class:`Guest` has its own guest RAM (a memfd), the backend's :class:`MemoryTable` over
it (a second, shared mapping, as a backend has), and a driver queue plus a device queue for
every vring of its :class:`NetPort`. :meth:`Guest.run` plays the worker: it pops what the
device wants, calls :meth:`NetPort.process_arrays` (or, with ``chains=True``,
:meth:`NetPort.process_batch`: the per-chain path, to compare with) and publishes the used
entries. The guest side adds chains with :class:`DriverQueue` (any layout: split header,
indirect, hostile flags) and reads back exactly what the device wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from trio_vhost.device import QueueContext
from trio_vhost.devices.net import NetPort
from trio_vhost.devices.net_spec import HEADER_SIZE, rx_header, rx_queue, tx_queue
from trio_vhost.mem import GuestRam, MemoryTable
from trio_vhost.proto.constants import VirtioFeature
from trio_vhost.vring import DriverQueue, SplitQueue

RAM_GPA = 0x1_0000_0000
MiB = 1 << 20
BROADCAST = b"\xff" * 6
ETHERTYPE = b"\x88\xb5"  # IEEE local experimental


def mac(n: int) -> bytes:
    """A locally administered unicast MAC numbered ``n``."""
    return bytes((0x02, 0, 0, 0, n >> 8, n & 0xFF))


def frame(dst: bytes, src: bytes, size: int = 60, tag: int = 0) -> bytes:
    """An Ethernet frame of ``size`` bytes whose payload starts with a 4-byte ``tag``."""
    body = tag.to_bytes(4, "little") + bytes((tag + i) & 0xFF for i in range(max(0, size - 18)))
    return (dst + src + ETHERTYPE + body)[:size]


class Guest:
    """One guest attached to ``port``: RAM, rings for every vring, a worker stand-in.

    Args:
        port: the device.
        size: queue size of every vring.
        features: the virtio features the driver acks (sets the header size).
        split_at: if set, the backend's table is two regions, split at this byte offset
            of the RAM (rings and buffers may then lie in either).
        skip: bytes of RAM to leave unused before the rings (to place them in region 2).
    """

    def __init__(
        self,
        port: NetPort,
        *,
        size: int = 256,
        features: int = int(VirtioFeature.VERSION_1),
        ram_size: int = 16 * MiB,
        split_at: int | None = None,
        skip: int = 0,
        pool: int = 2 * MiB,
    ) -> None:
        self.port = port
        self.ram = GuestRam.create(ram_size, gpa=RAM_GPA)
        if split_at is None:
            regions = [self.ram.backend_region()]
        else:
            regions = [
                self.ram.backend_region(0, split_at),
                self.ram.backend_region(split_at, ram_size - split_at),
            ]
        self.table = MemoryTable.from_regions(regions)
        if skip:
            self.ram.alloc(skip)
        port.ack_features(features)
        self.header_len = port.header_len
        n = port.num_queues
        # indirect=True: the queues accept indirect chains (drivers add them only when asked)
        self.drivers = [
            DriverQueue.create(self.ram, size, indirect=True, pool_size=pool) for _ in range(n)
        ]
        self.queues = [SplitQueue(self.table, d.queue_state()) for d in self.drivers]
        self.contexts = [QueueContext(i, self.table, enabled=True) for i in range(n)]
        self.woken: list[int] = []
        for index in range(n):
            port.queue_started(index, self._waker(index))

    def _waker(self, index: int) -> Callable[[], None]:
        return lambda: self.woken.append(index)

    def close(self) -> None:
        for index in range(self.port.num_queues):
            self.port.queue_stopped(index)
        del self.queues
        self.table.close()
        self.ram.close()

    # -- the worker's part ---------------------------------------------------------------------

    def run(self, index: int, *, limit: int = 64, chains: bool = False) -> int:
        """Drain vring ``index`` through the device like a worker; return chains completed."""
        queue, context, port = self.queues[index], self.contexts[index], self.port
        done = 0
        while True:
            wanted = port.chains_wanted(context)
            if wanted == 0:
                return done
            batch = queue.pop_arrays(limit if wanted is None else min(wanted, limit))
            if not batch:
                return done
            if chains:
                queue.add_used_batch(port.process_batch(context, batch.chains))
            else:
                written = port.process_arrays(context, batch)
                queue.add_used_arrays(batch.heads, written)
            done += batch.count

    # -- the driver's part ---------------------------------------------------------------------

    def send(
        self,
        frames: Sequence[bytes],
        *,
        pair: int = 0,
        header: bytes | None = None,
        chains: bool = False,
        limit: int = 64,
    ) -> None:
        """Transmit ``frames`` (one readable descriptor each, header first) and drain TX."""
        driver = self.drivers[tx_queue(pair)]
        prefix = bytes(self.header_len) if header is None else header
        for data in frames:
            driver.add([prefix + data])
        driver.publish()
        self.run(tx_queue(pair), chains=chains, limit=limit)
        driver.get_used()

    def post(self, sizes: Sequence[int], *, pair: int = 0) -> list[int]:
        """Post RX buffers of ``sizes`` writable bytes; return their heads."""
        driver = self.drivers[rx_queue(pair)]
        heads = [driver.add([], [size]) for size in sizes]
        driver.publish()
        return heads

    def receive(self, *, pair: int = 0, chains: bool = False, limit: int = 64) -> list[bytes]:
        """Run RX and return the frames received, in order (empty completions included as b"").

        Checks what a driver would: the used length is the header plus the frame, and the
        header is the one for a frame without offloads and ``num_buffers`` = 1.
        """
        self.run(rx_queue(pair), chains=chains, limit=limit)
        driver = self.drivers[rx_queue(pair)]
        out: list[bytes] = []
        for head, written in driver.get_used():
            if not written:
                out.append(b"")
                continue
            data = driver.read_written(head)
            assert len(data) == written
            assert data[: self.header_len] == rx_header(self.header_len)
            out.append(data[self.header_len :])
        return out


__all__ = ["BROADCAST", "HEADER_SIZE", "Guest", "frame", "mac"]
