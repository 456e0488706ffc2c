"""The NACK policy: a request that is well-formed but fails never costs the connection.

With REPLY_ACK negotiated, a failed request that asked for a reply gets a non-zero u64
ack; without it (or without NEED_REPLY) the failure is logged and nothing is sent. A
failed request with a reply of its own still gets that reply, in its failure form: a
zero-size GET_CONFIG, a ``success = 0`` byte for the crosvm extensions. Either way the
connection stays up, the ring keeps running and the fds the request carried are closed.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import pytest
from _raw_frontend import (
    RawFrontend,
    RawRing,
    Resources,
    fail_after,
    maps_of,
    negotiate,
    serving,
    set_mem_table,
    settle,
)

from trio_vhost.device import Device
from trio_vhost.devices.blk import BlkDevice
from trio_vhost.errors import DeviceError
from trio_vhost.mem.guest import GuestRam
from trio_vhost.proto.constants import FrontendReq as F
from trio_vhost.proto.constants import ProtocolFeature as P
from trio_vhost.proto.messages import (
    Body,
    ConfigSpace,
    MemoryTable,
    MemRegion,
    SingleMemRegion,
    VringAddr,
    VringFile,
    VringState,
)

ACK_PF = P.REPLY_ACK | P.CONFIG | P.MQ | P.CONFIGURE_MEM_SLOTS
NO_ACK_PF = P.CONFIG | P.MQ | P.CONFIGURE_MEM_SLOTS


class SmallQueueBlk(BlkDevice):
    """blk that takes queues of at most 256 entries."""

    max_queue_size = 256


class BrokenConfig(Device):
    """A device offering config space that it then fails to read."""

    device_protocol_features: ClassVar[P] = P.CONFIG

    def read_config(self, offset: int, size: int) -> bytes:
        raise DeviceError("config space is on fire")


@dataclass
class Env:
    ram: GuestRam
    ring: RawRing
    fds: list[int]

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.fds.append(fd)
        return fd

    def memfd(self, size: int) -> int:
        fd = os.memfd_create("tv-nack", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        self.fds.append(fd)
        return fd


@dataclass(frozen=True)
class Case:
    code: F
    body: Callable[[Env], Body | None]
    fds: Callable[[Env], list[int]] = lambda env: []
    ok: bool = False


CASES: dict[str, Case] = {
    "set_config_unwritable_offset": Case(F.SET_CONFIG, lambda e: ConfigSpace(0, 1, 0, b"\1")),
    "set_config_writeback_ok": Case(F.SET_CONFIG, lambda e: ConfigSpace(32, 1, 0, b"\0"), ok=True),
    "set_vring_num_above_device_max": Case(F.SET_VRING_NUM, lambda e: VringState(1, 512)),
    "set_vring_num_at_device_max_ok": Case(F.SET_VRING_NUM, lambda e: VringState(1, 256), ok=True),
    "set_vring_num_while_running": Case(F.SET_VRING_NUM, lambda e: VringState(0, 64)),
    "set_vring_base_while_running": Case(F.SET_VRING_BASE, lambda e: VringState(0, 5)),
    # Moving a running ring is refused; only its LOG flag and log address may change.
    "set_vring_addr_while_running": Case(
        F.SET_VRING_ADDR,
        lambda e: VringAddr(
            0, 0, e.ring.queue.desc_uva + 4096, e.ring.queue.used_uva, e.ring.queue.avail_uva, 0
        ),
    ),
    "set_vring_addr_log_flag_while_running_ok": Case(
        F.SET_VRING_ADDR,
        lambda e: VringAddr(
            0, 1, e.ring.queue.desc_uva, e.ring.queue.used_uva, e.ring.queue.avail_uva, 0x1000
        ),
        ok=True,
    ),
    "set_log_fd": Case(F.SET_LOG_FD, lambda e: None, lambda e: [e.eventfd()], ok=True),
    "gpu_set_socket_unsupported": Case(F.GPU_SET_SOCKET, lambda e: None, lambda e: [e.eventfd()]),
    "rem_mem_reg_unknown": Case(
        F.REM_MEM_REG, lambda e: SingleMemRegion(MemRegion(0x4000_0000, 4096, 0x4000_0000, 0))
    ),
    # Overlapping guest-physical ranges that are not the same region (an identical region
    # is another owner's copy and is counted: test_server_mem_slots.py).
    "add_mem_reg_overlapping": Case(
        F.ADD_MEM_REG,
        lambda e: SingleMemRegion(
            MemRegion(e.ram.gpa + 4096, 4096, e.ram.userspace_addr + (1 << 40), 0)
        ),
        lambda e: [e.ram.fd.fd],
    ),
    "add_mem_reg_region_past_file_end": Case(
        F.ADD_MEM_REG,
        lambda e: SingleMemRegion(MemRegion(0x4000_0000, 1 << 20, 0x7F40_0000_0000, 0)),
        lambda e: [e.memfd(1 << 16)],
    ),
    "set_mem_table_with_an_eventfd": Case(
        F.SET_MEM_TABLE,
        lambda e: MemoryTable((MemRegion(0, 1 << 16, 0x7F40_0000_0000, 0),)),
        lambda e: [e.eventfd()],
    ),
}


@pytest.fixture
def small_blk(image_fd: int) -> SmallQueueBlk:
    return SmallQueueBlk(image_fd, num_queues=2)


@pytest.fixture
def env() -> Iterator[Env]:
    with GuestRam.create(1 << 20) as ram:
        ring = RawRing.create(ram, 0)
        e = Env(ram, ring, [])
        yield e
        ring.close()
        for fd in e.fds:
            os.close(fd)


async def start(fe: RawFrontend, env: Env, *, protocol: int) -> None:
    acked = await negotiate(fe, protocol=protocol)
    await set_mem_table(fe, [env.ram], acked=bool(acked & P.REPLY_ACK))
    await env.ring.start(fe)


async def still_serving(fe: RawFrontend, env: Env) -> None:
    """The connection answers and ring 0 still completes chains."""
    await fe.request(F.GET_FEATURES)
    await fe.expect_u64(F.GET_FEATURES)
    env.ring.post([bytes(16)], [1])
    assert len(await env.ring.wait_used(1)) == 1


@pytest.mark.parametrize("name", sorted(CASES))
@fail_after()
async def test_failed_request_is_nacked_and_the_connection_stays(
    name: str, small_blk: SmallQueueBlk, sock_path: str, env: Env
) -> None:
    case = CASES[name]
    backend_maps = len(maps_of(env.ram.fd.fd))
    async with serving(small_blk, sock_path):
        before = Resources.snapshot()
        async with await RawFrontend.connect(sock_path) as fe:
            await start(fe, env, protocol=ACK_PF)
            await fe.request(case.code, case.body(env), need_reply=True, fds=case.fds(env))
            ack = await fe.expect_u64(case.code)
            assert (ack == 0) == case.ok, f"{name}: ack {ack}"
            for fd in env.fds:
                os.close(fd)
            env.fds.clear()
            await fe.expect_nothing()
            # Nothing the failed request mapped is left: the frontend's mapping and the
            # server's one of the current table.
            assert len(maps_of(env.ram.fd.fd)) == backend_maps + 1
            await still_serving(fe, env)
        await settle()
        before.assert_unchanged()


@fail_after()
async def test_set_vring_num_not_a_power_of_2_is_nacked(
    small_blk: SmallQueueBlk, sock_path: str, env: Env
) -> None:
    async with serving(small_blk, sock_path), await RawFrontend.connect(sock_path) as fe:
        await start(fe, env, protocol=ACK_PF)
        await fe.request(F.SET_VRING_NUM, VringState(1, 100), need_reply=True)
        assert await fe.expect_u64(F.SET_VRING_NUM) != 0
        await still_serving(fe, env)


@pytest.mark.parametrize(
    ("protocol", "need_reply"),
    [(NO_ACK_PF, True), (NO_ACK_PF, False), (ACK_PF, False)],
    ids=["no_reply_ack", "no_reply_ack_no_need_reply", "reply_ack_no_need_reply"],
)
@fail_after()
async def test_failure_without_an_ack_owed_is_logged(
    protocol: int,
    need_reply: bool,
    blk: BlkDevice,
    blk_server: str,
    env: Env,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_vhost")
    async with await RawFrontend.connect(blk_server) as fe:
        await start(fe, env, protocol=protocol)
        await fe.request(F.SET_CONFIG, ConfigSpace(0, 4, 0, bytes(4)), need_reply=need_reply)
        await fe.expect_nothing()
        assert any(
            r.levelno == logging.WARNING and "SET_CONFIG" in r.getMessage() for r in caplog.records
        ), caplog.text
        await still_serving(fe, env)
        assert blk.writeback


@pytest.mark.parametrize("protocol", [ACK_PF, NO_ACK_PF], ids=["reply_ack", "no_reply_ack"])
@pytest.mark.parametrize("need_reply", [True, False])
@fail_after()
async def test_get_config_failure_is_a_zero_size_reply(
    protocol: int, need_reply: bool, sock_path: str
) -> None:
    async with serving(BrokenConfig(), sock_path), await RawFrontend.connect(sock_path) as fe:
        await negotiate(fe, protocol=protocol)
        await fe.request(F.GET_CONFIG, ConfigSpace(8, 16, 0, bytes(16)), need_reply=need_reply)
        reply = await fe.expect_reply(F.GET_CONFIG, 12)
        assert struct.unpack("=III", reply.body) == (8, 0, 0)
        await fe.expect_nothing()  # no REPLY_ACK on top of the reply
        await fe.request(F.GET_FEATURES)
        await fe.expect_u64(F.GET_FEATURES)


@fail_after()
async def test_sleep_and_wake_reply_once_and_pause_the_rings(blk_server: str, env: Env) -> None:
    async with await RawFrontend.connect(blk_server) as fe:
        await start(fe, env, protocol=ACK_PF)
        await fe.request(F.SLEEP, need_reply=True)
        assert (await fe.expect_reply(F.SLEEP, 1)).body == b"\1"
        await fe.expect_nothing()  # its own reply, no REPLY_ACK as well
        env.ring.post([bytes(16)], [1])
        await settle()
        assert env.ring.queue.used_idx() == 0, "a sleeping backend processed a chain"
        await fe.request(F.WAKE, need_reply=True)
        assert (await fe.expect_reply(F.WAKE, 1)).body == b"\1"
        await fe.expect_nothing()
        assert len(await env.ring.wait_used(1)) == 1


@fail_after()
async def test_unsupported_snapshot_and_restore_fail_in_their_reply(
    blk_server: str, env: Env
) -> None:
    async with await RawFrontend.connect(blk_server) as fe:
        await start(fe, env, protocol=ACK_PF)
        await settle()  # the server has taken the ring's fds
        before = Resources.snapshot()
        await fe.request(F.SNAPSHOT, need_reply=True)
        assert (await fe.expect_reply(F.SNAPSHOT, 1)).body == b"\0"
        kicks = [env.eventfd(), env.eventfd()]
        await fe.request(F.RESTORE, b"not a snapshot", need_reply=True, fds=kicks)
        assert (await fe.expect_reply(F.RESTORE, 1)).body == b"\0"
        for fd in kicks:
            os.close(fd)
        env.fds.clear()
        await fe.expect_nothing()
        before.assert_unchanged()  # the fds RESTORE carried are closed
        await still_serving(fe, env)


async def kick_with_a_memfd(fe: RawFrontend, env: Env) -> None:
    """Replace ring 0's kick eventfd with a memfd: epoll refuses it, so the ring breaks."""
    await start(fe, env, protocol=ACK_PF)
    ring1 = RawRing.create(env.ram, 1)
    try:
        await ring1.start(fe)
        memfd = env.memfd(4096)
        await fe.request(F.SET_VRING_KICK, VringFile(0, False), need_reply=True, fds=[memfd])
        assert await fe.expect_u64(F.SET_VRING_KICK) == 0  # accepted; the ring fails later
        await settle()
        assert env.ring.err.read_nowait() == 1, "the broken ring's err eventfd was not signalled"
        # The other ring and the connection carry on.
        ring1.post([bytes(16)], [1])
        assert len(await ring1.wait_used(1)) == 1
        await fe.request(F.GET_FEATURES)
        await fe.expect_u64(F.GET_FEATURES)
    finally:
        ring1.close()


@fail_after()
async def test_kick_fd_that_is_not_an_eventfd_breaks_only_that_ring(
    blk_server: str, env: Env
) -> None:
    async with await RawFrontend.connect(blk_server) as fe:
        await kick_with_a_memfd(fe, env)


@fail_after()
async def test_broken_ring_releases_guest_memory_with_the_session(
    blk_server: str, env: Env
) -> None:
    """A worker that died on an error leaves no frames behind holding guest memory."""
    await settle()
    before = Resources.snapshot()
    async with await RawFrontend.connect(blk_server) as fe:
        await kick_with_a_memfd(fe, env)
    for fd in env.fds:
        os.close(fd)
    env.fds.clear()
    await settle()
    before.assert_unchanged()
