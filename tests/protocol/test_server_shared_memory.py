"""crosvm's GET_SHARED_MEMORY_REGIONS (1004, protocol bit 31) through the real server."""

from __future__ import annotations

from collections.abc import Sequence

import trio
from _raw_frontend import RawFrontend, fail_after, negotiate

from trio_vhost.device import Device
from trio_vhost.frontend import Frontend
from trio_vhost.proto.constants import FrontendReq
from trio_vhost.proto.constants import ProtocolFeature as P
from trio_vhost.proto.messages_ext import SharedMemoryRegions
from trio_vhost.server import serve

ALL_PROTOCOL_FEATURES = (1 << 64) - 1


class WindowDevice(Device):
    """A device with VIRTIO shared memory regions (as a virtio-fs DAX window has)."""

    def __init__(self, regions: Sequence[tuple[int, int]]) -> None:
        self.regions = regions

    def shared_memory_regions(self) -> Sequence[tuple[int, int]]:
        return self.regions


@fail_after()
async def test_the_device_regions_are_reported(sock_path: str) -> None:
    device = WindowDevice([(0, 1 << 30), (7, 4096)])
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, device, sock_path)
        async with await Frontend.connect(sock_path) as frontend:
            await frontend.negotiate(protocol_features=ALL_PROTOCOL_FEATURES)
            assert frontend.has_protocol_feature(P.SHARED_MEMORY_REGIONS)
            assert await frontend.get_shared_memory_regions() == ((0, 1 << 30), (7, 4096))
        async with await Frontend.connect(sock_path) as frontend:
            await frontend.negotiate(protocol_features=ALL_PROTOCOL_FEATURES)
            device.regions = []
            assert await frontend.get_shared_memory_regions() == ()
        nursery.cancel_scope.cancel()


@fail_after()
async def test_a_device_with_impossible_regions_gets_an_empty_answer(sock_path: str) -> None:
    """Repeated ids cannot be encoded: the reply the request is owed says none."""
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, WindowDevice([(1, 4096), (1, 8192)]), sock_path)
        async with await RawFrontend.connect(sock_path) as fe:
            await negotiate(fe, protocol=P.SHARED_MEMORY_REGIONS)
            await fe.request(FrontendReq.GET_SHARED_MEMORY_REGIONS)
            reply = await fe.expect_reply(FrontendReq.GET_SHARED_MEMORY_REGIONS, 8)
            assert SharedMemoryRegions.decode(reply.body).regions == ()
            # The connection goes on.
            await fe.request(FrontendReq.GET_FEATURES)
            await fe.expect_u64(FrontendReq.GET_FEATURES)
        nursery.cancel_scope.cancel()


@fail_after()
async def test_it_needs_the_protocol_feature(blk_server: str) -> None:
    async with await RawFrontend.connect(blk_server) as fe:
        await negotiate(fe, protocol=P.REPLY_ACK)  # bit 31 offered, not acked
        await fe.request(FrontendReq.GET_SHARED_MEMORY_REGIONS)
        await fe.expect_closed()
