"""The lifecycle messages on the wire, bad inputs first, through a raw frontend.

A malformed message (wrong size, phase, direction, fd count, an ungated request) ends the
connection, as every protocol violation does; a well-formed request that cannot be carried
out (SNAPSHOT while awake, RESTORE before the memory table or with corrupt bytes,
SET_DEVICE_STATE_FD while a ring runs or with a non-pipe) fails in its own reply and the
connection stays. Every fd a request carried is closed either way (the autouse leak check).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from _raw_frontend import (
    RawFrontend,
    RawRing,
    Resources,
    fail_after,
    frame,
    header,
    maps_of,
    negotiate,
    serving,
    set_mem_table,
    settle,
)

from trio_vhost.devices.blk import BlkDevice
from trio_vhost.devices.blk_spec import WRITEBACK_OFFSET
from trio_vhost.mem.guest import GuestRam
from trio_vhost.proto.constants import FrontendReq as F
from trio_vhost.proto.constants import ProtocolFeature as P
from trio_vhost.proto.messages import (
    U64,
    ConfigSpace,
    DeviceStateTransfer,
    VringAddr,
    VringFile,
    VringState,
)
from trio_vhost.snapshot import StateSnapshot

PF = P.REPLY_ACK | P.CONFIG | P.MQ | P.DEVICE_STATE | P.STATUS | P.RESET_DEVICE
SAVE = DeviceStateTransfer(DeviceStateTransfer.SAVE, DeviceStateTransfer.STOPPED)
LOAD = DeviceStateTransfer(DeviceStateTransfer.LOAD, DeviceStateTransfer.STOPPED)
FAILED = 0x101  # SET_DEVICE_STATE_FD: error 1, no fd returned
OK = 0x100  # success, no fd returned


@dataclass
class Env:
    ram: GuestRam
    ring: RawRing
    fds: list[int]

    def pipe(self) -> tuple[int, int]:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        self.fds += [read_end, write_end]
        return read_end, write_end

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.fds.append(fd)
        return fd

    def close(self, fd: int) -> None:
        self.fds.remove(fd)
        os.close(fd)


@pytest.fixture
def env() -> Iterator[Env]:
    with GuestRam.create(1 << 20) as ram:
        ring = RawRing.create(ram, 0)
        e = Env(ram, ring, [])
        yield e
        ring.close()
        for fd in e.fds:
            os.close(fd)


@pytest.fixture
def blk(image_fd: int) -> BlkDevice:
    return BlkDevice(image_fd, num_queues=2, serial="lifecycle")


async def start(fe: RawFrontend, env: Env, *, protocol: int = PF) -> None:
    acked = await negotiate(fe, protocol=protocol)
    await set_mem_table(fe, [env.ram], acked=bool(acked & P.REPLY_ACK))
    await env.ring.start(fe)


async def stop_ring(fe: RawFrontend, index: int = 0) -> int:
    await fe.request(F.GET_VRING_BASE, VringState(index, 0))
    reply = await fe.expect_reply(F.GET_VRING_BASE, 8)
    return int(struct.unpack("=II", reply.body)[1])


async def still_serving(fe: RawFrontend, env: Env, *, restart: bool = False) -> None:
    """The connection answers; ring 0 (restarted from its base if asked) completes a chain."""
    if restart:
        base = await stop_ring(fe)
        await fe.request(F.SET_VRING_BASE, VringState(0, base))
        await fe.request(F.SET_VRING_KICK, frame_kick(), fds=[env.ring.kick.fd])
    await fe.request(F.GET_FEATURES)
    await fe.expect_u64(F.GET_FEATURES)
    env.ring.post([bytes(16)], [1])
    assert len(await env.ring.wait_used(1)) == 1


def frame_kick(index: int = 0) -> VringFile:
    """The body of SET_VRING_KICK/CALL/ERR with an fd."""
    return VringFile(index, False)


async def read_to_eof(fd: int) -> bytes:
    """Read a pipe to its end through a duplicate (the test's Env closes ``fd``)."""
    chunks = []
    async with trio.lowlevel.FdStream(os.dup(fd)) as stream:
        while chunk := await stream.receive_some(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def write_all(fd: int, data: bytes) -> None:
    async with trio.lowlevel.FdStream(os.dup(fd)) as stream:
        await stream.send_all(data)


async def snapshot_of(fe: RawFrontend) -> bytes:
    await fe.request(F.SLEEP)
    assert (await fe.expect_reply(F.SLEEP, 1)).body == b"\1"
    await fe.request(F.SNAPSHOT)
    reply = await fe.expect_reply(F.SNAPSHOT)
    assert reply.body[:1] == b"\1"
    return reply.body[1:]


# -- malformed messages end the connection ------------------------------------------------

_DST = struct.Struct("=II")

Bad = Callable[[Env], tuple[bytes, list[int]]]

MALFORMED: dict[str, tuple[int, Bad]] = {
    "device_state_not_negotiated": (
        PF & ~P.DEVICE_STATE,
        lambda e: (frame(F.SET_DEVICE_STATE_FD, SAVE), [e.pipe()[1]]),
    ),
    "check_not_negotiated": (PF & ~P.DEVICE_STATE, lambda e: (frame(F.CHECK_DEVICE_STATE), [])),
    "wrong_phase": (PF, lambda e: (header(42, 8) + _DST.pack(0, 1), [e.pipe()[1]])),
    "wrong_direction": (PF, lambda e: (header(42, 8) + _DST.pack(2, 0), [e.pipe()[1]])),
    "no_fd": (PF, lambda e: (frame(F.SET_DEVICE_STATE_FD, SAVE), [])),
    "two_fds": (PF, lambda e: (frame(F.SET_DEVICE_STATE_FD, SAVE), list(e.pipe()))),
    "short_body": (PF, lambda e: (header(42, 4) + bytes(4), [e.pipe()[1]])),
    "long_body": (PF, lambda e: (header(42, 12) + _DST.pack(0, 0) + bytes(4), [e.pipe()[1]])),
    "check_with_body": (PF, lambda e: (header(43, 8) + bytes(8), [])),
    "check_with_fd": (PF, lambda e: (frame(F.CHECK_DEVICE_STATE), [e.eventfd()])),
    "sleep_with_body": (PF, lambda e: (header(1000, 1) + b"\1", [])),
    "wake_with_fd": (PF, lambda e: (frame(F.WAKE), [e.eventfd()])),
    "snapshot_with_body": (PF, lambda e: (header(1002, 4) + bytes(4), [])),
    "status_not_negotiated": (PF & ~P.STATUS, lambda e: (frame(F.SET_STATUS, U64(0xF)), [])),
    "status_too_wide": (PF, lambda e: (header(39, 8) + struct.pack("=Q", 0x1FF), [])),
    "reset_device_not_negotiated": (PF & ~P.RESET_DEVICE, lambda e: (frame(F.RESET_DEVICE), [])),
    "reset_device_with_body": (PF, lambda e: (header(34, 8) + bytes(8), [])),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
@fail_after()
async def test_malformed_lifecycle_message_closes_the_connection(
    name: str, blk: BlkDevice, sock_path: str, env: Env
) -> None:
    protocol, bad = MALFORMED[name]
    async with serving(blk, sock_path):
        async with await RawFrontend.connect(sock_path) as fe:
            await start(fe, env, protocol=protocol)
            data, fds = bad(env)
            await fe.send(data, fds)
            await fe.expect_closed()
        # The server takes the next frontend.
        async with await RawFrontend.connect(sock_path) as fe:
            await start(fe, env)
            await still_serving(fe, env)


# -- SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE ---------------------------------------------


@fail_after()
async def test_device_state_refused_while_a_ring_runs(
    blk: BlkDevice, sock_path: str, env: Env
) -> None:
    async with serving(blk, sock_path), await RawFrontend.connect(sock_path) as fe:
        await start(fe, env)
        await settle()
        before = Resources.snapshot()
        read_end, write_end = env.pipe()
        for transfer in (SAVE, LOAD):
            await fe.request(F.SET_DEVICE_STATE_FD, transfer, need_reply=True, fds=[write_end])
            assert await fe.expect_u64(F.SET_DEVICE_STATE_FD) == FAILED
            await fe.expect_nothing()  # its own reply, no REPLY_ACK on top
        env.close(write_end)
        assert await read_to_eof(read_end) == b""  # the server's copy is closed
        await fe.request(F.CHECK_DEVICE_STATE)
        assert await fe.expect_u64(F.CHECK_DEVICE_STATE) != 0
        await settle()
        env.close(read_end)
        before.assert_unchanged()
        await still_serving(fe, env)


@pytest.mark.parametrize("kind", ["eventfd", "memfd"])
@fail_after()
async def test_device_state_needs_a_pipe(
    kind: str, blk: BlkDevice, sock_path: str, env: Env
) -> None:
    async with serving(blk, sock_path), await RawFrontend.connect(sock_path) as fe:
        await start(fe, env)
        await stop_ring(fe)
        if kind == "eventfd":
            fd = env.eventfd()
        else:
            fd = os.memfd_create("not-a-pipe", os.MFD_CLOEXEC)
            env.fds.append(fd)
        await fe.request(F.SET_DEVICE_STATE_FD, SAVE, fds=[fd])
        assert await fe.expect_u64(F.SET_DEVICE_STATE_FD) == FAILED
        await still_serving(fe, env, restart=True)


@fail_after()
async def test_check_without_a_transfer_fails(blk: BlkDevice, sock_path: str, env: Env) -> None:
    async with serving(blk, sock_path), await RawFrontend.connect(sock_path) as fe:
        await start(fe, env)
        await fe.request(F.CHECK_DEVICE_STATE, need_reply=True)
        assert await fe.expect_u64(F.CHECK_DEVICE_STATE) == 1
        await fe.expect_nothing()
        await still_serving(fe, env)


@fail_after()
async def test_save_then_load_through_pipes(blk: BlkDevice, sock_path: str, env: Env) -> None:
    async with serving(blk, sock_path), await RawFrontend.connect(sock_path) as fe:
        await start(fe, env)
        env.ring.post([bytes(16)], [1])
        await env.ring.wait_used(1)
        assert await stop_ring(fe) == 1
        read_end, write_end = env.pipe()
        await fe.request(F.SET_DEVICE_STATE_FD, SAVE, fds=[write_end])
        assert await fe.expect_u64(F.SET_DEVICE_STATE_FD) == OK
        env.close(write_end)
        data = await read_to_eof(read_end)
        await fe.request(F.CHECK_DEVICE_STATE)
        assert await fe.expect_u64(F.CHECK_DEVICE_STATE) == 0
        snap = StateSnapshot.decode(data)
        assert (snap.rings[0].next_avail, snap.rings[0].started) == (1, False)
        assert snap.device_state == blk.save_state()
        # Load it back (the same device accepts its own state), then garbage.
        for payload, result in ((data, 0), (b"garbage", 1), (data[:-1], 1), (b"", 1)):
            read_end, write_end = env.pipe()
            await fe.request(F.SET_DEVICE_STATE_FD, LOAD, fds=[read_end])
            assert await fe.expect_u64(F.SET_DEVICE_STATE_FD) == OK
            env.close(read_end)
            await write_all(write_end, payload)
            env.close(write_end)
            await fe.request(F.CHECK_DEVICE_STATE)
            assert await fe.expect_u64(F.CHECK_DEVICE_STATE) == result, payload[:16]
        await still_serving(fe, env, restart=True)


@fail_after()
async def test_save_into_the_wrong_end_fails_in_check(
    blk: BlkDevice, sock_path: str, env: Env
) -> None:
    async with serving(blk, sock_path), await RawFrontend.connect(sock_path) as fe:
        await start(fe, env)
        await stop_ring(fe)
        read_end, _ = env.pipe()
        await fe.request(F.SET_DEVICE_STATE_FD, SAVE, fds=[read_end])
        assert await fe.expect_u64(F.SET_DEVICE_STATE_FD) == OK
        await fe.request(F.CHECK_DEVICE_STATE)
        assert await fe.expect_u64(F.CHECK_DEVICE_STATE) == 1
        await still_serving(fe, env, restart=True)


@fail_after(60)
async def test_check_gives_up_on_a_pipe_left_open(
    blk: BlkDevice, sock_path: str, env: Env, mock_clock: trio.testing.MockClock
) -> None:
    async with serving(blk, sock_path), await RawFrontend.connect(sock_path) as fe:
        await start(fe, env)
        await stop_ring(fe)
        # Virtual time from here: binding the socket above ran in a thread, which an
        # autojumping clock does not wait for.
        mock_clock.autojump_threshold = 0
        read_end, _write_end = env.pipe()
        await fe.request(F.SET_DEVICE_STATE_FD, LOAD, fds=[read_end])
        assert await fe.expect_u64(F.SET_DEVICE_STATE_FD) == OK
        await fe.request(F.CHECK_DEVICE_STATE)  # the write end is still open
        assert await fe.expect_u64(F.CHECK_DEVICE_STATE) == 1
        await still_serving(fe, env, restart=True)


@fail_after()
async def test_disconnect_during_a_transfer_releases_it(
    blk: BlkDevice, sock_path: str, env: Env
) -> None:
    async with serving(blk, sock_path):
        async with await RawFrontend.connect(sock_path) as fe:
            await start(fe, env)
            await stop_ring(fe)
            read_end, write_end = env.pipe()
            await fe.request(F.SET_DEVICE_STATE_FD, LOAD, fds=[read_end])
            assert await fe.expect_u64(F.SET_DEVICE_STATE_FD) == OK
        await settle()
        env.close(read_end)
        # The server dropped its read end with the session: writing now breaks the pipe.
        with pytest.raises(BrokenPipeError):
            os.write(write_end, b"x")
        async with await RawFrontend.connect(sock_path) as fe:
            await start(fe, env)
            await still_serving(fe, env)


@fail_after()
async def test_a_new_transfer_replaces_an_unfinished_one(
    blk: BlkDevice, sock_path: str, env: Env
) -> None:
    async with serving(blk, sock_path), await RawFrontend.connect(sock_path) as fe:
        await start(fe, env)
        await stop_ring(fe)
        first_read, first_write = env.pipe()
        await fe.request(F.SET_DEVICE_STATE_FD, LOAD, fds=[first_read])
        assert await fe.expect_u64(F.SET_DEVICE_STATE_FD) == OK
        read_end, write_end = env.pipe()
        await fe.request(F.SET_DEVICE_STATE_FD, SAVE, fds=[write_end])
        assert await fe.expect_u64(F.SET_DEVICE_STATE_FD) == OK
        env.close(write_end)
        assert StateSnapshot.decode(await read_to_eof(read_end))
        await fe.request(F.CHECK_DEVICE_STATE)
        assert await fe.expect_u64(F.CHECK_DEVICE_STATE) == 0
        env.close(first_read)
        with pytest.raises(BrokenPipeError):  # the first transfer's end is closed
            os.write(first_write, b"x")


# -- SLEEP / SNAPSHOT / RESTORE -------------------------------------------------------------


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]


CORRUPT: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda d: b"",
    "magic_only": lambda d: d[:8],
    "truncated_by_one": lambda d: d[:-1],
    "truncated_header": lambda d: d[:39],
    "trailing_byte": lambda d: d + b"\0",
    "bit_flip_in_a_ring": lambda d: _flip(d, StateSnapshot.HEADER_SIZE + 9),
    "bit_flip_in_the_checksum": lambda d: _flip(d, len(d) - 1),
    "bad_magic": lambda d: b"X" + d[1:],
    "version_2": lambda d: d[:8] + b"\2" + d[9:],
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
@fail_after()
async def test_restore_of_corrupt_bytes_fails_and_the_connection_stays(
    name: str, blk: BlkDevice, sock_path: str, env: Env
) -> None:
    async with serving(blk, sock_path), await RawFrontend.connect(sock_path) as fe:
        await start(fe, env)
        data = await snapshot_of(fe)
        before = Resources.snapshot()
        await fe.request(F.RESTORE, CORRUPT[name](data), need_reply=True, fds=[env.ring.kick.fd])
        assert (await fe.expect_reply(F.RESTORE, 1)).body == b"\0"
        await fe.expect_nothing()
        before.assert_unchanged()  # the kick fd RESTORE carried is closed
        await fe.request(F.WAKE)
        assert (await fe.expect_reply(F.WAKE, 1)).body == b"\1"
        await still_serving(fe, env)


@fail_after()
async def test_snapshot_while_awake_fails(blk: BlkDevice, sock_path: str, env: Env) -> None:
    async with serving(blk, sock_path), await RawFrontend.connect(sock_path) as fe:
        await start(fe, env)
        for need_reply in (False, True):
            await fe.request(F.SNAPSHOT, need_reply=need_reply)
            assert (await fe.expect_reply(F.SNAPSHOT, 1)).body == b"\0"
            await fe.expect_nothing()
        await still_serving(fe, env)


@fail_after()
async def test_restore_before_the_memory_table_fails(
    blk: BlkDevice, sock_path: str, env: Env, image_fd: int
) -> None:
    async with serving(blk, sock_path), await RawFrontend.connect(sock_path) as fe:
        await start(fe, env)
        data = await snapshot_of(fe)
    other = BlkDevice(image_fd, num_queues=2, serial="lifecycle")
    async with serving(other, sock_path), await RawFrontend.connect(sock_path) as fe:
        await negotiate(fe, protocol=PF)
        await fe.request(F.RESTORE, data, fds=[env.ring.kick.fd])
        assert (await fe.expect_reply(F.RESTORE, 1)).body == b"\0"
        await set_mem_table(fe, [env.ram], acked=True)
        await fe.request(F.RESTORE, data, fds=[env.ring.kick.fd])
        assert (await fe.expect_reply(F.RESTORE, 1)).body == b"\1"
        await fe.request(F.SET_VRING_CALL, frame_kick(), fds=[env.ring.call.fd])
        await fe.request(F.WAKE)
        assert (await fe.expect_reply(F.WAKE, 1)).body == b"\1"
        env.ring.post([bytes(16)], [1])
        assert len(await env.ring.wait_used(1)) == 1


RESTORE_REFUSALS: dict[str, Callable[[Env], list[int]]] = {
    # ring 0 was started: it needs its kick at position 0
    "no_kick_for_a_started_ring": lambda e: [],
    # two rings, three fds
    "more_kicks_than_rings": lambda e: [e.eventfd(), e.eventfd(), e.eventfd()],
}


@pytest.mark.parametrize("name", sorted(RESTORE_REFUSALS))
@fail_after()
async def test_restore_refusals(
    name: str, blk: BlkDevice, sock_path: str, env: Env, image_fd: int
) -> None:
    async with serving(blk, sock_path), await RawFrontend.connect(sock_path) as fe:
        await start(fe, env)
        data = await snapshot_of(fe)
    other = BlkDevice(image_fd, num_queues=2, serial="lifecycle")
    async with serving(other, sock_path), await RawFrontend.connect(sock_path) as fe:
        await negotiate(fe, protocol=PF)
        await set_mem_table(fe, [env.ram], acked=True)
        await fe.request(F.RESTORE, data, fds=RESTORE_REFUSALS[name](env))
        assert (await fe.expect_reply(F.RESTORE, 1)).body == b"\0"
        await fe.request(F.GET_FEATURES)
        await fe.expect_u64(F.GET_FEATURES)


@fail_after()
async def test_restore_refused_while_rings_run_and_into_another_shape(
    blk: BlkDevice, sock_path: str, env: Env, image_fd: int
) -> None:
    async with serving(blk, sock_path), await RawFrontend.connect(sock_path) as fe:
        await start(fe, env)
        data = await snapshot_of(fe)
        await fe.request(F.WAKE)
        await fe.expect_reply(F.WAKE, 1)
        await fe.request(F.RESTORE, data, fds=[env.eventfd()])  # ring 0 runs
        assert (await fe.expect_reply(F.RESTORE, 1)).body == b"\0"
        await still_serving(fe, env)
    for other in (
        BlkDevice(image_fd, num_queues=1, serial="lifecycle"),  # one ring, not two
        BlkDevice(image_fd, num_queues=2, serial="another"),  # device state refused
    ):
        async with serving(other, sock_path), await RawFrontend.connect(sock_path) as fe:
            await negotiate(fe, protocol=PF)
            await set_mem_table(fe, [env.ram], acked=True)
            await fe.request(F.RESTORE, data, fds=[env.eventfd()])
            assert (await fe.expect_reply(F.RESTORE, 1)).body == b"\0"
            await fe.request(F.GET_FEATURES)
            await fe.expect_u64(F.GET_FEATURES)


@fail_after()
async def test_restore_of_rings_outside_the_new_memory_fails(
    blk: BlkDevice, sock_path: str, env: Env, image_fd: int
) -> None:
    async with serving(blk, sock_path), await RawFrontend.connect(sock_path) as fe:
        await start(fe, env)
        data = await snapshot_of(fe)
    other = BlkDevice(image_fd, num_queues=2, serial="lifecycle")
    with GuestRam.create(1 << 20, gpa=0x1_0000_0000) as elsewhere:
        async with serving(other, sock_path), await RawFrontend.connect(sock_path) as fe:
            await negotiate(fe, protocol=PF)
            await set_mem_table(fe, [elsewhere], acked=True)
            await fe.request(F.RESTORE, data, fds=[env.eventfd()])
            assert (await fe.expect_reply(F.RESTORE, 1)).body == b"\0"


# -- STATUS -----------------------------------------------------------------------------


@fail_after()
async def test_status_zero_stops_the_rings_where_they_are(
    blk: BlkDevice, sock_path: str, env: Env
) -> None:
    """QEMU 7.2's stop: SET_STATUS(0), disable, GET_VRING_BASE; blk keeps its cache mode."""
    assert blk.offered_protocol_features() & P.STATUS
    async with serving(blk, sock_path), await RawFrontend.connect(sock_path) as fe:
        await start(fe, env)
        await fe.request(F.GET_STATUS)
        assert await fe.expect_u64(F.GET_STATUS) == 0
        await fe.request(F.SET_STATUS, U64(0x8), need_reply=True)
        assert await fe.expect_u64(F.SET_STATUS) == 0
        await fe.request(F.SET_CONFIG, ConfigSpace(WRITEBACK_OFFSET, 1, 0, b"\0"))
        await fe.request(F.SET_STATUS, U64(0xF))
        await fe.request(F.GET_STATUS)
        assert await fe.expect_u64(F.GET_STATUS) == 0xF
        for _ in range(3):
            env.ring.post([bytes(16)], [1])
        await env.ring.wait_used(3)
        await fe.request(F.SET_STATUS, U64(0), need_reply=True)
        assert await fe.expect_u64(F.SET_STATUS) == 0
        env.ring.post([bytes(16)], [1])
        await settle()
        assert env.ring.queue.used_idx() == 3, "a ring ran on after status 0"
        await fe.request(F.SET_VRING_ENABLE, VringState(0, 0))
        assert await stop_ring(fe) == 3
        await fe.request(F.GET_STATUS)
        assert await fe.expect_u64(F.GET_STATUS) == 0
        assert not blk.writeback  # a stop is not a reset of the device
        # Started again the way QEMU does: base, kick, enable, DRIVER_OK.
        await fe.request(F.SET_VRING_BASE, VringState(0, 3))
        await fe.request(F.SET_VRING_KICK, frame_kick(), fds=[env.ring.kick.fd])
        await fe.request(F.SET_VRING_ENABLE, VringState(0, 1))
        await fe.request(F.SET_STATUS, U64(0xF))
        assert len(await env.ring.wait_used(1)) == 1


@fail_after()
async def test_status_reports_needs_reset_after_a_ring_broke(
    blk: BlkDevice, sock_path: str, env: Env
) -> None:
    async with serving(blk, sock_path), await RawFrontend.connect(sock_path) as fe:
        await start(fe, env)
        await fe.request(F.SET_STATUS, U64(0xF))
        queue = env.ring.queue
        queue.write_desc(0, 0x7000_0000, 16)  # a buffer outside guest memory
        queue.push_avail(0)
        queue.publish()
        env.ring.kick.write(1)
        await env.ring.err.wait()
        await fe.request(F.GET_STATUS)
        assert await fe.expect_u64(F.GET_STATUS) == 0xF | 0x40


# -- RESET_DEVICE / RESET_OWNER -------------------------------------------------------------


@pytest.mark.parametrize("code", [F.RESET_DEVICE, F.RESET_OWNER])
@fail_after()
async def test_reset_stops_rings_closes_their_fds_and_keeps_memory(
    code: F, blk: BlkDevice, sock_path: str, env: Env
) -> None:
    async with serving(blk, sock_path), await RawFrontend.connect(sock_path) as fe:
        await negotiate(fe, protocol=PF)
        await set_mem_table(fe, [env.ram], acked=True)
        await settle()
        before = Resources.snapshot()  # memory mapped, no ring fds yet
        mapped = len(maps_of(env.ram.fd.fd))
        await env.ring.start(fe)
        await fe.request(F.SET_CONFIG, ConfigSpace(WRITEBACK_OFFSET, 1, 0, b"\0"))
        await fe.request(F.SET_STATUS, U64(0xF))
        env.ring.post([bytes(16)], [1])
        await env.ring.wait_used(1)
        await fe.request(F.SLEEP)
        await fe.expect_reply(F.SLEEP, 1)
        await fe.request(code, need_reply=True)
        assert await fe.expect_u64(code) == 0
        await settle()
        before.assert_unchanged()  # kick, call and err closed; the memory table kept
        assert len(maps_of(env.ram.fd.fd)) == mapped
        assert blk.writeback  # the device is back to its initial state
        await fe.request(F.GET_STATUS)
        assert await fe.expect_u64(F.GET_STATUS) == 0
        # Not asleep any more, and no ring: SNAPSHOT fails, WAKE starts nothing.
        await fe.request(F.SNAPSHOT)
        assert (await fe.expect_reply(F.SNAPSHOT, 1)).body == b"\0"
        env.ring.post([bytes(16)], [1])
        await settle()
        assert env.ring.queue.used_idx() == 1
        assert await stop_ring(fe) == 0  # a fresh ring
        # Re-initialised on the kept memory table: features, then the ring from its index.
        await fe.request(F.GET_FEATURES)
        offered = await fe.expect_u64(F.GET_FEATURES)
        await fe.request(F.SET_FEATURES, U64(offered))
        ring, queue = env.ring, env.ring.queue
        await fe.request(F.SET_VRING_CALL, frame_kick(), fds=[ring.call.fd])
        await fe.request(F.SET_VRING_NUM, VringState(0, queue.size))
        await fe.request(F.SET_VRING_BASE, VringState(0, 1))
        addr = VringAddr(0, 0, queue.desc_uva, queue.used_uva, queue.avail_uva, 0)
        await fe.request(F.SET_VRING_ADDR, addr)
        await fe.request(F.SET_VRING_KICK, frame_kick(), fds=[ring.kick.fd])
        await fe.request(F.SET_VRING_ENABLE, VringState(0, 1))
        assert len(await ring.wait_used(1)) == 1


@fail_after()
async def test_reset_cancels_a_device_state_transfer(
    blk: BlkDevice, sock_path: str, env: Env
) -> None:
    async with serving(blk, sock_path), await RawFrontend.connect(sock_path) as fe:
        await start(fe, env)
        await stop_ring(fe)
        read_end, write_end = env.pipe()
        await fe.request(F.SET_DEVICE_STATE_FD, LOAD, fds=[read_end])
        assert await fe.expect_u64(F.SET_DEVICE_STATE_FD) == OK
        await fe.request(F.RESET_DEVICE)
        await fe.request(F.CHECK_DEVICE_STATE)
        assert await fe.expect_u64(F.CHECK_DEVICE_STATE) == 1
        env.close(read_end)
        with pytest.raises(BrokenPipeError):
            os.write(write_end, b"x")
