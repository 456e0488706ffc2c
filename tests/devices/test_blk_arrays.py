"""virtio-blk's array path (blk_fast.py) against its chain path, request by request.

Each case lays a batch of requests (good and hostile) into guest memory, then runs it twice
from the same guest memory and image: through ``pop_arrays`` + ``process_arrays`` and
through ``pop_batch`` + ``process_batch``. Both must agree on everything: the error (a broken
chain stops the ring before any request runs), every used length, every byte of guest
memory and of the image. And the backend may change no guest byte outside the writable
buffers of the batch's chains (canaries around both regions stay intact).

Guest memory (one memfd), two regions the backend maps and three canaries it does not::

    [canary 4K][A 192K: rings, headers, data][canary 4K][B 64K: far buffers][canary 4K]
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from trio_vhost.device import QueueContext
from trio_vhost.devices import blk_fast
from trio_vhost.devices.blk import BlkDevice
from trio_vhost.devices.blk_fast import FAST_MIN
from trio_vhost.devices.blk_spec import DISCARD_SEGMENT, REQUEST_HEADER, RequestType, Status
from trio_vhost.errors import VirtqueueError
from trio_vhost.mem import GuestRam, MemoryTable
from trio_vhost.vring import QueueState, SplitQueue
from trio_vhost.vring.layout import DESC_DTYPE
from trio_vhost.vring.layout import VIRTQ_DESC_F_INDIRECT as IND
from trio_vhost.vring.layout import VIRTQ_DESC_F_NEXT as NEXT
from trio_vhost.vring.layout import VIRTQ_DESC_F_WRITE as WRITE

K = 1024
GPA = 0x100_0000
A, B = GPA + 4 * K, GPA + 200 * K
END = B + 64 * K
CANARIES = [(GPA, 4 * K), (A + 192 * K, 4 * K), (END, 4 * K)]
SIZE = 128  # ring entries
DESC, AVAIL, USED = A, A + 0x800, A + 0xA00
TABLES = A + 0x1000  # indirect tables: 12K
SECTORS = 256  # image: 128 KiB
IN, OUT = int(RequestType.IN), int(RequestType.OUT)


@dataclass
class Guest:
    """Guest memory, the backend's table of it, an image, and a bump allocator per region."""

    ram: GuestRam
    table: MemoryTable
    image: int
    path: Path
    cursor: dict[str, int] = field(default_factory=dict)
    tables: int = TABLES  # where the next indirect table goes

    def alloc(self, where: str, n: int) -> int:
        """Allocate ``n`` bytes in region ``where``; buffers never overlap (the two paths
        order requests differently, which only shows where buffers overlap)."""
        base = self.cursor.get(where, {"A": A + 0x4000, "B": B}[where])
        end = {"A": A + 192 * K, "B": END}[where]
        if base + n > end:
            raise Full
        self.cursor[where] = base + (n + 15) // 16 * 16
        return base


class Full(Exception):
    """A region of the test's guest memory is used up."""


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Guest]:
    ram = GuestRam.create(END - GPA + 4 * K, gpa=GPA)
    table = MemoryTable.from_regions(
        [ram.backend_region(4 * K, 192 * K), ram.backend_region(200 * K, 64 * K)]
    )
    path = tmp_path / "disk.img"
    image = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    yield Guest(ram, table, image, path)
    os.close(image)
    table.close()
    ram.close()


@dataclass
class Request:
    """One request's descriptors as (gpa, len, flags), with its guest bytes to write first."""

    descs: list[tuple[int, int, int]]
    fill: list[tuple[int, bytes]]


