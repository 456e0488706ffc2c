"""Follow the NEXT links of a whole batch of chains at once: walk_chain, vectorised.

:func:`~trio_vhost.vring.chain.walk_chain` is the specification; this module is a faster
route to the same answer for the chains it can prove well-formed, and hands every other
chain back to be walked one by one. Per step it gathers the next descriptor of every chain
still going with one ``take`` on the descriptor table (a copy: each descriptor is read once,
then only the copy is checked and used), so a batch of three-descriptor chains (virtio-blk:
header, data, status) costs three gathers, not three Python reads per chain.

A chain whose head is one INDIRECT descriptor (how Linux posts every multi-buffer request
once VIRTIO_F_INDIRECT_DESC is negotiated) is followed the same way inside its own table:
each row is copied out of guest memory (16 bytes, one fancy index for all chains) when the
walk reaches it.

A chain is *followed* only if walk_chain would accept it and return exactly the buffers
found here:

* every ``next`` indexes its table, and the chain ends within ``MAX_FOLLOW`` descriptors
  and within its table's size (walk_chain's loop guard);
* INDIRECT only on the head, only with the feature negotiated, without NEXT, pointing at a
  table whose length is a non-zero multiple of 16 of at most 32768 entries inside ONE
  region; no INDIRECT anywhere else (walk_chain refuses one inside a table and allows a
  direct chain to end in one: both are walked);
* every buffer is non-empty and inside ONE region (a zero-length descriptor or a buffer
  spanning two adjacent regions is legal but rare: walked);
* no device-readable buffer follows a device-writable one;
* the buffers total at most 2^32 bytes.

Everything else is marked to be walked, and walk_chain then raises the error (or builds the
legal oddity) itself, with its own message, so the batch path cannot drift from the
per-chain one. Walked chains are walked in batch order, and followed chains cannot fail, so
the first error raised is the one a per-chain pop would have raised.

Descriptor rows travel as ``uint64[k, 2]`` (two little-endian words: ``addr``, then
``len | flags << 32 | next << 48``) rather than as DESC_DTYPE records, because numpy
gathers, concatenates and compares plain arrays several times faster; and every constant an
array meets is a 0-d array of the array's own dtype, which numpy combines ~4x faster than a
Python int. The cost is a fixed ~20 us per batch, whatever its size: a few chains are
cheaper walked (:data:`FOLLOW_MIN`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import numpy as np

from ..errors import GuestMemoryError
from .batch import Segments
from .chain import MAX_CHAIN_BYTES
from .layout import (
    DESC_SIZE,
    MAX_QUEUE_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from ..mem.table import MemoryTable
    from .batch import RegionIndex

__all__ = ["FOLLOW_MIN", "MAX_FOLLOW", "desc_fields", "follow_chains"]

#: The most descriptors per chain followed with numpy; a longer chain is walked. Each step
#: costs a few numpy calls whatever the number of chains still going, so a long chain is
#: cheaper walked (~1 us per descriptor) than followed alone; and a hostile loop costs at most
#: this many steps before walk_chain's own guard takes over.
MAX_FOLLOW: Final = 64

#: Batches with fewer chained chains than this are walked one by one: below it the fixed
#: cost of the numpy path exceeds ~2.5 us per walked chain (bench/bench_vring_pure.py).
FOLLOW_MIN: Final = 6

_NEXT: Final = np.array(VIRTQ_DESC_F_NEXT, dtype=np.uint16)
_INDIRECT: Final = np.array(VIRTQ_DESC_F_INDIRECT, dtype=np.uint16)
_NEXT_OR_INDIRECT: Final = np.array(VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT, dtype=np.uint16)
_WRITE: Final = np.array(VIRTQ_DESC_F_WRITE, dtype=np.uint16)
_LOW32: Final = np.array(0xFFFF_FFFF, dtype=np.uint64)


def desc_fields(
    words: NDArray[np.uint64],
) -> tuple[NDArray[np.uint64], NDArray[np.uint32], NDArray[np.uint16], NDArray[np.uint16]]:
    """Split descriptor rows held as ``uint64[k, 2]`` into ``(addr, len, flags, next)`` views."""
    halves = words.view("<u4")
    quarters = words.view("<u2")
    return words[:, 0], halves[:, 2], quarters[:, 6], quarters[:, 7]


class _Links:
    """The result of following links: every row gathered, and how they are laid out."""

    __slots__ = ("chain", "rows", "steps", "uniform")

    def __init__(
        self, rows: NDArray[np.uint64], chain: NDArray[np.intp] | None, steps: int
    ) -> None:
        self.rows = rows  # chain-major, each chain's rows in link order
        self.chain = chain  # the chain of each row (positions 0..k-1); None: uniform
        self.steps = steps  # rows of the longest chain
        self.uniform = chain is None  # every chain has exactly ``steps`` rows

    def chains(self, count: int) -> NDArray[np.intp]:
        """The chain of each row (also when uniform) for ``count`` chains."""
        if self.chain is None:
            return np.repeat(np.arange(count, dtype=np.intp), self.steps)
        return self.chain


_NO_ROWS: Final = np.zeros((0, 2), dtype=np.uint64)
_NO_CHAIN: Final = np.zeros(0, dtype=np.intp)
_ENTRY_SHIFT: Final = np.array(4, dtype=np.uint64)
_ENTRY_MASK: Final = np.array(DESC_SIZE - 1, dtype=np.uint64)
_LARGEST_TABLE: Final = np.array(MAX_QUEUE_SIZE * DESC_SIZE, dtype=np.uint64)
_DESC_BYTES: Final = np.arange(DESC_SIZE, dtype=np.intp)

#: fetch(links, active): the rows at indices ``links`` of the tables of chains ``active``.
Fetch = Callable[["NDArray[np.uint16]", "NDArray[np.intp]"], "NDArray[np.uint64]"]


def _follow(
    first: NDArray[np.uint64],
    fetch: Fetch,
    limit: int,
    walk: NDArray[np.bool_],
    *,
    size: int = 0,
    entries: NDArray[np.uint64] | None = None,
) -> _Links:
    """Gather every descriptor of the chains whose first rows are ``first``, by NEXT links.

    ``limit`` caps the descriptors per chain. Either all chains share one table of ``size``
    entries (``fetch`` raises IndexError for an index outside it), or ``entries`` gives the
    size of each chain's own table. Marks in ``walk`` the chains that must be walked
    instead: INDIRECT anywhere (the caller decides about heads before), a ``next`` out of
    range, too long a chain (a loop); their rows may still be returned.
    """
    n = len(first)
    quarters = first.view("<u2")
    flags = quarters[:, 6]
    if np.count_nonzero(flags & _INDIRECT):
        walk |= (flags & _INDIRECT).astype(np.bool_)
    active = np.flatnonzero(flags & _NEXT)
    if np.count_nonzero(walk):
        active = active[~walk[active]]
    if not len(active):
        return _Links(first, None, 1)
    parts_rows = [first]
    parts_pos: list[NDArray[np.intp] | None] = [None]  # None: every chain
    links: NDArray[np.uint16] = quarters[:, 7][active]
    everyone = len(active) == n
    while True:
        steps = len(parts_rows)
        if steps >= limit:  # a loop, or longer than walk_chain allows or we follow
            walk[active] = True
            break
        if entries is not None:
            bound = entries[active]
            # loop guard first, then the range of next: walk_chain's order (either raises)
            stop = (bound <= steps) | (links >= bound)
            if np.count_nonzero(stop):
                walk[active[stop]] = True
                go = ~stop
                active, links = active[go], links[go]
                everyone = False
                if not len(active):
                    break
            rows = fetch(links, active)
        else:
            try:
                rows = fetch(links, active)
            except IndexError:  # a next index outside the table: walk_chain names it
                inside = links < size
                walk[active[~inside]] = True
                active, links = active[inside], links[inside]
                everyone = False
                if not len(active):
                    break
                rows = fetch(links, active)
        parts_rows.append(rows)
        parts_pos.append(None if everyone else active)
        quarters = rows.view("<u2")
        flags = quarters[:, 6] & _NEXT_OR_INDIRECT
        more = flags == _NEXT  # NEXT without INDIRECT: go on
        going = np.count_nonzero(more)
        if going != np.count_nonzero(flags):  # INDIRECT inside a chain: walk_chain decides
            walk[active[(flags & _INDIRECT).astype(np.bool_)]] = True
        if going == len(active):
            links = quarters[:, 7].copy()
            continue
        everyone = False
        if not going:
            break
        active, links = active[more], quarters[:, 7][more]
    steps = len(parts_rows)
    if all(p is None for p in parts_pos) and not np.count_nonzero(walk):
        # Every chain has the same length: interleave the steps, no sort needed.
        stacked = np.concatenate(parts_rows).reshape(steps, n, 2).transpose(1, 0, 2)
        return _Links(stacked.reshape(-1, 2), None, steps)
    everywhere = _arange(n)
    all_rows = np.concatenate(parts_rows)
    all_pos = np.concatenate([everywhere if p is None else p for p in parts_pos])
    # Steps were appended in order, so a stable sort by chain is chain-major, link order.
    order = np.argsort(all_pos, kind="stable")
    return _Links(all_rows.take(order, axis=0), all_pos[order], steps)


def _arange(n: int) -> NDArray[np.intp]:
    return np.arange(n, dtype=np.intp)


class _DirectFetch:
    """Rows of the ring's own descriptor table (``take`` raises IndexError past its end)."""

    __slots__ = ("desc",)

    def __init__(self, desc: NDArray[np.uint64]) -> None:
        self.desc = desc

    def __call__(self, links: NDArray[np.uint16], active: NDArray[np.intp]) -> NDArray[np.uint64]:
        rows: NDArray[np.uint64] = self.desc.take(links, axis=0)
        return rows


