"""The standard migration flow (spec "Migrating back-end state") at every stop point.

Source: the rings are stopped with GET_VRING_BASE (the device is suspended), the state is
saved through SET_DEVICE_STATE_FD into a pipe, CHECK_DEVICE_STATE confirms. Destination:
a fresh device loads it (CHECK confirms), then the frontend sets memory and every ring up
again from the bases it was given, as the spec describes. The in-flight stream continues
with no chain lost or completed twice.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from _lifecycle_rig import ALL_PROTOCOL, adopt, connected
from vhost_dp_harness import (
    AsyncRecordingDevice,
    Rig,
    fail_after,
    guarded_ram,
    make_device,
)

from trio_vhost.frontend import RequestNacked
from trio_vhost.snapshot import StateSnapshot

N = 5


async def _migrate_once(kind: str, k: int) -> None:
    with guarded_ram() as ram:
        device_a = make_device(kind)
        rig: Rig | None = None
        try:
            async with connected(device_a) as fe:
                rig = Rig(fe, ram, device_a, size=16, indirect=(False, True))
                await fe.negotiate(protocol_features=ALL_PROTOCOL)
                await rig.set_mem_table()
                await rig.start_all()
                with pytest.raises(RequestNacked):  # the rings run
                    await fe.save_device_state()
                if kind == "async":
                    assert isinstance(device_a, AsyncRecordingDevice)
                    park = device_a.park_at(0, k)
                    for _ in range(N):
                        rig.add(0)
                        await trio.testing.wait_all_tasks_blocked()
                    bases: list[int] = []

                    async def stop() -> None:
                        bases.append(await rig.get_vring_base(0))  # type: ignore[union-attr]

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(stop)
                        await trio.testing.wait_all_tasks_blocked()
                        assert not bases
                        park.release.set()
                    done = k + 1
                else:
                    for _ in range(k):
                        rig.add(0)
                        await trio.testing.wait_all_tasks_blocked()
                    for _ in range(N - k):
                        rig.add(0, kick=False)
                    await trio.testing.wait_all_tasks_blocked()
                    bases = [await rig.get_vring_base(0)]
                    done = k
                bases.append(await rig.get_vring_base(1))
                assert bases == [done, 0]
                rig.reap(0)
                assert rig.completed[0] == rig.added[0][:done]
                state = await fe.save_device_state()
                rings = StateSnapshot.decode(state).rings
                assert [ring.next_avail for ring in rings] == bases
                assert not any(ring.started for ring in rings)
            device_b = make_device(kind)
            async with connected(device_b) as fe:
                adopt(rig, fe, device_b)
                await fe.negotiate(protocol_features=ALL_PROTOCOL)
                await fe.load_device_state(state)
                await rig.set_mem_table()
                for index, base in enumerate(bases):
                    rig.vring(index).close()
                    await rig.start(index, base=base)
                await rig.wait_done(0, N - done)
                rig.assert_exactly_once(0)
                assert device_a.seen[0] + device_b.seen[0] == rig.added[0]
                rig.add(1)
                await rig.wait_done(1, 1)
                rig.assert_exactly_once(1)
        finally:
            if rig is not None:
                rig.close()
        assert rig is not None
        rig.assert_canaries()


@pytest.mark.parametrize("kind", ["sync", "async"])
@fail_after(30)
async def test_device_state_migration_at_every_stop_point(kind: str) -> None:
    for k in range(N if kind == "async" else N + 1):
        await _migrate_once(kind, k)


@fail_after(30)
async def test_sleeping_backend_can_be_saved_too() -> None:
    """SLEEP also suspends the device: a save works and records the rings as started."""
    with guarded_ram() as ram:
        device = make_device("sync")
        rig: Rig | None = None
        try:
            async with connected(device) as fe:
                rig = Rig(fe, ram, device, size=16, indirect=(False, True))
                await fe.negotiate(protocol_features=ALL_PROTOCOL)
                await rig.set_mem_table()
                await rig.start_all()
                rig.add(0)
                await rig.wait_done(0, 1)
                await fe.sleep()
                state = await fe.save_device_state()
                assert state == await fe.snapshot()
                ring0 = StateSnapshot.decode(state).rings[0]
                assert ring0.started
                assert ring0.next_avail == 1
                await fe.wake()
                rig.add(0)
                await rig.wait_done(0, 1)
                rig.assert_exactly_once(0)
        finally:
            if rig is not None:
                rig.close()
