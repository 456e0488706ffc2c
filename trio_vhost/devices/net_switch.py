"""An L2 learning switch between ports, independent of how a port moves its frames.

A port is anything with a ``name`` and a synchronous ``deliver(frame) -> bool``
(:class:`SwitchPort`): a vhost-user virtio-net connection, a TAP device, a test double. A
port that can take a whole batch also has ``deliver_frames(frames) -> (count, bytes)``
(:class:`FramePort`); the switch hands such a port its share of a batch in one call.

:meth:`Switch.forward` (one frame) and :meth:`Switch.forward_frames` (a batch, the virtio
fast path) run in the task that received the frames (a TX vring worker, a TAP reader) and
hand them to the destination ports right away. They never block and never await: a port
with no room says so and the switch counts a drop, so a guest that posts no RX buffers
cannot stall the traffic of the others.

Frames are immutable (``bytes``, or :class:`~trio_vhost.devices.net_frames.Frames` for a
batch): one object can be delivered to every port of a flood and sit in several backlogs
without a copy. A frame carries no virtio-net header; the virtio adapter strips it on TX and
prepends it on RX.

A batch is switched with a handful of numpy operations and Python work per *distinct*
address, not per frame: the MAC keys of all frames come from one gather, sources are learned
once each, destinations looked up once each, and the frames for one destination leave as one
subset. The outcome (deliveries, drops, every counter) is the one :meth:`Switch.forward`
would give frame by frame (a model test checks it), with two exceptions: frames for
different ports may be delivered in another order (each port still gets its own in order),
and a port attached from inside a delivery gets frames from the next batch on (a detached
one gets nothing more at once, as with single frames). A batch whose frames would teach
each other, or that would fill the MAC table, is switched frame by frame.

The RX backlogs of virtio ports (:class:`PortQueue`, :class:`MultiQueuePort`) live in
:mod:`trio_vhost.devices.net_backlog`, the port protocols and the statistics records in
:mod:`trio_vhost.devices.net_port`; all are re-exported here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final, final

import numpy as np

from .net_backlog import DEFAULT_BACKLOG as DEFAULT_BACKLOG
from .net_backlog import MultiQueuePort as MultiQueuePort
from .net_backlog import PortQueue as PortQueue
from .net_backlog import QueueStatistics as QueueStatistics
from .net_frames import Frames, mac_key
from .net_port import FramePort as FramePort
from .net_port import PortStatistics as PortStatistics
from .net_port import SwitchPort as SwitchPort
from .net_port import SwitchStatistics as SwitchStatistics
from .net_spec import ETH_ADDR_LEN, ETH_HEADER_LEN

__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_MACS",
    "FramePort",
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
#: A full table is swept for aged entries at most this often (seconds of the switch clock).
_SWEEP_INTERVAL: Final = 1.0


@final
class _Member:
    """One attached port and its counters (mutable; snapshots are :class:`PortStatistics`)."""

    __slots__ = (
        "active",
        "deliver",
        "deliver_frames",
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
        #: the port's batch delivery, or None: then the switch delivers frame by frame
        self.deliver_frames: Callable[[Frames], tuple[int, int]] | None = getattr(
            port, "deliver_frames", None
        )
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
        #: MAC key (net_frames.mac_key) -> where it was learned and when last seen
        self._table: dict[int, _MacEntry] = {}
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
        self._forward_one(src, frame, self._clock())

    def _forward_one(self, src: _Member, frame: bytes, now: float) -> None:
        """Learn from, and deliver, one frame of at least an Ethernet header."""
        source = int.from_bytes(frame[6:12], "little")
        entry = self._table.get(source)
        if entry is None:
            # only valid sources are ever learned: check validity here, off the hot path
            if source & 1 or not source:
                src.rx_invalid_source += 1
                return
            self._learn(source, src, now)
        else:
            if entry.member is not src:
                entry.member = src
                self._moved += 1
            entry.seen = now
        dst = self._route(int.from_bytes(frame[:6], "little"), now)
        if dst is src:
            src.rx_filtered += 1
            return
        if dst is not None:
            targets: tuple[_Member, ...] = (dst,)
        else:
            self._flooded += 1
            targets = self._members
        size = len(frame)
        for dst in targets:
            if dst is src or not dst.active:
                continue
            if dst.deliver(frame):
                dst.tx_frames += 1
                dst.tx_bytes += size
            else:
                dst.tx_dropped += 1

    def _route(self, key: int, now: float) -> _Member | None:
        """Return the member ``key`` is learned on, or None to flood (group, unknown, aged)."""
        if key & 1:
            return None
        entry = self._table.get(key)
        if entry is None:
            return None
        if now - entry.seen <= self._max_age:
            return entry.member
        del self._table[key]
        self._aged_out += 1
        return None

    def forward_frames(self, src_port: SwitchPort, frames: Frames) -> None:
        """Switch a batch of frames received from ``src_port``, in order.

        The batch twin of :meth:`forward`, with the same outcome (see the module
        docstring); not a checkpoint.
        """
        src = self._ports.get(id(src_port))
        count = frames.count
        if src is None:
            self._unknown_source += count
            return
        if not count:
            return
        src.rx_frames += count
        src.rx_bytes += frames.total
        if frames.shortest < ETH_HEADER_LEN:
            whole = frames.length >= ETH_HEADER_LEN
            kept = int(np.count_nonzero(whole))
            src.rx_runts += count - kept
            if not kept:
                return
            frames = frames.subset(whole)
        now = self._clock()
        common = frames.common_addresses()
        if common is not None:  # the usual batch: one flow
            dst, source = common
            if source & 1 or not source:
                src.rx_invalid_source += frames.count
            elif self._learn_batch(src, [source], [frames.count], [dst], now):
                self._forward_each(src, frames, now)
            else:
                self._send(src, self._route(dst, now), frames)
            return
        self._forward_mixed(src, frames, now)

    def _forward_mixed(self, src: _Member, frames: Frames, now: float) -> None:
        """:meth:`forward_frames` for a batch of several flows (addresses as arrays)."""
        dst, source = frames.macs()
        valid = ((source & 1) == 0) & (source != 0)
        kept = int(np.count_nonzero(valid))
        if kept < frames.count:
            src.rx_invalid_source += frames.count - kept
            if not kept:
                return
            frames = frames.subset(valid)
            dst, source = frames.macs()
        keys, first, counts = np.unique(source, return_index=True, return_counts=True)
        order = np.argsort(first)  # learn in the order the frames taught, as one by one
        targets: list[int] = np.unique(dst).tolist()
        if self._learn_batch(src, keys[order].tolist(), counts[order].tolist(), targets, now):
            self._forward_each(src, frames, now)
            return
        routes = [self._route(key, now) for key in targets]
        where = np.searchsorted(targets, dst)  # targets is sorted (np.unique)
        flood = np.array([route is None for route in routes], dtype=np.bool_)[where]
        flooded = int(np.count_nonzero(flood))
        self._flooded += flooded
        if src in routes:
            echo = np.array([route is src for route in routes], dtype=np.bool_)[where]
            src.rx_filtered += int(np.count_nonzero(echo))
        # One subset per destination port, in frame order: a port may get some frames of
        # the batch by unicast and others by flooding.
        for member in dict.fromkeys([*self._members, *routes]):
            if member is None or member is src:
                continue
            mine = np.array([route is member for route in routes], dtype=np.bool_)[where]
            if flooded:
                mine |= flood
            if mine.any():
                self._deliver(member, frames.subset(mine))

    def _forward_each(self, src: _Member, frames: Frames, now: float) -> None:
        for index in range(frames.count):
            self._forward_one(src, frames.frame(index), now)

    def _learn_batch(
        self, src: _Member, sources: list[int], counts: list[int], dsts: list[int], now: float
    ) -> bool:
        """Learn the (valid) ``sources`` of a batch from ``src`` (``counts`` frames each).

        Frame by frame, a frame is switched with what the frames before it taught; at
        once, with what the whole batch taught. The two differ only when a frame goes to
        an address that the batch itself learns anew, moves, or revives from aged out, and
        when the table fills up (a sweep for room would see the table in another state).
        Returns True, having learned nothing, in those cases: the caller then switches the
        batch frame by frame.
        """
        table, horizon = self._table, now - self._max_age
        news = [
            key
            for key in sources
            if (e := table.get(key)) is None or e.member is not src or e.seen < horizon
        ]
        if news and (len(table) + len(news) > self._max_macs or not set(news).isdisjoint(dsts)):
            return True
        for key, count in zip(sources, counts, strict=True):
            entry = table.get(key)
            if entry is None:
                self._learn(key, src, now, count)
                continue
            if entry.member is not src:
                entry.member = src
                self._moved += 1
            entry.seen = now
        return False

    def _send(self, src: _Member, target: _Member | None, frames: Frames) -> None:
        """Deliver ``frames`` to ``target``; None floods them to every port but ``src``."""
        if target is src:
            src.rx_filtered += frames.count
            return
        if target is not None:
            self._deliver(target, frames)
            return
        self._flooded += frames.count
        for member in self._members:
            if member is not src:
                self._deliver(member, frames)

    @staticmethod
    def _deliver(member: _Member, frames: Frames) -> None:
        """Hand ``frames`` to one port (in one call when it takes batches) and count."""
        if not member.active:  # detached by a delivery earlier in this batch
            return
        if member.deliver_frames is not None:
            got, got_bytes = member.deliver_frames(frames)
        else:
            got, got_bytes = _deliver_each(member, frames)
        member.tx_frames += got
        member.tx_bytes += got_bytes
        member.tx_dropped += frames.count - got

    def _learn(self, mac: int, member: _Member, now: float, frames: int = 1) -> None:
        """Learn ``mac`` on ``member``; if the table is full, count ``frames`` refusals."""
        table = self._table
        if len(table) >= self._max_macs:
            if now - self._last_sweep >= _SWEEP_INTERVAL:
                self._sweep(now)
            if len(table) >= self._max_macs:
                self._table_full += frames
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
        if len(mac) != ETH_ADDR_LEN:
            return None
        entry = self._table.get(mac_key(mac))
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


def _deliver_each(member: _Member, frames: Frames) -> tuple[int, int]:
    """Deliver a batch frame by frame to a port without ``deliver_frames``."""
    got = got_bytes = 0
    data, deliver = frames.data, member.deliver
    for begin, size in zip(frames.start.tolist(), frames.length.tolist(), strict=True):
        if not member.active:
            break  # a detached port gets nothing more, not even the rest of the batch
        if deliver(data[begin : begin + size]):
            got += 1
            got_bytes += size
    return got, got_bytes
