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
from .backend_channel import (
    BackendChannel,
    BackendChannelClosed,
    BackendRequestFailed,
    FrontendLink,
)
from .dirty_tracking import DirtyTracking
from .errors import (
    DeviceError,
    GuestMemoryError,
    LocalProtocolError,
    RemoteProtocolError,
    UnsupportedRequest,
    VirtqueueError,
)
from .inflight import InflightQueue, InflightRegion
from .mem.dirty import DirtyLog
from .mem.region import MemoryRegion
from .mem.table import MAX_MEM_SLOTS, MemoryTable
from .proto.connection import BackendProtocol, Request
from .proto.constants import FrontendReq, ProtocolFeature, VirtioFeature, VringAddrFlag
from .proto.messages import (
    U64,
    ConfigSpace,
    Inflight,
    LogBase,
    MemRegion,
    SingleMemRegion,
    VringAddr,
    VringFile,
    VringState,
)
from .proto.messages import (
    MemoryTable as MemoryTableMsg,
)
from .proto.messages_ext import SharedMemoryRegions, Success
from .session_state import _NOFD, _TRANSFER_FAILED, MAX_QUEUE_SIZE, StateTransfer, _Transfer
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
#: Virtio device status: the device sets DEVICE_NEEDS_RESET after an error it cannot fix.
_STATUS_NEEDS_RESET: Final = 0x40

_Handler = Callable[["Session", Request], Awaitable["Body | bytes | None"]]


