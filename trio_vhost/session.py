"""Session: the control task of one frontend connection and the state it alone mutates.

The control task reads one message at a time, has :class:`BackendProtocol` validate it,
applies it through the handler table below, and sends the reply. It owns the memory table,
the vring slots and the workers (started in the connection's nursery, one per started
vring). Handlers are looked up in :data:`_HANDLERS`, never chosen by if-chains.

Error policy (README, "Errors"):

* a bad frame, size or fd set (:class:`RemoteProtocolError`) ends the connection: every fd
  is closed and every worker stopped by the nursery's teardown;
* a request the device does not support (:class:`UnsupportedRequest`) or that fails
  (:class:`DeviceError`, :class:`GuestMemoryError`) is NACKed when REPLY_ACK is negotiated
  and logged otherwise;
* a ring whose guest data is corrupt stops alone and signals its err eventfd (worker.py).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final

import trio

from ._fd import OwnedFd, close_all
from ._io.eventfd import EventFd
from .errors import (
    DeviceError,
    GuestMemoryError,
    RemoteProtocolError,
    UnsupportedRequest,
    VirtqueueError,
)
from .mem.region import MemoryRegion
from .mem.table import MAX_MEM_SLOTS, MemoryTable
from .proto.connection import BackendProtocol, Request
from .proto.constants import FrontendReq, VirtioFeature
from .proto.messages import (
    U64,
    ConfigSpace,
    MemRegion,
    SingleMemRegion,
    VringAddr,
    VringFile,
    VringState,
)
from .proto.messages import (
    MemoryTable as MemoryTableMsg,
)
from .proto.messages_ext import Success
from .slot import RingWorkerHandle, VringSlot
from .vring.split import SplitQueue
from .vring.state import QueueState
from .worker import run_vring

if TYPE_CHECKING:
    from ._io.transport import UnixTransport
    from .device import Device
    from .proto.messages import Body

__all__ = ["STOP_GRACE", "Session"]

LOGGER = logging.getLogger(__name__)

#: How long a soft stop waits for in-flight chains before cancelling the worker.
STOP_GRACE: Final = 5.0
#: The largest queue size a split ring can have.
MAX_QUEUE_SIZE: Final = 32768

_Handler = Callable[["Session", Request], Awaitable["Body | bytes | None"]]


class Session:
    """The backend side of one frontend connection.

    Resource handling: every fd received is owned by the request until a handler claims
    it; what is not claimed is closed after the handler returns. :meth:`aclose` stops the
    workers and closes every eventfd and mapping the session holds.
    """

    def __init__(self, device: Device, transport: UnixTransport) -> None:
        self.device = device
        self.transport = transport
        self.protocol = BackendProtocol(
            features=device.offered_features(),
            protocol_features=device.offered_protocol_features(),
        )
        self.memory = MemoryTable.empty()
        #: How many ADD_MEM_REG owners each region has (see _add_mem_reg).
        self.region_refs: dict[tuple[int, int, int, int], int] = {}
        self.slots = [VringSlot(index) for index in range(device.num_queues)]
        self.status = 0
        self.backend_channel: OwnedFd | None = None
        #: SLEEP was received: no worker may start until WAKE.
        self.sleeping = False
        self._nursery: trio.Nursery | None = None

    # -- the control loop --------------------------------------------------------------

    async def run(self, nursery: trio.Nursery) -> None:
        """Serve requests until the frontend disconnects; a checkpoint.

        Returns normally when the frontend closes the connection between messages.
        Raises :class:`RemoteProtocolError` or
        :class:`~trio_vhost.errors.Disconnect` when the connection must be dropped.
        """
        self._nursery = nursery
        while True:
            request = await self._receive()
            if request is None:
                return
            try:
                await self._dispatch(request)
            finally:
                close_all(request.fds)

    async def _receive(self) -> Request | None:
        from .errors import ClientExit

        try:
            data, fds = await self.transport.receive_header()
        except ClientExit:
            LOGGER.info("frontend closed the connection")
            return None
        try:
            header = self.protocol.receive_header(data, len(fds))
            body = (
                await self.transport.receive_exactly(header.size)
                if header.size
                else b""
            )
            request = self.protocol.receive(header, body, tuple(fds))
        except BaseException:
            close_all(fds)
            raise
        index = getattr(request.body, "index", None)
        if index is None:
            LOGGER.debug("request %s", request.code.name)
        else:
            LOGGER.debug("request %s vring=%s", request.code.name, index)
        return request

    async def _dispatch(self, request: Request) -> None:
        handler = _HANDLERS.get(request.code, Session._unsupported)
        ok = True
        reply: Body | bytes | None
        try:
            reply = await handler(self, request)
        except (
            UnsupportedRequest,
            DeviceError,
            GuestMemoryError,
            VirtqueueError,
        ) as exc:
            ok = False
            reply = _failure_reply(request)
            LOGGER.warning("%s failed: %s", request.code.name, exc)
            if reply is None and not self._acks(request):
                # Without REPLY_ACK the frontend cannot be told; the spec leaves it at that.
                return
        if reply is not None:
            await self.transport.send(self.protocol.reply(request, reply))
            return
        ack = self.protocol.ack(request, ok)
        if ack is not None:
            await self.transport.send(ack)

    def _acks(self, request: Request) -> bool:
        return self.protocol.reply_ack_enabled and request.need_reply

    # -- negotiation -------------------------------------------------------------------

    async def _get_features(self, request: Request) -> Body:
        return U64(self.protocol.offered_features)

    async def _set_features(self, request: Request) -> None:
        # BackendProtocol has checked the bits against the offer and recorded them.
        self.device.ack_features(self.protocol.acked_features)
        if not self.protocol.acked_features & VirtioFeature.PROTOCOL_FEATURES:
            # Spec, "Ring states": without VHOST_USER_F_PROTOCOL_FEATURES the ring is
            # enabled as soon as it is started.
            for slot in self.slots:
                slot.enabled = True
                if slot.worker is not None:
                    slot.worker.nudge()

    async def _get_protocol_features(self, request: Request) -> Body:
        return U64(self.protocol.offered_protocol_features)

    async def _noop(self, request: Request) -> None:
        return None

    async def _get_queue_num(self, request: Request) -> Body:
        return U64(self.device.queue_num())

    async def _get_max_mem_slots(self, request: Request) -> Body:
        return U64(MAX_MEM_SLOTS)

    async def _set_status(self, request: Request) -> None:
        self.status = request.expect(U64).value & 0xFF

    async def _get_status(self, request: Request) -> Body:
        return U64(self.status)

    async def _reset(self, request: Request) -> None:
        await self.stop_all_rings(hard=False)
        for slot in self.slots:
            slot.close_fds()
        self.slots = [VringSlot(index) for index in range(self.device.num_queues)]
        self.status = 0
        self.device.reset()

    # -- config space ------------------------------------------------------------------

    async def _get_config(self, request: Request) -> Body:
        msg = request.expect(ConfigSpace)
        data = self.device.read_config(msg.offset, msg.size)
        if len(data) != msg.size:
            raise DeviceError(
                f"device returned {len(data)} config bytes, {msg.size} asked"
            )
        return ConfigSpace(msg.offset, msg.size, msg.flags, data)

    async def _set_config(self, request: Request) -> None:
        msg = request.expect(ConfigSpace)
        self.device.write_config(msg.offset, msg.payload, msg.flags)

    async def _set_backend_req_fd(self, request: Request) -> None:
        if self.backend_channel is not None:
            self.backend_channel.close()
        self.backend_channel = OwnedFd(request.fds[0].detach())

    # -- memory ------------------------------------------------------------------------

    async def _set_mem_table(self, request: Request) -> None:
        msg = request.expect(MemoryTableMsg)
        regions: list[MemoryRegion] = []
        try:
            for desc, owned in zip(msg.regions, request.fds, strict=True):
                regions.append(_map_region(desc, owned))
            table = MemoryTable.from_regions(
                regions, generation=self.memory.generation + 1
            )
        except BaseException:
            for region in regions:
                region.close()
            raise
        await self._swap_memory(table)
        self.region_refs = {_region_key(desc): 1 for desc in msg.regions}

    async def _add_mem_reg(self, request: Request) -> None:
        desc = request.expect(SingleMemRegion).region
        key = _region_key(desc)
        if key in self.region_refs:
            # QEMU keeps one region list per vhost device, and a net device has one vhost
            # device per queue pair on the same socket: every pair adds the same region.
            # Count the owners so that a region goes away with its last REM_MEM_REG.
            self.region_refs[key] += 1
            return
        region = _map_region(desc, request.fds[0])
        try:
            table = self.memory.with_region(region)
        except BaseException:
            region.close()
            raise
        await self._swap_memory(table, close_old=False)
        self.region_refs[key] = 1

    async def _rem_mem_reg(self, request: Request) -> None:
        desc = request.expect(SingleMemRegion).region
        key = _region_key(desc)
        if self.region_refs.get(key, 0) > 1:
            self.region_refs[key] -= 1
            return
        table, removed = self.memory.without_region(
            desc.guest_phys_addr, desc.memory_size, desc.userspace_addr
        )
        self.region_refs.pop(key, None)
        await self._swap_memory(table, close_old=False)
        removed.close()

    async def _swap_memory(self, table: MemoryTable, *, close_old: bool = True) -> None:
        """Stop the running workers at a chain boundary, swap tables, restart them.

        No worker runs while the old table is closed, so no view of it survives; the
        rings restart from the indices they stopped at, translated through the new table.
        """
        await self._stop_rings(self.slots)
        old, self.memory = self.memory, table
        if close_old:
            old.close()
        self._start_pending()

    def _start_pending(self) -> None:
        """Start the rings that were started before they were fully configured."""
        for slot in self.slots:
            if slot.started and slot.worker is None and not slot.broken:
                self._start_ring(slot)

    # -- vring configuration -----------------------------------------------------------

    def _slot(self, index: int) -> VringSlot:
        if not 0 <= index < len(self.slots):
            raise RemoteProtocolError(
                f"vring index {index} out of range ({len(self.slots)})"
            )
        return self.slots[index]

    def _stopped_slot(self, index: int) -> VringSlot:
        slot = self._slot(index)
        self._reap_if_finished(slot)
        if slot.worker is not None:
            raise DeviceError(
                f"vring {index} is running; stop it with GET_VRING_BASE first"
            )
        return slot

    async def _set_vring_num(self, request: Request) -> None:
        msg = request.expect(VringState)
        slot = self._stopped_slot(msg.index)
        limit = min(self.device.max_queue_size, MAX_QUEUE_SIZE)
        if not 0 < msg.num <= limit or msg.num & (msg.num - 1):
            raise DeviceError(
                f"vring {msg.index}: size {msg.num} not a power of 2 <= {limit}"
            )
        slot.num = msg.num

    async def _set_vring_addr(self, request: Request) -> None:
        msg = request.expect(VringAddr)
        slot = self._stopped_slot(msg.index)
        slot.addr = msg
        self._start_pending()

    async def _set_vring_base(self, request: Request) -> None:
        msg = request.expect(VringState)
        slot = self._stopped_slot(msg.index)
        if msg.num > 0xFFFF:
            raise DeviceError(
                f"vring {msg.index}: split-ring base {msg.num} exceeds 16 bits"
            )
        slot.base = msg.num
        slot.used_base = None

    async def _get_vring_base(self, request: Request) -> Body:
        msg = request.expect(VringState)
        slot = self._slot(msg.index)
        await self._stop_ring(slot)
        slot.started = False
        if slot.kick is not None:
            slot.kick.close()
            slot.kick = None
        return VringState(msg.index, slot.base)

    async def _set_vring_kick(self, request: Request) -> None:
        slot, efd = self._vring_fd(request)
        if slot.worker is not None:
            await self._stop_ring(slot)
        if slot.kick is not None:
            slot.kick.close()
        slot.kick = efd
        slot.started = True
        slot.broken = False
        # Spec, "Ring states": the ring starts here; no first kick is needed.
        self._start_ring(slot)

    async def _set_vring_call(self, request: Request) -> None:
        slot, efd = self._vring_fd(request)
        if slot.call is not None:
            slot.call.close()
        slot.call = efd

    async def _set_vring_err(self, request: Request) -> None:
        slot, efd = self._vring_fd(request)
        if slot.err is not None:
            slot.err.close()
        slot.err = efd

    def _vring_fd(self, request: Request) -> tuple[VringSlot, EventFd | None]:
        msg = request.expect(VringFile)
        slot = self._slot(msg.index)
        efd = None if msg.nofd else EventFd(OwnedFd(request.fds[0].detach()))
        return slot, efd

    async def _set_vring_enable(self, request: Request) -> None:
        msg = request.expect(VringState)
        slot = self._slot(msg.index)
        if msg.num not in (0, 1):
            raise RemoteProtocolError(
                f"SET_VRING_ENABLE num must be 0 or 1, got {msg.num}"
            )
        slot.enabled = bool(msg.num)
        if slot.worker is not None:
            slot.worker.nudge()

    # -- seed extensions ---------------------------------------------------------------

    async def _sleep(self, request: Request) -> Body:
        self.sleeping = True
        await self.stop_all_rings(hard=False, keep_started=True)
        return Success(True)

    async def _wake(self, request: Request) -> Body:
        self.sleeping = False
        self._start_pending()
        return Success(True)

    async def _unsupported(self, request: Request) -> None:
        raise UnsupportedRequest(
            f"{request.code.name} is not supported by this backend"
        )

    # -- ring start and stop -----------------------------------------------------------

    def _start_ring(self, slot: VringSlot) -> None:
        """Start a worker for ``slot`` if it has everything a ring needs."""
        if self._nursery is None or self.sleeping:
            return
        if slot.worker is not None or not slot.started:
            return
        if slot.addr is None or slot.num == 0 or not self.memory.regions:
            LOGGER.debug("vring %d started before it was fully configured", slot.index)
            return
        try:
            queue = SplitQueue(self.memory, self._queue_state(slot))
        except (VirtqueueError, GuestMemoryError) as exc:
            LOGGER.error("vring %d cannot start: %s", slot.index, exc)
            slot.broken = True
            slot.signal_error()
            return
        handle = RingWorkerHandle()
        slot.worker = handle
        LOGGER.info(
            "vring %d started at avail=%d used=%d",
            slot.index,
            queue.next_avail,
            queue.next_used,
        )
        self._nursery.start_soon(
            _run_worker,
            slot,
            queue,
            self.memory,
            self.device,
            handle,
            name=f"vring-{slot.index}",
        )

    def _queue_state(self, slot: VringSlot) -> QueueState:
        assert slot.addr is not None
        acked = self.protocol.acked_features
        try:
            desc = self.memory.uva_to_gpa(slot.addr.desc_user_addr, 16 * slot.num)
            avail = self.memory.uva_to_gpa(slot.addr.avail_user_addr, 6 + 2 * slot.num)
            used = self.memory.uva_to_gpa(slot.addr.used_user_addr, 6 + 8 * slot.num)
        except GuestMemoryError as exc:
            raise VirtqueueError(
                f"vring {slot.index}: ring outside guest memory"
            ) from exc
        used_idx = slot.used_base
        if used_idx is None:
            # The used index lives in guest memory: read it there, as it may be ahead of
            # the avail base when the previous owner completed chains out of order.
            used_idx = int.from_bytes(self.memory.read(used + 2, 2), "little")
        return QueueState(
            size=slot.num,
            desc_gpa=desc,
            avail_gpa=avail,
            used_gpa=used,
            next_avail=slot.base,
            next_used=used_idx,
            event_idx=bool(acked & VirtioFeature.RING_EVENT_IDX),
            indirect=bool(acked & VirtioFeature.RING_INDIRECT_DESC),
        )

    async def _stop_ring(self, slot: VringSlot) -> None:
        """Soft-stop the ring's worker at a chain boundary; record where it stopped."""
        await self._stop_rings([slot])

    async def _stop_rings(
        self, slots: Sequence[VringSlot], *, hard: bool = False
    ) -> None:
        """Stop the workers of ``slots`` together and record where each stopped.

        Soft stops (the default) let each worker finish its batch; they share one
        STOP_GRACE, after which the stragglers are cancelled (their unfinished batches are
        handed back, see worker.py). ``hard`` cancels at once.
        """
        handles = [(slot, slot.worker) for slot in slots if slot.worker is not None]
        for _, handle in handles:
            if hard:
                handle.scope.cancel()
            else:
                handle.request_stop()
        with trio.move_on_after(STOP_GRACE) as grace:
            for _, handle in handles:
                await handle.stopped.wait()
        if grace.cancelled_caught:
            for slot, handle in handles:
                if not handle.stopped.is_set():
                    LOGGER.error(
                        "vring %d did not stop within %.1fs: cancelled",
                        slot.index,
                        STOP_GRACE,
                    )
                    handle.scope.cancel()
            for _, handle in handles:
                await handle.stopped.wait()
        for slot, handle in handles:
            self._reap(slot, handle)

    @staticmethod
    def _reap(slot: VringSlot, handle: RingWorkerHandle) -> None:
        """Forget a stopped worker, keeping the state it stopped at."""
        slot.worker = None
        state = handle.final_state
        if state is not None:
            slot.base, slot.used_base = state.next_avail, state.next_used
            LOGGER.info(
                "vring %d stopped at avail=%d used=%d",
                slot.index,
                slot.base,
                slot.used_base,
            )

    def _reap_if_finished(self, slot: VringSlot) -> None:
        # A worker whose ring broke has returned on its own: the slot is stopped.
        if slot.worker is not None and slot.worker.stopped.is_set():
            self._reap(slot, slot.worker)

    async def stop_all_rings(self, *, hard: bool, keep_started: bool = False) -> None:
        """Stop every worker; a checkpoint. ``hard`` cancels instead of draining."""
        await self._stop_rings(self.slots, hard=hard)
        for slot in self.slots:
            slot.started = slot.started and keep_started

    async def aclose(self) -> None:
        """Stop every worker, close every fd and unmap guest memory; a checkpoint."""
        with trio.CancelScope(shield=True):
            await self.stop_all_rings(hard=True)
        for slot in self.slots:
            slot.close_fds()
        if self.backend_channel is not None:
            self.backend_channel.close()
        self.memory.close()
        self.memory = MemoryTable.empty()


