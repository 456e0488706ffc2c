"""A device that raises in its lifecycle hooks costs one ring, never the session.

``queue_started`` raising used to escape the worker before ``handle.stopped`` could be set,
so the server's teardown waited for it forever inside a shielded scope (not even a
deadline could end the test). ``queue_stopped`` raising ended the whole connection from a
``finally``. The tests rescue a stuck teardown themselves so that a regression fails
instead of hanging.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
from vhost_dp_harness import RecordingDevice, fail_after, open_rig

from trio_vhost import VringFailed
from trio_vhost.session import Session


class StartFails(RecordingDevice):
    def queue_started(self, index: int, wake: Callable[[], None]) -> None:
        super().queue_started(index, wake)
        if index == 0:
            raise RuntimeError("device bug in queue_started")


class StopFails(RecordingDevice):
    def queue_stopped(self, index: int) -> None:
        super().queue_stopped(index)
        if index == 0:
            raise RuntimeError("device bug in queue_stopped")


def rescue(session: Session) -> None:
    """Unblock a teardown stuck on a worker that died without setting ``stopped``.

    Only called once the test has already failed, so that it reports instead of hanging.
    """
    for slot in session.slots:
        if slot.worker is not None:
            slot.worker.stopped.set()


@fail_after(30)
async def test_queue_started_raising_breaks_only_that_ring(sessions: list[Session]) -> None:
    device = StartFails()
    async with open_rig(device, start=False) as rig:
        with trio.move_on_after(5) as guard:
            await rig.start(0)
            await rig.start(1)
            rig.add(0)
            with pytest.raises(VringFailed):
                await rig.vring(0).wait_used(1)
            rig.add(1)
            await rig.wait_done(1, 1)
            assert await rig.get_features()
        if guard.cancelled_caught:
            rescue(sessions[0])
        assert not guard.cancelled_caught, "the session stopped serving"
        # a new kick restarts the ring; the device fails again, the ring breaks again
        await rig.rekick(0)
        with pytest.raises(VringFailed):
            await rig.vring(0).wait_used(1)
    assert device.stopped.count(0) == 2


@fail_after(30)
async def test_queue_stopped_raising_keeps_the_connection(sessions: list[Session]) -> None:
    device = StopFails()
    async with open_rig(device) as rig:
        rig.add(0)
        await rig.wait_done(0, 1)
        with trio.move_on_after(5) as guard:
            assert await rig.get_vring_base(0) == 1
            rig.add(1)
            await rig.wait_done(1, 1)
            await rig.restart(0, 1)
            rig.add(0)
            await rig.wait_done(0, 1)
        if guard.cancelled_caught:
            rescue(sessions[0])
        assert not guard.cancelled_caught, "the session stopped serving"
        rig.assert_exactly_once(0)
        rig.assert_exactly_once(1)
