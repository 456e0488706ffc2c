"""What a switch port is, and what the switch tells about its ports: protocols and records.

:class:`SwitchPort` is all the switch needs of a port; a :class:`FramePort` also takes whole
batches. The statistics are frozen snapshots (trio's ``statistics()`` convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .net_frames import Frames

__all__ = ["FramePort", "PortStatistics", "SwitchPort", "SwitchStatistics"]


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


class FramePort(SwitchPort, Protocol):
    """A port that takes a batch of frames in one call (the virtio RX backlogs)."""

    def deliver_frames(self, frames: Frames) -> tuple[int, int]:
        """Take what it can of ``frames`` (all at least 14 bytes), without blocking.

        Must not raise, like :meth:`SwitchPort.deliver`.

        Returns:
            ``(frames, bytes)`` accepted; the rest count as dropped.
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
