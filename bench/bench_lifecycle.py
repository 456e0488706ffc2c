"""Lifecycle latency: SLEEP, SNAPSHOT, RESTORE, WAKE and DEVICE_STATE save/load of blk.

One process, one trio run: the real ``serve_connection`` over a socketpair and the Python
``Frontend`` as the peer, so each number is one request's round trip through both sides
(encode, socket, dispatch, handler, reply). Per configuration (a blk device with 1 or 8
queues of 256 entries, every ring started and a few requests done on each) it times, over
``--rounds`` rounds:

* ``sleep``: SLEEP with every ring's worker idle on its kick (soft stop of all workers);
* ``snapshot``: SNAPSHOT of the sleeping backend (capture + encode + reply);
* ``wake``: WAKE (every worker restarted);
* ``restore``: RESTORE into a fresh BlkDevice on a new connection that has negotiated and
  set the memory table and the call eventfds (parse + checks + apply + reply);
* ``save``/``load``: SET_DEVICE_STATE_FD through a pipe plus CHECK_DEVICE_STATE, with the
  rings stopped by SLEEP on the source and with none started on the destination.

It prints the snapshot size and the median and minimum of each, then a summary line.

Run: ``.venv/bin/python bench/bench_lifecycle.py [--rounds N]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from trio_vhost._io.transport import UnixTransport
from trio_vhost.devices.blk import BlkDevice
from trio_vhost.devices.blk_driver import BlkDriver
from trio_vhost.frontend import DriverVring, Frontend
from trio_vhost.mem.guest import GuestRam
from trio_vhost.proto.constants import FrontendReq, VirtioFeature
from trio_vhost.server import serve_connection
from trio_vhost.snapshot import StateSnapshot
from trio_vhost.vring.driver import DriverQueue

QUEUE_SIZE = 256
ALL_PROTOCOL = (1 << 64) - 1
IMAGE_SIZE = 64 << 20


@asynccontextmanager
async def connected(device: BlkDevice) -> AsyncIterator[Frontend]:
    backend, front = UnixTransport.socketpair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, device, backend)
        async with Frontend(front) as frontend:
            yield frontend


async def timed(samples: list[float], call: Callable[[], Awaitable[object]]) -> object:
    start = time.perf_counter()
    result = await call()
    samples.append(time.perf_counter() - start)
    return result


async def bench(queues: int, rounds: int, image_fd: int) -> dict[str, object]:
    times: dict[str, list[float]] = {
        name: [] for name in ("sleep", "snapshot", "wake", "restore", "save", "load")
    }
    size = 0
    with GuestRam.create(queues * (QUEUE_SIZE * 2048 + (64 << 10)) + (1 << 20)) as ram:
        source = BlkDevice(image_fd, num_queues=queues, serial="bench")
        vrings: list[DriverVring] = []
        try:
            async with connected(source) as fe:
                acked = await fe.negotiate(protocol_features=ALL_PROTOCOL)
                event_idx = bool(acked & VirtioFeature.RING_EVENT_IDX)
                await fe.set_mem_table([ram])
                for index in range(queues):
                    queue = DriverQueue.create(ram, QUEUE_SIZE, event_idx=event_idx)
                    vrings.append(await fe.start_vring(index, queue))
                for vring in vrings:
                    blk = BlkDriver(vring)
                    for sector in range(4):
                        await blk.write(sector * 8, bytes(4096))
                for _ in range(rounds):
                    await timed(times["sleep"], fe.sleep)
                    data = await timed(times["snapshot"], fe.snapshot)
                    await timed(times["save"], fe.save_device_state)
                    await timed(times["wake"], fe.wake)
                assert isinstance(data, bytes)
                size = len(data)
                assert len(StateSnapshot.decode(data).rings) == queues
                for _ in range(rounds):
                    target = BlkDevice(image_fd, num_queues=queues, serial="bench")
                    async with connected(target) as fe_b:
                        await fe_b.negotiate(protocol_features=ALL_PROTOCOL)
                        await fe_b.set_mem_table([ram])
                        await timed(times["load"], lambda: fe_b.load_device_state(data))
                        for vring in vrings:
                            await fe_b.set_vring_fd(
                                FrontendReq.SET_VRING_CALL, vring.index, vring.call
                            )
                        kicks = [vring.kick for vring in vrings]
                        await timed(
                            times["restore"],
                            lambda fe_b=fe_b, kicks=kicks: fe_b.restore(data, kicks),  # type: ignore[misc]
                        )
                        await fe_b.wake()
        finally:
            for vring in vrings:
                vring.close()
    return {"queues": queues, "size": size, **times}


def fmt(samples: object) -> str:
    assert isinstance(samples, list)
    return f"{statistics.median(samples) * 1e6:8.0f} {min(samples) * 1e6:7.0f}"


async def run(rounds: int, image_fd: int) -> None:
    results = [await bench(queues, rounds, image_fd) for queues in (1, 8)]
    names = ("sleep", "snapshot", "wake", "restore", "save", "load")
    print(f"blk, {QUEUE_SIZE}-entry rings, {rounds} rounds; microseconds: median min")
    print(f"{'queues':>6} {'bytes':>6} " + " ".join(f"{n:>16}" for n in names))
    for result in results:
        print(
            f"{result['queues']:>6} {result['size']:>6} "
            + " ".join(f"{fmt(result[n]):>16}" for n in names)
        )
    parts = []
    for result in results:
        medians = {n: statistics.median(result[n]) * 1e6 for n in names}  # type: ignore[arg-type]
        parts.append(
            f"q={result['queues']}: sleep {medians['sleep']:.0f} us, snapshot "
            f"{medians['snapshot']:.0f} us ({result['size']} B), restore "
            f"{medians['restore']:.0f} us, wake {medians['wake']:.0f} us"
        )
    print("SUMMARY lifecycle blk " + "; ".join(parts))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "disk.img")
        with open(path, "wb") as image:
            image.truncate(IMAGE_SIZE)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            trio.run(run, args.rounds, fd)
        finally:
            os.close(fd)
