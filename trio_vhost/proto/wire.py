"""Wire layouts: the message header and the struct of every body.

All numbers are in the machine's native byte order ("All numbers are in the machine
native byte order", vhost-user spec, *Message Specification*), so every layout uses
:mod:`struct`'s ``'='`` prefix: native order, standard sizes and **no implicit
alignment**. Where QEMU's C structs carry compiler padding, the pad bytes are spelled out
(``x``) so that each layout has exactly the size QEMU puts in the header.

Each layout lists its byte offsets; ``tests/unit/proto/test_proto_wire.py`` asserts
every size.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Final, ParamSpec, Self, TypeVar, final

from ..errors import LocalProtocolError, RemoteProtocolError
from .constants import HEADER_SIZE

__all__ = [
    "CONFIG_HEAD",
    "DEVICE_STATE",
    "HEADER",
    "INFLIGHT",
    "IOTLB",
    "LOG",
    "MEM_REGION",
    "MEM_TABLE_HEAD",
    "SHARED_MEM_REGION",
    "SHMEM_CONFIG",
    "SHMEM_MAP",
    "SINGLE_MEM_REGION",
    "SUCCESS",
    "U8_MAX",
    "U16_MAX",
    "U32_MAX",
    "U64",
    "U64_MAX",
    "VRING_ADDR",
    "VRING_AREA",
    "VRING_STATE",
    "FixedSize",
    "Header",
    "check_end",
    "check_uint",
    "decoded",
    "exact_size",
]

U8_MAX: Final = 0xFF
U16_MAX: Final = 0xFFFF
U32_MAX: Final = 0xFFFF_FFFF
U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF

#: 0 request u32 | 4 flags u32 | 8 size u32  (12 bytes)
HEADER: Final = struct.Struct("=III")
#: 0 value u64  (8 bytes)
U64: Final = struct.Struct("=Q")
#: 0 index u32 | 4 num u32  (8 bytes; ``struct vhost_vring_state``)
VRING_STATE: Final = struct.Struct("=II")
#: 0 index u32 | 4 flags u32 | 8 desc u64 | 16 used u64 | 24 avail u64 | 32 log u64  (40)
VRING_ADDR: Final = struct.Struct("=IIQQQQ")
#: 0 guest_phys_addr u64 | 8 memory_size u64 | 16 userspace_addr u64 | 24 mmap_offset u64 (32)
MEM_REGION: Final = struct.Struct("=QQQQ")
#: 0 nregions u32 | 4 padding u32  (8; the regions follow)
MEM_TABLE_HEAD: Final = struct.Struct("=II")
#: 0 padding u64 | 8 region (MEM_REGION)  (40; ``VhostUserMemRegMsg``)
SINGLE_MEM_REGION: Final = struct.Struct("=QQQQQ")
#: 0 mmap_size u64 | 8 mmap_offset u64  (16; ``VhostUserLog``)
LOG: Final = struct.Struct("=QQ")
#: 0 iova u64 | 8 size u64 | 16 uaddr u64 | 24 perm u8 | 25 type u8 | 26 pad[6]  (32)
#: ``struct vhost_iotlb_msg`` is not packed: 26 bytes of fields rounded up to its u64
#: alignment, and QEMU sends ``sizeof(msg.payload.iotlb)`` = 32.
IOTLB: Final = struct.Struct("=QQQBB6x")
#: 0 offset u32 | 4 size u32 | 8 flags u32  (12; ``size`` payload bytes follow)
CONFIG_HEAD: Final = struct.Struct("=III")
#: 0 mmap_size u64 | 8 mmap_offset u64 | 16 num_queues u16 | 18 queue_size u16 | 20 pad[4]
#: (24) ``VhostUserInflight`` is not packed either: QEMU sends ``sizeof`` = 24, not 20.
INFLIGHT: Final = struct.Struct("=QQHH4x")
#: 0 direction u32 | 4 phase u32  (8; ``VhostUserTransferDeviceState``)
DEVICE_STATE: Final = struct.Struct("=II")
#: 0 nregions u32 | 4 padding u32 | 8 memory_sizes u64[256]  (2056; ``VhostUserShMemConfig``)
SHMEM_CONFIG: Final = struct.Struct("=II256Q")
#: 0 success i8  (1; crosvm ``VhostUserSuccess``)
SUCCESS: Final = struct.Struct("=b")
#: 0 id u8 | 1 pad[7] | 8 length u64  (16; crosvm ``VhostSharedMemoryRegion``)
SHARED_MEM_REGION: Final = struct.Struct("=B7xQ")
#: 0 index|flags u64 | 8 size u64 | 16 offset u64  (24; ``VhostUserVringArea``)
VRING_AREA: Final = struct.Struct("=QQQ")
#: 0 shmid u8 | 1 pad[7] | 8 fd_offset u64 | 16 shm_offset u64 | 24 len u64 | 32 flags u64
#: (40; ``VhostUserMMap``)
SHMEM_MAP: Final = struct.Struct("=B7xQQQQ")

_P = ParamSpec("_P")
_T = TypeVar("_T")


def check_uint(name: str, value: int, maximum: int) -> None:
    """Raise :class:`LocalProtocolError` unless ``0 <= value <= maximum``.

    Args:
        name: The field name, for the message.
        value: The value to check.
        maximum: The largest value the field's wire type holds.
    """
    if not 0 <= value <= maximum:
        raise LocalProtocolError(f"{name}={value} does not fit in [0, {maximum:#x}]")


def check_end(name: str, start: int, length: int) -> None:
    """Raise :class:`LocalProtocolError` if ``start + length`` overflows a u64.

    crosvm and rust-vmm validate every (address, size) pair with ``checked_add``.
    """
    if start + length > U64_MAX:
        raise LocalProtocolError(f"{name} {start:#x} + {length:#x} overflows u64")


def exact_size(kind: str, data: bytes, size: int) -> None:
    """Raise :class:`RemoteProtocolError` unless ``len(data) == size``.

    Every body has an exact size ("exact body size per message", DESIGN.md §3): a
    frontend that sends more or fewer bytes has lost track of the framing.
    """
    if len(data) != size:
        raise RemoteProtocolError(f"{kind} body is {len(data)} bytes, expected {size}")


def decoded(factory: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Build a value from decoded wire fields.

    Constructors raise :class:`LocalProtocolError` for invalid values; when the values came
    off the wire the peer is at fault, so the error is re-raised as
    :class:`RemoteProtocolError` (h11's rule: one exception type inside, the direction
    decided at the boundary).
    """
    try:
        return factory(*args, **kwargs)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(str(exc)) from exc


