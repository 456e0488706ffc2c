"""VringSlot: what the control task knows about one vring, and its worker's lifetime.

A slot collects the vring's configuration (SET_VRING_NUM/ADDR/BASE, the kick/call/err
eventfds, enabled) and owns the worker running it. Only the control task touches a slot;
the worker receives what it needs when it is started and hands back its final
:class:`~trio_vhost.vring.state.QueueState` when it stops.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from .dirty_tracking import NO_TRACKING, DirtyTracking

if TYPE_CHECKING:
    from ._io.eventfd import EventFd
    from .inflight import InflightQueue
    from .proto.messages import VringAddr
    from .vring.state import QueueState

__all__ = ["RingWorkerHandle", "VringSlot"]

LOGGER = logging.getLogger(__name__)


@dataclass(eq=False)
class RingWorkerHandle:
    """The control task's handle on one running worker.

    ``scope`` cancels the worker outright (hard stop); ``stop_requested`` asks it to stop
    at the next chain boundary (soft stop); ``stopped`` is set once it has stopped, with
    the queue state to resume from in ``final_state``, however it stopped (soft, hard, a
    broken ring): chains of a batch that did not complete lie at or after its
    ``next_avail``. ``in_flight`` counts the chains of the batch being processed.
    """

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stop_requested: trio.Event = field(default_factory=trio.Event)
    idle_scope: trio.CancelScope | None = None
    stopped: trio.Event = field(default_factory=trio.Event)
    final_state: QueueState | None = None
    broken: bool = False
    in_flight: int = 0
    #: The ring's records in the INFLIGHT_SHMFD region, when the frontend set one.
    inflight: InflightQueue | None = None
    #: The session's dirty-page logging state (mem/dirty.py); checked once per batch.
    dirty: DirtyTracking = NO_TRACKING
    #: Where writes to the used ring are logged: ``log_guest_addr`` when the ring's
    #: VringAddr has the LOG flag, None for the used ring's own guest address.
    used_log_gpa: int | None = None

    def nudge(self) -> None:
        """Wake the worker if it is idle, so it looks at the ring again."""
        if self.idle_scope is not None:
            self.idle_scope.cancel()

    def request_stop(self) -> None:
        """Ask the worker to stop at the next chain boundary (does not wait)."""
        self.stop_requested.set()
        if self.idle_scope is not None:
            self.idle_scope.cancel()


@dataclass(eq=False)
class VringSlot:
    """Configuration and worker of one vring, as set by the frontend."""

    index: int
    num: int = 0
    addr: VringAddr | None = None
    #: next avail index set by SET_VRING_BASE (and the used index it implies).
    base: int = 0
    #: the used index to resume from; None means "read it from the used ring".
    used_base: int | None = None
    kick: EventFd | None = None
    call: EventFd | None = None
    err: EventFd | None = None
    enabled: bool = False
    started: bool = False
    broken: bool = False
    worker: RingWorkerHandle | None = None

    def close_fds(self) -> None:
        """Close every eventfd this slot holds."""
        for efd in (self.kick, self.call, self.err):
            if efd is not None:
                efd.close()
        self.kick = self.call = self.err = None

    def signal_error(self) -> None:
        """Signal the err eventfd, if there is one (the ring broke)."""
        if self.err is not None:
            try:
                self.err.write(1)
            except OSError:
                LOGGER.debug("vring %d: err eventfd write failed", self.index, exc_info=True)
