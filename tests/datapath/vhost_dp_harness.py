"""Shared rig for the data-path and cancellation tests: a real server, a Python frontend.

The server (:func:`serve_connection`) runs in the test's own trio run over a socketpair (or a
socket path) and the guest side is :class:`Frontend` + :class:`DriverQueue` on memfd guest
memory, so every test moves real bytes through real eventfds.

Guest memory is laid out with canary zones the backend's memory table does not map::

    memfd: [canary 64K][region 1M: rings, buffers][canary 64K]

The whole memfd starts filled with :data:`CANARY`; :meth:`Rig.assert_canaries` checks the
outer zones and the region's never-allocated tail, and :meth:`Rig.assert_backend_wrote_only`
compares two snapshots against the bytes the backend may write (used rings, the writable
buffers of the chains the test added) plus the two avail-ring words the driver itself writes
while it waits (``avail.flags``, ``used_event``).

:func:`open_rig` also checks, after the frontend has disconnected and the server returned,
that the canaries are intact and that no fd and no mapping of the guest memfd outlived the
session (log records keep whatever they are given, so a leak through a logged traceback
shows here too).

Every chain carries a unique 8-byte tag; the recording devices note each tag they process
and answer ``b"R" + readable bytes`` into the writable buffers, so a completion is checked
against the chain it belongs to and counted exactly once.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

import numpy as np
import trio
import trio.testing
from numpy.typing import NDArray

from trio_vhost import (
    DescriptorChain,
    Device,
    DriverQueue,
    DriverVring,
    Frontend,
    FrontendReq,
    GuestRam,
    QueueContext,
    VirtioFeature,
    serve_connection,
)
from trio_vhost._io.transport import UnixTransport
from trio_vhost.device import Completion
from trio_vhost.proto.messages import U64, MemoryTable, MemRegion, VringState
from trio_vhost.proto.messages_ext import Success
from trio_vhost.vring.batch import ChainBatch
from trio_vhost.vring.chain import ChainReader, ChainWriter
from trio_vhost.vring.layout import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    avail_ring_size,
    used_ring_size,
)

CANARY = 0xA5
GUARD = 64 * 1024
REGION = 1024 * 1024
RAM_GPA = 0x1_0000_0000
TAG = struct.Struct("<Q")
_DESC = struct.Struct("<QIHH")

P = ParamSpec("P")
R = TypeVar("R")


def fail_after(seconds: float) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Bound a test with a trio-clock deadline (virtual time under autojump_clock)."""

    def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with trio.fail_after(seconds):
                return await fn(*args, **kwargs)

        return wrapper

    return decorate


# -- devices ---------------------------------------------------------------------------


@dataclass
class Park:
    """Where an async recording device stops: it sets ``parked`` and waits for ``release``.

    With ``forever`` the device never finishes that chain (only a cancel gets it out).
    """

    parked: trio.Event = field(default_factory=trio.Event)
    release: trio.Event = field(default_factory=trio.Event)
    forever: bool = False


class RecordingDevice(Device):
    """Two queues; answers every chain with ``b"R" + its readable bytes``; records tags."""

    num_queues = 2

    def __init__(self) -> None:
        self.seen: list[list[int]] = [[] for _ in range(self.num_queues)]
        self.arrived = [0] * self.num_queues
        self.batches: list[list[int]] = [[] for _ in range(self.num_queues)]
        self.started: list[int] = []
        self.stopped: list[int] = []
        #: (queue, arrival number) -> a park, used by the async variant.
        self.parks: dict[tuple[int, int], Park] = {}
        #: called with (queue, arrival number) before a chain is handled (sync hook).
        self.on_chain: Callable[[int, int], None] | None = None

    def queue_started(self, index: int, wake: Callable[[], None]) -> None:
        self.started.append(index)

    def queue_stopped(self, index: int) -> None:
        self.stopped.append(index)

    def handle_chain(self, queue: QueueContext, chain: DescriptorChain) -> Completion:
        data = ChainReader(queue.memory, chain).read()
        self.seen[queue.index].append(TAG.unpack_from(data)[0] if len(data) >= 8 else -1)
        writer = ChainWriter(queue.memory, chain)
        writer.write(b"R" + data)
        return (chain.head, writer.written)

    def _arrive(self, queue: QueueContext) -> int:
        n = self.arrived[queue.index]
        self.arrived[queue.index] = n + 1
        if self.on_chain is not None:
            self.on_chain(queue.index, n)
        return n

    def process_batch(
        self, queue: QueueContext, chains: Sequence[DescriptorChain]
    ) -> Sequence[Completion]:
        self.batches[queue.index].append(len(chains))
        out = []
        for chain in chains:
            self._arrive(queue)
            out.append(self.handle_chain(queue, chain))
        return out


