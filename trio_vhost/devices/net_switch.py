"""An L2 learning switch between ports, independent of how a port moves its frames.

A port is anything with a ``name`` and a synchronous ``deliver(frame) -> bool``
(:class:`SwitchPort`): a vhost-user virtio-net connection, a TAP device, a test double.
:meth:`Switch.forward` runs in the task that received the frame (a TX vring worker, a TAP
reader) and hands the frame to the destination ports right away. It never blocks and never
awaits: a port with no room says so by returning ``False`` and the switch counts a drop, so a
guest that posts no RX buffers cannot stall the traffic of the others.

Frames are ``bytes``: immutable, so one object can be delivered to every port of a flood and
sit in several backlogs without a copy. A frame carries no virtio-net header; the virtio
adapter strips it on TX and prepends it on RX.

:class:`PortQueue` is the bounded RX backlog a virtio port needs because a receive ring is
owned by its own worker task: ``deliver`` only appends, and the RX worker drains the backlog
into the buffers the guest posts. :class:`MultiQueuePort` spreads one port over several
queue pairs (virtio-net MQ) and steers each frame to the RX queue of the pair the flow was
last transmitted on (the spec's "automatic receive steering").
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, final

import trio

from .net_spec import ETH_ADDR_LEN, ETH_HEADER_LEN

__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_MACS",
    "MultiQueuePort",
    "PortQueue",
    "PortStatistics",
    "QueueStatistics",
    "Switch",
    "SwitchPort",
    "SwitchStatistics",
]

LOGGER = logging.getLogger(__name__)

#: Seconds a learned MAC address stays valid without a frame from it (IEEE 802.1D default).
DEFAULT_MAX_AGE: Final = 300.0
#: Most MAC addresses the table holds; beyond it unknown sources are not learned (flooded).
DEFAULT_MAX_MACS: Final = 4096
#: Frames a :class:`PortQueue` holds before it drops.
DEFAULT_BACKLOG: Final = 256
#: A full table is swept for aged entries at most this often (seconds of the switch clock).
_SWEEP_INTERVAL: Final = 1.0
#: Remote MACs a :class:`MultiQueuePort` remembers for RX steering before it starts afresh.
_MAX_FLOWS: Final = 1024
_ZERO_MAC: Final = bytes(ETH_ADDR_LEN)


class SwitchPort(Protocol):
    """What the switch needs of a port."""

    @property
    def name(self) -> str:
        """A name for statistics and logs."""
        ...

    def deliver(self, frame: bytes) -> bool:
        """Take one frame for sending out of this port, without blocking.

        Must not raise: a port that cannot take the frame (no room, link down, closed)
        returns ``False`` and the switch counts the drop.

        Returns:
            Whether the port accepted the frame.
        """
        ...


@dataclass(frozen=True, slots=True)
class PortStatistics:
    """Counters of one switch port, seen from the switch.

    ``rx_*`` count frames the switch received from the port (the port's transmissions);
    ``tx_*`` count frames the switch handed to the port.
    """

    name: str
    #: Frames received from the port, including those dropped below.
    rx_frames: int
    rx_bytes: int
    #: Frames shorter than an Ethernet header (14 bytes), dropped.
    rx_runts: int
    #: Frames with a multicast or all-zero source MAC, dropped (as a bridge does).
    rx_invalid_source: int
    #: Unicast frames for a MAC learned on the same port, not sent back (no echo).
    rx_filtered: int
    #: Frames the port accepted.
    tx_frames: int
    tx_bytes: int
    #: Frames the port refused (``deliver`` returned False: no buffers, link down).
    tx_dropped: int


@dataclass(frozen=True, slots=True)
class SwitchStatistics:
    """A snapshot of the switch: per-port counters and the MAC table."""

    ports: tuple[PortStatistics, ...]
    #: MAC addresses currently learned and not aged out.
    mac_table_size: int
    #: New MAC addresses learned.
    learned: int
    #: Known MAC addresses seen on a different port than before.
    moved: int
    #: MAC addresses forgotten because no frame came from them for ``max_age`` seconds.
    aged_out: int
    #: New source MACs not learned because the table was full.
    table_full: int
    #: Frames flooded (broadcast, multicast or unknown unicast destination).
    flooded: int
    #: Frames from a port that is not (or no longer) attached, dropped.
    unknown_source: int

    def port(self, name: str) -> PortStatistics:
        """Return the counters of the first port called ``name``.

        Raises:
            KeyError: no such port.
        """
        for stats in self.ports:
            if stats.name == name:
                return stats
        raise KeyError(name)


@final
class _Member:
    """One attached port and its counters (mutable; snapshots are :class:`PortStatistics`)."""

    __slots__ = (
        "active",
        "deliver",
        "port",
        "rx_bytes",
        "rx_filtered",
        "rx_frames",
        "rx_invalid_source",
        "rx_runts",
        "tx_bytes",
        "tx_dropped",
        "tx_frames",
    )

    def __init__(self, port: SwitchPort) -> None:
        self.port = port
        self.deliver = port.deliver  # bound once: saves an attribute lookup per frame
        self.active = True
        self.rx_frames = self.rx_bytes = self.rx_runts = 0
        self.rx_invalid_source = self.rx_filtered = 0
        self.tx_frames = self.tx_bytes = self.tx_dropped = 0

    def snapshot(self) -> PortStatistics:
        return PortStatistics(
            name=self.port.name,
            rx_frames=self.rx_frames,
            rx_bytes=self.rx_bytes,
            rx_runts=self.rx_runts,
            rx_invalid_source=self.rx_invalid_source,
            rx_filtered=self.rx_filtered,
            tx_frames=self.tx_frames,
            tx_bytes=self.tx_bytes,
            tx_dropped=self.tx_dropped,
        )


@final
class _MacEntry:
    __slots__ = ("member", "seen")

    def __init__(self, member: _Member, seen: float) -> None:
        self.member = member
        self.seen = seen


@final
class Switch:
    """An L2 learning switch.

    Learns the source MAC of every frame, sends a unicast frame to the port its destination
    was learned on, and floods broadcast, multicast and unknown unicast frames to every other
    port. A frame never goes back to the port it came from.

    Only one task may call into a switch at a time; under trio's single thread that holds
    as long as no method awaits, and none does.

    Args:
        max_age: seconds a learned address stays valid without a frame from it.
        max_macs: most addresses the table holds; further new sources are flooded to.
        clock: the time source in seconds (injectable for tests; ``time.monotonic`` by
            default, so a switch works outside ``trio.run`` too).
    """

    __slots__ = (
        "_aged_out",
        "_clock",
        "_flooded",
        "_last_sweep",
        "_learned",
        "_max_age",
        "_max_macs",
        "_members",
        "_moved",
        "_ports",
        "_table",
        "_table_full",
        "_unknown_source",
    )

    def __init__(
        self,
        *,
        max_age: float = DEFAULT_MAX_AGE,
        max_macs: int = DEFAULT_MAX_MACS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_age <= 0 or max_macs < 1:
            raise ValueError("max_age must be positive and max_macs at least 1")
        self._max_age = max_age
        self._max_macs = max_macs
        self._clock = clock
        #: id(port) -> member; identity, not equality, tells ports apart
        self._ports: dict[int, _Member] = {}
        #: the flood list, rebuilt on attach/detach so forwarding never allocates one
        self._members: tuple[_Member, ...] = ()
        self._table: dict[bytes, _MacEntry] = {}
        self._last_sweep = float("-inf")
        self._learned = self._moved = self._aged_out = self._table_full = 0
        self._flooded = self._unknown_source = 0

    # -- ports ---------------------------------------------------------------------------

    def add_port(self, port: SwitchPort) -> None:
        """Attach ``port``; it receives floods from now on.

        Raises:
            ValueError: ``port`` is already attached.
        """
        if id(port) in self._ports:
            raise ValueError(f"port {port.name!r} is already attached")
        member = _Member(port)
        self._ports[id(port)] = member
        self._members = (*self._members, member)
        LOGGER.info("switch: port %s attached (%d ports)", port.name, len(self._members))

    def remove_port(self, port: SwitchPort) -> None:
        """Detach ``port`` and forget the addresses learned on it; a no-op if not attached.

        Safe to call from inside a ``deliver`` call of a flood in progress: the detached
        port gets no further frames, not even the rest of that flood.
        """
        member = self._ports.pop(id(port), None)
        if member is None:
            return
        member.active = False
        self._members = tuple(m for m in self._members if m is not member)
        stale = [mac for mac, entry in self._table.items() if entry.member is member]
        for mac in stale:
            del self._table[mac]
        LOGGER.info("switch: port %s detached (%d ports)", port.name, len(self._members))

    @property
    def ports(self) -> tuple[SwitchPort, ...]:
        """The attached ports, in attach order."""
        return tuple(member.port for member in self._members)

    # -- forwarding ----------------------------------------------------------------------

    def forward(self, src_port: SwitchPort, frame: bytes) -> None:
        """Switch one Ethernet frame received from ``src_port``.

        Synchronous and never blocking (not a checkpoint). Drops, and counts, a frame
        shorter than 14 bytes, a frame with a multicast or zero source MAC, and a frame
        from a port that is not attached.

        Args:
            src_port: the attached port the frame came from.
            frame: the frame from the destination MAC on, without a virtio-net header.
        """
        src = self._ports.get(id(src_port))
        if src is None:
            self._unknown_source += 1
            return
        size = len(frame)
        src.rx_frames += 1
        src.rx_bytes += size
        if size < ETH_HEADER_LEN:
            src.rx_runts += 1
            return
        now = self._clock()
        table = self._table
        source = frame[6:12]
        entry = table.get(source)
        if entry is None:
            # only valid sources are ever learned: check validity here, off the hot path
            if frame[6] & 1 or source == _ZERO_MAC:
                src.rx_invalid_source += 1
                return
            self._learn(source, src, now)
        else:
            if entry.member is not src:
                entry.member = src
                self._moved += 1
            entry.seen = now
        if not frame[0] & 1:
            entry = table.get(frame[:6])
            if entry is not None:
                if now - entry.seen <= self._max_age:
                    dst = entry.member
                    if dst is src:
                        src.rx_filtered += 1
                    elif dst.deliver(frame):
                        dst.tx_frames += 1
                        dst.tx_bytes += size
                    else:
                        dst.tx_dropped += 1
                    return
                del table[frame[:6]]
                self._aged_out += 1
        self._flooded += 1
        for dst in self._members:
            if dst is src or not dst.active:
                continue
            if dst.deliver(frame):
                dst.tx_frames += 1
                dst.tx_bytes += size
            else:
                dst.tx_dropped += 1

    def _learn(self, mac: bytes, member: _Member, now: float) -> None:
        table = self._table
        if len(table) >= self._max_macs:
            if now - self._last_sweep >= _SWEEP_INTERVAL:
                self._sweep(now)
            if len(table) >= self._max_macs:
                self._table_full += 1
                return
        table[mac] = _MacEntry(member, now)
        self._learned += 1

    def _sweep(self, now: float) -> int:
        self._last_sweep = now
        horizon = now - self._max_age
        stale = [mac for mac, entry in self._table.items() if entry.seen < horizon]
        for mac in stale:
            del self._table[mac]
        self._aged_out += len(stale)
        return len(stale)

    # -- inspection ----------------------------------------------------------------------

    def lookup(self, mac: bytes) -> SwitchPort | None:
        """Return the port ``mac`` is learned on, or None if unknown or aged out."""
        entry = self._table.get(bytes(mac))
        if entry is None or self._clock() - entry.seen > self._max_age:
            return None
        return entry.member.port

    def expire(self) -> int:
        """Forget every aged-out address now (forwarding also does it lazily).

        Returns:
            How many addresses were forgotten.
        """
        return self._sweep(self._clock())

    def statistics(self) -> SwitchStatistics:
        """Return a snapshot of the counters and the MAC table size."""
        horizon = self._clock() - self._max_age
        return SwitchStatistics(
            ports=tuple(member.snapshot() for member in self._members),
            mac_table_size=sum(1 for entry in self._table.values() if entry.seen >= horizon),
            learned=self._learned,
            moved=self._moved,
            aged_out=self._aged_out,
            table_full=self._table_full,
            flooded=self._flooded,
            unknown_source=self._unknown_source,
        )


# -- RX backlogs ----------------------------------------------------------------------------


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
    """A bounded RX backlog: a :class:`SwitchPort` that stores frames for a consumer task.

    ``deliver`` appends and never blocks; once ``capacity`` frames wait, further frames are
    refused (and the switch counts them). The consumer, typically the worker of one RX
    vring, takes frames with :meth:`peek_nowait` / :meth:`get_nowait` as the guest posts
    buffers, and sleeps in :meth:`wait_frames` (or is woken by ``on_ready``) when the
    backlog is empty.

    Args:
        name: the port name for statistics.
        capacity: most frames held.
        enabled: whether the queue accepts frames from the start. A disabled queue refuses
            every frame, like a started-but-disabled RX ring that must deliver nothing.
        on_ready: called (synchronously, from ``deliver``) when the backlog goes from empty
            to non-empty; must not block or raise.
    """

    __slots__ = (
        "_accepted",
        "_capacity",
        "_dropped_disabled",
        "_dropped_full",
        "_enabled",
        "_frames",
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
        self._frames: deque[bytes] = deque()
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
            self._dropped_disabled += len(self._frames)
            self._frames.clear()

    def deliver(self, frame: bytes) -> bool:
        """Append ``frame`` unless the queue is disabled or full (not a checkpoint)."""
        frames = self._frames
        if not self._enabled:
            self._dropped_disabled += 1
            return False
        if len(frames) >= self._capacity:
            self._dropped_full += 1
            return False
        frames.append(frame)
        self._accepted += 1
        if len(frames) == 1:
            if self._lot:
                self._lot.unpark_all()
            if self._on_ready is not None:
                self._on_ready()
        return True

    def __len__(self) -> int:
        return len(self._frames)

    def peek_nowait(self) -> bytes:
        """Return the oldest frame without taking it.

        Raises:
            trio.WouldBlock: the backlog is empty.
        """
        if not self._frames:
            raise trio.WouldBlock
        return self._frames[0]

    def get_nowait(self) -> bytes:
        """Take the oldest frame.

        Raises:
            trio.WouldBlock: the backlog is empty.
        """
        if not self._frames:
            raise trio.WouldBlock
        return self._frames.popleft()

    def clear(self) -> int:
        """Throw the backlog away (not counted as a drop); return how many frames it held."""
        count = len(self._frames)
        self._frames.clear()
        return count

    async def wait_frames(self) -> None:
        """Wait until at least one frame is queued.

        Always a checkpoint. Cancellation leaves the queue unchanged.
        """
        if self._frames:
            await trio.lowlevel.checkpoint()
            return
        await self._lot.park()

    def statistics(self) -> QueueStatistics:
        """Return a snapshot of the counters."""
        return QueueStatistics(
            name=self._name,
            enabled=self._enabled,
            queued=len(self._frames),
            capacity=self._capacity,
            accepted=self._accepted,
            dropped_full=self._dropped_full,
            dropped_disabled=self._dropped_disabled,
        )


@final
class MultiQueuePort:
    """One switch port over several RX queues (virtio-net MQ), one :class:`PortQueue` each.

    The TX side calls :meth:`note_tx` for every frame it sends (then ``switch.forward``);
    ``deliver`` then steers frames from that destination to the same pair's RX queue, and
    frames of flows never transmitted to a queue chosen by a hash of the source MAC, among
    the enabled queues. With no queue enabled, every frame is refused.

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
        self._flows: dict[bytes, PortQueue] = {}
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

    def note_tx(self, pair: int, frame: bytes) -> None:
        """Remember that the flow to ``frame``'s destination is sent on ``pair``."""
        if frame[0] & 1 or len(frame) < ETH_HEADER_LEN:
            return  # multicast or runt: no flow to steer
        flows = self._flows
        if len(flows) >= _MAX_FLOWS:
            flows.clear()  # only a steering hint: start afresh rather than grow
        flows[frame[:6]] = self.queues[pair]

    def deliver(self, frame: bytes) -> bool:
        """Queue ``frame`` on the RX queue its flow steers to (not a checkpoint)."""
        enabled = self._enabled
        if not enabled:
            self.dropped_no_queue += 1
            return False
        source = frame[6:12]
        queue = self._flows.get(source)
        if queue is None or not queue.enabled:
            queue = enabled[hash(source) % len(enabled)]
        return queue.deliver(frame)
