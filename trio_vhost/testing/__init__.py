"""Test helpers for devices written with trio_vhost: an in-process backend + frontend pair.

Library code never imports this package; tests and benchmarks do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from .._io.transport import UnixTransport
from ..device import Device
from ..frontend import DriverVring, Frontend
from ..mem.guest import GuestRam
from ..proto.constants import VirtioFeature
from ..server import serve_connection
from ..vring.driver import DriverQueue

__all__ = ["Harness", "open_device"]


@dataclass
class Harness:
    """A device served in-process, a negotiated frontend, guest RAM and started rings."""

    device: Device
    frontend: Frontend
    ram: GuestRam
    vrings: list[DriverVring]
    acked: int


@asynccontextmanager
async def open_device(
    device: Device,
    *,
    queues: Sequence[int] = (0,),
    queue_size: int = 64,
    ram_size: int = 4 << 20,
    features: int | None = None,
    protocol_features: int | None = None,
) -> AsyncIterator[Harness]:
    """Serve ``device`` over a socketpair and start ``queues`` through a Python frontend.

    The frontend negotiates like QEMU (masked by ``features``/``protocol_features``), sends
    one memfd region and starts each ring in ``queues``. On exit the frontend disconnects,
    the server tears the session down and every fd and mapping is released.
    """
    backend_side, frontend_side = UnixTransport.socketpair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, device, backend_side)
        frontend = Frontend(frontend_side)
        with GuestRam.create(ram_size) as ram:
            vrings: list[DriverVring] = []
            try:
                acked = await frontend.negotiate(
                    features=features, protocol_features=protocol_features
                )
                await frontend.set_mem_table([ram])
                for index in queues:
                    queue = DriverQueue.create(
                        ram,
                        queue_size,
                        event_idx=bool(acked & VirtioFeature.RING_EVENT_IDX),
                        indirect=bool(acked & VirtioFeature.RING_INDIRECT_DESC),
                        pool_size=ram_size // (len(queues) + 1),
                    )
                    vrings.append(await frontend.start_vring(index, queue))
                yield Harness(device, frontend, ram, vrings, acked)
            finally:
                for vring in vrings:
                    vring.close()
                await frontend.aclose()
