"""A real vhost-user frontend and virtio driver in Python.

:class:`Frontend` plays QEMU's part on the control socket (feature negotiation, memory
table, vring setup, config reads) using the same sans-IO codec the backend uses, and
:class:`DriverVring` plays the guest's part on a ring: it adds buffers, kicks, and waits for
used entries. Together they drive any vhost-user backend without QEMU: the tests, the
benchmarks and ``trio-vhost selfcheck`` use them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Final, final

import trio

from ._fd import OwnedFd, close_all
from ._io.eventfd import EventFd
from ._io.transport import UnixTransport, open_unix_connection
from .errors import VhostUserError
from .frontend_channel import FrontendChannelEnd
from .mem.guest import GuestRam
from .proto.constants import FrontendReq, ProtocolFeature, VirtioFeature
from .proto.frontend_codec import FrontendCodec
from .proto.messages import (
    U64,
    Body,
    ConfigSpace,
    DeviceStateTransfer,
    Inflight,
    MemoryTable,
    MemRegion,
    SingleMemRegion,
    Snapshot,
    Success,
    VringAddr,
    VringFile,
    VringState,
)
from .proto.messages_ext import SharedMemoryRegions
from .vring.driver import DriverQueue

__all__ = ["DriverVring", "Frontend", "RequestNacked", "VringFailed"]

LOGGER = logging.getLogger(__name__)

#: Protocol features QEMU 7.2 may ack (its mask stops below bit 17).
QEMU_PROTOCOL_MASK: Final = (1 << 17) - 1


class RequestNacked(VhostUserError):
    """The backend answered a NEED_REPLY request with a non-zero ack."""


class VringFailed(VhostUserError):
    """The backend signalled a vring's err eventfd: the ring is broken."""


def _region(ram: GuestRam) -> MemRegion:
    return MemRegion(
        guest_phys_addr=ram.gpa,
        memory_size=ram.size,
        userspace_addr=ram.userspace_addr,
        mmap_offset=0,
    )


