"""The back-end channel through the real server: SET_BACKEND_REQ_FD, then the device's own
CONFIG_CHANGE_MSG (blk grown on disk), answered the way QEMU answers it: a GET_CONFIG on
the main connection first, then the ack."""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing
from _raw_frontend import RawFrontend, fail_after, negotiate, settle

from trio_vhost.backend_channel import FrontendLink
from trio_vhost.devices.blk import BlkDevice
from trio_vhost.frontend import Frontend
from trio_vhost.proto.constants import BackendReq, FrontendReq
from trio_vhost.proto.constants import ProtocolFeature as P
from trio_vhost.proto.frontend_codec import BackendRequest


async def capacity(frontend: Frontend) -> int:
    """The blk config's first field: le64 capacity in sectors."""
    return int.from_bytes(await frontend.get_config(0, 8), "little")


#: The size of the protocol tests' blk image (tests/protocol/conftest.py), read here rather
#: than imported: tests/lifecycle has a conftest module of the same name.
IMAGE_SIZE = 8 << 20


def link_of(blk: BlkDevice) -> FrontendLink:
    assert blk.frontend is not None, "the session did not attach its link"
    return blk.frontend


@fail_after()
async def test_config_change_reaches_the_frontend_which_reads_the_new_capacity(
    blk: BlkDevice, image_fd: int, blk_server: str
) -> None:
    async with await Frontend.connect(blk_server) as frontend:
        await frontend.negotiate()
        assert frontend.has_protocol_feature(P.BACKEND_REQ)
        end = await frontend.open_backend_channel()
        seen: list[int] = []

        async def like_qemu(request: BackendRequest) -> bool:
            # QEMU reads the config on the main connection before it acks: the session
            # must keep serving while the device waits for this ack.
            assert request.code is BackendReq.CONFIG_CHANGE_MSG
            seen.append(await capacity(frontend))
            return True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(end.serve, like_qemu)
            assert await capacity(frontend) == IMAGE_SIZE // 512
            os.ftruncate(image_fd, 2 * IMAGE_SIZE)
            assert await blk.resized() is True
            assert seen == [2 * IMAGE_SIZE // 512]
            assert await blk.resized() is False  # same size: nothing to announce
            nursery.cancel_scope.cancel()
        await end.aclose()
    await settle()
    assert blk.frontend is None, "the link outlived the connection"


@fail_after()
async def test_a_config_change_while_asleep_is_sent_on_wake(
    blk: BlkDevice, image_fd: int, blk_server: str
) -> None:
    async with await Frontend.connect(blk_server) as frontend:
        await frontend.negotiate()
        end = await frontend.open_backend_channel()
        got = trio.Event()

        async def ack(request: BackendRequest) -> bool:
            got.set()
            return True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(end.serve, ack)
            await frontend.sleep()
            os.ftruncate(image_fd, 3 * IMAGE_SIZE)
            assert await blk.resized() is False  # asleep: no back-end message now
            await settle()
            assert not end.received
            await frontend.wake()
            await got.wait()
            assert [r.code for r in end.received] == [BackendReq.CONFIG_CHANGE_MSG]
            nursery.cancel_scope.cancel()
        await end.aclose()


@fail_after()
async def test_without_a_channel_the_change_is_not_announced(
    blk: BlkDevice, image_fd: int, blk_server: str
) -> None:
    async with await Frontend.connect(blk_server) as frontend:
        await frontend.negotiate()
        os.ftruncate(image_fd, 2 * IMAGE_SIZE)
        assert await blk.resized() is False
        assert await capacity(frontend) == 2 * IMAGE_SIZE // 512  # but GET_CONFIG tells


@fail_after()
async def test_a_frontend_that_never_acks_breaks_only_the_channel(
    blk: BlkDevice, image_fd: int, blk_server: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with await Frontend.connect(blk_server) as frontend:
        await frontend.negotiate()
        end = await frontend.open_backend_channel()
        with trio.move_on_after(1):
            os.ftruncate(image_fd, 2 * IMAGE_SIZE)
            await blk.resized()  # nobody reads the channel
        assert not link_of(blk).can_announce_config()
        # The main connection is unharmed.
        assert await capacity(frontend) == 2 * IMAGE_SIZE // 512
        await end.aclose()


@pytest.mark.parametrize("kind", ["eventfd", "datagram"])
@fail_after()
async def test_a_backend_req_fd_that_is_no_stream_socket_drops_the_connection(
    blk_server: str, kind: str
) -> None:
    if kind == "eventfd":
        fd = os.eventfd(0, os.EFD_CLOEXEC)

        def close() -> None:
            os.close(fd)

    else:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        fd = a.fileno()

        def close() -> None:
            a.close()
            b.close()

    try:
        async with await RawFrontend.connect(blk_server) as fe:
            await negotiate(fe, protocol=P.BACKEND_REQ)
            await fe.request(FrontendReq.SET_BACKEND_REQ_FD, fds=[fd])
            await fe.expect_closed()
    finally:
        close()
