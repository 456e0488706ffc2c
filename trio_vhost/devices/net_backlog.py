"""RX backlogs: where the switch leaves frames for a port whose receive ring has its own task.

A receive vring is owned by its worker task, so the switch (running in the sender's task)
cannot fill it: :class:`PortQueue` holds the frames, bounded, until the RX worker takes them
for the buffers the guest posts. Frames arrive and leave in batches (:class:`Frames`): a
backlog is a queue of batches plus how far into the first one the consumer has got, so a
whole TX batch is queued with one append and taken with one slice, never frame by frame.

:class:`MultiQueuePort` spreads one port over several queue pairs (virtio-net MQ) and steers
each frame to the RX queue of the pair its flow was last transmitted on (the spec's
"automatic receive steering").

Both are switch ports (``deliver`` for one frame, ``deliver_frames`` for a batch); neither
ever blocks: a full or disabled backlog refuses, and the switch counts the drop.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, final

import numpy as np
import trio

from .net_frames import Frames, mac_key
from .net_spec import ETH_HEADER_LEN

__all__ = ["DEFAULT_BACKLOG", "MultiQueuePort", "PortQueue", "QueueStatistics"]

#: Frames a :class:`PortQueue` holds before it drops.
DEFAULT_BACKLOG: Final = 256
#: Remote MACs a :class:`MultiQueuePort` remembers for RX steering before it starts afresh.
_MAX_FLOWS: Final = 1024

#: A batch whose buffer is more than this many times the bytes of the frames queued from
#: it (plus the slack) is copied down to those frames first: a backlog of 1024 frames must
#: not keep 1024 whole TX batches alive, one frame each.
_PIN_FACTOR: Final = 4
_PIN_SLACK: Final = 4096

#: A piece of a backlog handed to its consumer: frames ``lo:hi`` of a batch.
Piece = tuple[Frames, int, int]


@dataclass(frozen=True, slots=True)
class QueueStatistics:
    """Counters of one :class:`PortQueue`."""

    name: str
    enabled: bool
    #: Frames waiting now.
    queued: int
    capacity: int
    #: Frames accepted since creation.
    accepted: int
    #: Frames refused because the backlog was full.
    dropped_full: int
    #: Frames refused, or thrown away from the backlog, because the queue was disabled.
    dropped_disabled: int


@final
class PortQueue:
    """A bounded RX backlog: a switch port that stores frames for a consumer task.

    ``deliver`` / ``deliver_frames`` append and never block; once ``capacity`` frames wait,
    further frames are refused (and the switch counts them). The consumer, typically the
    worker of one RX vring, takes frames with :meth:`take` (or one at a time with
    :meth:`get_nowait`) as the guest posts buffers, and sleeps in :meth:`wait_frames` (or is
    woken by ``on_ready``) when the backlog is empty.

    Args:
        name: the port name for statistics.
        capacity: most frames held.
        enabled: whether the queue accepts frames from the start. A disabled queue refuses
            every frame, like a started-but-disabled RX ring that must deliver nothing.
        on_ready: called (synchronously, from a delivery) when the backlog goes from empty
            to non-empty; must not block or raise. Once per batch, not per frame: that is
            what makes one wake of the RX worker move many frames.
    """

    __slots__ = (
        "_accepted",
        "_batches",
        "_capacity",
        "_count",
        "_dropped_disabled",
        "_dropped_full",
        "_enabled",
        "_head",
        "_lot",
        "_name",
        "_on_ready",
    )

    def __init__(
        self,
        name: str,
        capacity: int = DEFAULT_BACKLOG,
        *,
        enabled: bool = True,
        on_ready: Callable[[], object] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._name = name
        self._capacity = capacity
        self._enabled = enabled
        self._on_ready = on_ready
        #: the batches waiting, oldest first; the first has its frames before _head taken
        self._batches: deque[Frames] = deque()
        self._head = 0
        self._count = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._accepted = self._dropped_full = self._dropped_disabled = 0

    @property
    def name(self) -> str:
        """The port name."""
        return self._name

    @property
    def enabled(self) -> bool:
        """Whether the queue accepts frames."""
        return self._enabled

    def set_enabled(self, enabled: bool) -> None:
        """Enable or disable the queue; disabling throws the backlog away (and counts it)."""
        self._enabled = enabled
        if not enabled:
            self._dropped_disabled += self.clear()

    def deliver(self, frame: bytes) -> bool:
        """Append ``frame`` unless the queue is disabled or full (not a checkpoint)."""
        return self.deliver_frames(Frames.of_bytes(frame))[0] == 1

    def deliver_frames(self, frames: Frames) -> tuple[int, int]:
        """Append as many of ``frames`` as there is room for, in order (not a checkpoint).

        Returns:
            ``(frames, bytes)`` accepted: a prefix of the batch, all of it when there is
            room, none when the queue is disabled.
        """
        count = frames.count
        if not self._enabled:
            self._dropped_disabled += count
            return 0, 0
        room = self._capacity - self._count
        if count > room:
            self._dropped_full += count - room
            if room <= 0:
                return 0, 0
            frames = frames.head(room)
            count = room
        if not count:
            return 0, 0
        if len(frames.data) > _PIN_FACTOR * frames.total + _PIN_SLACK:
            frames = frames.compacted()  # a few frames of a big batch: don't keep it all
        self._batches.append(frames)
        was_empty = not self._count
        self._count += count
        self._accepted += count
        if was_empty:
            if self._lot:
                self._lot.unpark_all()
            if self._on_ready is not None:
                self._on_ready()
        return count, frames.total

    def __len__(self) -> int:
        return self._count

    def take(self, count: int) -> list[Piece]:
        """Take up to ``count`` frames, oldest first, as pieces of the queued batches."""
        pieces: list[Piece] = []
        batches = self._batches
        while count > 0 and batches:
            first = batches[0]
            lo = self._head
            hi = min(first.count, lo + count)
            pieces.append((first, lo, hi))
            taken = hi - lo
            count -= taken
            self._count -= taken
            if hi == first.count:
                batches.popleft()
                self._head = 0
            else:
                self._head = hi
        return pieces

    def peek_nowait(self) -> bytes:
        """Return the oldest frame without taking it.

        Raises:
            trio.WouldBlock: the backlog is empty.
        """
        if not self._count:
            raise trio.WouldBlock
        return self._batches[0].frame(self._head)

    def get_nowait(self) -> bytes:
        """Take the oldest frame.

        Raises:
            trio.WouldBlock: the backlog is empty.
        """
        frame = self.peek_nowait()
        self.take(1)
        return frame

    def clear(self) -> int:
        """Throw the backlog away (not counted as a drop); return how many frames it held."""
        count = self._count
        self._batches.clear()
        self._head = self._count = 0
        return count

    async def wait_frames(self) -> None:
        """Wait until at least one frame is queued.

        Always a checkpoint. Cancellation leaves the queue unchanged.
        """
        if self._count:
            await trio.lowlevel.checkpoint()
            return
        await self._lot.park()

    def statistics(self) -> QueueStatistics:
        """Return a snapshot of the counters."""
        return QueueStatistics(
            name=self._name,
            enabled=self._enabled,
            queued=self._count,
            capacity=self._capacity,
            accepted=self._accepted,
            dropped_full=self._dropped_full,
            dropped_disabled=self._dropped_disabled,
        )


@final
class MultiQueuePort:
    """One switch port over several RX queues (virtio-net MQ), one :class:`PortQueue` each.

    The TX side calls :meth:`note_tx` (or :meth:`note_tx_frames`) for what it sends, then
    forwards it; deliveries then steer frames from that destination to the same pair's RX
    queue, and frames of flows never transmitted to a queue chosen by a hash of the source
    MAC, among the enabled queues. With no queue enabled, every frame is refused.

    All queues start disabled: enable a pair's queue once its RX ring is started and enabled
    (and disable it when the ring stops or is disabled).

    Args:
        name: the port name.
        pairs: number of queue pairs.
        backlog: capacity of each RX queue.
        on_ready: called with the pair number when that pair's backlog becomes non-empty.
    """

    __slots__ = ("_enabled", "_flows", "_name", "dropped_no_queue", "queues")

    def __init__(
        self,
        name: str,
        pairs: int,
        *,
        backlog: int = DEFAULT_BACKLOG,
        on_ready: Callable[[int], object] | None = None,
    ) -> None:
        if pairs < 1:
            raise ValueError("pairs must be at least 1")
        self._name = name
        #: the RX queue of each pair, in pair order
        self.queues: tuple[PortQueue, ...] = tuple(
            PortQueue(
                f"{name}/rx{pair}",
                backlog,
                enabled=False,
                on_ready=None if on_ready is None else functools.partial(on_ready, pair),
            )
            for pair in range(pairs)
        )
        self._enabled: Sequence[PortQueue] = ()
        #: remote MAC key -> the RX queue of the pair that last transmitted to it
        self._flows: dict[int, PortQueue] = {}
        #: frames refused because no RX queue was enabled
        self.dropped_no_queue = 0

    @property
    def name(self) -> str:
        """The port name."""
        return self._name

    def set_enabled(self, pair: int, enabled: bool) -> None:
        """Enable or disable the RX queue of ``pair`` (see :meth:`PortQueue.set_enabled`)."""
        self.queues[pair].set_enabled(enabled)
        self._enabled = tuple(queue for queue in self.queues if queue.enabled)

    def _note(self, pair: int, keys: list[int]) -> None:
        flows = self._flows
        queue = self.queues[pair]
        for key in keys:
            if len(flows) >= _MAX_FLOWS:
                flows.clear()  # only a steering hint: start afresh rather than grow
            flows[key] = queue

    def note_tx(self, pair: int, frame: bytes) -> None:
        """Remember that the flow to ``frame``'s destination is sent on ``pair``."""
        if frame[0] & 1 or len(frame) < ETH_HEADER_LEN:
            return  # multicast or runt: no flow to steer
        self._note(pair, [mac_key(frame)])

    def note_tx_frames(self, pair: int, frames: Frames) -> None:
        """:meth:`note_tx` for every frame of a batch."""
        if frames.shortest < ETH_HEADER_LEN:
            frames = frames.subset(frames.length >= ETH_HEADER_LEN)
            if not frames.count:
                return
        common = frames.common_addresses()
        if common is not None:
            keys = [] if common[0] & 1 else [common[0]]
        else:
            unique = np.unique(frames.macs()[0])
            keys = unique[(unique & 1) == 0].tolist()
        self._note(pair, keys)

    def _steer(self, source: int, enabled: Sequence[PortQueue], origin: int = -1) -> PortQueue:
        """The RX queue for frames from ``source`` (sent on queue pair ``origin`` elsewhere).

        The flow's own pair if it has one; else, for frames a multiqueue sender sent on its
        pair ``k``, enabled queue ``k``; else one chosen by the source address. Spreading
        by origin keeps one RX worker per TX worker: with a single flow on several pairs
        (all from one address), one RX queue would otherwise take the traffic of every TX
        queue of the sender, and its worker, which gets no more turns than each of them,
        could only drop the excess.
        """
        queue = self._flows.get(source)
        if queue is None or not queue.enabled:
            pick = origin if origin >= 0 else hash(source)
            queue = enabled[pick % len(enabled)]
        return queue

    def deliver(self, frame: bytes) -> bool:
        """Queue ``frame`` on the RX queue its flow steers to (not a checkpoint)."""
        enabled = self._enabled
        if not enabled:
            self.dropped_no_queue += 1
            return False
        return self._steer(mac_key(frame[6:12]), enabled).deliver(frame)

    def deliver_frames(self, frames: Frames) -> tuple[int, int]:
        """Queue each frame on the RX queue its flow steers to; return what was accepted.

        The frames must be at least Ethernet headers (the switch passes no runts).
        """
        enabled = self._enabled
        if not enabled:
            self.dropped_no_queue += frames.count
            return 0, 0
        if len(enabled) == 1:
            return enabled[0].deliver_frames(frames)
        common = frames.common_addresses()
        if common is not None:
            return self._steer(common[1], enabled, frames.origin).deliver_frames(frames)
        src = frames.macs()[1]
        unique, where = np.unique(src, return_inverse=True)
        queues = [self._steer(key, enabled, frames.origin) for key in unique.tolist()]
        accepted = accepted_bytes = 0
        for queue in dict.fromkeys(queues):  # each queue once, in order of first use
            mine = np.array([q is queue for q in queues], dtype=np.bool_)[where]
            got, got_bytes = queue.deliver_frames(frames.subset(mine))
            accepted += got
            accepted_bytes += got_bytes
        return accepted, accepted_bytes
