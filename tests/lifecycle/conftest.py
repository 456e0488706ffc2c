"""Fixtures of the lifecycle tests (SLEEP/WAKE/SNAPSHOT/RESTORE, DEVICE_STATE, STATUS, reset).

They reuse the data-path rig (``tests/datapath/vhost_dp_harness.py``) and the raw frontend
of the protocol tests (``tests/protocol/_raw_frontend.py``); test directories are not
packages, so both directories go on ``sys.path`` here.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent.parent
for _sub in ("datapath", "protocol"):
    _dir = str(_TESTS / _sub)
    if _dir not in sys.path:
        sys.path.insert(0, _dir)

from _raw_frontend import fd_target, open_fds  # noqa: E402

#: Size of the blk test images.
IMAGE_SIZE = 4 << 20


@pytest.fixture(autouse=True)
def _no_fd_leak() -> Iterator[None]:
    """Fail a test that leaves an fd open (with the cyclic collector out of the way)."""
    was_enabled = gc.isenabled()
    gc.disable()
    before = open_fds()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
    leaked = open_fds() - before
    assert not leaked, f"fds leaked: {[(fd, fd_target(fd)) for fd in sorted(leaked)]}"


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    """A sparse, zeroed blk image of :data:`IMAGE_SIZE` bytes."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as image:
        image.truncate(IMAGE_SIZE)
    return path


@pytest.fixture
def image_fd(image_path: Path) -> Iterator[int]:
    """An open fd of :func:`image_path`."""
    fd = os.open(image_path, os.O_RDWR | os.O_CLOEXEC)
    yield fd
    os.close(fd)


@pytest.fixture
def sock_path() -> Iterator[str]:
    """A socket path short enough for sun_path (pytest's tmp_path may not be)."""
    directory = tempfile.mkdtemp(prefix="tvl-")
    yield os.path.join(directory, "vhost.sock")
    shutil.rmtree(directory, ignore_errors=True)
