"""NetPort: one vhost-user-net socket as one port of an L2 :class:`Switch`.

Vring ``2p`` is receiveq ``p`` and ``2p + 1`` transmitq ``p`` (the control queue stays in
QEMU). TX: the worker pops a batch of chains, copies their frames out of guest memory in one
go (virtio-net header stripped) and hands the batch to the switch. RX: the switch queues
frames for this port in a bounded backlog per queue pair and wakes the RX worker (once per
batch that finds the backlog empty), which takes one guest buffer per frame. A port whose
guest posts no RX buffers drops frames (counted) once its backlog is full; it never blocks
the sender. The batch work itself is in :mod:`trio_vhost.devices.net_datapath`.

Both directions take whole batches (``uses_arrays``): nothing per frame but two memcpys
and the slices that make them. Cancellation cannot split a batch: processing one never
awaits, and the worker publishes its used entries before its next checkpoint. Frames taken
from the backlog for a batch that fails (a broken ring) are lost, as on a real link.

Started-but-disabled rings (spec, "Ring states"): TX is drained and dropped, RX delivers
nothing.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, Final

import numpy as np

from ..device import Completion, Device, QueueContext
from ..errors import DeviceError
from ..proto.constants import ProtocolFeature
from ..vring.chain import ChainReader, ChainWriter
from .net_datapath import MAX_FRAME, fill_rx, stage_tx
from .net_spec import (
    HEADER_SIZE,
    NetConfig,
    NetFeature,
    header_size,
    is_rx_queue,
    pair_of,
    random_mac,
    rx_header,
)
from .net_switch import MultiQueuePort, Switch

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from ..vring.batch import ChainBatch
    from ..vring.chain import DescriptorChain

__all__ = ["NetPort"]

LOGGER = logging.getLogger(__name__)

#: Frames held per RX queue while the guest has no buffers posted.
RX_BACKLOG: Final = 1024

#: save_state(), version 1: u8 version, u8 reserved (0), 6-byte MAC, u16 MTU, u16 queue
#: pairs, u64 RX frames dropped for too small a buffer; little-endian. The MAC is taken
#: over (the guest knows its device by it, and by default it is random); MTU and pairs
#: must match. Not saved: frames waiting in the RX backlog (a network may drop them) and
#: the switch's MAC table, which belongs to the switch, not to one port: it learns the
#: guest's addresses again from its next frame and floods to them until then.
_STATE: Final = struct.Struct("<BB6sHHQ")
_STATE_VERSION: Final = 1


class NetPort(Device):
    """A virtio-net device that is one port of ``switch``.

    Args:
        switch: the switch this port joins (at construction; it stays across reconnects).
        name: the port name in switch statistics.
        pairs: queue pairs offered (MQ; GET_QUEUE_NUM reports pairs).
        mac: the MAC address in config space (random locally administered by default).
        mtu: the MTU in config space.
    """

    device_features: ClassVar[int] = int(
        NetFeature.MAC
        | NetFeature.MRG_RXBUF
        | NetFeature.STATUS
        | NetFeature.MTU
        | NetFeature.CTRL_VQ
        | NetFeature.MQ
    )
    device_protocol_features: ClassVar[ProtocolFeature] = ProtocolFeature.MQ
    uses_arrays: ClassVar[bool] = True
    #: Whole rings per batch: per-batch costs (pop, publish, a wake) are most of a 64-byte
    #: frame's price (measured 1.5 -> 0.9 us/frame at 256 vs 64).
    max_batch: ClassVar[int | None] = 256

    def __init__(
        self,
        switch: Switch,
        name: str,
        *,
        pairs: int = 1,
        mac: bytes | None = None,
        mtu: int = 1500,
    ) -> None:
        if pairs < 1:
            raise ValueError("pairs must be at least 1")
        self.switch = switch
        self.pairs = pairs
        self.num_queues = 2 * pairs
        self.mac = mac or random_mac()
        self.mtu = mtu
        self.config_space = NetConfig(mac=self.mac, max_virtqueue_pairs=pairs, mtu=mtu).encode()
        self.header_len = HEADER_SIZE
        self.port = MultiQueuePort(name, pairs, backlog=RX_BACKLOG, on_ready=self._rx_ready)
        self._wakers: dict[int, Callable[[], None]] = {}
        self.rx_too_small = 0
        #: TX frames longer than MAX_FRAME, dropped unread (not saved with the state)
        self.tx_oversize = 0
        switch.add_port(self.port)

    # -- negotiation and config --------------------------------------------------------------

    def queue_num(self) -> int:
        """GET_QUEUE_NUM counts queue pairs for net (QEMU's reading)."""
        return self.pairs

    def ack_features(self, features: int) -> None:
        self.header_len = header_size(features)

    def read_config(self, offset: int, size: int) -> bytes:
        return self.config_space.ljust(offset + size, b"\0")[offset : offset + size]

    def reset(self) -> None:
        for pair in range(self.pairs):
            self.port.set_enabled(pair, False)
        self._wakers.clear()

    # -- device state --------------------------------------------------------------------------

    def save_state(self) -> bytes:
        return _STATE.pack(_STATE_VERSION, 0, self.mac, self.mtu, self.pairs, self.rx_too_small)

    def load_state(self, data: bytes) -> None:
        if len(data) != _STATE.size:
            raise DeviceError(f"net state of {len(data)} bytes, expected {_STATE.size}")
        version, reserved, mac, mtu, pairs, rx_too_small = _STATE.unpack(data)
        if version != _STATE_VERSION or reserved:
            raise DeviceError(f"net state version {version}, expected {_STATE_VERSION}")
        if (mtu, pairs) != (self.mtu, self.pairs):
            raise DeviceError(
                f"net port (mtu, pairs) {(self.mtu, self.pairs)} does not match the saved "
                f"{(mtu, pairs)}"
            )
        try:
            config = NetConfig(mac=mac, max_virtqueue_pairs=pairs, mtu=mtu).encode()
        except ValueError as exc:
            raise DeviceError(f"net state: {exc}") from exc
        self.mac, self.config_space, self.rx_too_small = mac, config, rx_too_small

    # -- ring lifetime -------------------------------------------------------------------------

    def queue_started(self, index: int, wake: Callable[[], None]) -> None:
        self._wakers[index] = wake
        if is_rx_queue(index):
            self.port.set_enabled(pair_of(index), True)

    def queue_stopped(self, index: int) -> None:
        self._wakers.pop(index, None)
        if is_rx_queue(index):
            self.port.set_enabled(pair_of(index), False)

    def drains_when_disabled(self, index: int) -> bool:
        """TX is drained (and dropped) while disabled; RX is left alone."""
        return not is_rx_queue(index)

    def _rx_ready(self, pair: int) -> None:
        wake = self._wakers.get(2 * pair)
        if wake is not None:
            wake()

    # -- data path -----------------------------------------------------------------------------

    def chains_wanted(self, queue: QueueContext) -> int | None:
        if is_rx_queue(queue.index):
            return len(self.port.queues[pair_of(queue.index)])
        return None

    def process_arrays(self, queue: QueueContext, batch: ChainBatch) -> int | NDArray[np.uint32]:
        if is_rx_queue(queue.index):
            backlog = self.port.queues[pair_of(queue.index)]
            pieces = backlog.take(batch.count)
            used, too_small = fill_rx(batch, pieces, rx_header(self.header_len))
            self.rx_too_small += too_small
            return used
        if not queue.enabled:
            return 0  # spec: a disabled TX ring is processed and its frames discarded
        frames, oversize = stage_tx(batch, self.header_len)
        self.tx_oversize += oversize
        if self.pairs > 1:
            pair = pair_of(queue.index)
            frames.origin = pair
            self.port.note_tx_frames(pair, frames)
        self.switch.forward_frames(self.port, frames)
        return 0

    def process_batch(
        self, queue: QueueContext, chains: Sequence[DescriptorChain]
    ) -> Sequence[Completion]:
        """The per-chain twin of :meth:`process_arrays` (the worker uses the batch one)."""
        if is_rx_queue(queue.index):
            return self._receive(queue, chains)
        return self._transmit(queue, chains)

    def _transmit(self, queue: QueueContext, chains: Sequence[DescriptorChain]) -> list[Completion]:
        done = [(chain.head, 0) for chain in chains]
        if not queue.enabled:
            return done  # spec: a disabled TX ring is processed and its frames discarded
        skip = self.header_len
        pair = pair_of(queue.index)
        for chain in chains:
            if chain.readable_len - skip > MAX_FRAME:
                self.tx_oversize += 1
                continue
            frame = ChainReader(queue.memory, chain).read()[skip:]
            if self.pairs > 1:
                self.port.note_tx(pair, frame)
            self.switch.forward(self.port, frame)
        return done

    def _receive(self, queue: QueueContext, chains: Sequence[DescriptorChain]) -> list[Completion]:
        backlog = self.port.queues[pair_of(queue.index)]
        header = rx_header(self.header_len)
        done: list[Completion] = []
        for chain in chains:
            if not len(backlog):
                done.append((chain.head, 0))
                continue
            frame = backlog.get_nowait()
            needed = len(header) + len(frame)
            if chain.writable_len < needed:
                # One buffer per frame (num_buffers = 1 even with MRG_RXBUF); a buffer
                # this small cannot take it. Linux posts buffers that always fit.
                self.rx_too_small += 1
                done.append((chain.head, 0))
                continue
            writer = ChainWriter(queue.memory, chain)
            writer.write(header)
            writer.write(frame)
            done.append((chain.head, needed))
        return done
