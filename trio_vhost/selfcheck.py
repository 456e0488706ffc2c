"""``trio-vhost selfcheck``: serve the example devices and drive them end to end.

Runs on any Linux machine, no QEMU needed: a blk backend is served on a temporary socket
over a temporary sparse image, and the built-in Python frontend negotiates with it like
QEMU, shares memfd guest memory, starts a ring and performs real I/O, checking every result
against the image file. Each verified step is printed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import trio

from .devices.blk import BlkDevice
from .devices.blk_driver import BlkDriver
from .devices.blk_spec import SECTOR_SIZE, BlkFeature
from .devices.net import NetPort
from .devices.net_switch import Switch
from .frontend import DriverVring, Frontend
from .mem.guest import GuestRam
from .proto.constants import ProtocolFeature, VirtioFeature
from .server import serve
from .vring.driver import DriverQueue

__all__ = ["run_selfcheck"]

IMAGE_SIZE = 8 << 20


class SelfcheckFailed(Exception):
    """A step of the selfcheck did not give the expected result."""


def _check(condition: bool, what: str, say: Callable[[str], None]) -> None:
    if not condition:
        raise SelfcheckFailed(what)
    say(f"  ok  {what}")


async def check_blk(directory: str, say: Callable[[str], None]) -> None:
    """Serve blk in ``directory`` and verify it through the Python frontend."""
    image = os.path.join(directory, "disk.img")
    socket_path = os.path.join(directory, "blk.sock")
    fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, IMAGE_SIZE)
    device = BlkDevice(fd, num_queues=2, serial="selfcheck")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, device, socket_path)
            say(f"blk: serving {IMAGE_SIZE >> 20} MiB image on {socket_path}")
            await _drive_blk(socket_path, fd, say)
            nursery.cancel_scope.cancel()
    finally:
        os.close(fd)


async def _drive_blk(socket_path: str, image_fd: int, say: Callable[[str], None]) -> None:
    with GuestRam.create(4 << 20) as ram:
        async with await Frontend.connect(socket_path) as frontend:
            acked = await frontend.negotiate()
            _check(bool(acked & VirtioFeature.VERSION_1), "negotiated VERSION_1", say)
            _check(frontend.has_protocol_feature(ProtocolFeature.CONFIG), "CONFIG acked", say)
            _check(await frontend.get_queue_num() == 2, "GET_QUEUE_NUM reports 2 queues", say)
            config = await frontend.get_config(0, 60)
            capacity = int.from_bytes(config[:8], "little")
            _check(capacity == IMAGE_SIZE // SECTOR_SIZE, f"capacity {capacity} sectors", say)
            _check(bool(acked & BlkFeature.FLUSH), "FLUSH offered and acked", say)
            await frontend.set_mem_table([ram])
            queue = DriverQueue.create(
                ram, 64, event_idx=bool(acked & VirtioFeature.RING_EVENT_IDX), indirect=True
            )
            vring = await frontend.start_vring(0, queue)
            try:
                await _blk_io(BlkDriver(vring), image_fd, say)
                base = await frontend.get_vring_base(0)
                _check(base == queue.avail_idx, f"GET_VRING_BASE returned {base}", say)
            finally:
                vring.close()


async def _blk_io(driver: BlkDriver, image_fd: int, say: Callable[[str], None]) -> None:
    pattern = bytes(range(256)) * 32  # 8 KiB
    await driver.write(16, pattern)
    _check(os.pread(image_fd, len(pattern), 16 * SECTOR_SIZE) == pattern, "write landed", say)
    _check(await driver.read(16, len(pattern)) == pattern, "read back the pattern", say)
    await driver.flush()
    say("  ok  flush")
    _check(await driver.get_id() == b"selfcheck", "GET_ID returned the serial", say)
    await driver.discard(16, 8)
    zeroes = os.pread(image_fd, 8 * SECTOR_SIZE, 16 * SECTOR_SIZE)
    _check(zeroes == bytes(len(zeroes)), "discard left zeroes", say)


async def check_net(directory: str, say: Callable[[str], None]) -> None:
    """Serve two net ports on one switch and pass frames between two Python guests."""
    switch = Switch()
    paths = [os.path.join(directory, f"net{i}.sock") for i in range(2)]
    ports = [NetPort(switch, f"port{i}", mac=bytes([2, 0, 0, 0, 0, i + 1])) for i in range(2)]
    async with trio.open_nursery() as nursery:
        for port, path in zip(ports, paths, strict=True):
            await nursery.start(serve, port, path)
        say(f"net: serving two switch ports on {paths[0]} and {paths[1]}")
        with GuestRam.create(4 << 20) as ram_a, GuestRam.create(4 << 20) as ram_b:
            async with (
                await Frontend.connect(paths[0]) as guest_a,
                await Frontend.connect(paths[1]) as guest_b,
            ):
                a = await _net_guest(guest_a, ram_a)
                b = await _net_guest(guest_b, ram_b)
                try:
                    mac_a, mac_b = bytes([2, 0, 0, 0, 0, 0xA]), bytes([2, 0, 0, 0, 0, 0xB])
                    frame = BROADCAST + mac_a + b"\x88\xb5" + b"hello from a".ljust(50, b".")
                    _check(await _send(a, b, frame) == frame, "broadcast a -> b delivered", say)
                    reply = mac_a + mac_b + b"\x88\xb5" + b"hello back".ljust(50, b".")
                    _check(await _send(b, a, reply) == reply, "unicast b -> a delivered", say)
                    learned = switch.lookup(mac_a) is ports[0].port
                    _check(learned, "switch learned a's MAC on port 0", say)
                finally:
                    for vring in (*a, *b):
                        vring.close()
        nursery.cancel_scope.cancel()


BROADCAST = b"\xff" * 6
NET_HEADER = bytes(12)


async def _net_guest(frontend: Frontend, ram: GuestRam) -> tuple[DriverVring, DriverVring]:
    acked = await frontend.negotiate()
    await frontend.set_mem_table([ram])
    event_idx = bool(acked & VirtioFeature.RING_EVENT_IDX)
    rings = [
        await frontend.start_vring(
            index, DriverQueue.create(ram, 64, event_idx=event_idx, pool_size=256 << 10)
        )
        for index in (0, 1)
    ]
    return rings[0], rings[1]


async def _send(
    sender: tuple[DriverVring, DriverVring],
    receiver: tuple[DriverVring, DriverVring],
    frame: bytes,
) -> bytes:
    rx = receiver[0]
    head = rx.submit([], [2048])
    sender[1].submit([NET_HEADER + frame])
    await sender[1].wait_used(1)
    used = await rx.wait_used(1)
    assert used[0][0] == head
    return rx.queue.read_written(head)[len(NET_HEADER) :]


async def run_selfcheck(say: Callable[[str], None] = print) -> int:
    """Run every check; return 0 when all pass, 1 otherwise (the reason is printed)."""
    with tempfile.TemporaryDirectory(prefix="trio-vhost-selfcheck-") as directory:
        try:
            with trio.fail_after(30):
                await check_blk(directory, say)
                await check_net(directory, say)
        except (SelfcheckFailed, trio.TooSlowError) as exc:
            say(f"selfcheck FAILED: {exc or 'timed out'}")
            return 1
    say("selfcheck passed: blk and net served and verified end to end")
    return 0
