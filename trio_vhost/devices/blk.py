"""BlkDevice: a virtio-blk device backed by a raw image file.

Reads go straight from the image into the guest's buffers and writes straight from them
(``preadv``/``pwritev`` on views of guest memory: no intermediate copy). Every request
gets a status byte: UNSUPP for an unknown type, IOERR for a sector range past the end, a
buffer layout the spec does not allow, or a write to a read-only image.

Two routes to the same results: the worker hands whole batches to :meth:`BlkDevice.process_arrays`,
which does plain reads and writes with numpy and one system call each (:mod:`.blk_fast`)
and passes every other request to the per-chain code here (:meth:`BlkDevice.process_batch`,
which the threaded variant uses for everything).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import struct
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, ClassVar, Final

import numpy as np

from ..device import Completion, Device, QueueContext
from ..errors import DeviceError, UnsupportedRequest
from ..proto.constants import ProtocolFeature
from .blk_fast import IOV_MAX, process_batch_arrays
from .blk_spec import (
    CONFIG_SIZE,
    DISCARD_SEGMENT,
    ID_BYTES,
    REQUEST_HEADER,
    SECTOR_SIZE,
    WRITEBACK_OFFSET,
    BlkConfig,
    BlkFeature,
    RequestType,
    Status,
)

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from ..mem.table import MemoryTable
    from ..vring.batch import ChainBatch
    from ..vring.chain import DescriptorChain

__all__ = ["BlkDevice"]

LOGGER = logging.getLogger(__name__)

#: Segments per request we announce in ``seg_max`` (the queue size bounds it anyway).
SEG_MAX: Final = 254
#: Largest discard / write-zeroes range per segment, in sectors (announce, then enforce).
MAX_DISCARD_SECTORS: Final = 1 << 22
MAX_DISCARD_SEG: Final = 16

#: save_state(), version 1: u8 version, u8 flags (bit 0 writeback, bit 1 read-only),
#: u16 queues, u64 capacity in sectors, 20-byte serial; little-endian. Everything but
#: the write-cache mode is checked against the loading device, which must match.
_STATE: Final = struct.Struct("<BBHQ20s")
_STATE_VERSION: Final = 1
_STATE_WRITEBACK: Final = 0x01
_STATE_READ_ONLY: Final = 0x02

_FALLOC_FL_KEEP_SIZE: Final = 0x01
_FALLOC_FL_PUNCH_HOLE: Final = 0x02


class BlkDevice(Device):
    """virtio-blk over a raw image file.

    Args:
        image_fd: an open file descriptor of the image; the device does not close it.
        read_only: refuse writes (and offer VIRTIO_BLK_F_RO).
        num_queues: request queues offered (MQ).
        serial: the device ID string returned by GET_ID (at most 20 bytes).
    """

    device_features: ClassVar[int] = int(
        BlkFeature.SIZE_MAX
        | BlkFeature.SEG_MAX
        | BlkFeature.BLK_SIZE
        | BlkFeature.FLUSH
        | BlkFeature.TOPOLOGY
        | BlkFeature.CONFIG_WCE
        | BlkFeature.MQ
        | BlkFeature.DISCARD
        | BlkFeature.WRITE_ZEROES
    )
    device_protocol_features: ClassVar[ProtocolFeature] = (
        ProtocolFeature.CONFIG | ProtocolFeature.MQ
    )
    #: STATUS suits blk: SET_STATUS(0) stops the rings where they are and keeps the
    #: write-cache mode (QEMU sends it for a VM pause too, and does not send the mode
    #: again on resume); nothing here waits for DRIVER_OK.
    offers_status: ClassVar[bool] = True
    offers_inflight: ClassVar[bool] = True

    def __init__(
        self, image_fd: int, *, read_only: bool = False, num_queues: int = 1, serial: str = ""
    ) -> None:
        if num_queues < 1:
            raise ValueError("num_queues must be at least 1")
        encoded = serial.encode("ascii")
        if len(encoded) > ID_BYTES:
            raise ValueError(f"serial longer than {ID_BYTES} bytes")
        self.fd = image_fd
        self._capacity: int | None = None
        self.read_only = read_only
        self.num_queues = num_queues
        self.serial = encoded.ljust(ID_BYTES, b"\0")
        self.writeback = True
        self.requests = 0

    @property
    def capacity(self) -> int:
        """Image size in 512-byte sectors (a partial last sector is not exposed).

        Read once, and again by :meth:`resized`: an fstat per request costs more than the
        bounds check it feeds, and the guest learns of a new size only when told.
        """
        if self._capacity is None:
            self._capacity = os.fstat(self.fd).st_size // SECTOR_SIZE
        return self._capacity

    async def resized(self) -> bool:
        """Read the image size again and, if the capacity changed, tell the frontend
        (CONFIG_CHANGE_MSG; QEMU then reads the config space and interrupts the guest); a
        checkpoint. Call it from a task of your own after growing or shrinking the image
        (``trio-vhost blk`` does on SIGHUP).

        Returns whether a connected frontend was told of a new capacity (False: the size
        did not change, no frontend is connected, or it cannot be told; it then learns the
        size at its next GET_CONFIG, QEMU at the next boot).
        """
        old = self._capacity
        self._capacity = None
        new = self.capacity
        if new == old:
            return False
        LOGGER.info("image is now %d sectors (was %s)", new, old)
        link = self.frontend
        return link is not None and await link.config_changed()

    # -- negotiation and config ----------------------------------------------------------

    def offered_features(self) -> int:
        features = super().offered_features()
        return features | int(BlkFeature.RO) if self.read_only else features

    def config(self) -> BlkConfig:
        """Return the current config space values."""
        return BlkConfig(
            capacity=self.capacity,
            size_max=1 << 20,
            seg_max=SEG_MAX,
            blk_size=SECTOR_SIZE,
            num_queues=self.num_queues,
            writeback=self.writeback,
            max_discard_sectors=MAX_DISCARD_SECTORS,
            max_discard_seg=MAX_DISCARD_SEG,
            discard_sector_alignment=1,
            max_write_zeroes_sectors=MAX_DISCARD_SECTORS,
            max_write_zeroes_seg=MAX_DISCARD_SEG,
            write_zeroes_may_unmap=True,
        )

    def read_config(self, offset: int, size: int) -> bytes:
        space = self.config().encode()
        if offset + size > CONFIG_SIZE:
            # QEMU asks for exactly the fields it knows; beyond them the space reads as 0.
            space = space.ljust(offset + size, b"\0")
        return space[offset : offset + size]

    def write_config(self, offset: int, data: bytes, flags: int) -> None:
        if offset != WRITEBACK_OFFSET or len(data) != 1:
            raise UnsupportedRequest("only the writeback byte of blk config is writable")
        self.writeback = bool(data[0])

    def reset(self) -> None:
        self.writeback = True

    # -- device state ----------------------------------------------------------------------

    def save_state(self) -> bytes:
        flags = (_STATE_WRITEBACK if self.writeback else 0) | (
            _STATE_READ_ONLY if self.read_only else 0
        )
        return _STATE.pack(_STATE_VERSION, flags, self.num_queues, self.capacity, self.serial)

    def load_state(self, data: bytes) -> None:
        if len(data) != _STATE.size:
            raise DeviceError(f"blk state of {len(data)} bytes, expected {_STATE.size}")
        version, flags, queues, capacity, serial = _STATE.unpack(data)
        if version != _STATE_VERSION:
            raise DeviceError(f"blk state version {version}, expected {_STATE_VERSION}")
        if flags & ~(_STATE_WRITEBACK | _STATE_READ_ONLY):
            raise DeviceError(f"blk state flags {flags:#x} has unknown bits")
        mine = (self.read_only, self.num_queues, self.capacity, self.serial)
        theirs = (bool(flags & _STATE_READ_ONLY), queues, capacity, serial)
        if mine != theirs:
            raise DeviceError(
                f"blk device (read_only, queues, sectors, serial) {mine} does not match "
                f"the saved {theirs}"
            )
        self.writeback = bool(flags & _STATE_WRITEBACK)

    # -- data path -------------------------------------------------------------------------

    #: The worker hands whole batches as arrays to :meth:`process_arrays` (blk_fast.py).
    uses_arrays: ClassVar[bool] = True

    def process_arrays(self, queue: QueueContext, batch: ChainBatch) -> NDArray[np.uint32]:
        """Process a batch: plain reads and writes vectorised (:mod:`.blk_fast`), every
        other request through the per-chain code, all in ring order."""
        memory = queue.memory
        request, chain = self._request, batch.chain
        written = process_batch_arrays(self, memory, batch, lambda pos: request(memory, chain(pos)))
        self.requests += batch.count
        return written

    def process_batch(
        self, queue: QueueContext, chains: Sequence[DescriptorChain]
    ) -> Sequence[Completion]:
        memory = queue.memory
        done = [(chain.head, self._request(memory, chain)) for chain in chains]
        self.requests += len(done)
        return done

    def _request(self, memory: MemoryTable, chain: DescriptorChain) -> int:
        """Carry out one request; return the used length reported to the driver.

        Like QEMU, the used length is the whole device-writable size: the status byte sits
        at its end, so a shorter length would not cover it.
        """
        if chain.writable_len < 1:
            # No room even for a status byte: nothing can be reported; complete it empty.
            LOGGER.debug("blk request %d without a status byte", chain.head)
            return 0
        data_len = chain.writable_len - 1
        status = self._execute(memory, chain, data_len)
        status_gpa, _ = _locate(chain.writable, data_len)
        memory.write(status_gpa, bytes((status,)))
        return chain.writable_len

    def _execute(self, memory: MemoryTable, chain: DescriptorChain, data_len: int) -> int:
        if chain.readable_len < REQUEST_HEADER.size:
            return Status.IOERR
        header = _gather(memory, chain.readable, 0, REQUEST_HEADER.size)
        rtype, _reserved, sector = REQUEST_HEADER.unpack(header)
        try:
            handler = _DISPATCH[RequestType(rtype)]
        except (ValueError, KeyError):
            return Status.UNSUPP
        try:
            return handler(self, memory, chain, sector, data_len)
        except OSError as exc:
            LOGGER.error("blk %s at sector %d failed: %s", RequestType(rtype).name, sector, exc)
            return Status.IOERR

    def _in_range(self, sector: int, nbytes: int) -> bool:
        return nbytes % SECTOR_SIZE == 0 and sector * SECTOR_SIZE + nbytes <= (
            self.capacity * SECTOR_SIZE
        )

    def _read(self, memory: MemoryTable, chain: DescriptorChain, sector: int, data_len: int) -> int:
        if chain.readable_len != REQUEST_HEADER.size or not self._in_range(sector, data_len):
            return Status.IOERR
        offset = sector * SECTOR_SIZE
        for views in _batches(_views(memory, chain.writable, 0, data_len)):
            got = os.preadv(self.fd, [view.data for view in views], offset)
            want = sum(view.nbytes for view in views)
            if got != want:
                return Status.IOERR
            offset += got
        return Status.OK

    def _write(
        self, memory: MemoryTable, chain: DescriptorChain, sector: int, data_len: int
    ) -> int:
        payload = chain.readable_len - REQUEST_HEADER.size
        if self.read_only or data_len != 0 or not self._in_range(sector, payload):
            return Status.IOERR
        offset = sector * SECTOR_SIZE
        for views in _batches(_views(memory, chain.readable, REQUEST_HEADER.size, payload)):
            put = os.pwritev(self.fd, [view.data for view in views], offset)
            if put != sum(view.nbytes for view in views):
                return Status.IOERR
            offset += put
        if not self.writeback:
            os.fdatasync(self.fd)
        return Status.OK

    def _flush(
        self, memory: MemoryTable, chain: DescriptorChain, sector: int, data_len: int
    ) -> int:
        if not self.read_only:
            os.fdatasync(self.fd)
        return Status.OK

    def _get_id(
        self, memory: MemoryTable, chain: DescriptorChain, sector: int, data_len: int
    ) -> int:
        count = min(data_len, ID_BYTES)
        _scatter(memory, chain.writable, 0, self.serial[:count])
        return Status.OK

    def _discard(
        self, memory: MemoryTable, chain: DescriptorChain, sector: int, data_len: int
    ) -> int:
        return self._ranges(memory, chain, data_len, zeroes=False)

    def _write_zeroes(
        self, memory: MemoryTable, chain: DescriptorChain, sector: int, data_len: int
    ) -> int:
        return self._ranges(memory, chain, data_len, zeroes=True)

    def _ranges(
        self, memory: MemoryTable, chain: DescriptorChain, data_len: int, *, zeroes: bool
    ) -> int:
        payload = chain.readable_len - REQUEST_HEADER.size
        count, rest = divmod(payload, DISCARD_SEGMENT.size)
        if self.read_only or data_len != 0 or rest or not 0 < count <= MAX_DISCARD_SEG:
            return Status.IOERR
        raw = _gather(memory, chain.readable, REQUEST_HEADER.size, payload)
        for sector, num_sectors, flags in DISCARD_SEGMENT.iter_unpack(raw):
            nbytes = num_sectors * SECTOR_SIZE
            if (
                flags & ~1
                or num_sectors > MAX_DISCARD_SECTORS
                or not self._in_range(sector, nbytes)
            ):
                return Status.IOERR
            if zeroes and not flags & 1:
                _write_zeroes(self.fd, sector * SECTOR_SIZE, nbytes)
            else:
                # Punching a hole both discards and reads back as zeroes.
                _punch_hole(self.fd, sector * SECTOR_SIZE, nbytes)
        return Status.OK


_DISPATCH: Final = {
    RequestType.IN: BlkDevice._read,
    RequestType.OUT: BlkDevice._write,
    RequestType.FLUSH: BlkDevice._flush,
    RequestType.GET_ID: BlkDevice._get_id,
    RequestType.DISCARD: BlkDevice._discard,
    RequestType.WRITE_ZEROES: BlkDevice._write_zeroes,
}


def _locate(segments: Sequence[tuple[int, int]], position: int) -> tuple[int, int]:
    """Return (gpa, bytes left in that segment) of byte ``position`` of a segment list."""
    for gpa, length in segments:
        if position < length:
            return gpa + position, length - position
        position -= length
    raise IndexError(position)


def _views(
    memory: MemoryTable, segments: Sequence[tuple[int, int]], start: int, length: int
) -> Iterator[NDArray[np.uint8]]:
    """Yield views of ``length`` bytes from ``start`` of a chain's segment list."""
    for gpa, seg_len in segments:
        if length <= 0:
            return
        if start >= seg_len:
            start -= seg_len
            continue
        take = min(seg_len - start, length)
        yield from memory.segments(gpa + start, take)
        length -= take
        start = 0


