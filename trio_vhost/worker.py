"""run_vring(): the worker task that drains one vring through its device.

One worker runs per started vring, in its own cancel scope in the connection's nursery.
The loop is the notification-suppression drain of the virtio spec, owned here so that no
device has to write it: pop a batch, let the device process it, publish the used entries,
signal the call eventfd if the driver wants to be told, and when the ring looks empty
re-enable notifications and look once more before sleeping on the kick eventfd.

Cancellation safety: between popping a batch and publishing its used entries there is no
checkpoint on the synchronous path, so a cancel can only land between batches, where every
popped chain has been completed exactly once and ``next_avail`` is exact. An async device
(:attr:`Device.is_async`) awaits inside a batch; a soft stop waits for the batch to finish,
only a hard stop (disconnect, shutdown) abandons it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import trio

from .device import QueueContext
from .errors import DeviceError, GuestMemoryError, VirtqueueError

if TYPE_CHECKING:
    from ._io.eventfd import EventFd
    from .device import Completion, Device
    from .mem.table import MemoryTable
    from .slot import RingWorkerHandle, VringSlot
    from .vring.chain import DescriptorChain
    from .vring.split import SplitQueue

__all__ = ["DEFAULT_MAX_BATCH", "POLL_INTERVAL", "run_vring"]

LOGGER = logging.getLogger(__name__)

#: The most chains taken in one pass; large batches amortise numpy's per-call cost.
DEFAULT_MAX_BATCH: Final = 256
#: How often a ring without a kick eventfd (NOFD: the frontend asked for polling) is polled.
POLL_INTERVAL: Final = 0.001


async def run_vring(
    *,
    slot: VringSlot,
    queue: SplitQueue,
    memory: MemoryTable,
    device: Device,
    handle: RingWorkerHandle,
    max_batch: int = DEFAULT_MAX_BATCH,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Drain ``queue`` through ``device`` until stopped; always a checkpoint.

    Resource handling: the worker owns none of the slot's fds; it reads the kick eventfd
    and writes the call eventfd. On return ``handle.final_state`` holds the queue state to
    resume from (None if the ring broke) and ``handle.stopped`` is set.

    Error handling: a :class:`VirtqueueError` (or a guest address outside memory) stops
    this ring only: the err eventfd is signalled and the worker returns normally, so the
    other rings and the connection keep serving. A device that returns a completion for a
    chain it was not given raises :class:`DeviceError`, which is handled the same way.
    """
    context = QueueContext(slot.index, memory, enabled=slot.enabled)
    with handle.scope:
        task_status.started()
        device.queue_started(slot.index, handle.nudge)
        try:
            await _drain(slot, queue, device, handle, context, max_batch)
        except (VirtqueueError, GuestMemoryError, DeviceError) as exc:
            _break(slot, handle)
            LOGGER.error("vring %d stopped: %s", slot.index, exc)
        except Exception:
            # A bug in the device: it costs this ring, not the connection or the process.
            _break(slot, handle)
            LOGGER.exception("vring %d stopped: device raised", slot.index)
        finally:
            if not handle.broken:
                handle.final_state = queue.state()
            handle.stopped.set()
            device.queue_stopped(slot.index)


def _break(slot: VringSlot, handle: RingWorkerHandle) -> None:
    handle.broken = True
    slot.broken = True
    slot.signal_error()


async def _drain(
    slot: VringSlot,
    queue: SplitQueue,
    device: Device,
    handle: RingWorkerHandle,
    context: QueueContext,
    max_batch: int,
) -> None:
    kick = slot.kick
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
        chains = queue.pop_batch(max_batch if wanted is None else min(wanted, max_batch))
        if chains:
            if device.is_async:
                completions = await device.process_batch_async(context, chains)
            else:
                completions = device.process_batch(context, chains)
            _publish(queue, chains, completions, slot.call)
            await trio.lowlevel.checkpoint()
            continue
        # The ring looks empty: ask for kicks again, then look once more, because the
        # driver may have added buffers after our read but before it saw the request.
        if queue.enable_notifications():
            continue
        await _wait_for_kick(kick, handle)
        queue.disable_notifications()


def _publish(
    queue: SplitQueue,
    chains: Sequence[DescriptorChain],
    completions: Sequence[Completion],
    call: EventFd | None,
) -> None:
    # A completion for a chain the device was not given would hand the guest a
    # descriptor twice: check the heads as a set before anything is published.
    if len(completions) != len(chains) or {h for h, _ in completions} != {c.head for c in chains}:
        raise DeviceError(
            f"device completed {len(completions)} of {len(chains)} chains, or other heads; "
            "every chain of a batch must be completed exactly once"
        )
    try:
        queue.add_used_batch(completions)
    except ValueError as exc:  # a head or length the ring cannot take: a device bug
        raise DeviceError(f"device returned an invalid completion: {exc}") from exc
    if call is not None and queue.needs_notification():
        call.write(1)


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
