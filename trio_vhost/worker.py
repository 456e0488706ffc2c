"""run_vring(): the worker task that drains one vring through its device.

One worker runs per started vring, in its own cancel scope in the connection's nursery.
The loop is the notification-suppression drain of the virtio spec, owned here so that no
device has to write it: pop a batch, let the device process it, publish the used entries,
signal the call eventfd if the driver wants to be told, and when the ring looks empty
re-enable notifications and look once more before sleeping on the kick eventfd.

Cancellation safety: between popping a batch and publishing its used entries there is no
checkpoint on the synchronous path, so a cancel can only land between batches, where every
popped chain has been completed exactly once and ``next_avail`` is exact; and there is at
least one checkpoint between two batches (an explicit one when more chains wait, else the
wait for the next kick), so a busy ring is always cancellable and never starves the others.
An async device (:attr:`Device.is_async`) awaits inside a batch; a soft stop waits for the
batch to finish, only a hard stop (disconnect, shutdown, a soft stop past its grace)
abandons it. A drained ring is watched for up to :data:`SPIN_MAX` before the worker
sleeps (:class:`_Spin`); that watch is not a checkpoint, but it is bounded and skipped
whenever another task is ready to run.

Where a worker stops, whatever stopped it (soft stop, hard stop, a broken ring, a device
bug), it leaves ``handle.final_state`` at a chain boundary: every chain before
``next_avail`` has been completed exactly once, and the chains of a batch that never
completed (none of a batch is published unless all of it is) are handed back by moving
``next_avail`` to the batch's first chain. A restart from that state (GET_VRING_BASE then
SET_VRING_BASE, SLEEP/WAKE, a memory-table change, a new SET_VRING_KICK after a repair)
therefore neither loses a chain nor completes one twice; a device that was cancelled in
the middle of a batch sees those chains again.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

import numpy as np
import trio

from .device import QueueContext
from .errors import DeviceError, GuestMemoryError, VirtqueueError
from .vring.layout import used_ring_size

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from ._io.eventfd import EventFd
    from .device import Completion, Device
    from .inflight import InflightQueue
    from .mem.table import MemoryTable
    from .slot import RingWorkerHandle, VringSlot
    from .vring.batch import ChainBatch
    from .vring.chain import DescriptorChain
    from .vring.split import SplitQueue
    from .vring.state import QueueState

__all__ = ["DEFAULT_MAX_BATCH", "POLL_INTERVAL", "SPIN_MAX", "run_vring"]

LOGGER = logging.getLogger(__name__)

#: The most chains taken in one pass; large batches amortise numpy's per-call cost.
DEFAULT_MAX_BATCH: Final = 256


def batch_limit(queue_size: int) -> int:
    """The batch size for a ring: a quarter of it (at most DEFAULT_MAX_BATCH).

    Taking the whole ring at once leaves the driver nothing to refill while the device
    works; a quarter keeps both sides busy (measured in bench/bench_vring.py: 1.3-1.7x at
    N=256).
    """
    return max(1, min(DEFAULT_MAX_BATCH, queue_size // 4))


#: How often a ring without a kick eventfd (NOFD: the frontend asked for polling) is polled.
POLL_INTERVAL: Final = 0.001

#: The longest a worker that has just drained its ring watches ``avail.idx`` before it
#: re-arms notifications and sleeps. A driver that keeps requests in flight refills the ring
#: within tens of microseconds of our call; sleeping through that gap costs more CPU than
#: watching it (an epoll round trip, a kick, and cold caches after the CPU idled: measured
#: with bench/bench_peers.py, blk 4K reads at queue depth 1 went from ~100 to ~70 us of CPU
#: per request and from 9k to 14k IOPS, and at depth 32 from 6.5 to 5.9 us; QEMU's
#: iothreads poll the same way, ``poll-max-ns``). The window adapts (:class:`_Spin`); its
#: ceiling is above the ~40-70 us a depth-1 driver takes to answer, so that it settles
#: rather than shrinks and grows around it.
SPIN_MAX: Final = 100e-6
#: The smallest window worth spinning; below it the worker does not spin at all.
SPIN_MIN: Final = 4e-6


async def run_vring(
    *,
    slot: VringSlot,
    queue: SplitQueue,
    memory: MemoryTable,
    device: Device,
    handle: RingWorkerHandle,
    max_batch: int | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Drain ``queue`` through ``device`` until stopped; always a checkpoint.

    Resource handling: the worker owns none of the slot's fds; it reads the kick eventfd
    and writes the call eventfd. On return, however it stopped (also when the ring broke
    or the worker was cancelled), ``handle.final_state`` holds the queue state to resume
    from (see the module docstring) and ``handle.stopped`` is set.

    Error handling: a :class:`VirtqueueError` (or a guest address outside memory) stops
    this ring only: the err eventfd is signalled and the worker returns normally, so the
    other rings and the connection keep serving. A device that returns a completion for a
    chain it was not given raises :class:`DeviceError`, which is handled the same way.
    """
    context = QueueContext(slot.index, memory, enabled=slot.enabled)
    with handle.scope:
        task_status.started()
        try:
            # Inside the try: whatever the device raises here, ``stopped`` must be set, or
            # the control task would wait for it forever (in a shielded scope at teardown).
            device.queue_started(slot.index, handle.nudge)
            if max_batch is None:
                wanted = device.max_batch
                max_batch = batch_limit(queue.size) if wanted is None else wanted
            limit = max(1, min(max_batch, queue.size))
            if handle.inflight is not None:
                await _resubmit(slot, queue, device, handle, context, limit)
            await _drain(slot, queue, device, handle, context, limit)
        except (VirtqueueError, GuestMemoryError, DeviceError) as exc:
            _break(slot, handle)
            LOGGER.error("vring %d stopped: %s", slot.index, str(exc))
            _release_frames(exc)
        except Exception as exc:
            # A bug in the device: it costs this ring, not the connection or the process.
            _break(slot, handle)
            LOGGER.error("vring %d stopped: device raised\n%s", slot.index, _traceback_text(exc))
            _release_frames(exc)
        finally:
            handle.final_state = _resume_state(queue, handle.in_flight)
            handle.stopped.set()
            _queue_stopped(device, slot.index)


