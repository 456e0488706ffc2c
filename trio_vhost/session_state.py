"""The state-transfer side of a session: SLEEP/WAKE, SNAPSHOT/RESTORE, device state.

:class:`StateTransfer` is a part of :class:`~trio_vhost.session.Session` kept in its own
module so that each stays readable; it works on the session's state (rings, memory,
features) through the attributes declared below and nothing else.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import trio

from ._fd import OwnedFd
from ._io.eventfd import EventFd
from .errors import (
    DeviceError,
    GuestMemoryError,
    LocalProtocolError,
)
from .mem.table import MemoryTable
from .proto.connection import BackendProtocol, Request
from .proto.constants import VirtioFeature
from .proto.messages import (
    U64,
    DeviceStateTransfer,
    VringAddr,
)
from .proto.messages_ext import MAX_SNAPSHOT_SIZE, Snapshot, Success
from .slot import VringSlot
from .snapshot import RingAddress, RingSnapshot, SnapshotError, StateSnapshot

if TYPE_CHECKING:
    from .device import Device
    from .proto.messages import Body

__all__ = ["MAX_QUEUE_SIZE", "StateTransfer"]

LOGGER = logging.getLogger(__name__)

#: The largest queue size a split ring can have.
MAX_QUEUE_SIZE: Final = 32768

#: How long CHECK_DEVICE_STATE waits for a transfer whose pipe the frontend keeps open.
TRANSFER_GRACE: Final = 5.0
#: SET_DEVICE_STATE_FD reply bits: the error code (bits 0-7) and "no fd returned" (bit 8).
_TRANSFER_FAILED: Final = 1
_NOFD: Final = 0x100


@dataclass(eq=False)
class _Transfer:
    """One SET_DEVICE_STATE_FD transfer running in the background."""

    direction: int
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    ok: bool = False


class StateTransfer:
    """SLEEP, WAKE, SNAPSHOT, RESTORE, SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE."""

    if TYPE_CHECKING:
        device: Device
        protocol: BackendProtocol
        memory: MemoryTable
        slots: list[VringSlot]
        sleeping: bool
        _nursery: trio.Nursery | None
        _transfer: _Transfer | None

        async def stop_all_rings(self, *, hard: bool, keep_started: bool = False) -> None: ...

        def _start_pending(self) -> None: ...

        def _reap_if_finished(self, slot: VringSlot) -> None: ...

    # -- seed extensions ---------------------------------------------------------------

    async def _sleep(self, request: Request) -> Body:
        self.sleeping = True
        await self.stop_all_rings(hard=False, keep_started=True)
        return Success(True)

    async def _wake(self, request: Request) -> Body:
        self.sleeping = False
        self._start_pending()
        return Success(True)

    async def _snapshot(self, request: Request) -> Body:
        """SNAPSHOT: the state of a sleeping backend (:mod:`trio_vhost.snapshot`)."""
        if not self.sleeping:
            raise DeviceError("SNAPSHOT needs a sleeping backend: send SLEEP first")
        data = self._capture().encode()
        if not Snapshot.size_ok(1 + len(data)):
            raise DeviceError(f"snapshot of {len(data)} bytes does not fit a reply")
        return Snapshot(True, data)

    async def _restore(self, request: Request) -> Body:
        """RESTORE: take over a snapshot in this fresh backend; WAKE then continues.

        The memory table must be set. The snapshot's virtio features, rings (size,
        addresses through their guest-physical addresses, indices, enabled/started) and
        device state replace this backend's; kick eventfd ``i`` of the message goes to
        ring ``i``, and a ring that was started needs one. Nothing changes unless all of
        it applies. The backend is then asleep: no ring runs until WAKE.
        """
        snap = StateSnapshot.decode(request.expect(bytes))
        if not self.memory.regions:
            raise DeviceError("RESTORE needs the memory table: send SET_MEM_TABLE first")
        self._require_stopped("RESTORE")
        self._check_fits(snap)
        kicks = request.fds
        if len(kicks) > len(snap.rings):
            raise SnapshotError(
                f"RESTORE carries {len(kicks)} kick fds for {len(snap.rings)} rings"
            )
        addrs = [self._restored_addr(ring) for ring in snap.rings]
        for ring in snap.rings:
            if ring.started and ring.index >= len(kicks):
                raise SnapshotError(f"vring {ring.index} was started but has no kick eventfd")
        self._load_device(snap.device_state)
        # Nothing below can fail: the snapshot is taken over whole.
        self.protocol.acked_features = snap.features
        self.device.ack_features(snap.features)
        for ring, addr in zip(snap.rings, addrs, strict=True):
            slot = self.slots[ring.index]
            if ring.index < len(kicks):
                if slot.kick is not None:
                    slot.kick.close()
                slot.kick = EventFd(OwnedFd(kicks[ring.index].detach()))
            slot.num = ring.size
            slot.addr = addr
            slot.base = ring.next_avail
            slot.used_base = ring.next_used
            slot.enabled = ring.enabled
            slot.started = ring.started
            slot.broken = ring.broken
        self.sleeping = True
        LOGGER.info("restored %d rings; asleep until WAKE", len(snap.rings))
        return Success(True)

    # -- device state transfer (DEVICE_STATE) ------------------------------------------

    async def _set_device_state_fd(self, request: Request) -> Body:
        """SET_DEVICE_STATE_FD: save the snapshot into the fd, or load one from it.

        Only while every ring is stopped (spec: the "stopped" phase, device suspended).
        The transfer runs in the background, since the frontend reads or writes the pipe
        only after this reply; we never offer a channel of our own (NOFD is set).
        """
        msg = request.expect(DeviceStateTransfer)
        self._cancel_transfer()
        self._transfer = None
        self._require_stopped("SET_DEVICE_STATE_FD")
        owned = request.fds[0]
        mode = os.fstat(owned.fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            raise DeviceError("the device state channel must be a pipe or a socket")
        data = self._capture().encode() if msg.direction == DeviceStateTransfer.SAVE else b""
        assert self._nursery is not None
        transfer = _Transfer(msg.direction)
        self._transfer = transfer
        self._nursery.start_soon(self._run_transfer, transfer, owned.detach(), data)
        return U64(_NOFD)

    async def _check_device_state(self, request: Request) -> Body:
        """CHECK_DEVICE_STATE: 0 once the last transfer has fully succeeded, else 1."""
        transfer = self._transfer
        if transfer is None:
            raise DeviceError("CHECK_DEVICE_STATE without a device state transfer")
        with trio.move_on_after(TRANSFER_GRACE):
            await transfer.done.wait()
        if not transfer.done.is_set():
            LOGGER.warning("device state transfer still open after %.1fs", TRANSFER_GRACE)
            transfer.scope.cancel()
            await transfer.done.wait()
        return U64(0 if transfer.ok else 1)

    async def _run_transfer(self, transfer: _Transfer, fd: int, data: bytes) -> None:
        stream = trio.lowlevel.FdStream(fd)
        try:
            with transfer.scope:
                if transfer.direction == DeviceStateTransfer.SAVE:
                    await stream.send_all(data)
                else:
                    received = await _read_to_eof(stream, MAX_SNAPSHOT_SIZE)
                    self._load_state(received)
                transfer.ok = True
        except Exception as exc:
            # I/O errors, a refused snapshot, a bug in Device.load_state: the transfer
            # fails (CHECK_DEVICE_STATE says so), the connection stays.
            LOGGER.warning("device state transfer failed: %s", exc)
        finally:
            stream.close()
            transfer.done.set()
        LOGGER.info("device state transfer %s", "done" if transfer.ok else "failed")

    def _load_state(self, data: bytes) -> None:
        """Apply a snapshot received over SET_DEVICE_STATE_FD (load).

        The frontend sets features and rings up again itself after a load (spec,
        "Migrating back-end state"), so only the device's state is taken over; the rest
        is checked to fit this backend.
        """
        snap = StateSnapshot.decode(data)
        self._require_stopped("a device state load")
        self._check_fits(snap)
        self._load_device(snap.device_state)

    def _cancel_transfer(self) -> None:
        if self._transfer is not None:
            self._transfer.scope.cancel()

    # -- snapshot helpers --------------------------------------------------------------

    def _require_stopped(self, what: str) -> None:
        """Raise unless every ring is stopped (the device is suspended or asleep)."""
        for slot in self.slots:
            self._reap_if_finished(slot)
            if slot.worker is not None or (slot.started and not self.sleeping):
                raise DeviceError(f"{what} needs every ring stopped; vring {slot.index} is not")

    def _check_fits(self, snap: StateSnapshot) -> None:
        """Raise unless this backend can take over ``snap``."""
        if len(snap.rings) != len(self.slots):
            raise SnapshotError(
                f"snapshot of {len(snap.rings)} rings, device has {len(self.slots)}"
            )
        extra = snap.features & ~self.protocol.offered_features
        if extra:
            raise SnapshotError(f"snapshot features {extra:#x} are not offered here")
        extra = snap.protocol_features & ~self.protocol.offered_protocol_features
        if extra:
            raise SnapshotError(f"snapshot protocol features {extra:#x} are not offered here")
        limit = min(self.device.max_queue_size, MAX_QUEUE_SIZE)
        for ring in snap.rings:
            if ring.size > limit:
                raise SnapshotError(f"vring {ring.index}: size {ring.size} above {limit}")

    def _load_device(self, data: bytes) -> None:
        try:
            self.device.load_state(data)
        except Exception as exc:
            # load_state changes nothing when it raises (its contract): a refusal.
            raise SnapshotError(f"device state refused: {exc}") from exc

    def _capture(self) -> StateSnapshot:
        """Snapshot the backend; every ring must be stopped."""
        event_idx = bool(self.protocol.acked_features & VirtioFeature.RING_EVENT_IDX)
        rings = []
        for slot in self.slots:
            self._reap_if_finished(slot)
            assert slot.worker is None, "snapshot of a running ring"
            address = None
            if slot.addr is not None:
                a = slot.addr
                address = RingAddress(
                    a.flags, a.desc_user_addr, a.avail_user_addr, a.used_user_addr, a.log_guest_addr
                )
            rings.append(
                RingSnapshot(
                    index=slot.index,
                    size=slot.num,
                    enabled=slot.enabled,
                    started=slot.started,
                    broken=slot.broken,
                    address=address,
                    gpas=self._ring_gpas(slot),
                    next_avail=slot.base,
                    next_used=slot.used_base,
                    event_idx=event_idx,
                )
            )
        return StateSnapshot(
            features=self.protocol.acked_features,
            protocol_features=self.protocol.acked_protocol_features,
            rings=tuple(rings),
            device_state=self.device.save_state(),
        )

    def _ring_gpas(self, slot: VringSlot) -> tuple[int, int, int] | None:
        """The guest-physical addresses of the ring's parts, if the memory table maps them."""
        if slot.addr is None or slot.num == 0:
            return None
        try:
            return (
                self.memory.uva_to_gpa(slot.addr.desc_user_addr, 16 * slot.num),
                self.memory.uva_to_gpa(slot.addr.avail_user_addr, 6 + 2 * slot.num),
                self.memory.uva_to_gpa(slot.addr.used_user_addr, 6 + 8 * slot.num),
            )
        except GuestMemoryError:
            return None

    def _restored_addr(self, ring: RingSnapshot) -> VringAddr | None:
        """SET_VRING_ADDR for a restored ring, in this frontend's address space.

        The guest-physical addresses are what survives a new frontend process, so a ring
        that has them is placed through this memory table; one without them keeps the
        frontend addresses it was given.
        """
        a = ring.address
        if a is None:
            return None
        desc, avail, used = a.desc_user_addr, a.avail_user_addr, a.used_user_addr
        if ring.gpas is not None:
            size = ring.size
            desc = self._gpa_to_uva(ring, ring.gpas[0], 16 * size)
            avail = self._gpa_to_uva(ring, ring.gpas[1], 6 + 2 * size)
            used = self._gpa_to_uva(ring, ring.gpas[2], 6 + 8 * size)
        try:
            return VringAddr(ring.index, a.flags, desc, used, avail, a.log_guest_addr)
        except LocalProtocolError as exc:  # e.g. a ring address without its alignment
            raise SnapshotError(f"vring {ring.index}: {exc}") from exc

    def _gpa_to_uva(self, ring: RingSnapshot, gpa: int, length: int) -> int:
        for region in self.memory.regions:
            if region.gpa <= gpa and gpa + length <= region.gpa_end:
                return region.uva + (gpa - region.gpa)
        raise SnapshotError(f"vring {ring.index}: ring at {gpa:#x} is outside guest memory")


async def _read_to_eof(stream: trio.lowlevel.FdStream, limit: int) -> bytes:
    """Read until end of file; more than ``limit`` bytes is a failure."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise DeviceError(f"device state larger than {limit} bytes")
        chunks.append(chunk)