def request(
    g: Guest,
    rtype: int,
    sector: int,
    data: list[tuple[str, int]],
    *,
    out: bool | None = None,
    header: str = "ok",
    status: str = "ok",
) -> Request:
    """Lay out one request: header, data buffers (region, length), status byte.

    ``out`` chooses the data direction (default: readable for OUT, writable otherwise);
    ``header`` "ok", "short" (8 bytes), "split" (8 + 8), "B" (in region B), "outside";
    ``status`` "ok", "two" (2 bytes), "none", "B", "outside", "first" (before the data).
    """
    rng = np.random.default_rng(sector + 7 * len(data) + rtype)
    raw = REQUEST_HEADER.pack(rtype, 0, sector)
    descs: list[tuple[int, int, int]] = []
    fill: list[tuple[int, bytes]] = []
    if header == "outside":
        descs.append((END + 64, 16, 0))
    elif header == "split":
        for part in (raw[:8], raw[8:]):
            gpa = g.alloc("A", 8)
            descs.append((gpa, 8, 0))
            fill.append((gpa, part))
    else:
        n = 8 if header == "short" else 16
        gpa = g.alloc("B" if header == "B" else "A", n)
        descs.append((gpa, n, 0))
        fill.append((gpa, raw[:n]))
    readable_data = rtype in (OUT, int(RequestType.DISCARD)) if out is None else out
    status_desc: list[tuple[int, int, int]] = []
    if status != "none":
        if status == "outside":
            status_desc.append((END + 8, 1, WRITE))
        else:
            n = 2 if status == "two" else 1
            status_desc.append((g.alloc("B" if status == "B" else "A", n), n, WRITE))
    if status == "first":
        descs += status_desc
    for where, n in data:
        gpa = g.alloc(where, n)
        descs.append((gpa, n, 0 if readable_data else WRITE))
        if readable_data:
            fill.append((gpa, rng.integers(0, 256, n, dtype=np.uint8).tobytes()))
    if status != "first":
        descs += status_desc
    return Request(descs, fill)


def lay_out(g: Guest, requests: list[Request], *, indirect: bool = False) -> QueueState:
    """Write the descriptor table, the available ring and every request's bytes.

    ``indirect``: each request is one ring descriptor pointing at a table of its own in
    region A (how Linux posts multi-buffer requests with VIRTIO_F_INDIRECT_DESC).
    """
    g.ram.view[:] = 0x5A
    for gpa, n in CANARIES:
        g.ram.fill(gpa, n, 0xA5)
    rows = np.zeros(SIZE, dtype=DESC_DTYPE)
    heads = []
    index = 0
    for req in requests:
        heads.append(index)
        table = np.zeros(len(req.descs), dtype=DESC_DTYPE)
        for k, (gpa, n, flags) in enumerate(req.descs):
            last = k + 1 == len(req.descs)
            if indirect:
                table[k] = (gpa, n, flags | (0 if last else NEXT), 0 if last else k + 1)
            else:
                rows[index] = (gpa, n, flags | (0 if last else NEXT), 0 if last else index + 1)
                index += 1
        if indirect:
            where = g.tables
            g.tables += len(table) * 16
            g.ram.write(where, table.tobytes())
            rows[index] = (where, len(table) * 16, IND, 0)
            index += 1
        for gpa, data in req.fill:
            g.ram.write(gpa, data)
    assert index <= SIZE
    g.ram.write(DESC, rows.tobytes())
    avail = np.zeros(3 + SIZE, dtype="<u2")
    avail[1] = len(heads)
    avail[2 : 2 + len(heads)] = heads
    g.ram.write(AVAIL, avail.tobytes())
    return QueueState(size=SIZE, desc_gpa=DESC, avail_gpa=AVAIL, used_gpa=USED, indirect=indirect)


@dataclass
class Outcome:
    error: type[Exception] | None
    used: list[int]
    ram: np.ndarray
    image: bytes
    fast: int = 0  # requests the array path did itself (not through the chain code)


def run(g: Guest, state: QueueState, image: bytes, device: BlkDevice, *, arrays: bool) -> Outcome:
    """Run the batch from ``image`` and the current guest memory, restored afterwards."""
    ram_before = g.ram.view.copy()
    os.ftruncate(g.image, 0)
    os.pwrite(g.image, image, 0)
    context = QueueContext(0, g.table, enabled=True)
    queue = SplitQueue(g.table, state)
    fast = 0
    try:
        if arrays:
            batch = queue.pop_arrays(SIZE)
            with mock.patch.object(blk_fast, "_run", wraps=blk_fast._run) as spy:
                used = device.process_arrays(context, batch).tolist()
            fast = sum(len(call.args[3].reads) for call in spy.call_args_list)
        else:
            chains = queue.pop_batch(SIZE)
            used = [n for _, n in device.process_batch(context, chains)]
        error = None
    except VirtqueueError as exc:
        error, used = type(exc), []
    after = g.ram.view.copy()
    g.ram.view[:] = ram_before
    with open(g.path, "rb") as f:
        disk = f.read()
    return Outcome(error, used, after, disk, fast)


