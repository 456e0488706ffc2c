"""Shared helpers for the proto unit tests: real fds, a catalog of valid requests, and
h11's ``tr()`` idea (feed a frame whole, byte by byte and with trailing data).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from trio_vhost._fd import OwnedFd, close_all
from trio_vhost.proto.connection import BackendProtocol
from trio_vhost.proto.constants import (
    KNOWN_PROTOCOL_FEATURES,
    FrontendReq,
    HeaderFlag,
    ProtocolFeature,
    VirtioFeature,
)
from trio_vhost.proto.framer import Frame, Framer
from trio_vhost.proto.frontend_codec import encode_request
from trio_vhost.proto.messages import (
    U64,
    Body,
    ConfigSpace,
    CryptoSession,
    DeviceStateTransfer,
    Inflight,
    IotlbMsg,
    LogBase,
    MemoryTable,
    MemRegion,
    SharedObject,
    SingleMemRegion,
    VringAddr,
    VringFile,
    VringState,
)
from trio_vhost.proto.rules import FRONTEND_RULES
from trio_vhost.proto.wire import Header

PF = int(VirtioFeature.PROTOCOL_FEATURES)
#: What the test back-end offers: bit 30, IOMMU, VERSION_1, EVENT_IDX and packed rings.
OFFERED = (
    PF
    | VirtioFeature.ACCESS_PLATFORM
    | VirtioFeature.VERSION_1
    | VirtioFeature.RING_EVENT_IDX
    | VirtioFeature.RING_PACKED
)
#: What the test frontend acks by default (no packed rings).
ACKED = PF | VirtioFeature.ACCESS_PLATFORM | VirtioFeature.VERSION_1
#: Every protocol feature except PAGEFAULT, which CONFIGURE_MEM_SLOTS forbids.
ALL_PF = KNOWN_PROTOCOL_FEATURES & ~ProtocolFeature.PAGEFAULT
#: The postcopy flavour: PAGEFAULT instead of CONFIGURE_MEM_SLOTS.
POSTCOPY_PF = KNOWN_PROTOCOL_FEATURES & ~ProtocolFeature.CONFIGURE_MEM_SLOTS

#: Protocol features that need another one in the same SET_PROTOCOL_FEATURES.
DEPENDENTS = {
    ProtocolFeature.BACKEND_REQ: ProtocolFeature.INBAND_NOTIFICATIONS,
    ProtocolFeature.REPLY_ACK: ProtocolFeature.INBAND_NOTIFICATIONS,
    ProtocolFeature.INFLIGHT_SHMFD: ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN,
    ProtocolFeature.GET_VRING_BASE_INFLIGHT: ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN,
}

REGION_A = MemRegion(0x0, 0x10_0000, 0x7F00_0000_0000, 0)
REGION_B = MemRegion(0x10_0000, 0x20_0000, 0x7F00_1000_0000, 0x1000)


@dataclass(frozen=True)
class Example:
    """A valid request for one code, with what must be negotiated for it."""

    body: Body | bytes | None = None
    nfds: int = 0
    protocol_features: int = ALL_PF

    def frame(self, code: FrontendReq) -> bytes:
        """The encoded request."""
        return encode_request(code, self.body)


F = FrontendReq

CATALOG: dict[FrontendReq, Example] = {
    F.GET_FEATURES: Example(),
    F.SET_FEATURES: Example(U64(PF | VirtioFeature.VERSION_1)),
    F.SET_OWNER: Example(),
    F.RESET_OWNER: Example(),
    F.SET_MEM_TABLE: Example(MemoryTable((REGION_A, REGION_B)), nfds=2),
    F.SET_LOG_BASE: Example(LogBase(0x1000, 0), nfds=1),
    F.SET_LOG_FD: Example(nfds=1),
    F.SET_VRING_NUM: Example(VringState(0, 256)),
    F.SET_VRING_ADDR: Example(VringAddr(0, 0, 0x1000, 0x2000, 0x1800, 0x3000)),
    F.SET_VRING_BASE: Example(VringState(0, 7)),
    F.GET_VRING_BASE: Example(VringState(1, 0)),
    F.SET_VRING_KICK: Example(VringFile(0, False), nfds=1),
    F.SET_VRING_CALL: Example(VringFile(1, False), nfds=1),
    F.SET_VRING_ERR: Example(VringFile(255, False), nfds=1),
    F.GET_PROTOCOL_FEATURES: Example(),
    F.SET_PROTOCOL_FEATURES: Example(U64(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK)),
    F.GET_QUEUE_NUM: Example(),
    F.SET_VRING_ENABLE: Example(VringState(0, 1)),
    F.SEND_RARP: Example(U64(0x5634_1200_5452)),
    F.NET_SET_MTU: Example(U64(1500)),
    F.SET_BACKEND_REQ_FD: Example(nfds=1),
    F.IOTLB_MSG: Example(IotlbMsg(0x1000, 0x1000, 0x7F00_0000_0000, 3, IotlbMsg.UPDATE)),
    F.SET_VRING_ENDIAN: Example(VringState(0, 1)),
    F.GET_CONFIG: Example(ConfigSpace(0, 60, 0, bytes(60))),
    F.SET_CONFIG: Example(ConfigSpace(32, 1, 0, b"\x01")),
    F.CREATE_CRYPTO_SESSION: Example(CryptoSession(bytes(CryptoSession.SIZE))),
    F.CLOSE_CRYPTO_SESSION: Example(U64(3)),
    F.POSTCOPY_ADVISE: Example(protocol_features=POSTCOPY_PF),
    F.POSTCOPY_LISTEN: Example(protocol_features=POSTCOPY_PF),
    F.POSTCOPY_END: Example(protocol_features=POSTCOPY_PF),
    F.GET_INFLIGHT_FD: Example(Inflight(0, 0, 2, 128)),
    F.SET_INFLIGHT_FD: Example(Inflight(0x4000, 0, 2, 128), nfds=1),
    F.GPU_SET_SOCKET: Example(nfds=1),
    F.RESET_DEVICE: Example(),
    F.VRING_KICK: Example(VringState(3, 0)),
    F.GET_MAX_MEM_SLOTS: Example(),
    F.ADD_MEM_REG: Example(SingleMemRegion(REGION_A), nfds=1),
    F.REM_MEM_REG: Example(SingleMemRegion(REGION_B)),
    F.SET_STATUS: Example(U64(0xF)),
    F.GET_STATUS: Example(),
    F.GET_SHARED_OBJECT: Example(SharedObject(bytes(range(16)))),
    F.SET_DEVICE_STATE_FD: Example(DeviceStateTransfer(0, 0), nfds=1),
    F.CHECK_DEVICE_STATE: Example(),
    F.GET_SHMEM_CONFIG: Example(),
    F.GET_VRING_BASE_SKIP_DRAIN: Example(VringState(0, 0)),
    F.SLEEP: Example(),
    F.WAKE: Example(),
    F.SNAPSHOT: Example(),
    F.RESTORE: Example(b"opaque snapshot", nfds=2),
    F.GET_SHARED_MEMORY_REGIONS: Example(),
}
assert set(CATALOG) == set(FrontendReq) == set(FRONTEND_RULES)


def negotiated(
    protocol_features: int = ALL_PF,
    *,
    acked: int = ACKED,
    offered: int = OFFERED,
    offered_protocol: int = KNOWN_PROTOCOL_FEATURES,
) -> BackendProtocol:
    """A protocol that went through SET_FEATURES and SET_PROTOCOL_FEATURES."""
    proto = BackendProtocol(features=offered, protocol_features=offered_protocol)
    for code, value in (
        (F.SET_FEATURES, acked),
        (F.SET_PROTOCOL_FEATURES, protocol_features),
    ):
        if value:
            data = encode_request(code, U64(value))
            proto.receive(Header.decode(data[:12]), data[12:], ())
    assert proto.acked_features == acked
    assert proto.acked_protocol_features == protocol_features
    return proto


def without(protocol_features: int, feature: int) -> int:
    """``protocol_features`` minus ``feature`` and whatever depends on it."""
    return protocol_features & ~feature & ~DEPENDENTS.get(ProtocolFeature(feature), 0)


def split(data: bytes) -> tuple[Header, bytes]:
    """Split an encoded frame into its header and body."""
    return Header.decode(data[:12]), data[12:]


def with_flags(data: bytes, flags: int) -> bytes:
    """Return the frame with its header flags replaced."""
    header = Header.decode(data[:12])
    return Header(header.request, flags, header.size).encode() + data[12:]


def with_code(data: bytes, code: int) -> bytes:
    """Return the frame with its request code replaced."""
    header = Header.decode(data[:12])
    return Header(code, header.flags, header.size).encode() + data[12:]


def resized(data: bytes, delta: int) -> bytes:
    """Return the frame with ``delta`` body bytes added (zeros) or removed, header kept true."""
    header = Header.decode(data[:12])
    body = data[12:] + bytes(max(delta, 0)) if delta >= 0 else data[12:delta]
    return Header(header.request, header.flags, len(body)).encode() + body


@contextlib.contextmanager
def eventfds(count: int) -> Iterator[list[OwnedFd]]:
    """Yield ``count`` real eventfds, all closed on exit."""
    fds = [OwnedFd(os.eventfd(0, os.EFD_CLOEXEC)) for _ in range(count)]
    try:
        yield fds
    finally:
        close_all(fds)


@dataclass
class FdPool:
    """Real fds handed out to tests; every one is closed at teardown."""

    owned: list[OwnedFd] = field(default_factory=list)

    def take(self, count: int) -> tuple[OwnedFd, ...]:
        fds = tuple(OwnedFd(os.eventfd(0, os.EFD_CLOEXEC)) for _ in range(count))
        self.owned.extend(fds)
        return fds

    def close(self) -> None:
        close_all(self.owned)


def three_ways(
    data: bytes,
    fds: tuple[OwnedFd, ...],
    check: Callable[[bytes, int], Header] | None = None,
) -> list[Frame]:
    """Feed ``data`` through a :class:`Framer` whole, byte by byte and with trailing data.

    Returns the one frame each way produced (asserting they agree), like h11's ``tr()``.
    """
    frames: list[Frame] = []
    # whole
    framer = Framer(check)
    framer.feed(data, fds)
    frames.append(_one(framer))
    # byte by byte: the fds travel with the first byte
    framer = Framer(check)
    got = None
    for i in range(len(data)):
        framer.feed(data[i : i + 1], fds if i == 0 else ())
        frame = framer.next_frame()
        if frame is not None:
            assert got is None
            assert i == len(data) - 1
            got = frame
    assert got is not None
    frames.append(got)
    # trailing data: the start of another header stays buffered
    framer = Framer(check)
    framer.feed(data + b"\x01\x00\x00", fds)
    frames.append(_one(framer))
    assert framer.buffered == 3
    framer.close()
    assert frames[0] == frames[1] == frames[2]
    return frames


def _one(framer: Framer) -> Frame:
    frame = framer.next_frame()
    assert frame is not None
    assert framer.next_frame() is None
    return frame


NEED_REPLY = int(HeaderFlag.NEED_REPLY)
REPLY = int(HeaderFlag.REPLY)