def _traceback_text(exc: BaseException) -> str:
    # Text, not exc_info: a handler that keeps records (pytest's capture, a MemoryHandler)
    # would keep the traceback, its frames, and their views of guest memory alive.
    return "".join(traceback.format_exception(exc)).rstrip()


def _release_frames(exc: BaseException) -> None:
    """Cut ``exc`` (and its cause and context) loose from the frames it was raised through.

    A ring failure's frames hold the queue's and the device's views of guest memory. An
    error raised inside trio's I/O layer sits in a reference cycle with its own traceback,
    and anything that keeps the exception (a log record's args) keeps the frames: either
    way the mapping, and the fd mmap keeps, would outlive the session. So the finished
    frames' locals are cleared and the tracebacks dropped, once the error has been logged.
    Pass exceptions to the logger as text: the record must not keep them either.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        err.__traceback__ = None
        todo += (err.__cause__, err.__context__)
        if isinstance(err, BaseExceptionGroup):
            todo += err.exceptions


def _resume_state(queue: SplitQueue, abandoned: int) -> QueueState:
    """Return where to resume: the queue's position, minus a batch that never completed."""
    state = queue.state()
    if abandoned:
        state = state.with_indices((state.next_avail - abandoned) & 0xFFFF, state.next_used)
    return state


def _queue_stopped(device: Device, index: int) -> None:
    try:
        device.queue_stopped(index)
    except Exception as exc:
        # Raised from a finally it would replace the worker's own outcome and end the
        # connection; a device bug costs the device, not the session.
        LOGGER.error("vring %d: device raised in queue_stopped\n%s", index, _traceback_text(exc))
        _release_frames(exc)


def _break(slot: VringSlot, handle: RingWorkerHandle) -> None:
    handle.broken = True
    slot.broken = True
    slot.signal_error()


class _Spin:
    """Watch a drained ring for a little while before sleeping, adapting how long.

    Like QEMU's adaptive polling: after each sleep, if the driver came back within
    :data:`SPIN_MAX` but after the current window, the window doubles (from
    :data:`SPIN_MIN`); if it took longer than SPIN_MAX, spinning would not have caught it
    and the window halves (to none). A worker never spins while another task is ready to
    run (another ring, the control task): the spin is time taken from them.
    """

    __slots__ = ("_clock", "_since", "window")

    def __init__(self) -> None:
        self.window = SPIN_MAX
        self._since: float | None = None
        self._clock = time.perf_counter

    def spin(self, has_available: Callable[[], bool]) -> bool:
        """Return True as soon as buffers are available, False when the window is over.

        Not a checkpoint: it runs for at most the window, then the caller sleeps.
        """
        now = self._clock()
        self._since = now
        if self.window < SPIN_MIN or trio.lowlevel.current_statistics().tasks_runnable:
            return False
        end = now + self.window
        clock = self._clock
        while not has_available():
            if clock() >= end:
                return False
        self._since = None  # caught: no sleep to learn from
        return True

    def skip(self) -> None:
        """The ring refilled before the worker slept: nothing to learn from this gap."""
        self._since = None

    def woke(self) -> None:
        """The worker woke from the sleep that followed a spin: adapt the window."""
        if self._since is None:
            return
        idle = self._clock() - self._since
        self._since = None
        if idle > SPIN_MAX:
            self.window = self.window / 2 if self.window >= 2 * SPIN_MIN else 0.0
        elif idle > self.window:
            self.window = min(max(2 * self.window, SPIN_MIN), SPIN_MAX)


