"""DirtyLog: the bitmap against a reference, bounds, and mapping a log fd."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from trio_vhost.errors import GuestMemoryError
from trio_vhost.mem.dirty import LOG_PAGE, DirtyLog, DirtyLogError


def _log(size: int) -> DirtyLog:
    return DirtyLog(None, np.zeros(size, dtype=np.uint8))


def _reference(size: int, ranges: list[tuple[int, int]]) -> set[int]:
    pages: set[int] = set()
    for gpa, n in ranges:
        if n:
            pages.update(range(gpa // LOG_PAGE, (gpa + n - 1) // LOG_PAGE + 1))
    return pages


def _marked(log: DirtyLog) -> set[int]:
    return {int(p) for p in log.pages()}


@pytest.mark.parametrize("seed", range(5))
def test_mark_matches_the_reference(seed: int) -> None:
    rnd = random.Random(seed)
    log = _log(64)
    limit = log.limit
    ranges = []
    for _ in range(40):
        gpa = rnd.randrange(limit)
        n = rnd.choice([0, 1, rnd.randrange(1, 3 * LOG_PAGE), rnd.randrange(1, 40 * LOG_PAGE)])
        n = min(n, limit - gpa)
        ranges.append((gpa, n))
        log.mark(gpa, n)
        assert _marked(log) == _reference(64, ranges)


@pytest.mark.parametrize("seed", range(5))
def test_mark_ranges_matches_the_reference(seed: int) -> None:
    rnd = random.Random(seed)
    log = _log(64)
    ranges = []
    for _ in range(30):
        gpa = rnd.randrange(log.limit)
        n = min(rnd.choice([0, 1, 4096, rnd.randrange(1, 70 * LOG_PAGE)]), log.limit - gpa)
        ranges.append((gpa, n))
    addrs = np.array([g for g, _ in ranges], dtype=np.uint64)
    lens = np.array([n for _, n in ranges], dtype=np.uint32)
    log.mark_ranges(addrs, lens)
    assert _marked(log) == _reference(64, ranges)


def test_only_sets_bits() -> None:
    view = np.full(8, 0x5A, dtype=np.uint8)
    log = DirtyLog(None, view)
    log.mark(0, 1)
    log.mark_ranges(np.array([9 * LOG_PAGE], dtype=np.uint64), np.array([1], dtype=np.uint64))
    assert view[0] == 0x5B
    assert view[1] == 0x5A | 0x02


@pytest.mark.parametrize(
    ("gpa", "n"), [(64 * 8 * LOG_PAGE, 1), (64 * 8 * LOG_PAGE - 1, 2), ((1 << 64) - 1, 2)]
)
def test_beyond_the_log_is_a_typed_error_and_writes_nothing(gpa: int, n: int) -> None:
    log = _log(64)
    with pytest.raises(DirtyLogError):
        log.mark(gpa, n)
    with pytest.raises(GuestMemoryError):
        log.mark_ranges(
            np.array([0, gpa], dtype=np.uint64), np.array([LOG_PAGE, n], dtype=np.uint64)
        )
    assert not log.view.any()


def test_last_page_is_covered() -> None:
    log = _log(2)
    log.mark(log.limit - 1, 1)
    assert _marked(log) == {15}


def test_map_a_memfd_at_an_offset() -> None:
    fd = os.memfd_create("log", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 3 * 4096)
        log = DirtyLog.map(fd, 100, 4096 + 8)
        log.mark(LOG_PAGE * 9, 1)
        log.close()
        log.close()
        data = os.pread(fd, 4, 4096 + 8)
        assert data == b"\x00\x02\x00\x00"
        with pytest.raises(DirtyLogError):
            DirtyLog.map(fd, 4096, 3 * 4096)  # beyond the file
        with pytest.raises(DirtyLogError):
            DirtyLog.map(fd, 0, 0)
    finally:
        os.close(fd)
