"""The backend snapshot format: what SNAPSHOT, RESTORE and SET_DEVICE_STATE_FD carry.

A snapshot is the whole state a fresh backend needs to continue where a suspended one
stopped: the negotiated features, every vring's configuration and position, and the
device's own bytes (:meth:`Device.save_state <trio_vhost.device.Device.save_state>`).
It is plain data; :mod:`trio_vhost.session` captures and applies it.

Byte format, version 1. Every integer is little-endian, whatever the host; no field is
implicit and there is no padding the parser does not check::

    header (40 bytes)
       0  8s   magic            b"TVSNAP\\r\\n"
       8  u16  version          1
      10  u16  flags            0 (reserved)
      12  u32  ring_count       0..256 (a vring index is 8 bits)
      16  u64  features         acked virtio features (SET_FEATURES)
      24  u64  protocol         acked protocol features (SET_PROTOCOL_FEATURES)
      32  u32  device_len       length of the device state
      36  u32  reserved         0
    ring_count ring records (72 bytes each), in index order
       0  u16  index            equal to the record's position
       2  u16  size             SET_VRING_NUM: 0 (never set) or a power of 2 <= 32768
       4  u16  flags            bit 0 ENABLED, 1 STARTED, 2 BROKEN, 3 HAS_ADDR,
                                4 HAS_GPA, 5 USED_KNOWN, 6 EVENT_IDX; others 0
       6  u16  reserved         0
       8  u16  next_avail       the next avail index the device reads
      10  u16  next_used        the next used index it writes (0 unless USED_KNOWN)
      12  u32  addr_flags       SET_VRING_ADDR flags (bit 0 LOG only)
      16  u64  desc_user_addr   SET_VRING_ADDR, as the frontend gave them
      24  u64  avail_user_addr    (all four 0 unless HAS_ADDR)
      32  u64  used_user_addr
      40  u64  log_guest_addr
      48  u64  desc_gpa         the guest-physical addresses they resolved to
      56  u64  avail_gpa          (0 unless HAS_GPA; HAS_GPA needs HAS_ADDR and a size)
      64  u64  used_gpa
    device state (device_len bytes)
    u32 crc32                   zlib CRC-32 of every byte before it

Meaning of the ring flags: STARTED is the protocol's "started" (SET_VRING_KICK, until
GET_VRING_BASE); BROKEN a ring stopped for bad guest data; USED_KNOWN says ``next_used``
is where the device stopped (otherwise the used index is read from the used ring when
the ring starts); EVENT_IDX must agree with bit 29 of ``features``.

Parsing is strict: :meth:`StateSnapshot.decode` raises :class:`SnapshotError` for a wrong
magic or version, a truncated or over-long buffer, a bad checksum, a reserved bit or
field that is not zero, a count, size, index or address out of range, or flags that
contradict each other. A newer version is refused rather than guessed at.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import ClassVar, Final, final

from .errors import DeviceError, VirtqueueError
from .proto.constants import VirtioFeature
from .vring.state import QueueState

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_RINGS",
    "RingAddress",
    "RingSnapshot",
    "SnapshotError",
    "StateSnapshot",
]

MAGIC: Final = b"TVSNAP\r\n"
FORMAT_VERSION: Final = 1
#: A vring index is 8 bits wide (VRING_IDX_MASK): at most 256 rings.
MAX_RINGS: Final = 256
#: The largest split ring (virtio "Queue Size").
_MAX_QUEUE_SIZE: Final = 32768
#: Largest device state: the whole snapshot must fit a SNAPSHOT reply (16 MiB).
MAX_DEVICE_STATE: Final = 16 << 20

_HEADER: Final = struct.Struct("<8sHHIQQII")
_RING: Final = struct.Struct("<HHHHHHIQQQQQQQ")
_CRC: Final = struct.Struct("<I")
_U64_MAX: Final = (1 << 64) - 1
_LOG_FLAG: Final = 1

_ENABLED: Final = 1 << 0
_STARTED: Final = 1 << 1
_BROKEN: Final = 1 << 2
_HAS_ADDR: Final = 1 << 3
_HAS_GPA: Final = 1 << 4
_USED_KNOWN: Final = 1 << 5
_EVENT_IDX: Final = 1 << 6
_KNOWN_FLAGS: Final = (
    _ENABLED | _STARTED | _BROKEN | _HAS_ADDR | _HAS_GPA | _USED_KNOWN | _EVENT_IDX
)


class SnapshotError(DeviceError):
    """A snapshot that is malformed, of another version, or does not fit this backend."""


@final
@dataclass(frozen=True, slots=True)
class RingAddress:
    """SET_VRING_ADDR of one ring as the frontend gave it (frontend virtual addresses)."""

    flags: int
    desc_user_addr: int
    avail_user_addr: int
    used_user_addr: int
    log_guest_addr: int

    def __post_init__(self) -> None:
        if self.flags & ~_LOG_FLAG:
            raise SnapshotError(f"vring address flags {self.flags:#x} has unknown bits")
        for name in ("desc_user_addr", "avail_user_addr", "used_user_addr", "log_guest_addr"):
            _check_u64(name, getattr(self, name))


@final
@dataclass(frozen=True, slots=True)
class RingSnapshot:
    """One vring: configuration, protocol state and position.

    Attributes:
        index: the vring index.
        size: SET_VRING_NUM, 0 if never set.
        enabled: SET_VRING_ENABLE state.
        started: started in the protocol's sense (SET_VRING_KICK .. GET_VRING_BASE).
        broken: stopped because the guest corrupted it.
        address: SET_VRING_ADDR, None if never set.
        gpas: ``(desc, avail, used)`` guest-physical addresses the ring parts resolved to
            through the memory table, None if they were not resolved.
        next_avail: the next avail index to read.
        next_used: the next used index to write; None means "read it from the used ring".
        event_idx: VIRTIO_F_EVENT_IDX in force on this ring.
    """

    index: int
    size: int = 0
    enabled: bool = False
    started: bool = False
    broken: bool = False
    address: RingAddress | None = None
    gpas: tuple[int, int, int] | None = None
    next_avail: int = 0
    next_used: int | None = None
    event_idx: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.index < MAX_RINGS:
            raise SnapshotError(f"vring index {self.index} out of range")
        if self.size and (self.size > _MAX_QUEUE_SIZE or self.size & (self.size - 1)):
            raise SnapshotError(f"vring {self.index}: size {self.size} not a power of 2")
        if not 0 <= self.size <= _MAX_QUEUE_SIZE:
            raise SnapshotError(f"vring {self.index}: size {self.size} out of range")
        for name, value in (("next_avail", self.next_avail), ("next_used", self.next_used)):
            if value is not None and not 0 <= value <= 0xFFFF:
                raise SnapshotError(f"vring {self.index}: {name} {value} is not 16 bits")
        if self.gpas is not None:
            if self.address is None or self.size == 0:
                raise SnapshotError(f"vring {self.index}: resolved addresses without a ring")
            desc, avail, used = self.gpas
            try:
                QueueState(size=self.size, desc_gpa=desc, avail_gpa=avail, used_gpa=used).validate()
            except VirtqueueError as exc:
                raise SnapshotError(f"vring {self.index}: {exc}") from exc

    @property
    def flags(self) -> int:
        """The record's flag word."""
        bits = (
            (self.enabled, _ENABLED),
            (self.started, _STARTED),
            (self.broken, _BROKEN),
            (self.address is not None, _HAS_ADDR),
            (self.gpas is not None, _HAS_GPA),
            (self.next_used is not None, _USED_KNOWN),
            (self.event_idx, _EVENT_IDX),
        )
        return sum(bit for present, bit in bits if present)

    def encode(self) -> bytes:
        """Return the 72-byte record."""
        addr = self.address or RingAddress(0, 0, 0, 0, 0)
        gpas = self.gpas or (0, 0, 0)
        return _RING.pack(
            self.index,
            self.size,
            self.flags,
            0,
            self.next_avail,
            self.next_used or 0,
            addr.flags,
            addr.desc_user_addr,
            addr.avail_user_addr,
            addr.used_user_addr,
            addr.log_guest_addr,
            *gpas,
        )

    @classmethod
    def decode(cls, record: bytes, position: int) -> RingSnapshot:
        """Parse one record found at ``position`` (which must be its index)."""
        (
            index,
            size,
            flags,
            reserved,
            next_avail,
            next_used,
            addr_flags,
            desc_uva,
            avail_uva,
            used_uva,
            log_gpa,
            desc_gpa,
            avail_gpa,
            used_gpa,
        ) = _RING.unpack(record)
        if index != position:
            raise SnapshotError(f"ring record {position} has index {index}")
        if flags & ~_KNOWN_FLAGS or reserved:
            raise SnapshotError(f"vring {index}: reserved flag bits or field set")
        address: RingAddress | None = None
        if flags & _HAS_ADDR:
            address = RingAddress(addr_flags, desc_uva, avail_uva, used_uva, log_gpa)
        elif addr_flags or desc_uva or avail_uva or used_uva or log_gpa:
            raise SnapshotError(f"vring {index}: addresses without HAS_ADDR")
        gpas: tuple[int, int, int] | None = None
        if flags & _HAS_GPA:
            gpas = (desc_gpa, avail_gpa, used_gpa)
        elif desc_gpa or avail_gpa or used_gpa:
            raise SnapshotError(f"vring {index}: guest addresses without HAS_GPA")
        if not flags & _USED_KNOWN and next_used:
            raise SnapshotError(f"vring {index}: next_used without USED_KNOWN")
        return cls(
            index=index,
            size=size,
            enabled=bool(flags & _ENABLED),
            started=bool(flags & _STARTED),
            broken=bool(flags & _BROKEN),
            address=address,
            gpas=gpas,
            next_avail=next_avail,
            next_used=next_used if flags & _USED_KNOWN else None,
            event_idx=bool(flags & _EVENT_IDX),
        )


