"""The device API: what a virtio device written with trio_vhost implements.

:class:`Device` is the Python twin of crosvm's ``Backend`` trait, seen from the device's
side: the server owns the protocol, the memory table and the rings, and calls the device
only for what is device-specific. Every method has a default, so a device implements only
what it needs; an optional request the device leaves alone is answered with
:class:`~trio_vhost.errors.UnsupportedRequest` (NACKed when REPLY_ACK is negotiated).

Data path: a worker pops a batch of descriptor chains from one queue and calls
:meth:`Device.process_batch` (synchronous, the fast path) or, when the device overrides
:meth:`Device.process_batch_async`, awaits it (for devices that wait on I/O). Either
returns exactly one ``(head, bytes_written)`` completion for every chain of the batch: a
batch is published whole or not at all. A device that wants fewer chains says so with
:meth:`Device.chains_wanted`. If a batch never completes (the worker is cancelled in an
async batch, or the device raises), its chains are handed back to the ring and the device
sees them again when the ring restarts: a device must tolerate re-delivery (blk writes the
same data again) rather than have a request lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from .errors import DeviceError, UnsupportedRequest
from .proto.constants import ProtocolFeature, VirtioFeature

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from .backend_channel import FrontendLink
    from .mem.table import MemoryTable
    from .vring.batch import ChainBatch
    from .vring.chain import DescriptorChain

__all__ = ["Completion", "Device", "QueueContext"]

LOGGER = logging.getLogger(__name__)

#: One finished chain: its head index and how many bytes the device wrote into it.
Completion = tuple[int, int]

#: Transport features the library itself implements for every device.
LIBRARY_FEATURES = (
    VirtioFeature.VERSION_1
    | VirtioFeature.PROTOCOL_FEATURES
    | VirtioFeature.RING_INDIRECT_DESC
    | VirtioFeature.RING_EVENT_IDX
    | VirtioFeature.LOG_ALL
)

#: Protocol features the library implements for every device. DEVICE_STATE (bit 19) is
#: beyond QEMU 7.2's mask (bits 0-16): such a frontend never sees it.
LIBRARY_PROTOCOL_FEATURES = (
    ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.DEVICE_STATE
    | ProtocolFeature.LOG_SHMFD
    | ProtocolFeature.SHARED_MEMORY_REGIONS
)


class QueueContext:
    """What a device sees of one running queue while it processes a batch.

    Attributes:
        index: the vring index.
        memory: the guest memory table of the current generation; views made from it must
            not be kept past the call.
        enabled: False while the ring is started but disabled: the device must then
            consume chains without side effects (net: drop TX, deliver no RX).
    """

    __slots__ = ("enabled", "index", "memory")

    def __init__(self, index: int, memory: MemoryTable, *, enabled: bool) -> None:
        self.index = index
        self.memory = memory
        self.enabled = enabled


class Device:
    """Base class for a vhost-user device.

    Subclasses set :attr:`num_queues` and override what they need. The server adds the
    transport features the library implements (:data:`LIBRARY_FEATURES`) to
    :meth:`features`; a device may remove any of them by overriding
    :meth:`offered_features`.
    """

    #: How many vrings the device has (the most GET_QUEUE_NUM may report).
    num_queues: int = 1
    #: The largest queue size the device accepts in SET_VRING_NUM.
    max_queue_size: int = 32768
    #: Device-specific virtio feature bits (bits 0-23 and the device's own above 40).
    device_features: ClassVar[int] = 0
    #: Protocol features the device needs on top of the library's (e.g. CONFIG, MQ).
    device_protocol_features: ClassVar[ProtocolFeature] = ProtocolFeature(0)
    #: Offer the STATUS protocol feature (SET_STATUS / GET_STATUS). An opt-in: QEMU 7.2
    #: acks it whenever it is offered and then drives the device through the status byte:
    #: GET_STATUS + SET_STATUS(FEATURES_OK) after SET_FEATURES, DRIVER_OK only after the
    #: rings were started (so processing is never gated on DRIVER_OK), and SET_STATUS(0)
    #: before the GET_VRING_BASE of each ring when it stops the device (also for a VM
    #: pause). The session answers status 0 by stopping every ring where it is, keeping
    #: the indices GET_VRING_BASE reports and the device's state (a pause is no reset).
    #: Opt in when that is right for the device.
    offers_status: ClassVar[bool] = False
    #: Offer INFLIGHT_SHMFD (GET/SET_INFLIGHT_FD): the session records popped and completed
    #: chains in a region the frontend keeps, and after a backend crash the new backend
    #: resubmits the chains that were in flight (:mod:`trio_vhost.inflight`). An opt-in for
    #: devices whose requests may be redone (blk); a resubmitted chain is processed again.
    offers_inflight: ClassVar[bool] = False

    # -- negotiation -------------------------------------------------------------------

    def offered_features(self) -> int:
        """Return the virtio feature bits offered in GET_FEATURES."""
        return int(LIBRARY_FEATURES) | self.device_features

    def offered_protocol_features(self) -> int:
        """Return the protocol feature bits offered in GET_PROTOCOL_FEATURES."""
        features = LIBRARY_PROTOCOL_FEATURES | self.device_protocol_features
        if self.offers_status:
            features |= ProtocolFeature.STATUS
        if self.offers_inflight:
            features |= ProtocolFeature.INFLIGHT_SHMFD
        return int(features)

    def ack_features(self, features: int) -> None:
        """Take note of the virtio features the driver acked (SET_FEATURES)."""

    def queue_num(self) -> int:
        """Return the answer to GET_QUEUE_NUM (net devices count queue pairs)."""
        return self.num_queues

    # -- config space ------------------------------------------------------------------

    def read_config(self, offset: int, size: int) -> bytes:
        """Return exactly ``size`` bytes of config space from ``offset`` (GET_CONFIG)."""
        raise UnsupportedRequest("device has no config space")

    def write_config(self, offset: int, data: bytes, flags: int) -> None:
        """Write config space (SET_CONFIG); ``flags`` 1 means a migration write."""
        raise UnsupportedRequest("device config space is read-only")

    def shared_memory_regions(self) -> Sequence[tuple[int, int]]:
        """Return the device's VIRTIO shared memory regions as ``(shmid, length)`` pairs.

        crosvm asks for them with GET_SHARED_MEMORY_REGIONS (its protocol bit 31) to size
        what it maps for the device (virtio-fs DAX windows, virtio-gpu host-visible
        memory). At most 256, with distinct u8 ids. The default is none.
        """
        return ()

    # -- lifecycle ---------------------------------------------------------------------

    def reset(self) -> None:
        """Return to the initial state (RESET_DEVICE, RESET_OWNER, disconnect)."""

    #: The connected frontend (between :meth:`frontend_attached` and
    #: :meth:`frontend_detached`), for messages the device sends on its own initiative.
    frontend: FrontendLink | None = None

    def frontend_attached(self, link: FrontendLink) -> None:
        """A frontend connected; ``link`` reaches it until :meth:`frontend_detached`.

        E.g. ``await self.frontend.config_changed()`` after the config space changed
        (CONFIG_CHANGE_MSG on the back-end channel), from a task of the device's own,
        never from a method the session calls. The default keeps it in :attr:`frontend`.
        """
        self.frontend = link

    def frontend_detached(self) -> None:
        """The frontend's connection ended; :attr:`frontend` goes back to None."""
        self.frontend = None

    def queue_started(self, index: int, wake: Callable[[], None]) -> None:
        """Called when a vring's worker starts (after SET_VRING_KICK).

        ``wake`` makes the worker look at the ring again if it is idle; a device that
        produces work on its own (net RX when a frame arrives) keeps it and calls it.
        It must not be called after :meth:`queue_stopped` for the same index.
        """

    def queue_stopped(self, index: int) -> None:
        """Called when a vring's worker has stopped at a chain boundary."""

    # -- device state (SNAPSHOT / RESTORE, SET_DEVICE_STATE_FD) ----------------------------

    def save_state(self) -> bytes:
        """Return the device's own state, to be restored by :meth:`load_state`.

        Called only while every ring is stopped. The bytes go into the snapshot as they
        are (:mod:`trio_vhost.snapshot`); version them. The default, for a device without
        state beyond what the session snapshots itself, is ``b""``.
        """
        return b""

    def load_state(self, data: bytes) -> None:
        """Take over the state :meth:`save_state` returned, on a fresh device.

        Called only while every ring is stopped, before any ring restarts. Must either
        apply all of ``data`` or change nothing and raise
        :class:`~trio_vhost.errors.DeviceError` (malformed bytes, another version, a
        device configured differently). The default accepts only ``b""``.
        """
        if data:
            raise DeviceError(f"this device keeps no state, the snapshot has {len(data)} bytes")

    # -- data path ---------------------------------------------------------------------

    #: Set when the device awaits I/O: the worker then awaits
    #: :meth:`process_batch_async` instead of calling :meth:`process_batch`.
    is_async: ClassVar[bool] = False
    #: Whether a started but disabled ring is drained through the device (with
    #: ``queue.enabled`` False, e.g. net drops TX) or left alone until it is enabled.
    process_disabled_rings: ClassVar[bool] = False

    #: Set to have the worker call :meth:`process_arrays` with whole-batch numpy arrays
    #: instead of :meth:`process_batch` with one object per chain (synchronous devices).
    uses_arrays: ClassVar[bool] = False
    #: The most chains a worker pops at once (capped at the ring size); None: a quarter
    #: of the ring, at most 256. A device whose per-batch cost dominates (a net switch
    #: copying small frames) takes whole rings.
    max_batch: ClassVar[int | None] = None

    def process_arrays(self, queue: QueueContext, batch: ChainBatch) -> int | NDArray[np.uint32]:
        """Process a whole batch given as arrays; return the used lengths.

        Return one int for every chain, or an array of ``batch.count`` lengths, in the
        order of ``batch.heads``. Three views of the same chains, all already checked
        against guest memory (:mod:`trio_vhost.vring.batch`):

        * single-buffer chains (``batch.simple``) one row each in ``batch.addr``,
          ``batch.length``, ``batch.writable``, ``batch.region``/``batch.offset`` (into
          ``batch.table.regions``);
        * every chain the queue followed, one buffer per row, in ``batch.segments`` (chain
          ``i`` owns rows ``segments.start[i]:segments.start[i + 1]``): the view for
          multi-buffer requests (virtio-blk's header, data, status);
        * the few chains walked one by one (indirect or odd) in ``batch.walked``; and
          any chain as a :class:`DescriptorChain` via ``batch.chain(i)``.

        The default hands ``batch.chains`` to :meth:`process_batch` and completes every
        chain with the length it reports.
        """
        completions = dict(self.process_batch(queue, batch.chains))
        return np.array([completions[int(head)] for head in batch.heads], dtype=np.uint32)

    def drains_when_disabled(self, index: int) -> bool:
        """Whether a started but disabled ring ``index`` is still drained (net TX)."""
        return self.process_disabled_rings

    def chains_wanted(self, queue: QueueContext) -> int | None:
        """How many chains the device can use now; None means as many as there are.

        The worker pops at most this many; 0 makes it sleep until woken (see
        :meth:`queue_started`) or kicked. Net RX returns the number of frames waiting.
        """
        return None

    def process_batch(
        self, queue: QueueContext, chains: Sequence[DescriptorChain]
    ) -> Sequence[Completion]:
        """Process a batch of chains synchronously and return their completions.

        The default completes every chain with nothing written, like a null device.
        Raising :class:`~trio_vhost.errors.VirtqueueError` stops this ring only.
        """
        return [(chain.head, 0) for chain in chains]

    async def process_batch_async(
        self, queue: QueueContext, chains: Sequence[DescriptorChain]
    ) -> Sequence[Completion]:
        """Process a batch of chains, awaiting I/O; used when :attr:`is_async` is set.

        A checkpoint when overridden. Cancellation (only on disconnect or shutdown) may
        abandon chains that were not completed.
        """
        return self.process_batch(queue, chains)
