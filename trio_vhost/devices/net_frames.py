"""Frames: a batch of Ethernet frames in one immutable buffer, the unit the switch moves.

A virtio-net TX worker copies a whole batch of frames out of guest memory into ONE ``bytes``
object (a single ``b"".join`` of memoryview slices: the only copy on the TX side) and
describes it with two arrays, the start and the length of every frame. That object then goes
through the switch and into the RX backlogs of the destination ports without being copied or
split again: a port takes a subset (two fancy indexes), never a frame at a time. The RX
worker of the destination finally copies each frame into a guest buffer.

``bytes`` because it is immutable: one batch can sit in several backlogs at once (a flood)
and no holder can change what another delivers. A frame carries no virtio-net header; but a
batch staged from a virtio TX ring has room for one: :data:`RX_PREFIX`, the 12-byte header
of a received frame, sits right before every frame (``Frames.prefixed``), so the RX side
copies header and frame into a guest buffer with one slice copy instead of two.

The switch works on MAC addresses as 48-bit integers (:func:`mac_key`): the six address
bytes read little-endian, so the group (multicast) bit, the lowest bit of the first byte,
is bit 0 of the key. The usual batch is one flow: :meth:`Frames.common_addresses` finds that
out with one gather (a strided view when the frames are all one size) and one bytes
comparison, and the switch then needs no per-frame array at all; :meth:`Frames.macs` gives
the keys of every frame for a batch of several flows.
"""

from __future__ import annotations

from typing import Final, final

import numpy as np
from numpy.typing import NDArray

from .net_spec import ETH_ADDR_LEN, ETH_HEADER_LEN

__all__ = ["MAC_MASK", "RX_PREFIX", "Frames", "mac_key"]

#: The ``virtio_net_hdr`` of a received frame in its 12-byte form (VERSION_1 or MRG_RXBUF):
#: no offloads, ``num_buffers`` = 1. Staged TX batches carry it before every frame.
RX_PREFIX: Final = bytes(10) + b"\x01\x00"

#: The low 48 bits: a MAC address key.
MAC_MASK: Final = (1 << 48) - 1
_MASK48: Final = np.array(MAC_MASK, dtype=np.uint64)
# Byte offsets gathered per frame: 8 bytes at the destination, 8 at the source. Each word
# takes two bytes too many (masked off); a frame of ETH_HEADER_LEN bytes holds all 14.
_MAC_BYTES: Final = np.concatenate(
    (np.arange(8), np.arange(ETH_ADDR_LEN, ETH_ADDR_LEN + 8))
).astype(np.intp)
assert int(_MAC_BYTES.max()) < ETH_HEADER_LEN
_ADDRESS_BYTES: Final = np.arange(2 * ETH_ADDR_LEN, dtype=np.intp)
_NO_INTP: Final = np.zeros(0, dtype=np.intp)


def mac_key(mac: bytes | bytearray | memoryview) -> int:
    """Return the switch's integer key of a 6-byte MAC address (little-endian)."""
    return int.from_bytes(mac[:ETH_ADDR_LEN], "little")


