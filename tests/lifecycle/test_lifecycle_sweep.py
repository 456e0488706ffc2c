"""SLEEP + SNAPSHOT at every stop point, RESTORE into a fresh backend, WAKE: nothing lost.

For each k, backend A has processed k chains of ring 0 (the async device parks inside the
batch of chain k, and SLEEP must wait for that batch; the sync device stops between
batches while more chains wait, published but not kicked). A sleeps, is snapshotted and
disconnected. The guest memory, the driver rings and the eventfds stay: a fresh device
behind a new connection, whose memory table puts the same guest memory at other
frontend addresses, gets the features, the memory table, the call/err eventfds and a
RESTORE with the kick eventfds, then WAKE. The stream continues: every chain completes
exactly once, in order, and the devices saw each chain once between them.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from _lifecycle_rig import UVA_SHIFT, adopt, connected, kicks, reattach_ring_fds, set_mem_table
from vhost_dp_harness import (
    AsyncRecordingDevice,
    Rig,
    fail_after,
    guarded_ram,
    make_device,
    memfd_mappings,
)

from trio_vhost import FrontendReq
from trio_vhost.frontend import RequestNacked
from trio_vhost.snapshot import StateSnapshot

N = 6


async def _fill_and_sleep(rig: Rig, kind: str, k: int) -> int:
    """Run ring 0 up to stop point ``k``, SLEEP; return how many chains completed."""
    fe = rig.frontend
    if kind == "async":
        assert isinstance(rig.device, AsyncRecordingDevice)
        park = rig.device.park_at(0, k)
        for _ in range(N):
            rig.add(0)
            await trio.testing.wait_all_tasks_blocked()
        assert park.parked.is_set()
        assert rig.queue(0).used_idx() == k
        slept: list[bool] = []

        async def sleeper() -> None:
            await fe.sleep()
            slept.append(True)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sleeper)
            await trio.testing.wait_all_tasks_blocked()
            assert not slept, "SLEEP must wait for the batch in flight"
            park.release.set()
        return k + 1
    for _ in range(k):
        rig.add(0)
        await trio.testing.wait_all_tasks_blocked()
    for _ in range(N - k):
        rig.add(0, kick=False)  # published, not kicked: the worker sleeps on
    await trio.testing.wait_all_tasks_blocked()
    assert rig.queue(0).used_idx() == k
    await fe.sleep()
    return k


async def _migrate_once(kind: str, k: int) -> None:
    with guarded_ram() as ram:
        maps_before = memfd_mappings(ram)
        device_a = make_device(kind)
        rig: Rig | None = None
        try:
            async with connected(device_a) as fe:
                rig = Rig(fe, ram, device_a, size=16, indirect=(False, True))
                acked = await fe.negotiate()
                await rig.set_mem_table()
                await rig.start_all()
                for _ in range(2):
                    rig.add(1)
                await rig.wait_done(1, 2)
                done = await _fill_and_sleep(rig, kind, k)
                rig.reap(0)
                assert rig.queue(0).used_idx() == done
                before = rig.snapshot()
                data = await fe.snapshot()
                # Asleep: a kick moves nothing and nothing is written.
                rig.vring(0).kick.write(1)
                await trio.testing.wait_all_tasks_blocked()
                assert rig.queue(0).used_idx() == done
                rig.assert_backend_wrote_only(before)
                snap = StateSnapshot.decode(data)
                assert snap.features == acked
                ring0, ring1 = snap.rings
                assert (ring0.next_avail, ring0.next_used) == (done, done)
                assert (ring1.next_avail, ring1.next_used) == (2, 2)
                assert ring0.started
                assert ring0.enabled
                assert ring0.gpas is not None
                assert ring0.gpas[0] == rig.queue(0).desc_gpa
            # A has gone; its mappings with it.
            assert memfd_mappings(ram) == maps_before
            device_b = make_device(kind)
            async with connected(device_b) as fe:
                adopt(rig, fe, device_b)
                await fe.negotiate()
                await set_mem_table(fe, ram, uva_shift=UVA_SHIFT)
                await reattach_ring_fds(rig)
                await fe.restore(data, kicks(rig))
                # Restored asleep: nothing runs before WAKE, even kicked.
                rig.vring(0).kick.write(1)
                await trio.testing.wait_all_tasks_blocked()
                assert rig.queue(0).used_idx() == done
                assert device_b.seen == [[], []]
                await fe.wake()
                await rig.wait_done(0, N - done)
                rig.assert_exactly_once(0)
                assert device_a.seen[0] + device_b.seen[0] == rig.added[0]
                for _ in range(2):
                    rig.add(1)
                await rig.wait_done(1, 2)
                rig.assert_exactly_once(1)
                assert device_b.seen[1] == rig.added[1][2:]
                assert await rig.get_vring_base(0) == N
                assert await rig.get_vring_base(1) == 4
        finally:
            if rig is not None:
                rig.close()
        assert rig is not None
        rig.assert_canaries()


@pytest.mark.parametrize("kind", ["sync", "async"])
@fail_after(30)
async def test_sleep_snapshot_restore_wake_at_every_stop_point(kind: str) -> None:
    for k in range(N if kind == "async" else N + 1):
        await _migrate_once(kind, k)


@fail_after(30)
async def test_sleep_past_its_grace_hands_the_batch_back(autojump_clock: object) -> None:
    """A batch that never finishes is cancelled after STOP_GRACE and handed back.

    The snapshot then points at the parked chain, and backend B processes it again: it
    completes once (the device saw it twice, as the device contract allows).
    """
    k = 2
    with guarded_ram() as ram:
        device_a = AsyncRecordingDevice()
        park = device_a.park_at(0, k, forever=True)
        rig: Rig | None = None
        try:
            async with connected(device_a) as fe:
                rig = Rig(fe, ram, device_a, size=16, indirect=(False, True))
                await fe.negotiate()
                await rig.set_mem_table()
                await rig.start_all()
                for _ in range(k):
                    rig.add(0)
                await rig.wait_done(0, k)
                rig.add(0)
                await park.parked.wait()
                for _ in range(N - k - 1):
                    rig.add(0, kick=False)
                await fe.sleep()  # returns after the grace, the batch cancelled
                data = await fe.snapshot()
                ring0 = StateSnapshot.decode(data).rings[0]
                assert (ring0.next_avail, ring0.next_used) == (k, k)
            device_b = AsyncRecordingDevice()
            async with connected(device_b) as fe:
                adopt(rig, fe, device_b)
                await fe.negotiate()
                await set_mem_table(fe, ram)
                await reattach_ring_fds(rig)
                await fe.restore(data, kicks(rig))
                await fe.wake()
                await rig.wait_done(0, N - k)
                rig.assert_exactly_once(0)
                assert device_b.seen[0] == rig.added[0][k:]
        finally:
            if rig is not None:
                rig.close()


@fail_after(30)
async def test_wake_continues_on_the_same_backend_and_snapshot_needs_sleep() -> None:
    with guarded_ram() as ram:
        device = make_device("sync")
        rig: Rig | None = None
        try:
            async with connected(device) as fe:
                rig = Rig(fe, ram, device, size=16, indirect=(False, True))
                await fe.negotiate()
                await rig.set_mem_table()
                await rig.start_all()
                with pytest.raises(RequestNacked):
                    await fe.snapshot()  # awake
                rig.add(0)
                await rig.wait_done(0, 1)
                await fe.sleep()
                await fe.sleep()  # twice is harmless
                first = await fe.snapshot()
                assert await fe.snapshot() == first  # nothing moved in between
                rig.add(0)
                await trio.testing.wait_all_tasks_blocked()
                assert rig.queue(0).used_idx() == 1
                await fe.wake()
                await rig.wait_done(0, 1)
                await fe.wake()  # awake already
                with pytest.raises(RequestNacked):
                    await fe.snapshot()
                rig.assert_exactly_once(0)
        finally:
            if rig is not None:
                rig.close()


@fail_after(30)
async def test_restore_refuses_rings_that_land_misaligned() -> None:
    """A memory table that puts the rings at frontend addresses without their alignment."""
    with guarded_ram() as ram:
        device = make_device("sync")
        rig: Rig | None = None
        try:
            async with connected(device) as fe:
                rig = Rig(fe, ram, device, size=16, indirect=(False, True))
                await fe.negotiate()
                await rig.set_mem_table()
                await rig.start_all()
                await fe.sleep()
                data = await fe.snapshot()
            async with connected(make_device("sync")) as fe:
                await fe.negotiate()
                await set_mem_table(fe, ram, uva_shift=8)
                with pytest.raises(RequestNacked):
                    await fe.restore(data, kicks(rig))
                assert await fe.request(FrontendReq.GET_FEATURES, need_reply=False)  # serving
        finally:
            if rig is not None:
                rig.close()
