"""BackendChannel (the back-end's requests) against FrontendChannelEnd (the frontend's end)
over a real socket pair, with the negotiated features set as a handshake would."""

from __future__ import annotations

import functools

import pytest
import trio
import trio.testing

from trio_vhost._io.transport import UnixTransport
from trio_vhost.backend_channel import BackendChannel, BackendChannelClosed, BackendRequestFailed
from trio_vhost.errors import LocalProtocolError, RemoteProtocolError
from trio_vhost.frontend_channel import FrontendChannelEnd
from trio_vhost.proto.connection import BackendProtocol
from trio_vhost.proto.constants import BackendReq, ProtocolFeature, VirtioFeature
from trio_vhost.proto.frontend_codec import BackendRequest, FrontendCodec
from trio_vhost.proto.messages import VringState
from trio_vhost.proto.wire import Header

BASE = ProtocolFeature.BACKEND_REQ | ProtocolFeature.CONFIG
OFFERED = int(BASE | ProtocolFeature.REPLY_ACK | ProtocolFeature.INBAND_NOTIFICATIONS)


def pair(acked: int) -> tuple[BackendChannel, FrontendChannelEnd]:
    protocol = BackendProtocol(
        features=int(VirtioFeature.PROTOCOL_FEATURES), protocol_features=OFFERED
    )
    protocol.acked_protocol_features = acked
    codec = FrontendCodec()
    codec.acked_protocol_features = acked
    ours, theirs = UnixTransport.socketpair()
    return BackendChannel(ours, protocol), FrontendChannelEnd(theirs, codec)


async def refuse_all(request: BackendRequest) -> bool:
    raise AssertionError(f"nothing may arrive, got {request}")


async def test_config_change_is_acked_and_seen_by_the_frontend() -> None:
    channel, end = pair(int(BASE | ProtocolFeature.REPLY_ACK))

    async def ok(request: BackendRequest) -> bool:
        return True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(end.serve, ok)
        await channel.config_changed()
        await channel.config_changed()
        channel.close()
    assert [r.code for r in end.received] == [BackendReq.CONFIG_CHANGE_MSG] * 2
    assert all(r.need_reply for r in end.received)
    await end.aclose()


async def test_a_failed_ack_raises_and_the_channel_stays_usable() -> None:
    channel, end = pair(int(BASE | ProtocolFeature.REPLY_ACK))
    results = iter([False, True])

    async def handler(request: BackendRequest) -> bool:
        return next(results)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(end.serve, handler)
        with pytest.raises(BackendRequestFailed) as info:
            await channel.config_changed()
        assert info.value.code == BackendReq.CONFIG_CHANGE_MSG
        assert channel.usable
        await channel.config_changed()
        channel.close()
    await end.aclose()


async def test_without_reply_ack_nothing_is_awaited() -> None:
    channel, end = pair(int(BASE))
    await channel.config_changed()  # the frontend is not even reading yet
    channel.close()
    seen: list[BackendRequest] = []

    async def handler(request: BackendRequest) -> bool:
        seen.append(request)
        return True

    await end.serve(handler)
    assert [r.code for r in seen] == [BackendReq.CONFIG_CHANGE_MSG]
    assert not seen[0].need_reply
    await end.aclose()


async def test_ungated_requests_are_refused_before_anything_is_sent() -> None:
    channel, end = pair(int(ProtocolFeature.BACKEND_REQ | ProtocolFeature.REPLY_ACK))
    with pytest.raises(LocalProtocolError, match="CONFIG"):
        await channel.config_changed()  # CONFIG not acked
    with pytest.raises(LocalProtocolError):
        await channel.request(BackendReq.VRING_CALL, VringState(0, 0))  # no INBAND
    channel.close()
    await end.serve(refuse_all)
    await end.aclose()


async def test_a_vanished_frontend_breaks_the_channel() -> None:
    channel, end = pair(int(BASE | ProtocolFeature.REPLY_ACK))
    await end.aclose()
    with pytest.raises(BackendChannelClosed):
        await channel.config_changed()
    assert not channel.usable
    with pytest.raises(BackendChannelClosed):
        await channel.config_changed()
    channel.close()


async def test_a_cancelled_request_breaks_the_channel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The reply's place in the stream is lost: a late ack must never answer the next one."""
    channel, end = pair(int(BASE | ProtocolFeature.REPLY_ACK))
    with trio.move_on_after(5) as scope:
        await channel.config_changed()  # nobody answers
    assert scope.cancelled_caught
    assert not channel.usable
    with pytest.raises(BackendChannelClosed, match="did not complete"):
        await channel.config_changed()
    channel.close()
    await end.aclose()


async def test_a_malformed_reply_breaks_the_channel() -> None:
    channel, end = pair(int(BASE | ProtocolFeature.REPLY_ACK))

    async def bad_frontend() -> None:
        await end.transport.receive_header()
        # A reply without the REPLY flag and with a wrong size.
        await end.transport.send(
            Header(int(BackendReq.CONFIG_CHANGE_MSG), 0x1, 4).encode() + b"\0" * 4
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bad_frontend)
        with pytest.raises(RemoteProtocolError):
            await channel.config_changed()
    assert not channel.usable
    channel.close()
    await end.aclose()


async def test_the_frontend_refuses_an_ungated_request() -> None:
    """A backend that sends what was not negotiated is a protocol error on the frontend."""
    channel, end = pair(
        int(BASE | ProtocolFeature.REPLY_ACK | ProtocolFeature.INBAND_NOTIFICATIONS)
    )
    end_codec = FrontendCodec()
    end_codec.acked_protocol_features = int(BASE | ProtocolFeature.REPLY_ACK)
    strict_end = FrontendChannelEnd(end.transport, end_codec)

    async def ok(request: BackendRequest) -> bool:
        return True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            functools.partial(
                channel.request, BackendReq.VRING_CALL, VringState(0, 0), need_reply=False
            )
        )
        with pytest.raises(RemoteProtocolError):
            await strict_end.serve(ok)
    channel.close()
    await end.aclose()
