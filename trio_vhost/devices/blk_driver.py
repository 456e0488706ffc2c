"""BlkDriver: the guest's side of virtio-blk over a :class:`DriverVring`.

Builds requests the way a virtio-blk driver does (header, data, status byte), submits them
and decodes the completions. Used by the selfcheck, the tests and the benchmarks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from .blk_spec import DISCARD_SEGMENT, ID_BYTES, REQUEST_HEADER, RequestType, Status

if TYPE_CHECKING:
    from ..frontend import DriverVring

__all__ = ["BlkDriver", "BlkRequestFailed"]

_STATUS_LEN: Final = 1


class BlkRequestFailed(Exception):
    """A request completed with a status other than OK."""

    def __init__(self, rtype: RequestType, status: int) -> None:
        super().__init__(f"{rtype.name} failed with status {status}")
        self.rtype = rtype
        self.status = status


class BlkDriver:
    """Issue virtio-blk requests on one vring and wait for each to complete."""

    def __init__(self, vring: DriverVring) -> None:
        self.vring = vring

    def submit(
        self, rtype: RequestType, sector: int = 0, data: bytes = b"", read_len: int = 0
    ) -> int:
        """Queue one request without waiting; return its head."""
        readable: list[bytes | int] = [REQUEST_HEADER.pack(rtype, 0, sector)]
        if data:
            readable.append(data)
        writable = [read_len, _STATUS_LEN] if read_len else [_STATUS_LEN]
        return self.vring.submit(readable, writable)

    def result(self, head: int, written: int) -> tuple[int, bytes]:
        """Decode a completion: (status, data read)."""
        payload = self.vring.queue.read_written(head)
        if written < 1 or len(payload) < 1:
            return Status.IOERR, b""
        # The device reports the whole writable size; the status byte is the last one.
        return payload[-1], payload[:-1]

    async def call(
        self, rtype: RequestType, sector: int = 0, data: bytes = b"", read_len: int = 0
    ) -> bytes:
        """Submit one request, wait for it and return what it read; a checkpoint.

        Raises:
            BlkRequestFailed: the status byte was not OK.
        """
        head = self.submit(rtype, sector, data, read_len)
        used = await self.vring.wait_used(1)
        assert used[0][0] == head, (used, head)
        status, payload = self.result(*used[0])
        if status != Status.OK:
            raise BlkRequestFailed(rtype, status)
        return payload

    async def read(self, sector: int, nbytes: int) -> bytes:
        """Read ``nbytes`` (a multiple of 512) from ``sector``; a checkpoint."""
        return await self.call(RequestType.IN, sector, read_len=nbytes)

    async def write(self, sector: int, data: bytes) -> None:
        """Write ``data`` (a multiple of 512 bytes) at ``sector``; a checkpoint."""
        await self.call(RequestType.OUT, sector, data)

    async def flush(self) -> None:
        """Flush the device's write cache; a checkpoint."""
        await self.call(RequestType.FLUSH)

    async def get_id(self) -> bytes:
        """Return the device ID string (NUL padding stripped); a checkpoint."""
        return (await self.call(RequestType.GET_ID, read_len=ID_BYTES)).rstrip(b"\0")

    async def discard(self, sector: int, count: int) -> None:
        """Discard ``count`` sectors from ``sector``; a checkpoint."""
        await self.call(RequestType.DISCARD, data=DISCARD_SEGMENT.pack(sector, count, 0))

    async def write_zeroes(self, sector: int, count: int, *, unmap: bool = False) -> None:
        """Zero ``count`` sectors from ``sector``; a checkpoint."""
        segment = DISCARD_SEGMENT.pack(sector, count, int(unmap))
        await self.call(RequestType.WRITE_ZEROES, data=segment)