class FixedSize:
    """Mixin for message bodies with one fixed wire size (``SIZE``)."""

    __slots__ = ()
    SIZE: ClassVar[int]

    @classmethod
    def size_ok(cls, size: int) -> bool:
        """Return whether ``size`` is the size of this body."""
        return size == cls.SIZE


@final
@dataclass(frozen=True, slots=True)
class Header:
    """The 12-byte message header: ``u32 request, u32 flags, u32 size``.

    Attributes:
        request: The request code (a front-end or back-end message id).
        flags: Bits 0-1 version, bit 2 REPLY, bit 3 NEED_REPLY.
        size: The size of the payload that follows.
    """

    request: int
    flags: int
    size: int

    def __post_init__(self) -> None:
        check_uint("request", self.request, U32_MAX)
        check_uint("flags", self.flags, U32_MAX)
        check_uint("size", self.size, U32_MAX)

    def encode(self) -> bytes:
        """Return the 12 header bytes."""
        return HEADER.pack(self.request, self.flags, self.size)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse exactly :data:`~trio_vhost.proto.constants.HEADER_SIZE` bytes.

        Raises:
            RemoteProtocolError: ``data`` is not exactly 12 bytes long.
        """
        exact_size("header", data, HEADER_SIZE)
        return cls(*HEADER.unpack(data))
