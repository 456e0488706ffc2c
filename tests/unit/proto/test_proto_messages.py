"""Message bodies: validation on construction, exact-size decoding, round trips."""

from __future__ import annotations

import typing

import pytest
from _proto_strategies import BODIES
from hypothesis import given
from hypothesis import strategies as st

from trio_vhost.errors import LocalProtocolError, RemoteProtocolError
from trio_vhost.proto import messages
from trio_vhost.proto.messages import (
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
from trio_vhost.proto.messages_ext import MAX_SNAPSHOT_SIZE
from trio_vhost.proto.wire import U64_MAX

R = MemRegion(0x1000, 0x1000, 0x7F00_0000_0000, 0)


def test_strategies_cover_every_body_kind() -> None:
    assert set(BODIES) == set(typing.get_args(Body))
    assert set(typing.get_args(Body)) >= {getattr(messages, n) for n in ("Success", "ShmemMap")}


@pytest.mark.parametrize("kind", list(BODIES), ids=lambda k: k.__name__)
@given(data=st.data())
def test_round_trip(kind: type[Body], data: st.DataObject) -> None:
    value = data.draw(BODIES[kind])
    encoded = value.encode()
    assert kind.size_ok(len(encoded))
    assert kind.decode(encoded) == value
    assert kind.decode(encoded).encode() == encoded


@pytest.mark.parametrize("kind", list(BODIES), ids=lambda k: k.__name__)
@given(data=st.data())
def test_one_byte_short_or_long_is_refused(kind: type[Body], data: st.DataObject) -> None:
    encoded = data.draw(BODIES[kind]).encode()
    for wrong in (encoded[:-1], encoded + b"\x00"):
        if len(wrong) == len(encoded):
            continue  # Empty has no byte to drop
        if kind is Snapshot and len(wrong) >= 1:
            continue  # opaque tail: any length from 1 byte is a snapshot
        with pytest.raises(RemoteProtocolError):
            kind.decode(wrong)


# -- construction refuses invalid values (LocalProtocolError) -----------------------------

INVALID: list[tuple[str, typing.Callable[[], object]]] = [
    ("u64 negative", lambda: U64(-1)),
    ("u64 too big", lambda: U64(2**64)),
    ("vring state index", lambda: VringState(2**32, 0)),
    ("vring state num", lambda: VringState(0, -1)),
    ("vring addr flags", lambda: VringAddr(0, 2, 0, 0, 0, 0)),
    ("vring addr flags u32", lambda: VringAddr(0, 2**32, 0, 0, 0, 0)),
    ("vring addr index", lambda: VringAddr(-1, 0, 0, 0, 0, 0)),
    ("desc alignment", lambda: VringAddr(0, 0, 8, 0, 0, 0)),
    ("used alignment", lambda: VringAddr(0, 0, 0, 2, 0, 0)),
    ("avail alignment", lambda: VringAddr(0, 0, 0, 0, 1, 0)),
    ("desc u64", lambda: VringAddr(0, 0, 2**64, 0, 0, 0)),
    ("log u64", lambda: VringAddr(0, 0, 0, 0, 0, 2**64)),
    ("vring file index", lambda: VringFile(256, False)),
    ("region size 0", lambda: MemRegion(0, 0, 0, 0)),
    ("region gpa overflow", lambda: MemRegion(U64_MAX, 1, 0, 0)),
    ("region uva overflow", lambda: MemRegion(0, 2, U64_MAX - 1, 0)),
    ("region offset overflow", lambda: MemRegion(0, 2**63, 0, 2**63)),
    ("region field u64", lambda: MemRegion(2**64, 1, 0, 0)),
    ("table empty", lambda: MemoryTable(())),
    ("table of nine", lambda: MemoryTable(tuple(_region(i) for i in range(9)))),
    ("table gpa overlap", lambda: MemoryTable((R, MemRegion(0x1FFF, 1, 0, 0)))),
    ("table uva overlap", lambda: MemoryTable((R, MemRegion(0, 1, 0x7F00_0000_0FFF, 0)))),
    ("log overflow", lambda: LogBase(2, U64_MAX)),
    ("config size", lambda: ConfigSpace(0, 257, 0, bytes(257))),
    ("config end", lambda: ConfigSpace(255, 2, 0, b"ab")),
    ("config offset u32", lambda: ConfigSpace(2**32, 0, 0, b"")),
    ("config flags", lambda: ConfigSpace(0, 1, 2, b"a")),
    ("config payload", lambda: ConfigSpace(0, 2, 0, b"a")),
    ("inflight queues 0", lambda: Inflight(0, 0, 0, 128)),
    ("inflight size 0", lambda: Inflight(0, 0, 1, 0)),
    ("inflight u16", lambda: Inflight(0, 0, 2**16, 1)),
    ("iotlb perm", lambda: IotlbMsg(0, 0, 0, 4, 2)),
    ("iotlb type 0", lambda: IotlbMsg(0, 0, 0, 0, 0)),
    ("iotlb type 5", lambda: IotlbMsg(0, 0, 0, 0, 5)),
    ("iotlb iova overflow", lambda: IotlbMsg(U64_MAX, 1, 0, 0, 2)),
    ("iotlb uaddr overflow", lambda: IotlbMsg(0, 1, U64_MAX, 0, 2)),
    ("device state direction", lambda: DeviceStateTransfer(2, 0)),
    ("device state phase", lambda: DeviceStateTransfer(0, 1)),
    ("uuid length", lambda: SharedObject(bytes(15))),
    ("crypto size", lambda: CryptoSession(bytes(100))),
    ("shmem config count", lambda: ShmemConfig((0,) * 257)),
    ("shmem config size", lambda: ShmemConfig((-1,))),
    ("failed snapshot with data", lambda: Snapshot(False, b"x")),
    ("snapshot too large", lambda: Snapshot(True, bytes(MAX_SNAPSHOT_SIZE + 1))),
    ("shared regions count", lambda: SharedMemoryRegions(tuple((0, 0) for _ in range(257)))),
    ("shared region id", lambda: SharedMemoryRegions(((256, 1),))),
    ("shared region length", lambda: SharedMemoryRegions(((1, 2**64),))),
    ("shared region ids repeat", lambda: SharedMemoryRegions(((1, 1), (1, 2)))),
    ("vring area index", lambda: VringArea(256, False, 0, 0)),
    ("vring area overflow", lambda: VringArea(0, False, 2, U64_MAX)),
    ("shmem map shmid", lambda: ShmemMap(256, 0, 0, 1, 0)),
    ("shmem map length 0", lambda: ShmemMap(0, 0, 0, 0, 0)),
    ("shmem map flags", lambda: ShmemMap(0, 0, 0, 1, 2)),
    ("shmem map fd overflow", lambda: ShmemMap(0, U64_MAX, 0, 1, 0)),
    ("shmem map shm overflow", lambda: ShmemMap(0, 0, U64_MAX, 1, 0)),
]


def _region(i: int) -> MemRegion:
    return MemRegion(i * 0x1000, 0x1000, 0x7F00_0000_0000 + i * 0x1000, 0)


@pytest.mark.parametrize(("name", "build"), INVALID, ids=[n for n, _ in INVALID])
def test_invalid_construction(name: str, build: typing.Callable[[], object]) -> None:
    with pytest.raises(LocalProtocolError):
        build()


def test_adjacent_regions_do_not_overlap() -> None:
    table = MemoryTable((R, MemRegion(0x2000, 0x1000, 0x7F00_0000_1000, 0)))
    assert len(table.regions) == 2
    assert MemRegion(0, U64_MAX, 0, 0).memory_size == U64_MAX  # end exactly at 2**64 - 1


# -- decoding refuses invalid bytes (RemoteProtocolError) ---------------------------------

BAD_BYTES: list[tuple[str, type[Body] | type[MemRegion], bytes]] = [
    ("vring file reserved bit", VringFile, (0x200).to_bytes(8, "little")),
    ("vring file high bit", VringFile, (1 << 63).to_bytes(8, "little")),
    ("vring addr flags", VringAddr, (2).to_bytes(4, "little") * 2 + bytes(32)),
    ("region size 0", MemRegion, bytes(32)),
    ("table padding", MemoryTable, b"\x01\x00\x00\x00\x01\x00\x00\x00" + R.encode()),
    ("table count 0", MemoryTable, bytes(8)),
    ("table count 9", MemoryTable, b"\x09" + bytes(7) + R.encode() * 9),
    ("table count vs size", MemoryTable, b"\x02" + bytes(7) + R.encode()),
    ("table short head", MemoryTable, bytes(4)),
    ("table bad region", MemoryTable, b"\x01" + bytes(7) + bytes(32)),
    ("table overlap", MemoryTable, b"\x02" + bytes(7) + R.encode() * 2),
    ("single region size 0", SingleMemRegion, bytes(40)),
    ("log overflow", LogBase, b"\x02" + bytes(7) + b"\xff" * 8),
    ("config short head", ConfigSpace, bytes(11)),
    ("config size vs body", ConfigSpace, b"\x00" * 4 + b"\x02" + bytes(7) + b"a"),
    ("config flags", ConfigSpace, bytes(4) + b"\x01" + bytes(3) + b"\x02" + bytes(3) + b"a"),
    ("inflight zero", Inflight, bytes(24)),
    ("iotlb type", IotlbMsg, bytes(32)),
    ("device state", DeviceStateTransfer, b"\x02" + bytes(7)),
    ("success 2", Success, b"\x02"),
    ("snapshot empty", Snapshot, b""),
    ("snapshot flag", Snapshot, b"\x02abc"),
    ("snapshot failed with data", Snapshot, b"\x00abc"),
    ("shmem config count", ShmemConfig, (257).to_bytes(4, "little") + bytes(2052)),
    ("shmem config past count", ShmemConfig, bytes(8) + b"\x01" + bytes(2047)),
    ("shared regions short", SharedMemoryRegions, bytes(7)),
    ("shared regions count", SharedMemoryRegions, (257).to_bytes(8, "little")),
    ("shared regions vs size", SharedMemoryRegions, b"\x01" + bytes(7)),
    ("shared regions repeat", SharedMemoryRegions, b"\x02" + bytes(7) + bytes(32)),
    ("vring area reserved", VringArea, (0x400).to_bytes(8, "little") + bytes(16)),
    ("vring area overflow", VringArea, bytes(8) + b"\x02" + bytes(7) + b"\xff" * 8),
    ("shmem map flags", ShmemMap, bytes(24) + b"\x01" + bytes(7) + b"\x02" + bytes(7)),
    ("crypto size", CryptoSession, bytes(633)),
    ("empty", Empty, b"\x00"),
]


@pytest.mark.parametrize(("name", "kind", "data"), BAD_BYTES, ids=[n for n, _, _ in BAD_BYTES])
def test_invalid_bytes(name: str, kind: type[Body] | type[MemRegion], data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        kind.decode(data)


def test_vring_file_wire_form() -> None:
    assert VringFile(5, True).encode() == (0x105).to_bytes(8, "little")
    assert VringFile.decode((0x1FF).to_bytes(8, "little")) == VringFile(255, True)


def test_inflight_is_24_bytes_with_zero_padding() -> None:
    data = Inflight(0x1000, 0x10, 2, 256).encode()
    assert len(data) == 24
    assert data[20:] == bytes(4)
    # QEMU's pad bytes are not ours to judge.
    assert Inflight.decode(data[:20] + b"\xff" * 4) == Inflight(0x1000, 0x10, 2, 256)


def test_iotlb_is_32_bytes_and_ignores_padding() -> None:
    msg = IotlbMsg(0x1000, 0x2000, 0x7000, 3, IotlbMsg.UPDATE)
    data = msg.encode()
    assert len(data) == 32
    assert data[26:] == bytes(6)
    assert IotlbMsg.decode(data[:26] + b"\xaa" * 6) == msg


def test_crypto_session_id_in_both_layouts() -> None:
    legacy = CryptoSession(bytes(CryptoSession.LEGACY_SIZE)).with_session_id(-1)
    assert legacy.session_id == -1
    assert legacy.data[:8] == b"\xff" * 8
    current = CryptoSession(bytes(CryptoSession.SIZE)).with_session_id(42)
    assert current.session_id == 42
    assert current.data[-8:] == (42).to_bytes(8, "little")


def test_shmem_config_wire_form() -> None:
    data = ShmemConfig((0, 4096)).encode()
    assert data[:8] == (2).to_bytes(4, "little") + bytes(4)
    assert ShmemConfig.decode(data).sizes == (0, 4096)


def test_snapshot_and_success_share_the_failure_byte() -> None:
    assert Snapshot(False).encode() == Success(False).encode() == b"\x00"
    assert Snapshot.decode(b"\x01data") == Snapshot(True, b"data")


def test_shared_memory_regions_wire_form() -> None:
    data = SharedMemoryRegions(((3, 0x1000),)).encode()
    assert data == (1).to_bytes(8, "little") + b"\x03" + bytes(7) + (0x1000).to_bytes(8, "little")


def test_single_region_ignores_padding() -> None:
    data = b"\xff" * 8 + R.encode()
    assert SingleMemRegion.decode(data) == SingleMemRegion(R)
