"""Helpers of the lifecycle tests: a backend per ``async with``, and moving a guest.

:func:`connected` serves one device over a socketpair for the length of a block and yields
a :class:`Frontend`; leaving the block disconnects, and the block only ends once the server
has returned by itself. A migration test keeps one :class:`vhost_dp_harness.Rig` (guest
memory, driver rings, the chains in flight and what was expected of them) and points it
at a second backend: :func:`adopt` swaps the frontend and device under it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from vhost_dp_harness import GUARD, REGION, RecordingDevice, Rig

from trio_vhost import Device, Frontend, FrontendReq, GuestRam, serve_connection
from trio_vhost._io.transport import UnixTransport
from trio_vhost.proto.messages import MemoryTable, MemRegion

#: Ack every protocol feature offered (DEVICE_STATE and STATUS are above QEMU 7.2's mask).
ALL_PROTOCOL = (1 << 64) - 1
#: Where a "new frontend process" maps the same guest memory in its address space.
UVA_SHIFT = 0x1000_0000_0000


@asynccontextmanager
async def connected(device: Device) -> AsyncIterator[Frontend]:
    """Serve ``device`` over a socketpair for the block; yield the connected frontend."""
    backend, front = UnixTransport.socketpair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, device, backend)
        async with Frontend(front) as frontend:
            yield frontend


async def set_mem_table(frontend: Frontend, ram: GuestRam, *, uva_shift: int = 0) -> None:
    """SET_MEM_TABLE with the rig's region, at frontend addresses moved by ``uva_shift``."""
    region = MemRegion(
        guest_phys_addr=ram.gpa + GUARD,
        memory_size=REGION,
        userspace_addr=ram.userspace_addr + GUARD + uva_shift,
        mmap_offset=GUARD,
    )
    await frontend.request(FrontendReq.SET_MEM_TABLE, MemoryTable((region,)), fds=[ram.fd.fd])


def adopt(rig: Rig, frontend: Frontend, device: RecordingDevice) -> None:
    """Point ``rig`` at another backend; guest memory and driver rings stay."""
    rig.frontend = frontend
    rig.device = device


async def reattach_ring_fds(rig: Rig) -> None:
    """SET_VRING_CALL and SET_VRING_ERR of every ring, with the driver's eventfds."""
    for vring in rig.vrings:
        if vring is not None:
            await rig.frontend.set_vring_fd(FrontendReq.SET_VRING_CALL, vring.index, vring.call)
            await rig.frontend.set_vring_fd(FrontendReq.SET_VRING_ERR, vring.index, vring.err)


def kicks(rig: Rig) -> list[int]:
    """The kick eventfds of the rig's rings, in ring order (RESTORE's fds)."""
    out = []
    for vring in rig.vrings:
        assert vring is not None
        out.append(vring.kick.fd)
    return out
