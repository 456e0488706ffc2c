"""RawFrontend: a frontend that sends exactly the bytes and fds it is told to.

:class:`trio_vhost.frontend.Frontend` speaks the protocol correctly and refuses to encode
anything else; the protocol tests also need frames no codec would produce (wrong sizes,
reply bits, 20 fds, half a header). :class:`RawFrontend` drives a plain non-blocking
AF_UNIX socket with ``sendmsg``/``recvmsg`` so any byte string and any fd set can be sent,
and reads replies back as raw ``(code, flags, body)`` triples that the tests check
field by field.

Also here, shared by the ``test_server_*`` files: the trio-clock ``fail_after`` decorator
every test wears; the resource counters behind the leak checks (``/proc/self/fd`` and
the memfd lines of ``/proc/self/maps``); :func:`serving`, which runs the real
:func:`trio_vhost.serve` for the length of an ``async with`` block; a well-behaved
prefix sent raw (:func:`negotiate`, :func:`set_mem_table`, :class:`RawRing`); and
:class:`GatedBlk`, a blk device whose batches the test can hold inside the device.
"""

from __future__ import annotations

import array
import functools
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final, ParamSpec

import trio
import trio.testing

from trio_vhost._io.eventfd import EventFd
from trio_vhost.device import Completion, Device, QueueContext
from trio_vhost.devices.blk import BlkDevice
from trio_vhost.devices.blk_driver import BlkDriver
from trio_vhost.frontend import Frontend
from trio_vhost.mem.guest import GuestRam
from trio_vhost.proto.constants import FrontendReq, VirtioFeature
from trio_vhost.proto.frontend_codec import encode_request
from trio_vhost.proto.messages import (
    U64,
    Body,
    MemoryTable,
    MemRegion,
    VringAddr,
    VringFile,
    VringState,
)
from trio_vhost.server import serve
from trio_vhost.vring.chain import DescriptorChain
from trio_vhost.vring.driver import DriverQueue

#: Every reply's flags: VERSION | REPLY.
REPLY_FLAGS: Final = 0x5
#: The default hard limit of a test, on the trio clock.
TIMEOUT: Final = 10.0

_HEADER: Final = struct.Struct("=III")
_GONE: Final = "(closed)"
_U64: Final = struct.Struct("=Q")
_ANC_SIZE: Final = socket.CMSG_SPACE(32 * array.array("i").itemsize)

P = ParamSpec("P")