def allowed(requests: list[Request]) -> np.ndarray:
    """Guest bytes the backend may write: the writable buffers of well-formed chains."""
    mask = np.zeros(END - GPA + 4 * K, dtype=bool)
    for req in requests:
        for gpa, n, flags in req.descs:
            if flags & WRITE and gpa >= A and gpa + n <= END:
                mask[gpa - GPA : gpa - GPA + n] = True
    return mask


def compare(
    g: Guest,
    requests: list[Request],
    *,
    read_only: bool = False,
    writeback: bool = True,
    indirect: bool = False,
) -> Outcome:
    """Run ``requests`` both ways; assert they agree; return the array path's outcome."""
    g.tables = TABLES
    state = lay_out(g, requests, indirect=indirect)
    before = g.ram.view.copy()
    image = np.random.default_rng(1).integers(0, 256, SECTORS * 512, dtype=np.uint8).tobytes()
    os.ftruncate(g.image, len(image))
    outcomes = []
    for arrays in (True, False):
        device = BlkDevice(g.image, read_only=read_only)
        device.writeback = writeback
        outcomes.append(run(g, state, image, device, arrays=arrays))
    fast, slow = outcomes
    assert fast.error == slow.error
    assert fast.used == slow.used
    assert (fast.ram == slow.ram).all(), "guest memory differs between the paths"
    assert fast.image == slow.image, "the image differs between the paths"
    changed = np.flatnonzero(fast.ram != before)
    outside = changed[~allowed(requests)[changed]]
    assert not len(outside), f"wrote guest bytes outside the buffers: {outside[:8] + GPA}"
    return fast


def statuses(g: Guest, requests: list[Request], outcome: Outcome) -> list[int]:
    """The status byte of each request (the last byte of its writable buffers)."""
    out = []
    for req in requests:
        writable = [(gpa, n) for gpa, n, flags in req.descs if flags & WRITE]
        if not writable:
            out.append(-1)
            continue
        gpa, n = writable[-1]
        out.append(int(outcome.ram[gpa + n - 1 - GPA]))
    return out


# -- fixed cases ------------------------------------------------------------------------------


def reads(g: Guest, count: int, **kw: object) -> list[Request]:
    return [request(g, IN, 8 * i, [("A", 4096)], **kw) for i in range(count)]  # type: ignore[arg-type]


@pytest.mark.parametrize("indirect", [False, True])
def test_plain_reads_and_writes(guest: Guest, indirect: bool) -> None:
    reqs = reads(guest, 10) + [request(guest, OUT, 100 + 8 * i, [("A", 4096)]) for i in range(10)]
    outcome = compare(guest, reqs, indirect=indirect)
    assert outcome.used == [4097] * 10 + [1] * 10
    assert statuses(guest, reqs, outcome) == [Status.OK] * 20
    assert outcome.fast == 20


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ({"header": "short"}, Status.IOERR),
        ({"header": "split"}, Status.OK),
        ({"header": "B"}, Status.OK),
        ({"status": "two"}, Status.IOERR),
        ({"status": "B"}, Status.OK),
        ({"out": True}, Status.IOERR),  # IN whose data is device-readable
    ],
)
def test_odd_layouts_give_the_chain_path_status(guest: Guest, variant, expected) -> None:
    reqs = reads(guest, 8)
    reqs[3] = request(guest, IN, 40, [("A", 4096)], **variant)
    outcome = compare(guest, reqs)
    assert statuses(guest, reqs, outcome)[3] == expected
    assert outcome.fast >= 7
    assert statuses(guest, reqs, outcome)[:3] == [Status.OK] * 3


def test_data_in_a_region_the_header_is_not(guest: Guest) -> None:
    reqs = [request(guest, IN if i % 2 else OUT, 8 * i, [("B", 2048)]) for i in range(10)]
    outcome = compare(guest, reqs)
    assert statuses(guest, reqs, outcome) == [Status.OK] * 10
    assert outcome.fast == 10