class Session(StateTransfer):
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
        #: The device's way to the frontend (back-end channel messages), see FrontendLink.
        self.link = FrontendLink(self.protocol)
        self._sleeping = False
        self._nursery: trio.Nursery | None = None
        #: The last SET_DEVICE_STATE_FD transfer (CHECK_DEVICE_STATE reports on it).
        self._transfer: _Transfer | None = None
        #: The INFLIGHT_SHMFD region (GET/SET_INFLIGHT_FD), see :mod:`trio_vhost.inflight`.
        self.inflight: InflightRegion | None = None
        #: Dirty-page logging (SET_LOG_BASE, SET_LOG_FD, LOG_ALL), shared with the workers.
        self.dirty = DirtyTracking()
        #: Fds to attach to the next own reply (set by a handler, taken by _dispatch).
        self._reply_fds: tuple[int, ...] = ()
        device.frontend_attached(self.link)

    @property
    def sleeping(self) -> bool:
        """SLEEP (or RESTORE) was received: no worker may start and no back-end message
        may be sent until WAKE."""
        return self._sleeping

    @sleeping.setter
    def sleeping(self, value: bool) -> None:
        self._sleeping = value
        if value:
            self.link.pause()
        elif self.link.resume() and self._nursery is not None:
            # Not awaited here: the frontend may need this connection to answer it.
            self._nursery.start_soon(self._announce_config_change)

    async def _announce_config_change(self) -> None:
        """Send the CONFIG_CHANGE_MSG a device asked for while the session slept."""
        try:
            await self.link.config_changed()
        except (BackendChannelClosed, BackendRequestFailed) as exc:
            LOGGER.warning("config change announced at WAKE failed: %s", exc)

    # -- the control loop --------------------------------------------------------------

    async def run(self, nursery: trio.Nursery) -> None:
        """Serve requests until the frontend disconnects; a checkpoint.

        Returns normally when the frontend closes the connection between messages.
        Raises :class:`RemoteProtocolError` or
        :class:`~trio_vhost.errors.Disconnect` when the connection must be dropped.
        """
        self._nursery = nursery
        try:
            while True:
                request = await self._receive()
                if request is None:
                    return
                try:
                    await self._dispatch(request)
                finally:
                    close_all(request.fds)
        finally:
            # A transfer pipe the frontend never closes must not keep the nursery open.
            self._cancel_transfer()

    async def _receive(self) -> Request | None:
        from .errors import ClientExit

        try:
            data, fds = await self.transport.receive_header()
        except ClientExit:
            LOGGER.info("frontend closed the connection")
            return None
        try:
            header = self.protocol.receive_header(data, len(fds))
            body = await self.transport.receive_exactly(header.size) if header.size else b""
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
        except (UnsupportedRequest, DeviceError, GuestMemoryError, VirtqueueError) as exc:
            ok = False
            reply = _failure_reply(request)
            LOGGER.warning("%s failed: %s", request.code.name, exc)
            if reply is None and not self._acks(request):
                # Without REPLY_ACK the frontend cannot be told; the spec leaves it at that.
                return
        fds, self._reply_fds = self._reply_fds, ()
        if reply is not None:
            await self.transport.send(self.protocol.reply(request, reply), fds if ok else ())
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
        self.dirty.set_log_all(bool(self.protocol.acked_features & VirtioFeature.LOG_ALL))
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
        """SET_STATUS: record the status byte; 0 (a reset) stops every ring where it is.

        A vhost-user frontend sends 0 when it stops the device (QEMU also for a VM pause,
        right before GET_VRING_BASE), so the rings keep the indices GET_VRING_BASE reports
        and the device keeps its state; the frontend sets each ring up again to restart.
        """
        status = request.expect(U64).value & 0xFF
        if status == 0:
            await self.stop_all_rings(hard=False)
        self.status = status

    async def _get_status(self, request: Request) -> Body:
        for slot in self.slots:
            self._reap_if_finished(slot)
        broken = any(slot.broken for slot in self.slots)
        return U64(self.status | (_STATUS_NEEDS_RESET if broken else 0))

    async def _reset(self, request: Request) -> None:
        """RESET_DEVICE (and the deprecated RESET_OWNER, which QEMU sends in its place).

        Spec: "disable all rings and reset all internal device state to the initial state,
        ready to be reinitialized. The back-end retains ownership". Every ring is stopped
        at a chain boundary and forgotten with its eventfds; the acked virtio features,
        the status byte, SLEEP and any device state transfer go; the device resets. What
        belongs to the connection stays: the protocol features (REPLY_ACK must keep
        working), the memory table (the frontend's mappings, replaced by its next
        SET_MEM_TABLE) and the back-end channel. The spec warns that dropping connection
        state on RESET_OWNER "would lead to bugs".
        """
        self._cancel_transfer()
        self._transfer = None
        await self.stop_all_rings(hard=False)
        for slot in self.slots:
            slot.close_fds()
        self.slots = [VringSlot(index) for index in range(self.device.num_queues)]
        self.status = 0
        self.sleeping = False
        self.protocol.acked_features = 0
        self.dirty.set_log_all(False)
        if self.inflight is not None:
            # Spec: the frontend retrieves a new region after a reset.
            self.inflight.close()
            self.inflight = None
        self.device.reset()

    # -- config space ------------------------------------------------------------------

    async def _get_config(self, request: Request) -> Body:
        msg = request.expect(ConfigSpace)
        data = self.device.read_config(msg.offset, msg.size)
        if len(data) != msg.size:
            raise DeviceError(f"device returned {len(data)} config bytes, {msg.size} asked")
        return ConfigSpace(msg.offset, msg.size, msg.flags, data)

    async def _set_config(self, request: Request) -> None:
        msg = request.expect(ConfigSpace)
        self.device.write_config(msg.offset, msg.payload, msg.flags)

    async def _get_shared_memory_regions(self, request: Request) -> Body:
        """crosvm's GET_SHARED_MEMORY_REGIONS: the device's VIRTIO shared memory regions."""
        try:
            return SharedMemoryRegions(tuple(self.device.shared_memory_regions()))
        except LocalProtocolError as exc:  # more than 256, or repeated ids
            raise DeviceError(f"the device's shared memory regions: {exc}") from exc

    async def _set_backend_req_fd(self, request: Request) -> None:
        self.link.set_channel(BackendChannel.from_fd(request.fds[0], self.protocol))

    # -- memory ------------------------------------------------------------------------

    async def _set_mem_table(self, request: Request) -> None:
        msg = request.expect(MemoryTableMsg)
        regions: list[MemoryRegion] = []
        try:
            for desc, owned in zip(msg.regions, request.fds, strict=True):
                regions.append(_map_region(desc, owned))
            table = MemoryTable.from_regions(regions, generation=self.memory.generation + 1)
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
            raise RemoteProtocolError(f"vring index {index} out of range ({len(self.slots)})")
        return self.slots[index]

    def _stopped_slot(self, index: int) -> VringSlot:
        slot = self._slot(index)
        self._reap_if_finished(slot)
        if slot.worker is not None:
            raise DeviceError(f"vring {index} is running; stop it with GET_VRING_BASE first")
        return slot

    async def _set_vring_num(self, request: Request) -> None:
        msg = request.expect(VringState)
        slot = self._stopped_slot(msg.index)
        limit = min(self.device.max_queue_size, MAX_QUEUE_SIZE)
        if not 0 < msg.num <= limit or msg.num & (msg.num - 1):
            raise DeviceError(f"vring {msg.index}: size {msg.num} not a power of 2 <= {limit}")
        slot.num = msg.num

    async def _set_vring_addr(self, request: Request) -> None:
        msg = request.expect(VringAddr)
        slot = self._slot(msg.index)
        self._reap_if_finished(slot)
        old = slot.addr
        if slot.worker is not None and old is not None and _same_ring(old, msg):
            # Migration: the frontend turns used-ring logging (the LOG flag) on and off
            # on running rings; only the flags and log_guest_addr may change.
            slot.addr = msg
            slot.worker.used_log_gpa = _used_log_gpa(msg)
            return
        slot = self._stopped_slot(msg.index)
        slot.addr = msg
        self._start_pending()

    async def _set_log_base(self, request: Request) -> Body:
        """SET_LOG_BASE (LOG_SHMFD): map the dirty bitmap; the reply is u64 0."""
        msg = request.expect(LogBase)
        self.dirty.set_log(DirtyLog.map(request.fds[0].fd, msg.mmap_size, msg.mmap_offset))
        LOGGER.info("dirty log set: %d bytes (LOG_ALL %s)", msg.mmap_size, self.dirty.log_all)
        return U64(0)

    async def _set_log_fd(self, request: Request) -> None:
        """SET_LOG_FD: the eventfd signalled after a batch was logged."""
        self.dirty.set_call(EventFd(OwnedFd(request.fds[0].detach())))

    async def _set_vring_base(self, request: Request) -> None:
        msg = request.expect(VringState)
        slot = self._stopped_slot(msg.index)
        if msg.num > 0xFFFF:
            raise DeviceError(f"vring {msg.index}: split-ring base {msg.num} exceeds 16 bits")
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
            raise RemoteProtocolError(f"SET_VRING_ENABLE num must be 0 or 1, got {msg.num}")
        slot.enabled = bool(msg.num)
        if slot.worker is not None:
            slot.worker.nudge()

    # -- in-flight tracking (INFLIGHT_SHMFD) -------------------------------------------

    async def _get_inflight_fd(self, request: Request) -> Body:
        """GET_INFLIGHT_FD: a new zeroed region in a memfd, replied with its fd."""
        msg = request.expect(Inflight)
        if msg.num_queues > len(self.slots) or msg.queue_size > MAX_QUEUE_SIZE:
            raise DeviceError(
                f"in-flight region for {msg.num_queues} queues of {msg.queue_size}: this"
                f" device has {len(self.slots)} queues of at most {MAX_QUEUE_SIZE}"
            )
        region = InflightRegion.create(msg.num_queues, msg.queue_size)
        await self._swap_inflight(region)
        self._reply_fds = (region.fd.fd,)
        return Inflight(region.mmap_size, 0, msg.num_queues, msg.queue_size)

    async def _set_inflight_fd(self, request: Request) -> None:
        """SET_INFLIGHT_FD: track in the frontend's region; rings resume from it."""
        msg = request.expect(Inflight)
        owned = OwnedFd(request.fds[0].detach())
        try:
            region = InflightRegion(
                owned, msg.mmap_size, msg.mmap_offset, msg.num_queues, msg.queue_size
            )
        except BaseException:
            owned.close()
            raise
        await self._swap_inflight(region)

    async def _swap_inflight(self, region: InflightRegion | None) -> None:
        """Stop the running rings, replace the region, restart them (they recover from it)."""
        await self._stop_rings(self.slots)
        old, self.inflight = self.inflight, region
        if old is not None:
            old.close()
        self._start_pending()

    def _inflight_state(
        self, slot: VringSlot, state: QueueState
    ) -> tuple[QueueState, InflightQueue | None]:
        """The ring's in-flight records and the state to start from after recovering them.

        With records from an earlier run the ring resumes at ``used.idx`` plus the chains
        still in flight (the worker resubmits those first), whatever SET_VRING_BASE said.
        """
        region = self.inflight
        if region is None or not self.protocol.acked_protocol_features & (
            ProtocolFeature.INFLIGHT_SHMFD
        ):
            return state, None
        tracker = region.queue(slot.index)
        if tracker is None:
            return state, None
        try:
            heads = tracker.recover(state.next_used, slot.num)
        except DeviceError as exc:
            raise VirtqueueError(f"vring {slot.index}: {exc}") from exc
        if heads is None:
            return state, tracker
        next_avail = (state.next_used + len(heads)) & 0xFFFF
        if next_avail != state.next_avail or len(heads):
            LOGGER.info(
                "vring %d: %d chains in flight, resuming at avail=%d (base was %d)",
                slot.index,
                len(heads),
                next_avail,
                state.next_avail,
            )
        return state.with_indices(next_avail, state.next_used), tracker

    async def _unsupported(self, request: Request) -> None:
        raise UnsupportedRequest(f"{request.code.name} is not supported by this backend")

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
            state, inflight = self._inflight_state(slot, self._queue_state(slot))
            queue = SplitQueue(self.memory, state)
        except (VirtqueueError, GuestMemoryError) as exc:
            LOGGER.error("vring %d cannot start: %s", slot.index, exc)
            slot.broken = True
            slot.signal_error()
            return
        handle = RingWorkerHandle(inflight=inflight)
        handle.dirty = self.dirty
        handle.used_log_gpa = _used_log_gpa(slot.addr)
        slot.worker = handle
        LOGGER.info(
            "vring %d started at avail=%d used=%d", slot.index, queue.next_avail, queue.next_used
        )
        self._nursery.start_soon(
            _run_worker, slot, queue, self.memory, self.device, handle, name=f"vring-{slot.index}"
        )

    def _queue_state(self, slot: VringSlot) -> QueueState:
        assert slot.addr is not None
        acked = self.protocol.acked_features
        try:
            desc = self.memory.uva_to_gpa(slot.addr.desc_user_addr, 16 * slot.num)
            avail = self.memory.uva_to_gpa(slot.addr.avail_user_addr, 6 + 2 * slot.num)
            used = self.memory.uva_to_gpa(slot.addr.used_user_addr, 6 + 8 * slot.num)
        except GuestMemoryError as exc:
            raise VirtqueueError(f"vring {slot.index}: ring outside guest memory") from exc
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

    async def _stop_rings(self, slots: Sequence[VringSlot], *, hard: bool = False) -> None:
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
                        "vring %d did not stop within %.1fs: cancelled", slot.index, STOP_GRACE
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
                "vring %d stopped at avail=%d used=%d", slot.index, slot.base, slot.used_base
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
        self.link.close()
        self.device.frontend_detached()
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        self.dirty.close()
        self.memory.close()
        self.memory = MemoryTable.empty()


