"""PackedDriverQueue: the GUEST (driver) side of a packed ring, over a :class:`GuestRam`.

The packed twin of :class:`~trio_vhost.vring.driver.DriverQueue`, for tests and the Python
frontend: it lays out the Descriptor Ring and both event suppression structures in guest
RAM, writes descriptor lists (direct or indirect) over per-buffer-id buffer areas, exposes
them, reads used descriptors back, and follows the driver-side notification rules. Raw
helpers write anything at all into the ring, for hostile-guest tests.

Exposing follows "Placing Available Buffers Into The Descriptor Ring": :meth:`add` writes
every descriptor of a list but the FIRST one's flags; :meth:`publish` then stores the
held-back flags of every list added since the last call, the oldest list's last, so the
device sees a whole batch or nothing. Buffer IDs are ``0..N-1``; each id owns a fixed
``pool_size // N`` bytes of buffers (and its indirect table), so nothing fragments and a
completed buffer's bytes stay readable (:meth:`read_written`) until the id is reused.

The driver trusts the device no more than it must: a used descriptor whose id is not in
flight raises :class:`VirtqueueError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, final

import numpy as np
from numpy.typing import NDArray

from ..errors import VirtqueueError
from ..mem.guest import GuestRam
from ._fence import fence
from .chain import DescriptorChain
from .driver import QueueFull
from .packed_layout import (
    EVENT_SUPPRESS_SIZE,
    PACKED_DESC_DTYPE,
    PACKED_DESC_SIZE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    avail_flags,
    desc_ring_size,
    event_word,
    from_position,
    is_valid_packed_size,
    packed_need_event,
    split_event_word,
    to_position,
    used_flags,
)
from .packed_state import PackedQueueState

__all__ = ["PackedDriverQueue"]

_AU: Final = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED


class _Record:
    """What the driver remembers about one buffer id it made available."""

    __slots__ = ("elements", "ndesc", "writable", "written")

    def __init__(
        self, ndesc: int, elements: list[tuple[int, int, int]], writable: list[tuple[int, int]]
    ) -> None:
        self.ndesc = ndesc
        self.elements = elements
        self.writable = writable
        self.written = 0


@final
class PackedDriverQueue:
    """The driver side of one packed ring in guest RAM. Not thread-safe."""

    def __init__(
        self, ram: GuestRam, size: int, *, event_idx: bool, indirect: bool, pool_size: int
    ) -> None:
        """Lay out a ring in ``ram``; prefer :meth:`create`."""
        if not is_valid_packed_size(size):
            raise ValueError(f"packed queue size {size} is not in 1..32768")
        self.ram: Final = ram
        self.size: Final = size
        self.event_idx: Final = event_idx
        self.indirect: Final = indirect
        self.desc_gpa: Final = ram.alloc(desc_ring_size(size), 4096)
        self.driver_gpa: Final = ram.alloc(EVENT_SUPPRESS_SIZE, 64)
        self.device_gpa: Final = ram.alloc(EVENT_SUPPRESS_SIZE, 64)
        # "The descriptor ring is zero-initialized." (and the structures: ENABLE, offset 0)
        ram.fill(self.desc_gpa, desc_ring_size(size), 0)
        ram.fill(self.driver_gpa, EVENT_SUPPRESS_SIZE, 0)
        ram.fill(self.device_gpa, EVENT_SUPPRESS_SIZE, 0)
        view = ram.view
        d = ram.offset(self.desc_gpa)
        self._rows: Final[NDArray[np.void]] = view[d : d + desc_ring_size(size)].view(
            PACKED_DESC_DTYPE
        )
        self._flags: Final[NDArray[np.uint16]] = self._rows["flags"]
        drv, dev = ram.offset(self.driver_gpa), ram.offset(self.device_gpa)
        self._driver_event: Final[NDArray[np.uint32]] = view[drv : drv + 4].view("<u4")
        self._device_event: Final[NDArray[np.uint32]] = view[dev : dev + 4].view("<u4")
        self.area_size: Final = (pool_size // size) & -16
        self._pool: Final = ram.alloc(self.area_size * size, 64)
        self._period: Final = 2 * size
        self._avail_pos = 0  # position of the next slot to fill: index 0, wrap counter 1
        self._used_pos = 0  # position of the next used descriptor to read
        self._num_free = size
        self._free_ids: list[int] = list(range(size - 1, -1, -1))
        self._records: dict[int, _Record] = {}
        self._done: dict[int, _Record] = {}
        self._held: list[tuple[int, int]] = []  # (slot, flags) of first descriptors to expose
        self._published = 0  # position after the last publish
        self._kick_checked = 0  # position at the last kick_needed
        self._kick_moved = 0

    @classmethod
    def create(
        cls,
        ram: GuestRam,
        size: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        pool_size: int | None = None,
    ) -> PackedDriverQueue:
        """Allocate a ring of ``size`` slots and a buffer pool (default ``2048 * size`` B)."""
        return cls(
            ram,
            size,
            event_idx=event_idx,
            indirect=indirect,
            pool_size=2048 * size if pool_size is None else pool_size,
        )

    # -- addresses and positions -----------------------------------------------------------

    @property
    def desc_uva(self) -> int:
        """Frontend virtual address of the Descriptor Ring (SET_VRING_ADDR ``descriptor``)."""
        return self.ram.uva(self.desc_gpa)

    @property
    def driver_uva(self) -> int:
        """Frontend virtual address of the Driver Area (SET_VRING_ADDR ``available``)."""
        return self.ram.uva(self.driver_gpa)

    @property
    def device_uva(self) -> int:
        """Frontend virtual address of the Device Area (SET_VRING_ADDR ``used``)."""
        return self.ram.uva(self.device_gpa)

    def queue_state(self) -> PackedQueueState:
        """Return the :class:`PackedQueueState` a device needs to serve this ring now.

        Both device positions are the driver's used position: right for a ring with nothing
        in flight (a fresh ring, or one after :meth:`start_at`).
        """
        index, wrap = from_position(self._used_pos, self.size)
        return PackedQueueState(
            size=self.size,
            desc_gpa=self.desc_gpa,
            driver_gpa=self.driver_gpa,
            device_gpa=self.device_gpa,
            next_avail=index,
            avail_wrap=wrap,
            next_used=index,
            used_wrap=wrap,
            event_idx=self.event_idx,
            indirect=self.indirect,
        )

    @property
    def num_free(self) -> int:
        """Free descriptor slots."""
        return self._num_free

    @property
    def next_avail(self) -> int:
        """The ring index of the next slot :meth:`add` fills."""
        return from_position(self._avail_pos, self.size)[0]

    @property
    def avail_wrap(self) -> bool:
        """The Driver Ring Wrap Counter."""
        return self._avail_pos < self.size

    @property
    def next_used(self) -> int:
        """The ring index of the next used descriptor :meth:`get_used` expects."""
        return from_position(self._used_pos, self.size)[0]

    @property
    def used_wrap(self) -> bool:
        """The driver's copy of the Device Ring Wrap Counter."""
        return self._used_pos < self.size

    @property
    def in_flight(self) -> int:
        """Buffer ids made available (or held for :meth:`publish`) and not used yet."""
        return len(self._records)

    def start_at(self, index: int, wrap: bool) -> None:
        """Start the (empty) ring at another position, for tests of SET_VRING_BASE.

        Build the device queue from :meth:`queue_state` afterwards.
        """
        if self._records:
            raise ValueError("start_at needs an empty ring")
        if not 0 <= index < self.size:
            raise ValueError(f"index {index} outside a ring of {self.size}")
        position = to_position(index, wrap, self.size)
        self._avail_pos = self._used_pos = self._published = self._kick_checked = position

    # -- adding ----------------------------------------------------------------------------

    def _place(
        self, buffer_id: int, items: list[tuple[bytes | None, int, int]], table: bool
    ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]], int]:
        """Lay the buffers (and indirect table) out in the id's area; return the elements,
        the writable ranges and the table's address (0 without a table)."""
        base = self._pool + buffer_id * self.area_size
        cursor = 0
        elements: list[tuple[int, int, int]] = []
        writable: list[tuple[int, int]] = []
        for payload, length, flags in items:
            addr = base + cursor
            cursor += (length + 15) & -16
            if cursor > self.area_size:
                raise QueueFull(f"buffers of {cursor}+ bytes exceed an id's {self.area_size}")
            if payload is not None:
                self.ram.write(addr, payload)
            elif not flags:
                self.ram.fill(addr, length, 0)
            else:
                writable.append((addr, length))
            elements.append((addr, length, flags))
        table_gpa = 0
        if table:
            table_gpa = base + cursor
            if cursor + PACKED_DESC_SIZE * len(items) > self.area_size:
                raise QueueFull(f"an indirect table does not fit an id's {self.area_size} bytes")
        return elements, writable, table_gpa

    def add(
        self,
        readable: Sequence[bytes | int],
        writable: Sequence[int] = (),
        *,
        indirect: bool | None = None,
    ) -> int:
        """Write a descriptor list, all but its first flags (call :meth:`publish` to expose).

        Args:
            readable: device-readable buffers: bytes to copy in, or a length of zeroes.
            writable: lengths of device-writable buffers.
            indirect: put the buffers in an indirect table (default: the queue's setting
                when there is more than one buffer).

        Returns:
            The Buffer ID.

        Raises:
            QueueFull: not enough free slots, ids, or room in the id's buffer area.
        """
        items: list[tuple[bytes | None, int, int]] = [
            (None, r, 0) if isinstance(r, int) else (bytes(r), len(r), 0) for r in readable
        ]
        items.extend((None, w, VIRTQ_DESC_F_WRITE) for w in writable)
        if not items:
            raise ValueError("a buffer needs at least one element")
        use_indirect = (self.indirect and len(items) > 1) if indirect is None else indirect
        needed = 1 if use_indirect else len(items)
        if needed > self._num_free or not self._free_ids:
            raise QueueFull(f"{needed} slots needed, {self._num_free} free")
        buffer_id = self._free_ids[-1]
        elements, writable_ranges, table = self._place(buffer_id, items, use_indirect)
        self._free_ids.pop()
        self._done.pop(buffer_id, None)
        descriptors = elements
        if use_indirect:
            self.write_indirect_table(table, elements)
            descriptors = [(table, PACKED_DESC_SIZE * len(elements), VIRTQ_DESC_F_INDIRECT)]
        first = self._avail_pos
        for i, (addr, length, flags) in enumerate(descriptors):
            index, wrap = from_position((first + i) % self._period, self.size)
            last = i == len(descriptors) - 1
            value = flags | avail_flags(wrap) | (0 if last else VIRTQ_DESC_F_NEXT)
            if i == 0:  # everything but the flags now; the flags when published
                rows = self._rows
                rows["addr"][index] = addr
                rows["len"][index] = length
                rows["id"][index] = buffer_id if last else 0
                self._held.append((index, value))
            else:
                self.write_desc(index, addr, length, buffer_id if last else 0, value)
        self._avail_pos = (first + needed) % self._period
        self._num_free -= needed
        self._records[buffer_id] = _Record(needed, elements, writable_ranges)
        return buffer_id

    def chain_of(self, buffer_id: int) -> DescriptorChain:
        """Return the chain a correct device pops for in-flight buffer ``buffer_id``.

        Raises:
            KeyError: ``buffer_id`` is not in flight.
        """
        elements = self._records[buffer_id].elements
        readable = tuple((a, n) for a, n, f in elements if n and not f & VIRTQ_DESC_F_WRITE)
        writable = tuple((a, n) for a, n, f in elements if n and f & VIRTQ_DESC_F_WRITE)
        return DescriptorChain.of(buffer_id, readable, writable)

    def publish(self) -> int:
        """Expose every list added since the last call; return how many.

        The held-back first flags are stored newest first and the oldest list's last: the
        device, reading in ring order, finds either nothing or every list complete. Each
        list's other descriptors were stored in :meth:`add`, before; x86 TSO keeps that order
        ("The driver MUST perform a suitable memory barrier before the flags update").
        """
        held = self._held
        for index, value in reversed(held):
            self._flags[index] = value
        self._held = []
        self._kick_moved += (self._avail_pos - self._published) % self._period
        self._published = self._avail_pos
        return len(held)

    def kick_needed(self) -> bool:
        """Return whether to notify the device about lists published since the last call.

        Fences first ("The driver MUST perform a suitable memory barrier before reading the
        Event Suppression structure occupying the Device Area"), then reads the Device Area.
        """
        moved = self._kick_moved
        if not moved:
            return False
        new, old = self._published, self._kick_checked
        self._kick_checked = new
        self._kick_moved = 0
        fence()
        word = int(self._device_event[0])
        flags = split_event_word(word)[0]
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags == RING_EVENT_FLAGS_DESC and self.event_idx and moved < self._period:
            return packed_need_event(word & 0xFFFF, old, new, self.size)
        return True

    # -- used descriptors ------------------------------------------------------------------

    def has_used(self) -> bool:
        """Return whether a used descriptor waits at the next used slot."""
        index, wrap = from_position(self._used_pos, self.size)
        return bool(self._records) and int(self._flags[index]) & _AU == used_flags(wrap)

    def get_used(self) -> list[tuple[int, int]]:
        """Read every used descriptor waiting: return ``(buffer_id, written)`` pairs.

        ``written`` is the used descriptor's ``len`` when it has WRITE, else 0 ("Element
        Length is reserved for used descriptors without the VIRTQ_DESC_F_WRITE flag").

        Raises:
            VirtqueueError: a used descriptor names an id that is not in flight.
        """
        out: list[tuple[int, int]] = []
        while self.has_used():
            index = from_position(self._used_pos, self.size)[0]
            flags = int(self._flags[index])  # flags first, then the rest (load order)
            buffer_id, length = int(self._rows["id"][index]), int(self._rows["len"][index])
            record = self._records.pop(buffer_id, None)
            if record is None:
                raise VirtqueueError(f"device used buffer id {buffer_id}, which is not in flight")
            record.written = length if flags & VIRTQ_DESC_F_WRITE else 0
            self._used_pos = (self._used_pos + record.ndesc) % self._period
            self._num_free += record.ndesc
            self._free_ids.append(buffer_id)
            self._done[buffer_id] = record
            out.append((buffer_id, record.written))
        return out

    def read_written(self, buffer_id: int) -> bytes:
        """Return the bytes the device reported writing into buffer ``buffer_id``.

        Raises:
            KeyError: ``buffer_id`` has no completed buffer (or was reused since).
        """
        record = self._done[buffer_id]
        left = record.written
        parts = []
        for addr, length in record.writable:
            take = min(left, length)
            parts.append(self.ram.read(addr, take))
            left -= take
        return b"".join(parts)

    def disable_interrupts(self) -> None:
        """Ask the device not to notify: RING_EVENT_FLAGS_DISABLE in the Driver Area."""
        self._driver_event[0] = event_word(RING_EVENT_FLAGS_DISABLE)

    def enable_interrupts(self) -> bool:
        """Ask for a notification on the next used descriptor, fence, and re-check.

        With EVENT_IDX: RING_EVENT_FLAGS_DESC at the next used slot; otherwise ENABLE.

        Returns:
            True if a used descriptor is already there (read it instead of waiting).
        """
        if self.event_idx:
            index, wrap = from_position(self._used_pos, self.size)
            self._driver_event[0] = event_word(RING_EVENT_FLAGS_DESC, index, wrap)
        else:
            self._driver_event[0] = event_word(RING_EVENT_FLAGS_ENABLE)
        fence()
        return self.has_used()

    # -- raw access, including for corrupting the ring on purpose -------------------------

    def write_desc(
        self, index: int, addr: int, length: int, buffer_id: int = 0, flags: int = 0
    ) -> None:
        """Store descriptor slot ``index`` raw (any values; ``addr`` taken modulo 2^64)."""
        self._rows[index] = (addr % (1 << 64), length & 0xFFFF_FFFF, buffer_id & 0xFFFF, flags)

    def set_flags(self, index: int, flags: int) -> None:
        """Store only the ``flags`` of slot ``index``."""
        self._flags[index] = flags & 0xFFFF

    def desc(self, index: int) -> tuple[int, int, int, int]:
        """Read slot ``index``: ``(addr, len, id, flags)``."""
        row = self._rows[index]
        return int(row["addr"]), int(row["len"]), int(row["id"]), int(row["flags"])

    def set_driver_event(self, flags: int, index: int = 0, wrap: bool = False) -> None:
        """Store the Driver Area raw."""
        self._driver_event[0] = event_word(flags, index, wrap)

    def driver_event(self) -> tuple[int, int, bool]:
        """Read the Driver Area: ``(flags, offset, wrap)``."""
        return split_event_word(int(self._driver_event[0]))

    def device_event(self) -> tuple[int, int, bool]:
        """Read the Device Area: ``(flags, offset, wrap)``."""
        return split_event_word(int(self._device_event[0]))

    def write_indirect_table(self, gpa: int, entries: Sequence[tuple[int, int, int]]) -> None:
        """Write an indirect table at ``gpa``: ``(addr, len, flags)`` entries, ids 0."""
        table = np.zeros(len(entries), dtype=PACKED_DESC_DTYPE)
        for i, (addr, length, flags) in enumerate(entries):
            table[i] = (addr, length, 0, flags)
        self.ram.write(gpa, table.tobytes())

    def alloc(self, nbytes: int, align: int = 16) -> int:
        """Allocate scratch guest memory (never freed) for hand-made descriptors."""
        return self.ram.alloc(nbytes, align)