@pytest.mark.parametrize("where", ["header", "status", "data"])
def test_buffers_outside_memory_stop_the_ring(guest: Guest, where: str) -> None:
    reqs = reads(guest, 10)
    if where == "header":
        reqs[4] = request(guest, IN, 0, [("A", 512)], header="outside")
    elif where == "status":
        reqs[4] = request(guest, IN, 0, [("A", 512)], status="outside")
    else:
        reqs[4].descs[1] = (END - 100, 512, WRITE)
    assert compare(guest, reqs).error is VirtqueueError


def test_read_after_write_order_stops_the_ring(guest: Guest) -> None:
    reqs = reads(guest, 10)
    reqs[6] = request(guest, OUT, 0, [("A", 512)], status="first")
    assert compare(guest, reqs).error is VirtqueueError


@pytest.mark.parametrize("writeback", [True, False])
def test_read_only_image_refuses_writes(guest: Guest, writeback: bool) -> None:
    reqs = [request(guest, OUT if i % 3 else IN, 8 * i, [("A", 1024)]) for i in range(12)]
    outcome = compare(guest, reqs, read_only=True, writeback=writeback)
    got = statuses(guest, reqs, outcome)
    assert got == [Status.IOERR if i % 3 else Status.OK for i in range(12)]
    outcome = compare(guest, reqs, read_only=False, writeback=writeback)
    assert statuses(guest, reqs, outcome) == [Status.OK] * 12


@pytest.mark.parametrize(
    ("sector", "length", "ok"),
    [
        (SECTORS - 8, 4096, True),
        (SECTORS - 7, 4096, False),
        (SECTORS, 512, False),
        (2**64 - 1, 512, False),
        (2**55, 512, False),
        (0, 1000, False),  # not whole sectors
    ],
)
def test_sector_ranges(guest: Guest, sector: int, length: int, ok: bool) -> None:
    reqs = reads(guest, 6)
    reqs[2] = request(guest, IN, sector, [("A", length)])
    reqs[4] = request(guest, OUT, sector, [("A", length)])
    got = statuses(guest, reqs, compare(guest, reqs))
    assert got[2] == got[4] == (Status.OK if ok else Status.IOERR)


def test_other_request_types_in_a_fast_batch(guest: Guest) -> None:
    reqs = reads(guest, 8)
    reqs[1] = request(guest, int(RequestType.FLUSH), 0, [])
    reqs[2] = request(guest, int(RequestType.GET_ID), 0, [("A", 20)])
    reqs[5] = request(guest, 77, 0, [("A", 512)])
    segment = DISCARD_SEGMENT.pack(8, 8, 0)
    reqs[6] = request(guest, int(RequestType.DISCARD), 0, [("A", len(segment))])
    guest.ram.write(reqs[6].descs[1][0], segment)
    reqs[6].fill.append((reqs[6].descs[1][0], segment))
    got = statuses(guest, reqs, compare(guest, reqs))
    assert got[5] == Status.UNSUPP
    assert got[1] == got[2] == got[6] == Status.OK


@pytest.mark.parametrize("indirect", [False, True])
def test_several_data_buffers_per_request(guest: Guest, indirect: bool) -> None:
    reqs = [request(guest, IN, 8 * i, [("A", 1024), ("B", 512), ("A", 2560)]) for i in range(6)]
    reqs += [request(guest, OUT, 80 + 8 * i, [("B", 512), ("A", 3584)]) for i in range(6)]
    outcome = compare(guest, reqs, indirect=indirect)
    assert statuses(guest, reqs, outcome) == [Status.OK] * 12
    assert outcome.used == [4097] * 6 + [1] * 6
    assert outcome.fast == 12


def test_short_read_past_a_shrunk_image_fails_that_request_only(guest: Guest) -> None:
    reqs = reads(guest, 10)
    reqs[7] = request(guest, IN, SECTORS - 8, [("A", 4096)])
    state = lay_out(guest, reqs)
    image = bytes(SECTORS * 512)
    device = BlkDevice(guest.image)
    os.ftruncate(guest.image, len(image))
    assert device.capacity == SECTORS  # cached: the shrink below is not seen
    os.ftruncate(guest.image, (SECTORS - 4) * 512)
    queue = SplitQueue(guest.table, state)
    used = device.process_arrays(QueueContext(0, guest.table, enabled=True), queue.pop_arrays(64))
    assert used.tolist() == [4097] * 10
    outcome = Outcome(None, used.tolist(), guest.ram.view.copy(), b"")
    expected = [Status.OK] * 10
    expected[7] = Status.IOERR
    assert statuses(guest, reqs, outcome) == expected


