"""The frontend codec and the back-end channel, both directions."""

from __future__ import annotations

import pytest
from _proto_helpers import (
    ALL_PF,
    CATALOG,
    OFFERED,
    PF,
    FdPool,
    negotiated,
    split,
    with_code,
    with_flags,
    without,
)

from trio_vhost.errors import LocalProtocolError, RemoteProtocolError
from trio_vhost.proto.connection import BackendProtocol
from trio_vhost.proto.constants import (
    KNOWN_PROTOCOL_FEATURES,
    VERSION,
    BackendReq,
    FrontendReq,
    ProtocolFeature,
    VirtioFeature,
)
from trio_vhost.proto.frontend_codec import (
    BackendRequest,
    FrontendCodec,
    decode_reply,
    encode_request,
)
from trio_vhost.proto.messages import (
    U64,
    ConfigSpace,
    Empty,
    Inflight,
    IotlbMsg,
    SharedObject,
    ShmemConfig,
    ShmemMap,
    Snapshot,
    Success,
    VringArea,
    VringState,
)
from trio_vhost.proto.wire import Header

F = FrontendReq
B = BackendReq


def reply_frame(code: int, body: bytes, flags: int = 0x5) -> tuple[Header, bytes]:
    return Header(code, flags, len(body)), body


# -- encode_request / decode_reply -----------------------------------------------------------


def test_encode_request_header() -> None:
    data = encode_request(F.SET_VRING_NUM, VringState(1, 256), need_reply=True)
    assert data == Header(F.SET_VRING_NUM, VERSION | 8, 8).encode() + VringState(1, 256).encode()


