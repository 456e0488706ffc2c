"""Stop-point sweep: stop a ring after k chains, in every way a ring stops, then resume.

For each k the device has processed k chains (the async device parks inside the batch of
chain k; the sync devices, on the chain path and on the array path, have no checkpoint
inside a batch, so their stop lands between batches while more chains wait, published but
not kicked), then the ring is stopped with
GET_VRING_BASE, SLEEP or a memory-table change. Afterwards:

* every chain popped has been completed exactly once, or lies at/after ``next_avail``;
* ``used.idx`` equals the number of completions and nothing moves while stopped;
* the restart (SET_VRING_BASE + SET_VRING_KICK, WAKE, or the swap's own restart) resumes at
  exactly that index: no chain is lost, none completes twice, the device sees each once.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from vhost_dp_harness import (
    STOPS,
    AsyncRecordingDevice,
    check_stopped_at,
    fail_after,
    finish,
    make_device,
    open_rig,
    stop_ring,
)

from trio_vhost.vring.follow import FOLLOW_MIN

N = 6


@pytest.mark.parametrize("how", STOPS)
@fail_after(30)
async def test_sweep_async_device_parked_in_batch(how: str) -> None:
    for k in range(N):
        device = AsyncRecordingDevice()
        park = device.park_at(0, k)
        async with open_rig(device, start=False) as rig:
            await rig.start(0)
            for _ in range(N):
                rig.add(0)
                await trio.testing.wait_all_tasks_blocked()
            # chains before k are done, chain k is parked in its batch, the rest wait
            assert park.parked.is_set()
            assert rig.queue(0).used_idx() == k
            result: list[int | None] = []

            async def stopper() -> None:
                result.append(await stop_ring(rig, how))  # noqa: B023

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stopper)
                await trio.testing.wait_all_tasks_blocked()
                assert not result, "a soft stop must wait for the batch in flight"
                park.release.set()
            await check_stopped_at(rig, how, k + 1, result[0])
            await finish(rig, how, result[0], N)


@pytest.mark.parametrize("how", STOPS)
@pytest.mark.parametrize("device_kind", ["sync", "arrays"])
@fail_after(30)
async def test_sweep_sync_device_between_batches(how: str, device_kind: str) -> None:
    for k in range(N + 1):
        device = make_device(device_kind)
        async with open_rig(device, start=False) as rig:
            await rig.start(0)
            for _ in range(k):
                rig.add(0)
                await trio.testing.wait_all_tasks_blocked()
            for _ in range(N - k):
                rig.add(0, kick=False)  # published, not kicked: the worker sleeps on
            await trio.testing.wait_all_tasks_blocked()
            assert rig.queue(0).used_idx() == k
            base = await stop_ring(rig, how)
            await check_stopped_at(rig, how, k, base)
            await finish(rig, how, base, N)


@pytest.mark.parametrize("how", STOPS)
@pytest.mark.parametrize("device_kind", ["sync", "async", "arrays"])
@fail_after(30)
async def test_sweep_stop_races_kicked_chains(how: str, device_kind: str) -> None:
    """The stop is sent right after the kicks: whoever wins, the invariants hold."""
    for k in range(N + 1):
        device = make_device(device_kind)
        async with open_rig(device, start=False) as rig:
            await rig.start(0)
            for _ in range(k):
                rig.add(0)
            await rig.wait_done(0, k)
            for _ in range(N - k):
                rig.add(0)
            base = await stop_ring(rig, how)
            queue = rig.queue(0)
            rig.reap(0)
            done = queue.used_idx()
            assert k <= done <= N
            if base is not None:
                assert base == done
            # completed exactly the first `done` chains, in order, each once
            assert rig.completed[0] == rig.added[0][:done]
            if how != "mem_table":
                assert device.seen[0] == rig.added[0][:done]
            await finish(rig, how, base, N)


@pytest.mark.parametrize("how", STOPS)
@fail_after(60)
async def test_sweep_array_device_with_followed_batches(how: str) -> None:
    """Batches large enough that the queue follows their chains with numpy (vring/follow.py)."""
    total = 3 * FOLLOW_MIN
    for k in (0, 1, FOLLOW_MIN, total - 1, total):
        device = make_device("arrays")
        async with open_rig(device, start=False, size=128) as rig:
            await rig.start(0)
            for _ in range(k):
                rig.add(0, split=True, kick=False)
            rig.vring(0).notify()
            await rig.wait_done(0, k)
            await trio.testing.wait_all_tasks_blocked()  # the worker sleeps on its kick fd
            for _ in range(total - k):
                rig.add(0, split=True, kick=False)
            await trio.testing.wait_all_tasks_blocked()
            assert rig.queue(0).used_idx() == k
            base = await stop_ring(rig, how)
            await check_stopped_at(rig, how, k, base)
            await finish(rig, how, base, total)
            if max(k, total - k) >= FOLLOW_MIN:
                assert max(device.batches[0]) >= FOLLOW_MIN
