"""No lost kicks: a kick that races a stop is served after the restart.

The idea of rust-vmm's ``test_no_lost_kicks`` (vhost-user-backend), without its sleeps: the
interleavings are forced by yielding a chosen number of scheduling steps, or by quiescence
(``wait_all_tasks_blocked``). A worker starting must look at the ring whether or not a kick
is pending, so a kick that landed while the ring was stopped, or on an eventfd the backend
no longer holds, never strands a chain.

Last, a real OS thread plays the guest and races the worker: it submits bursts and sleeps
on the call eventfd exactly when the suppression protocol says it may. A lost kick or a
lost call shows up as a bounded wait that expires.
"""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Iterator, Sequence

import pytest
import trio
import trio.testing
from vhost_dp_harness import (
    RecordingDevice,
    Rig,
    fail_after,
    make_device,
    open_rig,
)

from trio_vhost import DescriptorChain, FrontendReq, QueueContext, VirtioFeature
from trio_vhost._io.eventfd import EventFd
from trio_vhost.device import Completion
from trio_vhost.frontend import DriverVring

STOPS = ["vring_base", "sleep"]


async def stop(rig: Rig, how: str) -> int | None:
    if how == "vring_base":
        return await rig.get_vring_base(0)
    await rig.sleep()
    return None


async def resume(rig: Rig, how: str, base: int | None) -> None:
    if how == "vring_base":
        assert base is not None
        await rig.restart(0, base)
    else:
        await rig.wake()


@pytest.mark.parametrize("how", STOPS)
@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("new_kick_fd", [False, True], ids=["same_kick_fd", "new_kick_fd"])
@fail_after(20)
async def test_kick_while_stopped_is_served_after_restart(
    how: str, kind: str, new_kick_fd: bool
) -> None:
    async with open_rig(make_device(kind)) as rig:
        rig.add(0)
        await rig.wait_done(0, 1)
        base = await stop(rig, how)
        rig.add(0)  # published and kicked while the ring is stopped
        rig.vring(0).kick.write(1)  # whatever the suppression state, a kick is pending
        await trio.testing.wait_all_tasks_blocked()
        assert rig.queue(0).used_idx() == 1
        if new_kick_fd and how == "vring_base":
            # the frontend may hand over a fresh eventfd: the pending kick is gone with
            # the old one, and the worker must find the chain anyway
            vring = rig.vring(0)
            vring.kick.close()
            vring.kick = EventFd.create()
        await resume(rig, how, base)
        await rig.wait_done(0, 1)
        rig.assert_exactly_once(0)
        assert rig.device.seen[0] == rig.added[0]


@pytest.mark.parametrize("how", STOPS)
@pytest.mark.parametrize("kind", ["sync", "async"])
@fail_after(30)
async def test_kick_racing_the_stop(how: str, kind: str) -> None:
    """Kick after 0..11 scheduling steps of the stop; every chain completes exactly once."""
    for steps in range(12):
        async with open_rig(make_device(kind)) as rig:
            rig.add(0)
            await rig.wait_done(0, 1)
            result: list[int | None] = []

            async def stopper() -> None:
                result.append(await stop(rig, how))  # noqa: B023

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stopper)
                for _ in range(steps):
                    await trio.lowlevel.checkpoint()
                rig.add(0)
                rig.add(0)
            base = result[0]
            done = rig.queue(0).used_idx()
            assert 1 <= done <= 3
            if base is not None:
                assert base == done
            await resume(rig, how, base)
            await rig.wait_done(0, len(rig.expected[0]))
            rig.assert_exactly_once(0)
            assert rig.device.seen[0] == rig.added[0]


@pytest.mark.parametrize("kind", ["sync", "async"])
@fail_after(20)
async def test_kick_before_the_first_set_vring_kick(kind: str) -> None:
    """Chains published and kicked before the ring is started are served at start."""
    async with open_rig(make_device(kind), start=False) as rig:
        queue = rig.queue(0)
        vring = DriverVring(rig.frontend, 0, queue)
        rig.vrings[0] = vring
        rig.add(0)
        rig.add(0)
        vring.kick.write(1)
        started = await rig.frontend.start_vring(0, queue)
        # start_vring makes its own eventfds; the chains must not wait for a kick on them
        vring.close()
        rig.vrings[0] = started
        await rig.wait_done(0, 2)
        rig.assert_exactly_once(0)