async def _drain(
    slot: VringSlot,
    queue: SplitQueue,
    device: Device,
    handle: RingWorkerHandle,
    context: QueueContext,
    max_batch: int,
) -> None:
    kick = slot.kick
    arrays = device.uses_arrays and not device.is_async
    spin = _Spin()
    while not handle.stop_requested.is_set():
        if not slot.enabled and not device.drains_when_disabled(slot.index):
            # Spec, "Ring states": a disabled ring must cause no side effects; this device
            # cannot process one without any, so it waits for SET_VRING_ENABLE (which
            # nudges it) and the chains stay in the ring meanwhile.
            await _wait_for_kick(kick, handle)
            continue
        context.enabled = slot.enabled
        wanted = device.chains_wanted(context)
        if wanted == 0:
            # Nothing to put in buffers (net RX without frames): sleep until the device
            # wakes us (it holds handle.nudge) or the driver kicks.
            await _wait_for_kick(kick, handle)
            continue
        limit = max_batch if wanted is None else min(wanted, max_batch)
        if arrays:
            popped = _process_arrays(queue, device, handle, context, limit)
        else:
            popped = await _process_chains(queue, device, handle, context, limit)
        if popped:
            if slot.call is not None and queue.needs_notification():
                slot.call.write(1)
            if queue.has_available() or spin.spin(queue.has_available):
                # A checkpoint between two batches: where a cancel lands, and where the
                # control task and the other rings get their turn.
                await trio.lowlevel.checkpoint()
                continue
            # Drained: straight to re-arming, whose wait for a kick is the checkpoint.
        # The ring looks empty: ask for kicks again, then look once more, because the
        # driver may have added buffers after our read but before it saw the request.
        again = queue.enable_notifications()
        if handle.dirty.active:  # it wrote the used ring's flags or avail_event
            handle.dirty.log_used(*_used_log_range(queue, handle))
        if again:
            spin.skip()
            if popped:
                await trio.lowlevel.checkpoint()  # never two batches without one between
            continue
        await _wait_for_kick(kick, handle)
        spin.woke()
        queue.disable_notifications()
        if handle.dirty.active:
            handle.dirty.log_used(*_used_log_range(queue, handle))


async def _process_chains(
    queue: SplitQueue,
    device: Device,
    handle: RingWorkerHandle,
    context: QueueContext,
    limit: int,
) -> int:
    """Pop up to ``limit`` chains, have the device process them, publish; return the count."""
    chains = queue.pop_batch(limit)
    if chains:
        # Until the batch is published, a stop hands its chains back (_resume_state).
        handle.in_flight = len(chains)
        if handle.inflight is not None:
            handle.inflight.popped([chain.head for chain in chains])
        if device.is_async:
            completions = await device.process_batch_async(context, chains)
        else:
            completions = device.process_batch(context, chains)
        _complete(queue, chains, completions, handle.inflight)
        handle.in_flight = 0
        if handle.dirty.active:  # LOG_ALL: mark what the batch wrote (mem/dirty.py)
            handle.dirty.log_chains(chains, completions, *_used_log_range(queue, handle))
    return len(chains)


def _used_log_range(queue: SplitQueue, handle: RingWorkerHandle) -> tuple[int, int]:
    """Where the used ring's writes are logged: (address, the whole used ring's size)."""
    gpa = handle.used_log_gpa
    return (queue.state().used_gpa if gpa is None else gpa), used_ring_size(queue.size)


def _process_arrays(
    queue: SplitQueue,
    device: Device,
    handle: RingWorkerHandle,
    context: QueueContext,
    limit: int,
) -> int:
    """The vectorised twin of :func:`_process_chains` for devices with ``uses_arrays``.

    No per-chain Python objects: the batch's heads go back to the used ring as one array,
    so every popped head is completed exactly once by construction.
    """
    batch = queue.pop_arrays(limit)
    if not batch:
        return 0
    handle.in_flight = batch.count
    if handle.inflight is not None:
        handle.inflight.popped(batch.heads)
    written = device.process_arrays(context, batch)
    _complete_arrays(queue, batch, written, handle.inflight)
    handle.in_flight = 0
    if handle.dirty.active:  # LOG_ALL: mark what the batch wrote (mem/dirty.py)
        handle.dirty.log_arrays(batch, written, *_used_log_range(queue, handle))
    return batch.count


