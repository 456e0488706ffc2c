"""Split virtqueues over guest memory: synchronous and pure (no I/O, no trio).

The device side is :class:`SplitQueue`, built from untrusted :class:`QueueState` data (whole
batches come out as :class:`DescriptorChain` lists or as a :class:`ChainBatch` of arrays); the
driver (guest) side, for the Python frontend and tests, is :class:`DriverQueue`.
"""

from __future__ import annotations

from .batch import ChainBatch as ChainBatch
from .chain import MAX_CHAIN_BYTES as MAX_CHAIN_BYTES
from .chain import ChainReader as ChainReader
from .chain import ChainWriter as ChainWriter
from .chain import DescriptorChain as DescriptorChain
from .chain import walk_chain as walk_chain
from .driver import DriverQueue as DriverQueue
from .driver import QueueFull as QueueFull
from .split import SplitQueue as SplitQueue
from .split import vring_need_event as vring_need_event
from .state import QueueState as QueueState

__all__ = [
    "MAX_CHAIN_BYTES",
    "ChainBatch",
    "ChainReader",
    "ChainWriter",
    "DescriptorChain",
    "DriverQueue",
    "QueueFull",
    "QueueState",
    "SplitQueue",
    "vring_need_event",
    "walk_chain",
]
