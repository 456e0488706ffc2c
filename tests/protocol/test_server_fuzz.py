"""Hypothesis against the live server: valid frames, mutated frames, random fds.

Each example starts ``serve()`` on a blk device, connects a raw frontend, maybe
negotiates properly first, then sends a few frames drawn from a catalog of valid requests
and mutated on the way (a flipped byte, another size, flags or code, cut short, trailing
bytes), each with 0-3 eventfds or memfds attached. The frontend then half-closes and
reads whatever comes back until the server closes.

Whatever was sent: the server neither crashes (``serve`` goes on accepting, and a good
frontend negotiates next) nor hangs (trio-clock ``fail_after``), every reply is a whole
well-formed reply to one of the frames sent, in order, and every fd and memfd mapping the
server took is released once the connection is gone.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from _raw_frontend import (
    REPLY_FLAGS,
    PeerClosed,
    RawFrontend,
    Reply,
    Resources,
    fail_after,
    frame,
    serving,
    settle,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_vhost.devices.blk import BlkDevice
from trio_vhost.frontend import Frontend
from trio_vhost.proto.constants import FrontendReq as F
from trio_vhost.proto.constants import ProtocolFeature as P
from trio_vhost.proto.messages import (
    U64,
    Body,
    ConfigSpace,
    MemoryTable,
    MemRegion,
    SingleMemRegion,
    VringAddr,
    VringFile,
    VringState,
)

#: Guest memory the frames describe: a 64 KiB memfd at gpa 0.
MEM_SIZE = 1 << 16
UVA = 0x7F20_0000_0000
REGION = MemRegion(0, MEM_SIZE, UVA, 0)
ACK_PF = P.REPLY_ACK | P.CONFIG | P.MQ | P.CONFIGURE_MEM_SLOTS

#: (code, body, fds it carries when valid)
CATALOG: list[tuple[F, Body | bytes | None, tuple[str, ...]]] = [
    (F.GET_FEATURES, None, ()),
    (F.SET_FEATURES, U64(1 << 32 | 1 << 30 | 1 << 28), ()),
    (F.SET_OWNER, None, ()),
    (F.RESET_OWNER, None, ()),
    (F.GET_PROTOCOL_FEATURES, None, ()),
    (F.SET_PROTOCOL_FEATURES, U64(ACK_PF), ()),
    (F.GET_QUEUE_NUM, None, ()),
    (F.GET_MAX_MEM_SLOTS, None, ()),
    (F.GET_CONFIG, ConfigSpace(0, 8, 0, bytes(8)), ()),
    (F.SET_CONFIG, ConfigSpace(32, 1, 0, b"\0"), ()),
    (F.SET_MEM_TABLE, MemoryTable((REGION,)), ("memfd",)),
    (F.ADD_MEM_REG, SingleMemRegion(MemRegion(MEM_SIZE, MEM_SIZE, UVA + MEM_SIZE, 0)), ("memfd",)),
    (F.REM_MEM_REG, SingleMemRegion(REGION), ()),
    (F.SET_VRING_NUM, VringState(0, 16), ()),
    (F.SET_VRING_BASE, VringState(0, 0), ()),
    (F.SET_VRING_ADDR, VringAddr(0, 0, UVA, UVA + 0x2000, UVA + 0x1000, 0), ()),
    (F.SET_VRING_KICK, VringFile(0, False), ("eventfd",)),
    (F.SET_VRING_CALL, VringFile(1, False), ("eventfd",)),
    (F.SET_VRING_ERR, VringFile(0, True), ()),
    (F.SET_VRING_ENABLE, VringState(0, 1), ()),
    (F.GET_VRING_BASE, VringState(0, 0), ()),
    (F.SET_LOG_FD, None, ("eventfd",)),
    (F.RESET_DEVICE, None, ()),
    (F.SLEEP, None, ()),
    (F.WAKE, None, ()),
    (F.SNAPSHOT, None, ()),
    (F.RESTORE, b"\1\2\3", ("eventfd", "eventfd")),
]

SIZES = [0, 1, 7, 8, 9, 12, 13, 39, 40, 41, 72, 268, 269, 0x10000, 0xFFFF_FFFF]


@dataclass(frozen=True)
class Frame:
    data: bytes
    fds: tuple[str, ...]


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    code, body, valid_fds = draw(st.sampled_from(CATALOG))
    data = bytearray(frame(code, body, need_reply=draw(st.booleans())))
    mutation = draw(
        st.sampled_from(["none", "none", "byte", "size", "flags", "code", "cut", "extend"])
    )
    if mutation == "byte":
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
    elif mutation == "size":
        data[8:12] = struct.pack("=I", draw(st.sampled_from(SIZES)))
    elif mutation == "flags":
        data[4:8] = struct.pack(
            "=I", draw(st.sampled_from([0, 2, 3, 4, 5, 0x9, 0xD, 0x11, 1 << 31]))
        )
    elif mutation == "code":
        data[0:4] = struct.pack(
            "=I", draw(st.one_of(st.sampled_from([int(c) for c in F]), st.integers(0, 1100)))
        )
    elif mutation == "cut":
        data = data[: draw(st.integers(1, len(data)))]
    elif mutation == "extend":
        data += draw(st.binary(min_size=1, max_size=16))
    if mutation == "none" and draw(st.booleans()):
        fds = valid_fds
    else:
        fds = tuple(draw(st.lists(st.sampled_from(["eventfd", "memfd"]), max_size=3)))
    return Frame(bytes(data), fds)


class FdMaker:
    def __init__(self) -> None:
        self.fds: list[int] = []

    def make(self, kind: str) -> int:
        if kind == "eventfd":
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        else:
            fd = os.memfd_create("tv-fuzz", os.MFD_CLOEXEC)
            os.ftruncate(fd, MEM_SIZE)
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def check_replies(sent: list[int], replies: list[Reply]) -> None:
    """Each reply answers a distinct frame, in the order the frames were sent."""
    position = 0
    for reply in replies:
        assert reply.flags == REPLY_FLAGS, reply
        assert reply.nfds == 0, reply
        assert len(reply.body) in (1, 8) or (
            reply.code == F.GET_CONFIG and 12 <= len(reply.body) <= 12 + 256
        ), reply
        while position < len(sent) and sent[position] != reply.code:
            position += 1
        assert position < len(sent), f"reply {reply} answers nothing that was sent ({sent})"
        position += 1


def iter_codes(frames_: list[Frame]) -> Iterator[int]:
    for f in frames_:
        if len(f.data) >= 4:
            yield struct.unpack_from("=I", f.data)[0]


FEATURES = U64(1 << 32 | 1 << 30 | 1 << 28)
NEGOTIATE = [
    Frame(frame(F.GET_FEATURES), ()),
    Frame(frame(F.SET_PROTOCOL_FEATURES, U64(ACK_PF)), ()),
    Frame(frame(F.SET_OWNER), ()),
    Frame(frame(F.SET_FEATURES, FEATURES), ()),
]
#: A session with guest memory and ring 0 running (a 16-entry ring in the 64 KiB memfd).
RING = [
    *NEGOTIATE,
    Frame(frame(F.SET_MEM_TABLE, MemoryTable((REGION,)), need_reply=True), ("memfd",)),
    Frame(frame(F.SET_VRING_CALL, VringFile(0, False)), ("eventfd",)),
    Frame(frame(F.SET_VRING_NUM, VringState(0, 16)), ()),
    Frame(frame(F.SET_VRING_BASE, VringState(0, 0)), ()),
    Frame(frame(F.SET_VRING_ADDR, VringAddr(0, 0, UVA, UVA + 0x2000, UVA + 0x1000, 0)), ()),
    Frame(frame(F.SET_VRING_KICK, VringFile(0, False)), ("eventfd",)),
    Frame(frame(F.SET_VRING_ENABLE, VringState(0, 1)), ()),
]
PREFIXES = {"none": [], "negotiated": NEGOTIATE, "ring": RING}


@settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    prefix=st.sampled_from(sorted(PREFIXES)), sequence=st.lists(frames(), min_size=1, max_size=6)
)
@fail_after(10)
async def test_mutated_frames_never_crash_hang_or_leak(
    blk: BlkDevice,
    sock_path: str,
    caplog: pytest.LogCaptureFixture,
    prefix: str,
    sequence: list[Frame],
) -> None:
    logged = len(caplog.records)
    maker = FdMaker()
    everything = [*PREFIXES[prefix], *sequence]
    try:
        async with serving(blk, sock_path):
            await settle()
            before = Resources.snapshot()
            replies: list[Reply] = []
            async with await RawFrontend.connect(sock_path) as fe:
                for f in everything:
                    fds = [maker.make(kind) for kind in f.fds]
                    if not await fe.send(f.data, fds):
                        break
                maker.close()
                fe.shutdown_write()
                while True:
                    try:
                        replies.append(await fe.receive())
                    except PeerClosed:
                        break
            check_replies(list(iter_codes(everything)), replies)
            # The listener still serves, and a good frontend gets a working session.
            async with await Frontend.connect(sock_path) as frontend:
                await frontend.negotiate()
                assert await frontend.get_queue_num() == 2
            await settle()
            before.assert_unchanged()
        server_records = [r for r in caplog.records[logged:] if r.name == "trio_vhost.server"]
        assert all(r.levelno <= logging.WARNING for r in server_records), caplog.text
    finally:
        maker.close()
