"""INFLIGHT_SHMFD: GET/SET_INFLIGHT_FD and chains surviving a backend that dies mid-batch."""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Sequence

import pytest
import trio
from _raw_frontend import RawFrontend, fail_after, negotiate, serving, settle

import trio_vhost.session as session_mod
from trio_vhost.device import Completion, Device, QueueContext
from trio_vhost.devices.blk import BlkDevice
from trio_vhost.frontend import DriverVring, Frontend, RequestNacked
from trio_vhost.inflight import InflightRegion, region_size
from trio_vhost.mem.guest import GuestRam
from trio_vhost.proto.constants import FrontendReq, ProtocolFeature, VirtioFeature
from trio_vhost.proto.messages import Inflight
from trio_vhost.server import serve
from trio_vhost.vring.batch import ChainBatch
from trio_vhost.vring.chain import DescriptorChain
from trio_vhost.vring.driver import DriverQueue

P = ProtocolFeature


class Recorder(Device):
    """An async null device that records the heads it is given; parks in batch ``park_at``."""

    is_async = True
    offers_inflight = True

    def __init__(self, park_at: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.park_at = park_at
        self.parked = trio.Event()

    async def process_batch_async(
        self, queue: QueueContext, chains: Sequence[DescriptorChain]
    ) -> Sequence[Completion]:
        self.batches.append([chain.head for chain in chains])
        if len(self.batches) == self.park_at:
            self.parked.set()
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        return [(chain.head, 0) for chain in chains]

    @property
    def heads(self) -> list[int]:
        return [head for batch in self.batches for head in batch]


def test_only_devices_that_opt_in_offer_inflight(image_fd: int) -> None:
    assert not Device().offered_protocol_features() & P.INFLIGHT_SHMFD
    assert BlkDevice(image_fd).offered_protocol_features() & P.INFLIGHT_SHMFD
    assert Recorder().offered_protocol_features() & P.INFLIGHT_SHMFD


@fail_after()
async def test_get_inflight_fd_replies_a_zeroed_memfd_of_the_spec_size(blk_server: str) -> None:
    async with await Frontend.connect(blk_server) as fe:
        await fe.negotiate()
        assert fe.has_protocol_feature(P.INFLIGHT_SHMFD)
        desc, fd = await fe.get_inflight_fd(2, 128)
        with fd:
            assert desc == Inflight(region_size(2, 128), 0, 2, 128)
            assert os.fstat(fd.fd).st_size >= desc.mmap_size
            with mmap.mmap(fd.fd, desc.mmap_size) as m:
                assert bytes(m) == bytes(desc.mmap_size)
            # The frontend hands it back; a region too small for its queues is refused.
            await fe.set_inflight_fd(desc, fd.fd)
            with pytest.raises(RequestNacked):
                await fe.set_inflight_fd(Inflight(64, 0, 2, 128), fd.fd)


@fail_after()
async def test_get_inflight_fd_failure_replies_size_zero_without_fd(blk_server: str) -> None:
    async with await RawFrontend.connect(blk_server) as fe:
        await negotiate(fe, protocol=P.INFLIGHT_SHMFD)
        await fe.request(FrontendReq.GET_INFLIGHT_FD, Inflight(0, 0, 9, 128))  # 2 queues
        reply = await fe.expect_reply(FrontendReq.GET_INFLIGHT_FD, 24)
        assert Inflight.decode(reply.body) == Inflight(0, 0, 9, 128)
    # Our own frontend takes that reply and says why.
    async with await Frontend.connect(blk_server) as frontend:
        await frontend.negotiate()
        with pytest.raises(RequestNacked, match="no in-flight region"):
            await frontend.get_inflight_fd(9, 128)
        desc, fd = await frontend.get_inflight_fd(2, 128)  # the connection is still good
        fd.close()
        assert desc.mmap_size > 0


@pytest.mark.parametrize("code", [FrontendReq.GET_INFLIGHT_FD, FrontendReq.SET_INFLIGHT_FD])
@fail_after()
async def test_inflight_requests_need_the_feature(blk_server: str, code: FrontendReq) -> None:
    async with await RawFrontend.connect(blk_server) as fe:
        await negotiate(fe, protocol=P.REPLY_ACK)
        memfd = os.memfd_create("t", os.MFD_CLOEXEC)
        try:
            fds = [memfd] if code is FrontendReq.SET_INFLIGHT_FD else []
            await fe.request(code, Inflight(4096, 0, 1, 128), fds=fds)
        finally:
            os.close(memfd)
        await fe.expect_closed()


async def _start(
    fe: Frontend, ram: GuestRam, desc: Inflight, fd: int, queue: DriverQueue, base: int
) -> DriverVring:
    await fe.negotiate()
    await fe.set_inflight_fd(desc, fd)
    await fe.set_mem_table([ram])
    return await fe.start_vring(0, queue, base=base)


@pytest.mark.parametrize("base", ["used", "avail"])
@fail_after()
async def test_chains_of_a_backend_killed_mid_batch_are_completed_once_by_the_next(
    sock_path: str, base: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_vhost")
    with GuestRam.create(2 << 20) as ram:
        a = Recorder(park_at=2)
        async with trio.open_nursery() as nursery:
            # Backend A: the first batch completes, the second parks inside the device.
            server_a = trio.CancelScope()

            async def run_a(task_status: trio.TaskStatus[str]) -> None:
                with server_a:
                    await serve(a, sock_path, task_status=task_status)

            await nursery.start(run_a)
            fe = await Frontend.connect(sock_path)
            acked = await fe.negotiate()
            desc, region = await fe.get_inflight_fd(1, 64)
            event_idx = bool(acked & VirtioFeature.RING_EVENT_IDX)
            queue = DriverQueue.create(ram, 64, event_idx=event_idx, pool_size=1 << 16)
            try:
                await fe.set_inflight_fd(desc, region.fd)
                await fe.set_mem_table([ram])
                vring = await fe.start_vring(0, queue)
                first = [queue.add([b"first"], [16]) for _ in range(3)]
                vring.notify()
                assert sorted(h for h, _ in await vring.wait_used(3)) == sorted(first)
                lost = [queue.add([b"lost"], [16]) for _ in range(5)]
                vring.notify()
                await a.parked.wait()
                # The backend dies with the batch in flight: nothing of it reached the
                # used ring, and its chains are gone from the avail window.
                server_a.cancel()
                await settle()
                await fe.aclose()
                vring.close()
                assert a.batches == [first, lost]
                assert queue.used_idx() == 3

                # Backend B on the same socket, handed the same region.
                b = Recorder()
                async with serving(b, sock_path), await Frontend.connect(sock_path) as fe2:
                    start = queue.used_idx() if base == "used" else queue.avail_idx
                    vring2 = await _start(fe2, ram, desc, region.fd, queue, start)
                    try:
                        done = await vring2.wait_used(5)
                        assert sorted(h for h, _ in done) == sorted(lost)
                        assert b.heads == lost  # resubmitted in popped order
                        assert "resubmitting 5 in-flight chains" in caplog.text
                        more = [queue.add([b"more"], [16]) for _ in range(2)]
                        vring2.notify()
                        assert sorted(h for h, _ in await vring2.wait_used(2)) == sorted(more)
                        assert b.heads == lost + more  # none twice, none of `first`
                        assert queue.used_idx() == 10
                    finally:
                        vring2.close()
                nursery.cancel_scope.cancel()
            finally:
                region.close()


@fail_after()
async def test_a_hard_stopped_ring_resumes_from_the_region_in_the_same_session(
    sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET_VRING_BASE past a stuck batch, then a restart: the batch is redone once."""
    with GuestRam.create(2 << 20) as ram:
        dev = Recorder(park_at=1)
        async with serving(dev, sock_path), await Frontend.connect(sock_path) as fe:
            acked = await fe.negotiate()
            desc, region = await fe.get_inflight_fd(1, 64)
            with region:
                event_idx = bool(acked & VirtioFeature.RING_EVENT_IDX)
                queue = DriverQueue.create(ram, 64, event_idx=event_idx, pool_size=1 << 16)
                await fe.set_inflight_fd(desc, region.fd)
                await fe.set_mem_table([ram])
                vring = await fe.start_vring(0, queue)
                try:
                    heads = [queue.add([b"x"], [8]) for _ in range(4)]
                    vring.notify()
                    await dev.parked.wait()
                    # A hard stop (what a soft stop past its grace becomes).
                    monkeypatch.setattr(session_mod, "STOP_GRACE", 0.01)
                    assert await fe.get_vring_base(0) == 0
                finally:
                    vring.close()
                vring = await fe.start_vring(0, queue, base=0)
                try:
                    done = await vring.wait_used(4)
                    assert sorted(h for h, _ in done) == sorted(heads)
                    assert dev.heads == heads + heads  # the stuck batch, then redone once
                finally:
                    vring.close()


class ArrayRecorder(Device):
    """A synchronous array device (the vectorised path) that records the heads it gets."""

    uses_arrays = True
    offers_inflight = True

    def __init__(self) -> None:
        self.heads: list[int] = []

    def process_arrays(self, queue: QueueContext, batch: ChainBatch) -> int:
        self.heads += batch.heads.tolist()
        return 0


@fail_after()
async def test_frontend_made_region_left_by_a_dead_backend_is_resubmitted(sock_path: str) -> None:
    """A region in the frontend's own memfd, as a backend that died after popping left it."""
    with GuestRam.create(2 << 20) as ram:
        region = InflightRegion.create(1, 64)
        try:
            dead = region.queue(0)
            assert dead is not None
            dead.recover(used_idx=0, ring_size=64)
            dev = ArrayRecorder()
            async with serving(dev, sock_path), await Frontend.connect(sock_path) as fe:
                acked = await fe.negotiate()
                event_idx = bool(acked & VirtioFeature.RING_EVENT_IDX)
                queue = DriverQueue.create(ram, 64, event_idx=event_idx, pool_size=1 << 16)
                lost = [queue.add([b"lost"], [8]) for _ in range(4)]
                queue.publish()
                dead.popped(lost[::-1])  # popped in reverse order, then the backend died
                desc = Inflight(region.mmap_size, 0, 1, 64)
                await fe.set_inflight_fd(desc, region.fd.fd)
                await fe.set_mem_table([ram])
                vring = await fe.start_vring(0, queue)
                try:
                    done = await vring.wait_used(4)
                    assert sorted(h for h, _ in done) == sorted(lost)
                    assert dev.heads == lost[::-1]
                    assert dead.in_flight().tolist() == []
                    assert dead.header["used_idx"] == 4
                    more = vring.submit([b"more"], [8])
                    assert [h for h, _ in await vring.wait_used(1)] == [more]
                    assert dev.heads == [*lost[::-1], more]
                finally:
                    vring.close()
        finally:
            region.close()
