"""Message bodies beyond the core set: crypto, shared memory, crosvm's extensions and the
back-end channel.

Same conventions as :mod:`trio_vhost.proto.messages` (which re-exports every class here):
frozen slotted dataclasses, :class:`~trio_vhost.errors.LocalProtocolError` on invalid
construction, :class:`~trio_vhost.errors.RemoteProtocolError` from ``decode``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Final, Self, final

from ..errors import LocalProtocolError, RemoteProtocolError
from . import wire
from .constants import VRING_IDX_MASK, VRING_NOFD_MASK
from .wire import U8_MAX, U64_MAX, FixedSize, check_end, check_uint, decoded, exact_size

__all__ = [
    "MAX_SHMEM_REGIONS",
    "MAX_SNAPSHOT_SIZE",
    "CryptoSession",
    "SharedMemoryRegions",
    "ShmemConfig",
    "ShmemMap",
    "Snapshot",
    "Success",
    "VringArea",
]

#: ``VIRTIO_MAX_SHMEM_REGIONS``: entries of ``VhostUserShMemConfig.memory_sizes``.
MAX_SHMEM_REGIONS: Final = 256
#: Largest SNAPSHOT reply / RESTORE body accepted: a frontend cannot make us buffer more.
MAX_SNAPSHOT_SIZE: Final = 16 << 20

_I64: Final = struct.Struct("=q")


@final
@dataclass(frozen=True, slots=True)
class CryptoSession:
    """CREATE_CRYPTO_SESSION request and reply: QEMU's ``VhostUserCryptoSession``, opaque.

    The spec names the payload ("crypto session description") without a layout, and
    QEMU's struct changed in 8.0 when asymmetric sessions arrived. Both layouts are
    accepted, told apart by size (x86-64/aarch64 LP64 C layout):

    * :attr:`LEGACY_SIZE` (632, QEMU < 8.0 and DPDK's ``VhostUserCryptoSessionParam``):
      ``i64 session_id`` first, then the symmetric session info (48) and keys (64 + 512).
    * :attr:`SIZE` (1072, QEMU >= 8.0): ``u64 op_code``, a union of the symmetric
      (48 + 64 + 512) and asymmetric (32 + 1024) parameters, then ``i64 session_id``.

    The back-end replies with the same bytes and the session id set (negative = failure).
    """

    LEGACY_SIZE: ClassVar[int] = 632
    SIZE: ClassVar[int] = 1072
    data: bytes

    def __post_init__(self) -> None:
        if not self.size_ok(len(self.data)):
            raise LocalProtocolError(f"crypto session of {len(self.data)} bytes")

    @classmethod
    def size_ok(cls, size: int) -> bool:
        """Return whether ``size`` is one of the two known layouts."""
        return size in (cls.LEGACY_SIZE, cls.SIZE)

    @property
    def _id_offset(self) -> int:
        return 0 if len(self.data) == self.LEGACY_SIZE else self.SIZE - _I64.size

    @property
    def session_id(self) -> int:
        """The ``session_id`` field: the created session, or negative for a failure."""
        (value,) = _I64.unpack_from(self.data, self._id_offset)
        return int(value)

    def with_session_id(self, session_id: int) -> CryptoSession:
        """Return a copy with ``session_id`` set (how the back-end builds its reply)."""
        data = bytearray(self.data)
        _I64.pack_into(data, self._id_offset, session_id)
        return CryptoSession(bytes(data))

    def encode(self) -> bytes:
        """Return the session bytes."""
        return bytes(self.data)

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Accept a body of either layout's size."""
        if not cls.size_ok(len(body)):
            raise RemoteProtocolError(f"crypto session body of {len(body)} bytes")
        return cls(bytes(body))


@final
@dataclass(frozen=True, slots=True)
class ShmemConfig(FixedSize):
    """Spec "VIRTIO Shared Memory Region configuration" (GET_SHMEM_CONFIG reply).

    ``u32 nregions, u32 padding, u64 memory_sizes[256]``; the array index is the shmid.
    ``sizes`` holds the first ``nregions`` entries (a size may be 0 for an unused id).
    QEMU's frontend reads ``memory_sizes[0:nregions]``, so every entry past ``nregions``
    must be zero.
    """

    SIZE: ClassVar[int] = wire.SHMEM_CONFIG.size
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.sizes) > MAX_SHMEM_REGIONS:
            raise LocalProtocolError(f"{len(self.sizes)} shared memory regions, max 256")
        for size in self.sizes:
            check_uint("memory size", size, U64_MAX)

    def encode(self) -> bytes:
        """Return the 2056 body bytes."""
        padded = self.sizes + (0,) * (MAX_SHMEM_REGIONS - len(self.sizes))
        return wire.SHMEM_CONFIG.pack(len(self.sizes), 0, *padded)

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse the 2056-byte body."""
        exact_size("shmem config", body, cls.SIZE)
        count, _padding, *sizes = wire.SHMEM_CONFIG.unpack(body)
        if count > MAX_SHMEM_REGIONS:
            raise RemoteProtocolError(f"shmem config of {count} regions, max 256")
        if any(sizes[count:]):
            raise RemoteProtocolError("shmem config has sizes past nregions")
        return cls(tuple(sizes[:count]))


@final
@dataclass(frozen=True, slots=True)
class Success(FixedSize):
    """crosvm ``VhostUserSuccess``: one byte, 1 success, 0 failure (SLEEP, WAKE, RESTORE)."""

    SIZE: ClassVar[int] = wire.SUCCESS.size
    ok: bool

    def encode(self) -> bytes:
        """Return the single byte."""
        return wire.SUCCESS.pack(int(self.ok))

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse one byte that must be 0 or 1."""
        exact_size("success", body, cls.SIZE)
        return cls(_bool_byte(body[0]))


