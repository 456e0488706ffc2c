"""The virtio-net data path on whole batches: TX chains to :class:`Frames`, frames to RX chains.

What DPDK 22.11's virtio_user posts (``mrg_rxbuf=1``, seen with a debug log under
``bench/bench_peers.py``): on TX one device-readable descriptor per frame, the 12-byte
virtio-net header and the frame together (the header pushed into the mbuf's headroom); on RX
one device-writable descriptor per buffer, 2060 bytes (a header plus a 2048-byte mbuf).
Linux with MRG_RXBUF posts one descriptor per RX buffer too, and a linear frame on TX.
Those are the *simple* chains of a :class:`~trio_vhost.vring.batch.ChainBatch`, and they
take the fast path here:

* :func:`stage_tx` copies the frames of a whole TX batch out of guest memory with ONE
  ``b"".join`` of memoryview slices (the guest's bytes are read once; the switch and every
  port see only this copy), each frame after a ready-made RX header (``RX_PREFIX``), and
  describes them with start and length arrays;
* :func:`fill_rx` copies header and frame into each RX buffer with one ``readinto`` of a
  stream over that copy (a memcpy), and returns the used lengths as one array.

Per frame that is two memcpys and the memoryview slices that make them, nothing else. A
slice copy measured cheaper than a numpy gather/scatter of the bytes even for 64-byte
frames: the index arrays of a gather cost as much as the copies they replace, and far more
for large frames.

Any other chain (several descriptors, indirect, a TX buffer the guest marked writable, an RX
buffer it marked readable) goes through :class:`~trio_vhost.vring.chain.ChainReader` /
:class:`~trio_vhost.vring.chain.ChainWriter` one at a time, in its place in the batch, with
exactly the outcome of the per-chain path; so does a batch of frames that did not come
staged from a virtio TX ring (a TAP, another header size): header and frame are then two
slice copies.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Final

import numpy as np

from ..vring.chain import ChainReader, ChainWriter
from .net_frames import RX_PREFIX, Frames
from .net_spec import ETH_HEADER_LEN, MAX_MTU

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from ..vring.batch import ChainBatch
    from .net_backlog import Piece

__all__ = ["MAX_FRAME", "fill_rx", "stage_tx"]

#: The longest frame taken from a TX ring: the largest MTU virtio-net can announce, plus an
#: Ethernet header and a VLAN tag. A longer one is dropped unread: no legitimate driver
#: sends it (no GSO is offered), and a batch of them would make the staging copy huge (a
#: descriptor may cover the whole of guest memory).
MAX_FRAME: Final = MAX_MTU + ETH_HEADER_LEN + 4


def stage_tx(batch: ChainBatch, header_len: int) -> tuple[Frames, int]:
    """Copy the frames of a TX batch out of guest memory, headers stripped, in batch order.

    A chain shorter than the header gives an empty frame (the switch counts it as a runt),
    as does a chain with nothing device-readable. A frame longer than :data:`MAX_FRAME`
    is left out, unread.

    Returns:
        The frames, and how many were left out for being longer than :data:`MAX_FRAME`.
    """
    count = batch.count
    regions = batch.table.regions
    if not count:
        return Frames.empty(), 0
    if not batch.all_simple or np.count_nonzero(batch.writable):
        return _stage_mixed(batch, header_len)
    offsets = batch.offset.tolist()
    lengths = batch.length.tolist()
    shortest = min(lengths) - header_len
    if shortest < 0 or max(lengths) - header_len > MAX_FRAME:
        return _stage_mixed(batch, header_len)
    # The usual batch: one readable buffer per frame, its header first. The frames are
    # joined with the RX header before each (see net_frames), in one pass.
    parts: list[bytes | memoryview] = [RX_PREFIX] * (2 * count)
    if len(regions) == 1:
        memory = regions[0].view.data
        parts[1::2] = [
            memory[o + header_len : o + n] for o, n in zip(offsets, lengths, strict=True)
        ]
    else:
        views = [region.view.data for region in regions]
        where = batch.region.tolist()
        parts[1::2] = [
            views[r][o + header_len : o + n]
            for r, o, n in zip(where, offsets, lengths, strict=True)
        ]
    spans = batch.length.astype(np.intp)  # header + frame: with a 12-byte header, the
    sizes = spans - header_len  # span of a frame and its RX_PREFIX in the batch too
    steps = spans if header_len == len(RX_PREFIX) else sizes + len(RX_PREFIX)
    return Frames.prefixed_by_header(b"".join(parts), sizes, shortest, steps), 0


def _stage_mixed(batch: ChainBatch, header_len: int) -> tuple[Frames, int]:
    """:func:`stage_tx` for an unusual batch: each chain on its own, complex ones walked."""
    table = batch.table
    views = [region.view.data for region in table.regions]
    parts: list[bytes | memoryview] = []
    simple = batch.simple.tolist()
    readable = (~batch.writable).tolist()
    offsets = batch.offset.tolist()
    lengths = batch.length.tolist()
    regions = batch.region.tolist()
    oversize = 0
    for pos in range(batch.count):
        if not simple[pos]:
            chain = batch.chain(pos)
            if chain.readable_len - header_len > MAX_FRAME:
                oversize += 1  # not even handed to the switch
            else:
                parts.append(ChainReader(table, chain).read()[header_len:])
        elif readable[pos] and lengths[pos] - header_len > MAX_FRAME:
            oversize += 1
        elif readable[pos] and lengths[pos] > header_len:
            begin = offsets[pos] + header_len
            parts.append(views[regions[pos]][begin : offsets[pos] + lengths[pos]])
        else:
            parts.append(b"")
    sizes = np.fromiter(map(len, parts), dtype=np.intp, count=len(parts))
    return Frames.concatenated(b"".join(parts), sizes), oversize


def fill_rx(
    batch: ChainBatch, pieces: list[Piece], header: bytes
) -> tuple[NDArray[np.uint32], int]:
    """Put one frame, after ``header``, in each RX chain of ``batch``, in order.

    ``pieces`` hold at most ``batch.count`` frames; chains beyond them get nothing (used
    length 0). One buffer per frame (``num_buffers`` = 1 even with MRG_RXBUF): a frame that
    does not fit its chain's writable bytes is dropped and its chain returned empty.

    Returns:
        The used length of every chain, and how many frames were dropped for too small a
        buffer.
    """
    count = batch.count
    if not pieces:
        return np.zeros(count, dtype=np.uint32), 0
    if len(pieces) == 1:
        frames, lo, hi = pieces[0]
        sizes = frames.length[lo:hi]
    else:
        sizes = np.concatenate([frames.length[lo:hi] for frames, lo, hi in pieces])
    taken = len(sizes)
    needed = sizes + len(header)
    if batch.all_simple:
        room = np.where(batch.writable[:taken], batch.length[:taken], 0)
        fits = needed <= room
        complex_positions: list[int] = []
    else:
        simple = batch.simple[:taken]
        room = np.where(simple & batch.writable[:taken], batch.length[:taken], 0)
        fits = simple & (needed <= room)
        complex_positions = np.flatnonzero(~simple).tolist()
    fitting = int(np.count_nonzero(fits))
    if fitting == count:  # the usual batch: every chain takes a frame
        if header == RX_PREFIX and all(f.dense and f.prefixed for f, _, _ in pieces):
            _copy_runs(batch, needed, pieces)
        else:
            _copy_frames(batch, pieces, None, header)
        return needed.astype(np.uint32), 0
    used = np.zeros(count, dtype=np.uint32)
    if fitting:
        _copy_frames(batch, pieces, fits.tolist(), header)
        used[:taken][fits] = needed[fits]
    dropped = taken - fitting - len(complex_positions)
    if complex_positions:
        dropped += _fill_complex(batch, pieces, complex_positions, header, used)
    return used, dropped


def _copy_runs(batch: ChainBatch, needed: NDArray[np.intp], pieces: list[Piece]) -> None:
    """Fill every chain of ``batch`` from pieces of dense, prefixed batches.

    Chain ``i`` takes ``needed[i]`` bytes: header and frame, one range of its batch's
    ``data``, and within a piece the ranges follow each other. A stream read with
    ``readinto`` straight into each guest buffer is the cheapest copy Python has: half the
    cost of a slice assignment, which also has to slice the source.
    """
    regions = batch.table.regions
    begin = batch.offset.astype(np.intp)
    ends = (begin + needed).tolist()
    starts = begin.tolist()
    views = [region.view.data for region in regions]
    where = None if len(views) == 1 else batch.region.tolist()
    pos = 0
    for frames, lo, hi in pieces:
        stream = io.BytesIO(frames.data)  # shares the bytes: no copy
        stream.seek(int(frames.start[lo]) - len(RX_PREFIX))
        readinto = stream.readinto
        stop = pos + hi - lo
        if where is None:
            memory = views[0]
            for at, end in zip(starts[pos:stop], ends[pos:stop], strict=True):
                readinto(memory[at:end])
        else:
            for r, at, end in zip(where[pos:stop], starts[pos:stop], ends[pos:stop], strict=True):
                readinto(views[r][at:end])
        pos = stop


def _copy_frames(
    batch: ChainBatch, pieces: list[Piece], fits: list[bool] | None, header: bytes
) -> None:
    """Copy header and frame into each chain's buffer (``fits``: which chains; None: all).

    Two slice copies per frame: the general case (frames from a subset of a batch or from a
    single-frame delivery, another header size, some chains not taking a frame).
    """
    regions = batch.table.regions
    views = [region.view.data for region in regions]
    dest = batch.offset.tolist()
    where = [0] * len(dest) if len(views) == 1 else batch.region.tolist()
    h = len(header)
    pos = 0
    for frames, lo, hi in pieces:
        source = memoryview(frames.data)
        starts = frames.start[lo:hi].tolist()
        sizes = frames.length[lo:hi].tolist()
        for i, begin, size in zip(range(pos, pos + hi - lo), starts, sizes, strict=True):
            if fits is None or fits[i]:
                at = dest[i]
                memory = views[where[i]]
                memory[at : at + h] = header
                memory[at + h : at + h + size] = source[begin : begin + size]
        pos += hi - lo


def _fill_complex(
    batch: ChainBatch,
    pieces: list[Piece],
    positions: list[int],
    header: bytes,
    used: NDArray[np.uint32],
) -> int:
    """Fill the chains at ``positions`` one by one (ChainWriter); return the drops."""
    frames_at: dict[int, bytes] = {}
    pos = 0
    wanted = set(positions)
    for frames, lo, hi in pieces:
        for index in range(lo, hi):
            if pos in wanted:
                frames_at[pos] = frames.frame(index)
            pos += 1
    dropped = 0
    for pos in positions:
        frame = frames_at[pos]
        chain = batch.chain(pos)
        needed = len(header) + len(frame)
        if chain.writable_len < needed:
            dropped += 1
            continue
        writer = ChainWriter(batch.table, chain)
        writer.write(header)
        writer.write(frame)
        used[pos] = needed
    return dropped