@pytest.mark.parametrize("kind", ["sync", "async"])
@fail_after(20)
async def test_polled_ring_serves_without_kicks(kind: str) -> None:
    """SET_VRING_KICK with the NOFD bit: the backend polls and never needs a kick."""
    async with open_rig(make_device(kind)) as rig:
        await rig.frontend.set_vring_fd(FrontendReq.SET_VRING_KICK, 0, None)
        for _ in range(5):
            rig.add(0, kick=False)
            await rig.wait_done(0, 1)
        rig.assert_exactly_once(0)
        assert await rig.get_vring_base(0) == 5


# -- a driver thread racing the worker -----------------------------------------------------

TOTAL = 20_000
WAIT_MS = 5000  # only reached if a kick or a call is lost


class CountingDevice(RecordingDevice):
    """Completes every chain with one byte written; counts them."""

    def process_batch(
        self, queue: QueueContext, chains: Sequence[DescriptorChain]
    ) -> Sequence[Completion]:
        self.arrived[queue.index] += len(chains)
        return [(chain.head, 1) for chain in chains]


class AsyncCountingDevice(CountingDevice):
    is_async = True

    async def process_batch_async(
        self, queue: QueueContext, chains: Sequence[DescriptorChain]
    ) -> Sequence[Completion]:
        await trio.sleep(0)
        return self.process_batch(queue, chains)


@pytest.fixture
def fast_switching() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def drive(vring: DriverVring, total: int) -> tuple[int, int]:
    """The guest, in its own OS thread: submit bursts, reap, sleep on call only when allowed.

    Returns (kicks, calls). Raises AssertionError when a wait outlives WAIT_MS.
    """
    queue = vring.queue
    poller = select.poll()
    poller.register(vring.call.fd, select.POLLIN)
    poller.register(vring.err.fd, select.POLLIN)
    sent = done = kicks = calls = 0
    queue.disable_interrupts()
    while done < total:
        n = min(queue.num_free, total - sent, 1 + sent % 7)
        if n:
            queue.add_batch(n, 8, write=True)
            sent += n
            queue.publish()
            if queue.kick_needed():
                os.eventfd_write(vring.kick.fd, 1)
                kicks += 1
        used = queue.get_used()
        done += len(used)
        if used or (n and sent < total):
            continue
        if queue.enable_interrupts():  # used entries arrived while re-enabling
            queue.disable_interrupts()
            continue
        events = dict(poller.poll(WAIT_MS))
        assert events, f"nothing for {WAIT_MS} ms: sent {sent}, completed {done}"
        assert vring.err.fd not in events, "the ring broke"
        try:
            os.eventfd_read(vring.call.fd)
            calls += 1
        except BlockingIOError:
            pass
        queue.disable_interrupts()
    return kicks, calls


@pytest.mark.usefixtures("fast_switching")
@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
@pytest.mark.parametrize("kind", ["sync", "async"])
@fail_after(60)
async def test_driver_thread_races_the_worker(kind: str, event_idx: bool) -> None:
    device = AsyncCountingDevice() if kind == "async" else CountingDevice()
    mask = None if event_idx else ~int(VirtioFeature.RING_EVENT_IDX)
    start = 0x10000 - 1000  # the 16-bit indices wrap half-way through
    async with open_rig(device, features=mask, start=False, size=64) as rig:
        queue = rig.queue(0)
        queue.skip_to(start)
        vring = await rig.start(0, base=start)
        kicks, calls = await trio.to_thread.run_sync(drive, vring, TOTAL)
        assert device.arrived[0] == TOTAL
        assert queue.used_idx() == (start + TOTAL) & 0xFFFF
        assert await rig.get_vring_base(0) == (start + TOTAL) & 0xFFFF
        # suppression did suppress: far fewer notifications than chains
        assert kicks < TOTAL
        assert calls < TOTAL
