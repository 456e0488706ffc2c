"""ADD_MEM_REG / REM_MEM_REG when several vhost devices share one connection.

QEMU keeps a region list per vhost device; a multiqueue net device has one vhost device per
queue pair on the same socket, so each pair adds (and later removes) the same region. The
region must stay mapped until its last owner removes it (regression: the second ADD_MEM_REG
of a net device with 2 queue pairs was NACKed as an overlap, and QEMU fell back to
userspace virtio).
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from trio_vhost import Frontend, GuestRam, ProtocolFeature, RequestNacked, VirtioFeature
from trio_vhost._io.transport import UnixTransport
from trio_vhost.devices.blk import BlkDevice
from trio_vhost.devices.blk_driver import BlkDriver
from trio_vhost.server import serve_connection
from trio_vhost.vring.driver import DriverQueue


def memfd_maps(fd: int) -> int:
    target = os.readlink(f"/proc/self/fd/{fd}").split(" (deleted)")[0]
    with open("/proc/self/maps") as maps:
        return sum(target in line for line in maps)


async def test_duplicate_regions_are_counted(tmp_path: Path) -> None:
    image = os.open(tmp_path / "disk.img", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(image, 1 << 20)
    backend, front = UnixTransport.socketpair()
    try:
        with trio.fail_after(20), GuestRam.create(2 << 20) as ram:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_connection, BlkDevice(image), backend)
                frontend = Frontend(front)
                acked = await frontend.negotiate()
                assert frontend.has_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS)
                for _ in range(2):  # two owners of the same region
                    await frontend.add_mem_region(ram)
                queue = DriverQueue.create(
                    ram, 16, event_idx=bool(acked & VirtioFeature.RING_EVENT_IDX)
                )
                vring = await frontend.start_vring(0, queue)
                driver = BlkDriver(vring)
                await driver.write(0, b"a" * 512)
                await frontend.remove_mem_region(ram)  # one owner left: still mapped
                assert memfd_maps(ram.fd.fd) == 2
                assert await driver.read(0, 512) == b"a" * 512
                await frontend.get_vring_base(0)
                await frontend.remove_mem_region(ram)  # the last owner: unmapped
                assert memfd_maps(ram.fd.fd) == 1
                try:
                    await frontend.remove_mem_region(ram)
                except RequestNacked:
                    pass
                else:
                    raise AssertionError("removing an unknown region must be NACKed")
                vring.close()
                await frontend.aclose()
    finally:
        os.close(image)
