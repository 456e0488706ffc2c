"""Message bodies: one frozen, slotted dataclass per payload kind of the vhost-user spec.

Every body validates itself on construction and knows its wire form:

* ``__post_init__`` checks field ranges (u32/u64 bounds, counts, overflow) and raises
  :class:`~trio_vhost.errors.LocalProtocolError`: building an invalid body is a bug of
  whoever builds it.
* ``decode(body)`` requires the exact size and raises
  :class:`~trio_vhost.errors.RemoteProtocolError` for anything wrong: the bytes came from
  the peer.
* ``encode()`` returns the body bytes; ``size_ok(n)`` says whether ``n`` is a possible
  body size, so a header can be refused before its body is read.

Validation is syntactic and as strict as crosvm's ``VhostUserMsgValidator`` (and rust-vmm's
``message.rs``): rules that depend on negotiated features live in
:mod:`trio_vhost.proto.rules`. Padding the spec names is written as zero; it is checked
only in the memory table, as crosvm does, because QEMU copies uninitialised compiler
padding into ``vhost_iotlb_msg``.

Do not subclass these. The crypto, shared-memory, crosvm-extension and back-end channel
bodies live in :mod:`trio_vhost.proto.messages_ext` and are re-exported here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar, Final, Self, TypeAlias, final

from ..errors import LocalProtocolError, RemoteProtocolError
from . import wire
from .constants import MAX_FDS, VRING_IDX_MASK, VRING_NOFD_MASK, VringAddrFlag
from .messages_ext import (
    CryptoSession,
    SharedMemoryRegions,
    ShmemConfig,
    ShmemMap,
    Snapshot,
    Success,
    VringArea,
)
from .wire import (
    U16_MAX,
    U32_MAX,
    U64_MAX,
    FixedSize,
    check_end,
    check_uint,
    decoded,
    exact_size,
)

__all__ = [
    "CONFIG_SPACE_MAX",
    "MAX_MEM_REGIONS",
    "Body",
    "ConfigSpace",
    "CryptoSession",
    "DeviceStateTransfer",
    "Empty",
    "Inflight",
    "IotlbMsg",
    "LogBase",
    "MemRegion",
    "MemoryTable",
    "SharedMemoryRegions",
    "SharedObject",
    "ShmemConfig",
    "ShmemMap",
    "SingleMemRegion",
    "Snapshot",
    "Success",
    "U64",
    "VringAddr",
    "VringArea",
    "VringFile",
    "VringState",
]

#: Regions in one SET_MEM_TABLE: ``VHOST_MEMORY_BASELINE_NREGIONS``, one fd each.
MAX_MEM_REGIONS: Final = MAX_FDS
#: QEMU's ``VHOST_USER_MAX_CONFIG_SIZE``: the whole config buffer a frontend keeps.
CONFIG_SPACE_MAX: Final = 256

#: Alignment the split and packed ring layouts require (crosvm ``VhostUserVringAddr``).
_DESC_ALIGN: Final = 16
_USED_ALIGN: Final = 4
_AVAIL_ALIGN: Final = 2


@final
@dataclass(frozen=True, slots=True)
class Empty(FixedSize):
    """No payload (the reply of POSTCOPY_ADVISE; back-end CONFIG_CHANGE_MSG)."""

    SIZE: ClassVar[int] = 0

    def encode(self) -> bytes:
        """Return the empty body."""
        return b""

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Accept only an empty body."""
        exact_size("empty", body, 0)
        return cls()


@final
@dataclass(frozen=True, slots=True)
class U64(FixedSize):
    """Spec "A single 64-bit integer": features, counts, status and REPLY_ACK values."""

    SIZE: ClassVar[int] = wire.U64.size
    value: int

    def __post_init__(self) -> None:
        check_uint("value", self.value, U64_MAX)

    def encode(self) -> bytes:
        """Return the 8 body bytes."""
        return wire.U64.pack(self.value)

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse an 8-byte body."""
        exact_size("u64", body, cls.SIZE)
        return cls(*wire.U64.unpack(body))


@final
@dataclass(frozen=True, slots=True)
class VringState(FixedSize):
    """Spec "A vring state description": ``u32 index, u32 num``."""

    SIZE: ClassVar[int] = wire.VRING_STATE.size
    index: int
    num: int

    def __post_init__(self) -> None:
        check_uint("index", self.index, U32_MAX)
        check_uint("num", self.num, U32_MAX)

    def encode(self) -> bytes:
        """Return the 8 body bytes."""
        return wire.VRING_STATE.pack(self.index, self.num)

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse an 8-byte body."""
        exact_size("vring state", body, cls.SIZE)
        return cls(*wire.VRING_STATE.unpack(body))


