"""Byte layout and position arithmetic of the packed virtqueue (VIRTIO 1.x "Packed Virtqueues").

Spec citations in the packed modules name the subsection of ``packed-ring.tex`` they come from.
Every field is little-endian (``'<'``). A packed ring has three parts, each physically
contiguous in guest memory ("Structure Size and Alignment")::

    part                                      alignment   size (bytes)
    Descriptor Ring          (Descriptor Area)  16         16 * N
    Driver Event Suppression (Driver Area)       4          4   read-only for the device
    Device Event Suppression (Device Area)       4          4   written by the device

Queue Size N is any number in 1..32768: unlike a split ring it need not be a power of two.

**Ring positions.** Driver and device each walk the ring with an index in ``0..N-1`` and a
one-bit wrap counter that starts at 1 and flips each time the index passes the end ("Driver
and Device Ring Wrap Counters"). The pair repeats with period ``2N``, so this package
folds it into one *position* in ``0..2N-1``::

    position = index + (0 if wrap else N)        index = position mod N, wrap = position < N

Positions make distances plain modular arithmetic: "how many descriptors lie between the
device's used and available positions" is ``(avail - used) mod 2N``, at most N.
"""

from __future__ import annotations

from typing import Final

import numpy as np

__all__ = [
    "DESC_RING_ALIGN",
    "EVENT_ALIGN",
    "EVENT_SUPPRESS_SIZE",
    "MAX_PACKED_QUEUE_SIZE",
    "MAX_INDIRECT_ENTRIES",
    "PACKED_DESC_DTYPE",
    "PACKED_DESC_SIZE",
    "RING_EVENT_FLAGS_DESC",
    "RING_EVENT_FLAGS_DISABLE",
    "RING_EVENT_FLAGS_ENABLE",
    "VIRTQ_DESC_F_AVAIL",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_USED",
    "VIRTQ_DESC_F_WRITE",
    "avail_flags",
    "desc_ring_size",
    "event_word",
    "from_position",
    "is_valid_packed_size",
    "off_wrap",
    "packed_need_event",
    "split_event_word",
    "to_position",
    "used_flags",
]

#: ``struct pvirtq_desc`` ("The Virtqueue Descriptor Format"), 16 bytes::
#:
#:     offset 0  le64 addr   buffer address (unused in a used descriptor)
#:     offset 8  le32 len    buffer length; in a used descriptor, the bytes written
#:     offset 12 le16 id     Buffer ID (meaningful in the last descriptor of a list)
#:     offset 14 le16 flags  VIRTQ_DESC_F_*
#:
#: An indirect table is an array of the same structure; there only WRITE means anything.
PACKED_DESC_DTYPE: Final = np.dtype(
    [("addr", "<u8"), ("len", "<u4"), ("id", "<u2"), ("flags", "<u2")]
)
PACKED_DESC_SIZE: Final = 16

#: Minimum alignment of each part ("Structure Size and Alignment": the driver MUST respect it).
DESC_RING_ALIGN: Final = 16
EVENT_ALIGN: Final = 4
#: ``struct pvirtq_event_suppress``: le16 off_wrap at offset 0, le16 flags at offset 2.
EVENT_SUPPRESS_SIZE: Final = 4

#: "Packed virtqueues support up to 2^15 entries each."
MAX_PACKED_QUEUE_SIZE: Final = 32768
#: The longest indirect table accepted: the same cap as for split rings (chain.py), the
#: largest list a driver can describe to a device that sets no limit of its own.
MAX_INDIRECT_ENTRIES: Final = 32768

#: Descriptor flags ("Next Flag", "Write Flag", "Indirect Flag", "Driver and Device Ring
#: Wrap Counters").
VIRTQ_DESC_F_NEXT: Final = 1
VIRTQ_DESC_F_WRITE: Final = 2
VIRTQ_DESC_F_INDIRECT: Final = 4
VIRTQ_DESC_F_AVAIL: Final = 1 << 7
VIRTQ_DESC_F_USED: Final = 1 << 15

#: Descriptor Ring Change Event Flags ("Driver and Device Event Suppression"); 3 is reserved.
RING_EVENT_FLAGS_ENABLE: Final = 0x0
RING_EVENT_FLAGS_DISABLE: Final = 0x1
#: Only valid when VIRTIO_F_EVENT_IDX was negotiated.
RING_EVENT_FLAGS_DESC: Final = 0x2

_WRAP_BIT: Final = 1 << 15


def is_valid_packed_size(size: int) -> bool:
    """Return whether ``size`` is a legal packed Queue Size: 1..32768, any value."""
    return 0 < size <= MAX_PACKED_QUEUE_SIZE


def desc_ring_size(size: int) -> int:
    """Return the byte size of a descriptor ring of ``size`` entries (16 * N)."""
    return PACKED_DESC_SIZE * size


def avail_flags(wrap: bool) -> int:
    """Return the AVAIL/USED bits that mark a descriptor available under ``wrap``.

    "To mark a descriptor as available, the driver sets the VIRTQ_DESC_F_AVAIL bit in Flags
    to match the internal Driver Ring Wrap Counter. It also sets the VIRTQ_DESC_F_USED bit to
    match the inverse value."
    """
    return VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED


def used_flags(wrap: bool) -> int:
    """Return the AVAIL/USED bits that mark a descriptor used under ``wrap`` (both equal)."""
    return VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED if wrap else 0


def to_position(index: int, wrap: bool, size: int) -> int:
    """Fold a ring ``index`` and wrap counter into a position in ``0..2N-1``."""
    return index if wrap else index + size


def from_position(position: int, size: int) -> tuple[int, bool]:
    """Split a position in ``0..2N-1`` into ``(index, wrap)``."""
    if position < size:
        return position, True
    return position - size, False


def off_wrap(index: int, wrap: bool) -> int:
    """Encode the ``desc`` field of an event suppression structure (offset : 15, wrap : 1)."""
    return (index & 0x7FFF) | (_WRAP_BIT if wrap else 0)


def event_word(flags: int, index: int = 0, wrap: bool = False) -> int:
    """Return a whole event suppression structure as one little-endian 32-bit value.

    The structure is 4-byte aligned, so one aligned 32-bit store (or load) moves it whole:
    the peer never sees new flags with a stale offset.
    """
    return (flags & 0x3) << 16 | off_wrap(index, wrap)


def split_event_word(word: int) -> tuple[int, int, bool]:
    """Decode a 32-bit event suppression value into ``(flags, offset, wrap)``."""
    return (word >> 16) & 0x3, word & 0x7FFF, bool(word & _WRAP_BIT)


def packed_need_event(desc: int, old: int, new: int, size: int) -> bool:
    """Return whether moving a position from ``old`` to ``new`` passed the event descriptor.

    ``desc`` is the event structure's ``off_wrap`` field: "Event will only trigger when this
    descriptor is made available/used respectively" and the Ring Wrap Counter matches its
    wrap bit. The descriptors just made available (or used) are the positions
    ``old, old + 1, .., new - 1`` (modulo 2N); the event fires if ``desc`` is one of them.

    The caller must not move more than ``2N - 1`` positions between two checks (a full
    ``2N`` would look like no move at all): the device and driver here check once per batch,
    and a batch never exceeds N descriptors. An offset outside the ring (a driver bug) always
    fires: a spurious notification is harmless ("The driver MUST handle spurious
    notifications from the device"), a missing one hangs the queue.
    """
    index = desc & 0x7FFF
    if index >= size:
        return True
    event = to_position(index, bool(desc & _WRAP_BIT), size)
    period = 2 * size
    return (event - old) % period < (new - old) % period
