"""Real I/O through the server: a recording device driven by the Python frontend.

Each chain's readable bytes reach the device, its answer lands in the chain's writable
buffers (checked byte for byte by the driver), every head completes exactly once, and the
backend writes nothing but used rings and writable buffers.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import trio
import trio.testing
from vhost_dp_harness import (
    AsyncRecordingDevice,
    RecordingDevice,
    fail_after,
    make_device,
    open_rig,
)

from trio_vhost import DescriptorChain, QueueContext, VirtioFeature
from trio_vhost.device import Completion
from trio_vhost.worker import batch_limit

DEVICES = ["sync", "async"]


@pytest.mark.parametrize("kind", DEVICES)
@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
@fail_after(20)
async def test_io_round_trips_exactly_once(kind: str, event_idx: bool) -> None:
    device = make_device(kind)
    mask = None if event_idx else ~int(VirtioFeature.RING_EVENT_IDX)
    rng = random.Random(1234)
    async with open_rig(device, features=mask) as rig:
        before = rig.snapshot()
        for _round in range(12):
            for index in (0, 1):
                burst = rng.randint(1, 6)
                for _ in range(burst):
                    body = rng.randbytes(rng.randint(0, 300))
                    rig.add(index, body=body, split=rng.random() < 0.5, extra=rng.randint(0, 9))
            for index in (0, 1):
                await rig.wait_done(index, len(rig.expected[index]))
        for index in (0, 1):
            rig.assert_exactly_once(index)
            # the device saw every tag once, in ring order
            assert device.seen[index] == rig.added[index]
            assert rig.queue(index).used_idx() == len(rig.added[index])
        rig.assert_backend_wrote_only(before, driver=True)
        for index in (0, 1):
            assert await rig.get_vring_base(index) == rig.queue(index).avail_idx
    assert sorted(device.started) == [0, 1]


@pytest.mark.parametrize("kind", DEVICES)
@fail_after(20)
async def test_full_ring_and_batches(kind: str) -> None:
    """Fill the ring completely before kicking once: batches of a quarter ring, all answered."""
    device = make_device(kind)
    async with open_rig(device, size=8) as rig:
        for _ in range(3):
            for _ in range(8):
                rig.add(1, body=b"x" * 40, publish=False)
            rig.vring(1).notify()
            await rig.wait_done(1, 8)
        rig.assert_exactly_once(1)
        assert sum(device.batches[1]) == 24
        # The worker takes a quarter of the ring per batch, so the driver can refill.
        assert max(device.batches[1]) == batch_limit(8) == 2


@fail_after(20)
async def test_io_over_a_socket_path(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = str(tmp_path_factory.mktemp("dp") / "v.sock")
    device = AsyncRecordingDevice()
    async with open_rig(device, path=path) as rig:
        for i in range(20):
            rig.add(0, body=bytes([i]) * i)
            rig.add(1, body=bytes([i]) * (100 - i), split=True)
            await rig.wait_done(0, 1)
            await rig.wait_done(1, 1)
        rig.assert_exactly_once(0)
        rig.assert_exactly_once(1)


@fail_after(20)
async def test_rings_started_and_stopped_once_per_worker() -> None:
    device = RecordingDevice()
    async with open_rig(device) as rig:
        rig.add(0)
        await rig.wait_done(0, 1)
        base = await rig.get_vring_base(0)
        assert base == 1
        await trio.testing.wait_all_tasks_blocked()
        assert device.stopped == [0]
        await rig.restart(0, base)
        rig.add(0)
        await rig.wait_done(0, 1)
        rig.assert_exactly_once(0)
        assert device.started.count(0) == 2


class SequencedDevice(AsyncRecordingDevice):
    """Ring 0's batch may only finish after ring 1's batch has started (a Sequencer)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = trio.testing.Sequencer()
        self.order: list[str] = []

    async def process_batch_async(
        self, queue: QueueContext, chains: Sequence[DescriptorChain]
    ) -> Sequence[Completion]:
        step = 1 if queue.index == 0 else 0
        async with self.seq(step):
            self.order.append(f"ring {queue.index}")
        return await super().process_batch_async(queue, chains)


@fail_after(20)
async def test_async_batches_of_two_rings_interleave() -> None:
    """A worker awaiting inside its batch does not hold up the other ring's worker."""
    device = SequencedDevice()
    async with open_rig(device) as rig:
        rig.add(0, body=b"first in, second out")
        await trio.testing.wait_all_tasks_blocked()
        assert rig.queue(0).used_idx() == 0  # ring 0 waits for ring 1 inside its batch
        rig.add(1, body=b"second in, first out")
        await rig.wait_done(1, 1)
        await rig.wait_done(0, 1)
        assert device.order == ["ring 1", "ring 0"]
        rig.assert_exactly_once(0)
        rig.assert_exactly_once(1)
