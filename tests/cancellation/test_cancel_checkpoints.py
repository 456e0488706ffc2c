"""Checkpoint contracts: every public async function used here always checkpoints, even
when it has nothing to wait for; the synchronous driver calls never do.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from trio.testing import assert_checkpoints, assert_no_checkpoints
from vhost_dp_harness import RecordingDevice, fail_after, guarded_ram, open_rig

from trio_vhost import DriverQueue, Frontend, FrontendReq, serve_connection
from trio_vhost._io.eventfd import EventFd
from trio_vhost._io.transport import UnixTransport


@fail_after(20)
async def test_frontend_methods_checkpoint() -> None:
    device = RecordingDevice()
    with guarded_ram() as ram:
        backend, front = UnixTransport.socketpair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, device, backend)
            frontend = Frontend(front)
            with assert_checkpoints():
                await frontend.negotiate()
            with assert_checkpoints():
                await frontend.request(FrontendReq.GET_FEATURES)
            with assert_checkpoints():
                await frontend.set_mem_table([ram])
            queue = DriverQueue.create(ram, 8, event_idx=True)
            with assert_checkpoints():
                vring = await frontend.start_vring(0, queue)
            try:
                with assert_checkpoints():
                    await frontend.set_vring_enable(0, True)
                with assert_checkpoints():
                    await frontend.set_vring_fd(FrontendReq.SET_VRING_CALL, 0, vring.call)
                with assert_checkpoints():
                    assert await frontend.get_vring_base(0) == 0
            finally:
                vring.close()
            with assert_checkpoints():
                await frontend.aclose()
            with assert_checkpoints():
                await frontend.aclose()  # idempotent, still a checkpoint


@fail_after(20)
async def test_driver_side_checkpoints() -> None:
    async with open_rig(RecordingDevice()) as rig:
        vring = rig.vring(0)
        payload = (7).to_bytes(8, "little")
        with assert_no_checkpoints():
            head = vring.submit([payload], [16])
        await trio.testing.wait_all_tasks_blocked()
        assert vring.queue.has_used()
        # the completion is already there: wait_used must still checkpoint
        with assert_checkpoints():
            assert await vring.wait_used(1) == [(head, 9)]
        assert vring.queue.read_written(head) == b"R" + payload
        with assert_no_checkpoints():
            rig.add(0)
            vring.notify()
            vring.kick.write(1)
            vring.call.read_nowait()
        await rig.wait_done(0, 1)


@fail_after(20)
async def test_eventfd_wait_checkpoints() -> None:
    with EventFd.create() as efd:
        efd.write(3)
        with assert_checkpoints():
            assert await efd.wait() == 3  # a value was pending
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write_later, efd)
            with assert_checkpoints():
                assert await efd.wait() == 1  # had to wait
        with assert_no_checkpoints():
            efd.write(1)
            assert efd.read_nowait() == 1
            assert efd.read_nowait() == 0


async def _write_later(efd: EventFd) -> None:
    await trio.testing.wait_all_tasks_blocked()
    efd.write(1)


@fail_after(20)
async def test_serve_connection_returning_quickly_checkpoints() -> None:
    backend, front = UnixTransport.socketpair()
    await front.aclose()  # the frontend is gone before the server looks
    with assert_checkpoints():
        await serve_connection(RecordingDevice(), backend)
    assert backend.closed


@fail_after(20)
async def test_serve_connection_cancelled_at_once_closes_its_transport() -> None:
    backend, front = UnixTransport.socketpair()
    with trio.CancelScope() as scope:
        scope.cancel()
        with assert_checkpoints():
            await serve_connection(RecordingDevice(), backend)
    assert scope.cancelled_caught
    assert backend.closed
    await front.aclose()


@pytest.mark.parametrize("code", [FrontendReq.SLEEP, FrontendReq.WAKE, FrontendReq.GET_FEATURES])
@fail_after(20)
async def test_requests_checkpoint_once_served(code: FrontendReq) -> None:
    async with open_rig(RecordingDevice()) as rig:
        with assert_checkpoints():
            await rig.frontend.request(code, need_reply=False)
