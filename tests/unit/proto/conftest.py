"""Fixtures for the proto unit tests: real fds, and a leak check around every test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from _proto_helpers import FdPool


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def _no_fd_leak() -> Iterator[None]:
    """Fail a test that leaves an fd open that it did not find open."""
    before = _open_fds()
    yield
    leaked = _open_fds() - before
    # listdir itself opens one fd, which is gone by the time it returns.
    assert not leaked, f"fds leaked: {sorted(leaked)}"


@pytest.fixture
def fd_pool() -> Iterator[FdPool]:
    """Real eventfds for a test; all closed at teardown."""
    pool = FdPool()
    yield pool
    pool.close()