class AsyncRecordingDevice(RecordingDevice):
    """The same device on the async path: a checkpoint per chain, or a park."""

    is_async = True

    async def process_batch_async(
        self, queue: QueueContext, chains: Sequence[DescriptorChain]
    ) -> Sequence[Completion]:
        self.batches[queue.index].append(len(chains))
        out = []
        for chain in chains:
            n = self._arrive(queue)
            park = self.parks.pop((queue.index, n), None)
            if park is None:
                await trio.sleep(0)
            else:
                park.parked.set()
                if park.forever:
                    await trio.sleep_forever()
                await park.release.wait()
            out.append(self.handle_chain(queue, chain))
        return out

    def park_at(self, index: int, arrival: int, *, forever: bool = False) -> Park:
        park = Park(forever=forever)
        self.parks[(index, arrival)] = park
        return park


class ArrayRecordingDevice(RecordingDevice):
    """The same device on the worker's array path (:attr:`Device.uses_arrays`)."""

    uses_arrays = True

    def process_arrays(self, queue: QueueContext, batch: ChainBatch) -> NDArray[np.uint32]:
        self.batches[queue.index].append(batch.count)
        written = np.zeros(batch.count, dtype=np.uint32)
        for i in range(batch.count):
            self._arrive(queue)
            written[i] = self.handle_chain(queue, batch.chain(i))[1]
        return written


def make_device(kind: str) -> RecordingDevice:
    if kind == "arrays":
        return ArrayRecordingDevice()
    return AsyncRecordingDevice() if kind == "async" else RecordingDevice()


# -- driver-side helpers -----------------------------------------------------------------


def read_desc(
    queue: DriverQueue, index: int, table: int | None = None
) -> tuple[int, int, int, int]:
    """Read descriptor ``index`` of the ring's table (or of an indirect table at ``table``)."""
    base = queue.desc_gpa if table is None else table
    addr, length, flags, nxt = _DESC.unpack(queue.ram.read(base + 16 * index, 16))
    return addr, length, flags, nxt


def chain_buffers(queue: DriverQueue, head: int) -> list[tuple[int, int, int]]:
    """Walk a chain the driver built (trusted) and return its ``(addr, len, flags)``."""
    out: list[tuple[int, int, int]] = []
    addr, length, flags, nxt = read_desc(queue, head)
    if flags & VIRTQ_DESC_F_INDIRECT:
        table, i = addr, 0
        while True:
            a, ln, fl, nx = read_desc(queue, i, table)
            out.append((a, ln, fl))
            if not fl & VIRTQ_DESC_F_NEXT:
                return out
            i = nx
    while True:
        out.append((addr, length, flags))
        if not flags & VIRTQ_DESC_F_NEXT:
            return out
        addr, length, flags, nxt = read_desc(queue, nxt)


# -- the rig -----------------------------------------------------------------------------


@dataclass
class Expect:
    tag: int
    reply: bytes


