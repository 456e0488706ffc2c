"""SplitQueue: the device side of a split virtqueue over shared guest memory.

Fast path (measured in ``lab/ring-spike.md``): one read of ``avail.idx`` per batch, the heads
read with contiguous slices of the available ring (two slices when the batch wraps), one
vectorised gather of their descriptor rows, one vectorised check of their buffers against the
memory table. Chained batches follow their NEXT links (into indirect tables too) with one
gather per link for all chains at once (:mod:`~trio_vhost.vring.follow`); only odd chains
(a zero-length or region-spanning buffer, a broken chain) and batches too small to pay for
numpy are walked one by one. Completions go out as contiguous slice assignments into the
used ring, then one store of ``used.idx``.

Two interfaces to the same path: :meth:`SplitQueue.pop_batch` / :meth:`~SplitQueue.add_used_batch`
with :class:`DescriptorChain` objects and ``(head, written)`` pairs, and
:meth:`SplitQueue.pop_arrays` / :meth:`~SplitQueue.add_used_arrays` with numpy arrays
(:class:`~trio_vhost.vring.batch.ChainBatch`), which does no Python work per direct chain.

Memory ordering (DESIGN.md §6, :mod:`trio_vhost.vring._fence`): loads are not reordered with
loads and stores not with stores on x86-64 (TSO), and numpy copies are plain loads and stores
done in program order, so "read avail.idx, then the ring" and "write the used elements, then
used.idx" need no fence. The two store->load sequences (notification checks) call ``fence()``.

Hostile guests: everything read from the rings is copied once, then checked; a broken ring is
a :class:`VirtqueueError`, and bad numbers at construction a :class:`VirtqueueError` or
:class:`GuestMemoryError`. Nothing outside the translated ring parts and the buffers the
device itself writes through :class:`~trio_vhost.vring.chain.ChainWriter` is ever written.

Lifetime: a SplitQueue holds numpy views of its ring parts; drop it before the memory table it
was built on is closed (see :mod:`trio_vhost.mem.region`).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain as _chain
from typing import Final, final

import numpy as np
from numpy.typing import NDArray

from ..errors import VirtqueueError
from ..mem.table import MemoryTable
from ._fence import fence
from .batch import ChainBatch, RegionIndex, Segments
from .chain import DescriptorChain, walk_chain
from .follow import FOLLOW_MIN, desc_fields, follow_chains
from .layout import (
    USED_RING_OFFSET,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_USED_F_NO_NOTIFY,
    avail_event_offset,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from .state import QueueState

__all__ = ["SplitQueue", "vring_need_event"]

_SLOW_FLAGS: Final = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT
_SLOW0: Final = np.array(_SLOW_FLAGS, dtype=np.uint16)  # 0-d: cheaper than a scalar operand
_flatten: Final = _chain.from_iterable
_U16: Final = 0xFFFF


def _check_index_array(values: object, name: str, expected: int | None = None) -> int:
    """Return the length of a one-dimensional integer array, else raise ValueError."""
    if not isinstance(values, np.ndarray) or values.ndim != 1 or values.dtype.kind not in "ui":
        raise ValueError(f"{name} must be a one-dimensional integer array")
    if expected is not None and len(values) != expected:
        raise ValueError(f"{len(values)} written lengths for {expected} heads")
    return len(values)


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Return whether moving an index from ``old_idx`` to ``new_idx`` crosses ``event_idx``.

    The EVENT_IDX rule ("Used Buffer Notification Suppression"): notify if the entry at index
    ``event_idx`` was among those just written, i.e. ``old < event + 1 <= new`` in 16-bit
    wrapping arithmetic.
    """
    return (new_idx - event_idx - 1) & _U16 < (new_idx - old_idx) & _U16


