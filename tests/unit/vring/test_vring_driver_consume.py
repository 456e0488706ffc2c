"""DriverQueue.consume_used: the count-only twin of get_used."""

from __future__ import annotations

from typing import Any

import pytest

from trio_vhost.errors import VirtqueueError


@pytest.mark.parametrize("start", [0, 65530])
def test_consume_used_counts_and_recycles(make_ring: Any, start: int) -> None:
    ring = make_ring(16, start=start)
    for _ in range(5):  # several rounds so indices and ring slots wrap
        ring.driver.add_batch(12, 64, write=True)
        ring.driver.publish()
        chains = ring.queue.pop_batch(16)
        ring.queue.add_used_batch([(c.head, 64) for c in chains])
        assert ring.driver.consume_used() == 12
        assert ring.driver.consume_used() == 0
        assert ring.driver.num_free == 16


def test_consume_used_refuses_a_head_not_in_flight(make_ring: Any) -> None:
    ring = make_ring(8)
    ring.driver.add_batch(2, 64)
    ring.driver.publish()
    chains = ring.queue.pop_batch(8)
    ring.queue.add_used_batch([(chains[0].head, 0), (chains[0].head, 0)])  # twice: a bug
    with pytest.raises(VirtqueueError):
        ring.driver.consume_used()