class _TableFetch:
    """Rows of indirect tables, each inside one region: 16 bytes gathered per row.

    Each row is copied out of guest memory once, when it is reached, and only the copy is
    used (walk_chain copies the whole table first; for a table that does not change under
    us the rows are the same).
    """

    __slots__ = ("base", "region", "views")

    def __init__(
        self, table: MemoryTable, base: NDArray[np.uint64], region: NDArray[np.intp] | None
    ) -> None:
        self.views = [r.view for r in table.regions]  # dropped with the batch's pop
        self.base = base
        self.region = region

    def __call__(self, links: NDArray[np.uint16], active: NDArray[np.intp]) -> NDArray[np.uint64]:
        start = self.base[active] + (links.astype(np.uint64) << _ENTRY_SHIFT)
        index = start.astype(np.intp)[:, None] + _DESC_BYTES
        if self.region is None:
            raw = self.views[0][index]
        else:
            where = self.region[active]
            raw = np.empty((len(active), DESC_SIZE), dtype=np.uint8)
            for r in np.unique(where).tolist():
                mine = where == r
                raw[mine] = self.views[r][index[mine]]
        rows: NDArray[np.uint64] = raw.view("<u8")
        return rows


def _follow_tables(
    table: MemoryTable, regions: RegionIndex, heads: NDArray[np.uint64], walk: NDArray[np.bool_]
) -> _Links:
    """Follow chains whose head is one INDIRECT descriptor, inside their tables.

    The table must be what walk_chain accepts (INDIRECT without NEXT, a length that is a
    non-zero multiple of 16 of at most 32768 entries) and lie inside ONE region (a table
    spanning two adjacent regions is legal, and walked). Marks the others in ``walk``.
    """
    addr = heads[:, 0]
    size = heads[:, 1] & _LOW32
    ok, region, offset = regions.locate(addr, size)
    ok &= (heads.view("<u2")[:, 6] & _NEXT) == 0
    ok &= (size & _ENTRY_MASK) == 0
    ok &= size <= _LARGEST_TABLE
    followed = np.flatnonzero(ok)
    if len(followed) < len(heads):
        walk |= ~ok
    if not len(followed):
        return _Links(_NO_ROWS, _NO_CHAIN, 0)
    if len(followed) < len(heads):
        offset = offset[followed]
        region = None if region is None else region[followed]
        size = size[followed]
    inner = np.zeros(len(followed), dtype=np.bool_)
    try:
        fetch = _TableFetch(table, offset, region)
        first = fetch(np.zeros(len(followed), dtype=np.uint16), _arange(len(followed)))
        found = _follow(first, fetch, MAX_FOLLOW, inner, entries=size >> _ENTRY_SHIFT)
    except GuestMemoryError:  # a region closed under us: walk_chain reports it its way
        walk[followed] = True
        return _Links(_NO_ROWS, _NO_CHAIN, 0)
    if np.count_nonzero(inner):
        walk[followed[inner]] = True
    if len(followed) == len(heads):
        return found
    return _Links(found.rows, followed[found.chains(len(followed))], found.steps)


