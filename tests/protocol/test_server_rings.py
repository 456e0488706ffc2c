"""Several vrings of one connection, each with its own worker, running at once."""

from __future__ import annotations

import os

import trio
from _raw_frontend import GatedBlk, fail_after, sector_data, serving, settle

from trio_vhost.devices.blk_driver import BlkDriver
from trio_vhost.devices.blk_spec import RequestType
from trio_vhost.frontend import DriverVring, Frontend
from trio_vhost.mem.guest import GuestRam
from trio_vhost.proto.constants import VirtioFeature
from trio_vhost.vring.driver import DriverQueue


async def traffic(vring: DriverVring, base: int, rounds: int = 6) -> None:
    """Batches of 8 writes then reads on ``vring``, sectors from ``base``."""
    blk = BlkDriver(vring)
    for round_ in range(rounds):
        sectors = range(base + round_ * 8, base + round_ * 8 + 8)
        heads = {blk.submit(RequestType.OUT, s, sector_data(s)): s for s in sectors}
        used = await vring.wait_used(len(heads))
        assert sorted(h for h, _ in used) == sorted(heads)
        for s in sectors:
            assert await blk.read(s, 512) == sector_data(s)


@fail_after()
async def test_two_blk_rings_run_concurrently(image_fd: int, sock_path: str) -> None:
    device = GatedBlk(image_fd)
    with GuestRam.create(4 << 20) as ram:
        async with serving(device, sock_path), await Frontend.connect(sock_path) as frontend:
            acked = await frontend.negotiate()
            event_idx = bool(acked & VirtioFeature.RING_EVENT_IDX)
            assert await frontend.get_queue_num() == 2
            await frontend.set_mem_table([ram])
            rings: list[DriverVring] = []
            try:
                for i in (0, 1):
                    queue = DriverQueue.create(
                        ram, 64, event_idx=event_idx, indirect=True, pool_size=1 << 18
                    )
                    rings.append(await frontend.start_vring(i, queue))
                # Both workers hold a batch inside the device at the same time.
                device.close_gate()
                for i, vring in enumerate(rings):
                    BlkDriver(vring).submit(RequestType.OUT, 500 + i, sector_data(500 + i))
                await settle()
                assert device.inside == {0, 1}
                device.open_gate()
                for vring in rings:
                    assert len(await vring.wait_used(1)) == 1
                # Then traffic on both from two tasks.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(traffic, rings[0], 0)
                    nursery.start_soon(traffic, rings[1], 1000)
                for i, vring in enumerate(rings):
                    assert await frontend.get_vring_base(i) == vring.queue.avail_idx
                for s in [*range(48), *range(1000, 1048), 500, 501]:
                    assert os.pread(image_fd, 512, s * 512) == sector_data(s)
                assert sorted({index for index, _ in device.batches}) == [0, 1]
            finally:
                for vring in rings:
                    vring.close()