def _bool_byte(value: int) -> bool:
    if value not in (0, 1):
        raise RemoteProtocolError(f"success byte is {value}, expected 0 or 1")
    return bool(value)


@final
@dataclass(frozen=True, slots=True)
class Snapshot:
    """crosvm SNAPSHOT reply: a :class:`Success` byte followed by opaque snapshot bytes.

    A failed snapshot carries no data (crosvm sends an empty payload).
    """

    ok: bool
    data: bytes = b""

    def __post_init__(self) -> None:
        if not self.ok and self.data:
            raise LocalProtocolError("a failed snapshot carries no data")
        if len(self.data) > MAX_SNAPSHOT_SIZE:
            raise LocalProtocolError(f"snapshot of {len(self.data)} bytes is too large")

    @classmethod
    def size_ok(cls, size: int) -> bool:
        """Return whether ``size`` holds the success byte and at most the largest snapshot."""
        return 1 <= size <= 1 + MAX_SNAPSHOT_SIZE

    def encode(self) -> bytes:
        """Return the success byte and the data."""
        return wire.SUCCESS.pack(int(self.ok)) + self.data

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse the success byte and keep the rest as the snapshot."""
        if not cls.size_ok(len(body)):
            raise RemoteProtocolError(f"snapshot reply of {len(body)} bytes")
        return decoded(cls, _bool_byte(body[0]), bytes(body[1:]))


@final
@dataclass(frozen=True, slots=True)
class SharedMemoryRegions:
    """crosvm GET_SHARED_MEMORY_REGIONS reply: ``u64 count`` + count x ``{u8 id, u64 length}``.

    ``regions`` is a tuple of ``(id, length)`` pairs; ids are distinct u8 values.
    """

    _HEAD: ClassVar[int] = wire.U64.size
    regions: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if len(self.regions) > MAX_SHMEM_REGIONS:
            raise LocalProtocolError(f"{len(self.regions)} shared memory regions, max 256")
        for shmid, length in self.regions:
            check_uint("shared memory id", shmid, U8_MAX)
            check_uint("shared memory length", length, U64_MAX)
        if len({shmid for shmid, _ in self.regions}) != len(self.regions):
            raise LocalProtocolError("shared memory region ids repeat")

    @classmethod
    def size_ok(cls, size: int) -> bool:
        """Return whether ``size`` is ``8 + 16 * n`` for n <= 256."""
        count, rest = divmod(size - cls._HEAD, wire.SHARED_MEM_REGION.size)
        return rest == 0 and 0 <= count <= MAX_SHMEM_REGIONS

    def encode(self) -> bytes:
        """Return the count and the regions."""
        entries = (wire.SHARED_MEM_REGION.pack(*region) for region in self.regions)
        return wire.U64.pack(len(self.regions)) + b"".join(entries)

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse the count, then exactly that many regions."""
        if len(body) < cls._HEAD:
            exact_size("shared memory regions", body, cls._HEAD)
        (count,) = wire.U64.unpack_from(body)
        if count > MAX_SHMEM_REGIONS:
            raise RemoteProtocolError(f"{count} shared memory regions, max 256")
        exact_size("shared memory regions", body, cls._HEAD + count * 16)
        regions = tuple(wire.SHARED_MEM_REGION.iter_unpack(body[cls._HEAD :]))
        return decoded(cls, regions)


