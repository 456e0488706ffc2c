"""Memory-table changes while a ring carries I/O.

The device here is blk made asynchronous with a gate: the test closes the gate, submits
requests, and the worker ends up holding a batch inside the device. A memory change sent
then must wait for that batch (the worker stops at a chain boundary, never in the middle
of one), must not let the old worker pop the requests added meanwhile, must unmap what
the old table mapped and nothing else, and the ring must resume on the new table with
every request completed exactly once and its data on the image.
"""

from __future__ import annotations

import os

import trio
from _raw_frontend import GatedBlk, fail_after, maps_of, sector_data, serving, settle

from trio_vhost.devices.blk_driver import BlkDriver
from trio_vhost.devices.blk_spec import RequestType, Status
from trio_vhost.frontend import DriverVring, Frontend
from trio_vhost.mem.guest import GuestRam
from trio_vhost.proto.constants import VirtioFeature
from trio_vhost.vring.driver import DriverQueue

RAM_B_GPA = 0x1000_0000


def backend_maps(ram: GuestRam) -> list[int]:
    """Start addresses of the mappings of ``ram``'s memfd other than the frontend's own."""
    mine = ram.view.ctypes.data
    starts = [int(line.split("-", 1)[0], 16) for line in maps_of(ram.fd.fd)]
    assert mine in starts
    return [start for start in starts if start != mine]


async def change_under_traffic(
    device: GatedBlk, vring: DriverVring, change: object, first: range, more: range
) -> None:
    """Hold a batch of writes to ``first`` in the device, run ``change`` (an async
    callable), add writes to ``more`` meanwhile, then release and check every write."""
    blk = BlkDriver(vring)
    device.close_gate()
    heads = {blk.submit(RequestType.OUT, s, sector_data(s)): s for s in first}
    await device.holding.wait()
    held = device.batches[-1]
    assert held == (vring.index, len(first))
    done = trio.Event()

    async def run_change() -> None:
        await change()  # type: ignore[operator]
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_change)
        await settle()
        assert not done.is_set(), "the memory change did not wait for the batch in flight"
        heads |= {blk.submit(RequestType.OUT, s, sector_data(s)): s for s in more}
        await settle()
        assert device.batches[-1] is held, "a stopping worker popped new chains"
        device.open_gate()
        await done.wait()
    used = await vring.wait_used(len(heads))
    assert sorted(head for head, _ in used) == sorted(heads), "a chain was lost or doubled"
    for head, _written in used:
        status, _ = blk.result(head, _written)
        assert status == Status.OK


async def verify(vring: DriverVring, image_fd: int, sectors: range) -> None:
    blk = BlkDriver(vring)
    for s in sectors:
        assert os.pread(image_fd, 512, s * 512) == sector_data(s)
        assert await blk.read(s, 512) == sector_data(s)


@fail_after()
async def test_set_mem_table_under_traffic(image_fd: int, sock_path: str) -> None:
    device = GatedBlk(image_fd)
    with GuestRam.create(2 << 20) as ram_a, GuestRam.create(1 << 20, gpa=RAM_B_GPA) as ram_b:
        async with serving(device, sock_path), await Frontend.connect(sock_path) as frontend:
            acked = await frontend.negotiate()
            event_idx = bool(acked & VirtioFeature.RING_EVENT_IDX)
            await frontend.set_mem_table([ram_a])
            queue = DriverQueue.create(
                ram_a, 64, event_idx=event_idx, indirect=True, pool_size=1 << 18
            )
            vring = await frontend.start_vring(0, queue)
            try:
                await verify_roundtrip(vring)
                [old] = backend_maps(ram_a)
                assert backend_maps(ram_b) == []

                async def grow() -> None:
                    await frontend.set_mem_table([ram_a, ram_b])

                await change_under_traffic(device, vring, grow, range(8), range(8, 12))
                [new] = backend_maps(ram_a)
                assert new != old, "the old table's mapping is still there"
                assert len(backend_maps(ram_b)) == 1
                await verify(vring, image_fd, range(12))

                async def shrink() -> None:
                    await frontend.set_mem_table([ram_a])

                await change_under_traffic(device, vring, shrink, range(12, 20), range(20, 24))
                assert backend_maps(ram_b) == [], "a region dropped from the table is mapped"
                assert len(backend_maps(ram_a)) == 1
                await verify(vring, image_fd, range(24))
                assert await frontend.get_vring_base(0) == queue.avail_idx
            finally:
                vring.close()
        await settle()
        assert backend_maps(ram_a) == backend_maps(ram_b) == []


async def verify_roundtrip(vring: DriverVring) -> None:
    blk = BlkDriver(vring)
    await blk.write(100, sector_data(100))
    assert await blk.read(100, 512) == sector_data(100)


@fail_after()
async def test_add_and_remove_regions_under_traffic(image_fd: int, sock_path: str) -> None:
    device = GatedBlk(image_fd)
    with GuestRam.create(2 << 20) as ram_a, GuestRam.create(1 << 20, gpa=RAM_B_GPA) as ram_b:
        async with serving(device, sock_path), await Frontend.connect(sock_path) as frontend:
            acked = await frontend.negotiate()
            event_idx = bool(acked & VirtioFeature.RING_EVENT_IDX)
            assert frontend.codec.acked_protocol_features & (1 << 15), "CONFIGURE_MEM_SLOTS"
            await frontend.add_mem_region(ram_a)  # QEMU's way once the slots are negotiated
            queue = DriverQueue.create(ram_a, 64, event_idx=event_idx, pool_size=1 << 18)
            vring = await frontend.start_vring(0, queue)
            queue_b = DriverQueue.create(ram_b, 32, event_idx=event_idx, pool_size=1 << 17)
            vring_b: DriverVring | None = None
            try:
                await verify_roundtrip(vring)
                [old_a] = backend_maps(ram_a)

                async def add() -> None:
                    await frontend.add_mem_region(ram_b)

                await change_under_traffic(device, vring, add, range(8), range(8, 10))
                assert backend_maps(ram_a) == [old_a], "ADD_MEM_REG remapped a kept region"
                assert len(backend_maps(ram_b)) == 1
                # The new region is usable: a second ring lives entirely in it.
                vring_b = await frontend.start_vring(1, queue_b)
                await verify(vring_b, image_fd, range(10))
                assert await frontend.get_vring_base(1) == queue_b.avail_idx

                async def remove() -> None:
                    await frontend.remove_mem_region(ram_b)

                await change_under_traffic(device, vring, remove, range(10, 16), range(16, 18))
                assert backend_maps(ram_b) == [], "REM_MEM_REG left the region mapped"
                assert backend_maps(ram_a) == [old_a]
                await verify(vring, image_fd, range(18))
            finally:
                vring.close()
                if vring_b is not None:
                    vring_b.close()
