"""The INFLIGHT_SHMFD region: its byte layout and the recovery after a crash."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator

import numpy as np
import pytest

from trio_vhost._fd import OwnedFd
from trio_vhost.errors import DeviceError
from trio_vhost.inflight import InflightQueue, InflightRegion, queue_stride, region_size


@pytest.fixture
def region() -> Iterator[InflightRegion]:
    reg = InflightRegion.create(2, 8)
    yield reg
    reg.close()


def raw(reg: InflightRegion) -> bytes:
    """What a second process mapping the region sees."""
    with mmap.mmap(reg.fd.fd, reg.mmap_size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        return bytes(m)


def queue(reg: InflightRegion, index: int = 0) -> InflightQueue:
    q = reg.queue(index)
    assert q is not None
    return q


def test_sizes_follow_the_spec_layout_64_aligned() -> None:
    # 16-byte header + 16 bytes per descriptor, rounded up to 64.
    assert queue_stride(1) == 64
    assert queue_stride(8) == 192
    assert queue_stride(256) == 4160
    assert region_size(2, 128) == 2 * (16 + 16 * 128 + 48)


def test_create_is_a_zeroed_memfd_of_the_region_size(region: InflightRegion) -> None:
    assert os.fstat(region.fd.fd).st_size == region.mmap_size == region_size(2, 8)
    assert region.mmap_offset == 0
    assert raw(region) == bytes(region.mmap_size)
    assert region.queue(2) is None


def test_fields_are_at_their_spec_offsets(region: InflightRegion) -> None:
    q1 = queue(region, 1)
    assert q1.recover(used_idx=0x1234, ring_size=8) is None  # fresh: initialized
    q1.popped([5, 2])
    q1.publishing([2])
    data = raw(region)[queue_stride(8) :]
    features, version, desc_num, last_head, used_idx = struct.unpack_from("<QHHHH", data)
    assert (features, version, desc_num, last_head, used_idx) == (0, 1, 8, 2, 0x1234)
    inflight5, _, counter5 = struct.unpack_from("<B5xHQ", data, 16 + 16 * 5)
    inflight2, _, counter2 = struct.unpack_from("<B5xHQ", data, 16 + 16 * 2)
    assert (inflight5, inflight2) == (1, 1)
    assert counter2 == counter5 + 1  # popped order
    assert raw(region)[: queue_stride(8)] == bytes(queue_stride(8))  # queue 0 untouched


def test_resubmission_in_counter_order_and_resume_index(region: InflightRegion) -> None:
    q = queue(region)
    q.recover(used_idx=10, ring_size=8)
    q.popped(np.array([6, 1, 4], dtype=np.uint16))
    q.popped([0, 7])
    q.publishing([1, 7])
    q.published([1, 7], used_idx=12)
    # The process dies. The next one maps the same memfd.
    again = InflightRegion(region.fd.dup(), region.mmap_size, 0, 2, 8)
    try:
        heads = queue(again).recover(used_idx=12, ring_size=8)
        assert heads is not None
        assert heads.tolist() == [6, 4, 0]
        assert queue(again).take_resubmit().tolist() == [6, 4, 0]
        assert queue(again).take_resubmit().tolist() == []
    finally:
        again.close()


def test_crash_between_used_ring_write_and_inflight_clear(region: InflightRegion) -> None:
    q = queue(region)
    q.recover(used_idx=0xFFFE, ring_size=8)
    q.popped([3, 5, 7, 1])
    q.publishing([5, 3])  # then the used ring got both and used.idx moved by 2 ...
    # ... and the process died before published().
    assert q.in_flight().tolist() == [3, 5, 7, 1]
    heads = q.recover(used_idx=0x0000, ring_size=8)  # used.idx wrapped past 0xFFFF
    assert heads is not None
    assert heads.tolist() == [7, 1]
    assert q.header["used_idx"] == 0


def test_crash_before_used_idx_moved_resubmits_the_whole_batch(region: InflightRegion) -> None:
    q = queue(region)
    q.recover(used_idx=4, ring_size=8)
    q.popped([2, 6])
    q.publishing([6, 2])  # the used ring was not updated yet
    heads = q.recover(used_idx=4, ring_size=8)
    assert heads is not None
    assert heads.tolist() == [2, 6]


def test_batches_chain_through_last_batch_head(region: InflightRegion) -> None:
    q = queue(region)
    q.recover(used_idx=0, ring_size=8)
    q.popped([0, 1, 2, 3])
    q.publishing([0, 1])
    q.published([0, 1], used_idx=2)
    q.publishing([3, 2])  # used.idx moved to 4, crash before the clear
    heads = q.recover(used_idx=4, ring_size=8)
    assert heads is not None
    assert heads.tolist() == []
    # Counters keep growing after a recovery.
    q.popped([5])
    assert int(q._desc["counter"][5]) > 4


def test_set_region_at_an_offset_in_a_larger_fd() -> None:
    fd = OwnedFd(os.memfd_create("t", os.MFD_CLOEXEC))
    os.ftruncate(fd.fd, 3 * mmap.PAGESIZE)
    reg = InflightRegion(fd, region_size(1, 4), mmap.PAGESIZE + 64, 1, 4)
    try:
        queue(reg).recover(used_idx=7, ring_size=4)
        data = os.pread(fd.fd, 16, mmap.PAGESIZE + 64)
        assert struct.unpack("<QHHHH", data) == (0, 1, 4, 0, 7)
    finally:
        reg.close()
    assert fd.closed


@pytest.mark.parametrize(
    ("size", "offset", "queues", "qsize"),
    [(100, 0, 1, 8), (region_size(4, 8), 0, 4, 8), (region_size(1, 8), 4096, 1, 8)],
    ids=["too small", "fd too small", "offset past end"],
)
def test_bad_regions_are_refused(size: int, offset: int, queues: int, qsize: int) -> None:
    with OwnedFd(os.memfd_create("t", os.MFD_CLOEXEC)) as fd:
        os.ftruncate(fd.fd, region_size(2, 8))
        with pytest.raises(DeviceError):
            InflightRegion(fd, size, offset, queues, qsize)


def test_corrupt_region_is_refused(region: InflightRegion) -> None:
    q = queue(region)
    q.recover(used_idx=0, ring_size=8)
    with pytest.raises(DeviceError, match="does not fit"):
        q.recover(used_idx=0, ring_size=16)
    q._hdr["version"] = 9
    with pytest.raises(DeviceError, match="version"):
        q.recover(used_idx=0, ring_size=8)
    q._hdr["version"] = 1
    q._hdr["last_batch_head"] = 200
    with pytest.raises(DeviceError, match="batch list"):
        q.recover(used_idx=1, ring_size=8)
    q._hdr["used_idx"] = 0
    q.popped([7])
    with pytest.raises(DeviceError, match="beyond"):
        q.recover(used_idx=0, ring_size=4)
