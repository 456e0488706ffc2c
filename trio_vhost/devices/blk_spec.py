"""virtio-blk wire definitions: feature bits, request types, status codes, config space.

Pure data and codecs from the VIRTIO 1.4 block device chapter; no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Final

__all__ = [
    "CONFIG_SIZE",
    "DISCARD_SEGMENT",
    "REQUEST_HEADER",
    "SECTOR_SIZE",
    "BlkConfig",
    "BlkFeature",
    "RequestType",
    "Status",
]

#: The unit of ``sector`` and ``capacity``, whatever the logical block size.
SECTOR_SIZE: Final = 512
#: ``struct virtio_blk_req`` up to ``data``: le32 type, le32 reserved, le64 sector.
REQUEST_HEADER: Final = struct.Struct("<IIQ")
#: ``struct virtio_blk_discard_write_zeroes``: le64 sector, le32 num_sectors, le32 flags.
DISCARD_SEGMENT: Final = struct.Struct("<QII")
#: Length of the device ID string returned by GET_ID.
ID_BYTES: Final = 20


class BlkFeature(IntFlag):
    """virtio-blk feature bits."""

    SIZE_MAX = 1 << 1
    SEG_MAX = 1 << 2
    GEOMETRY = 1 << 4
    RO = 1 << 5
    BLK_SIZE = 1 << 6
    FLUSH = 1 << 9
    TOPOLOGY = 1 << 10
    CONFIG_WCE = 1 << 11
    MQ = 1 << 12
    DISCARD = 1 << 13
    WRITE_ZEROES = 1 << 14


class RequestType(IntEnum):
    """``virtio_blk_req.type``."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class Status(IntEnum):
    """The status byte the device writes last."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


# struct virtio_blk_config up to write_zeroes_may_unmap (+3 unused bytes):
#   0 le64 capacity            8 le32 size_max          12 le32 seg_max
#  16 le16 cylinders          18 u8 heads              19 u8 sectors
#  20 le32 blk_size           24 u8 physical_block_exp 25 u8 alignment_offset
#  26 le16 min_io_size        28 le32 opt_io_size      32 u8 writeback
#  33 u8 unused0              34 le16 num_queues       36 le32 max_discard_sectors
#  40 le32 max_discard_seg    44 le32 discard_sector_alignment
#  48 le32 max_write_zeroes_sectors                    52 le32 max_write_zeroes_seg
#  56 u8 write_zeroes_may_unmap                        57 u8 unused1[3]
_CONFIG: Final = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
#: Bytes of config space this device exposes (what QEMU 7.2 reads).
CONFIG_SIZE: Final = _CONFIG.size
#: Offset of the ``writeback`` byte, the only field a driver may write.
WRITEBACK_OFFSET: Final = 32


@dataclass(frozen=True, slots=True)
class BlkConfig:
    """The values of the config space; :meth:`encode` lays them out."""

    capacity: int
    size_max: int
    seg_max: int
    blk_size: int
    num_queues: int
    writeback: bool
    max_discard_sectors: int
    max_discard_seg: int
    discard_sector_alignment: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    write_zeroes_may_unmap: bool
    physical_block_exp: int = 0
    min_io_size: int = 1
    opt_io_size: int = 0

    def encode(self) -> bytes:
        """Return the config space bytes, little-endian as the spec says."""
        return _CONFIG.pack(
            self.capacity,
            self.size_max,
            self.seg_max,
            0,  # geometry is not offered: cylinders, heads, sectors stay 0
            0,
            0,
            self.blk_size,
            self.physical_block_exp,
            0,  # alignment_offset
            self.min_io_size,
            self.opt_io_size,
            int(self.writeback),
            0,
            self.num_queues,
            self.max_discard_sectors,
            self.max_discard_seg,
            self.discard_sector_alignment,
            self.max_write_zeroes_sectors,
            self.max_write_zeroes_seg,
            int(self.write_zeroes_may_unmap),
        )
