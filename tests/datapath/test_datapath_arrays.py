"""The worker's array path (Device.uses_arrays) through the real server."""

from __future__ import annotations

import numpy as np
import pytest
import trio
from numpy.typing import NDArray

from trio_vhost import Device, FrontendReq, QueueContext, VringFailed
from trio_vhost.testing import open_device
from trio_vhost.vring.batch import ChainBatch


class FillArrays(Device):
    """Writes each chain's head index (as one byte) into its first writable byte."""

    uses_arrays = True

    def __init__(self) -> None:
        self.batches: list[int] = []

    def process_arrays(self, queue: QueueContext, batch: ChainBatch) -> NDArray[np.uint32]:
        self.batches.append(batch.count)
        written = np.zeros(batch.count, dtype=np.uint32)
        for i in range(batch.count):
            chain = batch.chain(i)
            if chain.writable:
                gpa, _ = chain.writable[0]
                queue.memory.write(gpa, bytes([int(batch.heads[i]) & 0xFF]))
                written[i] = 1
        return written


class BadLengths(Device):
    uses_arrays = True

    def process_arrays(self, queue: QueueContext, batch: ChainBatch) -> NDArray[np.uint32]:
        return np.zeros(batch.count + 1, dtype=np.uint32)  # one length too many: a device bug


async def test_array_device_completes_every_chain_once() -> None:
    device = FillArrays()
    with trio.fail_after(20):
        async with open_device(device, queue_size=64) as harness:
            vring = harness.vrings[0]
            heads = [vring.queue.add([b"x" * 8], [4]) for _ in range(40)]
            heads.append(vring.queue.add([b"y"], [2, 2]))  # a chained one: complex path
            vring.notify()
            used = await vring.wait_used(len(heads))
            assert sorted(h for h, _ in used) == sorted(heads)
            for head, written in used:
                assert written == 1
                assert vring.queue.read_written(head) == bytes([head & 0xFF])
            assert sum(device.batches) == len(heads)


async def test_bad_lengths_break_only_that_ring() -> None:
    with trio.fail_after(20):
        async with open_device(BadLengths(), queue_size=16) as harness:
            vring = harness.vrings[0]
            vring.submit([b"x"], [4])
            with pytest.raises(VringFailed):
                await vring.wait_used(1)
            features = await harness.frontend.request(FrontendReq.GET_FEATURES)
            assert features is not None  # the connection still serves