@pytest.mark.parametrize(
    ("code", "body", "match"),
    [
        (F.SET_OWNER, U64(1), "no body"),
        (F.SET_FEATURES, None, "carries a U64"),
        (F.SET_FEATURES, VringState(0, 0), "carries a U64"),
        (F.RESTORE, U64(0), "opaque"),
    ],
)
def test_encode_request_refuses_wrong_bodies(code: FrontendReq, body: object, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        encode_request(code, body)  # type: ignore[arg-type]


def test_decode_reply_checks() -> None:
    body = U64(7).encode()
    assert decode_reply(F.GET_QUEUE_NUM, *reply_frame(F.GET_QUEUE_NUM, body)) == U64(7)
    for flags in (0x4, 0x1, 0xD, 0x5 | 0x10):
        with pytest.raises(RemoteProtocolError, match="flags"):
            decode_reply(F.GET_QUEUE_NUM, *reply_frame(F.GET_QUEUE_NUM, body, flags))
    with pytest.raises(RemoteProtocolError, match="expected GET_QUEUE_NUM"):
        decode_reply(F.GET_QUEUE_NUM, *reply_frame(F.GET_STATUS, body))
    with pytest.raises(RemoteProtocolError, match="header says"):
        decode_reply(F.GET_QUEUE_NUM, Header(F.GET_QUEUE_NUM, 5, 8), body[:7])
    with pytest.raises(RemoteProtocolError, match="reply of 7 bytes"):
        decode_reply(F.GET_QUEUE_NUM, *reply_frame(F.GET_QUEUE_NUM, body[:7]))


def test_decode_reply_ack_and_fds() -> None:
    ack = decode_reply(F.SET_MEM_TABLE, *reply_frame(F.SET_MEM_TABLE, U64(0).encode()), nfds=0)
    assert ack == U64(0)
    with pytest.raises(RemoteProtocolError, match="fds"):
        decode_reply(F.SET_MEM_TABLE, *reply_frame(F.SET_MEM_TABLE, U64(0).encode()), nfds=1)
    inflight = Inflight(0x1000, 0, 1, 128).encode()
    assert decode_reply(F.GET_INFLIGHT_FD, *reply_frame(F.GET_INFLIGHT_FD, inflight), nfds=1)
    with pytest.raises(RemoteProtocolError, match="fds"):
        decode_reply(F.GET_INFLIGHT_FD, *reply_frame(F.GET_INFLIGHT_FD, inflight), nfds=0)
    # A backend without a region answers size 0 and no fd (QEMU accepts it); no fd then.
    empty = Inflight(0, 0, 1, 128).encode()
    assert decode_reply(F.GET_INFLIGHT_FD, *reply_frame(F.GET_INFLIGHT_FD, empty), nfds=0)
    with pytest.raises(RemoteProtocolError, match="fds"):
        decode_reply(F.GET_INFLIGHT_FD, *reply_frame(F.GET_INFLIGHT_FD, empty), nfds=1)
    advise = decode_reply(F.POSTCOPY_ADVISE, *reply_frame(F.POSTCOPY_ADVISE, b""), nfds=1)
    assert advise == Empty()


def test_decode_reply_checks_against_the_request() -> None:
    asked = ConfigSpace(0, 4, 0, bytes(4))
    good = ConfigSpace(0, 4, 0, b"abcd").encode()
    got = decode_reply(F.GET_CONFIG, *reply_frame(F.GET_CONFIG, good), request_body=asked)
    assert got == ConfigSpace(0, 4, 0, b"abcd")
    bad = ConfigSpace(0, 2, 0, b"ab").encode()
    with pytest.raises(RemoteProtocolError, match="4 asked"):
        decode_reply(F.GET_CONFIG, *reply_frame(F.GET_CONFIG, bad), request_body=asked)


def test_snapshot_reply_decodes_both_forms() -> None:
    assert decode_reply(F.SNAPSHOT, *reply_frame(F.SNAPSHOT, b"\x00")) == Snapshot(False)
    assert decode_reply(F.SNAPSHOT, *reply_frame(F.SNAPSHOT, b"\x01ab")) == Snapshot(True, b"ab")
    assert decode_reply(F.SLEEP, *reply_frame(F.SLEEP, b"\x01")) == Success(True)


# -- FrontendCodec against BackendProtocol ---------------------------------------------------


def waiting(codec: FrontendCodec) -> bool:
    # A function, so that mypy does not carry a narrowed property across calls.
    return codec.awaiting_reply


def test_codec_negotiates_like_qemu() -> None:
    proto = BackendProtocol(features=OFFERED, protocol_features=KNOWN_PROTOCOL_FEATURES)
    codec = FrontendCodec()
    for code, body, answer in (
        (F.GET_FEATURES, None, U64(OFFERED)),
        (F.GET_PROTOCOL_FEATURES, None, U64(KNOWN_PROTOCOL_FEATURES)),
    ):
        request = proto.receive(*split(codec.request(code, body)), ())
        assert codec.awaiting_reply
        assert codec.reply(*split(proto.reply(request, answer))) == answer
    assert codec.offered_features == OFFERED
    assert codec.offered_protocol_features == KNOWN_PROTOCOL_FEATURES
    proto.receive(*split(codec.request(F.SET_PROTOCOL_FEATURES, U64(ALL_PF))), ())
    proto.receive(*split(codec.request(F.SET_FEATURES, U64(PF))), ())
    assert codec.acked_protocol_features == proto.acked_protocol_features == ALL_PF
    assert codec.acked_features == proto.acked_features == PF
    assert not waiting(codec)
    # With REPLY_ACK acked, NEED_REPLY requests are owed an ack.
    request = proto.receive(*split(codec.request(F.SET_OWNER, need_reply=True)), ())
    assert waiting(codec)
    ack = proto.ack(request, False)
    assert ack is not None
    assert codec.reply(*split(ack)) == U64(1)


def test_codec_without_reply_ack_expects_nothing() -> None:
    codec = FrontendCodec()
    codec.request(F.SET_OWNER, need_reply=True)
    assert not codec.awaiting_reply
    assert not codec.reply_ack_enabled


def test_codec_refuses_unsolicited_replies() -> None:
    codec = FrontendCodec()
    with pytest.raises(RemoteProtocolError, match="unsolicited"):
        codec.reply(*reply_frame(F.GET_FEATURES, U64(0).encode()))


def test_codec_checks_get_config_reply_size() -> None:
    codec = FrontendCodec()
    codec.request(F.GET_CONFIG, ConfigSpace(0, 8, 0, bytes(8)))
    error = ConfigSpace(0, 0, 0, b"").encode()
    assert codec.reply(*reply_frame(F.GET_CONFIG, error)) == ConfigSpace(0, 0, 0, b"")
    codec.request(F.GET_CONFIG, ConfigSpace(0, 8, 0, bytes(8)))
    with pytest.raises(RemoteProtocolError):
        codec.reply(*reply_frame(F.GET_CONFIG, ConfigSpace(0, 4, 0, bytes(4)).encode()))


def test_codec_matches_replies_in_order() -> None:
    codec = FrontendCodec()
    codec.request(F.GET_VRING_BASE, VringState(0, 0))
    codec.request(F.GET_VRING_BASE, VringState(1, 0))
    with pytest.raises(RemoteProtocolError, match="vring 1"):
        codec.reply(*reply_frame(F.GET_VRING_BASE, VringState(1, 5).encode()))
    assert codec.reply(*reply_frame(F.GET_VRING_BASE, VringState(1, 5).encode())) == VringState(
        1, 5
    )


@pytest.mark.parametrize("code", list(FrontendReq), ids=lambda c: c.name)
def test_every_request_round_trips_through_both_sides(code: FrontendReq, fd_pool: FdPool) -> None:
    example = CATALOG[code]
    proto = negotiated(example.protocol_features)
    request = proto.receive(*split(example.frame(code)), fd_pool.take(example.nfds))
    assert request.body == example.body
    assert encode_request(code, request.body) == example.frame(code)


# -- the back-end channel ---------------------------------------------------------------------

CHANNEL_PF = ALL_PF


def frontend(
    acked: int = CHANNEL_PF, features: int = PF | VirtioFeature.ACCESS_PLATFORM
) -> FrontendCodec:
    codec = FrontendCodec()
    codec.request(F.SET_PROTOCOL_FEATURES, U64(acked))
    codec.request(F.SET_FEATURES, U64(features))
    return codec


BACKEND_EXAMPLES: dict[BackendReq, tuple[object, int]] = {
    B.IOTLB_MSG: (IotlbMsg(0x1000, 0, 0, 1, IotlbMsg.MISS), 0),
    B.CONFIG_CHANGE_MSG: (None, 0),
    B.VRING_HOST_NOTIFIER_MSG: (VringArea(1, False, 0x1000, 0), 1),
    B.VRING_CALL: (VringState(0, 0), 0),
    B.VRING_ERR: (VringState(1, 0), 0),
    B.SHARED_OBJECT_ADD: (SharedObject(bytes(16)), 0),
    B.SHARED_OBJECT_REMOVE: (SharedObject(bytes(16)), 0),
    B.SHARED_OBJECT_LOOKUP: (SharedObject(bytes(16)), 0),
    B.SHMEM_MAP: (ShmemMap(0, 0, 0, 0x1000, ShmemMap.MAP_RW), 1),
    B.SHMEM_UNMAP: (ShmemMap(0, 0, 0, 0x1000, 0), 0),
}
assert set(BACKEND_EXAMPLES) == set(BackendReq)


@pytest.mark.parametrize("code", list(BackendReq), ids=lambda c: c.name)
def test_backend_request_round_trip(code: BackendReq, fd_pool: FdPool) -> None:
    body, nfds = BACKEND_EXAMPLES[code]
    proto = negotiated()
    data = proto.backend_request(code, body, need_reply=True, nfds=nfds)  # type: ignore[arg-type]
    codec = frontend()
    fds = fd_pool.take(nfds)
    request = codec.receive_backend_request(*split(data), fds)
    assert request == BackendRequest(code, VERSION | 8, body, fds)  # type: ignore[arg-type]
    assert request.need_reply
    if code is B.SHARED_OBJECT_LOOKUP:
        assert codec.backend_ack(request, True) is None
        reply = codec.backend_reply(request, U64(0))
        assert proto.backend_expects_reply(code, need_reply=False)
    else:
        ack = codec.backend_ack(request, True)
        assert ack is not None
        reply = ack
        assert proto.backend_expects_reply(code, need_reply=True)
    assert proto.backend_reply(code, *split(reply), nfds=0) == U64(0)


def test_backend_ack_only_when_asked_and_negotiated() -> None:
    proto = negotiated()
    data = proto.backend_request(B.CONFIG_CHANGE_MSG)
    request = frontend().receive_backend_request(*split(data), ())
    assert frontend().backend_ack(request, True) is None
    codec = frontend(without(CHANNEL_PF, ProtocolFeature.REPLY_ACK))
    asked = codec.receive_backend_request(
        *split(proto.backend_request(B.CONFIG_CHANGE_MSG, need_reply=True)), ()
    )
    assert codec.backend_ack(asked, False) is None
    no_ack = negotiated(without(CHANNEL_PF, ProtocolFeature.REPLY_ACK))
    assert not no_ack.backend_expects_reply(B.CONFIG_CHANGE_MSG, need_reply=True)


def test_backend_reply_must_not_be_sent_for_plain_requests() -> None:
    codec = frontend()
    request = codec.receive_backend_request(
        *split(negotiated().backend_request(B.CONFIG_CHANGE_MSG)), ()
    )
    with pytest.raises(LocalProtocolError, match="no reply of its own"):
        codec.backend_reply(request, U64(0))
    assert request.body is None
    with pytest.raises(LocalProtocolError):
        request.expect(U64)


@pytest.mark.parametrize(
    ("acked", "code", "body", "nfds", "match"),
    [
        (without(ALL_PF, ProtocolFeature.BACKEND_REQ), B.CONFIG_CHANGE_MSG, None, 0, "BACKEND_REQ"),
        (without(ALL_PF, ProtocolFeature.CONFIG), B.CONFIG_CHANGE_MSG, None, 0, "CONFIG"),
        (
            ALL_PF & ~ProtocolFeature.BACKEND_SEND_FD,
            B.SHMEM_MAP,
            ShmemMap(0, 0, 0, 1, 0),
            1,
            "BACKEND_SEND_FD",
        ),
        (ALL_PF, B.SHMEM_MAP, ShmemMap(0, 0, 0, 1, 0), 0, "carries 0 fds"),
        (ALL_PF, B.VRING_HOST_NOTIFIER_MSG, VringArea(0, True, 0, 0), 1, "NOFD"),
        (ALL_PF, B.VRING_CALL, U64(0), 0, "carries a VringState"),
    ],
)
def test_backend_request_refused_locally(
    acked: int, code: BackendReq, body: object, nfds: int, match: str
) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        negotiated(acked).backend_request(code, body, nfds=nfds)  # type: ignore[arg-type]


def test_backend_iotlb_needs_access_platform() -> None:
    proto = negotiated(acked=PF)
    with pytest.raises(LocalProtocolError, match="ACCESS_PLATFORM"):
        proto.backend_request(B.IOTLB_MSG, IotlbMsg(0, 0, 0, 1, IotlbMsg.MISS))


@pytest.mark.parametrize(
    ("codec", "code", "body", "nfds", "match"),
    [
        (lambda: FrontendCodec(), B.CONFIG_CHANGE_MSG, b"", 0, "BACKEND_REQ"),
        (
            lambda: frontend(ALL_PF & ~ProtocolFeature.BACKEND_SEND_FD),
            B.SHMEM_MAP,
            ShmemMap(0, 0, 0, 1, 0).encode(),
            1,
            "BACKEND_SEND_FD",
        ),
        (
            lambda: frontend(features=PF),
            B.IOTLB_MSG,
            IotlbMsg(0, 0, 0, 1, IotlbMsg.MISS).encode(),
            0,
            "ACCESS_PLATFORM",
        ),
        (lambda: frontend(), B.IOTLB_MSG, IotlbMsg(0, 1, 0, 1, 2).encode(), 0, "type 2"),
        (lambda: frontend(), B.VRING_ERR, VringState(0, 1).encode(), 0, "reserved"),
        (lambda: frontend(), 99, b"", 0, "unknown request code"),
    ],
)
def test_backend_request_refused_remotely(
    codec: object, code: int, body: bytes, nfds: int, match: str, fd_pool: FdPool
) -> None:
    header = Header(code, VERSION, len(body))
    with pytest.raises(RemoteProtocolError, match=match):
        codec().receive_backend_request(header, body, fd_pool.take(nfds))  # type: ignore[operator]


def test_backend_reply_checks() -> None:
    proto = negotiated()
    ok = U64(0).encode()
    with pytest.raises(RemoteProtocolError, match="flags"):
        proto.backend_reply(B.SHMEM_MAP, Header(B.SHMEM_MAP, 0x1, 8), ok)
    with pytest.raises(RemoteProtocolError, match="expected SHMEM_MAP"):
        proto.backend_reply(B.SHMEM_MAP, Header(B.SHMEM_UNMAP, 0x5, 8), ok)
    with pytest.raises(RemoteProtocolError, match="fds"):
        proto.backend_reply(B.SHMEM_MAP, Header(B.SHMEM_MAP, 0x5, 8), ok, nfds=1)
    lookup = proto.backend_reply(
        B.SHARED_OBJECT_LOOKUP, Header(B.SHARED_OBJECT_LOOKUP, 0x5, 8), ok, nfds=1
    )
    assert lookup == U64(0)


def test_frontend_reply_helpers_on_frames() -> None:
    # with_flags/with_code keep the rest of the frame intact.
    data = encode_request(F.SET_OWNER)
    assert split(with_flags(data, 9))[0].flags == 9
    assert split(with_code(data, 4))[0].request == 4
    assert ShmemConfig(()).encode()[:4] == bytes(4)