async def _run_worker(
    slot: VringSlot,
    queue: SplitQueue,
    memory: MemoryTable,
    device: Device,
    handle: RingWorkerHandle,
) -> None:
    await run_vring(slot=slot, queue=queue, memory=memory, device=device, handle=handle)


def _region_key(desc: MemRegion) -> tuple[int, int, int, int]:
    return (
        desc.guest_phys_addr,
        desc.memory_size,
        desc.userspace_addr,
        desc.mmap_offset,
    )


def _map_region(desc: object, owned: OwnedFd) -> MemoryRegion:
    from .proto.messages import MemRegion

    assert isinstance(desc, MemRegion)
    return MemoryRegion.map(
        owned.fd,
        guest_phys_addr=desc.guest_phys_addr,
        size=desc.memory_size,
        userspace_addr=desc.userspace_addr,
        mmap_offset=desc.mmap_offset,
    )


def _failure_reply(request: Request) -> Body | None:
    """The reply a failed request with a reply of its own still owes the frontend."""
    code = request.code
    if code is FrontendReq.GET_CONFIG:
        msg = request.expect(ConfigSpace)
        # Spec: a zero-size GET_CONFIG reply tells the frontend the read failed.
        return ConfigSpace(msg.offset, 0, msg.flags, b"")
    if code in (FrontendReq.SLEEP, FrontendReq.WAKE, FrontendReq.RESTORE):
        return Success(False)
    if code is FrontendReq.SNAPSHOT:
        return Success(False)
    return None


