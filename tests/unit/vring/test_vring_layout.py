"""Ring layouts: dtype sizes and offsets, part sizes, flag values."""

from __future__ import annotations

import numpy as np
import pytest

from trio_vhost.vring import layout


def test_descriptor_dtype():
    dt = layout.DESC_DTYPE
    assert dt.itemsize == layout.DESC_SIZE == 16
    assert [dt.fields[name][1] for name in ("addr", "len", "flags", "next")] == [0, 8, 12, 14]
    assert [dt.fields[name][0] for name in dt.names] == [
        np.dtype(t) for t in ("<u8", "<u4", "<u2", "<u2")
    ]
    raw = np.zeros(1, dt)
    raw[0] = (0x1122334455667788, 0xAABBCCDD, 0x0102, 0x0304)
    assert raw.tobytes() == bytes.fromhex("8877665544332211 ddccbbaa 0201 0403".replace(" ", ""))


def test_used_elem_dtype():
    dt = layout.USED_ELEM_DTYPE
    assert dt.itemsize == layout.USED_ELEM_SIZE == 8
    assert [dt.fields[name][1] for name in ("id", "len")] == [0, 4]


@pytest.mark.parametrize("n", [1, 2, 256, 1024, 32768])
def test_part_sizes(n):
    assert layout.desc_table_size(n) == 16 * n
    assert layout.avail_ring_size(n) == 6 + 2 * n
    assert layout.used_ring_size(n) == 6 + 8 * n
    assert layout.used_event_offset(n) == layout.avail_ring_size(n) - 2
    assert layout.avail_event_offset(n) == layout.used_ring_size(n) - 2


def test_alignments_and_flags():
    assert (layout.DESC_ALIGN, layout.AVAIL_ALIGN, layout.USED_ALIGN) == (16, 2, 4)
    assert layout.VIRTQ_DESC_F_NEXT == 1
    assert layout.VIRTQ_DESC_F_WRITE == 2
    assert layout.VIRTQ_DESC_F_INDIRECT == 4
    assert layout.VIRTQ_AVAIL_F_NO_INTERRUPT == 1
    assert layout.VIRTQ_USED_F_NO_NOTIFY == 1
    assert (layout.AVAIL_FLAGS_OFFSET, layout.AVAIL_IDX_OFFSET, layout.AVAIL_RING_OFFSET) == (
        0,
        2,
        4,
    )
    assert (layout.USED_FLAGS_OFFSET, layout.USED_IDX_OFFSET, layout.USED_RING_OFFSET) == (0, 2, 4)


@pytest.mark.parametrize(
    ("n", "ok"),
    [(0, False), (1, True), (3, False), (256, True), (32768, True), (65536, False), (-2, False)],
)
def test_queue_sizes(n, ok):
    assert layout.is_valid_queue_size(n) is ok