@final
@dataclass(frozen=True, slots=True)
class StateSnapshot:
    """A whole backend: features, rings and device state. See the module docstring."""

    HEADER_SIZE: ClassVar[int] = _HEADER.size
    RING_SIZE: ClassVar[int] = _RING.size
    features: int
    protocol_features: int
    rings: tuple[RingSnapshot, ...]
    device_state: bytes = b""

    def __post_init__(self) -> None:
        _check_u64("features", self.features)
        _check_u64("protocol_features", self.protocol_features)
        if len(self.rings) > MAX_RINGS:
            raise SnapshotError(f"{len(self.rings)} rings, at most {MAX_RINGS}")
        for position, ring in enumerate(self.rings):
            if ring.index != position:
                raise SnapshotError(f"ring {position} has index {ring.index}")
        event_idx = bool(self.features & VirtioFeature.RING_EVENT_IDX)
        for ring in self.rings:
            if ring.event_idx != event_idx:
                raise SnapshotError(f"vring {ring.index}: EVENT_IDX disagrees with the features")
        if len(self.device_state) > MAX_DEVICE_STATE:
            raise SnapshotError(f"device state of {len(self.device_state)} bytes is too large")

    @staticmethod
    def encoded_size(rings: int, device_len: int) -> int:
        """The length of a snapshot with ``rings`` rings and ``device_len`` device bytes."""
        return _HEADER.size + rings * _RING.size + device_len + _CRC.size

    def encode(self) -> bytes:
        """Return the snapshot bytes."""
        header = _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            0,
            len(self.rings),
            self.features,
            self.protocol_features,
            len(self.device_state),
            0,
        )
        body = b"".join([header, *(ring.encode() for ring in self.rings), self.device_state])
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> StateSnapshot:
        """Parse snapshot bytes strictly.

        Raises:
            SnapshotError: anything malformed (see the module docstring).
        """
        data = bytes(data)
        if len(data) < _HEADER.size + _CRC.size:
            if not MAGIC.startswith(data[: len(MAGIC)]):
                raise SnapshotError("not a trio_vhost snapshot (bad magic)")
            raise SnapshotError(f"snapshot truncated: {len(data)} bytes")
        magic, version, flags, count, features, protocol, device_len, reserved = (
            _HEADER.unpack_from(data)
        )
        if magic != MAGIC:
            raise SnapshotError("not a trio_vhost snapshot (bad magic)")
        if version != FORMAT_VERSION:
            raise SnapshotError(f"snapshot format version {version}, expected {FORMAT_VERSION}")
        if flags or reserved:
            raise SnapshotError("snapshot header has reserved bits set")
        if count > MAX_RINGS:
            raise SnapshotError(f"snapshot of {count} rings, at most {MAX_RINGS}")
        if device_len > MAX_DEVICE_STATE:
            raise SnapshotError(f"device state of {device_len} bytes is too large")
        expected = cls.encoded_size(count, device_len)
        if len(data) < expected:
            raise SnapshotError(f"snapshot truncated: {len(data)} of {expected} bytes")
        if len(data) > expected:
            raise SnapshotError(f"{len(data) - expected} bytes of trailing data after snapshot")
        (crc,) = _CRC.unpack_from(data, expected - _CRC.size)
        if crc != zlib.crc32(memoryview(data)[: expected - _CRC.size]):
            raise SnapshotError("snapshot checksum mismatch")
        offset = _HEADER.size
        rings = []
        for position in range(count):
            rings.append(RingSnapshot.decode(data[offset : offset + _RING.size], position))
            offset += _RING.size
        device_state = data[offset : offset + device_len]
        return cls(features, protocol, tuple(rings), device_state)


def _check_u64(name: str, value: int) -> None:
    if not 0 <= value <= _U64_MAX:
        raise SnapshotError(f"{name} {value} is not a u64")