def fail_after(
    seconds: float = TIMEOUT,
) -> Callable[[Callable[P, Awaitable[None]]], Callable[P, Coroutine[object, object, None]]]:
    """Fail a trio test that runs longer than ``seconds`` on the trio clock."""

    def decorate(fn: Callable[P, Awaitable[None]]) -> Callable[P, Coroutine[object, object, None]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
            with trio.fail_after(seconds):
                await fn(*args, **kwargs)

        return wrapper

    return decorate


# -- resource accounting ------------------------------------------------------------------


def open_fds() -> set[str]:
    """The fd numbers open in this process.

    The directory fd ``listdir`` itself used is listed too, under whatever number was
    free; it is closed by the time we look, which is how it is left out.
    """
    return {fd for fd in os.listdir("/proc/self/fd") if fd_target(fd) != _GONE}


def fd_target(fd: str) -> str:
    """What fd number ``fd`` of this process refers to (for messages)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return _GONE


def memfd_maps() -> list[str]:
    """The lines of ``/proc/self/maps`` that map a memfd (guest memory, both sides)."""
    with open("/proc/self/maps") as maps:
        return [line for line in maps if "memfd:" in line]


def maps_of(fd: int) -> list[str]:
    """The ``/proc/self/maps`` lines that map the file behind ``fd`` (matched by inode)."""
    st = os.fstat(fd)
    inode = str(st.st_ino)
    out = []
    for line in memfd_maps():
        fields = line.split()
        if len(fields) >= 5 and fields[4] == inode:
            out.append(line)
    return out


@dataclass
class Resources:
    """A snapshot of open fds and memfd mappings, to compare against later."""

    fds: set[str]
    maps: list[str]
    targets: dict[str, str]

    @classmethod
    def snapshot(cls) -> Resources:
        """Take a snapshot now."""
        fds = open_fds()
        return cls(fds, memfd_maps(), {fd: fd_target(fd) for fd in fds})

    def assert_unchanged(self) -> None:
        """Fail if an fd or a memfd mapping appeared (or vanished) since the snapshot."""
        now = Resources.snapshot()
        opened = [(fd, now.targets[fd]) for fd in sorted(now.fds - self.fds)]
        closed = [(fd, self.targets[fd]) for fd in sorted(self.fds - now.fds)]
        assert now.fds == self.fds, f"fds opened: {opened}; fds closed: {closed}"
        assert sorted(now.maps) == sorted(self.maps), "memfd mappings changed:\n" + "".join(
            sorted(set(now.maps) ^ set(self.maps))
        )


# -- the server ---------------------------------------------------------------------------


@asynccontextmanager
async def serving(device: Device, path: str) -> AsyncIterator[str]:
    """Run :func:`trio_vhost.serve` on ``path`` for the block; cancel it on exit."""
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, device, path)
        yield path
        nursery.cancel_scope.cancel()


async def settle() -> None:
    """Let the server finish whatever the last message or disconnect started."""
    await trio.testing.wait_all_tasks_blocked()


# -- frames -------------------------------------------------------------------------------


def header(code: int, size: int, flags: int = 0x1) -> bytes:
    """A raw 12-byte header."""
    return _HEADER.pack(code, flags, size)


def frame(
    code: FrontendReq, body: Body | bytes | None = None, *, need_reply: bool = False
) -> bytes:
    """A valid request frame, encoded by the library's own frontend codec."""
    return encode_request(code, body, need_reply=need_reply)


def u64(value: int) -> bytes:
    """A native-order u64 body."""
    return _U64.pack(value)


class PeerClosed(Exception):
    """The backend closed (or reset) the connection."""


@dataclass(frozen=True)
class Reply:
    """One message received from the backend."""

    code: int
    flags: int
    body: bytes
    nfds: int

    @property
    def u64(self) -> int:
        """The body as a u64 (an ack or a u64 reply)."""
        assert len(self.body) == 8, self
        return int(_U64.unpack(self.body)[0])


class RawFrontend:
    """The frontend end of a connection, sending raw frames.

    Resource handling: owns the socket; :meth:`close` closes it. Fds passed to
    :meth:`send` stay the caller's (the kernel duplicates them); fds that arrive with a
    reply are closed at once and only counted.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        #: How many fds arrived with replies (each closed at once).
        self.received_fds = 0

    @classmethod
    async def connect(cls, path: str) -> RawFrontend:
        """Connect to a backend listening on ``path``; a checkpoint."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            await trio.lowlevel.checkpoint()
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def close(self) -> None:
        """Close the socket (an abrupt disconnect if nothing else was done)."""
        self.sock.close()

    def shutdown_write(self) -> None:
        """Half-close: the backend sees EOF after what was sent."""
        self.sock.shutdown(socket.SHUT_WR)

    async def __aenter__(self) -> RawFrontend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # -- sending --------------------------------------------------------------------------

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> bool:
        """Send ``data`` with ``fds`` on its first byte; a checkpoint.

        Returns False if the backend is gone (EPIPE/ECONNRESET) before all was sent.
        """
        await trio.lowlevel.checkpoint()
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.sendmsg([view], anc, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                continue
            except (BrokenPipeError, ConnectionResetError):
                return False
            anc = []
            view = view[sent:]
        return True

    async def request(
        self,
        code: FrontendReq,
        body: Body | bytes | None = None,
        *,
        need_reply: bool = False,
        fds: Sequence[int] = (),
    ) -> None:
        """Send a valid request; a checkpoint."""
        assert await self.send(frame(code, body, need_reply=need_reply), fds)

    # -- receiving ------------------------------------------------------------------------

    async def _recv(self, n: int) -> bytes:
        while True:
            try:
                data, anc, _flags, _ = self.sock.recvmsg(n, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            except ConnectionResetError:
                return b""
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
                    for fd in fds:
                        os.close(fd)
                    self.received_fds += len(fds)
            return data

    async def _recv_exactly(self, n: int, what: str) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = await self._recv(n - len(buf))
            if not chunk:
                if not buf and what == "header":
                    raise PeerClosed
                raise AssertionError(f"backend closed inside a reply {what}")
            buf += chunk
        return buf

    async def receive(self) -> Reply:
        """Receive one whole message; a checkpoint. Raises PeerClosed on EOF or reset."""
        await trio.lowlevel.checkpoint()
        before = self.received_fds
        code, flags, size = _HEADER.unpack(await self._recv_exactly(12, "header"))
        body = await self._recv_exactly(size, "body") if size else b""
        return Reply(code, flags, body, self.received_fds - before)

    async def expect_reply(self, code: FrontendReq, size: int | None = None) -> Reply:
        """Receive the reply to ``code`` and check flags 0x5, the echoed code and size."""
        reply = await self.receive()
        assert reply.code == code, f"reply to {reply.code}, expected {code.name} ({code})"
        assert reply.flags == REPLY_FLAGS, f"{code.name} reply flags {reply.flags:#x}"
        assert reply.nfds == 0, f"{code.name} reply carried {reply.nfds} fds"
        if size is not None:
            assert len(reply.body) == size, f"{code.name} reply of {len(reply.body)} bytes"
        return reply

    async def expect_u64(self, code: FrontendReq) -> int:
        """Receive a u64 reply (or REPLY_ACK) to ``code`` and return its value."""
        return (await self.expect_reply(code, 8)).u64

    async def expect_closed(self) -> None:
        """Receive until the backend closes; fail if anything else arrives first."""
        try:
            reply = await self.receive()
        except PeerClosed:
            return
        raise AssertionError(f"expected the backend to close, got {reply}")

    def has_input(self) -> bool:
        """Whether a byte (or EOF) is waiting; not a checkpoint. Use after :func:`settle`."""
        try:
            self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # a byte, or b"" at EOF
        except BlockingIOError:
            return False
        except ConnectionResetError:
            pass
        return True

    async def expect_nothing(self) -> None:
        """Let the backend settle, then fail if it sent anything (or closed)."""
        await settle()
        assert not self.has_input(), "the backend sent something unexpected"


# -- a well-behaved prefix, sent raw ------------------------------------------------------


async def negotiate(fe: RawFrontend, *, protocol: int, features: int = ~0) -> int:
    """GET/SET features and protocol features like QEMU, acking ``protocol`` of the offer.

    Returns the acked protocol features. Nothing is sent with NEED_REPLY.
    """
    await fe.request(FrontendReq.GET_FEATURES)
    offered = await fe.expect_u64(FrontendReq.GET_FEATURES)
    await fe.request(FrontendReq.GET_PROTOCOL_FEATURES)
    acked_pf = await fe.expect_u64(FrontendReq.GET_PROTOCOL_FEATURES) & protocol
    await fe.request(FrontendReq.SET_PROTOCOL_FEATURES, U64(acked_pf))
    await fe.request(FrontendReq.SET_OWNER)
    await fe.request(FrontendReq.SET_FEATURES, U64(offered & features))
    return acked_pf


def mem_region(ram: GuestRam) -> MemRegion:
    """The region describing all of ``ram``."""
    return MemRegion(ram.gpa, ram.size, ram.userspace_addr, 0)


async def set_mem_table(fe: RawFrontend, rams: Sequence[GuestRam], *, acked: bool) -> None:
    """SET_MEM_TABLE with NEED_REPLY; checks the ack of 0 when REPLY_ACK is ``acked``."""
    table = MemoryTable(tuple(mem_region(ram) for ram in rams))
    await fe.request(
        FrontendReq.SET_MEM_TABLE, table, need_reply=True, fds=[ram.fd.fd for ram in rams]
    )
    if acked:
        assert await fe.expect_u64(FrontendReq.SET_MEM_TABLE) == 0


@dataclass
class RawRing:
    """A driver ring and its three eventfds, for a :class:`RawFrontend` to start."""

    index: int
    queue: DriverQueue
    kick: EventFd
    call: EventFd
    err: EventFd

    @classmethod
    def create(cls, ram: GuestRam, index: int, size: int = 64) -> RawRing:
        queue = DriverQueue.create(ram, size, pool_size=64 << 10)
        return cls(index, queue, EventFd.create(), EventFd.create(), EventFd.create())

    def close(self) -> None:
        """Close the eventfds and drop the ring's views of guest memory."""
        for efd in (self.kick, self.call, self.err):
            efd.close()
        self.queue = None  # type: ignore[assignment]

    async def start(self, fe: RawFrontend) -> None:
        """CALL, ERR, NUM, BASE, ADDR, KICK, ENABLE; nothing with NEED_REPLY."""
        i, q = self.index, self.queue
        await fe.request(FrontendReq.SET_VRING_CALL, VringFile(i, False), fds=[self.call.fd])
        await fe.request(FrontendReq.SET_VRING_ERR, VringFile(i, False), fds=[self.err.fd])
        await fe.request(FrontendReq.SET_VRING_NUM, VringState(i, q.size))
        await fe.request(FrontendReq.SET_VRING_BASE, VringState(i, 0))
        addr = VringAddr(i, 0, q.desc_uva, q.used_uva, q.avail_uva, 0)
        await fe.request(FrontendReq.SET_VRING_ADDR, addr)
        await fe.request(FrontendReq.SET_VRING_KICK, VringFile(i, False), fds=[self.kick.fd])
        await fe.request(FrontendReq.SET_VRING_ENABLE, VringState(i, 1))

    def post(self, readable: Sequence[bytes | int], writable: Sequence[int] = ()) -> int:
        """Add and publish one chain, and kick; return its head."""
        head = self.queue.add(readable, writable)
        self.queue.publish()
        self.kick.write(1)
        return head

    async def wait_used(self, count: int) -> list[tuple[int, int]]:
        """Wait on the call eventfd until ``count`` chains are used (no EVENT_IDX)."""
        done: list[tuple[int, int]] = []
        while True:
            done.extend(self.queue.get_used())
            if len(done) >= count:
                return done
            await self.call.wait()


# -- a blk device the test can hold mid-batch ---------------------------------------------


class GatedBlk(BlkDevice):
    """blk whose batches wait at a gate the test opens (None: no gate)."""

    is_async = True

    def __init__(self, image_fd: int) -> None:
        super().__init__(image_fd, num_queues=2, serial="protocol-test")
        self.gate: trio.Event | None = None
        self.holding = trio.Event()
        self.batches: list[tuple[int, int]] = []  # (vring, chains)
        self.inside: set[int] = set()  # vrings with a batch in the device now

    def close_gate(self) -> None:
        self.gate = trio.Event()
        self.holding = trio.Event()

    def open_gate(self) -> None:
        gate, self.gate = self.gate, None
        assert gate is not None
        gate.set()

    async def process_batch_async(
        self, queue: QueueContext, chains: Sequence[DescriptorChain]
    ) -> Sequence[Completion]:
        self.batches.append((queue.index, len(chains)))
        gate = self.gate
        if gate is not None:
            self.inside.add(queue.index)
            self.holding.set()
            await gate.wait()
            self.inside.discard(queue.index)
        return self.process_batch(queue, chains)


def sector_data(sector: int) -> bytes:
    return bytes([sector & 0xFF]) * 512


# -- a frontend doing blk I/O ----------------------------------------------------------------

PATTERN: Final = bytes(range(256)) * 16  # 4 KiB


async def exercise_blk(frontend: Frontend, ram: GuestRam, image_fd: int, sector: int) -> None:
    """Negotiate, share memory, start ring 0 and do every kind of blk request; the image
    and the ring index are checked along the way (serial "protocol-test" expected)."""
    acked = await frontend.negotiate()
    await frontend.set_mem_table([ram])
    event_idx = bool(acked & VirtioFeature.RING_EVENT_IDX)
    queue = DriverQueue.create(ram, 64, event_idx=event_idx, indirect=True, pool_size=1 << 18)
    vring = await frontend.start_vring(0, queue)
    try:
        blk = BlkDriver(vring)
        await blk.write(sector, PATTERN)
        assert os.pread(image_fd, len(PATTERN), sector * 512) == PATTERN
        assert await blk.read(sector, len(PATTERN)) == PATTERN
        await blk.flush()
        assert await blk.get_id() == b"protocol-test"
        await blk.write_zeroes(sector, 1)
        assert await blk.read(sector, 512) == bytes(512)
        assert await frontend.get_vring_base(0) == queue.avail_idx
    finally:
        vring.close()