_HANDLERS: Final[dict[FrontendReq, _Handler]] = {
    FrontendReq.GET_FEATURES: Session._get_features,
    FrontendReq.SET_FEATURES: Session._set_features,
    FrontendReq.SET_OWNER: Session._noop,
    FrontendReq.RESET_OWNER: Session._reset,
    FrontendReq.RESET_DEVICE: Session._reset,
    FrontendReq.SET_MEM_TABLE: Session._set_mem_table,
    FrontendReq.SET_VRING_NUM: Session._set_vring_num,
    FrontendReq.SET_VRING_ADDR: Session._set_vring_addr,
    FrontendReq.SET_VRING_BASE: Session._set_vring_base,
    FrontendReq.GET_VRING_BASE: Session._get_vring_base,
    FrontendReq.SET_VRING_KICK: Session._set_vring_kick,
    FrontendReq.SET_VRING_CALL: Session._set_vring_call,
    FrontendReq.SET_VRING_ERR: Session._set_vring_err,
    FrontendReq.GET_PROTOCOL_FEATURES: Session._get_protocol_features,
    FrontendReq.SET_PROTOCOL_FEATURES: Session._noop,
    FrontendReq.GET_QUEUE_NUM: Session._get_queue_num,
    FrontendReq.SET_VRING_ENABLE: Session._set_vring_enable,
    FrontendReq.GET_CONFIG: Session._get_config,
    FrontendReq.SET_CONFIG: Session._set_config,
    FrontendReq.SET_BACKEND_REQ_FD: Session._set_backend_req_fd,
    FrontendReq.GET_MAX_MEM_SLOTS: Session._get_max_mem_slots,
    FrontendReq.ADD_MEM_REG: Session._add_mem_reg,
    FrontendReq.REM_MEM_REG: Session._rem_mem_reg,
    FrontendReq.SET_STATUS: Session._set_status,
    FrontendReq.GET_STATUS: Session._get_status,
    FrontendReq.SLEEP: Session._sleep,
    FrontendReq.WAKE: Session._wake,
}