def _batches(views: Iterator[NDArray[np.uint8]]) -> Iterator[list[NDArray[np.uint8]]]:
    batch: list[NDArray[np.uint8]] = []
    for view in views:
        batch.append(view)
        if len(batch) == IOV_MAX:
            yield batch
            batch = []
    if batch:
        yield batch


def _gather(
    memory: MemoryTable, segments: Sequence[tuple[int, int]], start: int, length: int
) -> bytes:
    return b"".join(view.tobytes() for view in _views(memory, segments, start, length))


def _scatter(
    memory: MemoryTable, segments: Sequence[tuple[int, int]], start: int, data: bytes
) -> None:
    pos = 0
    for view in _views(memory, segments, start, len(data)):
        view[:] = np.frombuffer(data, np.uint8, view.nbytes, pos)
        pos += view.nbytes


_ZEROES: Final = bytes(1 << 20)


def _write_zeroes(fd: int, offset: int, nbytes: int) -> None:
    while nbytes:
        put = os.pwrite(fd, _ZEROES[: min(nbytes, len(_ZEROES))], offset)
        offset += put
        nbytes -= put


def _load_fallocate() -> ctypes._NamedFuncPointer | None:
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    func = ctypes.CDLL(libc_name, use_errno=True).fallocate
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func


_FALLOCATE: Final = _load_fallocate()


def _punch_hole(fd: int, offset: int, nbytes: int) -> None:
    """Deallocate a range (reads back as zeroes); write zeroes where holes are refused."""
    if _FALLOCATE is not None:
        flags = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _FALLOCATE(fd, flags, offset, nbytes) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))
    _write_zeroes(fd, offset, nbytes)