def _complete_arrays(
    queue: SplitQueue,
    batch: ChainBatch,
    written: int | NDArray[np.uint32],
    inflight: InflightQueue | None,
) -> None:
    """Publish a whole array batch with the lengths the device returned."""
    lengths = (
        np.full(batch.count, written, dtype=np.uint32) if isinstance(written, int) else written
    )
    if inflight is not None:
        inflight.publishing(batch.heads)
    try:
        queue.add_used_arrays(batch.heads, lengths)
    except ValueError as exc:  # lengths the ring cannot take: a device bug
        raise DeviceError(f"device returned invalid used lengths: {exc}") from exc
    if inflight is not None:
        inflight.published(batch.heads, queue.next_used)


async def _resubmit(
    slot: VringSlot,
    queue: SplitQueue,
    device: Device,
    handle: RingWorkerHandle,
    context: QueueContext,
    limit: int,
) -> None:
    """Complete the chains a previous backend left in flight (INFLIGHT_SHMFD), first.

    They are no longer in the available ring's window: their chains are built from the
    descriptor table, in the order they were popped. A stop before all are done leaves the
    rest marked in the region, to be resubmitted at the next start.
    """
    inflight = handle.inflight
    assert inflight is not None
    heads = inflight.take_resubmit()
    if not len(heads):
        return
    LOGGER.info("vring %d: resubmitting %d in-flight chains", slot.index, len(heads))
    arrays = device.uses_arrays and not device.is_async
    for start in range(0, len(heads), limit):
        while not slot.enabled and not device.drains_when_disabled(slot.index):
            if handle.stop_requested.is_set():
                return
            await _wait_for_kick(slot.kick, handle)
        if handle.stop_requested.is_set():
            return
        context.enabled = slot.enabled
        batch = queue.batch_of(heads[start : start + limit])
        if arrays:
            written = device.process_arrays(context, batch)
            _complete_arrays(queue, batch, written, inflight)
            if handle.dirty.active:
                handle.dirty.log_arrays(batch, written, *_used_log_range(queue, handle))
        else:
            chains = batch.chains
            if device.is_async:
                completions = await device.process_batch_async(context, chains)
            else:
                completions = device.process_batch(context, chains)
            _complete(queue, chains, completions, inflight)
            if handle.dirty.active:
                handle.dirty.log_chains(chains, completions, *_used_log_range(queue, handle))
        if slot.call is not None and queue.needs_notification():
            slot.call.write(1)
        await trio.lowlevel.checkpoint()


def _complete(
    queue: SplitQueue,
    chains: Sequence[DescriptorChain],
    completions: Sequence[Completion],
    inflight: InflightQueue | None = None,
) -> None:
    """Publish a whole batch's used entries, or raise DeviceError having published none."""
    # A completion for a chain the device was not given would hand the guest a
    # descriptor twice: check the heads as a set before anything is published.
    if len(completions) != len(chains) or {h for h, _ in completions} != {c.head for c in chains}:
        raise DeviceError(
            f"device completed {len(completions)} of {len(chains)} chains, or other heads; "
            "every chain of a batch must be completed exactly once"
        )
    heads = [head for head, _ in completions] if inflight is not None else []
    if inflight is not None:
        inflight.publishing(heads)
    try:
        queue.add_used_batch(completions)
    except ValueError as exc:  # a head or length the ring cannot take: a device bug
        raise DeviceError(f"device returned an invalid completion: {exc}") from exc
    if inflight is not None:
        inflight.published(heads, queue.next_used)


async def _wait_for_kick(kick: EventFd | None, handle: RingWorkerHandle) -> None:
    with trio.CancelScope() as idle:
        handle.idle_scope = idle
        if handle.stop_requested.is_set():
            idle.cancel()
        if kick is None:
            await trio.sleep(POLL_INTERVAL)
        else:
            try:
                await kick.wait()
            except trio.ClosedResourceError:
                # The control task closed the kick fd (a new SET_VRING_KICK or teardown);
                # it stops this worker right after.
                await trio.sleep_forever()
    handle.idle_scope = None


def completions_for(chains: list[DescriptorChain], written: int = 0) -> list[Completion]:
    """Return a completion for every chain with ``written`` bytes (a null device)."""
    return [(chain.head, written) for chain in chains]