@final
class Frontend:
    """The frontend side of one vhost-user connection.

    Resource handling: owns the transport; :meth:`aclose` closes it. Guest memory and
    eventfds passed in stay the caller's (the backend receives duplicates).
    """

    def __init__(self, transport: UnixTransport) -> None:
        self.transport = transport
        self.codec = FrontendCodec()

    @classmethod
    async def connect(cls, path: str) -> Frontend:
        """Connect to a backend listening on ``path``; a checkpoint."""
        return cls(await open_unix_connection(path))

    async def aclose(self) -> None:
        """Close the connection; a checkpoint."""
        await self.transport.aclose()

    async def __aenter__(self) -> Frontend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- one request -----------------------------------------------------------------------

    async def request(
        self,
        code: FrontendReq,
        body: Body | bytes | None = None,
        *,
        fds: Sequence[int] = (),
        need_reply: bool | None = None,
    ) -> Body | None:
        """Send one request and return its reply (None if none is owed); a checkpoint.

        ``need_reply`` defaults to True once REPLY_ACK is negotiated, so every request is
        acknowledged; a non-zero ack raises :class:`RequestNacked`.
        """
        if need_reply is None:
            need_reply = self.codec.reply_ack_enabled
        data = self.codec.request(code, body, need_reply=need_reply)
        await self.transport.send(data, fds)
        if not self.codec.awaiting_reply:
            return None
        header, payload, got = await self.transport.receive_message()
        try:
            reply = self.codec.reply(header, payload, nfds=len(got))
        finally:
            for owned in got:
                owned.close()
        if need_reply and self.codec.reply_ack_enabled and isinstance(reply, U64):
            own_reply = code in _U64_REPLIES
            if not own_reply and reply.value != 0:
                raise RequestNacked(f"{code.name} was NACKed ({reply.value})")
        return reply

    async def _u64(self, code: FrontendReq) -> int:
        reply = await self.request(code, need_reply=False)
        assert isinstance(reply, U64)
        return reply.value

    # -- negotiation -----------------------------------------------------------------------

    async def negotiate(
        self, *, features: int | None = None, protocol_features: int | None = None
    ) -> int:
        """Negotiate like QEMU: features, protocol features, owner; return acked features.

        ``features`` and ``protocol_features`` mask what is acked (default: everything
        offered; protocol bits are masked to those QEMU 7.2 knows).
        """
        offered = await self._u64(FrontendReq.GET_FEATURES)
        if offered & VirtioFeature.PROTOCOL_FEATURES:
            offered_pf = await self._u64(FrontendReq.GET_PROTOCOL_FEATURES)
            want_pf = QEMU_PROTOCOL_MASK if protocol_features is None else protocol_features
            await self.request(
                FrontendReq.SET_PROTOCOL_FEATURES, U64(offered_pf & want_pf), need_reply=False
            )
        await self.request(FrontendReq.SET_OWNER)
        acked = offered if features is None else offered & features
        if offered & VirtioFeature.PROTOCOL_FEATURES:
            acked |= VirtioFeature.PROTOCOL_FEATURES
        await self.request(FrontendReq.SET_FEATURES, U64(acked))
        return acked

    @property
    def acked_features(self) -> int:
        """The virtio features acked with SET_FEATURES."""
        return self.codec.acked_features

    def has_protocol_feature(self, feature: ProtocolFeature) -> bool:
        """Whether ``feature`` was acked with SET_PROTOCOL_FEATURES."""
        return bool(self.codec.acked_protocol_features & feature)

    async def get_queue_num(self) -> int:
        """GET_QUEUE_NUM; a checkpoint."""
        return await self._u64(FrontendReq.GET_QUEUE_NUM)

    # -- memory ----------------------------------------------------------------------------

    async def set_mem_table(self, rams: Sequence[GuestRam]) -> None:
        """Send SET_MEM_TABLE with one region per ``GuestRam``; a checkpoint."""
        table = MemoryTable(tuple(_region(ram) for ram in rams))
        await self.request(FrontendReq.SET_MEM_TABLE, table, fds=[ram.fd.fd for ram in rams])

    async def add_mem_region(self, ram: GuestRam) -> None:
        """ADD_MEM_REG (CONFIGURE_MEM_SLOTS); a checkpoint."""
        await self.request(FrontendReq.ADD_MEM_REG, SingleMemRegion(_region(ram)), fds=[ram.fd.fd])

    async def remove_mem_region(self, ram: GuestRam) -> None:
        """REM_MEM_REG (CONFIGURE_MEM_SLOTS); a checkpoint."""
        await self.request(FrontendReq.REM_MEM_REG, SingleMemRegion(_region(ram)))

    # -- config ----------------------------------------------------------------------------

    async def get_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG; a checkpoint. Raises :class:`RequestNacked` on a zero-size reply."""
        reply = await self.request(
            FrontendReq.GET_CONFIG, ConfigSpace(offset, size, 0, bytes(size)), need_reply=False
        )
        assert isinstance(reply, ConfigSpace)
        if reply.size != size:
            raise RequestNacked("GET_CONFIG failed (zero-size reply)")
        return reply.payload

    async def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        """SET_CONFIG; a checkpoint."""
        await self.request(FrontendReq.SET_CONFIG, ConfigSpace(offset, len(data), flags, data))

    # -- vrings ----------------------------------------------------------------------------

    async def set_vring_fd(self, code: FrontendReq, index: int, efd: EventFd | None) -> None:
        """SET_VRING_KICK/CALL/ERR with ``efd`` (None sends the NOFD bit); a checkpoint."""
        fds = [] if efd is None else [efd.fd]
        await self.request(code, VringFile(index, efd is None), fds=fds)

    async def start_vring(
        self, index: int, queue: DriverQueue, *, base: int = 0, enable: bool = True
    ) -> DriverVring:
        """Set up and start vring ``index`` over ``queue`` like QEMU does; a checkpoint.

        Sends CALL, ERR, NUM, BASE, ADDR, KICK and (when protocol features were acked)
        SET_VRING_ENABLE. The returned :class:`DriverVring` owns the three eventfds.
        """
        if queue.event_idx != bool(self.acked_features & VirtioFeature.RING_EVENT_IDX):
            # A mismatch makes both sides read the wrong suppression fields: a silent hang.
            raise ValueError("the DriverQueue's event_idx must match the negotiated EVENT_IDX")
        vring = DriverVring(self, index, queue)
        try:
            await self.set_vring_fd(FrontendReq.SET_VRING_CALL, index, vring.call)
            await self.set_vring_fd(FrontendReq.SET_VRING_ERR, index, vring.err)
            await self.request(FrontendReq.SET_VRING_NUM, VringState(index, queue.size))
            await self.request(FrontendReq.SET_VRING_BASE, VringState(index, base))
            addr = VringAddr(index, 0, queue.desc_uva, queue.used_uva, queue.avail_uva, 0)
            await self.request(FrontendReq.SET_VRING_ADDR, addr)
            await self.set_vring_fd(FrontendReq.SET_VRING_KICK, index, vring.kick)
            if enable and self.acked_features & VirtioFeature.PROTOCOL_FEATURES:
                await self.set_vring_enable(index, True)
        except BaseException:
            vring.close()
            raise
        return vring

    async def set_vring_enable(self, index: int, enable: bool) -> None:
        """SET_VRING_ENABLE; a checkpoint."""
        await self.request(FrontendReq.SET_VRING_ENABLE, VringState(index, int(enable)))

    async def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stop the ring and return its next avail index; a checkpoint."""
        reply = await self.request(
            FrontendReq.GET_VRING_BASE, VringState(index, 0), need_reply=False
        )
        assert isinstance(reply, VringState)
        return reply.num

    async def get_shared_memory_regions(self) -> tuple[tuple[int, int], ...]:
        """crosvm's GET_SHARED_MEMORY_REGIONS: ``(shmid, length)`` pairs; a checkpoint."""
        reply = await self.request(FrontendReq.GET_SHARED_MEMORY_REGIONS, need_reply=False)
        if not isinstance(reply, SharedMemoryRegions):  # pragma: no cover - codec checks it
            raise VhostUserError(f"GET_SHARED_MEMORY_REGIONS answered with {reply!r}")
        return reply.regions

    # -- the back-end channel (BACKEND_REQ) -------------------------------------------------

    async def open_backend_channel(self) -> FrontendChannelEnd:
        """SET_BACKEND_REQ_FD: give the backend a channel for its own requests; a checkpoint.

        Returns the frontend's end: run its ``serve(handler)`` in a task to answer them.
        """
        ours, theirs = UnixTransport.socketpair()
        try:
            await self.request(FrontendReq.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return FrontendChannelEnd(ours, self.codec)

    # -- in-flight tracking (INFLIGHT_SHMFD) ----------------------------------------------

    async def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[Inflight, OwnedFd]:
        """GET_INFLIGHT_FD: return the backend's region description and its fd; a checkpoint.

        The caller owns the returned fd (hand it back with :meth:`set_inflight_fd`).

        Raises:
            RequestNacked: the backend could not give a region (it answered size 0 and no
                fd, as it may; QEMU then goes on without in-flight tracking).
        """
        request = Inflight(0, 0, num_queues, queue_size)
        data = self.codec.request(FrontendReq.GET_INFLIGHT_FD, request, need_reply=False)
        await self.transport.send(data)
        header, payload, got = await self.transport.receive_message()
        try:
            reply = self.codec.reply(header, payload, nfds=len(got))
            if not isinstance(reply, Inflight):  # pragma: no cover - the codec checks kinds
                raise VhostUserError(f"GET_INFLIGHT_FD answered with {reply!r}")
        except BaseException:
            close_all(got)
            raise
        if reply.mmap_size == 0:
            raise RequestNacked("GET_INFLIGHT_FD: the backend gave no in-flight region")
        return reply, got[0]

    async def set_inflight_fd(self, inflight: Inflight, fd: int) -> None:
        """SET_INFLIGHT_FD: hand the in-flight region ``fd`` to the backend; a checkpoint."""
        await self.request(FrontendReq.SET_INFLIGHT_FD, inflight, fds=[fd])

    # -- lifecycle: status, reset, crosvm's SLEEP/WAKE/SNAPSHOT/RESTORE, DEVICE_STATE --------

    async def set_status(self, status: int) -> None:
        """SET_STATUS (STATUS); a checkpoint."""
        await self.request(FrontendReq.SET_STATUS, U64(status))

    async def get_status(self) -> int:
        """GET_STATUS (STATUS); a checkpoint."""
        return await self._u64(FrontendReq.GET_STATUS)

    async def reset_device(self) -> None:
        """RESET_DEVICE (RESET_DEVICE); a checkpoint."""
        await self.request(FrontendReq.RESET_DEVICE)

    async def _succeed(
        self, code: FrontendReq, body: bytes | None = None, fds: Sequence[int] = ()
    ) -> Body:
        reply = await self.request(code, body, fds=fds, need_reply=False)
        if not isinstance(reply, Success | Snapshot) or not reply.ok:
            raise RequestNacked(f"{code.name} failed")
        return reply

    async def sleep(self) -> None:
        """crosvm SLEEP: stop every ring at a chain boundary; a checkpoint.

        Raises :class:`RequestNacked` if the backend reports failure.
        """
        await self._succeed(FrontendReq.SLEEP)

    async def wake(self) -> None:
        """crosvm WAKE: restart the rings where they stopped; a checkpoint."""
        await self._succeed(FrontendReq.WAKE)

    async def snapshot(self) -> bytes:
        """crosvm SNAPSHOT of a sleeping backend: return its snapshot bytes; a checkpoint."""
        reply = await self._succeed(FrontendReq.SNAPSHOT)
        assert isinstance(reply, Snapshot)
        return reply.data

    async def restore(self, data: bytes, kicks: Sequence[EventFd | int] = ()) -> None:
        """crosvm RESTORE: ``kicks[i]`` is ring ``i``'s kick eventfd; a checkpoint.

        The memory table must be set first; the backend stays asleep until :meth:`wake`.
        """
        fds = [kick if isinstance(kick, int) else kick.fd for kick in kicks]
        await self._succeed(FrontendReq.RESTORE, data, fds)

    async def set_device_state_fd(self, direction: int, fd: int) -> None:
        """SET_DEVICE_STATE_FD (DEVICE_STATE) with ``fd`` as the backend's end; a checkpoint.

        ``direction`` is :attr:`DeviceStateTransfer.SAVE` or ``LOAD``. Raises
        :class:`RequestNacked` for an error code, and :class:`VhostUserError` if the
        backend answers with a channel of its own (this frontend does not take one).
        """
        reply = await self.request(
            FrontendReq.SET_DEVICE_STATE_FD,
            DeviceStateTransfer(direction, DeviceStateTransfer.STOPPED),
            fds=[fd],
            need_reply=False,
        )
        assert isinstance(reply, U64)
        if reply.value & 0xFF:
            raise RequestNacked(f"SET_DEVICE_STATE_FD failed ({reply.value & 0xFF})")
        if not reply.value & 0x100:
            raise VhostUserError("the backend offered its own state channel")

    async def check_device_state(self) -> int:
        """CHECK_DEVICE_STATE: 0 if the last transfer succeeded; a checkpoint."""
        return await self._u64(FrontendReq.CHECK_DEVICE_STATE)

    async def _open_transfer(self, direction: int) -> int:
        """Send the backend its end of a new pipe for ``direction``; return ours.

        SAVE hands the backend the write end, LOAD the read end; the end we keep is
        closed again if the request fails.
        """
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        theirs, ours = (
            (write_end, read_end)
            if direction == DeviceStateTransfer.SAVE
            else (
                read_end,
                write_end,
            )
        )
        try:
            await self.set_device_state_fd(direction, theirs)
        except BaseException:
            os.close(ours)
            raise
        finally:
            os.close(theirs)
        return ours

    async def save_device_state(self) -> bytes:
        """Read the backend's state through a pipe (save), then check it; a checkpoint.

        Raises :class:`RequestNacked` if the backend refuses or reports a failed transfer.
        """
        read_end = await self._open_transfer(DeviceStateTransfer.SAVE)
        chunks = []
        async with trio.lowlevel.FdStream(read_end) as stream:
            while chunk := await stream.receive_some(65536):
                chunks.append(chunk)
        if await self.check_device_state():
            raise RequestNacked("CHECK_DEVICE_STATE reports a failed save")
        return b"".join(chunks)

    async def load_device_state(self, data: bytes) -> None:
        """Write ``data`` to the backend through a pipe (load), then check; a checkpoint.

        Raises :class:`RequestNacked` if the backend refuses or reports a failed load.
        """
        write_end = await self._open_transfer(DeviceStateTransfer.LOAD)
        async with trio.lowlevel.FdStream(write_end) as stream:
            try:
                await stream.send_all(data)
            except trio.BrokenResourceError:
                pass  # the backend gave up reading; CHECK_DEVICE_STATE says why
        if await self.check_device_state():
            raise RequestNacked("CHECK_DEVICE_STATE reports a failed load")


_U64_REPLIES: Final = frozenset(
    {
        FrontendReq.SET_DEVICE_STATE_FD,
        FrontendReq.GET_FEATURES,
        FrontendReq.GET_PROTOCOL_FEATURES,
        FrontendReq.GET_QUEUE_NUM,
        FrontendReq.GET_MAX_MEM_SLOTS,
        FrontendReq.GET_STATUS,
        FrontendReq.CHECK_DEVICE_STATE,
        FrontendReq.POSTCOPY_END,
        FrontendReq.SET_LOG_BASE,
    }
)


@final
class DriverVring:
    """The guest's view of one started vring: a :class:`DriverQueue` plus its eventfds.

    Resource handling: owns the kick, call and err eventfds; :meth:`close` closes them.
    """

    def __init__(self, frontend: Frontend, index: int, queue: DriverQueue) -> None:
        self.frontend = frontend
        self.index = index
        self.queue = queue
        self.kick = EventFd.create()
        self.call = EventFd.create()
        self.err = EventFd.create()
        self.kicks = 0

    def close(self) -> None:
        """Close the eventfds."""
        for efd in (self.kick, self.call, self.err):
            efd.close()

    def submit(self, readable: Sequence[bytes | int], writable: Sequence[int] = ()) -> int:
        """Add one chain, publish it and kick if the device asks for kicks; return its head."""
        head = self.queue.add(readable, writable)
        self.notify()
        return head

    def notify(self) -> None:
        """Publish what was added and kick the device if it wants to be told."""
        self.queue.publish()
        if self.queue.kick_needed():
            self.kick.write(1)
            self.kicks += 1

    async def wait_used(self, count: int = 1) -> list[tuple[int, int]]:
        """Wait until at least ``count`` chains are used and return them; a checkpoint.

        Follows the driver's side of notification suppression: re-enable interrupts, look
        again, and only then sleep on the call eventfd, so no completion is missed.
        """
        done: list[tuple[int, int]] = []
        await trio.lowlevel.checkpoint()
        while True:
            done.extend(self.queue.get_used())
            if len(done) >= count:
                return done
            if self.queue.enable_interrupts():
                continue
            await self._wait_call_or_err()

    async def _wait_call_or_err(self) -> None:
        if self.err.read_nowait():
            raise VringFailed(f"backend signalled an error on vring {self.index}")
        async with trio.open_nursery() as nursery:

            async def watch_err() -> None:
                await trio.lowlevel.wait_readable(self.err.fd)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_err)
            await self.call.wait()
            nursery.cancel_scope.cancel()
        if self.err.read_nowait():
            raise VringFailed(f"backend signalled an error on vring {self.index}")
