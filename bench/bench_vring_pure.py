"""Time the pure device-side ring path: pop chains and complete them, no I/O, no trio.

A :class:`DriverQueue` refills the ring between rounds (untimed); only the device side is
timed, and the pop and the completion are timed separately:

* ``batch``: ``pop_batch`` (DescriptorChain objects) + ``add_used_batch`` of a list of pairs;
* ``arrays``: ``pop_arrays`` (a :class:`ChainBatch` of numpy arrays) + ``add_used_arrays``;
* ``naive``: ``pop`` + ``add_used`` per chain;

over 64-byte single-descriptor chains (the simple fast path), two-descriptor chains, and
virtio-blk shaped requests (header, 4 KiB, status) laid out directly or, as Linux posts them
with VIRTIO_F_INDIRECT_DESC, in an indirect table each: chained and indirect chains are
followed with numpy (``vring/follow.py``) when popped as arrays. "ns/chain" columns are
medians over full-ring rounds; ``device`` is the time spent between the two calls building
the completions.

Run: ``.venv/bin/python bench/bench_vring_pure.py [--rounds N]``
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

from trio_vhost.mem import GuestRam, MemoryTable
from trio_vhost.vring import DriverQueue, SplitQueue

Refill = Callable[[DriverQueue, int], None]
#: A device pass: returns (pop ns, device ns, complete ns).
Pass = Callable[[SplitQueue, int], tuple[int, int, int]]
clock = time.perf_counter_ns


def refill_single(driver: DriverQueue, n: int) -> None:
    driver.add_batch(n, 64)
    driver.publish()


def refill_chained(driver: DriverQueue, n: int) -> None:
    for _ in range(n // 2):
        driver.add([16], [48], indirect=False)
    driver.publish()


def refill_blk(driver: DriverQueue, n: int) -> None:
    for _ in range(n // 3):
        driver.add([16], [4096, 1], indirect=False)
    driver.publish()


def refill_blk_indirect(driver: DriverQueue, n: int) -> None:
    for _ in range(n // 3):
        driver.add([16], [4096, 1], indirect=True)
    driver.publish()


def batch_pass(queue: SplitQueue, n: int) -> tuple[int, int, int]:
    t0 = clock()
    chains = queue.pop_batch(n)
    t1 = clock()
    completions = [(c.head, 0) for c in chains]
    t2 = clock()
    queue.add_used_batch(completions)
    t3 = clock()
    assert chains
    return t1 - t0, t2 - t1, t3 - t2


def arrays_pass(queue: SplitQueue, n: int) -> tuple[int, int, int]:
    t0 = clock()
    batch = queue.pop_arrays(n)
    t1 = clock()
    written = 0
    t2 = clock()
    queue.add_used_arrays(batch.heads, written)
    t3 = clock()
    assert batch.count
    return t1 - t0, t2 - t1, t3 - t2


def naive_pass(queue: SplitQueue, n: int) -> tuple[int, int, int]:
    t0 = clock()
    while (chain := queue.pop()) is not None:
        queue.add_used(chain.head, 0)
    return clock() - t0, 0, 0


def measure(size: int, refill: Refill, device: Pass, rounds: int) -> tuple[float, float, float]:
    """Return the median ns/chain of (pop, device, complete) over ``rounds`` full-ring rounds."""
    ram = GuestRam.create(16 << 20)
    table = MemoryTable.from_regions([ram.backend_region()])
    try:
        driver = DriverQueue.create(ram, size, indirect=True, pool_size=size * 4352)
        queue = SplitQueue(table, driver.queue_state())
        pops, devs, adds = [], [], []
        for _ in range(rounds):
            refill(driver, size)
            expected = (driver.avail_idx - queue.next_avail) & 0xFFFF
            pop_ns, dev_ns, add_ns = device(queue, size)
            assert len(driver.get_used()) == expected
            pops.append(pop_ns / expected)
            devs.append(dev_ns / expected)
            adds.append(add_ns / expected)
        del queue
        return statistics.median(pops), statistics.median(devs), statistics.median(adds)
    finally:
        table.close()
        ram.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    print(f"python {platform.python_version()}  numpy {np.__version__}  {platform.machine()}")
    print(
        f"{'ring':>6} {'path':<22} {'pop ns':>8} {'device ns':>10} {'complete ns':>12}"
        f" {'total ns':>9} {'Mchains/s':>10}"
    )
    variants: list[tuple[str, Refill, Pass]] = [
        ("batch, 1 desc", refill_single, batch_pass),
        ("naive, 1 desc", refill_single, naive_pass),
        ("batch, 2-desc chains", refill_chained, batch_pass),
    ]
    if hasattr(SplitQueue, "pop_arrays"):
        variants[1:1] = [("arrays, 1 desc", refill_single, arrays_pass)]
        variants.append(("arrays, 2-desc chains", refill_chained, arrays_pass))
        variants.append(("arrays, blk 3-desc", refill_blk, arrays_pass))
        variants.append(("arrays, blk indirect", refill_blk_indirect, arrays_pass))
    totals: dict[tuple[int, str], float] = {}
    for size in (256, 1024):
        for name, refill, device in variants:
            pop, dev, add = measure(size, refill, device, args.rounds)
            total = pop + dev + add
            totals[(size, name)] = total
            print(
                f"{size:>6} {name:<22} {pop:>8.1f} {dev:>10.1f} {add:>12.1f}"
                f" {total:>9.1f} {1e3 / total:>10.2f}"
            )
    parts = []
    for size in (256, 1024):
        best = min(v for (n, k), v in totals.items() if n == size and "1 desc" in k)
        parts.append(
            f"N={size}: best batched {1e3 / best:.2f} Mchains/s,"
            f" {totals[(size, 'naive, 1 desc')] / best:.1f}x the per-chain loop"
        )
    print("summary: " + "; ".join(parts))


if __name__ == "__main__":
    main()