def _merge(parts: list[tuple[NDArray[np.intp], _Links]]) -> _Links:
    """Merge the links of disjoint sets of chains (batch positions, links) into one."""
    rows = np.concatenate([links.rows for _, links in parts])
    chain = np.concatenate([where[links.chains(len(where))] for where, links in parts])
    order = np.argsort(chain, kind="stable")
    return _Links(rows.take(order, axis=0), chain[order], max(links.steps for _, links in parts))


def follow_chains(
    table: MemoryTable,
    desc: NDArray[np.uint64],
    regions: RegionIndex,
    rows0: NDArray[np.uint64],
    *,
    indirect: bool,
) -> tuple[Segments, NDArray[np.bool_]]:
    """Follow the chains whose head rows are ``rows0``, copied from the ring's table ``desc``.

    Both are descriptor rows as ``uint64[k, 2]`` (module docstring). ``indirect``:
    VIRTIO_F_INDIRECT_DESC was negotiated (else an indirect chain is walked, and raises).

    Returns the :class:`Segments` of the chains followed (a chain to walk owns none) and
    ``walk``: True for each chain to be walked one by one (module docstring).
    """
    n = len(rows0)
    size = len(desc)
    to_table = (rows0.view("<u2")[:, 6] & _INDIRECT).astype(np.bool_)
    tables = np.count_nonzero(to_table)
    walk = np.zeros(n, dtype=np.bool_)
    direct = _DirectFetch(desc)
    limit = min(size, MAX_FOLLOW)
    if not tables or not indirect:  # without the feature, walk_chain refuses INDIRECT
        found = _follow(rows0, direct, limit, walk, size=size)
    elif tables == n:
        found = _follow_tables(table, regions, rows0, walk)
    else:
        near, far = np.flatnonzero(~to_table), np.flatnonzero(to_table)
        walk_near, walk_far = np.zeros(len(near), np.bool_), np.zeros(len(far), np.bool_)
        found = _merge(
            [
                (near, _follow(rows0[near], direct, limit, walk_near, size=size)),
                (far, _follow_tables(table, regions, rows0[far], walk_far)),
            ]
        )
        walk[near] = walk_near
        walk[far] = walk_far
    return _segments(found, regions, walk, n)


