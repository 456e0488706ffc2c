"""DriverQueue: the GUEST (driver) side of a split ring, over a :class:`GuestRam`.

Used by the Python frontend, the tests and the benchmarks to act as the guest: it lays out the
ring in guest RAM, builds descriptor chains (direct or indirect) over buffers from a per-queue
pool, publishes them, reads the used ring back, and follows the driver-side notification rules.
It also has raw helpers to corrupt the ring on purpose for hostile-guest tests.

The driver trusts the device no more than it must: a used element with an unknown head or a
used index that runs ahead by more than the ring raises :class:`VirtqueueError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, final

import numpy as np
from numpy.typing import NDArray

from ..errors import VhostUserError, VirtqueueError
from ..mem.guest import GuestRam
from ._fence import fence
from .layout import (
    AVAIL_IDX_OFFSET,
    DESC_DTYPE,
    DESC_SIZE,
    USED_RING_OFFSET,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    avail_event_offset,
    avail_ring_size,
    desc_table_size,
    is_valid_queue_size,
    used_ring_size,
)
from .split import vring_need_event
from .state import QueueState

__all__ = ["DriverQueue", "QueueFull"]

_U16: Final = 0xFFFF
_FREE: Final = 0
_BATCH: Final = 1
_CHAIN: Final = 2


class QueueFull(VhostUserError):
    """Not enough free descriptors (or pool memory) to add a chain."""


class _Pool:
    """First-fit allocator over ``[base, base + size)`` with coalescing free blocks."""

    __slots__ = ("_free", "_sizes")

    def __init__(self, base: int, size: int) -> None:
        self._free: list[tuple[int, int]] = [(base, base + size)]  # sorted (start, end)
        self._sizes: dict[int, int] = {}

    def alloc(self, nbytes: int, align: int = 16) -> int | None:
        nbytes = max(nbytes, 1)
        for i, (start, end) in enumerate(self._free):
            addr = (start + align - 1) & -align
            if addr + nbytes <= end:
                pieces = [(s, e) for s, e in ((start, addr), (addr + nbytes, end)) if e > s]
                self._free[i : i + 1] = pieces
                self._sizes[addr] = nbytes
                return addr
        return None

    def free(self, addr: int) -> None:
        end = addr + self._sizes.pop(addr)
        self._free.append((addr, end))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for s, e in self._free:
            if merged and merged[-1][1] == s:
                merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
        self._free = merged


class _Record:
    """What the driver remembers about one chain it added with :meth:`DriverQueue.add`."""

    __slots__ = ("allocs", "descs", "writable", "written")

    def __init__(self, descs: list[int], allocs: list[int], writable: list[tuple[int, int]]):
        self.descs = descs
        self.allocs = allocs
        self.writable = writable
        self.written = 0


@final
class DriverQueue:
    """The driver side of one split ring in guest RAM. Not thread-safe."""

    def __init__(
        self, ram: GuestRam, size: int, *, event_idx: bool, indirect: bool, pool_size: int
    ) -> None:
        """Lay out a ring in ``ram``; prefer :meth:`create`."""
        if not is_valid_queue_size(size):
            raise ValueError(f"queue size {size} is not a power of two in 1..32768")
        self.ram: Final = ram
        self.size: Final = size
        self.event_idx: Final = event_idx
        self.indirect: Final = indirect
        self._mask: Final = size - 1
        self.desc_gpa: Final = ram.alloc(desc_table_size(size), 4096)
        self.avail_gpa: Final = ram.alloc(avail_ring_size(size), 64)
        self.used_gpa: Final = ram.alloc(used_ring_size(size), 4096)
        view = ram.view
        for gpa, length in (
            (self.desc_gpa, desc_table_size(size)),
            (self.avail_gpa, avail_ring_size(size)),
            (self.used_gpa, used_ring_size(size)),
        ):
            ram.fill(gpa, length, 0)  # "The driver MUST initialize flags in the used ring to 0"
        d = ram.offset(self.desc_gpa)
        a = ram.offset(self.avail_gpa)
        u = ram.offset(self.used_gpa)
        self._desc: Final[NDArray[np.void]] = view[d : d + desc_table_size(size)].view(DESC_DTYPE)
        self._avail: Final[NDArray[np.uint16]] = view[a : a + avail_ring_size(size)].view("<u2")
        self._avail_ring: Final = self._avail[2 : 2 + size]
        used = view[u : u + used_ring_size(size)]
        self._used_hdr: Final[NDArray[np.uint16]] = used[:USED_RING_OFFSET].view("<u2")
        ev = avail_event_offset(size)
        self._used_ring: Final[NDArray[np.uint32]] = (
            used[USED_RING_OFFSET:ev].view("<u4").reshape(size, 2)
        )
        self._avail_event: Final[NDArray[np.uint16]] = used[ev : ev + 2].view("<u2")
        self._pool: Final = _Pool(ram.alloc(pool_size, 64), pool_size)
        self._free: list[int] = list(range(size - 1, -1, -1))
        self._kind: Final = np.zeros(size, dtype=np.int8)
        self._records: dict[int, _Record] = {}
        self._retired: dict[int, _Record] = {}
        self._slot_base = 0
        self._slot_len = 0
        self._batch_addr: Final = np.zeros(size, dtype=np.uint64)
        self._batch_len: Final = np.zeros(size, dtype=np.uint32)
        self._batch_written: Final = np.zeros(size, dtype=np.uint32)
        self._avail_idx = 0  # shadow: entries written to the avail ring
        self._published = 0  # last avail.idx stored
        self._kick_checked = 0  # avail.idx at the last kick_needed()
        self._last_used = 0

    @classmethod
    def create(
        cls,
        ram: GuestRam,
        size: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        pool_size: int | None = None,
    ) -> DriverQueue:
        """Allocate a ring of ``size`` entries and a buffer pool (default ``2048 * size`` B)."""
        return cls(
            ram,
            size,
            event_idx=event_idx,
            indirect=indirect,
            pool_size=2048 * size if pool_size is None else pool_size,
        )

    # -- addresses -------------------------------------------------------------------------

    @property
    def desc_uva(self) -> int:
        """Frontend virtual address of the descriptor table (for SET_VRING_ADDR)."""
        return self.ram.uva(self.desc_gpa)

    @property
    def avail_uva(self) -> int:
        """Frontend virtual address of the available ring."""
        return self.ram.uva(self.avail_gpa)

    @property
    def used_uva(self) -> int:
        """Frontend virtual address of the used ring."""
        return self.ram.uva(self.used_gpa)

    def queue_state(self, *, next_avail: int = 0, next_used: int = 0) -> QueueState:
        """Return the :class:`QueueState` a device needs to serve this ring."""
        return QueueState(
            size=self.size,
            desc_gpa=self.desc_gpa,
            avail_gpa=self.avail_gpa,
            used_gpa=self.used_gpa,
            next_avail=next_avail,
            next_used=next_used,
            event_idx=self.event_idx,
            indirect=self.indirect,
        )

    @property
    def num_free(self) -> int:
        """Free descriptors."""
        return len(self._free)

    @property
    def avail_idx(self) -> int:
        """The driver's avail index: entries written, published or not."""
        return self._avail_idx

    @property
    def last_used(self) -> int:
        """The used index up to which :meth:`get_used` has consumed."""
        return self._last_used

    # -- adding ----------------------------------------------------------------------------

    def _alloc(self, nbytes: int, align: int = 16) -> int:
        addr = self._pool.alloc(nbytes, align)
        if addr is None and self._retired:
            for record in self._retired.values():
                for a in record.allocs:
                    self._pool.free(a)
            self._retired.clear()
            addr = self._pool.alloc(nbytes, align)
        if addr is None:
            raise QueueFull(f"buffer pool cannot hold {nbytes} more bytes")
        return addr

    def _retire(self, head: int) -> None:
        record = self._retired.pop(head, None)
        if record is not None:
            for a in record.allocs:
                self._pool.free(a)

    def add(
        self,
        readable: Sequence[bytes | int],
        writable: Sequence[int] = (),
        *,
        indirect: bool | None = None,
    ) -> int:
        """Add a chain and write its ring entry (call :meth:`publish` to expose it).

        Args:
            readable: device-readable buffers: bytes to copy in, or a length of zeroes.
            writable: lengths of device-writable buffers.
            indirect: put the buffers in an indirect table (default: the queue's setting
                when there is more than one buffer).

        Returns:
            The head descriptor index.

        Raises:
            QueueFull: not enough free descriptors or pool memory.
        """
        items: list[tuple[bytes | None, int, int]] = [
            (None, r, 0) if isinstance(r, int) else (bytes(r), len(r), 0) for r in readable
        ]
        items.extend((None, w, VIRTQ_DESC_F_WRITE) for w in writable)
        if not items:
            raise ValueError("a chain needs at least one buffer")
        use_indirect = (self.indirect and len(items) > 1) if indirect is None else indirect
        needed = 1 if use_indirect else len(items)
        if needed > len(self._free):
            raise QueueFull(f"{needed} descriptors needed, {len(self._free)} free")
        allocs: list[int] = []
        table = 0
        entries: list[tuple[int, int, int]] = []
        record_writable: list[tuple[int, int]] = []
        try:
            for payload, length, flags in items:
                addr = self._alloc(length)
                allocs.append(addr)
                if payload is not None:
                    self.ram.write(addr, payload)
                elif not flags:
                    self.ram.fill(addr, length, 0)
                else:
                    record_writable.append((addr, length))
                entries.append((addr, length, flags))
            if use_indirect:
                table = self._alloc(DESC_SIZE * len(entries))
                allocs.append(table)
        except QueueFull:
            for a in allocs:
                self._pool.free(a)
            raise
        descs = [self._free.pop() for _ in range(needed)]
        if use_indirect:
            self.write_indirect_table(table, entries)
            self.write_desc(descs[0], table, DESC_SIZE * len(entries), VIRTQ_DESC_F_INDIRECT)
        else:
            for i, (addr, length, flags) in enumerate(entries):
                last = i == len(entries) - 1
                nxt = 0 if last else descs[i + 1]
                self.write_desc(
                    descs[i], addr, length, flags | (0 if last else VIRTQ_DESC_F_NEXT), nxt
                )
        head = descs[0]
        self._retire(head)
        self._records[head] = _Record(descs, allocs, record_writable)
        self._kind[head] = _CHAIN
        self._batch_len[head] = 0
        self.push_avail(head)
        return head

    def add_batch(self, count: int, length: int, *, write: bool = False) -> NDArray[np.intp]:
        """Add ``count`` single-descriptor chains in one vectorised pass (for benchmarks).

        Each descriptor gets a fixed ``length``-byte slot buffer (contents not initialised).
        Call :meth:`publish` to expose them.

        Raises:
            QueueFull: fewer than ``count`` free descriptors.
        """
        if count > len(self._free):
            raise QueueFull(f"{count} descriptors needed, {len(self._free)} free")
        if count <= 0:
            return np.zeros(0, dtype=np.intp)
        if length > self._slot_len:
            self._slot_len = (max(length, 1) + 63) & -64
            self._slot_base = self.ram.alloc(self._slot_len * self.size, 64)
        heads = np.array(self._free[-count:], dtype=np.intp)
        del self._free[-count:]
        for head in self._retired.keys() & set(heads.tolist()):
            self._retire(head)
        rows = np.zeros(count, dtype=DESC_DTYPE)
        rows["addr"] = self._slot_base + heads * self._slot_len
        rows["len"] = length
        rows["flags"] = VIRTQ_DESC_F_WRITE if write else 0
        self._desc[heads] = rows
        self._kind[heads] = _BATCH
        self._batch_addr[heads] = rows["addr"]
        self._batch_len[heads] = length if write else 0
        start = self._avail_idx & self._mask
        end = start + count
        if end <= self.size:
            self._avail_ring[start:end] = heads
        else:
            split = self.size - start
            self._avail_ring[start:] = heads[:split]
            self._avail_ring[: end - self.size] = heads[split:]
        self._avail_idx = (self._avail_idx + count) & _U16
        return heads

    def publish(self) -> int:
        """Expose every entry written so far: store ``avail.idx`` after the ring entries.

        The ring entries were stored first; x86 TSO keeps that order ("The driver MUST perform
        a suitable memory barrier before the idx update").

        Returns:
            How many entries this call exposed.
        """
        exposed = (self._avail_idx - self._published) & _U16
        self._published = self._avail_idx
        self._avail[1] = self._avail_idx
        return exposed

    def kick_needed(self) -> bool:
        """Return whether to notify the device about entries published since the last call.

        Fences first ("The driver MUST perform a suitable memory barrier before reading flags
        or avail_event"). With EVENT_IDX: :func:`vring_need_event` on ``avail_event``;
        otherwise: unless ``used.flags`` has VIRTQ_USED_F_NO_NOTIFY.
        """
        new, old = self._published, self._kick_checked
        if new == old:
            return False
        self._kick_checked = new
        fence()
        if self.event_idx:
            return vring_need_event(int(self._avail_event[0]), new, old)
        return not int(self._used_hdr[0]) & VIRTQ_USED_F_NO_NOTIFY

    # -- used ring -------------------------------------------------------------------------

    def has_used(self) -> bool:
        """Return whether the device has used entries not consumed yet."""
        return int(self._used_hdr[1]) != self._last_used

    def get_used(self) -> list[tuple[int, int]]:
        """Consume the used ring: return ``(head, written)`` pairs and free their descriptors.

        Buffers of chains from :meth:`add` stay readable with :meth:`read_written` until the
        head is reused or the pool runs short.

        Raises:
            VirtqueueError: the device returned an unknown head or a runaway used index.
        """
        taken = self._take_used()
        if taken is None:
            return []
        elems, used_idx = taken
        heads = elems[:, 0]
        head_list = heads.tolist()
        if (self._kind[heads] == _BATCH).all() and len(set(head_list)) == len(head_list):
            self._kind[heads] = _FREE
            self._batch_written[heads] = elems[:, 1]
            self._free.extend(head_list)
        else:
            self._complete_each(elems)
        self._last_used = used_idx
        return [(h, w) for h, w in elems.tolist()]

    def consume_used(self) -> int:
        """Consume the used ring like :meth:`get_used` but return only the count.

        The vectorised twin for drivers that post with :meth:`add_batch` and do not look at
        each completion (benchmarks): no per-entry Python objects are built.

        Raises:
            VirtqueueError: the device returned an unknown head or a runaway used index.
        """
        taken = self._take_used()
        if taken is None:
            return 0
        elems, used_idx = taken
        heads = elems[:, 0]
        if not (self._kind[heads] == _BATCH).all() or np.unique(heads).size != len(heads):
            self._complete_each(elems)
        else:
            self._kind[heads] = _FREE
            self._batch_written[heads] = elems[:, 1]
            self._free.extend(heads.tolist())
        self._last_used = used_idx
        return len(heads)

    def _take_used(self) -> tuple[NDArray[np.uint32], int] | None:
        """Copy the used entries added since the last consumption, with the new used index.

        Returns None when there are none. The caller moves ``_last_used`` once the
        entries are accounted for.

        Raises:
            VirtqueueError: a runaway used index, or a head outside the ring.
        """
        used_idx = int(self._used_hdr[1])
        n = (used_idx - self._last_used) & _U16
        if n > self.size:
            raise VirtqueueError(f"used.idx ran {n} entries ahead on a ring of {self.size}")
        if n == 0:
            return None
        start = self._last_used & self._mask
        end = start + n
        if end <= self.size:
            elems = self._used_ring[start:end].copy()
        else:
            elems = np.concatenate((self._used_ring[start:], self._used_ring[: end - self.size]))
        if int(elems[:, 0].max()) >= self.size:
            raise VirtqueueError("device returned a head outside the ring")
        return elems, used_idx

    def _complete_each(self, elems: NDArray[np.uint32]) -> None:
        """Complete used entries one by one (mixed or suspicious batches)."""
        for head, written in elems.tolist():
            self._complete(head, written)

    def _complete(self, head: int, written: int) -> None:
        kind = self._kind[head]
        if kind == _FREE:
            raise VirtqueueError(f"device returned head {head}, which is not in flight")
        self._kind[head] = _FREE
        if kind == _BATCH:
            self._batch_written[head] = written
            self._free.append(head)
            return
        record = self._records.pop(head)
        record.written = written
        self._free.extend(reversed(record.descs))
        self._retired[head] = record

    def read_written(self, head: int) -> bytes:
        """Return the bytes the device reported writing into chain ``head`` (used ``len``).

        The length is capped at the chain's writable size.

        Raises:
            KeyError: ``head`` has no completed chain whose buffers are still kept.
        """
        record = self._retired.get(head)
        if record is None:
            if self._batch_len[head] == 0 or self._kind[head] != _FREE:
                raise KeyError(head)
            n = min(int(self._batch_written[head]), int(self._batch_len[head]))
            return self.ram.read(int(self._batch_addr[head]), n)
        left = record.written
        parts = []
        for addr, length in record.writable:
            take = min(left, length)
            parts.append(self.ram.read(addr, take))
            left -= take
        return b"".join(parts)

    def disable_interrupts(self) -> None:
        """Ask the device not to notify (VIRTQ_AVAIL_F_NO_INTERRUPT; no-op with EVENT_IDX)."""
        if not self.event_idx:
            self._avail[0] = int(self._avail[0]) | VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_interrupts(self) -> bool:
        """Ask for a notification on the next used entry, fence, and re-check.

        With EVENT_IDX sets ``used_event`` to :attr:`last_used`, otherwise clears
        VIRTQ_AVAIL_F_NO_INTERRUPT.

        Returns:
            True if used entries are already there (consume them instead of waiting).
        """
        if self.event_idx:
            self.set_used_event(self._last_used)
        else:
            self._avail[0] = int(self._avail[0]) & ~VIRTQ_AVAIL_F_NO_INTERRUPT & _U16
        fence()
        return self.has_used()

    # -- raw access, including for corrupting the ring on purpose -------------------------

    def set_used_event(self, value: int) -> None:
        """Store ``avail.used_event``."""
        self._avail[2 + self.size] = value & _U16

    def set_avail_flags(self, value: int) -> None:
        """Store ``avail.flags``."""
        self._avail[0] = value & _U16

    def set_avail_idx(self, value: int) -> None:
        """Store ``avail.idx`` raw, bypassing the driver's bookkeeping."""
        self._avail[AVAIL_IDX_OFFSET // 2] = value & _U16

    def avail_event(self) -> int:
        """Read ``used.avail_event``."""
        return int(self._avail_event[0])

    def used_flags(self) -> int:
        """Read ``used.flags``."""
        return int(self._used_hdr[0])

    def used_idx(self) -> int:
        """Read ``used.idx``."""
        return int(self._used_hdr[1])

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        """Store descriptor ``index`` raw (any values; ``addr`` is taken modulo 2^64)."""
        self._desc[index] = (addr % (1 << 64), length & 0xFFFF_FFFF, flags & _U16, nxt & _U16)

    def write_avail_slot(self, slot: int, head: int) -> None:
        """Store ``avail.ring[slot % size]`` raw."""
        self._avail_ring[slot & self._mask] = head & _U16

    def push_avail(self, head: int) -> None:
        """Write ``head`` into the next avail slot and count it (any value; see :meth:`publish`)."""
        self.write_avail_slot(self._avail_idx, head)
        self._avail_idx = (self._avail_idx + 1) & _U16

    def skip_to(self, index: int) -> None:
        """Start the (empty) ring at another index: sets avail and used state to ``index``.

        For tests of 16-bit wrap-around; build the device queue with the same next_avail and
        next_used.
        """
        if self._avail_idx != self._last_used:
            raise ValueError("skip_to needs an empty ring")
        index &= _U16
        self._avail_idx = self._published = self._kick_checked = self._last_used = index
        self._avail[1] = index
        self._used_hdr[1] = index

    def write_indirect_table(self, gpa: int, entries: Sequence[tuple[int, int, int]]) -> None:
        """Write an indirect table at ``gpa``: ``(addr, len, flags)`` entries chained in order.

        NEXT is added to every entry but the last, with ``next = i + 1``.
        """
        table = np.zeros(len(entries), dtype=DESC_DTYPE)
        for i, (addr, length, flags) in enumerate(entries):
            last = i == len(entries) - 1
            table[i] = (
                addr,
                length,
                flags | (0 if last else VIRTQ_DESC_F_NEXT),
                0 if last else i + 1,
            )
        self.ram.write(gpa, table.tobytes())

    def alloc(self, nbytes: int, align: int = 16) -> int:
        """Allocate scratch guest memory from the queue's pool (never freed)."""
        return self._alloc(nbytes, align)
