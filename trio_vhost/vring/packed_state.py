"""PackedQueueState: the plain data that describes one packed virtqueue, and its vring base.

The packed twin of :class:`~trio_vhost.vring.state.QueueState`, kept separate because every
rule differs: any Queue Size up to 32768 (not only powers of two), other parts and
alignments, and ring positions that are an index below the Queue Size plus a wrap counter
instead of free-running 16-bit indices. Like QueueState it is UNTRUSTED: building one checks
nothing beyond Python types; :meth:`PackedQueueState.validate` checks the plain-data rules
and ``PackedQueue(table, state)`` checks them again together with the memory table.

**The vhost-user encoding** (vhost-user spec, "Vring descriptor indices for packed
virtqueues"): SET_VRING_BASE's and GET_VRING_BASE's 32-bit ``num`` carries both positions,
because a packed ring keeps neither in guest memory::

    bits 0-14   next_avail  the next descriptor the back-end will process
    bit  15     avail_wrap  the Driver (Available) Ring Wrap Counter
    bits 16-30  next_used   where the back-end will place the next used descriptor
    bit  31     used_wrap   the Device (Used) Ring Wrap Counter

No protocol feature gates this: the payload type follows from the ring type, i.e. from
VIRTIO_F_RING_PACKED (bit 34) being acked. The spec calls each index "free-running, not
wrapped by the ring size", words carried over from the split layout; a packed index is a
slot number, below the Queue Size (QEMU and DPDK send exactly that), and 15 bits cannot
hold more. :meth:`PackedQueueState.validate` therefore requires each index ``< size``.

SET_VRING_ADDR's three addresses mean, for a packed ring: ``descriptor`` the Descriptor Area
(descriptor ring), ``available`` the Driver Area (driver event suppression) and ``used`` the
Device Area (device event suppression): the fields keep their split-ring order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final, NamedTuple, final

from ..errors import VirtqueueError
from .packed_layout import (
    DESC_RING_ALIGN,
    EVENT_ALIGN,
    EVENT_SUPPRESS_SIZE,
    desc_ring_size,
    is_valid_packed_size,
    to_position,
)

if TYPE_CHECKING:
    from ..mem.table import MemoryTable

__all__ = [
    "FRESH_VRING_BASE",
    "PackedQueueState",
    "PackedRingBase",
    "decode_vring_base",
    "encode_vring_base",
]

_U64_LIMIT: Final = 1 << 64
_INDEX_MASK: Final = 0x7FFF
_WRAP: Final = 1 << 15

#: The vring base of a ring nothing has gone through: both indices 0, both wrap counters 1
#: ("each of the driver and the device are expected to maintain ... a single-bit ring wrap
#: counter initialized to 1").
FRESH_VRING_BASE: Final = _WRAP << 16 | _WRAP


class PackedRingBase(NamedTuple):
    """Both ring positions of a packed ring, as SET/GET_VRING_BASE carry them."""

    next_avail: int
    avail_wrap: bool
    next_used: int
    used_wrap: bool


def encode_vring_base(next_avail: int, avail_wrap: bool, next_used: int, used_wrap: bool) -> int:
    """Return the 32-bit vring base of a packed ring (GET_VRING_BASE's reply ``num``).

    Raises:
        ValueError: an index that does not fit 15 bits.
    """
    for name, index in (("next_avail", next_avail), ("next_used", next_used)):
        if not 0 <= index <= _INDEX_MASK:
            raise ValueError(f"{name} {index} does not fit the 15 bits of a packed vring base")
    avail = next_avail | (_WRAP if avail_wrap else 0)
    used = next_used | (_WRAP if used_wrap else 0)
    return used << 16 | avail


def decode_vring_base(value: int) -> PackedRingBase:
    """Split SET_VRING_BASE's 32-bit ``num`` of a packed ring into its four parts.

    Every 32-bit value decodes; whether the indices fit the ring is for
    :meth:`PackedQueueState.validate` to say.

    Raises:
        ValueError: ``value`` is not a 32-bit unsigned number.
    """
    if not 0 <= value <= 0xFFFF_FFFF:
        raise ValueError(f"packed vring base {value!r} is not a 32-bit value")
    avail, used = value & 0xFFFF, value >> 16
    return PackedRingBase(
        avail & _INDEX_MASK, bool(avail & _WRAP), used & _INDEX_MASK, bool(used & _WRAP)
    )


@final
@dataclass(frozen=True, slots=True)
class PackedQueueState:
    """The layout and position of one packed ring (untrusted plain data).

    Attributes:
        size: Queue Size (SET_VRING_NUM): 1..32768.
        desc_gpa: guest-physical address of the Descriptor Ring (16-byte aligned).
        driver_gpa: guest-physical address of the Driver Event Suppression structure
            (4-byte aligned; the device only reads it).
        device_gpa: guest-physical address of the Device Event Suppression structure
            (4-byte aligned; the device writes it).
        next_avail: the ring index of the next descriptor the device will read.
        avail_wrap: the Driver Ring Wrap Counter the device expects there (starts at 1).
        next_used: the ring index where the device writes its next used descriptor.
        used_wrap: the Device Ring Wrap Counter (starts at 1).
        event_idx: VIRTIO_F_EVENT_IDX (bit 29) was negotiated: RING_EVENT_FLAGS_DESC is valid.
        indirect: VIRTIO_F_INDIRECT_DESC (bit 28) was negotiated.
        log_guest_addr: the frontend's log address for the ring, carried along only.
    """

    size: int
    desc_gpa: int
    driver_gpa: int
    device_gpa: int
    next_avail: int = 0
    avail_wrap: bool = True
    next_used: int = 0
    used_wrap: bool = True
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
        driver_uva: int,
        device_uva: int,
        vring_base: int = FRESH_VRING_BASE,
        event_idx: bool = False,
        indirect: bool = False,
        log_guest_addr: int | None = None,
    ) -> PackedQueueState:
        """Build a state from SET_VRING_ADDR's frontend virtual addresses and SET_VRING_BASE.

        ``vring_base`` defaults to a fresh ring: both indices 0, both wrap counters 1.

        Raises:
            VirtqueueError: a bad size (needed to know how long the descriptor ring is).
            GuestMemoryError: a ring part that no single region maps.
            ValueError: ``vring_base`` is not a 32-bit value.
        """
        if not is_valid_packed_size(size):
            raise VirtqueueError(f"packed queue size {size} is not in 1..32768")
        base = decode_vring_base(vring_base)
        return cls(
            size=size,
            desc_gpa=table.uva_to_gpa(desc_uva, desc_ring_size(size)),
            driver_gpa=table.uva_to_gpa(driver_uva, EVENT_SUPPRESS_SIZE),
            device_gpa=table.uva_to_gpa(device_uva, EVENT_SUPPRESS_SIZE),
            next_avail=base.next_avail,
            avail_wrap=base.avail_wrap,
            next_used=base.next_used,
            used_wrap=base.used_wrap,
            event_idx=event_idx,
            indirect=indirect,
            log_guest_addr=log_guest_addr,
        )

    @property
    def vring_base(self) -> int:
        """The 32-bit value to reply to GET_VRING_BASE (call after :meth:`validate`)."""
        return encode_vring_base(self.next_avail, self.avail_wrap, self.next_used, self.used_wrap)

    def with_vring_base(self, value: int) -> PackedQueueState:
        """Return a copy at the positions of a SET_VRING_BASE ``num``.

        Raises:
            ValueError: ``value`` is not a 32-bit value.
        """
        base = decode_vring_base(value)
        return self.with_positions(*base)

    def with_positions(
        self, next_avail: int, avail_wrap: bool, next_used: int, used_wrap: bool
    ) -> PackedQueueState:
        """Return a copy at other ring positions."""
        return replace(
            self,
            next_avail=next_avail,
            avail_wrap=avail_wrap,
            next_used=next_used,
            used_wrap=used_wrap,
        )

    @property
    def in_flight(self) -> int:
        """Descriptors between the used and available positions (popped, not yet used)."""
        n = self.size
        avail = to_position(self.next_avail, bool(self.avail_wrap), n)
        used = to_position(self.next_used, bool(self.used_wrap), n)
        return (avail - used) % (2 * n)

    def validate(self) -> None:
        """Check the rules that need no memory table.

        * Queue Size in 1..32768 ("Packed virtqueues support up to 2^15 entries each");
        * each part aligned as "Structure Size and Alignment" demands (driver MUST);
        * each part fits in 64-bit guest-physical space;
        * each index is a slot of the ring (``< size``), each wrap counter a bool or 0/1;
        * the used position is at most a ring behind the available one: the device never
          has more than N descriptors in flight, and never uses one it has not read.

        Raises:
            VirtqueueError: a rule is broken.
        """
        size = self.size
        if not isinstance(size, int) or not is_valid_packed_size(size):
            raise VirtqueueError(f"packed queue size {size!r} is not in 1..32768")
        parts = (
            ("descriptor ring", self.desc_gpa, DESC_RING_ALIGN, desc_ring_size(size)),
            ("driver event suppression", self.driver_gpa, EVENT_ALIGN, EVENT_SUPPRESS_SIZE),
            ("device event suppression", self.device_gpa, EVENT_ALIGN, EVENT_SUPPRESS_SIZE),
        )
        for name, gpa, align, length in parts:
            if not isinstance(gpa, int) or gpa < 0 or gpa + length > _U64_LIMIT:
                raise VirtqueueError(f"{name} address {gpa!r} out of range")
            if gpa % align:
                raise VirtqueueError(f"{name} at {gpa:#x} is not {align}-byte aligned")
        for name, index in (("next_avail", self.next_avail), ("next_used", self.next_used)):
            if not isinstance(index, int) or not 0 <= index < size:
                raise VirtqueueError(f"{name} {index!r} is not a slot of a ring of {size}")
        for name, wrap in (("avail_wrap", self.avail_wrap), ("used_wrap", self.used_wrap)):
            if wrap not in (0, 1):  # True and False compare equal to 1 and 0
                raise VirtqueueError(f"{name} {wrap!r} is not a one-bit wrap counter")
        if self.in_flight > size:
            raise VirtqueueError(
                f"used position ({self.next_used}, wrap {int(self.used_wrap)}) is not within"
                f" a ring of {size} behind avail ({self.next_avail}, wrap {int(self.avail_wrap)})"
            )