def test_io_error_fails_that_request_only(guest: Guest) -> None:
    """Reads from an image opened write-only fail (EBADF); the writes still succeed."""
    reqs = [request(guest, IN if i % 2 else OUT, 8 * i, [("A", 512)]) for i in range(10)]
    state = lay_out(guest, reqs)
    os.ftruncate(guest.image, SECTORS * 512)
    fd = os.open(guest.path, os.O_WRONLY)
    try:
        device = BlkDevice(fd)
        queue = SplitQueue(guest.table, state)
        batch = queue.pop_arrays(64)
        device.process_arrays(QueueContext(0, guest.table, enabled=True), batch)
    finally:
        os.close(fd)
    outcome = Outcome(None, [], guest.ram.view.copy(), b"")
    assert statuses(guest, reqs, outcome) == [
        Status.IOERR if i % 2 else Status.OK for i in range(10)
    ]


# -- random batches -----------------------------------------------------------------------------

kinds = st.sampled_from(
    [IN] * 6 + [OUT] * 4 + [int(RequestType.FLUSH), int(RequestType.GET_ID), 77]
)
sectors = st.one_of(
    st.integers(0, SECTORS - 8),
    st.integers(0, SECTORS - 8),
    st.sampled_from([SECTORS - 1, SECTORS, 2**32, 2**63, 2**64 - 1]),
)
data_lengths = st.one_of(st.sampled_from([512, 1024, 4096]), st.integers(1, 1600))
buffers = st.tuples(st.sampled_from(["A", "A", "B"]), data_lengths)
datas = st.one_of(
    st.lists(
        st.tuples(st.sampled_from(["A", "A", "B"]), st.sampled_from([512, 4096])),
        min_size=1,
        max_size=1,
    ),
    st.lists(
        st.tuples(st.sampled_from(["A", "A", "B"]), st.sampled_from([512, 4096])),
        min_size=1,
        max_size=1,
    ),
    st.lists(buffers, min_size=0, max_size=3),
)
odd = st.tuples(
    kinds,
    sectors,
    datas,
    st.sampled_from([None] * 6 + [True, False]),
    st.sampled_from(["ok"] * 8 + ["short", "split", "B"]),
    st.sampled_from(["ok"] * 8 + ["two", "none", "B"]),
)
good = st.tuples(
    st.sampled_from([IN, OUT]),
    st.integers(0, SECTORS - 8),
    st.lists(
        st.tuples(st.sampled_from(["A", "A", "B"]), st.sampled_from([512, 1024, 4096])),
        min_size=1,
        max_size=2,
    ),
    st.just(None),
    st.just("ok"),
    st.just("ok"),
)
spec = st.one_of(good, good, odd)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    specs=st.one_of(
        st.lists(spec, min_size=1, max_size=5), st.lists(spec, min_size=6, max_size=40)
    ),
    read_only=st.booleans(),
    writeback=st.booleans(),
    indirect=st.booleans(),
)
def test_random_batches_agree(
    guest: Guest, specs, read_only: bool, writeback: bool, indirect: bool
) -> None:
    guest.cursor.clear()
    reqs: list[Request] = []
    used = 0
    for kind, sector, data, out, header, status in specs:
        try:
            req = request(guest, kind, sector, data, out=out, header=header, status=status)
        except Full:
            break
        if used + len(req.descs) > SIZE:
            break
        used += len(req.descs)
        reqs.append(req)
    outcome = compare(guest, reqs, read_only=read_only, writeback=writeback, indirect=indirect)
    event(f"{'fast-sized' if len(reqs) >= FAST_MIN else 'small'} batch")
    if outcome.error is None:
        ok = sum(s == Status.OK for s in statuses(guest, reqs, outcome))
        event(f"OK {ok * 4 // len(reqs)}/4")
        event(f"fast {outcome.fast * 4 // len(reqs)}/4")