@final
@dataclass(frozen=True, slots=True)
class VringArea(FixedSize):
    """Spec "Vring area description" (back-end VRING_HOST_NOTIFIER_MSG).

    ``u64`` with the vring index in bits 0-7 and NOFD in bit 8 (set: de-register the
    notifier, no fd attached), then ``u64 size, u64 offset`` of the area in the fd.
    """

    SIZE: ClassVar[int] = wire.VRING_AREA.size
    index: int
    nofd: bool
    size: int
    offset: int

    def __post_init__(self) -> None:
        check_uint("index", self.index, VRING_IDX_MASK)
        check_uint("size", self.size, U64_MAX)
        check_uint("offset", self.offset, U64_MAX)
        check_end("offset", self.offset, self.size)

    def encode(self) -> bytes:
        """Return the 24 body bytes."""
        value = self.index | (VRING_NOFD_MASK if self.nofd else 0)
        return wire.VRING_AREA.pack(value, self.size, self.offset)

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse a 24-byte body, refusing reserved bits in the index word."""
        exact_size("vring area", body, cls.SIZE)
        value, size, offset = wire.VRING_AREA.unpack(body)
        if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise RemoteProtocolError(f"vring area index word {value:#x} has reserved bits")
        return decoded(cls, value & VRING_IDX_MASK, bool(value & VRING_NOFD_MASK), size, offset)


@final
@dataclass(frozen=True, slots=True)
class ShmemMap(FixedSize):
    """Spec "MMAP request" (back-end SHMEM_MAP / SHMEM_UNMAP), 40 bytes.

    ``flags`` bit 0 maps read-write (``VHOST_USER_FLAG_MAP_RW``); no other bit exists.
    The length is non-zero and neither range overflows a u64.
    """

    SIZE: ClassVar[int] = wire.SHMEM_MAP.size
    MAP_RW: ClassVar[int] = 1
    shmid: int
    fd_offset: int
    shm_offset: int
    length: int
    flags: int

    def __post_init__(self) -> None:
        check_uint("shmid", self.shmid, U8_MAX)
        check_uint("fd_offset", self.fd_offset, U64_MAX)
        check_uint("shm_offset", self.shm_offset, U64_MAX)
        check_uint("length", self.length, U64_MAX)
        if self.length == 0:
            raise LocalProtocolError("shared memory mapping of length 0")
        if self.flags not in (0, self.MAP_RW):
            raise LocalProtocolError(f"unknown shared memory map flags {self.flags:#x}")
        check_end("fd_offset", self.fd_offset, self.length)
        check_end("shm_offset", self.shm_offset, self.length)

    def encode(self) -> bytes:
        """Return the 40 body bytes."""
        return wire.SHMEM_MAP.pack(
            self.shmid, self.fd_offset, self.shm_offset, self.length, self.flags
        )

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse a 40-byte body."""
        exact_size("shmem map", body, cls.SIZE)
        return decoded(cls, *wire.SHMEM_MAP.unpack(body))