class Rig:
    """A frontend connected to a running server, with guarded guest memory and driver rings."""

    def __init__(
        self,
        frontend: Frontend,
        ram: GuestRam,
        device: RecordingDevice,
        *,
        size: int,
        indirect: Sequence[bool],
    ) -> None:
        self.frontend = frontend
        self.ram = ram
        self.device = device
        self.size = size
        self.indirect = list(indirect)
        n = device.num_queues
        self.queues: list[DriverQueue | None] = [None] * n
        self.vrings: list[DriverVring | None] = [None] * n
        self.expected: list[dict[int, Expect]] = [{} for _ in range(n)]
        self.completed: list[list[int]] = [[] for _ in range(n)]
        self.added: list[list[int]] = [[] for _ in range(n)]
        self.writable: list[tuple[int, int]] = []
        self.driver_wrote: list[tuple[int, int]] = []
        self.next_tag = 1

    # -- setup --

    async def set_mem_table(self) -> None:
        """SET_MEM_TABLE with the region only (the canary zones stay unmapped)."""
        ram = self.ram
        region = MemRegion(
            guest_phys_addr=ram.gpa + GUARD,
            memory_size=REGION,
            userspace_addr=ram.userspace_addr + GUARD,
            mmap_offset=GUARD,
        )
        await self.frontend.request(
            FrontendReq.SET_MEM_TABLE, MemoryTable((region,)), fds=[ram.fd.fd]
        )

    def queue(self, index: int) -> DriverQueue:
        queue = self.queues[index]
        if queue is None:
            event_idx = bool(self.frontend.acked_features & VirtioFeature.RING_EVENT_IDX)
            queue = DriverQueue.create(
                self.ram,
                self.size,
                event_idx=event_idx,
                indirect=self.indirect[index],
                pool_size=1024 * self.size,
            )
            self.queues[index] = queue
        return queue

    def vring(self, index: int) -> DriverVring:
        vring = self.vrings[index]
        assert vring is not None
        return vring

    async def start(self, index: int, *, base: int = 0) -> DriverVring:
        vring = await self.frontend.start_vring(index, self.queue(index), base=base)
        self.vrings[index] = vring
        return vring

    async def start_all(self) -> None:
        for index in range(len(self.queues)):
            await self.start(index)

    # -- data path --

    def add(
        self,
        index: int,
        *,
        body: bytes = b"",
        extra: int = 3,
        split: bool = False,
        publish: bool = True,
        kick: bool = True,
        indirect: bool | None = None,
    ) -> tuple[int, int]:
        """Add one tagged chain; return ``(tag, head)``.

        ``split`` spreads the payload over two readable and two writable buffers.
        ``extra`` makes the writable space bigger than the reply (odd sizes leave
        alignment padding in the pool that the backend must not touch).
        """
        queue = self.queue(index)
        tag = self.next_tag
        self.next_tag += 1
        payload = TAG.pack(tag) + body
        reply = b"R" + payload
        room = len(reply) + extra
        if split:
            cut = len(payload) // 2
            head = queue.add(
                [payload[:cut], payload[cut:]], [room // 2, room - room // 2], indirect=indirect
            )
        else:
            head = queue.add([payload], [room], indirect=indirect)
        self.expected[index][head] = Expect(tag, reply)
        self.added[index].append(tag)
        for addr, length, flags in chain_buffers(queue, head):
            if flags & VIRTQ_DESC_F_WRITE:
                self.writable.append((addr, length))
            else:
                self.driver_wrote.append((addr, length))
        addr, length, flags, _ = read_desc(queue, head)
        if flags & VIRTQ_DESC_F_INDIRECT:
            self.driver_wrote.append((addr, length))
        if publish:
            if kick:
                self.vring(index).notify()
            else:
                queue.publish()
        return tag, head

    def check_used(self, index: int, used: Sequence[tuple[int, int]]) -> list[int]:
        """Check completions against what was added; return their tags."""
        queue = self.queue(index)
        tags = []
        for head, written in used:
            expect = self.expected[index].pop(head, None)
            assert expect is not None, f"ring {index}: head {head} completed but not in flight"
            assert written == len(expect.reply), (head, written, expect)
            assert queue.read_written(head) == expect.reply
            tags.append(expect.tag)
        self.completed[index].extend(tags)
        return tags

    async def wait_done(self, index: int, count: int) -> list[int]:
        """Wait until ``count`` more chains completed on ``index``; return their tags."""
        tags: list[int] = []
        while len(tags) < count:
            tags += self.check_used(index, await self.vring(index).wait_used(count - len(tags)))
        return tags

    def reap(self, index: int) -> list[int]:
        """Consume whatever is in the used ring right now."""
        return self.check_used(index, self.queue(index).get_used())

    def assert_exactly_once(self, index: int) -> None:
        """Every tag added on ``index`` completed exactly once, none twice."""
        counts = Counter(self.completed[index])
        assert not [t for t, c in counts.items() if c > 1], counts
        assert sorted(counts) == sorted(self.added[index]), (counts, self.added[index])
        assert not self.expected[index]

    # -- control --

    async def get_features(self) -> int:
        reply = await self.frontend.request(FrontendReq.GET_FEATURES, need_reply=False)
        assert isinstance(reply, U64)
        return reply.value

    async def get_vring_base(self, index: int) -> int:
        return await self.frontend.get_vring_base(index)

    async def restart(self, index: int, base: int) -> None:
        """SET_VRING_BASE + SET_VRING_KICK (the same kick eventfd as before)."""
        await self.frontend.request(FrontendReq.SET_VRING_BASE, VringState(index, base))
        await self.rekick(index)

    async def rekick(self, index: int) -> None:
        await self.frontend.set_vring_fd(FrontendReq.SET_VRING_KICK, index, self.vring(index).kick)

    async def sleep(self) -> None:
        reply = await self.frontend.request(FrontendReq.SLEEP, need_reply=False)
        assert reply == Success(True)

    async def wake(self) -> None:
        reply = await self.frontend.request(FrontendReq.WAKE, need_reply=False)
        assert reply == Success(True)

    # -- memory checks --

    def snapshot(self) -> np.ndarray:
        return self.ram.view.copy()

    def allowed_mask(self, *, driver: bool = False) -> np.ndarray:
        """Bytes the backend may change (plus the driver's own interrupt words).

        With ``driver`` also what the driver itself writes when it adds chains (descriptor
        tables, avail rings, readable buffers, indirect tables), for windows in which the
        test kept adding.
        """
        mask = np.zeros(self.ram.size, dtype=bool)

        def allow(gpa: int, length: int) -> None:
            off = gpa - self.ram.gpa
            mask[off : off + length] = True

        for queue in self.queues:
            if queue is None:
                continue
            allow(queue.used_gpa, used_ring_size(queue.size))
            allow(queue.avail_gpa, 2)  # avail.flags: the driver's NO_INTERRUPT
            allow(queue.avail_gpa + avail_ring_size(queue.size) - 2, 2)  # used_event
            if driver:
                allow(queue.desc_gpa, 16 * queue.size)
                allow(queue.avail_gpa, avail_ring_size(queue.size))
        for addr, length in self.writable:
            allow(addr, length)
        if driver:
            for addr, length in self.driver_wrote:
                allow(addr, length)
        return mask

    def assert_backend_wrote_only(self, before: np.ndarray, *, driver: bool = False) -> None:
        changed = np.flatnonzero(before != self.ram.view)
        bad = changed[~self.allowed_mask(driver=driver)[changed]]
        assert bad.size == 0, [hex(self.ram.gpa + int(o)) for o in bad[:8]]

    def assert_canaries(self) -> None:
        view = self.ram.view
        assert (view[:GUARD] == CANARY).all(), "front canary zone written"
        assert (view[GUARD + REGION :] == CANARY).all(), "back canary zone written"
        assert self.ram.allocated <= GUARD + REGION
        assert (view[self.ram.allocated : GUARD + REGION] == CANARY).all(), "free RAM written"

    def close(self) -> None:
        for vring in self.vrings:
            if vring is not None:
                vring.close()


# -- stopping and resuming ring 0 (the cancellation sweep and the grace tests) --------------

STOPS = ["vring_base", "sleep", "mem_table"]


async def stop_ring(rig: Rig, how: str) -> int | None:
    """Stop ring 0 the way ``how`` says; return GET_VRING_BASE's index if there is one."""
    if how == "vring_base":
        return await rig.get_vring_base(0)
    if how == "sleep":
        await rig.sleep()
    else:
        await rig.set_mem_table()
    return None


async def resume_ring(rig: Rig, how: str, base: int | None) -> None:
    if how == "vring_base":
        assert base is not None
        await rig.restart(0, base)
    elif how == "sleep":
        await rig.wake()
    # a memory-table change restarts the ring by itself


async def check_stopped_at(rig: Rig, how: str, done: int, base: int | None) -> None:
    """The ring stopped with exactly ``done`` chains completed, the rest untouched.

    After a memory-table change the ring is already running again, so only "the first
    ``done`` chains are complete and nothing completed out of order" can be checked here.
    """
    queue = rig.queue(0)
    rig.reap(0)
    if base is not None:
        assert base == done
    completed = rig.completed[0]
    if how == "mem_table":
        assert len(completed) >= done
        assert completed == rig.added[0][: len(completed)]
        return
    assert queue.used_idx() == done
    assert completed == rig.added[0][:done]
    assert rig.device.seen[0] == rig.added[0][:done]
    # stopped means stopped: a kick now moves nothing
    rig.vring(0).kick.write(1)
    await trio.testing.wait_all_tasks_blocked()
    assert queue.used_idx() == done
    assert rig.device.seen[0] == rig.added[0][:done]


async def finish(rig: Rig, how: str, base: int | None, total: int) -> None:
    """Resume ring 0 and check that all ``total`` chains completed exactly once."""
    await resume_ring(rig, how, base)
    await rig.wait_done(0, len(rig.expected[0]))
    rig.assert_exactly_once(0)
    assert rig.device.seen[0] == rig.added[0]
    assert await rig.get_vring_base(0) == total
    assert rig.queue(0).used_idx() == total


def guarded_ram() -> GuestRam:
    ram = GuestRam.create(GUARD + REGION + GUARD, gpa=RAM_GPA)
    ram.fill(ram.gpa, ram.size, CANARY)
    ram.alloc(GUARD)  # the rings and pools start inside the region
    return ram


@asynccontextmanager
async def open_rig(
    device: RecordingDevice,
    *,
    size: int = 16,
    features: int | None = None,
    indirect: Sequence[bool] = (False, True),
    start: bool = True,
    path: str | None = None,
) -> AsyncIterator[Rig]:
    """Serve ``device`` over a socketpair (or ``path``) and connect a negotiated frontend.

    On exit the frontend disconnects and the server must return by itself; then the canary
    zones must be intact, and every fd and guest mapping the server had must be gone.
    """
    with guarded_ram() as ram:
        maps_before = memfd_mappings(ram)
        fds_before = fd_numbers()
        rig: Rig | None = None
        try:
            async with trio.open_nursery() as nursery:
                if path is None:
                    backend, front = UnixTransport.socketpair()
                    nursery.start_soon(serve_connection, device, backend)
                    frontend = Frontend(front)
                else:
                    from trio_vhost import serve

                    await nursery.start(serve, device, path)
                    frontend = await Frontend.connect(path)
                rig = Rig(frontend, ram, device, size=size, indirect=indirect)
                async with frontend:
                    await frontend.negotiate(features=features)
                    await rig.set_mem_table()
                    if start:
                        await rig.start_all()
                    yield rig
                if path is not None:
                    await trio.testing.wait_all_tasks_blocked()  # the session ends
                    nursery.cancel_scope.cancel()
        finally:
            if rig is not None:
                rig.close()
        assert rig is not None
        rig.assert_canaries()
        leaked = fd_numbers() - fds_before
        assert memfd_mappings(ram) == maps_before, "the server kept a guest mapping"
        assert not leaked, (
            f"the server kept fds: {[os.readlink(f'/proc/self/fd/{fd}') for fd in leaked]}"
        )


def fd_numbers() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def memfd_mappings(ram: GuestRam) -> int:
    """How many lines of /proc/self/maps map ``ram``'s memfd (by inode)."""
    inode = os.fstat(ram.fd.fd).st_ino
    count = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and parts[4] == str(inode) and "memfd:" in line:
                count += 1
    return count


def small_socketpair() -> tuple[UnixTransport, UnixTransport]:
    """A socketpair whose buffers fill after a few replies (to block the server mid-send)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return UnixTransport.from_socket(a), UnixTransport.from_socket(b)
