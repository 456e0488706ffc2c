"""serve_client(): the backend connects to a listening frontend, and again after each one.

The frontend side here is a plain :class:`UnixListener` plus :class:`Frontend` over the
accepted transport, as QEMU (``server=on``) or DPDK virtio_user (``server=1``) would do.
"""

from __future__ import annotations

import errno
import os
import socket

import pytest
import trio
import trio.testing
from _raw_frontend import Resources, exercise_blk, fail_after, settle

from trio_vhost._io.transport import UnixListener, open_unix_listener
from trio_vhost.devices.blk import BlkDevice
from trio_vhost.frontend import Frontend
from trio_vhost.mem.guest import GuestRam
from trio_vhost.server import CLIENT_RETRY_MAX, CLIENT_RETRY_MIN, serve_client


def listen_now(path: str) -> UnixListener:
    """Listen without a checkpoint: under an autojump clock, trio's bind (which may run
    in a thread) lets the clock leap ahead while it runs, and the test's deadline with it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen()
    return UnixListener(trio.socket.from_stdlib_socket(sock), path)


@fail_after()
async def test_backend_connects_serves_and_connects_again(
    blk: BlkDevice, image_fd: int, sock_path: str
) -> None:
    with GuestRam.create(2 << 20) as ram:
        await settle()
        before = Resources.snapshot()
        listener = await open_unix_listener(sock_path)
        try:
            async with trio.open_nursery() as nursery:
                assert await nursery.start(serve_client, blk, sock_path) == sock_path
                for sector in (8, 16, 24):  # each frontend hangs up; the backend comes back
                    async with Frontend(await listener.accept()) as frontend:
                        await exercise_blk(frontend, ram, image_fd, sector)
                nursery.cancel_scope.cancel()
        finally:
            listener.close()
        await settle()
        before.assert_unchanged()


@fail_after(60)
async def test_backend_waits_for_the_frontend_to_listen(
    blk: BlkDevice, image_fd: int, sock_path: str, autojump_clock: trio.testing.MockClock
) -> None:
    with GuestRam.create(2 << 20) as ram:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_client, blk, sock_path)
            # No socket file for a while: the backend backs off, up to its cap.
            await trio.sleep(10)
            assert not os.path.exists(sock_path)
            listener = listen_now(sock_path)
            try:
                listening = trio.current_time()
                async with Frontend(await listener.accept()) as frontend:
                    # It connected within one capped back-off of the socket appearing.
                    waited = trio.current_time() - listening
                    assert waited <= CLIENT_RETRY_MAX + CLIENT_RETRY_MIN
                    await exercise_blk(frontend, ram, image_fd, 8)
            finally:
                listener.close()
            nursery.cancel_scope.cancel()


@fail_after()
async def test_a_refusing_socket_file_is_waited_on(
    blk: BlkDevice, image_fd: int, sock_path: str, autojump_clock: trio.testing.MockClock
) -> None:
    """A stale socket file (ECONNREFUSED) means the frontend is not up yet: retry."""
    # A plain socket: trio's bind resolves in a thread, and an autojump clock would leap
    # to the test's deadline while it runs.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(sock_path)
    with GuestRam.create(2 << 20) as ram:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_client, blk, sock_path)
            await trio.sleep(3)
            os.unlink(sock_path)
            listener = listen_now(sock_path)
            try:
                async with Frontend(await listener.accept()) as frontend:
                    await exercise_blk(frontend, ram, image_fd, 16)
            finally:
                listener.close()
            nursery.cancel_scope.cancel()


@fail_after()
async def test_an_error_waiting_cannot_mend_is_raised(blk: BlkDevice, sock_path: str) -> None:
    not_a_dir = os.path.join(os.path.dirname(sock_path), "file")
    with open(not_a_dir, "w"):
        pass
    with pytest.raises(OSError) as info:
        await serve_client(blk, os.path.join(not_a_dir, "vhost.sock"))
    assert info.value.errno == errno.ENOTDIR
