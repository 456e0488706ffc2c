"""PackedQueue: the device side of a packed virtqueue (VIRTIO_F_RING_PACKED, bit 34).

The same interface as :class:`~trio_vhost.vring.split.SplitQueue`, so a worker can drive
either: ``pop_batch`` / ``pop_arrays`` give :class:`DescriptorChain` lists or a
:class:`ChainBatch`, ``add_used_batch`` / ``add_used_arrays`` return them, and
``needs_notification`` / ``enable_notifications`` / ``disable_notifications`` run the event
suppression. A chain's ``head`` is its **Buffer ID** (the ``id`` of its last descriptor,
"Next Flag: Descriptor Chaining"): that is what a used descriptor gives back.

**Popping.** The device reads the ring in order from :attr:`next_avail`; a slot holds an
available descriptor when its AVAIL bit equals the Driver Ring Wrap Counter the device
expects there and its USED bit does not ("Driver and Device Ring Wrap Counters"). A batch is
found with two vectorised copies: first the ``flags`` of the next slots (to see how far the
available descriptors run), then the whole descriptors of those slots. The order matters:
the driver writes a descriptor, then its flags ("Perform a memory barrier to ensure that the
descriptor has been initialized / Set d.flags"); a single copy of a 16-byte descriptor may
load ``addr`` before ``flags`` and pair a stale address with fresh flags. Loading all flags
first, then the rows, is load->load order, which x86 TSO keeps without a fence; the rows are
then re-checked on their own copy, which is the one used.

**In flight.** Popped descriptors stay the device's until a used descriptor covers them, so
at most N descriptors are in flight, the distance from the used to the available position
(``packed_layout`` positions). A driver that makes a descriptor available in a slot still
in flight, a list longer than the free slots, or a list whose first descriptor is
available before the rest ("A driver MUST NOT make the first descriptor in the list
available before all subsequent descriptors comprising the list are made available") is a
:class:`VirtqueueError`, as are a Buffer ID already in flight (the driver takes "the next
free buffer id") and the chain rules of :mod:`~trio_vhost.vring.packed_chain`. On any error
nothing is returned and the position does not move.

**Completing.** Each completed buffer gets ONE used descriptor (id, len, flags with AVAIL and
USED both equal to the Device Ring Wrap Counter, WRITE when bytes were written) at the used
position, which then skips as many slots as the buffer's list had descriptors ("The device
only writes out a single used descriptor for the whole list. It then skips forward").
Completions may come in any order (in-order use is not required). The ids and lengths of a
batch are stored first, then the flags of every used descriptor but the first, and the first
one's flags last: the driver polls only that slot, so it never sees a half-written batch
("Multi-buffer requests"); x86 TSO keeps the store order.

**Notifications.** The Driver Area (read only) says whether the driver wants used-buffer
notifications: ENABLE, DISABLE, or DESC (with VIRTIO_F_EVENT_IDX) "only when this descriptor
is ... used". The Device Area (written by us) asks for available-buffer notifications the
same way. Each is one aligned 32-bit word, stored and loaded whole. The two store->load
sequences (used flags then the Driver Area; the Device Area then the next slot's flags) call
:func:`~trio_vhost.vring._fence.fence`.

Nothing is written at construction; afterwards only used descriptors (``id``, ``len``,
``flags``) and the Device Area. Lifetime: a PackedQueue holds numpy views of its ring parts;
drop it before its memory table is closed (see :mod:`trio_vhost.mem.region`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, TypeVar, final

import numpy as np
from numpy.typing import NDArray

from ..errors import VirtqueueError
from ..mem.table import MemoryTable
from ._fence import fence
from .batch import ChainBatch, RegionIndex
from .chain import DescriptorChain
from .packed_chain import build_packed_batch
from .packed_layout import (
    EVENT_SUPPRESS_SIZE,
    PACKED_DESC_DTYPE,
    PACKED_DESC_SIZE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    avail_flags,
    desc_ring_size,
    event_word,
    from_position,
    packed_need_event,
    split_event_word,
    to_position,
    used_flags,
)
from .packed_state import PackedQueueState

__all__ = ["PackedQueue"]

_T = TypeVar("_T", bound=np.generic)

_AU: Final = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
#: Slots looked at per batch beyond ``4 * max_chains``: lists of several descriptors are
#: common (a block request is three), and a short look costs another pass.
_MIN_WINDOW: Final = 64
_U32_MAX: Final = 0xFFFF_FFFF


def _has_duplicates(values: NDArray[np.integer]) -> bool:
    """Return whether a value occurs twice (a sort is cheaper than np.unique for a batch)."""
    if len(values) < 2:
        return False
    ordered = np.sort(values)
    return bool((ordered[1:] == ordered[:-1]).any())


def _leading(ok: NDArray[np.bool_]) -> int:
    """Return how many entries at the start of ``ok`` are True."""
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if bad.size else len(ok)


@final
class PackedQueue:
    """The device side of one packed ring.

    Not thread-safe: one worker owns a queue. :meth:`state` is the position to publish on
    GET_VRING_BASE (:attr:`PackedQueueState.vring_base`); build a new queue from it to resume.
    """

    __slots__ = (
        "_avail_pos",
        "_device_event",
        "_device_word",
        "_driver_event",
        "_empty",
        "_event_idx",
        "_flags",
        "_ids",
        "_in_flight",
        "_indirect",
        "_last_pop",
        "_last_used",
        "_lens",
        "_ndesc",
        "_period",
        "_regions",
        "_rows",
        "_signalled",
        "_size",
        "_state",
        "_table",
        "_unsignalled",
        "_used_pos",
    )

    def __init__(self, table: MemoryTable, state: PackedQueueState) -> None:
        """Check ``state`` against ``table`` and map the three ring parts.

        Nothing is written to guest memory here: call :meth:`enable_notifications` before
        the first wait for a kick.

        Raises:
            VirtqueueError: ``state`` breaks a plain-data rule
                (:meth:`PackedQueueState.validate`).
            GuestMemoryError: a ring part is not inside one region of ``table``.
        """
        state.validate()
        n = state.size
        ring = table.translate(state.desc_gpa, desc_ring_size(n))
        driver = table.translate(state.driver_gpa, EVENT_SUPPRESS_SIZE)
        device = table.translate(state.device_gpa, EVENT_SUPPRESS_SIZE)
        self._table: Final = table
        self._regions: Final = RegionIndex(table)
        self._empty: Final = ChainBatch.empty(table)
        self._state: Final = state
        self._size: Final = n
        self._period: Final = 2 * n
        self._event_idx: Final = bool(state.event_idx)
        self._indirect: Final = bool(state.indirect)
        self._rows: Final[NDArray[np.void]] = ring.view(PACKED_DESC_DTYPE)
        self._ids: Final[NDArray[np.uint16]] = self._rows["id"]  # strided column views
        self._lens: Final[NDArray[np.uint32]] = self._rows["len"]
        self._flags: Final[NDArray[np.uint16]] = self._rows["flags"]
        # each structure is one aligned le32: off_wrap in the low half, flags in the high
        self._driver_event: Final[NDArray[np.uint32]] = driver.view("<u4")
        self._device_event: Final[NDArray[np.uint32]] = device.view("<u4")
        self._device_word = int(self._device_event[0])
        self._avail_pos = to_position(state.next_avail, bool(state.avail_wrap), n)
        self._used_pos = to_position(state.next_used, bool(state.used_wrap), n)
        # Descriptors popped and not yet covered by a used descriptor. Those of a state
        # restored with chains in flight belong to no id this queue knows (see batch_of).
        self._in_flight = state.in_flight
        # descriptors in the list of each in-flight Buffer ID; 0 = not in flight
        self._ndesc: Final = np.zeros(1 << 16, dtype=np.uint16)
        # the last pop: its start position, and each list's offset from it and Buffer ID
        self._last_pop: tuple[int, NDArray[np.intp], NDArray[np.uint16]] | None = None
        self._last_used: tuple[int, int] | None = None  # (position, slots) of the last used
        self._signalled: int | None = None
        self._unsignalled = 0

    # -- plain properties ------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The Queue Size."""
        return self._size

    @property
    def next_avail(self) -> int:
        """The ring index of the next descriptor to pop."""
        return from_position(self._avail_pos, self._size)[0]

    @property
    def avail_wrap(self) -> bool:
        """The Driver Ring Wrap Counter expected at :attr:`next_avail`."""
        return self._avail_pos < self._size

    @property
    def next_used(self) -> int:
        """The ring index where the next used descriptor goes."""
        return from_position(self._used_pos, self._size)[0]

    @property
    def used_wrap(self) -> bool:
        """The Device Ring Wrap Counter."""
        return self._used_pos < self._size

    @property
    def in_flight(self) -> int:
        """Descriptors popped and not yet covered by a used descriptor."""
        return self._in_flight

    @property
    def event_idx(self) -> bool:
        """Whether VIRTIO_F_EVENT_IDX is in use (RING_EVENT_FLAGS_DESC is valid)."""
        return self._event_idx

    @property
    def table(self) -> MemoryTable:
        """The memory table the queue was built on."""
        return self._table

    def state(self) -> PackedQueueState:
        """Return the queue's layout and current positions as plain data."""
        n = self._size
        return self._state.with_positions(
            *from_position(self._avail_pos, n), *from_position(self._used_pos, n)
        )

    def resume_state(self, abandoned: int) -> PackedQueueState:
        """Return the state to resume from, handing back the last ``abandoned`` chains.

        For a worker stopped in the middle of a batch it never completed: the available
        position moves back to the first descriptor of those chains, so a queue built from
        the result pops them again. (A split ring subtracts ``abandoned`` from its index; a
        packed one must know how many descriptors each chain took.)

        Raises:
            ValueError: ``abandoned`` is not a count of chains of the last pop that are all
                still in flight.
        """
        if abandoned == 0:
            return self.state()
        popped = 0 if self._last_pop is None else len(self._last_pop[2])
        if self._last_pop is None or not 0 < abandoned <= popped:
            raise ValueError(f"cannot hand back {abandoned} of {popped} popped chains")
        base, offsets, ids = self._last_pop
        if not self._ndesc[ids[popped - abandoned :]].all():
            raise ValueError("a chain to hand back was completed already")
        n = self._size
        start = (base + int(offsets[popped - abandoned])) % self._period
        return self._state.with_positions(
            *from_position(start, n), *from_position(self._used_pos, n)
        )

    # -- popping ---------------------------------------------------------------------------

    def has_available(self) -> bool:
        """Return whether the descriptor at :attr:`next_avail` is available (one load)."""
        index, wrap = from_position(self._avail_pos, self._size)
        return int(self._flags[index]) & _AU == avail_flags(wrap)

    def _expected(self, index: int, wrap: bool, count: int) -> NDArray[np.uint16]:
        """The AVAIL/USED bits of ``count`` available slots from ``index``."""
        expected = np.full(count, avail_flags(wrap), dtype=np.uint16)
        expected[self._size - index :] = avail_flags(not wrap)  # slots after the ring's end
        return expected

    def _take(self, column: NDArray[_T], index: int, count: int) -> NDArray[_T]:
        """Copy ``count`` entries of a ring array from slot ``index``, wrapping at the end."""
        end = index + count
        if end <= self._size:
            return column[index:end].copy()
        return np.concatenate((column[index:], column[: end - self._size]))

    def _available(self, window: int) -> NDArray[np.void]:
        """Copy the run of available descriptors among the next ``window`` slots.

        Flags first, then the rows (see the module docstring); the run is re-measured on the
        rows' own copy, which is what the caller uses.
        """
        index, wrap = from_position(self._avail_pos, self._size)
        expected = self._expected(index, wrap, window)
        flags = self._take(self._flags, index, window)
        count = _leading(flags & _AU == expected)
        if not count:
            return self._rows[:0].copy()
        rows = self._take(self._rows, index, count)
        return rows[: _leading(rows["flags"] & _AU == expected[:count])]

    def _lists(self, max_chains: int) -> tuple[NDArray[np.void], NDArray[np.intp]]:
        """Return the available descriptors and the offsets where complete lists end.

        Raises:
            VirtqueueError: the ring breaks one of the in-flight rules (module docstring).
        """
        free = self._size - self._in_flight
        if free == 0:
            if self.has_available():
                raise VirtqueueError(
                    f"a descriptor was made available at slot {self.next_avail}, which is"
                    f" still in flight (the ring of {self._size} is full)"
                )
            return self._rows[:0], np.zeros(0, dtype=np.intp)
        window = min(free, max(_MIN_WINDOW, 4 * max_chains))
        rows = self._available(window)
        ends = np.flatnonzero(rows["flags"] & VIRTQ_DESC_F_NEXT == 0)
        if len(rows) and not len(ends):
            # The first list runs past what was looked at: look again over every free slot,
            # with fresh loads (a list's other descriptors were stored before its first).
            window = free
            rows = self._available(window)
            ends = np.flatnonzero(rows["flags"] & VIRTQ_DESC_F_NEXT == 0)
            if len(rows) == free and not len(ends):
                raise VirtqueueError(
                    f"descriptor list at slot {self.next_avail} is longer than the"
                    f" {free} free slots of the ring"
                )
            if len(rows) and not len(ends):
                raise VirtqueueError(
                    f"descriptor list at slot {self.next_avail} is available before its"
                    f" descriptor at slot {(self.next_avail + len(rows)) % self._size}"
                )
        return rows, ends[:max_chains]

    def pop_arrays(self, max_chains: int) -> ChainBatch:
        """Pop up to ``max_chains`` chains as a :class:`ChainBatch` (``heads`` = Buffer IDs).

        A list of one direct in-region descriptor is *simple* (array rows); other direct
        lists are followed with numpy (:attr:`ChainBatch.segments`); indirect and odd ones
        are walked (:attr:`ChainBatch.walked`): :func:`.packed_chain.build_packed_batch`.

        Raises:
            VirtqueueError: the ring or a chain is broken (module docstring); nothing is
                returned and :attr:`next_avail` does not move.
        """
        if max_chains <= 0:
            return self._empty
        rows, ends = self._lists(max_chains)
        count = len(ends)
        if not count:
            return self._empty
        used = int(ends[-1]) + 1
        rows = rows[:used]
        starts = np.empty(count, dtype=np.intp)
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
        lengths = ends - starts + 1
        ids: NDArray[np.uint16] = rows["id"][ends]
        self._check_ids(ids)
        batch = build_packed_batch(
            self._table,
            self._regions,
            rows,
            starts,
            ends,
            ids,
            first_slot=self.next_avail,
            size=self._size,
            indirect=self._indirect,
        )
        # commit: nothing above changed the queue
        self._last_pop = (self._avail_pos, starts, ids)
        self._ndesc[ids] = lengths
        self._avail_pos = (self._avail_pos + used) % self._period
        self._in_flight += used
        return batch

    def _check_ids(self, ids: NDArray[np.uint16]) -> None:
        if np.count_nonzero(self._ndesc[ids]):
            bad = int(ids[self._ndesc[ids] != 0][0])
            raise VirtqueueError(f"buffer id {bad} made available again while in flight")
        if _has_duplicates(ids):
            raise VirtqueueError("one buffer id used by two available descriptor lists")

    def pop_batch(self, max_chains: int) -> list[DescriptorChain]:
        """Pop up to ``max_chains`` chains; the chains of :meth:`pop_arrays` as objects.

        Raises:
            VirtqueueError: as :meth:`pop_arrays`; nothing is returned and :attr:`next_avail`
                does not move: the ring is dead and must be stopped.
        """
        batch = self.pop_arrays(max_chains)
        return batch.chains if batch.count else []

    def pop(self) -> DescriptorChain | None:
        """Pop one chain, or return None if none is available.

        Raises:
            VirtqueueError: as :meth:`pop_arrays`.
        """
        chains = self.pop_batch(1)
        return chains[0] if chains else None

    def batch_of(self, heads: NDArray[np.uint16]) -> ChainBatch:
        """Not possible for a packed ring: raises NotImplementedError.

        A split ring rebuilds an in-flight chain from its head, because the descriptor table
        keeps it. In a packed ring the driver may overwrite a popped list's slots as soon as
        used descriptors go past them, and a Buffer ID says nothing of where its list was.
        Chains to resubmit after a reconnect must be rebuilt from the descriptors that
        in-flight tracking saved (``DescStatePacked`` of the vhost-user spec, "Inflight I/O
        tracking"), which this queue does not read.
        """
        raise NotImplementedError(
            "a packed ring cannot rebuild chains from buffer ids; resubmit from the"
            " descriptors saved by in-flight tracking"
        )

    # -- completing ------------------------------------------------------------------------

    def add_used(self, buffer_id: int, written: int) -> None:
        """Return one chain to the driver: ``len`` and ``id``, then ``flags``.

        Raises:
            ValueError: ``buffer_id`` is not in flight or ``written`` is not a 32-bit length.
        """
        if not 0 <= buffer_id <= 0xFFFF or not self._ndesc[buffer_id]:
            raise ValueError(f"buffer id {buffer_id} is not in flight")
        if not 0 <= written <= _U32_MAX:
            raise ValueError(f"written {written} is not a 32-bit length")
        count = int(self._ndesc[buffer_id])
        index, wrap = from_position(self._used_pos, self._size)
        self._ids[index] = buffer_id
        self._lens[index] = written
        # flags last: x86 TSO keeps the stores above before it
        self._flags[index] = used_flags(wrap) | (VIRTQ_DESC_F_WRITE if written else 0)
        self._retire(np.array([buffer_id]), self._used_pos, count, 1)

    def add_used_batch(self, completions: Sequence[tuple[int, int]] | NDArray[np.uint32]) -> None:
        """Return chains to the driver: ``(buffer_id, written)`` pairs or a ``(k, 2)`` array.

        Raises:
            ValueError: a device bug (nothing is written): an id not in flight or given
                twice, a length outside 32 bits, or not pairs.
        """
        if not len(completions):
            return
        try:
            pairs = np.asarray(completions, dtype=np.int64)
        except (OverflowError, ValueError, TypeError) as exc:
            raise ValueError(f"bad completions: {exc}") from exc
        if pairs.ndim != 2 or pairs.shape[1] != 2:
            raise ValueError(f"completions must be (buffer_id, written) pairs, got {pairs.shape}")
        self._publish(pairs[:, 0], pairs[:, 1])

    def add_used_arrays(
        self, heads: NDArray[np.integer], written: NDArray[np.integer] | int
    ) -> None:
        """Return chains to the driver from arrays, e.g. :attr:`ChainBatch.heads`.

        Args:
            heads: the Buffer ID of each completed chain.
            written: the bytes written into each chain, in the same order; one int for all,
                or an integer array of ``len(heads)`` entries.

        Raises:
            ValueError: a device bug (nothing is written): not one-dimensional integer
                arrays of equal length, an id not in flight or given twice, or a length
                outside 32 bits.
        """
        if not isinstance(heads, np.ndarray) or heads.ndim != 1 or heads.dtype.kind not in "ui":
            raise ValueError("heads must be a one-dimensional integer array")
        if isinstance(written, int | np.integer):
            lengths = np.full(len(heads), int(written), dtype=np.int64)
        elif (
            not isinstance(written, np.ndarray)
            or written.ndim != 1
            or written.dtype.kind not in "ui"
        ):
            raise ValueError("written must be an int or a one-dimensional integer array")
        elif len(written) != len(heads):
            raise ValueError(f"{len(written)} written lengths for {len(heads)} heads")
        else:
            lengths = written.astype(np.int64)
        if len(heads):
            self._publish(heads.astype(np.int64), lengths)

    def _publish(self, ids: NDArray[np.int64], written: NDArray[np.int64]) -> None:
        """Check completions, then write their used descriptors, the first one's flags last."""
        if int(ids.min()) < 0 or int(ids.max()) > 0xFFFF:
            raise ValueError("a completed buffer id is not a 16-bit value")
        if int(written.min()) < 0 or int(written.max()) > _U32_MAX:
            raise ValueError("a written length is not a 32-bit length")
        counts = self._ndesc[ids].astype(np.int64)
        if not counts.all():
            raise ValueError(f"buffer id {int(ids[counts == 0][0])} is not in flight")
        if _has_duplicates(ids):
            raise ValueError("a buffer id is completed twice in one batch")
        skips = np.cumsum(counts) - counts  # slots before each used descriptor
        position = (self._used_pos + skips) % self._period
        wrapped = position >= self._size
        slots = position - self._size * wrapped
        flags = np.where(wrapped, used_flags(False), used_flags(True)) | np.where(
            written != 0, VIRTQ_DESC_F_WRITE, 0
        )
        self._ids[slots] = ids
        self._lens[slots] = written
        self._flags[slots[1:]] = flags[1:]
        # The first used descriptor exposes the batch: its flags go last (module docstring).
        self._flags[slots[0]] = flags[0]
        self._retire(ids, self._used_pos, int(counts.sum()), int(skips[-1]) + 1)

    def _retire(self, ids: NDArray[np.integer], start: int, count: int, span: int) -> None:
        """Account for used descriptors covering ``count`` slots from position ``start``."""
        self._ndesc[ids] = 0
        self._used_pos = (start + count) % self._period
        self._in_flight -= count
        self._unsignalled += count
        self._last_used = (start, span)

    def last_used_ranges(self) -> list[tuple[int, int]]:
        """Return the guest ranges ``(gpa, length)`` the last ``add_used*`` call wrote.

        For dirty logging: the slots from its first to its last used descriptor (one range,
        two when they wrap around the ring's end). Empty before any completion.
        """
        if self._last_used is None:
            return []
        start, span = self._last_used
        index = from_position(start, self._size)[0]
        gpa = self._state.desc_gpa
        first = min(span, self._size - index)
        ranges = [(gpa + index * PACKED_DESC_SIZE, first * PACKED_DESC_SIZE)]
        if span > first:
            ranges.append((gpa, (span - first) * PACKED_DESC_SIZE))
        return ranges

    # -- notifications ---------------------------------------------------------------------

    def needs_notification(self) -> bool:
        """Return whether the driver wants a used-buffer notification (call after add_used*).

        False when nothing was used since the previous call (or since construction). The
        first call with something to report notifies in DESC mode: the queue does not know
        what was signalled before it was built, and "The driver MUST handle spurious
        notifications from the device". Otherwise, by the Driver Area's flags: ENABLE
        notifies, DISABLE does not, DESC (with EVENT_IDX) when a used descriptor went over
        the event's slot (:func:`~trio_vhost.vring.packed_layout.packed_need_event`). DESC
        without EVENT_IDX and the reserved value 3 notify.
        """
        moved = self._unsignalled
        if not moved:
            return False
        new, old = self._used_pos, self._signalled
        self._unsignalled = 0
        self._signalled = new
        fence()  # the used flags (stored) must be visible before the Driver Area is loaded
        word = int(self._driver_event[0])
        flags = split_event_word(word)[0]
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self._event_idx:
            return True
        if old is None or moved >= self._period:
            return True
        return packed_need_event(word & 0xFFFF, old, new, self._size)

    def _store_device_event(self, word: int) -> None:
        if word != self._device_word:
            self._device_word = word
            self._device_event[0] = word  # one aligned 32-bit store

    def disable_notifications(self) -> None:
        """Ask the driver not to kick: RING_EVENT_FLAGS_DISABLE in the Device Area."""
        self._store_device_event(event_word(RING_EVENT_FLAGS_DISABLE))

    def enable_notifications(self) -> bool:
        """Ask for a kick on the next buffer, then re-check the ring.

        With EVENT_IDX: RING_EVENT_FLAGS_DESC at :attr:`next_avail` and its wrap counter (a
        kick when exactly that descriptor becomes available); otherwise ENABLE. Then fences
        and loads that slot's flags.

        Returns:
            True if a descriptor is already available: the driver may have checked before
            our store became visible and not kicked, so the caller must drain again.
        """
        if self._event_idx:
            index, wrap = from_position(self._avail_pos, self._size)
            self._store_device_event(event_word(RING_EVENT_FLAGS_DESC, index, wrap))
        else:
            self._store_device_event(event_word(RING_EVENT_FLAGS_ENABLE))
        fence()  # our store must be visible before the slot's flags are loaded
        return self.has_available()

    def __repr__(self) -> str:
        return (
            f"<PackedQueue size={self._size} next_avail={self.next_avail}/{int(self.avail_wrap)}"
            f" next_used={self.next_used}/{int(self.used_wrap)} in_flight={self._in_flight}>"
        )
