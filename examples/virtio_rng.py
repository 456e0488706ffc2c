"""A complete virtio-rng (entropy) device in a few lines: how to write a device.

Run it, then attach QEMU::

    python examples/virtio_rng.py /tmp/rng.sock
    qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on \\
        -machine q35,memory-backend=mem \\
        -chardev socket,id=rng0,path=/tmp/rng.sock \\
        -device vhost-user-rng-pci,chardev=rng0

Every chain the guest posts on the single queue is filled with random bytes; the guest's
virtio_rng driver serves them on /dev/hwrng (tests/interop/test_example_rng.py boots such a
guest).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

import trio

from trio_vhost import Completion, DescriptorChain, Device, QueueContext, serve


class RngDevice(Device):
    """virtio-rng: one queue of device-writable buffers, filled with entropy."""

    num_queues = 1

    def process_batch(
        self, queue: QueueContext, chains: Sequence[DescriptorChain]
    ) -> Sequence[Completion]:
        """Fill every writable buffer with random bytes."""
        done = []
        for chain in chains:
            for gpa, length in chain.writable:
                queue.memory.write(gpa, os.urandom(length))
            done.append((chain.head, chain.writable_len))
        return done


def main() -> None:
    """Serve the device on the socket path given on the command line."""
    logging.basicConfig(level=logging.INFO)
    path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/trio-vhost-rng.sock"
    trio.run(serve, RngDevice(), path)


if __name__ == "__main__":
    main()
