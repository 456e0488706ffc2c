"""STOP_GRACE: a batch that never finishes is cancelled after the grace, and nothing is lost.

An async device parks forever inside its batch. A soft stop (GET_VRING_BASE, SLEEP, a
memory-table change) waits exactly STOP_GRACE (virtual time: autojump_clock), then cancels
the worker and answers. The abandoned chains are handed back: GET_VRING_BASE returns the
index of the first one, a restart offers them to the device again and each completes once.
The connection stays usable throughout, and the other ring keeps serving during the grace.
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
    open_rig,
    stop_ring,
)

from trio_vhost.session import STOP_GRACE

N = 5


@pytest.mark.parametrize("how", STOPS)
@fail_after(600)
async def test_stop_grace_then_hard_cancel_hands_chains_back(
    how: str, autojump_clock: trio.abc.Clock
) -> None:
    for k in range(N):
        device = AsyncRecordingDevice()
        park = device.park_at(0, k, forever=True)
        async with open_rig(device, start=False) as rig:
            await rig.start(0)
            for _ in range(N):
                rig.add(0)
                await trio.testing.wait_all_tasks_blocked()
            assert park.parked.is_set()
            started = trio.current_time()
            base = await stop_ring(rig, how)
            assert trio.current_time() - started == pytest.approx(STOP_GRACE, abs=0.01)
            # chain k was abandoned mid-batch and handed back, never completed
            await check_stopped_at(rig, how, k, base)
            assert await rig.get_features()
            await finish(rig, how, base, N)
            assert device.arrived[0] == N + 1  # chain k reached the device twice


@fail_after(600)
async def test_get_vring_base_grace_leaves_other_ring_and_control_alive(
    autojump_clock: trio.abc.Clock,
) -> None:
    device = AsyncRecordingDevice()
    park = device.park_at(0, 0, forever=True)
    async with open_rig(device) as rig:
        rig.add(0, body=b"never finishes")
        await park.parked.wait()
        result: list[int] = []

        async def stopper() -> None:
            result.append(await rig.get_vring_base(0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stopper)
            await trio.testing.wait_all_tasks_blocked()
            started = trio.current_time()
            # ring 1 is served while the control task waits out ring 0's grace
            for _ in range(3):
                rig.add(1, body=b"meanwhile")
                await rig.wait_done(1, 1)
            assert not result
        assert trio.current_time() - started <= STOP_GRACE
        assert result == [0]
        assert rig.queue(0).used_idx() == 0
        assert await rig.get_features()
        # the stuck chain comes back after a restart, exactly once
        await rig.restart(0, result[0])
        await rig.wait_done(0, 1)
        for index in (0, 1):
            rig.assert_exactly_once(index)
        assert sorted(device.stopped) == [0]


@pytest.mark.parametrize("how", ["sleep", "mem_table"])
@fail_after(600)
async def test_stuck_rings_share_one_grace(how: str, autojump_clock: trio.abc.Clock) -> None:
    device = AsyncRecordingDevice()
    parks = [device.park_at(index, 0, forever=True) for index in (0, 1)]
    async with open_rig(device) as rig:
        rig.add(0)
        rig.add(1)
        for park in parks:
            await park.parked.wait()
        started = trio.current_time()
        await (rig.sleep() if how == "sleep" else rig.set_mem_table())
        elapsed = trio.current_time() - started
    assert elapsed == pytest.approx(STOP_GRACE, abs=0.01)