def _segments(
    found: _Links, regions: RegionIndex, walk: NDArray[np.bool_], n: int
) -> tuple[Segments, NDArray[np.bool_]]:
    """Check the gathered rows as buffers; build the segments of the chains that pass."""
    rows, steps = found.rows, found.steps
    addr = rows[:, 0]
    length64 = rows[:, 1] & _LOW32
    writable = (rows.view("<u2")[:, 6] & _WRITE).astype(np.bool_)
    ok, region, offset = regions.locate(addr, length64)
    bad = ~ok
    if steps > 1:
        # "Message Framing": no device-readable buffer after a device-writable one
        if found.uniform:
            by_chain = writable.reshape(n, steps)
            order = by_chain[:, :-1] & ~by_chain[:, 1:]
            if np.count_nonzero(order):
                bad.reshape(n, steps)[:, 1:] |= order
        else:
            assert found.chain is not None
            same = found.chain[1:] == found.chain[:-1]
            bad[1:] |= writable[:-1] & ~writable[1:] & same
    chain = found.chain
    if np.count_nonzero(bad):
        chain = found.chains(n)
        walk[chain[bad]] = True
    length = rows.view("<u4")[:, 2]
    if np.count_nonzero(walk):
        chain = found.chains(n)
        keep = ~walk[chain]
        chain, addr, length, writable, offset = (
            chain[keep],
            addr[keep],
            length[keep],
            writable[keep],
            offset[keep],
        )
        if region is not None:
            region = region[keep]
    if chain is None:
        start = np.arange(0, n * steps + 1, steps, dtype=np.intp)
        segments = Segments(start, addr, length, writable, region, offset, uniform=steps)
    else:
        start = np.zeros(n + 1, dtype=np.intp)
        np.cumsum(np.bincount(chain, minlength=n), out=start[1:])
        segments = Segments(start, addr, length, writable, region, offset)
    if steps > 1 and steps * regions.largest > MAX_CHAIN_BYTES and len(length):
        # Each buffer lies in one region, so only tables with huge regions get here.
        too_long = segments.per_chain_sum(length.astype(np.uint64)) > MAX_CHAIN_BYTES
        if np.count_nonzero(too_long):
            walk |= too_long
            return _drop(segments, too_long), walk
    return segments, walk


def _drop(segments: Segments, chains: NDArray[np.bool_]) -> Segments:
    """Return ``segments`` without the buffers of the marked chains."""
    counts = segments.counts()
    keep = ~np.repeat(chains, counts)
    counts[chains] = 0
    start = np.zeros(len(counts) + 1, dtype=np.intp)
    np.cumsum(counts, out=start[1:])
    region = None if segments.single_region else segments.region[keep]
    return Segments(
        start,
        segments.addr[keep],
        segments.length[keep],
        segments.writable[keep],
        region,
        segments.offset[keep],
    )
