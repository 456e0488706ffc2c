"""ThreadedBlkDevice: virtio-blk whose disk I/O runs in a worker thread.

The inline :class:`BlkDevice` does its ``preadv``/``pwritev`` in the vring worker, which is
fastest while the image sits in the page cache but holds up every other ring and the
control task for as long as one system call takes (a cold disk, ``fdatasync``). This
variant hands each batch to a thread with :func:`trio.to_thread.run_sync`, so a slow disk
stalls only its own ring.

Cancellation: the thread is not abandoned on cancel, so a stop waits for the batch's
system calls to finish; the ring therefore never sees a request completed after its
worker stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import trio

from .blk import BlkDevice

if TYPE_CHECKING:
    from ..device import Completion, QueueContext
    from ..vring.chain import DescriptorChain

__all__ = ["ThreadedBlkDevice"]


class ThreadedBlkDevice(BlkDevice):
    """:class:`BlkDevice` with each batch's I/O in a thread (``trio-vhost blk --io thread``)."""

    is_async: ClassVar[bool] = True

    async def process_batch_async(
        self, queue: QueueContext, chains: Sequence[DescriptorChain]
    ) -> Sequence[Completion]:
        """Run the batch in a worker thread; always a checkpoint."""
        return await trio.to_thread.run_sync(self.process_batch, queue, chains)
