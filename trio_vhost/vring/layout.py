"""Byte layouts of the split virtqueue (VIRTIO 1.x "Split Virtqueues"), as numpy dtypes.

Spec citations in this package name the section of ``split-ring.tex`` they come from.

Every field is little-endian (``'<'``) as the non-legacy spec requires, so the dtypes are
correct on any host. A split ring has three parts, each physically contiguous in guest
memory (the alignment table at the top of "Split Virtqueues")::

    part              alignment   size (bytes)
    descriptor table  16          16 * N
    available ring     2          6 + 2 * N   (flags, idx, ring[N], used_event)
    used ring          4          6 + 8 * N   (flags, idx, ring[N], avail_event)

``used_event`` and ``avail_event`` only mean something with VIRTIO_F_EVENT_IDX, but the
sizes above always include them (the spec's table does not depend on the feature).
"""

from __future__ import annotations

from typing import Final

import numpy as np

__all__ = [
    "AVAIL_ALIGN",
    "AVAIL_FLAGS_OFFSET",
    "AVAIL_IDX_OFFSET",
    "AVAIL_RING_OFFSET",
    "DESC_ALIGN",
    "DESC_DTYPE",
    "DESC_SIZE",
    "MAX_QUEUE_SIZE",
    "USED_ALIGN",
    "USED_ELEM_DTYPE",
    "USED_ELEM_SIZE",
    "USED_FLAGS_OFFSET",
    "USED_IDX_OFFSET",
    "USED_RING_OFFSET",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "avail_event_offset",
    "avail_ring_size",
    "desc_table_size",
    "is_valid_queue_size",
    "used_event_offset",
    "used_ring_size",
]

#: ``struct virtq_desc`` ("The Virtqueue Descriptor Table"), 16 bytes::
#:
#:     offset 0  le64 addr   guest-physical address of the buffer
#:     offset 8  le32 len    length of the buffer in bytes
#:     offset 12 le16 flags  VIRTQ_DESC_F_*
#:     offset 14 le16 next   index of the next descriptor if flags & NEXT
DESC_DTYPE: Final = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])

#: ``struct virtq_used_elem`` ("The Virtqueue Used Ring"), 8 bytes::
#:
#:     offset 0  le32 id   head index of the used descriptor chain
#:     offset 4  le32 len  bytes written into the device-writable part of the chain
USED_ELEM_DTYPE: Final = np.dtype([("id", "<u4"), ("len", "<u4")])

DESC_SIZE: Final = 16
USED_ELEM_SIZE: Final = 8

#: Minimum alignment of each part ("Split Virtqueues": the driver MUST respect it).
DESC_ALIGN: Final = 16
AVAIL_ALIGN: Final = 2
USED_ALIGN: Final = 4

#: Queue Size is a power of two no larger than 32768 ("Split Virtqueues").
MAX_QUEUE_SIZE: Final = 32768

#: Descriptor flags ("The Virtqueue Descriptor Table").
VIRTQ_DESC_F_NEXT: Final = 1
VIRTQ_DESC_F_WRITE: Final = 2
VIRTQ_DESC_F_INDIRECT: Final = 4

#: ``avail.flags``: the driver does not want used-buffer notifications
#: ("Used Buffer Notification Suppression").
VIRTQ_AVAIL_F_NO_INTERRUPT: Final = 1
#: ``used.flags``: the device does not want available-buffer notifications
#: ("Available Buffer Notification Suppression").
VIRTQ_USED_F_NO_NOTIFY: Final = 1

#: Byte offsets inside ``struct virtq_avail``: le16 flags, le16 idx, le16 ring[N], le16 used_event.
AVAIL_FLAGS_OFFSET: Final = 0
AVAIL_IDX_OFFSET: Final = 2
AVAIL_RING_OFFSET: Final = 4

#: Byte offsets inside ``struct virtq_used``: le16 flags, le16 idx, elem ring[N], le16 avail_event.
USED_FLAGS_OFFSET: Final = 0
USED_IDX_OFFSET: Final = 2
USED_RING_OFFSET: Final = 4


def is_valid_queue_size(size: int) -> bool:
    """Return whether ``size`` is a legal Queue Size: a power of two in 1..32768.

    "Split Virtqueues": Queue Size is always a power of 2, at most 32768.
    """
    return 0 < size <= MAX_QUEUE_SIZE and size & (size - 1) == 0


def desc_table_size(size: int) -> int:
    """Return the byte size of a descriptor table of ``size`` entries (16 * N)."""
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    """Return the byte size of an available ring of ``size`` entries (6 + 2 * N)."""
    return 6 + 2 * size


def used_ring_size(size: int) -> int:
    """Return the byte size of a used ring of ``size`` entries (6 + 8 * N)."""
    return 6 + USED_ELEM_SIZE * size


def used_event_offset(size: int) -> int:
    """Return the byte offset of ``used_event`` inside the available ring."""
    return AVAIL_RING_OFFSET + 2 * size


def avail_event_offset(size: int) -> int:
    """Return the byte offset of ``avail_event`` inside the used ring."""
    return USED_RING_OFFSET + USED_ELEM_SIZE * size
