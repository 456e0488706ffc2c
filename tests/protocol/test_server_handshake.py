"""Replays of real frontends' handshakes against the real server.

The sequences are QEMU 7.2 driving a blk backend (SeaBIOS, then Linux, on one connection)
and a net backend, and DPDK 22.11's virtio_user driving a net backend, as recorded in the
project lab (QEMU sniffer logs and DPDK handshake traces). They are copied here as data,
reduced to what matters: request codes, NEED_REPLY, bodies (rebuilt over our own guest
memory, since the recorded addresses belong to another process) and which fds travel.
QEMU acks every protocol bit below 17 that is offered, so the acks are the offer masked
that way; DPDK acks MQ, REPLY_ACK and STATUS only.

Each step checks the exact reply (flags 0x5, the echoed code, the size), a REPLY_ACK
exactly where NEED_REPLY was set and nothing anywhere else. The ring-start rule is proved
on the way: a buffer is posted before SET_VRING_KICK and completes without any kick.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, cast

from _raw_frontend import (
    RawFrontend,
    Resources,
    fail_after,
    serving,
    settle,
)

from trio_vhost._io.eventfd import EventFd
from trio_vhost.device import Device
from trio_vhost.devices.blk import BlkDevice
from trio_vhost.devices.blk_driver import BlkDriver
from trio_vhost.devices.blk_spec import REQUEST_HEADER, BlkFeature, RequestType, Status
from trio_vhost.devices.net_spec import NetFeature
from trio_vhost.frontend import DriverVring, Frontend
from trio_vhost.mem.guest import GuestRam
from trio_vhost.proto.constants import FrontendReq as F
from trio_vhost.proto.constants import ProtocolFeature as P
from trio_vhost.proto.constants import VirtioFeature as V
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
from trio_vhost.vring.driver import DriverQueue

#: QEMU 7.2 acks every offered protocol feature it knows: bits 0-16.
QEMU_PROTOCOL_MASK = (1 << 17) - 1
#: Features SeaBIOS acked on the blk trace, then Linux (QEMU adds bit 30 itself).
SEABIOS_BLK = 0x0000_0001_4000_0046
LINUX_BLK = 0x0000_0001_7000_6E46
#: Features Linux acked on the QEMU net trace.
LINUX_NET = 0x0000_0001_7020_E783
#: What DPDK's virtio_user acks by default: MRG_RXBUF, INDIRECT_DESC, bit 30, VERSION_1,
#: IN_ORDER (trace handshake-split-1q).
DPDK_NET = 0x0000_0009_5000_8000
DPDK_PROTOCOL = P.MQ | P.REPLY_ACK | P.STATUS
#: DPDK's single memfd region has gpa == uva.
DPDK_GPA = 0x1_0063_A000


class MiniNet(Device):
    """The smallest net-shaped device: one queue pair (RX 0, TX 1), MQ, STATUS.

    Every chain is completed with nothing written. It offers only protocol features the
    library implements and that the recorded peers use, so the frontends take the same
    paths as on the traces (SET_MEM_TABLE, not ADD_MEM_REG).
    """

    num_queues = 2
    device_features: ClassVar[int] = int(NetFeature.MRG_RXBUF | NetFeature.MQ)

    def offered_protocol_features(self) -> int:
        return int(P.MQ | P.REPLY_ACK | P.STATUS)

    def queue_num(self) -> int:
        return self.num_queues // 2  # net counts queue pairs


# -- the replay machinery -----------------------------------------------------------------


@dataclass
class Ctx:
    """What a sequence refers to: guest memory, driver rings, eventfds, negotiated bits."""

    ram: GuestRam
    rings: dict[str, DriverVring] = field(default_factory=dict)
    used: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    reply_ack: bool = False
    acked_features: int = 0

    def ring(self, name: str) -> DriverVring:
        return self.rings[name]

    def fd(self, name: str) -> int:
        """``mem``, or ``<ring>.<kick|call|err>``."""
        if name == "mem":
            return self.ram.fd.fd
        ring, kind = name.split(".")
        efd = cast(EventFd, getattr(self.rings[ring], kind))
        return efd.fd


BodyFn = Callable[[Ctx], "Body | None"]


@dataclass(frozen=True)
class Req:
    """One request of a recorded sequence and what must come back for it.

    ``reply`` is the size of the request's own reply (None: it has none); ``value`` the
    expected u64 of that reply. Without an own reply, a REPLY_ACK of 0 must come exactly
    when ``need_reply`` is set and REPLY_ACK is negotiated, and nothing otherwise.
    """

    code: F
    body: Body | BodyFn | None = None
    need_reply: bool = False
    fds: tuple[str, ...] = ()
    reply: int | None = None
    value: int | Callable[[Ctx], int] | None = None


@dataclass(frozen=True)
class Do:
    """A guest-side action between two requests."""

    action: Callable[[Ctx], Awaitable[None]]


Step = Req | Do


def vring(ring: str, index: int) -> tuple[Req, ...]:
    """NUM, BASE, ADDR of ``ring`` at vring ``index``, as QEMU and DPDK send them."""

    def addr(ctx: Ctx) -> Body:
        q = ctx.ring(ring).queue
        return VringAddr(index, 0, q.desc_uva, q.used_uva, q.avail_uva, 0)

    return (
        Req(F.SET_VRING_NUM, lambda ctx: VringState(index, ctx.ring(ring).queue.size)),
        Req(F.SET_VRING_BASE, VringState(index, 0)),
        Req(F.SET_VRING_ADDR, addr),
    )


def fd_req(code: F, ring: str, index: int, kind: str) -> Req:
    return Req(code, VringFile(index, False), fds=(f"{ring}.{kind}",))


def vs(index: int, num: int) -> int:
    """A VringState reply as the u64 its 8 bytes make (index low, num high)."""
    return index | num << 32


def region(ctx: Ctx) -> MemRegion:
    return MemRegion(ctx.ram.gpa, ctx.ram.size, ctx.ram.userspace_addr, 0)


async def replay(fe: RawFrontend, ctx: Ctx, steps: Sequence[Step]) -> None:
    """Send each request and check exactly what comes back (see :class:`Req`)."""
    for step in steps:
        if isinstance(step, Do):
            await step.action(ctx)
            continue
        body = step.body(ctx) if callable(step.body) else step.body
        fds = [ctx.fd(name) for name in step.fds]
        await fe.request(step.code, body, need_reply=step.need_reply, fds=fds)
        if step.code is F.SET_FEATURES:
            assert isinstance(body, U64)
            ctx.acked_features = body.value
        if step.code is F.SET_PROTOCOL_FEATURES:
            assert isinstance(body, U64)
            ctx.reply_ack = bool(body.value & P.REPLY_ACK)
        if step.reply is not None:
            reply = await fe.expect_reply(step.code, step.reply)
            expected = step.value(ctx) if callable(step.value) else step.value
            if expected is not None:
                assert reply.u64 == expected, f"{step.code.name}: {reply.u64:#x} != {expected:#x}"
        elif step.need_reply and ctx.reply_ack:
            assert await fe.expect_u64(step.code) == 0, f"{step.code.name} was NACKed"
        else:
            await fe.expect_nothing()


def post_without_kick(ring: str, count: int = 1) -> Do:
    """Publish ``count`` chains on ``ring`` and do not kick (whatever the device asks)."""

    async def action(ctx: Ctx) -> None:
        queue = ctx.ring(ring).queue
        for _ in range(count):
            queue.add([REQUEST_HEADER.pack(RequestType.GET_ID, 0, 0)], [20, 1])
        queue.publish()

    return Do(action)


def expect_used(ring: str, count: int) -> Do:
    """Wait for ``count`` used chains on ``ring``; the driver never kicked it."""

    async def action(ctx: Ctx) -> None:
        vring = ctx.ring(ring)
        used = await vring.wait_used(count)
        assert len(used) == count
        ctx.used[ring] = used
        assert vring.kicks == 0
        assert vring.kick.read_nowait() == 0, "somebody kicked"

    return Do(action)


def expect_unused(ring: str) -> Do:
    """The ring holds posted chains but must not have consumed any yet (disabled)."""

    async def action(ctx: Ctx) -> None:
        await settle()
        assert ctx.ring(ring).queue.used_idx() == 0

    return Do(action)


def driver_ring(ctx: Ctx, name: str, size: int, *, event_idx: bool, indirect: bool) -> None:
    queue = DriverQueue.create(
        ctx.ram, size, event_idx=event_idx, indirect=indirect, pool_size=64 << 10
    )
    old = ctx.rings.get(name)
    if old is not None:
        old.close()
    ctx.rings[name] = DriverVring(cast(Frontend, None), 0, queue)


# -- QEMU 7.2 + blk -----------------------------------------------------------------------


def qemu_blk(device: BlkDevice) -> list[Step]:
    """blk-qsd.sniff.log: realize, SeaBIOS boot (1 request), Linux (rings restarted)."""
    offered = device.offered_features()
    protocol = device.offered_protocol_features() & QEMU_PROTOCOL_MASK
    seabios = SEABIOS_BLK & offered
    linux = LINUX_BLK & offered

    async def linux_ring(ctx: Ctx) -> None:
        driver_ring(ctx, "q", 128, event_idx=True, indirect=True)

    async def linux_io(ctx: Ctx) -> None:
        blk = BlkDriver(ctx.ring("q"))
        data = bytes(range(256)) * 8
        await blk.write(8, data)
        assert await blk.read(8, len(data)) == data
        await blk.flush()
        assert await blk.get_id() == b"protocol-test"

    return [
        Req(F.GET_FEATURES, reply=8, value=offered),
        Req(F.GET_PROTOCOL_FEATURES, reply=8, value=device.offered_protocol_features()),
        Req(F.SET_PROTOCOL_FEATURES, U64(protocol)),
        Req(F.GET_QUEUE_NUM, reply=8, value=2),
        Req(F.GET_MAX_MEM_SLOTS, reply=8, value=32),
        Req(F.SET_OWNER),
        Req(F.GET_FEATURES, reply=8, value=offered),
        fd_req(F.SET_VRING_CALL, "q", 0, "call"),
        fd_req(F.SET_VRING_ERR, "q", 0, "err"),
        Req(F.GET_CONFIG, ConfigSpace(0, 57, 0, bytes(57)), reply=12 + 57),
        # SeaBIOS
        Req(F.SET_FEATURES, U64(seabios)),
        fd_req(F.SET_VRING_CALL, "q", 0, "call"),
        Req(F.SET_FEATURES, U64(seabios)),
        Req(
            F.ADD_MEM_REG,
            lambda ctx: SingleMemRegion(region(ctx)),
            need_reply=True,
            fds=("mem",),
        ),
        *vring("q", 0),
        post_without_kick("q"),
        fd_req(F.SET_VRING_KICK, "q", 0, "kick"),
        # Bit 30 is acked: the ring started above but is disabled until now.
        expect_unused("q"),
        Req(F.SET_VRING_ENABLE, VringState(0, 1)),
        expect_used("q", 1),
        Req(F.SET_VRING_ENABLE, VringState(0, 0)),
        Req(F.GET_VRING_BASE, VringState(0, 0), reply=8, value=vs(0, 1)),
        # Linux: new features, a new ring in new memory, from base 0.
        Do(linux_ring),
        Req(F.SET_FEATURES, U64(linux)),
        fd_req(F.SET_VRING_CALL, "q", 0, "call"),
        Req(F.SET_FEATURES, U64(linux)),
        *vring("q", 0),
        fd_req(F.SET_VRING_KICK, "q", 0, "kick"),
        Req(F.SET_VRING_ENABLE, VringState(0, 1)),
        Do(linux_io),
        Req(F.SET_VRING_ENABLE, VringState(0, 0)),
        Req(
            F.GET_VRING_BASE,
            VringState(0, 0),
            reply=8,
            value=lambda ctx: vs(0, ctx.ring("q").queue.avail_idx),
        ),
    ]


@fail_after()
async def test_qemu_blk_handshake_replay(blk: BlkDevice, sock_path: str) -> None:
    assert blk.offered_features() & (V.PROTOCOL_FEATURES | V.VERSION_1 | BlkFeature.MQ)
    assert blk.offered_protocol_features() & (P.CONFIG | P.MQ | P.REPLY_ACK)
    with GuestRam.create(2 << 20) as ram:
        ctx = Ctx(ram)
        driver_ring(ctx, "q", 128, event_idx=False, indirect=False)
        try:
            async with serving(blk, sock_path):
                before = Resources.snapshot()
                async with await RawFrontend.connect(sock_path) as fe:
                    await replay(fe, ctx, qemu_blk(blk))
                await settle()
                before.assert_unchanged()
        finally:
            for ring in ctx.rings.values():
                ring.close()


# -- QEMU 7.2 + net -----------------------------------------------------------------------


def qemu_net(device: MiniNet) -> list[Step]:
    """net-testpmd.sniff.log: SET_VRING_ENABLE long before features and memory."""
    offered = device.offered_features()
    protocol = device.offered_protocol_features() & QEMU_PROTOCOL_MASK
    ring_fds = [
        fd_req(code, ring, index, kind)
        for ring, index in (("rx", 0), ("tx", 1))
        for code, kind in ((F.SET_VRING_CALL, "call"), (F.SET_VRING_ERR, "err"))
    ]
    enable_both = [Req(F.SET_VRING_ENABLE, VringState(i, 1)) for i in (0, 1)]
    return [
        Req(F.GET_FEATURES, reply=8, value=offered),
        Req(F.GET_PROTOCOL_FEATURES, reply=8, value=device.offered_protocol_features()),
        Req(F.SET_PROTOCOL_FEATURES, U64(protocol)),
        Req(F.GET_QUEUE_NUM, reply=8, value=1),
        Req(F.SET_OWNER),
        Req(F.GET_FEATURES, reply=8, value=offered),
        *ring_fds,
        *enable_both,
        *enable_both,
        Req(F.SET_FEATURES, U64(LINUX_NET & offered)),
        Req(F.GET_STATUS, reply=8, value=0),
        Req(F.SET_STATUS, U64(0x8)),
        Req(
            F.SET_MEM_TABLE,
            lambda ctx: MemoryTable((region(ctx),)),
            need_reply=True,
            fds=("mem",),
        ),
        *vring("rx", 0),
        fd_req(F.SET_VRING_KICK, "rx", 0, "kick"),
        fd_req(F.SET_VRING_CALL, "rx", 0, "call"),
        *vring("tx", 1),
        # Enabled before it started: the ring runs from SET_VRING_KICK, no kick needed.
        post_without_kick("tx", 3),
        fd_req(F.SET_VRING_KICK, "tx", 1, "kick"),
        expect_used("tx", 3),
        fd_req(F.SET_VRING_CALL, "tx", 1, "call"),
        Req(F.GET_STATUS, reply=8, value=0x8),
        Req(F.SET_STATUS, U64(0xF)),
        Req(F.SET_STATUS, U64(0x0)),
        Req(F.GET_VRING_BASE, VringState(0, 0), reply=8, value=vs(0, 0)),
        Req(F.GET_VRING_BASE, VringState(1, 0), reply=8, value=vs(1, 3)),
        *enable_both,
    ]


@fail_after()
async def test_qemu_net_handshake_replay(sock_path: str) -> None:
    device = MiniNet()
    with GuestRam.create(2 << 20) as ram:
        ctx = Ctx(ram)
        driver_ring(ctx, "rx", 256, event_idx=False, indirect=False)
        driver_ring(ctx, "tx", 256, event_idx=False, indirect=False)
        try:
            async with serving(device, sock_path):
                before = Resources.snapshot()
                async with await RawFrontend.connect(sock_path) as fe:
                    await replay(fe, ctx, qemu_net(device))
                await settle()
                before.assert_unchanged()
        finally:
            for ring in ctx.rings.values():
                ring.close()


# -- DPDK 22.11 virtio_user + net ---------------------------------------------------------


def dpdk_net(device: MiniNet) -> list[Step]:
    """handshake-split-1q.txt: CALL before SET_FEATURES, STATUS with NEED_REPLY."""
    offered = device.offered_features()

    async def burst(ctx: Ctx) -> None:
        # DPDK busy-polls and kicks once per burst.
        tx = ctx.ring("tx")
        for _ in range(5):
            tx.queue.add([bytes(64)])
        tx.notify()
        await tx.wait_used(5)

    return [
        Req(F.SET_OWNER),
        Req(F.GET_FEATURES, reply=8, value=offered),
        Req(F.GET_PROTOCOL_FEATURES, reply=8, value=device.offered_protocol_features()),
        Req(F.SET_PROTOCOL_FEATURES, U64(DPDK_PROTOCOL)),
        fd_req(F.SET_VRING_CALL, "rx", 0, "call"),
        fd_req(F.SET_VRING_CALL, "tx", 1, "call"),
        Req(F.SET_FEATURES, U64(DPDK_NET & offered)),
        Req(F.SET_STATUS, U64(0xB), need_reply=True),
        Req(F.GET_STATUS, reply=8, value=0xB),
        Req(F.GET_STATUS, reply=8, value=0xB),
        Req(
            F.SET_MEM_TABLE,
            lambda ctx: MemoryTable((region(ctx),)),
            need_reply=True,
            fds=("mem",),
        ),
        *vring("rx", 0),
        fd_req(F.SET_VRING_KICK, "rx", 0, "kick"),
        *vring("tx", 1),
        post_without_kick("tx", 2),
        fd_req(F.SET_VRING_KICK, "tx", 1, "kick"),
        expect_unused("tx"),
        Req(F.SET_VRING_ENABLE, VringState(0, 1)),
        Req(F.SET_VRING_ENABLE, VringState(1, 1)),
        expect_used("tx", 2),
        Req(F.SET_STATUS, U64(0xF), need_reply=True),
        Do(burst),
        Req(F.SET_VRING_ENABLE, VringState(0, 0)),
        Req(F.SET_VRING_ENABLE, VringState(1, 0)),
        Req(F.GET_VRING_BASE, VringState(0, 0), reply=8, value=vs(0, 0)),
        # DPDK leaves junk in num (the previous reply's); it must be ignored.
        Req(F.GET_VRING_BASE, VringState(1, 96), reply=8, value=vs(1, 7)),
    ]


@fail_after()
async def test_dpdk_net_handshake_replay(sock_path: str) -> None:
    device = MiniNet()
    with GuestRam.create(2 << 20, gpa=DPDK_GPA, uva_base=DPDK_GPA) as ram:
        ctx = Ctx(ram)
        driver_ring(ctx, "rx", 256, event_idx=False, indirect=False)
        driver_ring(ctx, "tx", 256, event_idx=False, indirect=False)
        try:
            async with serving(device, sock_path):
                before = Resources.snapshot()
                async with await RawFrontend.connect(sock_path) as fe:
                    await replay(fe, ctx, dpdk_net(device))
                await settle()
                before.assert_unchanged()
        finally:
            for ring in ctx.rings.values():
                ring.close()


@fail_after()
async def test_blk_status_byte_of_the_ring_start_request(blk: BlkDevice, sock_path: str) -> None:
    """The chain completed without a kick was really executed (GET_ID wrote the serial)."""
    with GuestRam.create(2 << 20) as ram:
        ctx = Ctx(ram)
        driver_ring(ctx, "q", 64, event_idx=False, indirect=False)
        queue = ctx.ring("q").queue
        try:
            async with serving(blk, sock_path), await RawFrontend.connect(sock_path) as fe:
                steps: list[Step] = [
                    Req(F.GET_FEATURES, reply=8),
                    Req(F.SET_PROTOCOL_FEATURES, U64(P.REPLY_ACK)),
                    Req(F.SET_FEATURES, U64(blk.offered_features() & ~V.RING_EVENT_IDX)),
                    Req(
                        F.SET_MEM_TABLE,
                        lambda c: MemoryTable((region(c),)),
                        need_reply=True,
                        fds=("mem",),
                    ),
                    fd_req(F.SET_VRING_CALL, "q", 0, "call"),
                    *vring("q", 0),
                    Req(F.SET_VRING_ENABLE, VringState(0, 1), need_reply=True),
                    post_without_kick("q"),
                    fd_req(F.SET_VRING_KICK, "q", 0, "kick"),
                    expect_used("q", 1),
                ]
                await replay(fe, ctx, steps)
            [(head, written)] = ctx.used["q"]
            data = queue.read_written(head)
            assert written == 21
            assert data[:-1].rstrip(b"\0") == b"protocol-test"
            assert data[-1] == Status.OK
        finally:
            for ring in ctx.rings.values():
                ring.close()
