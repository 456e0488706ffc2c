"""A hostile guest through the server: a corrupt ring stops alone and can be restarted.

For each kind of corruption the broken ring signals its err eventfd (the driver's
``wait_used`` raises :class:`VringFailed`), writes nothing outside what the guest handed
out, the other ring keeps completing I/O, the control connection keeps answering, and after
the guest repairs the ring a new SET_VRING_KICK restarts it exactly where it stopped: the
repaired chain completes once and no earlier chain completes again.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
import trio.testing
from vhost_dp_harness import (
    RAM_GPA,
    Rig,
    fail_after,
    make_device,
    open_rig,
    read_desc,
)

from trio_vhost import RequestNacked, VringFailed
from trio_vhost.vring.layout import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT

Repair = Callable[[], None]
DESC = struct.Struct("<QIHH")


def _last_desc(rig: Rig, head: int) -> int:
    queue = rig.queue(0)
    index = head
    while True:
        _, _, flags, nxt = read_desc(queue, index)
        if not flags & VIRTQ_DESC_F_NEXT:
            return index
        index = nxt


def _patch_desc(rig: Rig, index: int, **change: int) -> Repair:
    """Rewrite descriptor ``index`` of ring 0's table; return what puts it back."""
    queue = rig.queue(0)
    addr, length, flags, nxt = read_desc(queue, index)
    new = {"addr": addr, "length": length, "flags": flags, "nxt": nxt, **change}
    queue.write_desc(index, new["addr"], new["length"], new["flags"], new["nxt"])
    return lambda: queue.write_desc(index, addr, length, flags, nxt)


def corrupt_loop(rig: Rig, head: int) -> Repair:
    last = _last_desc(rig, head)
    _, _, flags, _ = read_desc(rig.queue(0), last)
    return _patch_desc(rig, last, flags=flags | VIRTQ_DESC_F_NEXT, nxt=head)


def corrupt_next_out_of_range(rig: Rig, head: int) -> Repair:
    last = _last_desc(rig, head)
    _, _, flags, _ = read_desc(rig.queue(0), last)
    return _patch_desc(rig, last, flags=flags | VIRTQ_DESC_F_NEXT, nxt=rig.size + 5)


def corrupt_outside_memory(rig: Rig, head: int) -> Repair:
    # The last (writable) buffer now points into the canary zone in front of the region:
    # the same memfd, but not guest memory as far as the backend's table goes.
    return _patch_desc(rig, _last_desc(rig, head), addr=RAM_GPA + 0x100)


def corrupt_nested_indirect(rig: Rig, head: int) -> Repair:
    # The last entry of the chain's indirect table becomes an indirect descriptor itself
    # (pointing back at the table: valid memory, only the nesting is forbidden).
    queue = rig.queue(0)
    table, length, flags, _ = read_desc(queue, head)
    assert flags & VIRTQ_DESC_F_INDIRECT
    entry = table + length - 16
    saved = queue.ram.read(entry, 16)
    _, _, fl, nx = read_desc(queue, 0, entry)
    queue.ram.write(entry, DESC.pack(table, 16, fl | VIRTQ_DESC_F_INDIRECT, nx))
    return lambda: queue.ram.write(entry, saved)


def corrupt_head_out_of_range(rig: Rig, head: int) -> Repair:
    queue = rig.queue(0)
    slot = queue.avail_idx - 1
    queue.write_avail_slot(slot, rig.size + 3)
    return lambda: queue.write_avail_slot(slot, head)


def corrupt_idx_jump(rig: Rig, head: int) -> Repair:
    queue = rig.queue(0)
    queue.set_avail_idx(queue.avail_idx + rig.size + 1)
    return lambda: queue.set_avail_idx(queue.avail_idx)


CASES = {
    "loop": (corrupt_loop, False),
    "next_oob": (corrupt_next_out_of_range, False),
    "outside_memory": (corrupt_outside_memory, False),
    "nested_indirect": (corrupt_nested_indirect, True),
    "head_oob": (corrupt_head_out_of_range, False),
    "idx_jump": (corrupt_idx_jump, False),
}


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("case", sorted(CASES))
@fail_after(20)
async def test_hostile_ring_stops_alone_and_restarts(case: str, kind: str) -> None:
    corrupt, indirect = CASES[case]
    device = make_device(kind)
    async with open_rig(device) as rig:
        for index in (0, 1):
            for _ in range(3):
                rig.add(index, body=b"warm-up")
            await rig.wait_done(index, 3)

        tag, head = rig.add(0, body=b"bad", split=True, indirect=indirect, publish=False)
        queue = rig.queue(0)
        queue.publish()
        repair = corrupt(rig, head)
        await trio.testing.wait_all_tasks_blocked()
        before = rig.snapshot()
        rig.vring(0).kick.write(1)
        with pytest.raises(VringFailed):
            await rig.vring(0).wait_used(1)
        # the broken ring wrote nothing: not even a used entry
        rig.assert_backend_wrote_only(before)
        assert queue.used_idx() == 3

        # the other ring and the control connection carry on
        for _ in range(4):
            rig.add(1, body=b"still here", split=True)
        await rig.wait_done(1, 4)
        assert await rig.get_features()

        # the guest repairs the ring and kicks it back to life with SET_VRING_KICK
        repair()
        await rig.rekick(0)
        assert await rig.wait_done(0, 1) == [tag]
        for _ in range(3):
            rig.add(0, body=b"after")
        await rig.wait_done(0, 3)
        for index in (0, 1):
            rig.assert_exactly_once(index)
            assert device.seen[index] == rig.added[index]
        assert await rig.get_vring_base(0) == queue.avail_idx == queue.used_idx() == 7


@fail_after(20)
async def test_broken_ring_can_be_reprogrammed_without_get_vring_base() -> None:
    device = make_device("sync")
    nacked: list[str] = []
    async with open_rig(device) as rig:
        rig.add(0)
        await rig.wait_done(0, 1)
        tag, head = rig.add(0, split=True, publish=False)
        rig.queue(0).publish()
        repair = corrupt_loop(rig, head)
        rig.vring(0).kick.write(1)
        with pytest.raises(VringFailed):
            await rig.vring(0).wait_used(1)
        repair()
        # reprogram the stopped ring the way a frontend starts any ring: BASE, then KICK
        try:
            await rig.restart(0, 1)
        except RequestNacked as exc:
            nacked.append(str(exc))
        else:
            assert await rig.wait_done(0, 1) == [tag]
            rig.assert_exactly_once(0)
    assert not nacked, nacked