@final
class Frames:
    """Frames in one immutable buffer: frame ``i`` is ``data[start[i] : start[i] + length[i]]``.

    A value: nothing may change after construction (the arrays are not copied: whoever
    builds one hands them over), so it may be shared by any number of backlogs.

    Attributes:
        data: the buffer.
        start: ``intp[count]``, where each frame starts in ``data``.
        length: ``intp[count]``, each frame's length (>= 0).
        count: the number of frames.
        total: the sum of the lengths.
        prefixed: True when :data:`RX_PREFIX` precedes every frame in ``data``.
        dense: True when the frames (with their prefixes, if ``prefixed``) lie back to back
            in ``data`` in batch order, so that any run of them is one contiguous range.
        origin: the queue pair the frames were transmitted on, or -1: a hint for
            multiqueue receivers (see ``MultiQueuePort``). The only attribute a producer may
            set after construction, before it hands the batch on.
    """

    __slots__ = (
        "_common",
        "_macs",
        "_shortest",
        "count",
        "data",
        "dense",
        "length",
        "origin",
        "prefixed",
        "start",
        "total",
    )

    def __init__(
        self,
        data: bytes,
        start: NDArray[np.intp],
        length: NDArray[np.intp],
        total: int | None = None,
        *,
        prefixed: bool = False,
        dense: bool = False,
        shortest: int | None = None,
    ) -> None:
        """Wrap ``data`` and the frame bounds (which must lie inside it).

        ``total`` and ``shortest`` (the smallest length) may be given when known.
        """
        self.data: Final = data
        self.start: Final = start
        self.length: Final = length
        self.count: Final = len(length)
        self.total: Final = int(length.sum()) if total is None else total
        self.prefixed: Final = prefixed
        self.dense: Final = dense
        self._shortest = shortest
        self.origin = -1
        self._macs: tuple[NDArray[np.uint64], NDArray[np.uint64]] | None = None
        #: (destination, source) keys shared by every frame; () not known yet; None: mixed
        self._common: tuple[int, int] | tuple[()] | None = ()

    @classmethod
    def of_bytes(cls, frame: bytes) -> Frames:
        """Return a batch of the one frame ``frame`` (no copy)."""
        size = len(frame)
        start, length = np.zeros(1, dtype=np.intp), np.full(1, size, dtype=np.intp)
        return cls(frame, start, length, size, dense=True, shortest=size)

    @classmethod
    def concatenated(cls, data: bytes, length: NDArray[np.intp]) -> Frames:
        """Return the batch of frames laid end to end in ``data``, of lengths ``length``."""
        start = np.cumsum(length) - length
        return cls(data, start, length, len(data), dense=True)

    @classmethod
    def prefixed_by_header(
        cls,
        data: bytes,
        length: NDArray[np.intp],
        shortest: int | None = None,
        step: NDArray[np.intp] | None = None,
    ) -> Frames:
        """Return the batch laid out in ``data`` as ``RX_PREFIX, frame, RX_PREFIX, ...``.

        ``step`` is ``length + len(RX_PREFIX)``, if the caller has it at hand.
        """
        if step is None:
            step = length + len(RX_PREFIX)
        start = np.cumsum(step) - length
        total = len(data) - len(RX_PREFIX) * len(length)
        return cls(data, start, length, total, prefixed=True, dense=True, shortest=shortest)

    @classmethod
    def empty(cls) -> Frames:
        """Return a batch of no frames."""
        return cls(b"", _NO_INTP, _NO_INTP, 0, dense=True, shortest=0)

    def __len__(self) -> int:
        return self.count

    @property
    def shortest(self) -> int:
        """The length of the shortest frame (0 for no frames)."""
        if self._shortest is None:
            self._shortest = int(self.length.min()) if self.count else 0
        return self._shortest

    def frame(self, index: int) -> bytes:
        """Return frame ``index`` as ``bytes`` (a copy, for per-frame consumers)."""
        begin = int(self.start[index])
        return self.data[begin : begin + int(self.length[index])]

    def _derived(self, start: NDArray[np.intp], length: NDArray[np.intp], dense: bool) -> Frames:
        out = Frames(self.data, start, length, prefixed=self.prefixed, dense=dense)
        out.origin = self.origin
        if self._common:  # a part of a batch of one flow is of that flow
            out._common = self._common
        return out

    def subset(self, picked: NDArray[np.bool_] | NDArray[np.intp]) -> Frames:
        """Return the frames at ``picked`` (a mask, or positions in increasing order)."""
        out = self._derived(self.start[picked], self.length[picked], dense=False)
        if self._macs is not None:
            out._macs = (self._macs[0][picked], self._macs[1][picked])
        return out

    def head(self, count: int) -> Frames:
        """Return the first ``count`` frames (views of the arrays: no copy)."""
        if count >= self.count:
            return self
        out = self._derived(self.start[:count], self.length[:count], dense=self.dense)
        if self._macs is not None:
            out._macs = (self._macs[0][:count], self._macs[1][:count])
        return out

    def compacted(self) -> Frames:
        """Return the frames in a buffer of their own (prefixed), dropping the rest of ``data``.

        For a holder that keeps a few frames of a large batch for long (an RX backlog):
        otherwise they would keep the whole batch alive.
        """
        view = memoryview(self.data)
        parts: list[bytes | memoryview] = [RX_PREFIX] * (2 * self.count)
        parts[1::2] = [
            view[b : b + n] for b, n in zip(self.start.tolist(), self.length.tolist(), strict=True)
        ]
        out = Frames.prefixed_by_header(b"".join(parts), self.length, self._shortest)
        out.origin = self.origin
        out._common = self._common
        out._macs = self._macs
        return out

    def common_addresses(self) -> tuple[int, int] | None:
        """Return the (destination, source) MAC keys if every frame has the same; else None.

        The usual batch is one flow: then the switch needs no per-frame array at all. One
        gather of the 12 address bytes of every frame and one comparison. Every frame must
        be at least an Ethernet header long (:attr:`shortest`).
        """
        if self._common == ():
            if not self.count:
                self._common = None
            else:
                rows = self._address_rows()
                both = rows[0].tobytes()
                # one bytes comparison: cheaper than numpy's elementwise == and all()
                if rows.tobytes() == both * self.count:
                    self._common = (mac_key(both), mac_key(both[ETH_ADDR_LEN:]))
                else:
                    self._common = None
        return self._common or None

    def _address_rows(self) -> NDArray[np.uint8]:
        """``uint8[count, 12]``: the destination and source address of every frame."""
        raw = np.frombuffer(self.data, dtype=np.uint8)
        count, first = self.count, int(self.start[0])
        if self.dense and self.shortest * count == self.total:
            # frames of one size, back to back: a strided view, no index to build
            prefix = len(RX_PREFIX) if self.prefixed else 0
            stride = self.shortest + prefix
            begin = first - prefix
            block = raw[begin : begin + stride * count].reshape(count, stride)
            rows: NDArray[np.uint8] = block[:, prefix : prefix + 2 * ETH_ADDR_LEN]
            return rows
        gathered: NDArray[np.uint8] = raw[self.start[:, None] + _ADDRESS_BYTES]
        return gathered

    def macs(self) -> tuple[NDArray[np.uint64], NDArray[np.uint64]]:
        """Return the destination and source MAC keys of every frame (see :func:`mac_key`).

        Every frame must be at least an Ethernet header long (:attr:`shortest`). Computed
        once per batch, with one gather of 16 bytes a frame.
        """
        if self._macs is None:
            if not self.count:
                empty = np.zeros(0, dtype=np.uint64)
                self._macs = (empty, empty)
            else:
                raw = np.frombuffer(self.data, dtype=np.uint8)
                words = raw[self.start[:, None] + _MAC_BYTES].view("<u8") & _MASK48
                self._macs = (words[:, 0], words[:, 1])
        return self._macs

    def __repr__(self) -> str:
        return f"<Frames count={self.count} bytes={self.total}>"