@final
@dataclass(frozen=True, slots=True)
class VringAddr(FixedSize):
    """Spec "A vring address description" (SET_VRING_ADDR).

    The ring addresses are frontend virtual addresses unless IOMMU or GPA_ADDRESSES says
    otherwise; ``log_guest_addr`` is guest-physical. Like crosvm, only the LOG flag is
    accepted and each ring address must have its ring's alignment (descriptor table 16,
    used ring 4, available ring 2 bytes).
    """

    SIZE: ClassVar[int] = wire.VRING_ADDR.size
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int

    def __post_init__(self) -> None:
        check_uint("index", self.index, U32_MAX)
        check_uint("flags", self.flags, U32_MAX)
        if self.flags & ~int(VringAddrFlag.LOG):
            raise LocalProtocolError(f"unknown vring address flags {self.flags:#x}")
        for name, value, align in (
            ("desc_user_addr", self.desc_user_addr, _DESC_ALIGN),
            ("used_user_addr", self.used_user_addr, _USED_ALIGN),
            ("avail_user_addr", self.avail_user_addr, _AVAIL_ALIGN),
        ):
            check_uint(name, value, U64_MAX)
            if value % align:
                raise LocalProtocolError(f"{name}={value:#x} is not {align}-byte aligned")
        check_uint("log_guest_addr", self.log_guest_addr, U64_MAX)

    def encode(self) -> bytes:
        """Return the 40 body bytes."""
        return wire.VRING_ADDR.pack(
            self.index,
            self.flags,
            self.desc_user_addr,
            self.used_user_addr,
            self.avail_user_addr,
            self.log_guest_addr,
        )

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse a 40-byte body (wire order: index, flags, desc, used, avail, log)."""
        exact_size("vring address", body, cls.SIZE)
        return decoded(cls, *wire.VRING_ADDR.unpack(body))


@final
@dataclass(frozen=True, slots=True)
class VringFile(FixedSize):
    """The u64 of SET_VRING_KICK/CALL/ERR: vring index in bits 0-7, NOFD in bit 8.

    Spec: "Bits (0-7) of the payload contain the vring index. Bit 8 is the invalid FD
    flag." No other bit has a meaning, so any other bit set is an error.
    """

    SIZE: ClassVar[int] = wire.U64.size
    index: int
    nofd: bool

    def __post_init__(self) -> None:
        check_uint("index", self.index, VRING_IDX_MASK)

    def encode(self) -> bytes:
        """Return the 8 body bytes."""
        return wire.U64.pack(self.index | (VRING_NOFD_MASK if self.nofd else 0))

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse the u64, refusing bits other than the index and NOFD."""
        exact_size("vring fd", body, cls.SIZE)
        (value,) = wire.U64.unpack(body)
        if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise RemoteProtocolError(f"vring fd payload {value:#x} has reserved bits set")
        return cls(value & VRING_IDX_MASK, bool(value & VRING_NOFD_MASK))


