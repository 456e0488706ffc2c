"""serve(): one frontend after another on one socket path, and the socket file's life.

QEMU's ``reconnect=`` and DPDK's ``server=1`` rely on a backend that outlives its
frontends: a frontend that vanishes with memory shared and a ring running must leave
nothing behind, and the next one gets a fresh session on the same listener.
"""

from __future__ import annotations

import errno
import os
import socket

import pytest
import trio
from _raw_frontend import PATTERN, Resources, exercise_blk, fail_after, maps_of, settle

from trio_vhost.devices.blk import BlkDevice
from trio_vhost.devices.blk_driver import BlkDriver
from trio_vhost.devices.blk_spec import RequestType
from trio_vhost.frontend import Frontend
from trio_vhost.mem.guest import GuestRam
from trio_vhost.server import serve
from trio_vhost.vring.driver import DriverQueue


async def full_blk_io(path: str, ram: GuestRam, image_fd: int, sector: int) -> None:
    """Connect, then every kind of blk request (see ``exercise_blk``)."""
    async with await Frontend.connect(path) as frontend:
        await exercise_blk(frontend, ram, image_fd, sector)


@fail_after()
async def test_abrupt_disconnect_then_next_frontend_does_full_io(
    blk: BlkDevice, image_fd: int, sock_path: str
) -> None:
    with GuestRam.create(2 << 20) as ram:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, blk, sock_path)
            before = Resources.snapshot()
            # Frontend 1: memory, a running ring with a request in flight, then gone.
            frontend = await Frontend.connect(sock_path)
            await frontend.negotiate()
            await frontend.set_mem_table([ram])
            queue = DriverQueue.create(ram, 64, event_idx=True, pool_size=1 << 16)
            vring = await frontend.start_vring(0, queue)
            BlkDriver(vring).submit(RequestType.OUT, 8, PATTERN[:512])  # nobody waits for it
            await settle()
            assert len(maps_of(ram.fd.fd)) == 2  # ours and the server's
            frontend.transport.close()
            vring.close()
            del vring, queue
            await settle()
            assert len(maps_of(ram.fd.fd)) == 1
            before.assert_unchanged()
            # Frontend 2, same listener: a fresh session that works end to end.
            await full_blk_io(sock_path, ram, image_fd, 64)
            await settle()
            before.assert_unchanged()
            nursery.cancel_scope.cancel()
        assert not os.path.exists(sock_path), "serve() left its socket file behind"


@fail_after()
async def test_many_frontends_in_a_row(blk: BlkDevice, image_fd: int, blk_server: str) -> None:
    with GuestRam.create(2 << 20) as ram:
        await settle()
        before = Resources.snapshot()
        for sector in range(0, 40, 8):
            await full_blk_io(blk_server, ram, image_fd, sector)
        await settle()
        before.assert_unchanged()


@fail_after()
async def test_second_serve_on_a_live_path_fails_with_eaddrinuse(
    blk: BlkDevice, blk_server: str
) -> None:
    with pytest.raises(OSError) as info:
        await serve(blk, blk_server)
    assert info.value.errno == errno.EADDRINUSE
    # The first server is unharmed (the probe's connection was served and closed).
    async with await Frontend.connect(blk_server) as frontend:
        await frontend.negotiate()


@fail_after()
async def test_stale_socket_file_is_replaced(blk: BlkDevice, sock_path: str) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)
    dead.close()  # the file stays, nobody listens
    assert os.path.exists(sock_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, blk, sock_path)
        async with await Frontend.connect(sock_path) as frontend:
            await frontend.negotiate()
        nursery.cancel_scope.cancel()
    assert not os.path.exists(sock_path)


@fail_after()
async def test_a_path_that_is_not_a_socket_is_left_alone(blk: BlkDevice, sock_path: str) -> None:
    with open(sock_path, "w") as f:
        f.write("precious")
    with pytest.raises(OSError) as info:
        await serve(blk, sock_path)
    assert info.value.errno == errno.EADDRINUSE
    with open(sock_path) as f:
        assert f.read() == "precious"
