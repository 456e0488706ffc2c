"""Fixtures for the protocol tests: the real server, a blk image, and a leak check.

Rules for ``tests/protocol``: the real :func:`trio_vhost.serve` (or ``serve_connection``)
over real AF_UNIX sockets, real eventfds and memfd guest memory; synchronise with
``wait_all_tasks_blocked`` and events, never sleeps; every test wears a trio-clock
``fail_after`` (``_raw_frontend.fail_after``).
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
import trio
from _raw_frontend import fd_target, open_fds

from trio_vhost.devices.blk import BlkDevice
from trio_vhost.server import serve

#: Size of the blk test image.
IMAGE_SIZE = 8 << 20


@pytest.fixture(autouse=True)
def _no_cyclic_gc() -> Iterator[None]:
    """Keep the cyclic garbage collector out of the way while a test runs.

    The server must release fds and mappings when a session ends, not whenever the
    collector happens to run: with it off, a resource kept alive by a reference cycle
    shows up as a leak every time instead of now and then.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    yield
    if was_enabled:
        gc.enable()
    gc.collect()


@pytest.fixture(autouse=True)
def _no_fd_leak(_no_cyclic_gc: None) -> Iterator[None]:
    """Fail a test that leaves an fd open that it did not find open."""
    before = open_fds()
    yield
    leaked = open_fds() - before
    assert not leaked, f"fds leaked: {[(fd, fd_target(fd)) for fd in sorted(leaked)]}"


@pytest.fixture
def sock_path() -> Iterator[str]:
    """A socket path short enough for sun_path (pytest's tmp_path may not be)."""
    directory = tempfile.mkdtemp(prefix="tvp-")
    yield os.path.join(directory, "vhost.sock")
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def image_fd(tmp_path: object) -> Iterator[int]:
    """An open, sparse, zeroed blk image of :data:`IMAGE_SIZE` bytes."""
    fd = os.open(os.path.join(str(tmp_path), "disk.img"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    os.ftruncate(fd, IMAGE_SIZE)
    yield fd
    os.close(fd)


@pytest.fixture
def blk(image_fd: int) -> BlkDevice:
    """A two-queue blk device over :func:`image_fd`."""
    return BlkDevice(image_fd, num_queues=2, serial="protocol-test")


@pytest.fixture
async def blk_server(nursery: trio.Nursery, blk: BlkDevice, sock_path: str) -> str:
    """Serve :func:`blk` on :func:`sock_path` for the test; return the path."""
    path: str = await nursery.start(serve, blk, sock_path)
    return path
