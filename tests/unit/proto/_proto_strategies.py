"""Hypothesis strategies for every message body (valid values only)."""

from __future__ import annotations

from hypothesis import strategies as st

from trio_vhost.proto.messages import (
    CONFIG_SPACE_MAX,
    U64,
    Body,
    ConfigSpace,
    CryptoSession,
    DeviceStateTransfer,
    Empty,
    Inflight,
    IotlbMsg,
    LogBase,
    MemoryTable,
    MemRegion,
    SharedMemoryRegions,
    SharedObject,
    ShmemConfig,
    ShmemMap,
    SingleMemRegion,
    Snapshot,
    Success,
    VringAddr,
    VringArea,
    VringFile,
    VringState,
)

U8 = st.integers(0, 0xFF)
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFF_FFFF)
U64_ = st.integers(0, 2**64 - 1)


@st.composite
def mem_regions(draw: st.DrawFn) -> MemRegion:
    size = draw(st.integers(1, 2**48))
    limit = 2**64 - 1 - size
    return MemRegion(
        draw(st.integers(0, limit)),
        size,
        draw(st.integers(0, limit)),
        draw(st.integers(0, limit)),
    )


@st.composite
def memory_tables(draw: st.DrawFn) -> MemoryTable:
    count = draw(st.integers(1, 8))
    size = draw(st.integers(1, 2**32))
    gpas = draw(st.lists(st.integers(0, 2**20), min_size=count, max_size=count, unique=True))
    uvas = draw(st.permutations(range(count)))
    regions = tuple(
        MemRegion(g * 2**33, size, 0x7F00_0000_0000 + u * 2**33, draw(st.integers(0, 2**40)))
        for g, u in zip(gpas, uvas, strict=True)
    )
    return MemoryTable(regions)


@st.composite
def config_spaces(draw: st.DrawFn) -> ConfigSpace:
    size = draw(st.integers(0, CONFIG_SPACE_MAX))
    offset = draw(st.integers(0, CONFIG_SPACE_MAX - size))
    payload = draw(st.binary(min_size=size, max_size=size))
    return ConfigSpace(offset, size, draw(st.sampled_from([0, 1])), payload)


@st.composite
def iotlb_msgs(draw: st.DrawFn) -> IotlbMsg:
    size = draw(U64_)
    limit = 2**64 - 1 - size
    return IotlbMsg(
        draw(st.integers(0, limit)),
        size,
        draw(st.integers(0, limit)),
        draw(st.integers(0, 3)),
        draw(st.integers(1, 4)),
    )


@st.composite
def shmem_maps(draw: st.DrawFn) -> ShmemMap:
    length = draw(st.integers(1, 2**64 - 1))
    limit = 2**64 - 1 - length
    return ShmemMap(
        draw(U8),
        draw(st.integers(0, limit)),
        draw(st.integers(0, limit)),
        length,
        draw(st.sampled_from([0, 1])),
    )


@st.composite
def vring_areas(draw: st.DrawFn) -> VringArea:
    size = draw(U64_)
    return VringArea(draw(U8), draw(st.booleans()), size, draw(st.integers(0, 2**64 - 1 - size)))


@st.composite
def log_bases(draw: st.DrawFn) -> LogBase:
    size = draw(U64_)
    return LogBase(size, draw(st.integers(0, 2**64 - 1 - size)))


@st.composite
def vring_addrs(draw: st.DrawFn) -> VringAddr:
    return VringAddr(
        draw(U32),
        draw(st.sampled_from([0, 1])),
        draw(st.integers(0, 2**60 - 1)) * 16,
        draw(st.integers(0, 2**62 - 1)) * 4,
        draw(st.integers(0, 2**63 - 1)) * 2,
        draw(U64_),
    )


@st.composite
def crypto_sessions(draw: st.DrawFn) -> CryptoSession:
    size = draw(st.sampled_from([CryptoSession.LEGACY_SIZE, CryptoSession.SIZE]))
    return CryptoSession(draw(st.binary(min_size=size, max_size=size)))


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    ok = draw(st.booleans())
    return Snapshot(ok, draw(st.binary(max_size=64)) if ok else b"")


@st.composite
def shared_memory_regions(draw: st.DrawFn) -> SharedMemoryRegions:
    ids = draw(st.lists(U8, max_size=16, unique=True))
    return SharedMemoryRegions(tuple((i, draw(U64_)) for i in ids))


#: One strategy per body class.
BODIES: dict[type[Body], st.SearchStrategy[Body]] = {
    Empty: st.just(Empty()),
    U64: st.builds(U64, U64_),
    VringState: st.builds(VringState, U32, U32),
    VringAddr: vring_addrs(),
    VringFile: st.builds(VringFile, U8, st.booleans()),
    MemoryTable: memory_tables(),
    SingleMemRegion: st.builds(SingleMemRegion, mem_regions()),
    LogBase: log_bases(),
    ConfigSpace: config_spaces(),
    Inflight: st.builds(Inflight, U64_, U64_, st.integers(1, 0xFFFF), st.integers(1, 0xFFFF)),
    IotlbMsg: iotlb_msgs(),
    DeviceStateTransfer: st.builds(DeviceStateTransfer, st.sampled_from([0, 1]), st.just(0)),
    SharedObject: st.builds(SharedObject, st.binary(min_size=16, max_size=16)),
    CryptoSession: crypto_sessions(),
    ShmemConfig: st.builds(ShmemConfig, st.lists(U64_, max_size=256).map(tuple)),
    Success: st.builds(Success, st.booleans()),
    Snapshot: snapshots(),
    SharedMemoryRegions: shared_memory_regions(),
    VringArea: vring_areas(),
    ShmemMap: shmem_maps(),
}
