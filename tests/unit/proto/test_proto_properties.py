"""Properties: whatever bytes and fds arrive, only RemoteProtocolError escapes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from _proto_helpers import ACKED, ALL_PF, CATALOG, OFFERED, POSTCOPY_PF, eventfds, negotiated
from _proto_strategies import BODIES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_vhost._fd import OwnedFd
from trio_vhost.errors import RemoteProtocolError
from trio_vhost.proto.connection import BackendProtocol, Request
from trio_vhost.proto.constants import (
    HEADER_SIZE,
    KNOWN_PROTOCOL_FEATURES,
    BackendReq,
    FrontendReq,
)
from trio_vhost.proto.framer import Framer
from trio_vhost.proto.frontend_codec import FrontendCodec, decode_reply, encode_request
from trio_vhost.proto.messages import Body
from trio_vhost.proto.rules import FRONTEND_RULES
from trio_vhost.proto.wire import Header

#: A pool of real fds shared by the property tests; receive() never closes them.
POOL_SIZE = 16


@pytest.fixture(scope="module")
def pool() -> Iterator[list[OwnedFd]]:
    with eventfds(POOL_SIZE) as fds:
        yield fds


@pytest.fixture(autouse=True)
def _no_fd_leak() -> None:
    """Replace the per-test leak check: the module-scoped pool outlives single tests."""


protocols = st.sampled_from(["fresh", "all", "postcopy", "bare"])


def make(kind: str) -> BackendProtocol:
    if kind == "fresh":
        return BackendProtocol(features=OFFERED, protocol_features=KNOWN_PROTOCOL_FEATURES)
    if kind == "bare":
        return BackendProtocol(features=0, protocol_features=0)
    return negotiated(ALL_PF if kind == "all" else POSTCOPY_PF, acked=ACKED)


def attempt(proto: BackendProtocol, data: bytes, fds: tuple[OwnedFd, ...]) -> Request | None:
    """Feed a frame as the server would; None when it was (correctly) refused."""
    try:
        header = proto.receive_header(data[:HEADER_SIZE], len(fds))
        body = data[HEADER_SIZE : HEADER_SIZE + header.size]
        return proto.receive(header, body, fds)
    except RemoteProtocolError:
        return None


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=400)
@given(
    kind=protocols,
    data=st.binary(min_size=0, max_size=300),
    nfds=st.integers(0, POOL_SIZE),
)
def test_random_bytes_only_raise_remote_errors(
    pool: list[OwnedFd], kind: str, data: bytes, nfds: int
) -> None:
    fds = tuple(pool[:nfds])
    request = attempt(make(kind), data, fds)
    if request is not None:
        assert request.fds == fds
    assert all(not fd.closed for fd in pool)


@st.composite
def valid_headers(draw: st.DrawFn) -> bytes:
    code = draw(st.sampled_from([*FrontendReq, 0, 46, 1005]))
    flags = draw(st.sampled_from([1, 9, 5, 0, 3, 0x11, 1 | 1 << 31]))
    size = draw(st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1)))
    return Header(int(code), flags, size).encode()


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=400)
@given(kind=protocols, header=valid_headers(), body=st.binary(max_size=300), nfds=st.integers(0, 9))
def test_plausible_headers_only_raise_remote_errors(
    pool: list[OwnedFd], kind: str, header: bytes, body: bytes, nfds: int
) -> None:
    attempt(make(kind), header + body, tuple(pool[:nfds]))


@st.composite
def mutated_frames(draw: st.DrawFn) -> tuple[FrontendReq, bytes, int]:
    code = draw(st.sampled_from(list(FrontendReq)))
    example = CATALOG[code]
    data = bytearray(example.frame(code))
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "byte", "cut", "grow", "fds"]))
        if how == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif how == "byte" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif how == "cut":
            del data[draw(st.integers(0, len(data))) :]
        elif how == "grow":
            data += draw(st.binary(min_size=1, max_size=40))
    nfds = draw(st.sampled_from([example.nfds, example.nfds + 1, max(example.nfds - 1, 0), 0, 8]))
    return code, bytes(data), nfds


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=600)
@given(frame=mutated_frames(), kind=protocols)
def test_mutated_valid_frames_only_raise_remote_errors(
    pool: list[OwnedFd], frame: tuple[FrontendReq, bytes, int], kind: str
) -> None:
    _, data, nfds = frame
    attempt(make(kind), data, tuple(pool[:nfds]))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200)
@given(frame=mutated_frames(), chunks=st.lists(st.integers(1, 16), min_size=1, max_size=40))
def test_framer_with_any_chunking_only_raises_remote_errors(
    pool: list[OwnedFd], frame: tuple[FrontendReq, bytes, int], chunks: list[int]
) -> None:
    _, data, nfds = frame
    proto = negotiated()
    framer = Framer(proto.receive_header)
    offset = 0
    with contextlib.suppress(RemoteProtocolError):
        for i, size in enumerate([*chunks, len(data)]):
            piece = data[offset : offset + size]
            offset += size
            framer.feed(piece, tuple(pool[:nfds]) if i == 0 and piece else ())
            got = framer.next_frame()
            if got is not None:
                proto.receive(got.header, got.body, got.fds)
                break


# -- round trips through both sides ---------------------------------------------------------

_REQUEST_KINDS = {
    code: rule.body for code, rule in FRONTEND_RULES.items() if isinstance(rule.body, type)
}


@st.composite
def requests(draw: st.DrawFn) -> tuple[FrontendReq, Body]:
    code = draw(st.sampled_from(sorted(_REQUEST_KINDS)))
    return FrontendReq(code), draw(BODIES[_REQUEST_KINDS[code]])


@given(request=requests(), need_reply=st.booleans())
def test_request_encoding_round_trips(request: tuple[FrontendReq, Body], need_reply: bool) -> None:
    code, body = request
    data = encode_request(code, body, need_reply=need_reply)
    header = Header.decode(data[:12])
    assert header.size == len(data) - 12
    assert bool(header.flags & 8) == need_reply
    assert FRONTEND_RULES[code].body.decode(data[12:]) == body  # type: ignore[union-attr]


_REPLY_KINDS = {code: rule.reply[0] for code, rule in FRONTEND_RULES.items() if rule.reply}


@st.composite
def replies(draw: st.DrawFn) -> tuple[FrontendReq, Body]:
    code = draw(st.sampled_from(sorted(_REPLY_KINDS)))
    return FrontendReq(code), draw(BODIES[_REPLY_KINDS[code]])


@given(reply=replies())
def test_reply_decoding_round_trips(reply: tuple[FrontendReq, Body]) -> None:
    code, body = reply
    payload = body.encode()
    header = Header(code, 0x5, len(payload))
    assert decode_reply(code, header, payload) == body


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    code=st.sampled_from(list(BackendReq)),
    flags=st.integers(0, 15),
    body=st.binary(max_size=48),
    nfds=st.integers(0, 2),
)
def test_backend_channel_only_raises_remote_errors(
    pool: list[OwnedFd], code: BackendReq, flags: int, body: bytes, nfds: int
) -> None:
    codec = FrontendCodec()
    codec.acked_protocol_features = KNOWN_PROTOCOL_FEATURES
    codec.acked_features = ACKED
    with contextlib.suppress(RemoteProtocolError):
        codec.receive_backend_request(Header(code, flags, len(body)), body, tuple(pool[:nfds]))
