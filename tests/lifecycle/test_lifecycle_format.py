"""The snapshot byte format (trio_vhost.snapshot): layout, round trips, strict parsing.

The layout is checked against bytes built here from the documented table, so a change of
the format shows up as a failing golden test rather than as a silent incompatibility. The
parser must refuse anything malformed with :class:`SnapshotError` (never another
exception), and whatever it accepts must encode back to exactly the same bytes.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_vhost.errors import DeviceError
from trio_vhost.proto.constants import VirtioFeature
from trio_vhost.snapshot import (
    FORMAT_VERSION,
    MAGIC,
    MAX_RINGS,
    RingAddress,
    RingSnapshot,
    SnapshotError,
    StateSnapshot,
)

U64 = (1 << 64) - 1
EVENT_IDX = int(VirtioFeature.RING_EVENT_IDX)
HEADER = 40
RING = 72


def reseal(data: bytes | bytearray) -> bytes:
    """Recompute the trailing CRC-32 (to reach the checks behind it)."""
    body = bytes(data[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


def patch(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return reseal(out)


# -- strategies --------------------------------------------------------------------------


@st.composite
def rings(draw: st.DrawFn, index: int, event_idx: bool) -> RingSnapshot:
    size = draw(st.sampled_from([0, *(1 << k for k in range(16))]))
    address = None
    if draw(st.booleans()):
        address = RingAddress(
            draw(st.sampled_from([0, 1])),
            *(draw(st.integers(0, U64)) for _ in range(4)),
        )
    gpas = None
    if address is not None and size and draw(st.booleans()):
        gpas = (
            16 * draw(st.integers(0, ((1 << 64) - 16 * size) // 16)),
            2 * draw(st.integers(0, ((1 << 64) - 6 - 2 * size) // 2)),
            4 * draw(st.integers(0, ((1 << 64) - 6 - 8 * size) // 4)),
        )
    return RingSnapshot(
        index=index,
        size=size,
        enabled=draw(st.booleans()),
        started=draw(st.booleans()),
        broken=draw(st.booleans()),
        address=address,
        gpas=gpas,
        next_avail=draw(st.integers(0, 0xFFFF)),
        next_used=draw(st.none() | st.integers(0, 0xFFFF)),
        event_idx=event_idx,
    )


@st.composite
def snapshots(draw: st.DrawFn, max_rings: int = 6) -> StateSnapshot:
    features = draw(st.integers(0, U64))
    count = draw(st.integers(0, max_rings))
    event_idx = bool(features & EVENT_IDX)
    return StateSnapshot(
        features=features,
        protocol_features=draw(st.integers(0, U64)),
        rings=tuple(draw(rings(i, event_idx)) for i in range(count)),
        device_state=draw(st.binary(max_size=200)),
    )


# -- the layout --------------------------------------------------------------------------


def test_layout_matches_the_documented_table() -> None:
    ring = RingSnapshot(
        index=0,
        size=256,
        enabled=True,
        started=True,
        address=RingAddress(1, 0x7F00_0000_1000, 0x7F00_0000_2000, 0x7F00_0000_3000, 0x5000),
        gpas=(0x1000, 0x2000, 0x3000),
        next_avail=0x1234,
        next_used=0x1230,
        event_idx=True,
    )
    idle = RingSnapshot(index=1, event_idx=True)
    snap = StateSnapshot(EVENT_IDX | 1 << 32, 0x8009, (ring, idle), b"dev")
    header = (
        b"TVSNAP\r\n"
        + struct.pack("<HHI", 1, 0, 2)
        + struct.pack("<QQ", EVENT_IDX | 1 << 32, 0x8009)
        + struct.pack("<II", 3, 0)
    )
    # flags: ENABLED 1 | STARTED 2 | HAS_ADDR 8 | HAS_GPA 16 | USED_KNOWN 32 | EVENT_IDX 64
    record0 = struct.pack(
        "<6HI7Q",
        0,
        256,
        1 | 2 | 8 | 16 | 32 | 64,
        0,
        0x1234,
        0x1230,
        1,
        0x7F00_0000_1000,
        0x7F00_0000_2000,
        0x7F00_0000_3000,
        0x5000,
        0x1000,
        0x2000,
        0x3000,
    )
    record1 = struct.pack("<6HI7Q", 1, 0, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    body = header + record0 + record1 + b"dev"
    expected = body + struct.pack("<I", zlib.crc32(body))
    assert len(header) == HEADER == StateSnapshot.HEADER_SIZE
    assert len(record0) == RING == StateSnapshot.RING_SIZE
    assert snap.encode() == expected
    assert StateSnapshot.decode(expected) == snap
    assert MAGIC == b"TVSNAP\r\n"
    assert FORMAT_VERSION == 1


def test_snapshot_errors_are_device_errors() -> None:
    # So that RESTORE with bad bytes fails in its reply instead of ending the connection.
    assert issubclass(SnapshotError, DeviceError)


# -- round trips ---------------------------------------------------------------------------


@given(snapshots())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip(snap: StateSnapshot) -> None:
    data = snap.encode()
    assert len(data) == StateSnapshot.encoded_size(len(snap.rings), len(snap.device_state))
    assert StateSnapshot.decode(data) == snap
    assert StateSnapshot.decode(bytearray(data)) == snap
    assert StateSnapshot.decode(memoryview(data)) == snap


def test_most_rings_round_trip_and_one_more_is_refused() -> None:
    full = StateSnapshot(0, 0, tuple(RingSnapshot(index=i, size=1) for i in range(MAX_RINGS)))
    assert StateSnapshot.decode(full.encode()) == full
    with pytest.raises(SnapshotError, match="at most"):
        StateSnapshot(0, 0, tuple(RingSnapshot(index=i) for i in range(MAX_RINGS)) * 2)


# -- fuzzing ----------------------------------------------------------------------------------


def _decode_or_refuse(data: bytes) -> None:
    """Decode must refuse with SnapshotError or accept what re-encodes identically."""
    try:
        snap = StateSnapshot.decode(data)
    except SnapshotError:
        return
    assert snap.encode() == data


@given(st.binary(max_size=600))
@settings(max_examples=300)
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _decode_or_refuse(data)
    _decode_or_refuse(MAGIC + data)


@given(st.data(), snapshots(max_rings=3))
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_mutated_snapshots(data: st.DataObject, snap: StateSnapshot) -> None:
    encoded = snap.encode()
    at = data.draw(st.integers(0, len(encoded) - 1))
    value = data.draw(st.integers(0, 255))
    mutated = encoded[:at] + bytes([value]) + encoded[at + 1 :]
    if mutated != encoded:
        with pytest.raises(SnapshotError):  # the checksum catches any one changed byte
            StateSnapshot.decode(mutated)
    # Past the checksum, every field check must hold on its own.
    if at < len(encoded) - 4:
        _decode_or_refuse(reseal(mutated))
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(SnapshotError):
        StateSnapshot.decode(encoded[:cut])
    with pytest.raises(SnapshotError):
        StateSnapshot.decode(encoded + data.draw(st.binary(min_size=1, max_size=8)))


def test_every_truncation_is_refused() -> None:
    ring = RingSnapshot(index=0, size=4, address=RingAddress(0, 1, 2, 3, 4))
    data = StateSnapshot(0, 0, (ring,), b"state").encode()
    for cut in range(len(data)):
        with pytest.raises(SnapshotError):
            StateSnapshot.decode(data[:cut])


# -- each check, on resealed bytes ------------------------------------------------------------

_R0 = HEADER  # offset of ring record 0


def _base() -> bytes:
    ring = RingSnapshot(
        index=0,
        size=8,
        address=RingAddress(0, 0x1000, 0x2000, 0x3000, 0),
        gpas=(0x1000, 0x2000, 0x3000),
        next_used=5,
    )
    return StateSnapshot(0, 0, (ring, RingSnapshot(index=1)), b"xyz").encode()


BAD: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "bad_magic": (lambda d: reseal(b"TVSNAP\n\r" + d[8:]), "magic"),
    "version_0": (lambda d: patch(d, 8, "<H", 0), "version"),
    "version_2": (lambda d: patch(d, 8, "<H", 2), "version"),
    "header_flags": (lambda d: patch(d, 10, "<H", 1), "reserved"),
    "header_reserved": (lambda d: patch(d, 36, "<I", 1), "reserved"),
    "ring_count_257": (lambda d: patch(d, 12, "<I", 257), "at most"),
    "ring_count_high": (lambda d: patch(d, 12, "<I", 0xFFFF_FFFF), "at most"),
    "ring_count_more_than_present": (lambda d: patch(d, 12, "<I", 3), "truncated"),
    "ring_count_fewer_than_present": (lambda d: patch(d, 12, "<I", 1), "trailing"),
    "device_len_huge": (lambda d: patch(d, 32, "<I", 0xFFFF_FFFF), "too large"),
    "device_len_short": (lambda d: patch(d, 32, "<I", 2), "trailing"),
    "checksum": (lambda d: d[:-4] + bytes(4), "checksum"),
    "ring_index": (lambda d: patch(d, _R0, "<H", 1), "index"),
    "ring_size_3": (lambda d: patch(d, _R0 + 2, "<H", 3), "power of 2"),
    "ring_size_65535": (lambda d: patch(d, _R0 + 2, "<H", 0xFFFF), "power of 2"),
    "ring_flag_unknown": (lambda d: patch(d, _R0 + 4, "<H", 0x8000 | 8 | 16 | 32), "reserved"),
    "ring_reserved": (lambda d: patch(d, _R0 + 6, "<H", 1), "reserved"),
    "gpa_without_addr": (lambda d: patch(d, _R0 + 4, "<H", 16 | 32), "without HAS_ADDR"),
    "addr_cleared": (lambda d: patch(d, _R0 + 4, "<H", 32), "without HAS_ADDR"),
    "gpas_without_has_gpa": (lambda d: patch(d, _R0 + 4, "<H", 8 | 32), "without HAS_GPA"),
    "used_without_known": (lambda d: patch(d, _R0 + 4, "<H", 8 | 16), "USED_KNOWN"),
    "gpa_without_size": (lambda d: patch(d, _R0 + 2, "<H", 0), "without a ring"),
    "addr_flags_unknown": (lambda d: patch(d, _R0 + 12, "<I", 2), "unknown bits"),
    "desc_misaligned": (lambda d: patch(d, _R0 + 48, "<Q", 0x1008), "aligned"),
    "used_past_u64": (lambda d: patch(d, _R0 + 64, "<Q", U64 - 3), "out of range"),
    "event_idx_disagrees": (lambda d: patch(d, _R0 + 4, "<H", 8 | 16 | 32 | 64), "EVENT_IDX"),
    "event_idx_feature_only": (lambda d: patch(d, 16, "<Q", EVENT_IDX), "EVENT_IDX"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_malformation_is_refused(name: str) -> None:
    mutate, message = BAD[name]
    with pytest.raises(SnapshotError, match=message):
        StateSnapshot.decode(mutate(_base()))


def test_the_base_of_the_malformations_is_valid() -> None:
    snap = StateSnapshot.decode(_base())
    assert snap.rings[0].next_used == 5
    assert snap.device_state == b"xyz"


@pytest.mark.parametrize(
    "build",
    [
        lambda: RingSnapshot(index=256),
        lambda: RingSnapshot(index=0, size=6),
        lambda: RingSnapshot(index=0, next_avail=0x10000),
        lambda: RingSnapshot(index=0, size=4, gpas=(0, 0, 0)),
        lambda: RingAddress(4, 0, 0, 0, 0),
        lambda: RingAddress(0, 1 << 64, 0, 0, 0),
        lambda: StateSnapshot(1 << 64, 0, ()),
        lambda: StateSnapshot(0, 0, (RingSnapshot(index=1),)),
        lambda: StateSnapshot(0, 0, (RingSnapshot(index=0, event_idx=True),)),
    ],
)
def test_invalid_values_cannot_be_built(build: Callable[[], object]) -> None:
    with pytest.raises(SnapshotError):
        build()