def _same_ring(old: VringAddr, new: VringAddr) -> bool:
    """Whether ``new`` places the ring where ``old`` does (flags and log address aside)."""
    return (old.desc_user_addr, old.avail_user_addr, old.used_user_addr) == (
        new.desc_user_addr,
        new.avail_user_addr,
        new.used_user_addr,
    )


def _used_log_gpa(addr: VringAddr) -> int | None:
    """The address used-ring writes are logged at: log_guest_addr with the LOG flag."""
    return addr.log_guest_addr if addr.flags & VringAddrFlag.LOG else None


async def _run_worker(
    slot: VringSlot,
    queue: SplitQueue,
    memory: MemoryTable,
    device: Device,
    handle: RingWorkerHandle,
) -> None:
    await run_vring(slot=slot, queue=queue, memory=memory, device=device, handle=handle)


def _region_key(desc: MemRegion) -> tuple[int, int, int, int]:
    return (desc.guest_phys_addr, desc.memory_size, desc.userspace_addr, desc.mmap_offset)


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
    if code is FrontendReq.SET_DEVICE_STATE_FD:
        # An error code and no fd: "must not both indicate an error and return a fd".
        return U64(_NOFD | _TRANSFER_FAILED)
    if code is FrontendReq.CHECK_DEVICE_STATE:
        return U64(_TRANSFER_FAILED)
    if code is FrontendReq.SET_LOG_BASE:
        # Its reply is owed with or without REPLY_ACK (QEMU waits for it); non-zero: failed.
        return U64(1)
    if code is FrontendReq.GET_SHARED_MEMORY_REGIONS:
        return SharedMemoryRegions(())
    if code is FrontendReq.GET_INFLIGHT_FD:
        # mmap_size 0 and no fd: QEMU then goes on without in-flight tracking.
        wanted = request.expect(Inflight)
        return Inflight(0, 0, wanted.num_queues, wanted.queue_size)
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
    FrontendReq.SET_LOG_BASE: Session._set_log_base,
    FrontendReq.SET_LOG_FD: Session._set_log_fd,
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
    FrontendReq.GET_SHARED_MEMORY_REGIONS: Session._get_shared_memory_regions,
    FrontendReq.GET_MAX_MEM_SLOTS: Session._get_max_mem_slots,
    FrontendReq.ADD_MEM_REG: Session._add_mem_reg,
    FrontendReq.REM_MEM_REG: Session._rem_mem_reg,
    FrontendReq.GET_INFLIGHT_FD: Session._get_inflight_fd,
    FrontendReq.SET_INFLIGHT_FD: Session._set_inflight_fd,
    FrontendReq.SET_STATUS: Session._set_status,
    FrontendReq.GET_STATUS: Session._get_status,
    FrontendReq.SET_DEVICE_STATE_FD: Session._set_device_state_fd,
    FrontendReq.CHECK_DEVICE_STATE: Session._check_device_state,
    FrontendReq.SLEEP: Session._sleep,
    FrontendReq.WAKE: Session._wake,
    FrontendReq.SNAPSHOT: Session._snapshot,
    FrontendReq.RESTORE: Session._restore,
}
