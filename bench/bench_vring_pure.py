"""Time the pure device-side ring path: pop chains and complete them, no I/O, no trio.

A :class:`DriverQueue` refills the ring between rounds (untimed); only the device side is
timed: ``pop_batch`` + ``add_used_batch`` (batched) against ``pop`` + ``add_used`` per chain
(naive), over 64-byte single-descriptor chains, and the batched path over two-descriptor
chains (which take the per-chain walk). Prints a table and a final summary line.

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


def refill_single(driver: DriverQueue, n: int) -> None:
    driver.add_batch(n, 64)
    driver.publish()


def refill_chained(driver: DriverQueue, n: int) -> None:
    for _ in range(n // 2):
        driver.add([16], [48])
    driver.publish()


def batched(queue: SplitQueue, n: int) -> int:
    t0 = time.perf_counter_ns()
    chains = queue.pop_batch(n)
    queue.add_used_batch([(c.head, 0) for c in chains])
    elapsed = time.perf_counter_ns() - t0
    assert len(chains) > 0
    return elapsed


def naive(queue: SplitQueue, n: int) -> int:
    t0 = time.perf_counter_ns()
    while (chain := queue.pop()) is not None:
        queue.add_used(chain.head, 0)
    return time.perf_counter_ns() - t0


def measure(
    size: int, refill: Refill, device: Callable[[SplitQueue, int], int], rounds: int
) -> float:
    """Return the median chains per second over ``rounds`` full-ring rounds."""
    ram = GuestRam.create(16 << 20)
    table = MemoryTable.from_regions([ram.backend_region()])
    try:
        driver = DriverQueue.create(ram, size, pool_size=size * 256)
        queue = SplitQueue(table, driver.queue_state())
        rates = []
        for _ in range(rounds):
            refill(driver, size)
            expected = (driver.avail_idx - queue.next_avail) & 0xFFFF
            ns = device(queue, size)
            assert len(driver.get_used()) == expected
            rates.append(expected / (ns / 1e9))
        del queue
        return statistics.median(rates)
    finally:
        table.close()
        ram.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    print(f"python {platform.python_version()}  numpy {np.__version__}  {platform.machine()}")
    print(f"{'ring':>6} {'path':<28} {'chains/s':>14} {'ns/chain':>10}")
    results: dict[tuple[int, str], float] = {}
    for size in (256, 1024):
        for name, refill, device in (
            ("batched, 1 desc", refill_single, batched),
            ("naive per chain, 1 desc", refill_single, naive),
            ("batched, 2-desc chains", refill_chained, batched),
        ):
            rate = measure(size, refill, device, args.rounds)
            results[(size, name)] = rate
            print(f"{size:>6} {name:<28} {rate:>14,.0f} {1e9 / rate:>10.0f}")
    speedups = [
        results[(n, "batched, 1 desc")] / results[(n, "naive per chain, 1 desc")]
        for n in (256, 1024)
    ]
    print(
        "summary: batched pop+complete "
        f"{results[(256, 'batched, 1 desc')] / 1e6:.2f} Mchains/s (N=256), "
        f"{results[(1024, 'batched, 1 desc')] / 1e6:.2f} Mchains/s (N=1024); "
        f"{speedups[0]:.1f}x / {speedups[1]:.1f}x the per-chain loop"
    )


if __name__ == "__main__":
    main()
