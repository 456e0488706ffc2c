"""Header, struct layouts and the Framer."""

from __future__ import annotations

import struct

import pytest
from _proto_helpers import CATALOG, FdPool, negotiated, three_ways

from trio_vhost.errors import LocalProtocolError, RemoteProtocolError
from trio_vhost.proto import wire
from trio_vhost.proto.constants import HEADER_SIZE, FrontendReq
from trio_vhost.proto.framer import DEFAULT_MAX_BODY, Framer
from trio_vhost.proto.wire import Header

#: Every layout and the size QEMU's C struct has (sizeof on LP64).
LAYOUT_SIZES = {
    "HEADER": 12,
    "U64": 8,
    "VRING_STATE": 8,
    "VRING_ADDR": 40,
    "MEM_REGION": 32,
    "MEM_TABLE_HEAD": 8,
    "SINGLE_MEM_REGION": 40,
    "LOG": 16,
    "IOTLB": 32,
    "CONFIG_HEAD": 12,
    "INFLIGHT": 24,
    "DEVICE_STATE": 8,
    "SHMEM_CONFIG": 8 + 256 * 8,
    "SUCCESS": 1,
    "SHARED_MEM_REGION": 16,
    "VRING_AREA": 24,
    "SHMEM_MAP": 40,
}


@pytest.mark.parametrize(("name", "size"), sorted(LAYOUT_SIZES.items()))
def test_layout_sizes(name: str, size: int) -> None:
    layout = getattr(wire, name)
    assert isinstance(layout, struct.Struct)
    assert layout.size == size
    assert layout.format.startswith("=")  # native order, no implicit alignment


def test_every_layout_is_listed() -> None:
    layouts = {n for n in dir(wire) if isinstance(getattr(wire, n), struct.Struct)}
    assert layouts == set(LAYOUT_SIZES)


def test_header_round_trip_native_order() -> None:
    header = Header(24, 0x9, 69)
    data = header.encode()
    assert data == struct.pack("@III", 24, 9, 69)  # native order, as the spec says
    assert Header.decode(data) == header


@pytest.mark.parametrize("length", [0, 11, 13, 24])
def test_header_decode_needs_exactly_12_bytes(length: int) -> None:
    with pytest.raises(RemoteProtocolError, match="header body is"):
        Header.decode(bytes(length))


@pytest.mark.parametrize(("request_", "flags", "size"), [(-1, 0, 0), (0, 2**32, 0), (0, 0, 2**32)])
def test_header_fields_are_u32(request_: int, flags: int, size: int) -> None:
    with pytest.raises(LocalProtocolError):
        Header(request_, flags, size)


@pytest.mark.parametrize("code", list(FrontendReq), ids=lambda c: c.name)
def test_every_request_frames_three_ways(code: FrontendReq, fd_pool: FdPool) -> None:
    example = CATALOG[code]
    proto = negotiated(example.protocol_features)
    fds = fd_pool.take(example.nfds)
    data = example.frame(code)
    frame = three_ways(data, fds, proto.receive_header)[0]
    assert frame.fds == fds
    assert frame.header.request == code
    request = proto.receive(frame.header, frame.body, frame.fds)
    assert request.body == example.body
    assert request.fds == fds


def test_framer_refuses_fds_after_the_first_byte(fd_pool: FdPool) -> None:
    data = CATALOG[FrontendReq.SET_VRING_CALL].frame(FrontendReq.SET_VRING_CALL)
    framer = Framer()
    framer.feed(data[:1])
    fds = fd_pool.take(1)
    with pytest.raises(RemoteProtocolError, match="first byte"):
        framer.feed(data[1:], fds)
    with pytest.raises(RemoteProtocolError, match="already failed"):
        framer.feed(b"")
    with pytest.raises(RemoteProtocolError, match="already failed"):
        framer.next_frame()
    framer.close()
    assert not fds[0].closed  # a refused feed does not take the fds


def test_framer_refuses_fds_without_data_and_second_fds(fd_pool: FdPool) -> None:
    with pytest.raises(RemoteProtocolError):
        Framer().feed(b"", fd_pool.take(1))
    framer = Framer()
    framer.feed(b"\x0c", fd_pool.take(1))
    with pytest.raises(RemoteProtocolError):
        framer.feed(b"", fd_pool.take(1))


def test_framer_splits_back_to_back_frames(fd_pool: FdPool) -> None:
    kick = CATALOG[FrontendReq.SET_VRING_KICK].frame(FrontendReq.SET_VRING_KICK)
    owner = CATALOG[FrontendReq.SET_OWNER].frame(FrontendReq.SET_OWNER)
    framer = Framer()
    fds = fd_pool.take(1)
    framer.feed(kick + owner[:5], fds)
    first = framer.next_frame()
    assert first is not None
    assert first.fds == fds
    assert first.body == kick[12:]
    assert framer.next_frame() is None
    framer.feed(owner[5:])
    second = framer.next_frame()
    assert second is not None
    assert second.fds == ()
    assert second.header.size == 0
    assert framer.buffered == 0


def test_framer_close_closes_pending_fds(fd_pool: FdPool) -> None:
    framer = Framer()
    fds = fd_pool.take(1)
    framer.feed(b"\x0c\x00", fds)
    assert framer.next_frame() is None
    framer.close()
    assert fds[0].closed
    assert framer.buffered == 0
    framer.feed(b"\x03\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00")
    assert framer.next_frame() is not None


def test_framer_default_check_bounds_the_body() -> None:
    framer = Framer()
    framer.feed(Header(1002, 1, DEFAULT_MAX_BODY + 1).encode())
    with pytest.raises(RemoteProtocolError, match="too large"):
        framer.next_frame()
    with pytest.raises(RemoteProtocolError, match="already failed"):
        framer.next_frame()


def test_framer_checks_the_header_before_the_body() -> None:
    proto = negotiated()
    framer = Framer(proto.receive_header)
    framer.feed(Header(9999, 1, 2**31).encode())
    with pytest.raises(RemoteProtocolError, match="unknown request"):
        framer.next_frame()
    assert framer.buffered == HEADER_SIZE