@final
@dataclass(frozen=True, slots=True)
class MemRegion(FixedSize):
    """Spec "Memory region description" (32 bytes).

    As in crosvm: the size is non-zero and neither ``guest_phys_addr + memory_size``,
    ``userspace_addr + memory_size`` nor ``mmap_offset + memory_size`` overflows a u64.
    """

    SIZE: ClassVar[int] = wire.MEM_REGION.size
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def __post_init__(self) -> None:
        check_uint("guest_phys_addr", self.guest_phys_addr, U64_MAX)
        check_uint("memory_size", self.memory_size, U64_MAX)
        check_uint("userspace_addr", self.userspace_addr, U64_MAX)
        check_uint("mmap_offset", self.mmap_offset, U64_MAX)
        if self.memory_size == 0:
            raise LocalProtocolError("memory region of size 0")
        check_end("guest_phys_addr", self.guest_phys_addr, self.memory_size)
        check_end("userspace_addr", self.userspace_addr, self.memory_size)
        check_end("mmap_offset", self.mmap_offset, self.memory_size)

    def encode(self) -> bytes:
        """Return the 32 region bytes."""
        return wire.MEM_REGION.pack(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse a 32-byte region."""
        exact_size("memory region", body, cls.SIZE)
        return decoded(cls, *wire.MEM_REGION.unpack(body))


def _no_overlap(name: str, spans: list[tuple[int, int]]) -> None:
    # Spec "Memory region description": ranges never overlap in either address space.
    for (start, size), (next_start, _) in itertools.pairwise(sorted(spans)):
        if start + size > next_start:
            raise LocalProtocolError(f"memory regions overlap in {name} at {next_start:#x}")


@final
@dataclass(frozen=True, slots=True)
class MemoryTable:
    """Spec "Multiple Memory regions description" (SET_MEM_TABLE).

    ``u32 nregions, u32 padding`` then exactly ``nregions`` regions: the body is
    ``8 + 32 * nregions`` bytes, 1 to 8 regions, padding zero (crosvm), and no two regions
    overlap in guest-physical or user address space.
    """

    _HEAD: ClassVar[int] = wire.MEM_TABLE_HEAD.size
    regions: tuple[MemRegion, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.regions) <= MAX_MEM_REGIONS:
            raise LocalProtocolError(f"{len(self.regions)} memory regions, expected 1..8")
        _no_overlap("guest_phys_addr", [(r.guest_phys_addr, r.memory_size) for r in self.regions])
        _no_overlap("userspace_addr", [(r.userspace_addr, r.memory_size) for r in self.regions])

    @classmethod
    def size_ok(cls, size: int) -> bool:
        """Return whether ``size`` is ``8 + 32 * n`` for 1 <= n <= 8."""
        count, rest = divmod(size - cls._HEAD, MemRegion.SIZE)
        return rest == 0 and 1 <= count <= MAX_MEM_REGIONS

    def encode(self) -> bytes:
        """Return the head and every region."""
        head = wire.MEM_TABLE_HEAD.pack(len(self.regions), 0)
        return head + b"".join(region.encode() for region in self.regions)

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse the head, then exactly ``nregions`` regions."""
        if len(body) < cls._HEAD:
            exact_size("memory table", body, cls._HEAD)
        count, padding = wire.MEM_TABLE_HEAD.unpack_from(body)
        if padding:
            raise RemoteProtocolError(f"memory table padding is {padding:#x}, not 0")
        if not 1 <= count <= MAX_MEM_REGIONS:
            raise RemoteProtocolError(f"memory table of {count} regions, expected 1..8")
        exact_size("memory table", body, cls._HEAD + count * MemRegion.SIZE)
        fields = wire.MEM_REGION.iter_unpack(body[cls._HEAD :])
        return decoded(cls, tuple(decoded(MemRegion, *f) for f in fields))


@final
@dataclass(frozen=True, slots=True)
class SingleMemRegion(FixedSize):
    """Spec "Single memory region description": ``u64 padding`` + region (40 bytes).

    The body of ADD_MEM_REG and REM_MEM_REG.
    """

    SIZE: ClassVar[int] = wire.SINGLE_MEM_REGION.size
    region: MemRegion

    def encode(self) -> bytes:
        """Return the zero padding and the region."""
        return bytes(8) + self.region.encode()

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse a 40-byte body."""
        exact_size("single memory region", body, cls.SIZE)
        return cls(MemRegion.decode(body[8:]))


@final
@dataclass(frozen=True, slots=True)
class LogBase(FixedSize):
    """Spec "Log description" (SET_LOG_BASE with LOG_SHMFD): ``u64 size, u64 offset``."""

    SIZE: ClassVar[int] = wire.LOG.size
    mmap_size: int
    mmap_offset: int

    def __post_init__(self) -> None:
        check_uint("mmap_size", self.mmap_size, U64_MAX)
        check_uint("mmap_offset", self.mmap_offset, U64_MAX)
        check_end("mmap_offset", self.mmap_offset, self.mmap_size)

    def encode(self) -> bytes:
        """Return the 16 body bytes."""
        return wire.LOG.pack(self.mmap_size, self.mmap_offset)

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse a 16-byte body."""
        exact_size("log", body, cls.SIZE)
        return decoded(cls, *wire.LOG.unpack(body))


@final
@dataclass(frozen=True, slots=True)
class ConfigSpace:
    """Spec "Virtio device config space": ``u32 offset, u32 size, u32 flags`` + payload.

    ``payload`` is exactly ``size`` bytes; GET_CONFIG requests carry it too
    (zero-filled by QEMU). ``size`` is at most 256 and ``offset + size`` stays within
    QEMU's 256-byte config buffer. ``flags`` is 0 (writable fields) or 1 (live migration).
    ``size`` 0 is legal here because a GET_CONFIG reply of size 0 reports an error; the
    requests refuse it (crosvm).
    """

    _HEAD: ClassVar[int] = wire.CONFIG_HEAD.size
    #: Spec values of ``flags``: 0 front-end writable fields, 1 live migration.
    FLAGS: ClassVar[frozenset[int]] = frozenset({0, 1})
    offset: int
    size: int
    flags: int
    payload: bytes

    def __post_init__(self) -> None:
        check_uint("offset", self.offset, U32_MAX)
        check_uint("size", self.size, CONFIG_SPACE_MAX)
        if self.offset + self.size > CONFIG_SPACE_MAX:
            raise LocalProtocolError(f"config access {self.offset}+{self.size} exceeds 256")
        if self.flags not in self.FLAGS:
            raise LocalProtocolError(f"config flags {self.flags:#x} are neither 0 nor 1")
        if len(self.payload) != self.size:
            raise LocalProtocolError(f"config payload is {len(self.payload)} != {self.size}")

    @classmethod
    def size_ok(cls, size: int) -> bool:
        """Return whether ``size`` fits a head and up to 256 payload bytes."""
        return cls._HEAD <= size <= cls._HEAD + CONFIG_SPACE_MAX

    def encode(self) -> bytes:
        """Return the head and payload."""
        return wire.CONFIG_HEAD.pack(self.offset, self.size, self.flags) + self.payload

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse the head, then exactly ``size`` payload bytes."""
        if len(body) < cls._HEAD:
            exact_size("config space", body, cls._HEAD)
        offset, size, flags = wire.CONFIG_HEAD.unpack_from(body)
        exact_size("config space", body, cls._HEAD + size)
        return decoded(cls, offset, size, flags, bytes(body[cls._HEAD :]))


@final
@dataclass(frozen=True, slots=True)
class Inflight(FixedSize):
    """Spec "Inflight description" (GET/SET_INFLIGHT_FD), 24 bytes on the wire.

    QEMU's ``VhostUserInflight`` is ``u64, u64, u16, u16`` without ``packed``, so its
    ``sizeof`` is 24 and that is what QEMU, DPDK and crosvm send. Like crosvm, both counts
    must be non-zero.
    """

    SIZE: ClassVar[int] = wire.INFLIGHT.size
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    def __post_init__(self) -> None:
        check_uint("mmap_size", self.mmap_size, U64_MAX)
        check_uint("mmap_offset", self.mmap_offset, U64_MAX)
        check_uint("num_queues", self.num_queues, U16_MAX)
        check_uint("queue_size", self.queue_size, U16_MAX)
        if self.num_queues == 0 or self.queue_size == 0:
            raise LocalProtocolError("inflight description with zero queues or queue size")

    def encode(self) -> bytes:
        """Return the 24 body bytes."""
        return wire.INFLIGHT.pack(
            self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size
        )

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse a 24-byte body; the 4 trailing pad bytes are ignored."""
        exact_size("inflight", body, cls.SIZE)
        return decoded(cls, *wire.INFLIGHT.unpack(body))


@final
@dataclass(frozen=True, slots=True)
class IotlbMsg(FixedSize):
    """Spec "An IOTLB message": Linux ``struct vhost_iotlb_msg``, 32 bytes on the wire.

    ``perm`` is 0-3 (none, read, write, read/write); ``type`` is 1 miss, 2 update,
    3 invalidate or 4 access fail. Neither range may overflow a u64.
    """

    SIZE: ClassVar[int] = wire.IOTLB.size
    MISS: ClassVar[int] = 1
    UPDATE: ClassVar[int] = 2
    INVALIDATE: ClassVar[int] = 3
    ACCESS_FAIL: ClassVar[int] = 4
    iova: int
    size: int
    uaddr: int
    perm: int
    type: int

    def __post_init__(self) -> None:
        check_uint("iova", self.iova, U64_MAX)
        check_uint("size", self.size, U64_MAX)
        check_uint("uaddr", self.uaddr, U64_MAX)
        check_uint("perm", self.perm, 3)
        if not self.MISS <= self.type <= self.ACCESS_FAIL:
            raise LocalProtocolError(f"unknown IOTLB message type {self.type}")
        check_end("iova", self.iova, self.size)
        check_end("uaddr", self.uaddr, self.size)

    def encode(self) -> bytes:
        """Return the 32 body bytes (pad bytes zero)."""
        return wire.IOTLB.pack(self.iova, self.size, self.uaddr, self.perm, self.type)

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse a 32-byte body; the 6 pad bytes are ignored (QEMU leaves them unset)."""
        exact_size("iotlb", body, cls.SIZE)
        return decoded(cls, *wire.IOTLB.unpack(body))


@final
@dataclass(frozen=True, slots=True)
class DeviceStateTransfer(FixedSize):
    """Spec "Device state transfer parameters" (SET_DEVICE_STATE_FD).

    ``direction`` is 0 (save) or 1 (load); ``phase`` 0 (stopped) is the only phase.
    """

    SIZE: ClassVar[int] = wire.DEVICE_STATE.size
    SAVE: ClassVar[int] = 0
    LOAD: ClassVar[int] = 1
    STOPPED: ClassVar[int] = 0
    direction: int
    phase: int

    def __post_init__(self) -> None:
        if self.direction not in (self.SAVE, self.LOAD):
            raise LocalProtocolError(f"unknown transfer direction {self.direction}")
        if self.phase != self.STOPPED:
            raise LocalProtocolError(f"unknown migration phase {self.phase}")

    def encode(self) -> bytes:
        """Return the 8 body bytes."""
        return wire.DEVICE_STATE.pack(self.direction, self.phase)

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse an 8-byte body."""
        exact_size("device state transfer", body, cls.SIZE)
        return decoded(cls, *wire.DEVICE_STATE.unpack(body))


@final
@dataclass(frozen=True, slots=True)
class SharedObject(FixedSize):
    """Spec "VhostUserShared": a 16-byte UUID (GET_SHARED_OBJECT, SHARED_OBJECT_*)."""

    SIZE: ClassVar[int] = 16
    uuid: bytes

    def __post_init__(self) -> None:
        if len(self.uuid) != self.SIZE:
            raise LocalProtocolError(f"UUID of {len(self.uuid)} bytes, expected 16")

    def encode(self) -> bytes:
        """Return the UUID bytes."""
        return bytes(self.uuid)

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse a 16-byte UUID."""
        exact_size("shared object", body, cls.SIZE)
        return cls(bytes(body))


#: Every body kind; requests with opaque payloads (RESTORE) carry ``bytes`` instead.
Body: TypeAlias = (
    Empty
    | U64
    | VringState
    | VringAddr
    | VringFile
    | MemoryTable
    | SingleMemRegion
    | LogBase
    | ConfigSpace
    | Inflight
    | IotlbMsg
    | DeviceStateTransfer
    | SharedObject
    | CryptoSession
    | ShmemConfig
    | Success
    | Snapshot
    | SharedMemoryRegions
    | VringArea
    | ShmemMap
)
