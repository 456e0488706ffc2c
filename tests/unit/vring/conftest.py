"""Fixtures for the vring tests: both sides of a ring over one memfd.

The driver side (:class:`DriverQueue`) writes through :class:`GuestRam`'s whole-file mapping;
the device side (:class:`SplitQueue`) reads and writes through a :class:`MemoryTable` built
from :meth:`GuestRam.backend_region`, i.e. a separate MAP_SHARED mapping of the same fd, so
the two sides really share pages.

``guarded`` lays guest RAM out with canaries that the backend's table does not map::

    file:  [canary 64K][region A 512K][canary 64K][region B 512K][canary 64K]

Rings and the driver's buffer pool live in region A; region B is for far buffers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest

from trio_vhost.mem import GuestRam, MemoryTable
from trio_vhost.vring import DriverQueue, SplitQueue

KiB = 1024
CANARY = 0xA5
RAM_GPA = 0x4000_0000


@dataclass
class Ring:
    ram: GuestRam
    table: MemoryTable
    driver: DriverQueue
    queue: SplitQueue
    canaries: list[tuple[int, int]] = field(default_factory=list)  # (gpa, len)

    def snapshot(self) -> np.ndarray:
        return self.ram.view.copy()

    def assert_canaries(self) -> None:
        for gpa, length in self.canaries:
            off = self.ram.offset(gpa, length)
            assert (self.ram.view[off : off + length] == CANARY).all(), f"canary at {gpa:#x}"

    def rebuild(self, **changes: object) -> SplitQueue:
        """Build a fresh device queue from the current one's state with some fields changed."""
        from dataclasses import replace

        self.queue = SplitQueue(self.table, replace(self.queue.state(), **changes))
        return self.queue


@pytest.fixture
def make_ring() -> Iterator[object]:
    made: list[Ring] = []

    def make(
        size: int = 8,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        start: int = 0,
        pool_size: int | None = None,
    ) -> Ring:
        ram = GuestRam.create(max(1 << 20, 4096 * size * 2), gpa=RAM_GPA)
        table = MemoryTable.from_regions([ram.backend_region()])
        driver = DriverQueue.create(
            ram, size, event_idx=event_idx, indirect=indirect, pool_size=pool_size or 512 * KiB
        )
        if start:
            driver.skip_to(start)
        queue = SplitQueue(table, driver.queue_state(next_avail=start, next_used=start))
        ring = Ring(ram, table, driver, queue)
        made.append(ring)
        return ring

    yield make
    for ring in made:
        del ring.queue
        ring.table.close()
        ring.ram.close()


@pytest.fixture
def guarded() -> Iterator[object]:
    made: list[Ring] = []

    def make(size: int = 8, *, event_idx: bool = False, indirect: bool = False) -> Ring:
        ram = GuestRam.create(1216 * KiB, gpa=RAM_GPA)
        canaries = [(RAM_GPA, 64 * KiB), (RAM_GPA + 576 * KiB, 64 * KiB)]
        canaries.append((RAM_GPA + 1152 * KiB, 64 * KiB))
        for gpa, length in canaries:
            ram.fill(gpa, length, CANARY)
        ram.alloc(64 * KiB)  # the allocator starts past the first canary
        table = MemoryTable.from_regions(
            [ram.backend_region(64 * KiB, 512 * KiB), ram.backend_region(640 * KiB, 512 * KiB)]
        )
        driver = DriverQueue.create(
            ram, size, event_idx=event_idx, indirect=indirect, pool_size=64 * KiB
        )
        queue = SplitQueue(table, driver.queue_state())
        ring = Ring(ram, table, driver, queue, canaries)
        made.append(ring)
        return ring

    yield make
    for ring in made:
        ring.assert_canaries()
        del ring.queue
        ring.table.close()
        ring.ram.close()


#: Guest addresses of the guarded layout, for tests that aim at its edges.
REGION_A = RAM_GPA + 64 * KiB
REGION_B = RAM_GPA + 640 * KiB
REGION_SIZE = 512 * KiB


@pytest.fixture
def layout() -> dict[str, int]:
    return {"A": REGION_A, "B": REGION_B, "size": REGION_SIZE, "ram": RAM_GPA}
