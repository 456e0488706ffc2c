"""QueueState: the plain data that describes one split virtqueue.

A QueueState is what the control task gathers from SET_VRING_NUM / ADDR / BASE and the
negotiated features, what GET_VRING_BASE and snapshots publish, and what RESTORE brings back.
It is UNTRUSTED: every field may come from the frontend. Building one checks nothing beyond
Python types; :meth:`QueueState.validate` checks the plain-data rules and
``SplitQueue(table, state)`` checks them again together with the memory table.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, final

from ..errors import VirtqueueError
from .layout import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    USED_ALIGN,
    avail_ring_size,
    desc_table_size,
    is_valid_queue_size,
    used_ring_size,
)

if TYPE_CHECKING:
    from ..mem.table import MemoryTable

__all__ = ["QueueState"]

_U64_LIMIT = 1 << 64


@final
@dataclass(frozen=True, slots=True)
class QueueState:
    """The position and layout of one split ring (untrusted plain data).

    Attributes:
        size: Queue Size (SET_VRING_NUM): a power of two in 1..32768.
        desc_gpa: guest-physical address of the descriptor table (16-byte aligned).
        avail_gpa: guest-physical address of the available ring (2-byte aligned).
        used_gpa: guest-physical address of the used ring (4-byte aligned).
        next_avail: the next available-ring index the device will read (SET_VRING_BASE).
        next_used: the next used-ring index the device will write.
        event_idx: VIRTIO_F_EVENT_IDX (bit 29) was negotiated.
        indirect: VIRTIO_F_INDIRECT_DESC (bit 28) was negotiated.
        log_guest_addr: the used ring's address for dirty logging, if the frontend gave one
            (carried along only; this package does no dirty logging).
    """

    size: int
    desc_gpa: int
    avail_gpa: int
    used_gpa: int
    next_avail: int = 0
    next_used: int = 0
    event_idx: bool = False
    indirect: bool = False
    log_guest_addr: int | None = None

    @classmethod
    def from_frontend(
        cls,
        table: MemoryTable,
        *,
        size: int,
        desc_uva: int,
        avail_uva: int,
        used_uva: int,
        next_avail: int = 0,
        next_used: int = 0,
        event_idx: bool = False,
        indirect: bool = False,
        log_guest_addr: int | None = None,
    ) -> QueueState:
        """Build a state from SET_VRING_ADDR's frontend virtual addresses.

        Each ring part must lie inside one region of ``table``.

        Raises:
            VirtqueueError: a bad size (needed to know how long each part is).
            GuestMemoryError: a ring part that no region maps.
        """
        if not is_valid_queue_size(size):
            raise VirtqueueError(f"queue size {size} is not a power of two in 1..32768")
        return cls(
            size=size,
            desc_gpa=table.uva_to_gpa(desc_uva, desc_table_size(size)),
            avail_gpa=table.uva_to_gpa(avail_uva, avail_ring_size(size)),
            used_gpa=table.uva_to_gpa(used_uva, used_ring_size(size)),
            next_avail=next_avail,
            next_used=next_used,
            event_idx=event_idx,
            indirect=indirect,
            log_guest_addr=log_guest_addr,
        )

    def validate(self) -> None:
        """Check the rules that need no memory table.

        * Queue Size is a power of two, at most 32768 ("Split Virtqueues");
        * each part is aligned as the spec's table demands: the driver MUST ensure it
          ("Virtqueues", driver requirements);
        * each part fits in 64-bit guest-physical space;
        * the ring indices are 16-bit values.

        Raises:
            VirtqueueError: a rule is broken.
        """
        size = self.size
        if not isinstance(size, int) or not is_valid_queue_size(size):
            raise VirtqueueError(f"queue size {size!r} is not a power of two in 1..32768")
        parts = (
            ("descriptor table", self.desc_gpa, DESC_ALIGN, desc_table_size(size)),
            ("available ring", self.avail_gpa, AVAIL_ALIGN, avail_ring_size(size)),
            ("used ring", self.used_gpa, USED_ALIGN, used_ring_size(size)),
        )
        for name, gpa, align, length in parts:
            if not isinstance(gpa, int) or gpa < 0 or gpa + length > _U64_LIMIT:
                raise VirtqueueError(f"{name} address {gpa!r} out of range")
            if gpa % align:
                raise VirtqueueError(f"{name} at {gpa:#x} is not {align}-byte aligned")
        for name, index in (("next_avail", self.next_avail), ("next_used", self.next_used)):
            if not isinstance(index, int) or not 0 <= index <= 0xFFFF:
                raise VirtqueueError(f"{name} {index!r} is not a 16-bit ring index")

    def with_indices(self, next_avail: int, next_used: int) -> QueueState:
        """Return a copy at other ring positions (SET_VRING_BASE, GET_VRING_BASE)."""
        return replace(self, next_avail=next_avail, next_used=next_used)
