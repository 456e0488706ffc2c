"""Bad input from a frontend closes that connection cleanly; the listener carries on.

Each case runs on a live ``serve()``: a raw frontend negotiates (REPLY_ACK, no MQ),
shares guest memory and starts a ring, so the server holds a mapping, eventfds and a
running worker; then it sends one bad thing (with fds where the case calls for them) and
must see the connection closed. Afterwards a well-behaved frontend negotiates on the same
listener, and every fd (including the ones the bad frontend sent) and every memfd mapping
the server took is gone again.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from _raw_frontend import (
    RawFrontend,
    RawRing,
    Resources,
    fail_after,
    frame,
    header,
    negotiate,
    set_mem_table,
    settle,
    u64,
)

from trio_vhost.devices.blk import BlkDevice
from trio_vhost.frontend import Frontend
from trio_vhost.mem.guest import GuestRam
from trio_vhost.proto.constants import FrontendReq as F
from trio_vhost.proto.constants import ProtocolFeature as P
from trio_vhost.proto.messages import (
    U64,
    MemoryTable,
    MemRegion,
    VringAddr,
    VringFile,
    VringState,
)

#: What the raw frontend acks: REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS; not MQ.
ACKED_PF = P.REPLY_ACK | P.CONFIG | P.CONFIGURE_MEM_SLOTS


class FdKit:
    """Fds for a bad frontend to send; closed by the test (the server keeps dups)."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.fds.append(fd)
        return fd

    def memfd(self, size: int = 1 << 16) -> int:
        fd = os.memfd_create("tv-bad", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        self.fds.append(fd)
        return fd

    def eventfds(self, n: int) -> list[int]:
        return [self.eventfd() for _ in range(n)]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


@dataclass(frozen=True)
class Bad:
    """One bad input: chunks of bytes, each sent with its fds; ``vanish`` closes after."""

    chunks: Callable[[FdKit], list[tuple[bytes, list[int]]]]
    vanish: bool = False


def one(data: bytes, fds: Callable[[FdKit], list[int]] | None = None) -> Bad:
    return Bad(lambda kit: [(data, fds(kit) if fds else [])])


def vring_file(index: int, nofd: bool) -> bytes:
    return VringFile(index, nofd).encode()


REGION = MemRegion(0x1000_0000, 1 << 16, 0x7F10_0000_0000, 0)

BAD: dict[str, Bad] = {
    # header and size
    "set_features_short_body": one(header(F.SET_FEATURES, 4) + bytes(4)),
    "get_features_with_body": one(header(F.GET_FEATURES, 8) + bytes(8)),
    "vring_addr_wrong_size": one(header(F.SET_VRING_ADDR, 32) + bytes(32)),
    "config_payload_short": one(header(F.SET_CONFIG, 13) + struct.pack("=III", 32, 4, 0) + b"\1"),
    "huge_restore_body": one(header(F.RESTORE, 0xFFFF_FFF0)),
    "reply_bit": one(header(F.GET_FEATURES, 0, flags=0x5)),
    "version_0": one(header(F.GET_FEATURES, 0, flags=0x0)),
    "version_2": one(header(F.GET_FEATURES, 0, flags=0x2)),
    "reserved_flag": one(header(F.GET_FEATURES, 0, flags=0x11)),
    "unknown_code_0": one(header(0, 0)),
    "unknown_code_46": one(header(46, 8) + bytes(8)),
    "unknown_code_999": one(header(999, 0)),
    # fds
    "fd_on_get_features": one(frame(F.GET_FEATURES), lambda k: [k.eventfd()]),
    "fd_on_set_vring_num": one(frame(F.SET_VRING_NUM, VringState(0, 64)), lambda k: [k.memfd()]),
    "mem_table_one_region_nine_fds": one(
        frame(F.SET_MEM_TABLE, MemoryTable((REGION,))), lambda k: [k.memfd(), *k.eventfds(8)]
    ),
    "mem_table_one_region_two_fds": one(
        frame(F.SET_MEM_TABLE, MemoryTable((REGION,))), lambda k: [k.memfd(), k.memfd()]
    ),
    "twenty_fds_ctrunc": one(
        frame(F.SET_VRING_CALL, VringFile(0, False)), lambda k: k.eventfds(20)
    ),
    "nofd_set_but_fd_sent": one(
        frame(F.SET_VRING_CALL, VringFile(0, True)), lambda k: [k.eventfd()]
    ),
    "nofd_clear_no_fd": one(frame(F.SET_VRING_KICK, VringFile(0, False))),
    "vring_file_reserved_bits": one(header(F.SET_VRING_ERR, 8) + u64(0x200)),
    "fds_after_first_header_byte": Bad(
        lambda k: [(frame(F.GET_FEATURES)[:4], []), (frame(F.GET_FEATURES)[4:], [k.eventfd()])]
    ),
    "fds_with_the_body": Bad(
        lambda k: [
            (header(F.SET_VRING_CALL, 8), []),
            (vring_file(0, False), [k.eventfd()]),
        ]
    ),
    # values
    "vring_index_out_of_range_call": one(
        frame(F.SET_VRING_CALL, VringFile(2, False)), lambda k: [k.eventfd()]
    ),
    "vring_index_out_of_range_num": one(frame(F.SET_VRING_NUM, VringState(7, 64))),
    "vring_index_out_of_range_base": one(frame(F.GET_VRING_BASE, VringState(255, 0))),
    "vring_index_out_of_range_addr": one(frame(F.SET_VRING_ADDR, VringAddr(9, 0, 0, 0, 0, 0))),
    "vring_enable_2": one(frame(F.SET_VRING_ENABLE, VringState(0, 2))),
    "features_not_offered": one(frame(F.SET_FEATURES, U64(1 << 63))),
    "mem_table_padding": one(header(F.SET_MEM_TABLE, 40) + u64(1 | 7 << 32) + bytes(32)),
    "config_past_256_bytes": one(
        header(F.GET_CONFIG, 20) + struct.pack("=III", 250, 8, 0) + bytes(8)
    ),
    # feature gates
    "get_queue_num_without_mq": one(frame(F.GET_QUEUE_NUM)),
    "get_status_without_status": one(frame(F.GET_STATUS)),
    "backend_req_fd_without_backend_req": one(frame(F.SET_BACKEND_REQ_FD), lambda k: [k.eventfd()]),
    # garbage and vanishing frontends
    "garbage": one(bytes.fromhex("deadbeef") * 8),
    "garbage_with_fds": one(bytes.fromhex("5a") * 64, lambda k: [k.memfd(), k.eventfd()]),
    "vanish_mid_header": Bad(lambda k: [(frame(F.GET_FEATURES)[:7], [])], vanish=True),
    "vanish_mid_header_with_fd": Bad(
        lambda k: [(frame(F.SET_VRING_CALL, VringFile(0, False))[:5], [k.eventfd()])], vanish=True
    ),
    "vanish_mid_body": Bad(
        lambda k: [(frame(F.SET_MEM_TABLE, MemoryTable((REGION,)))[:30], [k.memfd()])],
        vanish=True,
    ),
}


@pytest.fixture
def kit() -> Iterator[FdKit]:
    fds = FdKit()
    yield fds
    fds.close()


async def set_up_session(fe: RawFrontend, ram: GuestRam, ring: RawRing) -> None:
    """Negotiate, share memory, start ring 0 and complete one request on it."""
    assert await negotiate(fe, protocol=ACKED_PF) == ACKED_PF
    await set_mem_table(fe, [ram], acked=True)
    await ring.start(fe)
    ring.post([bytes(16)], [1])
    assert len(await ring.wait_used(1)) == 1


async def next_frontend_works(path: str) -> None:
    async with await Frontend.connect(path) as frontend:
        await frontend.negotiate()
        assert await frontend.get_queue_num() == 2
        capacity = int.from_bytes(await frontend.get_config(0, 8), "little")
        assert capacity == (8 << 20) // 512


@pytest.mark.parametrize("case", sorted(BAD))
@fail_after()
async def test_bad_input_closes_only_that_connection(
    case: str, blk_server: str, blk: BlkDevice, kit: FdKit, caplog: pytest.LogCaptureFixture
) -> None:
    bad = BAD[case]
    caplog.set_level(logging.INFO, logger="trio_vhost")
    with GuestRam.create(1 << 20) as ram:
        ring = RawRing.create(ram, 0)
        try:
            before = Resources.snapshot()
            async with await RawFrontend.connect(blk_server) as fe:
                await set_up_session(fe, ram, ring)
                for data, fds in bad.chunks(kit):
                    await fe.send(data, fds)
                kit.close()
                if bad.vanish:
                    fe.close()
                else:
                    await fe.expect_closed()
            await next_frontend_works(blk_server)
            await settle()
            before.assert_unchanged()
        finally:
            ring.close()
    server_records = [r for r in caplog.records if r.name == "trio_vhost.server"]
    assert server_records, "the server did not log why it dropped the frontend"
    assert all(r.levelno <= logging.WARNING for r in server_records), caplog.text
    assert blk.requests == 1