@final
class SplitQueue:
    """The device side of one split ring.

    Not thread-safe: one worker owns a queue. ``state()`` is the ring position to publish on
    GET_VRING_BASE; build a new queue from it to resume.
    """

    __slots__ = (
        "_avail",
        "_avail_event",
        "_avail_ring",
        "_desc_bytes",
        "_desc_words",
        "_empty",
        "_event_idx",
        "_indirect",
        "_mask",
        "_next_avail",
        "_next_used",
        "_no_segments",
        "_regions",
        "_signalled_used",
        "_size",
        "_state",
        "_table",
        "_used_flags",
        "_used_hdr",
        "_used_ids",
        "_used_lens",
        "_used_ring",
    )

    def __init__(self, table: MemoryTable, state: QueueState) -> None:
        """Check ``state`` against ``table`` and map the three ring parts.

        Nothing is written to guest memory here: call :meth:`enable_notifications` before
        the first wait for a kick.

        Raises:
            VirtqueueError: ``state`` breaks a plain-data rule (:meth:`QueueState.validate`).
            GuestMemoryError: a ring part is not inside one region of ``table``.
        """
        state.validate()
        n = state.size
        desc = table.translate(state.desc_gpa, desc_table_size(n))
        avail = table.translate(state.avail_gpa, avail_ring_size(n))
        used = table.translate(state.used_gpa, used_ring_size(n))
        self._table: Final = table
        self._regions: Final = RegionIndex(table)
        self._empty: Final = ChainBatch.empty(table)
        # the segments of a small batch walked whole (FOLLOW_MIN), by its size
        self._no_segments: Final = [Segments.none(k) for k in range(FOLLOW_MIN)]
        self._state: Final = state
        self._size: Final = n
        self._mask: Final = n - 1
        self._event_idx: Final = bool(state.event_idx)
        self._indirect: Final = bool(state.indirect)
        # descriptors as two little-endian words each (addr; len | flags << 32 | next << 48):
        # numpy gathers plain arrays faster than DESC_DTYPE records (follow.desc_fields)
        self._desc_words: Final[NDArray[np.uint64]] = desc.view("<u8").reshape(n, 2)
        self._desc_bytes: Final = desc.data
        # avail: le16 flags, le16 idx, le16 ring[N], le16 used_event
        self._avail: Final[NDArray[np.uint16]] = avail.view("<u2")
        self._avail_ring: Final = self._avail[2 : 2 + n]
        # used: le16 flags, le16 idx, {le32 id, le32 len} ring[N], le16 avail_event
        self._used_hdr: Final[NDArray[np.uint16]] = used[:USED_RING_OFFSET].view("<u2")
        ring_end = avail_event_offset(n)
        self._used_ring: Final[NDArray[np.uint32]] = (
            used[USED_RING_OFFSET:ring_end].view("<u4").reshape(n, 2)
        )
        self._used_ids: Final = self._used_ring[:, 0]  # column views for add_used_arrays
        self._used_lens: Final = self._used_ring[:, 1]
        self._avail_event: Final[NDArray[np.uint16]] = used[ring_end : ring_end + 2].view("<u2")
        self._used_flags = int(self._used_hdr[0])
        self._next_avail = state.next_avail
        self._next_used = state.next_used
        self._signalled_used: int | None = None

    @property
    def size(self) -> int:
        """The Queue Size."""
        return self._size

    @property
    def next_avail(self) -> int:
        """The next available-ring index to pop (16-bit, wrapping)."""
        return self._next_avail

    @property
    def next_used(self) -> int:
        """The next used-ring index to fill (16-bit, wrapping)."""
        return self._next_used

    @property
    def event_idx(self) -> bool:
        """Whether VIRTIO_F_EVENT_IDX is in use."""
        return self._event_idx

    @property
    def table(self) -> MemoryTable:
        """The memory table the queue was built on."""
        return self._table

    def state(self) -> QueueState:
        """Return the queue's layout and current position as plain data."""
        return self._state.with_indices(self._next_avail, self._next_used)

    # -- popping ---------------------------------------------------------------------------

    def _pending(self) -> int:
        """Read ``avail.idx`` once and return how many chains are waiting."""
        pending = (int(self._avail[1]) - self._next_avail) & _U16
        if pending > self._size:
            # The ring holds at most Queue Size entries, so the driver cannot be further
            # ahead ("Supplying Buffers to The Device": idx always increments by the number
            # of heads added; the driver MUST NOT decrement it).
            raise VirtqueueError(
                f"avail.idx is {pending} entries ahead of next_avail {self._next_avail}"
                f" on a ring of {self._size}"
            )
        return pending

    def has_available(self) -> bool:
        """Return whether ``avail.idx`` moved past :attr:`next_avail`."""
        return int(self._avail[1]) != self._next_avail

    def _walk(self, head: int) -> DescriptorChain:
        return walk_chain(self._table, self._desc_bytes, self._size, head, indirect=self._indirect)

    def pop(self) -> DescriptorChain | None:
        """Pop one chain, or return None if the ring is empty (scalar path, no numpy batch).

        Raises:
            VirtqueueError: a corrupt index or chain; :attr:`next_avail` is not advanced.
        """
        if not self._pending():
            return None
        head = int(self._avail_ring[self._next_avail & self._mask])
        if head >= self._size:
            raise VirtqueueError(f"available ring head {head} >= queue size {self._size}")
        chain = self._walk(head)
        self._next_avail = (self._next_avail + 1) & _U16
        return chain

    def _read_heads(self, n: int) -> NDArray[np.uint16]:
        """Copy the next ``n`` heads out of the available ring (two slices on wrap)."""
        start = self._next_avail & self._mask
        end = start + n
        ring = self._avail_ring
        if end <= self._size:
            heads: NDArray[np.uint16] = ring[start:end].copy()
        else:
            heads = np.concatenate((ring[start:], ring[: end - self._size]))
        return heads

    def pop_arrays(self, max_chains: int) -> ChainBatch:
        """Pop up to ``max_chains`` chains as a :class:`ChainBatch` of numpy arrays.

        One read of ``avail.idx``, the heads by contiguous slices, one gather of their head
        descriptors (and one per link for chained and indirect ones), and one vectorised
        check of every buffer against the memory table. Only odd chains (a zero-length or
        region-spanning buffer, a broken chain) and the chained ones of a batch of fewer
        than :data:`~trio_vhost.vring.follow.FOLLOW_MIN` are walked one by one, into
        :attr:`ChainBatch.walked`.

        Raises:
            VirtqueueError: as :meth:`pop_batch`; nothing is returned and :attr:`next_avail`
                does not move.
        """
        n = min(self._pending(), max_chains) if max_chains > 0 else 0
        if n <= 0:
            return self._empty
        batch = self._batch_of(self._read_heads(n))
        self._next_avail = (self._next_avail + n) & _U16
        return batch

    def batch_of(self, heads: NDArray[np.uint16]) -> ChainBatch:
        """Build the chains of ``heads`` from the descriptor table; :attr:`next_avail` stays.

        For chains popped before (in-flight chains to resubmit after a reconnect): they are
        no longer in the available ring's window. ``heads`` is copied.

        Raises:
            VirtqueueError: a head is out of range or a chain is broken.
        """
        if not len(heads):
            return self._empty
        return self._batch_of(np.array(heads, dtype=np.uint16))

    def _batch_of(self, heads: NDArray[np.uint16]) -> ChainBatch:
        n = len(heads)
        try:
            rows = self._desc_words.take(heads, axis=0)  # the copy that is checked and used
        except IndexError:
            bad = int(heads[heads >= self._size][0])
            raise VirtqueueError(f"available ring head {bad} >= queue size {self._size}") from None
        addr, length, flags, _ = desc_fields(rows)
        slow = flags & _SLOW0
        # count_nonzero is the cheapest reduction numpy has for small arrays
        chained = np.count_nonzero(slow)
        if not chained or n < FOLLOW_MIN:
            ok, region, offset = self._regions.locate(addr, length)
            if not chained and np.count_nonzero(ok) == n:
                return ChainBatch.of_simple(self._table, heads, addr, length, flags, offset, region)
            if n < FOLLOW_MIN:  # too few to pay for following: walk all but the simple ones
                simple = ok & ~slow.astype(np.bool_)
                if not np.count_nonzero(simple):
                    return self._walked_batch(heads, ~simple, self._no_segments[n])
                segments = Segments.of_simple(simple, addr, length, flags, offset, region)
                return self._walked_batch(heads, ~simple, segments)
        segments, walk = follow_chains(
            self._table, self._desc_words, self._regions, rows, indirect=self._indirect
        )
        if not np.count_nonzero(walk):
            return ChainBatch(self._table, heads, segments)
        return self._walked_batch(heads, walk, segments)

    def _walked_batch(
        self, heads: NDArray[np.uint16], walk: NDArray[np.bool_], segments: Segments
    ) -> ChainBatch:
        """Walk the chains marked in ``walk``, in batch order; the first broken one raises."""
        positions = np.flatnonzero(walk)
        walk_one = self._walk
        walked = {
            pos: walk_one(h)
            for pos, h in zip(positions.tolist(), heads[positions].tolist(), strict=True)
        }
        return ChainBatch(self._table, heads, segments, walked)

    def pop_batch(self, max_chains: int) -> list[DescriptorChain]:
        """Pop up to ``max_chains`` chains with one read of ``avail.idx``.

        The chains of :meth:`pop_arrays`, as :class:`DescriptorChain` objects.

        Raises:
            VirtqueueError: ``avail.idx`` ran more than a ring ahead, a head is out of range
                or a chain is broken. Nothing of the batch is returned and :attr:`next_avail`
                does not move: the ring is dead and must be stopped.
        """
        batch = self.pop_arrays(max_chains)
        return batch.chains if batch.count else []

    # -- completing ------------------------------------------------------------------------

    def add_used(self, head: int, written: int) -> None:
        """Return one chain to the driver: write the used element, then ``used.idx``.

        Raises:
            ValueError: ``head`` is not a ring index or ``written`` not a 32-bit length.
        """
        if not 0 <= head < self._size or not 0 <= written <= 0xFFFF_FFFF:
            raise ValueError(f"bad completion ({head}, {written})")
        slot = self._next_used & self._mask
        ring = self._used_ring
        ring[slot, 0] = head
        ring[slot, 1] = written
        # "The device MUST set len prior to updating the used idx": the element stores above
        # are program-ordered before this store (x86 TSO keeps store order).
        self._next_used = (self._next_used + 1) & _U16
        self._used_hdr[1] = self._next_used

    def add_used_batch(self, completions: Sequence[tuple[int, int]] | NDArray[np.uint32]) -> None:
        """Return chains to the driver: one slice write of the elements, then ``used.idx``.

        Args:
            completions: ``(head, written)`` pairs, or a ``(k, 2)`` uint32 array of them.

        Raises:
            ValueError: more completions than the ring holds, or a bad head or length.
        """
        k = len(completions)
        if k == 0:
            return
        if k > self._size:
            raise ValueError(f"{k} completions do not fit a ring of {self._size}")
        try:
            if isinstance(completions, np.ndarray):
                if completions.dtype != np.uint32:
                    raise TypeError(f"a completion array must be uint32, not {completions.dtype}")
                elems = completions
            else:  # ~2.5x faster than np.asarray on a list of pairs
                flat = np.fromiter(_flatten(completions), dtype=np.uint32)
                elems = flat.reshape(k, 2) if flat.size == 2 * k else flat
        except (OverflowError, ValueError, TypeError) as exc:
            raise ValueError(f"bad completions: {exc}") from exc
        if elems.shape != (k, 2):
            raise ValueError(f"completions must be (head, written) pairs, got {elems.shape}")
        if int(elems[:, 0].max()) >= self._size:
            raise ValueError(f"a completed head is >= queue size {self._size}")
        start = self._next_used & self._mask
        end = start + k
        ring = self._used_ring
        if end <= self._size:
            ring[start:end] = elems
        else:
            split = self._size - start
            ring[start:] = elems[:split]
            ring[: end - self._size] = elems[split:]
        # used.idx last: x86 TSO keeps the element stores before it (see module docstring).
        self._next_used = (self._next_used + k) & _U16
        self._used_hdr[1] = self._next_used

    def add_used_arrays(
        self, heads: NDArray[np.integer], written: NDArray[np.integer] | int
    ) -> None:
        """Return chains to the driver from arrays: column slice writes, then ``used.idx``.

        Args:
            heads: the head of each completed chain, e.g. :attr:`ChainBatch.heads`.
            written: the bytes written into each chain, in the same order; one int for
                every chain, or an integer array of ``len(heads)`` entries.

        Raises:
            ValueError: a device bug (nothing is written): not one-dimensional integer
                arrays of equal length, more completions than the ring holds, a head
                ``>= size`` or a length outside 32 bits.
        """
        k = _check_index_array(heads, "heads")
        if k == 0:
            if not isinstance(written, int | np.integer):
                _check_index_array(written, "written", k)
            return
        if k > self._size:
            raise ValueError(f"{k} completions do not fit a ring of {self._size}")
        if (heads.dtype.kind == "i" and int(heads.min()) < 0) or int(heads.max()) >= self._size:
            raise ValueError(f"a completed head is outside a ring of {self._size}")
        if isinstance(written, int | np.integer):
            if not 0 <= written <= 0xFFFF_FFFF:
                raise ValueError(f"written {written} is not a 32-bit length")
        else:
            _check_index_array(written, "written", k)
            if not (written.dtype.kind == "u" and written.dtype.itemsize <= 4) and (
                int(written.min()) < 0 or int(written.max()) > 0xFFFF_FFFF
            ):
                raise ValueError("a written length is not a 32-bit length")
        start = self._next_used & self._mask
        end = start + k
        ids = self._used_ids
        lens = self._used_lens
        if end <= self._size:
            ids[start:end] = heads
            lens[start:end] = written
        else:
            split = self._size - start
            ids[start:] = heads[:split]
            ids[: end - self._size] = heads[split:]
            if isinstance(written, int | np.integer):
                lens[start:] = written
                lens[: end - self._size] = written
            else:
                lens[start:] = written[:split]
                lens[: end - self._size] = written[split:]
        # used.idx last: x86 TSO keeps the element stores before it (see module docstring).
        self._next_used = (self._next_used + k) & _U16
        self._used_hdr[1] = self._next_used

    # -- notifications ---------------------------------------------------------------------

    def needs_notification(self) -> bool:
        """Return whether the driver wants a used-buffer notification (call after add_used*).

        Returns False when nothing was used since the previous call (or since construction).
        The first call that has something to report always notifies: the queue does not know
        what was signalled before it was built, and a spurious notification is harmless ("The
        driver MUST handle spurious notifications from the device").

        * EVENT_IDX: notify if the used index moved across ``used_event`` since the last
          call (:func:`vring_need_event`; "Used Buffer Notification Suppression").
        * otherwise: notify unless ``avail.flags`` has VIRTQ_AVAIL_F_NO_INTERRUPT.
        """
        new = self._next_used
        old = self._signalled_used
        if old == new or (old is None and new == self._state.next_used):
            return False
        self._signalled_used = new
        fence()  # used.idx (stored) must be visible before used_event / flags are loaded
        if self._event_idx:
            used_event = int(self._avail[2 + self._size])
            return old is None or vring_need_event(used_event, new, old)
        return not int(self._avail[0]) & VIRTQ_AVAIL_F_NO_INTERRUPT

    def disable_notifications(self) -> None:
        """Ask the driver not to kick ("Available Buffer Notification Suppression").

        Without EVENT_IDX this sets VIRTQ_USED_F_NO_NOTIFY. With EVENT_IDX it does nothing:
        ``avail_event`` stays behind the driver's index, which suppresses kicks until
        :meth:`enable_notifications` moves it.
        """
        if not self._event_idx and not self._used_flags & VIRTQ_USED_F_NO_NOTIFY:
            self._used_flags |= VIRTQ_USED_F_NO_NOTIFY
            self._used_hdr[0] = self._used_flags

    def enable_notifications(self) -> bool:
        """Ask for a kick on the next buffer, then re-check the ring.

        With EVENT_IDX writes ``avail_event = next_avail``; otherwise clears
        VIRTQ_USED_F_NO_NOTIFY. Then fences and re-reads ``avail.idx``.

        Returns:
            True if buffers are already available: the driver may have checked before our
            store became visible and not kicked, so the caller must drain again instead of
            waiting.
        """
        if self._event_idx:
            self._avail_event[0] = self._next_avail
        elif self._used_flags & VIRTQ_USED_F_NO_NOTIFY:
            self._used_flags &= ~VIRTQ_USED_F_NO_NOTIFY
            self._used_hdr[0] = self._used_flags
        fence()  # our store must be visible before avail.idx is loaded again
        return self.has_available()

    def __repr__(self) -> str:
        return (
            f"<SplitQueue size={self._size} next_avail={self._next_avail}"
            f" next_used={self._next_used}>"
        )
